//! bf16 GEMM with fp32 accumulation through oneDNN, loaded at run time.
//!
//! On CPUs with AMX (Sapphire Rapids and later) oneDNN runs bf16 products
//! 3-5x faster than fp32 on the same cores; it is what PyTorch's CPU autocast
//! uses. We call its `dnnl_gemm_bf16bf16f32` (row-major, like `dnnl_sgemm`;
//! exported by libdnnl 2.x but not declared in its 2.6 header) through
//! `dlopen`, so the binary builds and runs without oneDNN and asking for bf16
//! where it is missing is a clear error.
//!
//! Inputs are rounded to bf16 (nearest even) as they enter a product; outputs
//! and every accumulation stay fp32, so a layer computes exactly what the
//! fp32 layer does up to the rounding of its GEMM inputs. The linear layers
//! here have the same signatures and gradient conventions as
//! [`crate::matmul`]; their plain reference is the fp32 one, within bf16
//! tolerance.
//!
//! oneDNN brings its own OpenMP thread pool; the process should set
//! `OMP_WAIT_POLICY=PASSIVE` before loading it so that those threads sleep
//! instead of spinning against the rayon pool between products.

use crate::matmul::bias_backward;
use rayon::prelude::*;
use std::cell::RefCell;
use std::ffi::c_char;
use std::sync::OnceLock;

type GemmBf16 = unsafe extern "C" fn(
    transa: c_char,
    transb: c_char,
    m: i64,
    n: i64,
    k: i64,
    alpha: f32,
    a: *const u16,
    lda: i64,
    b: *const u16,
    ldb: i64,
    beta: f32,
    c: *mut f32,
    ldc: i64,
) -> i32;

struct OneDnn {
    gemm: GemmBf16,
    _lib: libloading::Library,
}

static ONEDNN: OnceLock<Result<OneDnn, String>> = OnceLock::new();

const LIBRARIES: &[&str] = &["libdnnl.so.2", "libdnnl.so.3", "libdnnl.so"];

fn load() -> Result<OneDnn, String> {
    let mut last = String::new();
    for name in LIBRARIES {
        // SAFETY: loading oneDNN runs its (and OpenMP's) initialisers, which
        // have no preconditions on our side.
        match unsafe { libloading::Library::new(*name) } {
            Ok(lib) => {
                // SAFETY: the symbol has this C signature in oneDNN 2.x and 3.x.
                let gemm = unsafe { lib.get::<GemmBf16>(b"dnnl_gemm_bf16bf16f32\0") }
                    .map(|s| *s)
                    .map_err(|e| format!("{name} lacks dnnl_gemm_bf16bf16f32: {e}"))?;
                return Ok(OneDnn { gemm, _lib: lib });
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!(
        "bf16 needs oneDNN, which was not found ({last}): install it (Debian: apt-get install libdnnl2) or use fp32"
    ))
}

fn onednn() -> &'static OneDnn {
    ONEDNN.get_or_init(load).as_ref().expect("bf16 kernels are only called after bf16::available() succeeded")
}

/// Whether bf16 GEMM can run here; the error says what to install.
pub fn available() -> Result<(), String> {
    ONEDNN.get_or_init(load).as_ref().map(|_| ()).map_err(Clone::clone)
}

/// fp32 -> bf16, round to nearest even (NaN stays NaN).
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `dst = bf16(src)`, over the pool.
pub fn to_bf16_into(dst: &mut [u16], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    dst.par_chunks_mut(1 << 16).zip(src.par_chunks(1 << 16)).for_each(|(d, s)| {
        for (d, &s) in d.iter_mut().zip(s) {
            *d = to_bf16(s);
        }
    });
}

fn convert(dst: &mut Vec<u16>, src: &[f32]) {
    dst.clear();
    dst.resize(src.len(), 0);
    dst.par_chunks_mut(1 << 15).zip(src.par_chunks(1 << 15)).for_each(|(d, s)| {
        for (d, &s) in d.iter_mut().zip(s) {
            *d = to_bf16(s);
        }
    });
}

thread_local! {
    /// Conversion buffers, grown to the largest operand and then reused.
    static SCRATCH: RefCell<[Vec<u16>; 3]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

/// Row-major `c[m,n] = alpha * op(a) @ op(b) + beta * c`, `op` transposing
/// when the flag is set; `lda`, `ldb`, `ldc` are row strides of the stored
/// matrices.
#[allow(clippy::too_many_arguments)]
fn gemm(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    a: &[u16],
    lda: usize,
    b: &[u16],
    ldb: usize,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let (a_rows, b_rows) = (if ta { k } else { m }, if tb { n } else { k });
    assert!(a.len() >= (a_rows - 1) * lda + if ta { m } else { k }, "bf16 gemm: A too small");
    assert!(b.len() >= (b_rows - 1) * ldb + if tb { k } else { n }, "bf16 gemm: B too small");
    assert!(c.len() >= (m - 1) * ldc + n, "bf16 gemm: C too small");
    let flag = |t: bool| if t { b'T' as c_char } else { b'N' as c_char };
    // SAFETY: bounds checked above; oneDNN reads a and b, writes c only.
    let status = unsafe {
        (onednn().gemm)(
            flag(ta),
            flag(tb),
            m as i64,
            n as i64,
            k as i64,
            1.0,
            a.as_ptr(),
            lda as i64,
            b.as_ptr(),
            ldb as i64,
            beta,
            c.as_mut_ptr(),
            ldc as i64,
        )
    };
    assert_eq!(status, 0, "dnnl_gemm_bf16bf16f32 failed with status {status}");
}

/// `out[BT,N] = inp[BT,K] @ w[K,N] + bias[N]` with bf16 inputs.
pub fn matmul_forward(out: &mut [f32], inp: &[f32], w: &[f32], bias: Option<&[f32]>, bt: usize, k: usize, n: usize) {
    assert_eq!(out.len(), bt * n);
    assert_eq!(inp.len(), bt * k);
    assert_eq!(w.len(), k * n);
    match bias {
        Some(bias) => out.par_chunks_mut(n).for_each(|row| row.copy_from_slice(bias)),
        None => out.fill(0.0),
    }
    SCRATCH.with_borrow_mut(|[a, b, _]| {
        convert(a, inp);
        convert(b, w);
        gemm(false, false, bt, n, k, a, k, b, n, 1.0, out, n);
    });
}

/// Backward of [`matmul_forward`]: `dinp = dout @ w^T` (overwrites),
/// `dw += inp^T @ dout`, `dbias += column sums of dout` (fp32).
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
    SCRATCH.with_borrow_mut(|[g, wb, x]| {
        convert(g, dout);
        convert(wb, w);
        convert(x, inp);
        gemm(false, true, bt, k, n, g, n, wb, n, 0.0, dinp, k);
        gemm(true, false, k, n, bt, x, k, g, n, 1.0, dw, n);
    });
    if let Some(dbias) = dbias {
        bias_backward(dbias, dout, bt, n);
    }
}

/// The tied output projection: `logits[R,V] = x[R,C] @ wte[V,C]^T`.
pub fn logits_forward(logits: &mut [f32], x: &[f32], wte_bf16: &[u16], rows: usize, c: usize, v: usize) {
    SCRATCH.with_borrow_mut(|[a, _, _]| {
        convert(a, x);
        gemm(false, true, rows, v, c, a, c, wte_bf16, c, 0.0, logits, v);
    });
}

/// Its backward: `dx[R,C] = dlogits @ wte` (overwrites) and
/// `dwte[V,C] += dlogits^T @ x`.
#[allow(clippy::too_many_arguments)]
pub fn logits_backward(
    dx: &mut [f32],
    dwte: &mut [f32],
    dlogits: &[f32],
    x: &[f32],
    wte_bf16: &[u16],
    rows: usize,
    c: usize,
    v: usize,
) {
    SCRATCH.with_borrow_mut(|[g, _, a]| {
        convert(g, dlogits);
        convert(a, x);
        gemm(false, false, rows, c, v, g, v, wte_bf16, c, 0.0, dx, c);
        gemm(true, false, v, c, rows, g, v, a, c, 1.0, dwte, c);
    });
}

/// `w` rounded to bf16, for a weight used by several products.
pub fn to_bf16_vec(dst: &mut Vec<u16>, w: &[f32]) {
    convert(dst, w);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::reference;
    use crate::matmul::tests::random;
    use crate::Rng;

    /// bf16 rounds each input to 8 significant bits: products of K terms
    /// are checked within 1e-2 of the tensor's scale (max |ref|).
    fn assert_bf16_close(what: &str, ours: &[f32], reference: &[f32]) {
        let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
            assert!((a - b).abs() <= 1e-2 * scale, "{what}[{i}]: {a} vs fp32 reference {b} (scale {scale})");
        }
    }

    fn skip() -> bool {
        if let Err(e) = available() {
            eprintln!("skipped: {e}");
            return true;
        }
        false
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3F80);
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 512.0)), 1.0, "a tie rounds to even");
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 512.0)), 1.0 + 4.0 / 512.0, "a tie rounds to even, upward");
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
    }

    #[test]
    fn bf16_linear_layer_matches_fp32_reference() {
        if skip() {
            return;
        }
        let mut rng = Rng::new(61);
        for &(bt, k, n) in &[(1, 1, 1), (7, 5, 3), (130, 48, 96), (64, 256, 1024)] {
            let inp = random(&mut rng, bt * k);
            let w = random(&mut rng, k * n);
            let bias = random(&mut rng, n);
            let dout = random(&mut rng, bt * n);
            let (mut out, mut out_r) = (vec![0f32; bt * n], vec![0f32; bt * n]);
            matmul_forward(&mut out, &inp, &w, Some(&bias), bt, k, n);
            reference::matmul_forward(&mut out_r, &inp, &w, Some(&bias), bt, k, n);
            assert_bf16_close("forward", &out, &out_r);
            let (mut dinp, mut dw, mut db) = (vec![3f32; bt * k], vec![0.5f32; k * n], vec![0.25f32; n]);
            let (mut dinp_r, mut dw_r, mut db_r) = (vec![0f32; bt * k], dw.clone(), db.clone());
            matmul_backward(&mut dinp, &mut dw, Some(&mut db), &dout, &inp, &w, bt, k, n);
            reference::matmul_backward(&mut dinp_r, &mut dw_r, Some(&mut db_r), &dout, &inp, &w, bt, k, n);
            assert_bf16_close("dinp", &dinp, &dinp_r);
            assert_bf16_close("dw", &dw, &dw_r);
            crate::matmul::tests::assert_close("dbias (fp32)", &db, &db_r, 1e-5, 1e-5);
        }
    }

    #[test]
    fn bf16_tied_projection_matches_fp32() {
        if skip() {
            return;
        }
        let mut rng = Rng::new(62);
        let (rows, c, v) = (33, 64, 300);
        let x = random(&mut rng, rows * c);
        let wte = random(&mut rng, v * c);
        let g = random(&mut rng, rows * v);
        let mut wte_h = Vec::new();
        to_bf16_vec(&mut wte_h, &wte);
        let mut logits = vec![0f32; rows * v];
        logits_forward(&mut logits, &x, &wte_h, rows, c, v);
        // Reference: x @ wte^T is a linear layer with w = wte^T.
        let mut wt = vec![0f32; c * v];
        for i in 0..v {
            for j in 0..c {
                wt[j * v + i] = wte[i * c + j];
            }
        }
        let mut logits_r = vec![0f32; rows * v];
        reference::matmul_forward(&mut logits_r, &x, &wt, None, rows, c, v);
        assert_bf16_close("logits", &logits, &logits_r);
        let (mut dx, mut dwte) = (vec![0f32; rows * c], vec![0f32; v * c]);
        logits_backward(&mut dx, &mut dwte, &g, &x, &wte_h, rows, c, v);
        let (mut dx_r, mut dwt_r) = (vec![0f32; rows * c], vec![0f32; c * v]);
        reference::matmul_backward(&mut dx_r, &mut dwt_r, None, &g, &x, &wt, rows, c, v);
        let mut dwte_r = vec![0f32; v * c];
        for i in 0..v {
            for j in 0..c {
                dwte_r[i * c + j] = dwt_r[j * v + i];
            }
        }
        assert_bf16_close("dx", &dx, &dx_r);
        assert_bf16_close("dwte", &dwte, &dwte_r);
    }
}
