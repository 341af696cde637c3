//! Vectorizable scalar math: exp, sigmoid, and reductions with independent
//! accumulators.
//!
//! `std`'s `f32::exp` and `tanh` are calls into libm that the compiler cannot
//! vectorize; softmax, cross-entropy and GELU spent a quarter of a training
//! step in them. [`exp`] here is branch-free (Cephes' polynomial after range
//! reduction, about 1 ulp), so loops over slices compile to SIMD. Sums and
//! maxima use 16 independent accumulators, which the compiler may keep in
//! vector registers; the order is fixed, so results are deterministic.
use rayon::prelude::*;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const LANES: usize = 16;

/// e^x for f32, relative error within a few ulp; x below -87.3 gives about
/// 1e-38 instead of a denormal or 0, and x above 88.3 gives about 1.7e38
/// instead of infinity (both irrelevant where it is used: softmax after
/// subtracting the maximum, and sigmoid).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    f32::from_bits(((n as i32 + 127) as u32) << 23) * y
}

/// 1 / (1 + e^-x).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i]);
        }
    }
    acc.iter().chain(rest).fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// `x[i] = exp(x[i] - shift)`, returning the sum of the new values.
pub fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
    for v in x.iter_mut() {
        *v = exp(*v - shift);
    }
    sum(x)
}

/// Sum of `exp(x[i] - shift)`, leaving `x` as it is.
pub fn sum_exp_shifted(x: &[f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += exp(c[i] - shift);
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&v| exp(v - shift)).sum::<f32>()
}

/// Sum of squares of (x - mean).
pub fn centered_sum_sq(x: &[f32], mean: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            let d = c[i] - mean;
            acc[i] += d * d;
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>()
}

/// Sum of squares in f64, element by element in order (one piece of
/// [`SumSq`], and its reference).
pub fn sum_of_squares_f64(x: &[f32]) -> f64 {
    sum_of_squares_f64_from(0.0, x)
}

/// [`sum_of_squares_f64`] continued from `acc`.
pub fn sum_of_squares_f64_from(acc: f64, x: &[f32]) -> f64 {
    x.iter().fold(acc, |a, &v| a + v as f64 * v as f64)
}

/// Elements per piece of a tensor's sum of squares.
pub const SUMSQ_CHUNK: usize = 1 << 14;

/// A tensor's sum of squares in f64, the gradient norm's definition: the
/// tensor is cut into pieces of [`SUMSQ_CHUNK`] elements from its start,
/// each piece summed element by element in order, the pieces added in order.
/// Fed in order in parts of any size (a store's pages), it gives exactly
/// the value of the whole tensor at once, and whole pieces are summed in
/// parallel: one chain of dependent f64 adds over a 100M-element gradient
/// would take longer than the GPU's step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SumSq {
    total: f64,
    piece: f64,
    pos: usize,
}

impl SumSq {
    /// The next `x.len()` elements of the tensor.
    pub fn feed(&mut self, mut x: &[f32]) {
        let into = self.pos % SUMSQ_CHUNK;
        if into != 0 {
            let take = (SUMSQ_CHUNK - into).min(x.len());
            self.piece = sum_of_squares_f64_from(self.piece, &x[..take]);
            self.pos += take;
            x = &x[take..];
            if self.pos.is_multiple_of(SUMSQ_CHUNK) {
                self.total += self.piece;
                self.piece = 0.0;
            }
        }
        let whole = x.len() / SUMSQ_CHUNK * SUMSQ_CHUNK;
        if whole > 0 {
            let pieces: Vec<f64> = x[..whole].par_chunks(SUMSQ_CHUNK).map(sum_of_squares_f64).collect();
            for p in pieces {
                self.total += p;
            }
            self.pos += whole;
            x = &x[whole..];
        }
        if !x.is_empty() {
            self.piece = sum_of_squares_f64_from(self.piece, x);
            self.pos += x.len();
        }
    }

    pub fn value(&self) -> f64 {
        self.total + self.piece
    }

    /// `g += x`, then [`Self::feed`] of the sums, in one pass over `g`: a
    /// gradient's last contribution and its sum of squares together.
    pub fn add_and_feed(&mut self, g: &mut [f32], x: &[f32]) {
        fn add(g: &mut [f32], x: &[f32]) {
            for (a, b) in g.iter_mut().zip(x) {
                *a += b;
            }
        }
        self.merge_and_feed(g, x, add);
    }

    /// `g = x`, then [`Self::feed`]: a gradient's only contribution.
    pub fn copy_and_feed(&mut self, g: &mut [f32], x: &[f32]) {
        self.merge_and_feed(g, x, <[f32]>::copy_from_slice);
    }

    fn merge_and_feed(&mut self, mut g: &mut [f32], mut x: &[f32], add: fn(&mut [f32], &[f32])) {
        assert_eq!(g.len(), x.len());
        let into = self.pos % SUMSQ_CHUNK;
        if into != 0 {
            let take = (SUMSQ_CHUNK - into).min(g.len());
            let (head, rest) = std::mem::take(&mut g).split_at_mut(take);
            add(head, &x[..take]);
            self.feed(head);
            g = rest;
            x = &x[take..];
        }
        let whole = g.len() / SUMSQ_CHUNK * SUMSQ_CHUNK;
        if whole > 0 {
            let (body, rest) = std::mem::take(&mut g).split_at_mut(whole);
            let pieces: Vec<f64> = body
                .par_chunks_mut(SUMSQ_CHUNK)
                .zip(x[..whole].par_chunks(SUMSQ_CHUNK))
                .map(|(g, x)| {
                    add(g, x);
                    sum_of_squares_f64(g)
                })
                .collect();
            for p in pieces {
                self.total += p;
            }
            self.pos += whole;
            g = rest;
            x = &x[whole..];
        }
        if !g.is_empty() {
            add(g, x);
            self.feed(g);
        }
    }
}

/// [`SumSq`] of a whole tensor.
pub fn tensor_sum_of_squares(x: &[f32]) -> f64 {
    let mut s = SumSq::default();
    s.feed(x);
    s.value()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;

    #[test]
    fn sumsq_fed_in_parts_equals_whole_and_pieces_reference() {
        let mut rng = Rng::new(11);
        let n = 5 * SUMSQ_CHUNK + 1234;
        let mut x = vec![0f32; n];
        rng.fill_normal(&mut x, 0.0, 1.0);
        let whole = tensor_sum_of_squares(&x);
        // The definition, plainly: pieces summed in order, then added in order.
        let reference = x.chunks(SUMSQ_CHUNK).map(sum_of_squares_f64).fold(0.0, |a, p| a + p);
        assert_eq!(whole.to_bits(), reference.to_bits());
        for parts in [vec![1, 100, SUMSQ_CHUNK, 3 * SUMSQ_CHUNK + 7], vec![SUMSQ_CHUNK - 1, 2], vec![n]] {
            let mut s = SumSq::default();
            let mut at = 0usize;
            for p in parts.iter().copied().chain(std::iter::once(usize::MAX)) {
                let end = at.saturating_add(p).min(n);
                s.feed(&x[at..end]);
                at = end;
            }
            assert_eq!(s.value().to_bits(), whole.to_bits(), "fed as {parts:?}");
        }
        // Added and fed in parts: the same as adding first, then feeding.
        let y: Vec<f32> = x.iter().map(|v| v * 0.5 - 0.25).collect();
        let mut summed: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
        let want = tensor_sum_of_squares(&summed);
        let mut g = x.clone();
        let mut s = SumSq::default();
        for (lo, hi) in
            [(0, 7), (7, SUMSQ_CHUNK + 3), (SUMSQ_CHUNK + 3, 4 * SUMSQ_CHUNK + 10), (4 * SUMSQ_CHUNK + 10, n)]
        {
            s.add_and_feed(&mut g[lo..hi], &y[lo..hi]);
        }
        assert_eq!(s.value().to_bits(), want.to_bits());
        assert!(g.iter().zip(summed.iter_mut()).all(|(a, b)| a.to_bits() == b.to_bits()));
        // Copied and fed in parts: the same as feeding the copy.
        let mut g = vec![f32::NAN; n];
        let mut s = SumSq::default();
        for (lo, hi) in [(0, 5), (5, 2 * SUMSQ_CHUNK + 1), (2 * SUMSQ_CHUNK + 1, n)] {
            s.copy_and_feed(&mut g[lo..hi], &y[lo..hi]);
        }
        assert_eq!(s.value().to_bits(), tensor_sum_of_squares(&y).to_bits());
        assert!(g.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()));
        let f64_exact: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        assert!((whole - f64_exact).abs() <= 1e-12 * f64_exact);
    }

    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        let mut rng = Rng::new(3);
        let mut worst = 0f64;
        for i in 0..200_000 {
            let x = if i < 1000 { -87.0 + i as f32 * 0.175 } else { (rng.uniform_f64() * 170.0 - 86.0) as f32 };
            let ours = exp(x) as f64;
            let exact = (x as f64).exp();
            worst = worst.max(((ours - exact) / exact).abs());
        }
        assert!(worst < 4.0 * f32::EPSILON as f64, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
    }

    #[test]
    fn reductions_match_plain_loops() {
        let mut rng = Rng::new(4);
        for n in [0, 1, 15, 16, 17, 100, 1000] {
            let mut a = vec![0f32; n];
            let mut b = vec![0f32; n];
            rng.fill_uniform(&mut a, -1.0, 1.0);
            rng.fill_uniform(&mut b, -1.0, 1.0);
            let s: f64 = a.iter().map(|&x| x as f64).sum();
            let d: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let m = a.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert!((sum(&a) as f64 - s).abs() < 1e-4, "sum n={n}");
            assert!((dot(&a, &b) as f64 - d).abs() < 1e-4, "dot n={n}");
            assert_eq!(max(&a), m, "max n={n}");
            let ss: f64 = a.iter().map(|&x| (x as f64 - 0.1).powi(2)).sum();
            assert!((centered_sum_sq(&a, 0.1) as f64 - ss).abs() < 1e-3, "centered n={n}");
        }
    }
}
