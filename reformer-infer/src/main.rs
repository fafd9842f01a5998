//! `reformer-infer`: generation, scoring and evaluation with a trained Reformer run, on the
//! CPU by default.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use burn::prelude::*;
use burn::tensor::TensorData;
use clap::{Args as ClapArgs, Parser, Subcommand};
use rand::SeedableRng;
use rand::rngs::StdRng;
use reformer_model::checkpoint::{CHECKPOINTS_DIR, MODEL_FILE, STATE_FILE, load_run_model, save_weights};
use reformer_model::data::DuplicationTask;
use reformer_model::device::select_device;
use reformer_model::hf::{HfArchitecture, HfCheckpoint, load_hf_checkpoint, load_rotations, save_hf_checkpoint};
use reformer_model::loss::{causal_lm_outputs, weighted_accuracy, weighted_cross_entropy};
use reformer_model::decode::{self, GenerateOptions};
use reformer_model::sampling::SamplingPolicy;
use reformer_model::tokenizer::{SENTENCEPIECE_FILE, Tokenizer};
use reformer_model::{AttentionKind, ForwardContext, LshMode, ReformerLm};
use reformer_train::plot::PLOT_FILE;
use reformer_train::run_dir::{CONFIG_FILE, METRICS_FILE, SETTINGS_FILE, read_json, write_checkpoint, write_json_atomic};
use reformer_train::settings::{TaskSettings, TrainSettings};
use reformer_train::trainer::TrainState;
use serde_json::json;

/// Run a trained Reformer or a Hugging Face Reformer checkpoint: generate text, score files,
/// evaluate the duplication task, convert between formats.
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
    /// Convert a Hugging Face checkpoint into a run directory.
    Convert(ConvertArgs),
    /// Export a run's model as a Hugging Face checkpoint that transformers loads.
    Export(ExportArgs),
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

/// Model source and LSH rotations.
#[derive(ClapArgs, Debug)]
struct ModelArgs {
    /// Run directory written by reformer-train (or by `convert`).
    #[arg(long, value_name = "DIR", required_unless_present = "hf", conflicts_with = "hf")]
    run: Option<PathBuf>,
    /// Hugging Face checkpoint folder: config.json and model.safetensors or pytorch_model.bin,
    /// plus spiece.model when the checkpoint uses SentencePiece.
    #[arg(long, value_name = "DIR")]
    hf: Option<PathBuf>,
    /// With --hf, load even if tensors are missing, unexpected or mis-shaped; missing ones keep
    /// random initial values. The report goes to standard error.
    #[arg(long, requires = "hf")]
    allow_partial: bool,
    /// Safetensors file of LSH rotations to use in every forward call instead of random ones:
    /// one f32 tensor `layers.<i>.rotations` per LSH layer (i: index in attn_layers), in Hugging
    /// Face's layout [n_heads, d_head, n_hashes, rot_size / 2].
    #[arg(long, value_name = "FILE")]
    rotations: Option<PathBuf>,
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
    model: ModelArgs,
    /// Prompt: text for a text model; space-separated token ids for a duplication run.
    /// Repeat it to continue several prompts in one batch. Each continuation is then printed,
    /// followed by a newline, once all are done; use --json when they may contain newlines.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 100)]
    max_new_tokens: usize,
    /// Softmax temperature; 0 (the default) is greedy decoding.
    // Negative values parse, so that `--temperature -1` gets the range error, not "unexpected
    // argument".
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f64,
    /// Sample only from the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample only from the smallest set of tokens whose probability reaches p.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f64,
    /// Recompute the whole sequence for every new token instead of using the decoding cache
    /// (slower; for checking the cache).
    #[arg(long)]
    no_cache: bool,
    /// Print one JSON object per prompt, {"prompt": index, "ids": [...], "text": ...}, after
    /// all prompts are done.
    #[arg(long)]
    json: bool,
}

#[derive(ClapArgs, Debug)]
struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print one JSON object per line, per file and then the total with "file": null, with
    /// numbers at full precision.
    #[arg(long)]
    json: bool,
    /// Files to score: read as bytes by a byte-level model, as UTF-8 text by a SentencePiece one.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

#[derive(ClapArgs, Debug)]
struct EvalArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Hash rounds of every LSH layer at evaluation [default: those the run trained with].
    #[arg(long, value_name = "N", conflicts_with_all = ["full_attention", "ablate_lsh", "table"])]
    num_hashes: Option<usize>,
    /// Evaluate the LSH layers with exact attention over every position, keeping their
    /// parameters and conventions (shared query-key, a token attends to itself only when
    /// nothing else is allowed).
    #[arg(long, conflicts_with_all = ["ablate_lsh", "table"])]
    full_attention: bool,
    /// Set the output of every LSH layer to zero, so that only the residual stream passes: a
    /// model that copies through its LSH layers falls to chance accuracy.
    #[arg(long, conflicts_with = "table")]
    ablate_lsh: bool,
    /// Evaluate under full attention and LSH with 8, 4, 2 and 1 hash rounds, on the same
    /// sequences, and print the row as in Table 2 of the Reformer paper.
    #[arg(long)]
    table: bool,
    /// Print one JSON object per evaluation, with numbers at full precision.
    #[arg(long)]
    json: bool,
    /// Batches of evaluation sequences.
    #[arg(long, default_value_t = 8)]
    batches: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
}

#[derive(ClapArgs, Debug)]
struct ConvertArgs {
    /// Hugging Face checkpoint folder.
    #[arg(long, value_name = "DIR")]
    hf: PathBuf,
    /// Run directory to write: config.json, one checkpoint, and spiece.model if the checkpoint
    /// has one.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Load even if tensors are missing, unexpected or mis-shaped.
    #[arg(long)]
    allow_partial: bool,
    /// Replace a run already in --out.
    #[arg(long)]
    force: bool,
}

#[derive(ClapArgs, Debug)]
struct ExportArgs {
    /// Run directory written by reformer-train or `convert`.
    #[arg(long, value_name = "DIR")]
    run: PathBuf,
    /// Folder to write the checkpoint to (config.json and model.safetensors); created if needed.
    #[arg(long, value_name = "DIR")]
    hf_out: PathBuf,
}

fn main() -> ExitCode {
    reformer_model::memory::keep_freed_memory();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Score(args) => score(args),
        Command::Eval(args) => eval(args),
        Command::Convert(args) => convert(args),
        Command::Export(args) => export(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that closed the pipe early (`| head`) has all the output it wants.
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Returns the duplication task a run was trained on, with its training settings, or `None`
/// for a text run. A run directory without `train.json` (one written by `convert`) counts as
/// a text run.
fn duplication_run(run: &Path) -> anyhow::Result<Option<(DuplicationTask, TrainSettings)>> {
    if !run.is_dir() {
        bail!("run directory {} not found; pass the --out folder of a reformer-train run", run.display());
    }
    let path = run.join(SETTINGS_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let settings: TrainSettings = read_json(&path)?;
    Ok(match settings.task {
        TaskSettings::Duplication { n_symbols } => Some((DuplicationTask::for_seq_len(settings.seq_len, n_symbols), settings)),
        TaskSettings::Text { .. } => None,
    })
}

fn load(common: &CommonArgs) -> anyhow::Result<(ReformerLm, Device)> {
    let device = select_device(&common.device)?;
    let model = load_run(&common.run, &device)?;
    Ok((model, device))
}

/// Loads the model of a run directory's newest checkpoint.
fn load_run(run: &Path, device: &Device) -> anyhow::Result<ReformerLm> {
    load_run_model(run, device).with_context(|| format!("failed to load the model of run {}", run.display()))
}

/// Loads a Hugging Face checkpoint, printing a warning when `allow_partial` let an incomplete
/// load through.
fn load_hf(dir: &Path, device: &Device, allow_partial: bool) -> anyhow::Result<HfCheckpoint> {
    let checkpoint = load_hf_checkpoint(dir, device, allow_partial)
        .with_context(|| format!("failed to load the Hugging Face checkpoint {}", dir.display()))?;
    if !checkpoint.report.is_complete() {
        eprintln!("warning: partial load of {}: {}", dir.display(), checkpoint.report);
    }
    Ok(checkpoint)
}

/// Model input: token ids of the duplication task, or text through a tokenizer.
enum Input {
    Duplication,
    Text(Tokenizer),
}

/// A model ready to run, with what it reads and what its head computes.
struct Loaded {
    model: ReformerLm,
    device: Device,
    architecture: HfArchitecture,
    input: Input,
    ctx: ForwardContext,
    /// `run DIR` or `checkpoint DIR`, for messages.
    source: String,
}

/// Loads the model of `--run` or `--hf`, with the rotations of `--rotations`.
fn load_model(args: &ModelArgs) -> anyhow::Result<Loaded> {
    let device = select_device(&args.device)?;
    let (model, architecture, input, source) = match (&args.run, &args.hf) {
        (Some(run), _) => {
            let duplication = duplication_run(run)?.is_some();
            let model = load_run(run, &device)?;
            let input = if duplication { Input::Duplication } else { Input::Text(Tokenizer::for_checkpoint(run, model.config().vocab_size)?) };
            let architecture = HfArchitecture::for_config(model.config());
            (model, architecture, input, format!("run {}", run.display()))
        }
        (None, Some(dir)) => {
            let checkpoint = load_hf(dir, &device, args.allow_partial)?;
            let tokenizer = Tokenizer::for_checkpoint(dir, checkpoint.model.config().vocab_size)?;
            (checkpoint.model, checkpoint.architecture, Input::Text(tokenizer), format!("checkpoint {}", dir.display()))
        }
        (None, None) => bail!("no model given: pass --run DIR or --hf DIR"),
    };

    let mut ctx = ForwardContext::eval(args.seed);
    if let Some(path) = &args.rotations {
        ctx.rotations = Some(Arc::new(load_rotations(path, model.config())?));
    }
    Ok(Loaded { model, device, architecture, input, ctx, source })
}

fn ids_tensor(ids: &[i64], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device)
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let Loaded { model, architecture, input, ctx, source, .. } = load_model(&args.model)?;
    let config = model.config().clone();
    match architecture {
        HfArchitecture::CausalLm => {}
        HfArchitecture::MaskedLm => bail!(
            "{source} contains a bidirectional masked-LM model (ReformerForMaskedLM), which cannot generate left to right; use `score` instead"
        ),
        HfArchitecture::Base => bail!("{source} is a bare ReformerModel without an LM head, so it cannot generate"),
    }
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!("invalid --temperature {}: use 0 (greedy) or a positive number", args.temperature);
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("invalid --top-p {}: use a probability in (0, 1]", args.top_p);
    }
    if args.temperature == 0.0 && (args.top_k > 0 || args.top_p < 1.0) {
        bail!("--top-k and --top-p apply only when sampling, but --temperature is 0 (greedy); add --temperature, for example 1.0");
    }
    let prompts = args
        .prompt
        .iter()
        .enumerate()
        .map(|(index, prompt)| {
            let ids = match &input {
                Input::Duplication => parse_ids(prompt, config.vocab_size)?,
                Input::Text(tokenizer) => tokenizer.encode(prompt)?,
            };
            if ids.is_empty() {
                bail!("prompt {} is empty: give at least one token with --prompt", index + 1);
            }
            Ok(ids)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        policy: SamplingPolicy { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p },
        eos_token_id: config.eos_token_id,
        use_cache: !args.no_cache,
        seed: args.model.seed,
    };
    let render = |ids: &[i64]| -> anyhow::Result<Vec<u8>> {
        Ok(match &input {
            Input::Duplication => ids.iter().map(|id| format!("{id} ")).collect::<String>().into_bytes(),
            Input::Text(tokenizer) => tokenizer.decode(ids)?,
        })
    };

    let mut stdout = std::io::stdout().lock();
    // One prompt streams as it is generated. Pieces can merge on decoding, so the text so far
    // is decoded whole and only its new bytes are printed.
    let stream = prompts.len() == 1 && !args.json;
    let mut so_far = Vec::new();
    let mut printed = 0;
    let generated = decode::generate(&model, &prompts, &options, &ctx, |_, token| -> anyhow::Result<()> {
        if stream {
            so_far.push(token);
            let text = render(&so_far)?;
            stdout.write_all(&text[printed.min(text.len())..])?;
            printed = text.len();
            stdout.flush()?;
        }
        Ok(())
    })?;
    if stream {
        writeln!(stdout)?;
        return Ok(());
    }
    for (index, ids) in generated.iter().enumerate() {
        let mut text = render(ids)?;
        if matches!(input, Input::Duplication) {
            text.pop(); // the space after the last id
        }
        if args.json {
            let text = String::from_utf8_lossy(&text);
            writeln!(stdout, "{}", json!({ "prompt": index, "ids": ids, "text": text }))?;
        } else {
            stdout.write_all(&text)?;
            writeln!(stdout)?;
        }
    }
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
    let Loaded { model, device, architecture, input, ctx, source } = load_model(&args.model)?;
    let Input::Text(tokenizer) = input else {
        bail!("{source} is a duplication-task run, which scores no text; use `eval`");
    };
    if architecture == HfArchitecture::Base {
        bail!("{source} is a bare ReformerModel without an LM head, so it cannot score text");
    }
    let window = model.config().max_seq_len();
    let mut total = ScoreTotals::default();

    for file in &args.files {
        if let Ok(meta) = std::fs::metadata(file) {
            // The bytes and their token ids (8 bytes each) are held at once.
            reformer_model::memory::check_fits(
                meta.len() as f64 * 9.0,
                || format!("scoring {} ({} bytes)", file.display(), meta.len()),
                || "split the file and score the parts".to_string(),
            )?;
        }
        let bytes = std::fs::read(file).with_context(|| format!("failed to read {}", file.display()))?;
        let ids = tokenizer.encode_bytes(&bytes)?;
        let vocab_size = model.config().vocab_size;
        if let Some(offset) = ids.iter().position(|&id| id < 0 || id as usize >= vocab_size) {
            bail!(
                "{} has token id {} at token {offset}, outside the model's vocabulary 0..{vocab_size}: score text the model's tokenizer covers",
                file.display(),
                ids[offset]
            );
        }
        let mut totals = ScoreTotals::default();
        // Non-overlapping windows. A causal model has no prediction for the first token of a
        // window; a masked LM scores every token at its own position.
        for chunk in ids.chunks(window) {
            let input = ids_tensor(chunk, &device);
            let weights = Tensor::<2>::ones([1, chunk.len()], &device);
            let (loss, scored) = match architecture {
                HfArchitecture::MaskedLm => {
                    let logits = model.forward(input.clone(), None, &ctx)?;
                    (weighted_cross_entropy(logits, input, weights), chunk.len())
                }
                _ if chunk.len() < 2 => continue,
                _ => {
                    let (logits, targets, weights) = causal_lm_outputs(&model, input, weights, &ctx)?;
                    (weighted_cross_entropy(logits, targets, weights), chunk.len() - 1)
                }
            };
            let loss = loss.into_scalar::<f32>() as f64;
            totals.nats += loss * scored as f64;
            totals.tokens += scored;
        }
        if totals.tokens == 0 {
            let count = bytes.len();
            let unit = if count == 1 { "byte" } else { "bytes" };
            bail!("{} has {count} {unit}, too few to score: a file needs at least 2 tokens", file.display());
        }
        totals.bytes = match tokenizer {
            // One token is one byte, and unscored first tokens cover no scored byte.
            Tokenizer::Bytes => totals.tokens,
            Tokenizer::SentencePiece(_) => bytes.len(),
        };
        print_score(Some(file), &totals, args.json)?;
        total.add(&totals);
    }
    print_score(None, &total, args.json)?;
    Ok(())
}

fn print_score(file: Option<&PathBuf>, totals: &ScoreTotals, as_json: bool) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    if as_json {
        let line = json!({
            "file": file.map(|f| f.display().to_string()),
            "tokens": totals.tokens,
            "loss_nats": totals.loss(),
            "bits_per_token": totals.bits_per_token(),
            "bits_per_byte": totals.bits_per_byte(),
        });
        writeln!(stdout, "{line}")
    } else {
        let name = file.map_or("total".to_string(), |f| f.display().to_string());
        writeln!(
            stdout,
            "{name}: {} tokens, loss {:.4} nats, {:.4} bits/token, {:.4} bits/byte",
            totals.tokens,
            totals.loss(),
            totals.bits_per_token(),
            totals.bits_per_byte()
        )
    }
}

/// Columns of Table 2 of Kitaev et al. (2020): the attention at evaluation, full first, then
/// LSH by falling hash rounds.
const TABLE_HASHES: [Option<usize>; 5] = [None, Some(8), Some(4), Some(2), Some(1)];

/// One evaluation of a duplication run under one attention of its LSH layers.
struct Evaluation {
    /// `full`, `LSH-<n>` or `ablated`.
    label: String,
    /// Hash rounds, when the LSH layers hash.
    num_hashes: Option<usize>,
    correct: usize,
    counted: usize,
}

impl Evaluation {
    fn accuracy(&self) -> f64 {
        100.0 * self.correct as f64 / self.counted.max(1) as f64
    }
}

fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let run = &args.common.run;
    let Some((task, settings)) = duplication_run(run)? else {
        if !run.join(SETTINGS_FILE).exists() {
            bail!(
                "{} is not a reformer-train run ({SETTINGS_FILE} not found); pass the --out folder of a duplication-task run",
                run.display()
            );
        }
        bail!("run {} is not a duplication-task run; `eval` measures second-copy accuracy, use `score` for text", run.display());
    };
    if let Some(n) = args.num_hashes
        && !(1..=reformer_model::config::MAX_HASHES).contains(&n)
    {
        bail!("invalid --num-hashes {n}: use 1 to {} hash rounds", reformer_model::config::MAX_HASHES);
    }
    if args.batches == 0 || args.batch_size == 0 {
        bail!("invalid --batches {} / --batch-size {}: use positive numbers", args.batches, args.batch_size);
    }

    let (model, device) = load(&args.common)?;
    let mut needed = reformer_model::memory::step_bytes(model.config(), args.batch_size, task.seq_len(), false, true);
    if args.table || args.full_attention {
        needed += reformer_model::memory::full_attention_bytes(model.config(), args.batch_size, task.seq_len(), false);
    }
    reformer_model::memory::check_fits(
        needed,
        || format!("evaluating --batch-size {} sequences of {} tokens", args.batch_size, task.seq_len()),
        || "lower --batch-size and raise --batches to keep the number of sequences".to_string(),
    )?;
    let config = model.config();
    let changes_lsh = args.num_hashes.is_some() || args.full_attention || args.ablate_lsh || args.table;
    if changes_lsh && !config.attn_layers.contains(&AttentionKind::Lsh) {
        bail!(
            "run {} has no LSH layer (attn_layers {:?}); --num-hashes, --full-attention, --ablate-lsh and --table apply to LSH layers only",
            run.display(),
            config.attn_layers
        );
    }
    let trained = settings.attention_label(config);
    // Without a flag the run is evaluated as it trained.
    let trained_ctx = settings.apply_attention(ForwardContext::eval(args.common.seed));
    let hashed = |num_hashes: usize| (format!("LSH-{num_hashes}"), ForwardContext::eval(args.common.seed).with_num_hashes(Some(num_hashes)));
    let full = || ("full".to_string(), ForwardContext::eval(args.common.seed).with_lsh_mode(LshMode::Full));
    let runs: Vec<(String, ForwardContext)> = if args.table {
        TABLE_HASHES.iter().map(|hashes| hashes.map_or_else(full, hashed)).collect()
    } else if args.full_attention {
        vec![full()]
    } else if args.ablate_lsh {
        vec![("ablated".to_string(), ForwardContext::eval(args.common.seed).with_lsh_mode(LshMode::Ablated))]
    } else if let Some(num_hashes) = args.num_hashes {
        vec![hashed(num_hashes)]
    } else {
        vec![(trained.clone(), trained_ctx)]
    };

    let mut evaluations = Vec::with_capacity(runs.len());
    for (label, ctx) in runs {
        let (correct, counted) = second_copy_accuracy(&model, &device, &task, &ctx, &args)?;
        let num_hashes = (ctx.lsh_mode == LshMode::Hashed).then(|| ctx.num_hashes.unwrap_or(config.num_hashes));
        evaluations.push(Evaluation { label, num_hashes, correct, counted });
    }
    print_evaluations(&evaluations, &trained, args.table, args.json)?;
    Ok(())
}

/// Counts correct second-copy predictions and scored tokens over `--batches` batches. The
/// batches depend only on `--seed`, so every attention is evaluated on the same sequences.
fn second_copy_accuracy(
    model: &ReformerLm,
    device: &Device,
    task: &DuplicationTask,
    ctx: &ForwardContext,
    args: &EvalArgs,
) -> anyhow::Result<(usize, usize)> {
    let mut rng = StdRng::seed_from_u64(args.common.seed);
    let mut correct = 0;
    let mut counted = 0;
    for _ in 0..args.batches {
        let batch = task.sample(args.batch_size, &mut rng);
        let (ids, weights) = batch.to_tensors(device);
        let (logits, targets, weights) = causal_lm_outputs(model, ids, weights, ctx)?;
        let (batch_correct, batch_counted) = weighted_accuracy(logits, targets, weights);
        correct += batch_correct;
        counted += batch_counted;
    }
    Ok((correct, counted))
}

fn print_evaluations(evaluations: &[Evaluation], trained: &str, table: bool, as_json: bool) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    if as_json {
        for evaluation in evaluations {
            let line = json!({
                "trained": trained,
                "evaluated": evaluation.label,
                "num_hashes": evaluation.num_hashes,
                "accuracy": evaluation.accuracy(),
                "correct": evaluation.correct,
                "tokens": evaluation.counted,
            });
            writeln!(stdout, "{line}")?;
        }
        return Ok(());
    }
    if table {
        // Rows are the training attention and columns the evaluation attention, as in Table 2
        // of Kitaev et al. (2020).
        let counted = evaluations.first().map_or(0, |e| e.counted);
        writeln!(stdout, "second-copy accuracy in percent over {counted} tokens; columns: attention at evaluation")?;
        write!(stdout, "{:<14}", "trained with")?;
        for evaluation in evaluations {
            write!(stdout, "{:>8}", evaluation.label)?;
        }
        writeln!(stdout)?;
        write!(stdout, "{trained:<14}")?;
        for evaluation in evaluations {
            write!(stdout, "{:>8.2}", evaluation.accuracy())?;
        }
        return writeln!(stdout);
    }
    for evaluation in evaluations {
        writeln!(
            stdout,
            "second-copy accuracy: {:.2}% ({}/{} tokens, trained with {trained}, evaluated with {})",
            evaluation.accuracy(),
            evaluation.correct,
            evaluation.counted,
            evaluation.label
        )?;
    }
    Ok(())
}

fn convert(args: ConvertArgs) -> anyhow::Result<()> {
    let occupied = args.out.join(CONFIG_FILE).exists() || args.out.join(CHECKPOINTS_DIR).exists();
    if occupied && !args.force {
        bail!("{} already contains a run; pass --force to replace it or choose another --out", args.out.display());
    }
    let device = select_device("cpu")?;
    let checkpoint = load_hf(&args.hf, &device, args.allow_partial)?;
    if checkpoint.architecture == HfArchitecture::Base {
        bail!("{} is a bare ReformerModel without an LM head; a run directory needs an LM-head model", args.hf.display());
    }
    // Validate the tokenizer before anything is written.
    Tokenizer::for_checkpoint(&args.hf, checkpoint.model.config().vocab_size)?;

    if occupied {
        for path in [args.out.join(CONFIG_FILE), args.out.join(SETTINGS_FILE), args.out.join(METRICS_FILE), args.out.join(PLOT_FILE)] {
            if path.exists() {
                std::fs::remove_file(&path).with_context(|| format!("failed to remove {}", path.display()))?;
            }
        }
        let checkpoints = args.out.join(CHECKPOINTS_DIR);
        if checkpoints.exists() {
            std::fs::remove_dir_all(&checkpoints).with_context(|| format!("failed to remove {}", checkpoints.display()))?;
        }
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("failed to create {}", args.out.display()))?;
    copy_tokenizer(&args.hf, &args.out)?;
    // The checkpoint goes first and the config last: a run directory counts as one once its
    // config exists, so an interrupted conversion leaves none.
    let model = &checkpoint.model;
    write_checkpoint(&args.out, 0, |dir| {
        save_weights(model, &dir.join(MODEL_FILE)).map_err(|e| e.to_string())?;
        // The state file marks the checkpoint complete. Step 0 records that no training happened.
        let state = TrainState { step: 0, seed: 0 };
        write_json_atomic(&dir.join(STATE_FILE), &state).map_err(|e| e.to_string())
    })?;
    write_json_atomic(&args.out.join(CONFIG_FILE), model.config())?;
    println!("wrote run directory {} ({})", args.out.display(), checkpoint.architecture.class_name());
    Ok(())
}

fn export(args: ExportArgs) -> anyhow::Result<()> {
    if !args.run.is_dir() {
        bail!("run directory {} not found; pass the --out folder of a reformer-train or convert run", args.run.display());
    }
    // A run directory's config.json is in this project's format; exporting over it would
    // break the run.
    if args.hf_out.join(CHECKPOINTS_DIR).exists() {
        bail!("--hf-out {} contains a run directory; export to another folder", args.hf_out.display());
    }
    let device = select_device("cpu")?;
    let model = load_run(&args.run, &device)?;
    let architecture = HfArchitecture::for_config(model.config());
    save_hf_checkpoint(&model, architecture, &args.hf_out)?;
    copy_tokenizer(&args.run, &args.hf_out)?;
    println!("wrote Hugging Face checkpoint {} ({})", args.hf_out.display(), architecture.class_name());
    Ok(())
}

/// Copies `spiece.model` from `from` to `to`, or removes a stale one from `to` when `from` has
/// none, so that the folder's tokenizer always belongs to its model.
fn copy_tokenizer(from: &Path, to: &Path) -> anyhow::Result<()> {
    let (source, target) = (from.join(SENTENCEPIECE_FILE), to.join(SENTENCEPIECE_FILE));
    if source.is_file() {
        std::fs::copy(&source, &target).with_context(|| format!("failed to copy {}", source.display()))?;
    } else if target.exists() {
        std::fs::remove_file(&target).with_context(|| format!("failed to remove the stale {}", target.display()))?;
    }
    Ok(())
}

