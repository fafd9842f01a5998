//! Saving and loading model weights (burnpack) and finding checkpoints in a run directory.
//!
//! A run directory contains `config.json` and `checkpoints/step-NNNNNNNN/` folders, each with
//! `model.bpk`, `optimizer.bpk` and `state.json`. A checkpoint folder is complete once it has
//! `state.json`, which is written last.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::prelude::*;
use burn::store::{ApplyError, BurnpackStore, ModuleSnapshot};

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
    // Mismatches are collected rather than raised, so that the message can summarise them.
    let mut store = BurnpackStore::from_file(path).validate(false).allow_partial(true);
    let result = model.load_from(&mut store).map_err(|error| weights_error(error.to_string()))?;
    let mut problems = Vec::new();
    if let Some(first) = result.errors.first() {
        let first = match first {
            ApplyError::ShapeMismatch { path, expected, found } => {
                format!("{path} is {:?} in the file but {:?} in the model", found.as_slice(), expected.as_slice())
            }
            other => other.to_string(),
        };
        problems.push(format!("{} tensors do not fit (first: {first})", result.errors.len()));
    }
    if let Some((first, _)) = result.missing.first() {
        problems.push(format!("{} tensors are missing (first: {first})", result.missing.len()));
    }
    if let Some(first) = result.unused.first() {
        problems.push(format!("{} tensors are not in the model (first: {first})", result.unused.len()));
    }
    if !problems.is_empty() {
        return Err(weights_error(format!(
            "the checkpoint does not fit this config: {}; it was written for another config, so load it with the config.json of its run",
            problems.join(", ")
        )));
    }
    if let Some(name) = model.first_non_finite_weight() {
        return Err(weights_error(format!(
            "weight {name} holds NaN or infinite values; the file is damaged or the run diverged before it was saved, so use an earlier checkpoint"
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::test_device;

    fn config(hidden_size: usize) -> ReformerConfig {
        ReformerConfig {
            hidden_size,
            axial_pos_embds_dim: vec![hidden_size / 2, hidden_size / 2],
            axial_pos_shape: vec![4, 8],
            max_position_embeddings: 32,
            lsh_attn_chunk_length: 8,
            local_attn_chunk_length: 8,
            num_buckets: None,
            attention_head_size: 8,
            feed_forward_size: 32,
            vocab_size: 20,
            ..ReformerConfig::default()
        }
    }

    #[test]
    fn checkpoint_of_another_config_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MODEL_FILE);
        save_weights(&ReformerLm::new(&config(16), 0, &test_device()).unwrap(), &path).unwrap();
        let other = ReformerLm::new(&config(32), 0, &test_device()).unwrap();
        let error = load_weights(other, &path).unwrap_err().to_string();
        assert!(error.contains("another config"), "{error}");
    }

    #[test]
    fn damaged_weights_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MODEL_FILE);
        let model = ReformerLm::new(&config(16), 0, &test_device()).unwrap();
        save_weights(&model, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for damaged in [bytes[..bytes.len() / 2].to_vec(), b"not a burnpack file".to_vec(), Vec::new()] {
            std::fs::write(&path, &damaged).unwrap();
            let error = load_weights(model.clone(), &path).unwrap_err().to_string();
            assert!(error.starts_with("failed to load weights"), "{error}");
        }
    }
}
