//! Parity with Hugging Face transformers 5.25 on the fixtures that
//! `assets/hf-fixtures/generate.py` wrote. Each case's checkpoint is imported and run on the
//! same inputs with the rotations HF drew. The outputs are compared with HF's bucket ids,
//! logits (or hidden states), training loss and gradients.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::TensorData;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::config::AttentionKind;
use crate::context::{BucketMemo, ForwardContext, KeyMask};
use crate::decode::Decoder;
use crate::hf::{HfArchitecture, HfCheckpoint, key_table, load_hf_checkpoint};
use crate::loss::{causal_lm_outputs, weighted_cross_entropy};
use crate::testing::{GradSource, ParamGrad, grads_by_path, test_device};

/// Gradients must agree to this fraction of the largest reference entry.
const GRADIENT_TOLERANCE: f32 = 1e-4;

fn fixture_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/hf-fixtures").join(case)
}

/// A tensor read from a fixture file.
struct Stored {
    shape: Vec<usize>,
    floats: Vec<f32>,
    ints: Vec<i64>,
}

/// Reads every tensor of a safetensors fixture by name.
fn read_tensors(path: &Path) -> HashMap<String, Stored> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let file = SafeTensors::deserialize(&bytes).expect("a safetensors fixture");
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let (floats, ints) = match view.dtype() {
                Dtype::F32 => (data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(), vec![]),
                Dtype::I64 => (vec![], data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (name, Stored { shape: view.shape().to_vec(), floats, ints })
        })
        .collect()
}

fn read_meta(case: &str) -> Value {
    let text = std::fs::read_to_string(fixture_dir(case).join("meta.json")).expect("meta.json");
    serde_json::from_str(&text).expect("meta.json is JSON")
}

/// Returns the `layers.<i>.rotations` tensors as injectable rotations.
fn rotations(tensors: &HashMap<String, Stored>) -> HashMap<usize, crate::context::Rotations> {
    tensors
        .iter()
        .filter_map(|(name, stored)| {
            let layer = name.strip_prefix("layers.")?.strip_suffix(".rotations")?.parse().ok()?;
            let shape = stored.shape.clone().try_into().expect("rotations have rank 4");
            Some((layer, crate::context::Rotations { shape, values: Arc::new(stored.floats.clone()) }))
        })
        .collect()
}

fn ids_tensor(stored: &Stored, device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(stored.ints.clone(), [stored.shape[0], stored.shape[1]]), device)
}

fn key_mask(stored: &Stored) -> KeyMask {
    KeyMask::new(stored.shape[0], stored.shape[1], stored.ints.iter().map(|&v| v != 0).collect())
}

fn max_abs(values: &[f32]) -> f32 {
    values.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// Runs a case's eval reference: bucket ids first (a flipped bucket changes whole rows),
/// then logits or hidden states to 1e-5 of max(1, max |value|).
fn check_eval(case: &str) {
    let device = test_device();
    let dir = fixture_dir(case);
    let HfCheckpoint { model, architecture, report } = load_hf_checkpoint(&dir, &device, false).unwrap();
    assert!(report.is_complete(), "{case}: {report}");
    let meta = read_meta(case);
    assert_eq!(architecture.class_name(), meta["model_class"].as_str().unwrap(), "{case}: class");

    let tensors = read_tensors(&dir.join("case.safetensors"));
    let ids = ids_tensor(&tensors["input_ids"], &device);
    let mask = tensors.get("attention_mask").map(key_mask);
    let memo = Arc::new(BucketMemo::default());
    let ctx = ForwardContext {
        rotations: Some(Arc::new(rotations(&tensors))),
        num_hashes: meta["eval"]["forward_kwargs"]["num_hashes"].as_u64().map(|n| n as usize),
        buckets: Some(memo.clone()),
        ..ForwardContext::eval(0)
    };

    let (output, expected) = match architecture {
        HfArchitecture::Base => (model.hidden_states(ids, mask.as_ref(), &ctx).unwrap(), &tensors["last_hidden_state"]),
        _ => (model.forward(ids, mask.as_ref(), &ctx).unwrap(), &tensors["logits"]),
    };
    check_buckets(case, &model.config().attn_layers, &tensors, &memo, &meta["eval"]["hashed_layers"]);

    assert_eq!(output.dims().to_vec(), expected.shape, "{case}: output shape");
    let output: Vec<f32> = output.try_into_vec_as::<f32>().unwrap();
    let worst = output.iter().zip(&expected.floats).fold(0.0f32, |m, (a, e)| m.max((a - e).abs()));
    let allowed = 1e-5 * max_abs(&expected.floats).max(1.0);
    assert!(worst <= allowed, "{case}: max |difference| {worst:e} exceeds {allowed:e}");
}

/// Replays a cached-generation case: the prompt through [`Decoder::new`], then HF's greedy
/// tokens one [`Decoder::step`] at a time, comparing each step's logits with HF's cached ones
/// to 1e-4 of max(1, max |logit|).
fn check_cached_generation(case: &str) {
    let device = test_device();
    let dir = fixture_dir(case);
    let HfCheckpoint { model, report, .. } = load_hf_checkpoint(&dir, &device, false).unwrap();
    assert!(report.is_complete(), "{case}: {report}");
    let meta = read_meta(case);
    let prompt_len = meta["prompt_length"].as_u64().unwrap() as usize;
    let tensors = read_tensors(&dir.join("case.safetensors"));
    let ids = &tensors["input_ids"].ints;
    let expected = &tensors["step_logits"];
    let vocab_size = model.config().vocab_size;
    assert_eq!(expected.shape, vec![ids.len() - prompt_len + 1, vocab_size], "{case}: step_logits shape");
    let ctx = ForwardContext { rotations: Some(Arc::new(rotations(&tensors))), ..ForwardContext::eval(0) };

    let (mut decoder, first) = Decoder::new(&model, &[ids[..prompt_len].to_vec()], &ctx).unwrap();
    let mut logits = first.into_iter().next().unwrap();
    for (step, reference) in expected.floats.chunks(vocab_size).enumerate() {
        let worst = logits.iter().zip(reference).fold(0.0f32, |m, (a, e)| m.max((a - e).abs()));
        let allowed = 1e-4 * max_abs(reference).max(1.0);
        assert!(worst <= allowed, "{case}, step {step}: max |difference| {worst:e} exceeds {allowed:e}");
        if let Some(&token) = ids.get(prompt_len + step) {
            logits = decoder.step(&[0], &[token]).unwrap().remove(0);
        }
    }
}

/// Compares the bucket ids each LSH layer stored with HF's `layers.<i>.buckets`
/// (`[batch_size, n_heads, n_hashes, padded_len]`, without round offsets).
fn check_buckets(
    case: &str,
    attn_layers: &[AttentionKind],
    tensors: &HashMap<String, Stored>,
    memo: &BucketMemo,
    hashed_layers: &Value,
) {
    for (layer, kind) in attn_layers.iter().enumerate() {
        let Some(expected) = tensors.get(&format!("layers.{layer}.buckets")) else {
            continue;
        };
        assert_eq!(*kind, AttentionKind::Lsh, "{case}: buckets for a local layer {layer}");
        let ours = memo.get(layer).unwrap_or_else(|| panic!("{case}: layer {layer} did not hash"));
        let [_, _, n_hashes, seq_len] = expected.shape[..] else { panic!("{case}: bucket rank") };
        assert_eq!(ours.len(), expected.ints.len(), "{case}: layer {layer} bucket count");
        // Round r's ids are offset by r * stride, with HF's stride (buckets, plus the pad bucket).
        let stride = hashed_layers[layer.to_string()]["round_stride"].as_i64().expect("round_stride in meta.json");
        for (slot, (&ours, &hf)) in ours.iter().zip(&expected.ints).enumerate() {
            let round = (slot / seq_len) % n_hashes;
            let bucket = i64::from(ours) - (round as i64) * stride;
            assert_eq!(bucket, hf, "{case}: layer {layer}, slot {slot} (round {round}): bucket {bucket}, HF {hf}");
        }
    }
}

/// Runs a case's training reference: loss to 1e-5 relative and the recorded gradients to
/// [`GRADIENT_TOLERANCE`] of their largest entry.
fn check_train(case: &str) {
    let device = test_device().autodiff();
    let dir = fixture_dir(case);
    let HfCheckpoint { model, architecture, .. } = load_hf_checkpoint(&dir, &device, false).unwrap();
    let tensors = read_tensors(&dir.join("train.safetensors"));
    let ids = ids_tensor(&tensors["input_ids"], &device);
    let [batch_size, seq_len] = ids.dims();
    let ctx = ForwardContext { rotations: Some(Arc::new(rotations(&tensors))), ..ForwardContext::train(0, 0) };

    let weights = Tensor::<2>::ones([batch_size, seq_len], &device);
    let (logits, targets, weights) = causal_lm_outputs(&model, ids, weights, &ctx).unwrap();
    let loss = weighted_cross_entropy(logits, targets, weights);
    let loss_value = loss.clone().into_scalar::<f32>();
    let expected_loss = tensors["loss"].floats[0];
    assert!((loss_value - expected_loss).abs() <= 1e-5 * expected_loss.abs(), "{case}: loss {loss_value}, HF {expected_loss}");

    let grads = loss.backward();
    let ours: HashMap<String, ParamGrad> = grads_by_path(&model, GradSource::Backward(&grads))
        .into_iter()
        .filter_map(|(path, grad)| Some((path, grad?)))
        .collect();
    let paths: HashMap<String, String> = key_table(model.config(), architecture, false)
        .into_iter()
        .map(|entry| (entry.hf, entry.path))
        .collect();
    let mut checked = 0;
    for (name, expected) in &tensors {
        let Some(hf_name) = name.strip_prefix("grad.") else { continue };
        let path = &paths[hf_name];
        let (shape, grad) = ours.get(path).unwrap_or_else(|| panic!("{case}: no gradient for {path}"));
        // Linear weights are [in, out] here and [out, in] in PyTorch.
        let grad = if path.ends_with(".weight") && !path.starts_with("embeddings") && shape.len() == 2 {
            transpose(grad, shape[0], shape[1])
        } else {
            grad.clone()
        };
        let scale = max_abs(&expected.floats);
        let worst = grad.iter().zip(&expected.floats).fold(0.0f32, |m, (a, e)| m.max((a - e).abs()));
        assert!(
            worst <= GRADIENT_TOLERANCE * scale,
            "{case}: gradient of {hf_name} differs by {worst:e}, more than {GRADIENT_TOLERANCE:e} of {scale:e}"
        );
        checked += 1;
    }
    assert!(checked >= 5, "{case}: only {checked} gradients compared");
}

fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols).flat_map(|c| (0..rows).map(move |r| values[r * cols + c])).collect()
}

#[test]
fn enwik8_small_logits() {
    check_eval("enwik8_small");
}

#[test]
fn enwik8_small_gradients() {
    check_train("enwik8_small");
}

#[test]
fn crime_small_logits() {
    check_eval("crime_small");
}

#[test]
fn crime_small_gradients() {
    check_train("crime_small");
}

#[test]
fn local_causal_padded_logits() {
    check_eval("local_causal_padded");
}

#[test]
fn lsh_masked_lm_logits() {
    check_eval("lsh_masked_lm");
}

#[test]
fn short_sequence_logits() {
    check_eval("short_sequence");
}

#[test]
fn factorised_uneven_logits() {
    check_eval("factorised_uneven");
}

#[test]
fn hashes_override_logits() {
    check_eval("hashes_override");
}

#[test]
fn bare_model_hidden_states() {
    check_eval("bare_model");
}

#[test]
fn self_only_rows_logits() {
    check_eval("self_only_rows");
}

#[test]
fn bucket_ties_logits() {
    check_eval("bucket_ties");
}

#[test]
fn wrap_rounds_logits() {
    check_eval("wrap_rounds");
}

#[test]
fn cached_generation_logits() {
    check_cached_generation("cached_generation");
}

#[test]
fn cached_generation_short_prompt_logits() {
    check_cached_generation("cached_generation_short_prompt");
}
