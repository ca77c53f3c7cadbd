//! Loading a checkpoint (any list of optimizer ranges, so another data-parallel size or ZeRO
//! stage re-shards) and the resume policy: the newest valid checkpoint, the same config and
//! the same global batch.

use super::hf::load_hf_weights_from;
use super::manifest::{read_manifest, read_verified, Manifest};
use super::shards::{check_optimizer_files, copy_overlap};
use super::{list, TrainState};
use crate::config::{TrainConfig, RESUME_MAY_CHANGE};
use crate::error::TrainError;
use model::ParamLayout;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use std::ops::Range;
use std::path::Path;

/// Loads and verifies the checkpoint whose manifest is `path`, with the whole optimizer state.
pub fn load(path: &Path) -> Result<(Manifest, ParamLayout, TrainState), TrainError> {
    load_ranges(path, &|len| vec![0..len])
}

/// Loads and verifies the checkpoint whose manifest is `path`; the state's `m` and `v` are the
/// ranges `want(len)` returns (any list of ranges inside `0..len`, e.g. `Dp::owned_ranges`),
/// concatenated, taken from whichever optimizer files hold them. Every file is verified (size,
/// SHA-256), not only those read from, so every rank of a job judges a checkpoint alike.
pub fn load_ranges(
    path: &Path,
    want: &dyn Fn(usize) -> Vec<Range<usize>>,
) -> Result<(Manifest, ParamLayout, TrainState), TrainError> {
    let m = read_manifest(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let bad_manifest = |reason: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let mut weights = vec![(
        dir.join(&m.model_file.name),
        read_verified(dir, &m.model_file, "the weights")?,
    )];
    for (k, f) in m.stage_model_files.iter().enumerate() {
        let what = format!("the weights of pipeline stage {}", k + 1);
        weights.push((dir.join(&f.name), read_verified(dir, f, &what)?));
    }
    let vocab = m
        .config
        .model
        .vocab_size
        .ok_or_else(|| bad_manifest("the manifest's config has no model.vocab_size".into()))?;
    let mcfg = crate::trainer::model_config(&m.config, vocab);
    // The model the config describes must fit in its weights files before its layout (a
    // descriptor per layer) or its parameters (an f32 each) are allocated: a manifest whose
    // n_layer was changed to 2^32 would otherwise ask for terabytes. A GPT-2 layer holds
    // 12·C² + 13·C parameters (counted as at least 1), the embeddings (V + T)·C.
    let weight_bytes: u128 = weights.iter().map(|(_, b)| b.len() as u128).sum();
    let (l, c) = (mcfg.n_layer as u128, mcfg.channels as u128);
    let per_layer = c
        .saturating_mul(c)
        .saturating_mul(12)
        .saturating_add(c.saturating_mul(13))
        .max(1);
    let at_least = l
        .saturating_mul(per_layer)
        .saturating_add((mcfg.vocab_size as u128 + mcfg.max_seq_len as u128).saturating_mul(c))
        .saturating_mul(4);
    if at_least > weight_bytes {
        return Err(bad_manifest(format!(
            "the manifest's config describes a model of at least {at_least} bytes (n_layer {}, \
             channels {}, vocab_size {vocab}, seq_len {}), but its weights files hold {weight_bytes}",
            mcfg.n_layer, mcfg.channels, mcfg.max_seq_len
        )));
    }
    let layout = ParamLayout::new(&mcfg, &model::Shard::full(&mcfg))?;
    let files: Vec<(&Path, &[u8])> = weights
        .iter()
        .map(|(p, b)| (p.as_path(), b.as_slice()))
        .collect();
    let params = load_hf_weights_from(&files, &layout)?;
    drop(weights);
    let n = layout.len();
    if m.optimizer.len != n {
        return Err(bad_manifest(format!(
            "the optimizer state has {} elements, the model {n}",
            m.optimizer.len
        )));
    }
    check_optimizer_files(&m.optimizer).map_err(bad_manifest)?;
    let want = want(n);
    for w in &want {
        assert!(
            w.start <= w.end && w.end <= n,
            "load_ranges: {w:?} is not inside 0..{n}"
        );
    }
    let held: usize = want.iter().map(|w| w.len()).sum();
    let (mut mv, mut vv) = (vec![0.0f32; held], vec![0.0f32; held]);
    for s in &m.optimizer.shards {
        let what = format!("AdamW state of rank {} of {}", s.rank, m.optimizer.dp_size);
        let bytes = read_verified(dir, &s.file, &what)?;
        let file_path = dir.join(&s.file.name);
        let bad = |reason: String| TrainError::Checkpoint {
            path: file_path.clone(),
            reason,
        };
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let k: usize = s.ranges.iter().map(|r| r.len()).sum();
        // The tensor's little-endian bytes; only the ranges this rank wants are decoded.
        let get = |name: &str| -> Result<&[u8], TrainError> {
            let v = st.tensor(name).map_err(|e| bad(format!("{name}: {e}")))?;
            if v.dtype() != Dtype::F32 || v.shape() != [k] {
                return Err(bad(format!(
                    "{name} is {:?} {:?}, expected F32 [{k}] (the manifest's ranges)",
                    v.dtype(),
                    v.shape()
                )));
            }
            Ok(v.data())
        };
        copy_overlap(&mut mv, &want, get("adamw.m")?, &s.ranges);
        copy_overlap(&mut vv, &want, get("adamw.v")?, &s.ranges);
    }
    let state = TrainState {
        step: m.step,
        params,
        m: mv,
        v: vv,
        adam_step: m.adam_step,
        data_position: m.data_position,
        tokens_seen: m.tokens_seen,
        best_val_loss: m.best_val_loss,
        evals_without_improvement: m.evals_without_improvement,
        stability: m.stability.clone(),
    };
    Ok((m, layout, state))
}

/// Why resuming `m` as `dp_size` ranks of `cfg` would change the global batch, with the fix.
fn global_batch_change(m: &Manifest, dp_size: usize, cfg: &TrainConfig) -> Option<String> {
    let g = m.global_micro_batches;
    let (d, k) = (dp_size as u64, cfg.train.grad_accum as u64);
    if g == d * k || g == 0 {
        return None;
    }
    let b = cfg.train.batch_size as u64;
    let fix = if g.is_multiple_of(d) {
        format!(
            "to keep it, resume with --global-batch {} (train.grad_accum = {} at dp {d})",
            g * b,
            g / d
        )
    } else {
        format!("no train.grad_accum keeps it at dp {d} ({g} is not a multiple of {d}); resume with a dp that divides {g}")
    };
    Some(format!(
        "global batch: the checkpoint's run took {g} micro-batches of {b} sequences per step (dp {} × \
         grad_accum {}), this run takes {} (dp {d} × grad_accum {k}); {fix}",
        m.optimizer.dp_size,
        m.config.train.grad_accum,
        d * k
    ))
}

/// The newest valid checkpoint in `dir` for `cfg` run as `dp_size` data-parallel ranks, with
/// the optimizer ranges `want(len)` of this rank (see [`load_ranges`]). Invalid (truncated,
/// modified, missing a file) checkpoints are skipped with a warning; the newest valid one must
/// have been written with the same config (except [`RESUME_MAY_CHANGE`] and
/// `train.grad_accum`) and the same global batch (`dp × grad_accum` micro-batches), else the
/// run is refused with the differing fields and, for the batch, the fix.
pub fn find_resume(
    dir: &Path,
    cfg: &TrainConfig,
    dp_size: usize,
    want: &dyn Fn(usize) -> Vec<Range<usize>>,
) -> Result<(Manifest, ParamLayout, TrainState, Vec<String>), TrainError> {
    let mut warnings = Vec::new();
    let mut allowed = RESUME_MAY_CHANGE.to_vec();
    // grad_accum may change with the data-parallel size, as long as the product does not.
    allowed.push("train.grad_accum");
    // A checkpoint of another model has another length: read none of its optimizer state, the
    // config check below refuses it.
    let want = |len: usize| {
        let w = want(len);
        if w.iter().all(|r| r.start <= r.end && r.end <= len) {
            w
        } else {
            Vec::new()
        }
    };
    for (_, path) in list(dir) {
        match load_ranges(&path, &want) {
            Ok((m, layout, state)) => {
                let mut diffs = m.config.differences(cfg, &allowed);
                diffs.extend(global_batch_change(&m, dp_size, cfg));
                if !diffs.is_empty() {
                    return Err(TrainError::ConfigMismatch { path, diffs });
                }
                if m.global_micro_batches == 0 {
                    warnings.push(format!(
                        "{} was written by an older scaletrain (manifest version 1), which did not \
                         record the global batch; this run takes dp {dp_size} × grad_accum {} \
                         micro-batches per step (if the old run was data-parallel with another \
                         total, pass --global-batch to match it)",
                        path.display(),
                        cfg.train.grad_accum
                    ));
                }
                return Ok((m, layout, state, warnings));
            }
            Err(e) => warnings.push(format!("skipping {}", crate::error::chain_string(&e))),
        }
    }
    Err(TrainError::NoCheckpoint {
        dir: dir.to_path_buf(),
        reason: if warnings.is_empty() {
            "it holds no checkpoint (step-*.json)".into()
        } else {
            warnings.join("; ")
        },
    })
}
