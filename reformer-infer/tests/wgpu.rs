//! The wgpu backend against the CPU: a few training steps and greedy generation. Built only
//! with `--features wgpu`; on a machine without a GPU, Mesa's lavapipe driver runs it.
#![cfg(feature = "wgpu")]

use std::process::Command;

use reformer_train::settings::{TaskSettings, TrainAttention, TrainSettings, preset};
use reformer_train::trainer::{ExistingRun, TrainEvent, train};

fn settings(device: &str) -> TrainSettings {
    let config = preset("duplication").unwrap().config;
    TrainSettings {
        task: TaskSettings::Duplication { n_symbols: config.vocab_size },
        steps: 3,
        batch_size: 4,
        seq_len: 32,
        lr: 1e-3,
        warmup_steps: 1,
        grad_accum: 1,
        seed: 5,
        device: device.into(),
        clip_norm: 1.0,
        eval_every: 3,
        checkpoint_every: 3,
        reversible: true,
        attention: TrainAttention::Lsh,
        num_hashes: None,
    }
}

#[test]
fn wgpu_training_and_generation_match_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let config = preset("duplication").unwrap().config;
    let mut losses = Vec::new();
    for device in ["cpu", "wgpu"] {
        let mut run_losses = Vec::new();
        let mut observe = |event| {
            if let TrainEvent::Step { loss, .. } = event {
                run_losses.push(loss);
            }
        };
        train(&config, &settings(device), &dir.path().join(device), ExistingRun::Refuse, &mut observe).unwrap();
        losses.push(run_losses);
    }
    assert_eq!(losses[0].len(), 3);
    for (step, (cpu, wgpu)) in losses[0].iter().zip(&losses[1]).enumerate() {
        assert!((cpu - wgpu).abs() <= 1e-3, "step {}: loss {cpu} on the CPU, {wgpu} on wgpu", step + 1);
    }

    let generate = |device: &str| {
        // scripts/gpu-check.sh runs this test on another machine, where the path cargo
        // compiled in does not exist, and points REFORMER_INFER_BIN at the bundled binary.
        let binary = std::env::var("REFORMER_INFER_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_reformer-infer").to_string());
        let output = Command::new(binary)
            .args(["generate", "--run", dir.path().join("cpu").to_str().unwrap()])
            .args(["--prompt", "0 3 4 5 6 7", "--max-new-tokens", "8", "--device", device])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    assert_eq!(generate("wgpu"), generate("cpu"));
}

#[test]
fn missing_adapter_is_one_error_line() {
    // The Vulkan loader reads its driver list from the first two variables, and glvnd reads
    // its EGL vendors (wgpu's OpenGL path on Linux) from the last one. Pointed at missing
    // files, they leave no adapter of any kind, as on a machine without drivers.
    let binary = std::env::var("REFORMER_INFER_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_reformer-infer").to_string());
    let checkpoint = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/hf-fixtures/enwik8_small");
    let output = Command::new(binary)
        .args(["generate", "--hf", checkpoint, "--prompt", "The", "--max-new-tokens", "2", "--device", "wgpu"])
        .env("VK_ICD_FILENAMES", "/nonexistent/vulkan-icd.json")
        .env("VK_DRIVER_FILES", "/nonexistent/vulkan-icd.json")
        .env("__EGL_VENDOR_LIBRARY_FILENAMES", "/nonexistent/egl-vendor.json")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "wgpu ran without a driver; stderr: {stderr}");
    assert!(stderr.starts_with("error: --device wgpu found no usable GPU adapter"), "{stderr}");
    assert!(stderr.contains("mesa-vulkan-drivers"), "{stderr}");
    assert!(stderr.contains("--device cpu"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
}
