//! Fuzzes reformer-infer's argument handling: any subcommand with any mix of flags and values,
//! pointing at real runs, a Hugging Face checkpoint, damaged files or nothing, ends in success
//! or in a clear error, never in a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use reformer_train::settings::{TaskSettings, TrainAttention, TrainSettings, preset};
use reformer_train::trainer::{ExistingRun, train};

const INFER: &str = env!("CARGO_BIN_EXE_reformer-infer");
const SUBCOMMANDS: &[&str] = &["generate", "score", "eval", "convert", "export", "bogus"];
const FLAGS: &[&str] = &[
    "--run",
    "--hf",
    "--device",
    "--seed",
    "--prompt",
    "--max-new-tokens",
    "--temperature",
    "--top-k",
    "--top-p",
    "--json",
    "--num-hashes",
    "--batches",
    "--batch-size",
    "--out",
    "--hf-out",
    "--allow-partial",
    "--rotations",
    "--force",
    "",
];

/// Runs, checkpoints and files the values may name, set up once.
struct Fixtures {
    dir: tempfile::TempDir,
    values: Vec<String>,
}

fn train_run(out: &Path, text: Option<PathBuf>) {
    let mut config = preset(if text.is_some() { "text" } else { "duplication" }).unwrap().config;
    if text.is_some() {
        config.hidden_size = 32;
        config.attention_head_size = 16;
        config.feed_forward_size = 32;
        config.axial_pos_shape = vec![8, 8];
        config.axial_pos_embds_dim = vec![16, 16];
        config.max_position_embeddings = 64;
        config.lsh_attn_chunk_length = 16;
        config.local_attn_chunk_length = 16;
    }
    let task = match text {
        Some(path) => TaskSettings::Text { data: vec![path] },
        None => TaskSettings::Duplication { n_symbols: config.vocab_size },
    };
    let settings = TrainSettings {
        task,
        steps: 1,
        batch_size: 2,
        seq_len: 32,
        lr: 1e-3,
        warmup_steps: 1,
        grad_accum: 1,
        seed: 0,
        device: "cpu".into(),
        clip_norm: 1.0,
        eval_every: 1,
        checkpoint_every: 1,
        reversible: true,
        attention: TrainAttention::Lsh,
        num_hashes: None,
    };
    train(&config, &settings, out, ExistingRun::Refuse, &mut |_| {}).unwrap();
}

fn fixtures() -> Fixtures {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("text.txt"), "The quick brown fox jumps over the lazy dog. ".repeat(20)).unwrap();
    std::fs::write(path("empty.txt"), b"").unwrap();
    std::fs::write(path("binary.bin"), (0..=255u8).collect::<Vec<u8>>()).unwrap();
    std::fs::write(path("rotations.safetensors"), b"not safetensors").unwrap();
    train_run(&path("dup"), None);
    train_run(&path("text"), Some(path("text.txt")));
    // A copy, so that export --force never writes into the repository's fixtures.
    let hf = path("hf");
    std::fs::create_dir(&hf).unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/hf-fixtures/enwik8_small");
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(source.join(file), hf.join(file)).unwrap();
    }
    let mut values: Vec<String> = [
        "0", "1", "-1", "2", "8", "64", "1000000", "0.5", "1.5", "nan", "inf", "-0", "1e309", "18446744073709551616", "", "abc",
        "é", "cpu", "flex", "wgpu", "tpu", "0 3 4 5", "hello", "/nonexistent",
    ]
    .map(String::from)
    .to_vec();
    for name in ["dup", "text", "hf", "text.txt", "empty.txt", "binary.bin", "rotations.safetensors", "new-dir"] {
        values.push(path(name).display().to_string());
    }
    Fixtures { dir, values }
}

/// Runs reformer-infer with `args` and checks that it ends cleanly within a minute.
fn check(args: &[String]) -> Result<(), TestCaseError> {
    let mut child = Command::new(INFER).args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            child.wait().unwrap();
            // A long generation is what the user asked for, not a hang.
            prop_assert!(args.iter().any(|a| a == "--max-new-tokens"), "reformer-infer {:?} ran over a minute", args);
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    prop_assert!(!stderr.contains("panicked"), "reformer-infer {:?} panicked: {}", args, stderr);
    match status.code() {
        Some(0) => {}
        // 1: our errors; 2: clap's usage errors.
        Some(1 | 2) => prop_assert!(stderr.starts_with("error: "), "reformer-infer {:?} failed without an error line: {}", args, stderr),
        other => prop_assert!(false, "reformer-infer {:?} exited with {:?}: {}", args, other, stderr),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_arguments_end_in_success_or_a_clear_error(
        subcommand in 0..SUBCOMMANDS.len(),
        picks in proptest::collection::vec((0..FLAGS.len(), proptest::option::of(0usize..100)), 0..6),
    ) {
        thread_local! {
            static FIXTURES: Fixtures = fixtures();
        }
        FIXTURES.with(|fixtures| {
            let mut args = vec![SUBCOMMANDS[subcommand].to_string()];
            for (flag, value) in &picks {
                if !FLAGS[*flag].is_empty() {
                    args.push(FLAGS[*flag].to_string());
                }
                if let Some(value) = value {
                    args.push(fixtures.values[value % fixtures.values.len()].clone());
                }
            }
            let _ = &fixtures.dir;
            check(&args)
        })?;
    }
}
