//! AdamW with PyTorch semantics (`torch.optim.AdamW`, non-amsgrad).
//!
//! Per element, with g = grad * grad_scale (the global-norm clip factor):
//!   p *= 1 - lr * weight_decay          (decoupled; 0 for non-decayed tensors)
//!   m = beta1 * m + (1 - beta1) * g
//!   v = beta2 * v + (1 - beta2) * g^2
//!   p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! One pass over p, g, m, v: the update is bound by memory bandwidth.

use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number, for the bias corrections.
    pub t: u64,
    /// Multiplies the gradient first (gradient clipping).
    pub grad_scale: f32,
}

const CHUNK: usize = 1 << 14;

/// A step's scalars, derived once, and the update of one element: the
/// formula in one place for both entry points (and the CUDA kernel takes
/// the same scalars, `ws_cuda`'s `adamw`).
#[derive(Clone, Copy)]
struct Scalars {
    s: AdamWStep,
    step_size: f32,
    bc2_sqrt: f32,
    decay: f32,
}

impl Scalars {
    fn new(s: AdamWStep) -> Scalars {
        assert!(s.t >= 1);
        let bc1 = 1.0 - (s.beta1 as f64).powi(s.t as i32);
        let bc2 = 1.0 - (s.beta2 as f64).powi(s.t as i32);
        Scalars {
            s,
            step_size: (s.lr as f64 / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            decay: 1.0 - s.lr * s.weight_decay,
        }
    }

    #[inline(always)]
    fn update(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        let s = &self.s;
        let g = g * s.grad_scale;
        let mi = s.beta1 * *m + (1.0 - s.beta1) * g;
        let vi = s.beta2 * *v + (1.0 - s.beta2) * g * g;
        *m = mi;
        *v = vi;
        *p = *p * self.decay - self.step_size * mi / (vi.sqrt() / self.bc2_sqrt + s.eps);
    }
}

pub fn adamw_update(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], s: AdamWStep) {
    let n = param.len();
    assert!(grad.len() == n && m.len() == n && v.len() == n);
    let c = Scalars::new(s);
    param
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                c.update(&mut p[i], g[i], &mut m[i], &mut v[i]);
            }
        });
}

/// [`adamw_update`] that also writes each new weight rounded to bf16 (as
/// [`crate::bf16::to_bf16`]) into `out`: the store's update at a bf16 read,
/// one pass instead of an update and a second read of the weights.
pub fn adamw_update_bf16(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], s: AdamWStep, out: &mut [u16]) {
    let n = param.len();
    assert!(grad.len() == n && m.len() == n && v.len() == n && out.len() == n);
    let c = Scalars::new(s);
    param
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(out.par_chunks_mut(CHUNK))
        .for_each(|((((p, g), m), v), o)| {
            for i in 0..p.len() {
                c.update(&mut p[i], g[i], &mut m[i], &mut v[i]);
                o[i] = crate::bf16::to_bf16(p[i]);
            }
        });
}

pub mod reference {
    use super::AdamWStep;

    /// The same update, one element at a time in double precision.
    pub fn adamw_update(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], s: AdamWStep) {
        let (b1, b2) = (s.beta1 as f64, s.beta2 as f64);
        for i in 0..param.len() {
            let g = grad[i] as f64 * s.grad_scale as f64;
            let mi = b1 * m[i] as f64 + (1.0 - b1) * g;
            let vi = b2 * v[i] as f64 + (1.0 - b2) * g * g;
            let mhat = mi / (1.0 - b1.powi(s.t as i32));
            let vhat = vi / (1.0 - b2.powi(s.t as i32));
            let p = param[i] as f64 * (1.0 - s.lr as f64 * s.weight_decay as f64);
            param[i] = (p - s.lr as f64 * mhat / (vhat.sqrt() + s.eps as f64)) as f32;
            m[i] = mi as f32;
            v[i] = vi as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bf16_update_equals_update_then_rounding() {
        let mut rng = crate::Rng::new(8);
        let n = 40_000;
        let mut a: Vec<Vec<f32>> = (0..4)
            .map(|_| {
                let mut x = vec![0f32; n];
                rng.fill_normal(&mut x, 0.0, 0.1);
                x
            })
            .collect();
        for x in a[3].iter_mut() {
            *x = *x * *x;
        }
        let mut b = a.clone();
        let s = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, t: 3, grad_scale: 0.5 };
        let (p, rest) = a.split_at_mut(1);
        let (g, rest) = rest.split_at_mut(1);
        let (m, v) = rest.split_at_mut(1);
        adamw_update(&mut p[0], &g[0], &mut m[0], &mut v[0], s);
        let (p2, rest) = b.split_at_mut(1);
        let (g2, rest) = rest.split_at_mut(1);
        let (m2, v2) = rest.split_at_mut(1);
        let mut out = vec![0u16; n];
        adamw_update_bf16(&mut p2[0], &g2[0], &mut m2[0], &mut v2[0], s, &mut out);
        for (x, y) in [(&p[0], &p2[0]), (&m[0], &m2[0]), (&v[0], &v2[0]), (&g[0], &g2[0])] {
            assert!(x.iter().zip(y.iter()).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        let mut want = vec![0u16; n];
        crate::bf16::to_bf16_into(&mut want, &p[0]);
        assert_eq!(out, want);
        assert!(out.iter().any(|&x| x != 0));
    }

    use crate::matmul::tests::{assert_close, random};
    use crate::Rng;

    #[test]
    fn adamw_matches_reference_over_several_steps() {
        let mut rng = Rng::new(51);
        let n = 40_000;
        let mut p = random(&mut rng, n);
        let mut p_r = p.clone();
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let (mut m_r, mut v_r) = (m.clone(), v.clone());
        for t in 1..=4 {
            let g = random(&mut rng, n);
            let s = AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, t, grad_scale: 0.7 };
            adamw_update(&mut p, &g, &mut m, &mut v, s);
            reference::adamw_update(&mut p_r, &g, &mut m_r, &mut v_r, s);
        }
        assert_close("param", &p, &p_r, 1e-5, 1e-6);
        assert_close("m", &m, &m_r, 1e-5, 1e-7);
        assert_close("v", &v, &v_r, 1e-5, 1e-8);
    }
}
