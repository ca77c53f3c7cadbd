//! The manifest that commits a checkpoint (format, version upgrades, plain file names), and
//! reading its data files with their sizes and SHA-256 sums verified.

use super::shards::OptimizerFiles;
use crate::config::TrainConfig;
use crate::data::DataPosition;
use crate::error::{io, TrainError};
use crate::fsutil::sha256_hex;
use model::ParamLayout;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Manifest `format` value.
pub const FORMAT: &str = "scaletrain-checkpoint";
/// Manifest version this code writes and reads (1 had a single `state_file` and no global batch).
pub const VERSION: u32 = 2;

/// One data file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name, relative to the manifest's folder.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256, hex.
    pub sha256: String,
}

/// The manifest (JSON) that commits a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// The resolved config of the run that wrote it.
    pub config: TrainConfig,
    /// Weights (HF GPT-2 names): the whole model, or (pipeline runs) the first stage's.
    pub model_file: FileEntry,
    /// Pipeline runs: the weights of stages 1, 2, … (HF names; the last stage's copy of the
    /// tied embedding is not written). Empty otherwise (and then not written to the manifest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stage_model_files: Vec<FileEntry>,
    /// AdamW moments: which files hold which offset ranges.
    pub optimizer: OptimizerFiles,
    /// Where the next training batch starts.
    pub data_position: DataPosition,
    /// AdamW's step counter (bias correction).
    pub adam_step: u32,
    /// Micro-batches (of `train.batch_size` sequences) per optimizer step over all ranks:
    /// `dp × grad_accum`. A resumed run must keep it ([`find_resume`]).
    pub global_micro_batches: u64,
    /// Training tokens consumed so far.
    pub tokens_seen: u64,
    /// Best validation loss seen (early stopping).
    pub best_val_loss: Option<f64>,
    /// Evaluations since the best one (early stopping).
    pub evals_without_improvement: u64,
    /// The stability guards' statistics and the fp16 loss scale (absent in older manifests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stability: Option<crate::guard::StabilityState>,
    /// A Hugging Face `GPT2Config` for the weights (the demonstration script writes it out as
    /// `config.json`).
    pub hf_config: serde_json::Value,
}

/// A version-1 manifest (one process's or rank 0's gathered state: `state_file` with the whole
/// `m`, `v`; no data-parallel size or global batch) as version 2: one optimizer file covering
/// the whole buffer, written by "rank 0 of 1", and `global_micro_batches` 0 = not recorded (a
/// version-1 data-parallel run recorded only the per-rank `grad_accum`, so any global batch is
/// accepted on resume, with a warning).
fn upgrade_v1(mut value: serde_json::Value) -> Result<serde_json::Value, String> {
    let cfg: TrainConfig =
        serde_json::from_value(value["config"].clone()).map_err(|e| format!("config: {e}"))?;
    let vocab = cfg
        .model
        .vocab_size
        .ok_or("the config has no model.vocab_size")?;
    let mcfg = crate::trainer::model_config(&cfg, vocab);
    let len = ParamLayout::new(&mcfg, &model::Shard::full(&mcfg))
        .map_err(|e| e.to_string())?
        .len();
    let obj = value.as_object_mut().ok_or("not a JSON object")?;
    let state = obj.remove("state_file").ok_or("no state_file")?;
    obj.insert(
        "optimizer".into(),
        serde_json::json!({
            "dp_size": 1,
            "zero_stage": 0,
            "len": len,
            "shards": [{"rank": 0, "file": state, "ranges": [{"start": 0, "end": len}]}],
        }),
    );
    obj.insert("global_micro_batches".into(), 0.into());
    obj.insert("version".into(), VERSION.into());
    Ok(value)
}

/// Reads and parses a manifest (no data files); a version-1 manifest is read as version 2
/// ([`upgrade_v1`]).
pub fn read_manifest(path: &Path) -> Result<Manifest, TrainError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    parse_manifest(path, &text)
}

/// Parses and checks a manifest's text (`path` only names it in errors).
pub fn parse_manifest(path: &Path, text: &str) -> Result<Manifest, TrainError> {
    let bad = |reason: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("manifest is not valid: {e}")))?;
    // Format and version first: an older manifest fails with that, not with a missing field.
    let (format, version) = (value["format"].as_str(), value["version"].as_u64());
    let value = match (format, version) {
        (Some(FORMAT), Some(1)) => {
            upgrade_v1(value).map_err(|e| bad(format!("version 1 manifest: {e}")))?
        }
        _ => value,
    };
    let (format, version) = (value["format"].as_str(), value["version"].as_u64());
    if format != Some(FORMAT) || version != Some(VERSION.into()) {
        return Err(bad(format!(
            "format {} version {}, expected {FORMAT} version {VERSION}{}",
            format.unwrap_or("(none)"),
            version.map_or("(none)".into(), |v| v.to_string()),
            if version.is_some_and(|v| v < VERSION.into()) {
                " (written by an older scaletrain; continue that run with the version that wrote it)"
            } else {
                ""
            }
        )));
    }
    let m: Manifest =
        serde_json::from_value(value).map_err(|e| bad(format!("manifest is not valid: {e}")))?;
    // The manifest names files that loading reads and pruning deletes: only plain names in
    // its own folder.
    let names = std::iter::once(&m.model_file.name)
        .chain(m.stage_model_files.iter().map(|f| &f.name))
        .chain(m.optimizer.shards.iter().map(|s| &s.file.name));
    for name in names {
        // 255 bytes: the longest file name Linux file systems take (NAME_MAX).
        if name.is_empty()
            || name.len() > 255
            || name.contains(['/', '\\'])
            || name.starts_with('.')
        {
            return Err(bad(format!(
                "manifest is not valid: file name {name:?} is not a plain file name"
            )));
        }
    }
    Ok(m)
}

/// Whether every file the manifest at `path` lists exists with its recorded size (a cheap
/// check: loading also verifies the SHA-256).
pub fn files_present(path: &Path, m: &Manifest) -> bool {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::iter::once(&m.model_file)
        .chain(&m.stage_model_files)
        .chain(m.optimizer.shards.iter().map(|s| &s.file))
        .all(|f| std::fs::metadata(dir.join(&f.name)).is_ok_and(|md| md.len() == f.bytes))
}

/// Reads a checkpoint file and checks its size and SHA-256 against the manifest.
pub(super) fn read_verified(
    dir: &Path,
    entry: &FileEntry,
    what: &str,
) -> Result<Vec<u8>, TrainError> {
    let path = dir.join(&entry.name);
    let bad = |reason: String| TrainError::Checkpoint {
        path: path.clone(),
        reason,
    };
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad(format!("missing ({what}, listed in the manifest)")))
        }
        Err(e) => return Err(io(&path)(e)),
    };
    if bytes.len() as u64 != entry.bytes {
        return Err(bad(format!(
            "{} bytes, the manifest records {} ({})",
            bytes.len(),
            entry.bytes,
            if (bytes.len() as u64) < entry.bytes {
                "truncated"
            } else {
                "grown"
            }
        )));
    }
    if sha256_hex(&bytes) != entry.sha256 {
        return Err(bad(
            "SHA-256 mismatch: the file was modified or corrupted after it was written".into(),
        ));
    }
    Ok(bytes)
}
