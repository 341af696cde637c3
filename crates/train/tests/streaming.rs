//! Weight streaming against the resident baseline (DESIGN.md's central
//! invariant): with fp32 streaming, N steps through the store give the
//! resident run's weights and AdamW moments bit for bit, whatever the
//! prefetch depth and the store's DRAM budget (flash tier active below
//! 100%); a resume from a store checkpoint continues bit for bit.

use ws_model::{Gpt2Config, ModelSpec};
use ws_train::stream::{choose_micro_batch, create_store, StreamingTrainer};
use ws_train::{Engine, RunConfig, Trainer};

fn config(prefetch_depth: usize, dram_fraction: f64) -> RunConfig {
    let mut c = RunConfig::preset("tiny").unwrap();
    // 12 small blocks and a small vocabulary.
    c.model = Gpt2Config { n_layer: 12, n_head: 2, n_embd: 32, block_size: 16, vocab_size: 64 };
    c.train.batch_size = 4;
    c.train.micro_batch = 2;
    c.train.steps = 6;
    c.train.warmup_steps = 2;
    c.train.lr = 3e-3;
    c.stream.prefetch_depth = prefetch_depth;
    c.store.dram_fraction = dram_fraction;
    // 4 KiB pages (256 parameters): tensors span several, and a 10% budget holds a few.
    c.store.page_bytes = 4096;
    c.validate().unwrap();
    c
}

fn tokens() -> Vec<u16> {
    let mut rng = ws_kernels::Rng::new(99);
    (0..4000).map(|_| rng.below(64) as u16).collect()
}

fn tmp(name: &str) -> std::path::PathBuf {
    ws_store::scratch::dir(&format!("stream-{name}"))
}

fn streaming(c: &RunConfig, name: &str) -> StreamingTrainer {
    let spec = ModelSpec::new(c.model);
    let mb = choose_micro_batch(c, &spec).unwrap();
    let store = create_store(c, &spec, &tmp(name), c.train.batch_size / mb).unwrap();
    StreamingTrainer::start(c.clone(), store).unwrap()
}

#[test]
fn fp32_streaming_equals_resident_bit_for_bit_at_every_depth_and_budget() {
    let data = tokens();
    let steps = 3;
    let mut resident = Trainer::new(config(2, 1.0)).unwrap();
    let mut want = Vec::new();
    for _ in 0..steps {
        let s = Trainer::train_step(&mut resident, &data);
        want.push((s.loss, s.grad_norm));
    }
    let val = Trainer::evaluate(&mut resident, &data, 2);
    for k in [0, 1, 2, 4] {
        for fraction in [1.0, 0.5, 0.1] {
            let c = config(k, fraction);
            let mut t = streaming(&c, &format!("eq-{k}-{fraction}"));
            for (i, w) in want.iter().enumerate() {
                let s = t.train_step(&data).unwrap();
                assert_eq!((s.loss, s.grad_norm), *w, "step {i}, depth {k}, DRAM {fraction}");
            }
            assert_eq!(t.evaluate(&data, 2).unwrap(), val, "validation loss, depth {k}, DRAM {fraction}");
            let mut store = t.into_store();
            let (w, m, v) = store.snapshot().unwrap();
            assert!(w == resident.params, "weights differ: depth {k}, DRAM {fraction}");
            assert!(
                m == resident.optimizer.m && v == resident.optimizer.v,
                "moments differ: depth {k}, DRAM {fraction}"
            );
            let stats = store.stats();
            let budget = (16.0 * store.spec().parameter_count() as f64 * fraction).ceil() as u64;
            assert!(stats.dram_bytes_peak <= budget, "DRAM peak {} over budget {budget}", stats.dram_bytes_peak);
            // A cold start reads each byte from flash at most once; a partial budget re-reads.
            let total = 16 * store.spec().parameter_count() as u64;
            let read = stats.flash_read_bytes;
            assert_eq!(read > total, fraction < 1.0, "read {read} bytes of a {total}-byte store at DRAM {fraction}");
        }
    }
}

#[test]
fn bf16_streaming_tracks_resident_within_tolerance() {
    let data = tokens();
    let mut resident = Trainer::new(config(2, 1.0)).unwrap();
    let mut c = config(2, 0.5);
    c.stream.dtype = "bf16".into();
    let mut t = streaming(&c, "bf16");
    for i in 0..3 {
        let want = Trainer::train_step(&mut resident, &data).loss;
        let got = t.train_step(&data).unwrap().loss;
        // Weights rounded to 8 significant bits on the wire.
        assert!((got - want).abs() <= 1e-2 * want, "step {i}: bf16-streamed loss {got} vs resident {want}");
    }
}

#[test]
fn resume_from_a_store_checkpoint_continues_bit_for_bit() {
    let data = tokens();
    let c = config(1, 0.5);
    let mut straight = streaming(&c, "straight");
    for _ in 0..6 {
        straight.train_step(&data).unwrap();
    }
    let want = straight.into_store().snapshot().unwrap();

    let run = tmp("resume-run");
    let mut first = streaming(&c, "first");
    for _ in 0..3 {
        first.train_step(&data).unwrap();
    }
    let ckpt = first.checkpoint(&run).unwrap();
    drop(first);
    let spec = ModelSpec::new(c.model);
    let sc = ws_train::stream::store_config(&c, &spec, 2);
    let (store, manifest) = ws_store::Store::restore(&spec, &ckpt, &tmp("resumed"), sc).unwrap();
    assert_eq!(manifest.step, 3);
    let mut second = StreamingTrainer::start(c, store).unwrap();
    assert_eq!(second.step(), 3);
    for _ in 0..3 {
        second.train_step(&data).unwrap();
    }
    assert!(second.into_store().snapshot().unwrap() == want, "resumed run differs from the straight one");
}

#[test]
fn the_worker_memory_budget_splits_the_batch_or_refuses() {
    let mut c = config(2, 1.0);
    c.train.micro_batch = 0;
    let spec = ModelSpec::new(c.model);
    let one = ws_train::stream::worker_bytes(&spec, 1, 16, 2, ws_kernels::Precision::Fp32);
    let four = ws_train::stream::worker_bytes(&spec, 4, 16, 2, ws_kernels::Precision::Fp32);
    c.worker.memory_bytes = 0;
    assert_eq!(choose_micro_batch(&c, &spec).unwrap(), 4, "no limit: the whole batch");
    c.worker.memory_bytes = four - 1;
    assert_eq!(choose_micro_batch(&c, &spec).unwrap(), 2, "just under the whole batch: halves");
    c.worker.memory_bytes = one;
    assert_eq!(choose_micro_batch(&c, &spec).unwrap(), 1);
    c.worker.memory_bytes = one - 1;
    let e = choose_micro_batch(&c, &spec).unwrap_err().to_string();
    assert!(e.contains(&format!("needs {one} bytes")), "{e}");
}

/// The Hugging Face export of a store checkpoint, written page by page from
/// the slab files: the same tensors as the store's snapshot, bit for bit,
/// loadable by our loader (and so by transformers, which reads the same
/// format); a corrupt slab leaves no export behind.
#[test]
fn export_of_a_store_checkpoint_streams_every_weight_exactly() {
    let data = tokens();
    let c = config(2, 0.25);
    let spec = ModelSpec::new(c.model);
    let mut t = streaming(&c, "export-train");
    for _ in 0..2 {
        t.train_step(&data).unwrap();
    }
    let run = tmp("export-run");
    let ckpt = t.checkpoint(&run).unwrap();
    let (want, _, _) = t.into_store().snapshot().unwrap();
    let out = run.join("hf");
    assert_eq!(ws_train::checkpoint::export_store_checkpoint(&spec, &ckpt, &out).unwrap(), 2);
    let (got_spec, got) = ws_train::checkpoint::load(&out).unwrap();
    assert_eq!(got_spec.config, spec.config);
    for (i, ts) in spec.tensors.iter().enumerate() {
        let same = got.tensors[i].iter().zip(&want.tensors[i]).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same && got.tensors[i].len() == want.tensors[i].len(), "{} differs", ts.name);
    }
    let e = ws_train::checkpoint::export_store_checkpoint(&spec, &ckpt, &out).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");

    // One flipped byte in the last slab: detected, and nothing is left behind.
    let manifest = ws_store::read_manifest(&ckpt).unwrap();
    let slab = ckpt.join(&manifest.slabs.last().unwrap().file);
    let mut bytes = std::fs::read(&slab).unwrap();
    bytes[7] ^= 0x10;
    std::fs::write(&slab, bytes).unwrap();
    let bad = run.join("hf-bad");
    let e = ws_train::checkpoint::export_store_checkpoint(&spec, &ckpt, &bad).unwrap_err().to_string();
    assert!(e.contains("corrupt") && !e.contains('\n'), "{e}");
    assert!(!bad.exists());
    let leftovers: Vec<_> = std::fs::read_dir(&run).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(leftovers.iter().all(|n| !n.to_string_lossy().contains(".tmp-")), "{leftovers:?}");
}
