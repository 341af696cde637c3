//! Dynamic sparsity: when the patterns change and how, shared by the
//! resident trainer and the store (which decides, since the gradients
//! arrive there), so both make the same choices.
//!
//! Every `update_every` steps (until `update_until`), after the step's
//! update, each sparse tensor loses the `fraction` of its nonzeros of
//! smallest magnitude and regrows as many: at random (SET) or where the dense
//! gradient of that step is largest (RigL). With `update_until` set, the
//! fraction decays along a cosine to zero there, as in RigL. RigL's dense
//! gradient is computed only on the steps that end in an update.

use crate::config::RunConfig;
use ws_kernels::sparse::SparsePattern;
use ws_kernels::Rng;
use ws_model::sparsity::{prune_regrow, Regrow};

/// [`Rng::for_stream`] stream id of SET's regrowth.
const REGROW_STREAM: u64 = 4;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dynamic {
    rigl: bool,
    every: u64,
    until: u64,
    fraction: f64,
    seed: u64,
}

impl Dynamic {
    /// The configured dynamic sparsity; `None` when it is off or nothing is sparse.
    pub fn new(config: &RunConfig, spec: &ws_model::ModelSpec) -> Option<Dynamic> {
        let sp = &config.sparsity;
        (sp.dynamic != "off" && spec.is_sparse()).then(|| Dynamic {
            rigl: sp.dynamic == "rigl",
            every: sp.update_every,
            until: sp.update_until,
            fraction: sp.prune_fraction,
            seed: config.train.seed,
        })
    }

    /// Whether an update follows the step that completes `completed` steps.
    pub fn due(&self, completed: u64) -> bool {
        completed > 0 && completed.is_multiple_of(self.every) && (self.until == 0 || completed < self.until)
    }

    /// Whether step `step` (counting from 0) needs the dense gradients of the sparse tensors.
    pub fn needs_dense_grads(&self, step: u64) -> bool {
        self.rigl && self.due(step + 1)
    }

    /// The fraction of nonzeros moved at the update after `completed` steps.
    pub fn fraction(&self, completed: u64) -> f64 {
        if self.until == 0 {
            return self.fraction;
        }
        let ratio = (completed as f64 / self.until as f64).min(1.0);
        self.fraction * 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos())
    }

    /// The new pattern of tensor `t` after `completed` steps, and where its
    /// values come from; `grad` is the step's dense gradient (RigL).
    pub fn choose(
        &self,
        completed: u64,
        t: usize,
        pattern: &SparsePattern,
        values: &[f32],
        grad: Option<&[f32]>,
    ) -> (SparsePattern, Vec<Option<u32>>) {
        let fraction = self.fraction(completed);
        if self.rigl {
            let g = grad.expect("RigL's update has the dense gradient");
            return prune_regrow(pattern, values, fraction, Regrow::Gradient(g));
        }
        let mut rng = Rng::for_stream(self.seed, REGROW_STREAM, completed.wrapping_mul(1 << 20).wrapping_add(t as u64));
        prune_regrow(pattern, values, fraction, Regrow::Random(&mut rng))
    }
}
