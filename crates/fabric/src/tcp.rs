//! Links over TCP (tokio): a listener that admits only peers that prove the
//! cluster secret, a connector that retries with backoff, and per
//! connection a reader task and a writer task that turn frames into bytes
//! and back (see [`crate::wire`] for the format and the handshake).
//!
//! Flow control: the writer sends a data frame only while it holds a credit
//! (it starts with `credits`); the reader queues at most `credits` frames,
//! and each frame its owner takes sends one credit back in a `Credit` frame
//! (coalesced). A peer that sends past its credit is cut off. Anything that
//! fails a check (format, MAC, sequence, checksum, limits) closes that one
//! connection with a logged reason; the node above sees a closed link, never
//! a panic.

use crate::link::{LinkRx, LinkTx};
use crate::wire::{self, Hello, SessionKeys, HEADER_BYTES};
use crate::{FabricError, Frame, Kind, Link};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

/// What both ends of every connection agree on (from the run's config).
#[derive(Clone)]
pub struct TcpOptions {
    pub secret: Arc<Vec<u8>>,
    /// Data frames in flight per direction (`fabric.chunks_in_flight`).
    pub credits: usize,
    /// The largest payload accepted (`fabric.chunk_bytes`).
    pub payload_max: usize,
    /// MAC the payloads as well as the headers (`fabric.mac_payload`).
    pub mac_payload: bool,
}

impl TcpOptions {
    pub fn check(&self) -> Result<(), FabricError> {
        if self.secret.len() < wire::SECRET_BYTES_MIN {
            return Err(FabricError::Auth(format!(
                "the cluster secret has {} bytes; at least {} are needed",
                self.secret.len(),
                wire::SECRET_BYTES_MIN
            )));
        }
        if !(1..=crate::link::CREDITS_MAX).contains(&self.credits) {
            return Err(FabricError::Protocol(format!(
                "fabric.chunks_in_flight = {} is outside 1..={}",
                self.credits,
                crate::link::CREDITS_MAX
            )));
        }
        Ok(())
    }
}

/// A listener for children (or, at the store, for everyone joining).
pub struct Listener {
    inner: TcpListener,
    opts: TcpOptions,
}

impl Listener {
    /// Binds `addr` (the callers default to 127.0.0.1).
    pub async fn bind(addr: &str, opts: TcpOptions) -> Result<Listener, FabricError> {
        opts.check()?;
        let inner =
            TcpListener::bind(addr).await.map_err(|e| FabricError::Io(format!("cannot listen on {addr}: {e}")))?;
        Ok(Listener { inner, opts })
    }

    /// The flow-control credit of this listener's links.
    pub fn credits(&self) -> usize {
        self.opts.credits
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr().expect("a bound listener has an address")
    }

    /// The next peer that passes the handshake. Peers that fail it are
    /// logged and dropped; the listener goes on.
    pub async fn accept(&self) -> Result<(Link, Hello, SocketAddr), FabricError> {
        self.accept_with_local().await.map(|(l, h, from, _)| (l, h, from))
    }

    /// [`Self::accept`], also returning this end's address as the peer
    /// reached it (what to tell peers that should connect here).
    pub async fn accept_with_local(&self) -> Result<(Link, Hello, SocketAddr, SocketAddr), FabricError> {
        loop {
            let (mut s, from) =
                self.inner.accept().await.map_err(|e| FabricError::Io(format!("accepting a connection: {e}")))?;
            let local = s.local_addr().map_err(|e| FabricError::Io(format!("a connection's address: {e}")))?;
            match wire::handshake_server(&mut s, &self.opts.secret).await {
                Ok((hello, keys)) => {
                    let name = format!("{from} (role {}, position {})", hello.role, hello.position);
                    return Ok((spawn_link(s, keys, &self.opts, name), hello, from, local));
                }
                Err(e) => tracing::warn!("refused a connection from {from}: {e}"),
            }
        }
    }
}

/// Connects to `addr` and proves the secret; retries refused or failed
/// connections with doubling backoff up to `deadline`, then says why it gave up.
pub async fn connect(addr: &str, opts: &TcpOptions, hello: Hello, deadline: Duration) -> Result<Link, FabricError> {
    connect_with_local(addr, opts, hello, deadline).await.map(|(l, _)| l)
}

/// [`connect`], also returning this end's address on the connection (the
/// address of this machine that the peer's network reaches).
pub async fn connect_with_local(
    addr: &str,
    opts: &TcpOptions,
    hello: Hello,
    deadline: Duration,
) -> Result<(Link, SocketAddr), FabricError> {
    opts.check()?;
    let start = tokio::time::Instant::now();
    let mut wait = Duration::from_millis(20);
    loop {
        let err = match TcpStream::connect(addr).await {
            Ok(mut s) => match wire::handshake_client(&mut s, &opts.secret, hello).await {
                Ok(keys) => {
                    let local = s.local_addr().map_err(|e| FabricError::Io(format!("a connection's address: {e}")))?;
                    return Ok((spawn_link(s, keys, opts, addr.to_string()), local));
                }
                // A wrong secret does not get better with retries.
                Err(e @ FabricError::Auth(_)) => return Err(e),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if start.elapsed() + wait > deadline {
            return Err(FabricError::Io(format!("cannot reach {addr} within {deadline:?}: {err}")));
        }
        tracing::debug!("connecting to {addr}: {err}; retrying in {wait:?}");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

/// Starts the reader and writer tasks of an authenticated connection.
fn spawn_link(s: TcpStream, keys: SessionKeys, opts: &TcpOptions, peer: String) -> Link {
    let _ = s.set_nodelay(true);
    let (rd, wr) = s.into_split();
    let (in_tx, in_rx) = mpsc::channel(opts.credits);
    let (out_tx, out_rx) = mpsc::channel(opts.credits);
    let (credit_tx, credit_rx) = mpsc::unbounded_channel();
    let window = Arc::new(Semaphore::new(opts.credits));
    let (o, p) = (opts.clone(), peer.clone());
    let w = window.clone();
    // Set when this side stops reading: no credit can arrive after that.
    let no_credit = Arc::new(tokio::sync::Notify::new());
    let no_credit_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (nc, ncf) = (no_credit.clone(), no_credit_flag.clone());
    let (kill, mut killed) = tokio::sync::watch::channel(false);
    let (gone_tx, gone_rx) = tokio::sync::watch::channel(false);
    let mut killed2 = killed.clone();
    tokio::spawn(async move {
        let owner = in_tx.clone();
        let peer_gone = tokio::select! {
            r = read_loop(rd, keys.recv, &o, in_tx, w.clone()) => {
                if let Err(e) = r {
                    tracing::warn!("connection with {p}: {e}");
                }
                true
            }
            _ = until_killed(&mut killed) => true,
            // The owner let go of its receiving end: stop reading, so that
            // once the sending end goes too the connection closes and the
            // peer learns it (a peer waiting for credit would otherwise
            // wait forever).
            _ = owner.closed() => false,
        };
        // No credit can arrive any more: frames that still have credit go
        // out; one that would wait for more gives up (a peer that died
        // closes its socket like one that finished).
        ncf.store(true, std::sync::atomic::Ordering::SeqCst);
        nc.notify_one();
        drop(w);
        if peer_gone {
            let _ = gone_tx.send(true);
        }
    });
    let (o, p) = (opts.clone(), peer.clone());
    tokio::spawn(async move {
        tokio::select! {
            r = write_loop(wr, keys.send, &o, out_rx, credit_rx, window, (no_credit, no_credit_flag)) => if let Err(e) = r {
                tracing::debug!("connection with {p}: {e}");
            },
            _ = until_killed(&mut killed2) => {}
        }
    });
    Link { tx: LinkTx::new(out_tx, peer).with_kill(kill), rx: LinkRx::new(in_rx, Some(credit_tx)).with_gone(gone_rx) }
}

/// Resolves when the link's killer says so; never when it is merely
/// dropped (the link's owner let go: pending frames still go out).
async fn until_killed(killed: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if killed.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        if *killed.borrow() {
            return;
        }
    }
}

async fn read_loop(
    rd: tokio::net::tcp::OwnedReadHalf,
    key: wire::MacKey,
    opts: &TcpOptions,
    to_owner: mpsc::Sender<Frame>,
    window: Arc<Semaphore>,
) -> Result<(), FabricError> {
    let mut seq = 0u64;
    let mut raw = [0u8; HEADER_BYTES];
    // Small frames (headers, credits, statistics) come several to a read;
    // a large payload bypasses the buffer once it is empty.
    let mut rd = tokio::io::BufReader::with_capacity(READ_BUFFER, rd);
    loop {
        match rd.read_exact(&mut raw).await {
            Ok(_) => {}
            // A clean end between frames.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(FabricError::Io(format!("reading: {e}"))),
        }
        let h = wire::decode_header(&raw, opts.payload_max)?;
        // Read straight into fresh capacity (no zeroing first).
        let mut payload = bytes::BytesMut::with_capacity(h.len as usize);
        while payload.len() < h.len as usize {
            let mut part = (&mut rd).take((h.len as usize - payload.len()) as u64);
            match part.read_buf(&mut payload).await {
                Ok(0) => return Err(FabricError::Frame("a truncated payload: the peer hung up".into())),
                Ok(_) => {}
                Err(e) => return Err(FabricError::Frame(format!("a truncated payload: {e}"))),
            }
        }
        wire::verify(&h, &raw, &payload, &key, seq)?;
        seq += 1;
        let f = wire::frame_of(&h, payload.freeze());
        if f.kind == Kind::Credit {
            let n = usize::try_from(f.step).unwrap_or(usize::MAX);
            if n == 0 || n > opts.credits || window.available_permits() + n > opts.credits {
                return Err(FabricError::Protocol(format!("a credit of {n} beyond the window of {}", opts.credits)));
            }
            window.add_permits(n);
            continue;
        }
        match to_owner.try_send(f) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(FabricError::Protocol(format!("the peer sent past its {} credits", opts.credits)))
            }
            // The owner is gone: nobody reads any more.
            Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
        }
    }
}

/// The read buffer of a connection.
const READ_BUFFER: usize = 64 << 10;
/// Data frames one write may carry (each with its credit).
const FRAMES_PER_WRITE: usize = 16;

/// Writes frames, headers and payloads, in one vectored write where the
/// socket takes it: one system call for a data frame and the credit owed
/// beside it, and no small packet for a header alone.
async fn write_frames(
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    frames: &[Frame],
    seq: &mut u64,
    key: &wire::MacKey,
    mac_payload: bool,
) -> Result<(), FabricError> {
    let headers: Vec<[u8; HEADER_BYTES]> = frames
        .iter()
        .map(|f| {
            *seq += 1;
            wire::encode_header(f, *seq - 1, key, mac_payload)
        })
        .collect();
    let mut slices: Vec<std::io::IoSlice> = Vec::with_capacity(2 * frames.len());
    for (h, f) in headers.iter().zip(frames) {
        slices.push(std::io::IoSlice::new(h));
        if !f.payload.is_empty() {
            slices.push(std::io::IoSlice::new(&f.payload));
        }
    }
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await.map_err(|e| FabricError::Io(format!("writing: {e}")))?;
        if n == 0 {
            return Err(FabricError::Io("writing: the connection takes no more bytes".into()));
        }
        std::io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// The credits owed so far, as one `Credit` frame (none owed: `None`).
fn owed_credit(credits: &mut mpsc::UnboundedReceiver<u32>, first: Option<u32>) -> Option<Frame> {
    let mut n = first.map(u64::from);
    while let Ok(more) = credits.try_recv() {
        n = Some(n.unwrap_or(0) + u64::from(more));
    }
    n.map(|n| Frame { step: n, ..Frame::control(Kind::Credit) })
}

async fn write_loop(
    mut w: tokio::net::tcp::OwnedWriteHalf,
    key: wire::MacKey,
    opts: &TcpOptions,
    mut frames: mpsc::Receiver<Frame>,
    mut credits: mpsc::UnboundedReceiver<u32>,
    window: Arc<Semaphore>,
    (no_credit, no_credit_flag): (Arc<tokio::sync::Notify>, Arc<std::sync::atomic::AtomicBool>),
) -> Result<(), FabricError> {
    let mut seq = 0u64;
    let mut pending: Option<Frame> = None;
    let mut open = true;
    loop {
        let starved = no_credit_flag.load(std::sync::atomic::Ordering::SeqCst) && window.available_permits() == 0;
        if pending.is_some() && starved {
            return Err(FabricError::Closed("the peer stopped reading (no credit can come)".into()));
        }
        // Credits go back even while this side waits for its own: the two
        // directions never hold each other up.
        tokio::select! {
            biased;
            Some(n) = credits.recv() => {
                let f = owed_credit(&mut credits, Some(n)).expect("one credit at least");
                write_frames(&mut w, &[f], &mut seq, &key, opts.mac_payload).await?;
            }
            permit = window.acquire(), if pending.is_some() => {
                permit.expect("the window is never closed").forget();
                // The credit owed goes first, then every data frame already
                // waiting that has a credit of its own.
                let mut batch: Vec<Frame> = owed_credit(&mut credits, None).into_iter().collect();
                batch.push(pending.take().expect("guarded"));
                while batch.len() < FRAMES_PER_WRITE {
                    let Ok(permit) = window.try_acquire() else { break };
                    match frames.try_recv() {
                        Ok(f) => {
                            permit.forget();
                            batch.push(f);
                        }
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                }
                write_frames(&mut w, &batch, &mut seq, &key, opts.mac_payload).await?;
            }
            f = frames.recv(), if pending.is_none() && open => match f {
                Some(f) => pending = Some(f),
                None => open = false,
            },
            // Wakes a wait for credit when none can come any more (checked above).
            _ = no_credit.notified(), if pending.is_some() => {}
            else => break,
        }
        if !open && pending.is_none() {
            // The owner closed its side: the peer sees a clean end of stream.
            w.shutdown().await.map_err(|e| FabricError::Io(format!("closing: {e}")))?;
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Dtype;

    fn opts(secret: &[u8]) -> TcpOptions {
        TcpOptions { secret: Arc::new(secret.to_vec()), credits: 2, payload_max: 1 << 20, mac_payload: false }
    }

    fn chunk(i: u64, n: usize) -> Frame {
        Frame {
            kind: Kind::Weights,
            dtype: Dtype::F32,
            step: i,
            use_index: 0,
            layer: 0,
            offset: 0,
            total: 4 * n as u64,
            payload: bytes::Bytes::from(vec![i as u8; 4 * n]),
        }
    }

    const SECRET: &[u8] = b"a-test-cluster-secret-of-enough-bytes";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_cross_both_ways_in_order_under_a_small_credit() {
        let l = Listener::bind("127.0.0.1:0", opts(SECRET)).await.unwrap();
        let addr = l.local_addr().to_string();
        let server = tokio::spawn(async move {
            let (mut link, hello, _) = l.accept().await.unwrap();
            assert_eq!(hello.position, 3);
            // Echo everything back.
            while let Some(f) = link.rx.recv().await {
                link.tx.send(f).await.unwrap();
            }
        });
        let c = connect(&addr, &opts(SECRET), Hello { role: 2, position: 3 }, Duration::from_secs(5)).await.unwrap();
        let Link { tx, rx: c_rx } = c;
        let sender = tokio::spawn(async move {
            for i in 0..200 {
                tx.send(chunk(i, 1000 + i as usize)).await.unwrap();
            }
            tx
        });
        // The echo runs at most 2 frames ahead of this reader, so sending
        // and reading go on together.
        let mut rx = c_rx;
        for i in 0..200 {
            assert_eq!(rx.recv().await.unwrap(), chunk(i, 1000 + i as usize));
        }
        drop(sender.await.unwrap());
        drop(rx);
        server.await.unwrap();
    }

    /// With a wide window the writer puts several waiting frames (and the
    /// credit it owes) into one write, and the reader takes several from one
    /// buffered read: empty, small and larger-than-the-buffer payloads still
    /// arrive whole and in order, both ways.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_of_mixed_sizes_cross_in_order_under_a_wide_credit() {
        let wide = TcpOptions { credits: 16, ..opts(SECRET) };
        let size = |i: u64| match i % 7 {
            0 => 0,
            3 => (READ_BUFFER / 4) + 1000 + i as usize,
            _ => 1 + i as usize,
        };
        let l = Listener::bind("127.0.0.1:0", wide.clone()).await.unwrap();
        let addr = l.local_addr().to_string();
        let server = tokio::spawn(async move {
            let (mut link, _, _) = l.accept().await.unwrap();
            while let Some(f) = link.rx.recv().await {
                link.tx.send(f).await.unwrap();
            }
        });
        let Link { tx, mut rx } =
            connect(&addr, &wide, Hello { role: 2, position: 3 }, Duration::from_secs(5)).await.unwrap();
        let sender = tokio::spawn(async move {
            for i in 0..500 {
                tx.send(chunk(i, size(i))).await.unwrap();
            }
            tx
        });
        for i in 0..500 {
            assert_eq!(rx.recv().await.unwrap(), chunk(i, size(i)), "frame {i}");
        }
        drop(sender.await.unwrap());
        drop(rx);
        server.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_secret_is_refused_and_the_listener_goes_on() {
        let l = Listener::bind("127.0.0.1:0", opts(SECRET)).await.unwrap();
        let addr = l.local_addr().to_string();
        let server = tokio::spawn(async move { l.accept().await.map(|(_, h, _)| h) });
        let bad = connect(
            &addr,
            &opts(b"not-the-cluster-secret-at-all!!"),
            Hello { role: 2, position: 1 },
            Duration::from_secs(5),
        )
        .await;
        assert!(matches!(bad, Err(FabricError::Auth(_))), "{:?}", bad.err());
        // A peer that speaks garbage, then one that never speaks, then the real one.
        let mut g = TcpStream::connect(&addr).await.unwrap();
        g.write_all(&[0u8; 100]).await.unwrap();
        drop(g);
        let good = connect(&addr, &opts(SECRET), Hello { role: 2, position: 7 }, Duration::from_secs(5)).await.unwrap();
        assert_eq!(server.await.unwrap().unwrap().position, 7);
        drop(good);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_forged_frame_after_the_handshake_closes_only_that_connection() {
        let l = Listener::bind("127.0.0.1:0", opts(SECRET)).await.unwrap();
        let addr = l.local_addr().to_string();
        let server = tokio::spawn(async move {
            let (mut link, _, _) = l.accept().await.unwrap();
            link.rx.recv().await
        });
        // Authenticate properly, then write a frame under a key nobody agreed on.
        let mut s = TcpStream::connect(&addr).await.unwrap();
        wire::handshake_client(&mut s, SECRET, Hello { role: 2, position: 0 }).await.unwrap();
        let f = chunk(1, 4);
        let h = wire::encode_header(&f, 0, &wire::MacKey::new(b"forged"), false);
        s.write_all(&h).await.unwrap();
        s.write_all(&f.payload).await.unwrap();
        assert_eq!(server.await.unwrap(), None, "the forged frame is never delivered");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_parent_that_closes_right_after_its_shutdown_ends_the_node_cleanly() {
        // The parent sends frames, Shutdown, and closes at once; the node's
        // one child (in-process, room for one frame) reads nothing for 100
        // ms, so the Shutdown still waits in the link when the connection's
        // end is seen. The node must end the run, not report its parent lost.
        let l = Listener::bind("127.0.0.1:0", opts(SECRET)).await.unwrap();
        let addr = l.local_addr().to_string();
        let parent = tokio::spawn(async move {
            let (Link { tx, mut rx }, _, _) = l.accept().await.unwrap();
            for i in 0..3 {
                tx.send(chunk(i, 16)).await.unwrap();
            }
            tx.send(Frame::control(Kind::Shutdown)).await.unwrap();
            // This side's sending half closes (the store's root thread ends
            // so); its receiving half stays until the tree has drained.
            drop(tx);
            while rx.recv().await.is_some() {}
        });
        let up = connect(&addr, &opts(SECRET), Hello { role: 1, position: 1 }, Duration::from_secs(5)).await.unwrap();
        let (child, mut leaf) = crate::link::inproc_pair(1, "node", "leaf");
        let node = tokio::spawn(crate::node::run(up, vec![child], "node 1".into()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut kinds = Vec::new();
        while let Some(f) = leaf.rx.recv().await {
            kinds.push(f.kind);
            if f.kind == Kind::Shutdown {
                break;
            }
        }
        assert_eq!(kinds.last(), Some(&Kind::Shutdown), "{kinds:?}");
        // The leaf ends as a worker does, closing its link.
        drop(leaf);
        node.await.unwrap().expect("a clean end of the run");
        parent.await.unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_parent_is_a_clear_error_after_the_deadline() {
        // A port nobody listens on: bind, note it, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = connect(
            &format!("127.0.0.1:{port}"),
            &opts(SECRET),
            Hello { role: 2, position: 0 },
            Duration::from_millis(300),
        )
        .await
        .err()
        .expect("nobody listens");
        assert!(e.to_string().contains("cannot reach"), "{e}");
    }
}
