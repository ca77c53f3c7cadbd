//! Activation buffers, allocated once per (micro-batch, sequence) shape and reused every step.
//! The element counts are exactly `plan::cpu_runtime::{saved,scratch}_activation_count` (fp32,
//! no recomputation) and `plan::cpu_runtime::activation_elems` in general;
//! `tests/allocation.rs` checks real allocations against the prediction.
//!
//! Storage type `E` (`f32`, `Bf16`, `F16`) holds the tensors; layernorm statistics, per-token
//! losses and log-sum-exps stay `f32` (2–4 numbers per token), and so does the gradient scratch
//! (it lives only inside one backward).
//!
//! Recomputation (Korthikanti et al. 2022, §4): `Selective` does not save the softmax
//! probabilities `att`; `Full` saves only each layer's output (the next layer's input) and the
//! stage input. What backward rebuilds goes into a one-layer workspace in [`ActScratch`],
//! shared by the layers and micro-batches.
//!
//! Sequence parallelism (Korthikanti et al. 2022, §4.2.2; `with_sp`): the layer norms, residual
//! adds and their saved tensors (`ln1`, `res2`, `ln2`, `res3`, their statistics, the stage
//! input, `lnf`) hold only this rank's `btl = bt/tp` rows of the flattened (b·t) sequence, as
//! does the residual-stream gradient `d_res`; the column/row-parallel regions stay (bt, ·).
//!
//! Legend: bt = b*t, btl = bt / tp with sequence parallelism (else bt), c = channels,
//! cl = c / tp, nhl = heads / tp, vp = padded vocabulary, vpl = vp / tp (this rank's vocabulary
//! columns).

use crate::{ModelError, ParamLayout};
use kernels::Elem;
use plan::recipe::Recompute;

/// Activations of one transformer block. A tensor not kept (recomputation) is an empty `Vec`;
/// the same struct is the recompute workspace, holding exactly what the layers do not keep.
#[derive(Debug)]
pub(crate) struct LayerActs<E> {
    pub ln1: Vec<E>,        // (btl, c)
    pub ln1_mean: Vec<f32>, // (btl)
    pub ln1_rstd: Vec<f32>, // (btl)
    pub qkv: Vec<E>,        // (bt, 3*cl)
    pub atty: Vec<E>,       // (bt, cl) attention output before the projection
    pub att: Vec<E>,        // (b, nhl, t, t) softmax probabilities
    pub res2: Vec<E>,       // (btl, c) residual after attention
    pub ln2: Vec<E>,        // (btl, c)
    pub ln2_mean: Vec<f32>, // (btl)
    pub ln2_rstd: Vec<f32>, // (btl)
    pub fch: Vec<E>,        // (bt, 4*cl) pre-GELU
    pub fch_gelu: Vec<E>,   // (bt, 4*cl)
    pub res3: Vec<E>,       // (btl, c) block output
}

/// Which tensors of a layer a [`LayerActs`] holds.
#[derive(Clone, Copy)]
struct Keep {
    att: bool,
    body: bool, // everything but att and res3
    res3: bool,
}

impl<E: Elem> LayerActs<E> {
    /// `btl` rows of the sequence-split tensors (`bt` without sequence parallelism).
    fn alloc(k: Keep, b: usize, t: usize, btl: usize, s: Sizes) -> LayerActs<E> {
        let Sizes { c, cl, nhl, .. } = s;
        let bt = b * t;
        let e = |keep: bool, n: usize| {
            if keep {
                vec![E::default(); n]
            } else {
                Vec::new()
            }
        };
        let f = |keep: bool, n: usize| if keep { z(n) } else { Vec::new() };
        LayerActs {
            ln1: e(k.body, btl * c),
            ln1_mean: f(k.body, btl),
            ln1_rstd: f(k.body, btl),
            qkv: e(k.body, bt * 3 * cl),
            atty: e(k.body, bt * cl),
            att: e(k.att, b * nhl * t * t),
            res2: e(k.body, btl * c),
            ln2: e(k.body, btl * c),
            ln2_mean: f(k.body, btl),
            ln2_rstd: f(k.body, btl),
            fch: e(k.body, bt * 4 * cl),
            fch_gelu: e(k.body, bt * 4 * cl),
            res3: e(k.res3, btl * c),
        }
    }

    /// (storage-type elements, f32 elements) held.
    fn counts(&self) -> (usize, usize) {
        let e = [
            &self.ln1,
            &self.qkv,
            &self.atty,
            &self.att,
            &self.res2,
            &self.ln2,
            &self.fch,
            &self.fch_gelu,
            &self.res3,
        ]
        .iter()
        .map(|v| v.len())
        .sum();
        let f =
            self.ln1_mean.len() + self.ln1_rstd.len() + self.ln2_mean.len() + self.ln2_rstd.len();
        (e, f)
    }
}

/// Saved activations of the head (last stage).
#[derive(Debug)]
pub(crate) struct HeadActs<E> {
    pub lnf: Vec<E>,        // (btl, c)
    pub lnf_mean: Vec<f32>, // (btl)
    pub lnf_rstd: Vec<f32>, // (btl)
    /// (bt, vpl), this rank's vocabulary columns; backward overwrites it with d_logits in place.
    pub logits: Vec<E>,
    pub losses: Vec<f32>, // (bt)
    pub lse: Vec<f32>,    // (bt) log-sum-exp per row
}

/// What backward needs from one micro-batch's forward on one shard, for one (b, t) shape: the
/// stage input, every layer's saved tensors and, on the last stage, the head's (including the
/// logits, per-token losses and log-sum-exps). A pipeline stage holds one per micro-batch in
/// flight. For fp32 without recomputation its element count is exactly
/// `plan::cpu_runtime::saved_activation_count`.
#[derive(Debug)]
pub struct ActSaved<E: Elem = f32> {
    pub(crate) b: usize,
    pub(crate) t: usize,
    pub(crate) recompute: Recompute,
    /// Sequence parallelism: the sequence-split tensors hold this rank's rows only.
    pub(crate) sp: bool,
    /// (btl, c) the stage input: the encoder output, or the hidden state received.
    pub(crate) input: Vec<E>,
    pub(crate) layers: Vec<LayerActs<E>>,
    pub(crate) head: Option<HeadActs<E>>,
}

/// Scratch shared by every layer and every micro-batch of one shard and (b, t) shape: nothing in
/// it lives from a forward to its backward. The gradient buffers are `f32`; with recomputation
/// it also holds a one-layer workspace (type `E`) for what backward rebuilds. For fp32 without
/// recomputation its element count is exactly `plan::cpu_runtime::scratch_activation_count`.
#[derive(Debug)]
pub struct ActScratch<E: Elem = f32> {
    pub(crate) b: usize,
    pub(crate) t: usize,
    pub(crate) recompute: Recompute,
    /// Sequence parallelism (as [`ActSaved`]).
    pub(crate) sp: bool,
    /// (bt, c) row-parallel partial (fwd) / layernorm d_inp (bwd); with sequence parallelism
    /// also the all-gathered layer-norm output (the column-parallel matmuls' input).
    pub(crate) tmp: Vec<f32>,
    pub(crate) d_res: Vec<f32>, // (btl, c) gradient of the residual stream
    pub(crate) d_ln: Vec<f32>,  // (bt, c) gradient of a layernorm output
    pub(crate) d_big1: Vec<f32>, // (bt, 4*cl) d_fch_gelu, then d_atty
    pub(crate) d_big2: Vec<f32>, // (bt, 4*cl) d_fch, then d_qkv
    pub(crate) d_att: Vec<f32>, // (b, t, t) attention softmax gradient, one head at a time
    /// (6c) with sequence parallelism, else empty: one layer's partial gradients of the
    /// replicated norms and row-parallel biases (or `ln_f`'s), all-reduced before they are
    /// added to the gradient buffer.
    pub(crate) rep_grads: Vec<f32>,
    /// What the layers do not keep: `att` (selective), all but `res3` (full), nothing (none).
    pub(crate) work: LayerActs<E>,
}

/// Checks a (b, t) shape against the config (a caller bug otherwise: user input is validated
/// before it reaches here).
fn check_shape(what: &str, layout: &ParamLayout, b: usize, t: usize) {
    assert!(b >= 1 && t >= 1, "{what}: b ({b}) and t ({t}) must be >= 1");
    assert!(
        t <= layout.cfg.max_seq_len,
        "{what}: t ({t}) > max_seq_len ({})",
        layout.cfg.max_seq_len
    );
}

fn z(n: usize) -> Vec<f32> {
    vec![0.0f32; n]
}

/// The per-rank widths of a layout.
#[derive(Clone, Copy)]
struct Sizes {
    c: usize,
    cl: usize,
    nhl: usize,
    vpl: usize,
}

fn dims(layout: &ParamLayout) -> Sizes {
    let (cfg, tp) = (&layout.cfg, layout.shard.tp_size);
    Sizes {
        c: cfg.channels,
        cl: cfg.channels / tp,
        nhl: cfg.n_head / tp,
        vpl: cfg.padded_vocab() / tp,
    }
}

/// The rows of the sequence-split tensors: `b·t / tp` with sequence parallelism, else `b·t`;
/// an error when `tp` does not divide `b·t`.
pub(crate) fn local_rows(
    layout: &ParamLayout,
    b: usize,
    t: usize,
    sp: bool,
) -> Result<usize, ModelError> {
    let (bt, tp) = (b * t, layout.shard.tp_size);
    if !sp {
        return Ok(bt);
    }
    if bt % tp != 0 {
        return Err(ModelError::Config {
            field: "sequence_parallel",
            reason: format!(
                "the micro-batch's b·t = {b}·{t} = {bt} tokens must be a multiple of tp_size \
                 ({tp}) to split the sequence; change the micro-batch size or sequence length, \
                 or turn sequence parallelism off"
            ),
        });
    }
    Ok(bt / tp)
}

impl ActSaved {
    /// Allocates the fp32 saved buffers (no recomputation) for micro-batch `b` and sequence `t`
    /// (zero-filled). Panics if `t` exceeds the config's `max_seq_len` or `b` is 0 (a caller bug).
    pub fn new(layout: &ParamLayout, b: usize, t: usize) -> ActSaved {
        ActSaved::with(layout, b, t, Recompute::None)
    }
}

impl<E: Elem> ActSaved<E> {
    /// Allocates the saved buffers in storage type `E` for the recomputation policy `recompute`
    /// (pair it with an [`ActScratch::with`] of the same type and policy).
    pub fn with(layout: &ParamLayout, b: usize, t: usize, recompute: Recompute) -> ActSaved<E> {
        ActSaved::with_sp(layout, b, t, recompute, false).expect("no sequence split")
    }

    /// [`ActSaved::with`], with sequence parallelism on or off (see the module docs; pair it
    /// with an [`ActScratch::with_sp`] of the same setting). An error when sequence
    /// parallelism is on and the layout's `tp_size` does not divide `b·t`.
    pub fn with_sp(
        layout: &ParamLayout,
        b: usize,
        t: usize,
        recompute: Recompute,
        sequence_parallel: bool,
    ) -> Result<ActSaved<E>, ModelError> {
        check_shape("ActSaved::with", layout, b, t);
        let sz = dims(layout);
        let Sizes { c, vpl, .. } = sz;
        let bt = b * t;
        let btl = local_rows(layout, b, t, sequence_parallel)?;
        let keep = match recompute {
            Recompute::None => Keep {
                att: true,
                body: true,
                res3: true,
            },
            Recompute::Selective => Keep {
                att: false,
                body: true,
                res3: true,
            },
            Recompute::Full => Keep {
                att: false,
                body: false,
                res3: true,
            },
        };
        let layers = (0..layout.layers.len())
            .map(|_| LayerActs::alloc(keep, b, t, btl, sz))
            .collect();
        let head = layout.head.as_ref().map(|_| HeadActs {
            lnf: vec![E::default(); btl * c],
            lnf_mean: z(btl),
            lnf_rstd: z(btl),
            logits: vec![E::default(); bt * vpl],
            losses: z(bt),
            lse: z(bt),
        });
        Ok(ActSaved {
            b,
            t,
            recompute,
            sp: sequence_parallel,
            input: vec![E::default(); btl * c],
            layers,
            head,
        })
    }

    /// Micro-batch size.
    pub fn batch(&self) -> usize {
        self.b
    }

    /// Sequence length.
    pub fn seq_len(&self) -> usize {
        self.t
    }

    /// The recomputation policy these buffers were built for.
    pub fn recompute(&self) -> Recompute {
        self.recompute
    }

    /// Whether these buffers were built for sequence parallelism.
    pub fn sequence_parallel(&self) -> bool {
        self.sp
    }

    /// (elements of type `E`, `f32` elements) held.
    pub fn counts(&self) -> (usize, usize) {
        let (mut e, mut f) = (self.input.len(), 0);
        for l in &self.layers {
            let (le, lf) = l.counts();
            e += le;
            f += lf;
        }
        if let Some(h) = &self.head {
            e += h.lnf.len() + h.logits.len();
            f += h.lnf_mean.len() + h.lnf_rstd.len() + h.losses.len() + h.lse.len();
        }
        (e, f)
    }

    /// Total elements held (of either type).
    pub fn len(&self) -> usize {
        let (e, f) = self.counts();
        e + f
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let (e, f) = self.counts();
        e * E::BYTES + f * 4
    }

    /// True when nothing is held (never, for a valid shape).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stage output hidden state (bt, c) after a forward on a non-last stage: what a
    /// pipeline sends to the next stage. (On a stage without layers, the input itself.) With
    /// sequence parallelism only this rank's (bt/tp, c) rows, which the same tp rank of the
    /// next stage takes as its input.
    pub fn output(&self) -> &[E] {
        self.layers.last().map_or(&self.input, |l| &l.res3)
    }

    /// Per-token losses (bt) after a last-stage forward.
    pub fn losses(&self) -> Option<&[f32]> {
        self.head.as_ref().map(|h| h.losses.as_slice())
    }

    /// Logits (bt, vp/tp) after a last-stage forward (before backward overwrites them): this
    /// tensor-parallel rank's vocabulary columns [`ParamLayout::vocab_rows`] (all of them
    /// without tensor parallelism).
    pub fn logits(&self) -> Option<&[E]> {
        self.head.as_ref().map(|h| h.logits.as_slice())
    }
}

impl ActScratch {
    /// Allocates the fp32 shared scratch (no recomputation) for micro-batch `b` and sequence `t`
    /// (zero-filled). Panics if `t` exceeds the config's `max_seq_len` or `b` is 0 (a caller bug).
    pub fn new(layout: &ParamLayout, b: usize, t: usize) -> ActScratch {
        ActScratch::with(layout, b, t, Recompute::None)
    }
}

impl<E: Elem> ActScratch<E> {
    /// Allocates the shared scratch for storage type `E` and policy `recompute`.
    pub fn with(layout: &ParamLayout, b: usize, t: usize, recompute: Recompute) -> ActScratch<E> {
        ActScratch::with_sp(layout, b, t, recompute, false).expect("no sequence split")
    }

    /// [`ActScratch::with`], with sequence parallelism on or off (as [`ActSaved::with_sp`]).
    pub fn with_sp(
        layout: &ParamLayout,
        b: usize,
        t: usize,
        recompute: Recompute,
        sequence_parallel: bool,
    ) -> Result<ActScratch<E>, ModelError> {
        check_shape("ActScratch::with", layout, b, t);
        let sz = dims(layout);
        let Sizes { c, cl, .. } = sz;
        let bt = b * t;
        let btl = local_rows(layout, b, t, sequence_parallel)?;
        let keep = Keep {
            att: recompute != Recompute::None && !layout.layers.is_empty(),
            body: recompute == Recompute::Full && !layout.layers.is_empty(),
            res3: false,
        };
        Ok(ActScratch {
            b,
            t,
            recompute,
            sp: sequence_parallel,
            tmp: z(bt * c),
            d_res: z(btl * c),
            d_ln: z(bt * c),
            d_big1: z(bt * 4 * cl),
            d_big2: z(bt * 4 * cl),
            d_att: z(b * t * t),
            rep_grads: z(if sequence_parallel { 6 * c } else { 0 }),
            work: LayerActs::alloc(keep, b, t, btl, sz),
        })
    }

    /// Micro-batch size.
    pub fn batch(&self) -> usize {
        self.b
    }

    /// Sequence length.
    pub fn seq_len(&self) -> usize {
        self.t
    }

    /// (elements of type `E`, `f32` elements) held.
    pub fn counts(&self) -> (usize, usize) {
        let f = self.tmp.len()
            + self.d_res.len()
            + self.d_ln.len()
            + self.d_big1.len()
            + self.d_big2.len()
            + self.d_att.len()
            + self.rep_grads.len();
        let (we, wf) = self.work.counts();
        (we, f + wf)
    }

    /// Total elements held (of either type).
    pub fn len(&self) -> usize {
        let (e, f) = self.counts();
        e + f
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let (e, f) = self.counts();
        e * E::BYTES + f * 4
    }

    /// True when nothing is held (never, for a valid shape).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The gradient w.r.t. the stage input (bt, c) after a backward on a non-first stage: what
    /// a pipeline sends to the previous stage (with sequence parallelism this rank's
    /// (bt/tp, c) rows). Valid until the next backward with this scratch (a forward does not
    /// touch it).
    pub fn d_input(&self) -> &[f32] {
        &self.d_res
    }
}

/// All activation buffers of one shard for one (b, t) shape: one [`ActSaved`] and one
/// [`ActScratch`], for callers that run one micro-batch at a time.
#[derive(Debug)]
pub struct Activations<E: Elem = f32> {
    /// What backward needs from forward.
    pub saved: ActSaved<E>,
    /// Scratch shared by all layers.
    pub scratch: ActScratch<E>,
}

impl Activations {
    /// Allocates every fp32 buffer (no recomputation) for micro-batch `b` and sequence `t`
    /// (zero-filled). Panics if `t` exceeds the config's `max_seq_len` or `b` is 0 (a caller
    /// bug; user input is validated before it reaches here).
    pub fn new(layout: &ParamLayout, b: usize, t: usize) -> Activations {
        Activations::with(layout, b, t, Recompute::None)
    }
}

impl<E: Elem> Activations<E> {
    /// Allocates every buffer for storage type `E` and policy `recompute`.
    pub fn with(layout: &ParamLayout, b: usize, t: usize, recompute: Recompute) -> Activations<E> {
        check_shape("Activations::with", layout, b, t);
        Activations {
            saved: ActSaved::with(layout, b, t, recompute),
            scratch: ActScratch::with(layout, b, t, recompute),
        }
    }

    /// [`Activations::with`], with sequence parallelism on or off (as [`ActSaved::with_sp`]).
    pub fn with_sp(
        layout: &ParamLayout,
        b: usize,
        t: usize,
        recompute: Recompute,
        sequence_parallel: bool,
    ) -> Result<Activations<E>, ModelError> {
        Ok(Activations {
            saved: ActSaved::with_sp(layout, b, t, recompute, sequence_parallel)?,
            scratch: ActScratch::with_sp(layout, b, t, recompute, sequence_parallel)?,
        })
    }

    /// Micro-batch size.
    pub fn batch(&self) -> usize {
        self.saved.b
    }

    /// Sequence length.
    pub fn seq_len(&self) -> usize {
        self.saved.t
    }

    /// Total elements held (saved + scratch, of either type).
    pub fn len(&self) -> usize {
        self.saved.len() + self.scratch.len()
    }

    /// Bytes held (saved + scratch).
    pub fn bytes(&self) -> usize {
        self.saved.bytes() + self.scratch.bytes()
    }

    /// True when nothing is held (never, for a valid shape).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stage output hidden state (bt, c) after [`crate::forward`] on a non-last stage: what
    /// a pipeline sends to the next stage.
    pub fn output(&self) -> &[E] {
        self.saved.output()
    }

    /// The gradient w.r.t. the stage input (bt, c) after [`crate::backward`] on a non-first
    /// stage: what a pipeline sends to the previous stage.
    pub fn d_input(&self) -> &[f32] {
        self.scratch.d_input()
    }

    /// Per-token losses (bt) after a last-stage forward.
    pub fn losses(&self) -> Option<&[f32]> {
        self.saved.losses()
    }

    /// Logits (bt, vp/tp) after a last-stage forward (before backward overwrites them): this
    /// rank's vocabulary columns, as [`ActSaved::logits`].
    pub fn logits(&self) -> Option<&[E]> {
        self.saved.logits()
    }
}
