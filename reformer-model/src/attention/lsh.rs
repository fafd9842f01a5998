//! LSH self-attention with shared queries and keys (Kitaev et al. 2020, section 2), computed
//! as Hugging Face's `LSHSelfAttention` does in transformers 5.25.
//!
//! The layer projects to shared `qk` and `v`, hashes `qk` into buckets with random rotations
//! and sorts by (round, bucket, position). The sorted sequence is cut into chunks that attend
//! to themselves and their neighbours, masked by original positions. Each round gets its own
//! softmax, and after unsorting the rounds are combined by their logsumexp. Hashing and
//! sorting run on the host, because bucket ids are integers that no gradient flows through.

use std::sync::Arc;

use burn::module::Module;
use burn::nn::Linear;
use burn::prelude::*;
use rand::rngs::StdRng;
use burn::tensor::TensorData;

use super::chunked::{ChunkPlan, chunked_attention};
use super::{MASK_VALUE, SELF_MASK_VALUE, bool_tensor, merge_heads, softmax_with_lse, split_heads};
use crate::config::{NumBuckets, ReformerConfig};
use crate::context::{ForwardContext, KeyMask, LshMode, RandomSite, Rotations, mix_seed};
use crate::error::InputError;
use crate::init::normal_linear;
use crate::linear;

/// Epsilon of the key normalisation, fixed at 1e-6 by Hugging Face (`_len_norm`), independent
/// of `layer_norm_eps`.
const KEY_NORM_EPS: f64 = 1e-6;

/// Settings of one LSH layer, copied from the model config.
#[derive(Clone, Debug)]
pub struct LshSettings {
    /// Number of heads `n_heads`.
    pub n_heads: usize,
    /// Width of one head `d_head`.
    pub d_head: usize,
    /// Chunk length `chunk_len`.
    pub chunk_len: usize,
    /// Neighbouring chunks before a chunk that it attends to.
    pub chunks_before: usize,
    /// Neighbouring chunks after a chunk that it attends to.
    pub chunks_after: usize,
    /// Hash rounds `n_hashes`.
    pub n_hashes: usize,
    /// Bucket layout; `None` picks it from the padded length.
    pub num_buckets: Option<NumBuckets>,
    /// Causal masking.
    pub is_decoder: bool,
    /// Dropout on attention probabilities.
    pub dropout: f64,
    /// Fixed rotation seed shared by all layers and calls.
    pub hash_seed: Option<u64>,
    /// Maximum length, used by the automatic bucket count.
    pub max_position_embeddings: usize,
}

/// LSH self-attention: shared query-key projection and value projection, no biases.
#[derive(Module, Debug)]
pub struct LshSelfAttention {
    /// Shared query-key projection `W_qk`, `d_model -> n_heads * d_head`.
    pub query_key: Linear,
    /// Value projection `W_v`, `d_model -> n_heads * d_head`.
    pub value: Linear,
    #[module(skip)]
    settings: LshSettings,
}

impl LshSelfAttention {
    /// Creates the layer from the model config.
    pub fn new(config: &ReformerConfig, rng: &mut StdRng, device: &Device) -> Self {
        let d_model = config.hidden_size;
        let width = config.all_head_size();
        Self {
            query_key: normal_linear(d_model, width, false, config.initializer_range, rng, device),
            value: normal_linear(d_model, width, false, config.initializer_range, rng, device),
            settings: LshSettings {
                n_heads: config.num_attention_heads,
                d_head: config.attention_head_size,
                chunk_len: config.lsh_attn_chunk_length,
                chunks_before: config.lsh_num_chunks_before,
                chunks_after: config.lsh_num_chunks_after,
                n_hashes: config.num_hashes,
                num_buckets: config.num_buckets.clone(),
                is_decoder: config.is_decoder,
                dropout: config.lsh_attention_probs_dropout_prob,
                hash_seed: config.hash_seed,
                max_position_embeddings: config.max_position_embeddings,
            },
        }
    }

    /// Returns the layer's settings.
    pub fn settings(&self) -> &LshSettings {
        &self.settings
    }

    /// Returns the bucket layout used at padded length `seq_len`.
    // NOTE: with `num_buckets: null` this is recomputed at every call, whereas Hugging Face
    // stores the value from its first call, so later calls of another length can differ.
    pub fn buckets_for(&self, seq_len: usize) -> NumBuckets {
        let s = &self.settings;
        s.num_buckets
            .clone()
            .unwrap_or_else(|| NumBuckets::automatic(seq_len, s.chunk_len, s.max_position_embeddings))
    }

    /// Checks that rotations given in `ctx` for this layer fit a call at padded length
    /// `seq_len`. Sequences of at most one chunk, and calls in [`LshMode::Full`] or
    /// [`LshMode::Ablated`], are not hashed, so nothing is checked for them.
    pub fn check_rotations(&self, seq_len: usize, layer: usize, ctx: &ForwardContext) -> Result<(), InputError> {
        let given = ctx.rotations.as_ref().is_some_and(|all| all.contains_key(&layer));
        if !given || seq_len <= self.settings.chunk_len || ctx.lsh_mode != LshMode::Hashed {
            return Ok(());
        }
        let n_hashes = ctx.num_hashes.unwrap_or(self.settings.n_hashes);
        self.rotations(seq_len, n_hashes, layer, ctx).map(drop)
    }

    /// Returns the rotations of this layer for a call at padded length `seq_len`: the ones
    /// given in `ctx`, checked against `[n_heads, d_head, n_hashes, rot_size / 2]`, or random
    /// ones from the layer's stream (or from `hash_seed`).
    pub(crate) fn rotations(
        &self,
        seq_len: usize,
        n_hashes: usize,
        layer: usize,
        ctx: &ForwardContext,
    ) -> Result<Rotations, InputError> {
        let s = &self.settings;
        let shape = [s.n_heads, s.d_head, n_hashes, self.buckets_for(seq_len).rotation_size() / 2];
        match ctx.rotations.as_ref().and_then(|all| all.get(&layer)) {
            Some(given) if given.shape != shape => Err(InputError::Rotations {
                layer,
                reason: format!(
                    "shape {:?} does not match [n_heads, d_head, n_hashes, rot_size / 2] = {shape:?}",
                    given.shape
                ),
            }),
            Some(given) => Ok(given.clone()),
            None => {
                let seed = match s.hash_seed {
                    Some(seed) => mix_seed(&[seed]),
                    None => ctx.stream_seed(layer, RandomSite::Rotations),
                };
                Ok(Rotations::random(shape, seed))
            }
        }
    }

    /// Runs LSH self-attention and returns the merged heads, before the output projection.
    ///
    /// `layer` is the index in `attn_layers`: it selects injected rotations and seeds the
    /// random ones. With [`LshMode::Full`] in `ctx`, or when `seq_len <= chunk_len`, the layer
    /// attends exactly over the whole sequence instead of hashing. [`LshMode::Ablated`] is
    /// applied by the caller ([`crate::model::AttentionBlock`]), not here.
    ///
    /// # Shapes
    /// - `x`: `[batch_size, seq_len, d_model]`, with `seq_len` a multiple of `chunk_len` or at
    ///   most `chunk_len`
    /// - output: `[batch_size, seq_len, n_heads * d_head]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        mask: Option<&KeyMask>,
        layer: usize,
        ctx: &ForwardContext,
    ) -> Result<Tensor<3>, InputError> {
        let s = &self.settings;
        let [batch_size, seq_len, _] = x.dims();
        let qk = split_heads(linear::forward(&self.query_key, x.clone()), s.n_heads, s.d_head); // [batch_size, n_heads, seq_len, d_head]
        let v = split_heads(linear::forward(&self.value, x), s.n_heads, s.d_head); // [batch_size, n_heads, seq_len, d_head]

        let out = if seq_len <= s.chunk_len || ctx.lsh_mode == LshMode::Full {
            self.attend_full(qk, v, mask, layer, ctx)
        } else {
            debug_assert_eq!(seq_len % s.chunk_len, 0, "seq_len {seq_len} is not a multiple of chunk_len {}", s.chunk_len);
            self.attend_hashed(qk, v, mask, layer, ctx)?
        };
        debug_assert_eq!(out.dims(), [batch_size, s.n_heads, seq_len, s.d_head]);
        Ok(merge_heads(out))
    }

    /// Exact shared-QK attention over the whole sequence: no hashing and no random draw
    /// besides dropout. Used for [`LshMode::Full`] and whenever `seq_len <= chunk_len`.
    fn attend_full(
        &self,
        qk: Tensor<4>,
        v: Tensor<4>,
        mask: Option<&KeyMask>,
        layer: usize,
        ctx: &ForwardContext,
    ) -> Tensor<4> {
        let s = &self.settings;
        let keys = key_norm(qk.clone(), s.d_head);
        let scores = qk.matmul(keys.swap_dims(2, 3)); // [batch_size, n_heads, seq_len, seq_len]
        let scores = self.apply_full_masks(scores, mask);

        let (probs, _) = softmax_with_lse(scores);
        let probs = ctx.dropout(probs, s.dropout, layer, RandomSite::AttentionProbs);
        probs.matmul(v)
    }

    /// Replaces disallowed scores of full attention as [`Self::apply_masks`] does for chunks:
    /// padding keys and (when causal) later keys by [`MASK_VALUE`], then the diagonal by
    /// [`SELF_MASK_VALUE`]. The causal and self masks are built on the device; only the padding
    /// flags, `batch_size * seq_len` of them, come from the host.
    ///
    /// # Shapes
    /// - `scores`, output: `[batch_size, n_heads, seq_len, seq_len]`
    fn apply_full_masks(&self, scores: Tensor<4>, mask: Option<&KeyMask>) -> Tensor<4> {
        let shape = scores.dims();
        let [batch_size, _, seq_len, _] = shape;
        let device = scores.device();

        let later = self
            .settings
            .is_decoder
            .then(|| Tensor::<2, Bool>::tril_mask([seq_len, seq_len], 0, &device).reshape([1, 1, seq_len, seq_len])); // true where key > query
        let padding = mask.map(|mask| {
            let flags = (0..batch_size)
                .flat_map(|b| (0..seq_len).map(move |t| !mask.is_valid(b, t)))
                .collect();
            bool_tensor(flags, [batch_size, 1, 1, seq_len], &device)
        });
        let disallowed = match (later, padding) {
            (Some(later), Some(padding)) => Some(later.expand(shape).bool_or(padding.expand(shape))),
            (Some(later), None) => Some(later.expand(shape)),
            (None, Some(padding)) => Some(padding.expand(shape)),
            (None, None) => None,
        };
        let scores = match disallowed {
            Some(disallowed) => scores.mask_fill(disallowed, MASK_VALUE),
            None => scores,
        };

        // `diag_mask` is false on the diagonal.
        let own = Tensor::<2, Bool>::diag_mask([seq_len, seq_len], 0, &device)
            .bool_not()
            .reshape([1, 1, seq_len, seq_len])
            .expand(shape);
        scores.mask_fill(own, SELF_MASK_VALUE)
    }

    /// Hashed attention: bucket, sort, chunk, attend within windows, unsort, combine rounds.
    fn attend_hashed(
        &self,
        qk: Tensor<4>,
        v: Tensor<4>,
        mask: Option<&KeyMask>,
        layer: usize,
        ctx: &ForwardContext,
    ) -> Result<Tensor<4>, InputError> {
        let s = &self.settings;
        let [batch_size, n_heads, seq_len, d_head] = qk.dims();
        let n_hashes = ctx.num_hashes.unwrap_or(s.n_hashes);
        let rows = batch_size * n_heads;

        // Inside the reversible node the forward stores the ids and the recomputation reuses
        // them: hashing the recomputed `qk` could flip a near-tie into another bucket.
        let buckets = match &ctx.buckets {
            Some(memo) => memo.get_or_insert(layer, || self.hash(qk.clone(), n_hashes, mask, layer, ctx))?,
            None => Arc::new(self.hash(qk.clone(), n_hashes, mask, layer, ctx)?),
        };
        let positions = sort_by_bucket(&buckets, rows, n_hashes, seq_len);

        // Sorted chunks attend to their neighbours. Every round contains each position once.
        let plan = ChunkPlan {
            rows,
            n_heads,
            seq_len,
            d_head,
            n_rounds: n_hashes,
            chunk_len: s.chunk_len,
            before: s.chunks_before,
            after: s.chunks_after,
            order: Some(Arc::new(positions)),
            causal: s.is_decoder,
            self_mask: true,
            padding: mask.cloned(),
            dropout: None,
        }
        .with_dropout(ctx, s.dropout, layer);
        let qk = qk.reshape([rows, seq_len, d_head]);
        let keys = key_norm(qk.clone(), d_head);
        let both = chunked_attention(qk, keys, v.reshape([rows, seq_len, d_head]), plan); // [rows, n_hashes, seq_len, d_head + 1]
        let out = both
            .clone()
            .slice([0..rows, 0..n_hashes, 0..seq_len, 0..d_head])
            .reshape([batch_size, n_heads, n_hashes, seq_len, d_head]);
        let lse = both
            .slice([0..rows, 0..n_hashes, 0..seq_len, d_head..d_head + 1])
            .reshape([batch_size, n_heads, n_hashes, seq_len]);

        if n_hashes == 1 {
            return Ok(out.reshape([batch_size, n_heads, seq_len, d_head]));
        }
        // Weight round k by exp(lse_k - logsumexp_k(lse_k)): the rounds' softmax denominators
        // combine into one softmax over the union of their windows.
        let lse = lse.swap_dims(2, 3); // [batch_size, n_heads, seq_len, n_hashes]
        let weights = (lse.clone() - super::logsumexp(lse)).exp().swap_dims(2, 3); // [batch_size, n_heads, n_hashes, seq_len]
        let combined = (out * weights.unsqueeze_dim::<5>(4)).sum_dim(2); // [batch_size, n_heads, 1, seq_len, d_head]
        Ok(combined.reshape([batch_size, n_heads, seq_len, d_head]))
    }

    /// Hashes `qk` into buckets per head and round: `argmax([xR; -xR])` per bucket factor.
    /// Masked positions go to an extra bucket when the mask has padding.
    ///
    /// Returns bucket ids `[batch_size * n_heads, n_hashes, seq_len]` flattened, already
    /// offset so that each round's ids are disjoint: `bucket + round * stride`.
    fn hash(
        &self,
        qk: Tensor<4>,
        n_hashes: usize,
        mask: Option<&KeyMask>,
        layer: usize,
        ctx: &ForwardContext,
    ) -> Result<Vec<u32>, InputError> {
        let [batch_size, n_heads, seq_len, d_head] = qk.dims();
        let buckets = self.buckets_for(seq_len);
        let factors = buckets.factors();
        let rot_half = buckets.rotation_size() / 2;
        let rotations = self.rotations(seq_len, n_hashes, layer, ctx)?;

        // [1, n_heads, d_head, n_hashes * rot_half]: row-major, so HF's layout reshapes directly.
        let rotation_tensor = Tensor::<4>::from_data(
            TensorData::new(rotations.values.to_vec(), [1, n_heads, d_head, n_hashes * rot_half]),
            &qk.device(),
        );
        let projected = qk.detach().matmul(rotation_tensor); // [batch_size, n_heads, seq_len, n_hashes * rot_half]
        let projected: Vec<f32> = projected.try_into_vec_as::<f32>().expect("f32 data");

        let n_buckets = buckets.total();
        let pad_bucket = mask.is_some_and(KeyMask::has_padding);
        let stride = (n_buckets + usize::from(pad_bucket)) as u32;
        let rows = batch_size * n_heads;
        let mut ids = vec![0u32; rows * n_hashes * seq_len];
        for row in 0..rows {
            let b = row / n_heads;
            for t in 0..seq_len {
                let base = (row * seq_len + t) * n_hashes * rot_half;
                for round in 0..n_hashes {
                    let r = &projected[base + round * rot_half..base + (round + 1) * rot_half];
                    let bucket = if pad_bucket && !mask.expect("checked").is_valid(b, t) {
                        n_buckets as u32
                    } else {
                        factorised_argmax(r, &factors)
                    };
                    ids[(row * n_hashes + round) * seq_len + t] = bucket + round as u32 * stride;
                }
            }
        }
        Ok(ids)
    }
}

/// Returns the bucket of one projected vector: per factor `f`, the argmax over
/// `[r_block; -r_block]` (ties to the first index), combined as `a1 + f1 * a2 + ...`.
pub(crate) fn factorised_argmax(r: &[f32], factors: &[usize]) -> u32 {
    let mut bucket = 0usize;
    let mut scale = 1usize;
    let mut offset = 0usize;
    for &factor in factors {
        let half = factor / 2;
        let block = &r[offset..offset + half];
        let mut best = 0usize;
        let mut best_value = f32::NEG_INFINITY;
        for (i, &value) in block.iter().chain(block.iter()).enumerate() {
            let value = if i < half { value } else { -value };
            if value > best_value {
                best = i;
                best_value = value;
            }
        }
        bucket += best * scale;
        scale *= factor;
        offset += half;
    }
    bucket as u32
}

/// Sorts each row's `n_hashes * seq_len` slots stably by bucket id (ids of different rounds are
/// disjoint, so rounds stay in order and ties keep ascending positions), and returns the
/// original position in each sorted slot, `[rows, n_hashes * seq_len]` flattened.
fn sort_by_bucket(buckets: &[u32], rows: usize, n_hashes: usize, seq_len: usize) -> Vec<u32> {
    let slots = n_hashes * seq_len;
    let mut positions = Vec::with_capacity(rows * slots);
    let mut order: Vec<u32> = Vec::with_capacity(slots);
    for row in 0..rows {
        let keys = &buckets[row * slots..(row + 1) * slots];
        order.clear();
        order.extend(0..slots as u32);
        order.sort_by_key(|&slot| keys[slot as usize]); // stable
        positions.extend(order.iter().map(|&slot| slot % seq_len as u32));
    }
    positions
}

/// Normalises shared-QK keys as Hugging Face's `_len_and_dim_norm`:
/// `x / sqrt(mean(x^2) + 1e-6) / sqrt(d_head)`.
fn key_norm<const D: usize>(x: Tensor<D>, d_head: usize) -> Tensor<D> {
    let variance = x.clone().powi_scalar(2).mean_dim(D - 1);
    x / (variance + KEY_NORM_EPS).sqrt() / (d_head as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use burn::tensor::activation::softmax;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::config::AttentionKind;
    use crate::context::BucketMemo;
    use crate::testing::{assert_close, max_abs_diff, random_tensor, test_device, test_rng, values};

    const D_MODEL: usize = 32;
    const N_HEADS: usize = 2;
    const D_HEAD: usize = 16;
    const CHUNK_LEN: usize = 8;

    /// Returns a valid one-layer LSH config with chunks of [`CHUNK_LEN`] that look one chunk
    /// back. The large initializer range makes attention peaked: near-uniform attention
    /// averages all values alike and would hide a misplaced key or value.
    fn lsh_config(num_hashes: usize, num_buckets: Option<NumBuckets>, is_decoder: bool) -> ReformerConfig {
        let config = ReformerConfig {
            attn_layers: vec![AttentionKind::Lsh],
            hidden_size: D_MODEL,
            num_attention_heads: N_HEADS,
            attention_head_size: D_HEAD,
            num_hashes,
            num_buckets,
            lsh_attn_chunk_length: CHUNK_LEN,
            local_attn_chunk_length: CHUNK_LEN,
            lsh_num_chunks_before: 1,
            lsh_num_chunks_after: 0,
            axial_pos_shape: vec![8, 8],
            axial_pos_embds_dim: vec![16, 16],
            max_position_embeddings: 64,
            feed_forward_size: 64,
            is_decoder,
            vocab_size: 16,
            initializer_range: 0.5,
            ..ReformerConfig::default()
        };
        config.validate().expect("the test config is valid");
        config
    }

    /// Builds a `[batch_size, n_heads, seq_len, seq_len]` mask that is `true` where
    /// `fill(query, key)` returns true.
    fn pair_mask(
        shape: [usize; 4],
        fill: impl Fn(usize, usize) -> bool,
        device: &Device,
    ) -> Tensor<4, Bool> {
        let [batch_size, n_heads, seq_len, _] = shape;
        let mut flags = Vec::with_capacity(shape.iter().product());
        for _ in 0..batch_size * n_heads {
            for query in 0..seq_len {
                flags.extend((0..seq_len).map(|key| fill(query, key)));
            }
        }
        Tensor::from_data(TensorData::new(flags, shape), device)
    }

    /// Computes exact shared-QK attention with plain tensor ops from the layer's weights.
    /// The query is `qk` and the key `qk / sqrt(mean(qk^2) + 1e-6) / sqrt(d_head)`. When
    /// `causal`, scores of later keys are replaced by -1e9. Then the own key's score is
    /// replaced by -1e5.
    fn exact_shared_qk(layer: &LshSelfAttention, x: Tensor<3>, causal: bool) -> Tensor<3> {
        let [batch_size, seq_len, d_model] = x.dims();
        let device = x.device();
        let project = |weight: Tensor<2>| {
            x.clone()
                .reshape([batch_size * seq_len, d_model])
                .matmul(weight) // [batch_size * seq_len, n_heads * d_head]
                .reshape([batch_size, seq_len, N_HEADS, D_HEAD])
                .swap_dims(1, 2) // [batch_size, n_heads, seq_len, d_head]
        };
        let qk = project(layer.query_key.weight.val());
        let v = project(layer.value.weight.val());

        let rms = qk.clone().powi_scalar(2).mean_dim(3).add_scalar(1e-6).sqrt(); // [batch_size, n_heads, seq_len, 1]
        let keys = qk.clone() / rms / (D_HEAD as f64).sqrt();
        let scores = qk.matmul(keys.swap_dims(2, 3)); // [batch_size, n_heads, seq_len, seq_len]

        let shape = [batch_size, N_HEADS, seq_len, seq_len];
        let later = pair_mask(shape, |query, key| causal && key > query, &device);
        let own = pair_mask(shape, |query, key| key == query, &device);
        let scores = scores.mask_fill(later, -1e9).mask_fill(own, -1e5);

        softmax(scores, 3)
            .matmul(v) // [batch_size, n_heads, seq_len, d_head]
            .swap_dims(1, 2)
            .reshape([batch_size, seq_len, N_HEADS * D_HEAD])
    }

    /// Returns a context whose layer 0 uses `rotations` instead of drawing its own.
    fn with_rotations(seed: u64, rotations: Rotations) -> ForwardContext {
        ForwardContext {
            rotations: Some(Arc::new(HashMap::from([(0, rotations)]))),
            ..ForwardContext::eval(seed)
        }
    }

    #[test]
    fn short_sequence_equals_exact_attention() {
        let device = test_device();
        let layer = LshSelfAttention::new(&lsh_config(1, None, false), &mut test_rng(), &device);
        for seq_len in [5, CHUNK_LEN] {
            let x = random_tensor([2, seq_len, D_MODEL], seq_len as u64, &device);
            let out = layer.forward(x.clone(), None, 0, &ForwardContext::eval(0)).unwrap();
            let expected = exact_shared_qk(&layer, x, false);
            assert_close(&values(out), &values(expected), 1e-4);
        }
    }

    #[test]
    fn two_chunks_equal_exact_attention() {
        // With two chunks, one round and one chunk of look-back (wrapping around), every query
        // attends to every key exactly once, whatever the buckets are.
        let device = test_device();
        let layer = LshSelfAttention::new(&lsh_config(1, None, false), &mut test_rng(), &device);
        let x = random_tensor([2, 2 * CHUNK_LEN, D_MODEL], 1, &device);
        let expected = values(exact_shared_qk(&layer, x.clone(), false));
        for seed in 0..3 {
            let out = layer.forward(x.clone(), None, 0, &ForwardContext::eval(seed)).unwrap();
            assert_close(&values(out), &expected, 1e-4);
        }
    }

    #[test]
    fn two_chunks_causal_equal_exact_causal_attention() {
        let device = test_device();
        let layer = LshSelfAttention::new(&lsh_config(1, None, true), &mut test_rng(), &device);
        let x = random_tensor([2, 2 * CHUNK_LEN, D_MODEL], 2, &device);
        let expected = values(exact_shared_qk(&layer, x.clone(), true));
        for seed in 0..3 {
            let out = layer.forward(x.clone(), None, 0, &ForwardContext::eval(seed)).unwrap();
            assert_close(&values(out), &expected, 1e-4);
        }
    }

    #[test]
    fn full_mode_equals_exact_attention() {
        // Four chunks: hashed attention would see only part of the sequence.
        let device = test_device();
        for causal in [false, true] {
            let layer = LshSelfAttention::new(&lsh_config(2, None, causal), &mut test_rng(), &device);
            let x = random_tensor([2, 4 * CHUNK_LEN, D_MODEL], 30, &device);
            let ctx = ForwardContext::eval(0).with_lsh_mode(LshMode::Full);
            let out = layer.forward(x.clone(), None, 0, &ctx).unwrap();
            let expected = exact_shared_qk(&layer, x, causal);
            assert_close(&values(out), &values(expected), 1e-4);
        }
    }

    #[test]
    fn full_mode_ignores_padding_keys() {
        // Without a causal mask, padding is the only thing that hides the last keys: a real
        // token's output must equal that of the sequence cut before the padding.
        let device = test_device();
        let layer = LshSelfAttention::new(&lsh_config(2, None, false), &mut test_rng(), &device);
        let (seq_len, length) = (4 * CHUNK_LEN, 19);
        let x = random_tensor([1, seq_len, D_MODEL], 31, &device);
        let ctx = ForwardContext::eval(0).with_lsh_mode(LshMode::Full);
        let mask = KeyMask::from_lengths(&[length], seq_len);

        let padded = layer.forward(x.clone(), Some(&mask), 0, &ctx).unwrap();
        let padded = padded.slice([0..1, 0..length]);
        let cut = layer.forward(x.slice([0..1, 0..length]), None, 0, &ctx).unwrap();
        assert_close(&values(padded), &values(cut), 1e-5);
    }

    #[test]
    fn full_mode_row_with_only_itself_attends_to_itself() {
        // Position 0 of a causal model has no earlier key, so its output is its own value.
        let device = test_device();
        let layer = LshSelfAttention::new(&lsh_config(1, None, true), &mut test_rng(), &device);
        let x = random_tensor([1, 4 * CHUNK_LEN, D_MODEL], 32, &device);
        let ctx = ForwardContext::eval(0).with_lsh_mode(LshMode::Full);
        let out = layer.forward(x.clone(), None, 0, &ctx).unwrap();
        let first_value = layer.value.forward(x.slice([0..1, 0..1]));
        assert_close(&values(out.slice([0..1, 0..1])), &values(first_value), 1e-5);
    }

    #[test]
    fn full_mode_ignores_injected_rotations() {
        // Rotations of a wrong shape are an error when hashing, but full attention draws none.
        let device = test_device();
        let layer = LshSelfAttention::new(&lsh_config(2, Some(NumBuckets::Single(4)), false), &mut test_rng(), &device);
        let x = random_tensor([1, 4 * CHUNK_LEN, D_MODEL], 33, &device);
        let ctx = with_rotations(0, Rotations::random([N_HEADS, D_HEAD, 2, 3], 34)).with_lsh_mode(LshMode::Full);
        let seq_len = 4 * CHUNK_LEN;
        assert_eq!(layer.check_rotations(seq_len, 0, &ctx), Ok(()));
        assert!(layer.forward(x, None, 0, &ctx).is_ok());
    }

    #[test]
    fn sort_keeps_each_position_per_round() {
        let (rows, n_hashes, seq_len, n_buckets) = (3, 2, 10, 4);
        let mut rng = StdRng::seed_from_u64(3);
        let buckets: Vec<u32> = (0..rows * n_hashes * seq_len)
            .map(|slot| rng.random_range(0..n_buckets) + (slot / seq_len % n_hashes) as u32 * n_buckets)
            .collect();
        let positions = sort_by_bucket(&buckets, rows, n_hashes, seq_len);
        for (index, round) in positions.chunks(seq_len).enumerate() {
            let mut round = round.to_vec();
            round.sort_unstable();
            assert_eq!(round, (0..seq_len as u32).collect::<Vec<_>>(), "row {}, round {}", index / n_hashes, index % n_hashes);
        }
    }

    #[test]
    fn sort_by_bucket_is_stable() {
        let (rows, n_hashes, seq_len) = (2, 2, 12);
        let mut rng = StdRng::seed_from_u64(4);
        let buckets: Vec<u32> = (0..rows * n_hashes * seq_len)
            .map(|slot| rng.random_range(0..3) + (slot / seq_len % n_hashes) as u32 * 3)
            .collect();
        let positions = sort_by_bucket(&buckets, rows, n_hashes, seq_len);

        let slots = n_hashes * seq_len;
        // The bucket of sorted slot `s`: its round is `s / seq_len`, its position is stored.
        let bucket = |row: usize, sorted: usize| buckets[row * slots + (sorted / seq_len) * seq_len + positions[row * slots + sorted] as usize];
        for row in 0..rows {
            for sorted in 1..slots {
                let previous = (bucket(row, sorted - 1), positions[row * slots + sorted - 1]);
                let current = (bucket(row, sorted), positions[row * slots + sorted]);
                assert!(previous < current, "row {row}, sorted slot {sorted}: {previous:?} before {current:?}");
            }
        }
    }

    #[test]
    fn factorised_argmax_ties_go_to_first_index() {
        // One factor of 4: candidates [r0, r1, -r0, -r1].
        assert_eq!(factorised_argmax(&[1.0, 1.0], &[4]), 0);
        assert_eq!(factorised_argmax(&[-1.0, -1.0], &[4]), 2);
        // Factors [2, 4]: the first block [0, -0] ties at index 0; the second block
        // [-0.5, -0.5, 0.5, 0.5] ties at index 2, giving 0 + 2 * 2.
        assert_eq!(factorised_argmax(&[0.0, -0.5, -0.5], &[2, 4]), 4);
        // First block [-1, 1] picks 1, so the bucket is 1 + 2 * 2.
        assert_eq!(factorised_argmax(&[-1.0, -0.5, -0.5], &[2, 4]), 5);
    }

    #[test]
    fn injected_rotations_make_rounds_deterministic() {
        let device = test_device();
        let n_hashes = 4;
        let layer = LshSelfAttention::new(&lsh_config(n_hashes, Some(NumBuckets::Single(4)), false), &mut test_rng(), &device);
        let x = random_tensor([2, 4 * CHUNK_LEN, D_MODEL], 5, &device);
        let rotations = Rotations::random([N_HEADS, D_HEAD, n_hashes, 2], 6);

        // The two contexts would draw different rotations from their seeds, so equal outputs
        // show that the injected rotations replace the drawn ones.
        let first = layer.forward(x.clone(), None, 0, &with_rotations(1, rotations.clone())).unwrap();
        let second = layer.forward(x, None, 0, &with_rotations(2, rotations)).unwrap();
        assert_eq!(values(first), values(second));
    }

    #[test]
    fn wrong_rotation_shape_is_rejected() {
        let device = test_device();
        let n_hashes = 4;
        let layer = LshSelfAttention::new(&lsh_config(n_hashes, Some(NumBuckets::Single(4)), false), &mut test_rng(), &device);
        let x = random_tensor([1, 4 * CHUNK_LEN, D_MODEL], 7, &device);
        for shape in [[N_HEADS, D_HEAD, n_hashes, 3], [N_HEADS, D_HEAD, n_hashes - 1, 2], [1, D_HEAD, n_hashes, 2]] {
            let result = layer.forward(x.clone(), None, 0, &with_rotations(0, Rotations::random(shape, 8)));
            assert!(
                matches!(result, Err(InputError::Rotations { layer: 0, .. })),
                "shape {shape:?}: expected a rotations error, got {:?}",
                result.map(|out| out.dims())
            );
        }
    }

    #[test]
    fn memoised_buckets_replace_hashing() {
        let device = test_device();
        let layer = LshSelfAttention::new(&lsh_config(2, None, false), &mut test_rng(), &device);
        let x = random_tensor([1, 4 * CHUNK_LEN, D_MODEL], 20, &device);
        let other = random_tensor([1, 4 * CHUNK_LEN, D_MODEL], 21, &device);
        let plain = ForwardContext::eval(0);
        let memoised = ForwardContext { buckets: Some(Arc::new(BucketMemo::default())), ..plain.clone() };

        // The first call hashes and stores; its result is the plain one.
        let first = layer.forward(x.clone(), None, 0, &memoised).unwrap();
        assert_close(&values(first), &values(layer.forward(x, None, 0, &plain).unwrap()), 1e-6);
        // The second call sorts `other` by the stored buckets of `x`, not by its own.
        let replayed = layer.forward(other.clone(), None, 0, &memoised).unwrap();
        let hashed = layer.forward(other, None, 0, &plain).unwrap();
        let difference = max_abs_diff(&values(replayed), &values(hashed));
        assert!(difference > 1e-3, "stored buckets were not used: outputs differ by only {difference}");
    }
}
