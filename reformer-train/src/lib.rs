//! Training library behind the `reformer-train` binary: settings and presets, the training
//! loop, the run directory with crash-safe checkpoints, and the loss plot.

pub mod plot;
pub mod run_dir;
pub mod settings;
pub mod trainer;
