//! Parameter initialisation as Hugging Face's `ReformerPreTrainedModel._init_weights`:
//! weights from `N(0, initializer_range)`, biases zero, LayerNorm scale one and shift zero.

use burn::module::Param;
use burn::nn::{Initializer, Linear};
use burn::prelude::*;

/// Creates a `d_input -> d_output` linear layer with `N(0, std)` weights and zero bias.
pub fn normal_linear(d_input: usize, d_output: usize, bias: bool, std: f64, device: &Device) -> Linear {
    let weight = Initializer::Normal { mean: 0.0, std }.init([d_input, d_output], device);
    let bias = bias.then(|| Initializer::Zeros.init([d_output], device));
    Linear { weight, bias }
}

/// Creates a parameter of `shape` drawn from `N(0, std)`.
pub fn normal_param<const D: usize>(shape: [usize; D], std: f64, device: &Device) -> Param<Tensor<D>> {
    Initializer::Normal { mean: 0.0, std }.init(shape, device)
}
