//! One rank's share of writing a checkpoint: its files, the reports the ranks exchange, and
//! the manifest rank 0 publishes once every part is durable.

use super::hf::{hf_config, write_hf_safetensors, write_safetensors};
use super::manifest::{FileEntry, Manifest, FORMAT, VERSION};
use super::shards::{check_optimizer_files, optimizer_file_name, OptimizerFiles, OptimizerShard};
use super::{manifest_path, TrainState};
use crate::config::TrainConfig;
use crate::error::TrainError;
use crate::fsutil::{write_atomic, write_atomic_stream};
use model::ParamLayout;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// This rank's part in writing a checkpoint ([`save_rank`]).
#[derive(Clone, Debug)]
pub struct RankPart<'a> {
    /// Data-parallel rank (0 for one process).
    pub rank: usize,
    /// Data-parallel ranks (1 for one process).
    pub dp_size: usize,
    /// ZeRO stage (0, 1, 2): above 0 every rank writes its own optimizer file.
    pub zero_stage: u8,
    /// Offset ranges of `m`, `v` this rank holds (`Dp::owned_ranges`); the state's `m` and
    /// `v` are these ranges concatenated. Any list of disjoint ranges.
    pub ranges: &'a [Range<usize>],
}

/// Sends this rank's bytes to every rank and returns every rank's, in rank order
/// (`Dp::all_gather_bytes`).
pub type Gather<'a> = &'a mut dyn FnMut(&[u8]) -> Result<Vec<Vec<u8>>, TrainError>;

/// What one rank wrote (or why it could not), as the ranks tell each other.
#[derive(Debug, Serialize, Deserialize)]
struct Report {
    model_file: Option<FileEntry>,
    shard: Option<OptimizerShard>,
    error: Option<String>,
}

/// Writes a checkpoint of `state` (full-model `layout`) into `dir` from one process; returns
/// the manifest path.
pub fn save(
    dir: &Path,
    cfg: &TrainConfig,
    layout: &ParamLayout,
    state: &TrainState,
) -> Result<PathBuf, TrainError> {
    let all = [0..layout.len()];
    let part = RankPart {
        rank: 0,
        dp_size: 1,
        zero_stage: 0,
        ranges: &all,
    };
    let path = save_rank(dir, cfg, layout, state, &part, &mut |b| {
        Ok(vec![b.to_vec()])
    })?;
    Ok(path.expect("rank 0 publishes the manifest"))
}

/// One rank's share of writing a checkpoint; every rank of the job calls it at the same step.
///
/// Rank 0 writes the weights. Under ZeRO (`part.zero_stage > 0`) every rank writes the ranges
/// of `m`, `v` it holds (`state.m`, `state.v`) to its own file, then the ranks all-gather what
/// they wrote (`gather`); only when every rank has succeeded does rank 0 check that the files
/// cover every element once and publish the manifest. Without ZeRO every rank holds the whole
/// state and rank 0 alone writes it (no collective: asynchronous parameter-server workers are
/// not in step). Returns the manifest path on rank 0, `None` on the others. If any rank fails,
/// every rank returns an error naming it and no manifest is written (the previous checkpoint
/// stays the newest).
pub fn save_rank(
    dir: &Path,
    cfg: &TrainConfig,
    layout: &ParamLayout,
    state: &TrainState,
    part: &RankPart<'_>,
    gather: Gather<'_>,
) -> Result<Option<PathBuf>, TrainError> {
    let sharded = part.zero_stage > 0;
    if !sharded && part.rank != 0 {
        return Ok(None);
    }
    let held: usize = part.ranges.iter().map(|r| r.len()).sum();
    assert_eq!(
        state.m.len(),
        held,
        "save_rank: m is not the ranges' length"
    );
    assert_eq!(
        state.v.len(),
        held,
        "save_rank: v is not the ranges' length"
    );
    let step = state.step;
    let stem = format!("step-{step:08}");
    // 1. This rank's files.
    let mine = (|| -> Result<(Option<FileEntry>, OptimizerShard), TrainError> {
        let model_file = if part.rank == 0 {
            let name = format!("{stem}.safetensors");
            let (bytes, sha256) = write_atomic_stream(&dir.join(&name), |w| {
                write_hf_safetensors(w, layout, &state.params)
            })?;
            Some(FileEntry {
                name,
                bytes,
                sha256,
            })
        } else {
            None
        };
        let name = optimizer_file_name(step, part.rank, part.dp_size, sharded);
        let file = write_optimizer_file(&dir.join(&name), part.ranges, &state.m, &state.v)?;
        let shard = OptimizerShard {
            rank: part.rank,
            file,
            ranges: part.ranges.to_vec(),
        };
        Ok((model_file, shard))
    })();
    // 2. Every rank learns what every other wrote: no manifest names a file that is not there.
    let report = match &mine {
        Ok((model_file, shard)) => Report {
            model_file: model_file.clone(),
            shard: Some(shard.clone()),
            error: None,
        },
        Err(e) => Report {
            model_file: None,
            shard: None,
            error: Some(crate::error::chain_string(e)),
        },
    };
    let reports: Vec<Report> = if sharded && part.dp_size > 1 {
        let bytes = serde_json::to_vec(&report).expect("report serialises");
        let all = gather(&bytes)?;
        if all.len() != part.dp_size {
            return Err(TrainError::Dist(format!(
                "checkpoint step {step}: {} reports from {} ranks",
                all.len(),
                part.dp_size
            )));
        }
        all.iter()
            .enumerate()
            .map(|(r, b)| {
                serde_json::from_slice(b).map_err(|e| {
                    TrainError::Dist(format!(
                        "checkpoint step {step}: rank {r} sent an unreadable report: {e}"
                    ))
                })
            })
            .collect::<Result<_, _>>()?
    } else {
        vec![report]
    };
    let (_, own_shard) = mine?;
    if let Some((r, e)) = reports
        .iter()
        .enumerate()
        .find_map(|(r, rep)| rep.error.as_ref().map(|e| (r, e)))
    {
        return Err(TrainError::Checkpoint {
            path: dir.join(optimizer_file_name(step, r, part.dp_size, sharded)),
            reason: format!(
                "rank {r} could not write its part of the checkpoint at step {step}, so it was not \
                 published: {e}"
            ),
        });
    }
    if part.rank != 0 {
        return Ok(None);
    }
    // 3. Rank 0 publishes.
    let path = manifest_path(dir, step);
    let bad = |reason: String| TrainError::Checkpoint {
        path: path.clone(),
        reason,
    };
    let model_file = reports[0]
        .model_file
        .clone()
        .ok_or_else(|| bad("rank 0's report has no weights file".into()))?;
    let mut shards = Vec::with_capacity(reports.len());
    for (r, rep) in reports.into_iter().enumerate() {
        let shard = rep
            .shard
            .ok_or_else(|| bad(format!("rank {r}'s report has no optimizer file")))?;
        if shard.rank != r {
            return Err(bad(format!(
                "rank {r} reported a file of rank {}",
                shard.rank
            )));
        }
        shards.push(shard);
    }
    debug_assert_eq!(shards[part.rank], own_shard);
    let optimizer = OptimizerFiles {
        dp_size: part.dp_size,
        zero_stage: part.zero_stage,
        len: layout.len(),
        shards,
    };
    check_optimizer_files(&optimizer).map_err(bad)?;
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        step,
        config: cfg.clone(),
        model_file,
        stage_model_files: Vec::new(),
        optimizer,
        data_position: state.data_position,
        adam_step: state.adam_step,
        global_micro_batches: (part.dp_size * cfg.train.grad_accum) as u64,
        tokens_seen: state.tokens_seen,
        best_val_loss: state.best_val_loss,
        evals_without_improvement: state.evals_without_improvement,
        stability: state.stability.clone(),
        hf_config: hf_config(layout),
    };
    let text = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
    write_atomic(&path, text.as_bytes())?;
    Ok(Some(path))
}

/// Writes AdamW's `m` and `v` for the offset `ranges` (concatenated, in that order) to `path`
/// as a safetensors file (`adamw.m`, `adamw.v`; the ranges in its metadata), atomically.
pub fn write_optimizer_file(
    path: &Path,
    ranges: &[Range<usize>],
    m: &[f32],
    v: &[f32],
) -> Result<FileEntry, TrainError> {
    let held: usize = ranges.iter().map(|r| r.len()).sum();
    assert!(
        m.len() == held && v.len() == held,
        "write_optimizer_file: lengths"
    );
    let pairs: Vec<[usize; 2]> = ranges.iter().map(|r| [r.start, r.end]).collect();
    let mut meta = HashMap::new();
    meta.insert(
        "layout".to_string(),
        "scaletrain flat ParamLayout order: the ranges concatenated".to_string(),
    );
    meta.insert(
        "ranges".to_string(),
        serde_json::to_string(&pairs).expect("ranges serialise"),
    );
    let names = [
        ("adamw.m".to_string(), vec![held]),
        ("adamw.v".to_string(), vec![held]),
    ];
    let (bytes, sha256) = write_atomic_stream(path, |w| {
        write_safetensors(w, &names, &meta, |i| {
            Cow::Borrowed(if i == 0 { m } else { v })
        })
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(FileEntry {
        name,
        bytes,
        sha256,
    })
}
