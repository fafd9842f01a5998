//! Fuzzes reformer-train's argument handling: any mix of flags and values, valid or not, ends
//! in success or in a clear error, never in a panic. Every case runs with `--dry-run`, which
//! checks the arguments, config, data, memory and run directory without training.

use std::path::{Path, PathBuf};
use std::process::Command;

use proptest::prelude::*;

const TRAIN: &str = env!("CARGO_BIN_EXE_reformer-train");

const FLAGS: &[&str] = &[
    "--config",
    "--preset",
    "--data",
    "--steps",
    "--batch-size",
    "--seq-len",
    "--lr",
    "--warmup-steps",
    "--grad-accum",
    "--seed",
    "--device",
    "--clip-norm",
    "--eval-every",
    "--checkpoint-every",
    "--no-reversible",
    "--attention",
    "--num-hashes",
    "--resume",
    "--force",
    "--unknown-flag",
];

/// Files the values may name, set up once per test.
struct Fixtures {
    dir: tempfile::TempDir,
    values: Vec<String>,
}

fn fixtures() -> Fixtures {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| -> PathBuf { dir.path().join(name) };
    std::fs::write(path("empty.txt"), b"").unwrap();
    std::fs::write(path("binary.bin"), (0..=255u8).cycle().take(20_000).collect::<Vec<u8>>()).unwrap();
    std::fs::write(path("short.txt"), b"too short").unwrap();
    std::fs::write(path("broken.json"), b"{\"hidden_size\": ").unwrap();
    std::fs::write(path("array.json"), b"[1, 2]").unwrap();
    std::fs::write(path("unknown.json"), b"{\"hidden_sizes\": 64}").unwrap();
    std::fs::write(path("zero_buckets.json"), b"{\"num_buckets\": 0}").unwrap();
    std::fs::write(path("hf.json"), b"{\"model_type\": \"reformer\", \"num_hidden_layers\": 9}").unwrap();
    std::fs::create_dir(path("empty_dir")).unwrap();
    let mut values: Vec<String> = [
        "0", "1", "2", "-1", "3", "7", "16", "64", "65", "1024", "1e-3", "0.5", "nan", "inf", "-inf", "-0", "1e309",
        "18446744073709551616", "99999999999", "abc", "", " ", "é", "cpu", "flex", "ndarray", "wgpu", "tpu",
        "duplication", "text", "duplication-small", "lsh", "full", "/nonexistent/path",
    ]
    .map(String::from)
    .to_vec();
    for name in ["empty.txt", "binary.bin", "short.txt", "broken.json", "array.json", "unknown.json", "zero_buckets.json", "hf.json", "empty_dir"] {
        values.push(path(name).display().to_string());
    }
    Fixtures { dir, values }
}

/// Runs reformer-train with `args` and checks that it ends cleanly.
fn check(args: &[String], out: &Path) -> Result<(), TestCaseError> {
    let output = Command::new(TRAIN).args(args).arg("--dry-run").arg("--out").arg(out).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    prop_assert!(!stderr.contains("panicked"), "reformer-train {args:?} panicked: {stderr}");
    match output.status.code() {
        Some(0) => prop_assert!(String::from_utf8_lossy(&output.stdout).starts_with("ok: would train")),
        // 1: our errors; 2: clap's usage errors.
        Some(1 | 2) => prop_assert!(stderr.starts_with("error: "), "reformer-train {args:?} failed without an error line: {stderr}"),
        other => prop_assert!(false, "reformer-train {args:?} exited with {other:?}: {stderr}"),
    }
    prop_assert!(!out.exists(), "--dry-run wrote {}", out.display());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_arguments_end_in_success_or_a_clear_error(
        picks in proptest::collection::vec((0..FLAGS.len(), proptest::option::of(0usize..100)), 0..6),
    ) {
        thread_local! {
            static FIXTURES: Fixtures = fixtures();
        }
        FIXTURES.with(|fixtures| {
            let mut args = Vec::new();
            for (flag, value) in &picks {
                args.push(FLAGS[*flag].to_string());
                if let Some(value) = value {
                    args.push(fixtures.values[value % fixtures.values.len()].clone());
                }
            }
            let out = fixtures.dir.path().join("run");
            check(&args, &out)
        })?;
    }
}
