//! Errors a user, a file or the file system can cause; bugs panic instead.

use std::path::PathBuf;

/// What went wrong while preparing data, training, checkpointing or sampling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// A file or folder could not be read, written or created.
    // The reason is the source (printed by `{:#}` / [`chain_string`]), not repeated here: a
    // chain would print it twice.
    #[error("{}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A token file is missing pieces, has the wrong magic or version, or fails its checksum.
    #[error("token file {}: {reason}", path.display())]
    TokenFile {
        /// The token file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The training configuration has a bad field (unknown key, wrong type, out of range).
    #[error("config {origin}: {field}: {reason}")]
    Config {
        /// Where the config came from (a file path, or `command line`).
        origin: String,
        /// The offending field, dotted (`optim.lr`).
        field: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A checkpoint is truncated, tampered with, or unreadable.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint {
        /// The checkpoint's manifest or data file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A checkpoint was written by a run with a different configuration.
    #[error("checkpoint {} was written with a different config: {}", path.display(), diffs.join("; "))]
    ConfigMismatch {
        /// The checkpoint's manifest.
        path: PathBuf,
        /// One line per differing field: `model.channels: checkpoint 64, now 128`.
        diffs: Vec<String>,
    },
    /// A weights file does not match the shapes the config describes.
    #[error("weights {}: {reason}", path.display())]
    Weights {
        /// The safetensors file.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },
    /// The data does not fit the model or the batch shape.
    #[error("data: {0}")]
    Data(String),
    /// Tokenizer training, loading or a vocabulary mismatch.
    #[error("tokenizer {}: {reason}", path.display())]
    Tokenizer {
        /// The tokenizer file (or the text files it was trained on).
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The run folder holds checkpoints, and neither resuming nor starting afresh was asked for.
    /// (The hint names `scaletrain train`'s flags; other front ends rephrase it from the fields.)
    #[error(
        "{} already holds checkpoints (newest: step {newest_step}); pass --resume to continue that \
         run, --overwrite to start afresh, or choose another --out",
        dir.display()
    )]
    RunFolderInUse {
        /// The run folder.
        dir: PathBuf,
        /// Step of its newest checkpoint.
        newest_step: u64,
    },
    /// No usable checkpoint to resume from.
    #[error("cannot resume from {}: {reason}", dir.display())]
    NoCheckpoint {
        /// The run folder.
        dir: PathBuf,
        /// Why (no checkpoint, or why each was refused).
        reason: String,
    },
    /// Peers disagree (config, data, weights, start step) or sent something unusable.
    #[error("data parallel: {0}")]
    Dist(String),
    /// A collective or point-to-point call failed: a peer died, timed out or misbehaved. The
    /// communication error is the source (printed after `what` in an error chain).
    #[error("{what}")]
    Comm {
        /// What the ranks were doing (`data parallel: gradient all-reduce`).
        what: String,
        /// The communicator's error (names the rank and operation).
        #[source]
        source: comm::CommError,
    },
    /// The model's predicted memory exceeds what the machine offers (checked before
    /// allocating; `train::fits`).
    #[error("the model does not fit in memory: {reason}")]
    DoesNotFit {
        /// Both numbers and what would make it fit.
        reason: String,
    },
    /// The parallel layout does not fit the model, the batch or the job.
    #[error("layout: {0}")]
    Layout(String),
    /// Pipeline stages disagree or sent something unexpected.
    #[error("pipeline: {0}")]
    Pipeline(String),
    /// The model rejected its configuration or input.
    #[error(transparent)]
    Model(#[from] model::ModelError),
}

/// Shorthand for an [`TrainError::Io`] mapper: `.map_err(io(path))`.
pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `e` and every source under it, joined with `: ` (what `{:#}` prints for an `anyhow` chain),
/// for messages that travel as text (to other ranks, into checkpoint reports).
pub fn chain_string(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !out.ends_with(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = s.source();
    }
    out
}
