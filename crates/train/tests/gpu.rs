//! The CUDA worker: streamed training on the GPU (weights from the host
//! store, prefetch depths 0, 1 and 2, DRAM budgets 100% and 25%, the worker
//! keeping the step's weights and summing its gradients or not) against
//! resident training on the GPU and against the CPU, after several steps.
//! Without a GPU the tests print "CUDA tests skipped: <reason>" and pass;
//! without the `cuda` feature they are not built.
//!
//! What is compared, and why so: the losses of every step (relative 1e-5
//! GPU vs GPU, 1e-4 GPU vs CPU), and each tensor's update over the run
//! (weights after minus weights before) by relative L2 distance, 1e-3.
//! Not element by element: the runs add gradients in different orders (the
//! store adds each micro-batch's fresh gradient; cuBLAS sums in another
//! order than the CPU GEMM), and AdamW divides each gradient by its own
//! running magnitude, so an element whose gradient is a near-cancellation
//! can move by up to lr in either run. The key bias (c_attn.bias[C..2C]),
//! whose gradient is analytically zero and numerically such noise, is left
//! out of the L2 check and bounded by that reach: lr per step.
#![cfg(feature = "cuda")]

mod common;

use common::assert_updates_close;
use ws_model::{Gpt2Config, ModelSpec, Params};
use ws_train::gpu::{open_gpu, start_gpu_engine, GpuResident, WorkerPlan};
use ws_train::stream::{create_store, StreamingTrainer};
use ws_train::{Engine, RunConfig, Trainer};

fn config(prefetch_depth: usize, dram_fraction: f64, mode: &str) -> RunConfig {
    let mut c = RunConfig::preset("tiny").unwrap();
    c.model = Gpt2Config { n_layer: 6, n_head: 4, n_embd: 128, block_size: 64, vocab_size: 512 };
    c.train.batch_size = 4;
    c.train.micro_batch = 2;
    c.train.steps = 4;
    c.train.warmup_steps = 1;
    c.train.lr = 3e-3;
    c.train.device = "cuda".into();
    c.stream.mode = mode.into();
    c.stream.prefetch_depth = prefetch_depth;
    c.store.dram_fraction = dram_fraction;
    c.store.page_bytes = 65536;
    c.validate().unwrap();
    c
}

fn tokens() -> Vec<u16> {
    let mut rng = ws_kernels::Rng::new(99);
    (0..20000).map(|_| rng.below(512) as u16).collect()
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = ws_store::scratch::dir(&format!("gpu-{name}"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn gpu_streamed_equals_gpu_resident_and_cpu() {
    if ws_cuda::gpu_for_tests().is_none() {
        return;
    }
    let data = tokens();
    let steps = 3;
    let c = config(2, 1.0, "resident");
    let spec = ModelSpec::new(c.model);
    let init = Params::init(&spec, c.train.seed);
    let mut resident = GpuResident::new(c.clone(), &init).unwrap();
    let mut want = Vec::new();
    for _ in 0..steps {
        let s = resident.train_step(&data).unwrap();
        want.push(s.loss);
    }
    let want_params = resident.params().unwrap();
    let val = resident.evaluate(&data, 2).unwrap();

    let mut cpu_config = c.clone();
    cpu_config.train.device = "cpu".into();
    let mut cpu = Trainer::new(cpu_config).unwrap();
    for (i, &w) in want.iter().enumerate() {
        let s = Trainer::train_step(&mut cpu, &data);
        assert!((s.loss - w).abs() <= 1e-4 * w, "step {i}: cpu loss {} vs gpu {w}", s.loss);
    }
    assert_updates_close("gpu resident vs cpu", &init, &want_params, &cpu.params, &c, steps, 1e-3);

    // Depth, DRAM fraction, and what the worker holds beyond its micro-batch:
    // nothing (every use fetches, every micro-batch's gradient goes to the
    // store), the step's weights, the gradient sums, or both.
    let plan = |keep_weights, sum_gradients| WorkerPlan { keep_weights, sum_gradients };
    let runs = [
        (0, 1.0, plan(false, false)),
        (1, 0.25, plan(false, false)),
        (2, 1.0, plan(false, false)),
        (2, 0.25, plan(false, false)),
        (0, 1.0, plan(true, false)),
        (2, 0.25, plan(true, false)),
        (1, 0.25, plan(false, true)),
        (0, 1.0, plan(true, true)),
        (2, 0.25, plan(true, true)),
    ];
    for (k, fraction, p) in runs {
        let c = config(k, fraction, "streaming");
        let dir = tmp(&format!("s{k}-{fraction}-{}-{}", p.keep_weights, p.sum_gradients));
        let spec = c.model_spec().unwrap();
        let mb = c.train.micro_batch;
        let store = create_store(&c, &spec, &dir.join("store"), c.train.batch_size / mb).unwrap();
        let mut e = StreamingTrainer::start_on_gpu(c.clone(), store, mb, open_gpu().unwrap(), p).unwrap();
        for (i, &w) in want.iter().enumerate() {
            let s = e.train_step(&data).unwrap();
            assert!(
                (s.loss - w).abs() <= 1e-5 * w,
                "depth {k} dram {fraction} {p:?} step {i}: loss {} vs resident {w}",
                s.loss
            );
        }
        let got = e.params().unwrap();
        assert_updates_close(
            &format!("streamed depth {k} dram {fraction} {p:?}"),
            &init,
            &got,
            &want_params,
            &c,
            steps,
            1e-3,
        );
        let v = e.evaluate(&data, 2).unwrap();
        assert!((v - val).abs() <= 1e-5 * val, "validation {v} vs resident {val}");
        drop(e);
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn gpu_bf16_streaming_trains() {
    if ws_cuda::gpu_for_tests().is_none() {
        return;
    }
    // A periodic sequence the model can learn (the CPU in bf16 goes 6.26 -> 4.18).
    let data: Vec<u16> = (0..20000u32).map(|i| ((i * 7) % 61) as u16).collect();
    let mut c = config(2, 1.0, "streaming");
    c.train.precision = "bf16".into();
    c.stream.dtype = "bf16".into();
    c.train.steps = 8;
    let dir = tmp("bf16");
    let mut e = start_gpu_engine(&c, &dir, None).unwrap();
    let first = e.train_step(&data).unwrap().loss;
    let mut last = first;
    for _ in 1..8 {
        last = e.train_step(&data).unwrap().loss;
    }
    assert!(last < first - 1.0, "bf16 on the GPU: loss {first} -> {last}");
    drop(e);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn cuda_device_without_a_gpu_is_a_clear_error() {
    if ws_cuda::Gpu::new(0).is_ok() {
        return;
    }
    let c = config(2, 1.0, "resident");
    let spec = ModelSpec::new(c.model);
    let e = GpuResident::new(c, &Params::init(&spec, 1)).err().expect("no GPU");
    let msg = e.to_string();
    assert!(msg.starts_with("train.device = \"cuda\": ") && !msg.contains('\n'), "{msg}");
}
