//! Hugging Face GPT-2 names and shapes for the runtime's tensors, and safetensors files
//! (streamed writing; verified reading into the flat layout).

use crate::error::TrainError;
use model::ParamLayout;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

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
pub(super) fn write_safetensors<'a>(
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
    while !text.len().is_multiple_of(8) {
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

/// The weights of several chunks of a model (a pipeline stage's) as one safetensors file with
/// Hugging Face names, streamed into `w`. A stage's copy of the tied embedding
/// (`lm_head.weight`, a duplicate of `wte`) is not written.
pub fn write_hf_chunks(
    w: &mut dyn Write,
    chunks: &[(&ParamLayout, &[f32])],
) -> std::io::Result<()> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let mut names = Vec::new();
    let mut which = Vec::new();
    for (k, (l, _)) in chunks.iter().enumerate() {
        for (i, (name, shape)) in hf_names(l).into_iter().enumerate() {
            if l.tensors[i].name != "lm_head.weight" {
                names.push((name, shape));
                which.push((k, i));
            }
        }
    }
    write_safetensors(w, &names, &meta, |j| {
        let (k, i) = which[j];
        hf_values(chunks[k].0, chunks[k].1, i)
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

/// `--init-from PATH`: Hugging Face GPT-2 weights from a safetensors file, or from a model
/// folder as `save_pretrained` writes it (`config.json` and `model.safetensors`, or a sharded
/// `model.safetensors.index.json`; a scaletrain run folder is one). A folder's `config.json`
/// must describe the model `layout` has (layers, heads, channels, vocabulary, positions): a
/// difference is refused naming both values, so a model with another head count, whose
/// weights would load with every shape right, never trains silently.
pub fn load_init_weights(path: &Path, layout: &ParamLayout) -> Result<Vec<f32>, TrainError> {
    use crate::error::io;
    if !path.is_dir() {
        let bytes = std::fs::read(path).map_err(io(path))?;
        return load_hf_weights(path, &bytes, layout);
    }
    let cfg_path = path.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| TrainError::Weights {
        path: path.to_path_buf(),
        reason: format!(
            "a Hugging Face model folder needs config.json ({e}); give the weights file itself \
             (--init-from {}) to load it without the check",
            path.join("model.safetensors").display()
        ),
    })?;
    check_hf_config(&cfg_path, &text, layout)?;
    let single = path.join("model.safetensors");
    let files: Vec<std::path::PathBuf> = if single.exists() {
        vec![single]
    } else {
        let index = path.join(super::HF_INDEX);
        let text = std::fs::read_to_string(&index).map_err(|e| TrainError::Weights {
            path: path.to_path_buf(),
            reason: format!(
                "has neither model.safetensors nor {} ({e})",
                super::HF_INDEX
            ),
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| TrainError::Weights {
                path: index.clone(),
                reason: format!("not JSON: {e}"),
            })?;
        let map = v["weight_map"]
            .as_object()
            .ok_or_else(|| TrainError::Weights {
                path: index.clone(),
                reason: "has no weight_map object".into(),
            })?;
        let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let mut files = Vec::new();
        for n in names {
            // Only plain file names: an index cannot point outside its folder.
            if n.contains('/') || n.contains('\\') || n.starts_with('.') {
                return Err(TrainError::Weights {
                    path: index.clone(),
                    reason: format!("names {n:?}, which is not a file name in the folder"),
                });
            }
            files.push(path.join(n));
        }
        files
    };
    let bytes = files
        .iter()
        .map(|f| std::fs::read(f).map_err(io(f)))
        .collect::<Result<Vec<_>, _>>()?;
    let pairs: Vec<(&Path, &[u8])> = files
        .iter()
        .zip(&bytes)
        .map(|(f, b)| (f.as_path(), b.as_slice()))
        .collect();
    load_hf_weights_from(&pairs, layout)
}

/// Refuses a Hugging Face `config.json` (`text`) that describes another model than `layout`.
pub fn check_hf_config(path: &Path, text: &str, layout: &ParamLayout) -> Result<(), TrainError> {
    let bad = |reason: String| TrainError::Weights {
        path: path.to_path_buf(),
        reason,
    };
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    if let Some(t) = v.get("model_type").and_then(|t| t.as_str()) {
        if t != "gpt2" {
            return Err(bad(format!(
                "model_type is {t:?}; only GPT-2 weights (\"gpt2\") load into this runtime"
            )));
        }
    }
    let c = &layout.cfg;
    let fields: [(&str, Option<&str>, usize, &str); 5] = [
        ("n_layer", None, c.n_layer, "model.n_layer"),
        ("n_head", None, c.n_head, "model.n_head"),
        ("n_embd", None, c.channels, "model.channels"),
        ("n_positions", Some("n_ctx"), c.max_seq_len, "model.seq_len"),
        ("vocab_size", None, c.vocab_size, "the data's vocabulary"),
    ];
    let mut diffs = Vec::new();
    for (key, alt, ours, name) in fields {
        let theirs = v
            .get(key)
            .or_else(|| alt.and_then(|a| v.get(a)))
            .and_then(|x| x.as_u64());
        match theirs {
            None => diffs.push(format!("{key} is missing (expected {ours})")),
            Some(t) if t != ours as u64 => diffs.push(format!(
                "{key} is {t}, but the run's {name} is {ours}{}",
                if name.starts_with("model.") {
                    format!(" (--set {name}={t} to match)")
                } else {
                    String::new()
                }
            )),
            Some(_) => {}
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(bad(format!(
            "describes another model than this run's: {}",
            diffs.join("; ")
        )))
    }
}

/// Reads HF GPT-2 weights from safetensors `bytes` into the runtime's flat layout. Accepts the
/// `transformer.` prefix, ignores the attention-mask buffers and a tied `lm_head.weight`;
/// any other difference (missing tensor, shape, dtype, extra layer) is an error naming it.
pub fn load_hf_weights(
    path: &Path,
    bytes: &[u8],
    layout: &ParamLayout,
) -> Result<Vec<f32>, TrainError> {
    load_hf_weights_from(&[(path, bytes)], layout)
}

/// [`load_hf_weights`] from several files (a pipeline checkpoint's stage files), each tensor
/// taken from whichever file holds it; a tensor in two files is an error, as is one in none.
pub fn load_hf_weights_from(
    files: &[(&Path, &[u8])],
    layout: &ParamLayout,
) -> Result<Vec<f32>, TrainError> {
    let path = files.first().map_or(Path::new(""), |f| f.0);
    let bad = |reason: String| TrainError::Weights {
        path: path.to_path_buf(),
        reason,
    };
    let mut by_name: HashMap<String, TensorView<'_>> = HashMap::new();
    for (p, bytes) in files {
        let st = SafeTensors::deserialize(bytes).map_err(|e| TrainError::Weights {
            path: p.to_path_buf(),
            reason: format!("not a safetensors file: {e}"),
        })?;
        for (name, view) in st.tensors() {
            let short = name
                .strip_prefix("transformer.")
                .unwrap_or(&name)
                .to_string();
            let ignorable = short == "lm_head.weight"
                || short.ends_with(".attn.bias")
                || short.ends_with(".attn.masked_bias");
            if !ignorable && by_name.insert(short.clone(), view).is_some() {
                return Err(TrainError::Weights {
                    path: p.to_path_buf(),
                    reason: format!(
                        "holds {short}, which another weights file of the checkpoint holds too"
                    ),
                });
            }
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
