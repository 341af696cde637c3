//! Training for weightstream: the run configuration (presets, TOML, `--set`
//! overrides), AdamW with PyTorch semantics and the learning-rate schedule,
//! the resident trainer (every weight held by one process: the baseline the
//! streaming executor is checked against), Hugging Face checkpoints, metrics
//! and the loss plot.
//!
//! Errors a user can cause (config, data, checkpoint, run directory) are
//! [`TrainError`]s with one-line messages; broken invariants panic.

pub mod checkpoint;
pub mod config;
mod exec;
pub mod fabric;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod sparsity;
pub mod stream;
pub mod trainer;

pub use config::RunConfig;
pub use trainer::{Engine, StepStats, Trainer};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] ws_model::ConfigError),
    #[error(transparent)]
    Data(#[from] ws_data::DataError),
    #[error("checkpoint {path}: {problem}")]
    Checkpoint { path: PathBuf, problem: String },
    #[error("run directory {path}: {problem}")]
    RunDir { path: PathBuf, problem: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl TrainError {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> TrainError {
        TrainError::Io { what, path: path.into(), source }
    }
}
