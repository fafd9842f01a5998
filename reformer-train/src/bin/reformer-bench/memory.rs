//! `reformer-bench memory`: peak resident memory of one training step (forward, backward and
//! an Adam update) against depth and length.
//!
//! Each measurement runs in a fresh child process, so that one run's allocations cannot
//! inflate the next one's peak. The child reports its whole peak (`VmHWM` in
//! `/proc/self/status`): binary, parameters, gradients and optimizer state included.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::TensorData;
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reformer_model::config::AttentionKind;
use reformer_model::device::select_device;
use reformer_model::loss::{causal_lm_outputs, weighted_cross_entropy};
use reformer_model::{ForwardContext, ReformerConfig, ReformerLm};

use crate::common::{GpuMemorySampler, axial_rows, peak_rss_mib};
use serde::{Deserialize, Serialize};

/// Model shape shared by the parent and its children. The defaults are the depth benchmark of
/// BENCHMARKS.md.
#[derive(Args, Clone, Debug, Serialize)]
pub struct ModelArgs {
    /// Tokens per sequence; a multiple of --chunk-len.
    #[arg(long, default_value_t = 16384)]
    seq_len: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Model width d_model.
    #[arg(long, default_value_t = 256)]
    hidden_size: usize,
    /// Attention heads, each of width 64.
    #[arg(long, default_value_t = 2)]
    heads: usize,
    /// Hash rounds of the LSH layers.
    #[arg(long, default_value_t = 2)]
    num_hashes: usize,
    /// Chunk length of LSH and local attention.
    #[arg(long, default_value_t = 64)]
    chunk_len: usize,
    /// Inner width of the feed-forward blocks.
    #[arg(long, default_value_t = 512)]
    d_ff: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 258)]
    vocab_size: usize,
    /// Backend: cpu, ndarray, flex or wgpu.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Arguments of `reformer-bench memory`.
#[derive(Args, Debug)]
pub struct MemoryArgs {
    /// Depths to measure, comma-separated; layers alternate LSH and local attention.
    #[arg(long, value_delimiter = ',', default_value = "2,6,12")]
    depths: Vec<usize>,
    /// Skip the plain-autodiff runs.
    #[arg(long)]
    reversible_only: bool,
    #[command(flatten)]
    model: ModelArgs,
}

/// Arguments of the hidden `memory-step` command: one measurement.
#[derive(Args, Debug)]
pub struct StepArgs {
    /// Number of layers.
    #[arg(long)]
    depth: usize,
    /// Use plain autodiff instead of the reversible node.
    #[arg(long)]
    plain: bool,
    #[command(flatten)]
    model: ModelArgs,
}

/// Measurement reported by one child process.
#[derive(Debug, Serialize, Deserialize)]
struct StepReport {
    peak_rss_mib: f64,
    /// Peak GPU memory above the start (wgpu with nvidia-smi only).
    #[serde(default)]
    peak_gpu_mib: Option<f64>,
    seconds: f64,
    loss: f32,
    parameters: usize,
}

/// Runs every configuration in a child process and prints a Markdown table.
pub fn run(args: &MemoryArgs) -> anyhow::Result<()> {
    ensure!(!args.depths.is_empty(), "invalid --depths: give at least one depth, such as --depths 2,6,12");
    // Reject bad arguments before any child starts.
    for &depth in &args.depths {
        build_config(&args.model, depth)?;
    }
    select_device(&args.model.device)?;
    let exe = std::env::current_exe().context("failed to locate the reformer-bench executable")?;
    let modes: &[bool] = if args.reversible_only { &[false] } else { &[false, true] };
    let m = &args.model;

    println!(
        "one training step, batch {} x seq_len {}, d_model {}, {} heads of 64, {} hashes, chunk {}, d_ff {}, device {}",
        m.batch_size, m.seq_len, m.hidden_size, m.heads, m.num_hashes, m.chunk_len, m.d_ff, m.device
    );
    println!("| layers | backward | parameters | peak RSS (MiB) | peak GPU (MiB) | ratio to first depth | step time (s) | loss |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut measured = 0;
    for &plain in modes {
        let mut first_peak = None;
        for &depth in &args.depths {
            let report = match spawn_step(&exe, m, depth, plain) {
                Ok(report) => report,
                Err(error) => {
                    // A depth that does not fit is a result too; the deeper ones are skipped.
                    println!("| {depth} | {} | - | - | - | - | - | {error:#} |", if plain { "plain autodiff" } else { "reversible node" });
                    break;
                }
            };
            // On a GPU the activations live in its memory, so the ratio follows that peak.
            let peak = report.peak_gpu_mib.unwrap_or(report.peak_rss_mib);
            let first = *first_peak.get_or_insert(peak);
            println!(
                "| {depth} | {} | {} | {:.0} | {} | {:.3} | {:.1} | {:.4} |",
                if plain { "plain autodiff" } else { "reversible node" },
                report.parameters,
                report.peak_rss_mib,
                report.peak_gpu_mib.map_or("-".to_string(), |mib| format!("{mib:.0}")),
                peak / first,
                report.seconds,
                report.loss
            );
            measured += 1;
        }
    }
    // Failed rows are results, but a table without any measurement is an error.
    ensure!(measured > 0, "no configuration could be measured; see the reasons in the table above");
    Ok(())
}

fn spawn_step(exe: &std::path::Path, m: &ModelArgs, depth: usize, plain: bool) -> anyhow::Result<StepReport> {
    let mut command = Command::new(exe);
    command.arg("memory-step").arg("--depth").arg(depth.to_string());
    if plain {
        command.arg("--plain");
    }
    for (flag, value) in [
        ("--seq-len", m.seq_len.to_string()),
        ("--batch-size", m.batch_size.to_string()),
        ("--hidden-size", m.hidden_size.to_string()),
        ("--heads", m.heads.to_string()),
        ("--num-hashes", m.num_hashes.to_string()),
        ("--chunk-len", m.chunk_len.to_string()),
        ("--d-ff", m.d_ff.to_string()),
        ("--vocab-size", m.vocab_size.to_string()),
        ("--device", m.device.clone()),
    ] {
        command.arg(flag).arg(value);
    }
    let output = command.output().context("failed to start a measurement process")?;
    if !output.status.success() {
        // A child killed by a signal (often the kernel's out-of-memory killer) prints nothing.
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let reason = if stderr.is_empty() { format!("the process ended with {}", output.status) } else { stderr };
        bail!(
            "the measurement at {depth} layers ({}) failed: {reason}",
            if plain { "plain autodiff" } else { "reversible node" }
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("unreadable measurement output: {line:?}"))
}

/// Runs one training step and prints its [`StepReport`] as JSON.
pub fn run_step(args: &StepArgs) -> anyhow::Result<()> {
    let m = &args.model;
    let config = build_config(m, args.depth)?;
    if m.device != "wgpu" {
        let needed = reformer_model::memory::step_bytes(&config, m.batch_size, m.seq_len, true, !args.plain);
        reformer_model::memory::check_fits(
            needed,
            || format!("one training step of {} x {} tokens at {} layers", m.batch_size, m.seq_len, args.depth),
            || "lower --seq-len, --batch-size or --depths".to_string(),
        )?;
    }
    let device = select_device(&m.device)?.autodiff();
    // Seed 0 gives every process the same initial weights, so losses compare across modes.
    let model = ReformerLm::new(&config, 0, &device)?;
    let parameters = model.num_params();
    let mut optimizer = AdamConfig::new().init();

    let mut rng = StdRng::seed_from_u64(0);
    let ids: Vec<i64> = (0..m.batch_size * m.seq_len).map(|_| rng.random_range(0..m.vocab_size as i64)).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [m.batch_size, m.seq_len]), &device);
    let weights = Tensor::<2>::ones([m.batch_size, m.seq_len], &device);
    let ctx = ForwardContext::train(0, 0).with_reversible(!args.plain);

    let sampler = GpuMemorySampler::start(&m.device);
    let started = Instant::now();
    let (logits, targets, weights) = causal_lm_outputs(&model, ids, weights, &ctx)?;
    let loss = weighted_cross_entropy(logits, targets, weights);
    let loss_value = loss.clone().into_scalar::<f32>();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let model = optimizer.step(1e-4, model, grads);
    // Reading one updated value waits for the step on backends that run asynchronously.
    let _ = model.lm_head.weight.val().sum().into_scalar::<f32>();
    let seconds = started.elapsed().as_secs_f64();

    let peak_gpu_mib = sampler.and_then(GpuMemorySampler::finish);
    let report = StepReport { peak_rss_mib: peak_rss_mib()?, peak_gpu_mib, seconds, loss: loss_value, parameters };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Returns the benchmark's model config: `depth` layers alternating LSH and local attention,
/// heads of 64, an axial position shape whose product is `seq_len`, and no dropout.
fn build_config(m: &ModelArgs, depth: usize) -> anyhow::Result<ReformerConfig> {
    ensure!(depth > 0, "invalid --depths value 0: every depth needs at least one layer");
    ensure!(m.batch_size > 0, "invalid --batch-size 0: use at least one sequence");
    ensure!(m.chunk_len > 0, "invalid --chunk-len 0: use a positive chunk length such as 64");
    ensure!(
        m.seq_len >= m.chunk_len && m.seq_len % m.chunk_len == 0,
        "invalid --seq-len {}: use a multiple of --chunk-len {}",
        m.seq_len,
        m.chunk_len
    );
    ensure!(m.hidden_size >= 2 && m.hidden_size % 4 == 0, "invalid --hidden-size {}: use a multiple of 4", m.hidden_size);
    let rows = axial_rows(m.seq_len);
    let config = ReformerConfig {
        attn_layers: [AttentionKind::Lsh, AttentionKind::Local].into_iter().cycle().take(depth).collect(),
        hidden_size: m.hidden_size,
        num_attention_heads: m.heads,
        attention_head_size: 64,
        num_hashes: m.num_hashes,
        num_buckets: None,
        lsh_attn_chunk_length: m.chunk_len,
        local_attn_chunk_length: m.chunk_len,
        axial_pos_shape: vec![rows, m.seq_len / rows],
        axial_pos_embds_dim: vec![m.hidden_size / 4, m.hidden_size - m.hidden_size / 4],
        max_position_embeddings: m.seq_len,
        feed_forward_size: m.d_ff,
        hidden_dropout_prob: 0.0,
        lsh_attention_probs_dropout_prob: 0.0,
        local_attention_probs_dropout_prob: 0.0,
        is_decoder: true,
        vocab_size: m.vocab_size,
        ..ReformerConfig::default()
    };
    config.validate()?;
    Ok(config)
}
