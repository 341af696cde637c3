//! The optimizer step over a resident parameter set: global-norm gradient
//! clipping, then AdamW (PyTorch semantics) tensor by tensor, with weight
//! decay on 2-D tensors only; and the learning-rate schedule.

use crate::config::TrainSection;
use ws_kernels::adamw::{adamw_update, AdamWStep};
use ws_model::{ModelSpec, Params};

/// Linear warmup over `warmup_steps`, then cosine decay to `min_lr` at the
/// last step (nanoGPT's schedule). `step` counts from 0.
pub fn learning_rate(t: &TrainSection, step: u64) -> f64 {
    if step < t.warmup_steps {
        return t.lr * (step + 1) as f64 / (t.warmup_steps + 1) as f64;
    }
    if step >= t.steps || t.steps <= t.warmup_steps {
        return t.min_lr;
    }
    let ratio = (step - t.warmup_steps) as f64 / (t.steps - t.warmup_steps) as f64;
    let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
    t.min_lr + coeff * (t.lr - t.min_lr)
}

pub use ws_store::clip_factor;

/// AdamW moments of a resident run.
pub struct AdamW {
    pub m: Params,
    pub v: Params,
}

impl AdamW {
    pub fn new(spec: &ModelSpec) -> AdamW {
        AdamW { m: Params::zeros(spec), v: Params::zeros(spec) }
    }

    /// One update of every tensor; `t` is the 1-based step number. Returns
    /// the gradient norm before clipping.
    pub fn step(
        &mut self,
        spec: &ModelSpec,
        params: &mut Params,
        grads: &Params,
        cfg: &TrainSection,
        lr: f64,
        t: u64,
    ) -> f64 {
        let norm = grads.sum_of_squares().sqrt();
        let grad_scale = clip_factor(norm, cfg.grad_clip);
        for (i, ts) in spec.tensors.iter().enumerate() {
            let s = AdamWStep {
                lr: lr as f32,
                beta1: cfg.beta1 as f32,
                beta2: cfg.beta2 as f32,
                eps: cfg.eps as f32,
                weight_decay: if ts.decay { cfg.weight_decay as f32 } else { 0.0 },
                t,
                grad_scale,
            };
            adamw_update(&mut params.tensors[i], &grads.tensors[i], &mut self.m.tensors[i], &mut self.v.tensors[i], s);
        }
        norm
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RunConfig;

    #[test]
    fn schedule_warms_up_then_decays_to_min_lr() {
        let mut t = RunConfig::preset("tiny").unwrap().train;
        t.steps = 100;
        t.warmup_steps = 10;
        t.lr = 1.0;
        t.min_lr = 0.1;
        assert!((learning_rate(&t, 0) - 1.0 / 11.0).abs() < 1e-12);
        assert!((learning_rate(&t, 9) - 10.0 / 11.0).abs() < 1e-12);
        assert!((learning_rate(&t, 10) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&t, 55) - 0.55).abs() < 1e-12, "halfway down the cosine");
        assert!(learning_rate(&t, 99) > 0.1 && learning_rate(&t, 99) < 0.101);
        assert_eq!(learning_rate(&t, 100), 0.1);
        let lrs: Vec<f64> = (10..100).map(|s| learning_rate(&t, s)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]), "monotone decay");
    }

    #[test]
    fn clip_factor_matches_torch() {
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert!((clip_factor(2.0, 1.0) - (1.0 / (2.0 + 1e-6)) as f32).abs() < 1e-9);
        assert_eq!(clip_factor(10.0, 0.0), 1.0, "0 disables clipping");
    }
}
