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

use crate::config::{TrainConfig, RESUME_MAY_CHANGE};
use crate::data::DataPosition;
use crate::error::{io, TrainError};
use crate::fsutil::{sha256_hex, write_atomic, write_atomic_stream};
use model::ParamLayout;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

mod shards;
use shards::{check_optimizer_files, copy_overlap, optimizer_file_name};
pub use shards::{OptimizerFiles, OptimizerShard};

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
    /// Weights (HF GPT-2 names).
    pub model_file: FileEntry,
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
    /// A Hugging Face `GPT2Config` for the weights (the demonstration script writes it out as
    /// `config.json`).
    pub hf_config: serde_json::Value,
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
}

/// How a runtime tensor maps to its HF counterpart.
enum Map {
    Same,
    Transpose,
    /// Keep the first `v` rows.
    DropPadding(usize),
}

fn hf_map(layout: &ParamLayout, name: &str) -> Map {
    if name == "wte" {
        Map::DropPadding(layout.cfg.vocab_size)
    } else if name.starts_with("h.")
        && name.ends_with(".weight")
        && (name.contains(".c_attn.") || name.contains(".c_proj.") || name.contains(".c_fc."))
    {
        Map::Transpose
    } else {
        Map::Same
    }
}

fn hf_name(name: &str) -> String {
    match name {
        "wte" | "wpe" => format!("{name}.weight"),
        n => n.to_string(),
    }
}

/// The HF name and shape of each runtime tensor of a full-model layout, in buffer order.
pub fn hf_names(layout: &ParamLayout) -> Vec<(String, Vec<usize>)> {
    layout
        .tensors
        .iter()
        .map(|t| match hf_map(layout, &t.name) {
            Map::Same => (hf_name(&t.name), t.shape.clone()),
            Map::DropPadding(v) => (hf_name(&t.name), vec![v, t.shape[1]]),
            Map::Transpose => (hf_name(&t.name), vec![t.shape[1], t.shape[0]]),
        })
        .collect()
}

/// The values of runtime tensor `i` in HF layout: borrowed unless it must be transposed.
fn hf_values<'a>(layout: &ParamLayout, params: &'a [f32], i: usize) -> Cow<'a, [f32]> {
    let t = &layout.tensors[i];
    let x = &params[t.range()];
    match hf_map(layout, &t.name) {
        Map::Same => Cow::Borrowed(x),
        Map::DropPadding(v) => Cow::Borrowed(&x[..v * t.shape[1]]),
        Map::Transpose => {
            let (r, c) = (t.shape[0], t.shape[1]);
            let mut out = vec![0.0f32; r * c];
            for i in 0..r {
                for j in 0..c {
                    out[j * r + i] = x[i * c + j];
                }
            }
            Cow::Owned(out)
        }
    }
}

/// Streams a safetensors file (F32 tensors only): an 8-byte little-endian header length, the
/// JSON header (names, shapes, byte offsets, metadata) padded with spaces to a multiple of 8,
/// then each tensor's little-endian bytes, in order. Tensor `i`'s values come from `values(i)`
/// one at a time, so no copy of the whole file is ever held in memory.
fn write_safetensors<'a>(
    w: &mut dyn Write,
    names: &[(String, Vec<usize>)],
    metadata: &HashMap<String, String>,
    values: impl Fn(usize) -> Cow<'a, [f32]>,
) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in names {
        let bytes = 4 * shape.iter().product::<usize>();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    header.insert("__metadata__".into(), serde_json::json!(metadata));
    let mut text = serde_json::Value::Object(header).to_string();
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    w.write_all(&(text.len() as u64).to_le_bytes())?;
    w.write_all(text.as_bytes())?;
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    for (i, (_, shape)) in names.iter().enumerate() {
        let v = values(i);
        assert_eq!(
            v.len(),
            shape.iter().product::<usize>(),
            "write_safetensors: tensor {i} length"
        );
        for chunk in v.chunks(16 * 1024) {
            buf.clear();
            buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
            w.write_all(&buf)?;
        }
    }
    Ok(())
}

/// The weights of `layout` as an HF GPT-2 safetensors file, streamed into `w`.
pub fn write_hf_safetensors(
    w: &mut dyn Write,
    layout: &ParamLayout,
    params: &[f32],
) -> std::io::Result<()> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(w, &hf_names(layout), &meta, |i| {
        hf_values(layout, params, i)
    })
}

/// A Hugging Face `GPT2Config` (as JSON) describing `layout`'s model.
pub fn hf_config(layout: &ParamLayout) -> serde_json::Value {
    let c = &layout.cfg;
    serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.max_seq_len,
        "n_ctx": c.max_seq_len,
        "n_embd": c.channels,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": true,
    })
}

/// Reads HF GPT-2 weights from safetensors `bytes` into the runtime's flat layout. Accepts the
/// `transformer.` prefix, ignores the attention-mask buffers and a tied `lm_head.weight`;
/// any other difference (missing tensor, shape, dtype, extra layer) is an error naming it.
pub fn load_hf_weights(
    path: &Path,
    bytes: &[u8],
    layout: &ParamLayout,
) -> Result<Vec<f32>, TrainError> {
    let bad = |reason: String| TrainError::Weights {
        path: path.to_path_buf(),
        reason,
    };
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let mut by_name: HashMap<String, TensorView<'_>> = HashMap::new();
    for (name, view) in st.tensors() {
        let short = name
            .strip_prefix("transformer.")
            .unwrap_or(&name)
            .to_string();
        let ignorable = short == "lm_head.weight"
            || short.ends_with(".attn.bias")
            || short.ends_with(".attn.masked_bias");
        if !ignorable {
            by_name.insert(short, view);
        }
    }
    let mut params = vec![0.0f32; layout.len()];
    let expected = hf_names(layout);
    for (t, (hname, hshape)) in layout.tensors.iter().zip(&expected) {
        let view = by_name.remove(hname).ok_or_else(|| {
            bad(format!("has no tensor {hname} (the config describes {} layers, channels {}, vocabulary {})",
                layout.cfg.n_layer, layout.cfg.channels, layout.cfg.vocab_size))
        })?;
        if view.dtype() != Dtype::F32 {
            return Err(bad(format!(
                "{hname} is {:?}, only F32 is supported",
                view.dtype()
            )));
        }
        if view.shape() != hshape.as_slice() {
            return Err(bad(format!(
                "{hname} has shape {:?}, the config describes {hshape:?}",
                view.shape()
            )));
        }
        let vals: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let out = &mut params[t.range()];
        match hf_map(layout, &t.name) {
            Map::Same => out.copy_from_slice(&vals),
            Map::DropPadding(v) => {
                let c = t.shape[1];
                out[..v * c].copy_from_slice(&vals);
                out[v * c..].fill(0.0);
            }
            Map::Transpose => {
                let (r, c) = (t.shape[0], t.shape[1]);
                for i in 0..r {
                    for j in 0..c {
                        out[i * c + j] = vals[j * r + i];
                    }
                }
            }
        }
    }
    if let Some(extra) = by_name.keys().min() {
        return Err(bad(format!(
            "has tensor {extra}, which the config (n_layer {}) does not describe",
            layout.cfg.n_layer
        )));
    }
    Ok(params)
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
        let ranges: Vec<[usize; 2]> = part.ranges.iter().map(|r| [r.start, r.end]).collect();
        let mut meta = HashMap::new();
        meta.insert(
            "layout".to_string(),
            "scaletrain flat ParamLayout order: the ranges concatenated".to_string(),
        );
        meta.insert(
            "ranges".to_string(),
            serde_json::to_string(&ranges).expect("ranges serialise"),
        );
        let names = [
            ("adamw.m".to_string(), vec![held]),
            ("adamw.v".to_string(), vec![held]),
        ];
        let (bytes, sha256) = write_atomic_stream(&dir.join(&name), |w| {
            write_safetensors(w, &names, &meta, |i| {
                Cow::Borrowed(if i == 0 { &state.m[..] } else { &state.v[..] })
            })
        })?;
        let shard = OptimizerShard {
            rank: part.rank,
            file: FileEntry {
                name,
                bytes,
                sha256,
            },
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
            error: Some(e.to_string()),
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
        optimizer,
        data_position: state.data_position,
        adam_step: state.adam_step,
        global_micro_batches: (part.dp_size * cfg.train.grad_accum) as u64,
        tokens_seen: state.tokens_seen,
        best_val_loss: state.best_val_loss,
        evals_without_improvement: state.evals_without_improvement,
        hf_config: hf_config(layout),
    };
    let text = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
    write_atomic(&path, text.as_bytes())?;
    Ok(Some(path))
}

/// Deletes all but the newest `keep` checkpoints (manifest first, so a half-deleted one is
/// never mistaken for a checkpoint), and the data files of unpublished checkpoints older than
/// the newest published one.
pub fn prune(dir: &Path, keep: usize) {
    for (_, manifest) in list(dir).into_iter().skip(keep) {
        let m = read_manifest(&manifest).ok();
        let _ = std::fs::remove_file(&manifest);
        if let Some(m) = m {
            let _ = std::fs::remove_file(dir.join(&m.model_file.name));
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
    let bad = |reason: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("manifest is not valid: {e}")))?;
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
    let names =
        std::iter::once(&m.model_file.name).chain(m.optimizer.shards.iter().map(|s| &s.file.name));
    for name in names {
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
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
        .chain(m.optimizer.shards.iter().map(|s| &s.file))
        .all(|f| std::fs::metadata(dir.join(&f.name)).is_ok_and(|md| md.len() == f.bytes))
}

/// Reads a checkpoint file and checks its size and SHA-256 against the manifest.
fn read_verified(dir: &Path, entry: &FileEntry, what: &str) -> Result<Vec<u8>, TrainError> {
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
    let model_bytes = read_verified(dir, &m.model_file, "the weights")?;
    let vocab = m
        .config
        .model
        .vocab_size
        .ok_or_else(|| bad_manifest("the manifest's config has no model.vocab_size".into()))?;
    let mcfg = crate::trainer::model_config(&m.config, vocab);
    let layout = ParamLayout::new(&mcfg, &model::Shard::full(&mcfg))?;
    let params = load_hf_weights(&dir.join(&m.model_file.name), &model_bytes, &layout)?;
    drop(model_bytes);
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
    let fix = if g % d == 0 {
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
            Err(e) => warnings.push(format!("skipping {e}")),
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
