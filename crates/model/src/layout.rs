//! `ParamLayout`: name → (offset, shape) in one flat `f32` buffer, contiguous per layer:
//!
//! ```text
//! [ wte (vp, c) | wpe (max_t, c) ] [ layer l0 ] … [ layer l1-1 ] [ ln_f.w | ln_f.b | lm_head? ]
//!   first stage only                 this shard's layers           last stage only
//! ```
//!
//! Parameters, gradients and both AdamW moments share it, so a pipeline stage, a gradient
//! bucket or a ZeRO shard is an offset range. Under tensor parallelism (Shoeybi et al. 2019,
//! Megatron-LM §3) a rank holds its heads' rows of `c_attn`, its columns of `attn.c_proj`, its
//! rows of `mlp.c_fc`, its columns of `mlp.c_proj` and its `vp/tp` rows of the tied `wte`
//! (vocabulary-parallel embedding and LM head; the LM head's own copy on a last stage without
//! the embedding is split the same way); norms, `wpe` and the row-parallel biases are
//! replicated ([`ParamLayout::replicated_ranges`]). With `tp_size = 1` the layout is the full
//! model.

use crate::{ModelConfig, ModelError, Shard};
use kernels::rng::Rng;
use std::ops::Range;

/// How a tensor is split across tensor-parallel ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TpSplit {
    /// Every rank holds the whole tensor.
    Replicated,
    /// Dim 0 is `blocks` stacked blocks (3 for q|k|v); each block's rows split `tp` ways.
    Rows {
        /// Number of stacked blocks.
        blocks: usize,
    },
    /// Dim 1 (columns) split `tp` ways.
    Columns,
}

/// One named tensor in the flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamTensor {
    /// PyTorch-style name, e.g. `h.0.attn.c_attn.weight` (layer index is global).
    pub name: String,
    /// First element in the flat buffer.
    pub offset: usize,
    /// Shape held by this shard.
    pub shape: Vec<usize>,
    /// Shape in the full (unsharded) model.
    pub full_shape: Vec<usize>,
    /// AdamW weight decay applies (2-D tensors only; not biases or norm weights).
    pub decay: bool,
    /// Tensor-parallel split rule.
    pub split: TpSplit,
}

impl ParamTensor {
    /// The tensor's range in the flat buffer.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.shape.iter().product::<usize>()
    }
}

/// Offsets of one transformer block's parameters (shapes for this shard; cl = c / tp).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerParams {
    pub ln1_w: Range<usize>,    // (c)
    pub ln1_b: Range<usize>,    // (c)
    pub qkv_w: Range<usize>,    // (3*cl, c)
    pub qkv_b: Range<usize>,    // (3*cl)
    pub proj_w: Range<usize>,   // (c, cl)
    pub proj_b: Range<usize>,   // (c), replicated
    pub ln2_w: Range<usize>,    // (c)
    pub ln2_b: Range<usize>,    // (c)
    pub fc_w: Range<usize>,     // (4*cl, c)
    pub fc_b: Range<usize>,     // (4*cl)
    pub fcproj_w: Range<usize>, // (c, 4*cl)
    pub fcproj_b: Range<usize>, // (c), replicated
}

impl LayerParams {
    /// The same offsets relative to `base` (the layer's start, for a buffer holding only it).
    pub fn rebased(&self, base: usize) -> LayerParams {
        let r = |x: &Range<usize>| x.start - base..x.end - base;
        LayerParams {
            ln1_w: r(&self.ln1_w),
            ln1_b: r(&self.ln1_b),
            qkv_w: r(&self.qkv_w),
            qkv_b: r(&self.qkv_b),
            proj_w: r(&self.proj_w),
            proj_b: r(&self.proj_b),
            ln2_w: r(&self.ln2_w),
            ln2_b: r(&self.ln2_b),
            fc_w: r(&self.fc_w),
            fc_b: r(&self.fc_b),
            fcproj_w: r(&self.fcproj_w),
            fcproj_b: r(&self.fcproj_b),
        }
    }
}

/// Offsets of the embeddings (first stage).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbedParams {
    /// (vp/tp, c): this rank's rows [`ParamLayout::vocab_rows`]; rows ≥ v are padding, kept at
    /// zero.
    pub wte: Range<usize>,
    /// (max_t, c), replicated.
    pub wpe: Range<usize>,
}

/// Offsets of the head (last stage).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadParams {
    pub lnf_w: Range<usize>, // (c)
    pub lnf_b: Range<usize>, // (c)
    /// The tied LM head (vp/tp, c), this rank's vocabulary rows: the embedding's `wte` when
    /// this stage has it, else its own copy.
    pub wte: Range<usize>,
}

/// The layout of one shard's flat buffers.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    /// The validated model config.
    pub cfg: ModelConfig,
    /// The validated shard.
    pub shard: Shard,
    /// Every tensor, in buffer order.
    pub tensors: Vec<ParamTensor>,
    /// Embedding offsets (first stage).
    pub embed: Option<EmbedParams>,
    /// Per held layer, in order (`layers[i]` is global layer `shard.layers.start + i`).
    pub layers: Vec<LayerParams>,
    /// Head offsets (last stage).
    pub head: Option<HeadParams>,
    len: usize,
}

impl ParamLayout {
    /// Builds the layout for `shard` of `cfg`, validating both.
    pub fn new(cfg: &ModelConfig, shard: &Shard) -> Result<ParamLayout, ModelError> {
        cfg.validate()?;
        shard.validate(cfg)?;
        let (c, vp, tp) = (cfg.channels, cfg.padded_vocab(), shard.tp_size);
        let cl = c / tp;
        if vp % tp != 0 {
            return Err(ModelError::Config {
                field: "tp_size",
                reason: format!(
                    "the padded vocabulary ({vp}, vocab_size {} rounded up to a multiple of 64) \
                     must be a multiple of tp_size ({tp}) for the vocabulary-parallel \
                     embedding; use a tp_size that divides {vp}",
                    cfg.vocab_size
                ),
            });
        }
        let vocab = TpSplit::Rows { blocks: 1 };
        let mut b = Builder {
            tensors: Vec::new(),
            offset: 0,
            tp,
        };
        let embed = shard.has_embedding.then(|| EmbedParams {
            wte: b.push("wte".into(), &[vp, c], true, vocab),
            wpe: b.push(
                "wpe".into(),
                &[cfg.max_seq_len, c],
                true,
                TpSplit::Replicated,
            ),
        });
        let rep = TpSplit::Replicated;
        let layers = shard
            .layers
            .clone()
            .map(|l| {
                let n = |s: &str| format!("h.{l}.{s}");
                LayerParams {
                    ln1_w: b.push(n("ln_1.weight"), &[c], false, rep),
                    ln1_b: b.push(n("ln_1.bias"), &[c], false, rep),
                    qkv_w: b.push(
                        n("attn.c_attn.weight"),
                        &[3 * c, c],
                        true,
                        TpSplit::Rows { blocks: 3 },
                    ),
                    qkv_b: b.push(
                        n("attn.c_attn.bias"),
                        &[3 * c],
                        false,
                        TpSplit::Rows { blocks: 3 },
                    ),
                    proj_w: b.push(n("attn.c_proj.weight"), &[c, c], true, TpSplit::Columns),
                    proj_b: b.push(n("attn.c_proj.bias"), &[c], false, rep),
                    ln2_w: b.push(n("ln_2.weight"), &[c], false, rep),
                    ln2_b: b.push(n("ln_2.bias"), &[c], false, rep),
                    fc_w: b.push(
                        n("mlp.c_fc.weight"),
                        &[4 * c, c],
                        true,
                        TpSplit::Rows { blocks: 1 },
                    ),
                    fc_b: b.push(
                        n("mlp.c_fc.bias"),
                        &[4 * c],
                        false,
                        TpSplit::Rows { blocks: 1 },
                    ),
                    fcproj_w: b.push(n("mlp.c_proj.weight"), &[c, 4 * c], true, TpSplit::Columns),
                    fcproj_b: b.push(n("mlp.c_proj.bias"), &[c], false, rep),
                }
            })
            .collect();
        let head = shard.has_head.then(|| {
            let lnf_w = b.push("ln_f.weight".into(), &[c], false, rep);
            let lnf_b = b.push("ln_f.bias".into(), &[c], false, rep);
            let wte = match &embed {
                Some(e) => e.wte.clone(),
                None => b.push("lm_head.weight".into(), &[vp, c], true, vocab),
            };
            HeadParams { lnf_w, lnf_b, wte }
        });
        debug_assert!(cl * tp == c);
        Ok(ParamLayout {
            cfg: cfg.clone(),
            shard: shard.clone(),
            len: b.offset,
            tensors: b.tensors,
            embed,
            layers,
            head,
        })
    }

    /// Total elements in the flat buffer.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the shard holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The tensor called `name`, if this shard holds it.
    pub fn tensor(&self, name: &str) -> Option<&ParamTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The contiguous range of held layer `i` (0-based within the shard).
    pub fn layer_range(&self, i: usize) -> Range<usize> {
        let l = &self.layers[i];
        l.ln1_w.start..l.fcproj_b.end
    }

    /// Where this shard's head region starts (`ln_f`, and `lm_head` on a stage without the
    /// embedding): the end of the last held layer, or of the embedding, or 0.
    pub fn head_start(&self) -> usize {
        match self.layers.len() {
            0 => self.embed.as_ref().map_or(0, |e| e.wpe.end),
            n => self.layer_range(n - 1).end,
        }
    }

    /// The offsets at which [`crate::backward_into`] reports gradients final, in the order it
    /// reports them: after the head `head_start()`, after each layer (last to first) its start,
    /// after the embedding 0. `grads[p..]` is final at point `p`, so a gradient bucket is a
    /// range between two of these points.
    pub fn ready_points(&self) -> Vec<usize> {
        let mut pts = vec![self.head_start()];
        pts.extend(
            (0..self.layers.len())
                .rev()
                .map(|i| self.layer_range(i).start),
        );
        pts.push(0);
        pts.dedup();
        pts
    }

    /// The vocabulary rows (token ids, padding included) of the tied `wte` this rank holds:
    /// `tp_rank·vp/tp .. (tp_rank+1)·vp/tp`.
    pub fn vocab_rows(&self) -> Range<usize> {
        let vpl = self.cfg.padded_vocab() / self.shard.tp_size;
        self.shard.tp_rank * vpl..(self.shard.tp_rank + 1) * vpl
    }

    /// How many of [`ParamLayout::vocab_rows`] are real tokens (`< vocab_size`); the rest are
    /// padding. 0 for a rank holding only padding.
    pub(crate) fn vocab_rows_real(&self) -> usize {
        let r = self.vocab_rows();
        self.cfg.vocab_size.saturating_sub(r.start).min(r.len())
    }

    /// The split rule of the tensor holding flat offset `offset` (`None` past the end).
    pub fn tp_split_of(&self, offset: usize) -> Option<TpSplit> {
        let i = self.tensors.partition_point(|t| t.range().end <= offset);
        self.tensors
            .get(i)
            .filter(|t| t.range().contains(&offset))
            .map(|t| t.split)
    }

    /// The flat ranges (merged where adjacent, in buffer order) of the tensors every
    /// tensor-parallel rank holds whole: layer norms, `ln_f`, the row-parallel biases
    /// (`attn.c_proj.bias`, `mlp.c_proj.bias`) and `wpe`. Their values and — after
    /// [`crate::backward`] — their gradients are identical on every rank of the group, so a
    /// caller computing a global gradient norm over tp ranks counts these ranges on one rank
    /// only (say tp rank 0) and every other range on every rank; a checkpoint takes them from
    /// any one rank. With `tp_size = 1` every tensor is listed.
    pub fn replicated_ranges(&self) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = Vec::new();
        for t in self
            .tensors
            .iter()
            .filter(|t| t.split == TpSplit::Replicated)
        {
            let r = t.range();
            match out.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => out.push(r),
            }
        }
        out
    }

    /// GPT-2 initialisation from `seed` (Radford et al. 2019 §2.3, as nanoGPT does it):
    /// weights N(0, 0.02), residual projections (`c_proj`) N(0, 0.02/√(2·n_layer)), biases 0,
    /// norm weights 1, padded vocabulary rows 0. Each tensor draws from its own stream seeded by
    /// `(seed, full name)`, and is generated full then sliced, so every shard and stage of the
    /// same seed holds exactly the same model.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        let mut params = vec![0.0f32; self.len];
        let resid_std = 0.02 / (2.0 * self.cfg.n_layer as f32).sqrt();
        let v = self.cfg.vocab_size;
        for t in &self.tensors {
            let full_len: usize = t.full_shape.iter().product();
            let mut full = vec![0.0f32; full_len];
            let stream_name = if t.name == "lm_head.weight" {
                "wte"
            } else {
                t.name.as_str()
            };
            let mut rng = Rng::new(seed ^ fnv1a(stream_name));
            if t.name.ends_with("ln_1.weight")
                || t.name.ends_with("ln_2.weight")
                || t.name == "ln_f.weight"
            {
                full.fill(1.0);
            } else if t.full_shape.len() == 2 {
                let std = if t.name.ends_with("c_proj.weight") {
                    resid_std
                } else {
                    0.02
                };
                rng.fill_normal(&mut full, std);
                if stream_name == "wte" {
                    full[v * t.full_shape[1]..].fill(0.0);
                }
            }
            slice_for_rank(
                &mut params[t.range()],
                &full,
                t,
                self.shard.tp_rank,
                self.shard.tp_size,
            );
        }
        params
    }

    /// Copies this shard's part of a full-model buffer (`full` laid out by `full_layout`, which
    /// must hold every tensor this shard holds) into `out`.
    #[track_caller]
    pub fn shard_from_full(&self, out: &mut [f32], full_layout: &ParamLayout, full: &[f32]) {
        assert_eq!(out.len(), self.len, "shard_from_full: out length");
        assert_eq!(full.len(), full_layout.len, "shard_from_full: full length");
        assert_eq!(
            full_layout.shard.tp_size, 1,
            "shard_from_full: source must be unsharded"
        );
        for t in &self.tensors {
            let src_name = match (t.name.as_str(), full_layout.tensor(&t.name)) {
                ("lm_head.weight", None) => "wte",
                (n, _) => n,
            };
            let src = full_layout
                .tensor(src_name)
                .unwrap_or_else(|| panic!("shard_from_full: full layout lacks {src_name}"));
            slice_for_rank(
                &mut out[t.range()],
                &full[src.range()],
                t,
                self.shard.tp_rank,
                self.shard.tp_size,
            );
        }
    }

    /// The inverse of [`ParamLayout::shard_from_full`]: writes this shard's buffer `shard` into
    /// its place in the full-model buffer `full` (laid out by `full_layout`, unsharded). Calling
    /// it for every tensor-parallel rank of a stage fills that stage's tensors; replicated
    /// tensors are written by each (identical) rank. A last stage without the embedding writes
    /// its `lm_head.weight` into the full layout's `wte` when the full layout has no
    /// `lm_head.weight` of its own (the tied copies are equal).
    #[track_caller]
    pub fn shard_to_full(&self, shard: &[f32], full_layout: &ParamLayout, full: &mut [f32]) {
        assert_eq!(shard.len(), self.len, "shard_to_full: shard length");
        assert_eq!(full.len(), full_layout.len, "shard_to_full: full length");
        assert_eq!(
            full_layout.shard.tp_size, 1,
            "shard_to_full: target must be unsharded"
        );
        for t in &self.tensors {
            let dst_name = match (t.name.as_str(), full_layout.tensor(&t.name)) {
                ("lm_head.weight", None) => "wte",
                (n, _) => n,
            };
            let dst = full_layout
                .tensor(dst_name)
                .unwrap_or_else(|| panic!("shard_to_full: full layout lacks {dst_name}"));
            place_for_rank(
                &mut full[dst.range()],
                &shard[t.range()],
                t,
                self.shard.tp_rank,
                self.shard.tp_size,
            );
        }
    }

    /// Gathers the buffers of every tensor-parallel rank of one stage (`shards[r]` = rank `r`'s
    /// layout and buffer, all for the same layers) into `full` laid out by `self`, the
    /// unsharded layout (the whole model, or a `tp_size = 1` stage). Tensors of `self` that no
    /// shard holds are left untouched.
    #[track_caller]
    pub fn full_from_shards(&self, full: &mut [f32], shards: &[(&ParamLayout, &[f32])]) {
        for (r, (layout, buf)) in shards.iter().enumerate() {
            assert_eq!(
                (layout.shard.tp_rank, layout.shard.tp_size),
                (r, shards.len()),
                "full_from_shards: shards must be tp ranks 0..n in order"
            );
            layout.shard_to_full(buf, self, full);
        }
    }
}

/// Writes rank `r` of `tp`'s part `part` of a tensor into its place in the full tensor `full`.
fn place_for_rank(full: &mut [f32], part: &[f32], t: &ParamTensor, r: usize, tp: usize) {
    match t.split {
        TpSplit::Replicated => full.copy_from_slice(part),
        TpSplit::Rows { blocks } => {
            let rows = t.full_shape[0];
            let cols: usize = t.full_shape[1..].iter().product();
            let per_rank = rows / blocks / tp;
            let mut o = 0;
            for k in 0..blocks {
                let start = (k * rows / blocks + r * per_rank) * cols;
                let n = per_rank * cols;
                full[start..start + n].copy_from_slice(&part[o..o + n]);
                o += n;
            }
        }
        TpSplit::Columns => {
            let (rows, cols) = (t.full_shape[0], t.full_shape[1]);
            let per_rank = cols / tp;
            for i in 0..rows {
                full[i * cols + r * per_rank..i * cols + (r + 1) * per_rank]
                    .copy_from_slice(&part[i * per_rank..(i + 1) * per_rank]);
            }
        }
    }
}

/// Writes rank `r` of `tp`'s part of the full tensor `full` into `out`.
fn slice_for_rank(out: &mut [f32], full: &[f32], t: &ParamTensor, r: usize, tp: usize) {
    match t.split {
        TpSplit::Replicated => out.copy_from_slice(full),
        TpSplit::Rows { blocks } => {
            let rows = t.full_shape[0];
            let cols: usize = t.full_shape[1..].iter().product();
            let per_rank = rows / blocks / tp;
            let mut o = 0;
            for k in 0..blocks {
                let start = (k * rows / blocks + r * per_rank) * cols;
                let n = per_rank * cols;
                out[o..o + n].copy_from_slice(&full[start..start + n]);
                o += n;
            }
        }
        TpSplit::Columns => {
            let (rows, cols) = (t.full_shape[0], t.full_shape[1]);
            let per_rank = cols / tp;
            for i in 0..rows {
                out[i * per_rank..(i + 1) * per_rank]
                    .copy_from_slice(&full[i * cols + r * per_rank..i * cols + (r + 1) * per_rank]);
            }
        }
    }
}

/// FNV-1a, to derive a per-tensor seed from its name.
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

struct Builder {
    tensors: Vec<ParamTensor>,
    offset: usize,
    tp: usize,
}

impl Builder {
    fn push(
        &mut self,
        name: String,
        full_shape: &[usize],
        decay: bool,
        split: TpSplit,
    ) -> Range<usize> {
        let mut shape = full_shape.to_vec();
        match split {
            TpSplit::Replicated => {}
            TpSplit::Rows { .. } => shape[0] /= self.tp,
            TpSplit::Columns => shape[1] /= self.tp,
        }
        let n: usize = shape.iter().product();
        let range = self.offset..self.offset + n;
        self.tensors.push(ParamTensor {
            name,
            offset: self.offset,
            shape,
            full_shape: full_shape.to_vec(),
            decay,
            split,
        });
        self.offset += n;
        range
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        ModelConfig {
            vocab_size: 100,
            max_seq_len: 16,
            n_layer: 3,
            n_head: 4,
            channels: 16,
        }
    }

    #[test]
    fn layout_is_contiguous_per_layer_and_matches_plan() {
        let cfg = cfg();
        let full = ParamLayout::new(&cfg, &Shard::full(&cfg)).unwrap();
        let mut end = 0;
        for t in &full.tensors {
            assert_eq!(t.offset, end, "{} not contiguous", t.name);
            end = t.range().end;
        }
        assert_eq!(end, full.len());
        for i in 0..3 {
            let r = full.layer_range(i);
            let inside: Vec<_> = full
                .tensors
                .iter()
                .filter(|t| t.offset >= r.start && t.offset < r.end)
                .collect();
            assert_eq!(inside.len(), 12);
            assert!(inside
                .iter()
                .all(|t| t.name.starts_with(&format!("h.{i}."))));
        }
        assert_eq!(
            full.len() as u64,
            plan::cpu_runtime::param_count(&Shard::full(&cfg).dims(&cfg))
        );
        for tp in [2, 4] {
            for rank in 0..tp {
                let s = Shard {
                    tp_rank: rank,
                    tp_size: tp,
                    layers: 1..3,
                    has_embedding: false,
                    ..Shard::full(&cfg)
                };
                let l = ParamLayout::new(&cfg, &s).unwrap();
                assert_eq!(
                    l.len() as u64,
                    plan::cpu_runtime::param_count(&s.dims(&cfg))
                );
            }
        }
    }

    #[test]
    fn shards_init_the_same_model_as_the_full_layout() {
        let cfg = cfg();
        let full = ParamLayout::new(&cfg, &Shard::full(&cfg)).unwrap();
        let fp = full.init_params(42);
        // padded vocabulary rows are zero; norm weights are one
        let wte = full.embed.as_ref().unwrap().wte.clone();
        assert!(fp[wte.start + 100 * 16..wte.end].iter().all(|&x| x == 0.0));
        assert!(fp[full.layers[0].ln1_w.clone()].iter().all(|&x| x == 1.0));
        for tp in [2, 4] {
            for rank in 0..tp {
                let s = Shard {
                    tp_rank: rank,
                    tp_size: tp,
                    ..Shard::full(&cfg)
                };
                let l = ParamLayout::new(&cfg, &s).unwrap();
                let mut sliced = vec![0.0; l.len()];
                l.shard_from_full(&mut sliced, &full, &fp);
                assert_eq!(l.init_params(42), sliced);
            }
        }
        // a c_attn row of rank 1 of 2 for the k block is row c + c/2 of the full tensor
        let s = Shard {
            tp_rank: 1,
            tp_size: 2,
            ..Shard::full(&cfg)
        };
        let l = ParamLayout::new(&cfg, &s).unwrap();
        let p = l.init_params(42);
        let (fq, sq) = (full.layers[0].qkv_w.start, l.layers[0].qkv_w.start);
        assert_eq!(p[sq + 8 * 16..sq + 9 * 16], fp[fq + 24 * 16..fq + 25 * 16]);
    }
}
