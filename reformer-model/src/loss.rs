//! Losses and metrics of language modelling.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

use crate::context::ForwardContext;
use crate::error::InputError;
use crate::model::ReformerLm;

/// Mean cross-entropy over the positions whose weight is non-zero, in nats.
///
/// Weights select the scored positions (padding and, in the duplication task, the first copy
/// get 0), so the padding id needs no special meaning.
///
/// # Shapes
/// - `logits`: `[batch_size, seq_len, vocab_size]`
/// - `targets`: `[batch_size, seq_len]`
/// - `weights`: `[batch_size, seq_len]`
/// - output: `[1]`
pub fn weighted_cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>, weights: Tensor<2>) -> Tensor<1> {
    let [batch_size, seq_len, _] = logits.dims();
    let log_probs = log_softmax(logits, 2);
    let picked = log_probs
        .gather(2, targets.unsqueeze_dim::<3>(2))
        .reshape([batch_size, seq_len]);
    let total = weights.clone().sum().clamp_min(1.0);
    -(picked * weights).sum() / total
}

/// Shifts a causal language-model batch: logits at position `t` are scored against the token
/// at `t + 1`, and the last position has no target.
///
/// # Shapes
/// - `logits`: `[batch_size, seq_len, vocab_size]`, `ids` and `weights`: `[batch_size, seq_len]`
///   where `weights[t]` is the weight of token `t` as a target
/// - outputs: the same with `seq_len - 1`
pub fn shift_for_causal_lm(logits: Tensor<3>, ids: Tensor<2, Int>, weights: Tensor<2>) -> (Tensor<3>, Tensor<2, Int>, Tensor<2>) {
    let [batch_size, seq_len, vocab_size] = logits.dims();
    (
        logits.slice([0..batch_size, 0..seq_len - 1, 0..vocab_size]),
        ids.slice([0..batch_size, 1..seq_len]),
        weights.slice([0..batch_size, 1..seq_len]),
    )
}

/// Runs a causal language model on `ids` and returns its logits with the targets and
/// weights, shifted by [`shift_for_causal_lm`].
///
/// # Shapes
/// - `ids`, `weights`: `[batch_size, seq_len]`
/// - outputs: `[batch_size, seq_len - 1, vocab_size]`, `[batch_size, seq_len - 1]` twice
pub fn causal_lm_outputs(
    model: &ReformerLm,
    ids: Tensor<2, Int>,
    weights: Tensor<2>,
    ctx: &ForwardContext,
) -> Result<(Tensor<3>, Tensor<2, Int>, Tensor<2>), InputError> {
    let logits = model.forward(ids.clone(), None, ctx)?;
    Ok(shift_for_causal_lm(logits, ids, weights))
}

/// Counts correct argmax predictions among positions with non-zero weight; returns
/// `(correct, counted)`.
pub fn weighted_accuracy(logits: Tensor<3>, targets: Tensor<2, Int>, weights: Tensor<2>) -> (usize, usize) {
    let predicted: Vec<i64> = logits.argmax(2).try_into_vec_as::<i64>().expect("ids");
    let targets: Vec<i64> = targets.try_into_vec_as::<i64>().expect("ids");
    let weights: Vec<f32> = weights.try_into_vec_as::<f32>().expect("weights");
    let mut correct = 0;
    let mut counted = 0;
    for ((p, t), w) in predicted.iter().zip(&targets).zip(&weights) {
        if *w > 0.0 {
            counted += 1;
            correct += usize::from(p == t);
        }
    }
    (correct, counted)
}
