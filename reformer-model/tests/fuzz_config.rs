//! Fuzzes the config parser and the model built from what it accepts: any JSON is either
//! rejected with an error or gives a model that runs on every input length it accepts,
//! masked or not, without a panic and with finite logits.

use burn::prelude::*;
use burn::tensor::TensorData;
use proptest::prelude::*;
use reformer_model::device::select_device;
use reformer_model::{ForwardContext, KeyMask, ReformerConfig, ReformerLm, memory};
use serde_json::{Value, json};

/// A small valid config that mutations start from.
fn base() -> Value {
    json!({
        "attn_layers": ["local", "lsh"],
        "hidden_size": 16,
        "num_attention_heads": 2,
        "attention_head_size": 4,
        "num_hashes": 2,
        "num_buckets": 4,
        "lsh_attn_chunk_length": 8,
        "local_attn_chunk_length": 8,
        "axial_pos_shape": [4, 8],
        "axial_pos_embds_dim": [8, 8],
        "max_position_embeddings": 32,
        "feed_forward_size": 16,
        "vocab_size": 11,
        "is_decoder": true
    })
}

const FIELDS: &[&str] = &[
    "attn_layers",
    "hidden_size",
    "num_attention_heads",
    "attention_head_size",
    "num_hashes",
    "num_buckets",
    "lsh_attn_chunk_length",
    "local_attn_chunk_length",
    "lsh_num_chunks_before",
    "lsh_num_chunks_after",
    "local_num_chunks_before",
    "local_num_chunks_after",
    "axial_pos_embds",
    "axial_pos_shape",
    "axial_pos_embds_dim",
    "max_position_embeddings",
    "feed_forward_size",
    "chunk_size_feed_forward",
    "hidden_act",
    "is_decoder",
    "hidden_dropout_prob",
    "lsh_attention_probs_dropout_prob",
    "vocab_size",
    "pad_token_id",
    "eos_token_id",
    "layer_norm_eps",
    "hash_seed",
    "initializer_range",
    "axial_norm_std",
    "not_a_field",
];

fn values() -> Vec<Value> {
    vec![
        json!(0), json!(1), json!(2), json!(3), json!(4), json!(5), json!(6), json!(8), json!(12), json!(16), json!(32),
        json!(64), json!(-1), json!(1e20), json!(0.5), json!(1e-12), json!(f64::MAX), json!(u64::MAX), Value::Null,
        json!(true), json!(false), json!("lsh"), json!("gelu"), json!("relu"), json!("swish"), json!(""), json!(["lsh"]),
        json!(["local"]), json!(["lsh", "lsh", "local"]), json!([]), json!(["attention"]), json!([4, 8]), json!([8, 4]),
        json!([2, 16]), json!([2, 2, 8]), json!([8, 8]), json!([16, 0]), json!([4]), json!([2, 4]), json!({}),
    ]
}

/// Runs the model on `seq_len` tokens, masked when `masked`, and checks the outcome.
fn run(model: &ReformerLm, batch: usize, seq_len: usize, masked: bool, device: &Device) -> Result<(), TestCaseError> {
    let vocab = model.config().vocab_size as i64;
    let ids: Vec<i64> = (0..batch * seq_len).map(|i| (i as i64 * 5 + 1) % vocab).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, seq_len]), device);
    let lengths: Vec<usize> = (0..batch).map(|row| (seq_len - row).max(1)).collect();
    let mask = masked.then(|| KeyMask::from_lengths(&lengths, seq_len));
    match model.forward(ids, mask.as_ref(), &ForwardContext::eval(1)) {
        Ok(logits) => {
            prop_assert_eq!(logits.dims(), [batch, seq_len, vocab as usize]);
            let values = logits.try_into_vec_as::<f32>().unwrap();
            prop_assert!(values.iter().all(|v| v.is_finite()), "non-finite logits at seq_len {}", seq_len);
        }
        Err(error) => prop_assert!(seq_len > model.config().max_seq_len(), "unexpected error at seq_len {}: {}", seq_len, error),
    }
    Ok(())
}

#[test]
fn base_config_is_valid() {
    ReformerConfig::from_json_str(&base().to_string()).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_config_is_rejected_or_runs(edits in proptest::collection::vec((0..FIELDS.len(), 0usize..1000), 0..4)) {
        let mut config = base();
        let pool = values();
        for (field, value) in &edits {
            config[FIELDS[*field]] = pool[value % pool.len()].clone();
        }
        let Ok(config) = ReformerConfig::from_json_str(&config.to_string()) else {
            return Ok(());
        };
        // Large valid configs are covered by the memory check; the fuzzer runs small ones.
        if memory::parameter_count(&config) > 2e5 || config.max_seq_len() > 256 {
            return Ok(());
        }
        let device = select_device("cpu").unwrap();
        let model = ReformerLm::new(&config, 0, &device).unwrap();
        let max_len = config.max_seq_len();
        let chunk = config.min_chunk_len();
        let mut lengths = vec![1, chunk.saturating_sub(1).max(1), chunk + 1, max_len, max_len + 1];
        lengths.dedup();
        for (i, &seq_len) in lengths.iter().enumerate() {
            run(&model, 1 + i % 2, seq_len, i % 2 == 1, &device)?;
        }
    }

    #[test]
    fn any_text_is_parsed_or_rejected(text in "\\PC{0,40}") {
        let _ = ReformerConfig::from_json_str(&text);
    }
}
