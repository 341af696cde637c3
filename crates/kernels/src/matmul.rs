//! Linear layers: `out[BT,N] = inp[BT,K] @ w[K,N] + bias[N]`, and backward.
//!
//! Weights are stored [K, N] (in, out), the Hugging Face GPT-2 `Conv1D`
//! layout, so checkpoints need no transposes. GEMM comes from the `gemm`
//! crate (AVX-512 kernels, rayon threads); every other layout we need (A^T B
//! for weight gradients, A B^T for input gradients and the tied output
//! projection) is expressed with strides, never with a transposed copy.
//!
//! Gradients: `dw` and `dbias` accumulate, `dinp` is overwritten.

use crate::parallel::column_sums_into;
use rayon::prelude::*;

/// A strided view of a read-only matrix: element (i, j) is at `i*rs + j*cs`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major matrix with `cols` columns.
    pub fn rows(data: &'a [f32], cols: usize) -> Mat<'a> {
        Mat { data, rs: cols, cs: 1 }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn transposed(data: &'a [f32], cols: usize) -> Mat<'a> {
        Mat { data, rs: 1, cs: cols }
    }
    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows == 0 || cols == 0 {
            return;
        }
        let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
        assert!(last < self.data.len(), "{what}: {rows}x{cols} view past the end of {} elements", self.data.len());
    }
}

/// `dst[m,n] (+)= scale * a[m,k] @ b[k,n]`; `dst` is row-major with row
/// stride `dst_rs`. Accumulates into `dst` when `accumulate`, else overwrites.
/// `threads` = 1 runs on the calling thread (for use inside parallel loops).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    m: usize,
    n: usize,
    k: usize,
    scale: f32,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * dst_rs + n <= dst.len(), "gemm: dst too small");
    // SAFETY: `dst` is large enough (checked) and, being a unique borrow,
    // aliases neither input.
    unsafe { gemm_raw(dst.as_mut_ptr(), dst_rs, accumulate, a, b, m, n, k, scale, threads) }
}

/// [`gemm`] into a raw destination, for parallel loops whose tasks write
/// disjoint, interleaved parts of one buffer (attention heads).
///
/// # Safety
/// `dst` must be valid for writes at `i*dst_rs + j` for i < m, j < n, and no
/// other thread may access those elements during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_raw(
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    m: usize,
    n: usize,
    k: usize,
    scale: f32,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    a.check(m, k, "gemm lhs");
    b.check(k, n, "gemm rhs");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n).fill(0.0);
            }
        }
        return;
    }
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        1.0,
        scale,
        false,
        false,
        false,
        par,
    );
}

/// Number of threads GEMM should use from the current rayon pool.
pub fn pool_threads() -> usize {
    rayon::current_num_threads()
}

/// `out[BT,N] = inp[BT,K] @ w[K,N] + bias[N]`.
pub fn matmul_forward(out: &mut [f32], inp: &[f32], w: &[f32], bias: Option<&[f32]>, bt: usize, k: usize, n: usize) {
    assert_eq!(out.len(), bt * n);
    assert_eq!(inp.len(), bt * k);
    assert_eq!(w.len(), k * n);
    match bias {
        Some(bias) => {
            assert_eq!(bias.len(), n);
            out.par_chunks_mut(n).for_each(|row| row.copy_from_slice(bias));
        }
        None => out.fill(0.0),
    }
    gemm(out, n, true, Mat::rows(inp, k), Mat::rows(w, n), bt, n, k, 1.0, pool_threads());
}

/// Backward of [`matmul_forward`]: `dinp = dout @ w^T` (overwrites),
/// `dw += inp^T @ dout`, `dbias += sum over rows of dout`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward(
    dinp: &mut [f32],
    dw: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    bt: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(dinp.len(), bt * k);
    assert_eq!(dw.len(), k * n);
    assert_eq!(dout.len(), bt * n);
    assert_eq!(inp.len(), bt * k);
    assert_eq!(w.len(), k * n);
    let threads = pool_threads();
    gemm(dinp, k, false, Mat::rows(dout, n), Mat::transposed(w, n), bt, k, n, 1.0, threads);
    gemm(dw, n, true, Mat::transposed(inp, k), Mat::rows(dout, n), k, n, bt, 1.0, threads);
    if let Some(dbias) = dbias {
        bias_backward(dbias, dout, bt, n);
    }
}

/// `dbias[N] += sum over BT rows of dout[BT,N]`, deterministic.
pub fn bias_backward(dbias: &mut [f32], dout: &[f32], bt: usize, n: usize) {
    column_sums_into(dbias, bt, n, |rows, acc| {
        for r in rows {
            for (a, x) in acc.iter_mut().zip(&dout[r * n..(r + 1) * n]) {
                *a += x;
            }
        }
    });
}

pub mod reference {
    //! Plain triple loops, the specification of the fast versions.

    pub fn matmul_forward(
        out: &mut [f32],
        inp: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        bt: usize,
        k: usize,
        n: usize,
    ) {
        for r in 0..bt {
            for j in 0..n {
                let mut acc = bias.map_or(0.0, |b| b[j] as f64);
                for p in 0..k {
                    acc += inp[r * k + p] as f64 * w[p * n + j] as f64;
                }
                out[r * n + j] = acc as f32;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn matmul_backward(
        dinp: &mut [f32],
        dw: &mut [f32],
        dbias: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        w: &[f32],
        bt: usize,
        k: usize,
        n: usize,
    ) {
        for r in 0..bt {
            for p in 0..k {
                let mut acc = 0f64;
                for j in 0..n {
                    acc += dout[r * n + j] as f64 * w[p * n + j] as f64;
                }
                dinp[r * k + p] = acc as f32;
            }
        }
        for p in 0..k {
            for j in 0..n {
                let mut acc = 0f64;
                for r in 0..bt {
                    acc += inp[r * k + p] as f64 * dout[r * n + j] as f64;
                }
                dw[p * n + j] += acc as f32;
            }
        }
        if let Some(dbias) = dbias {
            for j in 0..n {
                let mut acc = 0f64;
                for r in 0..bt {
                    acc += dout[r * n + j] as f64;
                }
                dbias[j] += acc as f32;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::Rng;

    pub fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
        let mut v = vec![0f32; n];
        rng.fill_uniform(&mut v, -1.0, 1.0);
        v
    }

    /// Asserts `|a - b| <= atol + rtol * |b|` elementwise, naming the first
    /// element that differs.
    pub fn assert_close(what: &str, a: &[f32], b: &[f32], rtol: f32, atol: f32) {
        assert_eq!(a.len(), b.len(), "{what}: lengths differ");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= atol + rtol * y.abs(), "{what}: element {i} differs: {x} vs reference {y}");
        }
    }

    #[test]
    fn matmul_forward_and_backward_match_reference() {
        let mut rng = Rng::new(11);
        // Odd sizes exercise the edge handling of the GEMM micro-kernels.
        for &(bt, k, n) in &[(1, 1, 1), (7, 5, 3), (33, 64, 17), (130, 48, 96)] {
            let inp = random(&mut rng, bt * k);
            let w = random(&mut rng, k * n);
            let bias = random(&mut rng, n);
            let dout = random(&mut rng, bt * n);
            let mut out = vec![0f32; bt * n];
            let mut out_ref = vec![0f32; bt * n];
            matmul_forward(&mut out, &inp, &w, Some(&bias), bt, k, n);
            reference::matmul_forward(&mut out_ref, &inp, &w, Some(&bias), bt, k, n);
            assert_close("forward", &out, &out_ref, 1e-5, 1e-5);

            let init_dw = random(&mut rng, k * n);
            let init_db = random(&mut rng, n);
            let (mut dinp, mut dw, mut db) = (vec![9f32; bt * k], init_dw.clone(), init_db.clone());
            let (mut dinp_r, mut dw_r, mut db_r) = (vec![0f32; bt * k], init_dw, init_db);
            matmul_backward(&mut dinp, &mut dw, Some(&mut db), &dout, &inp, &w, bt, k, n);
            reference::matmul_backward(&mut dinp_r, &mut dw_r, Some(&mut db_r), &dout, &inp, &w, bt, k, n);
            assert_close("dinp", &dinp, &dinp_r, 1e-5, 1e-5);
            assert_close("dw", &dw, &dw_r, 1e-5, 1e-5);
            assert_close("dbias", &db, &db_r, 1e-5, 1e-5);
        }
    }

    #[test]
    fn gemm_is_deterministic_across_thread_counts() {
        let mut rng = Rng::new(5);
        let (m, n, k) = (200, 96, 300);
        let a = random(&mut rng, m * k);
        let b = random(&mut rng, k * n);
        let mut d1 = vec![0f32; m * n];
        let mut d2 = vec![0f32; m * n];
        gemm(&mut d1, n, false, Mat::rows(&a, k), Mat::rows(&b, n), m, n, k, 1.0, 1);
        gemm(&mut d2, n, false, Mat::rows(&a, k), Mat::rows(&b, n), m, n, k, 1.0, 2);
        assert_eq!(d1, d2);
    }
}
