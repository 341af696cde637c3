//! The run configuration: a preset, then a TOML file, then `--set key=value`
//! overrides, each layer replacing single keys of the one below.
//!
//! Every key has a default, so `weightstream train` needs no argument. An
//! unknown key is an error that names the key and the closest known one; a
//! value of the wrong type names the key and the expected type. The resolved
//! configuration is written to the run directory, so a run can be repeated
//! from it alone.

use crate::TrainError;
use serde::{Deserialize, Serialize};
use std::path::Path;
use toml::{Table, Value};
use ws_model::{Gpt2Config, ModelSpec};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The preset this configuration started from (`tiny`, `small`).
    pub preset: String,
    /// Where metrics, the resolved config, checkpoints and the plot go.
    /// Empty: `runs/<preset>-<UTC time>`.
    pub run_dir: String,
    pub model: Gpt2Config,
    pub train: TrainSection,
    pub data: DataSection,
    pub stream: StreamSection,
    pub store: StoreSection,
    pub worker: WorkerSection,
    pub fabric: FabricSection,
    pub sparsity: SparsitySection,
}

/// Unstructured sparsity of the linear layers' weight matrices: only their
/// nonzeros are stored, streamed, summed, updated and multiplied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparsitySection {
    /// Fraction of zeros in the attention matrices (c_attn, c_proj), 0 to 0.99.
    pub attention: f64,
    /// Fraction of zeros in the MLP matrices (c_fc, c_proj), 0 to 0.99.
    pub mlp: f64,
    /// "PATTERN=LEVEL" by tensor name, `*` matching any run of characters,
    /// e.g. "transformer.h.0.*=0" (a dense first block) or "*.mlp.c_fc.weight=0.95".
    /// A later rule wins over an earlier one, and any rule over `attention` and `mlp`.
    pub rules: Vec<String>,
    /// Reach the levels gradually: dense at step 0, then pruned by magnitude
    /// every `ramp_every` steps along a cubic (Zhu and Gupta's schedule) to
    /// the target at this step. 0: sparse from the start.
    pub ramp_steps: u64,
    /// Steps between two pruning stages of the ramp.
    pub ramp_every: u64,
    /// Dynamic sparsity: "off"; "set" (prune the smallest weights, regrow
    /// as many at random) or "rigl" (regrow where the dense gradient is largest).
    pub dynamic: String,
    /// Steps between two prune-and-regrow updates (dynamic sparsity).
    pub update_every: u64,
    /// Fraction of each tensor's nonzeros pruned and regrown at an update.
    pub prune_fraction: f64,
    /// No more updates after this step (RigL stops at 3/4 of training); 0: never stop.
    pub update_until: u64,
    /// Density (nonzeros / elements) at or below which a sparse matrix runs
    /// through the sparse kernels; above it, through the dense GEMM on the
    /// matrix expanded with zeros. The default is the crossover measured by
    /// `weightstream bench sparsity` (see BENCHMARKS.md).
    pub kernel_density_max: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FabricSection {
    /// Data-parallel workers; each trains on its shard (batch_size / workers
    /// sequences) of every global batch. More than 1 (or transport "tcp")
    /// puts the broadcast-reduce tree between the store and the workers.
    pub workers: usize,
    /// Children per broadcast-reduce node (2 to 16).
    pub fanout: usize,
    /// "inproc" (channels between threads) or "tcp" (authenticated sockets on `bind`).
    pub transport: String,
    /// Bytes of one chunk on the fabric (a multiple of 4).
    pub chunk_bytes: usize,
    /// Chunks in flight per link and direction: the flow-control credit.
    pub chunks_in_flight: usize,
    /// MAC every payload byte, not just headers and their CRC (costs bandwidth).
    pub mac_payload: bool,
    /// The address listeners bind (port 0: any free port).
    pub bind: String,
    /// A file holding the cluster secret (else WEIGHTSTREAM_SECRET; an
    /// in-process TCP tree without either makes a random one).
    pub secret_file: String,
    /// "threads": this process runs the nodes and workers; "join": they are
    /// separate processes (`weightstream fabric`, `weightstream worker`) that
    /// join the store at `bind` (what `weightstream store` sets).
    pub launch: String,
    /// Seconds the store waits for the tree to form, and a joiner for its place in it.
    pub join_timeout_s: u64,
    /// Seconds a pass may go without its result before the store gives up
    /// on the tree and forms it again (launch = "join"); 0: no limit.
    pub step_timeout_s: u64,
    /// The store's process runs the top broadcast-reduce node itself: one
    /// network edge fewer (faster on one machine), but the store then sends
    /// and receives F streams instead of one (`cluster` sets it).
    pub top_in_store: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSection {
    /// "streaming": weights live in the store and stream to the worker layer
    /// by layer; "resident": every weight held by one process (the baseline).
    pub mode: String,
    /// Layers in flight beyond the one computing (at most `PREFETCH_DEPTH_MAX`).
    pub prefetch_depth: usize,
    /// Streamed weights: "fp32" or "bf16" (master weights stay fp32).
    pub dtype: String,
    /// A GPU worker with memory to spare after its micro-batch's need keeps
    /// each layer's weights from their first fetch of a step to its end: the
    /// store sends every layer once a step instead of once per use.
    #[serde(default = "yes")]
    pub keep_weights: bool,
    /// A GPU worker with memory to spare sums the micro-batches' gradients
    /// and sends each layer's sum once a step instead of once per micro-batch.
    #[serde(default = "yes")]
    pub sum_gradients: bool,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// DRAM budget of the store in bytes; 0: use dram_fraction.
    pub dram_bytes: u64,
    /// DRAM budget as a fraction of the model state (16 bytes per parameter).
    pub dram_fraction: f64,
    /// Bytes of one page, the unit of DRAM residency (16 bytes per parameter).
    pub page_bytes: u64,
    /// Threads of the store's own pool (optimizer, copies, conversions); 0:
    /// one per core. Its own pool, so that its work never queues behind the
    /// CPU worker's compute tasks.
    pub threads: usize,
    /// Flash-tier page I/O around the kernel's page cache (`O_DIRECT`)
    /// where the file system allows it; buffered otherwise. Off by default:
    /// buffered, the kernel keeps what free memory it can of the flash tier
    /// in its page cache (faster where the disk is slower than memory, see
    /// BENCHMARKS.md); on, the tiers use no memory beyond the DRAM budget.
    #[serde(default)]
    pub direct_io: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSection {
    /// Worker memory budget (weights in flight, activations, workspace) in
    /// bytes; 0: no limit. The batch is split into micro-batches to fit.
    pub memory_bytes: u64,
}

/// Named limit on `stream.prefetch_depth`.
pub const PREFETCH_DEPTH_MAX: usize = 16;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps.
    pub steps: u64,
    /// Sequences per step (the global batch).
    pub batch_size: usize,
    /// Tokens per sequence; 0 means model.block_size.
    pub seq_len: usize,
    /// Sequences per micro-batch; 0 means the whole batch at once.
    pub micro_batch: usize,
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub grad_clip: f64,
    pub seed: u64,
    /// Evaluate on the validation split every this many steps (and at the end); 0: only at the end.
    pub eval_interval: u64,
    /// Batches averaged for a validation loss.
    pub eval_batches: usize,
    /// Save a checkpoint every this many steps (and at the end); 0: only at the end.
    pub checkpoint_interval: u64,
    /// Also write the final weights as a Hugging Face checkpoint
    /// (`checkpoint-<step>/`); streaming runs gather the weights for it.
    pub export_hf: bool,
    /// Precision of the linear layers' products: "fp32", or "bf16" (bf16
    /// inputs, fp32 accumulation, through oneDNN; master weights stay fp32).
    pub precision: String,
    /// Worker threads; 0: one per core.
    pub threads: usize,
    /// Where the worker computes: "cpu", or "cuda" (GPU 0; needs a build
    /// with `--features cuda` and an NVIDIA GPU with CUDA 13 libraries).
    pub device: String,
    /// Start from the weights of this Hugging Face GPT-2 checkpoint directory
    /// (model.safetensors and config.json: an export, or `save_pretrained`
    /// output) instead of the seeded initialisation; its config must match
    /// [model]. Sparse tensors keep its values of largest magnitude.
    pub init_from: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A UTF-8 text file (tokenized with the GPT-2 BPE) or a uint16 `.bin` token file.
    pub path: String,
    /// The last fraction of the tokens held out for validation.
    pub val_fraction: f64,
    /// Where tokenized text is cached; empty disables the cache.
    pub cache_dir: String,
}

pub const PRESETS: &[&str] = &["tiny", "small"];

impl RunConfig {
    pub fn preset(name: &str) -> Result<RunConfig, TrainError> {
        let train = TrainSection {
            steps: 200,
            batch_size: 8,
            seq_len: 0,
            micro_batch: 0,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 20,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            seed: 1337,
            eval_interval: 50,
            eval_batches: 8,
            checkpoint_interval: 0,
            export_hf: true,
            precision: "fp32".into(),
            threads: 0,
            device: "cpu".into(),
            init_from: String::new(),
        };
        let data = DataSection {
            path: "../shared/data/shakespeare.txt".into(),
            val_fraction: 0.1,
            cache_dir: ".cache/weightstream".into(),
        };
        let (model, train) = match name {
            "tiny" => (Gpt2Config::tiny(), train),
            "small" => (
                Gpt2Config::gpt2_small(),
                TrainSection {
                    steps: 1000,
                    batch_size: 4,
                    lr: 6e-4,
                    min_lr: 6e-5,
                    warmup_steps: 50,
                    eval_interval: 100,
                    ..train
                },
            ),
            other => {
                return Err(TrainError::Config(format!(
                    "unknown preset `{other}`: choose one of {}",
                    PRESETS.join(", ")
                )))
            }
        };
        Ok(RunConfig {
            preset: name.into(),
            run_dir: String::new(),
            model,
            train,
            data,
            stream: StreamSection {
                mode: "streaming".into(),
                prefetch_depth: 2,
                dtype: "fp32".into(),
                keep_weights: true,
                sum_gradients: true,
            },
            store: StoreSection {
                dram_bytes: 0,
                dram_fraction: 1.0,
                page_bytes: 64 << 20,
                threads: 0,
                direct_io: false,
            },
            worker: WorkerSection { memory_bytes: 0 },
            fabric: FabricSection {
                workers: 1,
                fanout: 4,
                transport: "inproc".into(),
                chunk_bytes: 1 << 20,
                chunks_in_flight: 8,
                mac_payload: false,
                bind: "127.0.0.1:0".into(),
                secret_file: String::new(),
                launch: "threads".into(),
                join_timeout_s: 300,
                step_timeout_s: 1800,
                top_in_store: false,
            },
            sparsity: SparsitySection {
                attention: 0.0,
                mlp: 0.0,
                rules: Vec::new(),
                ramp_steps: 0,
                ramp_every: 10,
                dynamic: "off".into(),
                update_every: 100,
                prune_fraction: 0.3,
                update_until: 0,
                kernel_density_max: ws_model::workspace::SPARSE_CROSSOVER_DENSITY,
            },
        })
    }

    /// Resolves preset, file and overrides. The preset is taken from the last
    /// `preset=` override, else the file's `preset`, else `tiny`.
    pub fn resolve(file: Option<&Path>, overrides: &[String]) -> Result<RunConfig, TrainError> {
        let file_table = match file {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|e| TrainError::io("cannot read config file", path, e))?;
                text.parse::<Table>().map_err(|e| {
                    TrainError::Config(format!("config file {}: {}", path.display(), one_line(&e.to_string())))
                })?
            }
            None => Table::new(),
        };
        RunConfig::resolve_table(file_table, overrides)
    }

    /// A saved configuration (a run's `config.toml`) with `--set` overrides.
    pub fn resolve_text(text: &str, overrides: &[String]) -> Result<RunConfig, TrainError> {
        let table = text
            .parse::<Table>()
            .map_err(|e| TrainError::Config(format!("saved configuration: {}", one_line(&e.to_string()))))?;
        RunConfig::resolve_table(table, overrides)
    }

    fn resolve_table(file_table: Table, overrides: &[String]) -> Result<RunConfig, TrainError> {
        let mut sets = Vec::new();
        for o in overrides {
            let (key, value) = o.split_once('=').ok_or_else(|| {
                TrainError::Config(format!("--set {o}: expected key=value, e.g. --set train.lr=3e-4"))
            })?;
            sets.push((key.trim().to_string(), parse_value(value.trim())));
        }
        let preset = sets
            .iter()
            .rev()
            .find(|(k, _)| k == "preset")
            .map(|(_, v)| v.clone())
            .or_else(|| file_table.get("preset").cloned())
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(TrainError::Config(format!("preset must be a string, got {other}"))),
            })
            .transpose()?
            .unwrap_or_else(|| "tiny".into());
        let base = RunConfig::preset(&preset)?;
        let mut table = Table::try_from(&base).expect("a config serializes");
        let known = table.clone();
        merge(&mut table, &file_table, &known, "")?;
        for (key, value) in sets {
            set_path(&mut table, &known, &key, value)?;
        }
        let config: RunConfig = Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| TrainError::Config(format!("config: {}", one_line(&e.to_string()))))?;
        config.validate()?;
        Ok(config)
    }

    pub fn seq_len(&self) -> usize {
        if self.train.seq_len == 0 {
            self.model.block_size
        } else {
            self.train.seq_len
        }
    }

    /// Sequences per micro-batch (per worker): 0 means a worker's whole share.
    pub fn micro_batch(&self) -> usize {
        if self.train.micro_batch == 0 {
            self.train.batch_size / self.fabric.workers.max(1)
        } else {
            self.train.micro_batch
        }
    }

    /// Whether the broadcast-reduce tree sits between store and workers.
    pub fn uses_fabric(&self) -> bool {
        self.fabric.workers > 1 || self.fabric.transport == "tcp"
    }

    /// The model with its sparse tensors (`[sparsity]`) as it starts.
    pub fn model_spec(&self) -> Result<ModelSpec, TrainError> {
        self.model_spec_at(0)
    }

    /// The fraction of `level` reached after `completed` steps of the ramp
    /// (`sparsity.ramp_steps`): 0 at the start, then in stages every
    /// `ramp_every` steps along 1 - (1 - stage / ramp_steps)^3, the level at
    /// `ramp_steps` and after.
    pub fn ramp_level(&self, level: f64, completed: u64) -> f64 {
        let (k, every) = (self.sparsity.ramp_steps, self.sparsity.ramp_every.max(1));
        if k == 0 || completed >= k {
            return level;
        }
        let stage = (completed / every * every) as f64 / k as f64;
        level * (1.0 - (1.0 - stage).powi(3))
    }

    /// The model after `completed` steps: during the ramp, a sparse tensor
    /// keeps more nonzeros than its target (every element at step 0).
    pub fn model_spec_at(&self, completed: u64) -> Result<ModelSpec, TrainError> {
        let mut spec = self.target_spec()?;
        if self.sparsity.ramp_steps > 0 {
            let reached = self.ramp_level(1.0, completed);
            for ts in &mut spec.tensors {
                if let Some(nnz) = ts.nnz {
                    // Of the zeros the target has, the share the ramp has reached.
                    let zeros = ((ts.numel() - nnz) as f64 * reached).round() as usize;
                    ts.nnz = Some(ts.numel() - zeros);
                }
            }
        }
        Ok(spec)
    }

    /// The model at its target sparsity.
    fn target_spec(&self) -> Result<ModelSpec, TrainError> {
        self.model.validate()?;
        let mut spec = ModelSpec::new(self.model);
        let sp = &self.sparsity;
        let bad = |msg: String| TrainError::Config(format!("sparsity: {msg}"));
        let mut levels: Vec<f64> = spec
            .tensors
            .iter()
            .map(|t| match () {
                _ if !t.is_linear_weight() => 0.0,
                _ if t.name.contains(".attn.") => sp.attention,
                _ => sp.mlp,
            })
            .collect();
        for rule in &sp.rules {
            let (pattern, level) = rule
                .rsplit_once('=')
                .and_then(|(p, l)| Some((p.trim(), l.trim().parse::<f64>().ok()?)))
                .ok_or_else(|| bad(format!("rule `{rule}` is not PATTERN=LEVEL, e.g. \"*.mlp.c_fc.weight=0.9\"")))?;
            let mut matched = false;
            for (t, level_t) in levels.iter_mut().enumerate() {
                if glob_match(pattern, &spec.tensors[t].name) {
                    matched = true;
                    *level_t = level;
                }
            }
            if !matched {
                return Err(bad(format!("rule `{rule}` matches no tensor (names as in Hugging Face GPT-2, e.g. transformer.h.0.mlp.c_fc.weight)")));
            }
        }
        for (t, level) in levels.into_iter().enumerate() {
            spec.set_sparsity(t, level).map_err(bad)?;
        }
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        let spec = self.model_spec()?;
        let t = &self.train;
        let bad = |msg: String| Err(TrainError::Config(msg));
        if t.batch_size == 0 {
            return bad("train.batch_size must be at least 1".into());
        }
        if self.seq_len() > self.model.block_size {
            return bad(format!(
                "train.seq_len ({}) is longer than model.block_size ({})",
                t.seq_len, self.model.block_size
            ));
        }
        let f = &self.fabric;
        if !(1..=ws_fabric::topology::WORKERS_MAX).contains(&f.workers) || !t.batch_size.is_multiple_of(f.workers) {
            return bad(format!(
                "fabric.workers ({}) must be between 1 and {} and divide train.batch_size ({})",
                f.workers,
                ws_fabric::topology::WORKERS_MAX,
                t.batch_size
            ));
        }
        ws_fabric::Tree::new(f.workers, f.fanout).map_err(TrainError::Config)?;
        if !(4..=ws_fabric::wire::PAYLOAD_BYTES_MAX).contains(&f.chunk_bytes) || !f.chunk_bytes.is_multiple_of(4) {
            return bad(format!(
                "fabric.chunk_bytes ({}) must be a multiple of 4 between 4 and {}",
                f.chunk_bytes,
                ws_fabric::wire::PAYLOAD_BYTES_MAX
            ));
        }
        if !(1..=ws_fabric::link::CREDITS_MAX).contains(&f.chunks_in_flight) {
            return bad(format!(
                "fabric.chunks_in_flight ({}) must be between 1 and {}",
                f.chunks_in_flight,
                ws_fabric::link::CREDITS_MAX
            ));
        }
        if f.launch != "threads" && (f.launch != "join" || f.transport != "tcp") {
            return bad(format!(
                "fabric.launch `{}` is not one of threads, join (join needs fabric.transport = \"tcp\")",
                f.launch
            ));
        }
        if f.transport != "inproc" && f.transport != "tcp" {
            return bad(format!("fabric.transport `{}` is not one of inproc, tcp", f.transport));
        }
        if self.uses_fabric() && (self.stream.mode != "streaming" || t.device != "cpu") {
            return bad("fabric.workers > 1 and fabric.transport = \"tcp\" need stream.mode = \"streaming\" \
                        and train.device = \"cpu\""
                .into());
        }
        if !(t.batch_size / f.workers).is_multiple_of(self.micro_batch()) {
            return bad(format!(
                "train.micro_batch ({}) must divide each worker's share of train.batch_size ({} / {} workers)",
                t.micro_batch, t.batch_size, f.workers
            ));
        }
        if !(t.lr > 0.0 && t.min_lr >= 0.0 && t.min_lr <= t.lr) {
            return bad(format!("need 0 <= train.min_lr <= train.lr and lr > 0 (lr {}, min_lr {})", t.lr, t.min_lr));
        }
        if !(0.0..1.0).contains(&t.beta1) || !(0.0..1.0).contains(&t.beta2) {
            return bad(format!("train.beta1 and train.beta2 must be in [0, 1) (got {}, {})", t.beta1, t.beta2));
        }
        if t.eps <= 0.0 || t.weight_decay < 0.0 || t.grad_clip < 0.0 {
            return bad("train.eps must be positive, train.weight_decay and train.grad_clip non-negative".into());
        }
        match t.device.as_str() {
            "cpu" => {}
            "cuda" if cfg!(feature = "cuda") => {}
            "cuda" => {
                return bad("train.device = \"cuda\" needs a build with CUDA support: \
                            cargo build --release --features cuda"
                    .into())
            }
            other => return bad(format!("train.device `{other}` is not one of cpu, cuda")),
        }
        match ws_kernels::Precision::parse(&t.precision) {
            Some(ws_kernels::Precision::Bf16) if t.device == "cuda" => {}
            Some(ws_kernels::Precision::Bf16) => ws_kernels::bf16::available()
                .map_err(|e| TrainError::Config(format!("train.precision = \"bf16\": {e}")))?,
            Some(ws_kernels::Precision::Fp32) => {}
            None => return bad(format!("train.precision `{}` is not one of fp32, bf16", t.precision)),
        }
        let st = &self.stream;
        if st.mode != "streaming" && st.mode != "resident" {
            return bad(format!("stream.mode `{}` is not one of streaming, resident", st.mode));
        }
        if st.prefetch_depth > PREFETCH_DEPTH_MAX {
            return bad(format!("stream.prefetch_depth {} is above its limit {PREFETCH_DEPTH_MAX}", st.prefetch_depth));
        }
        if ws_kernels::Precision::parse(&st.dtype).is_none() {
            return bad(format!("stream.dtype `{}` is not one of fp32, bf16", st.dtype));
        }
        if self.store.page_bytes < 4096 {
            return bad(format!("store.page_bytes must be at least 4096 (got {})", self.store.page_bytes));
        }
        if !(self.store.dram_fraction > 0.0 && self.store.dram_fraction <= 1.0) {
            return bad(format!("store.dram_fraction must be in (0, 1] (got {})", self.store.dram_fraction));
        }
        if !(self.data.val_fraction > 0.0 && self.data.val_fraction < 1.0) {
            return bad(format!("data.val_fraction must be between 0 and 1 (got {})", self.data.val_fraction));
        }
        let sp = &self.sparsity;
        if !["off", "set", "rigl"].contains(&sp.dynamic.as_str()) {
            return bad(format!("sparsity.dynamic `{}` is not one of off, set, rigl", sp.dynamic));
        }
        if sp.dynamic != "off" && (sp.update_every == 0 || !(sp.prune_fraction > 0.0 && sp.prune_fraction <= 1.0)) {
            return bad(format!(
                "dynamic sparsity needs sparsity.update_every >= 1 and 0 < sparsity.prune_fraction <= 1 (got {}, {})",
                sp.update_every, sp.prune_fraction
            ));
        }
        if sp.ramp_steps > 0 && sp.ramp_every == 0 {
            return bad("sparsity.ramp_every must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&sp.kernel_density_max) {
            return bad(format!("sparsity.kernel_density_max must be in [0, 1] (got {})", sp.kernel_density_max));
        }
        if !t.init_from.is_empty() {
            // Its config now, so a wrong directory fails before the run starts.
            let from = crate::checkpoint::load_config(Path::new(&t.init_from))?;
            if from != self.model {
                return bad(format!(
                    "train.init_from {} is a model of {from:?}, but [model] is {:?}: set the model to match",
                    t.init_from, self.model
                ));
            }
        }
        if spec.is_sparse() && t.device != "cpu" {
            return bad("sparse layers run on the CPU worker only: set train.device = \"cpu\" or sparsity to 0".into());
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a config serializes")
    }
}

fn one_line(s: &str) -> String {
    s.split('\n').map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}

/// Whether `name` matches `pattern`, where `*` stands for any run of characters.
fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

/// A `--set` value: TOML if it parses as a value (numbers, booleans, quoted
/// strings), else a bare string (`--set data.path=corpus.txt`).
fn parse_value(s: &str) -> Value {
    format!("v = {s}")
        .parse::<Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(s.to_string()))
}

fn unknown_key(path: &str, key: &str, known: &Table) -> TrainError {
    let full = if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
    let closest =
        known
            .keys()
            .map(|k| (edit_distance(k, key), k))
            .min()
            .filter(|(d, _)| *d <= 3)
            .map(|(_, k)| {
                if path.is_empty() {
                    format!(" (did you mean `{k}`?)")
                } else {
                    format!(" (did you mean `{path}.{k}`?)")
                }
            })
            .unwrap_or_default();
    let keys: Vec<&str> = known.keys().map(String::as_str).collect();
    TrainError::Config(format!("unknown config key `{full}`{closest}; known keys here: {}", keys.join(", ")))
}

/// Copies `src` over `dst` key by key; every key must exist in `known`.
fn merge(dst: &mut Table, src: &Table, known: &Table, path: &str) -> Result<(), TrainError> {
    for (k, v) in src {
        let Some(kv) = known.get(k) else {
            return Err(unknown_key(path, k, known));
        };
        let sub = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
        match (kv, v) {
            (Value::Table(kt), Value::Table(vt)) => {
                let Some(Value::Table(dt)) = dst.get_mut(k) else { unreachable!("dst mirrors known") };
                merge(dt, vt, kt, &sub)?;
            }
            (Value::Table(_), _) => {
                return Err(TrainError::Config(format!(
                    "config key `{sub}` is a section: use [{sub}] with keys inside"
                )))
            }
            _ => {
                dst.insert(k.clone(), coerce(kv, v.clone()));
            }
        }
    }
    Ok(())
}

fn set_path(table: &mut Table, known: &Table, key: &str, value: Value) -> Result<(), TrainError> {
    let parts: Vec<&str> = key.split('.').collect();
    let (mut dst, mut kn) = (table, known);
    let mut path = String::new();
    for (i, part) in parts.iter().enumerate() {
        let Some(kv) = kn.get(*part) else {
            return Err(unknown_key(&path, part, kn));
        };
        if i + 1 == parts.len() {
            if kv.is_table() {
                return Err(TrainError::Config(format!("--set {key}: `{key}` is a section; set one of its keys")));
            }
            dst.insert(part.to_string(), coerce(kv, value));
            return Ok(());
        }
        let (Value::Table(kt), Some(Value::Table(dt))) = (kv, dst.get_mut(*part)) else {
            return Err(TrainError::Config(format!("--set {key}: `{part}` has no keys below it")));
        };
        path = if path.is_empty() { part.to_string() } else { format!("{path}.{part}") };
        dst = dt;
        kn = kt;
    }
    unreachable!("the loop returns on the last part")
}

/// Integers are accepted where floats are expected (`lr = 1`), and a bare
/// word where a string is expected.
fn coerce(expected: &Value, v: Value) -> Value {
    match (expected, v) {
        (Value::Float(_), Value::Integer(i)) => Value::Float(i as f64),
        (_, v) => v,
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + (ca != *cb) as usize).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(file: Option<&Path>, sets: &[&str]) -> String {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        RunConfig::resolve(file, &sets).unwrap_err().to_string()
    }

    #[test]
    fn defaults_resolve_to_the_tiny_preset() {
        let c = RunConfig::resolve(None, &[]).unwrap();
        assert_eq!(c, RunConfig::preset("tiny").unwrap());
        assert_eq!(c.seq_len(), 256);
    }

    #[test]
    fn overrides_apply_in_order_over_the_file_and_preset() {
        let dir = ws_store::scratch::dir("config");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("run.toml");
        std::fs::write(&file, "preset = \"small\"\n[train]\nlr = 1\nsteps = 7\n[model]\nn_layer = 2\n").unwrap();
        let sets = vec!["train.steps=9".to_string(), "data.path=x.txt".to_string()];
        let c = RunConfig::resolve(Some(&file), &sets).unwrap();
        assert_eq!(c.model.n_embd, 768, "from the small preset");
        assert_eq!(c.model.n_layer, 2, "from the file");
        assert_eq!(c.train.lr, 1.0, "integer accepted for a float");
        assert_eq!(c.train.steps, 9, "--set wins over the file");
        assert_eq!(c.data.path, "x.txt", "bare word as a string");
        let round: RunConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(round, c);
    }

    #[test]
    fn sparsity_levels_come_from_sections_then_rules_in_order() {
        assert!(glob_match("*.mlp.*.weight", "transformer.h.3.mlp.c_fc.weight"));
        assert!(glob_match("transformer.h.0.*", "transformer.h.0.attn.c_proj.weight"));
        assert!(!glob_match("transformer.h.1.*", "transformer.h.10.attn.c_proj.weight"));
        assert!(!glob_match("*.mlp.*.weight", "transformer.h.3.mlp.c_fc.bias"));
        assert!(glob_match("a*b*b", "abb") && !glob_match("a*b*b", "ab"));
        let c = RunConfig::resolve(
            None,
            &[
                "sparsity.attention=0.75".into(),
                "sparsity.mlp=0.9".into(),
                r#"sparsity.rules=["transformer.h.0.*=0", "*.h.1.mlp.c_fc.weight=0.5"]"#.into(),
            ],
        )
        .unwrap();
        let spec = c.model_spec().unwrap();
        let level = |name: &str| {
            let t = &spec.tensors[spec.tensor_index(name).unwrap()];
            1.0 - t.len() as f64 / t.numel() as f64
        };
        assert_eq!(level("transformer.h.0.attn.c_attn.weight"), 0.0);
        assert_eq!(level("transformer.h.0.mlp.c_fc.weight"), 0.0);
        assert!((level("transformer.h.1.attn.c_attn.weight") - 0.75).abs() < 1e-3);
        assert!((level("transformer.h.1.mlp.c_proj.weight") - 0.9).abs() < 1e-3);
        assert!((level("transformer.h.1.mlp.c_fc.weight") - 0.5).abs() < 1e-3);
        assert_eq!(level("transformer.wte.weight"), 0.0);
        assert_eq!(level("transformer.h.1.ln_1.weight"), 0.0);
        for (set, want) in [
            (r#"sparsity.rules=["*.wte.*=0.5"]"#, "transformer.wte.weight cannot be sparse"),
            (r#"sparsity.rules=["nothing.like.this=0.5"]"#, "matches no tensor"),
            (r#"sparsity.rules=["*.mlp.c_fc.weight"]"#, "is not PATTERN=LEVEL"),
            ("sparsity.mlp=1.0", "outside 0 to 0.99"),
            ("sparsity.dynamic=often", "sparsity.dynamic `often`"),
        ] {
            let e = RunConfig::resolve(None, &[set.into()]).unwrap_err().to_string();
            assert!(e.contains(want) && !e.contains('\n'), "{set}: {e}");
        }
    }

    #[test]
    fn unknown_and_mistyped_keys_are_one_line_errors() {
        let e = err(None, &["train.lrr=1"]);
        assert!(e.contains("unknown config key `train.lrr`") && e.contains("did you mean `train.lr`"), "{e}");
        assert!(!e.contains('\n'));
        let e = err(None, &["trian.lr=1"]);
        assert!(e.contains("`trian`") && e.contains("did you mean `train`"), "{e}");
        let e = err(None, &["train.steps=lots"]);
        assert!(e.contains("steps") && !e.contains('\n'), "{e}");
        let e = err(None, &["preset=huge"]);
        assert!(e.contains("unknown preset `huge`"), "{e}");
        let e = err(None, &["model.n_head=5"]);
        assert!(e.contains("divisible"), "{e}");
        let e = err(None, &["train.lr"]);
        assert!(e.contains("key=value"), "{e}");
    }
}
