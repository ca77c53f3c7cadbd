//! The run folder's housekeeping: pruning old checkpoints, removing what interrupted writes
//! left behind, and the Hugging Face files (`config.json`, `model.safetensors.index.json`) that
//! let `transformers` load the folder as it is.

use super::{list, read_manifest};
use crate::error::{io, TrainError};
use crate::fsutil::write_atomic;
use std::path::Path;

/// The sharded-checkpoint index `transformers` reads from a folder without `model.safetensors`.
pub const HF_INDEX: &str = "model.safetensors.index.json";

/// Deletes all but the newest `keep` checkpoints (manifest first, so a half-deleted one is
/// never mistaken for a checkpoint), and the data files of unpublished checkpoints older than
/// the newest published one.
pub fn prune(dir: &Path, keep: usize) {
    prune_files(dir, keep);
    // The Hugging Face files follow the newest checkpoint (or go, with keep 0).
    if let Err(e) = write_hf_folder(dir) {
        eprintln!("warning: {}", crate::error::chain_string(&e));
    }
}

fn prune_files(dir: &Path, keep: usize) {
    for (_, manifest) in list(dir).into_iter().skip(keep) {
        let m = read_manifest(&manifest).ok();
        let _ = std::fs::remove_file(&manifest);
        if let Some(m) = m {
            let _ = std::fs::remove_file(dir.join(&m.model_file.name));
            for f in &m.stage_model_files {
                let _ = std::fs::remove_file(dir.join(&f.name));
            }
            for s in &m.optimizer.shards {
                let _ = std::fs::remove_file(dir.join(&s.file.name));
            }
        }
    }
    // Data files of a checkpoint that was never published (a rank died while the ranks wrote
    // it): no manifest names them, and a later checkpoint has been published since (or, with
    // `keep` 0, the run starts afresh), so no writer can still be working on them.
    let published = list(dir);
    let newest = match (keep, published.first()) {
        (0, _) => u64::MAX,
        (_, Some(&(n, _))) => n,
        (_, None) => return,
    };
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("step-") else {
            continue;
        };
        let Some((digits, ext)) = rest.split_once('.') else {
            continue;
        };
        let Ok(step) = digits.parse::<u64>() else {
            continue;
        };
        if ext.ends_with("safetensors") && step < newest && !published.iter().any(|p| p.0 == step) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The step of a checkpoint data file's name (`step-00000012.state.safetensors` → 12), for
/// any file of a checkpoint other than its manifest.
fn data_file_step(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("step-")?;
    let (digits, ext) = rest.split_once('.')?;
    (ext != "json" && ext.ends_with("safetensors"))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Removes what interrupted writes left in `dir`: temporary files of atomic writes
/// (`.NAME.tmp-PID`) and the data files of checkpoints that were never published (no manifest
/// names their step). Call it when a run starts, before any of its ranks writes; returns the
/// names removed, to report.
pub fn remove_leftovers(dir: &Path) -> Vec<String> {
    let published: Vec<u64> = list(dir).into_iter().map(|(s, _)| s).collect();
    let mut removed = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let tmp = name.starts_with('.') && name.contains(".tmp-");
        let orphan = data_file_step(&name).is_some_and(|s| !published.contains(&s));
        if (tmp || orphan)
            && e.file_type().is_ok_and(|t| t.is_file())
            && std::fs::remove_file(e.path()).is_ok()
        {
            removed.push(name);
        }
    }
    removed.sort();
    removed
}

/// Reads the tensor names of a safetensors file from its header (not the data).
fn tensor_names(path: &Path) -> Result<Vec<String>, TrainError> {
    use std::io::Read;
    let bad = |reason: String| TrainError::Weights {
        path: path.to_path_buf(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io(path))?;
    let len = u64::from_le_bytes(len);
    let size = f.metadata().map_err(io(path))?.len();
    if len > size.saturating_sub(8) || len > 100 << 20 {
        return Err(bad(format!(
            "header length {len} does not fit the file of {size} bytes"
        )));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(io(path))?;
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("the header is not a JSON object: {e}")))?;
    Ok(v.into_iter()
        .map(|(k, _)| k)
        .filter(|k| k != "__metadata__")
        .collect())
}

/// Points the run folder's Hugging Face files at its newest published checkpoint:
/// `config.json` (the manifest's `GPT2Config`) and `model.safetensors.index.json` (every tensor
/// name → the weights file holding it, as `transformers` writes for sharded checkpoints). With
/// no checkpoint left, removes them.
pub fn write_hf_folder(dir: &Path) -> Result<(), TrainError> {
    let Some((_, manifest)) = list(dir).into_iter().next() else {
        let _ = std::fs::remove_file(dir.join(HF_INDEX));
        let _ = std::fs::remove_file(dir.join("config.json"));
        return Ok(());
    };
    let m = read_manifest(&manifest)?;
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0u64;
    for f in std::iter::once(&m.model_file).chain(&m.stage_model_files) {
        for name in tensor_names(&dir.join(&f.name))? {
            weight_map.insert(name, serde_json::Value::String(f.name.clone()));
        }
        total_size += f.bytes;
    }
    let index = serde_json::json!({
        "metadata": {"total_size": total_size, "step": m.step},
        "weight_map": weight_map,
    });
    let text = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    write_atomic(&dir.join("config.json"), text(&m.hf_config).as_bytes())?;
    write_atomic(&dir.join(HF_INDEX), text(&index).as_bytes())
}
