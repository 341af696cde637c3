//! The CUDA worker (feature `cuda`, `train.device = "cuda"`).
//!
//! Two engines over [`ws_cuda::GpuWorkspace`]:
//! - [`GpuResident`]: weights, gradients and AdamW moments in GPU memory,
//!   the optimizer as a kernel: the GPU baseline;
//! - [`GpuStreamWorker`]: the streaming worker of [`crate::stream`] on the
//!   GPU. The store (host DRAM and flash, optimizer on the CPU) sends each
//!   layer's weights as before; the worker copies layers l+1..l+k to the GPU
//!   on the upload stream while layer l computes on the compute stream
//!   (events order them; no device-wide synchronisation), and copies each
//!   gradient back on the download stream, handing it to the store when the
//!   copy is done. The store's buffers are page-locked on first sight, so
//!   the copies are true DMA that overlaps compute.

use crate::checkpoint::{self, TrainState};
use crate::config::RunConfig;
use crate::optim::{learning_rate, AdamW};
use crate::schedule::{Pass, Schedule};
use crate::stream::{max_layer_params, Down, ToStore, WeightMsg, WeightWaits, Weights};
use crate::trainer::{Engine, StepStats, TRAIN_STREAM, VAL_STREAM};
use crate::TrainError;
use flume::{Receiver, Sender};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;
use ws_cuda::{DevBuf, DeviceParams, Event, Gpu, GpuWorkspace};
use ws_data::sample_batch;
use ws_kernels::adamw::AdamWStep;
use ws_kernels::Precision;
use ws_model::{ModelSpec, Params};

fn gpu_err(e: ws_cuda::GpuError) -> TrainError {
    TrainError::Config(e.to_string())
}

/// Opens GPU 0 for training.
pub fn open_gpu() -> Result<Gpu, TrainError> {
    Gpu::new(0).map_err(|e| TrainError::Config(format!("train.device = \"cuda\": {e}")))
}

/// Device memory the streaming worker needs for micro-batch `mb`: weight
/// slots (k+1, plus bf16 landing slots), two gradient slots, activations.
pub fn stream_worker_bytes(
    spec: &ModelSpec,
    mb: usize,
    t: usize,
    k: usize,
    dtype: Precision,
    precision: Precision,
    fused: bool,
) -> u64 {
    let max_layer = max_layer_params(spec) as u64;
    let slots = (k as u64 + 1) * max_layer * if dtype == Precision::Bf16 { 6 } else { 4 };
    slots + 2 * 4 * max_layer + GpuWorkspace::bytes_for(spec, mb, t, precision, fused) as u64
}

/// Device memory of one fp32 copy of every layer, laid out layer after
/// layer (the tied embedding twice: the embedding layer's and the head's):
/// what keeping a step's weights, or summing its gradients, costs.
pub fn layers_bytes(spec: &ModelSpec) -> u64 {
    4 * (0..spec.layer_count()).map(|l| layer_numel(spec, l) as u64).sum::<u64>()
}

fn layer_numel(spec: &ModelSpec, l: usize) -> usize {
    spec.layers[l].tensors.iter().map(|&t| spec.tensors[t].numel()).sum()
}

/// What the streaming worker holds beyond its micro-batch's need ([`crate::schedule`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerPlan {
    pub keep_weights: bool,
    pub sum_gradients: bool,
}

/// Each layer's weights kept, or gradients summed, where the GPU budget
/// has room for them after the micro-batch's `need` (sums first: with
/// several micro-batches they save the most host work) and the
/// configuration allows.
pub fn plan_worker(config: &RunConfig, spec: &ModelSpec, budget: u64, need: u64, micro_batches: usize) -> WorkerPlan {
    let copy = layers_bytes(spec);
    let mut left = budget.saturating_sub(need);
    let sum_gradients = config.stream.sum_gradients && micro_batches > 1 && left >= copy;
    if sum_gradients {
        left -= copy;
    }
    WorkerPlan { keep_weights: config.stream.keep_weights && left >= copy, sum_gradients }
}

/// Device memory of the resident GPU engine: four copies of the model and the workspace.
pub fn resident_bytes(spec: &ModelSpec, mb: usize, t: usize, precision: Precision, fused: bool) -> u64 {
    16 * spec.parameter_count() as u64 + GpuWorkspace::bytes_for(spec, mb, t, precision, fused) as u64
}

/// The GPU memory budget: `worker.memory_bytes`, else 92% of what is free.
pub fn gpu_budget(config: &RunConfig, gpu: &Gpu) -> Result<u64, TrainError> {
    if config.worker.memory_bytes > 0 {
        return Ok(config.worker.memory_bytes);
    }
    let (free, _) = gpu.memory_info().map_err(gpu_err)?;
    Ok((free as f64 * 0.92) as u64)
}

/// The micro-batch: the configured one, or the largest divisor of the batch
/// whose device memory fits the budget; an error naming the need if none does.
pub fn choose_gpu_micro_batch(
    config: &RunConfig,
    budget: u64,
    need: impl Fn(usize) -> u64,
) -> Result<usize, TrainError> {
    let b = config.train.batch_size;
    if config.train.micro_batch != 0 {
        let mb = config.train.micro_batch;
        if need(mb) > budget {
            return Err(TrainError::Config(format!(
                "train.micro_batch = {mb} needs {} bytes of GPU memory, above the budget of {budget}",
                need(mb)
            )));
        }
        return Ok(mb);
    }
    (1..=b).rev().filter(|mb| b.is_multiple_of(*mb)).find(|&mb| need(mb) <= budget).ok_or_else(|| {
        TrainError::Config(format!(
            "one sequence of {} tokens needs {} bytes of GPU memory, above the budget of {budget} \
             (worker.memory_bytes, or 92% of the free GPU memory): shorten train.seq_len or lower stream.prefetch_depth",
            config.seq_len(),
            need(1)
        ))
    })
}

/// Every weight, gradient and moment on the GPU.
pub struct GpuResident {
    pub config: RunConfig,
    pub spec: ModelSpec,
    gpu: Gpu,
    params: DeviceParams,
    grads: DeviceParams,
    m: DeviceParams,
    v: DeviceParams,
    ws: GpuWorkspace,
    partial: DevBuf<f64>,
    micro_batch: usize,
    step: u64,
    inputs: Vec<u32>,
    targets: Vec<u32>,
}

impl GpuResident {
    pub fn new(config: RunConfig, params: &Params) -> Result<GpuResident, TrainError> {
        config.validate()?;
        let spec = config.model_spec()?;
        let gpu = open_gpu()?;
        let precision = Precision::parse(&config.train.precision).expect("validated");
        let t = config.seq_len();
        let budget = gpu_budget(&config, &gpu)?;
        let fused = GpuWorkspace::fused_on(&gpu, &spec, precision);
        let mb = choose_gpu_micro_batch(&config, budget, |mb| resident_bytes(&spec, mb, t, precision, fused))?;
        let dp = DeviceParams::from_host(&gpu, &spec, params).map_err(gpu_err)?;
        let grads = DeviceParams::zeros(&gpu, &spec).map_err(gpu_err)?;
        let m = DeviceParams::zeros(&gpu, &spec).map_err(gpu_err)?;
        let v = DeviceParams::zeros(&gpu, &spec).map_err(gpu_err)?;
        let ws = GpuWorkspace::new(&gpu, &spec, mb, t, precision).map_err(gpu_err)?;
        let partial = gpu.zeros(ws_cuda::kernels::SUMSQ_BLOCKS).map_err(gpu_err)?;
        Ok(GpuResident {
            params: dp,
            grads,
            m,
            v,
            ws,
            partial,
            micro_batch: mb,
            step: 0,
            inputs: Vec::new(),
            targets: Vec::new(),
            gpu,
            config,
            spec,
        })
    }

    pub fn micro_batch(&self) -> usize {
        self.micro_batch
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Whether attention runs through the fused kernels ([`GpuWorkspace::fused_on`]).
    pub fn fused_attention(&self) -> bool {
        self.ws.fused_attention()
    }

    /// One optimizer step on the given batch; returns (loss, grad norm).
    pub fn step_on(&mut self, inputs: &[u32], targets: &[u32], lr: f64) -> Result<(f64, f64), TrainError> {
        let (gpu, spec) = (&self.gpu, &self.spec);
        let (t, mb) = (self.config.seq_len(), self.micro_batch);
        let b = inputs.len() / t;
        let layers = spec.layer_count();
        let scale = 1.0 / (b * t) as f32;
        self.grads.zero(gpu, &gpu.compute).map_err(gpu_err)?;
        for m in 0..b / mb {
            let r = m * mb * t..(m + 1) * mb * t;
            self.ws.set_batch(gpu, &inputs[r.clone()], &targets[r], mb, t).map_err(gpu_err)?;
            for l in 0..layers - 1 {
                self.ws.forward(gpu, spec, l, &self.params.layer(spec, l)).map_err(gpu_err)?;
            }
            let head = layers - 1;
            let (w, g) = (self.params.layer(spec, head), self.grads.layer(spec, head));
            self.ws.head(gpu, spec, &w, Some(&g), scale).map_err(gpu_err)?;
            for l in (0..layers - 1).rev() {
                let (w, g) = (self.params.layer(spec, l), self.grads.layer(spec, l));
                self.ws.backward(gpu, spec, l, &w, &g).map_err(gpu_err)?;
            }
        }
        let loss = self.ws.take_loss_sum(gpu).map_err(gpu_err)? / (b * t) as f64;
        self.ws.mark(gpu, "loss").map_err(gpu_err)?;
        let norm = gpu
            .sumsq(&gpu.compute, self.partial.ptr(), self.grads.buf.ptr(), self.grads.len())
            .map_err(gpu_err)?
            .sqrt();
        let tc = &self.config.train;
        let grad_scale = crate::optim::clip_factor(norm, tc.grad_clip);
        for (i, ts) in spec.tensors.iter().enumerate() {
            let st = AdamWStep {
                lr: lr as f32,
                beta1: tc.beta1 as f32,
                beta2: tc.beta2 as f32,
                eps: tc.eps as f32,
                weight_decay: if ts.decay { tc.weight_decay as f32 } else { 0.0 },
                t: self.step + 1,
                grad_scale,
            };
            let (p, g, m, v) = (self.params.tensor(i), self.grads.tensor(i), self.m.tensor(i), self.v.tensor(i));
            gpu.adamw(&gpu.compute, p, g, m, v, ts.numel(), st).map_err(gpu_err)?;
        }
        self.ws.mark(gpu, "optimizer (norm, AdamW)").map_err(gpu_err)?;
        gpu.compute.synchronize().map_err(gpu_err)?;
        self.step += 1;
        Ok((loss, norm))
    }

    /// One step as [`Self::step_on`], timed phase by phase on the GPU:
    /// milliseconds per phase, in order of first appearance.
    pub fn profile_step(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        lr: f64,
    ) -> Result<Vec<(&'static str, f64)>, TrainError> {
        self.ws.start_profile(&self.gpu).map_err(gpu_err)?;
        self.step_on(inputs, targets, lr)?;
        self.ws.finish_profile().map_err(gpu_err)
    }
}

impl Engine for GpuResident {
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
        let start = Instant::now();
        let (b, t) = (self.config.train.batch_size, self.config.seq_len());
        let lr = learning_rate(&self.config.train, self.step);
        let (mut x, mut y) = (std::mem::take(&mut self.inputs), std::mem::take(&mut self.targets));
        sample_batch(train, b, t, self.config.train.seed, TRAIN_STREAM, self.step, &mut x, &mut y);
        let r = self.step_on(&x, &y, lr);
        (self.inputs, self.targets) = (x, y);
        let (loss, grad_norm) = r?;
        Ok(StepStats { step: self.step, loss, lr, grad_norm, tokens: b * t, seconds: start.elapsed().as_secs_f64() })
    }
    fn evaluate(&mut self, tokens: &[u16], batches: usize) -> Result<f64, TrainError> {
        let (b, t) = (self.micro_batch, self.config.seq_len());
        let (gpu, spec) = (&self.gpu, &self.spec);
        let layers = spec.layer_count();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        self.ws.take_loss_sum(gpu).map_err(gpu_err)?;
        for i in 0..batches {
            sample_batch(tokens, b, t, self.config.train.seed, VAL_STREAM, i as u64, &mut x, &mut y);
            self.ws.set_batch(gpu, &x, &y, b, t).map_err(gpu_err)?;
            for l in 0..layers - 1 {
                self.ws.forward(gpu, spec, l, &self.params.layer(spec, l)).map_err(gpu_err)?;
            }
            self.ws.head(gpu, spec, &self.params.layer(spec, layers - 1), None, 0.0).map_err(gpu_err)?;
        }
        Ok(self.ws.take_loss_sum(gpu).map_err(gpu_err)? / (batches * b * t) as f64)
    }
    fn checkpoint(&mut self, run_dir: &Path) -> Result<PathBuf, TrainError> {
        let dir = checkpoint::dir_for_step(run_dir, self.step);
        let params = self.params()?;
        let m = self.m.to_host(&self.gpu, &self.spec).map_err(gpu_err)?;
        let v = self.v.to_host(&self.gpu, &self.spec).map_err(gpu_err)?;
        let optimizer = AdamW { m, v };
        let run_toml = self.config.to_toml();
        checkpoint::save(
            &dir,
            &self.spec,
            &params,
            &ws_model::Masks::dense(&self.spec),
            Some(TrainState { step: self.step, optimizer: &optimizer, run_toml: &run_toml }),
        )?;
        Ok(dir)
    }
    fn params(&mut self) -> Result<Params, TrainError> {
        self.params.to_host(&self.gpu, &self.spec).map_err(gpu_err)
    }
    fn masks(&mut self) -> Result<ws_model::Masks, TrainError> {
        Ok(ws_model::Masks::dense(&self.spec))
    }
}

/// Why a streamed pass on the GPU stopped.
pub enum PassError {
    /// A channel closed: the store stopped, and its reply says why.
    StoreStopped,
    Gpu(TrainError),
}

impl From<TrainError> for PassError {
    fn from(e: TrainError) -> PassError {
        PassError::Gpu(e)
    }
}

fn pe(e: ws_cuda::GpuError) -> PassError {
    PassError::Gpu(gpu_err(e))
}

/// A gradient on its way back to the host: the host buffer being written
/// by the download stream, and what the store needs to know of it.
struct PendingGrad {
    host: Vec<f32>,
    use_index: usize,
    layer: usize,
    len: usize,
}

/// One fp32 copy of every layer, layer after layer ([`layers_bytes`]).
struct LayerCopies {
    buf: DevBuf<f32>,
    start: Vec<usize>,
}

impl LayerCopies {
    fn new(gpu: &Gpu, spec: &ModelSpec) -> ws_cuda::Result<LayerCopies> {
        let mut start = Vec::with_capacity(spec.layer_count());
        let mut n = 0;
        for l in 0..spec.layer_count() {
            start.push(n);
            n += layer_numel(spec, l);
        }
        Ok(LayerCopies { buf: gpu.zeros(n)?, start })
    }

    fn base(&self, l: usize) -> u64 {
        self.buf.at(self.start[l])
    }
}

/// The streaming worker's GPU side (see the module docs).
pub struct GpuStreamWorker {
    pub gpu: Gpu,
    pub ws: GpuWorkspace,
    slots: Vec<DevBuf<f32>>,
    slots16: Vec<DevBuf<u16>>,
    copied: Vec<Event>,
    used: Vec<Event>,
    gslots: Vec<DevBuf<f32>>,
    gcomputed: Vec<Event>,
    gdone: Vec<Event>,
    pending: Vec<Option<PendingGrad>>,
    grad_uses: usize,
    pinned: HashSet<usize>,
    pin_failed: bool,
    /// The step's weights, kept from each layer's first fetch (schedules with `keep_weights`).
    kept: Option<LayerCopies>,
    /// The step's gradient sums (schedules with `sum_gradients`).
    sums: Option<LayerCopies>,
    /// The end of the last pass on the compute stream: kept weights are
    /// overwritten only after it.
    pass_done: Event,
    pub waits: WeightWaits,
}

impl GpuStreamWorker {
    /// What the worker holds beyond its micro-batch's need.
    pub fn plan(&self) -> WorkerPlan {
        WorkerPlan { keep_weights: self.kept.is_some(), sum_gradients: self.sums.is_some() }
    }

    /// A worker for micro-batch `mb`, holding what `train` asks of it.
    pub fn new(
        gpu: Gpu,
        spec: &ModelSpec,
        mb: usize,
        t: usize,
        config: &RunConfig,
        train: &Schedule,
    ) -> Result<GpuStreamWorker, TrainError> {
        let precision = Precision::parse(&config.train.precision).expect("validated");
        let dtype = Precision::parse(&config.stream.dtype).expect("validated");
        let depth = config.stream.prefetch_depth + 1;
        let max_layer = max_layer_params(spec);
        let e = gpu_err;
        let ws = GpuWorkspace::new(&gpu, spec, mb, t, precision).map_err(e)?;
        let slots = (0..depth).map(|_| gpu.zeros::<f32>(max_layer)).collect::<Result<Vec<_>, _>>().map_err(e)?;
        let slots16 = match dtype {
            Precision::Bf16 => {
                (0..depth).map(|_| gpu.zeros::<u16>(max_layer)).collect::<Result<Vec<_>, _>>().map_err(e)?
            }
            Precision::Fp32 => Vec::new(),
        };
        let events = |n: usize| (0..n).map(|_| Event::new(false)).collect::<Result<Vec<_>, _>>();
        Ok(GpuStreamWorker {
            ws,
            slots,
            slots16,
            copied: events(depth).map_err(e)?,
            used: events(depth).map_err(e)?,
            gslots: (0..2).map(|_| gpu.zeros::<f32>(max_layer)).collect::<Result<Vec<_>, _>>().map_err(e)?,
            gcomputed: events(2).map_err(e)?,
            gdone: events(2).map_err(e)?,
            pending: vec![None, None],
            grad_uses: 0,
            pinned: HashSet::new(),
            pin_failed: false,
            kept: if train.keep_weights { Some(LayerCopies::new(&gpu, spec).map_err(e)?) } else { None },
            sums: if train.sum_gradients { Some(LayerCopies::new(&gpu, spec).map_err(e)?) } else { None },
            pass_done: Event::new(false).map_err(e)?,
            waits: WeightWaits::default(),
            gpu,
        })
    }

    /// Page-locks a store buffer the first time it is seen.
    fn pin(&mut self, ptr: *const u8, bytes: usize) {
        if self.pin_failed || self.pinned.contains(&(ptr as usize)) {
            return;
        }
        // SAFETY: the store's buffers live until the worker is dropped, which
        // unpins them first (StreamingTrainer's Drop drops the worker before
        // it stops the store thread).
        match unsafe { self.gpu.pin(ptr, bytes) } {
            Ok(()) => {
                self.pinned.insert(ptr as usize);
            }
            Err(e) => {
                tracing::warn!("copies from pageable memory (slower): {e}");
                self.pin_failed = true;
            }
        }
    }

    /// Hands the gradient in flight in slot `g` to the store once its copy is done.
    fn flush(&mut self, g: usize, step: u64, to_store: &Sender<ToStore>) -> Result<(), PassError> {
        if let Some(p) = self.pending[g].take() {
            self.gdone[g].synchronize().map_err(pe)?;
            let msg = ToStore::Grads { step, use_index: p.use_index, layer: p.layer, len: p.len, data: p.host };
            to_store.send(msg).map_err(|_| PassError::StoreStopped)?;
        }
        Ok(())
    }

    /// One pass of `sched` (see [`crate::stream::StreamingTrainer`]); returns the loss sum.
    ///
    /// Fetched weights land in slot `f % (k+1)` (f counts the pass's
    /// fetches), or with `keep_weights` in the layer's kept copy (bf16
    /// weights land in a slot first and are widened there). Gradients go to
    /// a gradient slot and straight back to the host, or with
    /// `sum_gradients` into the layer's sum, which goes back after the last
    /// micro-batch's use.
    #[allow(clippy::too_many_arguments)]
    pub fn run_pass(
        &mut self,
        spec: &ModelSpec,
        sched: &Schedule,
        step: u64,
        inputs: &[u32],
        targets: &[u32],
        mb: usize,
        t: usize,
        dloss_scale: f32,
        weights: &Receiver<Down>,
        to_store: &Sender<ToStore>,
        grad_pool: &Receiver<Vec<f32>>,
    ) -> Result<f64, PassError> {
        let stopped = || PassError::StoreStopped;
        let n = sched.uses.len();
        let depth = self.slots.len();
        let fetches = sched.fetch_uses();
        let keep = sched.keep_weights;
        let sum = sched.sum_gradients;
        assert!(!keep || self.kept.is_some(), "a schedule that keeps weights on a worker without room for them");
        assert!(!sum || self.sums.is_some(), "a schedule that sums gradients on a worker without room for them");
        let mut inflight = std::collections::VecDeque::new();
        let mut next = 0;
        let mut micro = usize::MAX;
        self.ws.take_loss_sum(&self.gpu).map_err(pe)?;
        if keep {
            // The last pass may still read the copies about to be overwritten.
            self.gpu.upload.wait(&self.pass_done).map_err(pe)?;
        }
        if let Some(sums) = self.sums.as_ref().filter(|_| sum) {
            // The last pass's sums went back to the host before it returned.
            self.gpu.memset_zero(sums.buf.ptr(), sums.buf.bytes(), &self.gpu.compute).map_err(pe)?;
        }
        for j in 0..n {
            // Keep the fetches of uses j..j+k on their way to the GPU.
            while next < fetches.len() && fetches[next] < j + depth {
                let msg = self.waits.recv(weights, next == 0).ok_or_else(stopped)?;
                let f = fetches[next];
                let u = sched.uses[f];
                msg.expect_use(step, f, u.layer);
                let s = next % depth;
                let dst = match &self.kept {
                    Some(kept) if keep => kept.base(u.layer),
                    _ => {
                        if next >= depth {
                            self.gpu.upload.wait(&self.used[s]).map_err(pe)?;
                        }
                        self.slots[s].ptr()
                    }
                };
                match &msg.data {
                    Weights::F32(v) => {
                        self.pin(v.as_ptr() as *const u8, v.len() * 4);
                        self.gpu.upload(dst, &v[..msg.len], &self.gpu.upload).map_err(pe)?;
                    }
                    Weights::Bf16(v) => {
                        // The landing slot's last widening is earlier on this stream.
                        self.pin(v.as_ptr() as *const u8, v.len() * 2);
                        let up = &self.gpu.upload;
                        self.gpu.upload(self.slots16[s].ptr(), &v[..msg.len], up).map_err(pe)?;
                        self.gpu.from_bf16(up, dst, self.slots16[s].ptr(), msg.len).map_err(pe)?;
                    }
                }
                self.copied[s].record(&self.gpu.upload).map_err(pe)?;
                inflight.push_back((msg, s));
                next += 1;
            }
            let u = sched.uses[j];
            let mut slot = None;
            if inflight.front().is_some_and(|(m, _): &(WeightMsg, usize)| m.use_index == j) {
                let (msg, s) = inflight.pop_front().expect("checked");
                self.gpu.compute.wait(&self.copied[s]).map_err(pe)?;
                // The store's buffer is free once its copy is done.
                self.copied[s].synchronize().map_err(pe)?;
                to_store.send(ToStore::Release(msg.data)).map_err(|_| stopped())?;
                slot = Some(s);
            }
            if u.micro != micro {
                let r = u.micro * mb * t..(u.micro + 1) * mb * t;
                let y = if targets.is_empty() { &targets[..0] } else { &targets[r.clone()] };
                self.ws.set_batch(&self.gpu, &inputs[r], y, mb, t).map_err(pe)?;
                micro = u.micro;
            }
            let base = match (&self.kept, slot) {
                (Some(kept), _) if keep => kept.base(u.layer),
                (_, Some(s)) => self.slots[s].ptr(),
                // The embedding's backward reads no weights: no address is used.
                _ if !sched.needs_weights(j) => 0,
                _ => unreachable!("use {j} neither fetched nor kept"),
            };
            let w = layer_ptrs(spec, u.layer, base);
            let len = layer_numel(spec, u.layer);
            let training = sched.training;
            match u.pass {
                Pass::Forward => self.ws.forward(&self.gpu, spec, u.layer, &w).map_err(pe)?,
                Pass::Head | Pass::Backward if !training => {
                    self.ws.head(&self.gpu, spec, &w, None, 0.0).map_err(pe)?;
                }
                Pass::Head | Pass::Backward => {
                    let g = self.grad_uses % 2;
                    let gptr = match &self.sums {
                        Some(sums) if sum => sums.base(u.layer),
                        _ => {
                            // The slot's last gradient must be on the host before it is reused.
                            self.flush(g, step, to_store)?;
                            let gptr = self.gslots[g].ptr();
                            self.gpu.memset_zero(gptr, len * 4, &self.gpu.compute).map_err(pe)?;
                            gptr
                        }
                    };
                    let gw = layer_ptrs(spec, u.layer, gptr);
                    if u.pass == Pass::Head {
                        self.ws.head(&self.gpu, spec, &w, Some(&gw), dloss_scale).map_err(pe)?;
                    } else {
                        self.ws.backward(&self.gpu, spec, u.layer, &w, &gw).map_err(pe)?;
                    }
                    if sched.sends(j) {
                        self.send_gradient(g, gptr, j, u.layer, len, step, to_store, grad_pool)?;
                    }
                }
            }
            if let Some(s) = slot.filter(|_| !keep) {
                self.used[s].record(&self.gpu.compute).map_err(pe)?;
            }
        }
        let g = self.grad_uses % 2;
        self.flush(g, step, to_store)?;
        self.flush(1 - g, step, to_store)?;
        self.pass_done.record(&self.gpu.compute).map_err(pe)?;
        self.ws.take_loss_sum(&self.gpu).map_err(pe)
    }

    /// Copies the gradient just computed at `gptr` (slot `g`'s turn) back to
    /// a host buffer on the download stream; [`Self::flush`] hands it over.
    #[allow(clippy::too_many_arguments)]
    fn send_gradient(
        &mut self,
        g: usize,
        gptr: u64,
        use_index: usize,
        layer: usize,
        len: usize,
        step: u64,
        to_store: &Sender<ToStore>,
        grad_pool: &Receiver<Vec<f32>>,
    ) -> Result<(), PassError> {
        self.flush(g, step, to_store)?;
        self.gcomputed[g].record(&self.gpu.compute).map_err(pe)?;
        // With one host gradient buffer (depth 0) it may be the one in
        // flight in the other slot: hand that one over first.
        let mut host = match grad_pool.try_recv() {
            Ok(h) => h,
            Err(_) => {
                self.flush(1 - g, step, to_store)?;
                grad_pool.recv().map_err(|_| PassError::StoreStopped)?
            }
        };
        self.pin(host.as_ptr() as *const u8, host.len() * 4);
        self.gpu.download.wait(&self.gcomputed[g]).map_err(pe)?;
        // SAFETY: `host` moves into `pending` (its heap buffer stays put) and
        // is touched again only after `gdone[g]`.
        unsafe { self.gpu.download_async(&mut host[..len], gptr, &self.gpu.download) }.map_err(pe)?;
        self.gdone[g].record(&self.gpu.download).map_err(pe)?;
        self.pending[g] = Some(PendingGrad { host, use_index, layer, len });
        self.grad_uses += 1;
        Ok(())
    }
}

impl Drop for GpuStreamWorker {
    fn drop(&mut self) {
        let _ = self.gpu.synchronize();
        for &p in &self.pinned {
            // SAFETY: pinned by `pin`; the store's buffers are still allocated.
            unsafe { self.gpu.unpin(p as *const u8) };
        }
    }
}

/// Device addresses of layer `l`'s tensors laid out back to back from `base`.
fn layer_ptrs(spec: &ModelSpec, l: usize, base: u64) -> Vec<u64> {
    let mut off = 0u64;
    spec.layers[l]
        .tensors
        .iter()
        .map(|&t| {
            let p = base + 4 * off;
            off += spec.tensors[t].numel() as u64;
            p
        })
        .collect()
}

/// The streaming worker's micro-batch on `gpu`, and what it holds beyond it.
pub fn stream_plan(config: &RunConfig, spec: &ModelSpec, gpu: &Gpu) -> Result<(usize, WorkerPlan), TrainError> {
    let precision = Precision::parse(&config.train.precision).expect("validated");
    let dtype = Precision::parse(&config.stream.dtype).expect("validated");
    let (t, k) = (config.seq_len(), config.stream.prefetch_depth);
    let budget = gpu_budget(config, gpu)?;
    let fused = GpuWorkspace::fused_on(gpu, spec, precision);
    let need = |mb| stream_worker_bytes(spec, mb, t, k, dtype, precision, fused);
    let mb = choose_gpu_micro_batch(config, budget, need)?;
    Ok((mb, plan_worker(config, spec, budget, need(mb), config.train.batch_size / mb)))
}

/// The engine for `train.device = "cuda"`: [`GpuResident`] for
/// `stream.mode = "resident"`, else a store on the host streaming onto the GPU.
pub fn start_gpu_engine(
    config: &RunConfig,
    run_dir: &Path,
    resume: Option<&Path>,
) -> Result<Box<dyn Engine>, TrainError> {
    config.validate()?;
    let spec = config.model_spec()?;
    if config.stream.mode == "resident" {
        if resume.is_some() {
            return Err(TrainError::Config(
                "--resume needs stream.mode = \"streaming\" (the store checkpoints)".into(),
            ));
        }
        let (params, _) = crate::trainer::initial_weights(config, &spec)?;
        return Ok(Box::new(GpuResident::new(config.clone(), &params)?));
    }
    let gpu = open_gpu()?;
    let (mb, plan) = stream_plan(config, &spec, &gpu)?;
    let micro_batches = config.train.batch_size / mb;
    tracing::info!(
        "GPU worker: micro-batch {mb} ({micro_batches} a step), weights kept for the step: {}, gradients summed: {}",
        plan.keep_weights,
        plan.sum_gradients
    );
    let store_dir = run_dir.join("store");
    let store = match resume {
        None => crate::stream::create_store(config, &spec, &store_dir, micro_batches)?,
        Some(ckpt) => {
            let sc = crate::stream::store_config(config, &spec, micro_batches);
            ws_store::Store::restore(&spec, ckpt, &store_dir, sc).map_err(|e| TrainError::Config(e.to_string()))?.0
        }
    };
    Ok(Box::new(crate::stream::StreamingTrainer::start_on_gpu(config.clone(), store, mb, gpu, plan)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(batch: usize, micro: usize) -> RunConfig {
        let mut c = RunConfig::preset("tiny").unwrap();
        c.train.batch_size = batch;
        c.train.micro_batch = micro;
        c
    }

    #[test]
    fn the_gpu_budget_splits_the_batch_or_refuses_with_the_need() {
        // Need: 100 bytes fixed plus 10 per sequence.
        let need = |mb: usize| 100 + 10 * mb as u64;
        assert_eq!(choose_gpu_micro_batch(&config(12, 0), 1000, need).unwrap(), 12);
        assert_eq!(choose_gpu_micro_batch(&config(12, 0), 170, need).unwrap(), 6, "largest divisor that fits");
        assert_eq!(choose_gpu_micro_batch(&config(12, 0), 110, need).unwrap(), 1);
        let e = choose_gpu_micro_batch(&config(12, 0), 109, need).unwrap_err().to_string();
        assert!(e.contains("needs 110 bytes of GPU memory") && e.contains("budget of 109") && !e.contains('\n'), "{e}");
        let e = choose_gpu_micro_batch(&config(12, 4), 120, need).unwrap_err().to_string();
        assert!(e.starts_with("train.micro_batch = 4 needs 140 bytes"), "{e}");
    }

    #[test]
    fn the_worker_keeps_and_sums_only_with_room_and_leave() {
        let c = config(8, 2);
        let spec = ModelSpec::new(c.model);
        let copy = layers_bytes(&spec);
        let tied = 4 * spec.tensors[0].numel() as u64;
        assert_eq!(copy, 4 * spec.parameter_count() as u64 + tied, "the tied embedding twice");
        let plan = |c: &RunConfig, room: u64, micro| plan_worker(c, &spec, 1000 + room, 1000, micro);
        let both = WorkerPlan { keep_weights: true, sum_gradients: true };
        assert_eq!(plan(&c, 2 * copy, 4), both);
        assert_eq!(plan(&c, 2 * copy - 1, 4), WorkerPlan { keep_weights: false, sum_gradients: true });
        assert_eq!(plan(&c, 2 * copy, 1), WorkerPlan { keep_weights: true, sum_gradients: false }, "one micro-batch");
        assert_eq!(plan(&c, copy - 1, 4), WorkerPlan { keep_weights: false, sum_gradients: false });
        assert_eq!(plan_worker(&c, &spec, 10, 1000, 4), WorkerPlan { keep_weights: false, sum_gradients: false });
        let mut off = c.clone();
        off.stream.sum_gradients = false;
        assert_eq!(plan(&off, 2 * copy, 4), WorkerPlan { keep_weights: true, sum_gradients: false });
        off.stream.keep_weights = false;
        assert_eq!(plan(&off, 2 * copy, 4), WorkerPlan { keep_weights: false, sum_gradients: false });
    }

    #[test]
    fn worker_bytes_grow_with_depth_micro_batch_and_dtype() {
        let spec = ModelSpec::new(RunConfig::preset("tiny").unwrap().model);
        let f = |mb, k, d| stream_worker_bytes(&spec, mb, 256, k, d, Precision::Bf16, false);
        assert!(f(2, 2, Precision::Fp32) > f(1, 2, Precision::Fp32));
        assert!(f(1, 3, Precision::Fp32) > f(1, 2, Precision::Fp32));
        assert!(f(1, 2, Precision::Bf16) > f(1, 2, Precision::Fp32), "bf16 adds landing slots");
        assert!(resident_bytes(&spec, 1, 256, Precision::Bf16, false) > 16 * spec.parameter_count() as u64);
        let materialised = f(4, 2, Precision::Bf16);
        let fused = stream_worker_bytes(&spec, 4, 256, 2, Precision::Bf16, Precision::Bf16, true);
        assert!(fused < materialised, "fused attention keeps no T x T matrix");
    }
}
