//! Local (chunked) self-attention, computed as Hugging Face's `LocalSelfAttention` does in
//! transformers 5.25: the sequence is cut into chunks and each chunk attends to itself and
//! its neighbouring chunks, with chunk indices wrapping around.

use burn::module::Module;
use burn::nn::Linear;
use burn::prelude::*;
use rand::rngs::StdRng;

use super::{MASK_VALUE, bool_tensor, merge_heads, softmax_with_lse, split_heads, window_positions, window_rows};
use crate::config::ReformerConfig;
use crate::context::{ForwardContext, KeyMask, RandomSite};
use crate::init::normal_linear;

/// Settings of one local-attention layer, copied from the model config.
#[derive(Clone, Debug)]
pub struct LocalSettings {
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
    /// Causal masking.
    pub is_decoder: bool,
    /// Dropout on attention probabilities.
    pub dropout: f64,
}

/// Local self-attention with separate query, key and value projections, no biases.
#[derive(Module, Debug)]
pub struct LocalSelfAttention {
    /// Query projection, `d_model -> n_heads * d_head`.
    pub query: Linear,
    /// Key projection, `d_model -> n_heads * d_head`.
    pub key: Linear,
    /// Value projection, `d_model -> n_heads * d_head`.
    pub value: Linear,
    #[module(skip)]
    settings: LocalSettings,
}

impl LocalSelfAttention {
    /// Creates the layer from the model config.
    pub fn new(config: &ReformerConfig, rng: &mut StdRng, device: &Device) -> Self {
        let d_model = config.hidden_size;
        let width = config.all_head_size();
        let mut linear = || normal_linear(d_model, width, false, config.initializer_range, rng, device);
        Self {
            query: linear(),
            key: linear(),
            value: linear(),
            settings: LocalSettings {
                n_heads: config.num_attention_heads,
                d_head: config.attention_head_size,
                chunk_len: config.local_attn_chunk_length,
                chunks_before: config.local_num_chunks_before,
                chunks_after: config.local_num_chunks_after,
                is_decoder: config.is_decoder,
                dropout: config.local_attention_probs_dropout_prob,
            },
        }
    }

    /// Returns the layer's settings.
    pub fn settings(&self) -> &LocalSettings {
        &self.settings
    }

    /// Runs local self-attention and returns the merged heads, before the output projection.
    ///
    /// # Shapes
    /// - `x`: `[batch_size, seq_len, d_model]`, with `seq_len` a multiple of `chunk_len` or at
    ///   most `chunk_len`
    /// - output: `[batch_size, seq_len, n_heads * d_head]`
    pub fn forward(&self, x: Tensor<3>, mask: Option<&KeyMask>, layer: usize, ctx: &ForwardContext) -> Tensor<3> {
        let s = &self.settings;
        let [batch_size, seq_len, _] = x.dims();
        let x_device = x.device();
        let q = split_heads(self.query.forward(x.clone()), s.n_heads, s.d_head); // [batch_size, n_heads, seq_len, d_head]
        let k = split_heads(self.key.forward(x.clone()), s.n_heads, s.d_head) / (s.d_head as f64).sqrt();
        let v = split_heads(self.value.forward(x), s.n_heads, s.d_head);

        // Exact attention is one chunk with no neighbours.
        let (chunk_len, before, after) = if seq_len <= s.chunk_len {
            (seq_len, 0, 0)
        } else {
            debug_assert_eq!(seq_len % s.chunk_len, 0, "seq_len {seq_len} is not a multiple of chunk_len {}", s.chunk_len);
            (s.chunk_len, s.chunks_before, s.chunks_after)
        };
        let n_chunks = seq_len / chunk_len;
        let rows = batch_size * s.n_heads;
        let queries = q.reshape([rows, n_chunks, chunk_len, s.d_head]);

        // Keys and values are gathered straight into each chunk's window: one gather each
        // instead of shifted copies and their concatenation.
        let positions: Vec<u32> = (0..seq_len as u32).collect();
        let key_positions = window_positions(&positions, 1, chunk_len, before, after); // [n_chunks, window]
        let window = key_positions.len() / n_chunks;
        let (keys, values) = if before == 0 && after == 0 {
            (k.reshape([rows, n_chunks, window, s.d_head]), v.reshape([rows, n_chunks, window, s.d_head]))
        } else {
            let window_rows = window_rows(&key_positions.repeat(rows), rows, seq_len, &x_device);
            let gather = |t: Tensor<4>| t.reshape([rows * seq_len, s.d_head]).select(0, window_rows.clone()).reshape([rows, n_chunks, window, s.d_head]);
            (gather(k), gather(v))
        };

        let scores = queries.matmul(keys.swap_dims(2, 3)); // [rows, n_chunks, chunk_len, window]
        let scores = self.apply_masks(scores, batch_size, chunk_len, &key_positions, mask);

        let (probs, _) = softmax_with_lse(scores);
        let probs = ctx.dropout(probs, s.dropout, layer, RandomSite::AttentionProbs);
        let out = probs.matmul(values); // [rows, n_chunks, chunk_len, d_head]
        merge_heads(out.reshape([batch_size, s.n_heads, seq_len, s.d_head]))
    }

    /// Replaces scores of padding keys and, when causal, of later keys by [`MASK_VALUE`].
    /// Local attention has no self mask.
    ///
    /// `key_positions` contains each chunk's window of key positions, `[n_chunks, window]`.
    fn apply_masks(
        &self,
        scores: Tensor<4>,
        batch_size: usize,
        chunk_len: usize,
        key_positions: &[u32],
        mask: Option<&KeyMask>,
    ) -> Tensor<4> {
        let causal = self.settings.is_decoder;
        if mask.is_none() && !causal {
            return scores;
        }
        let [rows, n_chunks, _, window] = scores.dims();
        let seq_len = n_chunks * chunk_len;

        let mut disallowed = Vec::with_capacity(rows * seq_len * window);
        for row in 0..rows {
            let batch = row / self.settings.n_heads;
            for chunk in 0..n_chunks {
                let keys = &key_positions[chunk * window..(chunk + 1) * window];
                for q_pos in (chunk * chunk_len) as u32..((chunk + 1) * chunk_len) as u32 {
                    for &k_pos in keys {
                        let padded = mask.is_some_and(|m| !m.is_valid(batch, k_pos as usize));
                        disallowed.push(padded || (causal && q_pos < k_pos));
                    }
                }
            }
        }
        debug_assert_eq!(rows, batch_size * self.settings.n_heads);
        let shape = scores.dims();
        let device = scores.device();
        scores.mask_fill(bool_tensor(disallowed, shape, &device), MASK_VALUE)
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation::softmax;

    use super::*;
    use crate::config::AttentionKind;
    use crate::testing::{assert_causal_prefix, assert_close, random_tensor, test_device, test_rng, values};

    const D_MODEL: usize = 32;
    const N_HEADS: usize = 2;
    const D_HEAD: usize = 16;

    /// Returns a valid one-layer local-attention config that looks one chunk back. The large
    /// initializer range makes attention peaked, so that a misplaced key changes the output.
    fn local_config(chunk_len: usize, is_decoder: bool) -> ReformerConfig {
        let config = ReformerConfig {
            attn_layers: vec![AttentionKind::Local],
            hidden_size: D_MODEL,
            num_attention_heads: N_HEADS,
            attention_head_size: D_HEAD,
            lsh_attn_chunk_length: chunk_len,
            local_attn_chunk_length: chunk_len,
            local_num_chunks_before: 1,
            local_num_chunks_after: 0,
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

    /// Computes exact bidirectional attention with plain tensor ops from the layer's weights:
    /// keys scaled by `1 / sqrt(d_head)`, no mask.
    fn exact_attention(layer: &LocalSelfAttention, x: Tensor<3>) -> Tensor<3> {
        let [batch_size, seq_len, d_model] = x.dims();
        let project = |weight: Tensor<2>| {
            x.clone()
                .reshape([batch_size * seq_len, d_model])
                .matmul(weight) // [batch_size * seq_len, n_heads * d_head]
                .reshape([batch_size, seq_len, N_HEADS, D_HEAD])
                .swap_dims(1, 2) // [batch_size, n_heads, seq_len, d_head]
        };
        let q = project(layer.query.weight.val());
        let k = project(layer.key.weight.val()) / (D_HEAD as f64).sqrt();
        let v = project(layer.value.weight.val());

        let scores = q.matmul(k.swap_dims(2, 3)); // [batch_size, n_heads, seq_len, seq_len]
        softmax(scores, 3)
            .matmul(v) // [batch_size, n_heads, seq_len, d_head]
            .swap_dims(1, 2)
            .reshape([batch_size, seq_len, N_HEADS * D_HEAD])
    }

    #[test]
    fn short_sequence_equals_exact_attention() {
        let device = test_device();
        let layer = LocalSelfAttention::new(&local_config(16, false), &mut test_rng(), &device);
        for seq_len in [12, 16] {
            let x = random_tensor([2, seq_len, D_MODEL], seq_len as u64, &device);
            let out = layer.forward(x.clone(), None, 0, &ForwardContext::eval(0));
            let expected = exact_attention(&layer, x);
            assert_close(&values(out), &values(expected), 1e-4);
        }
    }

    #[test]
    fn causal_output_ignores_later_positions() {
        let device = test_device();
        let layer = LocalSelfAttention::new(&local_config(8, true), &mut test_rng(), &device);
        let (seq_len, last_unchanged) = (32, 13);
        let x = random_tensor([1, seq_len, D_MODEL], 1, &device);
        let changed = Tensor::cat(
            vec![
                x.clone().slice([0..1, 0..last_unchanged + 1]),
                random_tensor([1, seq_len - last_unchanged - 1, D_MODEL], 2, &device),
            ],
            1,
        );
        let ctx = ForwardContext::eval(0);
        let out = layer.forward(x, None, 0, &ctx);
        let out_changed = layer.forward(changed, None, 0, &ctx);
        assert_causal_prefix(out, out_changed, last_unchanged, 1e-3);
    }
}
