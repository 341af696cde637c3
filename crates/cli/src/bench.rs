//! `weightstream bench ...`: measurements that print one JSON line each.
//! Long runs live here, not in the test suite.

use crate::commands::{set_threads, Result};
use clap::Subcommand;
use std::time::Instant;
use ws_kernels::matmul::{gemm, pool_threads, Mat};
use ws_kernels::Rng;
use ws_train::{RunConfig, TrainError, Trainer};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Training throughput of a preset on random tokens.
    Train {
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Timed steps (after warm-up); the median is reported.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Override the preset's sequence length.
        #[arg(long)]
        seq: Option<usize>,
        /// Override the preset's batch size.
        #[arg(long)]
        batch: Option<usize>,
        /// Worker threads (0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// fp32, or bf16 (oneDNN) for the linear layers.
        #[arg(long, default_value = "fp32")]
        precision: String,
    },
    /// fp32 GEMM throughput on the GPT-2 small layer shapes (M = 2048 tokens).
    Gemm {
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Train { preset, steps, seq, batch, threads, precision } => {
            bench_train(&preset, steps, seq, batch, threads, &precision)
        }
        BenchCommand::Gemm { repeats, threads } => {
            set_threads(threads);
            let bf16 = ws_kernels::bf16::available().is_ok();
            for (name, a_t, b_t, m, n, k) in gemm_shapes() {
                let gflops = gemm_gflops(a_t, b_t, m, n, k, repeats);
                let bf16_gflops = bf16.then(|| round(linear_bf16_gflops(m, n, k, repeats)));
                println!(
                    "{}",
                    serde_json::json!({"bench": "gemm", "shape": name, "m": m, "n": n, "k": k,
                        "fp32_gflops": round(gflops), "bf16_linear_gflops": bf16_gflops, "threads": pool_threads()})
                );
            }
            Ok(())
        }
    }
}

/// The products of a GPT-2 small MLP layer at 2048 tokens: forward, input
/// gradient (B transposed) and weight gradient (A transposed).
fn gemm_shapes() -> Vec<(&'static str, bool, bool, usize, usize, usize)> {
    vec![
        ("fwd 2048x768 @ 768x3072", false, false, 2048, 3072, 768),
        ("dinp 2048x3072 @ (768x3072)^T", false, true, 2048, 768, 3072),
        ("dw (2048x768)^T @ 2048x3072", true, false, 768, 3072, 2048),
    ]
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Peak resident set size of this process so far, MiB.
pub fn peak_rss_mb() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss as f64 / 1024.0
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Median GFLOP/s of `m x n x k` products with the given layouts.
fn gemm_gflops(a_t: bool, b_t: bool, m: usize, n: usize, k: usize, repeats: usize) -> f64 {
    let mut rng = Rng::new(1);
    let mut a = vec![0f32; m * k];
    let mut b = vec![0f32; k * n];
    rng.fill_uniform(&mut a, -1.0, 1.0);
    rng.fill_uniform(&mut b, -1.0, 1.0);
    let mut c = vec![0f32; m * n];
    let am = if a_t { Mat::transposed(&a, m) } else { Mat::rows(&a, k) };
    let bm = if b_t { Mat::transposed(&b, k) } else { Mat::rows(&b, n) };
    let threads = pool_threads();
    gemm(&mut c, n, false, am, bm, m, n, k, 1.0, threads);
    let times: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let t0 = Instant::now();
            gemm(&mut c, n, false, am, bm, m, n, k, 1.0, threads);
            t0.elapsed().as_secs_f64()
        })
        .collect();
    2.0 * (m * n * k) as f64 / median(times) / 1e9
}

/// Median GFLOP/s of a bf16 linear layer forward (`m x k` by `k x n`),
/// including the rounding of both inputs to bf16.
fn linear_bf16_gflops(m: usize, n: usize, k: usize, repeats: usize) -> f64 {
    let mut rng = Rng::new(2);
    let mut a = vec![0f32; m * k];
    let mut b = vec![0f32; k * n];
    rng.fill_uniform(&mut a, -1.0, 1.0);
    rng.fill_uniform(&mut b, -1.0, 1.0);
    let mut c = vec![0f32; m * n];
    ws_kernels::bf16::matmul_forward(&mut c, &a, &b, None, m, k, n);
    let times: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let t0 = Instant::now();
            ws_kernels::bf16::matmul_forward(&mut c, &a, &b, None, m, k, n);
            t0.elapsed().as_secs_f64()
        })
        .collect();
    2.0 * (m * n * k) as f64 / median(times) / 1e9
}

fn bench_train(
    preset: &str,
    steps: usize,
    seq: Option<usize>,
    batch: Option<usize>,
    threads: usize,
    precision: &str,
) -> Result<()> {
    set_threads(threads);
    let mut config = RunConfig::preset(preset)?;
    if let Some(t) = seq {
        config.train.seq_len = t;
    }
    if let Some(b) = batch {
        config.train.batch_size = b;
    }
    config.train.steps = (steps + 2) as u64;
    config.train.precision = precision.to_string();
    config.validate()?;
    if steps == 0 {
        return Err(TrainError::Config("--steps must be at least 1".into()));
    }
    let (b, t, v) = (config.train.batch_size, config.seq_len(), config.model.vocab_size);
    let mut rng = Rng::new(7);
    let data: Vec<u16> = (0..(b * t * 4).max(t + 1)).map(|_| rng.below(v as u64) as u16).collect();
    let flops_per_token = config.model.train_flops_per_token(t);
    let mut trainer = Trainer::new(config)?;
    let warmup = 1;
    for _ in 0..warmup {
        trainer.train_step(&data);
    }
    let times: Vec<f64> = (0..steps).map(|_| trainer.train_step(&data).seconds).collect();
    let step_s = median(times);
    let tokens_per_s = (b * t) as f64 / step_s;
    let model_gflops = flops_per_token * tokens_per_s / 1e9;
    let (name, a_t, b_t, m, n, k) = gemm_shapes()[0];
    let _ = name;
    let peak = gemm_gflops(a_t, b_t, m, n, k, 5);
    println!(
        "{}",
        serde_json::json!({
            "bench": "train", "preset": preset, "precision": precision, "mode": "resident",
            "batch": b, "seq": t, "params": trainer.spec.parameter_count(), "steps": steps,
            "step_ms": round(step_s * 1e3), "tokens_per_s": round(tokens_per_s),
            "model_gflops": round(model_gflops), "gemm_peak_gflops": round(peak),
            "fraction_of_gemm_peak": round(model_gflops / peak * 100.0) / 100.0,
            "threads": pool_threads(), "peak_rss_mb": round(peak_rss_mb()),
        })
    );
    Ok(())
}
