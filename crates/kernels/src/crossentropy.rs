//! Softmax cross-entropy over the vocabulary, fused with its backward.
//!
//! `logits[R,V]` is consumed in place: after the call with a gradient scale
//! it holds `dlogits = (softmax - onehot(target)) * dloss_scale`. Computing
//! the loss and the gradient in one pass over the row saves a second read of
//! the largest activation in the model.

use crate::math;
use rayon::prelude::*;

/// Per-row losses (natural log) into `losses[R]`; if `dloss_scale` is given,
/// overwrites `logits` with the gradient of `dloss_scale * sum(losses)`.
pub fn crossentropy_forward_backward(
    losses: &mut [f32],
    logits: &mut [f32],
    targets: &[u32],
    v: usize,
    dloss_scale: Option<f32>,
) {
    let rows = targets.len();
    assert_eq!(logits.len(), rows * v);
    assert_eq!(losses.len(), rows);
    logits.par_chunks_mut(v).zip(losses.par_iter_mut()).zip(targets.par_iter()).for_each(|((row, loss), &target)| {
        let target = target as usize;
        assert!(target < v, "target {target} outside the vocabulary of {v}");
        let max = math::max(row);
        let shifted_target = row[target] - max;
        match dloss_scale {
            Some(scale) => {
                let sum = math::exp_shifted_sum(row, max);
                *loss = sum.ln() - shifted_target;
                let inv = scale / sum;
                for x in row.iter_mut() {
                    *x *= inv;
                }
                row[target] -= scale;
            }
            None => {
                let sum = math::sum_exp_shifted(row, max);
                *loss = sum.ln() - shifted_target;
            }
        }
    });
}

pub mod reference {
    pub fn crossentropy(
        losses: &mut [f32],
        dlogits: &mut [f32],
        logits: &[f32],
        targets: &[u32],
        v: usize,
        scale: f32,
    ) {
        for (r, &t) in targets.iter().enumerate() {
            let row = &logits[r * v..(r + 1) * v];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
            losses[r] = (z.ln() + max - row[t as usize] as f64) as f32;
            for j in 0..v {
                let p = (row[j] as f64 - max).exp() / z;
                let y = if j == t as usize { 1.0 } else { 0.0 };
                dlogits[r * v + j] = ((p - y) * scale as f64) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::tests::{assert_close, random};
    use crate::Rng;

    #[test]
    fn crossentropy_matches_reference_with_and_without_gradient() {
        let mut rng = Rng::new(31);
        let (rows, v) = (9, 1000);
        let mut logits = random(&mut rng, rows * v);
        for x in logits.iter_mut() {
            *x *= 8.0;
        }
        let targets: Vec<u32> = (0..rows).map(|_| rng.below(v as u64) as u32).collect();
        let (mut loss_r, mut dl_r) = (vec![0f32; rows], vec![0f32; rows * v]);
        reference::crossentropy(&mut loss_r, &mut dl_r, &logits, &targets, v, 0.25);

        let mut loss_only = vec![0f32; rows];
        let mut l1 = logits.clone();
        crossentropy_forward_backward(&mut loss_only, &mut l1, &targets, v, None);
        assert_close("loss (forward only)", &loss_only, &loss_r, 1e-5, 1e-5);
        assert_eq!(l1, logits, "forward-only must leave the logits untouched");

        let mut loss = vec![0f32; rows];
        let mut l2 = logits.clone();
        crossentropy_forward_backward(&mut loss, &mut l2, &targets, v, Some(0.25));
        assert_close("loss", &loss, &loss_r, 1e-5, 1e-5);
        assert_close("dlogits", &l2, &dl_r, 1e-5, 1e-7);
    }
}
