//! A pipeline rank's buffers in the whole model's offsets, and checkpoints written per stage.
//!
//! A checkpoint of a pipeline run holds, per stage, the weights of its chunks (Hugging Face
//! names; the last stage's copy of the tied embedding is not written, the first stage's `wte`
//! is the one) and its AdamW state, with the offset ranges it covers **in the whole model's
//! flat layout**. Loading is therefore the same for any layout: a rank takes the whole model's
//! weights by name from the stage files and the optimizer ranges it needs out of whichever
//! files hold them — another pp or dp re-shards, as data-parallel checkpoints already do.

use super::{Pipeline, StageModel};
use crate::checkpoint::{self, FileEntry, Manifest, OptimizerFiles, OptimizerShard, TrainState};
use crate::config::TrainConfig;
use crate::error::TrainError;
use crate::fsutil::{write_atomic, write_atomic_stream};
use model::ParamLayout;
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Per contiguous run of this rank's flat buffer: its window there, where it starts in the
/// whole model's buffer, and whether it is a copy another rank counts ([`StageModel::copies`]:
/// the LM head's copy of the tied embedding — `wte` there — or a replicated tensor on a
/// tensor-parallel rank other than 0). A tensor split across tensor-parallel ranks maps in
/// several runs (one per block of rows, or one per row of a column split).
pub fn full_segments(stage: &StageModel, full: &ParamLayout) -> Vec<(Range<usize>, usize, bool)> {
    let (tp_rank, tp) = stage.tp();
    let mut out: Vec<(Range<usize>, usize, bool)> = Vec::new();
    for (_, l, w) in &stage.chunks {
        for t in &l.tensors {
            let lm_copy = t.name == "lm_head.weight";
            let copy = lm_copy || (tp_rank > 0 && t.split == model::TpSplit::Replicated);
            let src = full
                .tensor(if lm_copy { "wte" } else { &t.name })
                .expect("the whole model holds every tensor of a stage");
            for (lo, fo, n) in tensor_runs(t, tp_rank, tp) {
                let local = w.start + t.offset + lo..w.start + t.offset + lo + n;
                let f = src.offset + fo;
                match out.last_mut() {
                    // Merge neighbours that are neighbours in the whole model too.
                    Some((r, f0, c))
                        if *c == copy && r.end == local.start && *f0 + r.len() == f =>
                    {
                        r.end = local.end
                    }
                    _ => out.push((local, f, copy)),
                }
            }
        }
    }
    out
}

/// The runs of tensor `t` that tensor-parallel rank `r` of `tp` holds: (offset in the rank's
/// tensor, offset in the whole tensor, length), by its split rule (`model::TpSplit`).
fn tensor_runs(t: &model::ParamTensor, r: usize, tp: usize) -> Vec<(usize, usize, usize)> {
    let full_len: usize = t.full_shape.iter().product();
    match t.split {
        _ if tp == 1 => vec![(0, 0, full_len)],
        model::TpSplit::Replicated => vec![(0, 0, full_len)],
        model::TpSplit::Rows { blocks } => {
            let rows = t.full_shape[0];
            let cols: usize = t.full_shape[1..].iter().product();
            let per_rank = rows / blocks / tp;
            (0..blocks)
                .map(|k| {
                    (
                        k * per_rank * cols,
                        (k * rows / blocks + r * per_rank) * cols,
                        per_rank * cols,
                    )
                })
                .collect()
        }
        model::TpSplit::Columns => {
            let (rows, cols) = (t.full_shape[0], t.full_shape[1]);
            let per = cols / tp;
            (0..rows)
                .map(|i| (i * per, i * cols + r * per, per))
                .collect()
        }
    }
}

/// The whole model's buffer from every tensor-parallel rank's buffer of the same stage
/// (`gathered[r·n..(r+1)·n]` is rank `r`'s), put back by the model's own
/// `ParamLayout::shard_to_full` (replicated tensors are the same bits on every rank).
fn assemble_full(
    stage: &StageModel,
    parts: &[Range<usize>],
    full: &ParamLayout,
    gathered: &[f32],
) -> Result<Vec<f32>, TrainError> {
    let (_, tp) = stage.tp();
    let n = stage.len();
    let held: Vec<usize> = stage.chunks.iter().map(|(k, _, _)| *k).collect();
    let mut out = vec![0.0f32; full.len()];
    for r in 0..tp {
        let other = StageModel::new_tp(&full.cfg, parts, &held, (r, tp))?;
        for (_, l, w) in &other.chunks {
            l.shard_to_full(&gathered[r * n + w.start..r * n + w.end], full, &mut out);
        }
    }
    Ok(out)
}

/// `local` ranges of this rank's buffer as ranges of the whole model's, in the same order (a
/// range crossing tensors is split), each with whether it lies in the tied embedding's copy.
pub fn to_full(
    segments: &[(Range<usize>, usize, bool)],
    local: &[Range<usize>],
) -> Vec<(Range<usize>, bool)> {
    let mut out: Vec<(Range<usize>, bool)> = Vec::new();
    for r in local {
        for (seg, f, copy) in segments {
            let (lo, hi) = (r.start.max(seg.start), r.end.min(seg.end));
            if lo < hi {
                let piece = f + lo - seg.start..f + hi - seg.start;
                match out.last_mut() {
                    Some((p, c)) if *c == *copy && p.end == piece.start => p.end = piece.end,
                    _ => out.push((piece, *copy)),
                }
            }
        }
    }
    out
}

/// This rank's part of the whole model's weights `full_params` (laid out by `full`).
pub fn slice_full(stage: &StageModel, full: &ParamLayout, full_params: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; stage.len()];
    for (_, l, w) in &stage.chunks {
        l.shard_from_full(&mut out[w.clone()], full, full_params);
    }
    out
}

/// What one pipeline rank wrote, as the ranks tell each other.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Report {
    stage: usize,
    tp: usize,
    model_file: Option<FileEntry>,
    shard: Option<OptimizerShard>,
    error: Option<String>,
}

/// One rank's share of a mesh checkpoint; every rank of the job calls it at the same step.
/// The stage's tensor-parallel rank 0 of data-parallel rank 0 writes the stage's weights as
/// whole tensors (its tensor-parallel group's parts gathered), so the file is the same for any
/// tp; every rank of data-parallel rank 0 (of every data-parallel rank under ZeRO) writes the
/// AdamW state of what it counts (`owned`, less [`StageModel::copies`]) labelled with whole-model
/// ranges. The ranks exchange what they wrote over the whole job, and world rank 0 publishes
/// the manifest once every rank has succeeded. Returns the manifest path on world rank 0,
/// `None` elsewhere; if any rank failed, every rank returns an error naming it.
pub fn save_checkpoint(
    p: &mut Pipeline,
    dir: &Path,
    cfg: &TrainConfig,
    stage: &StageModel,
    state: &TrainState,
    (dp_rank, dp_size, zero_stage): (usize, usize, u8),
    owned: &[Range<usize>],
) -> Result<Option<PathBuf>, TrainError> {
    let (s, pp) = (p.stage(), p.shape.pp);
    let step = state.step;
    let stem = format!("step-{step:08}");
    let mcfg = stage.chunks[0].1.cfg.clone();
    let full = ParamLayout::new(&mcfg, &model::Shard::full(&mcfg))?;
    let segments = full_segments(stage, &full);
    let mut report = Report {
        stage: s,
        tp: p.me.tp,
        ..Report::default()
    };
    let (tp_rank, tp) = p.tp();
    // Tensor parallelism: the stage's weights are written whole, by its tensor-parallel rank 0
    // (every rank's part gathered); each rank writes the AdamW state of what it counts.
    let whole_stage = if tp > 1 {
        let mut all = vec![0.0f32; stage.len() * tp];
        all[tp_rank * stage.len()..(tp_rank + 1) * stage.len()].copy_from_slice(&state.params);
        p.tp_all_gather(&mut all, "checkpoint: gathering the stage's weights")?;
        let parts = p.parts.clone();
        let whole = assemble_full(stage, &parts, &full, &all)?;
        let held: Vec<usize> = stage.chunks.iter().map(|(k, _, _)| *k).collect();
        let st = StageModel::new(&mcfg, &parts, &held)?;
        let params = slice_full(&st, &full, &whole);
        Some((st, params))
    } else {
        None
    };
    let writes_state = dp_rank == 0 || zero_stage > 0;
    if writes_state {
        let written = (|| -> Result<(Option<FileEntry>, OptimizerShard), TrainError> {
            // Weights: every chunk's tensors but the LM head copy, with HF names.
            let model_file = if dp_rank == 0 && tp_rank == 0 {
                let name = format!("{stem}.stage-{s}-of-{pp}.safetensors");
                let (st, params) = match &whole_stage {
                    Some((st, params)) => (st, &params[..]),
                    None => (stage, &state.params[..]),
                };
                let chunks: Vec<(&ParamLayout, &[f32])> = st
                    .chunks
                    .iter()
                    .map(|(_, l, w)| (l, &params[w.clone()]))
                    .collect();
                let (bytes, sha256) = write_atomic_stream(&dir.join(&name), |w| {
                    checkpoint::write_hf_chunks(w, &chunks)
                })?;
                Some(FileEntry {
                    name,
                    bytes,
                    sha256,
                })
            } else {
                None
            };
            // AdamW state of the pieces that are not the copy, labelled with whole-model ranges.
            let mut ranges = Vec::new();
            let (mut m, mut v) = (Vec::new(), Vec::new());
            let mut at = 0;
            for r in owned {
                for (piece, copy) in to_full(&segments, std::slice::from_ref(r)) {
                    let k = piece.len();
                    if !copy {
                        m.extend_from_slice(&state.m[at..at + k]);
                        v.extend_from_slice(&state.v[at..at + k]);
                        ranges.push(piece);
                    }
                    at += k;
                }
            }
            let mut name = format!("{stem}.state-stage-{s}-of-{pp}");
            if tp > 1 {
                name += &format!(".tp-{tp_rank}-of-{tp}");
            }
            if zero_stage > 0 {
                name += &format!(".dp-{dp_rank}-of-{dp_size}");
            }
            name += ".safetensors";
            let file = checkpoint::write_optimizer_file(&dir.join(&name), &ranges, &m, &v)?;
            Ok((
                model_file,
                OptimizerShard {
                    rank: if zero_stage > 0 { dp_rank } else { s },
                    file,
                    ranges,
                },
            ))
        })();
        match written {
            Ok((f, sh)) => {
                report.model_file = f;
                report.shard = Some(sh);
            }
            Err(e) => report.error = Some(crate::error::chain_string(&e)),
        }
    }
    let bytes = serde_json::to_vec(&report).expect("report serialises");
    let all = p.world_gather_bytes(&bytes, "checkpoint: telling the ranks what each wrote")?;
    let reports: Vec<Report> = all
        .iter()
        .enumerate()
        .map(|(r, b)| {
            serde_json::from_slice(b).map_err(|e| {
                TrainError::Pipeline(format!(
                    "checkpoint step {step}: rank {r} sent an unreadable report: {e}"
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    if let Some((r, e)) = reports
        .iter()
        .enumerate()
        .find_map(|(r, rep)| rep.error.as_ref().map(|e| (r, e)))
    {
        return Err(TrainError::Checkpoint {
            path: dir.join(format!("{stem}.stage-{}-of-{pp}.safetensors", reports[r].stage)),
            reason: format!(
                "rank {r} (stage {}) could not write its part of the checkpoint at step {step}, so it \
                 was not published: {e}",
                reports[r].stage
            ),
        });
    }
    if p.me.pp != 0 || p.me.tp != 0 || dp_rank != 0 {
        return Ok(None);
    }
    let path = checkpoint::manifest_path(dir, step);
    let bad = |reason: String| TrainError::Checkpoint {
        path: path.clone(),
        reason,
    };
    let mut files: Vec<Option<FileEntry>> = vec![None; pp];
    let mut shards: Vec<OptimizerShard> = Vec::new();
    for rep in reports {
        if rep.stage >= pp {
            return Err(bad(format!("a report names stage {} of {pp}", rep.stage)));
        }
        if let Some(f) = rep.model_file {
            files[rep.stage] = Some(f);
        }
        shards.extend(rep.shard);
    }
    let files: Vec<FileEntry> = files
        .into_iter()
        .enumerate()
        .map(|(k, f)| f.ok_or_else(|| bad(format!("no rank reported stage {k}'s weights"))))
        .collect::<Result<_, _>>()?;
    // Whole-model ranges: the files' order does not matter to a reader (check_files sorts).
    let optimizer = OptimizerFiles {
        dp_size,
        zero_stage,
        len: full.len(),
        shards,
    };
    checkpoint::check_files(&optimizer).map_err(bad)?;
    let mut files = files.into_iter();
    let manifest = Manifest {
        format: checkpoint::FORMAT.into(),
        version: checkpoint::VERSION,
        step,
        config: cfg.clone(),
        model_file: files.next().expect("stage 0"),
        stage_model_files: files.collect(),
        optimizer,
        data_position: state.data_position,
        adam_step: state.adam_step,
        global_micro_batches: (dp_size * cfg.train.grad_accum) as u64,
        tokens_seen: state.tokens_seen,
        best_val_loss: state.best_val_loss,
        evals_without_improvement: state.evals_without_improvement,
        stability: state.stability.clone(),
        hf_config: checkpoint::hf_config(&full),
    };
    let text = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
    write_atomic(&path, text.as_bytes())?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::ModelConfig;

    #[test]
    fn stage_ranges_map_to_the_whole_model_and_back() {
        let cfg = ModelConfig {
            vocab_size: 50,
            max_seq_len: 8,
            n_layer: 5,
            n_head: 2,
            channels: 16,
        };
        let full = ParamLayout::new(&cfg, &model::Shard::full(&cfg)).unwrap();
        let parts = crate::mesh::partition(&cfg, (2, 8), 2, Some(&[2, 3])).unwrap();
        let params = full.init_params(7);
        let mut covered = vec![0u8; full.len()];
        for k in 0..2 {
            let stage = StageModel::new(&cfg, &parts, &[k]).unwrap();
            let segs = full_segments(&stage, &full);
            let mine = slice_full(&stage, &full, &params);
            for (r, copy) in to_full(&segs, &[0..stage.len()]) {
                if !copy {
                    covered[r].iter_mut().for_each(|c| *c += 1);
                }
            }
            // Each local element equals the whole model's element it maps to.
            let mut at = 0;
            for (r, _) in to_full(&segs, &[0..stage.len()]) {
                assert_eq!(mine[at..at + r.len()], params[r.clone()]);
                at += r.len();
            }
            assert_eq!(at, stage.len());
        }
        assert!(
            covered.iter().all(|&c| c == 1),
            "every element once, the copy excluded"
        );
        // Tensor parallelism: each rank's runs map onto the whole model, and the ranks'
        // counted (non-copy) runs cover every element of a stage exactly once.
        for tp in [2] {
            let parts = crate::mesh::partition(&cfg, (2, 8), 1, None).unwrap();
            let mut covered = vec![0u8; full.len()];
            for r in 0..tp {
                let stage = StageModel::new_tp(&cfg, &parts, &[0], (r, tp)).unwrap();
                let mine = slice_full(&stage, &full, &params);
                let mut at = 0;
                for (seg, f, copy) in full_segments(&stage, &full) {
                    assert_eq!(seg.start, at, "runs are in buffer order");
                    assert_eq!(mine[seg.clone()], params[f..f + seg.len()]);
                    if !copy {
                        covered[f..f + seg.len()].iter_mut().for_each(|c| *c += 1);
                    }
                    at = seg.end;
                }
                assert_eq!(at, stage.len());
                let copies: usize = stage.copies().iter().map(|c| c.len()).sum();
                assert_eq!(copies > 0, r > 0, "replicated tensors count on rank 0 only");
            }
            assert!(
                covered.iter().all(|&c| c == 1),
                "tp {tp}: every element once"
            );
        }
        // Without a pipeline the map is the identity, in one range.
        let whole = StageModel::whole(full.clone());
        assert_eq!(
            to_full(&full_segments(&whole, &full), &[0..full.len()]),
            [(0..full.len(), false)]
        );
    }
}
