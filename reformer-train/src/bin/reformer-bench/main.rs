//! `reformer-bench`: benchmark programs whose results go to BENCHMARKS.md.
//!
//! - `memory`: peak resident memory of one training step, each configuration in a fresh
//!   process, with the reversible node and with plain autodiff.
//! - `speed`: training and inference throughput and peak memory against sequence length at
//!   fixed tokens per step, with LSH and with full attention.
//! - `decode`: per-token latency of generation after long prompts, with and without the
//!   decoding cache.

mod common;
mod decode;
mod memory;
mod speed;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "reformer-bench", version, about = "Benchmarks of the Reformer implementation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Peak memory of one training step against depth or length, each run in a fresh process.
    Memory(memory::MemoryArgs),
    /// Runs one training step and prints its measurement as one JSON line (used by `memory`).
    #[command(hide = true)]
    MemoryStep(memory::StepArgs),
    /// Throughput and peak memory against length at fixed tokens per step (Figure 5 of the paper).
    Speed(speed::SpeedArgs),
    /// Runs one speed measurement and prints it as one JSON line (used by `speed`).
    #[command(hide = true)]
    SpeedStep(speed::StepArgs),
    /// Per-token latency of generation after prompts of several lengths, cached and uncached.
    Decode(decode::DecodeArgs),
}

fn main() -> ExitCode {
    reformer_model::memory::keep_freed_memory();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let result = match Cli::parse().command {
        Command::Memory(args) => memory::run(&args),
        Command::MemoryStep(args) => memory::run_step(&args),
        Command::Speed(args) => speed::run(&args),
        Command::SpeedStep(args) => speed::run_step(&args),
        Command::Decode(args) => decode::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
