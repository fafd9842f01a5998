//! A run killed with SIGKILL resumes to the losses of an uninterrupted run, and Ctrl-C saves a
//! checkpoint before the process exits.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const TRAIN: &str = env!("CARGO_BIN_EXE_reformer-train");

/// Arguments of a short duplication run whose steps take milliseconds.
fn run_args(out: &Path, steps: u64) -> Vec<String> {
    let mut args: Vec<String> = ["--seq-len", "32", "--batch-size", "4", "--seed", "3", "--eval-every", "1000", "--checkpoint-every", "5"]
        .map(String::from)
        .to_vec();
    args.extend(["--steps".to_string(), steps.to_string(), "--out".to_string(), out.display().to_string()]);
    args
}

fn train(args: &[String]) -> Output {
    let output = Command::new(TRAIN).args(args).output().expect("reformer-train runs");
    assert!(output.status.success(), "reformer-train {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    output
}

fn spawn(args: &[String]) -> Child {
    Command::new(TRAIN).args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("reformer-train starts")
}

/// Training losses of a run directory, by step, as written (full precision).
fn losses(run: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics.jsonl exists");
    text.lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("each metrics line is JSON"))
        .filter_map(|value| Some((value.get("step")?.as_u64()?, value.get("loss")?.as_f64()?)))
        .collect()
}

/// Waits until `path` exists, failing after a minute.
fn wait_for(path: &Path, child: &mut Child) {
    let started = Instant::now();
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("reformer-train ended ({status}) before {} appeared", path.display());
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{} did not appear within a minute", path.display());
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn sigkill_then_resume_repeats_the_uninterrupted_losses() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 60;
    let whole = dir.path().join("whole");
    train(&run_args(&whole, steps));

    let killed = dir.path().join("killed");
    let args = run_args(&killed, steps);
    let mut child = spawn(&args);
    wait_for(&killed.join("checkpoints/step-00000010/state.json"), &mut child);
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run finished before SIGKILL reached it; lengthen it");

    let mut resume = args.clone();
    resume.push("--resume".into());
    train(&resume);

    let expected = losses(&whole);
    assert_eq!(expected.len(), steps as usize);
    // Same data order, dropout and rotations, weights and Adam state: the same bits.
    assert_eq!(losses(&killed), expected);
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_resume_continues() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut child = spawn(&run_args(&run, 1_000_000));
    wait_for(&run.join("checkpoints/step-00000005/state.json"), &mut child);
    // SAFETY: kill only sends a signal to the child this test started and still owns.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(sent, 0, "SIGINT could not be sent");
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "stderr: {stderr}");
    assert!(stderr.contains("plus --resume"), "stderr: {stderr}");

    // The newest checkpoint holds the last step that was logged.
    let last_logged = losses(&run).last().expect("steps were logged").0;
    let checkpoint = run.join(format!("checkpoints/step-{last_logged:08}/state.json"));
    assert!(checkpoint.is_file(), "no checkpoint of step {last_logged}");

    let mut resume = run_args(&run, last_logged + 2);
    resume.push("--resume".into());
    train(&resume);
    let steps: Vec<u64> = losses(&run).iter().map(|(step, _)| *step).collect();
    assert_eq!(steps, (1..=last_logged + 2).collect::<Vec<_>>());
}
