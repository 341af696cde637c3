//! The resident trainer: every weight, gradient and AdamW moment held in this
//! process. It is the baseline the streaming executor ([`crate::stream`])
//! must equal bit for bit; and the run loop of `weightstream train` over
//! either [`Engine`].
//!
//! One step: sample the global batch (a pure function of seed and step, so a
//! resumed run sees the same data), split it into micro-batches, and for
//! each run forward over layers 0..L-1, the head, and backward over
//! L-2..0; then clip and update. A layer's gradient for one micro-batch is
//! computed into a zeroed buffer and added to the accumulator, exactly as
//! the store adds what a worker sends (a tensor's first contribution is
//! computed in place, which is the same thing: the accumulator is zero).

use crate::checkpoint::{self, TrainState};
use crate::config::RunConfig;
use crate::metrics::{MetricsWriter, Record};
use crate::optim::{learning_rate, AdamW};
use crate::sparsity::Dynamic;
use crate::stream::{self, StreamingTrainer};
use crate::{plot, TrainError};
use std::path::{Path, PathBuf};
use std::time::Instant;
use ws_data::{sample_batch, Split};
use ws_kernels::Precision;
use ws_model::sparsity::{remap, shrink};
use ws_model::{Masks, ModelSpec, Params, Workspace};

/// [`ws_kernels::Rng::for_stream`] stream ids of the data sampler.
pub const TRAIN_STREAM: u64 = 2;
pub const VAL_STREAM: u64 = 3;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// The step just completed, counting from 1.
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub seconds: f64,
}

/// What the run loop drives: the resident trainer or the streaming one.
pub trait Engine {
    /// Steps completed.
    fn step(&self) -> u64;
    fn spec(&self) -> &ModelSpec;
    fn config(&self) -> &RunConfig;
    fn train_step(&mut self, train: &[u16]) -> Result<StepStats, TrainError>;
    fn evaluate(&mut self, tokens: &[u16], batches: usize) -> Result<f64, TrainError>;
    /// Writes a resumable checkpoint under `run_dir`; returns its directory.
    fn checkpoint(&mut self, run_dir: &Path) -> Result<PathBuf, TrainError>;
    /// The current weights, every tensor: the stored values (a sparse
    /// tensor's nonzeros, in its pattern's order; [`Masks::unpack`] makes it dense).
    fn params(&mut self) -> Result<Params, TrainError>;
    /// The sparse tensors' patterns.
    fn masks(&mut self) -> Result<Masks, TrainError>;
    /// A streaming engine's waits for weights since last asked.
    fn take_weight_waits(&mut self) -> Option<crate::stream::WeightWaits> {
        None
    }
    /// A GPU streaming engine's plan: whether its worker keeps the step's
    /// weights and sums the micro-batches' gradients on the GPU.
    #[cfg(feature = "cuda")]
    fn worker_plan(&self) -> Option<crate::gpu::WorkerPlan> {
        None
    }
}

pub struct Trainer {
    pub config: RunConfig,
    pub spec: ModelSpec,
    pub params: Params,
    pub grads: Params,
    pub optimizer: AdamW,
    /// Where the sparse tensors' nonzeros are (`params` holds those values only).
    pub masks: Masks,
    dynamic: Option<Dynamic>,
    workspace: Workspace,
    /// Steps completed.
    pub step: u64,
    inputs: Vec<u32>,
    targets: Vec<u32>,
}

impl Trainer {
    /// A fresh model initialised from the config's seed.
    pub fn new(config: RunConfig) -> Result<Trainer, TrainError> {
        config.validate()?;
        let spec = config.model_spec()?;
        let (params, masks) = initial_weights(&config, &spec)?;
        Ok(Trainer::with_state(config, spec, params, masks))
    }

    /// A trainer over `params` (stored values: the nonzeros of sparse
    /// tensors, whose patterns are those of the initialisation).
    pub fn with_params(config: RunConfig, spec: ModelSpec, params: Params) -> Trainer {
        let masks = if spec.is_sparse() { Masks::init(&spec, config.train.seed) } else { Masks::dense(&spec) };
        Trainer::with_state(config, spec, params, masks)
    }

    /// A trainer over `params`, the stored values of `masks`' patterns.
    pub fn with_state(config: RunConfig, spec: ModelSpec, params: Params, masks: Masks) -> Trainer {
        let mut workspace = Workspace::new(&spec, config.micro_batch(), config.seq_len());
        workspace.set_precision(Precision::parse(&config.train.precision).expect("validated precision"));
        workspace.set_masks(&masks, config.sparsity.kernel_density_max);
        Trainer {
            dynamic: Dynamic::new(&config, &spec),
            masks,
            grads: Params::zeros(&spec),
            optimizer: AdamW::new(&spec),
            workspace,
            step: 0,
            inputs: Vec::new(),
            targets: Vec::new(),
            config,
            spec,
            params,
        }
    }

    /// Forward and backward of one batch (B*T inputs and targets),
    /// accumulating gradients; returns the mean loss.
    pub fn accumulate_gradients(&mut self, inputs: &[u32], targets: &[u32]) -> f64 {
        let (t, mb) = (self.config.seq_len(), self.config.micro_batch());
        let b = inputs.len() / t;
        assert_eq!(b % mb, 0);
        let (spec, ws, params, grads) = (&self.spec, &mut self.workspace, &self.params, &mut self.grads);
        let layers = spec.layer_count();
        let dloss_scale = 1.0 / (b * t) as f32;
        let mut touched = vec![false; spec.tensors.len()];
        let mut scratch: Vec<Vec<f32>> = vec![Vec::new(); spec.tensors.len()];
        let mut loss_sum = 0f64;
        // Gradient slices for layer `l`: the accumulator where it is still
        // untouched this step, else a zeroed scratch buffer added afterwards.
        fn with_grads(
            spec: &ModelSpec,
            l: usize,
            grads: &mut Params,
            touched: &mut [bool],
            scratch: &mut [Vec<f32>],
            f: impl FnOnce(&mut [&mut [f32]]),
        ) {
            let ids = &spec.layers[l].tensors;
            for &i in ids {
                if touched[i] {
                    scratch[i].clear();
                    scratch[i].resize(spec.tensors[i].len(), 0.0);
                }
            }
            {
                let mut acc = grads.layer_mut(spec, l);
                let mut slices: Vec<&mut [f32]> = Vec::with_capacity(ids.len());
                let mut scratch_refs: Vec<Option<&mut Vec<f32>>> = scratch.iter_mut().map(Some).collect();
                for (a, &i) in acc.iter_mut().zip(ids) {
                    if touched[i] {
                        slices.push(scratch_refs[i].take().expect("each tensor once").as_mut_slice());
                    } else {
                        slices.push(std::mem::take(a));
                    }
                }
                f(&mut slices);
            }
            for &i in ids {
                if touched[i] {
                    ws_kernels::parallel::add_inplace(&mut grads.tensors[i], &scratch[i]);
                }
                touched[i] = true;
            }
        }
        for m in 0..b / mb {
            let x = &inputs[m * mb * t..(m + 1) * mb * t];
            let y = &targets[m * mb * t..(m + 1) * mb * t];
            for l in 0..layers - 1 {
                ws.forward(spec, l, &params.layer(spec, l), x, mb, t);
            }
            let head = layers - 1;
            with_grads(spec, head, grads, &mut touched, &mut scratch, |g| {
                loss_sum += ws.head(spec, &params.layer(spec, head), Some(g), y, mb, t, dloss_scale);
            });
            for l in (0..layers - 1).rev() {
                with_grads(spec, l, grads, &mut touched, &mut scratch, |g| {
                    ws.backward(spec, l, &params.layer(spec, l), g, x, mb, t);
                });
            }
        }
        loss_sum / (b * t) as f64
    }

    /// One optimizer step on a batch sampled from `train`.
    pub fn train_step(&mut self, train: &[u16]) -> StepStats {
        let start = Instant::now();
        let (b, t) = (self.config.train.batch_size, self.config.seq_len());
        let (mut inputs, mut targets) = (std::mem::take(&mut self.inputs), std::mem::take(&mut self.targets));
        sample_batch(train, b, t, self.config.train.seed, TRAIN_STREAM, self.step, &mut inputs, &mut targets);
        let stats = self.step_on(&inputs, &targets);
        (self.inputs, self.targets) = (inputs, targets);
        StepStats { seconds: start.elapsed().as_secs_f64(), ..stats }
    }

    /// One optimizer step on the given batch (B*T inputs and targets).
    pub fn step_on(&mut self, inputs: &[u32], targets: &[u32]) -> StepStats {
        let start = Instant::now();
        let lr = learning_rate(&self.config.train, self.step);
        self.grads.fill(0.0);
        let dynamic = self.dynamic.filter(|d| d.due(self.step + 1));
        if dynamic.is_some_and(|d| d.needs_dense_grads(self.step)) {
            self.workspace.capture_dense_grads(&self.spec);
        }
        let loss = self.accumulate_gradients(inputs, targets);
        let grad_norm =
            self.optimizer.step(&self.spec, &mut self.params, &self.grads, &self.config.train, lr, self.step + 1);
        self.step += 1;
        self.ramp();
        if let Some(d) = dynamic {
            let dense_grads = self.workspace.take_dense_grads();
            self.prune_regrow(&d, dense_grads);
        }
        StepStats { step: self.step, loss, lr, grad_norm, tokens: inputs.len(), seconds: start.elapsed().as_secs_f64() }
    }

    /// Mean loss over `batches` batches sampled from `tokens` (the same
    /// batches at every call: the sampler index does not move).
    pub fn evaluate(&mut self, tokens: &[u16], batches: usize) -> f64 {
        let (b, t) = (self.config.micro_batch(), self.config.seq_len());
        let (spec, ws, params) = (&self.spec, &mut self.workspace, &self.params);
        let layers = spec.layer_count();
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        let mut sum = 0f64;
        for i in 0..batches {
            sample_batch(tokens, b, t, self.config.train.seed, VAL_STREAM, i as u64, &mut inputs, &mut targets);
            for l in 0..layers - 1 {
                ws.forward(spec, l, &params.layer(spec, l), &inputs, b, t);
            }
            sum += ws.head(spec, &params.layer(spec, layers - 1), None, &targets, b, t, 0.0);
        }
        sum / (batches * b * t) as f64
    }

    /// Tensor `t` takes pattern `new`: its weights and both moments move
    /// with their nonzeros ([`remap`]).
    fn move_nonzeros(&mut self, t: usize, new: ws_kernels::sparse::SparsePattern, from: &[Option<u32>]) {
        for p in [&mut self.params, &mut self.optimizer.m, &mut self.optimizer.v] {
            p.tensors[t] = remap(&p.tensors[t], from);
        }
        self.masks.patterns[t] = Some(std::sync::Arc::new(new));
    }

    /// A stage of the sparsity ramp after the step just completed, when one
    /// falls here: each sparse tensor keeps its values of largest magnitude
    /// (and their moments) up to its new count.
    fn ramp(&mut self) {
        if self.config.sparsity.ramp_steps == 0 {
            return;
        }
        let next = self.config.model_spec_at(self.step).expect("validated at start");
        if next.tensors.iter().zip(&self.spec.tensors).all(|(a, b)| a.nnz == b.nnz) {
            return;
        }
        for (t, ts) in next.tensors.iter().enumerate() {
            let (Some(nnz), Some(p)) = (ts.nnz, self.masks.patterns[t].clone()) else { continue };
            let (new, from) = shrink(&p, &self.params.tensors[t], nnz);
            self.move_nonzeros(t, new, &from);
        }
        self.masks.version += 1;
        self.spec = next;
        self.grads = Params::zeros(&self.spec);
        self.workspace.set_masks(&self.masks, self.config.sparsity.kernel_density_max);
    }

    /// Dynamic sparsity's update after the step just completed: each sparse
    /// tensor's pattern, weights and moments move together.
    fn prune_regrow(&mut self, d: &Dynamic, dense_grads: Option<Vec<Option<Vec<f32>>>>) {
        for t in 0..self.spec.tensors.len() {
            let Some(pattern) = self.masks.patterns[t].clone() else { continue };
            let grad = dense_grads.as_ref().and_then(|g| g[t].as_deref());
            let (new, from) = d.choose(self.step, t, &pattern, &self.params.tensors[t], grad);
            self.move_nonzeros(t, new, &from);
        }
        self.masks.version += 1;
        self.workspace.set_masks(&self.masks, self.config.sparsity.kernel_density_max);
    }

    pub fn save_checkpoint(&self, dir: &Path) -> Result<(), TrainError> {
        let run_toml = self.config.to_toml();
        let state = TrainState { step: self.step, optimizer: &self.optimizer, run_toml: &run_toml };
        checkpoint::save(dir, &self.spec, &self.params, &self.masks, Some(state))
    }
}

impl Engine for Trainer {
    fn step(&self) -> u64 {
        self.step
    }
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }
    fn config(&self) -> &RunConfig {
        &self.config
    }
    fn train_step(&mut self, train: &[u16]) -> Result<StepStats, TrainError> {
        Ok(Trainer::train_step(self, train))
    }
    fn evaluate(&mut self, tokens: &[u16], batches: usize) -> Result<f64, TrainError> {
        Ok(Trainer::evaluate(self, tokens, batches))
    }
    fn checkpoint(&mut self, run_dir: &Path) -> Result<PathBuf, TrainError> {
        let dir = checkpoint::dir_for_step(run_dir, self.step);
        self.save_checkpoint(&dir)?;
        Ok(dir)
    }
    fn params(&mut self) -> Result<Params, TrainError> {
        Ok(self.params.clone())
    }
    fn masks(&mut self) -> Result<Masks, TrainError> {
        Ok(self.masks.clone())
    }
}

/// The weights a run starts from: `train.init_from`'s checkpoint, else the
/// seeded initialisation; sparse tensors keep their values of largest
/// magnitude. Returns the stored values and the sparse tensors' patterns.
pub fn initial_weights(config: &RunConfig, spec: &ModelSpec) -> Result<(Params, Masks), TrainError> {
    if config.train.init_from.is_empty() {
        let masks = if spec.is_sparse() { Masks::init(spec, config.train.seed) } else { Masks::dense(spec) };
        return Ok((Params::init(spec, config.train.seed), masks));
    }
    let dir = Path::new(&config.train.init_from);
    let (from, dense) = checkpoint::load(dir)?;
    if from.config != spec.config {
        return Err(TrainError::Checkpoint {
            path: dir.into(),
            problem: format!(
                "is a model of {:?}, but [model] is {:?}: set the model to match (train.init_from)",
                from.config, spec.config
            ),
        });
    }
    let masks = Masks::from_dense(spec, &dense);
    Ok((masks.pack(&dense), masks))
}

/// Seconds since the epoch as `YYYYmmdd-HHMMSS` (UTC), for run names.
pub fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Creates the run directory (which must be new or empty) and returns it.
pub fn prepare_run_dir(config: &mut RunConfig) -> Result<PathBuf, TrainError> {
    if config.run_dir.is_empty() {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        config.run_dir = format!("runs/{}-{}", config.preset, utc_stamp(secs));
    }
    let dir = PathBuf::from(&config.run_dir);
    let fail = |problem: String| TrainError::RunDir { path: dir.clone(), problem };
    if dir.exists() {
        let mut entries = std::fs::read_dir(&dir).map_err(|e| fail(format!("cannot read: {e}")))?;
        if entries.next().is_some() {
            return Err(fail("already holds files; choose a new one with --set run_dir=PATH".into()));
        }
    }
    std::fs::create_dir_all(&dir).map_err(|e| fail(format!("cannot create: {e}")))?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"").map_err(|e| fail(format!("cannot write: {e}")))?;
    let _ = std::fs::remove_file(probe);
    Ok(dir)
}

/// What a training run reports as it goes.
pub trait Progress {
    fn started(&mut self, _engine: &dyn Engine, _run_dir: &Path) {}
    fn step(&mut self, _stats: &StepStats, _val_loss: Option<f64>) {}
    fn message(&mut self, _text: &str) {}
}

/// Builds the engine the config asks for: a store in `run_dir/store` and a
/// streaming worker, or the resident trainer. With `resume`, the store starts
/// from the checkpoint in that directory.
pub fn start_engine(config: &RunConfig, run_dir: &Path, resume: Option<&Path>) -> Result<Box<dyn Engine>, TrainError> {
    #[cfg(feature = "cuda")]
    if config.train.device == "cuda" {
        return crate::gpu::start_gpu_engine(config, run_dir, resume);
    }
    let spec = config.model_spec()?;
    if config.stream.mode == "resident" {
        if resume.is_some() {
            return Err(TrainError::Config(
                "--resume needs stream.mode = \"streaming\" (the store checkpoints)".into(),
            ));
        }
        return Ok(Box::new(Trainer::new(config.clone())?));
    }
    let mb = stream::choose_micro_batch(config, &spec)?;
    // Gradient contributions per layer and step reaching the store: the tree sums the workers'.
    let micro_batches = config.train.batch_size / config.fabric.workers / mb;
    let store_dir = run_dir.join("store");
    let store = match resume {
        None => stream::create_store(config, &spec, &store_dir, micro_batches)?,
        Some(ckpt) => {
            let store_err = |e: ws_store::StoreError| TrainError::Config(e.to_string());
            // The model at the checkpoint's step (a sparsity ramp changes it).
            let spec = config.model_spec_at(ws_store::read_manifest(ckpt).map_err(store_err)?.step)?;
            let sc = stream::store_config(config, &spec, micro_batches);
            ws_store::Store::restore(&spec, ckpt, &store_dir, sc).map_err(store_err)?.0
        }
    };
    if config.uses_fabric() {
        return Ok(Box::new(crate::fabric::FabricTrainer::start(config.clone(), store, mb)?));
    }
    Ok(Box::new(StreamingTrainer::start(config.clone(), store)?))
}

/// The whole `weightstream train` job: run directory, data, steps,
/// evaluation, checkpoints, metrics and the plot. Returns the run directory.
pub fn run(mut config: RunConfig, data: &Split, progress: &mut dyn Progress) -> Result<PathBuf, TrainError> {
    config.validate()?;
    ws_data::check_vocab(&data.train, config.model.vocab_size)?;
    ws_data::check_vocab(&data.val, config.model.vocab_size)?;
    let run_dir = prepare_run_dir(&mut config)?;
    let config_path = run_dir.join("config.toml");
    std::fs::write(&config_path, config.to_toml()).map_err(|e| TrainError::io("cannot write", &config_path, e))?;
    let engine = start_engine(&config, &run_dir, None)?;
    train_loop(engine, &config, data, &run_dir, progress)
}

/// The configuration to resume the run in `run_dir` with: the one its last
/// checkpoint saved, with `overrides` (e.g. more steps).
pub fn resume_config(run_dir: &Path, overrides: &[String]) -> Result<RunConfig, TrainError> {
    let manifest = ws_store::read_manifest(&run_dir.join("checkpoint")).map_err(|e| TrainError::RunDir {
        path: run_dir.into(),
        problem: format!("no checkpoint to resume from ({e})"),
    })?;
    let mut config = RunConfig::resolve_text(&manifest.run_toml, overrides)?;
    config.run_dir = run_dir.display().to_string();
    // The store's layout follows the sparse tensors' counts: they cannot change.
    let saved = RunConfig::resolve_text(&manifest.run_toml, &[])?.model_spec_at(manifest.step)?;
    let now = config.model_spec_at(manifest.step)?;
    if let Some((a, b)) = saved.tensors.iter().zip(&now.tensors).find(|(a, b)| a.nnz != b.nnz) {
        return Err(TrainError::Config(format!(
            "--resume: {} keeps {} values in the checkpoint but {} with these settings; \
             sparsity levels, rules and ramp cannot change when resuming",
            a.name,
            a.len(),
            b.len()
        )));
    }
    Ok(config)
}

/// Continues the run in `config.run_dir` (see [`resume_config`]) from its
/// last checkpoint, with the same data order.
pub fn resume(config: RunConfig, data: &Split, progress: &mut dyn Progress) -> Result<PathBuf, TrainError> {
    let run_dir = PathBuf::from(&config.run_dir);
    ws_data::check_vocab(&data.train, config.model.vocab_size)?;
    let engine = start_engine(&config, &run_dir, Some(&run_dir.join("checkpoint")))?;
    progress.message(&format!("resuming {} at step {}", run_dir.display(), engine.step()));
    train_loop(engine, &config, data, &run_dir, progress)
}

fn train_loop(
    mut engine: Box<dyn Engine>,
    config: &RunConfig,
    data: &Split,
    run_dir: &Path,
    progress: &mut dyn Progress,
) -> Result<PathBuf, TrainError> {
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut records = crate::metrics::read(&metrics_path).unwrap_or_default();
    let before = records.len();
    records.retain(|r| r.step <= engine.step());
    if records.len() != before {
        crate::metrics::rewrite(&metrics_path, &records)?;
    }
    let mut metrics = MetricsWriter::create(&metrics_path)?;
    progress.started(engine.as_ref(), run_dir);
    let tc = &config.train;
    let streaming = config.stream.mode == "streaming";
    while engine.step() < tc.steps {
        let stats = engine.train_step(&data.train)?;
        if !stats.loss.is_finite() {
            return Err(TrainError::Config(format!(
                "training diverged at step {} (loss {}): lower train.lr or raise train.warmup_steps",
                stats.step, stats.loss
            )));
        }
        let last = stats.step == tc.steps;
        let val_loss = if last || (tc.eval_interval > 0 && stats.step % tc.eval_interval == 0) {
            Some(engine.evaluate(&data.val, tc.eval_batches.max(1))?)
        } else {
            None
        };
        let record = Record {
            step: stats.step,
            train_loss: stats.loss,
            val_loss,
            lr: stats.lr,
            grad_norm: stats.grad_norm,
            tokens_per_s: stats.tokens as f64 / stats.seconds,
            step_ms: stats.seconds * 1e3,
        };
        metrics.write(&record)?;
        records.push(record);
        progress.step(&stats, val_loss);
        if last || (tc.checkpoint_interval > 0 && stats.step % tc.checkpoint_interval == 0) {
            let dir = engine.checkpoint(run_dir)?;
            progress.message(&format!("checkpoint {} (step {})", dir.display(), stats.step));
            plot::write_loss_svg(&run_dir.join("loss.svg"), &records, &format!("weightstream {}", config.preset))?;
        }
    }
    if streaming && config.train.export_hf {
        // The Hugging Face export of the final weights, beside the store
        // checkpoint just written, read back from it page by page.
        let dir = checkpoint::dir_for_step(run_dir, engine.step());
        if !dir.exists() {
            checkpoint::export_store_checkpoint(engine.spec(), &run_dir.join("checkpoint"), &dir)?;
            progress.message(&format!("exported {}", dir.display()));
        }
    }
    if streaming {
        // The store's working slabs; the checkpoint holds everything to resume.
        drop(engine);
        let _ = std::fs::remove_dir_all(run_dir.join("store"));
    }
    Ok(run_dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamp_formats_known_dates() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert_eq!(utc_stamp(1_795_651_200 + 3_723), "20261126-010203");
        assert_eq!(utc_stamp(951_782_400), "20000229-000000");
    }
}
