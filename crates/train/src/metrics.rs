//! Metrics of a run as JSON lines (`metrics.jsonl`), one object per step,
//! flushed as written so a crashed run keeps its history.

use crate::TrainError;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub step: u64,
    pub train_loss: f64,
    /// Present on the steps that evaluated.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub step_ms: f64,
}

pub struct MetricsWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsWriter {
    pub fn create(path: &Path) -> Result<MetricsWriter, TrainError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| TrainError::io("cannot open metrics file", path, e))?;
        Ok(MetricsWriter { path: path.into(), file })
    }

    pub fn write(&mut self, r: &Record) -> Result<(), TrainError> {
        let mut line = serde_json::to_vec(r).expect("json");
        line.push(b'\n');
        self.file.write_all(&line).map_err(|e| TrainError::io("cannot write metrics", &self.path, e))
    }
}

/// Replaces the metrics file with `records` (a resumed run drops the steps
/// after its checkpoint, which it computes again). Temporary file, rename.
pub fn rewrite(path: &Path, records: &[Record]) -> Result<(), TrainError> {
    let mut text = Vec::new();
    for r in records {
        text.extend_from_slice(&serde_json::to_vec(r).expect("json"));
        text.push(b'\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, text).map_err(|e| TrainError::io("cannot write metrics", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io("cannot replace metrics", path, e))
}

/// Reads a metrics file back (for the plot and for tests).
pub fn read(path: &Path) -> Result<Vec<Record>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io("cannot read metrics", path, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .map_err(|e| TrainError::Config(format!("metrics {}: bad line: {e}", path.display())))
        })
        .collect()
}
