//! Data-parallel training through the broadcast-reduce fabric (DESIGN.md,
//! "The fabric"): one store, N workers, and the tree of `ws_fabric` between
//! them, over in-process channels or authenticated TCP.
//!
//! The store thread is the one of single-worker streaming ([`crate::stream`]):
//! it sends a pass start and the schedule's weights, and takes one gradient
//! per gradient use. Here two root threads stand where the worker stood:
//! one cuts the weights into chunks for the tree (and hands each buffer back
//! at once), one puts the tree's summed gradient chunks back together.
//!
//! Each worker is three threads: one that assembles weight chunks into its
//! k+1 weight buffers (the prefetch), one that computes (the same
//! [`CpuWorker`] as single-worker streaming), and one that cuts gradients
//! into chunks. Worker w trains on sequences [w*B/N, (w+1)*B/N) of every
//! global batch, scaled by 1/(B*T), so the tree's sum is the global
//! gradient. The tree sums in child order, so runs with the same N and
//! fan-out agree bit for bit over every transport; against one worker, only
//! the order of the sum differs.
//!
//! Evaluation pass i has worker w evaluate validation batch i*N + w (of the
//! micro-batch size), so N workers see the batches one worker would.
//!
//! Not here yet: worker processes on other machines (the worker threads
//! run in this process), and the fault handling of issue 4.

use crate::config::RunConfig;
use crate::optim::learning_rate;
use crate::schedule::Schedule;
use crate::stream::{spawn_store, Control, CpuWorker, Down, PassIo, Reply, StoreControl, StoreEnds, ToStore};
use crate::stream::{WeightMsg, Weights};
use crate::trainer::{Engine, StepStats, TRAIN_STREAM, VAL_STREAM};
use crate::TrainError;
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use ws_data::{sample_batch, Split};
use ws_fabric::chunk::{f32_bytes, f32_bytes_mut, frames, u16_bytes, u16_bytes_mut, Assembler, MessageId};
use ws_fabric::tcp::{Listener, TcpOptions};
use ws_fabric::wire::Hello;
use ws_fabric::PassStart;
use ws_fabric::{Dtype, FabricError, Frame, Kind, Link, LinkRx, LinkTx, Tree};
use ws_kernels::Precision;
use ws_model::{ModelSpec, Params};
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
    fn next(&self, p: PassStart, c: &RunConfig, mb: usize) -> Option<Shard> {
        match self {
            Shards::Dealt(rx) => rx.recv().ok(),
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

/// Builds the tree's links and starts its nodes on `rt`: returns the store's
/// link (to its one child) and each worker's link (to its parent).
pub fn build_tree(
    tree: &Tree,
    config: &RunConfig,
    rt: &tokio::runtime::Runtime,
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
    if f.transport == "inproc" {
        for (p, pos) in tree.positions.iter().enumerate() {
            for &c in &pos.children {
                let (a, b) = ws_fabric::link::inproc_pair(f.chunks_in_flight, &name(p), &name(c));
                down[p].push(a);
                up[c] = Some(b);
            }
        }
    } else {
        let opts = tcp_options(config, true)?;
        let (u, d) = rt.block_on(tcp_links(tree, &opts, &f.bind)).map_err(|e| TrainError::Config(e.to_string()))?;
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
        getrandom_fill(&mut s)?;
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

fn getrandom_fill(s: &mut [u8]) -> Result<(), TrainError> {
    ws_fabric::wire::random_fill(s).map_err(|e| TrainError::Config(e.to_string()))
}

type Links = (Vec<Option<Link>>, Vec<Vec<Link>>);

/// Every parent listens; every child connects and proves the secret; each
/// parent orders its children by the positions their hellos name.
async fn tcp_links(tree: &Tree, opts: &TcpOptions, bind: &str) -> Result<Links, FabricError> {
    let n = tree.positions.len();
    let parents: Vec<usize> = (0..n).filter(|&p| !tree.positions[p].children.is_empty()).collect();
    let mut addrs = vec![String::new(); n];
    let mut listeners = Vec::new();
    for &p in &parents {
        let l = Listener::bind(bind, opts.clone()).await?;
        addrs[p] = l.local_addr().to_string();
        listeners.push((p, l));
    }
    let mut connecting = Vec::new();
    for c in 1..n {
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
    for (c, h) in connecting {
        up[c] = Some(h.await.map_err(|e| FabricError::Io(e.to_string()))??);
    }
    Ok((up, down))
}

/// The store's side of a tree of separate processes: listens at
/// `fabric.bind` and waits until every node and worker has joined.
fn admit_processes(tree: &Tree, config: &RunConfig, rt: &tokio::runtime::Runtime) -> Result<Link, TrainError> {
    let opts = tcp_options(config, false)?;
    let deadline = Duration::from_secs(config.fabric.join_timeout_s);
    rt.block_on(async {
        let listener = Listener::bind(&config.fabric.bind, opts).await?;
        eprintln!(
            "store: waiting at {} for {} workers and {} fabric nodes to join",
            listener.local_addr(),
            tree.workers,
            tree.inner_nodes()
        );
        ws_fabric::rendezvous::admit(&listener, tree, &config.to_toml(), deadline, |m| tracing::info!("{m}")).await
    })
    .map_err(|e| TrainError::Config(format!("fabric: {e}")))
}

fn process_runtime() -> Result<tokio::runtime::Runtime, TrainError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| TrainError::Config(format!("cannot start the fabric's runtime: {e}")))
}

fn fabric_error(e: FabricError) -> TrainError {
    TrainError::Config(format!("fabric: {e}"))
}

/// `weightstream worker`: joins the store at `store`, loads the run's data,
/// and trains its shard of every step until the store ends the run.
/// `local` supplies the secret (fabric.secret_file) and nothing else: the
/// run's configuration comes from the store.
pub fn run_worker_process(store: &str, local: &RunConfig, deadline: Duration) -> Result<(), TrainError> {
    let rt = process_runtime()?;
    let opts = tcp_options(local, false)?;
    let role = ws_fabric::rendezvous::ROLE_WORKER;
    let a = rt.block_on(ws_fabric::rendezvous::join(store, &opts, role, None, deadline)).map_err(fabric_error)?;
    let config = RunConfig::resolve_text(&a.run, &[])?;
    let tree = Tree::new(a.workers, a.fanout).map_err(TrainError::Config)?;
    let w = (a.position as usize)
        .checked_sub(1 + tree.inner_nodes())
        .filter(|&w| w < tree.workers)
        .ok_or_else(|| TrainError::Config(format!("the store assigned position {}, not a worker's", a.position)))?;
    let spec = ModelSpec::new(config.model);
    let cache = (!config.data.cache_dir.is_empty()).then(|| PathBuf::from(&config.data.cache_dir));
    let tokens = ws_data::load_tokens(Path::new(&config.data.path), cache.as_deref())?;
    let data = Arc::new(ws_data::split(tokens, config.data.val_fraction, config.seq_len())?);
    let hello = Hello { role, position: a.position };
    let link = rt.block_on(ws_fabric::tcp::connect(&a.parent, &opts, hello, deadline)).map_err(fabric_error)?;
    let micro_batch = crate::stream::choose_micro_batch(&config, &spec)?;
    let layers = spec.layer_count();
    let setup = WorkerSetup {
        train: Schedule::new(layers, config.train.batch_size / tree.workers / micro_batch, true),
        eval: Schedule::new(layers, 1, false),
        spec,
        config,
        micro_batch,
    };
    tracing::info!("worker {w} of {} at position {}, parent {}", tree.workers, a.position, a.parent);
    for t in spawn_worker(w, link, setup, Shards::Sampled { data, worker: w })? {
        t.join().map_err(|_| TrainError::Config(format!("worker {w} failed (see above)")))?;
    }
    Ok(())
}

/// `weightstream fabric`: a broadcast-reduce node process. Listens at
/// `bind`, joins the store at `store`, and forwards and sums until the run ends.
pub fn run_node_process(store: &str, bind: &str, local: &RunConfig, deadline: Duration) -> Result<(), TrainError> {
    let rt = process_runtime()?;
    let opts = tcp_options(local, false)?;
    rt.block_on(async {
        let listener = Listener::bind(bind, opts.clone()).await?;
        let port = listener.local_addr().port();
        let role = ws_fabric::rendezvous::ROLE_NODE;
        let a = ws_fabric::rendezvous::join(store, &opts, role, Some(port), deadline).await?;
        tracing::info!("fabric node at position {}, parent {}", a.position, a.parent);
        ws_fabric::rendezvous::run_node(&a, listener, &opts, deadline).await
    })
    .map_err(fabric_error)
}

/// Cuts the store's weights into chunks for the tree; hands each buffer back
/// once its chunks are out. Ends the run with `Shutdown` when the store stops.
fn root_down(tx: LinkTx, from_store: Receiver<Down>, to_store: Sender<ToStore>, chunk: usize) {
    let r = (|| -> Result<(), FabricError> {
        while let Ok(d) = from_store.recv() {
            match d {
                Down::Begin(p) => tx.blocking_send(Frame::begin(p))?,
                Down::Weights(m) => {
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
                    for f in frames(id, bytes, chunk) {
                        tx.blocking_send(f)?;
                    }
                    if to_store.send(ToStore::Release(m.data)).is_err() {
                        break;
                    }
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = r {
        tracing::warn!("fabric root (down): {e}");
    }
    let _ = tx.blocking_send(Frame::control(Kind::Shutdown));
}

/// Puts the tree's summed gradients back together for the store, and passes
/// the summed statistics to the driver.
fn root_up(
    mut rx: LinkRx,
    grad_pool: Receiver<Vec<f32>>,
    to_store: Sender<ToStore>,
    stats: Sender<Result<f64, String>>,
) {
    let r = (|| -> Result<(), String> {
        let mut asm = Assembler::new();
        let mut cur: Option<Vec<f32>> = None;
        while let Some(f) = rx.blocking_recv() {
            match (f.kind, f.dtype) {
                (Kind::Grads, Dtype::F32) => {
                    if cur.is_none() {
                        cur = Some(grad_pool.recv().map_err(|_| "the store stopped")?);
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
                        to_store.send(g).map_err(|_| "the store stopped")?;
                    }
                }
                (Kind::Stats, Dtype::F64) if f.payload.len() == 8 => {
                    let sum = f64::from_le_bytes(f.payload[..].try_into().expect("8 bytes"));
                    let _ = stats.send(Ok(sum));
                }
                (k, d) => return Err(format!("a {k:?} frame of {d:?} reached the store")),
            }
        }
        Ok(())
    })();
    if let Err(e) = r {
        let _ = stats.send(Err(format!("fabric: {e}")));
    }
}

/// A worker's receiving half: pass starts go to the compute thread; weight
/// chunks are assembled into free buffers (k+1 of them, the prefetch).
fn worker_down(mut rx: LinkRx, to_compute: Sender<Down>, free: Receiver<Weights>) -> Result<(), String> {
    let mut asm = Assembler::new();
    let mut cur: Option<Weights> = None;
    while let Some(f) = rx.blocking_recv() {
        match f.kind {
            Kind::Begin => {
                let p = f.pass_start().map_err(|e| e.to_string())?;
                if to_compute.send(Down::Begin(p)).is_err() {
                    break;
                }
            }
            Kind::Weights => {
                if cur.is_none() {
                    match free.recv() {
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
            Kind::Shutdown => break,
            k => return Err(format!("a {k:?} frame travelling down")),
        }
    }
    Ok(())
}

/// A worker's sending half: gradients and statistics as chunks to the
/// parent; released weight buffers back to the receiving half.
fn worker_up(
    tx: LinkTx,
    from_compute: Receiver<ToStore>,
    free: Sender<Weights>,
    grad_return: Sender<Vec<f32>>,
    chunk: usize,
) -> Result<(), String> {
    while let Ok(m) = from_compute.recv() {
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
                    tx.blocking_send(f).map_err(|e| e.to_string())?;
                }
                let _ = grad_return.send(data);
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
                tx.blocking_send(f).map_err(|e| e.to_string())?;
            }
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

fn worker_compute(
    s: WorkerSetup,
    shards: Shards,
    weights: Receiver<Down>,
    to_up: Sender<ToStore>,
    grad_pool: Receiver<Vec<f32>>,
) {
    let (t, mb) = (s.config.seq_len(), s.micro_batch);
    let scale = 1.0 / (s.config.train.batch_size * t) as f32;
    let mut cpu = CpuWorker::new(&s.spec, mb, t, &s.config);
    let io = PassIo { weights: &weights, to_store: &to_up, grad_pool: &grad_pool };
    loop {
        let p = match weights.recv() {
            Ok(Down::Begin(p)) => p,
            Ok(Down::Weights(_)) => panic!("weights before their pass began"),
            Err(_) => return,
        };
        let Some(shard) = shards.next(p, &s.config, mb) else { return };
        let (sched, step, dloss) = if p.training { (&s.train, p.index, scale) } else { (&s.eval, u64::MAX, 0.0) };
        let Ok(loss) = cpu.pass(&s.spec, sched, step, &shard.inputs, &shard.targets, mb, t, dloss, &io) else { return };
        if to_up.send(ToStore::Stats { index: p.index, sum: loss }).is_err() {
            return;
        }
    }
}

/// Starts one worker's three threads on `link`.
fn spawn_worker(w: usize, link: Link, s: WorkerSetup, shards: Shards) -> Result<Vec<JoinHandle<()>>, TrainError> {
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
    let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name)
            .spawn(f)
            .map_err(|e| TrainError::Config(format!("cannot start a worker thread: {e}")))
    };
    Ok(vec![
        spawn(
            format!("worker{w}-down"),
            Box::new(move || {
                if let Err(e) = worker_down(rx, to_compute, free_rx) {
                    tracing::error!("worker {w}: {e}");
                }
            }),
        )?,
        spawn(
            format!("worker{w}-up"),
            Box::new(move || {
                if let Err(e) = worker_up(tx, from_compute, free_tx, grad_return, chunk) {
                    tracing::warn!("worker {w}: {e}");
                }
            }),
        )?,
        spawn(format!("worker{w}"), Box::new(move || worker_compute(s, shards, weights, to_up, grad_pool)))?,
    ])
}

/// A trainer with N data-parallel workers behind the fabric.
pub struct FabricTrainer {
    pub config: RunConfig,
    pub spec: ModelSpec,
    pub tree: Tree,
    micro_batch: usize,
    step: u64,
    store_control: StoreControl,
    stats: Receiver<Result<f64, String>>,
    shards: Vec<Sender<Shard>>,
    threads: Vec<JoinHandle<()>>,
    store: Option<JoinHandle<Store>>,
    runtime: Option<tokio::runtime::Runtime>,
    inputs: Vec<u32>,
    targets: Vec<u32>,
}

impl FabricTrainer {
    /// Starts the store thread over `store`, the tree and the workers.
    pub fn start(config: RunConfig, mut store: Store, micro_batch: usize) -> Result<FabricTrainer, TrainError> {
        config.validate()?;
        let spec = store.spec().clone();
        let n = config.fabric.workers;
        let tree = Tree::new(n, config.fabric.fanout).map_err(TrainError::Config)?;
        let layers = spec.layer_count();
        let train = Schedule::new(layers, config.train.batch_size / n / micro_batch, true);
        let eval = Schedule::new(layers, 1, false);
        store.set_access_sequence(&train.layer_sequence());
        let version = store.version;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fabric")
            .enable_all()
            .build()
            .map_err(|e| TrainError::Config(format!("cannot start the fabric's runtime: {e}")))?;
        let (root, worker_links) = if config.fabric.launch == "join" {
            (admit_processes(&tree, &config, &runtime)?, Vec::new())
        } else {
            build_tree(&tree, &config, &runtime)?
        };
        let StoreEnds { control, reply, weights, to_store, grad_pool, handle } =
            spawn_store(&config, store, &train, &eval)?;
        let (stats_tx, stats) = unbounded();
        let mut threads = Vec::new();
        let Link { tx: root_tx, rx: root_rx } = root;
        let chunk = config.fabric.chunk_bytes;
        let ts = to_store.clone();
        let spawn_err = |e: std::io::Error| TrainError::Config(format!("cannot start a fabric thread: {e}"));
        threads.push(
            std::thread::Builder::new()
                .name("fabric-root-down".into())
                .spawn(move || root_down(root_tx, weights, ts, chunk))
                .map_err(spawn_err)?,
        );
        threads.push(
            std::thread::Builder::new()
                .name("fabric-root-up".into())
                .spawn(move || root_up(root_rx, grad_pool, to_store, stats_tx))
                .map_err(spawn_err)?,
        );
        let mut shards = Vec::with_capacity(n);
        for (w, link) in worker_links.into_iter().enumerate() {
            let (tx, rx) = unbounded();
            shards.push(tx);
            let setup = WorkerSetup {
                spec: spec.clone(),
                config: config.clone(),
                micro_batch,
                train: train.clone(),
                eval: eval.clone(),
            };
            threads.extend(spawn_worker(w, link, setup, Shards::Dealt(rx))?);
        }
        Ok(FabricTrainer {
            config,
            spec,
            tree,
            micro_batch,
            step: version,
            store_control: StoreControl { control, reply },
            stats,
            shards,
            threads,
            store: Some(handle),
            runtime: Some(runtime),
            inputs: Vec::new(),
            targets: Vec::new(),
        })
    }

    pub fn micro_batch(&self) -> usize {
        self.micro_batch
    }

    /// The summed statistic of one pass from the tree.
    fn pass_stats(&self) -> Result<f64, TrainError> {
        match self.stats.recv() {
            Ok(Ok(sum)) => Ok(sum),
            Ok(Err(e)) => Err(TrainError::Config(e)),
            // The tree went down: the store's reply says why, if it knows.
            Err(_) => Err(self.store_control.failure()),
        }
    }

    /// Sends each worker its share of `inputs`/`targets` (B*T each);
    /// worker processes sample their own.
    fn deal(&self, inputs: &[u32], targets: &[u32]) -> Result<(), TrainError> {
        if self.shards.is_empty() {
            return Ok(());
        }
        let share = inputs.len() / self.shards.len();
        for (w, s) in self.shards.iter().enumerate() {
            let shard = Shard {
                inputs: inputs[w * share..(w + 1) * share].to_vec(),
                targets: targets[w * share..(w + 1) * share].to_vec(),
            };
            s.send(shard).map_err(|_| TrainError::Config(format!("worker {w} stopped")))?;
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
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
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
        let (mut inputs, mut targets) = (std::mem::take(&mut self.inputs), std::mem::take(&mut self.targets));
        sample_batch(train, b, t, self.config.train.seed, TRAIN_STREAM, self.step, &mut inputs, &mut targets);
        let dealt = self.deal(&inputs, &targets);
        (self.inputs, self.targets) = (inputs, targets);
        dealt?;
        self.store_control.send(Control::Train { step: self.step, lr })?;
        let loss = self.pass_stats()? / (b * t) as f64;
        let Reply::StepDone { grad_norm } = self.store_control.recv_reply()? else {
            unreachable!("the store answers a step with StepDone")
        };
        self.step += 1;
        Ok(StepStats { step: self.step, loss, lr, grad_norm, tokens: b * t, seconds: start.elapsed().as_secs_f64() })
    }

    fn evaluate(&mut self, tokens: &[u16], batches: usize) -> Result<f64, TrainError> {
        let (n, mb, t) = (self.config.fabric.workers, self.micro_batch, self.config.seq_len());
        let passes = batches.div_ceil(n);
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for i in 0..passes {
            // Worker processes sample these themselves.
            for (w, s) in self.shards.iter().enumerate() {
                let index = (i * n + w) as u64;
                sample_batch(tokens, mb, t, self.config.train.seed, VAL_STREAM, index, &mut inputs, &mut targets);
                let shard = Shard { inputs: inputs.clone(), targets: targets.clone() };
                s.send(shard).map_err(|_| TrainError::Config(format!("worker {w} stopped")))?;
            }
        }
        self.store_control.send(Control::Eval { batches: passes })?;
        let mut sum = 0f64;
        for _ in 0..passes {
            sum += self.pass_stats()?;
        }
        let Reply::EvalDone = self.store_control.recv_reply()? else {
            unreachable!("the store answers an evaluation with EvalDone")
        };
        Ok(sum / (passes * n * mb * t) as f64)
    }

    fn checkpoint(&mut self, run_dir: &Path) -> Result<PathBuf, TrainError> {
        self.store_control.checkpoint(run_dir, self.config.to_toml(), self.step)
    }

    fn params(&mut self) -> Result<Params, TrainError> {
        self.store_control.params()
    }
}
