//! Checkpoints: weights in safetensors with Hugging Face GPT-2 names, the optimizer state in a
//! second safetensors file, and a JSON manifest that commits them.
//!
//! A checkpoint at step s is three files in the run folder:
//!
//! ```text
//! step-0000000s.safetensors        weights, HF GPT-2 names/shapes (transformers can load it)
//! step-0000000s.state.safetensors  AdamW m and v (flat, the runtime's ParamLayout order)
//! step-0000000s.json               manifest: step, resolved config, data position, AdamW step,
//!                                  early-stopping state, and the size + SHA-256 of both files
//! ```
//!
//! Each file is written atomically (temporary file, fsync, rename); the manifest is written
//! last, so a checkpoint exists only once its data is durable. Loading checks the manifest's
//! sizes and SHA-256 sums before parsing anything, so a truncated or modified file is refused
//! with the reason. There is no RNG state beyond the data position: the batch order is a pure
//! function of (seed, epoch) and training draws no other random numbers.
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
use std::path::{Path, PathBuf};

/// Manifest `format` value.
pub const FORMAT: &str = "scaletrain-checkpoint";
/// Manifest version this code writes and reads.
pub const VERSION: u32 = 1;

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
    /// AdamW moments.
    pub state_file: FileEntry,
    /// Where the next training batch starts.
    pub data_position: DataPosition,
    /// AdamW's step counter (bias correction).
    pub adam_step: u32,
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
    /// AdamW first moments.
    pub m: Vec<f32>,
    /// AdamW second moments.
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

/// Writes a checkpoint of `state` (full-model `layout`) into `dir`; returns the manifest path.
pub fn save(
    dir: &Path,
    cfg: &TrainConfig,
    layout: &ParamLayout,
    state: &TrainState,
) -> Result<PathBuf, TrainError> {
    let stem = format!("step-{:08}", state.step);
    let n = layout.len();
    let model_name = format!("{stem}.safetensors");
    let state_name = format!("{stem}.state.safetensors");
    let (model_len, model_sha) = write_atomic_stream(&dir.join(&model_name), |w| {
        write_hf_safetensors(w, layout, &state.params)
    })?;
    let mut meta = HashMap::new();
    meta.insert(
        "layout".to_string(),
        "scaletrain flat ParamLayout order".to_string(),
    );
    let state_names = [
        ("adamw.m".to_string(), vec![n]),
        ("adamw.v".to_string(), vec![n]),
    ];
    let (state_len, state_sha) = write_atomic_stream(&dir.join(&state_name), |w| {
        write_safetensors(w, &state_names, &meta, |i| {
            Cow::Borrowed(if i == 0 { &state.m[..] } else { &state.v[..] })
        })
    })?;
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        step: state.step,
        config: cfg.clone(),
        model_file: FileEntry {
            name: model_name,
            bytes: model_len,
            sha256: model_sha,
        },
        state_file: FileEntry {
            name: state_name,
            bytes: state_len,
            sha256: state_sha,
        },
        data_position: state.data_position,
        adam_step: state.adam_step,
        tokens_seen: state.tokens_seen,
        best_val_loss: state.best_val_loss,
        evals_without_improvement: state.evals_without_improvement,
        hf_config: hf_config(layout),
    };
    let path = manifest_path(dir, state.step);
    let text = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
    write_atomic(&path, text.as_bytes())?;
    Ok(path)
}

/// Deletes all but the newest `keep` checkpoints (manifest first, so a half-deleted one is
/// never mistaken for a checkpoint).
pub fn prune(dir: &Path, keep: usize) {
    for (_, manifest) in list(dir).into_iter().skip(keep) {
        let m = read_manifest(&manifest).ok();
        let _ = std::fs::remove_file(&manifest);
        if let Some(m) = m {
            let _ = std::fs::remove_file(dir.join(&m.model_file.name));
            let _ = std::fs::remove_file(dir.join(&m.state_file.name));
        }
    }
}

/// Reads and parses a manifest (no data files).
pub fn read_manifest(path: &Path) -> Result<Manifest, TrainError> {
    let bad = |reason: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let m: Manifest =
        serde_json::from_str(&text).map_err(|e| bad(format!("manifest is not valid: {e}")))?;
    if m.format != FORMAT || m.version != VERSION {
        return Err(bad(format!(
            "format {} version {}, expected {FORMAT} version {VERSION}",
            m.format, m.version
        )));
    }
    Ok(m)
}

/// Reads a checkpoint file and checks its size and SHA-256 against the manifest.
fn read_verified(dir: &Path, entry: &FileEntry) -> Result<Vec<u8>, TrainError> {
    let path = dir.join(&entry.name);
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let bad = |reason: String| TrainError::Checkpoint {
        path: path.clone(),
        reason,
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

/// Loads and verifies the checkpoint whose manifest is `path`.
pub fn load(path: &Path) -> Result<(Manifest, ParamLayout, TrainState), TrainError> {
    let m = read_manifest(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let model_bytes = read_verified(dir, &m.model_file)?;
    let state_bytes = read_verified(dir, &m.state_file)?;
    let vocab = m
        .config
        .model
        .vocab_size
        .ok_or_else(|| TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason: "the manifest's config has no model.vocab_size".into(),
        })?;
    let mcfg = crate::trainer::model_config(&m.config, vocab);
    let layout = ParamLayout::new(&mcfg, &model::Shard::full(&mcfg))?;
    let params = load_hf_weights(&dir.join(&m.model_file.name), &model_bytes, &layout)?;
    let state_path = dir.join(&m.state_file.name);
    let bad = |reason: String| TrainError::Checkpoint {
        path: state_path.clone(),
        reason,
    };
    let st = SafeTensors::deserialize(&state_bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let get = |name: &str| -> Result<Vec<f32>, TrainError> {
        let v = st.tensor(name).map_err(|e| bad(format!("{name}: {e}")))?;
        if v.dtype() != Dtype::F32 || v.shape() != [layout.len()] {
            return Err(bad(format!(
                "{name} is {:?} {:?}, expected F32 [{}]",
                v.dtype(),
                v.shape(),
                layout.len()
            )));
        }
        Ok(v.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let state = TrainState {
        step: m.step,
        params,
        m: get("adamw.m")?,
        v: get("adamw.v")?,
        adam_step: m.adam_step,
        data_position: m.data_position,
        tokens_seen: m.tokens_seen,
        best_val_loss: m.best_val_loss,
        evals_without_improvement: m.evals_without_improvement,
    };
    Ok((m, layout, state))
}

/// The newest valid checkpoint in `dir` for `cfg`. Invalid (truncated, modified) checkpoints are
/// skipped with a warning; the newest valid one must have been written with the same config
/// (except [`RESUME_MAY_CHANGE`]), else the run is refused with the differing fields.
pub fn find_resume(
    dir: &Path,
    cfg: &TrainConfig,
) -> Result<(Manifest, ParamLayout, TrainState, Vec<String>), TrainError> {
    let mut warnings = Vec::new();
    for (_, path) in list(dir) {
        match load(&path) {
            Ok((m, layout, state)) => {
                let diffs = m.config.differences(cfg, RESUME_MAY_CHANGE);
                if !diffs.is_empty() {
                    return Err(TrainError::ConfigMismatch { path, diffs });
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
