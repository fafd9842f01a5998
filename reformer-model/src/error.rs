//! Error types of the library. Each message names the value at fault and what to do.

use std::path::{Path, PathBuf};

/// A config that cannot be read, parsed or accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("failed to read config {path}")]
    Read {
        /// File that failed.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The text is not valid JSON, names an unknown field or has a value of the wrong type.
    #[error("invalid config{}: {message}", location.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Json {
        /// File the text came from, where known.
        location: Option<PathBuf>,
        /// serde_json's description, with line and column.
        message: String,
    },
    /// A field has a value the model cannot use.
    #[error("invalid config field `{field}` = {value}: {fix}")]
    Invalid {
        /// Field name as written in the JSON.
        field: &'static str,
        /// The rejected value.
        value: String,
        /// Reason and fix.
        fix: String,
    },
    /// The model's weights do not fit in the machine's memory.
    #[error("invalid config: {0}")]
    TooLarge(#[from] crate::memory::MemoryError),
}

impl ConfigError {
    pub(crate) fn from_serde(error: serde_json::Error) -> Self {
        let mut message = error.to_string();
        if message.starts_with("unknown field") {
            message.push_str(" (remove or rename it; every field is listed in ReformerConfig's docs)");
        }
        ConfigError::Json { location: None, message }
    }

    /// Attaches the file the config came from.
    pub(crate) fn in_file(self, path: &Path) -> Self {
        match self {
            ConfigError::Json { message, .. } => ConfigError::Json {
                location: Some(path.to_path_buf()),
                message,
            },
            ConfigError::Invalid { field, value, fix } => ConfigError::Invalid {
                field,
                value,
                fix: format!("{fix} (in {})", path.display()),
            },
            other => other,
        }
    }
}

/// An input the model cannot run on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    /// The sequence is longer than the model's maximum length.
    #[error("sequence length {seq_len} exceeds the model's maximum length {max_len} (max_position_embeddings); use a shorter input or a model with a longer axial shape")]
    TooLong {
        /// Requested length.
        seq_len: usize,
        /// The model's maximum.
        max_len: usize,
    },
    /// The batch or the sequence is empty.
    #[error("empty input: batch_size = {batch_size}, seq_len = {seq_len}; give at least one token")]
    Empty {
        /// Batch size of the input.
        batch_size: usize,
        /// Sequence length of the input.
        seq_len: usize,
    },
    /// A token id is not below the vocabulary size.
    #[error("token id {id} is outside the vocabulary (vocab_size = {vocab_size})")]
    TokenOutOfRange {
        /// The offending id.
        id: i64,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
    /// The key mask does not have the shape of the ids.
    #[error("key mask has shape [{mask_batch}, {mask_len}] but the ids have shape [{batch_size}, {seq_len}]")]
    MaskShape {
        /// Rows of the mask.
        mask_batch: usize,
        /// Columns of the mask.
        mask_len: usize,
        /// Batch size of the ids.
        batch_size: usize,
        /// Sequence length of the ids.
        seq_len: usize,
    },
    /// A hash-round override outside 1..=[`crate::config::MAX_HASHES`].
    #[error("num_hashes override {0} is out of range; use 1 to {max} hash rounds", max = crate::config::MAX_HASHES)]
    NumHashes(usize),
    /// Injected rotations do not fit the layer.
    #[error("rotations for layer {layer}: {reason}")]
    Rotations {
        /// Index of the layer in `attn_layers`.
        layer: usize,
        /// Description of the mismatch.
        reason: String,
    },
}
