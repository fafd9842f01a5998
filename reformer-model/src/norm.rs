//! Layer normalisation (Ba et al. 2016, "Layer Normalization") as one backend operation with
//! its own backward.
//!
//! Burn 0.22.1's autodiff differentiates `layer_norm` through its decomposition into mean,
//! variance, subtraction, division and affine steps, each a full pass that allocates a tensor,
//! so the backward of one `[2, 16384, 256]` normalisation took about four times its forward on
//! Flex (measured: 120 ms for forward and backward against 27 ms for the forward). Here the Flex backward recomputes each row's mean and inverse deviation and writes the
//! input gradient in one pass per row, with the scale and shift gradients summed per block of
//! rows. Other backends run Burn's `layer_norm` and its gradient formula as tensor operations.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients as GraphGradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, DispatchKindConversion, DispatchTensor, backend_extension};
use burn::nn::LayerNorm;
use burn::prelude::*;

/// Normalises the last axis of `x` with `layer`'s scale and shift and the given epsilon, as
/// `layer.forward(x)` does when `layer` was built with `epsilon`.
///
/// # Shapes
/// - `x`, output: `[..., d_model]`
pub fn forward<const D: usize>(layer: &LayerNorm, epsilon: f64, x: Tensor<D>) -> Tensor<D> {
    let dims = x.dims();
    let [d_model] = layer.gamma.dims();
    assert_eq!(dims[D - 1], d_model, "layer norm of width {d_model} applied to input of shape {dims:?}");
    let beta = layer.beta.as_ref().expect("the Reformer's layer norms have a shift (beta)");
    let rows = dims[..D - 1].iter().product();

    let x = x.reshape([rows, d_model]).into_dispatch();
    let out = <burn::backend::Dispatch as LayerNormOps>::layer_norm_forward(x, layer.gamma.val().into_dispatch(), beta.val().into_dispatch(), epsilon);
    Tensor::<2>::from_dispatch(out).reshape(dims)
}

/// Layer normalisation with scale and shift as a backend operation.
#[backend_extension(
    Autodiff,
    NdArray: cfg(feature = "ndarray"),
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "wgpu")
)]
pub trait LayerNormOps: Backend {
    /// Returns `(x - mean) / sqrt(var + epsilon) * gamma + beta` per row of `x` `[rows, d_model]`.
    fn layer_norm_forward(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self>;

    /// Returns the gradients of `x`, `gamma` and `beta`, given the gradient `grad` of the output.
    fn layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Forward with Burn's `layer_norm`, for backends without their own kernel.
fn composed_forward<B: Backend>(x: FloatTensor<B>, gamma: FloatTensor<B>, beta: FloatTensor<B>, epsilon: f64) -> FloatTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    let out = burn::tensor::module::layer_norm(
        Tensor::<2>::from_primitive::<B>(x),
        Tensor::<1>::from_primitive::<B>(gamma),
        Some(Tensor::<1>::from_primitive::<B>(beta)),
        epsilon,
    );
    out.try_into_primitive::<B>().expect("the output lives on the backend of the input")
}

/// Backward with tensor operations, for backends without their own kernel. With
/// `x_hat = (x - mean) * rstd` and `g = grad * gamma`:
/// `dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))`, `dgamma = sum(grad * x_hat)` and
/// `dbeta = sum(grad)` over rows.
fn composed_backward<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    grad: FloatTensor<B>,
    epsilon: f64,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>)
where
    DispatchTensor: DispatchKindConversion<B>,
{
    let x = Tensor::<2>::from_primitive::<B>(x);
    let gamma = Tensor::<1>::from_primitive::<B>(gamma);
    let grad = Tensor::<2>::from_primitive::<B>(grad);
    let [_, d_model] = x.dims();

    let (variance, mean) = x.clone().var_mean_bias(1);
    let rstd = (variance + epsilon).sqrt().recip();
    let x_hat = (x - mean) * rstd.clone();
    let g = grad.clone() * gamma.unsqueeze::<2>();
    let grad_x = rstd * (g.clone() - g.clone().mean_dim(1) - x_hat.clone() * (g * x_hat.clone()).mean_dim(1));
    let grad_gamma = (grad.clone() * x_hat).sum_dim(0).reshape([d_model]);
    let grad_beta = grad.sum_dim(0).reshape([d_model]);
    let primitive = |t: Tensor<1>| t.try_into_primitive::<B>().expect("gradients live on the backend of the input");
    (grad_x.try_into_primitive::<B>().expect("gradients live on the backend of the input"), primitive(grad_gamma), primitive(grad_beta))
}

/// Implements the operation with Burn's tensor operations, for backends without a kernel of
/// their own.
macro_rules! composed_backend {
    ($backend:ty) => {
        impl LayerNormOps for $backend {
            fn layer_norm_forward(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self> {
                composed_forward::<Self>(x, gamma, beta, epsilon)
            }

            fn layer_norm_backward(
                x: FloatTensor<Self>,
                gamma: FloatTensor<Self>,
                grad: FloatTensor<Self>,
                epsilon: f64,
            ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
                composed_backward::<Self>(x, gamma, grad, epsilon)
            }
        }
    };
}

#[cfg(feature = "ndarray")]
composed_backend!(burn::backend::NdArray);
#[cfg(feature = "wgpu")]
composed_backend!(burn::backend::Cube);

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Flex, TensorMetadata};
    use rayon::prelude::*;

    use super::LayerNormOps;
    use crate::host::{add_assign, contiguous, tensor, values};

    /// Rows per parallel task, and per partial sum of the scale and shift gradients.
    const BLOCK_ROWS: usize = 256;

    impl LayerNormOps for Flex {
        fn layer_norm_forward(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self> {
            let [rows, d_model] = x.shape().dims::<2>();
            let (x, gamma, beta) = (contiguous(&x), contiguous(&gamma), contiguous(&beta));
            let (x_values, gamma, beta) = (values(&x), values(&gamma), values(&beta));
            let mut out = vec![0f32; rows * d_model];
            out.par_chunks_mut(BLOCK_ROWS * d_model).zip(x_values.par_chunks(BLOCK_ROWS * d_model)).for_each(|(out, x)| {
                kernels::forward_rows(out, x, gamma, beta, epsilon as f32);
            });
            tensor(out, vec![rows, d_model])
        }

        fn layer_norm_backward(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            epsilon: f64,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            let [rows, d_model] = x.shape().dims::<2>();
            let (x, gamma, grad) = (contiguous(&x), contiguous(&gamma), contiguous(&grad));
            let (x_values, gamma, grad) = (values(&x), values(&gamma), values(&grad));
            let block = BLOCK_ROWS * d_model;
            let mut grad_x = vec![0f32; rows * d_model];
            // Each block of rows writes its input gradients and returns its [dgamma, dbeta] sums.
            let partial: Vec<Vec<f32>> = grad_x
                .par_chunks_mut(block)
                .zip(x_values.par_chunks(block))
                .zip(grad.par_chunks(block))
                .map(|((grad_x, x), grad)| {
                    let mut sums = vec![0f32; 2 * d_model];
                    kernels::backward_rows(grad_x, &mut sums, x, grad, gamma, epsilon as f32);
                    sums
                })
                .collect();
            let mut sums = vec![0f32; 2 * d_model];
            for part in &partial {
                add_assign(&mut sums, part);
            }
            let grad_beta = sums.split_off(d_model);
            (tensor(grad_x, vec![rows, d_model]), tensor(sums, vec![d_model]), tensor(grad_beta, vec![d_model]))
        }
    }

    /// The row loops, compiled for AVX-512, for AVX2 with FMA and without either; the one the CPU
    /// supports is picked at run time.
    mod kernels {
        use crate::host::{dispatch_simd, lane_dot, lane_sum};

        dispatch_simd! {
            /// Normalises each row of `x` (`[rows, d_model]`) into `out`.
            pub(super) fn forward_rows(out: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], epsilon: f32) => forward_portable
        }

        dispatch_simd! {
            /// Writes each row's input gradient into `grad_x` and adds the scale and shift
            /// gradients into `sums` (`[dgamma; dbeta]`, `2 * d_model`).
            pub(super) fn backward_rows(grad_x: &mut [f32], sums: &mut [f32], x: &[f32], grad: &[f32], gamma: &[f32], epsilon: f32) => backward_portable
        }

        #[inline(always)]
        fn forward_portable(out: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], epsilon: f32) {
            let d_model = gamma.len();
            for (out, x) in out.chunks_exact_mut(d_model).zip(x.chunks_exact(d_model)) {
                let (mean, rstd) = moments(x, epsilon);
                for (((y, &x), &g), &b) in out.iter_mut().zip(x).zip(gamma).zip(beta) {
                    *y = (x - mean) * rstd * g + b;
                }
            }
        }

        /// With `x_hat = (x - mean) * rstd` and `g = grad * gamma`:
        /// `dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))`.
        #[inline(always)]
        fn backward_portable(grad_x: &mut [f32], sums: &mut [f32], x: &[f32], grad: &[f32], gamma: &[f32], epsilon: f32) {
            let d_model = gamma.len();
            let (grad_gamma, grad_beta) = sums.split_at_mut(d_model);
            let mut x_hat = vec![0f32; d_model];
            let mut scaled = vec![0f32; d_model];
            for ((grad_x, x), grad) in grad_x.chunks_exact_mut(d_model).zip(x.chunks_exact(d_model)).zip(grad.chunks_exact(d_model)) {
                let (mean, rstd) = moments(x, epsilon);
                for ((((h, s), &x), &dy), &g) in x_hat.iter_mut().zip(scaled.iter_mut()).zip(x).zip(grad).zip(gamma) {
                    *h = (x - mean) * rstd;
                    *s = dy * g;
                }
                let mean_scaled = lane_sum(&scaled, |s| s) / d_model as f32;
                let mean_scaled_x_hat = lane_dot(&scaled, &x_hat) / d_model as f32;
                for (((((dx, &h), &s), &dy), dg), db) in
                    grad_x.iter_mut().zip(&x_hat).zip(&scaled).zip(grad).zip(grad_gamma.iter_mut()).zip(grad_beta.iter_mut())
                {
                    *dx = rstd * (s - mean_scaled - h * mean_scaled_x_hat);
                    *dg += dy * h;
                    *db += dy;
                }
            }
        }

        /// Returns a row's mean and inverse standard deviation `1 / sqrt(var + epsilon)`, with the
        /// biased variance.
        #[inline(always)]
        fn moments(row: &[f32], epsilon: f32) -> (f32, f32) {
            let n = row.len() as f32;
            let mean = lane_sum(row, |x| x) / n;
            let variance = lane_sum(row, |x| (x - mean) * (x - mean)) / n;
            (mean, 1.0 / (variance + epsilon).sqrt())
        }
    }
}

impl<B, C> LayerNormOps for Autodiff<B, C>
where
    B: Backend + LayerNormOps,
    C: CheckpointStrategy,
{
    fn layer_norm_forward(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self> {
        let (x, x_node) = x.into_parts();
        let (gamma, gamma_node) = gamma.into_parts();
        let (beta, beta_node) = beta.into_parts();
        match LayerNormBackward.prepare::<C>([x_node, gamma_node, beta_node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let output = B::layer_norm_forward(x.clone(), gamma.clone(), beta, epsilon);
                prep.finish(LayerNormState { x, gamma, epsilon }, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::layer_norm_forward(x, gamma, beta, epsilon)),
        }
    }

    fn layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        // Only the node below calls the backward, on the inner backend; a call here is not
        // differentiated again.
        let inner = |t| <Self as AutodiffBackend>::inner(t);
        let outer = |t| <Self as AutodiffBackend>::from_inner(t);
        let (dx, dgamma, dbeta) = B::layer_norm_backward(inner(x), inner(gamma), inner(grad), epsilon);
        (outer(dx), outer(dgamma), outer(dbeta))
    }
}

/// State of the node: the input, the scale and the epsilon.
#[derive(Clone, Debug)]
struct LayerNormState<B: Backend> {
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    epsilon: f64,
}

/// The layer norm node: parents `x`, `gamma` and `beta`.
#[derive(Debug)]
struct LayerNormBackward;

impl<B: Backend + LayerNormOps> Backward<B, 3> for LayerNormBackward {
    type State = LayerNormState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut GraphGradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let LayerNormState { x, gamma, epsilon } = ops.state;
        let (dx, dgamma, dbeta) = B::layer_norm_backward(x, gamma, grad, epsilon);
        for (parent, gradient) in ops.parents.into_iter().zip([dx, dgamma, dbeta]) {
            if let Some(parent) = parent {
                grads.register::<B>(parent.id, gradient);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::nn::LayerNormConfig;

    use super::*;
    use crate::testing::{random_tensor, test_device, values};

    const EPSILON: f64 = 1e-12;

    fn layer(device: &Device) -> LayerNorm {
        let mut layer = LayerNormConfig::new(24).with_epsilon(EPSILON).init(device);
        // Scale and shift away from 1 and 0, so that a misplaced one shows.
        let shifted = |t: Tensor<1>, seed: u64, scale: f64| {
            let shifted = (t.clone() + random_tensor([24], seed, &t.device()) * scale).detach();
            if shifted.is_autodiff() { shifted.require_grad() } else { shifted }
        };
        layer.gamma = layer.gamma.map(|g| shifted(g, 4, 0.3));
        layer.beta = layer.beta.map(|b| b.map(|b| shifted(b, 5, 1.0)));
        layer
    }

    fn assert_relative(label: &str, actual: &[f32], expected: &[f32]) {
        assert_eq!(actual.len(), expected.len(), "{label}: length");
        let scale = expected.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            assert!((a - e).abs() <= 1e-5 * scale, "{label}: index {i}: {a} vs {e}");
        }
    }

    #[test]
    fn forward_matches_burn_layer_norm() {
        let device = test_device();
        let layer = layer(&device);
        let x = random_tensor([3, 5, 24], 1, &device) * 2.0 + 0.5;
        assert_relative("forward", &values(forward(&layer, EPSILON, x.clone())), &values(layer.forward(x)));
    }

    #[test]
    fn gradients_match_burn_layer_norm() {
        let device = test_device().autodiff();
        let layer = layer(&device);
        let x = (random_tensor([3, 7, 24], 2, &device) * 2.0 + 0.5).require_grad();
        let weights = random_tensor([3, 7, 24], 3, &device);
        let grads_of = |out: Tensor<3>| {
            let grads = (out * weights.clone()).sum().backward();
            let beta = layer.beta.as_ref().expect("beta");
            [
                values(x.grad(&grads).expect("x gradient")),
                values(layer.gamma.val().grad(&grads).expect("gamma gradient")),
                values(beta.val().grad(&grads).expect("beta gradient")),
            ]
        };
        let expected = grads_of(layer.forward(x.clone()));
        let actual = grads_of(forward(&layer, EPSILON, x.clone()));
        for (name, (a, e)) in ["x", "gamma", "beta"].iter().zip(actual.iter().zip(&expected)) {
            assert_relative(&format!("d{name}"), a, e);
        }
    }
}
