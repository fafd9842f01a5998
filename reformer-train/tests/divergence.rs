//! A loss that becomes NaN or infinite stops the run with the step and a lower learning rate
//! to try, and keeps the checkpoints written before it.

use std::process::Command;

#[test]
fn exploding_run_stops_and_keeps_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // A learning rate of 1e30 sends the weights to about 1e30 after one Adam step, so the
    // logits overflow within a few steps.
    let output = Command::new(env!("CARGO_BIN_EXE_reformer-train"))
        .args(["--lr", "1e30", "--warmup-steps", "1", "--steps", "20", "--checkpoint-every", "1", "--seq-len", "32", "--batch-size", "4"])
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("lower learning rate"), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");

    let checkpoint = reformer_model::checkpoint::latest_checkpoint(&run).expect("a checkpoint before the divergence");
    let state = std::fs::read_to_string(checkpoint.join("state.json")).unwrap();
    let step: u64 = serde_json::from_str::<serde_json::Value>(&state).unwrap()["step"].as_u64().unwrap();
    // The step that diverged is the one after the kept checkpoint, whose weights are finite.
    assert!(stderr.contains(&format!("step {}", step + 1)), "checkpoint at step {step}, stderr: {stderr}");
    let config = reformer_model::checkpoint::load_run_config(&run).unwrap();
    let model = reformer_model::ReformerLm::new(&config, 0, &reformer_model::device::select_device("cpu").unwrap()).unwrap();
    reformer_model::checkpoint::load_weights(model, &checkpoint.join("model.bpk")).expect("the kept checkpoint loads");
}
