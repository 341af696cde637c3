//! LayerNorm over the last dimension C, eps = 1e-5 (GPT-2).
//!
//! Forward saves the per-row mean and reciprocal standard deviation for the
//! backward pass. Backward accumulates into `dinp` (it is the residual
//! stream's gradient) and into `dweight`/`dbias`.

use crate::math;
use crate::parallel::{column_sums_into, SendPtr};
use rayon::prelude::*;

pub const EPS: f32 = 1e-5;

/// `out[R,C] = (inp - mean) * rstd * weight + bias`, saving `mean[R]`, `rstd[R]`.
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    rows: usize,
    c: usize,
) {
    assert_eq!(out.len(), rows * c);
    assert_eq!(inp.len(), rows * c);
    assert!(mean.len() == rows && rstd.len() == rows);
    assert!(weight.len() == c && bias.len() == c);
    out.par_chunks_mut(c)
        .zip(mean.par_iter_mut())
        .zip(rstd.par_iter_mut())
        .enumerate()
        .with_min_len(crate::parallel::rows_per_task(c))
        .for_each(|(r, ((o, m), s))| {
            let x = &inp[r * c..(r + 1) * c];
            let mu = math::sum(x) / c as f32;
            let var = math::centered_sum_sq(x, mu) / c as f32;
            let rs = 1.0 / (var + EPS).sqrt();
            for j in 0..c {
                o[j] = (x[j] - mu) * rs * weight[j] + bias[j];
            }
            *m = mu;
            *s = rs;
        });
}

/// Backward of [`layernorm_forward`]; accumulates into `dinp`, `dweight`, `dbias`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    rows: usize,
    c: usize,
) {
    assert_eq!(dinp.len(), rows * c);
    assert_eq!(dout.len(), rows * c);
    assert_eq!(inp.len(), rows * c);
    assert!(dweight.len() == c && dbias.len() == c && weight.len() == c);
    assert!(mean.len() == rows && rstd.len() == rows);
    let dinp_ptr = SendPtr(dinp.as_mut_ptr());
    let mut dwb = vec![0f32; 2 * c];
    column_sums_into(&mut dwb, rows, 2 * c, |range, acc| {
        let (dw_acc, db_acc) = acc.split_at_mut(c);
        for r in range {
            let x = &inp[r * c..(r + 1) * c];
            let g = &dout[r * c..(r + 1) * c];
            let (mu, rs) = (mean[r], rstd[r]);
            let mut dnorm_mean = 0f32;
            let mut dnorm_norm_mean = 0f32;
            for j in 0..c {
                let norm = (x[j] - mu) * rs;
                let dnorm = weight[j] * g[j];
                dnorm_mean += dnorm;
                dnorm_norm_mean += dnorm * norm;
            }
            dnorm_mean /= c as f32;
            dnorm_norm_mean /= c as f32;
            // SAFETY: each row r is written by exactly one task.
            let di = unsafe { std::slice::from_raw_parts_mut(dinp_ptr.get().add(r * c), c) };
            for j in 0..c {
                let norm = (x[j] - mu) * rs;
                let dnorm = weight[j] * g[j];
                db_acc[j] += g[j];
                dw_acc[j] += norm * g[j];
                di[j] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * rs;
            }
        }
    });
    for j in 0..c {
        dweight[j] += dwb[j];
        dbias[j] += dwb[c + j];
    }
}

pub mod reference {
    //! Two-pass, double-precision LayerNorm: the specification.

    pub fn layernorm_forward(
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        weight: &[f32],
        bias: &[f32],
        rows: usize,
        c: usize,
    ) {
        for r in 0..rows {
            let x = &inp[r * c..(r + 1) * c];
            let mu = x.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            let var = x.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / c as f64;
            let rs = 1.0 / (var + super::EPS as f64).sqrt();
            for j in 0..c {
                out[r * c + j] = ((x[j] as f64 - mu) * rs * weight[j] as f64 + bias[j] as f64) as f32;
            }
            mean[r] = mu as f32;
            rstd[r] = rs as f32;
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward(
        dinp: &mut [f32],
        dweight: &mut [f32],
        dbias: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        weight: &[f32],
        mean: &[f32],
        rstd: &[f32],
        rows: usize,
        c: usize,
    ) {
        for r in 0..rows {
            let (mu, rs) = (mean[r] as f64, rstd[r] as f64);
            let norm: Vec<f64> = (0..c).map(|j| (inp[r * c + j] as f64 - mu) * rs).collect();
            let dnorm: Vec<f64> = (0..c).map(|j| weight[j] as f64 * dout[r * c + j] as f64).collect();
            let m1 = dnorm.iter().sum::<f64>() / c as f64;
            let m2 = dnorm.iter().zip(&norm).map(|(a, b)| a * b).sum::<f64>() / c as f64;
            for j in 0..c {
                dbias[j] += dout[r * c + j];
                dweight[j] += (norm[j] * dout[r * c + j] as f64) as f32;
                dinp[r * c + j] += ((dnorm[j] - m1 - norm[j] * m2) * rs) as f32;
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
    fn layernorm_matches_reference() {
        let mut rng = Rng::new(2);
        let (rows, c) = (37, 48);
        let inp = random(&mut rng, rows * c);
        let w = random(&mut rng, c);
        let b = random(&mut rng, c);
        let dout = random(&mut rng, rows * c);
        let (mut out, mut mean, mut rstd) = (vec![0f32; rows * c], vec![0f32; rows], vec![0f32; rows]);
        let (mut out_r, mut mean_r, mut rstd_r) = (out.clone(), mean.clone(), rstd.clone());
        layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &b, rows, c);
        reference::layernorm_forward(&mut out_r, &mut mean_r, &mut rstd_r, &inp, &w, &b, rows, c);
        assert_close("out", &out, &out_r, 1e-5, 1e-5);
        assert_close("rstd", &rstd, &rstd_r, 1e-5, 1e-6);

        let start = random(&mut rng, rows * c);
        let (mut di, mut dw, mut db) = (start.clone(), vec![0.5f32; c], vec![0.25f32; c]);
        let (mut di_r, mut dw_r, mut db_r) = (start, dw.clone(), db.clone());
        layernorm_backward(&mut di, &mut dw, &mut db, &dout, &inp, &w, &mean, &rstd, rows, c);
        reference::layernorm_backward(&mut di_r, &mut dw_r, &mut db_r, &dout, &inp, &w, &mean_r, &rstd_r, rows, c);
        assert_close("dinp", &di, &di_r, 1e-4, 1e-5);
        assert_close("dweight", &dw, &dw_r, 1e-4, 1e-5);
        assert_close("dbias", &db, &db_r, 1e-5, 1e-5);
    }

    #[test]
    fn layernorm_backward_matches_finite_differences() {
        // Loss = sum(out * g) for a fixed random g; compare d loss / d inp.
        let mut rng = Rng::new(9);
        let (rows, c) = (3, 8);
        let inp = random(&mut rng, rows * c);
        let w = random(&mut rng, c);
        let b = random(&mut rng, c);
        let g = random(&mut rng, rows * c);
        let loss = |x: &[f32]| -> f64 {
            let (mut o, mut m, mut s) = (vec![0f32; rows * c], vec![0f32; rows], vec![0f32; rows]);
            reference::layernorm_forward(&mut o, &mut m, &mut s, x, &w, &b, rows, c);
            o.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let (mut o, mut m, mut s) = (vec![0f32; rows * c], vec![0f32; rows], vec![0f32; rows]);
        layernorm_forward(&mut o, &mut m, &mut s, &inp, &w, &b, rows, c);
        let (mut di, mut dw, mut db) = (vec![0f32; rows * c], vec![0f32; c], vec![0f32; c]);
        layernorm_backward(&mut di, &mut dw, &mut db, &g, &inp, &w, &m, &s, rows, c);
        let h = 1e-3f32;
        for i in 0..rows * c {
            let mut xp = inp.clone();
            xp[i] += h;
            let mut xm = inp.clone();
            xm[i] -= h;
            let fd = (loss(&xp) - loss(&xm)) / (2.0 * h as f64);
            assert!((fd - di[i] as f64).abs() < 2e-3, "dinp[{i}]: analytic {} vs finite difference {fd}", di[i]);
        }
    }
}
