//! Per-call state of a forward pass: training flag, host-side randomness, key masks and
//! injected LSH rotations.
//!
//! Rotations and dropout masks are drawn on the host from a generator seeded by
//! (seed, layer, step, site), never from the backend's generator. The same call therefore
//! gives the same numbers on every backend, and a recomputation replays exactly what the
//! forward pass drew.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use burn::prelude::*;
use burn::tensor::TensorData;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

/// Site of a random draw within a layer. It is part of the seed, so each site gets its own
/// stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RandomSite {
    /// LSH rotations.
    Rotations,
    /// Dropout on the word embeddings.
    EmbeddingDropout,
    /// Dropout on the position embeddings.
    PositionDropout,
    /// Dropout on attention probabilities.
    AttentionProbs,
    /// Dropout after the attention output projection.
    AttentionOutput,
    /// Dropout inside the feed-forward block, before the activation.
    FeedForwardInner,
    /// Dropout after the feed-forward block.
    FeedForwardOutput,
    /// Dropout after the final LayerNorm.
    FinalNorm,
}

/// Mixes the parts of a random stream's identity into one 64-bit seed (SplitMix64 finaliser,
/// Steele et al. 2014), so that neighbouring steps or layers get unrelated streams.
pub fn mix_seed(parts: &[u64]) -> u64 {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for &part in parts {
        state ^= part.wrapping_add(0x9E37_79B9_7F4A_7C15);
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        state = z ^ (z >> 31);
    }
    state
}

/// Valid-token mask over keys: `true` for a real token, `false` for padding.
///
/// Built from sequence lengths (or given explicitly), never by comparing ids with the padding
/// id, because a padding id can be a real token (the separator 0 of the duplication task).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyMask {
    batch_size: usize,
    seq_len: usize,
    valid: Vec<bool>,
}

impl KeyMask {
    /// Builds a mask from explicit flags, row-major `[batch_size, seq_len]`.
    ///
    /// # Panics
    /// If `valid.len() != batch_size * seq_len`.
    pub fn new(batch_size: usize, seq_len: usize, valid: Vec<bool>) -> Self {
        assert_eq!(
            valid.len(),
            batch_size * seq_len,
            "key mask has {} flags for shape [{batch_size}, {seq_len}]",
            valid.len()
        );
        Self { batch_size, seq_len, valid }
    }

    /// Builds a right-padding mask: row `b` has `lengths[b]` real tokens, then padding.
    pub fn from_lengths(lengths: &[usize], seq_len: usize) -> Self {
        let valid = lengths
            .iter()
            .flat_map(|&len| (0..seq_len).map(move |t| t < len))
            .collect();
        Self::new(lengths.len(), seq_len, valid)
    }

    /// Builds a left-padding mask: row `b` has padding, then its last `lengths[b]` tokens.
    pub fn from_lengths_left(lengths: &[usize], seq_len: usize) -> Self {
        let valid = lengths
            .iter()
            .flat_map(|&len| (0..seq_len).map(move |t| t + len >= seq_len))
            .collect();
        Self::new(lengths.len(), seq_len, valid)
    }

    /// Returns `[batch_size, seq_len]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.batch_size, self.seq_len]
    }

    /// Returns whether key `t` of row `b` is a real token.
    pub fn is_valid(&self, b: usize, t: usize) -> bool {
        self.valid[b * self.seq_len + t]
    }

    /// Returns whether any position is padding.
    pub fn has_padding(&self) -> bool {
        self.valid.iter().any(|&v| !v)
    }

    /// Returns the mask extended with `extra` padding positions on the right of every row.
    pub fn pad_right(&self, extra: usize) -> Self {
        let seq_len = self.seq_len + extra;
        let mut valid = Vec::with_capacity(self.batch_size * seq_len);
        for row in self.valid.chunks(self.seq_len.max(1)) {
            valid.extend_from_slice(row);
            valid.extend(std::iter::repeat_n(false, extra));
        }
        Self::new(self.batch_size, seq_len, valid)
    }
}

/// Random rotations of one LSH layer, in Hugging Face's layout `[n_heads, d_head, n_hashes,
/// rot_size / 2]`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Rotations {
    /// `[n_heads, d_head, n_hashes, rot_size / 2]`.
    pub shape: [usize; 4],
    /// Values, row-major.
    pub values: Arc<Vec<f32>>,
}

impl Rotations {
    /// Draws standard-normal rotations from a seeded host generator.
    pub fn random(shape: [usize; 4], seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let count = shape.iter().product();
        let values = (0..count).map(|_| StandardNormal.sample(&mut rng)).collect();
        Self { shape, values: Arc::new(values) }
    }
}

/// Attention mode of the LSH layers in one forward call. Local layers are never affected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LshMode {
    /// Hash, sort and attend within chunks, the Reformer's LSH attention (the default).
    #[default]
    Hashed,
    /// Exact attention over every allowed position with the same parameters and conventions:
    /// shared query-key projection, normalised keys, and a token's own key used only when no
    /// other key is allowed. This is the "full attention" evaluation of an LSH-trained model in
    /// Table 2 of Kitaev et al. (2020), and it also trains a full-attention baseline.
    Full,
    /// The layers' output is zero, so the residual stream passes through unchanged. Shows
    /// whether a trained model depends on its LSH layers.
    Ablated,
}

/// Settings and randomness of one forward call.
#[derive(Clone, Debug)]
pub struct ForwardContext {
    /// Training mode: dropout is active.
    pub training: bool,
    /// Base seed of rotations and dropout.
    pub seed: u64,
    /// Optimizer step (or any call counter): part of every random stream's seed.
    pub step: u64,
    /// Overrides `num_hashes` of every LSH layer.
    pub num_hashes: Option<usize>,
    /// Attention mode of the LSH layers.
    pub lsh_mode: LshMode,
    /// Rotations to use instead of random ones, by layer index in `attn_layers`.
    pub rotations: Option<Arc<HashMap<usize, Rotations>>>,
    /// Back-propagates through the layers with the reversible node, which recomputes each
    /// layer's activations instead of storing them (the default). `false` records every
    /// activation with plain autodiff, for comparison and debugging. Without autodiff both
    /// run the same plain loop.
    pub reversible: bool,
    /// Bucket ids hashed during this call, so that the reversible backward sorts exactly as
    /// the forward did even where recomputed inputs differ from the originals by rounding.
    pub(crate) buckets: Option<Arc<BucketMemo>>,
}

/// Bucket ids of the LSH layers of one forward call, by layer index.
#[derive(Debug, Default)]
pub(crate) struct BucketMemo {
    by_layer: Mutex<HashMap<usize, Arc<Vec<u32>>>>,
}

impl BucketMemo {
    /// Returns the ids stored for `layer`.
    pub(crate) fn get(&self, layer: usize) -> Option<Arc<Vec<u32>>> {
        self.by_layer.lock().unwrap_or_else(PoisonError::into_inner).get(&layer).cloned()
    }

    /// Returns the ids stored for `layer`, or computes and stores them.
    pub(crate) fn get_or_insert<E>(
        &self,
        layer: usize,
        compute: impl FnOnce() -> Result<Vec<u32>, E>,
    ) -> Result<Arc<Vec<u32>>, E> {
        // A panic while the lock was held cannot leave a half-written entry: entries are
        // inserted whole. Poisoning is therefore ignored.
        if let Some(ids) = self.by_layer.lock().unwrap_or_else(PoisonError::into_inner).get(&layer) {
            return Ok(ids.clone());
        }
        let ids = Arc::new(compute()?);
        self.by_layer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(layer, ids.clone());
        Ok(ids)
    }
}

impl ForwardContext {
    /// Returns an evaluation context (no dropout) with rotations drawn from `seed`.
    pub fn eval(seed: u64) -> Self {
        Self { training: false, seed, step: 0, num_hashes: None, lsh_mode: LshMode::Hashed, rotations: None, reversible: true, buckets: None }
    }

    /// Returns a training context (dropout on) for optimizer step `step`.
    pub fn train(seed: u64, step: u64) -> Self {
        Self { training: true, seed, step, num_hashes: None, lsh_mode: LshMode::Hashed, rotations: None, reversible: true, buckets: None }
    }

    /// Returns the context with [`ForwardContext::num_hashes`] set.
    pub fn with_num_hashes(mut self, num_hashes: Option<usize>) -> Self {
        self.num_hashes = num_hashes;
        self
    }

    /// Returns the context with [`ForwardContext::lsh_mode`] set.
    pub fn with_lsh_mode(mut self, lsh_mode: LshMode) -> Self {
        self.lsh_mode = lsh_mode;
        self
    }

    /// Returns the context with [`ForwardContext::reversible`] set.
    pub fn with_reversible(mut self, reversible: bool) -> Self {
        self.reversible = reversible;
        self
    }

    /// Returns the seed of one random stream.
    pub fn stream_seed(&self, layer: usize, site: RandomSite) -> u64 {
        mix_seed(&[self.seed, layer as u64, self.step, site as u64])
    }

    /// Applies inverted dropout with a mask drawn on the host, or returns `x` unchanged
    /// outside training or when `prob` is 0.
    pub fn dropout<const D: usize>(
        &self,
        x: Tensor<D>,
        prob: f64,
        layer: usize,
        site: RandomSite,
    ) -> Tensor<D> {
        if !self.training || prob <= 0.0 {
            return x;
        }
        let shape = x.dims();
        let mask = bernoulli_keep_mask(shape.iter().product(), prob, self.stream_seed(layer, site));
        let mask = Tensor::<D>::from_data(TensorData::new(mask, shape), &x.device());
        x * mask
    }

    /// Returns the `count` factors [`Self::dropout`] would multiply a tensor of `count` values
    /// by at `(layer, site)`, or `None` where it would return the tensor unchanged.
    pub fn dropout_factors(&self, count: usize, prob: f64, layer: usize, site: RandomSite) -> Option<Vec<f32>> {
        (self.training && prob > 0.0).then(|| bernoulli_keep_mask(count, prob, self.stream_seed(layer, site)))
    }
}

/// Draws `count` inverted-dropout factors: 0 with probability `prob`, else `1 / (1 - prob)`.
pub fn bernoulli_keep_mask(count: usize, prob: f64, seed: u64) -> Vec<f32> {
    use rand::Rng;
    let mut rng = StdRng::seed_from_u64(seed);
    let keep = (1.0 / (1.0 - prob)) as f32;
    (0..count)
        .map(|_| if rng.random::<f64>() < prob { 0.0 } else { keep })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_seeds_differ_by_each_part() {
        let base = mix_seed(&[1, 2, 3]);
        assert_ne!(base, mix_seed(&[1, 2, 4]));
        assert_ne!(base, mix_seed(&[1, 3, 3]));
        assert_ne!(base, mix_seed(&[2, 2, 3]));
        assert_eq!(base, mix_seed(&[1, 2, 3]));
    }

    #[test]
    fn key_mask_from_lengths() {
        let mask = KeyMask::from_lengths(&[2, 3], 3);
        assert!(mask.is_valid(0, 1));
        assert!(!mask.is_valid(0, 2));
        assert!(mask.is_valid(1, 2));
        let left = KeyMask::from_lengths_left(&[1], 3);
        assert!(!left.is_valid(0, 0));
        assert!(left.is_valid(0, 2));
        let padded = mask.pad_right(2);
        assert_eq!(padded.dims(), [2, 5]);
        assert!(padded.is_valid(1, 2));
        assert!(!padded.is_valid(1, 3));
    }

    #[test]
    fn dropout_mask_keeps_expected_fraction() {
        let mask = bernoulli_keep_mask(10_000, 0.25, 7);
        let kept_count = mask.iter().filter(|&&m| m > 0.0).count();
        assert!((7000..8000).contains(&kept_count), "kept {kept_count} of 10000");
        assert!(mask.iter().all(|&m| m == 0.0 || (m - 4.0 / 3.0).abs() < 1e-6));
    }
}
