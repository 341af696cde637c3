//! `weightstream`: the command-line front end.
//!
//! Subcommands: `train` (the main job), `eval`, `generate`, `bench`. Every
//! error a user can cause ends the process with one line on standard error,
//! `error: ...`, and exit status 1; nothing here panics on bad input.

mod bench;
#[cfg(feature = "cuda")]
mod bench_cuda;
mod bench_fabric;
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

#[derive(Subcommand)]
enum Command {
    /// Train a GPT-2 model (default: the `tiny` preset on the bundled Shakespeare corpus).
    Train {
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

/// Keeps freed buffers in the process instead of returning them to the
/// kernel: the GEMM library allocates its packing buffers on every call, and
/// with glibc's defaults each became a fresh mmap and a storm of page faults.
fn keep_freed_memory() {
    // SAFETY: mallopt only tunes glibc's allocator; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
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
        Command::Train { config, mut set, resume, workers, fanout } => {
            set.extend(workers.map(|n| format!("fabric.workers={n}")));
            set.extend(fanout.map(|f| format!("fabric.fanout={f}")));
            commands::train(config.as_deref(), &set, resume.as_deref())
        }
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
