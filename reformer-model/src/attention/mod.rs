//! Self-attention of the Reformer: LSH attention and local (chunked) attention, with the
//! helpers they share.

// The backend extension names NdArray, deprecated upstream in favour of Flex (see `reversible`
// in lib.rs).
#[allow(deprecated)]
pub mod chunked;
#[cfg(feature = "flex")]
mod chunked_host;
pub mod local;
pub mod lsh;

use burn::prelude::*;
use burn::tensor::TensorData;

/// Score given to a disallowed key (padding or, in a causal model, the future). It replaces
/// the score instead of being added, as in Hugging Face's Reformer (transformers 5.25), so a
/// row whose keys are all disallowed becomes a uniform average instead of NaN.
pub const MASK_VALUE: f32 = -1e9;

/// Score of a token's own key in LSH attention. With shared queries and keys a token's key
/// is the best match for its own query, so it is only used when nothing else is allowed.
/// Larger than [`MASK_VALUE`] so that a row with nothing else attends to itself.
pub const SELF_MASK_VALUE: f32 = -1e5;

/// Computes `log(sum(exp(x)))` over the last axis as `max + log(sum(exp(x - max)))`, keeping
/// the axis.
///
/// The max-shifted form in f32 matters: rows that see only themselves have scores near -1e5,
/// where a plain f32 exponential underflows to zero.
pub fn logsumexp<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let max = x.clone().max_dim(D - 1).detach();
    let shifted = shifted_exp(x - max.clone()).sum_dim(D - 1).log();
    max + shifted
}

/// Splits `[batch_size, seq_len, n_heads * d_head]` into `[batch_size, n_heads, seq_len, d_head]`.
pub fn split_heads(x: Tensor<3>, n_heads: usize, d_head: usize) -> Tensor<4> {
    let [batch_size, seq_len, _] = x.dims();
    x.reshape([batch_size, seq_len, n_heads, d_head]) // [batch_size, seq_len, n_heads, d_head]
        .swap_dims(1, 2) // [batch_size, n_heads, seq_len, d_head]
}

/// Merges `[batch_size, n_heads, seq_len, d_head]` into `[batch_size, seq_len, n_heads * d_head]`.
pub fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [batch_size, n_heads, seq_len, d_head] = x.dims();
    x.swap_dims(1, 2) // [batch_size, seq_len, n_heads, d_head]
        .reshape([batch_size, seq_len, n_heads * d_head])
}

/// Concatenates, for each chunk `m`, the chunks `m - before, ..., m, ..., m + after` along the
/// row axis, with chunk indices taken modulo the number of chunks (the first chunk's
/// predecessor is the last chunk).
///
/// # Shapes
/// - `x`: `[rows, n_chunks, chunk_len, width]`
/// - output: `[rows, n_chunks, (before + 1 + after) * chunk_len, width]`
pub fn look_adjacent(x: Tensor<4>, before: usize, after: usize) -> Tensor<4> {
    if before == 0 && after == 0 {
        return x;
    }
    let [_, n_chunks, _, _] = x.dims();
    let parts = (0..before + 1 + after)
        .map(|slot| {
            // out[m] = x[(m + offset) mod n_chunks], offset = slot - before.
            let shift = -neighbour_offset(slot as i64 - before as i64, n_chunks);
            if shift == 0 { x.clone() } else { x.clone().roll_dim(shift.rem_euclid(n_chunks as i64), 1) }
        })
        .collect();
    Tensor::cat(parts, 2)
}

/// Returns the chunk offset Hugging Face's `_look_adjacent` applies for neighbour `offset`: the
/// offset itself, except that an offset of at least `n_chunks` either way selects the chunk
/// itself (its slicing `cat([x[i:], x[:i]])` then takes the whole sequence unshifted).
fn neighbour_offset(offset: i64, n_chunks: usize) -> i64 {
    if offset.unsigned_abs() >= n_chunks as u64 { 0 } else { offset }
}

/// Returns the chunk at neighbour `offset` of chunk `chunk` among `n_chunks`, by
/// [`look_adjacent`]'s rule.
pub(crate) fn neighbour_chunk(chunk: usize, offset: i64, n_chunks: usize) -> usize {
    (chunk as i64 + neighbour_offset(offset, n_chunks)).rem_euclid(n_chunks as i64) as usize
}

/// Returns the original positions in each chunk's window, by [`look_adjacent`]'s rule.
///
/// `positions[row][slot]` is the original position in sorted slot `slot`; the output is
/// `[rows, n_chunks, window_len]` flattened.
pub(crate) fn window_positions(
    positions: &[u32],
    rows: usize,
    chunk_len: usize,
    before: usize,
    after: usize,
) -> Vec<u32> {
    let slots = positions.len() / rows;
    let n_chunks = slots / chunk_len;
    let window = (before + 1 + after) * chunk_len;
    let mut out = Vec::with_capacity(rows * n_chunks * window);
    for row in positions.chunks(slots) {
        for m in 0..n_chunks {
            for offset in -(before as i64)..=(after as i64) {
                let chunk = neighbour_chunk(m, offset, n_chunks);
                out.extend_from_slice(&row[chunk * chunk_len..(chunk + 1) * chunk_len]);
            }
        }
    }
    out
}

/// Turns window positions (`[rows, n_chunks, window]` flattened, as [`window_positions`]
/// returns them) into row indices of a `[rows * seq_len, width]` tensor, for one gather.
pub(crate) fn window_rows(positions: &[u32], rows: usize, seq_len: usize, device: &Device) -> Tensor<1, Int> {
    let per_row = positions.len() / rows;
    let index: Vec<i64> = positions
        .iter()
        .enumerate()
        .map(|(i, &position)| ((i / per_row) * seq_len) as i64 + i64::from(position))
        .collect();
    Tensor::from_data(TensorData::new(index, [positions.len()]), device)
}

/// Builds a boolean tensor from host flags.
pub(crate) fn bool_tensor<const D: usize>(flags: Vec<bool>, shape: [usize; D], device: &Device) -> Tensor<D, Bool> {
    Tensor::from_data(TensorData::new(flags, shape), device)
}

/// Softmax by `exp(s - logsumexp(s))`, returning the probabilities and the logsumexp.
pub(crate) fn softmax_with_lse<const D: usize>(scores: Tensor<D>) -> (Tensor<D>, Tensor<D>) {
    // Hugging Face computes `exp(s - lse)` with `lse` rounded to f32, which matters where it is
    // about -1e5 (rows that see only the query itself): dividing by the sum would not round
    // the same way. `exp(s - max) * exp(max - lse)` keeps that rounding (`max - lse` is exact
    // in f32, as the two are close) and reuses the exponentials the logsumexp needs anyway,
    // instead of a second pass of subtraction, clamping and `exp` over all the scores.
    let max = scores.clone().max_dim(D - 1).detach();
    let shifted = shifted_exp(scores - max.clone());
    let lse = max.clone() + shifted.clone().sum_dim(D - 1).log();
    let scale = (max - lse.clone()).exp();
    (shifted * scale, lse)
}

/// Lowest exponent passed to `exp` in softmaxes. Masked scores (-1e9 below the row maximum)
/// would otherwise take libm's slow underflow path, which cost 6% of an inference step. A
/// masked key so gets the weight `exp(-80)`, about 2e-35, instead of 0: far below f32's
/// resolution of any weight sum near 1.
const EXP_FLOOR: f64 = -80.0;

/// Returns `exp(x)` of scores already shifted by their row maximum, with exponents below
/// [`EXP_FLOOR`] raised to it.
fn shifted_exp<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.clamp_min(EXP_FLOOR).exp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, test_device, values};

    #[test]
    fn look_adjacent_wraps_around() {
        let device = test_device();
        // One row, three chunks of one element each: values 0, 1, 2.
        let x = Tensor::<4>::from_data(TensorData::new(vec![0.0f32, 1.0, 2.0], [1, 3, 1, 1]), &device);
        let out = look_adjacent(x, 1, 1);
        assert_eq!(out.dims(), [1, 3, 3, 1]);
        assert_eq!(values(out), vec![2.0, 0.0, 1.0, 0.0, 1.0, 2.0, 1.0, 2.0, 0.0]);
    }

    #[test]
    fn window_positions_match_look_adjacent() {
        let positions: Vec<u32> = vec![5, 6, 7, 8, 9, 10];
        let out = window_positions(&positions, 1, 2, 1, 0);
        assert_eq!(out, vec![9, 10, 5, 6, 5, 6, 7, 8, 7, 8, 9, 10]);
    }

    #[test]
    fn neighbours_beyond_the_sequence_are_the_chunk_itself() {
        // Three chunks of one position each, two chunks back: offset -2 wraps, as in HF.
        assert_eq!(window_positions(&[0, 1, 2], 1, 1, 2, 0), vec![1, 2, 0, 2, 0, 1, 0, 1, 2]);
        // Four chunks back on three chunks: HF's slicing leaves that neighbour unshifted.
        let out = window_positions(&[0, 1, 2], 1, 1, 4, 0);
        assert_eq!(out[..5], [0, 0, 1, 2, 0]);
        let device = test_device();
        let x = Tensor::<4>::from_data(TensorData::new(vec![0.0f32, 1.0, 2.0], [1, 3, 1, 1]), &device);
        let window = values(look_adjacent(x, 4, 0));
        let expected: Vec<f32> = window_positions(&[0, 1, 2], 1, 1, 4, 0).iter().map(|&p| p as f32).collect();
        assert_eq!(window, expected);
    }

    #[test]
    fn logsumexp_is_stable_near_self_mask() {
        let device = test_device();
        let x = Tensor::<2>::from_data(TensorData::new(vec![-1e5f32, -1e9, -1e9], [1, 3]), &device);
        assert_close(&values(logsumexp(x)), &[-1e5], 1e-3);
    }
}
