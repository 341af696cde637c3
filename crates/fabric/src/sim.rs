//! A simulated network for the tree: links whose frames arrive in order
//! (the protocol's guarantee on each link) after seeded delays, so that
//! across links the arrivals interleave differently for every seed. The
//! tree code runs over it unchanged. Under a paused tokio clock on a
//! current-thread runtime the delays are virtual and a run is a pure
//! function of its seed: crates/fabric/tests/sim.rs runs the nodes so, and
//! the trainer's simulator (`ws_train`, `FabricTrainer::start_simulated`)
//! runs the real store and workers so too. A connection may also drop, or
//! stop answering, after a given number of frames ([`sim_pair_fault`]), for
//! the tests of members that fail and of connections that come back.

use crate::link::inproc_pair;
use crate::{Link, LinkRx, LinkTx};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A small seeded generator (xorshift*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// What a simulated connection does once a given number of frames have
/// crossed it one way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// It drops: both directions end at once, and each end sees a closed
    /// link, as with a reset TCP connection.
    Drop,
    /// It stops answering, as a hung machine does: from then on frames
    /// either way vanish, and the connection stays open until an end
    /// closes its side or it is cut (its ends' killer).
    Stall,
}

/// One direction of a wire: frames leave in order, each after a seeded
/// delay below `max_us` (0: at once). Tokio's timers tick in milliseconds,
/// so every delay below 1 ms is one tick and all links keep step: for
/// interleavings that differ by seed, give delays of several milliseconds
/// (under a paused clock they cost no real time). With `fault_after`, the
/// connection drops or stalls once that many frames have crossed this way.
/// A wire that ends for any reason (its sender closed, its receiver gone,
/// a cut) cuts the connection: both directions end, as when either end of
/// a TCP connection closes it. Needs a tokio runtime context.
fn wire(mut from: LinkRx, to: LinkTx, seed: u64, max_us: u64, fault_after: Option<(u64, Fault)>, state: Wire) {
    tokio::spawn(async move {
        let Wire { cut: (turn_on, mut is_cut), stalled } = state;
        let mut rng = Rng::new(seed);
        let mut crossed = 0u64;
        loop {
            match fault_after {
                Some((n, Fault::Drop)) if n == crossed => break,
                Some((n, Fault::Stall)) if n == crossed => stalled.store(true, Ordering::SeqCst),
                _ => {}
            }
            let one = async {
                let f = from.recv().await?;
                if stalled.load(Ordering::SeqCst) {
                    return Some(());
                }
                if max_us > 0 {
                    tokio::time::sleep(Duration::from_micros(rng.next_u64() % max_us)).await;
                }
                to.send(f).await.ok()
            };
            // A cut ends the wire wherever it waits: for a frame, for its
            // delay, or for room on the far side (that frame is lost).
            tokio::select! {
                biased;
                _ = is_cut.wait_for(|&c| c) => break,
                sent = one => if sent.is_none() {
                    break;
                },
            }
            crossed += 1;
        }
        let _ = turn_on.send(true);
    });
}

/// A connection's shared state: whether it has dropped (and the switch
/// that drops it), and whether it has stalled.
struct Wire {
    cut: (watch::Sender<bool>, watch::Receiver<bool>),
    stalled: Arc<AtomicBool>,
}

/// Two ends joined by a simulated wire each way, `credits` frames of room
/// at each end. Needs a tokio runtime context.
pub fn sim_pair(credits: usize, seed: u64, max_us: u64) -> (Link, Link) {
    sim_pair_fault(credits, seed, max_us, None)
}

/// [`sim_pair`] whose connection drops or stalls after `fault` = (frames,
/// way, fault): once that many frames have crossed from a to b (`way`
/// false) or from b to a (true). Each end's [`LinkTx::killer`] cuts the
/// connection, as closing a TCP connection would.
pub fn sim_pair_fault(credits: usize, seed: u64, max_us: u64, fault: Option<(u64, bool, Fault)>) -> (Link, Link) {
    let (mut a, a_wire) = inproc_pair(credits, "a", "wire");
    let (b_wire, mut b) = inproc_pair(credits, "wire", "b");
    let (Link { tx: to_a, rx: from_a }, Link { tx: to_b, rx: from_b }) = (a_wire, b_wire);
    let (turn_on, is_cut) = watch::channel(false);
    let stalled = Arc::new(AtomicBool::new(false));
    let way = |back: bool| fault.filter(|c| c.1 == back).map(|c| (c.0, c.2));
    let state = || Wire { cut: (turn_on.clone(), is_cut.clone()), stalled: stalled.clone() };
    wire(from_a, to_b, seed, max_us, way(false), state());
    wire(from_b, to_a, seed ^ 0xABCD, max_us, way(true), state());
    // Each end learns of a cut as a TCP end learns of a closed connection
    // (a node whose parent is gone ends even while it waits on a child).
    a.tx = a.tx.with_cut(turn_on.clone());
    b.tx = b.tx.with_cut(turn_on);
    a.rx = a.rx.with_gone(is_cut.clone());
    b.rx = b.rx.with_gone(is_cut);
    (a, b)
}
