//! `reformer-bench decode`: per-token latency of generation after prompts of several lengths,
//! with the decoding cache and with full recomputation.
//!
//! Two layer stacks are measured: the config's own (named by its layers, such as
//! `lsh+local`) and the same with every layer local. For each stack and prefix length, a
//! random prompt runs through [`Decoder::new`]. After one untimed token, `--tokens` tokens are
//! fed one at a time, and the median time per token is reported. Without the cache, each token
//! is a forward pass over the whole sequence, timed over `--uncached-tokens` tokens.
//! The model's maximum length is the smallest power of two not below the longest prefix plus
//! the generated tokens, with the axial shape of `reformer-bench speed`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, ensure};
use burn::prelude::*;
use burn::tensor::TensorData;
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reformer_model::decode::Decoder;
use reformer_model::device::select_device;
use reformer_model::{AttentionKind, ForwardContext, ReformerConfig, ReformerLm, memory};
use reformer_train::settings::load_config;
use serde::Serialize;

use crate::common::{axial_rows, peak_rss_mib};

/// Limit on the prompt length: 2^30, far past what fits in memory, so that the
/// power-of-two maximum length cannot overflow.
const MAX_LEN: usize = 1 << 30;

/// Limit on the generated tokens per prompt.
const MAX_TOKENS: usize = 1 << 20;

/// The speed benchmark's config: 2 layers [lsh, local], hidden 256, 2 heads of 64.
const DEFAULT_CONFIG: &str = include_str!("../../../../assets/presets/bench-speed.json");

/// Arguments of `reformer-bench decode`.
#[derive(Args, Debug)]
pub struct DecodeArgs {
    /// Model config: this project's JSON or a Hugging Face config.json [default:
    /// assets/presets/bench-speed.json, built in]; its max_position_embeddings and
    /// axial_pos_shape are set to fit the longest prefix.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Prefix (prompt) lengths, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1024,8192,32768")]
    prefixes: Vec<usize>,
    /// Tokens generated with the cache after each prefix; the median time is reported.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Tokens generated without the cache after each prefix (0 skips the uncached runs).
    #[arg(long, default_value_t = 2)]
    uncached_tokens: usize,
    /// Backend: cpu, ndarray, flex or wgpu (as compiled in).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Also write the results as JSON Lines to this file.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// One measurement: a layer stack at one prefix length.
#[derive(Debug, Serialize)]
struct Row {
    implementation: &'static str,
    stack: String,
    prefix: usize,
    prefill_seconds: f64,
    cached_ms_per_token: f64,
    uncached_ms_per_token: Option<f64>,
    peak_rss_mib: f64,
    threads: usize,
    backend: String,
}

pub fn run(args: &DecodeArgs) -> anyhow::Result<()> {
    ensure!(!args.prefixes.is_empty() && args.prefixes.iter().all(|&p| p > 0), "invalid --prefixes {:?}: give positive lengths", args.prefixes);
    ensure!((1..=MAX_TOKENS).contains(&args.tokens), "invalid --tokens {}: use 1 to {MAX_TOKENS}", args.tokens);
    ensure!(args.uncached_tokens <= MAX_TOKENS, "invalid --uncached-tokens {}: use 0 to {MAX_TOKENS}", args.uncached_tokens);
    let longest_prefix = *args.prefixes.iter().max().expect("checked non-empty");
    ensure!(longest_prefix <= MAX_LEN, "invalid --prefixes {longest_prefix}: use at most {MAX_LEN} tokens");
    let mut base = match &args.config {
        Some(path) => load_config(path).with_context(|| format!("failed to load --config {}", path.display()))?,
        None => ReformerConfig::from_json_str(DEFAULT_CONFIG)?,
    };
    // One untimed token warms the caches up before the timed ones.
    let longest = longest_prefix + 1 + args.tokens.max(args.uncached_tokens);
    // Inputs are padded to a multiple of the chunk lengths' least common multiple, so the
    // maximum length is one: the next power of two when it is one, else the next multiple.
    let multiple = base.chunk_lcm();
    let max_len = match longest.next_power_of_two() {
        power if power % multiple == 0 => power,
        _ => longest.div_ceil(multiple).saturating_mul(multiple),
    };
    ensure!(
        max_len <= 2 * MAX_LEN,
        "invalid --config: its chunk lengths' least common multiple {multiple} pads prompts of {longest} tokens beyond {} tokens; choose chunk lengths with a smaller common multiple (powers of two)",
        2 * MAX_LEN
    );
    let rows = axial_rows(max_len);
    base.max_position_embeddings = max_len;
    base.axial_pos_shape = vec![rows, max_len / rows];
    let local = ReformerConfig { attn_layers: vec![AttentionKind::Local; base.attn_layers.len()], ..base.clone() };
    for config in [&base, &local] {
        config.validate().with_context(|| format!("invalid model config for prompts of up to {longest} tokens"))?;
    }
    // Every length is checked before the first measurement, because a failed allocation
    // aborts the process without a message.
    for &prefix in &args.prefixes {
        let bytes = memory::step_bytes(&base, 1, prefix + args.uncached_tokens, false, true);
        memory::check_fits(
            bytes,
            || format!("the prompt pass at --prefixes {prefix}"),
            || "lower --prefixes".to_string(),
        )?;
    }
    let device = select_device(&args.device)?;
    let mut out = match &args.out {
        Some(path) => Some(std::fs::File::create(path).with_context(|| format!("cannot create --out {}", path.display()))?),
        None => None,
    };

    println!("| stack | prefix | prefill (s) | cached ms/token | uncached ms/token |");
    println!("|---|---:|---:|---:|---:|");
    for config in [&base, &local] {
        let stack = stack_name(config);
        let model = ReformerLm::new(config, 0, &device)?;
        for &prefix in &args.prefixes {
            let row = measure(&model, &stack, prefix, args, &device)?;
            let uncached = row.uncached_ms_per_token.map_or("-".to_string(), |ms| format!("{ms:.1}"));
            println!("| {stack} | {prefix} | {:.2} | {:.2} | {uncached} |", row.prefill_seconds, row.cached_ms_per_token);
            if let Some(file) = out.as_mut() {
                writeln!(file, "{}", serde_json::to_string(&row)?)?;
            }
        }
    }
    Ok(())
}

/// Names a layer stack by its attention kinds, such as `lsh+local`.
fn stack_name(config: &ReformerConfig) -> String {
    let kinds: Vec<&str> = config
        .attn_layers
        .iter()
        .map(|kind| match kind {
            AttentionKind::Lsh => "lsh",
            AttentionKind::Local => "local",
        })
        .collect();
    kinds.join("+")
}

fn measure(model: &ReformerLm, stack: &str, prefix: usize, args: &DecodeArgs, device: &Device) -> anyhow::Result<Row> {
    let vocab_size = model.config().vocab_size as i64;
    let mut rng = StdRng::seed_from_u64(prefix as u64);
    let prompt: Vec<i64> = (0..prefix).map(|_| rng.random_range(0..vocab_size)).collect();
    let ctx = ForwardContext::eval(0);

    let start = Instant::now();
    let (mut decoder, _) = Decoder::new(model, std::slice::from_ref(&prompt), &ctx)?;
    let prefill_seconds = start.elapsed().as_secs_f64();
    decoder.step(&[0], &[rng.random_range(0..vocab_size)])?;
    let mut times = Vec::with_capacity(args.tokens);
    for _ in 0..args.tokens {
        let token = rng.random_range(0..vocab_size);
        let start = Instant::now();
        decoder.step(&[0], &[token])?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let cached_ms_per_token = times[times.len() / 2];

    let uncached_ms_per_token = if args.uncached_tokens > 0 {
        let mut ids = prompt;
        let start = Instant::now();
        for _ in 0..args.uncached_tokens {
            ids.push(rng.random_range(0..vocab_size));
            let input = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [1, ids.len()]), device);
            let logits = model.forward(input, None, &ctx)?;
            let [_, seq_len, vocab] = logits.dims();
            let _: Vec<f32> = logits.slice([0..1, seq_len - 1..seq_len, 0..vocab]).try_into_vec_as::<f32>().context("failed to read logits")?;
        }
        Some(start.elapsed().as_secs_f64() * 1e3 / args.uncached_tokens as f64)
    } else {
        None
    };
    Ok(Row {
        implementation: "reformer-rs",
        stack: stack.to_string(),
        prefix,
        prefill_seconds,
        cached_ms_per_token,
        uncached_ms_per_token,
        peak_rss_mib: peak_rss_mib()?,
        threads: std::thread::available_parallelism().map_or(1, usize::from),
        backend: args.device.clone(),
    })
}
