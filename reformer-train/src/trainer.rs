//! The training loop: batches, forward and backward, Adam with warm-up and cosine decay,
//! validation, metrics and checkpoints.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::optim::{AdamConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use reformer_model::checkpoint::{self, MODEL_FILE, STATE_FILE};
use reformer_model::context::mix_seed;
use reformer_model::data::{Batch, ByteCorpus, DuplicationTask};
use reformer_model::device::select_device;
use reformer_model::loss::{causal_lm_outputs, weighted_accuracy, weighted_cross_entropy};
use reformer_model::memory;
use reformer_model::{AttentionKind, ForwardContext, ReformerConfig, ReformerLm};
use serde::{Deserialize, Serialize};

use crate::run_dir::{self, RunDirError};
use crate::settings::{TaskSettings, TrainAttention, TrainSettings};

/// File name of the optimizer state inside a checkpoint folder.
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
/// Number of fixed batches the duplication task is validated on.
const DUPLICATION_EVAL_BATCHES: usize = 4;
/// Maximum validation windows of a text run.
const TEXT_EVAL_WINDOWS: usize = 16;
/// Stream index separating validation data from training data in the seed.
const EVAL_STREAM: u64 = u64::MAX;

/// Errors of a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The settings or the config are unusable.
    #[error("{0}")]
    Invalid(String),
    /// The run directory could not be prepared, written or resumed.
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    /// Weights could not be loaded or saved.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// The data could not be read.
    #[error(transparent)]
    Data(#[from] reformer_model::data::DataError),
    /// The model rejected the input.
    #[error(transparent)]
    Input(#[from] reformer_model::InputError),
    /// The update of a step left NaN or infinite weights.
    #[error(
        "weight {weight} is NaN or infinite after step {step}; checkpoints written before it are kept in \
         {run_dir}/checkpoints. Start over with a lower learning rate (--lr, now {lr}) and --force, or choose another --out"
    )]
    DivergedWeights {
        /// Step whose update diverged.
        step: u64,
        /// Module path of the first non-finite weight.
        weight: String,
        /// Learning rate of the run.
        lr: f64,
        /// Run directory.
        run_dir: PathBuf,
    },
    /// Ctrl-C (or SIGTERM) stopped the run, and `checkpoint` contains its last step.
    #[error(
        "stopped by a signal after step {step}; checkpoint {checkpoint} holds it; continue with the same \
         command plus --resume"
    )]
    Interrupted {
        /// Steps completed.
        step: u64,
        /// The checkpoint folder holding that step.
        checkpoint: PathBuf,
    },
    /// Ctrl-C (or SIGTERM) stopped the run before it completed a step.
    #[error("stopped by a signal before the first step completed, so nothing was saved; rerun the same command plus --resume to start it")]
    InterruptedBeforeStart,
    /// The loss became NaN or infinite.
    #[error(
        "loss is {loss} at step {step}; checkpoints written before it are kept in {run_dir}/checkpoints. \
         Start over with a lower learning rate (--lr, now {lr}) and --force, or choose another --out"
    )]
    Diverged {
        /// Step that diverged.
        step: u64,
        /// The loss value.
        loss: f32,
        /// Learning rate of the run.
        lr: f64,
        /// Run directory.
        run_dir: PathBuf,
    },
}

/// Training state saved with each checkpoint (`state.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Seed of the run. Data and randomness of step `k` derive from (seed, k), so the step
    /// alone fixes the data position and the random streams.
    pub seed: u64,
}

/// Progress event of the training loop, from which the CLI draws its progress bar.
#[derive(Clone, Debug)]
pub enum TrainEvent {
    /// The run starts at `start_step` of `total_steps`.
    Started {
        /// First step to run.
        start_step: u64,
        /// Last step.
        total_steps: u64,
        /// Number of trainable parameters.
        parameters: usize,
    },
    /// An optimizer step finished.
    Step {
        /// Steps completed.
        step: u64,
        /// Mean training loss of the step, in nats.
        loss: f32,
        /// Learning rate used.
        lr: f64,
        /// Training tokens per second over the step.
        tokens_per_second: f64,
    },
    /// A validation finished.
    Validation {
        /// Steps completed.
        step: u64,
        /// The result.
        metrics: ValidationMetrics,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// Steps completed.
        step: u64,
        /// Checkpoint folder.
        path: PathBuf,
    },
}

/// Validation result of one evaluation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ValidationMetrics {
    /// Mean loss in nats per scored token.
    pub loss: f32,
    /// Second-copy accuracy in percent (duplication task only).
    pub accuracy: Option<f64>,
    /// Bits per byte (text only: one token is one byte).
    pub bits_per_byte: Option<f64>,
}

/// Summary of a finished run.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// Steps completed.
    pub steps: u64,
    /// The last validation.
    pub final_validation: ValidationMetrics,
    /// Wall-clock seconds of this process's training.
    pub seconds: f64,
}

/// Training data in memory.
pub enum TaskData {
    /// Duplication task generator.
    Duplication(DuplicationTask),
    /// Byte corpus.
    Text(ByteCorpus),
}

impl TaskData {
    /// Prepares the data of a run, checking that it fits the model.
    pub fn load(settings: &TrainSettings, config: &ReformerConfig) -> Result<Self, TrainError> {
        match &settings.task {
            TaskSettings::Duplication { n_symbols } => {
                if settings.seq_len < 4 || settings.seq_len % 2 != 0 {
                    return Err(TrainError::Invalid(format!(
                        "invalid --seq-len {} for the duplication task: use an even length of at least 4 (0 w 0 w)",
                        settings.seq_len
                    )));
                }
                if *n_symbols < 2 || *n_symbols > config.vocab_size {
                    return Err(TrainError::Invalid(format!(
                        "the duplication task has {n_symbols} symbols but the model's vocab_size is {}; use 2..=vocab_size symbols",
                        config.vocab_size
                    )));
                }
                Ok(TaskData::Duplication(DuplicationTask::for_seq_len(settings.seq_len, *n_symbols)))
            }
            TaskSettings::Text { data } => {
                if config.vocab_size < reformer_model::data::BYTE_VOCAB_SIZE {
                    return Err(TrainError::Invalid(format!(
                        "byte-level text needs vocab_size >= {} but the config has {}; use --preset text or raise vocab_size",
                        reformer_model::data::BYTE_VOCAB_SIZE,
                        config.vocab_size
                    )));
                }
                Ok(TaskData::Text(ByteCorpus::load(data, settings.seq_len)?))
            }
        }
    }

    fn sample(&self, settings: &TrainSettings, rng: &mut StdRng) -> Batch {
        match self {
            TaskData::Duplication(task) => task.sample(settings.batch_size, rng),
            TaskData::Text(corpus) => corpus.sample(settings.batch_size, settings.seq_len, rng),
        }
    }
}

/// Returns the learning rate of step `step` (0-based): linear warm-up, then cosine decay from
/// `lr` to `lr / 10` at the last step.
pub fn learning_rate(settings: &TrainSettings, step: u64) -> f64 {
    let peak = settings.lr;
    if step < settings.warmup_steps {
        return peak * (step + 1) as f64 / settings.warmup_steps as f64;
    }
    let decay_steps = settings.steps.saturating_sub(settings.warmup_steps).max(1);
    let progress = ((step - settings.warmup_steps) as f64 / decay_steps as f64).min(1.0);
    let floor = peak / 10.0;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Computes the causal LM loss of a batch (and the accuracy counts when `with_accuracy`).
pub fn batch_loss(
    model: &ReformerLm,
    batch: &Batch,
    ctx: &ForwardContext,
    device: &Device,
    with_accuracy: bool,
) -> Result<(Tensor<1>, Option<(usize, usize)>), TrainError> {
    let (ids, weights) = batch.to_tensors(device);
    let (logits, targets, weights) = causal_lm_outputs(model, ids, weights, ctx)?;
    let accuracy = with_accuracy.then(|| weighted_accuracy(logits.clone(), targets.clone(), weights.clone()));
    Ok((weighted_cross_entropy(logits, targets, weights), accuracy))
}

/// Validates `model` (without autodiff) on the task's held-out data.
pub fn validate(model: &ReformerLm, task: &TaskData, settings: &TrainSettings, device: &Device) -> Result<ValidationMetrics, TrainError> {
    let ctx = settings.apply_attention(ForwardContext::eval(mix_seed(&[settings.seed, EVAL_STREAM])));
    let batches: Vec<Batch> = match task {
        TaskData::Duplication(dup) => {
            let mut rng = StdRng::seed_from_u64(mix_seed(&[settings.seed, EVAL_STREAM]));
            (0..DUPLICATION_EVAL_BATCHES).map(|_| dup.sample(settings.batch_size, &mut rng)).collect()
        }
        TaskData::Text(corpus) => corpus
            .validation_windows(settings.seq_len, TEXT_EVAL_WINDOWS)
            .into_iter()
            .map(|ids| Batch { weights: vec![1.0; ids.len()], seq_len: ids.len(), batch_size: 1, ids })
            .collect(),
    };
    let mut loss_sum = 0.0f64;
    let mut scored = 0.0f64;
    let mut correct = 0usize;
    let mut counted = 0usize;
    for batch in &batches {
        let (loss, accuracy) = batch_loss(model, batch, &ctx, device, true)?;
        let weight = batch_target_count(batch);
        loss_sum += loss.into_scalar::<f32>() as f64 * weight;
        scored += weight;
        let (c, n) = accuracy.expect("requested");
        correct += c;
        counted += n;
    }
    let loss = (loss_sum / scored.max(1.0)) as f32;
    Ok(match task {
        TaskData::Duplication(_) => ValidationMetrics {
            loss,
            accuracy: Some(100.0 * correct as f64 / counted.max(1) as f64),
            bits_per_byte: None,
        },
        TaskData::Text(_) => ValidationMetrics {
            loss,
            accuracy: None,
            bits_per_byte: Some(loss as f64 / std::f64::consts::LN_2),
        },
    })
}

/// Returns the number of scored targets of a batch after the causal shift.
fn batch_target_count(batch: &Batch) -> f64 {
    batch
        .weights
        .chunks(batch.seq_len)
        .map(|row| row[1..].iter().filter(|&&w| w > 0.0).count() as f64)
        .sum()
}

/// How to treat an existing run directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExistingRun {
    /// Reject a directory that contains another run.
    Refuse,
    /// Continue the run in the directory from its newest checkpoint.
    Resume,
    /// Delete the run in the directory and start over.
    Overwrite,
}

/// Checks everything a run needs without writing anything: settings, config, device, data,
/// memory and the run directory (`reformer-train --dry-run`).
pub fn check_run(config: &ReformerConfig, settings: &TrainSettings, run_dir: &Path, existing: ExistingRun) -> Result<(), TrainError> {
    check_settings(config, settings)?;
    select_device(&settings.device).map_err(|e| TrainError::Invalid(e.to_string()))?;
    TaskData::load(settings, config)?;
    Ok(run_dir::check(run_dir, config, settings, existing)?)
}

/// Trains a model and writes the run directory; `observe` receives progress events.
pub fn train(
    config: &ReformerConfig,
    settings: &TrainSettings,
    run_dir: &Path,
    existing: ExistingRun,
    observe: &mut dyn FnMut(TrainEvent),
) -> Result<TrainSummary, TrainError> {
    train_until(config, settings, run_dir, existing, &AtomicBool::new(false), observe)
}

/// Like [`train`], but checks `stop` before each step: once it is set, the run saves a
/// checkpoint of the last completed step (unless one exists) and returns
/// [`TrainError::Interrupted`]. A signal handler sets it.
pub fn train_until(
    config: &ReformerConfig,
    settings: &TrainSettings,
    run_dir: &Path,
    existing: ExistingRun,
    stop: &AtomicBool,
    observe: &mut dyn FnMut(TrainEvent),
) -> Result<TrainSummary, TrainError> {
    check_settings(config, settings)?;
    let device = select_device(&settings.device).map_err(|e| TrainError::Invalid(e.to_string()))?;
    let task = TaskData::load(settings, config)?;
    let resume_from = run_dir::prepare(run_dir, config, settings, existing)?;

    let ad_device = device.clone().autodiff();
    let clipping = (settings.clip_norm > 0.0).then_some(GradientClippingConfig::Norm(settings.clip_norm));
    let mut optimizer: ModuleOptimizer = AdamConfig::new().with_grad_clipping(clipping).init();
    let mut model = ReformerLm::new(config, settings.seed, &ad_device).map_err(|e| TrainError::Invalid(e.to_string()))?;
    let mut step = 0;
    let mut saved: Option<(u64, PathBuf)> = None;
    if let Some(checkpoint) = resume_from {
        let state: TrainState = run_dir::read_json(&checkpoint.join(STATE_FILE))?;
        model = checkpoint::load_weights(model, &checkpoint.join(MODEL_FILE)).map_err(|error| {
            TrainError::Invalid(format!(
                "{error}; the checkpoint cannot be resumed: start over with --force or choose another --out"
            ))
        })?;
        optimizer = optimizer
            .load(checkpoint.join(OPTIMIZER_FILE))
            .map_err(|e| RunDirError::Corrupt { path: checkpoint.join(OPTIMIZER_FILE), message: e.to_string() })?;
        step = state.step;
        saved = Some((step, checkpoint.clone()));
        if step > settings.steps {
            return Err(TrainError::Invalid(format!(
                "invalid --steps {}: the run in {} is already at step {step}; pass --steps {step} or more to resume it",
                settings.steps,
                run_dir.display()
            )));
        }
        // Metrics logged after this checkpoint belong to the interrupted attempt.
        run_dir::trim_metrics(run_dir, step)?;
    }

    observe(TrainEvent::Started { start_step: step, total_steps: settings.steps, parameters: model.num_params() });
    let started = Instant::now();
    let mut last_validation = None;
    let tokens_per_step = settings.batch_size as f64 * settings.seq_len as f64 * settings.grad_accum as f64;

    while step < settings.steps {
        if stop.load(Ordering::SeqCst) {
            let checkpoint = match saved {
                Some((saved_step, path)) if saved_step == step => path,
                _ if step == 0 => return Err(TrainError::InterruptedBeforeStart),
                _ => save_checkpoint(run_dir, &model, &optimizer, &TrainState { step, seed: settings.seed })?,
            };
            return Err(TrainError::Interrupted { step, checkpoint });
        }
        let step_started = Instant::now();
        let lr = learning_rate(settings, step);
        let mut accumulator = GradientsAccumulator::<ReformerLm>::new();
        let mut step_loss = 0.0f32;
        for micro in 0..settings.grad_accum {
            let mut rng = StdRng::seed_from_u64(mix_seed(&[settings.seed, step, micro as u64]));
            let batch = task.sample(settings, &mut rng);
            let ctx = ForwardContext::train(settings.seed, step * settings.grad_accum as u64 + micro as u64)
                .with_reversible(settings.reversible);
            let ctx = settings.apply_attention(ctx);
            let (loss, _) = batch_loss(&model, &batch, &ctx, &ad_device, false)?;
            let loss = loss / settings.grad_accum as f64;
            step_loss += loss.clone().into_scalar::<f32>();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            accumulator.accumulate(&model, grads);
        }
        if !step_loss.is_finite() {
            return Err(TrainError::Diverged { step: step + 1, loss: step_loss, lr: settings.lr, run_dir: run_dir.to_path_buf() });
        }
        model = optimizer.step(lr, model, accumulator.grads());
        step += 1;

        let tokens_per_second = tokens_per_step / step_started.elapsed().as_secs_f64();
        run_dir::append_metric(run_dir, &serde_json::json!({"step": step, "loss": step_loss, "lr": lr, "tokens_per_second": tokens_per_second}))?;
        observe(TrainEvent::Step { step, loss: step_loss, lr, tokens_per_second });

        let last = step == settings.steps;
        if last || step % settings.eval_every == 0 {
            let metrics = validate(&model.valid(), &task, settings, &device)?;
            run_dir::append_metric(run_dir, &serde_json::json!({"step": step, "validation": metrics}))?;
            observe(TrainEvent::Validation { step, metrics: metrics.clone() });
            last_validation = Some(metrics);
        }
        if last || step % settings.checkpoint_every == 0 {
            // An update can overflow the weights while the loss that led to it was finite; such
            // weights must not replace the last good checkpoint.
            if let Some(weight) = model.first_non_finite_weight() {
                return Err(TrainError::DivergedWeights { step, weight, lr: settings.lr, run_dir: run_dir.to_path_buf() });
            }
            let path = save_checkpoint(run_dir, &model, &optimizer, &TrainState { step, seed: settings.seed })?;
            saved = Some((step, path.clone()));
            observe(TrainEvent::Checkpoint { step, path });
        }
    }

    let final_validation = match last_validation {
        Some(metrics) => metrics,
        None => validate(&model.valid(), &task, settings, &device)?,
    };
    crate::plot::write_loss_plot(run_dir).map_err(|e| RunDirError::Write { path: run_dir.join(crate::plot::PLOT_FILE), source: e })?;
    Ok(TrainSummary { steps: step, final_validation, seconds: started.elapsed().as_secs_f64() })
}

/// Writes one checkpoint atomically: into a temporary folder, synced, then renamed.
pub fn save_checkpoint(
    run_dir: &Path,
    model: &ReformerLm,
    optimizer: &ModuleOptimizer,
    state: &TrainState,
) -> Result<PathBuf, TrainError> {
    let path = run_dir::write_checkpoint(run_dir, state.step, |tmp| {
        checkpoint::save_weights(model, &tmp.join(MODEL_FILE)).map_err(|e| e.to_string())?;
        optimizer.save(tmp.join(OPTIMIZER_FILE)).map_err(|e| e.to_string())?;
        let text = serde_json::to_string_pretty(state).expect("state serialises");
        std::fs::write(tmp.join(STATE_FILE), text).map_err(|e| e.to_string())
    })?;
    Ok(path)
}

fn check_settings(config: &ReformerConfig, settings: &TrainSettings) -> Result<(), TrainError> {
    config.validate_causal_lm().map_err(|e| TrainError::Invalid(e.to_string()))?;
    let positive = [
        ("--steps", settings.steps as usize),
        ("--batch-size", settings.batch_size),
        ("--seq-len", settings.seq_len),
        ("--grad-accum", settings.grad_accum),
        ("--eval-every", settings.eval_every as usize),
        ("--checkpoint-every", settings.checkpoint_every as usize),
    ];
    for (flag, value) in positive {
        if value == 0 {
            return Err(TrainError::Invalid(format!("invalid {flag} 0: use a positive integer")));
        }
    }
    if settings.seq_len < 2 {
        return Err(TrainError::Invalid(format!("invalid --seq-len {}: use at least 2 tokens", settings.seq_len)));
    }
    let max_len = config.max_seq_len();
    if settings.seq_len > max_len {
        return Err(TrainError::Invalid(format!(
            "--seq-len {} exceeds the model's maximum length {max_len} (max_position_embeddings); lower --seq-len or use a config with a larger axial shape",
            settings.seq_len
        )));
    }
    if !(settings.lr > 0.0 && settings.lr.is_finite()) {
        return Err(TrainError::Invalid(format!("invalid --lr {}: use a positive learning rate such as 1e-3", settings.lr)));
    }
    if !(settings.clip_norm >= 0.0 && settings.clip_norm.is_finite()) {
        return Err(TrainError::Invalid(format!("invalid clip norm {}: use 0 (off) or a positive threshold", settings.clip_norm)));
    }
    check_attention(config, settings)?;
    check_memory(config, settings)
}

/// Checks `--attention` and `--num-hashes` against each other and the model.
fn check_attention(config: &ReformerConfig, settings: &TrainSettings) -> Result<(), TrainError> {
    if let Some(n) = settings.num_hashes
        && !(1..=reformer_model::config::MAX_HASHES).contains(&n)
    {
        return Err(TrainError::Invalid(format!(
            "invalid --num-hashes {n}: use 1 to {} hash rounds",
            reformer_model::config::MAX_HASHES
        )));
    }
    let changes_lsh = settings.attention != TrainAttention::Lsh || settings.num_hashes.is_some();
    if changes_lsh && !config.attn_layers.contains(&AttentionKind::Lsh) {
        return Err(TrainError::Invalid(format!(
            "--attention and --num-hashes set the LSH layers, but the model has none (attn_layers {:?}); drop them or use a config with an \"lsh\" layer",
            config.attn_layers
        )));
    }
    if let (TrainAttention::Full, Some(n_hashes)) = (settings.attention, settings.num_hashes) {
        return Err(TrainError::Invalid(format!(
            "--num-hashes {n_hashes} has no effect with --attention full, which does not hash; drop one of them"
        )));
    }
    Ok(())
}

/// Refuses a step too large for the machine, before anything is allocated: an allocation that
/// fails aborts the process without a message.
fn check_memory(config: &ReformerConfig, settings: &TrainSettings) -> Result<(), TrainError> {
    let what = || {
        format!("one training step with --batch-size {} and --seq-len {}", settings.batch_size, settings.seq_len)
    };
    // Weights, gradients and Adam's two moments: when they alone do not fit, the config is at fault.
    let model_bytes = 16.0 * memory::parameter_count(config);
    let model_too_large = memory::available_bytes().is_some_and(|available| model_bytes > available);
    let fix = || {
        if model_too_large {
            "the model alone does not fit: lower hidden_size, feed_forward_size, vocab_size or the number of layers in the config".to_string()
        } else {
            "lower --batch-size or --seq-len; --grad-accum N keeps the tokens per step with N smaller micro-batches".to_string()
        }
    };
    // On a GPU the activations live in the adapter's memory, and the host keeps only the batch.
    let needed = if settings.device == "wgpu" {
        settings.batch_size as f64 * settings.seq_len as f64 * 12.0
    } else {
        let full = settings.attention == TrainAttention::Full;
        memory::step_bytes(config, settings.batch_size, settings.seq_len, true, settings.reversible)
            + if full { memory::full_attention_bytes(config, settings.batch_size, settings.seq_len, true) } else { 0.0 }
    };
    memory::check_fits(needed, what, fix).map_err(|e| TrainError::Invalid(e.to_string()))
}
