//! Checkpoints: weights in safetensors with Hugging Face GPT-2 names, the optimizer state in
//! one or more safetensors files, and a JSON manifest that commits them.
//!
//! A checkpoint at step s is these files in the run folder:
//!
//! ```text
//! step-0000000s.safetensors                   weights, HF GPT-2 names/shapes (transformers loads it)
//! step-0000000s.state.safetensors             AdamW m and v, whole (one process, or data parallel
//!                                             without ZeRO: rank 0 writes it)
//!   or step-0000000s.optim-rank-R-of-D.safetensors   ZeRO-1/2: each of the D ranks writes the
//!                                             ranges of m and v it holds (`Dp::owned_ranges`)
//! step-0000000s.json                          manifest: step, resolved config, data position, AdamW
//!                                             step, global batch, early-stopping state, and the
//!                                             size + SHA-256 of every file (and each optimizer
//!                                             file's offset ranges)
//! ```
//!
//! Each file is written atomically (temporary file, fsync, rename); the manifest is written
//! last, by rank 0, and only after every rank has reported its optimizer file written
//! ([`save_rank`]), so a checkpoint exists (for [`list`], [`find_resume`]) only once all its
//! data is durable. Loading checks the manifest's sizes and SHA-256 sums before parsing
//! anything, and that the optimizer files' ranges cover every element of `m` and `v` exactly
//! once, so a truncated, modified or missing file is refused with the reason. A loader takes
//! any list of ranges out of whichever files hold them ([`load_ranges`]): resume at another
//! data-parallel size or ZeRO stage re-shards. There is no RNG state beyond the data position:
//! the batch order is a pure function of (seed, epoch) and training draws no other random
//! numbers.
//!
//! **Name mapping** (GPT-2's `Conv1D` stores weights as (in, out); the runtime, like
//! `nn.Linear`, as (out, in), so the four block matrices are transposed; the runtime's padded
//! vocabulary rows — always zero — are dropped):
//!
//! ```text
//! runtime                        shape        HF GPT-2                       shape
//! wte                            (vp, c)      wte.weight                     (v, c)
//! wpe                            (T, c)       wpe.weight                     (T, c)
//! h.i.attn.c_attn.weight         (3c, c)      h.i.attn.c_attn.weight         (c, 3c)
//! h.i.attn.c_proj.weight         (c, c)       h.i.attn.c_proj.weight         (c, c)ᵀ
//! h.i.mlp.c_fc.weight            (4c, c)      h.i.mlp.c_fc.weight            (c, 4c)
//! h.i.mlp.c_proj.weight          (c, 4c)      h.i.mlp.c_proj.weight          (4c, c)
//! biases, ln_1, ln_2, ln_f       same         same                           same
//! ```
//!
//! Files: `hf.rs` (Hugging Face names, safetensors writing and reading), `manifest.rs` (the
//! manifest and verified reads), `save.rs` (one rank's share of writing a checkpoint),
//! `resume.rs` (loading, re-sharding and the resume policy), `shards.rs` (which optimizer file
//! holds which ranges), `folder.rs` (pruning, leftovers of interrupted writes, and the run
//! folder's Hugging Face files).
//!
//! **The run folder loads in `transformers` as it is.** After every published checkpoint the
//! run folder gets `config.json` (a `GPT2Config`) and `model.safetensors.index.json`, the
//! sharded-checkpoint index `transformers` reads when a folder has no `model.safetensors`: it
//! maps every tensor name to the newest checkpoint's weights file (or a pipeline checkpoint's
//! stage files), so `GPT2LMHeadModel.from_pretrained(run_folder)` loads the newest weights.

use crate::data::DataPosition;
use std::path::{Path, PathBuf};

mod folder;
mod hf;
mod manifest;
mod resume;
mod save;
mod shards;

pub use folder::{prune, remove_leftovers, write_hf_folder, HF_INDEX};
pub use hf::{
    check_hf_config, hf_config, hf_names, load_hf_weights, load_hf_weights_from, load_init_weights,
    write_hf_chunks, write_hf_safetensors,
};
pub use manifest::{
    files_present, parse_manifest, read_manifest, FileEntry, Manifest, FORMAT, VERSION,
};
pub use resume::{find_resume, load, load_ranges};
pub use save::{save, save_rank, write_optimizer_file, Gather, RankPart};
pub use shards::{OptimizerFiles, OptimizerShard};

/// Checks that a checkpoint's optimizer files cover every element exactly once (and, under
/// ZeRO, that every rank's file is listed); the reason otherwise.
pub fn check_files(o: &OptimizerFiles) -> Result<(), String> {
    shards::check_optimizer_files(o)
}

/// Everything a run needs to continue bit for bit.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Parameters (the runtime's flat layout).
    pub params: Vec<f32>,
    /// AdamW first moments: the whole buffer, or the ranges a data-parallel rank holds
    /// concatenated ([`load_ranges`], [`save_rank`]).
    pub m: Vec<f32>,
    /// AdamW second moments (ranges as `m`).
    pub v: Vec<f32>,
    /// AdamW step counter.
    pub adam_step: u32,
    /// Data position.
    pub data_position: DataPosition,
    /// Training tokens consumed.
    pub tokens_seen: u64,
    /// Best validation loss so far.
    pub best_val_loss: Option<f64>,
    /// Evaluations since the best.
    pub evals_without_improvement: u64,
    /// The stability guards' statistics and the fp16 loss scale (`None` in checkpoints written
    /// before they existed: a resumed run starts them afresh).
    pub stability: Option<crate::guard::StabilityState>,
}

/// The manifest path of the checkpoint at `step` in `dir`.
pub fn manifest_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step-{step:08}.json"))
}

/// Checkpoints in `dir`, newest first, as (step, manifest path).
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name
                .strip_prefix("step-")?
                .strip_suffix(".json")?
                .parse()
                .ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort_by_key(|e| std::cmp::Reverse(e.0));
    out
}
