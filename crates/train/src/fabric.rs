//! Data-parallel training through the broadcast-reduce fabric (DESIGN.md,
//! "The fabric"): one store, N workers, and the tree of `ws_fabric` between
//! them, over in-process channels or authenticated TCP.
//!
//! The store loop is the one of single-worker streaming ([`crate::stream`]):
//! it sends a pass start and the schedule's weights, and takes one gradient
//! per gradient use. Here two root loops stand where the worker stood: one
//! cuts the weights into chunks for the tree (and hands each buffer back at
//! once), one puts the tree's summed gradient chunks back together.
//!
//! Each worker is three loops: one that assembles weight chunks into its
//! k+1 weight buffers (the prefetch), one that computes (the same
//! [`CpuWorker`] as single-worker streaming), and one that cuts gradients
//! into chunks. Every loop is an async function: each runs on a thread of
//! its own, or, in the simulator, all run on one thread under a virtual
//! clock (`crate::exec`, docs/fabric.md "The simulator").
//!
//! Worker w trains on sequences [w*B/N, (w+1)*B/N) of every global batch,
//! scaled by 1/(B*T), so the tree's sum is the global gradient. The tree sums in child order, so runs with the same N and
//! fan-out agree bit for bit over every transport; against one worker, only
//! the order of the sum differs.
//!
//! Evaluation pass i has worker w evaluate validation batch i*N + w (of the
//! micro-batch size), so N workers see the batches one worker would.
//!
//! Worker and node processes (`weightstream worker`, `weightstream
//! fabric`) join a store started with `fabric.launch = "join"`; faults are
//! in docs/fabric.md.

use crate::config::RunConfig;
use crate::exec::{Exec, Task};
use crate::optim::learning_rate;
use crate::schedule::Schedule;
use crate::stream::{store_task, Control, CpuWorker, Down, PassIo, Reply, StoreControl, StoreEnds, ToStore};
use crate::stream::{WeightMsg, Weights};
use crate::trainer::{Engine, StepStats, TRAIN_STREAM, VAL_STREAM};
use crate::TrainError;
use flume::{bounded, unbounded, Receiver, Sender};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ws_data::{sample_batch, Split};
use ws_fabric::chunk::{f32_bytes, f32_bytes_mut, frames, u16_bytes, u16_bytes_mut, Assembler, MessageId};
use ws_fabric::rendezvous::Host;
use ws_fabric::tcp::{Listener, TcpOptions};
use ws_fabric::wire::Hello;
use ws_fabric::PassStart;
use ws_fabric::{Dtype, FabricError, Frame, Kind, Link, LinkRx, LinkTx, Tree};
use ws_kernels::Precision;
use ws_model::{Masks, ModelSpec, Params};
use ws_store::Store;

/// One worker's sequences of a pass: B/N*T inputs and targets.
struct Shard {
    inputs: Vec<u32>,
    targets: Vec<u32>,
}

/// Where a worker's sequences come from.
enum Shards {
    /// Dealt by the driver in this process.
    Dealt(Receiver<Shard>),
    /// Sampled by the worker from its own copy of the data, exactly as the
    /// driver would deal them (a worker process).
    Sampled { data: Arc<Split>, worker: usize },
}

impl Shards {
    async fn next(&self, p: PassStart, c: &RunConfig, mb: usize) -> Option<Shard> {
        match self {
            Shards::Dealt(rx) => rx.recv_async().await.ok(),
            Shards::Sampled { data, worker } => {
                let (n, t, seed) = (c.fabric.workers, c.seq_len(), c.train.seed);
                let (mut inputs, mut targets) = (Vec::new(), Vec::new());
                if p.training {
                    let b = c.train.batch_size;
                    sample_batch(&data.train, b, t, seed, TRAIN_STREAM, p.index, &mut inputs, &mut targets);
                    let share = b / n * t;
                    let r = worker * share..(worker + 1) * share;
                    Some(Shard { inputs: inputs[r.clone()].to_vec(), targets: targets[r].to_vec() })
                } else {
                    let index = p.index * n as u64 + *worker as u64;
                    sample_batch(&data.val, mb, t, seed, VAL_STREAM, index, &mut inputs, &mut targets);
                    Some(Shard { inputs, targets })
                }
            }
        }
    }
}

/// How long a child may take to reach its parent while the tree forms.
const CONNECT_DEADLINE: Duration = Duration::from_secs(30);

/// A simulated network in place of the configured transport (tests), and
/// the simulator's single thread and virtual clock for the store, the tree
/// and the workers (`crate::exec`): every link delays each frame by a
/// seeded amount below `max_delay_us` (virtual time; use milliseconds, see
/// `ws_fabric::sim`). While `drops` is above zero, one link of each tree
/// (seeded) drops its connection after a seeded number of frames one way
/// (1 to `drop_within`); the members, all tasks of the simulator, come
/// back, the tree forms again over new links, and the pass is redone.
/// With `crash`, the first drop is a worker's link and that worker is lost
/// for good: the tree forms again with the workers left (the largest count
/// whose batch share divides evenly), as over TCP. With `hang` instead, that
/// worker's connection stalls rather than drops (a hung machine): nothing
/// fails until `fabric.step_timeout_s` of simulated time has passed, then
/// the step is aborted and the worker is lost as with `crash`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Simulated {
    pub seed: u64,
    pub max_delay_us: u64,
    pub drops: u32,
    pub drop_within: u64,
    pub crash: bool,
    pub hang: bool,
}

impl Simulated {
    /// Whether the next fault loses a worker for good.
    fn loses_a_worker(&self) -> bool {
        self.drops > 0 && (self.crash || self.hang)
    }
}

/// Builds the tree's links and starts its nodes on `rt`: returns the store's
/// link (to its one child) and each worker's link (to its parent).
pub fn build_tree(
    tree: &Tree,
    config: &RunConfig,
    rt: &tokio::runtime::Runtime,
) -> Result<(Link, Vec<Link>), TrainError> {
    build_tree_on(tree, config, rt, None)
}

/// [`build_tree`], over a simulated network when `sim` says so.
pub fn build_tree_on(
    tree: &Tree,
    config: &RunConfig,
    rt: &tokio::runtime::Runtime,
    sim: Option<Simulated>,
) -> Result<(Link, Vec<Link>), TrainError> {
    let f = &config.fabric;
    let n = tree.positions.len();
    let name = |p: usize| match tree.positions[p].role {
        ws_fabric::topology::Role::Store => "store".to_string(),
        ws_fabric::topology::Role::Node => format!("node {p}"),
        ws_fabric::topology::Role::Worker(w) => format!("worker {w}"),
    };
    // At each position: the link to its parent, and those to its children in order.
    let mut up: Vec<Option<Link>> = (0..n).map(|_| None).collect();
    let mut down: Vec<Vec<Link>> = (0..n).map(|_| Vec::new()).collect();
    if let Some(s) = sim {
        let _runtime = rt.enter();
        // With drops left, the link above one position (not the store's)
        // drops after some frames one way.
        let cut = (s.drops > 0).then(|| {
            let mut rng = ws_fabric::sim::Rng::new(s.seed ^ 0xD509);
            let r = rng.next_u64();
            let at = if s.loses_a_worker() {
                tree.worker_position((r % tree.workers as u64) as usize)
            } else {
                1 + (r % (n as u64 - 1)) as usize
            };
            let fault = if s.hang { ws_fabric::sim::Fault::Stall } else { ws_fabric::sim::Fault::Drop };
            (at, (1 + rng.next_u64() % s.drop_within.max(1), rng.next_u64() & 1 == 1, fault))
        });
        for (p, pos) in tree.positions.iter().enumerate() {
            for &c in &pos.children {
                let seed = s.seed.wrapping_mul(0x1_0000).wrapping_add(c as u64);
                let cut_after = cut.filter(|&(at, _)| at == c).map(|(_, after)| after);
                let (a, b) = ws_fabric::sim::sim_pair_fault(f.chunks_in_flight, seed, s.max_delay_us, cut_after);
                down[p].push(a);
                up[c] = Some(b);
            }
        }
    } else if f.transport == "inproc" {
        for (p, pos) in tree.positions.iter().enumerate() {
            for &c in &pos.children {
                let (a, b) = ws_fabric::link::inproc_pair(f.chunks_in_flight, &name(p), &name(c));
                down[p].push(a);
                up[c] = Some(b);
            }
        }
    } else {
        let opts = tcp_options(config, true)?;
        let in_store = f.top_in_store && tree.inner_nodes() > 0;
        let (u, d) =
            rt.block_on(tcp_links(tree, &opts, &f.bind, in_store)).map_err(|e| TrainError::Config(e.to_string()))?;
        (up, down) = (u, d);
    }
    for id in tree.nodes() {
        let parent = up[id].take().expect("every node has a parent link");
        let children = std::mem::take(&mut down[id]);
        let who = name(id);
        rt.spawn(async move {
            if let Err(e) = ws_fabric::node::run(parent, children, who.clone()).await {
                tracing::error!("{who}: {e}");
            }
        });
    }
    let root = down[0].pop().expect("the store has one child");
    let workers = (0..tree.workers).map(|w| up[tree.worker_position(w)].take().expect("a worker's link")).collect();
    Ok((root, workers))
}

/// The cluster secret: `fabric.secret_file`, else WEIGHTSTREAM_SECRET, else
/// (only for a tree inside this process) a random one.
pub fn tcp_options(config: &RunConfig, may_invent: bool) -> Result<TcpOptions, TrainError> {
    let f = &config.fabric;
    let secret = if !f.secret_file.is_empty() {
        let s = std::fs::read(&f.secret_file)
            .map_err(|e| TrainError::io("cannot read fabric.secret_file", &f.secret_file, e))?;
        s.trim_ascii().to_vec()
    } else if let Ok(s) = std::env::var("WEIGHTSTREAM_SECRET") {
        s.into_bytes()
    } else if may_invent {
        let mut s = vec![0u8; 32];
        ws_fabric::wire::random_fill(&mut s).map_err(|e| TrainError::Config(e.to_string()))?;
        s
    } else {
        return Err(TrainError::Config(
            "the fabric needs a cluster secret: set fabric.secret_file or WEIGHTSTREAM_SECRET".into(),
        ));
    };
    let opts = TcpOptions {
        secret: Arc::new(secret),
        credits: f.chunks_in_flight,
        payload_max: f.chunk_bytes,
        mac_payload: f.mac_payload,
    };
    opts.check().map_err(|e| TrainError::Config(e.to_string()))?;
    Ok(opts)
}

type Links = (Vec<Option<Link>>, Vec<Vec<Link>>);

/// Every parent listens; every child connects and proves the secret; each
/// parent orders its children by the positions their hellos name. With
/// `top_in_store`, the store's link to the top node (position 1) is in-process.
async fn tcp_links(tree: &Tree, opts: &TcpOptions, bind: &str, top_in_store: bool) -> Result<Links, FabricError> {
    let n = tree.positions.len();
    let parents: Vec<usize> =
        (0..n).filter(|&p| !(tree.positions[p].children.is_empty() || top_in_store && p == 0)).collect();
    let mut addrs = vec![String::new(); n];
    let mut listeners = Vec::new();
    for &p in &parents {
        let l = Listener::bind(bind, opts.clone()).await?;
        addrs[p] = l.local_addr().to_string();
        listeners.push((p, l));
    }
    let mut connecting = Vec::new();
    for c in (1..n).filter(|&c| !(top_in_store && c == 1)) {
        let addr = addrs[tree.positions[c].parent.expect("not the store")].clone();
        let o = opts.clone();
        let hello = Hello { role: 1, position: c as u32 };
        connecting
            .push((c, tokio::spawn(async move { ws_fabric::tcp::connect(&addr, &o, hello, CONNECT_DEADLINE).await })));
    }
    let mut down: Vec<Vec<Link>> = (0..n).map(|_| Vec::new()).collect();
    for (p, l) in listeners {
        let children = &tree.positions[p].children;
        let mut got: Vec<Option<Link>> = (0..children.len()).map(|_| None).collect();
        for _ in 0..children.len() {
            let (link, hello, from) = l.accept().await?;
            let Some(i) = children.iter().position(|&c| c == hello.position as usize) else {
                return Err(FabricError::Protocol(format!(
                    "{from} claims position {}, not a child of {p}",
                    hello.position
                )));
            };
            if got[i].replace(link).is_some() {
                return Err(FabricError::Protocol(format!("two children claim position {}", hello.position)));
            }
        }
        down[p] = got.into_iter().map(|l| l.expect("each child accepted once")).collect();
    }
    let mut up: Vec<Option<Link>> = (0..n).map(|_| None).collect();
    if top_in_store {
        let (a, b) = ws_fabric::link::inproc_pair(opts.credits, "store", "node 1");
        down[0] = vec![a];
        up[1] = Some(b);
    }
    for (c, h) in connecting {
        up[c] = Some(h.await.map_err(|e| FabricError::Io(e.to_string()))??);
    }
    Ok((up, down))
}

/// The fabric's async runtime: two threads carry every link and node of a
/// worker's process (and of the embedded trainer, whose links copy nothing).
pub fn process_runtime() -> Result<tokio::runtime::Runtime, TrainError> {
    runtime_with(2)
}

/// The runtime of a process that forwards to children over the network (a
/// fabric node, or the store when it waits for joiners and may host nodes):
/// one thread per core, at least two. Each child's link writes its own
/// copy of every chunk, and on two threads a node with F children could
/// send only about two links' worth at once (BENCHMARKS.md, session 12: the
/// whole tree on 2 threads moved one stream's worth of bytes on 16 cores).
pub fn forwarding_runtime() -> Result<tokio::runtime::Runtime, TrainError> {
    runtime_with(std::thread::available_parallelism().map_or(2, |n| n.get().max(2)))
}

/// A multi-threaded runtime of `threads` threads for the fabric.
pub fn runtime_with(threads: usize) -> Result<tokio::runtime::Runtime, TrainError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(|e| TrainError::Config(format!("cannot start the fabric's runtime: {e}")))
}

pub fn fabric_error(e: FabricError) -> TrainError {
    TrainError::Config(format!("fabric: {e}"))
}

/// How long the store waits, after a loss, for no further process to rejoin.
const REJOIN_QUIET: Duration = Duration::from_secs(2);
/// How long the threads of a tree that broke in this process may take to end.
const OLD_TREE_ENDS: Duration = Duration::from_secs(30);
/// Attempts at one step (or evaluation) before the run gives up.
const STEP_ATTEMPTS_MAX: usize = 8;

/// `weightstream worker`: joins the store at `store`, loads the run's data,
/// and trains its shard of every step until the store ends the run. When
/// the tree loses a member the worker joins again and takes the place the
/// store assigns. `local` supplies the secret (fabric.secret_file) and
/// nothing else: the run's configuration comes from the store.
pub fn run_worker_process(store: &str, local: &RunConfig, deadline: Duration) -> Result<(), TrainError> {
    let rt = process_runtime()?;
    let opts = tcp_options(local, false)?;
    let role = ws_fabric::rendezvous::ROLE_WORKER;
    let mut data: Option<Arc<Split>> = None;
    loop {
        let a = rt.block_on(ws_fabric::rendezvous::join(store, &opts, role, None, deadline)).map_err(fabric_error)?;
        let mut config = RunConfig::resolve_text(&a.run, &[])?;
        config.fabric.workers = a.workers;
        let tree = Tree::new(a.workers, a.fanout).map_err(TrainError::Config)?;
        let w = (a.position as usize)
            .checked_sub(1 + tree.inner_nodes())
            .filter(|&w| w < tree.workers)
            .ok_or_else(|| TrainError::Config(format!("the store assigned position {}, not a worker's", a.position)))?;
        let spec = config.model_spec()?;
        if data.is_none() {
            let cache = (!config.data.cache_dir.is_empty()).then(|| PathBuf::from(&config.data.cache_dir));
            let tokens = ws_data::load_tokens(Path::new(&config.data.path), cache.as_deref())?;
            data = Some(Arc::new(ws_data::split(tokens, config.data.val_fraction, config.seq_len())?));
        }
        let hello = Hello { role, position: a.position };
        let link = rt.block_on(ws_fabric::tcp::connect(&a.parent, &opts, hello, deadline)).map_err(fabric_error)?;
        let micro_batch = crate::stream::choose_micro_batch(&config, &spec)?;
        let (train, eval, _) = schedules(spec.layer_count(), &config, tree.workers, micro_batch);
        let setup = WorkerSetup { train, eval, spec, config, micro_batch };
        tracing::info!("worker {w} of {} at position {}, parent {}", tree.workers, a.position, a.parent);
        let ended = Arc::new(AtomicBool::new(false));
        let shards = Shards::Sampled { data: data.clone().expect("loaded above"), worker: w };
        let exec = Exec::Threads;
        for t in spawn_worker(&exec, w, link, setup, shards, ended.clone())? {
            t.join().ok_or_else(|| TrainError::Config(format!("worker {w} failed (see above)")))?;
        }
        if ended.load(Ordering::SeqCst) {
            return Ok(());
        }
        eprintln!("worker: the tree lost a member; joining the store again");
    }
}

/// `weightstream fabric`: a broadcast-reduce node process. Listens at
/// `bind`, joins the store at `store`, and forwards and sums until the run
/// ends; when the tree loses a member it joins again.
pub fn run_node_process(store: &str, bind: &str, local: &RunConfig, deadline: Duration) -> Result<(), TrainError> {
    let rt = forwarding_runtime()?;
    let opts = tcp_options(local, false)?;
    rt.block_on(async {
        let listener = Listener::bind(bind, opts.clone()).await?;
        let port = listener.local_addr().port();
        let role = ws_fabric::rendezvous::ROLE_NODE;
        loop {
            let a = ws_fabric::rendezvous::join(store, &opts, role, Some(port), deadline).await?;
            tracing::info!("fabric node at position {}, parent {}", a.position, a.parent);
            match ws_fabric::rendezvous::run_node(&a, &listener, &opts, deadline).await {
                Ok(()) => return Ok(()),
                Err(e) => eprintln!("fabric node: {e}; joining the store again"),
            }
        }
    })
    .map_err(fabric_error)
}

/// The use index that marks a message of dense gradients of a sparse tensor
/// (RigL's update steps; the layer field holds the tensor).
const DENSE_GRADS_USE: u32 = u32::MAX;

/// What the root threads are doing, for telling a loss from an ending.
const ROOT_RUNNING: u8 = 0;
const ROOT_SHUTTING_DOWN: u8 = 1;
const ROOT_DETACHING: u8 = 2;

/// Cuts the store's weights into chunks for the tree; hands each buffer back
/// once its chunks are out. Ends the run with `Shutdown` when the store
/// stops; on `stop`, leaves without it (the tree is being replaced).
async fn root_down(
    tx: LinkTx,
    spec: &ModelSpec,
    from_store: Receiver<Down>,
    stop: Receiver<()>,
    to_store: Sender<ToStore>,
    chunk: usize,
    state: Arc<AtomicU8>,
) {
    let r: Result<bool, FabricError> = async {
        loop {
            let d = tokio::select! {
                biased;
                _ = stop.recv_async() => return Ok(false),
                d = from_store.recv_async() => d,
            };
            match d {
                Err(_) => return Ok(true),
                Ok(Down::Begin(p)) => tx.send(Frame::begin(p)).await?,
                Ok(Down::Masks(m)) => {
                    let id =
                        MessageId { kind: Kind::Masks, dtype: Dtype::None, step: m.version, use_index: 0, layer: 0 };
                    for f in frames(id, &m.to_safetensors(spec), chunk) {
                        tx.send(f).await?;
                    }
                }
                Ok(Down::Weights(m)) => {
                    let (dtype, bytes) = match &m.data {
                        Weights::F32(v) => (Dtype::F32, f32_bytes(&v[..m.len])),
                        Weights::Bf16(v) => (Dtype::Bf16, u16_bytes(&v[..m.len])),
                    };
                    let id = MessageId {
                        kind: Kind::Weights,
                        dtype,
                        step: m.step,
                        use_index: m.use_index as u32,
                        layer: m.layer as u32,
                    };
                    // The buffer goes back even if the tree fails midway.
                    let mut sent = Ok(());
                    for f in frames(id, bytes, chunk) {
                        sent = tx.send(f).await;
                        if sent.is_err() {
                            break;
                        }
                    }
                    let _ = to_store.send(ToStore::Release(m.data));
                    sent?;
                }
            }
        }
    }
    .await;
    match r {
        Ok(true) => {
            state.store(ROOT_SHUTTING_DOWN, Ordering::SeqCst);
            let _ = tx.send(Frame::control(Kind::Shutdown)).await;
        }
        Ok(false) => {}
        Err(e) => tracing::warn!("fabric root (down): {e}"),
    }
}

/// What the root's receiving thread needs.
struct RootUp {
    rx: LinkRx,
    spec: ModelSpec,
    grad_pool: Receiver<Vec<f32>>,
    grad_return: Sender<Vec<f32>>,
    to_store: Sender<ToStore>,
    stats: Sender<Result<f64, String>>,
    state: Arc<AtomicU8>,
    epoch: u64,
}

/// Puts the tree's summed gradients back together for the store and passes
/// the summed statistics to the driver. If the tree breaks while running,
/// tells the store to drop the open pass, and the driver why.
async fn root_up(mut r: RootUp) {
    let mut cur: Option<Vec<f32>> = None;
    let result: Result<(), String> = async {
        let mut asm = Assembler::new();
        let last_sparse = r.spec.tensors.iter().rposition(|t| t.is_sparse());
        let mut dense: Option<Vec<Option<Vec<f32>>>> = None;
        while let Some(f) = r.rx.recv().await {
            match (f.kind, f.dtype) {
                (Kind::Grads, Dtype::F32) if f.use_index == DENSE_GRADS_USE => {
                    let t = f.layer as usize;
                    let ts = r.spec.tensors.get(t).filter(|ts| ts.is_sparse());
                    let numel = ts.ok_or("dense gradients of a tensor that is not sparse")?.numel();
                    let d = dense.get_or_insert_with(|| vec![None; r.spec.tensors.len()]);
                    let buf = d[t].get_or_insert_with(|| vec![0f32; numel]);
                    if let Some((id, _)) = asm.add(&f, f32_bytes_mut(buf)).map_err(|e| e.to_string())? {
                        if Some(t) == last_sparse {
                            let grads = dense.take().expect("gathered above");
                            r.to_store
                                .send(ToStore::DenseGrads { step: id.step, grads })
                                .map_err(|_| "the store stopped")?;
                        }
                    }
                }
                (Kind::Grads, Dtype::F32) => {
                    if cur.is_none() {
                        cur = Some(r.grad_pool.recv_async().await.map_err(|_| "the store stopped")?);
                    }
                    let buf = cur.as_mut().expect("taken above");
                    if let Some((id, n)) = asm.add(&f, f32_bytes_mut(buf)).map_err(|e| e.to_string())? {
                        let g = ToStore::Grads {
                            step: id.step,
                            use_index: id.use_index as usize,
                            layer: id.layer as usize,
                            len: n / 4,
                            data: cur.take().expect("assembled"),
                        };
                        r.to_store.send(g).map_err(|_| "the store stopped")?;
                    }
                }
                (Kind::Stats, Dtype::F64) if f.payload.len() == 8 => {
                    let sum = f64::from_le_bytes(f.payload[..].try_into().expect("8 bytes"));
                    let _ = r.stats.send(Ok(sum));
                }
                (k, d) => return Err(format!("a {k:?} frame of {d:?} reached the store")),
            }
        }
        Ok(())
    }
    .await;
    if let Some(b) = cur {
        let _ = r.grad_return.send(b);
    }
    if r.state.load(Ordering::SeqCst) == ROOT_RUNNING {
        let reason = match result {
            Ok(()) => "the tree lost a member".to_string(),
            Err(e) => e,
        };
        let _ = r.to_store.send(ToStore::Abort { epoch: r.epoch, reason: reason.clone() });
        let _ = r.stats.send(Err(format!("fabric: {reason}")));
    }
}

/// A worker's receiving half: pass starts go to the compute thread; weight
/// chunks are assembled into free buffers (k+1 of them, the prefetch).
/// Returns whether the run ended (`Shutdown`) rather than the link.
async fn worker_down(
    mut rx: LinkRx,
    spec: &ModelSpec,
    to_compute: Sender<Down>,
    free: Receiver<Weights>,
) -> Result<bool, String> {
    let mut asm = Assembler::new();
    let mut cur: Option<Weights> = None;
    let mut masks = Vec::new();
    while let Some(f) = rx.recv().await {
        match f.kind {
            Kind::Masks => {
                if masks.is_empty() {
                    // The bitmaps and a generous allowance for the file's header.
                    let bitmaps: usize =
                        spec.tensors.iter().filter(|t| t.is_sparse()).map(|t| t.numel().div_ceil(8)).sum();
                    masks = vec![0u8; bitmaps + (1 << 20)];
                }
                if let Some((_, n)) = asm.add(&f, &mut masks).map_err(|e| e.to_string())? {
                    let m =
                        Masks::from_safetensors(spec, &masks[..n]).map_err(|e| format!("the store's masks: {e}"))?;
                    masks = Vec::new();
                    if to_compute.send(Down::Masks(m)).is_err() {
                        break;
                    }
                }
            }
            Kind::Begin => {
                let p = f.pass_start().map_err(|e| e.to_string())?;
                if to_compute.send(Down::Begin(p)).is_err() {
                    break;
                }
            }
            Kind::Weights => {
                if cur.is_none() {
                    match free.recv_async().await {
                        Ok(b) => cur = Some(b),
                        Err(_) => break,
                    }
                }
                let buf = cur.as_mut().expect("taken above");
                let (bytes, size) = match (buf, f.dtype) {
                    (Weights::F32(v), Dtype::F32) => (f32_bytes_mut(v), 4),
                    (Weights::Bf16(v), Dtype::Bf16) => (u16_bytes_mut(v), 2),
                    (_, d) => return Err(format!("weights of {d:?} for this worker's stream.dtype")),
                };
                if let Some((id, n)) = asm.add(&f, bytes).map_err(|e| e.to_string())? {
                    let m = WeightMsg {
                        step: id.step,
                        use_index: id.use_index as usize,
                        layer: id.layer as usize,
                        version: 0,
                        len: n / size,
                        data: cur.take().expect("assembled"),
                    };
                    if to_compute.send(Down::Weights(m)).is_err() {
                        break;
                    }
                }
            }
            Kind::Shutdown => return Ok(true),
            k => return Err(format!("a {k:?} frame travelling down")),
        }
    }
    Ok(false)
}

/// A worker's sending half: gradients and statistics as chunks to the
/// parent; released weight buffers back to the receiving half.
async fn worker_up(
    tx: LinkTx,
    from_compute: Receiver<ToStore>,
    free: Sender<Weights>,
    grad_return: Sender<Vec<f32>>,
    chunk: usize,
) -> Result<(), String> {
    // Fault injection for the fault tests: "STEP:USE" ends this process
    // abruptly once that use's gradients are out, as a crash would (EXIT),
    // or stops it answering from then on, as a hung machine would (STALL).
    let at = |name: &str| -> Option<(u64, usize)> {
        let v = std::env::var(name).ok()?;
        let (s, u) = v.split_once(':')?;
        Some((s.parse().ok()?, u.parse().ok()?))
    };
    let (exit_after, stall_after) = (at("WEIGHTSTREAM_FAULT_EXIT_AFTER"), at("WEIGHTSTREAM_FAULT_STALL_AFTER"));
    while let Ok(m) = from_compute.recv_async().await {
        match m {
            ToStore::Release(w) => {
                let _ = free.send(w);
            }
            ToStore::Grads { step, use_index, layer, len, data } => {
                let id = MessageId {
                    kind: Kind::Grads,
                    dtype: Dtype::F32,
                    step,
                    use_index: use_index as u32,
                    layer: layer as u32,
                };
                for f in frames(id, f32_bytes(&data[..len]), chunk) {
                    tx.send(f).await.map_err(|e| e.to_string())?;
                }
                let _ = grad_return.send(data);
                if exit_after == Some((step, use_index)) {
                    // Time for the writer to put the frames on the wire (a
                    // worker process's thread: blocking it blocks no one else).
                    std::thread::sleep(Duration::from_millis(300));
                    eprintln!("worker: WEIGHTSTREAM_FAULT_EXIT_AFTER={step}:{use_index}: exiting");
                    // SAFETY: ends the process at once, like a crash; nothing is left half-written.
                    unsafe { libc::_exit(137) };
                }
                if stall_after == Some((step, use_index)) {
                    eprintln!("worker: WEIGHTSTREAM_FAULT_STALL_AFTER={step}:{use_index}: no longer answering");
                    loop {
                        std::thread::park();
                    }
                }
            }
            ToStore::Stats { index, sum } => {
                let f = Frame {
                    kind: Kind::Stats,
                    dtype: Dtype::F64,
                    step: index,
                    total: 8,
                    payload: bytes::Bytes::copy_from_slice(&sum.to_le_bytes()),
                    ..Frame::control(Kind::Stats)
                };
                tx.send(f).await.map_err(|e| e.to_string())?;
            }
            ToStore::DenseGrads { step, grads } => {
                for (t, g) in grads.iter().enumerate() {
                    let Some(g) = g else { continue };
                    let id = MessageId {
                        kind: Kind::Grads,
                        dtype: Dtype::F32,
                        step,
                        use_index: DENSE_GRADS_USE,
                        layer: t as u32,
                    };
                    for f in frames(id, f32_bytes(g), chunk) {
                        tx.send(f).await.map_err(|e| e.to_string())?;
                    }
                }
            }
            ToStore::Abort { .. } => unreachable!("workers do not abort passes"),
        }
    }
    Ok(())
}

/// What one worker's compute thread needs.
struct WorkerSetup {
    spec: ModelSpec,
    config: RunConfig,
    micro_batch: usize,
    train: Schedule,
    eval: Schedule,
}

async fn worker_compute(
    s: WorkerSetup,
    shards: Shards,
    weights: Receiver<Down>,
    to_up: Sender<ToStore>,
    grad_pool: Receiver<Vec<f32>>,
) {
    let (t, mb) = (s.config.seq_len(), s.micro_batch);
    let scale = 1.0 / (s.config.train.batch_size * t) as f32;
    let mut cpu = CpuWorker::new(&s.spec, mb, t, &s.config);
    let crossover = s.config.sparsity.kernel_density_max;
    let mut spec = s.spec.clone();
    loop {
        let Some(p) = crate::stream::recv_begin(&weights, &mut cpu.workspace, &mut spec, crossover).await else {
            return;
        };
        let Some(shard) = shards.next(p, &s.config, mb).await else { return };
        let (sched, step, dloss) = if p.training { (&s.train, p.index, scale) } else { (&s.eval, u64::MAX, 0.0) };
        // The loss goes up right after the last head use, ahead of the
        // backward gradients: a step whose gradients all arrived has its loss.
        let io = PassIo { weights: &weights, to_store: &to_up, grad_pool: &grad_pool, stats_index: Some(p.index) };
        if cpu.pass(&spec, sched, step, &shard.inputs, &shard.targets, mb, t, dloss, &io).await.is_err() {
            return;
        }
    }
}

/// Starts one worker's three loops on `link` where `exec` runs them;
/// `ended` is set if the run ended normally (rather than the link).
fn spawn_worker(
    exec: &Exec,
    w: usize,
    link: Link,
    s: WorkerSetup,
    shards: Shards,
    ended: Arc<AtomicBool>,
) -> Result<Vec<Task<()>>, TrainError> {
    let buffers = s.config.stream.prefetch_depth + 1;
    let max_layer = crate::stream::max_layer_params(&s.spec);
    let dtype = Precision::parse(&s.config.stream.dtype).expect("validated");
    let chunk = s.config.fabric.chunk_bytes;
    let (free_tx, free_rx) = bounded(buffers);
    for _ in 0..buffers {
        let b = match dtype {
            Precision::Fp32 => Weights::F32(vec![0f32; max_layer]),
            Precision::Bf16 => Weights::Bf16(vec![0u16; max_layer]),
        };
        free_tx.send(b).expect("room for every buffer");
    }
    let (grad_return, grad_pool) = bounded(buffers);
    for _ in 0..buffers {
        grad_return.send(vec![0f32; max_layer]).expect("room for every buffer");
    }
    let (to_compute, weights) = unbounded();
    let (to_up, from_compute) = unbounded();
    let Link { tx, rx } = link;
    let spec = s.spec.clone();
    Ok(vec![
        exec.spawn(format!("worker{w}-down"), move || async move {
            match worker_down(rx, &spec, to_compute, free_rx).await {
                Ok(done) => ended.store(done, Ordering::SeqCst),
                Err(e) => tracing::error!("worker {w}: {e}"),
            }
        })?,
        exec.spawn(format!("worker{w}-up"), move || async move {
            if let Err(e) = worker_up(tx, from_compute, free_tx, grad_return, chunk).await {
                tracing::warn!("worker {w}: {e}");
            }
        })?,
        exec.spawn(format!("worker{w}"), move || worker_compute(s, shards, weights, to_up, grad_pool))?,
    ])
}

/// Whether `w` workers divide a batch of `b` sequences evenly, whole
/// micro-batches of `mb` each.
fn share_fits(b: usize, mb: usize, w: usize) -> bool {
    b.is_multiple_of(w) && (b / w).is_multiple_of(mb)
}

/// One worker's schedules in a tree of `workers`: training over its share of
/// the batch (returned too, in micro-batches), evaluation one micro-batch a
/// pass.
fn schedules(layers: usize, config: &RunConfig, workers: usize, micro_batch: usize) -> (Schedule, Schedule, usize) {
    let micro_batches = config.train.batch_size / workers / micro_batch;
    (Schedule::new(layers, micro_batches, true), Schedule::new(layers, 1, false), micro_batches)
}

/// The driver's ends of the workers inside this process: each one's shard
/// sender, and all their loops.
type InprocWorkers = (Vec<Sender<Shard>>, Vec<Task<()>>);

/// Starts the workers of a tree inside this process, one per link, each
/// fed its shards by the driver.
fn spawn_inproc_workers(
    exec: &Exec,
    links: Vec<Link>,
    spec: &ModelSpec,
    config: &RunConfig,
    micro_batch: usize,
    train: &Schedule,
    eval: &Schedule,
) -> Result<InprocWorkers, TrainError> {
    let (mut shards, mut threads) = (Vec::with_capacity(links.len()), Vec::new());
    for (w, link) in links.into_iter().enumerate() {
        let (tx, rx) = unbounded();
        shards.push(tx);
        let setup = WorkerSetup {
            spec: spec.clone(),
            config: config.clone(),
            micro_batch,
            train: train.clone(),
            eval: eval.clone(),
        };
        threads.extend(spawn_worker(exec, w, link, setup, Shards::Dealt(rx), Arc::new(AtomicBool::new(false)))?);
    }
    Ok((shards, threads))
}

/// The store's end of the running tree.
struct Root {
    down: Task<()>,
    up: Task<()>,
    stop: Sender<()>,
    state: Arc<AtomicU8>,
    /// Closes the connection to the store's child at once (TCP).
    kill: Option<tokio::sync::watch::Sender<bool>>,
}

/// The store thread's channels the root threads work on (the driver keeps
/// them to restart the root on a new tree).
struct StoreSide {
    spec: ModelSpec,
    weights: Receiver<Down>,
    to_store: Sender<ToStore>,
    grad_pool: Receiver<Vec<f32>>,
    grad_return: Sender<Vec<f32>>,
    stats: Sender<Result<f64, String>>,
}

fn start_root(exec: &Exec, link: Link, side: &StoreSide, chunk: usize, epoch: u64) -> Result<Root, TrainError> {
    let Link { tx, rx } = link;
    let kill = tx.killer();
    let state = Arc::new(AtomicU8::new(ROOT_RUNNING));
    let (stop, stop_rx) = bounded(1);
    let (w, ts, st, spec) = (side.weights.clone(), side.to_store.clone(), state.clone(), side.spec.clone());
    let down =
        exec.spawn(
            "fabric-root-down".into(),
            move || async move { root_down(tx, &spec, w, stop_rx, ts, chunk, st).await },
        )?;
    let r = RootUp {
        rx,
        spec: side.spec.clone(),
        grad_pool: side.grad_pool.clone(),
        grad_return: side.grad_return.clone(),
        to_store: side.to_store.clone(),
        stats: side.stats.clone(),
        state: state.clone(),
        epoch,
    };
    let up = exec.spawn("fabric-root-up".into(), move || root_up(r))?;
    Ok(Root { down, up, stop, state, kill })
}

/// A trainer with N data-parallel workers behind the fabric.
pub struct FabricTrainer {
    pub config: RunConfig,
    pub spec: ModelSpec,
    pub tree: Tree,
    micro_batch: usize,
    step: u64,
    store_control: StoreControl,
    side: StoreSide,
    stats: Receiver<Result<f64, String>>,
    root: Option<Root>,
    /// Where worker and node processes join (launch = "join"), for the whole run.
    listener: Option<Listener>,
    /// The tree's generation: it grows each time the tree forms again.
    epoch: u64,
    /// The workers the run started with: a tree formed again has at most as many.
    workers_max: usize,
    /// The simulated network the tree runs on (tests), with its drops left.
    sim: Option<Simulated>,
    /// See [`Self::shrunk`].
    shrunk: Vec<(u64, usize)>,
    shards: Vec<Sender<Shard>>,
    threads: Vec<Task<()>>,
    store: Option<Task<Store>>,
    /// Where the store, root and workers run: threads, or the simulator.
    exec: Exec,
    /// The runtime of the tree's nodes and links (threads; the simulator has its own).
    runtime: Option<tokio::runtime::Runtime>,
    inputs: Vec<u32>,
    targets: Vec<u32>,
}

impl FabricTrainer {
    /// Starts the store thread over `store`, the tree and the workers.
    pub fn start(config: RunConfig, store: Store, micro_batch: usize) -> Result<FabricTrainer, TrainError> {
        FabricTrainer::start_on(config, store, micro_batch, None)
    }

    /// [`Self::start`] with the tree over a simulated network (tests).
    pub fn start_simulated(
        config: RunConfig,
        store: Store,
        micro_batch: usize,
        sim: Simulated,
    ) -> Result<FabricTrainer, TrainError> {
        FabricTrainer::start_on(config, store, micro_batch, Some(sim))
    }

    fn start_on(
        config: RunConfig,
        mut store: Store,
        micro_batch: usize,
        sim: Option<Simulated>,
    ) -> Result<FabricTrainer, TrainError> {
        config.validate()?;
        let spec = store.spec().clone();
        let n = config.fabric.workers;
        let tree = Tree::new(n, config.fabric.fanout).map_err(TrainError::Config)?;
        let (train, eval, _) = schedules(spec.layer_count(), &config, n, micro_batch);
        store.set_access_sequence(&train.layer_sequence());
        let version = store.version;
        let exec = if sim.is_some() { Exec::simulated()? } else { Exec::Threads };
        let runtime = match (&exec, config.fabric.launch.as_str()) {
            (Exec::Sim(_), _) => None,
            (Exec::Threads, "join") => Some(forwarding_runtime()?),
            (Exec::Threads, _) => Some(process_runtime()?),
        };
        let rt = runtime.as_ref().or(exec.sim_runtime()).expect("one of the two");
        let mut listener = None;
        let (root, worker_links) = if config.fabric.launch == "join" {
            let l =
                rt.block_on(Listener::bind(&config.fabric.bind, tcp_options(&config, false)?)).map_err(fabric_error)?;
            let top_in_store = config.fabric.top_in_store;
            eprintln!(
                "store: waiting at {} for {} workers and {} fabric nodes to join",
                l.local_addr(),
                tree.workers,
                ws_fabric::rendezvous::node_processes(&tree, usize::from(top_in_store))
            );
            let deadline = Duration::from_secs(config.fabric.join_timeout_s);
            let run = config.to_toml();
            let admit =
                ws_fabric::rendezvous::admit(&l, &tree, &run, top_in_store, deadline, |m| tracing::info!("{m}"));
            let link = rt.block_on(admit).map_err(fabric_error)?;
            listener = Some(l);
            (link, Vec::new())
        } else {
            build_tree_on(&tree, &config, rt, sim)?
        };
        let (StoreEnds { control, reply, weights, to_store, grad_pool, grad_return }, task) =
            store_task(&config, store, &train, &eval)?;
        let handle = task.start(&exec)?;
        let (stats_tx, stats) = unbounded();
        let side = StoreSide { spec: spec.clone(), weights, to_store, grad_pool, grad_return, stats: stats_tx };
        let root = start_root(&exec, root, &side, config.fabric.chunk_bytes, 0)?;
        let (shards, threads) = spawn_inproc_workers(&exec, worker_links, &spec, &config, micro_batch, &train, &eval)?;
        Ok(FabricTrainer {
            config,
            spec,
            tree,
            micro_batch,
            step: version,
            store_control: StoreControl { control, reply, exec: exec.clone() },
            side,
            stats,
            root: Some(root),
            listener,
            epoch: 0,
            workers_max: n,
            sim,
            shrunk: Vec::new(),
            shards,
            threads,
            store: Some(handle),
            exec,
            runtime,
            inputs: Vec::new(),
            targets: Vec::new(),
        })
    }

    pub fn micro_batch(&self) -> usize {
        self.micro_batch
    }

    /// The summed statistic of one pass from the tree, waiting at most
    /// `fabric.step_timeout_s` (0: no limit).
    fn pass_stats(&self) -> Result<f64, String> {
        match self.exec.recv(&self.stats, self.step_limit()) {
            Ok(r) => r,
            Err(flume::RecvTimeoutError::Timeout) => Err(self.give_up()),
            Err(flume::RecvTimeoutError::Disconnected) => Err("the fabric stopped".into()),
        }
    }

    /// The store's answer to a step whose loss arrived, waiting at most
    /// `fabric.step_timeout_s` for the step's last gradients: a worker
    /// that stops answering after it sent its loss costs the step too.
    fn step_reply(&self) -> Result<Reply, TrainError> {
        match self.store_control.reply_within(self.step_limit())? {
            Some(r) => Ok(r),
            None => {
                self.give_up();
                // The store drops the pass and says so.
                self.store_control.recv_reply()
            }
        }
    }

    /// How long the driver waits for the tree in a step: `fabric.step_timeout_s`
    /// (0: no limit); in the simulator, of simulated time.
    fn step_limit(&self) -> Option<Duration> {
        let s = self.config.fabric.step_timeout_s;
        (s > 0).then(|| Duration::from_secs(s))
    }

    /// A member stopped answering: the pass ends here, and the tree with
    /// it (the store drops the pass; the connection to the tree closes).
    /// Returns why.
    fn give_up(&self) -> String {
        let limit = self.config.fabric.step_timeout_s;
        let reason = format!("no answer from the tree within fabric.step_timeout_s = {limit}");
        let _ = self.side.to_store.send(ToStore::Abort { epoch: self.epoch, reason: reason.clone() });
        if let Some(k) = self.root.as_ref().and_then(|r| r.kill.as_ref()) {
            let _ = k.send(true);
        }
        reason
    }

    /// After a loss: retires the root, forms the tree again from the
    /// processes that rejoin, and tells the store its new shape.
    fn reform(&mut self, why: &str) -> Result<(), TrainError> {
        if self.listener.is_none() && self.sim.is_none() {
            // Threads of this process do not come back: the loss is a bug's.
            return Err(TrainError::Config(format!("fabric: {why}")));
        }
        if let Some(root) = self.root.take() {
            root.state.store(ROOT_DETACHING, Ordering::SeqCst);
            let _ = root.stop.send(());
            if let Some(k) = &root.kill {
                let _ = k.send(true);
            }
            let _ = root.down.join();
            let _ = root.up.join();
        }
        // What the old tree left: weights never sent, statistics never read.
        while let Ok(d) = self.side.weights.try_recv() {
            if let Down::Weights(m) = d {
                let _ = self.side.to_store.send(ToStore::Release(m.data));
            }
        }
        while self.stats.try_recv().is_ok() {}
        if let Some(sim) = self.sim {
            return self.reconnect(why, sim);
        }
        let listener = self.listener.as_ref().expect("checked above");
        let (b, mb) = (self.config.train.batch_size, self.micro_batch);
        let fits = move |w: usize| share_fits(b, mb, w);
        let deadline = Duration::from_secs(self.config.fabric.join_timeout_s);
        let rt = self.runtime.as_ref().expect("running");
        let run = self.config.to_toml();
        let fanout = self.config.fabric.fanout;
        let admit = ws_fabric::rendezvous::admit_survivors(
            listener,
            fanout,
            self.workers_max,
            &fits,
            &run,
            self.config.fabric.top_in_store,
            REJOIN_QUIET,
            deadline,
        );
        let (tree, link, host) = rt.block_on(admit).map_err(fabric_error)?;
        // Places no node process took: their parents' hosts run them.
        let top_in_store = self.config.fabric.top_in_store;
        let moved: Vec<String> = tree
            .nodes()
            .filter_map(|p| match host[p] {
                Some(Host::Process(q)) if q != p => Some(format!("node {p} runs in node {q}'s process")),
                Some(Host::Store) if !(top_in_store && p == 1) => Some(format!("node {p} runs in the store")),
                _ => None,
            })
            .collect();
        let moved = if moved.is_empty() { String::new() } else { format!(" ({})", moved.join(", ")) };
        eprintln!(
            "fabric: {why}; the tree formed again with {} workers (was {}){moved}",
            tree.workers, self.config.fabric.workers
        );
        self.config.fabric.workers = tree.workers;
        self.tree = tree;
        self.start_new_tree(link)
    }

    /// The schedules of one worker of the current tree (see [`schedules`]).
    fn schedules(&self) -> (Schedule, Schedule, usize) {
        schedules(self.spec.layer_count(), &self.config, self.tree.workers, self.micro_batch)
    }

    /// Tells the store the shape of the tree that formed again (a new
    /// epoch) and starts the root on its link.
    fn start_new_tree(&mut self, link: Link) -> Result<(), TrainError> {
        self.epoch += 1;
        let (train, _, micro_batches) = self.schedules();
        self.store_control.send(Control::Reshape { train, micro_batches, epoch: self.epoch })?;
        let Reply::Reshaped = self.store_control.recv_reply()? else { unreachable!("the store answers with Reshaped") };
        self.root = Some(start_root(&self.exec, link, &self.side, self.config.fabric.chunk_bytes, self.epoch)?);
        Ok(())
    }

    /// After the simulated network dropped a connection: every member is a
    /// thread of this process and comes back, so the same tree forms again
    /// over new links (the next seed, one drop fewer).
    fn reconnect(&mut self, why: &str, sim: Simulated) -> Result<(), TrainError> {
        // The old tree's workers end once their links close (the drop
        // closes every link of the tree in turn) and their shards stop.
        self.shards.clear();
        if !self.exec.join_all(std::mem::take(&mut self.threads), OLD_TREE_ENDS) {
            return Err(TrainError::Config(format!("fabric: {why}; the old tree's workers did not end")));
        }
        let next = Simulated {
            seed: sim.seed.wrapping_add(1),
            drops: sim.drops.saturating_sub(1),
            crash: false,
            hang: false,
            ..sim
        };
        self.sim = Some(next);
        if sim.loses_a_worker() {
            // A worker is gone for good: the largest tree of those left
            // whose batch share divides evenly.
            let fanout = self.config.fabric.fanout;
            self.tree = (1..self.tree.workers)
                .rev()
                .find_map(|w| Tree::new(w, fanout).ok().filter(|_| self.share_fits(w)))
                .ok_or_else(|| TrainError::Config(format!("fabric: {why}; no worker is left")))?;
            self.config.fabric.workers = self.tree.workers;
            self.shrunk.push((self.step, self.tree.workers));
        }
        let rt = self.exec.sim_runtime().or(self.runtime.as_ref()).expect("running");
        let (link, worker_links) = build_tree_on(&self.tree, &self.config, rt, Some(next))?;
        let (train, eval, _) = self.schedules();
        let (exec, mb) = (&self.exec, self.micro_batch);
        (self.shards, self.threads) =
            spawn_inproc_workers(exec, worker_links, &self.spec, &self.config, mb, &train, &eval)?;
        eprintln!("fabric: {why}; the simulated network connected the tree again ({} workers)", self.tree.workers);
        self.start_new_tree(link)
    }

    /// Whether `w` workers divide the batch evenly, whole micro-batches each.
    fn share_fits(&self, w: usize) -> bool {
        share_fits(self.config.train.batch_size, self.micro_batch, w)
    }

    /// How many times the tree has formed again since the start.
    pub fn formed_again(&self) -> u64 {
        self.epoch
    }

    /// The simulated time since the start (a simulated run; `None`
    /// otherwise): it moves only by the links' seeded delays, so the same
    /// seed gives the same reading after every step.
    pub fn simulated_time(&self) -> Option<Duration> {
        self.exec.elapsed()
    }

    /// Where the simulated network lost a worker for good: (the step then
    /// redone, the workers from then on), in order.
    pub fn shrunk(&self) -> &[(u64, usize)] {
        &self.shrunk
    }

    /// Sends each worker its share of `inputs`/`targets` (B*T each);
    /// worker processes sample their own. Fails with the reason when a
    /// worker has stopped (the tree broke while idle).
    fn deal(&self, inputs: &[u32], targets: &[u32]) -> Result<(), String> {
        if self.shards.is_empty() {
            return Ok(());
        }
        let share = inputs.len() / self.shards.len();
        for (w, s) in self.shards.iter().enumerate() {
            let shard = Shard {
                inputs: inputs[w * share..(w + 1) * share].to_vec(),
                targets: targets[w * share..(w + 1) * share].to_vec(),
            };
            s.send(shard).map_err(|_| format!("worker {w} stopped"))?;
        }
        Ok(())
    }

    /// Stops everything and returns the store.
    pub fn into_store(mut self) -> Store {
        let handle = self.store.take().expect("running");
        self.shutdown();
        handle.join().expect("the store thread does not panic")
    }

    fn shutdown(&mut self) {
        // Closing the control channel ends the store thread, whose weights
        // channel closing sends Shutdown down the tree; the workers end and
        // close their links, and the tree drains upwards.
        self.store_control.close();
        self.shards.clear();
        if let Some(root) = self.root.take() {
            // The root's receiver clone keeps the weights channel open: the
            // store thread must end first, so join it before the root.
            if let Some(h) = self.store.take() {
                let s = h.join();
                drop(s);
            }
            let _ = root.down.join();
            let _ = root.up.join();
        }
        // The workers end on the tree's Shutdown.
        self.exec.join_all(std::mem::take(&mut self.threads), OLD_TREE_ENDS);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

impl Drop for FabricTrainer {
    fn drop(&mut self) {
        self.shutdown();
        if let Some(h) = self.store.take() {
            let _ = h.join();
        }
    }
}

impl Engine for FabricTrainer {
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
        for _ in 0..STEP_ATTEMPTS_MAX {
            let (mut inputs, mut targets) = (std::mem::take(&mut self.inputs), std::mem::take(&mut self.targets));
            sample_batch(train, b, t, self.config.train.seed, TRAIN_STREAM, self.step, &mut inputs, &mut targets);
            let dealt = self.deal(&inputs, &targets);
            (self.inputs, self.targets) = (inputs, targets);
            if let Err(why) = dealt {
                self.reform(&format!("step {}: {why}", self.step))?;
                continue;
            }
            self.store_control.send(Control::Train { step: self.step, lr })?;
            let stats = self.pass_stats();
            let reply = if stats.is_ok() { self.step_reply()? } else { self.store_control.recv_reply()? };
            match (reply, stats) {
                (Reply::StepDone { grad_norm }, Ok(sum)) => {
                    self.step += 1;
                    if self.config.sparsity.ramp_steps > 0 {
                        // The model this step left (a stage of the sparsity ramp changes it).
                        self.spec = self.config.model_spec_at(self.step)?;
                    }
                    let (loss, seconds) = (sum / (b * t) as f64, start.elapsed().as_secs_f64());
                    return Ok(StepStats { step: self.step, loss, lr, grad_norm, tokens: b * t, seconds });
                }
                (Reply::Aborted(why), _) => self.reform(&format!("step {} aborted: {why}", self.step))?,
                (Reply::StepDone { .. }, Err(e)) => unreachable!("a complete step without its loss: {e}"),
                _ => unreachable!("the store answers a step with StepDone or Aborted"),
            }
        }
        Err(TrainError::Config(format!("fabric: step {} failed {STEP_ATTEMPTS_MAX} times", self.step)))
    }

    fn evaluate(&mut self, tokens: &[u16], batches: usize) -> Result<f64, TrainError> {
        for _ in 0..STEP_ATTEMPTS_MAX {
            let (n, mb, t) = (self.config.fabric.workers, self.micro_batch, self.config.seq_len());
            let passes = batches.div_ceil(n);
            let (mut inputs, mut targets) = (Vec::new(), Vec::new());
            let mut stopped = None;
            for i in 0..passes {
                // Worker processes sample these themselves.
                for (w, s) in self.shards.iter().enumerate() {
                    let index = (i * n + w) as u64;
                    sample_batch(tokens, mb, t, self.config.train.seed, VAL_STREAM, index, &mut inputs, &mut targets);
                    let shard = Shard { inputs: inputs.clone(), targets: targets.clone() };
                    if s.send(shard).is_err() {
                        stopped.get_or_insert(w);
                    }
                }
            }
            if let Some(w) = stopped {
                self.reform(&format!("an evaluation: worker {w} stopped"))?;
                continue;
            }
            self.store_control.send(Control::Eval { batches: passes })?;
            let mut sum = Ok(0f64);
            for _ in 0..passes {
                sum = match (sum, self.pass_stats()) {
                    (Ok(a), Ok(x)) => Ok(a + x),
                    (Err(e), _) | (_, Err(e)) => Err(e),
                };
                if sum.is_err() {
                    break;
                }
            }
            match (self.store_control.recv_reply()?, sum) {
                (Reply::EvalDone, Ok(sum)) => return Ok(sum / (passes * n * mb * t) as f64),
                (Reply::Aborted(why), _) => self.reform(&format!("an evaluation aborted: {why}"))?,
                (Reply::EvalDone, Err(e)) => unreachable!("a complete evaluation without its losses: {e}"),
                _ => unreachable!("the store answers an evaluation with EvalDone or Aborted"),
            }
        }
        Err(TrainError::Config(format!("fabric: an evaluation failed {STEP_ATTEMPTS_MAX} times")))
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
