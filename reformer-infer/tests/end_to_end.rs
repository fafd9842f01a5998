//! End to end: train a few steps with the training library, then run the `reformer-infer`
//! binary on the run directory.

use std::path::Path;
use std::process::Command;

use reformer_model::ReformerConfig;
use reformer_model::checkpoint::latest_checkpoint;
use reformer_train::settings::{TaskSettings, TrainSettings, preset};
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
