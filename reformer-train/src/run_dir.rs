//! The run directory: config, settings, metrics and crash-safe checkpoints.
//!
//! A checkpoint is written into `checkpoints/.tmp-step-N`, every file is synced, and the folder
//! is renamed to `checkpoints/step-N`; only then is the previous checkpoint removed. A crash at
//! any point leaves at least one complete checkpoint.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use reformer_model::ReformerConfig;
use reformer_model::checkpoint::{CHECKPOINTS_DIR, latest_checkpoint};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::settings::TrainSettings;
use crate::trainer::ExistingRun;

/// File of per-step metrics, one JSON object a line.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// File of the training settings.
pub const SETTINGS_FILE: &str = "train.json";
/// File of the model config.
pub const CONFIG_FILE: &str = "config.json";

/// Errors on the run directory.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    /// The folder contains another run.
    #[error("output folder {0} already contains a run; pass --resume to continue it, --force to delete it and start over, or choose another --out")]
    Occupied(PathBuf),
    /// `--resume` on a run with a different config or settings.
    #[error("cannot resume {path}: its {file} differs from this run's ({detail}); resume with the same settings or use another --out")]
    Mismatch {
        /// Run directory.
        path: PathBuf,
        /// File that differs.
        file: &'static str,
        /// What differs.
        detail: String,
    },
    /// A file could not be written.
    #[error("failed to write {path}")]
    Write {
        /// The path.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// A file is missing or unreadable.
    #[error("failed to read {path}: {message}")]
    Corrupt {
        /// The path.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}

fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> RunDirError + '_ {
    move |source| RunDirError::Write { path: path.to_path_buf(), source }
}

/// Returns whether `run_dir` already contains a run.
fn occupied(run_dir: &Path) -> bool {
    run_dir.join(CONFIG_FILE).exists() || run_dir.join(CHECKPOINTS_DIR).exists()
}

/// Checks, without writing anything, that a run may use `run_dir`: an empty or new folder, or
/// with `Resume` a run of the same config and settings, or with `Overwrite` anything.
pub fn check(run_dir: &Path, config: &ReformerConfig, settings: &TrainSettings, existing: ExistingRun) -> Result<(), RunDirError> {
    if !occupied(run_dir) {
        return Ok(());
    }
    match existing {
        ExistingRun::Refuse => Err(RunDirError::Occupied(run_dir.to_path_buf())),
        ExistingRun::Overwrite => Ok(()),
        ExistingRun::Resume => {
            let saved: ReformerConfig = read_json(&run_dir.join(CONFIG_FILE))?;
            if &saved != config {
                return Err(RunDirError::Mismatch {
                    path: run_dir.to_path_buf(),
                    file: CONFIG_FILE,
                    detail: "model config".into(),
                });
            }
            let saved: TrainSettings = read_json(&run_dir.join(SETTINGS_FILE))?;
            let comparable = TrainSettings {
                steps: settings.steps,
                device: settings.device.clone(),
                reversible: settings.reversible,
                ..saved.clone()
            };
            if &comparable != settings {
                return Err(RunDirError::Mismatch {
                    path: run_dir.to_path_buf(),
                    file: SETTINGS_FILE,
                    detail: format!(
                        "{}; only --steps, --device and --no-reversible may change on resume",
                        settings_difference(&comparable, settings)
                    ),
                });
            }
            Ok(())
        }
    }
}

/// Prepares `run_dir` for a run and returns the checkpoint to resume from, if any.
pub fn prepare(
    run_dir: &Path,
    config: &ReformerConfig,
    settings: &TrainSettings,
    existing: ExistingRun,
) -> Result<Option<PathBuf>, RunDirError> {
    check(run_dir, config, settings, existing)?;
    let mut resume_from = None;
    if occupied(run_dir) {
        match existing {
            ExistingRun::Refuse => unreachable!("check refuses an occupied folder"),
            ExistingRun::Overwrite => {
                for name in [CONFIG_FILE, SETTINGS_FILE, METRICS_FILE, crate::plot::PLOT_FILE] {
                    let path = run_dir.join(name);
                    if path.exists() {
                        fs::remove_file(&path).map_err(write_error(&path))?;
                    }
                }
                let checkpoints = run_dir.join(CHECKPOINTS_DIR);
                if checkpoints.exists() {
                    fs::remove_dir_all(&checkpoints).map_err(write_error(&checkpoints))?;
                }
            }
            ExistingRun::Resume => {
                resume_from = latest_checkpoint(run_dir).ok();
                if resume_from.is_none() {
                    // Killed before its first checkpoint: the run starts over, and the metrics of
                    // the lost attempt would otherwise repeat its first steps.
                    log::warn!("no complete checkpoint in {}: the run restarts from step 0", run_dir.display());
                    trim_metrics(run_dir, 0)?;
                }
            }
        }
    }
    fs::create_dir_all(run_dir.join(CHECKPOINTS_DIR)).map_err(write_error(run_dir))?;
    write_json_atomic(&run_dir.join(CONFIG_FILE), config)?;
    write_json_atomic(&run_dir.join(SETTINGS_FILE), settings)?;
    Ok(resume_from)
}

/// Lists the settings that differ, as `name is <saved value> ... but <requested value> now`.
fn settings_difference(saved: &TrainSettings, requested: &TrainSettings) -> String {
    let (Ok(Value::Object(saved)), Ok(Value::Object(requested))) = (serde_json::to_value(saved), serde_json::to_value(requested))
    else {
        unreachable!("TrainSettings serialises to a JSON object")
    };
    let differences: Vec<String> = saved
        .iter()
        .filter(|(name, value)| requested.get(*name) != Some(*value))
        .map(|(name, value)| {
            let now = requested.get(name).unwrap_or(&Value::Null);
            format!("{name} is {value} in the saved run but {now} now")
        })
        .collect();
    differences.join(", ")
}

/// Reads a JSON file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, RunDirError> {
    let corrupt = |message: String| RunDirError::Corrupt { path: path.to_path_buf(), message };
    let text = fs::read_to_string(path).map_err(|e| corrupt(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| corrupt(format!("invalid JSON: {e}")))
}

/// Writes a JSON file through a synced temporary file and a rename.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), RunDirError> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(value).expect("value serialises");
    let mut file = File::create(&tmp).map_err(write_error(&tmp))?;
    file.write_all(text.as_bytes()).map_err(write_error(&tmp))?;
    file.sync_all().map_err(write_error(&tmp))?;
    fs::rename(&tmp, path).map_err(write_error(path))
}

/// Removes the lines of `metrics.jsonl` logged after step `step`, so that a resumed run does
/// not log the steps between its checkpoint and the interruption twice.
pub fn trim_metrics(run_dir: &Path, step: u64) -> Result<(), RunDirError> {
    let path = run_dir.join(METRICS_FILE);
    let Ok(text) = fs::read_to_string(&path) else {
        return Ok(());
    };
    let remaining_lines: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|value| value["step"].as_u64())
                .is_some_and(|logged| logged <= step)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    let tmp = path.with_extension("jsonl.tmp");
    fs::write(&tmp, remaining_lines).map_err(write_error(&tmp))?;
    fs::rename(&tmp, &path).map_err(write_error(&path))
}

/// Appends one line to `metrics.jsonl`.
pub fn append_metric(run_dir: &Path, value: &serde_json::Value) -> Result<(), RunDirError> {
    let path = run_dir.join(METRICS_FILE);
    let mut file = OpenOptions::new().create(true).append(true).open(&path).map_err(write_error(&path))?;
    writeln!(file, "{value}").map_err(write_error(&path))
}

/// Writes checkpoint `step` with `fill`, which writes the files into the folder it is given,
/// then syncs and renames it into place and removes older checkpoints.
pub fn write_checkpoint(
    run_dir: &Path,
    step: u64,
    fill: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<PathBuf, RunDirError> {
    let checkpoints = run_dir.join(CHECKPOINTS_DIR);
    let name = format!("step-{step:08}");
    let tmp = checkpoints.join(format!(".tmp-{name}"));
    let target = checkpoints.join(&name);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(write_error(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(write_error(&tmp))?;
    fill(&tmp).map_err(|message| RunDirError::Write { path: tmp.clone(), source: std::io::Error::other(message) })?;
    for entry in fs::read_dir(&tmp).map_err(write_error(&tmp))? {
        let path = entry.map_err(write_error(&tmp))?.path();
        File::open(&path).and_then(|f| f.sync_all()).map_err(write_error(&path))?;
    }
    if target.exists() {
        fs::remove_dir_all(&target).map_err(write_error(&target))?;
    }
    fs::rename(&tmp, &target).map_err(write_error(&target))?;
    File::open(&checkpoints).and_then(|d| d.sync_all()).map_err(write_error(&checkpoints))?;

    // The new checkpoint is complete: older ones can go.
    for entry in fs::read_dir(&checkpoints).map_err(write_error(&checkpoints))?.flatten() {
        let path = entry.path();
        let file_name = entry.file_name();
        let old = file_name.to_str().is_some_and(|n| n.starts_with("step-") && n < name.as_str());
        if old {
            fs::remove_dir_all(&path).map_err(write_error(&path))?;
        }
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{TaskSettings, TrainAttention, preset};

    fn settings() -> TrainSettings {
        TrainSettings {
            task: TaskSettings::Duplication { n_symbols: 16 },
            steps: 10,
            batch_size: 2,
            seq_len: 32,
            lr: 1e-3,
            warmup_steps: 1,
            grad_accum: 1,
            seed: 0,
            device: "cpu".into(),
            clip_norm: 1.0,
            eval_every: 5,
            checkpoint_every: 5,
            reversible: true,
            attention: TrainAttention::Lsh,
            num_hashes: None,
        }
    }

    #[test]
    fn resume_mismatch_names_field_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let config = preset("duplication").unwrap().config;
        prepare(dir.path(), &config, &settings(), ExistingRun::Refuse).unwrap();

        let changed = TrainSettings { checkpoint_every: 7, ..settings() };
        let error = prepare(dir.path(), &config, &changed, ExistingRun::Resume).unwrap_err().to_string();
        assert!(error.contains("checkpoint_every is 5 in the saved run but 7 now"), "{error}");
    }

    #[test]
    fn resume_rejects_changed_attention() {
        let dir = tempfile::tempdir().unwrap();
        let config = preset("duplication").unwrap().config;
        prepare(dir.path(), &config, &settings(), ExistingRun::Refuse).unwrap();

        let full = TrainSettings { attention: TrainAttention::Full, ..settings() };
        let error = prepare(dir.path(), &config, &full, ExistingRun::Resume).unwrap_err().to_string();
        assert!(error.contains("attention is \"lsh\" in the saved run but \"full\" now"), "{error}");

        let hashes = TrainSettings { num_hashes: Some(2), ..settings() };
        let error = prepare(dir.path(), &config, &hashes, ExistingRun::Resume).unwrap_err().to_string();
        assert!(error.contains("num_hashes is null in the saved run but 2 now"), "{error}");
    }

    #[test]
    fn settings_without_attention_load_as_lsh() {
        // train.json as written before `attention` and `num_hashes` existed.
        let mut value = serde_json::to_value(settings()).unwrap();
        let object = value.as_object_mut().unwrap();
        object.remove("attention");
        object.remove("num_hashes");
        let loaded: TrainSettings = serde_json::from_value(value).unwrap();
        assert_eq!(loaded, settings());
    }

    #[test]
    fn resume_without_checkpoint_restarts_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let config = preset("duplication").unwrap().config;
        prepare(dir.path(), &config, &settings(), ExistingRun::Refuse).unwrap();
        append_metric(dir.path(), &serde_json::json!({ "step": 1, "loss": 2.0 })).unwrap();

        let resume_from = prepare(dir.path(), &config, &settings(), ExistingRun::Resume).unwrap();
        assert_eq!(resume_from, None);
        let metrics = fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(metrics, "", "metrics of the attempt without a checkpoint are dropped");
    }
}

