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
    /// Streamed over resident training throughput, same model and batch, one run.
    Streaming {
        #[arg(long, default_value = "small")]
        preset: String,
        /// Timed steps of each mode (after one warm-up step); medians are compared.
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// The store's DRAM budget as a fraction of the model state.
        #[arg(long, default_value_t = 1.0)]
        dram_fraction: f64,
        #[arg(long, default_value_t = 2)]
        prefetch_depth: usize,
        /// Streamed weights: fp32 or bf16.
        #[arg(long, default_value = "fp32")]
        dtype: String,
        /// Override the preset's sequence length.
        #[arg(long)]
        seq: Option<usize>,
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// The store's flash tier around the page cache (`store.direct_io`).
        #[arg(long)]
        direct_io: bool,
        /// Threads of the store's own pool (`store.threads`; 0: one per core).
        #[arg(long, default_value_t = 0)]
        store_threads: usize,
    },
    /// The store's AdamW update against memory bandwidth measured in the same run.
    Optimizer {
        /// Parameters updated per pass.
        #[arg(long, default_value_t = 64 << 20)]
        params: usize,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// GPU ceilings (GEMM, copies) and the CUDA worker's throughput (needs `--features cuda`).
    Cuda {
        /// all, gemm, copy, train (resident), streaming (streamed against
        /// resident), or large: a model whose fp32 weights and AdamW moments
        /// exceed the GPU's memory (and 80 GB), streamed from host memory
        /// (needs about 17 bytes of host memory per parameter, the rest on flash).
        #[arg(long, default_value = "all")]
        what: String,
        /// small (GPT-2 small) or 1b (20 layers, 2048 channels).
        #[arg(long, default_value = "small")]
        model: String,
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Sequences per forward/backward pass (gradients accumulate over
        /// batch / micro-batch passes per step); 0: the whole batch.
        #[arg(long, default_value_t = 0)]
        micro_batch: usize,
        #[arg(long, default_value_t = 1024)]
        seq: usize,
        /// Timed steps (after warm-up); medians are reported.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Streamed weights: fp32 or bf16.
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// Training tokens (text or a uint16 .bin file); default: random tokens.
        #[arg(long, default_value = "")]
        data: String,
    },
    /// Sparse against dense linear layers (forward, input and weight
    /// gradients) on the GPT-2 small shapes at 2048 tokens; with --step,
    /// whole streamed training steps of a model whose attention and MLP
    /// matrices are sparse against the dense model (time and bytes streamed).
    Sparsity {
        /// One sparsity (fraction of zeros, e.g. 0.9); default 0, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95 (--step: 0.9).
        #[arg(long)]
        sparsity: Option<f64>,
        /// Whole training steps instead of single layers.
        #[arg(long)]
        step: bool,
        /// The model of --step.
        #[arg(long, default_value = "small")]
        preset: String,
        /// Timed steps of --step (after one warm-up each); medians are reported.
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Timed repeats of each (after one warm-up); medians are reported.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        #[arg(long, default_value_t = 2048)]
        tokens: usize,
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// The broadcast-reduce tree: broadcast and reduce throughput against raw
    /// TCP between two processes (same run), or with --latency the step
    /// latency of lightweight workers for N = 1, 2, 4, ... up to --workers.
    Fabric {
        #[arg(long, default_value_t = 4)]
        workers: usize,
        #[arg(long, default_value_t = 4)]
        fanout: usize,
        /// Bytes broadcast, and reduced from every worker, per repeat.
        #[arg(long, default_value_t = 256 << 20)]
        bytes: usize,
        /// tcp (loopback sockets, authenticated) or inproc.
        #[arg(long, default_value = "tcp")]
        transport: String,
        #[arg(long, default_value_t = 1 << 20)]
        chunk_bytes: usize,
        /// Timed repeats; medians are reported.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        #[arg(long)]
        latency: bool,
        /// MAC every payload byte (fabric.mac_payload), not just headers.
        #[arg(long)]
        mac_payload: bool,
        /// The store runs the top node itself (fabric.top_in_store).
        #[arg(long)]
        top_in_store: bool,
        /// Threads of the runtime that hosts the whole tree (every node,
        /// link and worker of this one process); 0: one per core.
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// The receiving process of bench fabric's raw TCP measurement.
    #[command(hide = true)]
    TcpSink {
        #[arg(long)]
        addr: String,
        #[arg(long)]
        bytes: usize,
        #[arg(long)]
        repeats: usize,
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
        BenchCommand::Streaming {
            preset,
            steps,
            dram_fraction,
            prefetch_depth,
            dtype,
            seq,
            threads,
            direct_io,
            store_threads,
        } => {
            set_threads(threads);
            bench_streaming(&preset, steps, dram_fraction, prefetch_depth, &dtype, seq, direct_io, store_threads)
        }
        BenchCommand::Optimizer { params, repeats, threads } => {
            set_threads(threads);
            bench_optimizer(params, repeats);
            Ok(())
        }
        #[cfg(feature = "cuda")]
        BenchCommand::Cuda { what, model, batch, micro_batch, seq, steps, dtype, data } => {
            let shape = crate::bench_cuda::Shape { batch, micro_batch, seq };
            crate::bench_cuda::run(&what, &model, shape, steps.max(1), &dtype, &data)
        }
        #[cfg(not(feature = "cuda"))]
        BenchCommand::Cuda { .. } => Err(TrainError::Config(
            "bench cuda needs a build with CUDA support: cargo build --release --features cuda".into(),
        )),
        BenchCommand::Sparsity { sparsity, step: true, preset, steps, threads, .. } => {
            set_threads(threads);
            let s = sparsity.unwrap_or(0.9);
            if !(0.0..=0.99).contains(&s) {
                return Err(TrainError::Config(format!("--sparsity {s}: expected a fraction in [0, 0.99]")));
            }
            bench_sparse_step(&preset, s, steps.max(1))
        }
        BenchCommand::Sparsity { sparsity, repeats, tokens, threads, .. } => {
            set_threads(threads);
            let levels = match sparsity {
                Some(s) if (0.0..1.0).contains(&s) => vec![s],
                Some(s) => return Err(TrainError::Config(format!("--sparsity {s}: expected a fraction in [0, 1)"))),
                None => vec![0.0, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95],
            };
            bench_sparsity(&levels, repeats.max(1), tokens.max(1));
            Ok(())
        }
        BenchCommand::Fabric {
            workers,
            fanout,
            bytes,
            transport,
            chunk_bytes,
            repeats,
            latency,
            mac_payload,
            top_in_store,
            threads,
        } => {
            let flags = crate::bench_fabric::Flags { latency, mac_payload, top_in_store, threads };
            crate::bench_fabric::run(workers, fanout, bytes, &transport, chunk_bytes, repeats.max(1), flags)
        }
        BenchCommand::TcpSink { addr, bytes, repeats } => crate::bench_fabric::tcp_sink(&addr, bytes, repeats),
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

pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
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

pub(crate) fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// A ratio to four decimals (one division, so it prints as 0.9054, not
/// 0.9054000000000001).
fn ratio(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
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
            "fraction_of_gemm_peak": ratio(model_gflops / peak),
            "threads": pool_threads(), "peak_rss_mb": round(peak_rss_mb()),
        })
    );
    Ok(())
}

fn random_tokens(n: usize, vocab: usize) -> Vec<u16> {
    let mut rng = Rng::new(7);
    (0..n).map(|_| rng.below(vocab as u64) as u16).collect()
}

fn bench_streaming(
    preset: &str,
    steps: usize,
    fraction: f64,
    k: usize,
    dtype: &str,
    seq: Option<usize>,
    direct_io: bool,
    store_threads: usize,
) -> Result<()> {
    let mut config = RunConfig::preset(preset)?;
    if let Some(t) = seq {
        config.train.seq_len = t;
    }
    config.train.steps = (steps + 1) as u64;
    config.store.dram_fraction = fraction;
    config.stream.prefetch_depth = k;
    config.stream.dtype = dtype.to_string();
    config.store.direct_io = direct_io;
    config.store.threads = store_threads;
    config.validate()?;
    if steps == 0 {
        return Err(TrainError::Config("--steps must be at least 1".into()));
    }
    let (b, t) = (config.train.batch_size, config.seq_len());
    let data = random_tokens((b * t * 4).max(t + 1), config.model.vocab_size);
    // Both engines live side by side and their timed steps alternate, so
    // that drift in the machine's load hits both alike.
    let mut resident = {
        let mut c = config.clone();
        c.stream.mode = "resident".into();
        Trainer::new(c)?
    };
    let spec = config.model_spec()?;
    let dir = std::env::temp_dir().join(format!("ws-bench-store-{}", std::process::id()));
    let mb = ws_train::stream::choose_micro_batch(&config, &spec)?;
    let store = ws_train::stream::create_store(&config, &spec, &dir, b / mb)?;
    let mut streamed = ws_train::stream::StreamingTrainer::start(config.clone(), store)?;
    use ws_train::Engine;
    Engine::train_step(&mut resident, &data)?;
    streamed.train_step(&data)?;
    streamed.take_weight_waits();
    let (mut resident_times, mut streamed_times) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        resident_times.push(Engine::train_step(&mut resident, &data)?.seconds);
        streamed_times.push(streamed.train_step(&data)?.seconds);
    }
    let waits = streamed.take_weight_waits().unwrap_or_default();
    drop(resident);
    let (resident_s, streamed_s) = (median(resident_times), median(streamed_times));
    let stats = streamed.into_store().stats();
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        serde_json::json!({
            "bench": "streaming", "preset": preset, "batch": b, "seq": t, "dram_fraction": fraction,
            "prefetch_depth": k, "dtype": dtype, "steps": steps,
            "resident_tokens_per_s": round((b * t) as f64 / resident_s),
            "streamed_tokens_per_s": round((b * t) as f64 / streamed_s),
            "efficiency": ratio(resident_s / streamed_s),
            "weight_wait_ms_per_step": round(waits.total_s / steps as f64 * 1e3),
            "first_weight_wait_ms_per_step": round(waits.first_s / steps as f64 * 1e3),
            "store_dram_peak_bytes": stats.dram_bytes_peak,
            "flash_read_bytes": stats.flash_read_bytes, "flash_write_bytes": stats.flash_write_bytes,
            "direct_io": direct_io, "flash_direct_bytes": stats.flash_direct_bytes,
            "threads": pool_threads(), "store_threads": store_threads, "peak_rss_mb": round(peak_rss_mb()),
        })
    );
    Ok(())
}

/// Bytes one training step moves between the store and the worker: weights
/// down at every use that needs them, gradients up at every head and
/// backward use.
fn bytes_per_step(config: &RunConfig, spec: &ws_model::ModelSpec, micro_batches: usize) -> (u64, u64) {
    let sched = ws_train::schedule::Schedule::new(spec.layer_count(), micro_batches, true);
    let width = if config.stream.dtype == "bf16" { 2 } else { 4 };
    let (mut down, mut up) = (0u64, 0u64);
    for (j, u) in sched.uses.iter().enumerate() {
        let n = spec.layer_len(u.layer) as u64;
        if sched.needs_weights(j) {
            down += width * n;
        }
        if u.sends_gradients(true) {
            up += 4 * n;
        }
    }
    (down, up)
}

/// Whole streamed training steps, dense against sparse attention and MLP
/// matrices at `sparsity`, timed steps alternating.
fn bench_sparse_step(preset: &str, sparsity: f64, steps: usize) -> Result<()> {
    let mut dense = RunConfig::preset(preset)?;
    dense.train.steps = (steps + 1) as u64;
    dense.validate()?;
    let mut sparse = dense.clone();
    sparse.sparsity.attention = sparsity;
    sparse.sparsity.mlp = sparsity;
    sparse.validate()?;
    let (b, t) = (dense.train.batch_size, dense.seq_len());
    let data = random_tokens((b * t * 4).max(t + 1), dense.model.vocab_size);
    let mut engines = Vec::new();
    let mut traffic = Vec::new();
    for (name, c) in [("dense", &dense), ("sparse", &sparse)] {
        let spec = c.model_spec()?;
        let dir = std::env::temp_dir().join(format!("ws-bench-sparse-{name}-{}", std::process::id()));
        let mb = ws_train::stream::choose_micro_batch(c, &spec)?;
        let store = ws_train::stream::create_store(c, &spec, &dir, b / mb)?;
        traffic.push((bytes_per_step(c, &spec, b / mb), spec.stored_count(), dir));
        engines.push(ws_train::stream::StreamingTrainer::start(c.clone(), store)?);
    }
    use ws_train::Engine;
    for e in &mut engines {
        e.train_step(&data)?;
    }
    let mut times = vec![Vec::new(), Vec::new()];
    for _ in 0..steps {
        for (e, ts) in engines.iter_mut().zip(&mut times) {
            ts.push(e.train_step(&data)?.seconds);
        }
    }
    drop(engines);
    let (dense_s, sparse_s) = (median(times[0].clone()), median(times[1].clone()));
    let total = |i: usize| traffic[i].0 .0 + traffic[i].0 .1;
    println!(
        "{}",
        serde_json::json!({
            "bench": "sparsity_step", "preset": preset, "sparsity": sparsity, "batch": b, "seq": t, "steps": steps,
            "dense_ms": round(dense_s * 1e3), "sparse_ms": round(sparse_s * 1e3),
            "speedup": round(dense_s / sparse_s),
            "dense_tokens_per_s": round((b * t) as f64 / dense_s), "sparse_tokens_per_s": round((b * t) as f64 / sparse_s),
            "dense_bytes_streamed": total(0), "sparse_bytes_streamed": total(1),
            "bytes_ratio": (total(1) as f64 / total(0) as f64 * 1000.0).round() / 1000.0,
            "dense_stored_params": traffic[0].1, "sparse_stored_params": traffic[1].1,
            "kernel_density_max": sparse.sparsity.kernel_density_max, "threads": pool_threads(),
        })
    );
    for (_, _, dir) in traffic {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

/// STREAM-style copy and triad bandwidth, then AdamW over the same number
/// of parameters (28 bytes moved per parameter: p, g, m, v read; p, m, v written).
fn bench_optimizer(n: usize, repeats: usize) {
    use rayon::prelude::*;
    use ws_kernels::adamw::{adamw_update, AdamWStep};
    let chunk = 1 << 16;
    let mut a = vec![1f32; n];
    let b = vec![2f32; n];
    let c = vec![0.5f32; n];
    let timed = |f: &mut dyn FnMut()| -> f64 {
        f();
        median(
            (0..repeats.max(1))
                .map(|_| {
                    let t0 = Instant::now();
                    f();
                    t0.elapsed().as_secs_f64()
                })
                .collect(),
        )
    };
    let copy_s =
        timed(&mut || a.par_chunks_mut(chunk).zip(b.par_chunks(chunk)).for_each(|(a, b)| a.copy_from_slice(b)));
    let triad_s = timed(&mut || {
        a.par_chunks_mut(chunk).zip(b.par_chunks(chunk)).zip(c.par_chunks(chunk)).for_each(|((a, b), c)| {
            for i in 0..a.len() {
                a[i] = b[i] + 3.0 * c[i];
            }
        })
    });
    let (mut p, g, mut m, mut v) = (vec![0.1f32; n], vec![0.01f32; n], vec![0f32; n], vec![0f32; n]);
    drop(a);
    let mut t = 0;
    let adamw_s = timed(&mut || {
        t += 1;
        let s = AdamWStep { lr: 1e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, t, grad_scale: 1.0 };
        adamw_update(&mut p, &g, &mut m, &mut v, s);
    });
    let copy_bw = 8.0 * n as f64 / copy_s;
    let triad_bw = 12.0 * n as f64 / triad_s;
    let adamw_bw = 28.0 * n as f64 / adamw_s;
    println!(
        "{}",
        serde_json::json!({
            "bench": "optimizer", "params": n, "params_per_s": round(n as f64 / adamw_s),
            "adamw_bytes_per_s": round(adamw_bw), "copy_bytes_per_s": round(copy_bw), "triad_bytes_per_s": round(triad_bw),
            "bandwidth_ratio": ratio(adamw_bw / copy_bw.max(triad_bw)),
            "threads": pool_threads(),
        })
    );
}

/// Forward + both gradients of one linear layer, dense (the `gemm` crate)
/// against sparse (`ws_kernels::sparse`) on the same magnitude-pruned
/// weights, medians of `repeats`.
fn bench_sparsity(levels: &[f64], repeats: usize, bt: usize) {
    use ws_kernels::matmul::{matmul_backward, matmul_forward};
    use ws_kernels::sparse::{self, Scratch, SparseWeight};
    let mut rng = Rng::new(5);
    // Per sparsity: whether the sparse kernels beat dense on every shape.
    let mut faster = vec![true; levels.len()];
    for (name, k, n) in [("768x768", 768, 768), ("768x3072", 768, 3072), ("3072x768", 3072, 768)] {
        let mut fill = |len: usize| {
            let mut v = vec![0f32; len];
            rng.fill_normal(&mut v, 0.0, 1.0);
            v
        };
        let (w, x, g, bias) = (fill(k * n), fill(bt * k), fill(bt * n), fill(n));
        let (mut out, mut dinp, mut dw, mut db) =
            (vec![0f32; bt * n], vec![0f32; bt * k], vec![0f32; k * n], vec![0f32; n]);
        let time = |f: &mut dyn FnMut()| {
            f();
            median(
                (0..repeats)
                    .map(|_| {
                        let t = Instant::now();
                        f();
                        t.elapsed().as_secs_f64() * 1e3
                    })
                    .collect(),
            )
        };
        for (li, &sparsity) in levels.iter().enumerate() {
            let sw = SparseWeight::from_dense_top(&w, k, n, 1.0 - sparsity);
            let wd = sw.to_dense();
            let dense_ms = time(&mut || {
                matmul_forward(&mut out, &x, &wd, Some(&bias), bt, k, n);
                matmul_backward(&mut dinp, &mut dw, Some(&mut db), &g, &x, &wd, bt, k, n);
            });
            let mut s = Scratch::default();
            let mut dv = vec![0f32; sw.nnz()];
            let sparse_ms = time(&mut || {
                sparse::forward(&mut out, &x, &sw.pattern, &sw.values, Some(&bias), bt);
                sparse::backward_input(&mut dinp, &g, &sw.pattern, &sw.values, bt);
                sparse::backward_weight(&mut dv, &x, &g, &sw.pattern, bt, &mut s);
                ws_kernels::matmul::bias_backward(&mut db, &g, bt, n);
            });
            faster[li] &= sparse_ms < dense_ms;
            // Each sparse kernel alone, for where the time goes.
            let forward_ms = time(&mut || sparse::forward(&mut out, &x, &sw.pattern, &sw.values, Some(&bias), bt));
            let input_ms = time(&mut || sparse::backward_input(&mut dinp, &g, &sw.pattern, &sw.values, bt));
            let weight_ms = time(&mut || sparse::backward_weight(&mut dv, &x, &g, &sw.pattern, bt, &mut s));
            // What the executor runs for this layer with the default
            // crossover: the sparse kernels at or below it, else the dense
            // kernel on the masked weights (the dense time of this run).
            use ws_model::workspace::{runs_sparse_kernels, SPARSE_CROSSOVER_DENSITY};
            let sparse_kernels = runs_sparse_kernels(sw.pattern.density(), SPARSE_CROSSOVER_DENSITY);
            let executor_ms = if sparse_kernels { sparse_ms } else { dense_ms };
            println!(
                "{}",
                serde_json::json!({"bench": "sparsity", "shape": name, "tokens": bt, "sparsity": sparsity,
                    "nnz": sw.nnz(), "dense_ms": round(dense_ms), "sparse_ms": round(sparse_ms),
                    "speedup": round(dense_ms / sparse_ms), "sparse_forward_ms": round(forward_ms),
                    "sparse_input_ms": round(input_ms), "sparse_weight_ms": round(weight_ms),
                    "executor_kernel": if sparse_kernels { "sparse" } else { "dense" },
                    "executor_speedup": round(dense_ms / executor_ms),
                    "threads": pool_threads()})
            );
        }
    }
    // The crossover for sparsity.kernel_density_max: the highest density
    // measured at which the sparse kernels won on every shape.
    let crossover = levels.iter().zip(&faster).filter(|(_, &f)| f).map(|(s, _)| 1.0 - s).fold(0.0, f64::max);
    println!(
        "{}",
        serde_json::json!({"bench": "sparsity_crossover", "tokens": bt, "density_max_where_sparse_wins": round(crossover),
            "kernel_density_max_default": ws_model::workspace::SPARSE_CROSSOVER_DENSITY})
    );
}
