//! `weightstream`: the command-line front end.
//!
//! Subcommands: `train` (the main job), `eval`, `generate`, `bench`. Every
//! error a user can cause ends the process with one line on standard error,
//! `error: ...`, and exit status 1; nothing here panics on bad input.

mod bench;
#[cfg(feature = "cuda")]
mod bench_cuda;
mod bench_fabric;
mod cluster;
mod commands;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "weightstream",
    version,
    about = "Train GPT models larger than the memory of the machine that computes them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// What `train` and `store` take.
#[derive(clap::Args)]
struct RunArgs {
    /// A TOML run configuration (see README); keys not given keep their defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override one key, e.g. --set train.steps=500 --set preset=small (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue the run in this directory from its last checkpoint (same
    /// configuration and data order; --set may change e.g. train.steps).
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Data-parallel workers behind the broadcast-reduce fabric (same as --set fabric.workers=N).
    #[arg(long)]
    workers: Option<usize>,
    /// Children per fabric node, 2 to 16 (same as --set fabric.fanout=F).
    #[arg(long)]
    fanout: Option<usize>,
}

impl RunArgs {
    /// Trains with these arguments and `extra` overrides after them.
    fn train(mut self, extra: &[String]) -> commands::Result<()> {
        self.set.extend(self.workers.map(|n| format!("fabric.workers={n}")));
        self.set.extend(self.fanout.map(|f| format!("fabric.fanout={f}")));
        self.set.extend_from_slice(extra);
        commands::train(self.config.as_deref(), &self.set, self.resume.as_deref())
    }
}

#[derive(Subcommand)]
enum Command {
    /// Train a GPT-2 model (default: the `tiny` preset on the bundled Shakespeare corpus).
    Train {
        #[command(flatten)]
        run: RunArgs,
    },
    /// The store of a multi-process run: trains like `train`, with its fabric
    /// nodes and workers as separate processes that join it at --listen.
    Store {
        #[command(flatten)]
        run: RunArgs,
        /// Where nodes and workers join (fabric.bind); 0.0.0.0:PORT for other machines.
        #[arg(long, env = "WEIGHTSTREAM_LISTEN", default_value = "127.0.0.1:7070")]
        listen: String,
    },
    /// A broadcast-reduce node process: joins the store, takes the place in
    /// the tree it assigns, forwards weights down and sums gradients up.
    Fabric {
        /// The store's address (host:port).
        #[arg(long, env = "WEIGHTSTREAM_STORE")]
        store: String,
        /// Where this node listens for its children; 0.0.0.0:0 for other machines.
        #[arg(long, env = "WEIGHTSTREAM_BIND", default_value = "127.0.0.1:0")]
        bind: String,
        /// The cluster secret's file (else WEIGHTSTREAM_SECRET).
        #[arg(long, env = "WEIGHTSTREAM_SECRET_FILE")]
        secret_file: Option<PathBuf>,
        /// Seconds to reach the store and wait for the tree to form.
        #[arg(long, env = "WEIGHTSTREAM_JOIN_TIMEOUT", default_value_t = 300)]
        timeout: u64,
    },
    /// A worker process: joins the store, loads the run's data, and trains
    /// its shard of every global batch until the store ends the run.
    Worker {
        #[arg(long, env = "WEIGHTSTREAM_STORE")]
        store: String,
        #[arg(long, env = "WEIGHTSTREAM_SECRET_FILE")]
        secret_file: Option<PathBuf>,
        #[arg(long, env = "WEIGHTSTREAM_JOIN_TIMEOUT", default_value_t = 300)]
        timeout: u64,
        /// Compute threads (0: one per core).
        #[arg(long, env = "WEIGHTSTREAM_THREADS", default_value_t = 0)]
        threads: usize,
    },
    /// A whole multi-process run on this machine: a store, the fabric nodes
    /// and N workers as processes, with a fresh cluster secret; Ctrl-C stops them all.
    Cluster {
        #[arg(long, default_value_t = 2)]
        workers: usize,
        #[arg(long, default_value_t = 4)]
        fanout: usize,
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Write the Hugging Face checkpoint (model.safetensors, config.json) of a
    /// run's store checkpoint.
    Export {
        /// A run directory (its checkpoint/) or a store checkpoint directory.
        #[arg(long)]
        run: PathBuf,
        /// The new checkpoint directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Mean next-token cross-entropy of a checkpoint over a token or text file.
    Eval {
        /// A checkpoint directory (model.safetensors + config.json, Hugging Face layout).
        #[arg(long)]
        checkpoint: PathBuf,
        /// A uint16 .bin token file or a UTF-8 text file.
        #[arg(long)]
        data: PathBuf,
        /// Windows per forward pass.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Window length in tokens (default: the model's block size).
        #[arg(long)]
        seq: Option<usize>,
    },
    /// Continue a prompt with a checkpoint.
    Generate {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        prompt: String,
        /// Tokens to generate.
        #[arg(long, default_value_t = 100)]
        tokens: usize,
        /// Sampling temperature; 0 picks the most likely token.
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        /// Sample only among the k most likely tokens (0: all).
        #[arg(long, default_value_t = 200)]
        top_k: usize,
        #[arg(long, default_value_t = 1337)]
        seed: u64,
    },
    /// Benchmarks; each prints one JSON line.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// mimalloc, not glibc's malloc. A training step allocates and frees
/// activations and the GEMM library's packing buffers of tens to hundreds of
/// MB; glibc maps the ones above its threshold afresh each time, and first
/// touch of new memory (a fault and zeroing per page) was 11% of a CPU
/// step's samples on the 2-core VM (`perf`, GPT-2 small at 4 x 1024). With
/// mimalloc and freed memory kept (below), minor faults over `bench
/// streaming --preset small --steps 3 --dram-fraction 0.25` fell from 5.1M
/// to 14k and the resident trainer gained 4-8%.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps freed memory in the process instead of giving it back to the
/// kernel: a step's buffers come back at the next step at the same sizes,
/// and memory given back is faulted in again. The process then holds its
/// peak, which the worker's budget already counts.
fn keep_freed_memory() {
    // mimalloc.h's `mi_option_purge_delay` (the 16th option; the Rust
    // bindings do not name it): -1 never purges.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets a global option of the allocator; safe at any time.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

/// oneDNN (bf16) brings an OpenMP pool; passive waiting keeps its threads
/// from spinning against ours between products. Set before any thread starts.
fn quiet_openmp() {
    if std::env::var_os("OMP_WAIT_POLICY").is_none() {
        std::env::set_var("OMP_WAIT_POLICY", "PASSIVE");
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    quiet_openmp();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEIGHTSTREAM_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train { run } => run.train(&[]),
        Command::Store { run, listen } => {
            run.train(&["fabric.transport=tcp".into(), "fabric.launch=join".into(), format!("fabric.bind={listen}")])
        }
        Command::Fabric { store, bind, secret_file, timeout } => {
            cluster::node(&store, &bind, secret_file.as_deref(), timeout)
        }
        Command::Worker { store, secret_file, timeout, threads } => {
            commands::set_threads(threads);
            cluster::worker(&store, secret_file.as_deref(), timeout)
        }
        Command::Cluster { workers, fanout, config, set } => cluster::run(workers, fanout, config.as_deref(), &set),
        Command::Export { run, out } => commands::export(&run, &out),
        Command::Eval { checkpoint, data, batch, seq } => commands::eval(&checkpoint, &data, batch, seq),
        Command::Generate { checkpoint, prompt, tokens, temperature, top_k, seed } => {
            commands::generate(&checkpoint, &prompt, tokens, temperature, top_k, seed)
        }
        Command::Bench(b) => bench::run(b),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
