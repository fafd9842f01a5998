//! Model configuration: field names follow Hugging Face's `ReformerConfig` so that a
//! `config.json` written by `transformers` describes the same model here.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// The kind of self-attention a layer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKind {
    /// Locality-sensitive-hashing attention with shared queries and keys.
    Lsh,
    /// Chunked local attention: each chunk attends to itself and its neighbours.
    Local,
}

/// Number of LSH buckets: one even count, a list of even factors, or automatic (`null`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NumBuckets {
    /// One even bucket count.
    Single(usize),
    /// Factorised buckets `[f1, f2, ...]`: the bucket id is `a1 + f1 * a2 + f1 * f2 * a3 + ...`.
    Factorised(Vec<usize>),
}

impl NumBuckets {
    /// Returns the bucket factors (one factor for [`NumBuckets::Single`]).
    pub fn factors(&self) -> Vec<usize> {
        match self {
            NumBuckets::Single(n) => vec![*n],
            NumBuckets::Factorised(factors) => factors.clone(),
        }
    }

    /// Returns the total number of buckets `n_buckets`: the product of the factors.
    pub fn total(&self) -> usize {
        self.factors().iter().product()
    }

    /// Returns the number of rotation columns one hash round needs: the sum of the factors.
    pub fn rotation_size(&self) -> usize {
        self.factors().iter().sum()
    }

    /// Picks the bucket count for padded length `seq_len` as Hugging Face does when
    /// `num_buckets` is null (`ReformerConfig` docs and `_set_num_buckets`, transformers 5.25):
    /// about `2 * seq_len / chunk_len` buckets, factorised once they exceed a limit.
    pub fn automatic(seq_len: usize, chunk_len: usize, max_position_embeddings: usize) -> Self {
        let target = 2 * (seq_len / chunk_len);
        let bits = (usize::BITS - target.leading_zeros()).saturating_sub(1);
        let n_buckets = 1usize << bits;
        let root = (max_position_embeddings / chunk_len).isqrt();
        let limit = 2 * root.max(chunk_len);
        if n_buckets > limit {
            let low = bits / 2;
            NumBuckets::Factorised(vec![1 << low, 1 << (bits - low)])
        } else {
            NumBuckets::Single(n_buckets)
        }
    }
}

/// Activation of the feed-forward block, by Hugging Face's `hidden_act` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `max(0, x)`.
    Relu,
    /// Exact GELU, `x * Phi(x)` with the erf-based normal CDF.
    Gelu,
    /// GELU in its tanh approximation (`gelu_new` in `transformers`).
    GeluNew,
    /// `x * sigmoid(x)`.
    Silu,
}

/// Largest number of neighbouring chunks a chunk may attend to on one side. Beyond the number
/// of chunks in a sequence more neighbours add nothing, and the bound keeps window sizes far
/// from overflow.
pub const MAX_NEIGHBOUR_CHUNKS: usize = 1024;

/// Largest number of hash rounds, in configs and in overrides: far beyond any useful value
/// (the paper uses 1 to 8) and far from overflowing sizes.
pub const MAX_HASHES: usize = 1024;

fn default_attn_layers() -> Vec<AttentionKind> {
    [AttentionKind::Local, AttentionKind::Lsh].repeat(3)
}

/// Configuration of a Reformer language model.
///
/// Defaults are Hugging Face's `ReformerConfig` defaults (transformers 5.25) except where a
/// field's documentation says otherwise. `deny_unknown_fields` makes a misspelt field an error
/// that names it instead of a silently ignored setting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReformerConfig {
    /// Attention kind of each layer, in order; its length is the number of layers.
    #[serde(default = "default_attn_layers")]
    pub attn_layers: Vec<AttentionKind>,
    /// Model width `d_model`.
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    /// Number of attention heads `n_heads`.
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Width of one head `d_head`; `n_heads * d_head` need not equal `d_model`.
    #[serde(default = "defaults::attention_head_size")]
    pub attention_head_size: usize,
    /// Hash rounds `n_hashes` of every LSH layer.
    #[serde(default = "defaults::num_hashes")]
    pub num_hashes: usize,
    /// LSH buckets; `null` picks them from the padded length at each call.
    #[serde(default)]
    pub num_buckets: Option<NumBuckets>,
    /// Chunk length of LSH attention.
    #[serde(default = "defaults::lsh_attn_chunk_length")]
    pub lsh_attn_chunk_length: usize,
    /// Chunk length of local attention.
    #[serde(default = "defaults::local_attn_chunk_length")]
    pub local_attn_chunk_length: usize,
    /// Chunks before its own that an LSH chunk attends to.
    #[serde(default = "defaults::one")]
    pub lsh_num_chunks_before: usize,
    /// Chunks after its own that an LSH chunk attends to (0 for a causal model).
    #[serde(default)]
    pub lsh_num_chunks_after: usize,
    /// Chunks before its own that a local chunk attends to.
    #[serde(default = "defaults::one")]
    pub local_num_chunks_before: usize,
    /// Chunks after its own that a local chunk attends to (0 for a causal model).
    #[serde(default)]
    pub local_num_chunks_after: usize,
    /// Axial position embeddings (two factor tables) instead of one learned table.
    #[serde(default = "defaults::yes")]
    pub axial_pos_embds: bool,
    /// Axial shape `[A0, A1]`; `A0 * A1` must equal `max_position_embeddings`.
    #[serde(default = "defaults::axial_pos_shape")]
    pub axial_pos_shape: Vec<usize>,
    /// Feature split `[d0, d1]` of the axial embeddings; it must sum to `hidden_size`.
    #[serde(default = "defaults::axial_pos_embds_dim")]
    pub axial_pos_embds_dim: Vec<usize>,
    /// Maximum sequence length the model accepts.
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Inner width `d_ff` of the feed-forward block.
    #[serde(default = "defaults::feed_forward_size")]
    pub feed_forward_size: usize,
    /// Feed-forward slice length along the sequence (0: one slice). It changes memory, not
    /// results, in evaluation; in training each slice draws its own dropout mask.
    #[serde(default)]
    pub chunk_size_feed_forward: usize,
    /// Feed-forward activation.
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: Activation,
    /// Causal (decoder) attention; `false` makes a bidirectional (masked-LM) model.
    #[serde(default)]
    pub is_decoder: bool,
    /// Dropout on embeddings, attention output, feed-forward and the final norm.
    #[serde(default = "defaults::hidden_dropout_prob")]
    pub hidden_dropout_prob: f64,
    /// Dropout on LSH attention probabilities.
    #[serde(default)]
    pub lsh_attention_probs_dropout_prob: f64,
    /// Dropout on local attention probabilities.
    #[serde(default = "defaults::local_attention_probs_dropout_prob")]
    pub local_attention_probs_dropout_prob: f64,
    /// Vocabulary size `vocab_size`.
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    /// Token id used for the model's own tail padding.
    #[serde(default)]
    pub pad_token_id: usize,
    /// End-of-sequence id: generation stops when it is produced. Defaults to null, not to
    /// Hugging Face's 2, because in the byte-level vocabulary id 2 is the byte 0.
    #[serde(default)]
    pub eos_token_id: Option<usize>,
    /// Epsilon of every LayerNorm.
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Fixed seed for LSH rotations: with it every call and every LSH layer of one shape use
    /// the same rotations, as in Hugging Face.
    #[serde(default)]
    pub hash_seed: Option<u64>,
    /// Standard deviation of the normal initialisation of weights.
    #[serde(default = "defaults::initializer_range")]
    pub initializer_range: f64,
    /// Standard deviation of the axial position tables at initialisation.
    #[serde(default = "defaults::axial_norm_std")]
    pub axial_norm_std: f64,
}

mod defaults {
    use super::Activation;

    pub fn hidden_size() -> usize {
        256
    }
    pub fn num_attention_heads() -> usize {
        12
    }
    pub fn attention_head_size() -> usize {
        64
    }
    pub fn num_hashes() -> usize {
        1
    }
    pub fn lsh_attn_chunk_length() -> usize {
        64
    }
    pub fn local_attn_chunk_length() -> usize {
        64
    }
    pub fn one() -> usize {
        1
    }
    pub fn yes() -> bool {
        true
    }
    pub fn axial_pos_shape() -> Vec<usize> {
        vec![64, 64]
    }
    pub fn axial_pos_embds_dim() -> Vec<usize> {
        vec![64, 192]
    }
    pub fn max_position_embeddings() -> usize {
        4096
    }
    pub fn feed_forward_size() -> usize {
        512
    }
    pub fn hidden_act() -> Activation {
        Activation::Relu
    }
    pub fn hidden_dropout_prob() -> f64 {
        0.05
    }
    pub fn local_attention_probs_dropout_prob() -> f64 {
        0.05
    }
    pub fn vocab_size() -> usize {
        320
    }
    pub fn layer_norm_eps() -> f64 {
        1e-12
    }
    pub fn initializer_range() -> f64 {
        0.02
    }
    pub fn axial_norm_std() -> f64 {
        1.0
    }
}

impl Default for ReformerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("an empty object deserialises to the defaults")
    }
}

impl ReformerConfig {
    /// Parses a config from JSON text and validates it.
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(ConfigError::from_serde)?;
        if !value.is_object() {
            return Err(ConfigError::Json {
                location: None,
                message: "expected a JSON object with ReformerConfig fields".into(),
            });
        }
        let config: Self = serde_json::from_value(value).map_err(ConfigError::from_serde)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text).map_err(|error| error.in_file(path))
    }

    /// Serialises the config as pretty-printed JSON.
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(self).expect("a config always serialises")
    }

    /// Returns the number of layers.
    pub fn num_layers(&self) -> usize {
        self.attn_layers.len()
    }

    /// Returns `n_heads * d_head`, the width of the attention projections.
    pub fn all_head_size(&self) -> usize {
        self.num_attention_heads * self.attention_head_size
    }

    /// Returns the longest sequence the model accepts: the axial table size or
    /// `max_position_embeddings`, which validation keeps equal.
    pub fn max_seq_len(&self) -> usize {
        self.max_position_embeddings
    }

    fn uses(&self, kind: AttentionKind) -> bool {
        self.attn_layers.contains(&kind)
    }

    /// Returns the chunk lengths of the attention kinds that occur in `attn_layers`.
    fn used_chunk_lengths(&self) -> Vec<usize> {
        let mut lengths = Vec::new();
        if self.uses(AttentionKind::Lsh) {
            lengths.push(self.lsh_attn_chunk_length);
        }
        if self.uses(AttentionKind::Local) {
            lengths.push(self.local_attn_chunk_length);
        }
        lengths
    }

    /// Returns the least common multiple of the used chunk lengths: inputs longer than the
    /// shortest chunk are padded to a multiple of it.
    pub fn chunk_lcm(&self) -> usize {
        self.used_chunk_lengths().into_iter().fold(1, lcm)
    }

    /// Returns the shortest used chunk length: inputs up to it run as exact attention unpadded.
    pub fn min_chunk_len(&self) -> usize {
        self.used_chunk_lengths().into_iter().min().unwrap_or(1)
    }

    /// Returns the length that the model runs internally for an input of `seq_len` tokens.
    pub fn padded_len(&self, seq_len: usize) -> usize {
        let multiple = self.chunk_lcm();
        if seq_len > self.min_chunk_len() && seq_len % multiple != 0 {
            seq_len + multiple - seq_len % multiple
        } else {
            seq_len
        }
    }

    /// Checks every field and their combinations; the error names the field, the value and
    /// the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, value: String, fix: String| {
            Err(ConfigError::Invalid { field, value, fix })
        };

        if self.attn_layers.is_empty() {
            return invalid("attn_layers", "[]".into(), "list at least one of \"lsh\" or \"local\"".into());
        }
        for (field, value) in [
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_size", self.attention_head_size),
            ("num_hashes", self.num_hashes),
            ("lsh_attn_chunk_length", self.lsh_attn_chunk_length),
            ("local_attn_chunk_length", self.local_attn_chunk_length),
            ("max_position_embeddings", self.max_position_embeddings),
            ("feed_forward_size", self.feed_forward_size),
        ] {
            if value == 0 {
                return invalid(field, "0".into(), "set it to a positive integer".into());
            }
        }
        if self.vocab_size < 2 {
            return invalid("vocab_size", self.vocab_size.to_string(), "set it to at least 2".into());
        }
        if self.num_hashes > MAX_HASHES {
            return invalid(
                "num_hashes",
                self.num_hashes.to_string(),
                format!("use at most {MAX_HASHES} hash rounds (the paper uses 1 to 8)"),
            );
        }
        for (field, value) in [
            ("lsh_num_chunks_before", self.lsh_num_chunks_before),
            ("lsh_num_chunks_after", self.lsh_num_chunks_after),
            ("local_num_chunks_before", self.local_num_chunks_before),
            ("local_num_chunks_after", self.local_num_chunks_after),
        ] {
            if value > MAX_NEIGHBOUR_CHUNKS {
                return invalid(
                    field,
                    value.to_string(),
                    format!("use at most {MAX_NEIGHBOUR_CHUNKS} neighbouring chunks (Hugging Face's default is 1 before, 0 after)"),
                );
            }
        }
        if self.pad_token_id >= self.vocab_size {
            return invalid(
                "pad_token_id",
                self.pad_token_id.to_string(),
                format!("use an id below vocab_size = {}", self.vocab_size),
            );
        }
        if let Some(eos) = self.eos_token_id
            && eos >= self.vocab_size
        {
            return invalid(
                "eos_token_id",
                eos.to_string(),
                format!("use an id below vocab_size = {}, or null", self.vocab_size),
            );
        }
        self.validate_buckets()?;
        self.validate_positions()?;
        for (field, value) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            ("lsh_attention_probs_dropout_prob", self.lsh_attention_probs_dropout_prob),
            ("local_attention_probs_dropout_prob", self.local_attention_probs_dropout_prob),
        ] {
            if !(0.0..1.0).contains(&value) {
                return invalid(field, value.to_string(), "use a probability in [0, 1)".into());
            }
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return invalid(
                "layer_norm_eps",
                self.layer_norm_eps.to_string(),
                "use a small positive number such as 1e-12".into(),
            );
        }
        // Weights are f32; beyond this bound initial activations overflow it.
        const MAX_STD: f64 = 100.0;
        if !(self.initializer_range > 0.0 && self.initializer_range <= MAX_STD) {
            return invalid(
                "initializer_range",
                self.initializer_range.to_string(),
                format!("use a positive standard deviation up to {MAX_STD}, such as 0.02"),
            );
        }
        if !(self.axial_norm_std > 0.0 && self.axial_norm_std <= MAX_STD) {
            return invalid(
                "axial_norm_std",
                self.axial_norm_std.to_string(),
                format!("use a positive standard deviation up to {MAX_STD}, such as 1.0"),
            );
        }
        Ok(())
    }

    fn validate_buckets(&self) -> Result<(), ConfigError> {
        let Some(buckets) = &self.num_buckets else {
            return Ok(());
        };
        let factors = buckets.factors();
        let value = serde_json::to_string(buckets).expect("buckets serialise");
        if factors.is_empty() {
            return Err(ConfigError::Invalid {
                field: "num_buckets",
                value,
                fix: "give an even bucket count, a list of even factors, or null".into(),
            });
        }
        if let Some(bad) = factors.iter().find(|&&f| f == 0 || f % 2 != 0) {
            return Err(ConfigError::Invalid {
                field: "num_buckets",
                value,
                fix: format!(
                    "{bad} is not a positive even number: each bucket count or factor must be even \
                     because a rotation of size f/2 hashes into f buckets ([xR; -xR])"
                ),
            });
        }
        Ok(())
    }

    fn validate_positions(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, value: String, fix: String| {
            Err(ConfigError::Invalid { field, value, fix })
        };
        if self.axial_pos_embds {
            if self.axial_pos_shape.len() != 2 {
                return invalid(
                    "axial_pos_shape",
                    format!("{:?}", self.axial_pos_shape),
                    "give exactly two factors [A0, A1]".into(),
                );
            }
            if self.axial_pos_shape.contains(&0) {
                return invalid(
                    "axial_pos_shape",
                    format!("{:?}", self.axial_pos_shape),
                    "use positive factors".into(),
                );
            }
            if self.axial_pos_embds_dim.len() != 2 || self.axial_pos_embds_dim.contains(&0) {
                return invalid(
                    "axial_pos_embds_dim",
                    format!("{:?}", self.axial_pos_embds_dim),
                    "give exactly two positive widths [d0, d1]".into(),
                );
            }
            let dim_sum: usize = self.axial_pos_embds_dim.iter().sum();
            if dim_sum != self.hidden_size {
                return invalid(
                    "axial_pos_embds_dim",
                    format!("{:?}", self.axial_pos_embds_dim),
                    format!(
                        "the widths sum to {dim_sum} but must sum to hidden_size = {}",
                        self.hidden_size
                    ),
                );
            }
            let product: usize = self.axial_pos_shape.iter().product();
            if product != self.max_position_embeddings {
                return invalid(
                    "max_position_embeddings",
                    self.max_position_embeddings.to_string(),
                    format!(
                        "with axial positions the maximum length is A0 * A1 = {} (axial_pos_shape \
                         {:?}): set max_position_embeddings to {product} or change the shape",
                        product, self.axial_pos_shape
                    ),
                );
            }
        }
        let multiple = self.chunk_lcm();
        if self.max_position_embeddings > self.min_chunk_len()
            && self.max_position_embeddings % multiple != 0
        {
            return invalid(
                "max_position_embeddings",
                self.max_position_embeddings.to_string(),
                format!(
                    "inputs are padded to a multiple of the chunk lengths' least common multiple \
                     {multiple}, so the maximum length must be one too (for example {})",
                    self.max_position_embeddings.div_ceil(multiple) * multiple
                ),
            );
        }
        Ok(())
    }

    /// Checks that the config fits a causal language-model head (`ReformerModelWithLMHead`):
    /// a decoder that looks at no later chunk.
    pub fn validate_causal_lm(&self) -> Result<(), ConfigError> {
        if !self.is_decoder {
            return Err(ConfigError::Invalid {
                field: "is_decoder",
                value: "false".into(),
                fix: "a causal language model needs is_decoder = true; a bidirectional \
                      model is a masked language model"
                    .into(),
            });
        }
        for (field, value) in [
            ("lsh_num_chunks_after", self.lsh_num_chunks_after),
            ("local_num_chunks_after", self.local_num_chunks_after),
        ] {
            if value != 0 {
                return Err(ConfigError::Invalid {
                    field,
                    value: value.to_string(),
                    fix: "a causal model must not look at later chunks: set it to 0".into(),
                });
            }
        }
        Ok(())
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn lcm(a: usize, b: usize) -> usize {
    a / gcd(a, b) * b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(result: Result<ReformerConfig, ConfigError>) -> &'static str {
        match result {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid-field error, got {other:?}"),
        }
    }

    fn with(patch: &str) -> Result<ReformerConfig, ConfigError> {
        let mut value: serde_json::Value =
            serde_json::from_str(&ReformerConfig::default().to_json_string()).unwrap();
        let patch: serde_json::Value = serde_json::from_str(patch).unwrap();
        for (key, field) in patch.as_object().unwrap() {
            value[key] = field.clone();
        }
        ReformerConfig::from_json_str(&value.to_string())
    }

    #[test]
    fn default_config_is_valid() {
        ReformerConfig::default().validate().unwrap();
    }

    #[test]
    fn json_round_trip_keeps_every_field() {
        let config = with(r#"{"num_buckets": [4, 8], "hash_seed": 7}"#).unwrap();
        let back = ReformerConfig::from_json_str(&config.to_json_string()).unwrap();
        assert_eq!(config, back);
    }

    #[test]
    fn odd_bucket_count_is_rejected() {
        assert_eq!(field_of(with(r#"{"num_buckets": 7}"#)), "num_buckets");
    }

    #[test]
    fn zero_or_odd_factor_is_rejected() {
        assert_eq!(field_of(with(r#"{"num_buckets": [4, 0]}"#)), "num_buckets");
        assert_eq!(field_of(with(r#"{"num_buckets": [4, 3]}"#)), "num_buckets");
        assert_eq!(field_of(with(r#"{"num_buckets": []}"#)), "num_buckets");
    }

    #[test]
    fn axial_dims_must_sum_to_hidden_size() {
        assert_eq!(field_of(with(r#"{"axial_pos_embds_dim": [64, 64]}"#)), "axial_pos_embds_dim");
    }

    #[test]
    fn axial_shape_must_match_max_length() {
        assert_eq!(field_of(with(r#"{"axial_pos_shape": [32, 64]}"#)), "max_position_embeddings");
    }

    #[test]
    fn zero_chunk_length_is_rejected() {
        assert_eq!(field_of(with(r#"{"lsh_attn_chunk_length": 0}"#)), "lsh_attn_chunk_length");
        assert_eq!(field_of(with(r#"{"local_attn_chunk_length": 0}"#)), "local_attn_chunk_length");
    }

    #[test]
    fn zero_heads_are_rejected() {
        assert_eq!(field_of(with(r#"{"num_attention_heads": 0}"#)), "num_attention_heads");
        assert_eq!(field_of(with(r#"{"attention_head_size": 0}"#)), "attention_head_size");
    }

    #[test]
    fn pad_id_outside_vocabulary_is_rejected() {
        assert_eq!(field_of(with(r#"{"pad_token_id": 320}"#)), "pad_token_id");
    }

    #[test]
    fn dropout_outside_unit_interval_is_rejected() {
        assert_eq!(field_of(with(r#"{"hidden_dropout_prob": 1.5}"#)), "hidden_dropout_prob");
    }

    #[test]
    fn empty_layer_list_is_rejected() {
        assert_eq!(field_of(with(r#"{"attn_layers": []}"#)), "attn_layers");
    }

    #[test]
    fn unknown_field_is_named() {
        let error = ReformerConfig::from_json_str(r#"{"hidden_sise": 4}"#).unwrap_err();
        assert!(error.to_string().contains("hidden_sise"), "{error}");
    }

    #[test]
    fn invalid_json_is_an_error() {
        let error = ReformerConfig::from_json_str("{").unwrap_err();
        assert!(matches!(error, ConfigError::Json { .. }), "{error:?}");
    }

    #[test]
    fn causal_head_needs_decoder() {
        let config = with(r#"{"is_decoder": false}"#).unwrap();
        assert!(config.validate_causal_lm().is_err());
        let config = with(r#"{"is_decoder": true, "lsh_num_chunks_after": 1}"#).unwrap();
        assert!(config.validate_causal_lm().is_err());
    }

    #[test]
    fn automatic_buckets_follow_hugging_face() {
        // Values from the spec of HF's `_set_num_buckets` with chunk 64, max length = seq_len.
        assert_eq!(NumBuckets::automatic(4096, 64, 4096), NumBuckets::Single(128));
        assert_eq!(NumBuckets::automatic(16384, 64, 16384), NumBuckets::Factorised(vec![16, 32]));
        assert_eq!(NumBuckets::automatic(65536, 64, 65536), NumBuckets::Factorised(vec![32, 64]));
    }

    #[test]
    fn max_length_suggestion_is_a_larger_multiple() {
        let error = with(r#"{"lsh_attn_chunk_length": 9, "local_attn_chunk_length": 11, "axial_pos_embds": false, "max_position_embeddings": 64}"#).unwrap_err();
        assert!(error.to_string().contains("(for example 99)"), "{error}");
    }

    #[test]
    fn padded_len_rounds_up_to_chunk_multiple() {
        let config = ReformerConfig::default();
        assert_eq!(config.padded_len(10), 10);
        assert_eq!(config.padded_len(64), 64);
        assert_eq!(config.padded_len(65), 128);
    }
}
