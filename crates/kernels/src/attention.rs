//! Causal multi-head self-attention (GPT-2), forward and backward.
//!
//! Input is the fused projection `qkv[B,T,3C]` (q, k, v side by side, head h
//! in channels h*hs..(h+1)*hs of each, hs = C/H); output `out[B,T,C]`.
//! Forward saves the attention probabilities `att[B,H,T,T]` (zero above the
//! diagonal) for the backward pass.
//!
//! Each (batch, head) pair is one task; inside it the products are GEMMs on
//! strided views of `qkv`, computed in row blocks so that the upper triangle
//! that the causal mask discards is mostly never multiplied.
//! Backward overwrites `dqkv`.

use crate::math;
use crate::matmul::{gemm_raw, Mat};
use crate::parallel::SendPtr;
use rayon::prelude::*;

/// Rows per block: the causal waste is at most one block's triangle.
const ROW_BLOCK: usize = 64;

fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(ROW_BLOCK).map(move |r0| (r0, (r0 + ROW_BLOCK).min(t)))
}

/// `out[B,T,C]`, `att[B,H,T,T]` from `qkv[B,T,3C]`.
pub fn attention_forward(out: &mut [f32], att: &mut [f32], qkv: &[f32], b: usize, t: usize, c: usize, nh: usize) {
    assert_eq!(c % nh, 0, "channels must divide by heads");
    assert_eq!(out.len(), b * t * c);
    assert_eq!(att.len(), b * nh * t * t);
    assert_eq!(qkv.len(), b * t * 3 * c);
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let out_ptr = SendPtr(out.as_mut_ptr());
    att.par_chunks_mut(t * t).enumerate().for_each(|(bh, p)| {
        let (bi, h) = (bh / nh, bh % nh);
        let base = bi * t * 3 * c + h * hs;
        let q = &qkv[base..];
        let k = &qkv[base + c..];
        let v = &qkv[base + 2 * c..];
        for (r0, r1) in blocks(t) {
            let m = r1 - r0;
            // S[r0..r1, 0..r1] = scale * Q[r0..r1] K[0..r1]^T
            // SAFETY: `p` is this task's own [T,T] block.
            unsafe {
                gemm_raw(
                    p.as_mut_ptr().add(r0 * t),
                    t,
                    false,
                    Mat { data: &q[r0 * 3 * c..], rs: 3 * c, cs: 1 },
                    Mat { data: k, rs: 1, cs: 3 * c },
                    m,
                    r1,
                    hs,
                    scale,
                    1,
                );
            }
            for i in r0..r1 {
                let row = &mut p[i * t..(i + 1) * t];
                let (live, masked) = row.split_at_mut(i + 1);
                let max = math::max(live);
                let inv = 1.0 / math::exp_shifted_sum(live, max);
                for x in live.iter_mut() {
                    *x *= inv;
                }
                masked.fill(0.0);
            }
            // Y[r0..r1] = P[r0..r1, 0..r1] V[0..r1]
            // SAFETY: task (bi, h) alone writes rows bi*T.. and columns h*hs..(h+1)*hs of `out`.
            unsafe {
                gemm_raw(
                    out_ptr.get().add((bi * t + r0) * c + h * hs),
                    c,
                    false,
                    Mat { data: &p[r0 * t..], rs: t, cs: 1 },
                    Mat { data: v, rs: 3 * c, cs: 1 },
                    m,
                    hs,
                    r1,
                    1.0,
                    1,
                );
            }
        }
    });
}

/// Backward of [`attention_forward`]: overwrites `dqkv[B,T,3C]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    att: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    assert_eq!(dqkv.len(), b * t * 3 * c);
    assert_eq!(dout.len(), b * t * c);
    assert_eq!(att.len(), b * nh * t * t);
    assert_eq!(qkv.len(), b * t * 3 * c);
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let dqkv_ptr = SendPtr(dqkv.as_mut_ptr());
    (0..b * nh).into_par_iter().for_each_init(
        || vec![0f32; t * t],
        |ds, bh| {
            let (bi, h) = (bh / nh, bh % nh);
            let base = bi * t * 3 * c + h * hs;
            let q = &qkv[base..];
            let k = &qkv[base + c..];
            let v = &qkv[base + 2 * c..];
            let dy = &dout[bi * t * c + h * hs..];
            let p = &att[bh * t * t..(bh + 1) * t * t];
            let dst = |part: usize, row: usize| dqkv_ptr.get().wrapping_add(base + part * c + row * 3 * c);
            for (r0, r1) in blocks(t) {
                let m = r1 - r0;
                // dV[r0..r1] = P[r0.., r0..r1]^T dY[r0..]   (P is zero above the diagonal)
                // SAFETY (all gemm_raw below): task (bi, h) alone writes rows of batch
                // bi in columns h*hs..(h+1)*hs of each of q, k, v in `dqkv`; `ds` is its own.
                unsafe {
                    gemm_raw(
                        dst(2, r0),
                        3 * c,
                        false,
                        Mat { data: &p[r0 * t + r0..], rs: 1, cs: t },
                        Mat { data: &dy[r0 * c..], rs: c, cs: 1 },
                        m,
                        hs,
                        t - r0,
                        1.0,
                        1,
                    );
                    // dP[r0..r1, 0..r1] = dY[r0..r1] V[0..r1]^T
                    gemm_raw(
                        ds.as_mut_ptr().add(r0 * t),
                        t,
                        false,
                        Mat { data: &dy[r0 * c..], rs: c, cs: 1 },
                        Mat { data: v, rs: 1, cs: 3 * c },
                        m,
                        r1,
                        hs,
                        1.0,
                        1,
                    );
                }
                // dS = P * (dP - sum_j P dP), scaled for the 1/sqrt(hs) in S.
                for i in r0..r1 {
                    let pr = &p[i * t..i * t + r1];
                    let dr = &mut ds[i * t..i * t + r1];
                    let dot = math::dot(pr, dr);
                    for (d, &pv) in dr.iter_mut().zip(pr) {
                        *d = pv * (*d - dot) * scale;
                    }
                }
            }
            for (r0, r1) in blocks(t) {
                let m = r1 - r0;
                unsafe {
                    // dQ[r0..r1] = dS[r0..r1, 0..r1] K[0..r1]
                    gemm_raw(
                        dst(0, r0),
                        3 * c,
                        false,
                        Mat { data: &ds[r0 * t..], rs: t, cs: 1 },
                        Mat { data: k, rs: 3 * c, cs: 1 },
                        m,
                        hs,
                        r1,
                        1.0,
                        1,
                    );
                    // dK[r0..r1] = dS[r0.., r0..r1]^T Q[r0..]
                    gemm_raw(
                        dst(1, r0),
                        3 * c,
                        false,
                        Mat { data: &ds[r0 * t + r0..], rs: 1, cs: t },
                        Mat { data: &q[r0 * 3 * c..], rs: 3 * c, cs: 1 },
                        m,
                        hs,
                        t - r0,
                        1.0,
                        1,
                    );
                }
            }
        },
    );
}

pub mod reference {
    //! Naive attention in double precision: the specification.

    pub fn attention_forward(out: &mut [f32], att: &mut [f32], qkv: &[f32], b: usize, t: usize, c: usize, nh: usize) {
        let hs = c / nh;
        let scale = 1.0 / (hs as f64).sqrt();
        for bi in 0..b {
            for h in 0..nh {
                let q = |i: usize, d: usize| qkv[(bi * t + i) * 3 * c + h * hs + d] as f64;
                let k = |i: usize, d: usize| qkv[(bi * t + i) * 3 * c + c + h * hs + d] as f64;
                let v = |i: usize, d: usize| qkv[(bi * t + i) * 3 * c + 2 * c + h * hs + d] as f64;
                for i in 0..t {
                    let s: Vec<f64> =
                        (0..=i).map(|j| (0..hs).map(|d| q(i, d) * k(j, d)).sum::<f64>() * scale).collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let z: f64 = e.iter().sum();
                    let row = &mut att[((bi * nh + h) * t + i) * t..((bi * nh + h) * t + i + 1) * t];
                    row.fill(0.0);
                    for j in 0..=i {
                        row[j] = (e[j] / z) as f32;
                    }
                    for d in 0..hs {
                        out[(bi * t + i) * c + h * hs + d] = (0..=i).map(|j| e[j] / z * v(j, d)).sum::<f64>() as f32;
                    }
                }
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
    fn attention_forward_matches_reference() {
        let mut rng = Rng::new(21);
        for &(b, t, c, nh) in &[(1, 1, 4, 1), (2, 7, 8, 2), (2, 70, 24, 3), (1, 130, 32, 4)] {
            let qkv = random(&mut rng, b * t * 3 * c);
            let (mut out, mut att) = (vec![0f32; b * t * c], vec![7f32; b * nh * t * t]);
            let (mut out_r, mut att_r) = (out.clone(), att.clone());
            attention_forward(&mut out, &mut att, &qkv, b, t, c, nh);
            reference::attention_forward(&mut out_r, &mut att_r, &qkv, b, t, c, nh);
            assert_close("out", &out, &out_r, 1e-5, 1e-5);
            assert_close("att", &att, &att_r, 1e-5, 1e-6);
        }
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        // loss = sum(out * g); check d loss / d qkv against central differences
        // of the double-precision reference.
        let mut rng = Rng::new(22);
        for &(b, t, c, nh) in &[(1, 5, 4, 2), (2, 67, 8, 2)] {
            let qkv = random(&mut rng, b * t * 3 * c);
            let g = random(&mut rng, b * t * c);
            let loss = |x: &[f32]| -> f64 {
                let (mut o, mut a) = (vec![0f32; b * t * c], vec![0f32; b * nh * t * t]);
                reference::attention_forward(&mut o, &mut a, x, b, t, c, nh);
                o.iter().zip(&g).map(|(p, q)| *p as f64 * *q as f64).sum()
            };
            let (mut out, mut att) = (vec![0f32; b * t * c], vec![0f32; b * nh * t * t]);
            attention_forward(&mut out, &mut att, &qkv, b, t, c, nh);
            let mut dqkv = vec![5f32; qkv.len()];
            attention_backward(&mut dqkv, &g, &qkv, &att, b, t, c, nh);
            let h = 1e-3f32;
            let stride = if qkv.len() > 200 { 7 } else { 1 };
            for i in (0..qkv.len()).step_by(stride) {
                let mut xp = qkv.clone();
                xp[i] += h;
                let mut xm = qkv.clone();
                xm[i] -= h;
                let fd = (loss(&xp) - loss(&xm)) / (2.0 * h as f64);
                assert!(
                    (fd - dqkv[i] as f64).abs() < 1e-3 + 1e-3 * fd.abs(),
                    "dqkv[{i}] (b={b} t={t}): analytic {} vs finite difference {fd}",
                    dqkv[i]
                );
            }
        }
    }
}
