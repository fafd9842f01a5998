//! Saving and loading model weights (burnpack) and finding checkpoints in a run directory.
//!
//! A run directory contains `config.json` and `checkpoints/step-NNNNNNNN/` folders, each with
//! `model.bpk`, `optimizer.bpk` and `state.json`. A checkpoint folder is complete once it has
//! `state.json`, which is written last.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::prelude::*;
use burn::store::{BurnpackStore, ModuleSnapshot};

use crate::config::ReformerConfig;
use crate::error::ConfigError;
use crate::model::ReformerLm;

/// File name of the model weights inside a checkpoint folder.
pub const MODEL_FILE: &str = "model.bpk";
/// File name of the training state inside a checkpoint folder, written last.
pub const STATE_FILE: &str = "state.json";
/// Folder of checkpoints inside a run directory.
pub const CHECKPOINTS_DIR: &str = "checkpoints";

/// Errors loading or saving weights.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The run directory has no config.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No complete checkpoint exists.
    #[error("no complete checkpoint in {0}/checkpoints; train first with reformer-train --out {0}")]
    NoCheckpoint(PathBuf),
    /// Weights could not be written or read.
    #[error("failed to {action} weights {path}: {message}")]
    Weights {
        /// "save" or "load".
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The store's message.
        message: String,
    },
    /// An I/O error on the run directory.
    #[error("failed to read {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
}

/// Writes the model weights to `path` (burnpack).
pub fn save_weights(model: &ReformerLm, path: &Path) -> Result<(), CheckpointError> {
    let mut store = BurnpackStore::from_file(path).overwrite(true);
    model.save_into(&mut store).map_err(|error| CheckpointError::Weights {
        action: "save",
        path: path.to_path_buf(),
        message: error.to_string(),
    })
}

/// Loads weights from `path` into `model`, requiring every tensor to be present and to fit.
pub fn load_weights(mut model: ReformerLm, path: &Path) -> Result<ReformerLm, CheckpointError> {
    let weights_error = |message: String| CheckpointError::Weights { action: "load", path: path.to_path_buf(), message };
    let mut store = BurnpackStore::from_file(path);
    let result = model.load_from(&mut store).map_err(|error| weights_error(error.to_string()))?;
    if !result.errors.is_empty() || !result.missing.is_empty() {
        let missing: Vec<&str> = result.missing.iter().map(|(name, _)| name.as_str()).collect();
        return Err(weights_error(format!(
            "the checkpoint does not fit this config (missing: {missing:?}; errors: {:?}); was it written for another config?",
            result.errors
        )));
    }
    Ok(model)
}

/// Returns the newest complete checkpoint folder of a run directory.
pub fn latest_checkpoint(run_dir: &Path) -> Result<PathBuf, CheckpointError> {
    let dir = run_dir.join(CHECKPOINTS_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::NoCheckpoint(run_dir.to_path_buf()));
        }
        Err(source) => return Err(CheckpointError::Io { path: dir, source }),
    };
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in entries.flatten() {
        let path = entry.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(step) = step
            && path.join(STATE_FILE).is_file()
            && best.as_ref().is_none_or(|(b, _)| step > *b)
        {
            best = Some((step, path));
        }
    }
    best.map(|(_, path)| path).ok_or_else(|| CheckpointError::NoCheckpoint(run_dir.to_path_buf()))
}

/// Reads the model config of a run directory.
pub fn load_run_config(run_dir: &Path) -> Result<ReformerConfig, CheckpointError> {
    Ok(ReformerConfig::load(&run_dir.join("config.json"))?)
}

/// Loads the model of a run directory's newest checkpoint onto `device`.
pub fn load_run_model(run_dir: &Path, device: &Device) -> Result<ReformerLm, CheckpointError> {
    let config = load_run_config(run_dir)?;
    let checkpoint = latest_checkpoint(run_dir)?;
    // The checkpoint replaces every weight, so the seed of the initial ones does not matter.
    let model = ReformerLm::new(&config, 0, device)?;
    load_weights(model, &checkpoint.join(MODEL_FILE))
}

/// Returns a copy of `model` without autodiff, for evaluation.
pub fn without_autodiff(model: &ReformerLm) -> ReformerLm {
    model.clone().valid()
}
