//! Linear layers (`y = x W + b`) as one backend operation with its own backward.
//!
//! Burn's `Linear::forward` is a matrix product followed by a bias addition. On the Flex backend
//! (Burn 0.22.1) every matrix product allocates its output zero-filled and then copies it into
//! an aligned buffer, and the bias addition makes one more full-size tensor. For the
//! `[tokens, d_ff]` activations of a long sequence that is two extra passes over tens of
//! megabytes per layer, in the forward and again in the backward. On Flex this operation writes
//! the bias into a fresh buffer and lets the matrix product add to it. Its backward computes
//! the input and weight gradients with one matrix product each and the bias gradient as a
//! column sum. Other backends run Burn's own operations.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients as GraphGradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, DispatchKindConversion, DispatchTensor, backend_extension};
use burn::nn::Linear;
use burn::prelude::*;

/// Applies `layer` to the last axis of `x`, as `layer.forward(x)` does.
///
/// # Shapes
/// - `x`: `[..., d_input]`
/// - output: `[..., d_output]`
pub fn forward<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let dims = x.dims();
    let [d_input, d_output] = layer.weight.dims();
    assert_eq!(dims[D - 1], d_input, "linear layer of width {d_input} applied to input of shape {dims:?}");
    let rows = dims[..D - 1].iter().product();

    let x = x.reshape([rows, d_input]).into_dispatch();
    let weight = layer.weight.val().into_dispatch();
    let out = match &layer.bias {
        Some(bias) => <burn::backend::Dispatch as LinearOps>::linear_forward_with_bias(x, weight, bias.val().into_dispatch()),
        None => <burn::backend::Dispatch as LinearOps>::linear_forward(x, weight),
    };
    let out = Tensor::<2>::from_dispatch(out);

    let mut out_dims = dims;
    out_dims[D - 1] = d_output;
    out.reshape(out_dims)
}

/// The linear layer as a backend operation.
#[backend_extension(
    Autodiff,
    NdArray: cfg(feature = "ndarray"),
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "wgpu")
)]
pub trait LinearOps: Backend {
    /// Returns `x W` for `x` `[rows, d_input]` and `weight` `[d_input, d_output]`.
    fn linear_forward(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;

    /// Returns `x W + b`, with `bias` `[d_output]`.
    fn linear_forward_with_bias(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self>;

    /// Returns the gradients of `x`, `weight` and (when `with_bias`) the bias, given the
    /// gradient `grad` (`[rows, d_output]`) of the output.
    fn linear_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        with_bias: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, Option<FloatTensor<Self>>);
}

/// Forward with Burn's tensor operations, for backends without their own kernel.
fn composed_forward<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, bias: Option<FloatTensor<B>>) -> FloatTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    let out = Tensor::<2>::from_primitive::<B>(x).matmul(Tensor::<2>::from_primitive::<B>(weight));
    let out = match bias {
        Some(bias) => out + Tensor::<1>::from_primitive::<B>(bias).unsqueeze::<2>(),
        None => out,
    };
    out.try_into_primitive::<B>().expect("the output lives on the backend of the input")
}

/// Backward with Burn's tensor operations, for backends without their own kernel.
fn composed_backward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    grad: FloatTensor<B>,
    with_bias: bool,
) -> (FloatTensor<B>, FloatTensor<B>, Option<FloatTensor<B>>)
where
    DispatchTensor: DispatchKindConversion<B>,
{
    let x = Tensor::<2>::from_primitive::<B>(x);
    let weight = Tensor::<2>::from_primitive::<B>(weight);
    let grad = Tensor::<2>::from_primitive::<B>(grad);
    let primitive = |t: Tensor<2>| t.try_into_primitive::<B>().expect("gradients live on the backend of the input");
    let grad_bias = with_bias.then(|| {
        let [_, d_output] = grad.dims();
        grad.clone().sum_dim(0).reshape([d_output]).try_into_primitive::<B>().expect("gradients live on the backend of the input")
    });
    (primitive(grad.clone().matmul(weight.transpose())), primitive(x.transpose().matmul(grad)), grad_bias)
}

/// Implements the operation with Burn's tensor operations, for backends without a kernel of
/// their own.
macro_rules! composed_backend {
    ($backend:ty) => {
        impl LinearOps for $backend {
            fn linear_forward(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
                composed_forward::<Self>(x, weight, None)
            }

            fn linear_forward_with_bias(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
                composed_forward::<Self>(x, weight, Some(bias))
            }

            fn linear_backward(
                x: FloatTensor<Self>,
                weight: FloatTensor<Self>,
                grad: FloatTensor<Self>,
                with_bias: bool,
            ) -> (FloatTensor<Self>, FloatTensor<Self>, Option<FloatTensor<Self>>) {
                composed_backward::<Self>(x, weight, grad, with_bias)
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
    use burn_flex::FlexTensor;
    use rayon::prelude::*;

    use super::LinearOps;
    use crate::host::{Operand, add_assign, contiguous, matmul, tensor, values};

    /// Products with at least this many multiply-adds split across threads; smaller ones (a
    /// decoding step's single row) run on the calling thread.
    const PARALLEL_WORK: usize = 1 << 18;

    /// Rows per partial sum of the bias gradient.
    const BIAS_ROWS: usize = 1024;

    fn forward(x: FlexTensor, weight: FlexTensor, bias: Option<FlexTensor>) -> FlexTensor {
        let [rows, d_input] = x.shape().dims::<2>();
        let [_, d_output] = weight.shape().dims::<2>();
        let (x, weight) = (contiguous(&x), contiguous(&weight));

        // The bias goes into the output buffer first and the product is added to it.
        let mut out = match &bias {
            Some(bias) => {
                let bias = contiguous(bias);
                values(&bias).repeat(rows)
            }
            None => vec![0.0; rows * d_output],
        };
        let parallel = rows * d_output * d_input >= PARALLEL_WORK;
        let (x, weight) = (Operand::rows(values(&x), d_input), Operand::rows(values(&weight), d_output));
        matmul([rows, d_output, d_input], &mut out, d_output, bias.is_some(), x, weight, parallel);
        tensor(out, vec![rows, d_output])
    }

    impl LinearOps for Flex {
        fn linear_forward(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
            forward(x, weight, None)
        }

        fn linear_forward_with_bias(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
            forward(x, weight, Some(bias))
        }

        fn linear_backward(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            with_bias: bool,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, Option<FloatTensor<Self>>) {
            let [rows, d_input] = x.shape().dims::<2>();
            let [_, d_output] = weight.shape().dims::<2>();
            let (x, weight, grad) = (contiguous(&x), contiguous(&weight), contiguous(&grad));
            let (x, weight, grad) = (values(&x), values(&weight), values(&grad));

            // dx = grad · W^T and dW = x^T · grad.
            let mut grad_x = vec![0.0; rows * d_input];
            let parallel = rows * d_output * d_input >= PARALLEL_WORK;
            matmul([rows, d_input, d_output], &mut grad_x, d_input, false, Operand::rows(grad, d_output), Operand::transposed(weight, d_output), parallel);
            let mut grad_weight = vec![0.0; d_input * d_output];
            matmul([d_input, d_output, rows], &mut grad_weight, d_output, false, Operand::transposed(x, d_input), Operand::rows(grad, d_output), parallel);

            // db = column sums of grad, in blocks of rows summed in parallel.
            let grad_bias = with_bias.then(|| {
                let partial: Vec<Vec<f32>> = grad
                    .par_chunks(BIAS_ROWS * d_output)
                    .map(|block| {
                        let mut sums = vec![0f32; d_output];
                        for row in block.chunks_exact(d_output) {
                            add_assign(&mut sums, row);
                        }
                        sums
                    })
                    .collect();
                let mut sums = vec![0f32; d_output];
                for block in &partial {
                    add_assign(&mut sums, block);
                }
                tensor(sums, vec![d_output])
            });
            (tensor(grad_x, vec![rows, d_input]), tensor(grad_weight, vec![d_input, d_output]), grad_bias)
        }
    }
}

impl<B, C> LinearOps for Autodiff<B, C>
where
    B: Backend + LinearOps,
    C: CheckpointStrategy,
{
    fn linear_forward(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x, x_node) = x.into_parts();
        let (weight, weight_node) = weight.into_parts();
        match LinearBackward.prepare::<C>([x_node, weight_node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let output = B::linear_forward(x.clone(), weight.clone());
                prep.finish(LinearState { x, weight }, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::linear_forward(x, weight)),
        }
    }

    fn linear_forward_with_bias(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x, x_node) = x.into_parts();
        let (weight, weight_node) = weight.into_parts();
        let (bias, bias_node) = bias.into_parts();
        match LinearBackward.prepare::<C>([x_node, weight_node, bias_node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let output = B::linear_forward_with_bias(x.clone(), weight.clone(), bias);
                prep.finish(LinearState { x, weight }, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::linear_forward_with_bias(x, weight, bias)),
        }
    }

    fn linear_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        with_bias: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, Option<FloatTensor<Self>>) {
        // Only the node below calls the backward, on the inner backend; a call here is not
        // differentiated again.
        let inner = |t| <Self as AutodiffBackend>::inner(t);
        let outer = |t| <Self as AutodiffBackend>::from_inner(t);
        let (dx, dw, db) = B::linear_backward(inner(x), inner(weight), inner(grad), with_bias);
        (outer(dx), outer(dw), db.map(outer))
    }
}

/// State of the node: the input and the weight.
#[derive(Clone, Debug)]
struct LinearState<B: Backend> {
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
}

/// The linear node: parents `x`, `weight` and, with `N = 3`, the bias.
#[derive(Debug)]
struct LinearBackward;

impl<B: Backend + LinearOps, const N: usize> Backward<B, N> for LinearBackward {
    type State = LinearState<B>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut GraphGradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let LinearState { x, weight } = ops.state;
        let (dx, dw, db) = B::linear_backward(x, weight, grad, N == 3);
        for (parent, gradient) in ops.parents.into_iter().zip([Some(dx), Some(dw), db]) {
            if let (Some(parent), Some(gradient)) = (parent, gradient) {
                grads.register::<B>(parent.id, gradient);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::nn::LinearConfig;

    use super::*;
    use crate::testing::{random_tensor, test_device, values};

    fn assert_relative(label: &str, actual: &[f32], expected: &[f32]) {
        assert_eq!(actual.len(), expected.len(), "{label}: length");
        let scale = expected.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            assert!((a - e).abs() <= 1e-5 * scale, "{label}: index {i}: {a} vs {e}");
        }
    }

    #[test]
    fn forward_matches_burn_linear() {
        let device = test_device();
        for bias in [true, false] {
            let layer = LinearConfig::new(24, 40).with_bias(bias).init(&device);
            let x = random_tensor([3, 5, 24], 1, &device);
            assert_relative(&format!("bias {bias}"), &values(forward(&layer, x.clone())), &values(layer.forward(x)));
        }
    }

    #[test]
    fn gradients_match_burn_linear() {
        let device = test_device().autodiff();
        for bias in [true, false] {
            let layer = LinearConfig::new(24, 40).with_bias(bias).init(&device);
            let x = random_tensor([3, 7, 24], 2, &device).require_grad();
            let weights = random_tensor([3, 7, 40], 3, &device);
            let grads_of = |out: Tensor<3>| {
                let grads = (out * weights.clone()).sum().backward();
                let mut all = vec![values(x.grad(&grads).expect("x gradient")), values(layer.weight.val().grad(&grads).expect("weight gradient"))];
                if let Some(b) = &layer.bias {
                    all.push(values(b.val().grad(&grads).expect("bias gradient")));
                }
                all
            };
            let expected = grads_of(layer.forward(x.clone()));
            let actual = grads_of(forward(&layer, x.clone()));
            for (name, (a, e)) in ["x", "weight", "bias"].iter().zip(actual.iter().zip(&expected)) {
                assert_relative(&format!("bias {bias}: d{name}"), a, e);
            }
        }
    }
}
