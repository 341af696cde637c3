//! `weightstream bench cuda ...` (feature `cuda`): the GPU's ceilings and
//! the CUDA worker's throughput, one JSON line each.
//!
//! - `gemm`: cuBLAS bf16 (fp32 accumulate), TF32 and fp32 at 8192^3 and the
//!   GPT-2 small layer shapes, random data, CUDA events, median of 10;
//! - `copy`: device-to-device (bytes read + written), host-to-device and
//!   device-to-host from pinned memory;
//! - `train`: resident training tokens/s and MFU against the bf16 ceiling
//!   measured in the same run;
//! - `streaming`: streamed over resident tokens/s at the same batch, and the
//!   batch above which a layer's compute outlasts its transfers;
//! - `large`: a model whose fp32 weights and AdamW moments are larger than
//!   the GPU (and 80 GB) trained for a few steps, streamed from the store in
//!   host memory: the point of weight streaming.

use crate::bench::{median, round};
use crate::commands::Result;
use std::time::Instant;
use ws_cuda::{Event, GemmType, Gpu, Operand};
use ws_kernels::Rng;
use ws_model::{ModelSpec, Params};
use ws_train::gpu::{start_gpu_engine, GpuResident};
use ws_train::{Engine, RunConfig, TrainError};

fn err(e: ws_cuda::GpuError) -> TrainError {
    TrainError::Config(e.to_string())
}

/// Milliseconds of `f` on the compute stream: median of `reps` after 3 warm-ups.
fn time_ms(gpu: &Gpu, reps: usize, mut f: impl FnMut() -> ws_cuda::Result<()>) -> ws_cuda::Result<f64> {
    let (a, b) = (Event::new(true)?, Event::new(true)?);
    for _ in 0..3 {
        f()?;
    }
    let mut ts = Vec::with_capacity(reps);
    for _ in 0..reps {
        a.record(&gpu.compute)?;
        f()?;
        b.record(&gpu.compute)?;
        b.synchronize()?;
        ts.push(b.elapsed_ms(&a)? as f64);
    }
    Ok(median(ts))
}

fn random_device(gpu: &Gpu, n: usize, seed: u64) -> ws_cuda::Result<ws_cuda::DevBuf<f32>> {
    let mut host = vec![0f32; n];
    Rng::new(seed).fill_uniform(&mut host, -1.0, 1.0);
    let d = gpu.alloc::<f32>(n)?;
    gpu.upload(d.ptr(), &host, &gpu.compute)?;
    gpu.compute.synchronize()?;
    Ok(d)
}

/// TFLOP/s of `C[m,n] = A[m,k] B[k,n]` (B transposed when `bt`), `ty`; C's
/// rows `ldc` apart.
fn gemm_tflops(gpu: &Gpu, ty: GemmType, m: usize, n: usize, k: usize, bt: bool, ldc: usize) -> ws_cuda::Result<f64> {
    let a32 = random_device(gpu, m * k, 1)?;
    let b32 = random_device(gpu, k * n, 2)?;
    let c = gpu.alloc::<f32>(m * ldc)?;
    let (a, b, _keep) = if ty == GemmType::Bf16 {
        let (a16, b16) = (gpu.alloc::<u16>(m * k)?, gpu.alloc::<u16>(k * n)?);
        gpu.to_bf16(&gpu.compute, a16.ptr(), a32.ptr(), m * k)?;
        gpu.to_bf16(&gpu.compute, b16.ptr(), b32.ptr(), k * n)?;
        (a16.ptr(), b16.ptr(), Some((a16, b16)))
    } else {
        (a32.ptr(), b32.ptr(), None)
    };
    let bop = if bt { Operand::t(b, k) } else { Operand::n(b, n) };
    let ms =
        time_ms(gpu, 10, || gpu.gemm(ty, m, n, k, 1.0, Operand::n(a, k), bop, 0.0, Operand::n(c.ptr(), ldc), None))?;
    Ok(2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12)
}

pub fn bench_gemm(gpu: &Gpu) -> Result<f64> {
    let mut bf16_ceiling = 0.0;
    let shapes: [(&str, usize, usize, usize, bool, usize); 5] = [
        ("8192^3", 8192, 8192, 8192, false, 8192),
        ("gpt2-small fc 16384x3072x768", 16384, 3072, 768, false, 3072),
        ("gpt2-small proj 16384x768x3072", 16384, 768, 3072, false, 768),
        ("gpt2-small logits 8192x50257x768 (B^T), ldc 50257", 8192, 50257, 768, true, 50257),
        ("gpt2-small logits 8192x50257x768 (B^T), ldc 50304", 8192, 50257, 768, true, 50304),
    ];
    for (name, m, n, k, bt, ldc) in shapes {
        for ty in [GemmType::Bf16, GemmType::Tf32, GemmType::F32] {
            if ty == GemmType::F32 && name != "8192^3" {
                continue;
            }
            let tf = gemm_tflops(gpu, ty, m, n, k, bt, ldc).map_err(err)?;
            if ty == GemmType::Bf16 && name == "8192^3" {
                bf16_ceiling = tf;
            }
            println!(
                "{}",
                serde_json::json!({"bench": "cuda_gemm", "gpu": gpu.name, "shape": name, "m": m, "n": n, "k": k, "ldc": ldc,
                    "type": format!("{ty:?}").to_lowercase(), "tflops": round(tf)})
            );
        }
    }
    // The linear layers' products with their bias: cuBLASLt's epilogue
    // (where loaded) against writing the bias first and adding the product.
    for (name, m, n, k) in [("gpt2-small fc + bias", 16384, 3072, 768), ("gpt2-small proj + bias", 16384, 768, 3072)] {
        let (a32, b32) = (random_device(gpu, m * k, 1).map_err(err)?, random_device(gpu, k * n, 2).map_err(err)?);
        let bias = random_device(gpu, n, 3).map_err(err)?;
        let (a16, b16, c) = (gpu.alloc::<u16>(m * k), gpu.alloc::<u16>(k * n), gpu.alloc::<f32>(m * n));
        let (a16, b16, c) = (a16.map_err(err)?, b16.map_err(err)?, c.map_err(err)?);
        gpu.to_bf16(&gpu.compute, a16.ptr(), a32.ptr(), m * k).map_err(err)?;
        gpu.to_bf16(&gpu.compute, b16.ptr(), b32.ptr(), k * n).map_err(err)?;
        let (a, b, co) = (Operand::n(a16.ptr(), k), Operand::n(b16.ptr(), n), Operand::n(c.ptr(), n));
        let fused =
            time_ms(gpu, 10, || gpu.gemm_bias(GemmType::Bf16, m, n, k, a, b, bias.ptr(), None, co)).map_err(err)?;
        let apart = time_ms(gpu, 10, || {
            gpu.bias_fill(&gpu.compute, c.ptr(), bias.ptr(), m, n)?;
            gpu.gemm(GemmType::Bf16, m, n, k, 1.0, a, b, 1.0, co, None)
        })
        .map_err(err)?;
        let tf = |ms: f64| round(2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12);
        println!(
            "{}",
            serde_json::json!({"bench": "cuda_gemm_bias", "gpu": gpu.name, "shape": name, "m": m, "n": n, "k": k,
                "cublaslt": gpu.uses_cublaslt(), "ms": round(fused), "tflops": tf(fused),
                "bias_fill_then_gemm_ms": round(apart), "bias_fill_then_gemm_tflops": tf(apart)})
        );
    }
    Ok(bf16_ceiling)
}

/// (device-to-device GB/s counting read + write, host-to-device GB/s, device-to-host GB/s)
pub fn bench_copy(gpu: &Gpu) -> Result<(f64, f64, f64)> {
    let n = 256usize << 20; // floats: 1 GiB
    let bytes = n * 4;
    let a = random_device(gpu, n, 3).map_err(err)?;
    let b = gpu.alloc::<f32>(n).map_err(err)?;
    let ms = time_ms(gpu, 10, || gpu.copy_d2d(b.ptr(), a.ptr(), bytes, &gpu.compute)).map_err(err)?;
    let d2d = 2.0 * bytes as f64 / (ms * 1e-3) / 1e9;
    let mut host = gpu.pinned::<f32>(n).map_err(err)?;
    host.as_mut_slice().fill(1.0);
    let ms = time_ms(gpu, 5, || gpu.upload(b.ptr(), host.as_slice(), &gpu.compute)).map_err(err)?;
    let h2d = bytes as f64 / (ms * 1e-3) / 1e9;
    let dst = host.as_mut_slice().as_mut_ptr();
    let ms = time_ms(gpu, 5, || {
        // SAFETY: the pinned buffer outlives the timed copies, which are waited for.
        unsafe { gpu.download_async(std::slice::from_raw_parts_mut(dst, n), a.ptr(), &gpu.compute) }
    })
    .map_err(err)?;
    let d2h = bytes as f64 / (ms * 1e-3) / 1e9;
    println!(
        "{}",
        serde_json::json!({"bench": "cuda_copy", "gpu": gpu.name, "bytes": bytes,
            "d2d_gbps_read_plus_write": round(d2d), "h2d_pinned_gbps": round(h2d), "d2h_pinned_gbps": round(d2h)})
    );
    Ok((d2d, h2d, d2h))
}

/// Sequences per step, per forward/backward pass (0: all of them) and their length.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub batch: usize,
    pub micro_batch: usize,
    pub seq: usize,
}

/// A run config for the benchmarks: `model` "small" (GPT-2 small) or "1b"
/// (20 layers, 2048 channels, 16 heads: 1.1 B parameters), bf16 products.
pub fn bench_config(model: &str, shape: Shape, precision: &str) -> Result<RunConfig> {
    let Shape { batch, micro_batch, seq } = shape;
    let mut c = RunConfig::preset("small")?;
    match model {
        "small" => {}
        "1b" => {
            c.model =
                ws_model::Gpt2Config { n_layer: 20, n_head: 16, n_embd: 2048, block_size: 1024, vocab_size: 50257 }
        }
        other => return Err(TrainError::Config(format!("--model `{other}` is not one of small, 1b"))),
    }
    c.train.batch_size = batch;
    c.train.micro_batch = if micro_batch == 0 { batch } else { micro_batch };
    c.train.seq_len = seq;
    c.train.precision = precision.into();
    c.train.device = "cuda".into();
    c.train.steps = 1000;
    c.train.warmup_steps = 10;
    c.train.lr = 1e-4;
    c.validate()?;
    Ok(c)
}

/// The training tokens: the file `path` if given, else `n` random ones.
fn tokens_from(path: &str, n: usize, vocab: usize) -> Result<Vec<u16>> {
    if path.is_empty() {
        return Ok(tokens(n, vocab));
    }
    let data = ws_data::load_tokens(std::path::Path::new(path), None).map_err(|e| TrainError::Config(e.to_string()))?;
    ws_data::check_vocab(&data, vocab).map_err(|e| TrainError::Config(e.to_string()))?;
    Ok(data)
}

fn tokens(n: usize, vocab: usize) -> Vec<u16> {
    let mut rng = Rng::new(7);
    (0..n).map(|_| rng.below(vocab as u64) as u16).collect()
}

/// Median seconds per step after `warmup` steps, the last loss, and every
/// step's milliseconds (the spread, on a shared machine).
fn time_steps(e: &mut dyn Engine, data: &[u16], warmup: usize, steps: usize) -> Result<(f64, f64, Vec<f64>)> {
    let mut loss = 0.0;
    for _ in 0..warmup {
        loss = e.train_step(data)?.loss;
    }
    let mut ts = Vec::new();
    for _ in 0..steps {
        let t0 = Instant::now();
        loss = e.train_step(data)?.loss;
        ts.push(t0.elapsed().as_secs_f64());
    }
    let all = ts.iter().map(|s| round(s * 1e3)).collect();
    Ok((median(ts), loss, all))
}

pub fn bench_train(model: &str, shape: Shape, steps: usize, precision: &str, ceiling_tflops: f64) -> Result<f64> {
    let (batch, seq) = (shape.batch, shape.seq);
    let c = bench_config(model, shape, precision)?;
    let spec = ModelSpec::new(c.model);
    let data = tokens(batch * seq * 8, c.model.vocab_size);
    let t0 = Instant::now();
    let mut e = GpuResident::new(c.clone(), &Params::init(&spec, 1))?;
    let setup_s = t0.elapsed().as_secs_f64();
    let (step_s, loss, all_ms) = time_steps(&mut e, &data, 2, steps)?;
    let tokens_per_s = (batch * seq) as f64 / step_s;
    let tflops = c.model.train_flops_per_token(seq) * tokens_per_s / 1e12;
    // Where one step's time goes (events between phases; the sum is the step's GPU time).
    let (mut x, mut y) = (Vec::new(), Vec::new());
    ws_data::sample_batch(&data, batch, seq, 1, 2, 0, &mut x, &mut y);
    let micro_batch = e.micro_batch();
    let phases = e.profile_step(&x, &y, 1e-4)?;
    let total: f64 = phases.iter().map(|p| p.1).sum();
    let mut breakdown = serde_json::Map::new();
    for (name, ms) in &phases {
        breakdown.insert(name.to_string(), serde_json::json!(round(*ms)));
    }
    println!(
        "{}",
        serde_json::json!({"bench": "cuda_profile", "model": model, "batch": batch, "micro_batch": micro_batch,
            "seq": seq, "precision": precision,
            "gpu_ms_total": round(total), "phases_ms": breakdown})
    );
    println!(
        "{}",
        serde_json::json!({"bench": "cuda_train", "gpu": e.gpu().name, "mode": "resident", "model": model,
            "params": spec.parameter_count(), "precision": precision, "batch": batch, "micro_batch": micro_batch,
            "seq": seq, "steps": steps, "step_ms": round(step_s * 1e3), "step_ms_all": all_ms, "tokens_per_s": round(tokens_per_s), "model_tflops": round(tflops),
            "gemm_ceiling_tflops": round(ceiling_tflops), "mfu": round(tflops / ceiling_tflops * 1e4) / 1e4,
            "setup_s": round(setup_s), "last_loss": loss, "fused_attention": e.fused_attention(),
            "cublaslt_missing": e.gpu().cublaslt_missing(),
            "gpu_allocated_gb": round(e.gpu().allocated() as f64 / 1e9)})
    );
    Ok(tokens_per_s)
}

/// Streamed over resident tokens/s at the same batch, twice in one sitting:
/// the worker fetching every use and sending every micro-batch's gradient
/// (`per_use`), and holding what its memory allows (`planned`: the step's
/// weights kept, the micro-batches' gradients summed; [`ws_train::gpu::plan_worker`]).
pub fn bench_streaming(
    model: &str,
    shape: Shape,
    steps: usize,
    precision: &str,
    dtype: &str,
    resident_tokens_per_s: f64,
    pcie: (f64, f64),
) -> Result<()> {
    let (batch, seq) = (shape.batch, shape.seq);
    for (variant, hold) in [("per_use", false), ("planned", true)] {
        let mut c = bench_config(model, shape, precision)?;
        c.stream.mode = "streaming".into();
        c.stream.dtype = dtype.into();
        c.stream.prefetch_depth = 2;
        c.stream.keep_weights = hold;
        c.stream.sum_gradients = hold;
        c.validate()?;
        let dir = std::env::temp_dir().join(format!("ws-bench-cuda-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io("cannot create", &dir, e))?;
        let data = tokens(batch * seq * 8, c.model.vocab_size);
        let t0 = Instant::now();
        let mut e = start_gpu_engine(&c, &dir, None)?;
        let setup_s = t0.elapsed().as_secs_f64();
        e.train_step(&data)?;
        e.take_weight_waits();
        let (step_s, loss, all_ms) = time_steps(e.as_mut(), &data, 0, steps)?;
        let waits = e.take_weight_waits().unwrap_or_default();
        let plan = e
            .worker_plan()
            .ok_or_else(|| TrainError::Config("bench cuda: the engine is not streaming onto the GPU".into()))?;
        let params = e.spec().parameter_count();
        drop(e);
        let _ = std::fs::remove_dir_all(&dir);
        let tokens_per_s = (batch * seq) as f64 / step_s;
        // Per block and step: weights down twice (forward, backward), the gradient up once.
        let wbytes = if dtype == "bf16" { 2.0 } else { 4.0 };
        let (h2d, d2h) = pcie;
        let transfer_s_per_param = (2.0 * wbytes / (h2d * 1e9)).max(4.0 / (d2h * 1e9));
        // Compute per parameter and token at the resident rate: 6 FLOP per parameter-token.
        let flops_rate = c.model.train_flops_per_token(seq) * resident_tokens_per_s;
        let compute_s_per_param_token = 6.0 / flops_rate;
        let min_tokens = transfer_s_per_param / compute_s_per_param_token;
        let per_step = |s: f64| round(s / steps as f64 * 1e3);
        println!(
            "{}",
            serde_json::json!({"bench": "cuda_streaming", "mode": "streamed", "variant": variant, "model": model,
                "params": params, "precision": precision, "dtype": dtype, "batch": batch,
                "micro_batch": c.train.micro_batch, "seq": seq,
                "keep_weights": plan.keep_weights, "sum_gradients": plan.sum_gradients,
                "steps": steps, "step_ms": round(step_s * 1e3), "step_ms_all": all_ms, "tokens_per_s": round(tokens_per_s),
                "resident_tokens_per_s": round(resident_tokens_per_s),
                "efficiency": round(tokens_per_s / resident_tokens_per_s * 1e4) / 1e4,
                "weight_wait_ms_per_step": per_step(waits.total_s),
                "first_weight_wait_ms_per_step": per_step(waits.first_s),
                "h2d_gbps": round(h2d), "d2h_gbps": round(d2h),
                "tokens_per_micro_batch_for_compute_over_transfer": min_tokens.ceil(),
                "setup_s": round(setup_s), "last_loss": loss})
        );
    }
    Ok(())
}

/// A `/proc/meminfo` field in bytes (Linux), e.g. "MemAvailable".
fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(&format!("{field}:")))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// This process's peak resident memory in GB (10^9 bytes).
fn peak_rss_gb() -> f64 {
    round(crate::bench::peak_rss_mb() * 1048576.0 / 1e9)
}

/// GPT-2 shapes with 4096 channels and 32 heads of 128, and layers added
/// until fp32 weights plus AdamW moments (12 bytes a parameter) exceed `bytes`.
pub fn large_model(bytes: u64) -> ws_model::Gpt2Config {
    let mut m = ws_model::Gpt2Config { n_layer: 1, n_head: 32, n_embd: 4096, block_size: 1024, vocab_size: 50257 };
    while 12 * ModelSpec::new(m).parameter_count() as u64 <= bytes {
        m.n_layer += 1;
    }
    m
}

/// `large`: trains a model larger than the GPU, streamed from host memory;
/// one JSON line per step and a summary. The store's DRAM budget is the
/// whole state if the machine has it free (with 12 GB to spare), else what
/// it has, the rest on flash under the temporary directory.
pub fn bench_large(shape: Shape, steps: usize, data: &str, gpu_memory: u64, ceiling_tflops: f64) -> Result<()> {
    let mut c = bench_config("small", shape, "bf16")?;
    c.model = large_model(gpu_memory.max(80_000_000_000));
    c.stream.mode = "streaming".into();
    c.stream.dtype = "bf16".into();
    c.stream.prefetch_depth = 2;
    // Adam's first steps move every weight by about the learning rate; on a
    // model this wide 3e-5 from step 1, or 2e-5 warmed up over 3 steps, sent
    // the loss from 11.5 to 28-32 before it fell (H100, 2026-11-27).
    c.train.lr = 1e-5;
    c.train.min_lr = 1e-5;
    c.train.warmup_steps = 5;
    let spec = ModelSpec::new(c.model);
    let params = spec.parameter_count() as u64;
    let state = 16 * params;
    let available = meminfo("MemAvailable").unwrap_or(0);
    c.store.dram_bytes = state.min(available.saturating_sub(12_000_000_000)).max(1);
    c.validate()?;
    println!(
        "{}",
        serde_json::json!({"bench": "cuda_large_plan", "model": c.model, "params": params,
            "weights_and_adam_gb": round(12.0 * params as f64 / 1e9), "store_state_gb": round(state as f64 / 1e9),
            "gpu_memory_gb": round(gpu_memory as f64 / 1e9), "host_available_gb": round(available as f64 / 1e9),
            "store_dram_budget_gb": round(c.store.dram_bytes as f64 / 1e9)})
    );
    let dir = std::env::temp_dir().join(format!("ws-bench-large-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io("cannot create", &dir, e))?;
    let tokens = tokens_from(data, shape.batch * shape.seq * 8, c.model.vocab_size)?;
    let t0 = Instant::now();
    let run = || -> Result<Vec<f64>> {
        let mut e = start_gpu_engine(&c, &dir, None)?;
        let setup_s = t0.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({"bench": "cuda_large_setup", "setup_s": round(setup_s),
            "peak_rss_gb": peak_rss_gb()})
        );
        let mut times = Vec::new();
        for step in 1..=steps {
            let t = Instant::now();
            let st = e.train_step(&tokens)?;
            let s = t.elapsed().as_secs_f64();
            times.push(s);
            println!(
                "{}",
                serde_json::json!({"bench": "cuda_large_step", "step": step, "loss": st.loss,
                "grad_norm": st.grad_norm, "step_s": round(s), "peak_rss_gb": peak_rss_gb()})
            );
        }
        Ok(times)
    };
    let times = run();
    let _ = std::fs::remove_dir_all(&dir);
    let times = times?;
    // Steps 1 and 2 also touch fresh memory (the gradient accumulators, then
    // the moments) and pin buffers; the median of the rest is the rate.
    let step_s = median(if times.len() > 1 { times[1..].to_vec() } else { times.clone() });
    let tokens_per_s = (shape.batch * shape.seq) as f64 / step_s;
    let tflops = c.model.train_flops_per_token(shape.seq) * tokens_per_s / 1e12;
    println!(
        "{}",
        serde_json::json!({"bench": "cuda_large", "mode": "streamed", "params": params, "n_layer": c.model.n_layer,
            "batch": shape.batch, "seq": shape.seq, "steps": steps, "step_s": round(step_s),
            "tokens_per_s": round(tokens_per_s), "model_tflops": round(tflops),
            "mfu": round(tflops / ceiling_tflops * 1e4) / 1e4, "gemm_ceiling_tflops": round(ceiling_tflops),
            "peak_rss_gb": peak_rss_gb(), "total_s": round(t0.elapsed().as_secs_f64())})
    );
    Ok(())
}

/// `bench cuda`: everything, in an order that puts the ceilings first.
pub fn run(what: &str, model: &str, shape: Shape, steps: usize, dtype: &str, data: &str) -> Result<()> {
    const WHAT: [&str; 6] = ["all", "gemm", "copy", "train", "streaming", "large"];
    if !WHAT.contains(&what) {
        return Err(TrainError::Config(format!("bench cuda --what `{what}` is not one of {}", WHAT.join(", "))));
    }
    let gpu = Gpu::new(0).map_err(|e| TrainError::Config(format!("bench cuda: {e}")))?;
    println!(
        "{}",
        serde_json::json!({"bench": "cuda_device", "gpu": gpu.name, "compute_capability": format!("{}.{}", gpu.compute_capability.0, gpu.compute_capability.1),
            "multiprocessors": gpu.multiprocessors, "max_shared_optin": gpu.max_shared_optin, "cublaslt": gpu.uses_cublaslt(), "memory_gb": round(gpu.total_memory as f64 / 1e9), "driver": gpu.driver_version})
    );
    let all = what == "all";
    let ceiling = if all || ["gemm", "train", "streaming", "large"].contains(&what) { bench_gemm(&gpu)? } else { 0.0 };
    let pcie = if all || what == "copy" || what == "streaming" {
        let (_, h2d, d2h) = bench_copy(&gpu)?;
        (h2d, d2h)
    } else {
        (0.0, 0.0)
    };
    let gpu_memory = gpu.total_memory as u64;
    drop(gpu);
    if what == "large" {
        return bench_large(shape, steps, data, gpu_memory, ceiling);
    }
    if all || what == "train" || what == "streaming" {
        let resident = bench_train(model, shape, steps, "bf16", ceiling)?;
        if all || what == "streaming" {
            bench_streaming(model, shape, steps, "bf16", dtype, resident, pcie)?;
        }
    }
    Ok(())
}
