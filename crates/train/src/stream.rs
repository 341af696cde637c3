//! The weight-streaming executor: a worker that holds no weights of its own
//! and a store that holds them all, connected by channels (the interfaces
//! the fabric will carry over the network).
//!
//! The store runs on its own thread (an async loop over its channels, so
//! that the fabric's simulator can run it on one thread with everything
//! else; see `crate::exec`). For each use of the schedule it reads
//! the layer from its tiers into a free weight buffer and sends it; the
//! worker computes, sends the gradients of head and backward uses up, and
//! releases the buffer, which is the credit for the next fetch: with k+1
//! buffers the worker never holds more than k+1 layers and the store runs up
//! to k fetches ahead. Gradient buffers circulate the same way, k+1 of them.
//! Every message names its step, use and layer, and both sides check them
//! against the schedule (paired assertions).
//!
//! Gradients reach the store in schedule order and are added there in that
//! order; each is computed into a zeroed buffer, which the resident trainer
//! mirrors, so fp32 streaming gives the resident run's weights bit for bit.

use crate::config::RunConfig;
use crate::exec::{Exec, Task};
use crate::optim::learning_rate;
use crate::schedule::{Pass, Schedule};
use crate::sparsity::Dynamic;
use crate::trainer::{Engine, StepStats, TRAIN_STREAM, VAL_STREAM};
use crate::TrainError;
use flume::{bounded, unbounded, Receiver, RecvError, Sender};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;
use ws_data::sample_batch;
use ws_fabric::PassStart;
use ws_kernels::bf16::from_bf16;
use ws_kernels::Precision;
use ws_model::sparsity::shrink;
use ws_model::{Masks, ModelSpec, Params, Workspace};
use ws_store::{Layout, Manifest, OptimizerConfig, Store, StoreConfig};

/// A layer's weights on the wire: its tensors in layer order.
pub enum Weights {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

pub struct WeightMsg {
    pub step: u64,
    pub use_index: usize,
    pub layer: usize,
    /// The store's version of these weights (steps applied).
    pub version: u64,
    pub len: usize,
    pub data: Weights,
}

impl WeightMsg {
    /// Panics unless these are the weights of use `j` (layer `layer`) of `step`.
    pub fn expect_use(&self, step: u64, j: usize, layer: usize) {
        assert!(
            self.step == step && self.use_index == j && self.layer == layer,
            "weights out of schedule: got step {} use {} layer {}, expected step {step} use {j} layer {layer}",
            self.step,
            self.use_index,
            self.layer,
        );
    }
}

/// What the store sends down: the start of a pass, then its layers'
/// weights; before a pass, the sparse tensors' patterns when the worker's
/// copy is not current.
pub enum Down {
    Begin(PassStart),
    Weights(WeightMsg),
    Masks(Masks),
}

/// The next weights of a pass (`None`: the store stopped).
pub fn recv_weights(rx: &Receiver<Down>) -> Option<WeightMsg> {
    expect_weights(rx.recv())
}

/// What came down where a pass's next weights belong.
fn expect_weights(d: Result<Down, RecvError>) -> Option<WeightMsg> {
    match d {
        Ok(Down::Weights(m)) => Some(m),
        Ok(Down::Begin(p)) => panic!("a pass ({p:?}) began inside another"),
        Ok(Down::Masks(_)) => panic!("masks changed inside a pass"),
        Err(_) => None,
    }
}

/// Time a streaming worker spent waiting for weights, since last taken.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WeightWaits {
    /// At the passes' first fetches: the store applying the last step's
    /// update to the first layer, while the worker has nothing to do.
    pub first_s: f64,
    /// In all, the first fetches included.
    pub total_s: f64,
    pub passes: u64,
}

impl WeightWaits {
    /// [`recv_weights`], timed; `first`: a pass's first fetch.
    pub fn recv(&mut self, rx: &Receiver<Down>, first: bool) -> Option<WeightMsg> {
        let t0 = Instant::now();
        let m = recv_weights(rx);
        self.add(t0, first);
        m
    }

    /// [`Self::recv`], awaiting the weights.
    pub async fn recv_async(&mut self, rx: &Receiver<Down>, first: bool) -> Option<WeightMsg> {
        let t0 = Instant::now();
        let m = expect_weights(rx.recv_async().await);
        self.add(t0, first);
        m
    }

    fn add(&mut self, since: Instant, first: bool) {
        let s = since.elapsed().as_secs_f64();
        self.total_s += s;
        if first {
            self.first_s += s;
            self.passes += 1;
        }
    }
}

/// The start of the next pass (`None`: the store stopped), taking new
/// patterns into `workspace` and their counts into `spec` on the way.
pub(crate) async fn recv_begin(
    rx: &Receiver<Down>,
    workspace: &mut Workspace,
    spec: &mut ModelSpec,
    crossover: f64,
) -> Option<PassStart> {
    loop {
        match rx.recv_async().await {
            Ok(Down::Begin(p)) => return Some(p),
            Ok(Down::Masks(m)) => {
                m.apply_to(spec);
                workspace.set_masks(&m, crossover);
            }
            Ok(Down::Weights(_)) => panic!("weights before their pass began"),
            Err(_) => return None,
        }
    }
}

pub enum ToStore {
    /// A weight buffer back to the store: the credit for the next fetch.
    Release(Weights),
    Grads {
        step: u64,
        use_index: usize,
        layer: usize,
        len: usize,
        data: Vec<f32>,
    },
    /// A pass's loss sum, from a fabric worker to its up link (the store never sees it).
    Stats {
        index: u64,
        sum: f64,
    },
    /// The dense weight gradients of the sparse tensors over a whole step
    /// (per tensor, `None` for dense ones), on the steps that end in a RigL
    /// update: after the step's last gradients.
    DenseGrads {
        step: u64,
        grads: Vec<Option<Vec<f32>>>,
    },
    /// The pass cannot complete (the fabric lost a member): drop its
    /// gradients. Only an abort of the current `epoch` (tree) counts.
    Abort {
        epoch: u64,
        reason: String,
    },
}

/// Why a store pass ended early.
pub(crate) enum PassEnd {
    Failed(String),
    Aborted(String),
}

impl From<String> for PassEnd {
    fn from(e: String) -> PassEnd {
        PassEnd::Failed(e)
    }
}

pub(crate) enum Control {
    Train {
        step: u64,
        lr: f64,
    },
    Eval {
        batches: usize,
    },
    Checkpoint {
        dir: PathBuf,
        run_toml: String,
    },
    Snapshot,
    Masks,
    /// A new tree: its workers' schedule, the contributions per step, and its epoch.
    Reshape {
        train: Schedule,
        micro_batches: usize,
        epoch: u64,
    },
}

pub(crate) enum Reply {
    StepDone {
        grad_norm: f64,
    },
    EvalDone,
    Checkpointed(Manifest),
    Snapshot(Box<(Params, Params, Params)>),
    Masks(Masks),
    /// The pass was aborted and its gradients dropped; the store is as before it.
    Aborted(String),
    Reshaped,
    Failed(String),
}

/// Where the store keeps its slabs and how much DRAM it may use.
pub struct StoreSetup {
    pub dir: PathBuf,
    pub dram_bytes: u64,
}

/// Bytes of DRAM the whole model state (weights, gradients, two moments) takes in the store.
/// (Sparse tensors: their nonzeros only.)
pub fn model_state_bytes(spec: &ModelSpec) -> u64 {
    16 * spec.stored_count() as u64
}

/// Worker memory for a micro-batch of `mb` sequences: weights in flight and
/// in use, gradient buffers, the bf16 decode buffer, activations.
pub fn worker_bytes(spec: &ModelSpec, mb: usize, t: usize, prefetch_depth: usize, dtype: Precision) -> u64 {
    let max_layer = max_layer_params(spec) as u64;
    let buffers = (prefetch_depth as u64 + 1) * max_layer;
    let weight_bytes = match dtype {
        Precision::Fp32 => 4 * buffers,
        Precision::Bf16 => 2 * buffers + 4 * max_layer,
    };
    // The sparse tensors' patterns (three u32 per nonzero, two offsets per row
    // and column) and the sparse products' scratch.
    let patterns: usize =
        spec.tensors.iter().filter(|t| t.is_sparse()).map(|t| 12 * t.len() + 4 * (t.shape[0] + t.shape[1] + 2)).sum();
    weight_bytes
        + 4 * buffers
        + Workspace::bytes_for(spec, mb, t) as u64
        + (patterns + Workspace::sparse_bytes_for(spec, mb, t)) as u64
}

/// Floats of the largest layer's weights as streamed.
pub fn max_layer_params(spec: &ModelSpec) -> usize {
    let layout = Layout::new(spec, ws_store::PAGE_PARAMS_DEFAULT);
    (0..spec.layer_count()).map(|l| layout.layer_params(spec, l)).max().unwrap_or(0)
}

/// The micro-batch size: the configured one, or else the largest divisor of
/// the batch whose worker memory fits `worker.memory_bytes` (0: no limit).
pub fn choose_micro_batch(config: &RunConfig, spec: &ModelSpec) -> Result<usize, TrainError> {
    // Each worker's share of the batch.
    let (b, t, k) = (config.train.batch_size / config.fabric.workers, config.seq_len(), config.stream.prefetch_depth);
    let dtype = Precision::parse(&config.stream.dtype).expect("validated");
    let limit = config.worker.memory_bytes;
    // RigL's update steps sum the dense gradient of every sparse matrix.
    let rigl: u64 = if config.sparsity.dynamic == "rigl" {
        spec.tensors.iter().filter(|t| t.is_sparse()).map(|t| 4 * t.numel() as u64).sum()
    } else {
        0
    };
    let worker_bytes = |mb: usize| worker_bytes(spec, mb, t, k, dtype) + rigl;
    let fits = |mb: usize| limit == 0 || worker_bytes(mb) <= limit;
    if config.train.micro_batch != 0 {
        let mb = config.train.micro_batch;
        if !fits(mb) {
            return Err(TrainError::Config(format!(
                "train.micro_batch = {mb} needs {} bytes of worker memory, above worker.memory_bytes = {limit}",
                worker_bytes(mb)
            )));
        }
        return Ok(mb);
    }
    (1..=b).rev().filter(|mb| b % mb == 0).find(|&mb| fits(mb)).ok_or_else(|| {
        TrainError::Config(format!(
            "one sequence of {t} tokens needs {} bytes of worker memory (weights in flight, activations), \
             above worker.memory_bytes = {limit}: raise it, shorten train.seq_len or lower stream.prefetch_depth",
            worker_bytes(1)
        ))
    })
}

pub(crate) struct StoreThread {
    pub(crate) store: Store,
    pub(crate) to_worker: Sender<Down>,
    pub(crate) from_worker: Receiver<ToStore>,
    pub(crate) grad_return: Sender<Vec<f32>>,
    pub(crate) free: Vec<Weights>,
    pub(crate) buffers: usize,
    pub(crate) dtype: Precision,
    pub(crate) train: Schedule,
    pub(crate) eval: Schedule,
    /// The tree the store is serving (see `ToStore::Abort`).
    pub(crate) epoch: u64,
    /// The version of the masks the workers of this tree hold.
    pub(crate) masks_sent: Option<u64>,
    pub(crate) dynamic: Option<Dynamic>,
    /// The step's dense gradients of the sparse tensors (RigL), once in.
    pub(crate) dense_grads: Option<Vec<Option<Vec<f32>>>>,
    /// The run's configuration when its sparsity ramps up (the model at each step).
    pub(crate) ramp: Option<RunConfig>,
}

impl StoreThread {
    pub(crate) async fn run(mut self, control: Receiver<Control>, reply: Sender<Reply>) -> Store {
        while let Ok(c) = control.recv_async().await {
            let r = match c {
                Control::Train { step, lr } => match self.pass(true, step).await {
                    Ok(()) => {
                        let grad_norm = self.store.finish_step(lr);
                        self.ramp().and_then(|_| self.prune_regrow()).map(|_| Reply::StepDone { grad_norm })
                    }
                    Err(PassEnd::Aborted(why)) => {
                        self.dense_grads = None;
                        self.store.abandon_step().map(|_| Reply::Aborted(why)).map_err(|e| e.to_string())
                    }
                    Err(PassEnd::Failed(e)) => Err(e),
                },
                Control::Eval { batches } => {
                    let mut done = Ok(());
                    for i in 0..batches as u64 {
                        done = self.pass(false, i).await;
                        if done.is_err() {
                            break;
                        }
                    }
                    match done {
                        Ok(()) => Ok(Reply::EvalDone),
                        Err(PassEnd::Aborted(why)) => Ok(Reply::Aborted(why)),
                        Err(PassEnd::Failed(e)) => Err(e),
                    }
                }
                Control::Reshape { train, micro_batches, epoch } => {
                    self.store.set_micro_batches(micro_batches);
                    self.store.set_access_sequence(&train.layer_sequence());
                    self.train = train;
                    self.epoch = epoch;
                    // The new tree's workers have no masks yet.
                    self.masks_sent = None;
                    Ok(Reply::Reshaped)
                }
                Control::Checkpoint { dir, run_toml } => {
                    self.store.checkpoint(&dir, &run_toml).map(Reply::Checkpointed).map_err(|e| e.to_string())
                }
                Control::Snapshot => {
                    self.store.snapshot().map(|s| Reply::Snapshot(Box::new(s))).map_err(|e| e.to_string())
                }
                Control::Masks => Ok(Reply::Masks(self.store.masks().clone())),
            };
            let failed = r.is_err();
            if reply.send(r.unwrap_or_else(Reply::Failed)).is_err() || failed {
                break;
            }
        }
        self.store
    }

    fn handle(&mut self, m: ToStore, sched: &Schedule, step: u64, grads_left: &mut usize) -> Result<(), PassEnd> {
        match m {
            ToStore::Release(w) => self.free.push(w),
            ToStore::Grads { step: s, use_index, layer, len, data } => {
                let u = sched.uses[use_index];
                assert!(s == step && u.layer == layer && sched.sends(use_index), "gradients out of schedule");
                self.store.accumulate(layer, &data[..len]).map_err(|e| PassEnd::Failed(e.to_string()))?;
                *grads_left -= 1;
                let _ = self.grad_return.send(data);
            }
            ToStore::DenseGrads { step: s, grads } => {
                assert!(s == step && self.dense_grads.is_none(), "dense gradients out of schedule");
                self.dense_grads = Some(grads);
            }
            ToStore::Stats { .. } => unreachable!("statistics end at the fabric's root"),
            ToStore::Abort { epoch, reason } if epoch == self.epoch => return Err(PassEnd::Aborted(reason)),
            // An abort of a tree already replaced.
            ToStore::Abort { .. } => {}
        }
        Ok(())
    }

    /// Sends every use's weights of one pass and takes its gradients; `index`
    /// is the step (training) or the evaluation pass.
    async fn pass(&mut self, training: bool, index: u64) -> Result<(), PassEnd> {
        let sched = if training { self.train.clone() } else { self.eval.clone() };
        let step = if training { index } else { u64::MAX };
        let masks = self.store.masks();
        if masks.is_sparse() && self.masks_sent != Some(masks.version) {
            self.masks_sent = Some(masks.version);
            self.to_worker.send(Down::Masks(masks.clone())).map_err(|_| "worker stopped".to_string())?;
        }
        self.to_worker.send(Down::Begin(PassStart { training, index })).map_err(|_| "worker stopped".to_string())?;
        let dense_grads = training && self.dynamic.is_some_and(|d| d.needs_dense_grads(step));
        let mut grads_left = sched.gradient_messages();
        for j in sched.fetch_uses() {
            let u = sched.uses[j];
            let mut buf = loop {
                if let Some(b) = self.free.pop() {
                    break b;
                }
                let m = self.from_worker.recv_async().await.map_err(|_| "worker stopped".to_string())?;
                self.handle(m, &sched, step, &mut grads_left)?;
            };
            let len = self.store.layout().layer_params(self.store.spec(), u.layer);
            match (&mut buf, self.dtype) {
                (Weights::F32(v), _) => self.store.read_layer(u.layer, &mut v[..len]).map_err(|e| e.to_string())?,
                (Weights::Bf16(v), _) => {
                    self.store.read_layer_bf16(u.layer, &mut v[..len]).map_err(|e| e.to_string())?
                }
            }
            let msg = WeightMsg { step, use_index: j, layer: u.layer, version: self.store.version, len, data: buf };
            self.to_worker.send(Down::Weights(msg)).map_err(|_| "worker stopped".to_string())?;
            while let Ok(m) = self.from_worker.try_recv() {
                self.handle(m, &sched, step, &mut grads_left)?;
            }
        }
        while grads_left > 0 || self.free.len() < self.buffers || (dense_grads && self.dense_grads.is_none()) {
            let m = self.from_worker.recv_async().await.map_err(|_| "worker stopped".to_string())?;
            self.handle(m, &sched, step, &mut grads_left)?;
        }
        Ok(())
    }

    /// A stage of the sparsity ramp after the step just finished, when one falls here.
    fn ramp(&mut self) -> Result<(), String> {
        let Some(config) = &self.ramp else { return Ok(()) };
        let next = config.model_spec_at(self.store.version).map_err(|e| e.to_string())?;
        if next.tensors.iter().zip(&self.store.spec().tensors).all(|(a, b)| a.nnz == b.nnz) {
            return Ok(());
        }
        self.store.relayout(&next, |_, p, w, nnz| shrink(p, w, nnz)).map_err(|e| e.to_string())
    }

    /// Dynamic sparsity's update after the step just finished, when due.
    fn prune_regrow(&mut self) -> Result<(), String> {
        let completed = self.store.version;
        let Some(d) = self.dynamic.filter(|d| d.due(completed)) else { return Ok(()) };
        let grads = self.dense_grads.take();
        self.store
            .prune_regrow(|t, p, w| d.choose(completed, t, p, w, grads.as_ref().and_then(|g| g[t].as_deref())))
            .map_err(|e| e.to_string())
    }
}

/// The worker-facing ends of a running store thread.
pub(crate) struct StoreEnds {
    pub control: Sender<Control>,
    pub reply: Receiver<Reply>,
    /// Pass starts and weights, in schedule order.
    pub weights: Receiver<Down>,
    /// Released weight buffers and gradients back to the store.
    pub to_store: Sender<ToStore>,
    /// Gradient buffers to fill (k+1 of them circulate).
    pub grad_pool: Receiver<Vec<f32>>,
    /// Where a gradient buffer goes back to that pool without reaching the store.
    pub grad_return: Sender<Vec<f32>>,
}

/// The store's loop before it starts, with the thread pool it computes in.
pub(crate) struct StoreTask {
    thread: StoreThread,
    control: Receiver<Control>,
    reply: Sender<Reply>,
    pool: rayon::ThreadPool,
}

impl StoreTask {
    /// Runs the loop on a thread of its own, inside its pool.
    pub fn spawn(self) -> Result<JoinHandle<Store>, TrainError> {
        let StoreTask { thread, control, reply, pool } = self;
        std::thread::Builder::new()
            .name("store".into())
            .spawn(move || pool.install(move || pollster::block_on(thread.run(control, reply))))
            .map_err(|e| TrainError::Config(format!("cannot start the store thread: {e}")))
    }

    /// Starts the loop where `exec` runs loops. The simulator runs it on
    /// its one thread, where the store's parallel loops use rayon's global
    /// pool.
    pub fn start(self, exec: &Exec) -> Result<Task<Store>, TrainError> {
        match exec {
            Exec::Threads => self.spawn().map(Task::Thread),
            Exec::Sim(_) => exec.spawn("store".into(), move || self.thread.run(self.control, self.reply)),
        }
    }
}

/// Starts the store thread (in its own thread pool of `store.threads`)
/// with k+1 weight and gradient buffers.
pub(crate) fn spawn_store(
    config: &RunConfig,
    store: Store,
    train: &Schedule,
    eval: &Schedule,
) -> Result<(StoreEnds, JoinHandle<Store>), TrainError> {
    let (ends, task) = store_task(config, store, train, eval)?;
    Ok((ends, task.spawn()?))
}

/// The store's ends and its loop, not started.
pub(crate) fn store_task(
    config: &RunConfig,
    store: Store,
    train: &Schedule,
    eval: &Schedule,
) -> Result<(StoreEnds, StoreTask), TrainError> {
    let k = config.stream.prefetch_depth;
    let dtype = Precision::parse(&config.stream.dtype).expect("validated");
    let max_layer = max_layer_params(store.spec());
    let spec = store.spec().clone();
    let buffers = k + 1;
    let free = (0..buffers)
        .map(|_| match dtype {
            Precision::Fp32 => Weights::F32(vec![0f32; max_layer]),
            Precision::Bf16 => Weights::Bf16(vec![0u16; max_layer]),
        })
        .collect();
    let (to_worker, weights) = unbounded();
    let (to_store, from_worker) = unbounded();
    let (grad_return, grad_pool) = bounded(buffers);
    for _ in 0..buffers {
        grad_return.send(vec![0f32; max_layer]).expect("room for every buffer");
    }
    let (control, control_rx) = unbounded();
    let (reply_tx, reply) = unbounded();
    let thread = StoreThread {
        store,
        to_worker,
        from_worker,
        grad_return: grad_return.clone(),
        free,
        buffers,
        dtype,
        train: train.clone(),
        eval: eval.clone(),
        epoch: 0,
        masks_sent: None,
        dynamic: Dynamic::new(config, &spec),
        dense_grads: None,
        ramp: (config.sparsity.ramp_steps > 0).then(|| config.clone()),
    };
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = if config.store.threads == 0 { cores } else { config.store.threads };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("store-{i}"))
        .build()
        .map_err(|e| TrainError::Config(format!("cannot start the store's threads: {e}")))?;
    let task = StoreTask { thread, control: control_rx, reply: reply_tx, pool };
    Ok((StoreEnds { control, reply, weights, to_store, grad_pool, grad_return }, task))
}

/// The driver's side of the store thread: requests and their replies.
pub(crate) struct StoreControl {
    pub control: Sender<Control>,
    pub reply: Receiver<Reply>,
    /// Where the store runs (the simulator runs it while the driver waits).
    pub exec: Exec,
}

impl StoreControl {
    /// Why the store stopped (its reply says).
    pub fn failure(&self) -> TrainError {
        match self.exec.recv(&self.reply, None) {
            Ok(Reply::Failed(e)) => TrainError::Config(e),
            _ => TrainError::Config("the store stopped unexpectedly".into()),
        }
    }

    pub fn send(&self, c: Control) -> Result<(), TrainError> {
        self.control.send(c).map_err(|_| self.failure())
    }

    pub fn recv_reply(&self) -> Result<Reply, TrainError> {
        Ok(self.reply_within(None)?.expect("no time limit"))
    }

    /// The store's next reply, waiting at most `limit` (`None`: no
    /// limit); `Ok(None)` when the limit passed first.
    pub fn reply_within(&self, limit: Option<std::time::Duration>) -> Result<Option<Reply>, TrainError> {
        match self.exec.recv(&self.reply, limit) {
            Ok(Reply::Failed(e)) => Err(TrainError::Config(e)),
            Ok(r) => Ok(Some(r)),
            Err(flume::RecvTimeoutError::Timeout) => Ok(None),
            Err(flume::RecvTimeoutError::Disconnected) => {
                Err(TrainError::Config("the store stopped unexpectedly".into()))
            }
        }
    }

    /// A resumable checkpoint of the store at `step`, under `run_dir`.
    pub fn checkpoint(&self, run_dir: &Path, run_toml: String, step: u64) -> Result<PathBuf, TrainError> {
        let dir = run_dir.join("checkpoint");
        self.send(Control::Checkpoint { dir: dir.clone(), run_toml })?;
        let Reply::Checkpointed(m) = self.recv_reply()? else { unreachable!("the store answers with Checkpointed") };
        assert_eq!(m.step, step, "the store checkpointed another step than the worker's");
        Ok(dir)
    }

    pub fn params(&self) -> Result<Params, TrainError> {
        self.send(Control::Snapshot)?;
        let Reply::Snapshot(s) = self.recv_reply()? else { unreachable!("the store answers with Snapshot") };
        Ok(s.0)
    }

    pub fn masks(&self) -> Result<Masks, TrainError> {
        self.send(Control::Masks)?;
        let Reply::Masks(m) = self.recv_reply()? else { unreachable!("the store answers with Masks") };
        Ok(m)
    }

    /// Closes the control channel (the store thread then ends).
    pub fn close(&mut self) {
        drop(std::mem::replace(&mut self.control, unbounded().0));
    }
}

/// A trainer whose weights live in a [`Store`] on another thread.
pub struct StreamingTrainer {
    pub config: RunConfig,
    pub spec: ModelSpec,
    cpu: CpuWorker,
    micro_batch: usize,
    train: Schedule,
    eval: Schedule,
    step: u64,
    store_control: StoreControl,
    weights: Receiver<Down>,
    to_store: Sender<ToStore>,
    grad_pool: Receiver<Vec<f32>>,
    store: Option<JoinHandle<Store>>,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    /// The GPU that computes in place of `workspace` (train.device = "cuda").
    #[cfg(feature = "cuda")]
    gpu: Option<crate::gpu::GpuStreamWorker>,
}

impl StreamingTrainer {
    /// Starts the store thread over `store` (fresh, or restored at `store.version`).
    pub fn start(config: RunConfig, store: Store) -> Result<StreamingTrainer, TrainError> {
        let micro_batch = choose_micro_batch(&config, store.spec())?;
        let train = Schedule::new(store.spec().layer_count(), config.train.batch_size / micro_batch, true);
        StreamingTrainer::start_with(config, store, micro_batch, train)
    }

    /// [`Self::start`] with the micro-batch and the training schedule chosen
    /// by the caller (the store counts the schedule's contributions).
    pub fn start_with(
        config: RunConfig,
        mut store: Store,
        micro_batch: usize,
        train: Schedule,
    ) -> Result<StreamingTrainer, TrainError> {
        config.validate()?;
        if config.store.direct_io && !store.direct_io_active() {
            tracing::warn!("store.direct_io: this file system refuses O_DIRECT; the flash tier's I/O is buffered");
        }
        let spec = store.spec().clone();
        let layers = spec.layer_count();
        assert_eq!(train.micro_batches * micro_batch, config.train.batch_size, "the schedule covers the batch");
        let eval = Schedule::new(layers, 1, false);
        store.set_micro_batches(train.contributions());
        store.set_access_sequence(&train.layer_sequence());
        let version = store.version;
        let (StoreEnds { control, reply, weights, to_store, grad_pool, .. }, handle) =
            spawn_store(&config, store, &train, &eval)?;
        let cpu = if config.train.device == "cuda" {
            // The GPU computes; this CPU workspace stays unused (and fp32:
            // a GPU machine need not have oneDNN for CPU bf16).
            CpuWorker::idle(&spec)
        } else {
            CpuWorker::new(&spec, micro_batch, config.seq_len(), &config)
        };
        Ok(StreamingTrainer {
            micro_batch,
            train,
            eval,
            step: version,
            store_control: StoreControl { control, reply, exec: Exec::Threads },
            weights,
            to_store,
            grad_pool,
            store: Some(handle),
            inputs: Vec::new(),
            targets: Vec::new(),
            cpu,
            config,
            spec,
            #[cfg(feature = "cuda")]
            gpu: None,
        })
    }

    /// Streams onto the GPU: a trainer whose worker computes on `gpu`.
    #[cfg(feature = "cuda")]
    pub fn start_on_gpu(
        config: RunConfig,
        store: Store,
        micro_batch: usize,
        gpu: ws_cuda::Gpu,
        plan: crate::gpu::WorkerPlan,
    ) -> Result<StreamingTrainer, TrainError> {
        let (t, spec) = (config.seq_len(), store.spec().clone());
        let micro_batches = config.train.batch_size / micro_batch;
        let train =
            Schedule::new(spec.layer_count(), micro_batches, true).for_worker(plan.keep_weights, plan.sum_gradients);
        let worker = crate::gpu::GpuStreamWorker::new(gpu, &spec, micro_batch, t, &config, &train)?;
        let mut trainer = StreamingTrainer::start_with(config, store, micro_batch, train)?;
        trainer.gpu = Some(worker);
        Ok(trainer)
    }

    pub fn micro_batch(&self) -> usize {
        self.micro_batch
    }

    fn failure(&self) -> TrainError {
        self.store_control.failure()
    }

    /// Runs one pass of `sched` over `inputs`/`targets` (B*T each); returns the loss sum.
    fn run_pass(
        &mut self,
        training: bool,
        index: u64,
        inputs: &[u32],
        targets: &[u32],
        dloss_scale: f32,
    ) -> Result<f64, TrainError> {
        let crossover = self.config.sparsity.kernel_density_max;
        match pollster::block_on(recv_begin(&self.weights, &mut self.cpu.workspace, &mut self.spec, crossover)) {
            Some(p) => assert_eq!(p, PassStart { training, index }, "the store began another pass"),
            None => return Err(self.failure()),
        }
        let sched = if training { &self.train } else { &self.eval };
        let step = if training { index } else { u64::MAX };
        let (t, mb) = (self.config.seq_len(), self.micro_batch);
        #[cfg(feature = "cuda")]
        if let Some(g) = self.gpu.as_mut() {
            let (w, ts, gp) = (&self.weights, &self.to_store, &self.grad_pool);
            return match g.run_pass(&self.spec, sched, step, inputs, targets, mb, t, dloss_scale, w, ts, gp) {
                Ok(loss) => Ok(loss),
                // The store's own error says why it stopped.
                Err(crate::gpu::PassError::StoreStopped) => Err(self.failure()),
                Err(crate::gpu::PassError::Gpu(e)) => Err(e),
            };
        }
        let io =
            PassIo { weights: &self.weights, to_store: &self.to_store, grad_pool: &self.grad_pool, stats_index: None };
        match pollster::block_on(self.cpu.pass(&self.spec, sched, step, inputs, targets, mb, t, dloss_scale, &io)) {
            Ok(loss) => Ok(loss),
            Err(StoreStopped) => Err(self.failure()),
        }
    }

    /// Stops the store thread and returns the store.
    pub fn into_store(mut self) -> Store {
        let handle = self.store.take().expect("running");
        drop(self);
        handle.join().expect("the store thread does not panic")
    }
}

impl Drop for StreamingTrainer {
    /// Closes the channels so the store thread ends, and waits for it (its
    /// files are closed when this returns).
    fn drop(&mut self) {
        // The GPU worker unpins the store's buffers while they still exist.
        #[cfg(feature = "cuda")]
        drop(self.gpu.take());
        if let Some(handle) = self.store.take() {
            self.store_control.close();
            drop(std::mem::replace(&mut self.to_store, unbounded().0));
            drop(std::mem::replace(&mut self.weights, unbounded().1));
            let _ = handle.join();
        }
    }
}

/// The channels a worker's pass runs over.
pub(crate) struct PassIo<'a> {
    pub weights: &'a Receiver<Down>,
    pub to_store: &'a Sender<ToStore>,
    pub grad_pool: &'a Receiver<Vec<f32>>,
    /// Send the loss sum as `Stats` with this index once the last head use
    /// is done, before the gradients of the backward uses (fabric workers:
    /// a step whose every gradient arrived has its loss too).
    pub stats_index: Option<u64>,
}

/// The store (or the link towards it) went away mid-pass.
#[derive(Debug)]
pub(crate) struct StoreStopped;

/// The CPU half of a streaming worker: its workspace, and the buffer that
/// bf16 weights are widened into.
pub(crate) struct CpuWorker {
    pub workspace: Workspace,
    decoded: Vec<f32>,
    dynamic: Option<Dynamic>,
    pub waits: WeightWaits,
}

impl CpuWorker {
    pub fn new(spec: &ModelSpec, micro_batch: usize, t: usize, config: &RunConfig) -> CpuWorker {
        let mut workspace = Workspace::new(spec, micro_batch, t);
        workspace.set_precision(Precision::parse(&config.train.precision).expect("validated"));
        let bf16 = Precision::parse(&config.stream.dtype).expect("validated") == Precision::Bf16;
        let decoded = if bf16 { vec![0f32; max_layer_params(spec)] } else { Vec::new() };
        CpuWorker { workspace, decoded, dynamic: Dynamic::new(config, spec), waits: WeightWaits::default() }
    }

    /// A placeholder for engines that compute elsewhere (the GPU worker):
    /// a one-token fp32 workspace, never run.
    pub fn idle(spec: &ModelSpec) -> CpuWorker {
        CpuWorker {
            workspace: Workspace::new(spec, 1, 1),
            decoded: Vec::new(),
            dynamic: None,
            waits: WeightWaits::default(),
        }
    }

    /// The worker's side of one pass (after its `Begin`): takes each use's
    /// weights, computes, sends gradients up and releases the weights.
    /// Returns the loss sum over `inputs`.
    #[allow(clippy::too_many_arguments)]
    pub async fn pass(
        &mut self,
        spec: &ModelSpec,
        sched: &Schedule,
        step: u64,
        inputs: &[u32],
        targets: &[u32],
        mb: usize,
        t: usize,
        dloss_scale: f32,
        io: &PassIo<'_>,
    ) -> Result<f64, StoreStopped> {
        assert!(
            !sched.keep_weights && !sched.sum_gradients,
            "the CPU worker fetches every use and sends every gradient"
        );
        let training = sched.training;
        let last_head = sched.uses.iter().rposition(|u| u.pass == Pass::Head).expect("a pass has a head");
        let mut loss = 0f64;
        let dense_grads = training && self.dynamic.is_some_and(|d| d.needs_dense_grads(step));
        if dense_grads {
            self.workspace.capture_dense_grads(spec);
        }
        for (j, u) in sched.uses.iter().enumerate() {
            // A use that needs no weights (the embedding's backward) gets none.
            let msg = match sched.needs_weights(j) {
                true => {
                    let msg = self.waits.recv_async(io.weights, j == 0).await.ok_or(StoreStopped)?;
                    msg.expect_use(step, j, u.layer);
                    Some(msg)
                }
                false => None,
            };
            let views = match msg.as_ref().map(|m| (&m.data, m.len)) {
                None => Vec::new(),
                Some((Weights::F32(v), len)) => split(spec, u.layer, &v[..len]),
                Some((Weights::Bf16(v), len)) => {
                    for (d, &s) in self.decoded[..len].iter_mut().zip(&v[..len]) {
                        *d = from_bf16(s);
                    }
                    split(spec, u.layer, &self.decoded[..len])
                }
            };
            let x = &inputs[u.micro * mb * t..(u.micro + 1) * mb * t];
            let y = &targets[u.micro * mb * t..(u.micro + 1) * mb * t];
            let ws = &mut self.workspace;
            match u.pass {
                Pass::Forward => ws.forward(spec, u.layer, &views, x, mb, t),
                Pass::Head | Pass::Backward if !training => {
                    loss += ws.head(spec, &views, None, y, mb, t, 0.0);
                }
                Pass::Head | Pass::Backward => {
                    let mut g = io.grad_pool.recv_async().await.map_err(|_| StoreStopped)?;
                    let len = spec.layer_len(u.layer);
                    g[..len].fill(0.0);
                    {
                        let mut gv = split_mut(spec, u.layer, &mut g[..len]);
                        if u.pass == Pass::Head {
                            loss += ws.head(spec, &views, Some(&mut gv), y, mb, t, dloss_scale);
                        } else {
                            ws.backward(spec, u.layer, &views, &mut gv, x, mb, t);
                        }
                    }
                    let grads = ToStore::Grads { step, use_index: j, layer: u.layer, len, data: g };
                    io.to_store.send(grads).map_err(|_| StoreStopped)?;
                }
            }
            if let Some(msg) = msg {
                io.to_store.send(ToStore::Release(msg.data)).map_err(|_| StoreStopped)?;
            }
            if let (true, Some(index)) = (j == last_head, io.stats_index) {
                io.to_store.send(ToStore::Stats { index, sum: loss }).map_err(|_| StoreStopped)?;
            }
        }
        if dense_grads {
            let grads = self.workspace.take_dense_grads().expect("captured since the pass began");
            io.to_store.send(ToStore::DenseGrads { step, grads }).map_err(|_| StoreStopped)?;
        }
        Ok(loss)
    }
}

/// Views of a layer's concatenated tensors.
fn split<'a>(spec: &ModelSpec, layer: usize, mut w: &'a [f32]) -> Vec<&'a [f32]> {
    spec.layers[layer]
        .tensors
        .iter()
        .map(|&t| {
            let (a, b) = w.split_at(spec.tensors[t].len());
            w = b;
            a
        })
        .collect()
}

fn split_mut<'a>(spec: &ModelSpec, layer: usize, mut w: &'a mut [f32]) -> Vec<&'a mut [f32]> {
    spec.layers[layer]
        .tensors
        .iter()
        .map(|&t| {
            let (a, b) = std::mem::take(&mut w).split_at_mut(spec.tensors[t].len());
            w = b;
            a
        })
        .collect()
}

impl Engine for StreamingTrainer {
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
        self.store_control.send(Control::Train { step: self.step, lr })?;
        let (mut inputs, mut targets) = (std::mem::take(&mut self.inputs), std::mem::take(&mut self.targets));
        sample_batch(train, b, t, self.config.train.seed, TRAIN_STREAM, self.step, &mut inputs, &mut targets);
        let step = self.step;
        let loss = self.run_pass(true, step, &inputs, &targets, 1.0 / (b * t) as f32);
        (self.inputs, self.targets) = (inputs, targets);
        let loss = loss? / (b * t) as f64;
        let Reply::StepDone { grad_norm } = self.store_control.recv_reply()? else {
            unreachable!("the store answers a step with StepDone")
        };
        self.step += 1;
        if self.config.sparsity.ramp_steps > 0 {
            // The model this step left (a stage of the sparsity ramp changes it).
            self.spec = self.config.model_spec_at(self.step)?;
        }
        Ok(StepStats { step: self.step, loss, lr, grad_norm, tokens: b * t, seconds: start.elapsed().as_secs_f64() })
    }

    #[cfg(feature = "cuda")]
    fn worker_plan(&self) -> Option<crate::gpu::WorkerPlan> {
        self.gpu.as_ref().map(|g| g.plan())
    }

    fn take_weight_waits(&mut self) -> Option<WeightWaits> {
        #[cfg(feature = "cuda")]
        if let Some(g) = self.gpu.as_mut() {
            return Some(std::mem::take(&mut g.waits));
        }
        Some(std::mem::take(&mut self.cpu.waits))
    }

    fn evaluate(&mut self, tokens: &[u16], batches: usize) -> Result<f64, TrainError> {
        let (b, t) = (self.micro_batch, self.config.seq_len());
        self.store_control.send(Control::Eval { batches })?;
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        let mut sum = 0f64;
        for i in 0..batches {
            sample_batch(tokens, b, t, self.config.train.seed, VAL_STREAM, i as u64, &mut inputs, &mut targets);
            sum += self.run_pass(false, i as u64, &inputs, &targets, 0.0)?;
        }
        let Reply::EvalDone = self.store_control.recv_reply()? else {
            unreachable!("the store answers an evaluation with EvalDone")
        };
        Ok(sum / (batches * b * t) as f64)
    }

    fn checkpoint(&mut self, run_dir: &Path) -> Result<PathBuf, TrainError> {
        self.store_control.checkpoint(run_dir, self.config.to_toml(), self.step)
    }

    fn params(&mut self) -> Result<Params, TrainError> {
        self.store_control.params()
    }
    fn masks(&mut self) -> Result<ws_model::Masks, TrainError> {
        self.store_control.masks()
    }
}

/// The optimizer settings the store applies.
pub fn optimizer_config(config: &RunConfig) -> OptimizerConfig {
    let t = &config.train;
    OptimizerConfig {
        beta1: t.beta1 as f32,
        beta2: t.beta2 as f32,
        eps: t.eps as f32,
        weight_decay: t.weight_decay as f32,
        grad_clip: t.grad_clip,
    }
}

/// The DRAM budget of the store for this config: `store.dram_bytes`, else
/// `store.dram_fraction` of the model state.
pub fn dram_budget(config: &RunConfig, spec: &ModelSpec) -> u64 {
    if config.store.dram_bytes > 0 {
        config.store.dram_bytes
    } else {
        (model_state_bytes(spec) as f64 * config.store.dram_fraction).ceil() as u64
    }
}

/// The store's layout and limits for this config.
pub fn store_config(config: &RunConfig, spec: &ModelSpec, micro_batches: usize) -> StoreConfig {
    StoreConfig {
        dram_budget: dram_budget(config, spec),
        page_params: (config.store.page_bytes / 16).max(1) as usize,
        optimizer: optimizer_config(config),
        micro_batches,
        direct_io: config.store.direct_io,
    }
}

/// A fresh store in `dir` initialised from the config's seed, one slab at a
/// time (the whole model never sits in memory), or from `train.init_from`.
pub fn create_store(
    config: &RunConfig,
    spec: &ModelSpec,
    dir: &Path,
    micro_batches: usize,
) -> Result<Store, TrainError> {
    let sc = store_config(config, spec, micro_batches);
    let err = |e: ws_store::StoreError| TrainError::Config(e.to_string());
    if !config.train.init_from.is_empty() {
        let (params, masks) = crate::trainer::initial_weights(config, spec)?;
        let mut store = Store::create(spec, &params, None, 0, dir, sc).map_err(err)?;
        store.set_masks(masks).expect("the masks of this spec");
        return Ok(store);
    }
    let layout = Layout::new(spec, sc.page_params);
    // Each tensor's initial values are drawn in order, page by page; a
    // tensor lives in one slab, so the slabs are drawn in parallel.
    let mut store = Store::create_parallel(spec, 0, dir, sc, |s| {
        let (layout, mut init) = (&layout, None::<(usize, ws_model::params::TensorInit)>);
        move |p0, p1, page: &mut [f32]| {
            for (t, off, lo, hi) in layout.tensors_in(spec, s, p0, p1) {
                if init.as_ref().is_none_or(|(it, _)| *it != t) {
                    assert_eq!(lo, off, "a tensor's first page comes first");
                    init = Some((t, ws_model::params::TensorInit::new(spec, t, config.train.seed)));
                }
                init.as_mut().expect("set above").1.fill_next(&mut page[lo - p0..hi - p0]);
            }
            Ok(())
        }
    })
    .map_err(err)?;
    if spec.is_sparse() {
        store.set_masks(Masks::init(spec, config.train.seed)).expect("the masks of this spec");
    }
    Ok(store)
}
