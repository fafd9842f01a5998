//! Incremental decoding: a per-row cache that makes each generated token cost about one
//! attention window instead of a pass over the whole prefix.
//!
//! A prompt runs once through the ordinary forward pass ([`Decoder::new`]), which fills one
//! cache per layer. Each later token then runs alone through the layers ([`Decoder::step`]):
//!
//! - A local layer keeps the scaled keys and the values of the positions a later query can
//!   see: its own chunk and `chunks_before` chunks back, plus the first `chunks_after` chunks
//!   that the last chunk reaches by wrapping around. The new token attends to exactly the keys
//!   a full recomputation would give it, so cached and recomputed logits agree.
//! - An LSH layer follows Hugging Face's `past_buckets_states` (transformers 5.25,
//!   `LSHSelfAttention.forward` with a cache and `_get_relevant_hid_states_and_buckets`): it
//!   keeps every past token's shared query-key vector, value and bucket per round. The new
//!   token is hashed with the prompt's rotations, placed after the past tokens of its bucket,
//!   and attends to the `(chunks_before + 1 + chunks_after) * chunk_len` tokens around it in
//!   that sorted order (wrapping around), with only its own key masked. A prompt of at most one
//!   chunk is not hashed: the layer then attends to every cached token until the cache reaches
//!   `chunk_len` tokens, hashes them all, and switches to buckets.
//!
//! Attention over the cache runs on the host, where the cache lives: appending to a host
//! vector is amortised O(1), while a device tensor would be copied whole. Projections,
//! feed-forward layers and the LM head run on the model's device.

use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::TensorData;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::attention::local::LocalSelfAttention;
use crate::attention::lsh::{LshSelfAttention, factorised_argmax};
use crate::attention::{SELF_MASK_VALUE, neighbour_chunk};
use crate::context::{BucketMemo, ForwardContext, KeyMask, LshMode, Rotations};
use crate::error::InputError;
use crate::model::{ReformerLm, check_num_hashes, check_token_ids};
use crate::sampling::SamplingPolicy;

/// Epsilon of the key normalisation (Hugging Face's `_len_norm`), as in LSH attention.
const KEY_NORM_EPS: f32 = 1e-6;

/// Lowest exponent in the cached softmax, as in the chunked one: masked keys get `exp(-80)`.
const EXP_FLOOR: f32 = -80.0;

/// Decoding state of a batch of sequences that grow one token per step.
///
/// Each row keeps its own cache and length, so prompts of different lengths decode together
/// and each row gets the numbers it would get alone.
pub struct Decoder<'a> {
    model: &'a ReformerLm,
    ctx: ForwardContext,
    rows: Vec<RowCache>,
}

/// Cache of one sequence: its length and one cache per layer.
struct RowCache {
    len: usize,
    layers: Vec<LayerCache>,
}

enum LayerCache {
    Local(LocalCache),
    Lsh(LshCache),
    /// An LSH layer under [`LshMode::Ablated`]: its output is zero and nothing is kept.
    Ablated,
}

/// Keys (already scaled by `1 / sqrt(d_head)`) and values of a local layer, each position a
/// row of `n_heads * d_head` values.
struct LocalCache {
    /// Positions `0..early_len`: the chunks the last chunk reaches by wrapping around.
    early_keys: Vec<f32>,
    early_values: Vec<f32>,
    early_len: usize,
    /// Positions `window_start..len`.
    keys: Vec<f32>,
    values: Vec<f32>,
    window_start: usize,
}

/// Shared query-key vectors, values and bucket ids of an LSH layer.
struct LshCache {
    /// `[len, n_heads * d_head]`, unnormalised, as the layer projects them.
    qk: Vec<f32>,
    values: Vec<f32>,
    /// Bucket ids per head and round, once the layer hashes; `None` while it attends to every
    /// cached token.
    buckets: Option<Vec<SortedBuckets>>,
    /// Hash settings; `None` under [`LshMode::Full`], which never hashes.
    hashing: Option<Hashing>,
}

/// Hash settings of an LSH layer's cache, fixed for the whole decoding.
struct Hashing {
    /// Rotations `[n_heads, d_head, n_hashes, rotation_size / 2]` used for every hash.
    rotations: Rotations,
    factors: Vec<usize>,
    n_buckets: usize,
    n_hashes: usize,
}

/// Positions of one head and round grouped by bucket id, in ascending position order: the
/// stable sort by bucket id that Hugging Face recomputes at every step, kept up to date.
/// Ids are stored densely from `base`, the lowest id the round can have.
struct SortedBuckets {
    base: u32,
    by_id: Vec<Vec<u32>>,
    max_id: u32,
}

impl SortedBuckets {
    fn new(base: u32) -> Self {
        Self { base, by_id: Vec::new(), max_id: base }
    }

    fn insert(&mut self, id: u32, position: u32) {
        let slot = (id - self.base) as usize;
        if slot >= self.by_id.len() {
            self.by_id.resize_with(slot + 1, Vec::new);
        }
        self.by_id[slot].push(position);
        self.max_id = self.max_id.max(id);
    }

    /// Returns the sorted index of the last position stored under `id`.
    fn index_of_last(&self, id: u32) -> usize {
        let slot = (id - self.base) as usize;
        let before: usize = self.by_id[..slot].iter().map(Vec::len).sum();
        before + self.by_id[slot].len() - 1
    }

    /// Returns the positions at sorted indices `start, start + 1, ...` (`count` of them), taken
    /// modulo `total`, the number of stored positions.
    fn positions_from(&self, start: i64, count: usize, total: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(count);
        let mut index = start.rem_euclid(total as i64) as usize;
        while out.len() < count {
            // Walk the buckets from the one holding `index` to the end of the order.
            let mut skipped = 0;
            for positions in &self.by_id {
                if index >= skipped + positions.len() {
                    skipped += positions.len();
                    continue;
                }
                for &position in &positions[index - skipped..] {
                    if out.len() == count {
                        break;
                    }
                    out.push(position);
                }
                index = skipped + positions.len();
                skipped = index;
                if out.len() == count {
                    break;
                }
            }
            index = 0;
        }
        out
    }
}

impl<'a> Decoder<'a> {
    /// Runs each prompt through the model, fills its cache, and returns the decoder with the
    /// logits of each prompt's last token.
    ///
    /// Prompts run one at a time, so a row's numbers do not depend on the others. A prompt
    /// longer than the model's maximum length is an error; callers keep only its last tokens.
    /// `ctx` is used in evaluation mode, whatever its training flag.
    ///
    /// # Shapes
    /// - output logits: `[batch_size][vocab_size]`
    pub fn new(
        model: &'a ReformerLm,
        prompts: &[Vec<i64>],
        ctx: &ForwardContext,
    ) -> Result<(Self, Vec<Vec<f32>>), InputError> {
        if prompts.is_empty() {
            return Err(InputError::Empty { batch_size: 0, seq_len: 0 });
        }
        check_num_hashes(ctx)?;
        let ctx = ForwardContext { training: false, buckets: None, ..ctx.clone() };
        let mut decoder = Self { model, ctx, rows: Vec::with_capacity(prompts.len()) };
        let mut logits = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let (row, row_logits) = decoder.prefill(prompt)?;
            decoder.rows.push(row);
            logits.push(row_logits);
        }
        Ok((decoder, logits))
    }

    /// Returns the number of tokens cached for `row`.
    pub fn len(&self, row: usize) -> usize {
        self.rows[row].len
    }

    /// Returns whether `row` can take another token (its length is below the maximum).
    pub fn has_room(&self, row: usize) -> bool {
        self.rows[row].len < self.model.config().max_seq_len()
    }

    /// Appends one token to each row in `rows` and returns the logits of those tokens, in the
    /// order of `rows`. The other rows are left as they are.
    ///
    /// # Shapes
    /// - `rows`, `tokens`: one entry per row to extend
    /// - output: `[rows.len()][vocab_size]`
    ///
    /// # Panics
    /// If `rows` and `tokens` differ in length, or `rows` repeats a row or names one that
    /// [`Decoder::new`] did not create.
    pub fn step(&mut self, rows: &[usize], tokens: &[i64]) -> Result<Vec<Vec<f32>>, InputError> {
        assert_eq!(rows.len(), tokens.len(), "{} rows but {} tokens", rows.len(), tokens.len());
        let mut seen = vec![false; self.rows.len()];
        for &row in rows {
            assert!(row < seen.len(), "row {row} does not exist: the decoder has {} rows", seen.len());
            assert!(!seen[row], "row {row} appears twice in {rows:?}");
            seen[row] = true;
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let model = self.model;
        let config = model.config();
        let vocab_size = config.vocab_size;
        check_token_ids(tokens, vocab_size)?;
        let max_len = config.max_seq_len();
        if let Some(&row) = rows.iter().find(|&&row| self.rows[row].len >= max_len) {
            return Err(InputError::TooLong { seq_len: self.rows[row].len + 1, max_len });
        }
        let device = model.embeddings.word.val().device();
        let batch_size = rows.len();
        let positions: Vec<usize> = rows.iter().map(|&row| self.rows[row].len).collect();

        let ids = Tensor::<2, Int>::from_data(TensorData::new(tokens.to_vec(), [batch_size, 1]), &device);
        let x = model.embeddings.forward_at(ids, &positions); // [batch_size, 1, d_model]
        let mut u = x.clone();
        let mut z = x;
        for (index, layer) in model.layers.iter().enumerate() {
            let attention = &layer.attention;
            let normed = attention.layer_norm.forward(z.clone()); // [batch_size, 1, d_model]
            let heads = match (&attention.lsh, &attention.local) {
                (Some(_), _) if self.ctx.lsh_mode == LshMode::Ablated => None,
                (Some(lsh), _) => Some(self.lsh_step(lsh, normed, rows, index)),
                (None, Some(local)) => Some(self.local_step(local, normed, rows, index)),
                (None, None) => unreachable!("an attention block has an LSH or a local attention"),
            };
            if let Some(heads) = heads {
                u = u + attention.output.forward(heads);
            }
            z = z + layer.feed_forward.forward(u.clone(), index, &self.ctx);
        }
        let hidden = model.layer_norm.forward(Tensor::cat(vec![u, z], 2)); // [batch_size, 1, 2 * d_model]
        let logits = model.lm_head.forward(hidden); // [batch_size, 1, vocab_size]
        for &row in rows {
            self.rows[row].len += 1;
        }
        Ok(rows_of(logits.reshape([batch_size, vocab_size]), vocab_size))
    }

    /// Runs one prompt through the layers, keeping what each layer's cache needs.
    fn prefill(&self, prompt: &[i64]) -> Result<(RowCache, Vec<f32>), InputError> {
        let model = self.model;
        let config = model.config();
        let device = model.embeddings.word.val().device();
        let seq_len = prompt.len();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(prompt.to_vec(), [1, seq_len]), &device);
        let (ids, mask) = model.prepare_input(ids, None)?;
        let [_, padded_len] = ids.dims();
        // The memo keeps the bucket ids each LSH layer hashed, to seed its cache.
        let memo = Arc::new(BucketMemo::default());
        let ctx = ForwardContext { buckets: Some(memo.clone()), ..self.ctx.clone() };

        let x = model.embeddings.forward(ids, &ctx);
        let mut u = x.clone();
        let mut z = x;
        let mut layers = Vec::with_capacity(model.layers.len());
        for (index, layer) in model.layers.iter().enumerate() {
            let attention = &layer.attention;
            if attention.lsh.is_some() && ctx.lsh_mode == LshMode::Ablated {
                layers.push(LayerCache::Ablated);
            } else {
                let normed = attention.layer_norm.forward(z.clone()); // [1, padded_len, d_model]
                // The forward pass first: it stores the LSH layer's bucket ids in the memo.
                u = u + attention.forward_normed(normed.clone(), mask.as_ref(), index, &ctx)?;
                layers.push(match (&attention.lsh, &attention.local) {
                    (Some(lsh), _) => LayerCache::Lsh(self.lsh_prefill(lsh, normed, seq_len, padded_len, index, &memo)?),
                    (None, Some(local)) => LayerCache::Local(local_prefill(local, normed, seq_len)),
                    (None, None) => unreachable!("an attention block has an LSH or a local attention"),
                });
            }
            z = z + layer.feed_forward.forward(u.clone(), index, &ctx);
        }
        let last = Tensor::cat(vec![u, z], 2).slice([0..1, seq_len - 1..seq_len]); // [1, 1, 2 * d_model]
        let logits = model.lm_head.forward(model.layer_norm.forward(last));
        let vocab_size = config.vocab_size;
        let logits = rows_of(logits.reshape([1, vocab_size]), vocab_size).remove(0);
        Ok((RowCache { len: seq_len, layers }, logits))
    }

    fn lsh_prefill(
        &self,
        lsh: &LshSelfAttention,
        normed: Tensor<3>,
        seq_len: usize,
        padded_len: usize,
        layer: usize,
        memo: &BucketMemo,
    ) -> Result<LshCache, InputError> {
        let s = lsh.settings();
        let width = s.n_heads * s.d_head;
        let n_hashes = self.ctx.num_hashes.unwrap_or(s.n_hashes);
        let qk = host_rows(lsh.query_key.forward(normed.clone()), seq_len, width);
        let values = host_rows(lsh.value.forward(normed), seq_len, width);
        let hashed = memo.get(layer);
        let hashing = if self.ctx.lsh_mode == LshMode::Hashed {
            // The bucket layout and rotations of the prompt's hashing. A prompt that was not
            // hashed takes those of the longest input, because the cache can grow to it.
            let layout_len = if hashed.is_some() { padded_len } else { self.model.config().max_seq_len() };
            let layout = lsh.buckets_for(layout_len);
            Some(Hashing {
                rotations: lsh.rotations(layout_len, n_hashes, layer, &self.ctx)?,
                factors: layout.factors(),
                n_buckets: layout.total(),
                n_hashes,
            })
        } else {
            None
        };
        let n_buckets = lsh.buckets_for(padded_len).total();
        let buckets = hashed.map(|ids| {
            // ids: [n_heads, n_hashes, padded_len] flattened; the padding is not cached, as in HF.
            let mut sorted: Vec<SortedBuckets> = (0..s.n_heads * n_hashes)
                .map(|head_round| SortedBuckets::new(round_base(head_round % n_hashes, n_buckets)))
                .collect();
            for (head_round, buckets) in sorted.iter_mut().enumerate() {
                let ids = &ids[head_round * padded_len..head_round * padded_len + seq_len];
                for (position, &id) in ids.iter().enumerate() {
                    buckets.insert(id, position as u32);
                }
            }
            sorted
        });
        Ok(LshCache { qk, values, buckets, hashing })
    }

    /// Attention of one new token per row in an LSH layer; returns `[rows, 1, n_heads * d_head]`.
    fn lsh_step(&mut self, lsh: &LshSelfAttention, normed: Tensor<3>, rows: &[usize], layer: usize) -> Tensor<3> {
        let s = lsh.settings();
        let (n_heads, d_head) = (s.n_heads, s.d_head);
        let width = n_heads * d_head;
        let device = normed.device();
        let projected = Tensor::cat(vec![lsh.query_key.forward(normed.clone()), lsh.value.forward(normed)], 2); // [rows, 1, 2 * width]
        let projected = host_rows(projected, rows.len(), 2 * width);

        let mut out = Vec::with_capacity(rows.len() * width);
        for (i, &row) in rows.iter().enumerate() {
            let position = self.rows[row].len;
            let LayerCache::Lsh(cache) = &mut self.rows[row].layers[layer] else {
                unreachable!("layer {layer} has an LSH cache");
            };
            let new = &projected[i * 2 * width..(i + 1) * 2 * width];
            cache.qk.extend_from_slice(&new[..width]);
            cache.values.extend_from_slice(&new[width..]);
            let total = position + 1;
            let window = (s.chunks_before + 1 + s.chunks_after) * s.chunk_len;

            match (&mut cache.buckets, &cache.hashing) {
                (Some(buckets), Some(hashing)) => {
                    // Hugging Face offsets round r's ids by r * n_buckets, or by
                    // r * (n_buckets + 1) when the prompt had a pad bucket. It picks the second
                    // when the largest cached id exceeds n_hashes * n_buckets - 1
                    // (`increase_num_buckets`), and so does this.
                    let largest = buckets.iter().map(|b| b.max_id).max().unwrap_or(0) as usize;
                    let stride = hashing.n_buckets + usize::from(largest > hashing.n_hashes * hashing.n_buckets - 1);
                    for head in 0..n_heads {
                        let query = &new[head * d_head..(head + 1) * d_head];
                        let mut rounds = Vec::with_capacity(hashing.n_hashes);
                        for round in 0..hashing.n_hashes {
                            let bucket = hash_one(query, &hashing.rotations, head, round, &hashing.factors);
                            let id = bucket + (round * stride) as u32;
                            let sorted = &mut buckets[head * hashing.n_hashes + round];
                            sorted.insert(id, position as u32);
                            let index = sorted.index_of_last(id) as i64;
                            let chunk_len = s.chunk_len as i64;
                            let start = (index / chunk_len - s.chunks_before as i64) * chunk_len;
                            let keys = sorted.positions_from(start, window, total);
                            rounds.push(attend(query, &keys, position, &cache.qk, &cache.values, head, d_head, true));
                        }
                        out.extend(combine_rounds(rounds, d_head));
                    }
                }
                (buckets, hashing) => {
                    debug_assert!(buckets.is_none(), "an LSH cache with buckets has hash settings");
                    let keys: Vec<u32> = (0..total as u32).collect();
                    for head in 0..n_heads {
                        let query = &new[head * d_head..(head + 1) * d_head];
                        let (head_out, _) = attend(query, &keys, position, &cache.qk, &cache.values, head, d_head, true);
                        out.extend(head_out);
                    }
                    // Once the cache has `chunk_len` tokens, all of them are hashed, at the same
                    // step as in HF.
                    if let Some(hashing) = hashing
                        && total >= s.chunk_len
                    {
                        let hashed = hash_all(&cache.qk, hashing, n_heads, d_head, total);
                        cache.buckets = Some(hashed);
                    }
                }
            }
        }
        Tensor::from_data(TensorData::new(out, [rows.len(), 1, width]), &device)
    }

    /// Attention of one new token per row in a local layer; returns `[rows, 1, n_heads * d_head]`.
    fn local_step(&mut self, local: &LocalSelfAttention, normed: Tensor<3>, rows: &[usize], layer: usize) -> Tensor<3> {
        let s = local.settings();
        let (n_heads, d_head) = (s.n_heads, s.d_head);
        let width = n_heads * d_head;
        let device = normed.device();
        let keys = local.key.forward(normed.clone()) / (d_head as f64).sqrt();
        let projected = Tensor::cat(vec![local.query.forward(normed.clone()), keys, local.value.forward(normed)], 2); // [rows, 1, 3 * width]
        let projected = host_rows(projected, rows.len(), 3 * width);
        let config = self.model.config();

        let mut out = Vec::with_capacity(rows.len() * width);
        for (i, &row) in rows.iter().enumerate() {
            let position = self.rows[row].len;
            let LayerCache::Local(cache) = &mut self.rows[row].layers[layer] else {
                unreachable!("layer {layer} has a local cache");
            };
            let new = &projected[i * 3 * width..(i + 1) * 3 * width];
            cache.push(position, &new[width..2 * width], &new[2 * width..], s.chunk_len, s.chunks_after, width);
            let visible = local_key_positions(position, config.padded_len(position + 1), s.chunk_len, s.chunks_before, s.chunks_after);
            for head in 0..n_heads {
                let query = &new[head * d_head..(head + 1) * d_head];
                let (scores, values): (Vec<f32>, Vec<&[f32]>) = visible
                    .iter()
                    .map(|&p| {
                        let (key, value) = cache.get(p as usize, width);
                        let range = head * d_head..(head + 1) * d_head;
                        (dot(query, &key[range.clone()]), &value[range])
                    })
                    .unzip();
                out.extend(softmax_average(scores, &values, d_head).0);
            }
            cache.trim(position + 1, s.chunk_len, s.chunks_before, width);
        }
        Tensor::from_data(TensorData::new(out, [rows.len(), 1, width]), &device)
    }
}

/// Builds the cache of a local layer from the prompt's normalised input.
fn local_prefill(local: &LocalSelfAttention, normed: Tensor<3>, seq_len: usize) -> LocalCache {
    let s = local.settings();
    let width = s.n_heads * s.d_head;
    let keys = host_rows(local.key.forward(normed.clone()) / (s.d_head as f64).sqrt(), seq_len, width);
    let values = host_rows(local.value.forward(normed), seq_len, width);
    let early_len = (s.chunks_after * s.chunk_len).min(seq_len);
    let mut cache = LocalCache {
        early_keys: keys[..early_len * width].to_vec(),
        early_values: values[..early_len * width].to_vec(),
        early_len,
        keys,
        values,
        window_start: 0,
    };
    cache.trim(seq_len, s.chunk_len, s.chunks_before, width);
    cache
}

impl LocalCache {
    /// Appends position `position`'s key and value.
    fn push(&mut self, position: usize, key: &[f32], value: &[f32], chunk_len: usize, chunks_after: usize, width: usize) {
        debug_assert_eq!(self.window_start + self.keys.len() / width, position, "local cache out of step");
        self.keys.extend_from_slice(key);
        self.values.extend_from_slice(value);
        if position < chunks_after * chunk_len && position == self.early_len {
            self.early_keys.extend_from_slice(key);
            self.early_values.extend_from_slice(value);
            self.early_len += 1;
        }
    }

    /// Returns the key and value rows of `position`.
    fn get(&self, position: usize, width: usize) -> (&[f32], &[f32]) {
        if position >= self.window_start {
            let offset = (position - self.window_start) * width;
            (&self.keys[offset..offset + width], &self.values[offset..offset + width])
        } else {
            assert!(position < self.early_len, "position {position} left the local cache (window from {})", self.window_start);
            let offset = position * width;
            (&self.early_keys[offset..offset + width], &self.early_values[offset..offset + width])
        }
    }

    /// Drops positions no later query can see through look-back: the next query, at `len` or
    /// later, reaches back to the start of chunk `len / chunk_len - chunks_before` at most.
    fn trim(&mut self, len: usize, chunk_len: usize, chunks_before: usize, width: usize) {
        let keep_from = (len / chunk_len).saturating_sub(chunks_before) * chunk_len;
        if keep_from > self.window_start {
            let drop = (keep_from - self.window_start) * width;
            self.keys.drain(..drop);
            self.values.drain(..drop);
            self.window_start = keep_from;
        }
    }
}

/// Returns the key positions, with repeats, visible to the query at `position` in a causal
/// local layer when the sequence ends at `position` and runs at `padded_len`: the chunks of
/// [`crate::attention::look_adjacent`]'s rule, without positions after the query.
fn local_key_positions(position: usize, padded_len: usize, chunk_len: usize, before: usize, after: usize) -> Vec<u32> {
    if padded_len <= chunk_len {
        // The whole sequence is one chunk without neighbours.
        return (0..=position as u32).collect();
    }
    let n_chunks = padded_len / chunk_len;
    let chunk = position / chunk_len;
    let mut keys = Vec::with_capacity((before + 1 + after) * chunk_len);
    for offset in -(before as i64)..=(after as i64) {
        let neighbour = neighbour_chunk(chunk, offset, n_chunks);
        let first = neighbour * chunk_len;
        keys.extend((first..(first + chunk_len).min(position + 1)).map(|p| p as u32));
    }
    keys
}

/// Hashes the first `total` cached vectors `qk` of an LSH layer (no padding bucket).
fn hash_all(qk: &[f32], hashing: &Hashing, n_heads: usize, d_head: usize, total: usize) -> Vec<SortedBuckets> {
    let width = n_heads * d_head;
    let mut sorted: Vec<SortedBuckets> = (0..n_heads * hashing.n_hashes)
        .map(|head_round| SortedBuckets::new(round_base(head_round % hashing.n_hashes, hashing.n_buckets)))
        .collect();
    for head in 0..n_heads {
        for round in 0..hashing.n_hashes {
            let buckets = &mut sorted[head * hashing.n_hashes + round];
            for position in 0..total {
                let vector = &qk[position * width + head * d_head..position * width + (head + 1) * d_head];
                let bucket = hash_one(vector, &hashing.rotations, head, round, &hashing.factors);
                buckets.insert(bucket + (round * hashing.n_buckets) as u32, position as u32);
            }
        }
    }
    sorted
}

/// Returns the lowest id of round `round`: its offset `round * stride` is at least
/// `round * n_buckets`, the stride being `n_buckets` or, with a pad bucket, one more.
fn round_base(round: usize, n_buckets: usize) -> u32 {
    (round * n_buckets) as u32
}

/// Returns the bucket of one vector of `head` in `round`: `vector · R[head, :, round, :]`, then
/// the factorised argmax of the LSH layer. Sums run in f64, so that only true near-ties can
/// come out differently from the device's matmul.
fn hash_one(vector: &[f32], rotations: &Rotations, head: usize, round: usize, factors: &[usize]) -> u32 {
    let [_, d_head, n_hashes, half] = rotations.shape;
    let projected: Vec<f32> = (0..half)
        .map(|k| {
            (0..d_head)
                .map(|j| f64::from(vector[j]) * f64::from(rotations.values[((head * d_head + j) * n_hashes + round) * half + k]))
                .sum::<f64>() as f32
        })
        .collect();
    factorised_argmax(&projected, factors)
}

/// Attends `query` to the cached shared-QK keys at `keys` of `head`: normalised keys, the
/// query's own key (`position`) scored [`SELF_MASK_VALUE`] when `self_mask`. Returns the output
/// and the logsumexp of the scores.
#[allow(clippy::too_many_arguments)]
fn attend(
    query: &[f32],
    keys: &[u32],
    position: usize,
    qk: &[f32],
    values: &[f32],
    head: usize,
    d_head: usize,
    self_mask: bool,
) -> (Vec<f32>, f32) {
    let width = qk.len() / (position + 1);
    let range = |p: u32| p as usize * width + head * d_head..p as usize * width + (head + 1) * d_head;
    let (scores, rows): (Vec<f32>, Vec<&[f32]>) = keys
        .iter()
        .map(|&p| {
            let score = if self_mask && p as usize == position {
                SELF_MASK_VALUE
            } else {
                let key = &qk[range(p)];
                let variance = key.iter().map(|x| x * x).sum::<f32>() / d_head as f32;
                let scale = 1.0 / (variance + KEY_NORM_EPS).sqrt() / (d_head as f32).sqrt();
                key.iter().zip(query).map(|(k, q)| k * scale * q).sum()
            };
            (score, &values[range(p)])
        })
        .unzip();
    softmax_average(scores, &rows, d_head)
}

/// Returns `sum_j softmax(scores)_j * values_j` and the logsumexp of `scores`, computed as the
/// chunked attention does: `exp(max(s - lse, -80))`.
fn softmax_average(scores: Vec<f32>, values: &[&[f32]], d_head: usize) -> (Vec<f32>, f32) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = scores.iter().map(|s| (s - max).max(EXP_FLOOR).exp()).sum();
    let lse = max + sum.ln();
    let mut out = vec![0.0f32; d_head];
    for (score, value) in scores.iter().zip(values) {
        let weight = (score - lse).max(EXP_FLOOR).exp();
        for (o, v) in out.iter_mut().zip(value.iter()) {
            *o += weight * v;
        }
    }
    (out, lse)
}

/// Combines the outputs of the hash rounds by their logsumexps, as chunked LSH attention does.
fn combine_rounds(rounds: Vec<(Vec<f32>, f32)>, d_head: usize) -> Vec<f32> {
    if rounds.len() == 1 {
        return rounds.into_iter().next().expect("one round").0;
    }
    let max = rounds.iter().map(|(_, lse)| *lse).fold(f32::NEG_INFINITY, f32::max);
    let total = max + rounds.iter().map(|(_, lse)| (lse - max).exp()).sum::<f32>().ln();
    let mut out = vec![0.0f32; d_head];
    for (round_out, lse) in &rounds {
        let weight = (lse - total).exp();
        for (o, v) in out.iter_mut().zip(round_out) {
            *o += weight * v;
        }
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Reads the first `len` positions of a `[1 or rows, len', width]` tensor to the host, one row
/// of `width` values per position.
fn host_rows(x: Tensor<3>, len: usize, width: usize) -> Vec<f32> {
    let [batch_size, seq_len, _] = x.dims();
    let x = if batch_size == 1 && seq_len > len { x.slice([0..1, 0..len]) } else { x };
    let values: Vec<f32> = x.try_into_vec_as::<f32>().expect("f32 data");
    debug_assert_eq!(values.len(), len * width);
    values
}

fn rows_of(logits: Tensor<2>, vocab_size: usize) -> Vec<Vec<f32>> {
    let values: Vec<f32> = logits.try_into_vec_as::<f32>().expect("f32 logits");
    values.chunks(vocab_size).map(<[f32]>::to_vec).collect()
}

/// Settings of [`generate`].
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Tokens to generate per prompt, at most.
    pub max_new_tokens: usize,
    /// Sampling policy (greedy by default).
    pub policy: SamplingPolicy,
    /// A prompt stops after producing this token.
    pub eos_token_id: Option<usize>,
    /// Decode with the cache ([`Decoder`]); `false` recomputes the whole sequence per token.
    pub use_cache: bool,
    /// Seed of each prompt's sampler. Every prompt gets a sampler seeded with it, so a prompt
    /// gets the same continuation alone or in a batch.
    pub seed: u64,
}

/// Continues each prompt token by token and returns the generated tokens of each.
///
/// `on_token(row, token)` is called for every token as soon as it is chosen, so a caller can
/// stream. With the cache, a sequence that reaches the model's maximum length goes on as
/// without it: the most recent `max_len` tokens are recomputed for each new token. Prompts
/// longer than that keep their last `max_len` tokens.
pub fn generate<E: From<InputError>>(
    model: &ReformerLm,
    prompts: &[Vec<i64>],
    options: &GenerateOptions,
    ctx: &ForwardContext,
    mut on_token: impl FnMut(usize, i64) -> Result<(), E>,
) -> Result<Vec<Vec<i64>>, E> {
    let max_len = model.config().max_seq_len();
    let recent = |ids: &[i64]| ids[ids.len().saturating_sub(max_len)..].to_vec();
    let recompute = |ids: &[i64]| -> Result<Vec<f32>, InputError> {
        let window = recent(ids);
        let device = model.embeddings.word.val().device();
        let seq_len = window.len();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(window, [1, seq_len]), &device);
        let logits = model.forward(ids, None, ctx)?.slice([0..1, seq_len - 1..seq_len]); // [1, 1, vocab_size]
        let vocab_size = model.config().vocab_size;
        Ok(rows_of(logits.reshape([1, vocab_size]), vocab_size).remove(0))
    };

    let mut sequences: Vec<Vec<i64>> = prompts.to_vec();
    let mut generated = vec![Vec::new(); prompts.len()];
    let mut rngs: Vec<StdRng> = prompts.iter().map(|_| StdRng::seed_from_u64(options.seed)).collect();
    let (mut decoder, mut logits) = if options.use_cache {
        let windows: Vec<Vec<i64>> = prompts.iter().map(|prompt| recent(prompt)).collect();
        let (decoder, logits) = Decoder::new(model, &windows, ctx)?;
        (Some(decoder), logits)
    } else {
        if prompts.is_empty() {
            return Err(InputError::Empty { batch_size: 0, seq_len: 0 }.into());
        }
        (None, prompts.iter().map(|prompt| recompute(prompt)).collect::<Result<_, _>>()?)
    };
    let mut active: Vec<usize> = (0..prompts.len()).collect();

    for step in 0..options.max_new_tokens {
        let mut still_active = Vec::with_capacity(active.len());
        for (&row, row_logits) in active.iter().zip(&logits) {
            let token = options.policy.sample(row_logits, &mut rngs[row]) as i64;
            sequences[row].push(token);
            generated[row].push(token);
            on_token(row, token)?;
            if options.eos_token_id != Some(token as usize) {
                still_active.push(row);
            }
        }
        active = still_active;
        if active.is_empty() || step + 1 == options.max_new_tokens {
            break;
        }

        // Rows with room in their cache take one cached step together; the others recompute.
        let (cached, full): (Vec<usize>, Vec<usize>) = match &decoder {
            Some(decoder) => active.iter().partition(|&&row| decoder.has_room(row)),
            None => (Vec::new(), active.clone()),
        };
        let tokens: Vec<i64> = cached.iter().map(|&row| *sequences[row].last().expect("a token was just added")).collect();
        let mut cached_logits = match &mut decoder {
            Some(decoder) => decoder.step(&cached, &tokens)?.into_iter(),
            None => Vec::new().into_iter(),
        };
        logits = Vec::with_capacity(active.len());
        for &row in &active {
            logits.push(if full.contains(&row) {
                recompute(&sequences[row])?
            } else {
                cached_logits.next().expect("one row of logits per cached row")
            });
        }
    }
    Ok(generated)
}

/// Splits a left-padded batch into its prompts: row `b` keeps the positions the mask marks as
/// real. This is how a batch padded for Hugging Face's `generate` is given to [`Decoder::new`].
///
/// # Shapes
/// - `ids`: `[batch_size * seq_len]`, row-major
/// - `mask`: `[batch_size, seq_len]`
pub fn prompts_from_padded(ids: &[i64], mask: &KeyMask) -> Result<Vec<Vec<i64>>, InputError> {
    let [batch_size, seq_len] = mask.dims();
    if ids.len() != batch_size * seq_len {
        return Err(InputError::MaskShape { mask_batch: batch_size, mask_len: seq_len, batch_size: ids.len() / seq_len.max(1), seq_len });
    }
    Ok((0..batch_size)
        .map(|b| (0..seq_len).filter(|&t| mask.is_valid(b, t)).map(|t| ids[b * seq_len + t]).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;
    use crate::config::{AttentionKind, ReformerConfig};
    use crate::testing::{assert_close, test_device};

    const VOCAB_SIZE: usize = 20;

    /// Returns a small causal config: 2 heads of 8, chunks of `chunk_len`, a maximum length of
    /// 64. The large initializer range makes attention peaked, so that a wrong key shows.
    fn config(attn_layers: Vec<AttentionKind>, chunk_len: usize, before: usize, after: usize) -> ReformerConfig {
        let config = ReformerConfig {
            attn_layers,
            hidden_size: 16,
            num_attention_heads: 2,
            attention_head_size: 8,
            num_hashes: 2,
            num_buckets: None,
            lsh_attn_chunk_length: chunk_len,
            local_attn_chunk_length: chunk_len,
            lsh_num_chunks_before: 1,
            lsh_num_chunks_after: 0,
            local_num_chunks_before: before,
            local_num_chunks_after: after,
            axial_pos_shape: vec![8, 8],
            axial_pos_embds_dim: vec![8, 8],
            max_position_embeddings: 64,
            feed_forward_size: 32,
            is_decoder: true,
            vocab_size: VOCAB_SIZE,
            initializer_range: 0.3,
            ..ReformerConfig::default()
        };
        config.validate().expect("the test config is valid");
        config
    }

    fn random_ids(len: usize, seed: u64) -> Vec<i64> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(0..VOCAB_SIZE as i64)).collect()
    }

    /// Returns the logits of the last token of `ids`, from a forward pass over all of them.
    fn recomputed(model: &ReformerLm, ids: &[i64], ctx: &ForwardContext) -> Vec<f32> {
        let device = test_device();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), &device);
        let logits = model.forward(ids, None, ctx).unwrap(); // [1, seq_len, vocab_size]
        let [_, seq_len, _] = logits.dims();
        rows_of(logits.slice([0..1, seq_len - 1..seq_len]).reshape([1, VOCAB_SIZE]), VOCAB_SIZE).remove(0)
    }

    /// Feeds `steps` random tokens after `prompt_len` random ones and checks every step's
    /// logits against a full recomputation.
    fn assert_cached_equals_recomputed(config: &ReformerConfig, prompt_len: usize, steps: usize, seed: u64) {
        let model = ReformerLm::new(config, seed, &test_device()).unwrap();
        let ctx = ForwardContext::eval(seed);
        let ids = random_ids(prompt_len + steps, seed + 100);
        let (mut decoder, logits) = Decoder::new(&model, &[ids[..prompt_len].to_vec()], &ctx).unwrap();
        assert_close(&logits[0], &recomputed(&model, &ids[..prompt_len], &ctx), 1e-4);
        for len in prompt_len + 1..=prompt_len + steps {
            let logits = decoder.step(&[0], &[ids[len - 1]]).unwrap();
            let expected = recomputed(&model, &ids[..len], &ctx);
            let difference = crate::testing::max_abs_diff(&logits[0], &expected);
            assert!(difference < 1e-4, "prompt {prompt_len}, length {len}: cached logits differ by {difference}");
        }
        assert_eq!(decoder.len(0), prompt_len + steps);
    }

    #[test]
    fn local_cache_equals_recomputation() {
        let local = config(vec![AttentionKind::Local, AttentionKind::Local], 4, 1, 0);
        for prompt_len in [1, 3, 4, 9] {
            assert_cached_equals_recomputed(&local, prompt_len, 14, prompt_len as u64);
        }
    }

    #[test]
    fn local_cache_repeated_and_wrapped_chunks() {
        // Two chunks back and one ahead: early queries get their own chunk more than once, and
        // the last chunk gets the first one again by wrapping around.
        let local = config(vec![AttentionKind::Local], 4, 2, 1);
        for prompt_len in [1, 6, 13] {
            assert_cached_equals_recomputed(&local, prompt_len, 20, 10 + prompt_len as u64);
        }
    }

    #[test]
    fn lsh_cache_within_one_chunk() {
        // Up to one chunk the LSH layer attends to every token, cached or not.
        let mixed = config(vec![AttentionKind::Local, AttentionKind::Lsh], 8, 1, 0);
        for prompt_len in [1, 3, 7] {
            assert_cached_equals_recomputed(&mixed, prompt_len, 8 - prompt_len, 20 + prompt_len as u64);
        }
    }

    fn greedy(model: &ReformerLm, prompts: &[Vec<i64>], use_cache: bool, max_new_tokens: usize) -> Vec<Vec<i64>> {
        let options = GenerateOptions {
            max_new_tokens,
            policy: SamplingPolicy::default(),
            eos_token_id: None,
            use_cache,
            seed: 0,
        };
        generate::<InputError>(model, prompts, &options, &ForwardContext::eval(3), |_, _| Ok(())).unwrap()
    }

    #[test]
    fn greedy_output_cache_independent() {
        let local = ReformerLm::new(&config(vec![AttentionKind::Local, AttentionKind::Local], 4, 1, 0), 1, &test_device()).unwrap();
        let prompts = [random_ids(5, 1)];
        assert_eq!(greedy(&local, &prompts, true, 30), greedy(&local, &prompts, false, 30));
        let mixed = ReformerLm::new(&config(vec![AttentionKind::Local, AttentionKind::Lsh], 8, 1, 0), 2, &test_device()).unwrap();
        let prompts = [random_ids(2, 2)];
        assert_eq!(greedy(&mixed, &prompts, true, 6), greedy(&mixed, &prompts, false, 6));
    }

    #[test]
    fn full_cache_falls_back_to_recomputation() {
        // 60 + 12 tokens pass the maximum of 64; past it both paths slide a 64-token window.
        let local = ReformerLm::new(&config(vec![AttentionKind::Local, AttentionKind::Local], 4, 1, 0), 3, &test_device()).unwrap();
        let prompts = [random_ids(60, 3), random_ids(70, 4)];
        assert_eq!(greedy(&local, &prompts, true, 12), greedy(&local, &prompts, false, 12));
    }

    #[test]
    fn batch_matches_one_prompt_at_a_time() {
        // Prompts below, at and above one chunk, so rows decode in different modes together.
        let mixed = config(vec![AttentionKind::Local, AttentionKind::Lsh, AttentionKind::Lsh], 8, 1, 0);
        let model = ReformerLm::new(&mixed, 4, &test_device()).unwrap();
        let ctx = ForwardContext::eval(5);
        let prompts = vec![random_ids(3, 5), random_ids(8, 6), random_ids(21, 7), random_ids(40, 8)];

        let batch = greedy(&model, &prompts, true, 15);
        for (prompt, continuation) in prompts.iter().zip(&batch) {
            assert_eq!(&greedy(&model, std::slice::from_ref(prompt), true, 15)[0], continuation);
        }

        // Step logits agree too, with rows stepping in another order and one row skipped.
        let (mut together, _) = Decoder::new(&model, &prompts, &ctx).unwrap();
        let mut alone: Vec<Decoder> = prompts.iter().map(|p| Decoder::new(&model, std::slice::from_ref(p), &ctx).unwrap().0).collect();
        for step in 0..10 {
            let rows: Vec<usize> = if step % 3 == 2 { vec![3, 0, 2] } else { vec![2, 1, 0, 3] };
            let tokens: Vec<i64> = rows.iter().map(|&row| ((row + step * 7) % VOCAB_SIZE) as i64).collect();
            let logits = together.step(&rows, &tokens).unwrap();
            for ((&row, &token), row_logits) in rows.iter().zip(&tokens).zip(&logits) {
                let expected = alone[row].step(&[0], &[token]).unwrap().remove(0);
                assert_close(row_logits, &expected, 1e-5);
            }
        }
    }

    #[test]
    fn left_padded_batch_splits_into_prompts() {
        let mask = KeyMask::from_lengths_left(&[2, 4, 1], 4);
        let ids = vec![0, 0, 5, 6, 1, 2, 3, 4, 0, 0, 0, 9];
        assert_eq!(prompts_from_padded(&ids, &mask).unwrap(), vec![vec![5, 6], vec![1, 2, 3, 4], vec![9]]);
    }

    #[test]
    fn sorted_buckets_wrap_around() {
        let mut buckets = SortedBuckets::new(2);
        // Stable order by id: positions 1, 3 (id 2), 0, 4 (id 5), 2 (id 7).
        for (position, id) in [(0, 5), (1, 2), (2, 7), (3, 2), (4, 5)] {
            buckets.insert(id, position);
        }
        assert_eq!(buckets.index_of_last(5), 3);
        assert_eq!(buckets.positions_from(0, 5, 5), vec![1, 3, 0, 4, 2]);
        assert_eq!(buckets.positions_from(-2, 4, 5), vec![4, 2, 1, 3]);
        assert_eq!(buckets.positions_from(3, 8, 5), vec![4, 2, 1, 3, 0, 4, 2, 1]);
    }

    #[test]
    #[should_panic(expected = "row 0 appears twice")]
    fn step_rejects_repeated_row() {
        let local = ReformerLm::new(&config(vec![AttentionKind::Local], 4, 1, 0), 5, &test_device()).unwrap();
        let (mut decoder, _) = Decoder::new(&local, &[random_ids(3, 9)], &ForwardContext::eval(0)).unwrap();
        let _ = decoder.step(&[0, 0], &[1, 2]);
    }

    #[test]
    fn bad_tokens_and_full_rows_are_errors() {
        let local = ReformerLm::new(&config(vec![AttentionKind::Local], 4, 1, 0), 5, &test_device()).unwrap();
        let ctx = ForwardContext::eval(0);
        let (mut decoder, _) = Decoder::new(&local, &[random_ids(64, 9)], &ctx).unwrap();
        assert!(!decoder.has_room(0));
        assert_eq!(decoder.step(&[0], &[1]).err(), Some(InputError::TooLong { seq_len: 65, max_len: 64 }));
        let (mut decoder, _) = Decoder::new(&local, &[random_ids(3, 9)], &ctx).unwrap();
        assert_eq!(decoder.step(&[0], &[VOCAB_SIZE as i64]).err(), Some(InputError::TokenOutOfRange { id: VOCAB_SIZE as i64, vocab_size: VOCAB_SIZE }));
        assert!(Decoder::new(&local, &[vec![]], &ctx).is_err());
    }
}
