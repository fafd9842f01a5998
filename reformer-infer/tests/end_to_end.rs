//! End to end: train a few steps with the training library, then run the `reformer-infer`
//! binary on the run directory.

use std::path::Path;
use std::process::Command;

use reformer_model::{AttentionKind, ReformerConfig};
use reformer_model::checkpoint::latest_checkpoint;
use reformer_train::settings::{TaskSettings, TrainAttention, TrainSettings, preset};
use reformer_train::trainer::{ExistingRun, TrainEvent, train};

fn settings(task: TaskSettings, seq_len: usize) -> TrainSettings {
    TrainSettings {
        task,
        steps: 3,
        batch_size: 2,
        seq_len,
        lr: 1e-3,
        warmup_steps: 1,
        grad_accum: 2,
        seed: 1,
        device: "cpu".into(),
        clip_norm: 1.0,
        eval_every: 2,
        checkpoint_every: 2,
        reversible: true,
        attention: TrainAttention::Lsh,
        num_hashes: None,
    }
}

fn small_text_config() -> ReformerConfig {
    let mut config = preset("text").unwrap().config;
    config.hidden_size = 32;
    config.num_attention_heads = 2;
    config.attention_head_size = 16;
    config.feed_forward_size = 64;
    config.lsh_attn_chunk_length = 16;
    config.local_attn_chunk_length = 16;
    config.axial_pos_shape = vec![8, 16];
    config.axial_pos_embds_dim = vec![16, 16];
    config.max_position_embeddings = 128;
    config.validate().unwrap();
    config
}

fn infer(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_reformer-infer")).args(args).output().expect("binary runs")
}

fn assert_run_dir(run: &Path) {
    for file in ["config.json", "train.json", "metrics.jsonl", "loss.png"] {
        assert!(run.join(file).is_file(), "missing {file}");
    }
    let checkpoint = latest_checkpoint(run).unwrap();
    assert!(checkpoint.ends_with("step-00000003"), "{}", checkpoint.display());
    for file in ["model.bpk", "optimizer.bpk", "state.json"] {
        assert!(checkpoint.join(file).is_file(), "missing checkpoint file {file}");
    }
    let checkpoints = std::fs::read_dir(run.join("checkpoints")).unwrap().count();
    assert_eq!(checkpoints, 1, "older checkpoints are removed once a newer one is complete");
}

#[test]
fn duplication_run_trains_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("dup");
    let config = preset("duplication").unwrap().config;
    let settings = settings(TaskSettings::Duplication { n_symbols: config.vocab_size }, 32);
    let summary = train(&config, &settings, &run, ExistingRun::Refuse, &mut |_| {}).unwrap();
    assert_eq!(summary.steps, 3);
    assert!(summary.final_validation.accuracy.is_some());
    assert_run_dir(&run);

    let run_arg = run.to_str().unwrap();
    let output = infer(&["eval", "--run", run_arg, "--batches", "1", "--batch-size", "2"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("second-copy accuracy"));

    let output = infer(&["generate", "--run", run_arg, "--prompt", "0 3 4 5", "--max-new-tokens", "3"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let generated = String::from_utf8_lossy(&output.stdout).split_whitespace().count();
    assert_eq!(generated, 3, "three ids printed");

    // A second run into the same folder is refused without --resume or --force.
    let error = train(&config, &settings, &run, ExistingRun::Refuse, &mut |_| {}).unwrap_err();
    assert!(error.to_string().contains("--resume"), "{error}");
}

/// Returns the row of `eval --table`'s output: the accuracies after the training label.
fn table_row(stdout: &str) -> Vec<f64> {
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "a title, a header and one row:\n{stdout}");
    let header: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(header, ["trained", "with", "full", "LSH-8", "LSH-4", "LSH-2", "LSH-1"], "{stdout}");
    let row: Vec<&str> = lines[2].split_whitespace().collect();
    row[1..].iter().map(|cell| cell.parse().unwrap_or_else(|_| panic!("cell `{cell}` is not a number: {stdout}"))).collect()
}

#[test]
fn duplication_table_and_ablation() {
    let dir = tempfile::tempdir().unwrap();
    let config = preset("duplication-small").unwrap().config;
    let base = settings(TaskSettings::Duplication { n_symbols: config.vocab_size }, 32);
    let run = dir.path().join("lsh");
    train(&config, &TrainSettings { num_hashes: Some(2), ..base.clone() }, &run, ExistingRun::Refuse, &mut |_| {}).unwrap();
    let run_arg = run.to_str().unwrap();
    let small = ["--batches", "1", "--batch-size", "2"];

    let output = infer(&[&["eval", "--run", run_arg, "--table"][..], &small].concat());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let row = table_row(&stdout);
    assert_eq!(row.len(), 5, "{stdout}");
    assert!(row.iter().all(|accuracy| (0.0..=100.0).contains(accuracy)), "{stdout}");
    assert!(stdout.lines().nth(2).unwrap().starts_with("LSH-2 "), "the row names the training attention: {stdout}");

    let output = infer(&[&["eval", "--run", run_arg, "--table", "--json"][..], &small].concat());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let evaluated: Vec<&str> = lines.iter().map(|line| line["evaluated"].as_str().unwrap()).collect();
    assert_eq!(evaluated, ["full", "LSH-8", "LSH-4", "LSH-2", "LSH-1"]);
    for (line, accuracy) in lines.iter().zip(&row) {
        assert!((line["accuracy"].as_f64().unwrap() - accuracy).abs() < 0.01, "JSON and table differ: {line} against {accuracy}");
        assert_eq!(line["trained"], "LSH-2");
    }

    for (flag, label) in [("--ablate-lsh", "ablated"), ("--full-attention", "full")] {
        let output = infer(&[&["eval", "--run", run_arg, flag, "--json"][..], &small].concat());
        assert!(output.status.success(), "{flag}: {}", String::from_utf8_lossy(&output.stderr));
        let line: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(line["evaluated"], label);
    }
    let output = infer(&[&["eval", "--run", run_arg, "--json"][..], &small].concat());
    let line: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(line["evaluated"], "LSH-2", "without a flag the run is evaluated as it trained");
}

#[test]
fn full_attention_run_trains_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let config = preset("duplication-small").unwrap().config;
    let base = settings(TaskSettings::Duplication { n_symbols: config.vocab_size }, 64);
    let run = dir.path().join("full");
    let mut losses = Vec::new();
    let mut observe = |event| {
        if let TrainEvent::Step { loss, .. } = event {
            losses.push(loss);
        }
    };
    train(&config, &TrainSettings { attention: TrainAttention::Full, ..base.clone() }, &run, ExistingRun::Refuse, &mut observe).unwrap();
    assert!(losses.iter().all(|loss| loss.is_finite()), "{losses:?}");

    let output = infer(&["eval", "--run", run.to_str().unwrap(), "--json", "--batches", "1", "--batch-size", "2"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let line: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(line["trained"], "full");
    assert_eq!(line["evaluated"], "full");
    assert!(line["num_hashes"].is_null());

    // Changing the attention of a run is rejected on resume.
    let error = train(&config, &TrainSettings { steps: 4, ..base }, &run, ExistingRun::Resume, &mut |_| {}).unwrap_err();
    assert!(error.to_string().contains("attention is \"full\" in the saved run but \"lsh\" now"), "{error}");
}

#[test]
fn attention_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let config = preset("duplication-small").unwrap().config;
    let base = settings(TaskSettings::Duplication { n_symbols: config.vocab_size }, 32);
    let cases = [
        (TrainSettings { num_hashes: Some(0), ..base.clone() }, "invalid --num-hashes 0"),
        (TrainSettings { attention: TrainAttention::Full, num_hashes: Some(2), ..base.clone() }, "--num-hashes 2 has no effect with --attention full"),
    ];
    for (index, (settings, expected)) in cases.into_iter().enumerate() {
        let error = train(&config, &settings, &dir.path().join(index.to_string()), ExistingRun::Refuse, &mut |_| {}).unwrap_err();
        assert!(error.to_string().contains(expected), "{error}");
    }

    let mut local_only = config.clone();
    local_only.attn_layers = vec![AttentionKind::Local];
    let full = TrainSettings { attention: TrainAttention::Full, ..base.clone() };
    let error = train(&local_only, &full, &dir.path().join("local-full"), ExistingRun::Refuse, &mut |_| {}).unwrap_err();
    assert!(error.to_string().contains("the model has none"), "{error}");

    // A run without LSH layers trains, but the LSH flags of `eval` are rejected on it.
    let run = dir.path().join("local");
    train(&local_only, &TrainSettings { steps: 1, ..base }, &run, ExistingRun::Refuse, &mut |_| {}).unwrap();
    let run_arg = run.to_str().unwrap();
    for flag in ["--table", "--full-attention", "--ablate-lsh"] {
        let output = infer(&["eval", "--run", run_arg, flag, "--batches", "1", "--batch-size", "2"]);
        assert!(!output.status.success(), "{flag} on a run without LSH layers succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("has no LSH layer"), "{flag}: {stderr}");
    }

    let output = infer(&["eval", "--run", run_arg, "--num-hashes", "0"]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid --num-hashes 0"));
    for conflict in [["--table", "--num-hashes"], ["--full-attention", "--ablate-lsh"], ["--table", "--ablate-lsh"]] {
        let mut args = vec!["eval", "--run", run_arg, conflict[0], conflict[1]];
        if conflict[1] == "--num-hashes" {
            args.push("2");
        }
        let output = infer(&args);
        assert!(!output.status.success(), "{conflict:?} accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("cannot be used with"), "{conflict:?}: {stderr}");
    }
}

#[test]
fn reversible_node_trains_like_plain_autodiff() {
    // The text preset has dropout, two LSH and two local layers; its losses must not depend on
    // how gradients are computed.
    let dir = tempfile::tempdir().unwrap();
    let text_path = dir.path().join("book.txt");
    std::fs::write(&text_path, "Call me Ishmael. Some years ago, never mind how long precisely. ".repeat(30)).unwrap();
    let config = small_text_config();
    assert!(config.hidden_dropout_prob > 0.0);
    let mut losses = Vec::new();
    for reversible in [true, false] {
        let settings = TrainSettings { steps: 4, reversible, ..settings(TaskSettings::Text { data: vec![text_path.clone()] }, 64) };
        let mut run_losses = Vec::new();
        let mut observe = |event| {
            if let TrainEvent::Step { loss, .. } = event {
                run_losses.push(loss);
            }
        };
        train(&config, &settings, &dir.path().join(format!("run-{reversible}")), ExistingRun::Refuse, &mut observe).unwrap();
        losses.push(run_losses);
    }
    assert_eq!(losses[0].len(), 4);
    for (step, (with_node, plain)) in losses[0].iter().zip(&losses[1]).enumerate() {
        assert!((with_node - plain).abs() <= 1e-4 * plain.abs(), "step {}: loss {with_node} with the node, {plain} without", step + 1);
    }
}

#[test]
fn text_run_trains_scores_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    let text_path = dir.path().join("book.txt");
    let text = "It was the best of times, it was the worst of times. ".repeat(40);
    std::fs::write(&text_path, &text).unwrap();
    let run = dir.path().join("text");
    let config = small_text_config();
    let settings = settings(TaskSettings::Text { data: vec![text_path.clone()] }, 64);
    let summary = train(&config, &settings, &run, ExistingRun::Refuse, &mut |_| {}).unwrap();
    assert!(summary.final_validation.bits_per_byte.unwrap() > 0.0);
    assert_run_dir(&run);

    let run_arg = run.to_str().unwrap();
    let output = infer(&["score", "--run", run_arg, "--json", text_path.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "one line per file and the total");
    assert!(lines[1]["file"].is_null());
    let tokens = lines[0]["tokens"].as_u64().unwrap();
    // 128-token windows lose their first token as a target.
    assert_eq!(tokens as usize, text.len() - text.len().div_ceil(128));
    for key in ["loss_nats", "bits_per_token", "bits_per_byte"] {
        assert!(lines[0][key].as_f64().unwrap() > 0.0, "{key}");
    }

    let output = infer(&["generate", "--run", run_arg, "--prompt", "It was", "--max-new-tokens", "5", "--temperature", "0.8", "--top-k", "5"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    // A batch gives each prompt what it gets alone, with the cache and without it.
    let generate_json = |prompts: &[&str], extra: &[&str]| -> Vec<serde_json::Value> {
        let mut args = vec!["generate", "--run", run_arg, "--max-new-tokens", "12", "--temperature", "0.8", "--seed", "3", "--json"];
        for prompt in prompts {
            args.extend(["--prompt", prompt]);
        }
        args.extend(extra);
        let output = infer(&args);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).lines().map(|line| serde_json::from_str(line).unwrap()).collect()
    };
    let prompts = ["It", "The first line of a much longer prompt, which"];
    let batch = generate_json(&prompts, &[]);
    assert_eq!(batch.len(), 2, "one object per prompt");
    for (index, prompt) in prompts.iter().enumerate() {
        assert_eq!(batch[index]["prompt"], index);
        assert_eq!(batch[index]["ids"], generate_json(&[prompt], &[])[0]["ids"], "prompt {index} alone");
    }
    let short = generate_json(&["It"], &["--no-cache"]);
    assert_eq!(short[0]["ids"], batch[0]["ids"], "cached and recomputed tokens differ for a short prompt");

    let output = infer(&["eval", "--run", run_arg]);
    assert!(!output.status.success(), "eval on a text run is an error");
}

#[test]
fn missing_run_is_a_clear_error() {
    let output = infer(&["eval", "--run", "/nonexistent/run"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("error:"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
