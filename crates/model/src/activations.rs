//! Activation buffers, allocated once per (micro-batch, sequence) shape and reused every step.
//! The element counts are exactly `plan::cpu_runtime::{saved,scratch}_activation_count`;
//! `tests/allocation.rs` checks real allocations against the prediction.
//!
//! Legend: bt = b*t, c = channels, cl = c / tp, nhl = heads / tp, vp = padded vocabulary.

use crate::ParamLayout;

/// Saved activations of one transformer block.
#[derive(Debug)]
pub(crate) struct LayerActs {
    pub ln1: Vec<f32>,      // (bt, c)
    pub ln1_mean: Vec<f32>, // (bt)
    pub ln1_rstd: Vec<f32>, // (bt)
    pub qkv: Vec<f32>,      // (bt, 3*cl)
    pub atty: Vec<f32>,     // (bt, cl) attention output before the projection
    pub att: Vec<f32>,      // (b, nhl, t, t) softmax probabilities
    pub res2: Vec<f32>,     // (bt, c) residual after attention
    pub ln2: Vec<f32>,      // (bt, c)
    pub ln2_mean: Vec<f32>, // (bt)
    pub ln2_rstd: Vec<f32>, // (bt)
    pub fch: Vec<f32>,      // (bt, 4*cl) pre-GELU
    pub fch_gelu: Vec<f32>, // (bt, 4*cl)
    pub res3: Vec<f32>,     // (bt, c) block output
}

/// Saved activations of the head (last stage).
#[derive(Debug)]
pub(crate) struct HeadActs {
    pub lnf: Vec<f32>,      // (bt, c)
    pub lnf_mean: Vec<f32>, // (bt)
    pub lnf_rstd: Vec<f32>, // (bt)
    /// (bt, vp); backward overwrites it with d_logits in place.
    pub logits: Vec<f32>,
    pub losses: Vec<f32>, // (bt)
    pub lse: Vec<f32>,    // (bt) log-sum-exp per row
}

/// What backward needs from one micro-batch's forward on one shard, for one (b, t) shape: the
/// stage input, every layer's saved tensors and, on the last stage, the head's (including the
/// logits, per-token losses and log-sum-exps). A pipeline stage holds one per micro-batch in
/// flight. Its element count is exactly `plan::cpu_runtime::saved_activation_count`.
#[derive(Debug)]
pub struct ActSaved {
    pub(crate) b: usize,
    pub(crate) t: usize,
    /// (bt, c) the stage input: the encoder output, or the hidden state received.
    pub(crate) input: Vec<f32>,
    pub(crate) layers: Vec<LayerActs>,
    pub(crate) head: Option<HeadActs>,
}

/// Scratch shared by every layer and every micro-batch of one shard and (b, t) shape: nothing in
/// it lives from a forward to its backward. Its element count is exactly
/// `plan::cpu_runtime::scratch_activation_count`.
#[derive(Debug)]
pub struct ActScratch {
    pub(crate) b: usize,
    pub(crate) t: usize,
    pub(crate) tmp: Vec<f32>, // (bt, c) row-parallel partial (fwd) / layernorm d_inp (bwd)
    pub(crate) d_res: Vec<f32>, // (bt, c) gradient of the residual stream
    pub(crate) d_ln: Vec<f32>, // (bt, c) gradient of a layernorm output
    pub(crate) d_big1: Vec<f32>, // (bt, 4*cl) d_fch_gelu, then d_atty
    pub(crate) d_big2: Vec<f32>, // (bt, 4*cl) d_fch, then d_qkv
    pub(crate) d_att: Vec<f32>, // (b, t, t) attention softmax gradient, one head at a time
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

impl ActSaved {
    /// Allocates the saved buffers for micro-batch `b` and sequence `t` (zero-filled).
    /// Panics if `t` exceeds the config's `max_seq_len` or `b` is 0 (a caller bug).
    pub fn new(layout: &ParamLayout, b: usize, t: usize) -> ActSaved {
        check_shape("ActSaved::new", layout, b, t);
        let cfg = &layout.cfg;
        let tp = layout.shard.tp_size;
        let (c, vp, bt) = (cfg.channels, cfg.padded_vocab(), b * t);
        let (cl, nhl) = (c / tp, cfg.n_head / tp);
        let layers = (0..layout.layers.len())
            .map(|_| LayerActs {
                ln1: z(bt * c),
                ln1_mean: z(bt),
                ln1_rstd: z(bt),
                qkv: z(bt * 3 * cl),
                atty: z(bt * cl),
                att: z(b * nhl * t * t),
                res2: z(bt * c),
                ln2: z(bt * c),
                ln2_mean: z(bt),
                ln2_rstd: z(bt),
                fch: z(bt * 4 * cl),
                fch_gelu: z(bt * 4 * cl),
                res3: z(bt * c),
            })
            .collect();
        let head = layout.head.as_ref().map(|_| HeadActs {
            lnf: z(bt * c),
            lnf_mean: z(bt),
            lnf_rstd: z(bt),
            logits: z(bt * vp),
            losses: z(bt),
            lse: z(bt),
        });
        ActSaved {
            b,
            t,
            input: z(bt * c),
            layers,
            head,
        }
    }

    /// Micro-batch size.
    pub fn batch(&self) -> usize {
        self.b
    }

    /// Sequence length.
    pub fn seq_len(&self) -> usize {
        self.t
    }

    /// Total `f32` elements held.
    pub fn len(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|a| {
                [
                    &a.ln1,
                    &a.ln1_mean,
                    &a.ln1_rstd,
                    &a.qkv,
                    &a.atty,
                    &a.att,
                    &a.res2,
                    &a.ln2,
                    &a.ln2_mean,
                    &a.ln2_rstd,
                    &a.fch,
                    &a.fch_gelu,
                    &a.res3,
                ]
                .iter()
                .map(|v| v.len())
                .sum::<usize>()
            })
            .sum();
        let h = self.head.as_ref().map_or(0, |h| {
            h.lnf.len()
                + h.lnf_mean.len()
                + h.lnf_rstd.len()
                + h.logits.len()
                + h.losses.len()
                + h.lse.len()
        });
        self.input.len() + l + h
    }

    /// True when nothing is held (never, for a valid shape).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stage output hidden state (bt, c) after a forward on a non-last stage: what a
    /// pipeline sends to the next stage. (On a stage without layers, the input itself.)
    pub fn output(&self) -> &[f32] {
        self.layers.last().map_or(&self.input, |l| &l.res3)
    }

    /// Per-token losses (bt) after a last-stage forward.
    pub fn losses(&self) -> Option<&[f32]> {
        self.head.as_ref().map(|h| h.losses.as_slice())
    }

    /// Logits (bt, vp) after a last-stage forward (before backward overwrites them).
    pub fn logits(&self) -> Option<&[f32]> {
        self.head.as_ref().map(|h| h.logits.as_slice())
    }
}

impl ActScratch {
    /// Allocates the shared scratch for micro-batch `b` and sequence `t` (zero-filled).
    /// Panics if `t` exceeds the config's `max_seq_len` or `b` is 0 (a caller bug).
    pub fn new(layout: &ParamLayout, b: usize, t: usize) -> ActScratch {
        check_shape("ActScratch::new", layout, b, t);
        let c = layout.cfg.channels;
        let cl = c / layout.shard.tp_size;
        let bt = b * t;
        ActScratch {
            b,
            t,
            tmp: z(bt * c),
            d_res: z(bt * c),
            d_ln: z(bt * c),
            d_big1: z(bt * 4 * cl),
            d_big2: z(bt * 4 * cl),
            d_att: z(b * t * t),
        }
    }

    /// Micro-batch size.
    pub fn batch(&self) -> usize {
        self.b
    }

    /// Sequence length.
    pub fn seq_len(&self) -> usize {
        self.t
    }

    /// Total `f32` elements held.
    pub fn len(&self) -> usize {
        self.tmp.len()
            + self.d_res.len()
            + self.d_ln.len()
            + self.d_big1.len()
            + self.d_big2.len()
            + self.d_att.len()
    }

    /// True when nothing is held (never, for a valid shape).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The gradient w.r.t. the stage input (bt, c) after a backward on a non-first stage: what
    /// a pipeline sends to the previous stage. Valid until the next backward with this scratch
    /// (a forward does not touch it).
    pub fn d_input(&self) -> &[f32] {
        &self.d_res
    }
}

/// All activation buffers of one shard for one (b, t) shape: one [`ActSaved`] and one
/// [`ActScratch`], for callers that run one micro-batch at a time.
#[derive(Debug)]
pub struct Activations {
    /// What backward needs from forward.
    pub saved: ActSaved,
    /// Scratch shared by all layers.
    pub scratch: ActScratch,
}

impl Activations {
    /// Allocates every buffer for micro-batch `b` and sequence `t` (zero-filled).
    /// Panics if `t` exceeds the config's `max_seq_len` or `b` is 0 (a caller bug; user input is
    /// validated before it reaches here).
    pub fn new(layout: &ParamLayout, b: usize, t: usize) -> Activations {
        check_shape("Activations::new", layout, b, t);
        Activations {
            saved: ActSaved::new(layout, b, t),
            scratch: ActScratch::new(layout, b, t),
        }
    }

    /// Micro-batch size.
    pub fn batch(&self) -> usize {
        self.saved.b
    }

    /// Sequence length.
    pub fn seq_len(&self) -> usize {
        self.saved.t
    }

    /// Total `f32` elements held (saved + scratch).
    pub fn len(&self) -> usize {
        self.saved.len() + self.scratch.len()
    }

    /// True when nothing is held (never, for a valid shape).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stage output hidden state (bt, c) after [`crate::forward`] on a non-last stage: what
    /// a pipeline sends to the next stage.
    pub fn output(&self) -> &[f32] {
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

    /// Logits (bt, vp) after a last-stage forward (before backward overwrites them).
    pub fn logits(&self) -> Option<&[f32]> {
        self.saved.logits()
    }
}
