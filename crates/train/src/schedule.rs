//! The weight-streaming schedule: which layer's weights are used when, as
//! plain data computed from the model and the micro-batch count before the
//! first step (DESIGN.md, "One training step").
//!
//! A training step runs, for each micro-batch m: forward of layers
//! 0..L-2 (embedding and blocks), the head L-1 (forward and backward at once,
//! it is the last layer), then backward of L-2..0. Every use fetches the
//! layer's weights afresh; the uses that compute gradients (head and
//! backward) send them up right after. An evaluation pass runs the forward
//! uses and the head without gradients.
//!
//! With prefetch depth k the worker holds at most k+1 layers of weights: the
//! weights of use j are fetched once use j-k-1 has released its own.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward,
    /// The head: forward, loss and (when training) backward.
    Head,
    Backward,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Use {
    pub layer: usize,
    pub micro: usize,
    pub pass: Pass,
}

impl Use {
    /// Whether this use sends gradients to the store.
    pub fn sends_gradients(&self, training: bool) -> bool {
        training && self.pass != Pass::Forward
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub layers: usize,
    pub micro_batches: usize,
    pub training: bool,
    pub uses: Vec<Use>,
}

impl Schedule {
    /// `layers` = L streamable layers (embedding, blocks, head).
    pub fn new(layers: usize, micro_batches: usize, training: bool) -> Schedule {
        assert!(layers >= 2 && micro_batches >= 1);
        let head = layers - 1;
        let mut uses = Vec::new();
        for micro in 0..micro_batches {
            uses.extend((0..head).map(|layer| Use { layer, micro, pass: Pass::Forward }));
            uses.push(Use { layer: head, micro, pass: Pass::Head });
            if training {
                uses.extend((0..head).rev().map(|layer| Use { layer, micro, pass: Pass::Backward }));
            }
        }
        Schedule { layers, micro_batches, training, uses }
    }

    /// Gradient messages one step sends up.
    pub fn gradient_messages(&self) -> usize {
        self.uses.iter().filter(|u| u.sends_gradients(self.training)).count()
    }

    /// The use after whose release the fetch for use `j` may start with
    /// prefetch depth `k` (`None`: at the start of the pass).
    pub fn fetch_after(&self, j: usize, k: usize) -> Option<usize> {
        j.checked_sub(k + 1)
    }

    /// The layers in access order (for the store's eviction policy).
    pub fn layer_sequence(&self) -> Vec<usize> {
        self.uses.iter().map(|u| u.layer).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_training_step_is_forward_head_backward_per_micro_batch() {
        let s = Schedule::new(4, 2, true);
        let passes: Vec<(usize, Pass)> = s.uses.iter().map(|u| (u.layer, u.pass)).collect();
        use Pass::*;
        let one =
            vec![(0, Forward), (1, Forward), (2, Forward), (3, Head), (2, Backward), (1, Backward), (0, Backward)];
        assert_eq!(passes, [one.clone(), one].concat());
        assert_eq!(s.gradient_messages(), 2 * 4);
        let e = Schedule::new(4, 1, false);
        assert_eq!(e.uses.len(), 4);
        assert_eq!(e.gradient_messages(), 0);
    }

    /// Replays the schedule with depth k: fetch j starts when use j-k-1 has
    /// released. Every use must find its weights fetched, and no more than
    /// k+1 layers of weights may be held at any time.
    #[test]
    fn every_use_is_fetched_first_and_at_most_k_plus_1_are_held() {
        for layers in [2, 3, 14] {
            for micro in [1, 3] {
                let s = Schedule::new(layers, micro, true);
                for k in [0, 1, 2, 4, 100] {
                    let mut fetched = vec![false; s.uses.len()];
                    let mut held = 0usize;
                    let mut next_fetch = 0;
                    let mut max_held = 0;
                    for j in 0..s.uses.len() {
                        // Issue every fetch allowed so far.
                        while next_fetch < s.uses.len() && s.fetch_after(next_fetch, k).is_none_or(|a| a < j) {
                            fetched[next_fetch] = true;
                            held += 1;
                            next_fetch += 1;
                        }
                        max_held = max_held.max(held);
                        assert!(fetched[j], "use {j} before its fetch (k={k})");
                        held -= 1; // use j releases its weights
                    }
                    assert!(max_held <= k + 1, "held {max_held} > k+1 with k={k}");
                    assert_eq!(max_held, (k + 1).min(s.uses.len()));
                }
            }
        }
    }
}
