//! Helpers shared by the integration tests.
//!
//! Comparing two runs that add the same gradients in different orders:
//! each tensor's update over the run (weights after minus weights before)
//! by relative L2 distance. Not element by element: AdamW divides each
//! gradient by its own running magnitude, so an element whose gradient is a
//! near-cancellation can move by up to lr per step in either run. The key
//! bias (c_attn.bias[C..2C]), whose gradient is analytically zero and
//! numerically such noise, is left out of the L2 check and bounded by that
//! reach.
#![allow(dead_code)]

use ws_model::{ModelSpec, Params};
use ws_train::RunConfig;

pub fn assert_updates_close(what: &str, init: &Params, a: &Params, b: &Params, c: &RunConfig, steps: usize, tol: f64) {
    let spec = ModelSpec::new(c.model);
    let ch = c.model.n_embd;
    let reach = (c.train.lr * steps as f64) as f32;
    for (i, ts) in spec.tensors.iter().enumerate() {
        let key_bias = ts.name.ends_with("attn.c_attn.bias");
        let (mut diff, mut norm) = (0f64, 0f64);
        for j in 0..ts.numel() {
            let (x0, xa, xb) = (init.tensors[i][j], a.tensors[i][j], b.tensors[i][j]);
            if key_bias && (ch..2 * ch).contains(&j) {
                assert!(
                    (xa - x0).abs() <= reach && (xb - x0).abs() <= reach,
                    "{what}: {}[{j}] beyond AdamW's reach",
                    ts.name
                );
                continue;
            }
            diff += ((xa - x0) as f64 - (xb - x0) as f64).powi(2);
            norm += ((xb - x0) as f64).powi(2);
        }
        let rel = (diff / norm.max(1e-300)).sqrt();
        assert!(
            rel <= tol || norm == 0.0 && diff == 0.0,
            "{what}: {} update differs by {rel:.2e} (relative L2)",
            ts.name
        );
    }
}
