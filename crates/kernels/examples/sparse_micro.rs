//! Micro-benchmarks behind the sparse kernels' figures in BENCHMARKS.md
//! (run with `RAYON_NUM_THREADS=1` for one thread):
//!
//! - `sparse_micro kernels K N SPARSITY f|i|w`: one sparse kernel (forward
//!   with a bias, as the model's layers have; input gradient; weight
//!   gradient) at 2048 tokens, 25 calls; prints the median and the minimum.
//! - `sparse_micro inner [FEATS] [PER] [OFFSET] [OUTPUTS] [NONZEROS]`: the
//!   forward's inner loop alone on synthetic data: FEATS feature rows of 64
//!   tokens (in L1 at 128), PER nonzeros per output, the rows OFFSET floats
//!   past a 64-byte line, OUTPUTS output blocks cycled through, NONZEROS
//!   indices and values streamed; prints nanoseconds per nonzero (the
//!   fastest of five rounds).

use std::time::Instant;
use ws_kernels::sparse::{self, Scratch, SparseWeight};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn kernels(args: &[String]) {
    let (k, n, s): (usize, usize, f64) = (arg(args, 2, 768), arg(args, 3, 3072), arg(args, 4, 0.9));
    let which = args.get(5).map(String::as_str).unwrap_or("f");
    let bt = 2048;
    let mut rng = ws_kernels::Rng::new(5);
    let mut fill = |len: usize| {
        let mut v = vec![0f32; len];
        rng.fill_normal(&mut v, 0.0, 1.0);
        v
    };
    let (w, x, g, bias) = (fill(k * n), fill(bt * k), fill(bt * n), fill(n));
    let sw = SparseWeight::from_dense_top(&w, k, n, 1.0 - s);
    let (mut out, mut dinp, mut dv) = (vec![0f32; bt * n], vec![0f32; bt * k], vec![0f32; sw.nnz()]);
    let mut scratch = Scratch::default();
    let mut ms: Vec<f64> = (0..25)
        .map(|_| {
            let t = Instant::now();
            match which {
                "f" => sparse::forward(&mut out, &x, &sw.pattern, &sw.values, Some(&bias), bt),
                "i" => sparse::backward_input(&mut dinp, &g, &sw.pattern, &sw.values, bt),
                _ => sparse::backward_weight(&mut dv, &x, &g, &sw.pattern, bt, &mut scratch),
            }
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    println!("{which} {k}x{n} sparsity {s}: median {:.2} ms, min {:.2} ms", ms[12], ms[0]);
}

#[cfg(target_arch = "x86_64")]
mod inner {
    use std::arch::x86_64::*;

    /// Outputs of `per` nonzeros each, two at a time into eight FMA chains
    /// (as `chunk_sum`), every output's block loaded and stored.
    ///
    /// # Safety
    /// AVX-512F must be present; every index < x.len() / 64; y holds
    /// `outputs * 64` floats.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn run(x: &[f32], idx: &[u32], val: &[f32], per: usize, outputs: usize, y: &mut [f32]) {
        let xp = x.as_ptr();
        let z = _mm512_setzero_ps();
        let (mut o, mut out) = (0, 0);
        while o + per <= idx.len() {
            let yp = y.as_mut_ptr().add(out * 64);
            out = if out + 1 == outputs { 0 } else { out + 1 };
            let (mut a, mut b) = ([z; 4], [z; 4]);
            for (j, a) in a.iter_mut().enumerate() {
                *a = _mm512_loadu_ps(yp.add(16 * j));
            }
            let mut p = o;
            while p + 2 <= o + per {
                let (v0, v1) = (_mm512_set1_ps(*val.get_unchecked(p)), _mm512_set1_ps(*val.get_unchecked(p + 1)));
                let x0 = xp.add(*idx.get_unchecked(p) as usize * 64);
                let x1 = xp.add(*idx.get_unchecked(p + 1) as usize * 64);
                for j in 0..4 {
                    a[j] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x0.add(16 * j)), a[j]);
                    b[j] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(x1.add(16 * j)), b[j]);
                }
                p += 2;
            }
            for j in 0..4 {
                _mm512_storeu_ps(yp.add(16 * j), _mm512_add_ps(a[j], b[j]));
            }
            o += per;
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn inner(args: &[String]) {
    if !std::arch::is_x86_feature_detected!("avx512f") {
        println!("inner: needs AVX-512F");
        return;
    }
    let (feats, per, offset): (usize, usize, usize) = (arg(args, 2, 128), arg(args, 3, 12), arg(args, 4, 0));
    let (outputs, nonzeros): (usize, usize) = (arg(args, 5, 64), arg(args, 6, 1 << 16));
    let xv: Vec<f32> = (0..feats * 64 + 32).map(|i| (i % 7) as f32).collect();
    let skip = (64 - xv.as_ptr() as usize % 64) % 64 / 4 + offset % 16;
    let x = &xv[skip..skip + feats * 64];
    let mut s = 12345u64;
    let idx: Vec<u32> = (0..nonzeros)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) % feats as u64) as u32
        })
        .collect();
    let val: Vec<f32> = (0..nonzeros).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut y = vec![0f32; outputs * 64];
    // Five rounds of about 2.6 M nonzeros each; the fastest round counts.
    let reps = (40 << 16) / nonzeros.max(1) + 1;
    let done = (nonzeros / per.max(2) * per.max(2) * reps) as f64;
    let ns = (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                // SAFETY: AVX-512F checked; indices < feats; y holds outputs * 64.
                unsafe { inner::run(x, &idx, &val, per.max(2), outputs.max(1), &mut y) };
            }
            t.elapsed().as_secs_f64() / done * 1e9
        })
        .fold(f64::INFINITY, f64::min);
    println!(
        "inner: {feats} features, {per} per output, rows {} bytes past a line, {outputs} outputs: {ns:.2} ns per nonzero ({})",
        x.as_ptr() as usize % 64,
        y[5]
    );
}

#[cfg(not(target_arch = "x86_64"))]
fn inner(_: &[String]) {
    println!("inner: needs x86_64 with AVX-512F");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("kernels") => kernels(&args),
        Some("inner") => inner(&args),
        _ => println!(
            "usage: sparse_micro kernels K N SPARSITY f|i|w | inner [FEATS] [PER] [OFFSET] [OUTPUTS] [NONZEROS]"
        ),
    }
}
