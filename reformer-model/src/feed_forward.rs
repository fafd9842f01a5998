//! The position-wise feed-forward block of a Reformer layer.

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::prelude::*;
use rand::rngs::StdRng;
use burn::tensor::activation;

use crate::config::{Activation, ReformerConfig};
use crate::context::{ForwardContext, RandomSite};
use crate::init::normal_linear;
use crate::{linear, norm};

/// `FF(u) = dropout(W2 act(dropout(W1 LN(u) + b1)) + b2)`, with dropout before the activation
/// as in Hugging Face's `ChunkReformerFeedForward`.
#[derive(Module, Debug)]
pub struct FeedForward {
    /// LayerNorm before the block.
    pub layer_norm: LayerNorm,
    /// `W1`, `d_model -> d_ff`.
    pub dense: Linear,
    /// `W2`, `d_ff -> d_model`.
    pub output: Linear,
    /// Slice length along the sequence (0: the whole sequence at once).
    pub chunk_size: usize,
    /// Dropout probability `hidden_dropout_prob`.
    pub dropout: f64,
    #[module(skip)]
    activation: Activation,
    /// Epsilon of `layer_norm` (`layer_norm_eps`).
    #[module(skip)]
    layer_norm_eps: f64,
}

impl FeedForward {
    /// Creates the block from the model config.
    pub fn new(config: &ReformerConfig, rng: &mut StdRng, device: &Device) -> Self {
        Self {
            layer_norm: LayerNormConfig::new(config.hidden_size)
                .with_epsilon(config.layer_norm_eps)
                .init(device),
            dense: normal_linear(config.hidden_size, config.feed_forward_size, true, config.initializer_range, rng, device),
            output: normal_linear(config.feed_forward_size, config.hidden_size, true, config.initializer_range, rng, device),
            chunk_size: config.chunk_size_feed_forward,
            dropout: config.hidden_dropout_prob,
            activation: config.hidden_act,
            layer_norm_eps: config.layer_norm_eps,
        }
    }

    /// Runs the block, in slices of `chunk_size` positions when it is set: slicing bounds the
    /// `[batch_size, chunk_size, d_ff]` activation without changing the result in evaluation.
    /// In training each slice draws its own dropout mask.
    ///
    /// # Shapes
    /// - `x`: `[batch_size, seq_len, d_model]`
    /// - output: `[batch_size, seq_len, d_model]`
    pub fn forward(&self, x: Tensor<3>, layer: usize, ctx: &ForwardContext) -> Tensor<3> {
        let [_, seq_len, _] = x.dims();
        if self.chunk_size == 0 || self.chunk_size >= seq_len {
            return self.forward_slice(x, layer, ctx, 0);
        }
        let slices = x
            .split(self.chunk_size, 1)
            .into_iter()
            .enumerate()
            .map(|(index, slice)| self.forward_slice(slice, layer, ctx, index as u64 + 1))
            .collect();
        Tensor::cat(slices, 1)
    }

    fn forward_slice(&self, x: Tensor<3>, layer: usize, ctx: &ForwardContext, slice: u64) -> Tensor<3> {
        // Each slice draws its own dropout stream; `slice` 0 is the unsliced call.
        let ctx = if slice == 0 { ctx.clone() } else { ForwardContext { seed: crate::context::mix_seed(&[ctx.seed, slice]), ..ctx.clone() } };
        let h = linear::forward(&self.dense, norm::forward(&self.layer_norm, self.layer_norm_eps, x));
        let h = ctx.dropout(h, self.dropout, layer, RandomSite::FeedForwardInner);
        let h = match self.activation {
            Activation::Relu => activation::relu(h),
            Activation::Gelu => exact_gelu(h),
            Activation::GeluNew => activation::gelu_approximate(h),
            Activation::Silu => activation::silu(h),
        };
        let out = linear::forward(&self.output, h);
        ctx.dropout(out, self.dropout, layer, RandomSite::FeedForwardOutput)
    }
}

/// GELU with the exact erf form, `x * (1 + erf(x / sqrt(2))) / 2`, as PyTorch's default
/// `gelu`. It is built from `erf` because Burn 0.22's fused `gelu` differentiates the tanh
/// approximation, which put gradients 6e-4 (relative) away from PyTorch's.
fn exact_gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.clone() * ((x / std::f64::consts::SQRT_2).erf() + 1.0) * 0.5
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AttentionKind;
    use crate::testing::{assert_close, random_tensor, test_device, test_rng, values};

    #[test]
    fn chunked_equals_unchunked() {
        let config = ReformerConfig {
            attn_layers: vec![AttentionKind::Local],
            hidden_size: 32,
            num_attention_heads: 2,
            attention_head_size: 16,
            local_attn_chunk_length: 8,
            lsh_attn_chunk_length: 8,
            axial_pos_shape: vec![8, 8],
            axial_pos_embds_dim: vec![16, 16],
            max_position_embeddings: 64,
            feed_forward_size: 64,
            chunk_size_feed_forward: 0,
            vocab_size: 16,
            initializer_range: 0.5,
            ..ReformerConfig::default()
        };
        config.validate().expect("the test config is valid");
        let device = test_device();
        let mut block = FeedForward::new(&config, &mut test_rng(), &device);
        let x = random_tensor([2, 8, 32], 1, &device);
        let ctx = ForwardContext::eval(0);

        let whole = block.forward(x.clone(), 0, &ctx);
        // Slices of 3, 3 and 2 positions.
        block.chunk_size = 3;
        let chunked = block.forward(x, 0, &ctx);
        assert_eq!(chunked.dims(), whole.dims());
        assert_close(&values(chunked), &values(whole), 1e-5);
    }
}
