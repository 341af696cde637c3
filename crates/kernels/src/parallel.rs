//! Helpers to split work over the rayon pool deterministically.
//!
//! Reductions (sums over rows, for example bias gradients) are split into a
//! fixed number of chunks that depends only on the problem size, never on the
//! number of threads, and the partial sums are added in chunk order. So a
//! result is bit-identical whatever the thread count.

use rayon::prelude::*;

/// Row chunk size for row-parallel kernels: large enough to amortise the
/// task overhead, independent of the thread count.
pub fn rows_per_task(row_len: usize) -> usize {
    (16384 / row_len.max(1)).clamp(1, 256)
}

/// Sums `f(rows)` over fixed chunks of `rows` rows each into `out` (length
/// `width`), accumulating (`+=`), in chunk order.
pub fn column_sums_into(
    out: &mut [f32],
    rows: usize,
    width: usize,
    f: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) {
    assert_eq!(out.len(), width);
    let chunk = 64usize;
    let n_chunks = rows.div_ceil(chunk);
    let partials: Vec<Vec<f32>> = (0..n_chunks)
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![0f32; width];
            f(c * chunk..((c + 1) * chunk).min(rows), &mut acc);
            acc
        })
        .collect();
    for p in &partials {
        for (o, x) in out.iter_mut().zip(p) {
            *o += x;
        }
    }
}

/// A raw pointer that may be shared across rayon tasks which write disjoint
/// parts of the buffer it points into.
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// `acc += x` elementwise, over the pool.
pub fn add_inplace(acc: &mut [f32], x: &[f32]) {
    assert_eq!(acc.len(), x.len());
    acc.par_chunks_mut(1 << 14).zip(x.par_chunks(1 << 14)).for_each(|(a, x)| {
        for (a, x) in a.iter_mut().zip(x) {
            *a += x;
        }
    });
}

/// `dst = src`, over the pool in 1 MiB pieces (one thread copies at a
/// fraction of the memory bandwidth).
pub fn copy(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    dst.par_chunks_mut(1 << 18).zip(src.par_chunks(1 << 18)).for_each(|(d, s)| d.copy_from_slice(s));
}

/// `dst[..] = value`, over the pool.
pub fn fill(dst: &mut [f32], value: f32) {
    dst.par_chunks_mut(1 << 18).for_each(|d| d.fill(value));
}
