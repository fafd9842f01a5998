//! Reversible residual layers as one custom node on Burn's autodiff graph (Kitaev et al. 2020,
//! section 3; Gomez et al. 2017).
//!
//! A Reformer layer maps `(U, Z)` to `(U' = U + Attn(Z), Z' = Z + FF(U'))`, which can be
//! inverted: `Z = Z' - FF(U')`, then `U = U' - Attn(Z)`. The node below runs all layers
//! without recording them and keeps only the last layer's output. Its backward walks the
//! layers in reverse. For each layer it rebuilds the inputs from the outputs and runs a nested
//! forward and backward of that one layer, so activation memory stays that of one layer
//! whatever the depth.
//!
//! How the node sits on Burn 0.22's autodiff graph:
//! - [`ReversibleOps`] is a backend extension: one implementation per compiled backend runs the
//!   layers plainly, and the one for `Autodiff<B, C>` registers the node.
//! - The nested passes use copies of the parameters on fresh autodiff leaves. They must never
//!   touch a tensor of the outer graph, whose lock is held during backward.
//! - Parameter gradients are registered in the outer gradients under each parameter's own node
//!   id, where the optimizer looks for them. A parameter also used outside the stack gets the
//!   sum of both contributions.
//! - A node has a fixed number of parents, so the parameters are tied in as ancestors by a
//!   chain of one-element anchor nodes. This keeps the node on the graph when its input is not
//!   tracked (frozen embeddings).
//! - The recomputation replays the forward's randomness: dropout masks and rotations come from
//!   the same host streams, and LSH bucket ids are stored by the forward and reused, so a
//!   recomputed input that differs by rounding cannot change a bucket.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients as GraphGradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{
    Autodiff, AutodiffBackend, Backend, DispatchKindConversion, DispatchTensor, FloatDType, TensorMetadata,
    backend_extension,
};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use burn::tensor::Gradients;

use crate::context::{BucketMemo, ForwardContext, KeyMask};
use crate::model::{ReformerLayer, run_layers};

/// The layers and per-call inputs of one pass through the reversible stack.
#[derive(Clone, Debug)]
pub struct ReversibleStack {
    layers: Vec<ReformerLayer>,
    mask: Option<KeyMask>,
    ctx: ForwardContext,
}

impl ReversibleStack {
    /// Runs the layers on `x` without recording anything and returns `concat(U, Z)`.
    ///
    /// # Shapes
    /// - `x`: `[batch_size, seq_len, d_model]`
    /// - output: `[batch_size, seq_len, 2 * d_model]`
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        run_layers(&self.layers, x, self.mask.as_ref(), &self.ctx)
            .expect("rotations are checked before the reversible node runs")
    }
}

/// Runs `layers` on `x` through the reversible node and returns `concat(U, Z)`. `x` must be on
/// an autodiff device; given rotations must have been checked for this call.
///
/// # Shapes
/// - `x`: `[batch_size, seq_len, d_model]`
/// - output: `[batch_size, seq_len, 2 * d_model]`
pub(crate) fn reversible_layers(
    layers: &[ReformerLayer],
    x: Tensor<3>,
    mask: Option<&KeyMask>,
    ctx: &ForwardContext,
) -> Tensor<3> {
    let stack = ReversibleStack { layers: layers.to_vec(), mask: mask.cloned(), ctx: ctx.clone() };
    Tensor::from_dispatch(<burn::backend::Dispatch as ReversibleOps>::reversible_layers(x.into_dispatch(), stack))
}

/// The reversible stack as a backend operation.
#[backend_extension(
    Autodiff,
    NdArray: cfg(feature = "ndarray"),
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "wgpu")
)]
pub trait ReversibleOps: Backend {
    /// Runs the stack on `x` (`[batch_size, seq_len, d_model]`) and returns `concat(U, Z)`
    /// (`[batch_size, seq_len, 2 * d_model]`).
    fn reversible_layers(x: FloatTensor<Self>, stack: ReversibleStack) -> FloatTensor<Self>;
}

/// Runs the stack plainly: the implementation of every backend without autodiff. Its only
/// caller, the `Autodiff` implementation, passes layers already stripped of autodiff.
fn run_plain<B: Backend>(x: FloatTensor<B>, stack: ReversibleStack) -> FloatTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    stack
        .forward(Tensor::from_primitive::<B>(x))
        .try_into_primitive::<B>()
        .expect("the stack's output lives on the backend of its input")
}

#[cfg(feature = "ndarray")]
impl ReversibleOps for burn::backend::NdArray {
    fn reversible_layers(x: FloatTensor<Self>, stack: ReversibleStack) -> FloatTensor<Self> {
        run_plain::<Self>(x, stack)
    }
}

#[cfg(feature = "flex")]
impl ReversibleOps for burn::backend::Flex {
    fn reversible_layers(x: FloatTensor<Self>, stack: ReversibleStack) -> FloatTensor<Self> {
        run_plain::<Self>(x, stack)
    }
}

#[cfg(feature = "wgpu")]
impl ReversibleOps for burn::backend::Cube {
    fn reversible_layers(x: FloatTensor<Self>, stack: ReversibleStack) -> FloatTensor<Self> {
        run_plain::<Self>(x, stack)
    }
}

impl<B, C> ReversibleOps for Autodiff<B, C>
where
    B: Backend + ReversibleOps,
    C: CheckpointStrategy,
    DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B, C>>,
{
    fn reversible_layers(x: FloatTensor<Self>, stack: ReversibleStack) -> FloatTensor<Self> {
        let mut params = CollectParamNodes::<B, C> { ids: HashMap::new(), tensors: Vec::new() };
        for layer in &stack.layers {
            layer.visit(&mut params);
        }
        let device = x.primitive().device();
        let anchor = anchor_chain::<B, C>(params.tensors, &device);
        let (x, input_guard) = x.into_parts();
        let (_, anchor_guard) = anchor.into_parts();

        // The forward fills the memo with bucket ids; the backward reads them back.
        let stack = ReversibleStack {
            layers: stack.layers.into_iter().map(|layer| layer.map(&mut StripAutodiff)).collect(),
            ctx: ForwardContext { buckets: Some(Arc::new(BucketMemo::default())), ..stack.ctx },
            ..stack
        };
        match ReversibleBackward.prepare::<C>([input_guard, anchor_guard]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let output = B::reversible_layers(x, stack.clone());
                prep.finish(ReversibleState { output: output.clone(), stack, param_nodes: params.ids }, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::reversible_layers(x, stack)),
        }
    }
}

/// State kept for the backward: the stack's output (the only activation), the layers with
/// parameters stripped of autodiff (shared buffers, not copies) and the outer node of each
/// trainable parameter.
#[derive(Clone, Debug)]
struct ReversibleState<B: Backend> {
    output: FloatTensor<B>,
    stack: ReversibleStack,
    param_nodes: HashMap<ParamId, NodeId>,
}

/// The reversible node. Parent 0 is the stack's input, parent 1 the end of the anchor chain.
#[derive(Debug)]
struct ReversibleBackward;

impl<B: Backend> Backward<B, 2> for ReversibleBackward
where
    DispatchTensor: DispatchKindConversion<B>,
{
    type State = ReversibleState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut GraphGradients, _checkpointer: &mut Checkpointer) {
        let [input, anchor] = ops.parents;
        if let Some(anchor) = anchor {
            // The anchors only pass this token along; they carry no gradient.
            let token = B::float_zeros([1].into(), &ops.state.output.device(), FloatDType::F32);
            grads.register::<B>(anchor.id, token);
        }
        let grad_output = Tensor::<3>::from_primitive::<B>(grads.consume::<B>(&ops.node));
        let ReversibleState { output, stack, param_nodes } = ops.state;
        let output = Tensor::<3>::from_primitive::<B>(output);

        let [_, _, two_d_model] = output.dims();
        let [mut u, mut z] = halves(output, two_d_model / 2);
        let [mut grad_u, mut grad_z] = halves(grad_output, two_d_model / 2);
        for (index, layer) in stack.layers.iter().enumerate().rev() {
            (u, z, grad_u, grad_z) = layer_backward::<B>(layer, index, &stack, &param_nodes, [u, z, grad_u, grad_z], grads);
        }

        if let Some(input) = input {
            // The input fed both streams: U = Z = x.
            let grad_input = (grad_u + grad_z).try_into_primitive::<B>().expect("gradient on the inner backend");
            grads.register::<B>(input.id, grad_input);
        }
    }
}

/// Back-propagates through one layer from its outputs.
///
/// Takes `[U', Z', dU', dZ']` and returns `(U, Z, dU, dZ)`: the layer's inputs rebuilt from its
/// outputs and the gradients with respect to them. Parameter gradients go to `outer`.
fn layer_backward<B: Backend>(
    layer: &ReformerLayer,
    index: usize,
    stack: &ReversibleStack,
    param_nodes: &HashMap<ParamId, NodeId>,
    [u_out, z_out, grad_u_out, grad_z_out]: [Tensor<3>; 4],
    outer: &mut GraphGradients,
) -> (Tensor<3>, Tensor<3>, Tensor<3>, Tensor<3>)
where
    DispatchTensor: DispatchKindConversion<B>,
{
    let ctx = &stack.ctx;

    // Z' = Z + FF(U'): recompute FF(U') and back-propagate dZ' through it.
    let feed_forward = layer.feed_forward.clone().map(&mut FreshLeaves(param_nodes));
    let u_leaf = u_out.clone().autodiff().require_grad();
    let ff_out = feed_forward.forward(u_leaf.clone(), index, ctx);
    let z = z_out - ff_out.clone().inner();
    let nested = (ff_out * grad_z_out.clone()).sum().backward();
    let grad_u = grad_u_out + u_leaf.grad(&nested).expect("the leaf requires a gradient");
    feed_forward.visit(&mut TransferGrads::<B> { nested: &nested, outer, param_nodes, _backend: PhantomData });
    drop(nested);

    // U' = U + Attn(Z): recompute Attn(Z) and back-propagate dU through it.
    let attention = layer.attention.clone().map(&mut FreshLeaves(param_nodes));
    let z_leaf = z.clone().autodiff().require_grad();
    let attn_out = attention
        .forward(z_leaf.clone(), stack.mask.as_ref(), index, ctx)
        .expect("rotations are checked before the reversible node runs");
    let u = u_out - attn_out.clone().inner();
    let nested = (attn_out * grad_u.clone()).sum().backward();
    let grad_z = grad_z_out + z_leaf.grad(&nested).expect("the leaf requires a gradient");
    attention.visit(&mut TransferGrads::<B> { nested: &nested, outer, param_nodes, _backend: PhantomData });

    (u, z, grad_u, grad_z)
}

/// Splits `[batch_size, seq_len, 2 * d_model]` into its two streams.
fn halves(x: Tensor<3>, d_model: usize) -> [Tensor<3>; 2] {
    let [batch_size, seq_len, _] = x.dims();
    [
        x.clone().slice([0..batch_size, 0..seq_len, 0..d_model]),
        x.slice([0..batch_size, 0..seq_len, d_model..2 * d_model]),
    ]
}

/// Moves the nested gradients of a block's fresh parameters into the outer gradients, keyed by
/// the outer node of the same parameter.
struct TransferGrads<'a, B> {
    nested: &'a Gradients,
    outer: &'a mut GraphGradients,
    param_nodes: &'a HashMap<ParamId, NodeId>,
    _backend: PhantomData<B>,
}

impl<B: Backend> ModuleVisitor for TransferGrads<'_, B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(&node) = self.param_nodes.get(&param.id) else { return };
        let Some(grad) = param.val().grad(self.nested) else { return };
        let grad = grad.try_into_primitive::<B>().expect("gradient on the inner backend");
        self.outer.register::<B>(node, grad);
    }
}

/// Removes the autodiff association of every parameter, keeping its id and buffer.
struct StripAutodiff;

impl ModuleMapper for StripAutodiff {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|tensor| tensor.inner())
    }
}

/// Puts every parameter on a fresh autodiff leaf of its own graph; trainable ones (those with
/// an outer node) require a gradient.
struct FreshLeaves<'a>(&'a HashMap<ParamId, NodeId>);

impl ModuleMapper for FreshLeaves<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        // The stripped copy reports `is_require_grad` false, so trainability comes from the map.
        let trainable = self.0.contains_key(&param.id);
        param.map(|tensor| {
            let leaf = tensor.inner().autodiff();
            if trainable { leaf.require_grad() } else { leaf }
        })
    }
}

/// Collects the outer node id and tensor of every trainable parameter.
struct CollectParamNodes<B: Backend, C: CheckpointStrategy> {
    ids: HashMap<ParamId, NodeId>,
    tensors: Vec<FloatTensor<Autodiff<B, C>>>,
}

impl<B: Backend, C: CheckpointStrategy> ModuleVisitor for CollectParamNodes<B, C>
where
    DispatchTensor: DispatchKindConversion<Autodiff<B, C>>,
{
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor = param.val();
        if !tensor.is_require_grad() {
            return;
        }
        let primitive = tensor
            .try_into_primitive::<Autodiff<B, C>>()
            .expect("the parameters live on the autodiff backend of the stack's input");
        self.ids.insert(param.id, primitive.id());
        self.tensors.push(primitive);
    }
}

/// First anchor of the chain: one parameter as parent.
#[derive(Debug)]
struct FirstAnchor;

impl<B: Backend> Backward<B, 1> for FirstAnchor {
    type State = ();

    fn backward(self, ops: Ops<(), 1>, grads: &mut GraphGradients, _checkpointer: &mut Checkpointer) {
        // The parameter's gradient is registered by the reversible node; drop the token.
        let _ = grads.consume::<B>(&ops.node);
    }
}

/// Later anchors: one parameter and the previous anchor as parents.
#[derive(Debug)]
struct Anchor;

impl<B: Backend> Backward<B, 2> for Anchor {
    type State = ();

    fn backward(self, ops: Ops<(), 2>, grads: &mut GraphGradients, _checkpointer: &mut Checkpointer) {
        let token = grads.consume::<B>(&ops.node);
        if let Some(previous) = &ops.parents[1] {
            grads.register::<B>(previous.id, token);
        }
    }
}

/// Ties every parameter into the graph as an ancestor of the reversible node, through a chain
/// of one-element anchors, and returns the chain's end (an untracked constant when there are
/// no trainable parameters).
fn anchor_chain<B: Backend, C: CheckpointStrategy>(
    params: Vec<FloatTensor<Autodiff<B, C>>>,
    device: &B::Device,
) -> FloatTensor<Autodiff<B, C>> {
    let token = || B::float_zeros([1].into(), device, FloatDType::F32);
    let mut chain: Option<FloatTensor<Autodiff<B, C>>> = None;
    for param in params {
        chain = Some(match chain {
            None => FirstAnchor.prepare::<C>([param.node()]).compute_bound().stateless(token()),
            Some(previous) => {
                let (_, previous_guard) = previous.into_parts();
                Anchor.prepare::<C>([param.node(), previous_guard]).compute_bound().stateless(token())
            }
        });
    }
    chain.unwrap_or_else(|| <Autodiff<B, C> as AutodiffBackend>::from_inner(token()))
}

#[cfg(test)]
mod tests {
    use burn::module::Module;
    use burn::optim::{GradientsAccumulator, GradientsParams};
    use burn::tensor::TensorData;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::config::{AttentionKind, ReformerConfig};
    use crate::context::LshMode;
    use crate::device::{compiled_backends, select_device};
    use crate::model::ReformerLm;
    use crate::testing::{GradSource, grads_by_path, random_tensor, values};

    const D_MODEL: usize = 32;
    const VOCAB_SIZE: usize = 16;
    const SEQ_LEN: usize = 32;
    /// Gradients must agree to this fraction of the largest reference entry of each tensor.
    const RELATIVE_TOLERANCE: f32 = 1e-4;

    /// Returns a config of `depth` layers alternating LSH and local attention, with dropout
    /// everywhere, 4 hash rounds, chunks of 8 (so `SEQ_LEN` hashes into 4 chunks per round) and
    /// a sliced feed-forward.
    fn config(depth: usize, is_decoder: bool) -> ReformerConfig {
        let config = ReformerConfig {
            attn_layers: [AttentionKind::Lsh, AttentionKind::Local].into_iter().cycle().take(depth).collect(),
            hidden_size: D_MODEL,
            num_attention_heads: 2,
            attention_head_size: 16,
            num_hashes: 4,
            num_buckets: None,
            lsh_attn_chunk_length: 8,
            local_attn_chunk_length: 8,
            lsh_num_chunks_before: 1,
            lsh_num_chunks_after: 0,
            local_num_chunks_before: 1,
            local_num_chunks_after: 0,
            axial_pos_shape: vec![4, 8],
            axial_pos_embds_dim: vec![16, 16],
            max_position_embeddings: SEQ_LEN,
            feed_forward_size: 64,
            chunk_size_feed_forward: 16,
            hidden_dropout_prob: 0.1,
            lsh_attention_probs_dropout_prob: 0.1,
            local_attention_probs_dropout_prob: 0.1,
            is_decoder,
            vocab_size: VOCAB_SIZE,
            initializer_range: 0.2,
            ..ReformerConfig::default()
        };
        config.validate().expect("the test config is valid");
        config
    }

    /// Returns the autodiff devices of every CPU backend compiled in (and wgpu when compiled).
    fn devices() -> Vec<Device> {
        compiled_backends()
            .into_iter()
            .map(|name| select_device(name).expect("a compiled backend").autodiff())
            .collect()
    }

    fn random_ids(batch_size: usize, seed: u64, device: &Device) -> Tensor<2, Int> {
        let mut rng = StdRng::seed_from_u64(seed);
        let ids: Vec<i64> = (0..batch_size * SEQ_LEN).map(|_| rng.random_range(0..VOCAB_SIZE as i64)).collect();
        Tensor::from_data(TensorData::new(ids, [batch_size, SEQ_LEN]), device)
    }

    /// Inputs of one forward call of a gradient check.
    struct Call {
        ids: Tensor<2, Int>,
        mask: Option<KeyMask>,
        ctx: ForwardContext,
        /// Random weights of the logits in the loss: a plain sum would give the final
        /// LayerNorm's inputs a zero gradient at initialisation.
        weights: Tensor<3>,
    }

    impl Call {
        fn new(batch_size: usize, lengths: Option<&[usize]>, step: u64, device: &Device) -> Self {
            Self {
                ids: random_ids(batch_size, step, device),
                mask: lengths.map(|lengths| KeyMask::from_lengths(lengths, SEQ_LEN)),
                ctx: ForwardContext::train(11, step),
                weights: random_tensor([batch_size, SEQ_LEN, VOCAB_SIZE], 100 + step, device),
            }
        }

        /// Returns the weighted sum of logits, with `offset` added to the embedded input (a
        /// zero leaf whose gradient is the gradient with respect to the stack's input).
        fn loss(&self, model: &ReformerLm, offset: Option<&Tensor<3>>, reversible: bool) -> Tensor<1> {
            let ctx = self.ctx.clone().with_reversible(reversible);
            let mut x = model.embeddings.forward(self.ids.clone(), &ctx);
            if let Some(offset) = offset {
                x = x + offset.clone();
            }
            let hidden = model.forward_embedded(x, self.mask.as_ref(), &ctx).unwrap();
            (model.lm_head.forward(hidden) * self.weights.clone()).sum()
        }
    }

    /// Returns every parameter's gradient values by module path.
    fn param_grads(model: &impl Module, source: GradSource<'_>) -> Vec<(String, Option<Vec<f32>>)> {
        grads_by_path(model, source)
            .into_iter()
            .map(|(path, grad)| (path, grad.map(|(_, values)| values)))
            .collect()
    }

    /// Asserts `actual` equals `expected` to [`RELATIVE_TOLERANCE`] of `expected`'s largest
    /// entry.
    fn assert_relative(label: &str, actual: &[f32], expected: &[f32]) {
        assert_eq!(actual.len(), expected.len(), "{label}: length");
        let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let worst = actual.iter().zip(expected).fold(0.0f32, |m, (a, e)| m.max((a - e).abs()));
        assert!(
            worst <= RELATIVE_TOLERANCE * scale.max(f32::MIN_POSITIVE),
            "{label}: max difference {worst:e} exceeds {RELATIVE_TOLERANCE:e} of the largest entry {scale:e}"
        );
    }

    /// Asserts two gradient lists agree parameter by parameter, that every parameter in
    /// `trained` has a nonzero gradient, and that no other parameter has one.
    fn assert_same_grads(
        label: &str,
        actual: &[(String, Option<Vec<f32>>)],
        expected: &[(String, Option<Vec<f32>>)],
        trained: impl Fn(&str) -> bool,
    ) {
        assert_eq!(actual.len(), expected.len(), "{label}: parameter count");
        for ((path, actual), (_, expected)) in actual.iter().zip(expected) {
            match (actual, expected) {
                (Some(actual), Some(expected)) => {
                    assert!(trained(path), "{label}: {path} has a gradient but should have none");
                    assert!(expected.iter().any(|&g| g != 0.0), "{label}: {path} has a zero reference gradient");
                    assert_relative(&format!("{label}: {path}"), actual, expected);
                }
                (None, None) => assert!(!trained(path), "{label}: {path} has no gradient"),
                (actual, expected) => panic!(
                    "{label}: {path}: gradient with the node: {}, with plain autodiff: {}",
                    actual.is_some(),
                    expected.is_some()
                ),
            }
        }
    }

    /// Runs one call with and without the node on every backend and compares the loss, the
    /// gradient of the stack's input and every parameter's gradient.
    fn check_against_plain(depth: usize, is_decoder: bool, lengths: Option<&[usize]>, lsh_mode: LshMode) {
        for device in devices() {
            let label = format!("{device:?}, {depth} layers, decoder {is_decoder}, lengths {lengths:?}, {lsh_mode:?}");
            let model = ReformerLm::new(&config(depth, is_decoder), 0, &device).unwrap();
            let mut call = Call::new(lengths.map_or(2, <[usize]>::len), lengths, 3, &device);
            call.ctx.lsh_mode = lsh_mode;

            let run = |reversible: bool| {
                let offset = Tensor::<3>::zeros([call.ids.dims()[0], SEQ_LEN, D_MODEL], &device).require_grad();
                let loss = call.loss(&model, Some(&offset), reversible);
                let loss_value = values(loss.clone())[0];
                let grads = loss.backward();
                let input_grad = values(offset.grad(&grads).expect("the offset is a tracked leaf"));
                (loss_value, input_grad, param_grads(&model, GradSource::Backward(&grads)))
            };
            let (loss, input_grad, grads) = run(true);
            let (plain_loss, plain_input_grad, plain_grads) = run(false);

            assert_relative(&format!("{label}: loss"), &[loss], &[plain_loss]);
            assert_relative(&format!("{label}: input gradient"), &input_grad, &plain_input_grad);
            assert_same_grads(&label, &grads, &plain_grads, |_| true);
        }
    }

    #[test]
    fn two_layers_causal_padded() {
        check_against_plain(2, true, Some(&[SEQ_LEN, 21]), LshMode::Hashed);
    }

    #[test]
    fn full_lsh_mode_causal_padded() {
        check_against_plain(2, true, Some(&[SEQ_LEN, 21]), LshMode::Full);
    }

    #[test]
    fn six_layers_causal_padded() {
        check_against_plain(6, true, Some(&[13, SEQ_LEN]), LshMode::Hashed);
    }

    #[test]
    fn two_layers_bidirectional() {
        check_against_plain(2, false, None, LshMode::Hashed);
    }

    #[test]
    fn untracked_input_trains_layers() {
        for device in devices() {
            let model = ReformerLm::new(&config(2, true), 0, &device).unwrap();
            let call = Call::new(2, Some(&[SEQ_LEN, 17]), 4, &device);
            let run = |reversible: bool| {
                let ctx = call.ctx.clone().with_reversible(reversible);
                let x = model.embeddings.forward(call.ids.clone(), &ctx).detach();
                assert!(!x.is_tracked());
                let hidden = model.forward_embedded(x, call.mask.as_ref(), &ctx).unwrap();
                let grads = (model.lm_head.forward(hidden) * call.weights.clone()).sum().backward();
                param_grads(&model, GradSource::Backward(&grads))
            };
            assert_same_grads("untracked input", &run(true), &run(false), |path| !path.starts_with("embeddings"));
        }
    }

    /// A model whose first feed-forward weight also enters the loss directly, as a tied
    /// weight would.
    #[derive(Module, Debug)]
    struct SharedWeight {
        model: ReformerLm,
    }

    impl SharedWeight {
        fn loss(&self, call: &Call, reversible: bool) -> Tensor<1> {
            let shared = self.model.layers[0].feed_forward.dense.weight.val();
            call.loss(&self.model, None, reversible) + shared.powi_scalar(2).sum() * 3.0
        }
    }

    #[test]
    fn shared_parameter_sums_both_gradients() {
        for device in devices() {
            let module = SharedWeight { model: ReformerLm::new(&config(2, true), 0, &device).unwrap() };
            let call = Call::new(2, None, 5, &device);
            let run = |reversible: bool| param_grads(&module, GradSource::Backward(&module.loss(&call, reversible).backward()));
            assert_same_grads("shared weight", &run(true), &run(false), |_| true);
        }
    }

    #[test]
    fn several_calls_one_backward() {
        for device in devices() {
            let model = ReformerLm::new(&config(2, true), 0, &device).unwrap();
            let first = Call::new(2, Some(&[SEQ_LEN, 9]), 6, &device);
            let second = Call::new(1, None, 7, &device);
            let run = |reversible: bool| {
                let loss = first.loss(&model, None, reversible) + second.loss(&model, None, reversible) * 0.5;
                param_grads(&model, GradSource::Backward(&loss.backward()))
            };
            assert_same_grads("two calls", &run(true), &run(false), |_| true);
        }
    }

    #[test]
    fn accumulation_matches_plain_autodiff() {
        for device in devices() {
            let model = ReformerLm::new(&config(2, true), 0, &device).unwrap();
            let calls = [Call::new(2, None, 8, &device), Call::new(2, Some(&[20, SEQ_LEN]), 9, &device)];
            let run = |reversible: bool| {
                let mut accumulator = GradientsAccumulator::<ReformerLm>::new();
                for call in &calls {
                    let grads = GradientsParams::from_grads(call.loss(&model, None, reversible).backward(), &model);
                    accumulator.accumulate(&model, grads);
                }
                param_grads(&model, GradSource::Accumulated(&accumulator.grads()))
            };
            assert_same_grads("accumulated", &run(true), &run(false), |_| true);
        }
    }

    #[test]
    fn forward_equals_plain_loop() {
        for device in devices() {
            let model = ReformerLm::new(&config(4, true), 0, &device).unwrap();
            let call = Call::new(2, Some(&[SEQ_LEN, 25]), 10, &device);
            let with_node = values(call.loss(&model, None, true));
            let plain = values(call.loss(&model, None, false));
            let inner = device.clone().inner();
            let inference = values(Call::new(2, Some(&[SEQ_LEN, 25]), 10, &inner).loss(&model.valid(), None, true));
            assert_relative("forward through the node", &with_node, &plain);
            assert_relative("forward without autodiff", &inference, &plain);
        }
    }
}
