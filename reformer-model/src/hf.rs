//! Import and export of Hugging Face Reformer checkpoints (transformers 5.25 layout).
//!
//! A checkpoint folder contains `config.json` and `model.safetensors` (or `pytorch_model.bin`).
//! Config fields use Hugging Face's names, so [`ReformerConfig`] reads them directly once the
//! bookkeeping keys in [`IGNORED_CONFIG_KEYS`] are set aside. Weights load through burn-store
//! with one key table, [`key_table`], from Hugging Face's parameter names to module paths:
//!
//! | Hugging Face name (`reformer.` prefix in the LM models) | module path |
//! |---|---|
//! | `embeddings.word_embeddings.weight` | `embeddings.word` |
//! | `embeddings.position_embeddings.weights.0` / `.1` | `embeddings.position.axial.rows` / `.cols` |
//! | `embeddings.position_embeddings.embedding.weight` | `embeddings.position.table` |
//! | `encoder.layers.<i>.attention.layer_norm.weight` / `.bias` | `layers.<i>.attention.layer_norm.gamma` / `.beta` |
//! | `encoder.layers.<i>.attention.self_attention.query_key.weight` | `layers.<i>.attention.lsh.query_key.weight` |
//! | `encoder.layers.<i>.attention.self_attention.value.weight` (LSH layer) | `layers.<i>.attention.lsh.value.weight` |
//! | `encoder.layers.<i>.attention.self_attention.{query,key,value}.weight` (local layer) | `layers.<i>.attention.local.{query,key,value}.weight` |
//! | `encoder.layers.<i>.attention.output.dense.weight` | `layers.<i>.attention.output.weight` |
//! | `encoder.layers.<i>.feed_forward.layer_norm.weight` / `.bias` | `layers.<i>.feed_forward.layer_norm.gamma` / `.beta` |
//! | `encoder.layers.<i>.feed_forward.dense.dense.weight` / `.bias` | `layers.<i>.feed_forward.dense.weight` / `.bias` |
//! | `encoder.layers.<i>.feed_forward.output.dense.weight` / `.bias` | `layers.<i>.feed_forward.output.weight` / `.bias` |
//! | `encoder.layer_norm.weight` / `.bias` | `layer_norm.gamma` / `.beta` |
//! | `lm_head.decoder.weight` / `.bias` (no prefix) | `lm_head.weight` / `.bias` |
//!
//! Linear weights are stored `[out, in]` by PyTorch and `[in, out]` by Burn; burn-store's
//! PyTorch adapters transpose them. Transformers 5.25 also stores `lm_head.bias`, which its
//! forward never reads: it is the fallback for the output bias when `lm_head.decoder.bias` is
//! absent (as in some checkpoints written by transformers 4), and it is written on export.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::DType;
use burn::store::{
    ApplyError, ApplyResult, BurnToPyTorchAdapter, ChainAdapter, FloatCastAdapter, KeyRemapper, ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter,
    PytorchStore, SafetensorsStore,
};
use serde_json::{Map, Value};

use crate::config::{AttentionKind, ReformerConfig};
use crate::context::Rotations;
use crate::error::ConfigError;
use crate::model::ReformerLm;

/// Keys of an HF `config.json` that describe the file or the training setup rather than the
/// model's numbers, and are ignored on import. Any other key that [`ReformerConfig`] lacks is
/// an error, since it might change the numbers.
///
/// They are `PretrainedConfig`'s generic fields in transformers 5.25 (and 4.x names still
/// found in published checkpoints), plus Reformer fields without a numeric effect in a
/// forward pass: `chunk_size_lm_head` (slicing only) and `use_cache`.
pub const IGNORED_CONFIG_KEYS: &[&str] = &[
    "_name_or_path",
    "add_cross_attention",
    "architectures",
    "bad_words_ids",
    "begin_suppress_tokens",
    "bos_token_id",
    "chunk_size_lm_head",
    "classifier_dropout",
    "cross_attention_hidden_size",
    "decoder_start_token_id",
    "diversity_penalty",
    "do_sample",
    "dtype",
    "early_stopping",
    "encoder_no_repeat_ngram_size",
    "exponential_decay_length_penalty",
    "finetuning_task",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "id2label",
    "is_encoder_decoder",
    "label2id",
    "length_penalty",
    "max_length",
    "min_length",
    "model_type",
    "no_repeat_ngram_size",
    "num_beam_groups",
    "num_beams",
    "num_return_sequences",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "prefix",
    "problem_type",
    "pruned_heads",
    "remove_invalid_values",
    "repetition_penalty",
    "return_dict",
    "return_dict_in_generate",
    "sep_token_id",
    "suppress_tokens",
    "task_specific_params",
    "temperature",
    "tf_legacy_loss",
    "tie_encoder_decoder",
    "tie_word_embeddings",
    "tokenizer_class",
    "top_k",
    "top_p",
    "torch_dtype",
    "torchscript",
    "transformers_version",
    "typical_p",
    "use_bfloat16",
    "use_cache",
];

/// Name of the config file in a checkpoint folder.
pub const CONFIG_FILE: &str = "config.json";
/// Name of the safetensors weights file in a checkpoint folder.
pub const SAFETENSORS_FILE: &str = "model.safetensors";
/// Name of the PyTorch pickle weights file in a checkpoint folder.
pub const PYTORCH_FILE: &str = "pytorch_model.bin";

/// Prefix of the encoder's parameters in the LM-head models.
const MODEL_PREFIX: &str = "reformer.";

/// Prefix given to file keys that would otherwise collide with a module path.
const SET_ASIDE_PREFIX: &str = "set_aside.";

/// Hugging Face class of a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfArchitecture {
    /// `ReformerModelWithLMHead`: causal language model (`is_decoder: true`).
    CausalLm,
    /// `ReformerForMaskedLM`: bidirectional masked language model.
    MaskedLm,
    /// `ReformerModel`: the encoder without a head; outputs hidden states only.
    Base,
}

impl HfArchitecture {
    /// Returns the Hugging Face class name.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::CausalLm => "ReformerModelWithLMHead",
            Self::MaskedLm => "ReformerForMaskedLM",
            Self::Base => "ReformerModel",
        }
    }

    /// Returns whether the checkpoint has an LM head.
    pub fn has_lm_head(self) -> bool {
        self != Self::Base
    }

    /// Returns the architecture a model with `config` is exported as.
    pub fn for_config(config: &ReformerConfig) -> Self {
        if config.is_decoder { Self::CausalLm } else { Self::MaskedLm }
    }

    fn from_class_name(name: &str) -> Option<Self> {
        [Self::CausalLm, Self::MaskedLm, Self::Base].into_iter().find(|a| a.class_name() == name)
    }
}

/// Errors importing or exporting Hugging Face checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    /// A file could not be read or written.
    #[error("failed to access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The config is invalid.
    #[error("invalid Hugging Face config {path}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// The cause.
        source: ConfigError,
    },
    /// The config has keys that are neither Reformer fields nor known bookkeeping keys.
    #[error(
        "invalid Hugging Face config {path}: unknown keys {keys:?}; they are not Reformer config fields \
         nor bookkeeping keys this importer ignores, so results could differ: remove them if they do not \
         change the model"
    )]
    UnknownConfigKeys {
        /// The config file.
        path: PathBuf,
        /// The unknown keys.
        keys: Vec<String>,
    },
    /// The checkpoint folder has no weights file.
    #[error("no weights in {dir}: expected {SAFETENSORS_FILE} or {PYTORCH_FILE}")]
    MissingWeights {
        /// The checkpoint folder.
        dir: PathBuf,
    },
    /// The weights file could not be read.
    #[error("failed to read weights {path}: {message}")]
    Weights {
        /// The weights file.
        path: PathBuf,
        /// The reader's message.
        message: String,
    },
    /// The weights do not match the config.
    #[error(
        "weights {path} do not match the config: {report}; pass --allow-partial to keep the model's own \
         values for the missing tensors"
    )]
    Partial {
        /// The weights file.
        path: PathBuf,
        /// Missing, unexpected and mis-shaped tensors.
        report: LoadReport,
    },
    /// The architecture in the config contradicts the weights or `is_decoder`.
    #[error("invalid checkpoint {dir}: {reason}")]
    Architecture {
        /// The checkpoint folder.
        dir: PathBuf,
        /// The contradiction.
        reason: String,
    },
    /// A rotations file does not fit the model.
    #[error("invalid rotations file {path}: {reason}")]
    Rotations {
        /// The rotations file.
        path: PathBuf,
        /// The problem and its fix.
        reason: String,
    },
}

/// Tensors that did not load cleanly, by Hugging Face name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Tensors the model needs that the file lacks.
    pub missing: Vec<String>,
    /// Tensors in the file that the model has no place for.
    pub unexpected: Vec<String>,
    /// Tensors whose shape or type differs from the model's, with both.
    pub mismatched: Vec<String>,
}

impl LoadReport {
    /// Returns whether every tensor loaded.
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for (label, names) in [("missing", &self.missing), ("unexpected", &self.unexpected), ("mis-shaped", &self.mismatched)] {
            if !names.is_empty() {
                parts.push(format!("{label} {}", names.join(", ")));
            }
        }
        write!(f, "{}", if parts.is_empty() { "complete".to_string() } else { parts.join("; ") })
    }
}

/// A loaded Hugging Face checkpoint.
#[derive(Debug)]
pub struct HfCheckpoint {
    /// The model with the checkpoint's weights. For [`HfArchitecture::Base`] the LM head keeps
    /// its random initial weights and must not be used.
    pub model: ReformerLm,
    /// The checkpoint's class.
    pub architecture: HfArchitecture,
    /// Tensors that did not load (none unless `allow_partial` was given).
    pub report: LoadReport,
}

/// One row of the key table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyEntry {
    /// Hugging Face parameter name.
    pub hf: String,
    /// Module path in [`ReformerLm`].
    pub path: String,
}

/// Returns the key table of a model with `config` saved as `architecture`. The output bias is
/// read from `lm_head.decoder.bias`, or from `lm_head.bias` when `bias_fallback` is set.
pub fn key_table(config: &ReformerConfig, architecture: HfArchitecture, bias_fallback: bool) -> Vec<KeyEntry> {
    let prefix = if architecture.has_lm_head() { MODEL_PREFIX } else { "" };
    let mut table = Vec::new();
    let mut add = |hf: String, path: String| table.push(KeyEntry { hf, path });

    add(format!("{prefix}embeddings.word_embeddings.weight"), "embeddings.word".into());
    if config.axial_pos_embds {
        add(format!("{prefix}embeddings.position_embeddings.weights.0"), "embeddings.position.axial.rows".into());
        add(format!("{prefix}embeddings.position_embeddings.weights.1"), "embeddings.position.axial.cols".into());
    } else {
        add(format!("{prefix}embeddings.position_embeddings.embedding.weight"), "embeddings.position.table".into());
    }

    for (i, kind) in config.attn_layers.iter().enumerate() {
        let hf = format!("{prefix}encoder.layers.{i}");
        let ours = format!("layers.{i}");
        for block in ["attention", "feed_forward"] {
            add(format!("{hf}.{block}.layer_norm.weight"), format!("{ours}.{block}.layer_norm.gamma"));
            add(format!("{hf}.{block}.layer_norm.bias"), format!("{ours}.{block}.layer_norm.beta"));
        }
        let projections: &[&str] = match kind {
            AttentionKind::Lsh => &["query_key", "value"],
            AttentionKind::Local => &["query", "key", "value"],
        };
        let attention = match kind {
            AttentionKind::Lsh => "lsh",
            AttentionKind::Local => "local",
        };
        for name in projections {
            add(
                format!("{hf}.attention.self_attention.{name}.weight"),
                format!("{ours}.attention.{attention}.{name}.weight"),
            );
        }
        add(format!("{hf}.attention.output.dense.weight"), format!("{ours}.attention.output.weight"));
        for param in ["weight", "bias"] {
            add(format!("{hf}.feed_forward.dense.dense.{param}"), format!("{ours}.feed_forward.dense.{param}"));
            add(format!("{hf}.feed_forward.output.dense.{param}"), format!("{ours}.feed_forward.output.{param}"));
        }
    }
    add(format!("{prefix}encoder.layer_norm.weight"), "layer_norm.gamma".into());
    add(format!("{prefix}encoder.layer_norm.bias"), "layer_norm.beta".into());

    if architecture.has_lm_head() {
        add("lm_head.decoder.weight".into(), "lm_head.weight".into());
        let bias = if bias_fallback { "lm_head.bias" } else { "lm_head.decoder.bias" };
        add(bias.into(), "lm_head.bias".into());
    }
    table
}

/// Reads an HF `config.json`: drops the keys in [`IGNORED_CONFIG_KEYS`], rejects other keys
/// that [`ReformerConfig`] lacks, and returns the config with the class named in
/// `architectures` (if any).
pub fn read_hf_config(path: &Path) -> Result<(ReformerConfig, Option<HfArchitecture>), HfError> {
    let text = fs::read_to_string(path).map_err(|source| HfError::Io { path: path.to_path_buf(), source })?;
    let config_error = |source| HfError::Config { path: path.to_path_buf(), source };
    let value: Value = serde_json::from_str(&text).map_err(|error| config_error(ConfigError::from_serde(error)))?;
    let Value::Object(mut fields) = value else {
        return Err(config_error(ConfigError::Json { location: None, message: "the config is not a JSON object".into() }));
    };

    let architecture = match fields.get("architectures") {
        Some(Value::Array(names)) => names.iter().filter_map(Value::as_str).find_map(HfArchitecture::from_class_name),
        _ => None,
    };
    // Transformers writes `num_hidden_layers` as the length of `attn_layers`.
    let num_hidden_layers = fields.remove("num_hidden_layers");
    fields.retain(|key, _| !IGNORED_CONFIG_KEYS.contains(&key.as_str()));
    let known = known_config_keys();
    let unknown: Vec<String> = fields.keys().filter(|key| !known.contains(key.as_str())).cloned().collect();
    if !unknown.is_empty() {
        return Err(HfError::UnknownConfigKeys { path: path.to_path_buf(), keys: unknown });
    }
    let config = ReformerConfig::from_json_str(&Value::Object(fields).to_string()).map_err(config_error)?;
    if let Some(value) = num_hidden_layers {
        if value.as_u64() != Some(config.attn_layers.len() as u64) {
            return Err(config_error(ConfigError::Invalid {
                field: "num_hidden_layers",
                value: value.to_string(),
                fix: format!("it must equal the length of attn_layers, {}", config.attn_layers.len()),
            }));
        }
    }
    Ok((config, architecture))
}

/// Returns the field names of [`ReformerConfig`].
fn known_config_keys() -> BTreeSet<String> {
    match serde_json::to_value(ReformerConfig::default()) {
        Ok(Value::Object(fields)) => fields.keys().cloned().collect(),
        _ => unreachable!("ReformerConfig serialises to a JSON object"),
    }
}

/// Loads the checkpoint in `dir` onto `device`. Missing, unexpected and mis-shaped tensors
/// are an error unless `allow_partial` is set, in which case they are reported and missing
/// tensors keep the model's initial values.
pub fn load_hf_checkpoint(dir: &Path, device: &Device, allow_partial: bool) -> Result<HfCheckpoint, HfError> {
    let (config, named) = read_hf_config(&dir.join(CONFIG_FILE))?;
    config.validate().map_err(|source| HfError::Config { path: dir.join(CONFIG_FILE), source })?;
    let weights = weights_file(dir)?;
    let keys = WeightsReader::open(&weights)?.keys()?;

    let architecture = detect_architecture(dir, &config, named, &keys)?;
    let bias_fallback = architecture.has_lm_head() && !keys.contains("lm_head.decoder.bias");
    let table = key_table(&config, architecture, bias_fallback);
    // A file key outside the table keeps its name, so one that happens to equal a module path
    // (such as transformers 5.25's unread `lm_head.bias`) is renamed out of the way first.
    let module_paths: BTreeSet<&str> = table.iter().map(|e| e.path.as_str()).collect();
    let table_names: BTreeSet<&str> = table.iter().map(|e| e.hf.as_str()).collect();
    let set_aside: Vec<(String, String)> = keys
        .iter()
        .filter(|key| module_paths.contains(key.as_str()) && !table_names.contains(key.as_str()))
        .map(|key| (key.clone(), format!("{SET_ASIDE_PREFIX}{key}")))
        .collect();
    // Transformers 5.25 writes `lm_head.bias` beside `lm_head.decoder.bias` and never reads it.
    let unread: Vec<&str> = if bias_fallback { vec![] } else { vec!["lm_head.bias"] };

    let mut model = ReformerLm::new(&config, 0, device).map_err(|source| HfError::Config { path: dir.join(CONFIG_FILE), source })?;
    let result = WeightsReader::open(&weights)?.apply(&mut model, &set_aside, &table)?;
    let mut report = load_report(&result, &table, &unread);
    if !architecture.has_lm_head() {
        // The base model has no head to load; the model's own stays unused.
        report.missing.retain(|name| !name.starts_with("lm_head."));
    }
    if !report.is_complete() && !allow_partial {
        return Err(HfError::Partial { path: weights, report });
    }
    if let Some(name) = model.first_non_finite_weight() {
        return Err(HfError::Weights {
            path: weights,
            message: format!("weight {name} holds NaN or infinite values; re-export the checkpoint from a model whose weights are finite"),
        });
    }
    Ok(HfCheckpoint { model, architecture, report })
}

/// Returns the weights file of a checkpoint folder, preferring safetensors.
fn weights_file(dir: &Path) -> Result<PathBuf, HfError> {
    [SAFETENSORS_FILE, PYTORCH_FILE]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|path| path.is_file())
        .ok_or_else(|| HfError::MissingWeights { dir: dir.to_path_buf() })
}

/// Decides the class from the weights' names, checked against the config's `architectures`
/// and `is_decoder`.
fn detect_architecture(
    dir: &Path,
    config: &ReformerConfig,
    named: Option<HfArchitecture>,
    keys: &BTreeSet<String>,
) -> Result<HfArchitecture, HfError> {
    let has_head = keys.contains("lm_head.decoder.weight");
    let has_prefix = keys.iter().any(|key| key.starts_with(MODEL_PREFIX));
    let from_weights = match (has_head || has_prefix, config.is_decoder) {
        (false, _) => HfArchitecture::Base,
        (true, true) => HfArchitecture::CausalLm,
        (true, false) => HfArchitecture::MaskedLm,
    };
    let contradiction = |reason: String| Err(HfError::Architecture { dir: dir.to_path_buf(), reason });
    match named {
        Some(named) if named != from_weights && (named == HfArchitecture::Base) != (from_weights == HfArchitecture::Base) => {
            contradiction(format!(
                "config.json names {} but the weights are those of {}",
                named.class_name(),
                from_weights.class_name()
            ))
        }
        Some(HfArchitecture::CausalLm) if !config.is_decoder => {
            contradiction("config.json names ReformerModelWithLMHead, which needs is_decoder: true".into())
        }
        Some(HfArchitecture::MaskedLm) if config.is_decoder => {
            contradiction("config.json names ReformerForMaskedLM, which needs is_decoder: false".into())
        }
        _ => Ok(from_weights),
    }
}

/// Turns burn-store's result into names a Hugging Face user recognises.
fn load_report(result: &ApplyResult, table: &[KeyEntry], unread: &[&str]) -> LoadReport {
    let hf_name: HashMap<&str, &str> = table.iter().map(|e| (e.path.as_str(), e.hf.as_str())).collect();
    let name_of = |path: &str| hf_name.get(path).map_or_else(|| path.to_string(), |hf| hf.to_string());
    LoadReport {
        missing: result.missing.iter().map(|(path, _)| name_of(path)).collect(),
        unexpected: result
            .unused
            .iter()
            .map(|name| name.strip_prefix(SET_ASIDE_PREFIX).unwrap_or(name).to_string())
            .filter(|name| !unread.contains(&name.as_str()))
            .collect(),
        mismatched: result.errors.iter().map(|error| describe_error(error, &name_of)).collect(),
    }
}

/// Describes a tensor that failed to load, by Hugging Face name.
fn describe_error(error: &ApplyError, name_of: &impl Fn(&str) -> String) -> String {
    match error {
        ApplyError::ShapeMismatch { path, expected, found } => {
            // Linear weights are [in, out] here and [out, in] in the file: report the file's.
            let file_layout = |shape: &[usize]| {
                let linear = shape.len() == 2 && path.ends_with(".weight") && !path.starts_with("embeddings");
                if linear { shape.iter().rev().copied().collect() } else { shape.to_vec() }
            };
            format!(
                "{} (shape {:?} where the config needs {:?})",
                name_of(path),
                file_layout(found.as_slice()),
                file_layout(expected.as_slice())
            )
        }
        ApplyError::DTypeMismatch { path, expected, found } => {
            format!("{} (type {found:?} where the model needs {expected:?})", name_of(path))
        }
        other => other.to_string(),
    }
}

/// A safetensors or PyTorch weights file opened through burn-store.
enum WeightsReader {
    Safetensors(PathBuf, SafetensorsStore),
    Pytorch(PathBuf, PytorchStore),
}

impl WeightsReader {
    fn open(path: &Path) -> Result<Self, HfError> {
        let is_pytorch = path.file_name().is_some_and(|name| name == PYTORCH_FILE)
            || path.extension().is_some_and(|ext| ext == "bin" || ext == "pt" || ext == "pth");
        Ok(if is_pytorch {
            Self::Pytorch(path.to_path_buf(), PytorchStore::from_file(path))
        } else {
            Self::Safetensors(path.to_path_buf(), SafetensorsStore::from_file(path))
        })
    }

    fn error(path: &Path, error: impl std::fmt::Display) -> HfError {
        HfError::Weights { path: path.to_path_buf(), message: error.to_string() }
    }

    /// Returns the tensor names in the file. A PyTorch file must hold f32 tensors: its loader
    /// cannot convert other types, and loading them would panic.
    fn keys(mut self) -> Result<BTreeSet<String>, HfError> {
        let keys = match &mut self {
            Self::Safetensors(path, store) => store.keys().map_err(|e| Self::error(path, e))?,
            Self::Pytorch(path, store) => {
                let tensors = store.get_all_tensors().map_err(|e| Self::error(path, e))?;
                if let Some((name, tensor)) = tensors.iter().find(|(_, t)| t.dtype != DType::F32) {
                    return Err(Self::error(
                        path,
                        format!(
                            "tensor {name} is {:?}, and pickled weights load only as f32; save the checkpoint as \
                             model.safetensors (transformers' save_pretrained does) or cast it to float32",
                            tensor.dtype
                        ),
                    ));
                }
                tensors.keys().cloned().collect()
            }
        };
        Ok(keys.into_iter().collect())
    }

    /// Loads the tensors named in `table` into `model`, after renaming the `set_aside` keys.
    fn apply(self, model: &mut ReformerLm, set_aside: &[(String, String)], table: &[KeyEntry]) -> Result<ApplyResult, HfError> {
        // Renames apply in order, each to the result of the previous ones.
        let pairs = set_aside.iter().map(|(from, to)| (from.as_str(), to.as_str()));
        let remapper = exact_remapper(pairs.chain(table.iter().map(|e| (e.hf.as_str(), e.path.as_str()))));
        match self {
            Self::Safetensors(path, store) => {
                // Half-precision checkpoints load as f32, the type the model computes in.
                let adapter = ChainAdapter::new(PyTorchToBurnAdapter, FloatCastAdapter::to(DType::F32));
                let mut store = store
                    .remap(remapper)
                    .with_from_adapter(adapter)
                    .allow_partial(true)
                    .validate(false)
                    .map_indices_contiguous(false);
                model.load_from(&mut store).map_err(|e| Self::error(&path, e))
            }
            Self::Pytorch(path, store) => {
                let mut store = store.remap(remapper).allow_partial(true).validate(false).map_indices_contiguous(false);
                model.load_from(&mut store).map_err(|e| Self::error(&path, e))
            }
        }
    }
}

/// Returns a remapper that renames each `from` exactly to its `to`.
fn exact_remapper<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> KeyRemapper {
    KeyRemapper::from_pattern_iter(pairs.map(|(from, to)| (format!("^{}$", regex_escape(from)), to.to_string())))
        .expect("escaped names are valid patterns")
}

/// Escapes the regex metacharacters that parameter names can contain.
fn regex_escape(name: &str) -> String {
    let mut escaped = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// A model in Hugging Face's layout for export: the unread `lm_head.bias` of transformers 5.25
/// is written as a copy of the output bias, so that transformers finds every parameter.
#[derive(Module, Debug)]
struct ExportModel {
    model: ReformerLm,
    unread_bias: Option<Param<Tensor<1>>>,
}

/// Writes `model` to `dir` as a Hugging Face checkpoint of class `architecture`:
/// `config.json` and `model.safetensors`. The folder is created if needed; existing files of
/// those names are replaced.
pub fn save_hf_checkpoint(model: &ReformerLm, architecture: HfArchitecture, dir: &Path) -> Result<(), HfError> {
    fs::create_dir_all(dir).map_err(|source| HfError::Io { path: dir.to_path_buf(), source })?;
    let config = model.config();

    let mut fields = match serde_json::to_value(config) {
        Ok(Value::Object(fields)) => fields,
        _ => unreachable!("ReformerConfig serialises to a JSON object"),
    };
    fields.insert("architectures".into(), Value::Array(vec![Value::String(architecture.class_name().into())]));
    fields.insert("model_type".into(), Value::String("reformer".into()));
    fields.insert("tie_word_embeddings".into(), Value::Bool(false));
    let sorted: Map<String, Value> = fields.into_iter().collect::<std::collections::BTreeMap<_, _>>().into_iter().collect();
    let text = serde_json::to_string_pretty(&Value::Object(sorted)).expect("JSON values serialise");
    write_atomically(&dir.join(CONFIG_FILE), text.as_bytes())?;

    // The adapter renames LayerNorm's gamma and beta to weight and bias before remapping.
    let table = key_table(config, architecture, false);
    let adapted = |path: &str| path.replace(".gamma", ".weight").replace(".beta", ".bias");
    let mut pairs: Vec<(String, String)> = table.iter().map(|e| (format!("model.{}", adapted(&e.path)), e.hf.clone())).collect();
    let unread_bias = if architecture.has_lm_head() {
        pairs.push(("unread_bias".into(), "lm_head.bias".into()));
        model.lm_head.bias.clone()
    } else {
        None
    };
    let export = ExportModel { model: model.clone(), unread_bias };
    let remapper = exact_remapper(pairs.iter().map(|(from, to)| (from.as_str(), to.as_str())));
    // burn-store writes the file under a scratch name and renames it into place.
    let path = dir.join(SAFETENSORS_FILE);
    let mut store = SafetensorsStore::from_file(&path)
        .remap(remapper)
        .with_to_adapter(BurnToPyTorchAdapter)
        .metadata("format", "pt")
        .overwrite(true);
    // The base model has no head: its (random) head is left out of the file.
    if !architecture.has_lm_head() {
        store = store.with_predicate(|path, _| !path.starts_with("model.lm_head"));
    }
    export.save_into(&mut store).map_err(|e| HfError::Weights { path, message: e.to_string() })
}

/// Writes `bytes` to `path` through a temporary file in the same folder, so that a crash
/// never leaves a half-written file under the final name.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), HfError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.tmp"));
    fs::write(&temporary, bytes).map_err(|source| HfError::Io { path: temporary.clone(), source })?;
    fs::rename(&temporary, path).map_err(|source| HfError::Io { path: path.to_path_buf(), source })
}

/// Reads injected LSH rotations: a safetensors file with one f32 tensor per LSH layer named
/// `layers.<i>.rotations`, `i` being the layer's index in `attn_layers`, in Hugging Face's
/// layout `[n_heads, d_head, n_hashes, rot_size / 2]`. A tensor for a layer that is not an
/// LSH layer, a missing LSH layer, another name or another type is an error. Shapes are
/// checked at each call, where `n_hashes` and the bucket count are known.
pub fn load_rotations(path: &Path, config: &ReformerConfig) -> Result<HashMap<usize, Rotations>, HfError> {
    let invalid = |reason: String| HfError::Rotations { path: path.to_path_buf(), reason };
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .map_err(|source| HfError::Io { path: path.to_path_buf(), source })?;
    let tensors = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| invalid(format!("not a safetensors file ({e})")))?;

    let lsh_layers: BTreeSet<usize> = config
        .attn_layers
        .iter()
        .enumerate()
        .filter(|(_, kind)| **kind == AttentionKind::Lsh)
        .map(|(i, _)| i)
        .collect();
    let mut rotations = HashMap::new();
    for (name, view) in tensors.tensors() {
        let layer = name
            .strip_prefix("layers.")
            .and_then(|rest| rest.strip_suffix(".rotations"))
            .and_then(|index| index.parse::<usize>().ok())
            .ok_or_else(|| invalid(format!("unexpected tensor {name:?}: name tensors layers.<i>.rotations")))?;
        if !lsh_layers.contains(&layer) {
            return Err(invalid(format!(
                "tensor {name:?} is for layer {layer}, which is not an LSH layer; the LSH layers are {lsh_layers:?}"
            )));
        }
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(invalid(format!("tensor {name:?} is {:?}; rotations must be F32", view.dtype())));
        }
        let shape: [usize; 4] = view
            .shape()
            .try_into()
            .map_err(|_| invalid(format!("tensor {name:?} has shape {:?}; expected [n_heads, d_head, n_hashes, rot_size / 2]", view.shape())))?;
        let values: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(invalid(format!("tensor {name:?} holds {} at flat index {index}; rotations must be finite", values[index])));
        }
        rotations.insert(layer, Rotations { shape, values: Arc::new(values) });
    }
    if let Some(missing) = lsh_layers.iter().find(|layer| !rotations.contains_key(layer)) {
        return Err(invalid(format!("no tensor layers.{missing}.rotations for LSH layer {missing}; give one for each of {lsh_layers:?}")));
    }
    Ok(rotations)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use burn::tensor::TensorData;
    use safetensors::tensor::TensorView;

    use super::*;
    use crate::context::ForwardContext;
    use crate::testing::{assert_close, test_device, values};

    /// Tensors of a safetensors file: dtype, shape and raw little-endian bytes.
    type RawTensors = BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

    fn fixture(case: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/hf-fixtures").join(case)
    }

    fn read_raw(path: &Path) -> RawTensors {
        let bytes = fs::read(path).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        file.tensors()
            .into_iter()
            .map(|(name, view)| (name, (view.dtype(), view.shape().to_vec(), view.data().to_vec())))
            .collect()
    }

    fn write_raw(path: &Path, tensors: &RawTensors) {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, (dtype, shape, data))| (name.clone(), TensorView::new(*dtype, shape.clone(), data).unwrap()))
            .collect();
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        fs::write(path, safetensors::serialize(views, Some(metadata)).unwrap()).unwrap();
    }

    /// Copies a fixture's config and weights into a fresh folder, with `edit` applied to the
    /// weights.
    fn edited_copy(case: &str, edit: impl FnOnce(&mut RawTensors)) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::copy(fixture(case).join(CONFIG_FILE), dir.path().join(CONFIG_FILE)).unwrap();
        let mut tensors = read_raw(&fixture(case).join(SAFETENSORS_FILE));
        edit(&mut tensors);
        write_raw(&dir.path().join(SAFETENSORS_FILE), &tensors);
        dir
    }

    /// Returns logits of fixed ids under fixed rotations (drawn from seed 7).
    fn logits(model: &ReformerLm) -> Vec<f32> {
        let device = test_device();
        let seq_len = model.config().max_seq_len().min(64);
        let ids: Vec<i64> = (0..seq_len as i64).map(|t| (t * 7 + 3) % model.config().vocab_size as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, seq_len]), &device);
        values(model.forward(ids, None, &ForwardContext::eval(7)).unwrap())
    }

    fn partial_report(result: Result<HfCheckpoint, HfError>) -> LoadReport {
        match result {
            Err(HfError::Partial { report, .. }) => report,
            other => panic!("expected a partial-load error, got {other:?}"),
        }
    }

    #[test]
    fn pytorch_weights_equal_safetensors() {
        let device = test_device();
        let from_safetensors = load_hf_checkpoint(&fixture("enwik8_small"), &device, false).unwrap();
        let from_pickle = load_hf_checkpoint(&fixture("enwik8_small_pytorch"), &device, false).unwrap();
        assert!(from_pickle.report.is_complete(), "{}", from_pickle.report);
        assert_eq!(from_pickle.architecture, HfArchitecture::CausalLm);
        assert_eq!(logits(&from_pickle.model), logits(&from_safetensors.model));
    }

    /// Converts a finite f32 of magnitude below 65504 to IEEE half-precision bits, rounding the
    /// mantissa half up (values below 6.1e-5 flush to zero).
    fn f32_to_f16_bits(value: f32) -> u16 {
        let bits = value.to_bits();
        let sign = ((bits >> 16) & 0x8000) as u16;
        let exponent = ((bits >> 23) & 0xff) as i32 - 127 + 15;
        if exponent <= 0 {
            return sign;
        }
        assert!(exponent < 31, "{value} does not fit in f16");
        // A carry out of the mantissa correctly moves into the exponent.
        let magnitude = (((exponent as u32) << 10) | ((bits >> 13) & 0x3ff)) + ((bits >> 12) & 1);
        sign | magnitude as u16
    }

    #[test]
    fn half_precision_weights_load_as_f32() {
        let original = load_hf_checkpoint(&fixture("wrap_rounds"), &test_device(), false).unwrap();
        let dir = edited_copy("wrap_rounds", |tensors| {
            for (dtype, _, data) in tensors.values_mut() {
                if *dtype == safetensors::Dtype::F32 {
                    *dtype = safetensors::Dtype::F16;
                    *data = data
                        .chunks_exact(4)
                        .flat_map(|b| f32_to_f16_bits(f32::from_le_bytes(b.try_into().unwrap())).to_le_bytes())
                        .collect();
                }
            }
        });
        let half = load_hf_checkpoint(dir.path(), &test_device(), false).unwrap();
        assert!(half.report.is_complete(), "{}", half.report);
        // f16 keeps about 3 significant digits, and peaked attention amplifies the rounding.
        let (ours, reference) = (logits(&half.model), logits(&original.model));
        let scale = reference.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        assert_close(&ours, &reference, 5e-2 * scale);
    }

    #[test]
    fn unknown_config_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let text = fs::read_to_string(fixture("wrap_rounds").join(CONFIG_FILE)).unwrap();
        let text = text.replacen('{', "{\n  \"frobnicate\": 1,", 1);
        fs::write(dir.path().join(CONFIG_FILE), text).unwrap();
        match read_hf_config(&dir.path().join(CONFIG_FILE)) {
            Err(HfError::UnknownConfigKeys { keys, .. }) => assert_eq!(keys, vec!["frobnicate".to_string()]),
            other => panic!("expected an unknown-key error, got {other:?}"),
        }
    }

    #[test]
    fn num_hidden_layers_must_match_attn_layers() {
        let dir = tempfile::tempdir().unwrap();
        let text = fs::read_to_string(fixture("wrap_rounds").join(CONFIG_FILE)).unwrap();
        let text = text.replace("\"num_hidden_layers\": 1", "\"num_hidden_layers\": 3");
        fs::write(dir.path().join(CONFIG_FILE), text).unwrap();
        let error = read_hf_config(&dir.path().join(CONFIG_FILE)).unwrap_err();
        let cause = std::error::Error::source(&error).map(ToString::to_string).unwrap_or_default();
        assert!(cause.contains("num_hidden_layers"), "{error}: {cause}");
    }

    #[test]
    fn missing_tensor_is_named_and_refused() {
        let name = "reformer.encoder.layers.0.attention.self_attention.query_key.weight";
        let dir = edited_copy("wrap_rounds", |tensors| {
            tensors.remove(name).expect("the fixture has the tensor");
        });
        let report = partial_report(load_hf_checkpoint(dir.path(), &test_device(), false));
        assert_eq!(report.missing, vec![name.to_string()]);
        assert!(report.unexpected.is_empty(), "{report}");
        assert!(report.mismatched.is_empty(), "{report}");

        let loaded = load_hf_checkpoint(dir.path(), &test_device(), true).unwrap();
        assert_eq!(loaded.report.missing, vec![name.to_string()]);
    }

    #[test]
    fn unexpected_tensor_is_named() {
        let dir = edited_copy("wrap_rounds", |tensors| {
            let extra = tensors["lm_head.decoder.bias"].clone();
            tensors.insert("reformer.encoder.extra.bias".into(), extra);
        });
        let report = partial_report(load_hf_checkpoint(dir.path(), &test_device(), false));
        assert_eq!(report.unexpected, vec!["reformer.encoder.extra.bias".to_string()]);
        assert!(report.missing.is_empty(), "{report}");
    }

    #[test]
    fn mis_shaped_tensor_is_named() {
        let name = "reformer.encoder.layer_norm.weight";
        let dir = edited_copy("wrap_rounds", |tensors| {
            let (_, shape, data) = tensors.get_mut(name).unwrap();
            shape[0] -= 1;
            data.truncate(data.len() - 4);
        });
        let report = partial_report(load_hf_checkpoint(dir.path(), &test_device(), false));
        assert_eq!(report.mismatched.len(), 1, "{report}");
        assert!(report.mismatched[0].contains(name), "{report}");
    }

    #[test]
    fn output_bias_falls_back_to_lm_head_bias() {
        // Transformers 4 could save the output bias only as `lm_head.bias`.
        let original = load_hf_checkpoint(&fixture("wrap_rounds"), &test_device(), false).unwrap();
        let dir = edited_copy("wrap_rounds", |tensors| {
            let bias = tensors.remove("lm_head.decoder.bias").unwrap();
            tensors.insert("lm_head.bias".into(), bias);
        });
        let fallback = load_hf_checkpoint(dir.path(), &test_device(), false).unwrap();
        assert!(fallback.report.is_complete(), "{}", fallback.report);
        assert_eq!(logits(&fallback.model), logits(&original.model));
    }

    #[test]
    fn export_then_import_keeps_logits() {
        for case in ["enwik8_small", "lsh_masked_lm", "crime_small"] {
            let original = load_hf_checkpoint(&fixture(case), &test_device(), false).unwrap();
            let dir = tempfile::tempdir().unwrap();
            save_hf_checkpoint(&original.model, original.architecture, dir.path()).unwrap();
            let reloaded = load_hf_checkpoint(dir.path(), &test_device(), false).unwrap();
            assert!(reloaded.report.is_complete(), "{case}: {}", reloaded.report);
            assert_eq!(reloaded.architecture, original.architecture, "{case}");
            assert_close(&logits(&reloaded.model), &logits(&original.model), 0.0);

            let (_, named) = read_hf_config(&dir.path().join(CONFIG_FILE)).unwrap();
            assert_eq!(named, Some(original.architecture), "{case}: architectures in config.json");
            let keys: BTreeSet<String> = read_raw(&dir.path().join(SAFETENSORS_FILE)).into_keys().collect();
            let expected: BTreeSet<String> = read_raw(&fixture(case).join(SAFETENSORS_FILE)).into_keys().collect();
            assert_eq!(keys, expected, "{case}: exported names");
        }
    }

    #[test]
    fn rotations_file_is_checked_against_layers() {
        let config = read_hf_config(&fixture("enwik8_small").join(CONFIG_FILE)).unwrap().0;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rotations.safetensors");
        let tensor = |shape: Vec<usize>| {
            let count: usize = shape.iter().product();
            (safetensors::Dtype::F32, shape, vec![0u8; 4 * count])
        };

        // enwik8_small alternates local (even) and LSH (odd) layers.
        let mut tensors = RawTensors::new();
        tensors.insert("layers.1.rotations".into(), tensor(vec![2, 16, 2, 3]));
        write_raw(&path, &tensors);
        let error = load_rotations(&path, &config).unwrap_err().to_string();
        assert!(error.contains("layers.3.rotations"), "missing LSH layer not named: {error}");

        tensors.insert("layers.3.rotations".into(), tensor(vec![2, 16, 2, 3]));
        write_raw(&path, &tensors);
        let rotations = load_rotations(&path, &config).unwrap();
        assert_eq!(rotations[&3].shape, [2, 16, 2, 3]);

        tensors.insert("layers.0.rotations".into(), tensor(vec![2, 16, 2, 3]));
        write_raw(&path, &tensors);
        let error = load_rotations(&path, &config).unwrap_err().to_string();
        assert!(error.contains("not an LSH layer"), "{error}");

        tensors.remove("layers.0.rotations");
        let (_, _, data) = tensors.get_mut("layers.3.rotations").unwrap();
        data[20..24].copy_from_slice(&f32::NAN.to_le_bytes());
        write_raw(&path, &tensors);
        let error = load_rotations(&path, &config).unwrap_err().to_string();
        assert!(error.contains("NaN at flat index 5"), "{error}");
    }

    #[test]
    fn non_finite_weight_is_named() {
        let name = "reformer.encoder.layer_norm.weight";
        let dir = edited_copy("wrap_rounds", |tensors| {
            let (_, _, data) = tensors.get_mut(name).unwrap();
            data[..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
        });
        let error = load_hf_checkpoint(dir.path(), &test_device(), false).unwrap_err().to_string();
        assert!(error.contains("layer_norm") && error.contains("NaN or infinite"), "{error}");
    }
}
