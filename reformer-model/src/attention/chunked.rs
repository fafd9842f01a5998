//! The core that LSH and local attention share, as one backend operation. Queries in chunks
//! attend to a window of neighbouring chunks, with masks given as rules over original
//! positions. Each query gets its output and the logsumexp of its scores.
//!
//! Written with tensor operations, this core materialises the gathered keys and values, the
//! `[rows, n_chunks, chunk_len, window]` scores, two boolean masks and every softmax step as
//! full tensors, and autodiff keeps several of them for the backward. On the Flex backend the
//! operation instead runs one CPU kernel per chunk ([`super::chunked_host`]), which keeps a
//! chunk's scores in cache. Its backward recomputes the scores from the queries, keys and
//! values instead of storing them, as FlashAttention does (Dao et al. 2022, "FlashAttention:
//! Fast and Memory-Efficient Exact Attention with IO-Awareness"). Other backends run the
//! tensor-operation version ([`composed_forward`]), whose backward is a nested autodiff pass
//! over the same code, so every backend computes the same function.
//!
//! Chunks follow Hugging Face's layout (transformers 5.25): a row's `n_rounds * seq_len` slots
//! (sorted by bucket for LSH, in order for local attention) are cut into chunks of
//! `chunk_len`, and chunk `m` attends to chunks `m - before ..= m + after`, wrapping around
//! ([`neighbour_chunk`]).

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients as GraphGradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, DispatchKindConversion, DispatchTensor, backend_extension};
use burn::prelude::*;
use burn::tensor::TensorData;

use super::{MASK_VALUE, SELF_MASK_VALUE, bool_tensor, neighbour_chunk, softmax_with_lse, window_positions, window_rows};
use crate::context::{ForwardContext, KeyMask, RandomSite};

/// Everything a chunked attention call needs besides its tensors.
#[derive(Clone, Debug)]
pub struct ChunkPlan {
    /// Independent rows, `batch_size * n_heads`, batch-major.
    pub rows: usize,
    /// Heads per batch entry, to find a row's entry in the padding mask.
    pub n_heads: usize,
    /// Positions per row.
    pub seq_len: usize,
    /// Width of queries, keys and values.
    pub d_head: usize,
    /// Hash rounds (1 for local attention). Each round contains every position once.
    pub n_rounds: usize,
    /// Slots per chunk, a divisor of `n_rounds * seq_len`.
    pub chunk_len: usize,
    /// Chunks before a chunk that it attends to.
    pub before: usize,
    /// Chunks after a chunk that it attends to.
    pub after: usize,
    /// Original position in each slot, `[rows, n_rounds * seq_len]` flattened. `None` means
    /// that slot `t` contains position `t` (one round, in order).
    pub order: Option<Arc<Vec<u32>>>,
    /// Keys after the query are disallowed.
    pub causal: bool,
    /// A query's own key scores [`SELF_MASK_VALUE`] (LSH attention).
    pub self_mask: bool,
    /// Padding keys are disallowed.
    pub padding: Option<KeyMask>,
    /// Inverted-dropout factors for the probabilities, `[rows, n_chunks, chunk_len, window]`
    /// flattened, or `None` without dropout.
    pub dropout: Option<Arc<Vec<f32>>>,
}

impl ChunkPlan {
    /// Slots per row, `n_rounds * seq_len`.
    pub fn slots(&self) -> usize {
        self.n_rounds * self.seq_len
    }

    /// Chunks per row.
    pub fn n_chunks(&self) -> usize {
        self.slots() / self.chunk_len
    }

    /// Keys a chunk attends to: `(before + 1 + after) * chunk_len`.
    pub fn window(&self) -> usize {
        (self.before + 1 + self.after) * self.chunk_len
    }

    /// Returns the plan with the dropout factors that `ctx` draws for the probabilities at
    /// `(layer, AttentionProbs)`, none outside training or when `prob` is 0.
    pub fn with_dropout(self, ctx: &ForwardContext, prob: f64, layer: usize) -> Self {
        let n_probs = self.rows * self.slots() * self.window();
        let dropout = ctx.dropout_factors(n_probs, prob, layer, RandomSite::AttentionProbs).map(Arc::new);
        Self { dropout, ..self }
    }

    /// Returns the original position in `slot` of `row`.
    pub fn position(&self, row: usize, slot: usize) -> u32 {
        match &self.order {
            Some(order) => order[row * self.slots() + slot],
            None => slot as u32,
        }
    }

    /// Returns the slots of chunk `chunk`'s window in order: its neighbours from `before`
    /// chunks back to `after` chunks ahead.
    pub fn window_slots(&self, chunk: usize) -> impl Iterator<Item = usize> + '_ {
        let n_chunks = self.n_chunks();
        (-(self.before as i64)..=self.after as i64).flat_map(move |offset| {
            let neighbour = neighbour_chunk(chunk, offset, n_chunks);
            neighbour * self.chunk_len..(neighbour + 1) * self.chunk_len
        })
    }

    /// Returns the score that replaces a query's score for a key, or `None` when the key is
    /// allowed. Padding keys and, when causal, later keys get [`MASK_VALUE`]; then, with the
    /// self mask, the query's own key gets [`SELF_MASK_VALUE`] (Hugging Face applies the two
    /// in this order, so a padded own key still scores the self value).
    pub fn replacement(&self, row: usize, query: u32, key: u32) -> Option<f32> {
        if self.self_mask && query == key {
            return Some(SELF_MASK_VALUE);
        }
        let padded = self.padding.as_ref().is_some_and(|mask| !mask.is_valid(row / self.n_heads, key as usize));
        (padded || (self.causal && query < key)).then_some(MASK_VALUE)
    }

    /// Checks that the tensors' sizes fit the plan.
    ///
    /// # Panics
    /// If `seq_len` or `chunk_len` is zero, the chunk length does not divide the slots, the
    /// order or the dropout factors have the wrong length, or `rows` is not a multiple of
    /// `n_heads`: all are programming errors of the caller.
    fn check(&self) {
        assert!(self.seq_len > 0, "chunked attention needs seq_len > 0");
        assert!(self.chunk_len > 0, "chunked attention needs chunk_len > 0");
        assert_eq!(self.slots() % self.chunk_len, 0, "chunk_len {} does not divide n_rounds * seq_len = {}", self.chunk_len, self.slots());
        assert_eq!(self.rows % self.n_heads, 0, "rows {} is not a multiple of n_heads {}", self.rows, self.n_heads);
        if let Some(order) = &self.order {
            assert_eq!(order.len(), self.rows * self.slots(), "order has {} slots, expected rows * n_rounds * seq_len", order.len());
        } else {
            assert_eq!(self.n_rounds, 1, "chunked attention without an order has one round, not {}", self.n_rounds);
        }
        if let Some(factors) = &self.dropout {
            let expected = self.rows * self.slots() * self.window();
            assert_eq!(factors.len(), expected, "dropout has {} factors, expected {expected}", factors.len());
        }
    }
}

/// Runs chunked attention and returns each query's output with its logsumexp appended.
///
/// # Shapes
/// - `q`, `k`, `v`: `[rows, seq_len, d_head]`
/// - output: `[rows, n_rounds, seq_len, d_head + 1]`: round `r`'s output for position `t` in
///   `[.., r, t, ..d_head]` and the logsumexp of its scores in `[.., r, t, d_head]`
pub fn chunked_attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, plan: ChunkPlan) -> Tensor<4> {
    plan.check();
    let expected = [plan.rows, plan.seq_len, plan.d_head];
    for (name, tensor) in [("q", &q), ("k", &k), ("v", &v)] {
        assert_eq!(tensor.dims(), expected, "chunked attention: {name} is not [rows, seq_len, d_head]");
    }
    Tensor::from_dispatch(<burn::backend::Dispatch as ChunkedAttentionOps>::chunked_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        plan,
    ))
}

/// Chunked attention as a backend operation, with its backward.
#[backend_extension(
    Autodiff,
    NdArray: cfg(feature = "ndarray"),
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "wgpu")
)]
pub trait ChunkedAttentionOps: Backend {
    /// Forward: `q`, `k`, `v` are `[rows, seq_len, d_head]`; the output is
    /// `[rows, n_rounds, seq_len, d_head + 1]` (see [`chunked_attention`]).
    fn chunked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        plan: ChunkPlan,
    ) -> FloatTensor<Self>;

    /// Backward: given the gradient of the forward's output, returns the gradients of `q`, `k`
    /// and `v`.
    fn chunked_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        plan: ChunkPlan,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Chunked attention written with tensor operations, differentiable on an autodiff device.
/// Backends without a kernel of their own run it, and the tests compare kernels against it.
///
/// # Shapes
/// - `q`, `k`, `v`: `[rows, seq_len, d_head]`
/// - output: `[rows, n_rounds, seq_len, d_head + 1]`
pub fn composed_forward(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, plan: &ChunkPlan) -> Tensor<4> {
    let ChunkPlan { rows, seq_len, d_head, n_rounds, chunk_len, .. } = *plan;
    let device = q.device();
    if rows == 0 {
        return Tensor::zeros([0, n_rounds, seq_len, d_head + 1], &device);
    }
    let (slots, n_chunks, window) = (plan.slots(), plan.n_chunks(), plan.window());

    // Row indices into `[rows * seq_len, d_head]` of each slot's query and each window's keys.
    let positions: Vec<u32> = (0..rows).flat_map(|row| (0..slots).map(move |slot| plan.position(row, slot))).collect();
    let query_rows: Vec<i64> = positions.iter().enumerate().map(|(i, &p)| ((i / slots) * seq_len) as i64 + i64::from(p)).collect();
    let query_rows = Tensor::<1, Int>::from_data(TensorData::new(query_rows, [rows * slots]), &device);
    let key_positions = window_positions(&positions, rows, chunk_len, plan.before, plan.after);
    let key_rows = window_rows(&key_positions, rows, seq_len, &device);

    let queries = q.reshape([rows * seq_len, d_head]).select(0, query_rows).reshape([rows, n_chunks, chunk_len, d_head]);
    let keys = k.reshape([rows * seq_len, d_head]).select(0, key_rows.clone()).reshape([rows, n_chunks, window, d_head]);
    let values = v.reshape([rows * seq_len, d_head]).select(0, key_rows).reshape([rows, n_chunks, window, d_head]);

    let scores = queries.matmul(keys.swap_dims(2, 3)); // [rows, n_chunks, chunk_len, window]
    let scores = apply_replacements(scores, plan, &positions, &key_positions);
    let (probs, lse) = softmax_with_lse(scores); // lse: [rows, n_chunks, chunk_len, 1]
    let probs = match &plan.dropout {
        Some(factors) => probs.clone() * Tensor::<4>::from_data(TensorData::new(factors.to_vec(), probs.dims()), &device),
        None => probs,
    };
    let out = Tensor::cat(vec![probs.matmul(values), lse], 3); // [rows, n_chunks, chunk_len, d_head + 1]

    // Undo the sort: slot `s` of a row contains round `s / seq_len`'s query for its position.
    let mut undo = vec![0i64; rows * slots];
    for (i, &position) in positions.iter().enumerate() {
        let (row, slot) = (i / slots, i % slots);
        undo[row * slots + (slot / seq_len) * seq_len + position as usize] = i as i64;
    }
    let undo = Tensor::<1, Int>::from_data(TensorData::new(undo, [rows * slots]), &device);
    out.reshape([rows * slots, d_head + 1]).select(0, undo).reshape([rows, n_rounds, seq_len, d_head + 1])
}

/// Replaces disallowed scores by [`ChunkPlan::replacement`], through two boolean masks built on
/// the host: [`MASK_VALUE`] first, then [`SELF_MASK_VALUE`].
///
/// # Shapes
/// - `scores`, output: `[rows, n_chunks, chunk_len, window]`
fn apply_replacements(scores: Tensor<4>, plan: &ChunkPlan, positions: &[u32], key_positions: &[u32]) -> Tensor<4> {
    let shape = scores.dims();
    let [rows, n_chunks, chunk_len, window] = shape;
    let device = scores.device();
    let mut disallowed = Vec::with_capacity(scores.shape().num_elements());
    let mut own = Vec::with_capacity(if plan.self_mask { disallowed.capacity() } else { 0 });
    for row in 0..rows {
        for chunk in 0..n_chunks {
            let first = row * n_chunks + chunk;
            let keys = &key_positions[first * window..(first + 1) * window];
            for &query in &positions[first * chunk_len..(first + 1) * chunk_len] {
                for &key in keys {
                    let replacement = plan.replacement(row, query, key);
                    disallowed.push(replacement == Some(MASK_VALUE));
                    if plan.self_mask {
                        own.push(replacement == Some(SELF_MASK_VALUE));
                    }
                }
            }
        }
    }
    let scores = if disallowed.iter().any(|&flag| flag) {
        scores.mask_fill(bool_tensor(disallowed, shape, &device), MASK_VALUE)
    } else {
        scores
    };
    if plan.self_mask { scores.mask_fill(bool_tensor(own, shape, &device), SELF_MASK_VALUE) } else { scores }
}

/// Forward of a backend without its own kernel: [`composed_forward`] on its tensors.
fn composed_primitive<B: Backend>(q: FloatTensor<B>, k: FloatTensor<B>, v: FloatTensor<B>, plan: &ChunkPlan) -> FloatTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    let tensor = |t| Tensor::<3>::from_primitive::<B>(t);
    composed_forward(tensor(q), tensor(k), tensor(v), plan)
        .try_into_primitive::<B>()
        .expect("the output lives on the backend of the inputs")
}

/// Backward of a backend without its own kernel: a nested autodiff pass through
/// [`composed_forward`], on fresh leaves (the outer graph is locked during its backward).
fn composed_backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    grad: FloatTensor<B>,
    plan: &ChunkPlan,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>)
where
    DispatchTensor: DispatchKindConversion<B>,
{
    if plan.rows == 0 {
        // Nothing depends on an empty batch; its gradients are empty too.
        return (q, k, v);
    }
    let leaf = |t| Tensor::<3>::from_primitive::<B>(t).autodiff().require_grad();
    let (q, k, v) = (leaf(q), leaf(k), leaf(v));
    let grad = Tensor::<4>::from_primitive::<B>(grad).autodiff();
    let nested = (composed_forward(q.clone(), k.clone(), v.clone(), plan) * grad).sum().backward();
    let take = |leaf: Tensor<3>| {
        leaf.grad(&nested)
            .expect("the leaf requires a gradient")
            .try_into_primitive::<B>()
            .expect("the gradient lives on the inner backend")
    };
    (take(q), take(k), take(v))
}

/// Implements the operation with Burn's tensor operations, for backends without a kernel of
/// their own.
macro_rules! composed_backend {
    ($backend:ty) => {
        impl ChunkedAttentionOps for $backend {
            fn chunked_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, plan: ChunkPlan) -> FloatTensor<Self> {
                composed_primitive::<Self>(q, k, v, &plan)
            }

            fn chunked_attention_backward(
                q: FloatTensor<Self>,
                k: FloatTensor<Self>,
                v: FloatTensor<Self>,
                grad: FloatTensor<Self>,
                plan: ChunkPlan,
            ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
                composed_backward::<Self>(q, k, v, grad, &plan)
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
    use burn::backend::Flex;
    use burn::backend::tensor::FloatTensor;

    use super::{ChunkPlan, ChunkedAttentionOps};
    use crate::attention::chunked_host;
    use crate::host::{contiguous, tensor, values};

    impl ChunkedAttentionOps for Flex {
        fn chunked_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, plan: ChunkPlan) -> FloatTensor<Self> {
            let (q, k, v) = (contiguous(&q), contiguous(&k), contiguous(&v));
            let out = chunked_host::forward(values(&q), values(&k), values(&v), &plan);
            tensor(out, vec![plan.rows, plan.n_rounds, plan.seq_len, plan.d_head + 1])
        }

        fn chunked_attention_backward(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            plan: ChunkPlan,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            let (q, k, v, grad) = (contiguous(&q), contiguous(&k), contiguous(&v), contiguous(&grad));
            let [dq, dk, dv] = chunked_host::backward(values(&q), values(&k), values(&v), values(&grad), &plan);
            let shape = || vec![plan.rows, plan.seq_len, plan.d_head];
            (tensor(dq, shape()), tensor(dk, shape()), tensor(dv, shape()))
        }
    }
}

impl<B, C> ChunkedAttentionOps for Autodiff<B, C>
where
    B: Backend + ChunkedAttentionOps,
    C: CheckpointStrategy,
{
    fn chunked_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, plan: ChunkPlan) -> FloatTensor<Self> {
        let (q, q_node) = q.into_parts();
        let (k, k_node) = k.into_parts();
        let (v, v_node) = v.into_parts();
        // The node keeps only its inputs; the backward recomputes the scores from them.
        match ChunkedAttentionBackward.prepare::<C>([q_node, k_node, v_node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let output = B::chunked_attention(q.clone(), k.clone(), v.clone(), plan.clone());
                prep.finish(ChunkedAttentionState { q, k, v, plan }, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::chunked_attention(q, k, v, plan)),
        }
    }

    fn chunked_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        plan: ChunkPlan,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        // Only the node below calls the backward, on the inner backend; a call here is not
        // differentiated again.
        let inner = |t| <Self as AutodiffBackend>::inner(t);
        let (dq, dk, dv) = B::chunked_attention_backward(inner(q), inner(k), inner(v), inner(grad), plan);
        let outer = |t| <Self as AutodiffBackend>::from_inner(t);
        (outer(dq), outer(dk), outer(dv))
    }
}

/// State of the node: its inputs and plan.
#[derive(Clone, Debug)]
struct ChunkedAttentionState<B: Backend> {
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    plan: ChunkPlan,
}

/// The chunked attention node: parents `q`, `k`, `v`.
#[derive(Debug)]
struct ChunkedAttentionBackward;

impl<B: Backend + ChunkedAttentionOps> Backward<B, 3> for ChunkedAttentionBackward {
    type State = ChunkedAttentionState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut GraphGradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let ChunkedAttentionState { q, k, v, plan } = ops.state;
        let (dq, dk, dv) = B::chunked_attention_backward(q, k, v, grad, plan);
        for (parent, gradient) in ops.parents.into_iter().zip([dq, dk, dv]) {
            if let Some(parent) = parent {
                grads.register::<B>(parent.id, gradient);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{random_tensor, test_device, values};

    /// Builds a plan over 4 rows with a random order per round (a permutation of the
    /// positions) for LSH, padding on the last batch entry and dropout when requested.
    fn plan(n_rounds: usize, causal: bool, self_mask: bool, padded: bool, dropout: bool, seed: u64) -> ChunkPlan {
        plan_of_length(24, n_rounds, causal, self_mask, padded, dropout, seed)
    }

    /// Builds a plan as [`plan`] does, for sequences of `seq_len` positions.
    fn plan_of_length(seq_len: usize, n_rounds: usize, causal: bool, self_mask: bool, padded: bool, dropout: bool, seed: u64) -> ChunkPlan {
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        let (batch_size, n_heads, chunk_len) = (2, 2, 4);
        let rows = batch_size * n_heads;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let order = (n_rounds > 1 || self_mask).then(|| {
            let mut order = Vec::with_capacity(rows * n_rounds * seq_len);
            for _ in 0..rows * n_rounds {
                let mut round: Vec<u32> = (0..seq_len as u32).collect();
                round.shuffle(&mut rng);
                order.extend(round);
            }
            Arc::new(order)
        });
        let mut plan = ChunkPlan {
            rows,
            n_heads,
            seq_len,
            d_head: 8,
            n_rounds,
            chunk_len,
            before: 1,
            after: usize::from(!causal),
            order,
            causal,
            self_mask,
            padding: padded.then(|| KeyMask::from_lengths(&[seq_len, seq_len / 2], seq_len)),
            dropout: None,
        };
        if dropout {
            let count = rows * plan.slots() * plan.window();
            plan.dropout = Some(Arc::new((0..count).map(|_| if rng.random::<f64>() < 0.2 { 0.0 } else { 1.25 }).collect()));
        }
        plan
    }

    fn inputs(plan: &ChunkPlan, device: &Device) -> [Tensor<3>; 3] {
        let shape = [plan.rows, plan.seq_len, plan.d_head];
        // Scaled up so that attention is peaked and a misplaced key shows.
        [1, 2, 3].map(|seed| random_tensor(shape, seed, device) * 1.5)
    }

    fn plans() -> Vec<(&'static str, ChunkPlan)> {
        vec![
            ("lsh causal padded", plan(3, true, true, true, false, 1)),
            ("lsh bidirectional", plan(2, false, true, false, false, 2)),
            ("lsh with dropout", plan(2, true, true, true, true, 3)),
            ("local causal padded", plan(1, true, false, true, false, 4)),
            ("local bidirectional with dropout", plan(1, false, false, false, true, 5)),
            // Two chunks that look one back and one ahead: each window contains the other
            // chunk twice.
            ("local window wider than the sequence", plan_of_length(8, 1, false, false, true, false, 6)),
            ("lsh window wider than the sequence", plan_of_length(4, 2, false, true, true, false, 7)),
            // 2 rounds of 6 positions in chunks of 4: the middle chunk spans both rounds.
            ("lsh chunks across rounds", plan_of_length(6, 2, false, true, false, false, 11)),
        ]
    }

    fn assert_relative(label: &str, actual: &[f32], expected: &[f32], tolerance: f32) {
        assert_eq!(actual.len(), expected.len(), "{label}: length");
        let scale = expected.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            assert!((a - e).abs() <= tolerance * scale, "{label}: index {i}: {a} vs {e} (scale {scale})");
        }
    }

    #[test]
    fn backend_forward_matches_composed() {
        let device = test_device();
        for (label, plan) in plans() {
            let [q, k, v] = inputs(&plan, &device);
            let expected = values(composed_forward(q.clone(), k.clone(), v.clone(), &plan));
            let actual = values(chunked_attention(q, k, v, plan));
            assert_relative(label, &actual, &expected, 1e-5);
        }
    }

    #[test]
    fn backend_gradients_match_composed() {
        let device = test_device().autodiff();
        for (label, plan) in plans() {
            let [q, k, v] = inputs(&plan, &device).map(|t| t.require_grad());
            let weights = random_tensor([plan.rows, plan.n_rounds, plan.seq_len, plan.d_head + 1], 9, &device);
            let grads_of = |out: Tensor<4>| {
                let grads = (out * weights.clone()).sum().backward();
                [&q, &k, &v].map(|leaf| values(leaf.grad(&grads).expect("gradient")))
            };
            let expected = grads_of(composed_forward(q.clone(), k.clone(), v.clone(), &plan));
            let actual = grads_of(chunked_attention(q.clone(), k.clone(), v.clone(), plan.clone()));
            for (name, (a, e)) in ["q", "k", "v"].iter().zip(actual.iter().zip(&expected)) {
                assert_relative(&format!("{label}: d{name}"), a, e, 1e-4);
            }
        }
    }

    #[test]
    fn one_chunk_without_masks_is_softmax_attention() {
        let device = test_device();
        let plan = ChunkPlan { before: 0, after: 0, chunk_len: 24, ..plan(1, false, false, false, false, 6) };
        let [q, k, v] = inputs(&plan, &device);
        let out = chunked_attention(q.clone(), k.clone(), v.clone(), plan.clone());
        let expected = burn::tensor::activation::softmax(q.matmul(k.swap_dims(1, 2)), 2).matmul(v);
        let out = out.slice([0..plan.rows, 0..1, 0..plan.seq_len, 0..plan.d_head]).reshape([plan.rows, plan.seq_len, plan.d_head]);
        assert_relative("exact attention", &values(out), &values(expected), 1e-5);
    }

    #[test]
    fn empty_batch_gives_empty_gradients() {
        // Every CPU backend: Flex runs the kernel, ndarray the tensor-operation version.
        for name in crate::device::compiled_backends().into_iter().filter(|&name| name != "wgpu") {
            let device = crate::device::select_device(name).expect("compiled backend").autodiff();
            let plan = ChunkPlan { rows: 0, order: None, padding: None, ..plan(1, true, false, false, false, 8) };
            let [q, k, v] = [0, 1, 2].map(|_| Tensor::<3>::zeros([0, plan.seq_len, plan.d_head], &device).require_grad());
            let out = chunked_attention(q.clone(), k, v, plan);
            assert_eq!(out.dims()[0], 0, "{name}");
            let grads = out.sum().backward();
            assert_eq!(q.grad(&grads).expect("gradient").dims(), [0, 24, 8], "{name}");
        }
    }

    #[test]
    #[should_panic(expected = "chunk_len 5 does not divide")]
    fn chunk_len_must_divide_the_slots() {
        let device = test_device();
        let plan = ChunkPlan { chunk_len: 5, ..plan(1, true, false, false, false, 7) };
        let [q, k, v] = inputs(&plan, &device);
        let _ = chunked_attention(q, k, v, plan);
    }
}
