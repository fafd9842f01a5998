//! Parameter initialisation as Hugging Face's `ReformerPreTrainedModel._init_weights`:
//! weights from `N(0, initializer_range)`, biases zero, LayerNorm scale one and shift zero.
//!
//! Weights are drawn on the host from a generator seeded by the caller, not from the device's
//! generator: the same seed then gives the same model on every backend, and models built at the
//! same time on several threads (parallel tests) cannot interleave their draws.

use burn::module::Param;
use burn::nn::{Initializer, Linear};
use burn::prelude::*;
use burn::tensor::TensorData;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

/// Creates a `d_input -> d_output` linear layer with `N(0, std)` weights and zero bias.
pub fn normal_linear(d_input: usize, d_output: usize, bias: bool, std: f64, rng: &mut StdRng, device: &Device) -> Linear {
    let weight = normal_param([d_input, d_output], std, rng, device);
    let bias = bias.then(|| Initializer::Zeros.init([d_output], device));
    Linear { weight, bias }
}

/// Creates a parameter of `shape` drawn from `N(0, std)`.
pub fn normal_param<const D: usize>(shape: [usize; D], std: f64, rng: &mut StdRng, device: &Device) -> Param<Tensor<D>> {
    let normal = Normal::new(0.0f32, std as f32).expect("standard deviations are validated as finite and positive");
    let values: Vec<f32> = (0..shape.iter().product()).map(|_| normal.sample(rng)).collect();
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}
