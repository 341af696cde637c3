//! A broadcast-reduce node: what sits between the store and the workers.
//!
//! Two independent loops, so that neither direction can hold the other up:
//! - down: every frame from the parent is forwarded to each child in turn,
//!   as it arrives (chunks, not whole tensors);
//! - up: the next frame is taken from child 0, then child 1, ... (each child
//!   sends the same sequence of chunks, because each runs the same schedule
//!   and cuts messages at the same offsets); their headers must agree, and
//!   the sum is computed in child order in fp32 (f64 for statistics) and
//!   sent to the parent. Waiting on the children in index order is what
//!   makes the sum's order fixed: it never depends on which child was first.
//!
//! Flow control is the links' credit: a node holds at most the credits of
//! its links in each direction.

use crate::{Dtype, FabricError, Frame, Kind, Link};
use bytes::Bytes;
use std::collections::VecDeque;
use tokio::task::JoinHandle;

/// The elementwise sum of children's chunks, in child order.
pub fn reduce(frames: &[Frame]) -> Result<Frame, FabricError> {
    let first = frames.first().expect("a node has children");
    if let Some((i, f)) = frames.iter().enumerate().find(|(_, f)| f.key() != first.key()) {
        return Err(FabricError::Protocol(format!(
            "children disagree: child 0 sent {:?}, child {i} sent {:?}",
            first.key(),
            f.key()
        )));
    }
    if first.kind != Kind::Grads && first.kind != Kind::Stats {
        return Err(FabricError::Protocol(format!("a {:?} frame travelling up", first.kind)));
    }
    let payload = match first.dtype {
        Dtype::F32 => sum_into_owned::<f32>(frames),
        Dtype::F64 => sum_into_owned::<f64>(frames),
        other => return Err(FabricError::Protocol(format!("cannot sum {other:?} chunks"))),
    };
    Ok(Frame { payload, ..first.clone() })
}

/// A sum buffer handed to `Bytes` without re-encoding it (the wire is
/// little-endian, as is every target we build for).
struct Sum<T>(Vec<T>);

impl<T: Copy> AsRef<[u8]> for Sum<T> {
    fn as_ref(&self) -> &[u8] {
        const { assert!(cfg!(target_endian = "little")) };
        // SAFETY: f32 and f64 have no padding; any initialized value is valid bytes.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), std::mem::size_of_val(self.0.as_slice())) }
    }
}

/// The element types a node sums, read from little-endian bytes.
trait Element: Copy + std::ops::AddAssign + Send + Sync + 'static {
    const SIZE: usize;
    fn le(b: &[u8]) -> Self;
}

impl Element for f32 {
    const SIZE: usize = 4;
    #[inline(always)]
    fn le(b: &[u8]) -> f32 {
        f32::from_le_bytes(b.try_into().expect("4 bytes"))
    }
}

impl Element for f64 {
    const SIZE: usize = 8;
    #[inline(always)]
    fn le(b: &[u8]) -> f64 {
        f64::from_le_bytes(b.try_into().expect("8 bytes"))
    }
}

/// Elements summed at a time: a block of the sum that stays in L1 while
/// every child's piece of it is added.
const SUM_BLOCK: usize = 1024;

/// child 0 + child 1 + ... in that order, element by element.
///
/// One pass over the payloads, a block at a time: the block of partial sums
/// stays in L1 while each child's piece is added, so every byte is read once
/// (summing child by child over the whole chunk read and wrote the partial
/// sums F - 1 times, and ran at a quarter of the speed at F = 4). The order
/// of the additions of each element is the same: ((c0 + c1) + c2) + ...
/// [`sum_reference`] is the plain form it is tested against.
fn sum_into_owned<T: Element>(frames: &[Frame]) -> Bytes {
    let n = frames[0].payload.len() / T::SIZE;
    let mut acc: Vec<T> = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let len = SUM_BLOCK.min(n - start);
        let bytes = start * T::SIZE..(start + len) * T::SIZE;
        acc.extend(frames[0].payload[bytes.clone()].chunks_exact(T::SIZE).map(T::le));
        let part = &mut acc[start..];
        for f in &frames[1..] {
            for (a, b) in part.iter_mut().zip(f.payload[bytes.clone()].chunks_exact(T::SIZE)) {
                *a += T::le(b);
            }
        }
        start += len;
    }
    Bytes::from_owner(Sum(acc))
}

/// The plain sum, child by child over the whole payload.
#[cfg(test)]
fn sum_reference<T: Element>(frames: &[Frame]) -> Vec<T> {
    let mut acc: Vec<T> = frames[0].payload.chunks_exact(T::SIZE).map(T::le).collect();
    for f in &frames[1..] {
        for (a, b) in acc.iter_mut().zip(f.payload.chunks_exact(T::SIZE)) {
            *a += T::le(b);
        }
    }
    acc
}

#[cfg(test)]
fn decode_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
}

/// Sums a node runs at once on the blocking pool (multi-threaded runtimes).
const SUMS_IN_FLIGHT: usize = 4;
/// Chunks at least this large are summed off the node's task.
const PARALLEL_SUM_BYTES: usize = 64 << 10;

/// Whether this runtime has threads to sum on beside the node's own.
fn parallel_sums() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread)
}

/// A sum's result from the blocking pool.
fn joined(r: Result<Result<Frame, FabricError>, tokio::task::JoinError>) -> Result<Frame, FabricError> {
    r.map_err(|e| FabricError::Protocol(format!("a sum failed: {e}")))?
}

/// How long a node whose parent closed gives frames already received (a
/// last `Shutdown`) to be taken before it counts the parent as lost.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Runs one node until the parent sends `Shutdown` and the children close
/// (`Ok`), or until a neighbour is lost (`Err`; the node then drops every
/// link, so the loss reaches the whole tree).
pub async fn run(parent: Link, children: Vec<Link>, name: String) -> Result<(), FabricError> {
    assert!(!children.is_empty(), "a node has children");
    let parent_gone = parent.rx.peer_gone();
    let Link { tx: up_tx, rx: mut down_rx } = parent;
    // Whether the parent's Shutdown has been taken: the run ended.
    let (ended_down, mut ended) = tokio::sync::watch::channel(false);
    let lost_name = name.clone();
    let (child_tx, mut child_rx): (Vec<_>, Vec<_>) = children.into_iter().map(|l| (l.tx, l.rx)).unzip();
    let who = name.clone();
    let down = async move {
        let mut shutdown = false;
        while let Some(f) = down_rx.recv().await {
            shutdown = f.kind == Kind::Shutdown;
            if shutdown {
                let _ = ended_down.send(true);
            }
            for c in &child_tx {
                c.send(f.clone()).await?;
            }
            if shutdown {
                break;
            }
        }
        // Dropping the child senders tells the children the parent is gone.
        drop(child_tx);
        if shutdown {
            Ok(())
        } else {
            Err(FabricError::Closed(format!("{who}: the parent went away before the end of the run")))
        }
    };
    let up = async move {
        // Sums of large chunks run on the blocking pool, up to `depth` at a
        // time, and go up in the order their chunks came: one thread alone
        // sums F chunks slower than F links deliver them. In a
        // single-threaded runtime (the simulator) every sum is inline.
        let depth = if parallel_sums() { SUMS_IN_FLIGHT } else { 0 };
        let mut sums: VecDeque<JoinHandle<Result<Frame, FabricError>>> = VecDeque::new();
        let mut frames: Vec<Frame> = Vec::with_capacity(child_rx.len());
        let mut closed: Vec<usize> = Vec::new();
        loop {
            // The next child to hear from, in index order.
            let i = frames.len() + closed.len();
            if i == child_rx.len() {
                if closed.len() == child_rx.len() {
                    while let Some(h) = sums.pop_front() {
                        up_tx.send(joined(h.await)?).await?;
                    }
                    return Ok(());
                }
                if !closed.is_empty() {
                    return Err(FabricError::Closed(format!("{name}: children {closed:?} went away mid-step")));
                }
                let all = std::mem::replace(&mut frames, Vec::with_capacity(child_rx.len()));
                if depth > 0 && all[0].payload.len() >= PARALLEL_SUM_BYTES {
                    sums.push_back(tokio::task::spawn_blocking(move || reduce(&all)));
                } else {
                    // A small frame goes up after every sum ahead of it.
                    while let Some(h) = sums.pop_front() {
                        up_tx.send(joined(h.await)?).await?;
                    }
                    up_tx.send(reduce(&all)?).await?;
                }
                continue;
            }
            tokio::select! {
                biased;
                r = async { sums.front_mut().expect("guarded").await }, if !sums.is_empty() => {
                    sums.pop_front();
                    up_tx.send(joined(r)?).await?;
                }
                f = child_rx[i].recv(), if sums.len() < depth.max(1) => match f {
                    Some(f) => frames.push(f),
                    None => closed.push(i),
                },
            }
        }
    };
    // The first loss ends both directions (and drops every link). A parent
    // that goes away before the end also ends them, even while the down
    // direction waits on a child that stopped reading. A parent that closes
    // right after its Shutdown is not lost: the Shutdown may still wait in
    // the link to be taken, so the down direction has `SHUTDOWN_GRACE` to
    // take it.
    let lost_parent = async move {
        parent_gone.await;
        if tokio::time::timeout(SHUTDOWN_GRACE, ended.wait_for(|&e| e)).await.is_ok_and(|r| r.is_ok()) {
            std::future::pending::<()>().await;
        }
        FabricError::Closed(format!("{lost_name}: the parent went away before the end of the run"))
    };
    // Biased: the simulator's runs depend on the seed only.
    tokio::select! {
        biased;
        r = async { tokio::try_join!(down, up) } => r.map(|_| ()),
        e = lost_parent => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grads(vals: &[f32]) -> Frame {
        Frame {
            kind: Kind::Grads,
            dtype: Dtype::F32,
            step: 1,
            use_index: 0,
            layer: 0,
            offset: 0,
            total: 4 * vals.len() as u64,
            payload: Bytes::from(vals.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()),
        }
    }

    #[test]
    fn the_sum_is_in_child_order() {
        // (1e8 + -1e8) + 1 = 1, but 1e8 + (-1e8 + 1) = 0 in f32: the order shows.
        let fs = [grads(&[1e8, 2.0]), grads(&[-1e8, 3.0]), grads(&[1.0, 4.0])];
        let s = reduce(&fs).unwrap();
        assert_eq!(decode_f32(&s.payload), vec![1.0, 9.0]);
        let fs = [grads(&[-1e8, 3.0]), grads(&[1.0, 4.0]), grads(&[1e8, 2.0])];
        assert_eq!(decode_f32(&reduce(&fs).unwrap().payload), vec![0.0, 9.0]);
    }

    /// The blocked sum against the plain one, bit for bit, over payloads
    /// of several blocks plus a partial one, with values whose sum depends
    /// on the order (mixed magnitudes and signs).
    #[test]
    fn the_blocked_sum_equals_the_plain_sum_bit_for_bit() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let m = ((x >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 2.0;
            m * 10f64.powi((x % 16) as i32 - 8)
        };
        for children in [1, 2, 3, 4, 8] {
            for n in [1, SUM_BLOCK - 1, SUM_BLOCK, 3 * SUM_BLOCK + 17] {
                let f32s: Vec<Frame> =
                    (0..children).map(|_| grads(&(0..n).map(|_| next() as f32).collect::<Vec<_>>())).collect();
                let got = decode_f32(&reduce(&f32s).unwrap().payload);
                let want = sum_reference::<f32>(&f32s);
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
                let f64s: Vec<Frame> = (0..children)
                    .map(|_| {
                        let mut f = grads(&[]);
                        f.dtype = Dtype::F64;
                        f.kind = Kind::Stats;
                        f.payload = Bytes::from((0..n).flat_map(|_| next().to_le_bytes()).collect::<Vec<u8>>());
                        f.total = f.payload.len() as u64;
                        f
                    })
                    .collect();
                let got: Vec<u64> = reduce(&f64s)
                    .unwrap()
                    .payload
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                let want: Vec<u64> = sum_reference::<f64>(&f64s).iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want);
            }
        }
    }

    /// With threads to sum on, large chunks are summed off the node's task,
    /// several at once: the sums still go up in the order the chunks came,
    /// a small frame after them keeps its place, each sum is the plain one
    /// bit for bit, and the node still ends cleanly.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parallel_sums_go_up_in_order_and_exact() {
        let elems = PARALLEL_SUM_BYTES / 4;
        let frame_of = move |child: usize, k: usize| -> Frame {
            if k == 10 {
                let mut f = grads(&[]);
                (f.kind, f.dtype, f.step) = (Kind::Stats, Dtype::F64, 7);
                f.payload = Bytes::copy_from_slice(&(child as f64 + 0.25).to_le_bytes());
                f.total = 8;
                return f;
            }
            let vals: Vec<f32> = (0..elems)
                .map(|j| ((j * 31 + k * 7 + child * 13) % 1000) as f32 * 10f32.powi((j % 9) as i32 - 4))
                .collect();
            let mut f = grads(&vals);
            f.offset = (k * PARALLEL_SUM_BYTES) as u64;
            f.total = (30 * PARALLEL_SUM_BYTES) as u64;
            f
        };
        let (parent, mut store) = crate::link::inproc_pair(4, "node", "store");
        let (mut kids, mut senders) = (Vec::new(), Vec::new());
        for c in 0..3 {
            let (a, b) = crate::link::inproc_pair(4, "node", &format!("w{c}"));
            kids.push(a);
            senders.push(tokio::spawn(async move {
                let mut b = b;
                for k in 0..30 {
                    b.tx.send(frame_of(c, k)).await.unwrap();
                }
                // Stay until the run ends, as a worker does.
                while let Some(f) = b.rx.recv().await {
                    if f.kind == Kind::Shutdown {
                        break;
                    }
                }
            }));
        }
        let node = tokio::spawn(run(parent, kids, "n".into()));
        for k in 0..30 {
            let got = store.rx.recv().await.unwrap();
            let inputs: Vec<Frame> = (0..3).map(|c| frame_of(c, k)).collect();
            if k == 10 {
                assert_eq!(got.kind, Kind::Stats);
                assert_eq!(f64::from_le_bytes(got.payload[..].try_into().unwrap()), sum_reference::<f64>(&inputs)[0]);
                continue;
            }
            assert_eq!((got.kind, got.offset), (Kind::Grads, inputs[0].offset), "chunk {k} in its place");
            let want: Vec<u32> = sum_reference::<f32>(&inputs).iter().map(|v| v.to_bits()).collect();
            assert_eq!(decode_f32(&got.payload).iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want);
        }
        store.tx.send(Frame::control(Kind::Shutdown)).await.unwrap();
        for t in senders {
            t.await.unwrap();
        }
        node.await.unwrap().unwrap();
        assert!(store.rx.recv().await.is_none(), "the node closes its side");
    }

    #[test]
    fn children_that_disagree_are_a_protocol_error() {
        let mut b = grads(&[1.0]);
        b.layer = 1;
        assert!(reduce(&[grads(&[1.0]), b]).unwrap_err().to_string().contains("disagree"));
        let mut w = grads(&[1.0]);
        w.kind = Kind::Weights;
        assert!(reduce(&[w.clone(), w]).is_err());
    }

    #[tokio::test]
    async fn a_node_broadcasts_down_and_reduces_up_then_stops() {
        let (parent, mut store) = crate::link::inproc_pair(2, "node", "store");
        let mut kids = Vec::new();
        let mut leaves = Vec::new();
        for i in 0..3 {
            let (a, b) = crate::link::inproc_pair(2, "node", &format!("w{i}"));
            kids.push(a);
            leaves.push(b);
        }
        let node = tokio::spawn(run(parent, kids, "n".into()));
        store.tx.send(Frame::begin(crate::PassStart { training: true, index: 4 })).await.unwrap();
        for (i, l) in leaves.iter_mut().enumerate() {
            assert_eq!(l.rx.recv().await.unwrap().pass_start().unwrap().index, 4);
            l.tx.send(grads(&[i as f32, 1.0])).await.unwrap();
        }
        assert_eq!(decode_f32(&store.rx.recv().await.unwrap().payload), vec![3.0, 3.0]);
        store.tx.send(Frame::control(Kind::Shutdown)).await.unwrap();
        for l in leaves.iter_mut() {
            assert_eq!(l.rx.recv().await.unwrap().kind, Kind::Shutdown);
        }
        drop(leaves);
        node.await.unwrap().unwrap();
        assert!(store.rx.recv().await.is_none(), "the node closes its side");
    }
}
