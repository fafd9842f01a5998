//! `reformer-infer` on Hugging Face checkpoints: the parity fixtures of `assets/hf-fixtures`
//! scored, generated from, converted to a run and exported back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::SafeTensors;
use safetensors::tensor::TensorView;

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/hf-fixtures").join(case)
}

fn infer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_reformer-infer")).args(args).output().expect("binary runs")
}

fn stdout_of(output: &Output) -> String {
    assert!(output.status.success(), "failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr_of(output: &Output) -> String {
    assert!(!output.status.success(), "succeeded unexpectedly: {}", String::from_utf8_lossy(&output.stdout));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(stderr.starts_with("error:"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// Writes the `layers.<i>.rotations` tensors of a case's eval reference to `path`.
fn write_case_rotations(case: &str, path: &Path) {
    let bytes = std::fs::read(fixture(case).join("case.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, TensorView<'_>)> = file
        .tensors()
        .into_iter()
        .filter(|(name, _)| name.ends_with(".rotations"))
        .collect();
    assert!(!views.is_empty());
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Returns HF's mean causal-LM loss over a case's eval input, from its reference logits.
fn reference_causal_loss(case: &str) -> f64 {
    let bytes = std::fs::read(fixture(case).join("case.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let tensors: HashMap<String, TensorView<'_>> = file.tensors().into_iter().collect();
    let ids: Vec<i64> = tensors["input_ids"].data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
    let logits: Vec<f32> = tensors["logits"].data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let vocab_size = tensors["logits"].shape()[2];
    let mut total = 0.0f64;
    for t in 0..ids.len() - 1 {
        let row = &logits[t * vocab_size..(t + 1) * vocab_size];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let log_sum = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
        total += log_sum - row[ids[t + 1] as usize] as f64;
    }
    total / (ids.len() - 1) as f64
}

#[test]
fn score_with_hf_rotations_matches_hf_loss() {
    let dir = tempfile::tempdir().unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("crime_small").join("meta.json")).unwrap()).unwrap();
    let text_path = dir.path().join("sample.txt");
    std::fs::write(&text_path, meta["sentencepiece"]["sample_text"].as_str().unwrap()).unwrap();
    let rotations = dir.path().join("rotations.safetensors");
    write_case_rotations("crime_small", &rotations);

    let output = infer(&[
        "score",
        "--hf",
        fixture("crime_small").to_str().unwrap(),
        "--rotations",
        rotations.to_str().unwrap(),
        "--json",
        text_path.to_str().unwrap(),
    ]);
    let stdout = stdout_of(&output);
    let total: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let loss = total["loss_nats"].as_f64().unwrap();
    let expected = reference_causal_loss("crime_small");
    assert!((loss - expected).abs() <= 1e-5 * expected, "loss {loss}, HF {expected}");
    assert_eq!(total["tokens"].as_u64().unwrap(), 26, "27 SentencePiece tokens, 26 predicted");
}

#[test]
fn masked_lm_scores_but_does_not_generate() {
    let dir = tempfile::tempdir().unwrap();
    // The masked-LM fixture has 48 ids, so the bytes must map below it (id = byte + 2).
    let text_path = dir.path().join("low.txt");
    std::fs::write(&text_path, "!#$%&()*+,-".repeat(4)).unwrap();
    let checkpoint = fixture("lsh_masked_lm");
    let checkpoint = checkpoint.to_str().unwrap();

    let stdout = stdout_of(&infer(&["score", "--hf", checkpoint, "--json", text_path.to_str().unwrap()]));
    let total: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(total["tokens"].as_u64().unwrap(), 44, "a masked LM scores every token, with no shift");

    let stderr = stderr_of(&infer(&["generate", "--hf", checkpoint, "--prompt", "!#"]));
    assert!(stderr.contains("masked-LM"), "{stderr}");
    let stderr = stderr_of(&infer(&["generate", "--hf", fixture("bare_model").to_str().unwrap(), "--prompt", "!#"]));
    assert!(stderr.contains("without an LM head"), "{stderr}");
}

#[test]
fn convert_generate_and_export_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let exported = dir.path().join("exported");
    let checkpoint = fixture("crime_small");
    let (checkpoint, run_arg, exported_arg) = (checkpoint.to_str().unwrap(), run.to_str().unwrap(), exported.to_str().unwrap());

    stdout_of(&infer(&["convert", "--hf", checkpoint, "--out", run_arg]));
    assert!(run.join("spiece.model").is_file(), "the tokenizer travels with the run");
    let stderr = stderr_of(&infer(&["convert", "--hf", checkpoint, "--out", run_arg]));
    assert!(stderr.contains("--force"), "{stderr}");

    let prompt = ["generate", "--prompt", "The old clerk", "--max-new-tokens", "6"];
    let from_run = stdout_of(&infer(&[&prompt[..], &["--run", run_arg]].concat()));
    let from_hf = stdout_of(&infer(&[&prompt[..], &["--hf", checkpoint]].concat()));
    assert_eq!(from_run, from_hf, "greedy output of the converted run and of the checkpoint");
    assert!(!from_run.trim().is_empty());

    stdout_of(&infer(&["export", "--run", run_arg, "--hf-out", exported_arg]));
    let from_export = stdout_of(&infer(&[&prompt[..], &["--hf", exported_arg]].concat()));
    assert_eq!(from_export, from_hf, "greedy output of the exported checkpoint");
}

#[test]
fn bad_hf_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = stderr_of(&infer(&["score", "--hf", dir.path().to_str().unwrap(), "x.txt"]));
    assert!(stderr.contains("config.json"), "{stderr}");

    std::fs::copy(fixture("wrap_rounds").join("config.json"), dir.path().join("config.json")).unwrap();
    let stderr = stderr_of(&infer(&["score", "--hf", dir.path().to_str().unwrap(), "x.txt"]));
    assert!(stderr.contains("model.safetensors"), "{stderr}");

    let stderr = stderr_of(&infer(&["score", "--hf", fixture("wrap_rounds").to_str().unwrap(), "--rotations", "/nonexistent.safetensors", "x.txt"]));
    assert!(stderr.contains("/nonexistent.safetensors"), "{stderr}");

    let output = infer(&["score", "--run", "r", "--hf", "h", "x.txt"]);
    assert!(!output.status.success());
}
