//! `reformer-train`: trains a Reformer language model. With no arguments it trains the
//! embedded default, the duplication task of the Reformer paper.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use reformer_train::settings::{PRESET_NAMES, TaskSettings, TrainAttention, TrainSettings, load_config, preset};
use reformer_train::trainer::{ExistingRun, TrainError, TrainEvent, check_run, train_until};

/// Train a Reformer language model.
#[derive(Parser, Debug)]
#[command(version, about, allow_negative_numbers = true)]
struct Args {
    /// Model config file (JSON, Hugging Face ReformerConfig field names); unknown fields are
    /// an error.
    #[arg(long, value_name = "FILE", conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// Built-in model config: `duplication` (the default), `duplication-small` (one LSH layer,
    /// length 128), `duplication-paper` (the Reformer paper's duplication setting, length 1024)
    /// or `text` (the default with --data).
    #[arg(long, value_name = "NAME")]
    preset: Option<String>,
    /// Text to train a byte-level model on: a file or a folder (walked recursively in sorted
    /// order); repeatable. The last 5% of the bytes are held out for validation.
    #[arg(long, value_name = "PATH")]
    data: Vec<PathBuf>,
    /// Run directory [default: runs/<preset>-<UTC timestamp>].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Total optimizer steps; a resumed run continues up to this step.
    #[arg(long)]
    steps: Option<u64>,
    /// Sequences per micro-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Tokens per sequence (at most the model's max_position_embeddings).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Peak learning rate of Adam.
    #[arg(long)]
    lr: Option<f64>,
    /// Steps of linear learning-rate warm-up.
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Micro-batches accumulated into one optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Seed of initialisation, data order, hash rotations and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Backend: `cpu` (the faster CPU backend compiled in), `ndarray`, `flex` or `wgpu`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Per-parameter gradient-norm clipping threshold (0 turns clipping off).
    #[arg(long, default_value_t = 1.0)]
    clip_norm: f32,
    /// Steps between validations.
    #[arg(long, default_value_t = 100)]
    eval_every: u64,
    /// Steps between checkpoints (the last step is always saved).
    #[arg(long, default_value_t = 100)]
    checkpoint_every: u64,
    /// Back-propagate with plain autodiff, storing every layer's activations, instead of the
    /// reversible node that recomputes them (for comparison and debugging).
    #[arg(long)]
    no_reversible: bool,
    /// Attention of the LSH layers: `lsh` hashes as configured; `full` attends exactly to every
    /// position with the same parameters (the full-attention baseline).
    #[arg(long, value_enum, default_value_t = TrainAttention::Lsh)]
    attention: TrainAttention,
    /// Hash rounds of every LSH layer in training, overriding the config's num_hashes.
    #[arg(long, value_name = "N")]
    num_hashes: Option<usize>,
    /// Continue the run in --out from its newest checkpoint.
    #[arg(long, conflicts_with = "force")]
    resume: bool,
    /// Delete the run in --out and start over.
    #[arg(long)]
    force: bool,
    /// Check the arguments, config, data, memory and run directory, print the plan and exit
    /// without writing anything.
    #[arg(long)]
    dry_run: bool,
}

/// Exit status after Ctrl-C, as shells report a process ended by SIGINT.
const INTERRUPTED_EXIT: u8 = 130;

/// Set by the first Ctrl-C or SIGTERM; the training loop saves a checkpoint and stops.
static STOP: AtomicBool = AtomicBool::new(false);

fn main() -> ExitCode {
    reformer_model::memory::keep_freed_memory();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let handler = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            // Checkpoints are written atomically, so quitting mid-write loses nothing saved.
            eprintln!("\nsecond signal: quitting without saving");
            std::process::exit(i32::from(INTERRUPTED_EXIT));
        }
        eprintln!("\nstopping: the current step finishes, then a checkpoint is saved (a second Ctrl-C or SIGTERM quits without saving)");
    });
    if let Err(error) = handler {
        log::warn!("Ctrl-C will stop training without saving a checkpoint: {error}");
    }
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // A stop on request is not a failure: it prints what was saved and how to resume.
            let stopped = error.chain().find_map(|cause| match cause.downcast_ref::<TrainError>() {
                Some(stop @ (TrainError::Interrupted { .. } | TrainError::InterruptedBeforeStart)) => Some(stop.to_string()),
                _ => None,
            });
            match stopped {
                Some(message) => {
                    eprintln!("{message}");
                    ExitCode::from(INTERRUPTED_EXIT)
                }
                None => {
                    eprintln!("error: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let preset_name = match (&args.preset, args.data.is_empty()) {
        (Some(name), _) => name.clone(),
        (None, true) => "duplication".to_string(),
        (None, false) => "text".to_string(),
    };
    let defaults = preset(&preset_name)
        .map_err(|_| anyhow::anyhow!("invalid --preset {preset_name}: use one of {}", PRESET_NAMES.join(", ")))?;
    let config = match &args.config {
        Some(path) => load_config(path)?,
        None => defaults.config.clone(),
    };
    let task = if args.data.is_empty() {
        if args.preset.as_deref() == Some("text") {
            bail!("--preset text trains on text: give the files with --data PATH");
        }
        TaskSettings::Duplication { n_symbols: config.vocab_size }
    } else {
        TaskSettings::Text { data: args.data.clone() }
    };
    let settings = TrainSettings {
        task,
        steps: args.steps.unwrap_or(defaults.steps),
        batch_size: args.batch_size.unwrap_or(defaults.batch_size),
        seq_len: args.seq_len.unwrap_or(defaults.seq_len.min(config.max_seq_len())),
        lr: args.lr.unwrap_or(defaults.lr),
        warmup_steps: args.warmup_steps.unwrap_or(defaults.warmup_steps),
        grad_accum: args.grad_accum,
        seed: args.seed,
        device: args.device.clone(),
        clip_norm: args.clip_norm,
        eval_every: args.eval_every,
        checkpoint_every: args.checkpoint_every,
        reversible: !args.no_reversible,
        attention: args.attention,
        num_hashes: args.num_hashes,
    };
    let out = args.out.clone().unwrap_or_else(|| default_run_dir(&preset_name));
    let existing = match (args.resume, args.force) {
        (true, _) => ExistingRun::Resume,
        (_, true) => ExistingRun::Overwrite,
        _ => ExistingRun::Refuse,
    };

    if args.dry_run {
        check_run(&config, &settings, &out, existing).with_context(|| format!("training run in {} would fail", out.display()))?;
        println!(
            "ok: would train {preset_name} ({} layers, {} parameters) for {} steps of {} x {} tokens on {} into {}",
            config.num_layers(),
            reformer_model::memory::parameter_count(&config),
            settings.steps,
            settings.batch_size,
            settings.seq_len,
            settings.device,
            out.display()
        );
        return Ok(());
    }

    let bar = ProgressBar::new(settings.steps);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
            .expect("valid template"),
    );
    let mut last_metric = String::new();
    let mut observe = |event: TrainEvent| match event {
        TrainEvent::Started { start_step, total_steps, parameters } => {
            bar.set_position(start_step);
            progress_line(&bar, format!(
                "training {} ({parameters} parameters, {} attention) on {} for steps {}..{total_steps}; run directory {}",
                preset_name,
                settings.attention_label(&config),
                settings.device,
                start_step + 1,
                out.display()
            ));
        }
        TrainEvent::Step { step, loss, tokens_per_second, .. } => {
            bar.set_position(step);
            bar.set_message(format!("loss {loss:.4}  {tokens_per_second:.0} tok/s{last_metric}"));
        }
        TrainEvent::Validation { step, metrics } => {
            last_metric = match (metrics.accuracy, metrics.bits_per_byte) {
                (Some(accuracy), _) => format!("  val acc {accuracy:.1}%"),
                (_, Some(bpb)) => format!("  val {bpb:.3} bits/byte"),
                _ => format!("  val loss {:.4}", metrics.loss),
            };
            progress_line(&bar, format!("step {step}: validation loss {:.4}{last_metric}", metrics.loss));
        }
        TrainEvent::Checkpoint { .. } => {}
    };
    let summary = train_until(&config, &settings, &out, existing, &STOP, &mut observe)
        .with_context(|| format!("training run in {} failed", out.display()))?;
    bar.finish_and_clear();

    let result = match (summary.final_validation.accuracy, summary.final_validation.bits_per_byte) {
        (Some(accuracy), _) => format!("second-copy accuracy {accuracy:.2}%"),
        (_, Some(bpb)) => format!("validation {bpb:.4} bits/byte"),
        _ => format!("validation loss {:.4}", summary.final_validation.loss),
    };
    println!(
        "finished {} steps in {:.0} s: {result}; run directory {}",
        summary.steps,
        summary.seconds,
        out.display()
    );
    Ok(())
}

/// Prints a line above the progress bar, or to stderr when the bar is hidden (stderr is not a
/// terminal, as under nohup or with `2> log`), where the bar's own printing drops it.
fn progress_line(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

fn default_run_dir(preset_name: &str) -> PathBuf {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("{preset_name}-{}", utc_timestamp(now)))
}

/// Formats seconds since the Unix epoch as `YYYYMMDDTHHMMSSZ` (UTC, proleptic Gregorian).
fn utc_timestamp(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let rem = seconds % 86_400;
    // Civil-from-days conversion (Howard Hinnant's algorithm, public domain).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_formats_known_date() {
        // 2026-12-04 20:26:58 UTC.
        assert_eq!(utc_timestamp(1_796_416_018), "20261204T202658Z");
    }

    #[test]
    fn preset_names_listed() {
        assert!(PRESET_NAMES.contains(&"duplication"));
    }
}
