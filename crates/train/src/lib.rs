//! scaletrain-train: the single-process trainer.
//!
//! - [`tokens`]: the binary token-file format (magic, version, dtype, vocabulary, count,
//!   SHA-256), validated on load.
//! - [`synthetic`]: the built-in Markov corpus with an exactly known loss floor.
//! - [`data`]: deterministic, per-epoch reshuffled batches; the data position is `(epoch, cursor)`.
//! - [`config`]: the TOML training config (every field defaulted and documented), overrides.
//! - [`trainer`]: the loop (AdamW, warmup + cosine, clipping, validation, early stopping,
//!   metrics JSONL), with an [`trainer::Observer`] for progress display.
//! - [`checkpoint`]: atomic, checksummed checkpoints with Hugging Face GPT-2 tensor names,
//!   optimizer state per data-parallel rank under ZeRO; bit-exact resume, re-sharding resume.
//! - [`dp`]: data parallelism (ring or parameter-server gradient sync, ZeRO-1/2), hooked
//!   into the trainer through [`RunOptions::dp`].
//! - [`straggler`]: which data-parallel rank is consistently slower than the others.
//! - [`sample`]: text generation from a checkpoint (temperature, top-k).
//! - [`tokenizer`]: byte-level BPE (the `tokenizers` crate) and `data prepare`.
//! - [`plot`]: the loss curve as SVG.
//! - [`precision`]: the trainer's mixed precision (16-bit working weights, activations and
//!   per-micro-batch gradients widened into the `f32` gradients the reduction and AdamW read).
//! - [`loss_scale`], [`guard`]: dynamic loss scaling for fp16 and training stability guards
//!   (non-finite steps, loss and gradient-norm spikes, rollback), used by the trainer.
//!
//! Memory and step-time predictions come from `plan::cpu_runtime` and `plan::cpu_time`; this
//! crate re-derives no formula.

// A list of offset ranges that holds one range (the whole buffer) is what we mean, not a range.
#![allow(clippy::single_range_in_vec_init)]

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dp;
mod error;
pub mod fits;
pub mod fsutil;
pub mod guard;
pub mod loss_scale;
pub mod mesh;
pub mod pipeline;
pub mod plot;
pub mod precision;
pub mod run_dir;
pub mod sample;
pub mod straggler;
pub mod synthetic;
pub mod tokenizer;
pub mod tokens;
pub mod trace;
pub mod trainer;

pub use config::TrainConfig;
pub use error::TrainError;
pub use trainer::{run, Observer, Quiet, RunOptions, RunSummary, StartInfo, StepRecord};
