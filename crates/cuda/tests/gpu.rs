//! The CUDA backend against the CPU kernels and PyTorch.
//!
//! Without a GPU (CI), the tests that need one print "CUDA tests skipped:
//! <reason>" and pass; the error path itself is checked. With NVRTC present
//! (LD_LIBRARY_PATH), the kernels are compiled for Hopper even without a GPU.
//!
//! Tolerances, as max |gpu - cpu| <= tol * max |cpu| per tensor: our kernels
//! in fp32 1e-5 (the same arithmetic in another order); whole layers in fp32
//! 1e-4 (cuBLAS sums in another order than the CPU GEMM, over K up to 3072);
//! bf16 products 1e-2 against fp32.

use safetensors::SafeTensors;
use ws_cuda::kernels::{self, token_buckets};
use ws_cuda::{gpu_for_tests, DeviceParams, GemmType, Gpu, GpuWorkspace, Operand};
use ws_kernels::adamw::{adamw_update, AdamWStep};
use ws_kernels::{Precision, Rng};
use ws_model::{Gpt2Config, ModelSpec, Params, Workspace};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures");

fn assert_scaled_close(what: &str, ours: &[f32], reference: &[f32], tol: f32) {
    assert_eq!(ours.len(), reference.len(), "{what}: length");
    let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs())).max(f32::MIN_POSITIVE);
    let mut worst = (0usize, 0f32);
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        let d = (a - b).abs();
        assert!(!d.is_nan(), "{what}[{i}]: {a} vs {b}");
        if d > worst.1 {
            worst = (i, d);
        }
    }
    let (i, d) = worst;
    assert!(
        d <= tol * scale,
        "{what}[{i}]: gpu {} vs cpu {} (|diff| {d} > {tol} x max|cpu| {scale})",
        ours[i],
        reference[i]
    );
    eprintln!("{what}: max |diff| / max |cpu| = {:.2e}", d / scale);
}

fn random(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    let mut v = vec![0f32; n];
    rng.fill_normal(&mut v, 0.0, std);
    v
}

fn up(gpu: &Gpu, x: &[f32]) -> ws_cuda::DevBuf<f32> {
    let b = gpu.alloc::<f32>(x.len()).unwrap();
    gpu.upload(b.ptr(), x, &gpu.compute).unwrap();
    b
}

fn up_i32(gpu: &Gpu, x: &[i32]) -> ws_cuda::DevBuf<i32> {
    let b = gpu.alloc::<i32>(x.len().max(1)).unwrap();
    gpu.upload(b.ptr(), x, &gpu.compute).unwrap();
    b
}

fn down(gpu: &Gpu, b: &ws_cuda::DevBuf<f32>) -> Vec<f32> {
    let mut v = vec![0f32; b.len()];
    gpu.download(&mut v, b.ptr(), &gpu.compute).unwrap();
    v
}

#[test]
fn without_a_gpu_the_error_is_one_clear_line() {
    match Gpu::new(0) {
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty() && !msg.contains('\n'), "{msg:?}");
            assert!(msg.contains("CUDA") || msg.contains("GPU"), "{msg}");
        }
        Ok(_) => {
            let e = Gpu::new(99).err().expect("no machine has 100 GPUs here");
            assert!(e.to_string().contains("no CUDA device 99"), "{e}");
        }
    }
}

#[test]
fn kernels_compile_for_hopper_with_nvrtc() {
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        eprintln!("CUDA tests skipped: NVRTC (libnvrtc.so.13) not found");
        return;
    }
    let ptx = kernels::compile((9, 0)).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> =
        kernels::SOURCE.split("__global__ void ").skip(1).map(|s| s.split('(').next().unwrap()).collect();
    assert!(names.len() >= 20, "{names:?}");
    for n in names {
        assert!(ptx.contains(&format!(".entry {n}(")), "{n} missing from the PTX");
    }
}

#[test]
fn embedding_matches_cpu() {
    let Some(gpu) = gpu_for_tests() else { return };
    let mut rng = Rng::new(1);
    let (b, t, c, v) = (3, 37, 96, 500);
    let tokens: Vec<u32> = (0..b * t).map(|_| rng.below(60) as u32).collect();
    let (wte, wpe) = (random(&mut rng, v * c, 1.0), random(&mut rng, t * c, 1.0));
    let mut out = vec![0f32; b * t * c];
    ws_kernels::embedding::embedding_forward(&mut out, &tokens, &wte, &wpe, b, t, c);
    let toks: Vec<i32> = tokens.iter().map(|&x| x as i32).collect();
    let (dt, dwte, dwpe) = (up_i32(&gpu, &toks), up(&gpu, &wte), up(&gpu, &wpe));
    let dout = gpu.alloc::<f32>(b * t * c).unwrap();
    gpu.embedding_fwd(&gpu.compute, dout.ptr(), dt.ptr(), dwte.ptr(), dwpe.ptr(), b * t, t, c).unwrap();
    assert_scaled_close("embedding forward", &down(&gpu, &dout), &out, 1e-6);

    let g = random(&mut rng, b * t * c, 1.0);
    let (mut gwte, mut gwpe) = (random(&mut rng, v * c, 1.0), random(&mut rng, t * c, 1.0));
    let (d_gwte, d_gwpe, d_g) = (up(&gpu, &gwte), up(&gpu, &gwpe), up(&gpu, &g));
    ws_kernels::embedding::embedding_backward(&mut gwte, &mut gwpe, &g, &tokens, b, t, c);
    let (order, starts, uniq) = token_buckets(&tokens);
    let (o, s, u) = (up_i32(&gpu, &order), up_i32(&gpu, &starts), up_i32(&gpu, &uniq));
    let buckets = (o.ptr(), s.ptr(), u.ptr(), uniq.len());
    gpu.embedding_bwd(&gpu.compute, d_gwte.ptr(), d_gwpe.ptr(), d_g.ptr(), buckets, b, t, c).unwrap();
    assert_scaled_close("embedding dwte", &down(&gpu, &d_gwte), &gwte, 1e-5);
    assert_scaled_close("embedding dwpe", &down(&gpu, &d_gwpe), &gwpe, 1e-5);
}

/// The bf16 output a kernel wrote beside its fp32 one is that output rounded
/// as the CPU rounds (bit for bit).
fn assert_rounds_to_bf16(what: &str, gpu: &Gpu, out16: &ws_cuda::DevBuf<u16>, out: &[f32]) {
    let mut bits = vec![0u16; out.len()];
    gpu.download(&mut bits, out16.ptr(), &gpu.compute).unwrap();
    for (i, (&g, &v)) in bits.iter().zip(out).enumerate() {
        assert_eq!(g, ws_kernels::bf16::to_bf16(v), "{what}: bf16 copy of [{i}] = {v}");
    }
}

#[test]
fn layernorm_matches_cpu() {
    let Some(gpu) = gpu_for_tests() else { return };
    // 768 and 128 channels run the float4 kernels, 200 the scalar ones.
    for (n, c) in [(301, 768), (37, 200), (64, 128)] {
        layernorm_matches_cpu_at(&gpu, n, c);
    }
}

fn layernorm_matches_cpu_at(gpu: &Gpu, n: usize, c: usize) {
    eprintln!("layernorm, {n} rows of {c}");
    let mut rng = Rng::new(2 + c as u64);
    let x: Vec<f32> = random(&mut rng, n * c, 2.0).iter().map(|v| v + 0.5).collect();
    let (w, bias) = (random(&mut rng, c, 1.0), random(&mut rng, c, 1.0));
    let (mut out, mut mean, mut rstd) = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
    ws_kernels::layernorm::layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &bias, n, c);
    let (dx, dw, db) = (up(gpu, &x), up(gpu, &w), up(gpu, &bias));
    let (dout, dmean, drstd) =
        (gpu.alloc::<f32>(n * c).unwrap(), gpu.alloc::<f32>(n).unwrap(), gpu.alloc::<f32>(n).unwrap());
    let out16 = gpu.alloc::<u16>(n * c).unwrap();
    let outs = (dout.ptr(), out16.ptr());
    gpu.layernorm_fwd(&gpu.compute, outs, dmean.ptr(), drstd.ptr(), dx.ptr(), dw.ptr(), db.ptr(), n, c).unwrap();
    assert_scaled_close("layernorm out", &down(gpu, &dout), &out, 1e-5);
    assert_rounds_to_bf16("layernorm out", gpu, &out16, &down(gpu, &dout));
    assert_scaled_close("layernorm mean", &down(gpu, &dmean), &mean, 1e-5);
    assert_scaled_close("layernorm rstd", &down(gpu, &drstd), &rstd, 1e-5);

    let g = random(&mut rng, n * c, 1.0);
    let mut dinp = random(&mut rng, n * c, 1.0);
    let (mut gw, mut gb) = (random(&mut rng, c, 1.0), random(&mut rng, c, 1.0));
    let (d_dinp, d_gw, d_gb, d_g) = (up(gpu, &dinp), up(gpu, &gw), up(gpu, &gb), up(gpu, &g));
    ws_kernels::layernorm::layernorm_backward(&mut dinp, &mut gw, &mut gb, &g, &x, &w, &mean, &rstd, n, c);
    let partial = gpu.alloc::<f32>(kernels::partial_len(n, 2 * c)).unwrap();
    gpu.layernorm_bwd(
        &gpu.compute,
        d_dinp.ptr(),
        d_gw.ptr(),
        d_gb.ptr(),
        partial.ptr(),
        d_g.ptr(),
        dx.ptr(),
        dw.ptr(),
        dmean.ptr(),
        drstd.ptr(),
        n,
        c,
    )
    .unwrap();
    assert_scaled_close("layernorm dinp", &down(gpu, &d_dinp), &dinp, 1e-5);
    assert_scaled_close("layernorm dweight", &down(gpu, &d_gw), &gw, 1e-5);
    assert_scaled_close("layernorm dbias", &down(gpu, &d_gb), &gb, 1e-5);
}

#[test]
fn gelu_bias_and_bf16_match_cpu() {
    let Some(gpu) = gpu_for_tests() else { return };
    let mut rng = Rng::new(3);
    let n = 100_003;
    let x = random(&mut rng, n, 3.0);
    let mut out = vec![0f32; n];
    ws_kernels::gelu::gelu_forward(&mut out, &x);
    let dx = up(&gpu, &x);
    let dout = gpu.alloc::<f32>(n).unwrap();
    let out16 = gpu.alloc::<u16>(n).unwrap();
    let x16 = gpu.alloc::<u16>(n).unwrap();
    gpu.gelu_fwd(&gpu.compute, (dout.ptr(), out16.ptr(), x16.ptr()), dx.ptr(), n).unwrap();
    assert_scaled_close("gelu forward", &down(&gpu, &dout), &out, 1e-5);
    assert_rounds_to_bf16("gelu forward", &gpu, &out16, &down(&gpu, &dout));
    assert_rounds_to_bf16("gelu forward's input", &gpu, &x16, &x);
    let mut d = random(&mut rng, n, 1.0);
    let dd = up(&gpu, &d);
    ws_kernels::gelu::gelu_backward_inplace(&mut d, &x);
    gpu.gelu_bwd(&gpu.compute, dd.ptr(), dx.ptr(), n).unwrap();
    assert_scaled_close("gelu backward", &down(&gpu, &dd), &d, 1e-5);

    let (rows, c) = (1000, 333);
    let g = random(&mut rng, rows * c, 1.0);
    let mut dbias = random(&mut rng, c, 1.0);
    let (d_dbias, d_g) = (up(&gpu, &dbias), up(&gpu, &g));
    ws_kernels::matmul::bias_backward(&mut dbias, &g, rows, c);
    let partial = gpu.alloc::<f32>(kernels::partial_len(rows, c)).unwrap();
    gpu.bias_bwd(&gpu.compute, d_dbias.ptr(), partial.ptr(), d_g.ptr(), rows, c).unwrap();
    assert_scaled_close("bias backward", &down(&gpu, &d_dbias), &dbias, 1e-5);

    // Through GELU (its input kept in bf16) with a bf16 copy, in one pass:
    // the bias gradient of gelu'(x) * g against the CPU, and the copy equal
    // to the GPU's separate GELU backward rounded.
    let gx = bf16_round(&random(&mut rng, rows * c, 3.0));
    let mut through = g.clone();
    ws_kernels::gelu::gelu_backward_inplace(&mut through, &gx);
    let mut dbias2 = random(&mut rng, c, 1.0);
    let d_dbias2 = up(&gpu, &dbias2);
    ws_kernels::matmul::bias_backward(&mut dbias2, &through, rows, c);
    let (d_gx, g16) = (up(&gpu, &gx), gpu.alloc::<u16>(rows * c).unwrap());
    let gx16 = gpu.alloc::<u16>(rows * c).unwrap();
    gpu.to_bf16(&gpu.compute, gx16.ptr(), d_gx.ptr(), rows * c).unwrap();
    gpu.bias_bwd_cast(&gpu.compute, d_dbias2.ptr(), partial.ptr(), (gx16.ptr(), g16.ptr()), d_g.ptr(), rows, c)
        .unwrap();
    assert_scaled_close("bias backward through gelu", &down(&gpu, &d_dbias2), &dbias2, 1e-5);
    gpu.gelu_bwd(&gpu.compute, d_g.ptr(), d_gx.ptr(), rows * c).unwrap();
    let through_gpu = down(&gpu, &d_g);
    assert_scaled_close("gelu backward (bias test)", &through_gpu, &through, 1e-5);
    assert_rounds_to_bf16("bias backward's bf16 copy through gelu", &gpu, &g16, &through_gpu);
    // And without GELU: the copy is the input rounded.
    gpu.bias_bwd_cast(&gpu.compute, d_dbias2.ptr(), partial.ptr(), (0, g16.ptr()), d_g.ptr(), rows, c).unwrap();
    assert_rounds_to_bf16("bias backward's bf16 copy", &gpu, &g16, &through_gpu);

    let h = gpu.alloc::<u16>(n).unwrap();
    gpu.to_bf16(&gpu.compute, h.ptr(), dx.ptr(), n).unwrap();
    let mut bits = vec![0u16; n];
    gpu.download(&mut bits, h.ptr(), &gpu.compute).unwrap();
    for (i, (&g, &v)) in bits.iter().zip(&x).enumerate() {
        assert_eq!(g, ws_kernels::bf16::to_bf16(v), "bf16 rounding of x[{i}] = {v}");
    }
    gpu.from_bf16(&gpu.compute, dout.ptr(), h.ptr(), n).unwrap();
    let back = down(&gpu, &dout);
    for (i, (&b, &g)) in back.iter().zip(&bits).enumerate() {
        assert_eq!(b.to_bits(), ws_kernels::bf16::from_bf16(g).to_bits(), "bf16 widening [{i}]");
    }
}

#[test]
fn crossentropy_adamw_and_sumsq_match_cpu() {
    let Some(gpu) = gpu_for_tests() else { return };
    let mut rng = Rng::new(4);
    let (rows, v) = (67, 50257);
    let mut logits = random(&mut rng, rows * v, 3.0);
    let targets: Vec<u32> = (0..rows).map(|_| rng.below(v as u64) as u32).collect();
    let dl = up(&gpu, &logits);
    let dl_kept = up(&gpu, &logits);
    let tg: Vec<i32> = targets.iter().map(|&x| x as i32).collect();
    let dt = up_i32(&gpu, &tg);
    let dloss = gpu.alloc::<f32>(rows).unwrap();
    let mut losses = vec![0f32; rows];
    let scale = 1.0 / 300.0;
    ws_kernels::crossentropy::crossentropy_forward_backward(&mut losses, &mut logits, &targets, v, Some(scale));
    gpu.crossentropy(&gpu.compute, dloss.ptr(), dl.ptr(), 0, dt.ptr(), rows, v, v, Some(scale)).unwrap();
    assert_scaled_close("cross-entropy losses", &down(&gpu, &dloss), &losses, 1e-5);
    let dlogits = down(&gpu, &dl);
    assert_scaled_close("cross-entropy dlogits", &dlogits, &logits, 1e-5);
    // With a bf16 output: the same gradient rounded, the logits untouched.
    let before = down(&gpu, &dl_kept);
    let d16 = gpu.alloc::<u16>(rows * v).unwrap();
    let dloss16 = gpu.alloc::<f32>(rows).unwrap();
    gpu.crossentropy(&gpu.compute, dloss16.ptr(), dl_kept.ptr(), d16.ptr(), dt.ptr(), rows, v, v, Some(scale)).unwrap();
    assert_eq!(down(&gpu, &dloss16), down(&gpu, &dloss), "cross-entropy losses with a bf16 gradient");
    assert_rounds_to_bf16("cross-entropy bf16 dlogits", &gpu, &d16, &dlogits);
    assert!(down(&gpu, &dl_kept) == before, "a bf16 gradient leaves the logits as they were");

    let n = 70_001;
    let (mut p, g) = (random(&mut rng, n, 0.02), random(&mut rng, n, 1.0));
    let mut m = random(&mut rng, n, 0.1);
    let mut vv: Vec<f32> = random(&mut rng, n, 0.1).iter().map(|x| x * x).collect();
    let (dp, dg, dm, dv) = (up(&gpu, &p), up(&gpu, &g), up(&gpu, &m), up(&gpu, &vv));
    let st = AdamWStep { lr: 3e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, t: 7, grad_scale: 0.7 };
    adamw_update(&mut p, &g, &mut m, &mut vv, st);
    gpu.adamw(&gpu.compute, dp.ptr(), dg.ptr(), dm.ptr(), dv.ptr(), n, st).unwrap();
    assert_scaled_close("adamw params", &down(&gpu, &dp), &p, 1e-6);
    assert_scaled_close("adamw m", &down(&gpu, &dm), &m, 1e-6);
    assert_scaled_close("adamw v", &down(&gpu, &dv), &vv, 1e-6);

    let partial = gpu.alloc::<f64>(kernels::SUMSQ_BLOCKS).unwrap();
    let ours = gpu.sumsq(&gpu.compute, partial.ptr(), dg.ptr(), n).unwrap();
    let cpu = ws_kernels::math::sum_of_squares_f64(&g);
    assert!((ours - cpu).abs() <= 1e-9 * cpu, "sum of squares {ours} vs {cpu}");
}

/// A whole model's forward, head and backward on the GPU against the CPU workspace.
fn model_matches_cpu(precision: Precision, n_head: usize, tol: f32) {
    let Some(gpu) = gpu_for_tests() else { return };
    let config = Gpt2Config { n_layer: 2, n_head, n_embd: 128, block_size: 64, vocab_size: 1000 };
    let spec = ModelSpec::new(config);
    let params = Params::init(&spec, 5);
    let (b, t) = (3, 64);
    let mut rng = Rng::new(6);
    let tokens: Vec<u32> = (0..b * t).map(|_| rng.below(1000) as u32).collect();
    let targets: Vec<u32> = (0..b * t).map(|_| rng.below(1000) as u32).collect();
    let n = spec.layer_count();
    let scale = 1.0 / (b * t) as f32;

    let mut ws = Workspace::new(&spec, b, t);
    let mut grads = Params::zeros(&spec);
    for l in 0..n - 1 {
        ws.forward(&spec, l, &params.layer(&spec, l), &tokens, b, t);
    }
    let loss =
        ws.head(&spec, &params.layer(&spec, n - 1), Some(&mut grads.layer_mut(&spec, n - 1)), &targets, b, t, scale);
    for l in (0..n - 1).rev() {
        ws.backward(&spec, l, &params.layer(&spec, l), &mut grads.layer_mut(&spec, l), &tokens, b, t);
    }

    let dparams = DeviceParams::from_host(&gpu, &spec, &params).unwrap();
    let dgrads = DeviceParams::zeros(&gpu, &spec).unwrap();
    let mut gws = GpuWorkspace::new(&gpu, &spec, b, t, precision).unwrap();
    let fused = precision == Precision::Bf16 && gpu.has_fused_attention(128 / n_head);
    assert_eq!(gws.fused_attention(), fused && std::env::var("WS_CUDA_ATTENTION").is_err());
    eprintln!("{} with {n_head} heads: fused attention {}", precision.name(), gws.fused_attention());
    gws.set_batch(&gpu, &tokens, &targets, b, t).unwrap();
    for l in 0..n - 1 {
        gws.forward(&gpu, &spec, l, &dparams.layer(&spec, l)).unwrap();
    }
    gws.head(&gpu, &spec, &dparams.layer(&spec, n - 1), Some(&dgrads.layer(&spec, n - 1)), scale).unwrap();
    for l in (0..n - 1).rev() {
        gws.backward(&gpu, &spec, l, &dparams.layer(&spec, l), &dgrads.layer(&spec, l)).unwrap();
    }
    let gloss = gws.take_loss_sum(&gpu).unwrap();
    let what = precision.name();
    assert!((gloss - loss).abs() <= tol as f64 * loss.abs(), "{what} loss sum {gloss} vs cpu {loss}");
    let ggrads = dgrads.to_host(&gpu, &spec).unwrap();
    for (i, ts) in spec.tensors.iter().enumerate() {
        assert_scaled_close(&format!("{what} grad.{}", ts.name), &ggrads.tensors[i], &grads.tensors[i], tol * 10.0);
    }
}

#[test]
fn model_fp32_matches_cpu() {
    model_matches_cpu(Precision::Fp32, 4, 1e-5);
}

#[test]
fn model_bf16_matches_cpu_fp32_within_bf16_tolerance() {
    model_matches_cpu(Precision::Bf16, 4, 2e-3);
}

#[test]
fn model_bf16_with_fused_attention_matches_cpu_fp32() {
    // Head size 64: attention runs through the fused kernels (sm_80 on).
    model_matches_cpu(Precision::Bf16, 2, 2e-3);
}

#[test]
fn products_with_a_bias_match_cpu() {
    let Some(gpu) = gpu_for_tests() else { return };
    eprintln!("bias epilogue through cuBLASLt: {}", gpu.uses_cublaslt());
    let mut rng = Rng::new(9);
    let (m, k, n) = (300, 136, 200);
    let (a, b) = (random(&mut rng, m * k, 1.0), random(&mut rng, k * n, 1.0));
    // Room for the bias at a 16-byte boundary and one float past it (the fallback).
    let bias_room = random(&mut rng, n + 4, 1.0);
    let bias_dev = up(&gpu, &bias_room);
    // A residual added to the output (`add`), as the blocks' projections do.
    let residual = random(&mut rng, m * n, 1.0);
    let residual_dev = up(&gpu, &residual);
    for ty in [GemmType::Bf16, GemmType::Tf32, GemmType::F32] {
        for (transposed_a, skew, add) in [
            (false, 0usize, false),
            (false, 1, false),
            (true, 0, false),
            (true, 1, false),
            (false, 0, true),
            (true, 1, true),
        ] {
            let bias = &bias_room[skew..skew + n];
            // bf16 takes inputs rounded to bf16; both sides then see the same values.
            let (ar, br) = if ty == GemmType::Bf16 { (bf16_round(&a), bf16_round(&b)) } else { (a.clone(), b.clone()) };
            let mut expected = vec![0f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    let dot: f64 = (0..k).map(|p| ar[i * k + p] as f64 * br[p * n + j] as f64).sum();
                    let r = if add { residual[i * n + j] as f64 } else { 0.0 };
                    expected[i * n + j] = (dot + bias[j] as f64 + r) as f32;
                }
            }
            // A as stored: [M, K], or [K, M] read transposed.
            let a_stored: Vec<f32> =
                if transposed_a { (0..k * m).map(|x| a[(x % m) * k + x / m]).collect() } else { a.clone() };
            let (da, db) = (up(&gpu, &a_stored), up(&gpu, &b));
            let (a16, b16) = (gpu.alloc::<u16>(m * k).unwrap(), gpu.alloc::<u16>(k * n).unwrap());
            let (pa, pb) = if ty == GemmType::Bf16 {
                gpu.to_bf16(&gpu.compute, a16.ptr(), da.ptr(), m * k).unwrap();
                gpu.to_bf16(&gpu.compute, b16.ptr(), db.ptr(), k * n).unwrap();
                (a16.ptr(), b16.ptr())
            } else {
                (da.ptr(), db.ptr())
            };
            let aop = if transposed_a { Operand::t(pa, m) } else { Operand::n(pa, k) };
            let c = gpu.alloc::<f32>(m * n).unwrap();
            let bias_ptr = bias_dev.ptr() + 4 * skew as u64;
            let add_ptr = add.then(|| residual_dev.ptr());
            gpu.gemm_bias(ty, m, n, k, aop, Operand::n(pb, n), bias_ptr, add_ptr, Operand::n(c.ptr(), n)).unwrap();
            let tol = match ty {
                GemmType::Bf16 => 1e-4,
                GemmType::Tf32 => 3e-3,
                GemmType::F32 => 1e-5,
            };
            let what = format!(
                "{ty:?} product + bias (A transposed: {transposed_a}, bias at +{skew} floats, residual: {add})"
            );
            assert_scaled_close(&what, &down(&gpu, &c), &expected, tol);
        }
    }
}

fn down16(gpu: &Gpu, b: &ws_cuda::DevBuf<u16>) -> Vec<f32> {
    let mut bits = vec![0u16; b.len()];
    gpu.download(&mut bits, b.ptr(), &gpu.compute).unwrap();
    bits.iter().map(|&h| ws_kernels::bf16::from_bf16(h)).collect()
}

/// GELU in the FC product (forward: GELU and its input kept, both bf16) and
/// its derivative in the product that makes GELU's output gradient
/// (backward: bf16 gradient and the bias gradient), against the CPU.
/// Through cuBLASLt's epilogues where it has them, else our kernels.
#[test]
fn products_with_gelu_match_cpu() {
    let Some(gpu) = gpu_for_tests() else { return };
    let lt = gpu.uses_cublaslt();
    eprintln!("through cuBLASLt: {lt}");
    products_with_gelu_on(&gpu);
    if lt {
        eprintln!("without cuBLASLt");
        products_with_gelu_on(&gpu.without_cublaslt());
    }
}

fn products_with_gelu_on(gpu: &Gpu) {
    let mut rng = Rng::new(11);
    let (m, k, n) = (300, 136, 200);
    let (a, b) = (bf16_round(&random(&mut rng, m * k, 1.0)), bf16_round(&random(&mut rng, k * n, 0.2)));
    let bias = random(&mut rng, n, 0.5);
    // A B in f64, rounded once.
    let product = || -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum();
                out[i * n + j] = dot as f32;
            }
        }
        out
    };
    let to16 = |x: &ws_cuda::DevBuf<f32>| {
        let h = gpu.alloc::<u16>(x.len()).unwrap();
        gpu.to_bf16(&gpu.compute, h.ptr(), x.ptr(), x.len()).unwrap();
        h
    };
    let (da, db, dbias) = (up(gpu, &a), up(gpu, &b), up(gpu, &bias));
    let (a16, b16) = (to16(&da), to16(&db));
    let (out16, pre16) = (gpu.alloc::<u16>(m * n).unwrap(), gpu.alloc::<u16>(m * n).unwrap());
    let scratch = gpu.alloc::<f32>(m * n).unwrap();
    let (ao, bo) = (Operand::n(a16.ptr(), k), Operand::n(b16.ptr(), n));
    let bias16 = gpu.alloc::<u16>(n).unwrap();
    let biases = (dbias.ptr(), bias16.ptr());
    gpu.gemm_bias_gelu(m, n, k, ao, bo, biases, (out16.ptr(), pre16.ptr()), scratch.ptr()).unwrap();
    let pre: Vec<f32> = product().iter().enumerate().map(|(i, x)| x + bias[i % n]).collect();
    let mut gelu = vec![0f32; m * n];
    ws_kernels::gelu::gelu_forward(&mut gelu, &pre);
    assert_scaled_close("product + bias, GELU's input kept", &down16(gpu, &pre16), &pre, 1e-2);
    assert_scaled_close("gelu(product + bias)", &down16(gpu, &out16), &gelu, 1e-2);

    // Backward, as the blocks run it (the output gradient times a weight
    // read transposed): the same A B, with B stored [N, K] and read
    // transposed; GELU's derivative at the input kept in bf16.
    let pre_kept = down16(gpu, &pre16);
    let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
    let dbt = up(gpu, &bt);
    let bt16 = to16(&dbt);
    let mut expected = product();
    ws_kernels::gelu::gelu_backward_inplace(&mut expected, &pre_kept);
    let mut dbias_ref = random(&mut rng, n, 1.0);
    let d_dbias = up(gpu, &dbias_ref);
    ws_kernels::matmul::bias_backward(&mut dbias_ref, &expected, m, n);
    let partial = gpu.alloc::<f32>(kernels::partial_len(m, n)).unwrap();
    let d16 = gpu.alloc::<u16>(m * n).unwrap();
    let bto = Operand::t(bt16.ptr(), k);
    gpu.gemm_dgelu(m, n, k, ao, bto, pre16.ptr(), (d_dbias.ptr(), partial.ptr()), d16.ptr(), scratch.ptr()).unwrap();
    assert_scaled_close("product * gelu'(kept input)", &down16(gpu, &d16), &expected, 1e-2);
    assert_scaled_close("its bias gradient", &down(gpu, &d_dbias), &dbias_ref, 1e-2);
    eprintln!("cuBLASLt without an algorithm for: {:?}", gpu.cublaslt_missing());
}

/// `x` rounded to bf16 and back: inputs both sides see exactly.
fn bf16_round(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| ws_kernels::bf16::from_bf16(ws_kernels::bf16::to_bf16(v))).collect()
}

#[test]
fn fused_attention_matches_cpu() {
    let Some(gpu) = gpu_for_tests() else { return };
    // (batch, sequence, heads, head size): ragged and whole tiles of 64, both head sizes.
    for (b, t, nh, hs) in [(2, 200, 3, 64), (1, 256, 2, 128), (3, 64, 2, 64), (1, 77, 1, 128)] {
        if !gpu.has_fused_attention(hs) {
            eprintln!("CUDA tests skipped: no fused attention for head size {hs} on {}", gpu.name);
            return;
        }
        let c = nh * hs;
        let mut rng = Rng::new(40 + t as u64);
        // Inputs exactly representable in bf16, as the fused kernels read them.
        let qkv = bf16_round(&random(&mut rng, b * t * 3 * c, 1.0));
        let dy = bf16_round(&random(&mut rng, b * t * c, 1.0));
        let mut y = vec![0f32; b * t * c];
        let mut att = vec![0f32; b * nh * t * t];
        ws_kernels::attention::attention_forward(&mut y, &mut att, &qkv, b, t, c, nh);
        let mut dqkv = vec![0f32; b * t * 3 * c];
        ws_kernels::attention::attention_backward(&mut dqkv, &dy, &qkv, &att, b, t, c, nh);

        let (d_qkv, d_dy) = (up(&gpu, &qkv), up(&gpu, &dy));
        let d_y = gpu.zeros::<f32>(b * t * c).unwrap();
        let lse = gpu.zeros::<f32>(b * nh * t).unwrap();
        let dvec = gpu.zeros::<f32>(b * nh * t).unwrap();
        let d_dqkv = gpu.zeros::<f32>(b * t * 3 * c).unwrap();
        let (qkv16, dy16) = (gpu.zeros::<u16>(b * t * 3 * c).unwrap(), gpu.zeros::<u16>(b * t * c).unwrap());
        let s = &gpu.compute;
        let y16 = gpu.zeros::<u16>(b * t * c).unwrap();
        gpu.fused_attention_fwd(s, (d_y.ptr(), y16.ptr()), lse.ptr(), d_qkv.ptr(), qkv16.ptr(), b, t, nh, hs).unwrap();
        let what = format!("fused attention b{b} t{t} nh{nh} hs{hs}");
        let y_gpu = down(&gpu, &d_y);
        assert_scaled_close(&format!("{what} forward"), &y_gpu, &y, 1e-2);
        assert_rounds_to_bf16(&format!("{what} forward's bf16 copy"), &gpu, &y16, &y_gpu);
        let run_bwd = || {
            let scratch = (dvec.ptr(), dy16.ptr());
            gpu.fused_attention_bwd(
                s,
                d_dqkv.ptr(),
                qkv16.ptr(),
                d_y.ptr(),
                d_dy.ptr(),
                lse.ptr(),
                scratch,
                b,
                t,
                nh,
                hs,
            )
            .unwrap();
            down(&gpu, &d_dqkv)
        };
        let got = run_bwd();
        let dy_gpu = down(&gpu, &d_dy);
        assert_rounds_to_bf16(&format!("{what} dy's bf16 copy"), &gpu, &dy16, &dy_gpu);
        for (part, name) in ["dq", "dk", "dv"].iter().enumerate() {
            let pick = |x: &[f32]| -> Vec<f32> {
                x.chunks(3 * c).flat_map(|row| row[part * c..(part + 1) * c].to_vec()).collect()
            };
            assert_scaled_close(&format!("{what} {name}"), &pick(&got), &pick(&dqkv), 1e-2);
        }
        let again = run_bwd();
        assert!(got.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: backward not deterministic");
    }
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("fixture lacks {name}: {e}"));
    t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn ids(st: &SafeTensors, name: &str) -> Vec<u32> {
    let t = st.tensor(name).unwrap();
    t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect()
}

/// The foundation's PyTorch fixture, on the GPU: loss 1e-5, gradients 1e-4
/// relative to each tensor's scale (the CPU test's tolerances).
#[test]
fn pytorch_parity_fixture_on_gpu() {
    let Some(gpu) = gpu_for_tests() else { return };
    let bytes = std::fs::read(format!("{FIXTURES}/gpt2_parity.safetensors")).expect("committed fixture");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{FIXTURES}/gpt2_parity.json")).unwrap()).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let get = |k: &str| meta[k].as_u64().unwrap() as usize;
    let config = Gpt2Config {
        n_layer: get("n_layer"),
        n_head: get("n_head"),
        n_embd: get("n_embd"),
        block_size: get("block_size"),
        vocab_size: get("vocab_size"),
    };
    let (b, t) = (get("batch"), get("seq"));
    let spec = ModelSpec::new(config);
    let mut params = Params::zeros(&spec);
    for (ts, data) in spec.tensors.iter().zip(params.tensors.iter_mut()) {
        *data = f32s(&st, &ts.name);
    }
    let (tokens, targets) = (ids(&st, "input_ids"), ids(&st, "targets"));
    let dparams = DeviceParams::from_host(&gpu, &spec, &params).unwrap();
    let dgrads = DeviceParams::zeros(&gpu, &spec).unwrap();
    let mut ws = GpuWorkspace::new(&gpu, &spec, b, t, Precision::Fp32).unwrap();
    ws.set_batch(&gpu, &tokens, &targets, b, t).unwrap();
    let n = spec.layer_count();
    for l in 0..n - 1 {
        ws.forward(&gpu, &spec, l, &dparams.layer(&spec, l)).unwrap();
    }
    ws.head(&gpu, &spec, &dparams.layer(&spec, n - 1), Some(&dgrads.layer(&spec, n - 1)), 1.0 / (b * t) as f32)
        .unwrap();
    for l in (0..n - 1).rev() {
        ws.backward(&gpu, &spec, l, &dparams.layer(&spec, l), &dgrads.layer(&spec, l)).unwrap();
    }
    let loss = (ws.take_loss_sum(&gpu).unwrap() / (b * t) as f64) as f32;
    let loss_ref = f32s(&st, "loss")[0];
    assert!((loss - loss_ref).abs() <= 1e-5 * loss_ref.abs(), "loss {loss} vs PyTorch {loss_ref}");
    let grads = dgrads.to_host(&gpu, &spec).unwrap();
    for (ts, g) in spec.tensors.iter().zip(&grads.tensors) {
        assert_scaled_close(&format!("grad.{}", ts.name), g, &f32s(&st, &format!("grad.{}", ts.name)), 1e-4);
    }
}
