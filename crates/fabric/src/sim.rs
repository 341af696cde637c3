//! A simulated network for the tree: links whose frames arrive in order
//! (the protocol's guarantee on each link) after seeded delays, so that
//! across links the arrivals interleave differently for every seed. The
//! tree code runs over it unchanged. Under a paused tokio clock on a
//! current-thread runtime the delays are virtual and a run is a pure
//! function of its seed (crates/fabric/tests/sim.rs); on a normal runtime
//! they are real, which is how the trainer's equivalence tests use it. A
//! link may also drop its connection after a given number of frames
//! ([`sim_pair_cut`]), for the trainer's tests of connections that drop
//! and come back.

use crate::link::inproc_pair;
use crate::{Link, LinkRx, LinkTx};
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

/// One direction of a wire: frames leave in order, each after a seeded
/// delay below `max_us` (0: at once). With `cut_after`, the connection
/// drops once that many frames have crossed this way: the wire turns `cut`
/// on, and both directions end at once (each end then sees a closed link,
/// as with a reset TCP connection). Needs a tokio runtime context.
fn wire(mut from: LinkRx, to: LinkTx, seed: u64, max_us: u64, cut_after: Option<u64>, cut: Cut) {
    tokio::spawn(async move {
        let (turn_on, mut is_cut) = cut;
        let mut rng = Rng::new(seed);
        let mut crossed = 0u64;
        loop {
            if cut_after == Some(crossed) {
                let _ = turn_on.send(true);
                return;
            }
            let one = async {
                let f = from.recv().await?;
                if max_us > 0 {
                    tokio::time::sleep(Duration::from_micros(rng.next_u64() % max_us)).await;
                }
                to.send(f).await.ok()
            };
            // A cut ends the wire wherever it waits: for a frame, for its
            // delay, or for room on the far side (that frame is lost).
            tokio::select! {
                biased;
                _ = is_cut.wait_for(|&c| c) => return,
                sent = one => if sent.is_none() {
                    return;
                },
            }
            crossed += 1;
        }
    });
}

/// A connection's shared state: whether it has dropped.
type Cut = (Arc<watch::Sender<bool>>, watch::Receiver<bool>);

/// Two ends joined by a simulated wire each way, `credits` frames of room
/// at each end. Needs a tokio runtime context.
pub fn sim_pair(credits: usize, seed: u64, max_us: u64) -> (Link, Link) {
    sim_pair_cut(credits, seed, max_us, None)
}

/// [`sim_pair`] whose connection drops after `cut_after` = (frames, way)
/// frames have crossed from a to b (`way` false) or from b to a (true).
pub fn sim_pair_cut(credits: usize, seed: u64, max_us: u64, cut_after: Option<(u64, bool)>) -> (Link, Link) {
    let (a, a_wire) = inproc_pair(credits, "a", "wire");
    let (b_wire, b) = inproc_pair(credits, "wire", "b");
    let (Link { tx: to_a, rx: from_a }, Link { tx: to_b, rx: from_b }) = (a_wire, b_wire);
    let (turn_on, is_cut) = watch::channel(false);
    let turn_on = Arc::new(turn_on);
    let way = |back: bool| cut_after.filter(|c| c.1 == back).map(|c| c.0);
    wire(from_a, to_b, seed, max_us, way(false), (turn_on.clone(), is_cut.clone()));
    wire(from_b, to_a, seed ^ 0xABCD, max_us, way(true), (turn_on, is_cut));
    (a, b)
}
