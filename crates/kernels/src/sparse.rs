//! Unstructured sparse linear layers: zeros are neither stored nor multiplied.
//!
//! A linear layer computes `out[BT,N] = inp[BT,K] @ W[K,N] + bias` (the
//! dense kernels' layout). A [`SparseWeight`] keeps only W's nonzeros, as
//! compressed rows of W^T (for each output column n: its input indices k,
//! ascending, and values), plus the same pattern by input row k (for the
//! input gradient), pointing into the one values array.
//!
//! The products take the tokens in blocks of 64, transposed in cache to
//! feature-major order: then every nonzero (k, n, w) is four 16-lane FMAs
//! `Y[n, block] += w * X[k, block]`, with 128 features of the block (32 KiB)
//! in L1 while every output feature takes its nonzeros from them (read
//! chunk-major, so in one sequential run), and the 64 outputs in registers.
//! The weight gradient is one dot product over the tokens per nonzero, in
//! chunks of 128 tokens: one side's chunk (a feature of dout, or of inp)
//! in eight registers while its nonzeros' rows of the other side, transposed
//! in tiles sized to the density, stream past. All scratch starts on a cache
//! line: a 64-byte load that straddles two lines halves the products' speed.
//!
//! - [`forward`]: `out = inp @ W + bias`;
//! - [`backward_input`]: `dinp = dout @ W^T` (overwrites);
//! - [`backward_weight`]: `dW += inp^T @ dout` at the nonzeros only (a
//!   sampled dense-dense product), into the values' order.
//!
//! Each has a plain reference in [`reference`]; the tests also check them
//! against the dense kernels on the masked dense matrix.

use crate::parallel::SendPtr;
use rayon::prelude::*;

/// Where the nonzeros of a `K x N` weight matrix are. Their values live
/// apart (a `&[f32]` of [`Self::nnz`] floats, in this pattern's order), so
/// the store, the wire and the optimizer see one flat array of nonzeros and
/// a worker keeps the pattern while the values stream through.
///
/// The order of the values: output feature n ascending, then input feature
/// k ascending within it (the nonzeros of W column by column).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SparsePattern {
    pub k: usize,
    pub n: usize,
    /// Column n's nonzeros are values `col_start[n]..col_start[n + 1]`, at rows `row_index[..]`.
    pub col_start: Vec<u32>,
    pub row_index: Vec<u32>,
    /// The same pattern by row k: `row_start[k]..row_start[k + 1]` index
    /// `row_cols` (the column n) and `row_value` (the position in the values).
    pub row_start: Vec<u32>,
    pub row_cols: Vec<u32>,
    pub row_value: Vec<u32>,
}

impl SparsePattern {
    /// The nonzero pattern `mask[K*N]` (row-major, as W).
    pub fn from_mask(mask: &[bool], k: usize, n: usize) -> SparsePattern {
        assert_eq!(mask.len(), k * n);
        assert!(k * n <= u32::MAX as usize, "a sparse matrix of {k} x {n} is beyond u32 indices");
        let mut col_start = Vec::with_capacity(n + 1);
        let mut row_index = Vec::new();
        col_start.push(0u32);
        for c in 0..n {
            for r in 0..k {
                if mask[r * n + c] {
                    row_index.push(r as u32);
                }
            }
            col_start.push(row_index.len() as u32);
        }
        SparsePattern::from_columns(k, n, col_start, row_index)
    }

    /// From the by-column index (`col_start[N+1]`, rows ascending within a
    /// column), building the by-row one.
    pub fn from_columns(k: usize, n: usize, col_start: Vec<u32>, row_index: Vec<u32>) -> SparsePattern {
        assert_eq!(col_start.len(), n + 1);
        assert_eq!(*col_start.last().expect("n + 1 entries") as usize, row_index.len());
        let mut s = SparsePattern {
            k,
            n,
            col_start,
            row_index,
            row_start: Vec::new(),
            row_cols: Vec::new(),
            row_value: Vec::new(),
        };
        s.index_rows();
        s
    }

    /// Builds the by-row index from the by-column one.
    fn index_rows(&mut self) {
        let mut count = vec![0u32; self.k + 1];
        for &r in &self.row_index {
            count[r as usize + 1] += 1;
        }
        for r in 0..self.k {
            count[r + 1] += count[r];
        }
        self.row_start = count.clone();
        let nnz = self.row_index.len();
        self.row_cols = vec![0; nnz];
        self.row_value = vec![0; nnz];
        let mut next = count;
        for c in 0..self.n {
            for p in self.col_start[c]..self.col_start[c + 1] {
                let r = self.row_index[p as usize] as usize;
                let at = next[r] as usize;
                self.row_cols[at] = c as u32;
                self.row_value[at] = p;
                next[r] += 1;
            }
        }
    }

    pub fn nnz(&self) -> usize {
        self.row_index.len()
    }

    pub fn density(&self) -> f64 {
        self.nnz() as f64 / (self.k * self.n).max(1) as f64
    }

    /// Row-major positions (r * N + c) of the nonzeros, in the values' order.
    pub fn positions(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.n).flat_map(move |c| {
            (self.col_start[c] as usize..self.col_start[c + 1] as usize)
                .map(move |p| self.row_index[p] as usize * self.n + c)
        })
    }

    /// The mask as `K*N` booleans, row-major.
    pub fn mask(&self) -> Vec<bool> {
        let mut m = vec![false; self.k * self.n];
        for i in self.positions() {
            m[i] = true;
        }
        m
    }

    /// The values of a dense `K x N` matrix at the nonzeros, in order.
    pub fn gather(&self, dense: &[f32]) -> Vec<f32> {
        assert_eq!(dense.len(), self.k * self.n);
        self.positions().map(|i| dense[i]).collect()
    }

    /// `dense[K*N]` with `values` at the nonzeros and zeros elsewhere.
    /// Bands of [`BAND`] columns in parallel (the dense path of every
    /// sparse matrix runs this at each use).
    pub fn scatter(&self, values: &[f32], dense: &mut [f32]) {
        assert_eq!(values.len(), self.nnz());
        assert_eq!(dense.len(), self.k * self.n);
        dense.par_chunks_mut(1 << 16).for_each(|d| d.fill(0.0));
        let out = SendPtr(dense.as_mut_ptr());
        self.bands(|c, p, r| {
            // SAFETY: r < k and c < n (a pattern's indices), so the element
            // is inside dense; column c belongs to this band alone.
            unsafe { *out.get().add(r * self.n + c) = values[p] };
        });
    }

    /// `values[p] += dense[position of p]` for every nonzero p.
    pub fn gather_add(&self, dense: &[f32], values: &mut [f32]) {
        assert_eq!(values.len(), self.nnz());
        assert_eq!(dense.len(), self.k * self.n);
        let out = SendPtr(values.as_mut_ptr());
        self.bands(|c, p, r| {
            // SAFETY: p < nnz = values.len(), and column c (so nonzero p)
            // belongs to this band alone.
            unsafe { *out.get().add(p) += dense[r * self.n + c] };
        });
    }

    /// `f(column, nonzero, row)` for every nonzero, bands of [`BAND`]
    /// columns in parallel, each band column by column: its writes or reads
    /// of a row stay in one cache line of the dense matrix, and the values
    /// of a band are one run.
    fn bands(&self, f: impl Fn(usize, usize, usize) + Sync) {
        (0..self.n.div_ceil(BAND)).into_par_iter().for_each(|b| {
            for c in b * BAND..((b + 1) * BAND).min(self.n) {
                for p in self.col_start[c] as usize..self.col_start[c + 1] as usize {
                    let r = self.row_index[p] as usize;
                    assert!(r < self.k);
                    f(c, p, r);
                }
            }
        });
    }

    /// The mask as a bitmap, bit `i % 8` of byte `i / 8` for position i
    /// (row-major): the index as stored in checkpoints and sent on the wire.
    pub fn to_bitmap(&self) -> Vec<u8> {
        let mut b = vec![0u8; (self.k * self.n).div_ceil(8)];
        for i in self.positions() {
            b[i / 8] |= 1 << (i % 8);
        }
        b
    }

    /// The pattern of a bitmap ([`Self::to_bitmap`]); `None` when its length
    /// is wrong for `K x N` or bits beyond the matrix are set.
    pub fn from_bitmap(bits: &[u8], k: usize, n: usize) -> Option<SparsePattern> {
        let len = k * n;
        if bits.len() != len.div_ceil(8) || (!len.is_multiple_of(8) && bits[len / 8] >> (len % 8) != 0) {
            return None;
        }
        let mask: Vec<bool> = (0..len).map(|i| bits[i / 8] >> (i % 8) & 1 == 1).collect();
        Some(SparsePattern::from_mask(&mask, k, n))
    }

    /// The nonzeros' row-major positions as gaps, for very sparse matrices
    /// (smaller than the bitmap below density 1/16): each position minus the
    /// previous one minus 1 (the first: the position itself), written in base
    /// 65535 as that many 0xFFFF followed by the remainder.
    pub fn to_gaps(&self) -> Vec<u16> {
        let mut positions: Vec<usize> = self.positions().collect();
        positions.sort_unstable();
        let mut out = Vec::with_capacity(positions.len());
        let mut next = 0usize;
        for pos in positions {
            let mut gap = pos - next;
            while gap >= 0xFFFF {
                out.push(0xFFFF);
                gap -= 0xFFFF;
            }
            out.push(gap as u16);
            next = pos + 1;
        }
        out
    }

    /// The pattern of [`Self::to_gaps`]' encoding; `None` when a position
    /// falls outside the matrix or the encoding ends in the middle of a gap.
    pub fn from_gaps(gaps: &[u16], k: usize, n: usize) -> Option<SparsePattern> {
        let mut mask = vec![false; k * n];
        let (mut next, mut gap) = (0usize, 0usize);
        for &g in gaps {
            gap += g as usize;
            if g == 0xFFFF {
                continue;
            }
            let pos = next + gap;
            *mask.get_mut(pos)? = true;
            (next, gap) = (pos + 1, 0);
        }
        (gap == 0).then(|| SparsePattern::from_mask(&mask, k, n))
    }
}

/// Columns per task of [`SparsePattern::scatter`] and
/// [`SparsePattern::gather_add`]: 64 bytes of a row, one cache line.
const BAND: usize = 16;

/// A pattern with its values: a sparse matrix in one piece (tests, benchmarks).
#[derive(Clone, Debug, PartialEq)]
pub struct SparseWeight {
    pub pattern: SparsePattern,
    pub values: Vec<f32>,
}

impl SparseWeight {
    /// The nonzero pattern `mask[K*N]` (row-major, as W) with values from `w`.
    pub fn from_mask(w: &[f32], mask: &[bool], k: usize, n: usize) -> SparseWeight {
        let pattern = SparsePattern::from_mask(mask, k, n);
        let values = pattern.gather(w);
        SparseWeight { pattern, values }
    }

    /// Keeps the `round(density * K * N)` entries of largest magnitude
    /// (ties to the lower index): the magnitude pruning of a dense layer.
    pub fn from_dense_top(w: &[f32], k: usize, n: usize, density: f64) -> SparseWeight {
        SparseWeight::from_mask(w, &top_magnitude_mask(w, density), k, n)
    }

    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// W as a dense row-major `K x N` matrix, zeros where masked.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.pattern.k * self.pattern.n];
        self.pattern.scatter(&self.values, &mut w);
        w
    }
}

/// The mask of the `round(density * len)` entries of largest magnitude.
pub fn top_magnitude_mask(w: &[f32], density: f64) -> Vec<bool> {
    assert!((0.0..=1.0).contains(&density), "density {density} outside [0, 1]");
    let keep = (density * w.len() as f64).round() as usize;
    let mut mask = vec![false; w.len()];
    for i in top_magnitude(w, keep) {
        mask[i] = true;
    }
    mask
}

/// The indices of the `keep` entries of largest magnitude, in no particular
/// order (equal magnitudes: the lower index first).
pub fn top_magnitude(w: &[f32], keep: usize) -> impl Iterator<Item = usize> {
    assert!(keep <= w.len());
    let mut order: Vec<u32> = (0..w.len() as u32).collect();
    let by = |a: &u32, b: &u32| w[*b as usize].abs().total_cmp(&w[*a as usize].abs()).then(a.cmp(b));
    if keep > 0 && keep < order.len() {
        order.select_nth_unstable_by(keep - 1, by);
    }
    order.truncate(keep);
    order.into_iter().map(|i| i as usize)
}

/// `dst[c * ds + r] = src[r * ss + c]` for r < rows, c < cols: 16x16
/// blocks through AVX-512 registers where whole, element by element at the
/// edges (and without AVX-512).
fn transpose_region(dst: &mut [f32], ds: usize, src: &[f32], ss: usize, rows: usize, cols: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!((rows - 1) * ss + cols <= src.len() && (cols - 1) * ds + rows <= dst.len());
    let (r16, c16) = if simd::available() { (rows / 16 * 16, cols / 16 * 16) } else { (0, 0) };
    for r0 in (0..r16).step_by(16) {
        for c0 in (0..c16).step_by(16) {
            // SAFETY: AVX-512F checked; the block is inside both (asserted above).
            unsafe { simd::transpose16(dst.as_mut_ptr().add(c0 * ds + r0), ds, src.as_ptr().add(r0 * ss + c0), ss) };
        }
    }
    for r in 0..rows {
        let c_start = if r < r16 { c16 } else { 0 };
        for c in c_start..cols {
            dst[c * ds + r] = src[r * ss + c];
        }
    }
}

/// Tokens per block of the sparse products: four 16-lane vectors per feature.
const TOK: usize = 64;
/// Features per chunk: the power of two that gives each output feature
/// about 24 nonzeros per chunk, within [128, 1024]. A chunk of a token block
/// stays in cache (L1 at 128 features, 32 KiB; L2 above) while every output
/// feature takes its nonzeros from it; at low density a short chunk would
/// leave each output only a few nonzeros between the loads and stores of its
/// block and the mispredicted end of its loop. Measured on GPT-2 small's
/// shapes, one thread (`sparse_micro kernels`): 128 features is best at 75%
/// sparsity, 256 at 90% (about 10% faster than 128), 512 at 95% and 1024 at
/// 99%.
fn chunk_features(features: usize, outs: usize, nnz: usize) -> usize {
    features_for(24.0, features, outs, nnz).max(128)
}

/// The power of two, at most 1024, of input features that gives each of
/// `outs` outputs about `each` nonzeros at the density of `nnz` in
/// `features x outs`.
fn features_for(each: f64, features: usize, outs: usize, nnz: usize) -> usize {
    let density = nnz as f64 / (features.max(1) * outs.max(1)) as f64;
    let want = (each / density.max(1e-9)).min(1024.0) as usize;
    want.next_power_of_two().min(1024)
}

/// A sparse matrix's nonzeros reordered chunk-major: by feature chunk (`kc`
/// input features), then output feature, then input feature, each with a
/// payload (its value for the products, its position in the values' order
/// for the weight gradient). A chunk's pass over every output then reads
/// indices and payloads in one sequential run (by output feature they would
/// be a short piece of every column, scattered over the whole matrix).
struct ChunkMajor<T> {
    /// Features per chunk.
    kc: usize,
    /// Output o's nonzeros in chunk c: `start[c * outs + o]..start[c * outs + o + 1]`.
    start: Vec<u32>,
    index: Vec<u32>,
    value: Vec<T>,
}

impl<T: Copy + Default + Send + Sync> ChunkMajor<T> {
    /// From nonzeros given by output feature (`start`, `index`, payload
    /// `value(p)`), indices ascending within each output feature, in chunks
    /// of `kc` of the `features` input features.
    fn new(start: &[u32], index: &[u32], value: &(impl Fn(usize) -> T + Sync), features: usize, kc: usize) -> Self {
        let outs = start.len() - 1;
        let chunks = features.div_ceil(kc);
        // Where output o's nonzeros of chunk c begin, by output: ptr[o * (chunks + 1) + c].
        let mut ptr = vec![0u32; outs * (chunks + 1)];
        for o in 0..outs {
            let (mut p, p1) = (start[o] as usize, start[o + 1] as usize);
            for c in 0..=chunks {
                while p < p1 && (index[p] as usize) < c * kc {
                    p += 1;
                }
                ptr[o * (chunks + 1) + c] = p as u32;
            }
        }
        let at = |o: usize, c: usize| ptr[o * (chunks + 1) + c] as usize..ptr[o * (chunks + 1) + c + 1] as usize;
        let mut cstart = Vec::with_capacity(chunks * outs + 1);
        cstart.push(0u32);
        for c in 0..chunks {
            for o in 0..outs {
                cstart.push(cstart[cstart.len() - 1] + at(o, c).len() as u32);
            }
        }
        let nnz = index.len();
        let (mut cindex, mut cvalue) = (vec![0u32; nnz], vec![T::default(); nnz]);
        // One task per chunk, each filling its own run of both arrays.
        let mut runs = Vec::with_capacity(chunks);
        let (mut ri, mut rv) = (&mut cindex[..], &mut cvalue[..]);
        for c in 0..chunks {
            let len = (cstart[(c + 1) * outs] - cstart[c * outs]) as usize;
            let (i, i_rest) = std::mem::take(&mut ri).split_at_mut(len);
            let (v, v_rest) = std::mem::take(&mut rv).split_at_mut(len);
            (ri, rv) = (i_rest, v_rest);
            runs.push((c, i, v));
        }
        runs.into_par_iter().for_each(|(c, ri, rv)| {
            let mut q = 0;
            for o in 0..outs {
                for p in at(o, c) {
                    ri[q] = index[p];
                    rv[q] = value(p);
                    q += 1;
                }
            }
        });
        ChunkMajor { kc, start: cstart, index: cindex, value: cvalue }
    }
}

/// `out[BT,outs] = inp[BT,features] @ S + bias` for a sparse `S[features,outs]`
/// given by output feature (`start`, `index` = input feature, `value(p)`),
/// indices ascending within each output feature. Token blocks of [`TOK`]
/// in parallel; each block is transposed in cache (feature-major), then
/// every output feature sums its nonzeros chunk by chunk.
#[allow(clippy::too_many_arguments)]
fn spmm(
    out: &mut [f32],
    inp: &[f32],
    bt: usize,
    features: usize,
    start: &[u32],
    index: &[u32],
    value: impl Fn(usize) -> f32 + Sync,
    bias: Option<&[f32]>,
    simd: bool,
) {
    let outs = start.len() - 1;
    assert_eq!(inp.len(), bt * features);
    assert_eq!(out.len(), bt * outs);
    assert!(index.iter().all(|&j| (j as usize) < features), "an index beyond the features");
    let nz = ChunkMajor::new(start, index, &value, features, chunk_features(features, outs, index.len()));
    let chunks = features.div_ceil(nz.kc);
    let simd = simd && simd::available();
    out.par_chunks_mut(TOK * outs.max(1)).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(xv, yv), (blk, out_rows)| {
            let (xb, yb) = (sized(xv, features * TOK), sized(yv, outs * TOK));
            let t0 = blk * TOK;
            let nt = out_rows.len() / outs.max(1);
            // xb[f][i] = inp[t0 + i][f], zero past the last token.
            if nt < TOK {
                xb.fill(0.0);
            }
            transpose_region(xb, TOK, &inp[t0 * features..], features, nt, features);
            for c in 0..chunks {
                let starts = &nz.start[c * outs..(c + 1) * outs + 1];
                if simd {
                    // SAFETY: AVX-512F checked; every index < features (asserted above).
                    unsafe { simd::chunk_sum(yb, xb, (c == 0).then_some(bias), starts, &nz.index, &nz.value) };
                    continue;
                }
                for o in 0..outs {
                    let y = &mut yb[o * TOK..(o + 1) * TOK];
                    if c == 0 {
                        y.fill(bias.map_or(0.0, |b| b[o]));
                    }
                    for p in starts[o] as usize..starts[o + 1] as usize {
                        let v = nz.value[p];
                        let x = &xb[nz.index[p] as usize * TOK..(nz.index[p] as usize + 1) * TOK];
                        for i in 0..TOK {
                            y[i] = v.mul_add(x[i], y[i]);
                        }
                    }
                }
            }
            // out[t0 + i][o] = yb[o][i] (the bias is in yb's start).
            transpose_region(out_rows, outs, yb, TOK, outs, nt);
        },
    );
}

/// `sum over i of a[i] * b[i]` in f32 with 64 lanes of partial sums.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if simd::available() {
            // SAFETY: AVX-512F is present; equal lengths checked above.
            return unsafe { simd::dot(a, b) };
        }
    }
    let mut acc = [0f32; 16];
    for (xc, dc) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        for i in 0..16 {
            acc[i] = xc[i].mul_add(dc[i], acc[i]);
        }
    }
    let tail = a.len() / 16 * 16;
    acc.iter().sum::<f32>() + a[tail..].iter().zip(&b[tail..]).map(|(x, y)| x * y).sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{TOK, WG_TOK};
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512vl")
        })
    }

    /// For every output o < `starts.len() - 1`: `yb[o] += sum over p in
    /// starts[o]..starts[o + 1] of value[p] * xb[index[p]]` (64 tokens
    /// each), two nonzeros at a time into two accumulator sets (eight
    /// independent FMA chains). On the first chunk (`first` is `Some`), yb
    /// starts from the bias (or zero) instead of its contents.
    ///
    /// # Safety
    /// AVX-512F must be present; `(index[p] + 1) * TOK <= xb.len()` for
    /// every p in those ranges, which lie inside `index` and `value`; `yb`
    /// and a bias hold `outs * TOK` and `outs`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn chunk_sum(
        yb: &mut [f32],
        xb: &[f32],
        first: Option<Option<&[f32]>>,
        starts: &[u32],
        index: &[u32],
        value: &[f32],
    ) {
        const _: () = assert!(TOK == 64);
        let outs = starts.len() - 1;
        assert!(yb.len() >= outs * TOK && index.len() == value.len());
        assert!(starts[outs] as usize <= index.len());
        if let Some(Some(b)) = first {
            assert!(b.len() >= outs);
        }
        let (x, ix, vl) = (xb.as_ptr(), index.as_ptr(), value.as_ptr());
        let z = _mm512_setzero_ps();
        for o in 0..outs {
            let (p0, p1) = (*starts.get_unchecked(o) as usize, *starts.get_unchecked(o + 1) as usize);
            let y = yb.as_mut_ptr().add(o * TOK);
            let start = |bias: Option<&[f32]>| bias.map_or(z, |b| _mm512_set1_ps(*b.get_unchecked(o)));
            if p0 == p1 {
                if let Some(bias) = first {
                    for j in 0..4 {
                        _mm512_storeu_ps(y.add(16 * j), start(bias));
                    }
                }
                continue;
            }
            let mut a = match first {
                Some(bias) => [start(bias); 4],
                None => std::array::from_fn(|j| _mm512_loadu_ps(y.add(16 * j))),
            };
            let mut b = [z; 4];
            let mut p = p0;
            while p + 2 <= p1 {
                let (v0, v1) = (_mm512_set1_ps(*vl.add(p)), _mm512_set1_ps(*vl.add(p + 1)));
                let x0 = x.add(*ix.add(p) as usize * TOK);
                let x1 = x.add(*ix.add(p + 1) as usize * TOK);
                for j in 0..4 {
                    a[j] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x0.add(16 * j)), a[j]);
                    b[j] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(x1.add(16 * j)), b[j]);
                }
                p += 2;
            }
            if p < p1 {
                let v = _mm512_set1_ps(*vl.add(p));
                let x0 = x.add(*ix.add(p) as usize * TOK);
                for (j, a) in a.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(v, _mm512_loadu_ps(x0.add(16 * j)), *a);
                }
            }
            for j in 0..4 {
                _mm512_storeu_ps(y.add(16 * j), _mm512_add_ps(a[j], b[j]));
            }
        }
    }

    /// `dst[c * ds + r] = src[r * ss + c]` for r, c < 16: one 16x16 block
    /// through registers (two rounds of lane unpacks, two of 128-bit shuffles).
    ///
    /// # Safety
    /// AVX-512F must be present; both 16x16 blocks must be in bounds.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn transpose16(dst: *mut f32, ds: usize, src: *const f32, ss: usize) {
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, x) in r.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(src.add(i * ss));
        }
        // 32-bit interleave of row pairs.
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // 64-bit interleave of pairs of pairs.
        let mut u = [_mm512_setzero_ps(); 16];
        for i in 0..4 {
            let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
            u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));
            u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));
            u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));
            u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));
        }
        // 128-bit lanes: first between groups of four rows, then of eight.
        let mut v = [_mm512_setzero_ps(); 16];
        for h in 0..2 {
            for j in 0..4 {
                let (a, b) = (u[8 * h + j], u[8 * h + 4 + j]);
                v[8 * h + j] = _mm512_shuffle_f32x4::<0x88>(a, b);
                v[8 * h + 4 + j] = _mm512_shuffle_f32x4::<0xdd>(a, b);
            }
        }
        let mut w = [_mm512_setzero_ps(); 16];
        for j in 0..8 {
            let (a, b) = (v[j], v[8 + j]);
            w[j] = _mm512_shuffle_f32x4::<0x88>(a, b);
            w[8 + j] = _mm512_shuffle_f32x4::<0xdd>(a, b);
        }
        for (i, x) in w.iter().enumerate() {
            _mm512_storeu_ps(dst.add(i * ds), *x);
        }
    }

    /// For every wide feature r < `starts.len() - 1` (`wide[r]`: its
    /// [`WG_TOK`] tokens): `acc[q] += narrow[index[q]] . wide[r]` for q in
    /// `starts[r]..starts[r + 1]`, `wide[r]` in eight registers, four
    /// nonzeros at a time (eight independent FMA chains, the four sums
    /// reduced together).
    ///
    /// # Safety
    /// AVX-512F and VL must be present; `(index[q] + 1) * WG_TOK <=
    /// narrow.len()` for every q in those ranges, which lie inside `index`
    /// and `acc`; `wide` holds `(starts.len() - 1) * WG_TOK`.
    #[target_feature(enable = "avx512f,avx512vl")]
    pub unsafe fn sddmm_tile(acc: *mut f32, narrow: &[f32], wide: &[f32], starts: &[u32], index: &[u32]) {
        let rows = starts.len() - 1;
        assert!(wide.len() >= rows * WG_TOK && starts[rows] as usize <= index.len());
        let (x, ix) = (narrow.as_ptr(), index.as_ptr());
        for r in 0..rows {
            let (p0, p1) = (*starts.get_unchecked(r) as usize, *starts.get_unchecked(r + 1) as usize);
            if p0 == p1 {
                continue;
            }
            let d: [__m512; 8] = std::array::from_fn(|j| _mm512_loadu_ps(wide.as_ptr().add(r * WG_TOK + 16 * j)));
            let mut q = p0;
            while q + 4 <= p1 {
                let sums = dots::<4>(x, ix.add(q), &d);
                _mm_storeu_ps(acc.add(q), _mm_add_ps(_mm_loadu_ps(acc.add(q)), sums));
                q += 4;
            }
            let (sums, mask) = match p1 - q {
                0 => continue,
                1 => (dots::<1>(x, ix.add(q), &d), 0b0001),
                2 => (dots::<2>(x, ix.add(q), &d), 0b0011),
                _ => (dots::<3>(x, ix.add(q), &d), 0b0111),
            };
            _mm_mask_storeu_ps(acc.add(q), mask, _mm_add_ps(_mm_maskz_loadu_ps(mask, acc.add(q)), sums));
        }
    }

    /// `[x[ix[0]] . d, .., x[ix[R - 1]] . d, 0, ..]` over [`WG_TOK`]
    /// tokens, two FMA chains per row.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn dots<const R: usize>(x: *const f32, ix: *const u32, d: &[__m512; 8]) -> __m128 {
        const { assert!(R >= 1 && R <= 4 && WG_TOK == 128) };
        let rows: [*const f32; R] = std::array::from_fn(|i| x.add(*ix.add(i) as usize * WG_TOK));
        let mut a = [[_mm512_setzero_ps(); 2]; R];
        for (j, d) in d.iter().enumerate() {
            for i in 0..R {
                a[i][j % 2] = _mm512_fmadd_ps(_mm512_loadu_ps(rows[i].add(16 * j)), *d, a[i][j % 2]);
            }
        }
        let v: [__m512; 4] =
            std::array::from_fn(|i| if i < R { _mm512_add_ps(a[i][0], a[i][1]) } else { _mm512_setzero_ps() });
        reduce4(v[0], v[1], v[2], v[3])
    }

    /// The lane sums of four vectors, `[sum a, sum b, sum c, sum d]`:
    /// pairwise interleaved adds, then the four 128-bit lanes folded.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn reduce4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
        // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d.
        let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
        // Per 128-bit lane: [a, b, c, d] partial sums (64-bit unpacks move
        // float pairs; the adds are in f32).
        let (ab, cd) = (_mm512_castps_pd(ab), _mm512_castps_pd(cd));
        let lo = _mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd));
        let hi = _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd));
        let u = _mm512_add_ps(lo, hi);
        // Fold the four 128-bit lanes: 0+2, 1+3, then (0+2)+(1+3).
        let v = _mm512_add_ps(u, _mm512_shuffle_f32x4::<0b01_00_11_10>(u, u));
        let w = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v));
        _mm512_castps512_ps128(w)
    }

    /// # Safety
    /// AVX-512F must be present; `a` and `b` of equal length.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= n {
            for (j, s) in acc.iter_mut().enumerate() {
                let x = _mm512_loadu_ps(a.as_ptr().add(i + 16 * j));
                let y = _mm512_loadu_ps(b.as_ptr().add(i + 16 * j));
                *s = _mm512_fmadd_ps(x, y, *s);
            }
            i += 64;
        }
        let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        let mut total = _mm512_reduce_add_ps(s);
        while i < n {
            total += a[i] * b[i];
            i += 1;
        }
        total
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    pub fn available() -> bool {
        false
    }
    pub unsafe fn chunk_sum(_: &mut [f32], _: &[f32], _: Option<Option<&[f32]>>, _: &[u32], _: &[u32], _: &[f32]) {
        unreachable!("no SIMD path on this architecture")
    }
    pub unsafe fn dot(_: &[f32], _: &[f32]) -> f32 {
        unreachable!("no SIMD path on this architecture")
    }
    pub unsafe fn sddmm_tile(_: *mut f32, _: &[f32], _: &[f32], _: &[u32], _: &[u32]) {
        unreachable!("no SIMD path on this architecture")
    }
    pub unsafe fn transpose16(_: *mut f32, _: usize, _: *const f32, _: usize) {
        unreachable!("no SIMD path on this architecture")
    }
}

/// Scratch for the weight gradient (transposed activations, sums), reused across calls.
#[derive(Default)]
pub struct Scratch {
    xt: Vec<f32>,
    acc: Vec<f32>,
}

/// `n` floats of `v` (grown as needed) starting on a 64-byte boundary: the
/// kernels' 64-byte loads of feature rows then never straddle two cache
/// lines (on a misaligned buffer the products run at half the speed or less).
fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    const LINE_FLOATS: usize = 16;
    if v.len() < n + LINE_FLOATS - 1 {
        v.resize(n + LINE_FLOATS - 1, 0.0);
    }
    let at = v.as_ptr() as usize;
    let skip = (64 - at % 64) % 64 / 4;
    &mut v[skip..skip + n]
}

/// `out[BT,N] = inp[BT,K] @ W + bias`.
pub fn forward(out: &mut [f32], inp: &[f32], w: &SparsePattern, values: &[f32], bias: Option<&[f32]>, bt: usize) {
    assert_eq!(values.len(), w.nnz());
    if let Some(b) = bias {
        assert_eq!(b.len(), w.n);
    }
    spmm(out, inp, bt, w.k, &w.col_start, &w.row_index, |p| values[p], bias, true);
}

/// `dinp[BT,K] = dout[BT,N] @ W^T` (overwrites).
pub fn backward_input(dinp: &mut [f32], dout: &[f32], w: &SparsePattern, values: &[f32], bt: usize) {
    assert_eq!(values.len(), w.nnz());
    spmm(dinp, dout, bt, w.n, &w.row_start, &w.row_cols, |p| values[w.row_value[p] as usize], None, true);
}

/// Tokens per chunk of the weight gradient: eight 16-lane vectors, so a
/// feature's chunk of one side sits in eight registers while its nonzeros'
/// rows of the other side stream past.
const WG_TOK: usize = 128;
/// Features of the streamed side per tile of the weight gradient: the power
/// of two that gives each feature held in registers about 12 nonzeros per
/// tile, within [64, 1024]. At 64 features a tile ([`WG_TOK`] tokens, 32
/// KiB) stays in L1 while a group of features takes its nonzeros' dot
/// products from it; a wider tile sits in L2, whose loads bound the
/// product, but at low density a narrow one leaves each feature too few
/// nonzeros between its loads and its loop's mispredicted end. Measured on
/// 768x3072, one thread (`sparse_micro kernels`): 64 features is best at
/// 75% sparsity, 128 at 90%, 256-1024 at 95% and 1024 at 99%.
fn tile_features(features: usize, outs: usize, nnz: usize) -> usize {
    features_for(12.0, features, outs, nnz).max(64)
}

/// `dvalues[p] += sum over tokens of inp[t, k_p] * dout[t, n_p]` for every
/// nonzero p of `w` (in `w.values`' order): the weight gradient at the
/// mask only (a sampled dense-dense product).
///
/// The product is symmetric in its two sides; the narrower one (inp when
/// K <= N) is transposed whole, chunk by chunk of [`WG_TOK`] tokens, and
/// shared, while groups of the wider side's features run in parallel,
/// each transposing its own features chunk by chunk and holding one
/// feature's chunk in registers while its nonzeros' rows of the narrow
/// side stream past, tile by tile ([`tile_features`]). Every nonzero's sum
/// gathers the chunks in order, whatever the grouping, so the result does
/// not depend on the thread count.
pub fn backward_weight(dvalues: &mut [f32], inp: &[f32], dout: &[f32], w: &SparsePattern, bt: usize, s: &mut Scratch) {
    let (k, n) = (w.k, w.n);
    assert_eq!(dvalues.len(), w.nnz());
    assert_eq!(inp.len(), bt * k);
    assert_eq!(dout.len(), bt * n);
    if w.nnz() == 0 {
        return;
    }
    if k <= n {
        // Wide side: dout's columns (the pattern by column; values in order).
        sddmm(
            dvalues,
            Side { m: dout, width: n },
            Side { m: inp, width: k },
            &w.col_start,
            &w.row_index,
            &|q| q as u32,
            bt,
            s,
        );
    } else {
        // Wide side: inp's features (the pattern by row).
        let at = |q: usize| w.row_value[q];
        sddmm(dvalues, Side { m: inp, width: k }, Side { m: dout, width: n }, &w.row_start, &w.row_cols, &at, bt, s);
    }
}

/// One operand of the weight gradient: `m[BT, width]`, token-major.
#[derive(Clone, Copy)]
struct Side<'a> {
    m: &'a [f32],
    width: usize,
}

/// `dvalues[pos(q)] += sum over t of wide[t, r] * narrow[t, index[q]]` for
/// every wide feature r and q in `start[r]..start[r + 1]` (indices
/// ascending within each r). See [`backward_weight`].
#[allow(clippy::too_many_arguments)]
fn sddmm(
    dvalues: &mut [f32],
    wide: Side,
    narrow: Side,
    start: &[u32],
    index: &[u32],
    pos: &(impl Fn(usize) -> u32 + Sync),
    bt: usize,
    s: &mut Scratch,
) {
    let (rw, cn) = (wide.width, narrow.width);
    assert_eq!(start.len(), rw + 1);
    assert!(index.iter().all(|&c| (c as usize) < cn), "an index beyond the features");
    let nnz = index.len();
    let wf = tile_features(cn, rw, nnz);
    let nz = ChunkMajor::new(start, index, pos, cn, wf);
    let (tiles, chunks) = (cn.div_ceil(wf), bt.div_ceil(WG_TOK));
    // The narrow side transposed, chunk j as [cn][WG_TOK], zero past BT.
    let Scratch { xt, acc } = s;
    let nt = sized(xt, chunks * cn * WG_TOK);
    nt.par_chunks_mut(cn * WG_TOK).enumerate().for_each(|(j, blk)| {
        let t0 = j * WG_TOK;
        let rows = (bt - t0).min(WG_TOK);
        if rows < WG_TOK {
            blk.fill(0.0);
        }
        transpose_region(blk, WG_TOK, &narrow.m[t0 * cn..], cn, rows, cn);
    });
    let acc = sized(acc, nnz);
    acc.fill(0.0);
    let (nt, sums, out) = (&*nt, SendPtr(acc.as_mut_ptr()), SendPtr(dvalues.as_mut_ptr()));
    // One group per thread; each nonzero is one group's alone. Every group
    // reads the whole shared side, so more groups cost more than their
    // balance gains: on 2 threads, 768x768 at 90% took 2.9 ms with one
    // group per thread, 3.2 with two and 3.5 with four (the larger shapes
    // within 8% of each other).
    let per = rw.div_ceil(rayon::current_num_threads()).max(16);
    let simd = simd::available();
    (0..rw.div_ceil(per)).into_par_iter().for_each_init(Vec::new, |wv, g| {
        let (r0, r1) = (g * per, ((g + 1) * per).min(rw));
        let wt = sized(wv, (r1 - r0) * WG_TOK);
        for j in 0..chunks {
            let t0 = j * WG_TOK;
            let rows = (bt - t0).min(WG_TOK);
            // wt[r][i] = wide[t0 + i][r0 + r], zero past BT.
            if rows < WG_TOK {
                wt.fill(0.0);
            }
            transpose_region(wt, WG_TOK, &wide.m[t0 * rw + r0..], rw, rows, r1 - r0);
            let nc = &nt[j * cn * WG_TOK..(j + 1) * cn * WG_TOK];
            for c in 0..tiles {
                let starts = &nz.start[c * rw + r0..=c * rw + r1];
                if simd {
                    // SAFETY: AVX-512 checked; every index < cn (asserted),
                    // so each row is inside nc; the nonzeros of features
                    // r0..r1 are this task's alone.
                    unsafe { simd::sddmm_tile(sums.get(), nc, wt, starts, &nz.index) };
                    continue;
                }
                for r in 0..r1 - r0 {
                    for q in starts[r] as usize..starts[r + 1] as usize {
                        let ci = nz.index[q] as usize;
                        let d = dot(&nc[ci * WG_TOK..(ci + 1) * WG_TOK], &wt[r * WG_TOK..(r + 1) * WG_TOK]);
                        // SAFETY: as above, q is this task's alone.
                        unsafe { *sums.get().add(q) += d };
                    }
                }
            }
        }
        for c in 0..tiles {
            for q in nz.start[c * rw + r0] as usize..nz.start[c * rw + r1] as usize {
                let p = nz.value[q] as usize;
                assert!(p < nnz);
                // SAFETY: q and its position p (inside dvalues, asserted) are
                // this task's alone: positions are a permutation of 0..nnz.
                unsafe { *out.get().add(p) += *sums.get().add(q) };
            }
        }
    });
}

pub mod reference {
    //! Plain loops over the nonzeros: the specification of the fast kernels.
    use super::SparsePattern;

    pub fn forward(out: &mut [f32], inp: &[f32], w: &SparsePattern, values: &[f32], bias: Option<&[f32]>, bt: usize) {
        let (k, n) = (w.k, w.n);
        for t in 0..bt {
            for c in 0..n {
                let mut acc = bias.map_or(0.0, |b| b[c] as f64);
                for p in w.col_start[c] as usize..w.col_start[c + 1] as usize {
                    acc += values[p] as f64 * inp[t * k + w.row_index[p] as usize] as f64;
                }
                out[t * n + c] = acc as f32;
            }
        }
    }

    #[allow(clippy::needless_range_loop)] // p indexes two arrays: the plainest form
    pub fn backward_input(dinp: &mut [f32], dout: &[f32], w: &SparsePattern, values: &[f32], bt: usize) {
        let (k, n) = (w.k, w.n);
        dinp.fill(0.0);
        let mut acc = vec![0f64; bt * k];
        for c in 0..n {
            for p in w.col_start[c] as usize..w.col_start[c + 1] as usize {
                let r = w.row_index[p] as usize;
                for t in 0..bt {
                    acc[t * k + r] += values[p] as f64 * dout[t * n + c] as f64;
                }
            }
        }
        for (d, a) in dinp.iter_mut().zip(acc) {
            *d = a as f32;
        }
    }

    #[allow(clippy::needless_range_loop)] // p indexes three arrays: the plainest form
    pub fn backward_weight(dvalues: &mut [f32], inp: &[f32], dout: &[f32], w: &SparsePattern, bt: usize) {
        let (k, n) = (w.k, w.n);
        for c in 0..n {
            for p in w.col_start[c] as usize..w.col_start[c + 1] as usize {
                let r = w.row_index[p] as usize;
                let s: f64 = (0..bt).map(|t| inp[t * k + r] as f64 * dout[t * n + c] as f64).sum();
                dvalues[p] += s as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::{matmul_backward, matmul_forward};
    use crate::Rng;

    fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
        let mut v = vec![0f32; n];
        rng.fill_normal(&mut v, 0.0, 1.0);
        v
    }

    fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len(), "{what}");
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * scale, "{what}[{i}]: {x} vs {y} (scale {scale})");
        }
    }

    #[test]
    fn masks_keep_the_largest_magnitudes_exactly() {
        let w = [0.5f32, -3.0, 0.0, 2.0, -2.0, 1.0, 0.1, -0.2];
        let m = top_magnitude_mask(&w, 0.5);
        assert_eq!(m, vec![false, true, false, true, true, true, false, false]);
        assert_eq!(top_magnitude_mask(&w, 0.0).iter().filter(|&&x| x).count(), 0);
        assert!(top_magnitude_mask(&w, 1.0).iter().all(|&x| x));
        let s = SparseWeight::from_dense_top(&w, 2, 4, 0.5);
        assert_eq!(s.nnz(), 4);
        assert_eq!(s.to_dense(), vec![0.0, -3.0, 0.0, 2.0, -2.0, 1.0, 0.0, 0.0]);
    }

    /// Sparse kernels against the plain reference and against the dense
    /// kernels on the masked matrix, from no nonzeros to fully dense, with
    /// empty rows and columns, and token counts that are not multiples of
    /// the tiles.
    #[test]
    fn sparse_kernels_match_reference_and_dense_on_the_masked_matrix() {
        let mut rng = Rng::new(21);
        // The weight gradient holds dout's columns in registers where K <= N
        // (the first and fifth shapes), inp's features elsewhere; the last
        // three have several tiles of features at the higher densities, and
        // every token count but 600 ends in a partial chunk.
        for &(bt, k, n) in
            &[(37usize, 24usize, 40usize), (130, 64, 48), (600, 96, 80), (300, 1100, 12), (150, 200, 260)]
        {
            for density in [0.0, 0.02, 0.1, 0.25, 0.5, 1.0] {
                let dense = random(&mut rng, k * n);
                let mut mask = top_magnitude_mask(&random(&mut rng, k * n), density);
                if density > 0.0 && density < 1.0 {
                    // An empty column and an empty row.
                    for r in 0..k {
                        mask[r * n + 3] = false;
                    }
                    for c in 0..n {
                        mask[5 * n + c] = false;
                    }
                }
                let w = SparseWeight::from_mask(&dense, &mask, k, n);
                let wd = w.to_dense();
                let (x, bias, g) = (random(&mut rng, bt * k), random(&mut rng, n), random(&mut rng, bt * n));
                let mut s = Scratch::default();
                // The generic path against the SIMD one (where there is one).
                let mut generic = vec![f32::NAN; bt * n];
                let (wv, w) = (&w.values, &w.pattern);
                spmm(&mut generic, &x, bt, k, &w.col_start, &w.row_index, |p| wv[p], Some(&bias), false);
                let what = format!("bt {bt} k {k} n {n} density {density}");

                let mut out = vec![f32::NAN; bt * n];
                forward(&mut out, &x, w, wv, Some(&bias), bt);
                assert_close(&format!("{what} forward generic vs simd"), &generic, &out, 1e-5);
                let mut want = vec![0f32; bt * n];
                reference::forward(&mut want, &x, w, wv, Some(&bias), bt);
                assert_close(&format!("{what} forward vs reference"), &out, &want, 1e-5);
                let mut dense_out = vec![0f32; bt * n];
                matmul_forward(&mut dense_out, &x, &wd, Some(&bias), bt, k, n);
                assert_close(&format!("{what} forward vs dense"), &out, &dense_out, 1e-5);

                let mut dinp = vec![f32::NAN; bt * k];
                backward_input(&mut dinp, &g, w, wv, bt);
                let mut want = vec![0f32; bt * k];
                reference::backward_input(&mut want, &g, w, wv, bt);
                assert_close(&format!("{what} input gradient vs reference"), &dinp, &want, 1e-5);

                let init = random(&mut rng, w.nnz());
                let mut dv = init.clone();
                backward_weight(&mut dv, &x, &g, w, bt, &mut s);
                let mut want = init.clone();
                reference::backward_weight(&mut want, &x, &g, w, bt);
                assert_close(&format!("{what} weight gradient vs reference"), &dv, &want, 1e-5);

                // Dense backward on the masked matrix: the same input gradient,
                // and the same weight gradient at the nonzeros.
                let (mut ddinp, mut ddw, mut ddb) = (vec![0f32; bt * k], vec![0f32; k * n], vec![0f32; n]);
                matmul_backward(&mut ddinp, &mut ddw, Some(&mut ddb), &g, &x, &wd, bt, k, n);
                assert_close(&format!("{what} input gradient vs dense"), &dinp, &ddinp, 1e-5);
                let at_mask: Vec<f32> = (0..n)
                    .flat_map(|c| (w.col_start[c]..w.col_start[c + 1]).map(move |p| (c, p as usize)))
                    .map(|(c, p)| init[p] + ddw[w.row_index[p] as usize * n + c])
                    .collect();
                assert_close(&format!("{what} weight gradient vs dense"), &dv, &at_mask, 1e-5);
            }
        }
    }

    /// The widths the docs give: the products' chunks and the weight
    /// gradient's tiles at 75%, 90%, 95% and 99% sparsity of 768 x 3072.
    #[test]
    fn chunk_and_tile_widths_follow_the_density() {
        let at = |sparsity: f64| ((1.0 - sparsity) * 768.0 * 3072.0).round() as usize;
        let chunks: Vec<usize> = [0.75, 0.9, 0.95, 0.99].map(|s| chunk_features(768, 3072, at(s))).to_vec();
        assert_eq!(chunks, [128, 256, 512, 1024]);
        let tiles: Vec<usize> = [0.75, 0.9, 0.95, 0.99].map(|s| tile_features(768, 3072, at(s))).to_vec();
        assert_eq!(tiles, [64, 128, 256, 1024]);
        assert_eq!((chunk_features(768, 3072, 0), tile_features(768, 3072, 0)), (1024, 1024));
        assert_eq!((chunk_features(8, 8, 64), tile_features(8, 8, 64)), (128, 64));
    }

    #[test]
    fn patterns_round_trip_through_bitmaps_and_dense() {
        let mut rng = Rng::new(8);
        for &(k, n, density) in &[(5usize, 7usize, 0.3), (16, 8, 0.0), (9, 9, 1.0), (33, 3, 0.5)] {
            let w = random(&mut rng, k * n);
            let mask = top_magnitude_mask(&random(&mut rng, k * n), density);
            let p = SparsePattern::from_mask(&mask, k, n);
            assert_eq!(p.mask(), mask);
            assert_eq!(p.nnz(), mask.iter().filter(|&&m| m).count());
            let bits = p.to_bitmap();
            assert_eq!(SparsePattern::from_bitmap(&bits, k, n).as_ref(), Some(&p));
            assert_eq!(SparsePattern::from_gaps(&p.to_gaps(), k, n).as_ref(), Some(&p));
            assert!(SparsePattern::from_bitmap(&bits[1..], k, n).is_none(), "a short bitmap is refused");
            if (k * n) % 8 != 0 {
                let mut extra = bits.clone();
                *extra.last_mut().unwrap() |= 0x80;
                assert!(SparsePattern::from_bitmap(&extra, k, n).is_none(), "bits past the matrix are refused");
            }
            let values = p.gather(&w);
            let mut dense = vec![f32::NAN; k * n];
            p.scatter(&values, &mut dense);
            for i in 0..k * n {
                assert_eq!(dense[i], if mask[i] { w[i] } else { 0.0 });
            }
            let mut acc = vec![1f32; p.nnz()];
            p.gather_add(&w, &mut acc);
            assert_eq!(acc, values.iter().map(|v| 1.0 + v).collect::<Vec<_>>());
        }
    }

    #[test]
    fn gaps_encode_long_runs_and_refuse_positions_outside() {
        // Nonzeros at 0, 70000 (a gap over 65535) and the last element.
        let (k, n) = (300, 400);
        let mut mask = vec![false; k * n];
        for i in [0, 70_000, k * n - 1] {
            mask[i] = true;
        }
        let p = SparsePattern::from_mask(&mask, k, n);
        let g = p.to_gaps();
        assert_eq!(g, vec![0, 0xFFFF, (69_999usize - 0xFFFF) as u16, (k * n - 1 - 70_001) as u16]);
        assert_eq!(SparsePattern::from_gaps(&g, k, n), Some(p));
        assert!(SparsePattern::from_gaps(&g, k, n - 1).is_none(), "a position past the matrix");
        assert!(SparsePattern::from_gaps(&[0, 0xFFFF], k, n).is_none(), "an unfinished gap");
        assert_eq!(SparsePattern::from_gaps(&[], k, n).map(|p| p.nnz()), Some(0));
    }

    #[test]
    fn block_transpose_is_exact() {
        if !simd::available() {
            return;
        }
        let src: Vec<f32> = (0..20 * 16).map(|i| i as f32).collect();
        let mut dst = vec![-1f32; 16 * 24];
        // SAFETY: AVX-512F checked; both blocks in bounds (strides 20 and 24).
        unsafe { simd::transpose16(dst.as_mut_ptr(), 24, src.as_ptr(), 20) };
        for r in 0..16 {
            for c in 0..16 {
                assert_eq!(dst[c * 24 + r], src[r * 20 + c], "row {r} column {c}");
            }
        }
    }

    #[test]
    fn transpose_is_exact() {
        let mut rng = Rng::new(3);
        let (r, c) = (70, 45);
        let x = random(&mut rng, r * c);
        let mut t = vec![0f32; r * c];
        transpose_region(&mut t, r, &x, c, r, c);
        for i in 0..r {
            for j in 0..c {
                assert_eq!(t[j * r + i].to_bits(), x[i * c + j].to_bits());
            }
        }
    }
}
