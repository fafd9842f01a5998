//! Local (chunked) self-attention, computed as Hugging Face's `LocalSelfAttention` does in
//! transformers 5.25: the sequence is cut into chunks and each chunk attends to itself and
//! its neighbouring chunks, with chunk indices wrapping around.

use burn::module::Module;
use burn::nn::Linear;
use burn::prelude::*;
use rand::rngs::StdRng;

use super::chunked::{ChunkPlan, chunked_attention};
use super::{merge_heads, split_heads};
use crate::config::ReformerConfig;
use crate::context::{ForwardContext, KeyMask};
use crate::init::normal_linear;
use crate::linear;

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
        let rows = batch_size * s.n_heads;
        let heads = |t: Tensor<3>| split_heads(t, s.n_heads, s.d_head).reshape([rows, seq_len, s.d_head]);
        let q = heads(linear::forward(&self.query, x.clone()));
        let k = heads(linear::forward(&self.key, x.clone())) / (s.d_head as f64).sqrt();
        let v = heads(linear::forward(&self.value, x));

        // Exact attention is one chunk with no neighbours.
        let (chunk_len, before, after) = if seq_len <= s.chunk_len {
            (seq_len, 0, 0)
        } else {
            debug_assert_eq!(seq_len % s.chunk_len, 0, "seq_len {seq_len} is not a multiple of chunk_len {}", s.chunk_len);
            (s.chunk_len, s.chunks_before, s.chunks_after)
        };
        let plan = ChunkPlan {
            rows,
            n_heads: s.n_heads,
            seq_len,
            d_head: s.d_head,
            n_rounds: 1,
            chunk_len,
            before,
            after,
            order: None,
            causal: s.is_decoder,
            self_mask: false,
            padding: mask.cloned(),
            dropout: None,
        }
        .with_dropout(ctx, s.dropout, layer);
        let out = chunked_attention(q, k, v, plan) // [rows, 1, seq_len, d_head + 1]
            .slice([0..rows, 0..1, 0..seq_len, 0..s.d_head])
            .reshape([batch_size, s.n_heads, seq_len, s.d_head]);
        merge_heads(out)
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
