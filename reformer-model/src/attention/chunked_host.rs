//! CPU kernel of chunked attention ([`super::chunked`]) on row-major `f32` slices.
//!
//! Each chunk gathers its queries and its window's keys and values into small buffers and
//! scores them with one matrix product. The scores are masked and normalised in place and
//! multiplied by the values, so a chunk's `chunk_len x window` scores stay in the cache. The backward
//! recomputes the same scores and probabilities from the inputs, then applies the softmax and
//! matrix-product gradients chunk by chunk, adding each chunk's query, key and value gradients
//! into the positions they came from.
//!
//! The forward runs chunks in parallel. The backward adds into shared positions, so it runs
//! rows in parallel, and splits rows into groups of chunks with their own sums when there are
//! fewer rows than threads.

use rayon::prelude::*;

use super::chunked::ChunkPlan;
use crate::host::{Operand, add_assign, dispatch_simd, lane_dot, matmul};
use super::{MASK_VALUE, SELF_MASK_VALUE};

/// Lowest exponent of the softmax exponentials, as in the tensor version
/// ([`super::softmax_with_lse`]).
const EXP_FLOOR: f32 = -80.0;

/// Most groups of chunks one row's backward is split into when there are fewer rows than threads.
const MAX_GROUPS: usize = 8;

/// Returns `[rows, n_rounds, seq_len, d_head + 1]`: each query's output and logsumexp.
pub(crate) fn forward(q: &[f32], k: &[f32], v: &[f32], plan: &ChunkPlan) -> Vec<f32> {
    let d = plan.d_head;
    let width = d + 1;
    let (n_chunks, chunk_len) = (plan.n_chunks(), plan.chunk_len);

    // Outputs in slot order: chunk `g` (row-major over rows and chunks) fills one block.
    let mut sorted = vec![0f32; plan.rows * plan.slots() * width];
    sorted
        .par_chunks_mut(chunk_len * width)
        .enumerate()
        .for_each_init(
            || Scratch::new(plan),
            |scratch, (g, out)| {
                let (row, chunk) = (g / n_chunks, g % n_chunks);
                scratch.load(plan, q, k, v, row, chunk);
                scratch.probabilities(plan);
                scratch.apply_dropout(plan, g);
                // out[i, ..d] = probs[i, :] · values; the logsumexp goes in column d.
                let probs = scratch.dropped(plan);
                matmul([chunk_len, d, plan.window()], out, width, false, Operand::rows(probs, plan.window()), Operand::rows(&scratch.values, d), false);
                for (i, lse) in scratch.lse.iter().enumerate() {
                    out[i * width + d] = *lse;
                }
            },
        );
    if plan.order.is_none() {
        return sorted;
    }

    // Undo the sort: slot `s` of a row contains round `s / seq_len`'s query for its position.
    let (seq_len, slots) = (plan.seq_len, plan.slots());
    let mut out = vec![0f32; sorted.len()];
    out.par_chunks_mut(slots * width).zip(sorted.par_chunks(slots * width)).enumerate().for_each(|(row, (out, sorted))| {
        for slot in 0..slots {
            let target = (slot / seq_len) * seq_len + plan.position(row, slot) as usize;
            out[target * width..(target + 1) * width].copy_from_slice(&sorted[slot * width..(slot + 1) * width]);
        }
    });
    out
}

/// Returns the gradients `[dq, dk, dv]`, each `[rows, seq_len, d_head]`, given the gradient of
/// the forward's output, `[rows, n_rounds, seq_len, d_head + 1]`.
pub(crate) fn backward(q: &[f32], k: &[f32], v: &[f32], grad: &[f32], plan: &ChunkPlan) -> [Vec<f32>; 3] {
    let per_row = plan.seq_len * plan.d_head;
    if plan.rows == 0 {
        return [Vec::new(), Vec::new(), Vec::new()];
    }
    let n_chunks = plan.n_chunks();
    // NOTE: with fewer rows than threads, the split into groups (and so the order of the sums)
    // follows the thread count, so the gradients can differ in the last bits between counts.
    // Each extra group keeps its own three `[seq_len, d_head]` sums, hence the cap.
    let groups = rayon::current_num_threads().div_ceil(plan.rows).clamp(1, n_chunks.min(MAX_GROUPS));
    let chunks_per_group = n_chunks.div_ceil(groups);
    let run = |row: usize, group: usize, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]| {
        let mut scratch = Scratch::new(plan);
        let first = group * chunks_per_group;
        for chunk in first..(first + chunks_per_group).min(n_chunks) {
            scratch.backward_chunk(plan, [q, k, v, grad], row, chunk, [&mut *dq, &mut *dk, &mut *dv]);
        }
    };

    let mut gradients = [(); 3].map(|_| vec![0f32; plan.rows * per_row]);
    let [dq, dk, dv] = &mut gradients;
    if groups == 1 {
        dq.par_chunks_mut(per_row)
            .zip(dk.par_chunks_mut(per_row))
            .zip(dv.par_chunks_mut(per_row))
            .enumerate()
            .for_each(|(row, ((dq, dk), dv))| run(row, 0, dq, dk, dv));
    } else {
        // Fewer rows than threads: each group of chunks sums into its own buffers.
        let partial: Vec<[Vec<f32>; 3]> = (0..plan.rows * groups)
            .into_par_iter()
            .map(|task| {
                let mut sums = [(); 3].map(|_| vec![0f32; per_row]);
                let [a, b, c] = &mut sums;
                run(task / groups, task % groups, a, b, c);
                sums
            })
            .collect();
        for (task, sums) in partial.iter().enumerate() {
            let row = task / groups;
            for (total, part) in [&mut *dq, &mut *dk, &mut *dv].into_iter().zip(sums) {
                add_assign(&mut total[row * per_row..(row + 1) * per_row], part);
            }
        }
    }
    gradients
}

/// Buffers of one chunk, reused from chunk to chunk by one thread.
struct Scratch {
    /// Original positions of the chunk's queries, `[chunk_len]`.
    query_positions: Vec<u32>,
    /// Original positions of the window's keys, `[window]`.
    key_positions: Vec<u32>,
    /// Whether each of the window's keys is padding, `[window]`.
    key_padded: Vec<bool>,
    /// Queries, `[chunk_len, d_head]`.
    queries: Vec<f32>,
    /// Keys, `[window, d_head]`.
    keys: Vec<f32>,
    /// Values, `[window, d_head]`.
    values: Vec<f32>,
    /// Scores, then probabilities, `[chunk_len, window]`.
    probs: Vec<f32>,
    /// Probabilities after dropout, `[chunk_len, window]` (used only with dropout).
    dropped: Vec<f32>,
    /// Logsumexp of each query's scores, `[chunk_len]`.
    lse: Vec<f32>,
    /// Gradient of the outputs, `[chunk_len, d_head]` (backward only).
    grad_out: Vec<f32>,
    /// Gradient of the logsumexps, `[chunk_len]` (backward only).
    grad_lse: Vec<f32>,
    /// Gradient of the probabilities, then of the scores, `[chunk_len, window]` (backward only).
    grad_scores: Vec<f32>,
    /// Gradient of the queries, `[chunk_len, d_head]`, and of the window's keys and values,
    /// `[window, d_head]` (backward only).
    grad_queries: Vec<f32>,
    grad_keys: Vec<f32>,
    grad_values: Vec<f32>,
}

impl Scratch {
    fn new(plan: &ChunkPlan) -> Self {
        let (chunk_len, window, d) = (plan.chunk_len, plan.window(), plan.d_head);
        Self {
            query_positions: vec![0; chunk_len],
            key_positions: vec![0; window],
            key_padded: vec![false; window],
            queries: vec![0.0; chunk_len * d],
            keys: vec![0.0; window * d],
            values: vec![0.0; window * d],
            probs: vec![0.0; chunk_len * window],
            dropped: Vec::new(),
            lse: vec![0.0; chunk_len],
            grad_out: Vec::new(),
            grad_lse: Vec::new(),
            grad_scores: Vec::new(),
            grad_queries: Vec::new(),
            grad_keys: Vec::new(),
            grad_values: Vec::new(),
        }
    }

    /// Gathers chunk `chunk` of row `row`: its queries, and its window's keys and values.
    fn load(&mut self, plan: &ChunkPlan, q: &[f32], k: &[f32], v: &[f32], row: usize, chunk: usize) {
        let (d, base) = (plan.d_head, row * plan.seq_len);
        for i in 0..plan.chunk_len {
            let position = plan.position(row, chunk * plan.chunk_len + i);
            self.query_positions[i] = position;
            let source = (base + position as usize) * d;
            self.queries[i * d..(i + 1) * d].copy_from_slice(&q[source..source + d]);
        }
        let batch = row / plan.n_heads;
        for (j, slot) in plan.window_slots(chunk).enumerate() {
            let position = plan.position(row, slot);
            self.key_positions[j] = position;
            self.key_padded[j] = plan.padding.as_ref().is_some_and(|mask| !mask.is_valid(batch, position as usize));
            let source = (base + position as usize) * d;
            self.keys[j * d..(j + 1) * d].copy_from_slice(&k[source..source + d]);
            self.values[j * d..(j + 1) * d].copy_from_slice(&v[source..source + d]);
        }
    }

    /// Computes the loaded chunk's scores, replaces the disallowed ones and turns each
    /// query's row into probabilities, keeping its logsumexp.
    fn probabilities(&mut self, plan: &ChunkPlan) {
        let (chunk_len, window, d) = (plan.chunk_len, plan.window(), plan.d_head);
        matmul([chunk_len, window, d], &mut self.probs, window, false, Operand::rows(&self.queries, d), Operand::transposed(&self.keys, d), false);
        let keys = Keys { positions: &self.key_positions, padded: &self.key_padded, causal: plan.causal, self_mask: plan.self_mask };
        for i in 0..chunk_len {
            let scores = &mut self.probs[i * window..(i + 1) * window];
            self.lse[i] = mask_softmax(scores, self.query_positions[i], &keys);
        }
    }

    /// Multiplies chunk `g`'s probabilities by their dropout factors into `dropped`, when the
    /// plan has dropout.
    fn apply_dropout(&mut self, plan: &ChunkPlan, g: usize) {
        if let Some(factors) = &plan.dropout {
            let size = self.probs.len();
            self.dropped.clear();
            self.dropped.extend(self.probs.iter().zip(&factors[g * size..(g + 1) * size]).map(|(p, f)| p * f));
        }
    }

    /// Returns the probabilities after dropout: the probabilities themselves without it.
    fn dropped(&self, plan: &ChunkPlan) -> &[f32] {
        if plan.dropout.is_some() { &self.dropped } else { &self.probs }
    }

    /// Back-propagates through one chunk and adds its gradients into `[dq, dk, dv]` of the row.
    /// `inputs` are `[q, k, v, grad]` as [`backward`] takes them.
    fn backward_chunk(&mut self, plan: &ChunkPlan, inputs: [&[f32]; 4], row: usize, chunk: usize, [dq, dk, dv]: [&mut [f32]; 3]) {
        let [q, k, v, grad] = inputs;
        let (chunk_len, window, d, seq_len) = (plan.chunk_len, plan.window(), plan.d_head, plan.seq_len);
        let width = d + 1;
        let g = row * plan.n_chunks() + chunk;
        self.load(plan, q, k, v, row, chunk);
        self.probabilities(plan);
        self.apply_dropout(plan, g);

        // Gradients of this chunk's outputs and logsumexps, read at (row, round, position).
        // A chunk can span two rounds when chunk_len does not divide seq_len, so each slot
        // finds its own round.
        self.grad_out.resize(chunk_len * d, 0.0);
        self.grad_lse.resize(chunk_len, 0.0);
        for (i, &position) in self.query_positions.iter().enumerate() {
            let round = (chunk * chunk_len + i) / seq_len;
            let source = ((row * plan.n_rounds + round) * seq_len + position as usize) * width;
            self.grad_out[i * d..(i + 1) * d].copy_from_slice(&grad[source..source + d]);
            self.grad_lse[i] = grad[source + d];
        }

        // dV = dropped^T · dO.
        self.grad_values.resize(window * d, 0.0);
        let dropped = if plan.dropout.is_some() { &self.dropped } else { &self.probs };
        matmul([window, d, chunk_len], &mut self.grad_values, d, false, Operand::transposed(dropped, window), Operand::rows(&self.grad_out, d), false);

        // dP = (dO · V^T) * dropout factors.
        self.grad_scores.resize(chunk_len * window, 0.0);
        matmul([chunk_len, window, d], &mut self.grad_scores, window, false, Operand::rows(&self.grad_out, d), Operand::transposed(&self.values, d), false);
        if let Some(factors) = &plan.dropout {
            let size = chunk_len * window;
            for (gp, f) in self.grad_scores.iter_mut().zip(&factors[g * size..(g + 1) * size]) {
                *gp *= f;
            }
        }

        // Softmax with logsumexp: dS = P * (dP - sum(P * dP) + dlse), zero where a score was
        // replaced (it no longer depends on the query or key).
        let keys = Keys { positions: &self.key_positions, padded: &self.key_padded, causal: plan.causal, self_mask: plan.self_mask };
        for i in 0..chunk_len {
            let probs = &self.probs[i * window..(i + 1) * window];
            let grads = &mut self.grad_scores[i * window..(i + 1) * window];
            score_grads(grads, probs, self.grad_lse[i], self.query_positions[i], &keys);
        }

        // dQ = dS · K and dK = dS^T · Q.
        self.grad_queries.resize(chunk_len * d, 0.0);
        matmul([chunk_len, d, window], &mut self.grad_queries, d, false, Operand::rows(&self.grad_scores, window), Operand::rows(&self.keys, d), false);
        self.grad_keys.resize(window * d, 0.0);
        matmul([window, d, chunk_len], &mut self.grad_keys, d, false, Operand::transposed(&self.grad_scores, window), Operand::rows(&self.queries, d), false);

        add_rows(dq, &self.query_positions, &self.grad_queries, d);
        add_rows(dk, &self.key_positions, &self.grad_keys, d);
        add_rows(dv, &self.key_positions, &self.grad_values, d);
    }
}

/// Adds row `i` of `rows` (`[positions.len(), d]`) into row `positions[i]` of `target`.
fn add_rows(target: &mut [f32], positions: &[u32], rows: &[f32], d: usize) {
    for (row, &position) in rows.chunks_exact(d).zip(positions) {
        let start = position as usize * d;
        add_assign(&mut target[start..start + d], row);
    }
}

/// The keys of one chunk's window and the rules that replace their scores: the same rules as
/// [`ChunkPlan::replacement`], with padding looked up once per window.
struct Keys<'a> {
    positions: &'a [u32],
    padded: &'a [bool],
    causal: bool,
    self_mask: bool,
}

impl Keys<'_> {
    /// Returns whether `query`'s score for the key at `key` (padding when `padded`) is replaced
    /// by [`MASK_VALUE`] (`disallowed`) and by [`SELF_MASK_VALUE`] (`own`, which wins). Written
    /// with `&` and `|`, not branches, so that the loops calling it vectorise.
    #[inline(always)]
    fn rules(&self, query: u32, key: u32, padded: bool) -> (bool, bool) {
        let disallowed = padded | (self.causal & (query < key));
        let own = self.self_mask & (query == key);
        (disallowed, own)
    }
}

dispatch_simd! {
    /// Replaces the disallowed scores of one query's row, turns the row into probabilities in
    /// place and returns their logsumexp, as [`super::softmax_with_lse`] does: `p = exp(s - max)
    /// * exp(max - lse)` with `lse = max + ln(sum(exp(s - max)))` and exponents floored at
    /// [`EXP_FLOOR`].
    fn mask_softmax(scores: &mut [f32], query: u32, keys: &Keys) -> f32 => mask_softmax_portable
}

/// Computes [`mask_softmax`]. It is inlined into each instruction-set variant, so its loops
/// vectorise for that set.
#[inline(always)]
fn mask_softmax_portable(scores: &mut [f32], query: u32, keys: &Keys) -> f32 {
    for ((score, &key), &padded) in scores.iter_mut().zip(keys.positions).zip(keys.padded) {
        let (disallowed, own) = keys.rules(query, key, padded);
        let value = if disallowed { MASK_VALUE } else { *score };
        *score = if own { SELF_MASK_VALUE } else { value };
    }
    softmax_portable(scores)
}

dispatch_simd! {
    /// Turns the gradient of one query's probabilities into the gradient of its scores, in
    /// place: `dS = P * (dP - sum(P * dP) + dlse)`, zero where a score was replaced (it no
    /// longer depends on the query or key).
    fn score_grads(grads: &mut [f32], probs: &[f32], grad_lse: f32, query: u32, keys: &Keys) => score_grads_portable
}

/// Computes [`score_grads`], inlined into each instruction-set variant.
#[inline(always)]
fn score_grads_portable(grads: &mut [f32], probs: &[f32], grad_lse: f32, query: u32, keys: &Keys) {
    let shift = grad_lse - lane_dot(probs, grads);
    for (((grad, &p), &key), &padded) in grads.iter_mut().zip(probs).zip(keys.positions).zip(keys.padded) {
        let (disallowed, own) = keys.rules(query, key, padded);
        *grad = if disallowed | own { 0.0 } else { p * (*grad + shift) };
    }
}

/// Turns one row of scores into probabilities in place and returns their logsumexp (the
/// softmax of [`mask_softmax`]).
#[cfg(test)]
fn softmax_in_place(scores: &mut [f32]) -> f32 {
    softmax_portable(scores)
}

/// Computes the softmax of [`mask_softmax`] on a row whose scores are already replaced.
#[inline(always)]
fn softmax_portable(scores: &mut [f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = scores.chunks_exact(16);
    let mut max = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &s| if s > m { s } else { m });
    for chunk in chunks {
        for l in 0..16 {
            lanes[l] = if chunk[l] > lanes[l] { chunk[l] } else { lanes[l] };
        }
    }
    for lane in lanes {
        max = if lane > max { lane } else { max };
    }

    let mut sums = [0f32; 16];
    let mut tail = 0f32;
    let mut chunks = scores.chunks_exact_mut(16);
    for chunk in &mut chunks {
        for l in 0..16 {
            chunk[l] = exp_floored(chunk[l] - max);
            sums[l] += chunk[l];
        }
    }
    for s in chunks.into_remainder() {
        *s = exp_floored(*s - max);
        tail += *s;
    }
    let lse = max + (sums.iter().sum::<f32>() + tail).ln();
    let scale = (max - lse).exp();
    for s in scores.iter_mut() {
        *s *= scale;
    }
    lse
}

/// Returns `exp(max(x, EXP_FLOOR))` for `x <= 0`, branch-free so that it vectorises. It splits
/// `x = n ln 2 + r` with `|r| <= ln 2 / 2`, takes `exp(r)` from its Taylor polynomial of degree
/// 7 (truncation error below 1e-8 there) and builds `2^n` in the exponent bits.
#[inline(always)]
fn exp_floored(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two (Cody and Waite), so that `n * LN2_HI` is exact for the n used here.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer in f32.
    const ROUND: f32 = 12_582_912.0;
    let x = if x < EXP_FLOOR { EXP_FLOOR } else { x };
    let rounded = x * LOG2_E + ROUND;
    let n = rounded - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // `rounded` is ROUND + n exactly, so its bits are ROUND's plus n: integer steps give the
    // exponent bits of 2^n without a float-to-int conversion, which would not vectorise. n lies
    // in [-116, 0] here, so 2^n is a normal f32.
    let exponent = rounded.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23;
    p * f32::from_bits(exponent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_floored_matches_std() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -80.0 * i as f32 / 200_000.0;
            let expected = x.exp();
            worst = worst.max(((exp_floored(x) - expected) / expected).abs());
        }
        assert!(worst < 4e-7, "largest relative error {worst}");
        assert_eq!(exp_floored(-1e9), (-80f32).exp());
        assert_eq!(exp_floored(0.0), 1.0);
    }

    #[test]
    fn softmax_in_place_matches_definition() {
        for len in [1, 7, 16, 33, 128] {
            let scores: Vec<f32> = (0..len).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7).collect();
            let mut probs = scores.clone();
            let lse = softmax_in_place(&mut probs);
            let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let expected_lse = max + scores.iter().map(|s| (s - max).exp()).sum::<f32>().ln();
            assert!((lse - expected_lse).abs() < 1e-5, "len {len}: lse {lse} vs {expected_lse}");
            for (p, s) in probs.iter().zip(&scores) {
                assert!((p - (s - expected_lse).exp()).abs() < 1e-6, "len {len}");
            }
        }
    }
}
