//! Memory estimates, checked before allocating.
//!
//! A failed allocation aborts a Rust process without a message, so sizes a user picks (a
//! config's widths, a batch size, a sequence length) are checked against the memory the
//! machine has before anything is allocated. The estimates count only the largest tensors, so
//! they are lower bounds. A run they reject could never have fitted. A run they accept can
//! still need up to about twice the estimate (compared with `reformer-bench memory` figures
//! in BENCHMARKS.md).
//!
//! Only host memory is known here. On wgpu, tensors live in the adapter's memory and the
//! checks cover the host side (weights are drawn on the host before upload).

use crate::config::{AttentionKind, ReformerConfig};

const GIB: f64 = (1u64 << 30) as f64;
/// Bytes of one f32 value.
const F32: f64 = 4.0;

/// A size the machine cannot hold.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "{what} needs at least {needed:.1} GiB (estimate) but this machine has {available:.1} GiB available; {fix}",
    needed = needed_bytes / GIB,
    available = available_bytes / GIB
)]
pub struct MemoryError {
    /// Request that does not fit, with its values.
    pub what: String,
    /// Estimated bytes.
    pub needed_bytes: f64,
    /// Bytes available on the machine.
    pub available_bytes: f64,
    /// Fix to apply.
    pub fix: String,
}

/// Keeps freed memory in the process instead of returning it to the kernel after each tensor
/// operation. With glibc's defaults every tensor above 32 MiB is a fresh `mmap`, so each
/// operation pays for page faults and zeroing, and `munmap` on free. Raising the mmap and trim
/// thresholds made one training step of the speed benchmark (2 layers, 32 x 1024 tokens, Flex)
/// about 38% faster at 13% more peak memory (BENCHMARKS.md). The binaries call this first;
/// it does nothing on other C libraries.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // Allocations below 1 GiB come from the heap, and the heap is trimmed only when 2 GiB
        // at its top are free.
        // SAFETY: mallopt only changes glibc's allocation thresholds; it is called before
        // this process allocates tensors.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

/// Returns the memory available to a new allocation in bytes (`MemAvailable` of
/// `/proc/meminfo`), or `None` where it cannot be read (then no check is made).
pub fn available_bytes() -> Option<f64> {
    meminfo_bytes("MemAvailable")
}

/// Returns the machine's total memory in bytes (`MemTotal` of `/proc/meminfo`), or `None`
/// where it cannot be read.
pub fn total_bytes() -> Option<f64> {
    meminfo_bytes("MemTotal")
}

/// Reads one `/proc/meminfo` entry, given there in KiB, as bytes.
fn meminfo_bytes(key: &str) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let rest = text.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))?;
    let kib: f64 = rest.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024.0)
}

/// Fails when `needed_bytes` exceeds the memory available.
pub fn check_fits(needed_bytes: f64, what: impl FnOnce() -> String, fix: impl FnOnce() -> String) -> Result<(), MemoryError> {
    match available_bytes() {
        Some(available) if needed_bytes > available => Err(MemoryError {
            what: what(),
            needed_bytes,
            available_bytes: available,
            fix: fix(),
        }),
        _ => Ok(()),
    }
}

/// Returns the number of parameters a model of `config` has, computed in floating point so
/// that absurd configs cannot overflow.
pub fn parameter_count(config: &ReformerConfig) -> f64 {
    let d = config.hidden_size as f64;
    let heads = config.all_head_size() as f64;
    let vocab = config.vocab_size as f64;
    let ff = config.feed_forward_size as f64;
    let positions = if config.axial_pos_embds {
        config.axial_pos_shape.iter().zip(&config.axial_pos_embds_dim).map(|(&a, &w)| a as f64 * w as f64).sum()
    } else {
        config.max_position_embeddings as f64 * d
    };
    let layers: f64 = config
        .attn_layers
        .iter()
        .map(|kind| {
            let projections = match kind {
                AttentionKind::Lsh => 3.0,
                AttentionKind::Local => 4.0,
            };
            // Two LayerNorms, the attention projections and the feed-forward block.
            4.0 * d + projections * d * heads + (d * ff + ff) + (ff * d + d)
        })
        .sum();
    // Token embeddings, positions, layers, final LayerNorm over 2d and the LM head.
    vocab * d + positions + layers + 4.0 * d + (2.0 * d * vocab + vocab)
}

/// Returns the bytes of the largest tensors of one forward pass (`training = false`) or one
/// training step with Adam (`training = true`) on `batch_size` sequences of `seq_len` tokens.
///
/// Counted: weights (and in training their gradients and Adam's two moments), the logits and
/// their softmax, and per layer the attention scores, the gathered keys and values and the
/// feed-forward activations. In training, the reversible node keeps each layer's output pair
/// and one layer's working set at a time; plain autodiff keeps every layer's working set.
pub fn step_bytes(config: &ReformerConfig, batch_size: usize, seq_len: usize, training: bool, reversible: bool) -> f64 {
    let batch = batch_size as f64;
    let len = config.padded_len(seq_len) as f64;
    let tokens = batch * len;
    let d = config.hidden_size as f64;
    let heads = config.num_attention_heads as f64;
    let head_size = config.attention_head_size as f64;
    let weights = parameter_count(config) * F32 * if training { 4.0 } else { 1.0 };
    let logits = tokens * config.vocab_size as f64 * F32 * if training { 3.0 } else { 2.0 };
    let layer = |kind: &AttentionKind| {
        let (rounds, chunk, window) = match kind {
            AttentionKind::Lsh => (
                config.num_hashes as f64,
                config.lsh_attn_chunk_length as f64,
                (1 + config.lsh_num_chunks_before + config.lsh_num_chunks_after) as f64,
            ),
            AttentionKind::Local => (
                1.0,
                config.local_attn_chunk_length as f64,
                (1 + config.local_num_chunks_before + config.local_num_chunks_after) as f64,
            ),
        };
        let chunk = chunk.min(len);
        let scores = tokens * heads * rounds * chunk * window * F32 * 2.0;
        let gathered = tokens * heads * rounds * head_size * window * F32 * 2.0;
        let ff_width = if config.chunk_size_feed_forward > 0 {
            (config.chunk_size_feed_forward as f64 / len).min(1.0) * config.feed_forward_size as f64
        } else {
            config.feed_forward_size as f64
        };
        scores + gathered + tokens * ff_width * F32 * 2.0
    };
    let working: Vec<f64> = config.attn_layers.iter().map(layer).collect();
    let largest = working.iter().cloned().fold(0.0, f64::max);
    let stream = tokens * 2.0 * d * F32;
    let activations = if !training {
        largest + stream
    } else if reversible {
        // Each layer's output pair, and one layer's forward and backward working set.
        stream * config.num_layers() as f64 + 2.0 * largest
    } else {
        working.iter().sum::<f64>() + stream * config.num_layers() as f64
    };
    weights + logits + activations
}

/// Returns the extra bytes when the LSH layers attend exactly over all positions (one layer's
/// `[batch, heads, len, len]` scores and probabilities at a time, and their gradients in
/// training).
pub fn full_attention_bytes(config: &ReformerConfig, batch_size: usize, seq_len: usize, training: bool) -> f64 {
    let len = seq_len as f64;
    let scores = batch_size as f64 * config.num_attention_heads as f64 * len * len * F32;
    scores * if training { 4.0 } else { 2.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::test_device;
    use crate::ReformerLm;
    use burn::module::Module;

    #[test]
    fn parameter_count_matches_the_model() {
        for axial in [true, false] {
            let config = ReformerConfig {
                attn_layers: vec![AttentionKind::Local, AttentionKind::Lsh, AttentionKind::Lsh],
                axial_pos_embds: axial,
                axial_pos_shape: vec![8, 16],
                axial_pos_embds_dim: vec![16, 16],
                max_position_embeddings: 128,
                hidden_size: 32,
                num_attention_heads: 2,
                attention_head_size: 8,
                feed_forward_size: 40,
                vocab_size: 30,
                lsh_attn_chunk_length: 16,
                local_attn_chunk_length: 16,
                num_buckets: None,
                ..ReformerConfig::default()
            };
            let model = ReformerLm::new(&config, 0, &test_device()).unwrap();
            assert_eq!(parameter_count(&config), model.num_params() as f64, "axial = {axial}");
        }
    }

    #[test]
    fn absurd_sizes_do_not_fit() {
        let config = ReformerConfig { vocab_size: 1 << 40, ..ReformerConfig::default() };
        let needed = parameter_count(&config) * F32;
        let error = check_fits(needed, || "vocab_size 2^40".into(), || "lower it".into()).unwrap_err();
        assert!(error.to_string().starts_with("vocab_size 2^40 needs at least"), "{error}");
        assert!(check_fits(1024.0, || unreachable!(), || unreachable!()).is_ok());
    }

    #[test]
    fn training_estimate_orders_as_measured() {
        let config = ReformerConfig::default();
        let infer = step_bytes(&config, 1, 16384, false, true);
        let reversible = step_bytes(&config, 1, 16384, true, true);
        let plain = step_bytes(&config, 1, 16384, true, false);
        assert!(infer < reversible && reversible < plain, "{infer} {reversible} {plain}");
        assert!(step_bytes(&config, 2, 16384, true, true) > reversible);
    }
}
