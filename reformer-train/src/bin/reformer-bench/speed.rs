//! `reformer-bench speed`: training-step and inference throughput and peak memory against
//! sequence length. The total tokens per step stay fixed, as in Figure 5 of Kitaev et al.
//! (2020), which runs 1024 x 32 up to 32768 x 1; the default adds 65536 x 1.
//!
//! Every (attention, mode, length) runs in a fresh child process, so peaks do not carry over.
//! Each length gets `max_position_embeddings = seq_len` and the axial shape `[a, seq_len / a]`
//! with `a` the largest divisor of `seq_len` not above its square root (for powers of two, the
//! largest power of two not above the square root, as in `scripts/bench_hf.py`). The baseline
//! `--attention full` runs the same model with exact full attention in its LSH layers; local
//! layers stay local. A length whose estimated memory exceeds `--max-memory-gib` is reported
//! as "does not fit" with the estimate instead of being run.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::TensorData;
use clap::{Args, ValueEnum};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reformer_model::context::LshMode;
use reformer_model::device::select_device;
use reformer_model::loss::{causal_lm_outputs, weighted_cross_entropy};
use reformer_model::{AttentionKind, ForwardContext, ReformerConfig, ReformerLm, memory};
use reformer_train::settings::load_config;
use serde::{Deserialize, Serialize};

use crate::common::{GpuMemorySampler, axial_rows, peak_rss_mib};

/// The speed benchmark's config in BENCHMARKS.md: 2 layers, hidden 256, 2 heads of 64.
const DEFAULT_CONFIG: &str = include_str!("../../../../assets/presets/bench-speed.json");

/// Kind of step that one measurement times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Forward, backward through the reversible node, and an Adam update.
    Train,
    /// One forward pass without autodiff, producing the logits.
    Infer,
}

/// Attention of the LSH layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attention {
    /// LSH attention as configured.
    Lsh,
    /// Exact attention over all positions, the baseline.
    Full,
}

/// Arguments of `reformer-bench speed`.
#[derive(Args, Debug)]
pub struct SpeedArgs {
    /// Model config: this project's JSON or a Hugging Face config.json [default:
    /// assets/presets/bench-speed.json, built in]; its max_position_embeddings and
    /// axial_pos_shape are set per length.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Sequence lengths, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096,16384,65536")]
    lengths: Vec<usize>,
    /// Tokens per step; the batch size is this divided by the length (at least 1).
    #[arg(long, default_value_t = 32768)]
    tokens_per_step: usize,
    /// Modes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "train,infer")]
    mode: Vec<Mode>,
    /// Attention of the LSH layers, comma-separated: lsh, full (the baseline) or both.
    #[arg(long, value_delimiter = ',', default_value = "lsh,full")]
    attention: Vec<Attention>,
    /// Untimed steps before the timed ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed steps; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Backend: cpu, ndarray, flex or wgpu.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads of each measurement (RAYON_NUM_THREADS) [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Memory limit: a length whose estimate exceeds it is not run [default: 80% of the
    /// machine's total memory].
    #[arg(long)]
    max_memory_gib: Option<f64>,
    /// Seconds after which a measurement is stopped and reported as a timeout.
    #[arg(long, default_value_t = 1800)]
    timeout_s: u64,
    /// JSON Lines file for the results (the format of scripts/bench_hf.py).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// Arguments of the hidden `speed-step` subcommand: one measurement in this process.
#[derive(Args, Debug)]
pub struct StepArgs {
    /// The model config as JSON text.
    #[arg(long)]
    config_json: String,
    /// Sequences per step.
    #[arg(long)]
    batch_size: usize,
    /// Tokens per sequence.
    #[arg(long)]
    seq_len: usize,
    /// Kind of step to time.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Attention of the LSH layers.
    #[arg(long, value_enum)]
    attention: Attention,
    /// Untimed steps.
    #[arg(long)]
    warmup: usize,
    /// Timed steps.
    #[arg(long)]
    repeats: usize,
    /// Backend name.
    #[arg(long)]
    device: String,
}

/// Measurement that a child process reports.
#[derive(Debug, Serialize, Deserialize)]
struct StepReport {
    seconds: Vec<f64>,
    peak_rss_mib: f64,
    /// Peak GPU memory above the start (wgpu with nvidia-smi only).
    peak_gpu_mib: Option<f64>,
}

/// One result line, in the format `scripts/bench_hf.py` writes.
#[derive(Debug, Serialize)]
struct Record {
    implementation: &'static str,
    attention: Attention,
    mode: Mode,
    seq_len: usize,
    batch_size: usize,
    seconds_per_step: Option<f64>,
    tokens_per_second: Option<f64>,
    ms_per_token: Option<f64>,
    peak_rss_mib: Option<f64>,
    peak_gpu_mib: Option<f64>,
    status: String,
    estimate_gib: f64,
    threads: usize,
    backend: String,
}

const GIB: f64 = (1u64 << 30) as f64;

/// Returns the config for one length.
fn config_for(base: &ReformerConfig, seq_len: usize) -> anyhow::Result<ReformerConfig> {
    let rows = axial_rows(seq_len);
    let config = ReformerConfig {
        max_position_embeddings: seq_len,
        axial_pos_shape: if base.axial_pos_embds { vec![rows, seq_len / rows] } else { base.axial_pos_shape.clone() },
        ..base.clone()
    };
    config.validate().with_context(|| format!("the benchmark config does not fit seq_len {seq_len}"))?;
    Ok(config)
}

/// Estimated bytes of one measurement.
fn estimate(config: &ReformerConfig, batch_size: usize, seq_len: usize, mode: Mode, attention: Attention) -> f64 {
    let training = mode == Mode::Train;
    let mut bytes = memory::step_bytes(config, batch_size, seq_len, training, true);
    if attention == Attention::Full && config.attn_layers.contains(&AttentionKind::Lsh) {
        bytes += memory::full_attention_bytes(config, batch_size, seq_len, training);
    }
    bytes
}

/// Runs the benchmark and prints the table.
pub fn run(args: &SpeedArgs) -> anyhow::Result<()> {
    let base = match &args.config {
        Some(path) => load_config(path).with_context(|| format!("failed to load --config {}", path.display()))?,
        None => ReformerConfig::from_json_str(DEFAULT_CONFIG)?,
    };
    ensure!(!args.lengths.is_empty(), "give at least one length with --lengths");
    ensure!(args.tokens_per_step > 0, "invalid --tokens-per-step 0: use a positive number such as 32768");
    ensure!(args.repeats > 0, "invalid --repeats 0: time at least one step");
    ensure!(args.timeout_s > 0, "invalid --timeout-s 0: use a positive number of seconds");
    ensure!(!args.mode.is_empty() && !args.attention.is_empty(), "give at least one --mode and one --attention");
    if args.threads == Some(0) {
        bail!("invalid --threads 0: use at least one thread");
    }
    let limit = match args.max_memory_gib {
        Some(gib) if gib > 0.0 && gib.is_finite() => gib * GIB,
        Some(gib) => bail!("invalid --max-memory-gib {gib}: use a positive number of GiB"),
        None => 0.8 * memory::total_bytes().context("the machine's total memory is unreadable (no /proc/meminfo); pass --max-memory-gib")?,
    };
    select_device(&args.device)?;
    let mut plan = Vec::new();
    for &seq_len in &args.lengths {
        ensure!(seq_len >= 2, "invalid length {seq_len} in --lengths: use at least 2 tokens");
        let batch_size = (args.tokens_per_step / seq_len).max(1);
        ensure!(
            args.tokens_per_step % seq_len == 0 || seq_len % args.tokens_per_step == 0,
            "length {seq_len} does not divide --tokens-per-step {} (nor the reverse); use powers of two",
            args.tokens_per_step
        );
        plan.push((seq_len, batch_size, config_for(&base, seq_len)?));
    }
    let backend = if args.device == "cpu" {
        reformer_model::device::default_cpu_backend().unwrap_or("cpu").to_string()
    } else {
        args.device.clone()
    };
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let exe = std::env::current_exe().context("cannot locate the reformer-bench executable")?;
    let mut out = match &args.out {
        Some(path) => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).with_context(|| format!("failed to create {}", parent.display()))?;
            }
            Some((std::fs::File::create(path).with_context(|| format!("failed to create --out {}", path.display()))?, path))
        }
        None => None,
    };

    println!("attention  mode   seq_len  batch     s/step   tokens/s  ms/token  peak MiB  GPU MiB  est GiB  status");
    for &attention in &args.attention {
        for &mode in &args.mode {
            for (seq_len, batch_size, config) in &plan {
                let estimate_bytes = estimate(config, *batch_size, *seq_len, mode, attention);
                let mut record = Record {
                    implementation: "reformer-rs",
                    attention,
                    mode,
                    seq_len: *seq_len,
                    batch_size: *batch_size,
                    seconds_per_step: None,
                    tokens_per_second: None,
                    ms_per_token: None,
                    peak_rss_mib: None,
                    peak_gpu_mib: None,
                    status: "ok".into(),
                    estimate_gib: estimate_bytes / GIB,
                    threads,
                    backend: backend.clone(),
                };
                if estimate_bytes > limit {
                    record.status = "does not fit".into();
                } else {
                    eprintln!("measuring {attention:?} {mode:?} at seq_len {seq_len} x {batch_size}");
                    match measure(&exe, args, config, *batch_size, *seq_len, mode, attention, threads) {
                        Ok(report) => {
                            let mut seconds = report.seconds.clone();
                            seconds.sort_by(f64::total_cmp);
                            let median = seconds[seconds.len() / 2];
                            let tokens = (*batch_size * *seq_len) as f64;
                            record.seconds_per_step = Some(median);
                            record.tokens_per_second = Some(tokens / median);
                            record.ms_per_token = Some(1000.0 * median / tokens);
                            record.peak_rss_mib = Some(report.peak_rss_mib);
                            record.peak_gpu_mib = report.peak_gpu_mib;
                        }
                        Err(status) => record.status = status,
                    }
                }
                print_row(&record);
                if let Some((file, path)) = &mut out {
                    use std::io::Write;
                    writeln!(file, "{}", serde_json::to_string(&record)?).with_context(|| format!("failed to write {}", path.display()))?;
                }
            }
        }
    }
    Ok(())
}

fn print_row(r: &Record) {
    let number = |value: Option<f64>, digits: usize| value.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    println!(
        "{:<9}  {:<5}  {:>7}  {:>5}  {:>9}  {:>9}  {:>8}  {:>8}  {:>7}  {:>7.2}  {}",
        format!("{:?}", r.attention).to_lowercase(),
        format!("{:?}", r.mode).to_lowercase(),
        r.seq_len,
        r.batch_size,
        number(r.seconds_per_step, 3),
        number(r.tokens_per_second, 0),
        number(r.ms_per_token, 4),
        number(r.peak_rss_mib, 0),
        number(r.peak_gpu_mib, 0),
        r.estimate_gib,
        r.status
    );
}

/// Runs one measurement in a child process; `Err` carries the status to record.
#[allow(clippy::too_many_arguments)]
fn measure(
    exe: &std::path::Path,
    args: &SpeedArgs,
    config: &ReformerConfig,
    batch_size: usize,
    seq_len: usize,
    mode: Mode,
    attention: Attention,
    threads: usize,
) -> Result<StepReport, String> {
    let mut command = Command::new(exe);
    command
        .arg("speed-step")
        .arg("--config-json")
        .arg(config.to_json_string())
        .args(["--batch-size", &batch_size.to_string(), "--seq-len", &seq_len.to_string()])
        .args(["--mode", if mode == Mode::Train { "train" } else { "infer" }])
        .args(["--attention", if attention == Attention::Lsh { "lsh" } else { "full" }])
        .args(["--warmup", &args.warmup.to_string(), "--repeats", &args.repeats.to_string(), "--device", &args.device])
        .env("RAYON_NUM_THREADS", threads.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|e| format!("error: failed to start a measurement process: {e}"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > Duration::from_secs(args.timeout_s) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("timeout".into());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("error: {e}")),
        }
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    if !status.success() {
        // A child killed by a signal (often the kernel's out-of-memory killer) prints nothing.
        let reason = stderr.lines().last().unwrap_or_default().trim().to_string();
        return Err(if reason.is_empty() { format!("error: the process ended with {status}") } else { format!("error: {reason}") });
    }
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|e| format!("error: unreadable measurement output {line:?}: {e}"))
}

/// Runs one measurement in this process and prints its report as JSON.
pub fn run_step(args: &StepArgs) -> anyhow::Result<()> {
    let config = ReformerConfig::from_json_str(&args.config_json)?;
    let device = select_device(&args.device)?;
    let lsh_mode = if args.attention == Attention::Full { LshMode::Full } else { LshMode::Hashed };
    let mut rng = StdRng::seed_from_u64(1);
    let ids: Vec<i64> = (0..args.batch_size * args.seq_len).map(|_| rng.random_range(0..config.vocab_size as i64)).collect();
    let mut seconds = Vec::with_capacity(args.repeats);
    let sampler = GpuMemorySampler::start(&args.device);
    match args.mode {
        Mode::Train => {
            let device = device.autodiff();
            let mut model = ReformerLm::new(&config, 0, &device)?;
            let mut optimizer = AdamConfig::new().init();
            let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [args.batch_size, args.seq_len]), &device);
            let weights = Tensor::<2>::ones([args.batch_size, args.seq_len], &device);
            for step in 0..args.warmup + args.repeats {
                let started = Instant::now();
                let ctx = ForwardContext::train(0, step as u64).with_lsh_mode(lsh_mode);
                let (logits, targets, w) = causal_lm_outputs(&model, ids.clone(), weights.clone(), &ctx)?;
                let loss = weighted_cross_entropy(logits, targets, w);
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                model = optimizer.step(1e-4, model, grads);
                // Reading one updated value waits for the step on backends that run asynchronously.
                let _ = model.lm_head.weight.val().sum().into_scalar::<f32>();
                if step >= args.warmup {
                    seconds.push(started.elapsed().as_secs_f64());
                }
            }
        }
        Mode::Infer => {
            let model = ReformerLm::new(&config, 0, &device)?;
            let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [args.batch_size, args.seq_len]), &device);
            for step in 0..args.warmup + args.repeats {
                let started = Instant::now();
                let ctx = ForwardContext::eval(step as u64).with_lsh_mode(lsh_mode);
                let logits = model.forward(ids.clone(), None, &ctx)?;
                let _ = logits.sum().into_scalar::<f32>();
                if step >= args.warmup {
                    seconds.push(started.elapsed().as_secs_f64());
                }
            }
        }
    }
    let peak_gpu_mib = sampler.and_then(GpuMemorySampler::finish);
    let report = StepReport { seconds, peak_rss_mib: peak_rss_mib()?, peak_gpu_mib };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_fits_every_default_length() {
        let base = ReformerConfig::from_json_str(DEFAULT_CONFIG).unwrap();
        for seq_len in [1024, 4096, 16384, 65536] {
            let config = config_for(&base, seq_len).unwrap();
            assert_eq!(config.axial_pos_shape.iter().product::<usize>(), seq_len);
        }
    }

    #[test]
    fn full_attention_costs_more_memory_at_long_lengths() {
        let config = config_for(&ReformerConfig::from_json_str(DEFAULT_CONFIG).unwrap(), 16384).unwrap();
        let lsh = estimate(&config, 2, 16384, Mode::Train, Attention::Lsh);
        let full = estimate(&config, 2, 16384, Mode::Train, Attention::Full);
        assert!(full > 4.0 * lsh, "{full} vs {lsh}");
    }
}
