//! Selectable sparsity end to end: sparse training against dense training
//! on masked weights (an independent reference: the dense kernels, with the
//! gradient zeroed off the mask), masked weights that stay exactly zero
//! through training, streaming, resume and export, dynamic sparsity that
//! keeps every tensor's count, and the store, the fabric and the resident
//! trainer agreeing.

mod common;

use ws_data::sample_batch;
use ws_model::{Gpt2Config, Masks, Params};
use ws_train::stream::{choose_micro_batch, create_store, store_config, StreamingTrainer};
use ws_train::trainer::TRAIN_STREAM;
use ws_train::{Engine, RunConfig, Trainer};

fn config(attention: f64, mlp: f64) -> RunConfig {
    let mut c = RunConfig::preset("tiny").unwrap();
    c.model = Gpt2Config { n_layer: 3, n_head: 2, n_embd: 32, block_size: 16, vocab_size: 64 };
    c.train.batch_size = 4;
    c.train.micro_batch = 2;
    c.train.steps = 8;
    c.train.warmup_steps = 2;
    c.train.lr = 3e-3;
    c.store.page_bytes = 4096;
    c.sparsity.attention = attention;
    c.sparsity.mlp = mlp;
    c.validate().unwrap();
    c
}

fn tokens() -> Vec<u16> {
    let mut rng = ws_kernels::Rng::new(99);
    (0..4000).map(|_| rng.below(64) as u16).collect()
}

fn tmp(name: &str) -> std::path::PathBuf {
    ws_store::scratch::dir(&format!("sparse-{name}"))
}

fn streaming(c: &RunConfig, name: &str) -> StreamingTrainer {
    let spec = c.model_spec().unwrap();
    let mb = choose_micro_batch(c, &spec).unwrap();
    let store = create_store(c, &spec, &tmp(name), c.train.batch_size / mb).unwrap();
    StreamingTrainer::start(c.clone(), store).unwrap()
}

/// Every masked element of `dense` is exactly zero.
fn assert_zero_off_mask(what: &str, masks: &Masks, dense: &Params) {
    for (t, p) in masks.patterns.iter().enumerate() {
        let Some(p) = p else { continue };
        let on = p.mask();
        let stray = dense.tensors[t].iter().zip(&on).filter(|(x, &m)| !m && **x != 0.0).count();
        assert_eq!(stray, 0, "{what}: tensor {t} has {stray} nonzeros off its mask");
    }
}

/// Each sparse tensor has exactly the nonzeros its level asks for after `steps`.
fn assert_counts(what: &str, c: &RunConfig, masks: &Masks, steps: u64) {
    let spec = c.model_spec_at(steps).unwrap();
    masks.check(&spec).unwrap_or_else(|e| panic!("{what}: {e}"));
    for (ts, p) in spec.tensors.iter().zip(&masks.patterns) {
        if let (Some(nnz), Some(p)) = (ts.nnz, p) {
            assert_eq!(p.mask().iter().filter(|&&m| m).count(), nnz, "{what}: {}", ts.name);
        }
    }
}

/// Sparse training (both kernel paths: the sparse kernels, and the dense
/// GEMM on the expanded matrix) against a dense trainer started from the
/// masked weights whose gradients are zeroed off the mask before clipping
/// and AdamW: the same losses and weights within fp32 tolerance, at
/// moderate and extreme sparsity (at 99% many rows and columns are empty).
#[test]
fn sparse_training_equals_dense_training_on_masked_weights() {
    let data = tokens();
    let steps = 4;
    for (attention, mlp) in [(0.5, 0.75), (0.9, 0.99)] {
        for kernel_density_max in [1.0, 0.0] {
            let what = format!("sparsity {attention}/{mlp}, kernels up to density {kernel_density_max}");
            let mut c = config(attention, mlp);
            c.sparsity.kernel_density_max = kernel_density_max;
            let mut sparse = Trainer::new(c.clone()).unwrap();
            let masks = sparse.masks.clone();
            let init = masks.unpack(&sparse.params);
            assert_zero_off_mask(&what, &masks, &init);

            let dense_config = config(0.0, 0.0);
            let spec = dense_config.model_spec().unwrap();
            let mut dense = Trainer::with_params(dense_config.clone(), spec.clone(), init.clone());
            let (b, t) = (c.train.batch_size, c.seq_len());
            let (mut x, mut y) = (Vec::new(), Vec::new());
            for step in 0..steps {
                sample_batch(&data, b, t, c.train.seed, TRAIN_STREAM, step, &mut x, &mut y);
                let got = sparse.step_on(&x, &y);
                dense.grads.fill(0.0);
                let loss = dense.accumulate_gradients(&x, &y);
                for (t, p) in masks.patterns.iter().enumerate() {
                    if let Some(p) = p {
                        for (g, on) in dense.grads.tensors[t].iter_mut().zip(p.mask()) {
                            *g = if on { *g } else { 0.0 };
                        }
                    }
                }
                let lr = ws_train::optim::learning_rate(&c.train, step);
                let norm = dense.optimizer.step(&spec, &mut dense.params, &dense.grads, &c.train, lr, step + 1);
                assert!((got.loss - loss).abs() <= 1e-5 * loss, "{what}: step {step} loss {} vs {loss}", got.loss);
                assert!(
                    (got.grad_norm - norm).abs() <= 1e-4 * norm,
                    "{what}: step {step} norm {} vs {norm}",
                    got.grad_norm
                );
            }
            let after = masks.unpack(&sparse.params);
            assert_zero_off_mask(&what, &masks, &after);
            assert_zero_off_mask(&format!("{what} (dense reference)"), &masks, &dense.params);
            common::assert_updates_close(&what, &init, &after, &dense.params, &c, steps as usize, 1e-4);
        }
    }
}

/// The store and the streaming worker carry only nonzeros and give the
/// resident run's weights bit for bit, with static, SET and RigL sparsity,
/// through the flash tier.
#[test]
fn streaming_sparse_equals_resident_bit_for_bit_with_static_and_dynamic_masks() {
    let data = tokens();
    for dynamic in ["off", "set", "rigl"] {
        let mut c = config(0.75, 0.9);
        c.sparsity.dynamic = dynamic.into();
        c.sparsity.update_every = 2;
        c.sparsity.prune_fraction = 0.3;
        c.stream.prefetch_depth = 1;
        c.store.dram_fraction = 0.5;
        let mut resident = Trainer::new(c.clone()).unwrap();
        let mut streamed = streaming(&c, &format!("eq-{dynamic}"));
        let first = resident.masks.clone();
        for i in 0..5 {
            let want = Trainer::train_step(&mut resident, &data);
            let got = streamed.train_step(&data).unwrap();
            assert_eq!((got.loss, got.grad_norm), (want.loss, want.grad_norm), "{dynamic}: step {i}");
            assert_counts(&format!("{dynamic} step {i}"), &c, &resident.masks, i + 1);
        }
        let masks = streamed.masks().unwrap();
        assert_eq!(masks, resident.masks, "{dynamic}: masks");
        assert_eq!(masks.version, if dynamic == "off" { 0 } else { 2 }, "{dynamic}: two updates in five steps");
        if dynamic != "off" {
            assert_ne!(masks.patterns, first.patterns, "{dynamic}: the updates moved nonzeros");
        }
        assert_eq!(Trainer::evaluate(&mut resident, &data, 2), streamed.evaluate(&data, 2).unwrap(), "{dynamic}: eval");
        let store = streamed.into_store();
        let stored = store.stats();
        let spec = c.model_spec().unwrap();
        let mut store = store;
        let (w, m, v) = store.snapshot().unwrap();
        assert!(w == resident.params, "{dynamic}: weights differ");
        assert!(m == resident.optimizer.m && v == resident.optimizer.v, "{dynamic}: moments differ");
        // The store holds the nonzeros only: 16 bytes per stored value.
        assert!(spec.stored_count() < spec.parameter_count() * 6 / 10);
        let budget = (16.0 * spec.stored_count() as f64 * 0.5).ceil() as u64;
        assert!(stored.dram_bytes_peak <= budget, "{dynamic}: DRAM peak {} over {budget}", stored.dram_bytes_peak);
        assert_zero_off_mask(dynamic, &masks, &masks.unpack(&w));
    }
}

/// Train 2N steps straight, or N, checkpoint, resume, N more: the same
/// weights and masks bit for bit (dynamic masks travel in the checkpoint);
/// the Hugging Face export is dense with zeros off the mask.
#[test]
fn dynamic_masks_survive_resume_and_export_dense() {
    let data = tokens();
    let mut c = config(0.75, 0.9);
    c.sparsity.dynamic = "rigl".into();
    c.sparsity.update_every = 2;
    let mut straight = streaming(&c, "straight");
    for _ in 0..6 {
        straight.train_step(&data).unwrap();
    }
    let want_masks = straight.masks().unwrap();
    let want = straight.into_store().snapshot().unwrap();

    let run = tmp("resume-run");
    let mut first = streaming(&c, "first");
    for _ in 0..3 {
        first.train_step(&data).unwrap();
    }
    let ckpt = first.checkpoint(&run).unwrap();
    drop(first);
    let spec = c.model_spec().unwrap();
    let sc = store_config(&c, &spec, 2);
    let (store, manifest) = ws_store::Store::restore(&spec, &ckpt, &tmp("resumed"), sc).unwrap();
    assert_eq!(manifest.step, 3);
    assert!(manifest.masks.is_some());
    let mut second = StreamingTrainer::start(c.clone(), store).unwrap();
    for _ in 0..3 {
        second.train_step(&data).unwrap();
    }
    assert_eq!(second.masks().unwrap(), want_masks);
    let ckpt = second.checkpoint(&run).unwrap();
    let got = second.into_store().snapshot().unwrap();
    assert!(got == want, "a resumed sparse run differs from the straight one");

    // Export: dense tensors, zeros off the mask, the nonzeros as stored.
    let out = tmp("export");
    ws_train::checkpoint::export_store_checkpoint(&spec, &ckpt, &out).unwrap();
    let (dense_spec, dense) = ws_train::checkpoint::load(&out).unwrap();
    assert!(!dense_spec.is_sparse());
    assert!(dense == want_masks.unpack(&want.0), "the export is the stored weights, expanded");
    assert_zero_off_mask("export", &want_masks, &dense);
    let saved = std::fs::read(out.join(ws_model::sparsity::MASKS_FILE)).unwrap();
    assert_eq!(Masks::from_safetensors(&spec, &saved).unwrap(), want_masks);

    // A flipped byte in the checkpoint's masks is caught.
    let masks_file = ckpt.join(manifest_masks_file(&ckpt));
    let mut bytes = std::fs::read(&masks_file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&masks_file, bytes).unwrap();
    let e = ws_store::Store::restore(&spec, &ckpt, &tmp("corrupt"), sc).err().expect("corrupt masks refused");
    assert!(e.to_string().contains("corrupt"), "{e}");
}

fn manifest_masks_file(ckpt: &std::path::Path) -> String {
    ws_store::read_manifest(ckpt).unwrap().masks.unwrap().file
}

/// The resident trainer's own checkpoint: dense weights with zeros off the
/// mask, and the masks beside them.
#[test]
fn resident_checkpoints_are_dense_with_their_masks() {
    let data = tokens();
    let c = config(0.5, 0.9);
    let mut t = Trainer::new(c.clone()).unwrap();
    for _ in 0..2 {
        Trainer::train_step(&mut t, &data);
    }
    let dir = tmp("resident-ckpt");
    t.save_checkpoint(&dir).unwrap();
    let (_, dense) = ws_train::checkpoint::load(&dir).unwrap();
    assert!(dense == t.masks.unpack(&t.params));
    let saved = std::fs::read(dir.join(ws_model::sparsity::MASKS_FILE)).unwrap();
    assert_eq!(Masks::from_safetensors(&c.model_spec().unwrap(), &saved).unwrap(), t.masks);
}

/// Sparse weights through the broadcast-reduce tree: masks go down once per
/// tree and after each change, only nonzeros go down and up, and RigL's
/// dense gradients are summed up the tree on update steps only; on a
/// sparsity ramp the workers follow each new layout. Channels and
/// TCP agree bit for bit; against the resident run (static masks) only the
/// order of the sum differs.
#[test]
fn sparse_fabric_runs_agree_across_transports_and_with_resident() {
    use ws_train::fabric::FabricTrainer;
    let data = tokens();
    let run = |dynamic: &str, ramp: u64, transport: &str| {
        let mut c = config(0.75, 0.9);
        c.train.batch_size = 4;
        c.train.micro_batch = 1;
        c.fabric.workers = 2;
        c.fabric.fanout = 2;
        c.fabric.transport = transport.into();
        c.fabric.top_in_store = transport == "tcp";
        c.fabric.chunk_bytes = 4096;
        c.sparsity.dynamic = dynamic.into();
        c.sparsity.update_every = 2;
        c.sparsity.ramp_steps = ramp;
        c.sparsity.ramp_every = 2;
        c.validate().unwrap();
        let spec = c.model_spec().unwrap();
        let store = create_store(&c, &spec, &tmp(&format!("fab-{dynamic}-{transport}")), 2).unwrap();
        let mut t = FabricTrainer::start(c.clone(), store, 1).unwrap();
        let losses: Vec<f64> = (0..5).map(|_| t.train_step(&data).unwrap().loss).collect();
        let val = t.evaluate(&data, 2).unwrap();
        (losses, val, t.params().unwrap(), t.masks().unwrap(), c)
    };
    // RigL on a ramp: stages and updates after steps 2 and 4.
    for (dynamic, ramp) in [("off", 0), ("rigl", 4)] {
        let a = run(dynamic, ramp, "inproc");
        let b = run(dynamic, ramp, "tcp");
        assert_eq!((&a.0, a.1), (&b.0, b.1), "{dynamic}: losses");
        assert!(a.2 == b.2, "{dynamic}: weights differ between channels and TCP");
        assert_eq!(a.3, b.3, "{dynamic}: masks");
        assert_counts(dynamic, &a.4, &a.3, 5);
        assert_eq!(a.3.version, if dynamic == "off" { 0 } else { 4 });
        assert_zero_off_mask(dynamic, &a.3, &a.3.unpack(&a.2));
    }
    let (losses, _, params, masks, c) = run("off", 0, "inproc");
    let mut rc = c.clone();
    rc.fabric.workers = 1;
    rc.fabric.transport = "inproc".into();
    rc.fabric.top_in_store = false;
    let mut r = Trainer::new(rc.clone()).unwrap();
    let init = masks.unpack(&r.params);
    for (i, want) in losses.iter().enumerate() {
        let got = Trainer::train_step(&mut r, &data).loss;
        assert!((got - want).abs() <= 1e-6 * want, "step {i}: resident {got} vs fabric {want}");
    }
    assert_eq!(r.masks, masks);
    common::assert_updates_close(
        "fabric vs resident",
        &init,
        &masks.unpack(&params),
        &masks.unpack(&r.params),
        &rc,
        5,
        1e-4,
    );
}

/// Magnitude pruning of a dense checkpoint (`train.init_from`): the sparse
/// run keeps each tensor's largest values of that checkpoint, the same in
/// the resident trainer and the store; a checkpoint of another shape is a
/// one-line error.
#[test]
fn init_from_a_dense_checkpoint_keeps_its_largest_values() {
    let data = tokens();
    let mut dense = Trainer::new(config(0.0, 0.0)).unwrap();
    for _ in 0..2 {
        Trainer::train_step(&mut dense, &data);
    }
    let dir = tmp("dense-ckpt");
    dense.save_checkpoint(&dir).unwrap();
    let mut c = config(0.5, 0.9);
    c.train.init_from = dir.display().to_string();
    let sparse = Trainer::new(c.clone()).unwrap();
    let spec = c.model_spec().unwrap();
    assert_eq!(sparse.masks, Masks::from_dense(&spec, &dense.params));
    assert!(sparse.params == sparse.masks.pack(&dense.params));
    for (t, p) in sparse.masks.patterns.iter().enumerate() {
        let Some(p) = p else { continue };
        let mask = p.mask();
        let magnitudes = || dense.params.tensors[t].iter().map(|x| x.abs()).zip(&mask);
        let least = magnitudes().filter(|(_, &m)| m).map(|(x, _)| x).fold(f32::INFINITY, f32::min);
        assert!(magnitudes().all(|(x, &m)| m || x <= least), "tensor {t} dropped a larger value than it kept");
    }
    let mut streamed = streaming(&c, "init-from");
    let mut resident = sparse;
    for i in 0..2 {
        let want = Trainer::train_step(&mut resident, &data);
        let got = streamed.train_step(&data).unwrap();
        assert_eq!(got.loss, want.loss, "step {i}");
    }
    assert!(streamed.params().unwrap() == resident.params);

    let mut wrong = config(0.5, 0.9);
    wrong.model.n_layer = 2;
    wrong.train.init_from = dir.display().to_string();
    let e = Trainer::new(wrong).err().expect("a checkpoint of another model is refused").to_string();
    assert!(e.contains("set the model to match") && !e.contains('\n'), "{e}");
}

/// Gradual sparsity: dense at step 0, pruned by magnitude in stages along
/// the cubic ramp to the target. The store lays itself out again at each
/// stage and the streaming worker follows: the resident run's weights bit
/// for bit, each tensor's count exactly the schedule's after every step, and
/// a resume from the middle of the ramp continues bit for bit.
#[test]
fn sparsity_ramps_up_in_stages_and_streaming_follows_bit_for_bit() {
    let data = tokens();
    let mut c = config(0.75, 0.9);
    c.sparsity.ramp_steps = 6;
    c.sparsity.ramp_every = 2;
    c.stream.prefetch_depth = 1;
    c.store.dram_fraction = 0.5;
    let at = |s: u64| c.model_spec_at(s).unwrap();
    // Level after 0, 2, 4, 6 steps: 0, 1 - (2/3)^3, 1 - (1/3)^3, 1 (of the target).
    let fc = at(0).tensor_index("transformer.h.0.mlp.c_fc.weight").unwrap();
    let numel = at(0).tensors[fc].numel();
    let target_zeros = numel - c.model_spec_at(100).unwrap().tensors[fc].nnz.unwrap();
    assert_eq!(target_zeros, (0.9 * numel as f64).round() as usize);
    for (s, fraction) in [(0, 0.0), (1, 0.0), (2, 1.0 - 8.0 / 27.0), (5, 1.0 - 1.0 / 27.0), (6, 1.0), (9, 1.0)] {
        let want = numel - (fraction * target_zeros as f64).round() as usize;
        assert_eq!(at(s).tensors[fc].nnz, Some(want), "after {s} steps");
    }
    let mut resident = Trainer::new(c.clone()).unwrap();
    let mut streamed = streaming(&c, "ramp");
    for i in 0..8 {
        let want = Trainer::train_step(&mut resident, &data);
        let got = streamed.train_step(&data).unwrap();
        assert_eq!((got.loss, got.grad_norm), (want.loss, want.grad_norm), "step {i}");
        let spec = at(i + 1);
        resident.masks.check(&spec).unwrap_or_else(|e| panic!("after step {}: {e}", i + 1));
        assert_eq!(Engine::spec(&streamed), &spec);
    }
    assert_eq!(streamed.masks().unwrap(), resident.masks);
    assert_eq!(resident.masks.version, 3, "three stages: after steps 2, 4 and 6");
    let first = streamed.params().unwrap();
    assert!(first == resident.params, "weights differ after the ramp");
    assert_zero_off_mask("ramp", &resident.masks, &resident.masks.unpack(&resident.params));

    // Resume from step 3, between two stages.
    let run = tmp("ramp-run");
    let mut a = streaming(&c, "ramp-a");
    for _ in 0..3 {
        a.train_step(&data).unwrap();
    }
    let ckpt = a.checkpoint(&run).unwrap();
    drop(a);
    let spec = at(3);
    let (store, _) = ws_store::Store::restore(&spec, &ckpt, &tmp("ramp-b"), store_config(&c, &spec, 2)).unwrap();
    let mut b = StreamingTrainer::start(c.clone(), store).unwrap();
    for _ in 0..5 {
        b.train_step(&data).unwrap();
    }
    assert!(b.params().unwrap() == first, "a resume in the middle of the ramp differs");
    assert_eq!(b.masks().unwrap().patterns, resident.masks.patterns);
}
