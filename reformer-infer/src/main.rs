//! `reformer-infer`: generation, scoring and evaluation with a trained Reformer run, on the
//! CPU by default.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use burn::prelude::*;
use burn::tensor::TensorData;
use clap::{Args as ClapArgs, Parser, Subcommand};
use rand::SeedableRng;
use rand::rngs::StdRng;
use reformer_model::checkpoint::load_run_model;
use reformer_model::data::{DuplicationTask, bytes_to_ids, ids_to_bytes};
use reformer_model::device::select_device;
use reformer_model::loss::{causal_lm_outputs, weighted_accuracy, weighted_cross_entropy};
use reformer_model::sampling::SamplingPolicy;
use reformer_model::{ForwardContext, ReformerLm};
use reformer_train::run_dir::{SETTINGS_FILE, read_json};
use reformer_train::settings::{TaskSettings, TrainSettings};
use serde_json::json;

/// Run a trained Reformer: generate text, score files, evaluate the duplication task.
#[derive(Parser, Debug)]
#[command(version, about, allow_negative_numbers = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate a continuation of a prompt; the generated text streams to standard output.
    Generate(GenerateArgs),
    /// Score files: tokens, mean loss in nats, bits per token and bits per byte.
    Score(ScoreArgs),
    /// Evaluate a duplication-task run: second-copy accuracy in percent.
    Eval(EvalArgs),
}

#[derive(ClapArgs, Debug)]
struct CommonArgs {
    /// Run directory written by reformer-train.
    #[arg(long, value_name = "DIR")]
    run: PathBuf,
    /// Backend: `cpu` (the faster CPU backend compiled in), `ndarray`, `flex` or `wgpu`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Seed of the LSH hash rotations (and of sampling in generate).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(ClapArgs, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Prompt: text for a byte-level run; space-separated token ids for a duplication run.
    #[arg(long)]
    prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 100)]
    max_new_tokens: usize,
    /// Softmax temperature; 0 (the default) is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sample only from the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample only from the smallest set of tokens whose probability reaches p.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
}

#[derive(ClapArgs, Debug)]
struct ScoreArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Print one JSON object per line: per file, then the total with "file": null.
    #[arg(long)]
    json: bool,
    /// Files to score, read as bytes.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

#[derive(ClapArgs, Debug)]
struct EvalArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Hash rounds of every LSH layer at evaluation, overriding the config's num_hashes.
    #[arg(long)]
    num_hashes: Option<usize>,
    /// Batches of evaluation sequences.
    #[arg(long, default_value_t = 8)]
    batches: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Score(args) => score(args),
        Command::Eval(args) => eval(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Returns the duplication task a run was trained on, or `None` for a byte-level run. A run
/// directory without `train.json` (one not written by reformer-train) counts as byte-level.
fn duplication_task(run: &Path) -> anyhow::Result<Option<DuplicationTask>> {
    if !run.is_dir() {
        bail!("run directory {} not found; pass the --out folder of a reformer-train run", run.display());
    }
    let path = run.join(SETTINGS_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let settings: TrainSettings = read_json(&path)?;
    Ok(match settings.task {
        TaskSettings::Duplication { n_symbols } => Some(DuplicationTask::for_seq_len(settings.seq_len, n_symbols)),
        TaskSettings::Text { .. } => None,
    })
}

fn load(common: &CommonArgs) -> anyhow::Result<(ReformerLm, Device)> {
    let device = select_device(&common.device)?;
    let model = load_run_model(&common.run, &device)
        .with_context(|| format!("failed to load the model of run {}", common.run.display()))?;
    Ok((model, device))
}

fn ids_tensor(ids: &[i64], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device)
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let duplication = duplication_task(&args.common.run)?.is_some();
    let (model, device) = load(&args.common)?;
    let config = model.config().clone();
    if !config.is_decoder {
        bail!("run {} contains a bidirectional (masked-LM) model, which cannot generate left to right; use `score` instead", args.common.run.display());
    }
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!("invalid --temperature {}: use 0 (greedy) or a positive number", args.temperature);
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("invalid --top-p {}: use a probability in (0, 1]", args.top_p);
    }
    let mut ids = if duplication {
        parse_ids(&args.prompt, config.vocab_size)?
    } else {
        bytes_to_ids(args.prompt.as_bytes())
    };
    if ids.is_empty() {
        bail!("the prompt is empty: give at least one token with --prompt");
    }
    let policy = SamplingPolicy { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p };
    let mut rng = StdRng::seed_from_u64(args.common.seed);
    let ctx = ForwardContext::eval(args.common.seed);
    let max_len = config.max_seq_len();
    let mut stdout = std::io::stdout().lock();

    for _ in 0..args.max_new_tokens {
        // The model accepts at most its maximum length, so only the most recent tokens go in.
        let window = &ids[ids.len().saturating_sub(max_len)..];
        let logits = model.forward(ids_tensor(window, &device), None, &ctx)?;
        let [_, seq_len, vocab_size] = logits.dims();
        let last: Vec<f32> = logits
            .slice([0..1, seq_len - 1..seq_len, 0..vocab_size])
            .try_into_vec_as::<f32>()
            .context("failed to read logits")?;
        let next = policy.sample(&last, &mut rng) as i64;
        ids.push(next);
        if duplication {
            write!(stdout, "{next} ")?;
        } else {
            stdout.write_all(&ids_to_bytes(&[next]))?;
        }
        stdout.flush()?;
        if config.eos_token_id == Some(next as usize) {
            break;
        }
    }
    writeln!(stdout)?;
    Ok(())
}

fn parse_ids(text: &str, vocab_size: usize) -> anyhow::Result<Vec<i64>> {
    text.split_whitespace()
        .map(|word| {
            let id: i64 = word
                .parse()
                .with_context(|| format!("invalid token id `{word}` in --prompt: a duplication run takes space-separated integers"))?;
            if id < 0 || id as usize >= vocab_size {
                bail!("token id {id} in --prompt is outside the vocabulary 0..{vocab_size}");
            }
            Ok(id)
        })
        .collect()
}

/// Loss totals of scored text.
#[derive(Default)]
struct ScoreTotals {
    nats: f64,
    tokens: usize,
    bytes: usize,
}

impl ScoreTotals {
    fn add(&mut self, other: &ScoreTotals) {
        self.nats += other.nats;
        self.tokens += other.tokens;
        self.bytes += other.bytes;
    }

    fn loss(&self) -> f64 {
        self.nats / self.tokens.max(1) as f64
    }

    fn bits_per_token(&self) -> f64 {
        self.loss() / std::f64::consts::LN_2
    }

    fn bits_per_byte(&self) -> f64 {
        self.nats / std::f64::consts::LN_2 / self.bytes.max(1) as f64
    }
}

fn score(args: ScoreArgs) -> anyhow::Result<()> {
    if duplication_task(&args.common.run)?.is_some() {
        bail!("run {} is a duplication-task run, which scores no text; use `eval`", args.common.run.display());
    }
    let (model, device) = load(&args.common)?;
    let ctx = ForwardContext::eval(args.common.seed);
    let window = model.config().max_seq_len();
    let mut total = ScoreTotals::default();

    for file in &args.files {
        let bytes = std::fs::read(file).with_context(|| format!("failed to read {}", file.display()))?;
        let ids = bytes_to_ids(&bytes);
        let mut totals = ScoreTotals::default();
        // Non-overlapping windows; the first token of each window has no prediction.
        for chunk in ids.chunks(window).filter(|c| c.len() >= 2) {
            let input = ids_tensor(chunk, &device);
            let weights = Tensor::<2>::ones([1, chunk.len()], &device);
            let (logits, targets, weights) = causal_lm_outputs(&model, input, weights, &ctx)?;
            let loss = weighted_cross_entropy(logits, targets, weights).into_scalar::<f32>() as f64;
            let scored = chunk.len() - 1;
            totals.nats += loss * scored as f64;
            totals.tokens += scored;
            // One token is one byte in a byte-level model.
            totals.bytes += scored;
        }
        if totals.tokens == 0 {
            bail!("{} has {} bytes, too few to score: a file needs at least 2 bytes", file.display(), bytes.len());
        }
        print_score(Some(file), &totals, args.json);
        total.add(&totals);
    }
    print_score(None, &total, args.json);
    Ok(())
}

fn print_score(file: Option<&PathBuf>, totals: &ScoreTotals, as_json: bool) {
    if as_json {
        let line = json!({
            "file": file.map(|f| f.display().to_string()),
            "tokens": totals.tokens,
            "loss_nats": totals.loss(),
            "bits_per_token": totals.bits_per_token(),
            "bits_per_byte": totals.bits_per_byte(),
        });
        println!("{line}");
    } else {
        let name = file.map_or("total".to_string(), |f| f.display().to_string());
        println!(
            "{name}: {} tokens, loss {:.4} nats, {:.4} bits/token, {:.4} bits/byte",
            totals.tokens,
            totals.loss(),
            totals.bits_per_token(),
            totals.bits_per_byte()
        );
    }
}

fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let Some(task) = duplication_task(&args.common.run)? else {
        bail!("run {} is not a duplication-task run; `eval` measures second-copy accuracy, use `score` for text", args.common.run.display());
    };
    if args.num_hashes == Some(0) {
        bail!("invalid --num-hashes 0: use at least one hash round");
    }
    if args.batches == 0 || args.batch_size == 0 {
        bail!("invalid --batches {} / --batch-size {}: use positive numbers", args.batches, args.batch_size);
    }

    let (model, device) = load(&args.common)?;
    let mut ctx = ForwardContext::eval(args.common.seed);
    ctx.num_hashes = args.num_hashes;
    let mut rng = StdRng::seed_from_u64(args.common.seed);

    let mut correct = 0;
    let mut counted = 0;
    for _ in 0..args.batches {
        let batch = task.sample(args.batch_size, &mut rng);
        let (ids, weights) = batch.to_tensors(&device);
        let (logits, targets, weights) = causal_lm_outputs(&model, ids, weights, &ctx)?;
        let (batch_correct, batch_counted) = weighted_accuracy(logits, targets, weights);
        correct += batch_correct;
        counted += batch_counted;
    }

    let hashes = args.num_hashes.unwrap_or(model.config().num_hashes);
    println!("second-copy accuracy: {:.2}% ({correct}/{counted} tokens, hash rounds: {hashes})", 100.0 * correct as f64 / counted.max(1) as f64);
    Ok(())
}
