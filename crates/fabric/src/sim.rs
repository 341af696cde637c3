//! A simulated network for the tree: links whose frames arrive in order
//! (the protocol's guarantee on each link) after seeded delays, so that
//! across links the arrivals interleave differently for every seed. The
//! tree code runs over it unchanged. Under a paused tokio clock on a
//! current-thread runtime the delays are virtual and a run is a pure
//! function of its seed (crates/fabric/tests/sim.rs); on a normal runtime
//! they are real, which is how the trainer's equivalence tests use it.

use crate::link::inproc_pair;
use crate::{Link, LinkRx, LinkTx};
use std::time::Duration;

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
/// delay below `max_us` (0: at once). Needs a tokio runtime context.
fn wire(mut from: LinkRx, to: LinkTx, seed: u64, max_us: u64) {
    tokio::spawn(async move {
        let mut rng = Rng::new(seed);
        while let Some(f) = from.recv().await {
            if max_us > 0 {
                tokio::time::sleep(Duration::from_micros(rng.next_u64() % max_us)).await;
            }
            if to.send(f).await.is_err() {
                return;
            }
        }
    });
}

/// Two ends joined by a simulated wire each way, `credits` frames of room
/// at each end. Needs a tokio runtime context.
pub fn sim_pair(credits: usize, seed: u64, max_us: u64) -> (Link, Link) {
    let (a, a_wire) = inproc_pair(credits, "a", "wire");
    let (b_wire, b) = inproc_pair(credits, "wire", "b");
    let (Link { tx: to_a, rx: from_a }, Link { tx: to_b, rx: from_b }) = (a_wire, b_wire);
    wire(from_a, to_b, seed, max_us);
    wire(from_b, to_a, seed ^ 0xABCD, max_us);
    (a, b)
}
