//! The weight-streaming schedule: which layer's weights are used when, as
//! plain data computed from the model and the micro-batch count before the
//! first step (DESIGN.md, "One training step").
//!
//! A training step runs, for each micro-batch m: forward of layers
//! 0..L-2 (embedding and blocks), the head L-1 (forward and backward at once,
//! it is the last layer), then backward of L-2..0. Every use fetches the
//! layer's weights afresh, except the embedding's backward: its gradient is
//! the output gradient added into the rows of the tokens (and positions)
//! seen, which reads no weights, so the tied embedding goes down twice a
//! step (embedding and head), not three times. The uses that compute
//! gradients (head and backward) send them up right after. An evaluation
//! pass runs the forward uses and the head without gradients.
//!
//! With prefetch depth k the worker holds at most k+1 layers of weights: the
//! weights of use j are fetched once use j-k-1 has released its own.
//!
//! A worker with memory to spare (a GPU holding a model that fits) may ask
//! for less traffic, in two independent ways:
//! - it keeps a layer's weights from their first fetch of the step to the
//!   step's end: only each layer's first use fetches ([`Schedule::fetches`]);
//! - it sums the micro-batches' gradients itself: only the last
//!   micro-batch's gradient uses send ([`Schedule::sends`]), one message per
//!   layer and step, and the store counts one contribution per listing.

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
    /// The worker keeps each layer's weights for the whole pass.
    pub keep_weights: bool,
    /// The worker sums the micro-batches' gradients.
    pub sum_gradients: bool,
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
        Schedule { layers, micro_batches, training, uses, keep_weights: false, sum_gradients: false }
    }

    /// The same uses for a worker that keeps the weights and/or sums the
    /// gradients (see the module docs).
    pub fn for_worker(mut self, keep_weights: bool, sum_gradients: bool) -> Schedule {
        self.keep_weights = keep_weights;
        self.sum_gradients = sum_gradients && self.training;
        self
    }

    /// Whether use `j` computes with the layer's weights: all but the
    /// embedding's backward (layer 0), whose gradient needs none.
    pub fn needs_weights(&self, j: usize) -> bool {
        let u = self.uses[j];
        !(u.layer == 0 && u.pass == Pass::Backward)
    }

    /// The uses that fetch weights from the store, in order: every use that
    /// needs them, or each layer's first when the worker keeps them.
    pub fn fetch_uses(&self) -> Vec<usize> {
        let mut seen = vec![false; self.layers];
        (0..self.uses.len())
            .filter(|&j| self.needs_weights(j))
            .filter(|&j| !self.keep_weights || !std::mem::replace(&mut seen[self.uses[j].layer], true))
            .collect()
    }

    /// Whether use `j` sends gradients to the store.
    pub fn sends(&self, j: usize) -> bool {
        let u = self.uses[j];
        u.sends_gradients(self.training) && (!self.sum_gradients || u.micro + 1 == self.micro_batches)
    }

    /// Gradient contributions the store receives per listing of a tensor in
    /// a layer, per step.
    pub fn contributions(&self) -> usize {
        if self.sum_gradients {
            1
        } else {
            self.micro_batches
        }
    }

    /// Gradient messages one step sends up.
    pub fn gradient_messages(&self) -> usize {
        (0..self.uses.len()).filter(|&j| self.sends(j)).count()
    }

    /// The use after whose release the fetch for use `j` may start with
    /// prefetch depth `k` (`None`: at the start of the pass).
    pub fn fetch_after(&self, j: usize, k: usize) -> Option<usize> {
        j.checked_sub(k + 1)
    }

    /// The layers in the order the store reads them (for its eviction policy).
    pub fn layer_sequence(&self) -> Vec<usize> {
        self.fetch_uses().into_iter().map(|j| self.uses[j].layer).collect()
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

    #[test]
    fn a_worker_that_keeps_weights_fetches_each_layer_once_and_one_that_sums_sends_once() {
        let plain = Schedule::new(4, 3, true);
        // Every use but each micro-batch's embedding backward (uses 6, 13, 20).
        let weighted: Vec<usize> = (0..21).filter(|j| j % 7 != 6).collect();
        assert_eq!(plain.fetch_uses(), weighted);
        assert!((0..21).all(|j| plain.needs_weights(j) == (j % 7 != 6)));
        assert_eq!(plain.layer_sequence(), [0, 1, 2, 3, 2, 1].repeat(3));
        assert_eq!(plain.contributions(), 3);
        let keep = Schedule::new(4, 3, true).for_worker(true, false);
        assert_eq!(keep.uses, plain.uses);
        assert_eq!(keep.fetch_uses(), vec![0, 1, 2, 3], "layers 0..2 forward, then the head");
        assert_eq!(keep.layer_sequence(), vec![0, 1, 2, 3]);
        assert_eq!(keep.gradient_messages(), 3 * 4);
        let sum = Schedule::new(4, 3, true).for_worker(false, true);
        let senders: Vec<usize> = (0..21).filter(|&j| sum.sends(j)).collect();
        assert_eq!(senders, vec![17, 18, 19, 20], "the last micro-batch's head and backward uses");
        assert_eq!(sum.gradient_messages(), 4);
        assert_eq!(sum.contributions(), 1);
        assert_eq!(sum.fetch_uses(), weighted);
        // An evaluation sends nothing, and keeps a layer it uses once.
        let eval = Schedule::new(4, 1, false).for_worker(true, true);
        assert_eq!((eval.fetch_uses().len(), eval.gradient_messages(), eval.sum_gradients), (4, 0, false));
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
