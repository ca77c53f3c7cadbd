//! The executor: one rank's model chunks, their activation sets, and one optimizer step's list
//! of forward and backward operations (with the exchanges between them).
//!
//! Legend: b = micro-batch, t = sequence, c = channels, bt = b·t, m = micro-batches per step.

use super::{boundaries, with_tp, Kind, Pipeline};
use crate::dp::Dp;
use crate::error::TrainError;
use crate::precision::Storage;
use crate::trace::Trace;
use kernels::Par;
use model::Recompute;
use model::{forward_with, ActSaved, ActScratch, GradInput, ModelConfig, ParamLayout, StageInput};
use plan::schedule::Op;
use std::ops::Range;
use std::time::Instant;

/// The model chunks one rank holds (one without interleaving), laid end to end in its flat
/// parameter / gradient / optimizer buffers.
#[derive(Clone, Debug)]
pub struct StageModel {
    /// Per chunk: its global virtual stage, its layout, and its window of the flat buffers.
    pub chunks: Vec<(usize, ParamLayout, Range<usize>)>,
    /// Virtual stages in the whole pipeline.
    pub vstages: usize,
}

impl StageModel {
    /// The chunks of virtual stages `vstages_held` (global indices) of a pipeline whose
    /// virtual stages hold the layers `parts`.
    pub fn new(
        cfg: &ModelConfig,
        parts: &[Range<usize>],
        vstages_held: &[usize],
    ) -> Result<StageModel, TrainError> {
        StageModel::new_tp(cfg, parts, vstages_held, (0, 1))
    }

    /// [`StageModel::new`] for tensor-parallel rank `tp_rank` of `tp`: each chunk holds its
    /// rank's part of the split tensors (Megatron-LM's layout, `model::ParamLayout`).
    pub fn new_tp(
        cfg: &ModelConfig,
        parts: &[Range<usize>],
        vstages_held: &[usize],
        (tp_rank, tp): (usize, usize),
    ) -> Result<StageModel, TrainError> {
        let mut at = 0;
        let mut chunks = Vec::with_capacity(vstages_held.len());
        for &k in vstages_held {
            let layout = ParamLayout::new(cfg, &crate::mesh::shard_of(parts, k, tp_rank, tp))?;
            let n = layout.len();
            chunks.push((k, layout, at..at + n));
            at += n;
        }
        Ok(StageModel {
            chunks,
            vstages: parts.len(),
        })
    }

    /// The whole model as one chunk (no pipeline).
    pub fn whole(layout: ParamLayout) -> StageModel {
        let n = layout.len();
        StageModel {
            chunks: vec![(0, layout, 0..n)],
            vstages: 1,
        }
    }

    /// Elements of the flat buffers.
    pub fn len(&self) -> usize {
        self.chunks.last().map_or(0, |c| c.2.end)
    }

    /// True when the rank holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tensor-parallel rank and degree of the chunks.
    pub fn tp(&self) -> (usize, usize) {
        self.chunks
            .first()
            .map_or((0, 1), |(_, l, _)| (l.shard.tp_rank, l.shard.tp_size))
    }

    /// Windows of this rank's buffers that another rank holds too and counts instead (in the
    /// gradient norm, in checkpoints): the LM head's copy of the tied embedding on the last
    /// stage, and on tensor-parallel ranks other than 0 every replicated tensor (norms, the
    /// row-parallel biases, what the model does not split) — rank 0's copy is the one counted.
    pub fn copies(&self) -> Vec<Range<usize>> {
        let (tp_rank, _) = self.tp();
        let mut out: Vec<Range<usize>> = Vec::new();
        for (_, l, w) in &self.chunks {
            for t in &l.tensors {
                let copy = t.name == "lm_head.weight"
                    || (tp_rank > 0 && t.split == model::TpSplit::Replicated);
                if copy {
                    let r = w.start + t.offset..w.start + t.range().end;
                    match out.last_mut() {
                        Some(p) if p.end == r.start => p.end = r.end,
                        _ => out.push(r),
                    }
                }
            }
        }
        out
    }

    /// The window of the tied embedding's gradient this rank sums with the other end of the
    /// pipeline: `wte` on the first virtual stage, the LM head copy on the last (when they are
    /// different stages). `(window, is the copy)`.
    pub fn tied_range(&self) -> Option<(Range<usize>, bool)> {
        if self.vstages == 1 {
            return None;
        }
        self.chunks.iter().find_map(|(k, l, w)| {
            if *k == 0 {
                let e = l
                    .embed
                    .as_ref()
                    .expect("the first stage holds the embedding");
                Some((w.start + e.wte.start..w.start + e.wte.end, false))
            } else if *k + 1 == self.vstages {
                let h = l.head.as_ref().expect("the last stage holds the head");
                Some((w.start + h.wte.start..w.start + h.wte.end, true))
            } else {
                None
            }
        })
    }
}

/// Activation buffers of one rank: per chunk as many saved sets as the schedule keeps in flight
/// on it, and one scratch they share, in storage type `E` under the recomputation policy the
/// run uses.
pub struct StageActs<E: Storage = f32> {
    saved: Vec<Vec<ActSaved<E>>>,
    scratch: ActScratch<E>,
    /// Per chunk, which saved set micro-batch `mb` uses (valid from its forward to its backward).
    slot_of: Vec<Vec<usize>>,
    free: Vec<Vec<usize>>,
    /// Receive buffers (bt·c) for an activation and a gradient.
    act_in: Vec<f32>,
    grad_in: Vec<f32>,
    /// 16-bit storage between stages: the outgoing activation widened to `f32` (bt·c).
    act_out: Vec<f32>,
    /// Weights packed once per step for the matmuls (`super::panels`; empty unless used).
    pub(super) panels: kernels::panels::WeightPanels,
}

/// The saved activation sets each chunk of `stage` keeps for the step list `ops` (its most
/// micro-batches in flight, at least one): what [`StageActs::with_sp`] allocates.
pub fn activation_sets(stage: &StageModel, ops: &[Op]) -> Vec<usize> {
    (0..stage.chunks.len())
        .map(|c| in_flight(ops, c as u32).max(1))
        .collect()
}

/// The most micro-batches whose forward on `chunk` has run and whose backward has not, along
/// the list `ops`: the saved activation sets the chunk needs.
pub fn in_flight(ops: &[Op], chunk: u32) -> usize {
    let (mut alive, mut peak) = (0usize, 0usize);
    for op in ops {
        match *op {
            Op::Forward { chunk: c, .. } if c == chunk => {
                alive += 1;
                peak = peak.max(alive);
            }
            Op::Backward { chunk: c, .. } if c == chunk => alive -= 1,
            _ => {}
        }
    }
    peak
}

impl StageActs {
    /// fp32 buffers (no recomputation) for micro-batches of (b, t) running the list `ops` over
    /// `stage`'s chunks.
    pub fn new(stage: &StageModel, ops: &[Op], b: usize, t: usize) -> StageActs {
        StageActs::with_sp(stage, ops, b, t, Recompute::None, false).expect("no sequence split")
    }

    /// [`StageActs::new`] with sequence parallelism on or off (Korthikanti et al. 2022): with
    /// it the residual stream, the norms and the hidden states between stages hold this
    /// tensor-parallel rank's b·t/tp rows. An error when tp does not divide b·t.
    pub fn new_sp(
        stage: &StageModel,
        ops: &[Op],
        b: usize,
        t: usize,
        sequence_parallel: bool,
    ) -> Result<StageActs, TrainError> {
        StageActs::with_sp(stage, ops, b, t, Recompute::None, sequence_parallel)
    }
}

impl<E: Storage> StageActs<E> {
    /// The first chunk's first saved set and the scratch (a whole model with one micro-batch
    /// in flight: how ZeRO-3 runs its micro-batches, `crate::dp`).
    pub(crate) fn first_set(&mut self) -> (&mut ActSaved<E>, &mut ActScratch<E>) {
        (&mut self.saved[0][0], &mut self.scratch)
    }

    /// Buffers in storage type `E` under `recompute` (and sequence parallelism on or off, as
    /// [`StageActs::new_sp`]) for micro-batches of (b, t) running the list `ops` over
    /// `stage`'s chunks.
    pub fn with_sp(
        stage: &StageModel,
        ops: &[Op],
        b: usize,
        t: usize,
        recompute: Recompute,
        sequence_parallel: bool,
    ) -> Result<StageActs<E>, TrainError> {
        let m = ops.len() / (2 * stage.chunks.len()).max(1);
        let mut saved: Vec<Vec<ActSaved<E>>> = Vec::with_capacity(stage.chunks.len());
        for ((_, l, _), k) in stage.chunks.iter().zip(activation_sets(stage, ops)) {
            let sets = (0..k)
                .map(|_| ActSaved::with_sp(l, b, t, recompute, sequence_parallel))
                .collect::<Result<Vec<_>, _>>()?;
            saved.push(sets);
        }
        let first = &stage.chunks[0].1;
        let c = first.cfg.channels;
        let rows = if sequence_parallel {
            b * t / first.shard.tp_size
        } else {
            b * t
        };
        let recv = if stage.vstages > 1 { rows * c } else { 0 };
        // 16-bit storage: the outgoing activation is widened to f32 here before it is sent.
        let widen = if E::f32s(&[]).is_none() { recv } else { 0 };
        Ok(StageActs {
            free: saved.iter().map(|s| (0..s.len()).rev().collect()).collect(),
            slot_of: vec![vec![usize::MAX; m.max(1)]; saved.len()],
            saved,
            scratch: ActScratch::with_sp(first, b, t, recompute, sequence_parallel)?,
            act_in: vec![0.0; recv],
            grad_in: vec![0.0; recv],
            act_out: vec![0.0; widen],
            panels: Default::default(),
        })
    }

    /// Elements held, of either type (saved sets, scratch, buffers between stages).
    pub fn len(&self) -> usize {
        self.saved.iter().flatten().map(|s| s.len()).sum::<usize>()
            + self.scratch.len()
            + self.act_in.len()
            + self.grad_in.len()
            + self.act_out.len()
    }

    /// Bytes held (what `plan::cpu_runtime::trainer_memory` predicts as activations).
    pub fn bytes(&self) -> usize {
        self.saved
            .iter()
            .flatten()
            .map(|s| s.bytes())
            .sum::<usize>()
            + self.scratch.bytes()
            + 4 * (self.act_in.len() + self.grad_in.len() + self.act_out.len())
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Saved sets per chunk.
    pub fn sets(&self) -> Vec<usize> {
        self.saved.iter().map(|s| s.len()).collect()
    }
}

/// One step's micro-batches: tokens and targets of micro-batch `mb` are
/// `xs[mb·bt..(mb+1)·bt]`, `ys[…]`.
pub struct MicroBatches<'a> {
    /// Token ids, m × (b, t).
    pub xs: &'a [u32],
    /// Targets, m × (b, t).
    pub ys: &'a [u32],
    /// Tokens per micro-batch (b·t).
    pub bt: usize,
    /// Gradient of the step's objective w.r.t. each token's loss (times the loss scale
    /// under fp16).
    pub d_loss: f32,
    /// What 16-bit gradients are multiplied by as they are added into the `f32` ones
    /// (`1/loss_scale` under fp16; 1 otherwise).
    pub unscale: f32,
}

/// Runs one optimizer step's list `ops` on this rank: forwards and backwards of every
/// micro-batch on every chunk, gradients accumulated (`+=`) into `grads` (`f32`; in 16-bit
/// storage each backward first writes `staging`, see `crate::precision`), with the exchanges
/// between stages (`pipe`) and, on each micro-step that communicates, the data-parallel
/// gradient buckets reduced as backward finishes them (`dp`; one chunk only). Returns
/// the loss of each micro-batch on the rank that holds the loss (empty elsewhere).
#[allow(clippy::too_many_arguments)]
pub fn run_ops<E: Storage>(
    ops: &[Op],
    stage: &StageModel,
    params: &[E],
    grads: &mut [f32],
    staging: &mut [E],
    acts: &mut StageActs<E>,
    data: &MicroBatches<'_>,
    par: Par,
    mut pipe: Option<&mut Pipeline>,
    mut dp: Option<&mut Dp>,
    mut trace: Option<&mut Trace>,
) -> Result<Vec<f32>, TrainError> {
    let m = data.xs.len() / data.bt;
    let pp = pipe.as_ref().map_or(1, |p| p.shape.pp);
    let me = pipe.as_ref().map_or(0, |p| p.me.pp);
    let bounds = boundaries(ops, me, pp, stage.vstages);
    let mut losses = vec![f32::NAN; m];
    let mut has_loss = false;
    // The last backward of each chunk communicates data-parallel gradients.
    let last_bwd: Vec<Option<usize>> = (0..stage.chunks.len())
        .map(|c| {
            ops.iter()
                .rposition(|op| matches!(*op, Op::Backward { chunk, .. } if chunk as usize == c))
        })
        .collect();
    assert!(
        dp.is_none() || stage.chunks.len() == 1,
        "the trainer reduces interleaved chunks' gradients after the list (Dp::reduce_all)"
    );
    // Each weight packed once for this step's matmuls (the parameters do not change here).
    let mut panels = std::mem::take(&mut acts.panels);
    let scope = E::f32s(params).map(|p| kernels::panels::PanelScope::enter(&mut panels, p));
    let StageActs {
        saved,
        scratch,
        slot_of,
        free,
        act_in,
        grad_in,
        act_out,
        panels: _,
    } = &mut *acts;
    for (i, op) in ops.iter().enumerate() {
        // The exchange before op i: what op i-1 produced, what op i needs.
        if let Some(p) = pipe.as_deref_mut() {
            let bd = bounds[i];
            let send = bd.send.map(|msg| {
                let c = chunk_of(&ops[i - 1]);
                let data: &[f32] = match msg.kind {
                    Kind::Act => widen(saved[c][slot_of[c][msg.mb as usize]].output(), act_out),
                    Kind::Grad => scratch.d_input(),
                };
                (msg, data)
            });
            let recv = bd.recv.map(|msg| {
                let buf: &mut [f32] = match msg.kind {
                    Kind::Act => act_in,
                    Kind::Grad => grad_in,
                };
                (msg, buf)
            });
            let what = trace.as_ref().map(|_| exchange_name(&send, &recv));
            let t0 = Instant::now();
            p.exchange(send, recv)?;
            if let (Some(tr), Some(name)) = (trace.as_deref_mut(), what) {
                if !name.is_empty() {
                    tr.span(crate::trace::MAIN, "p2p", &name, t0, Instant::now());
                }
            }
        }
        let t_op = Instant::now();
        match *op {
            Op::Forward { mb, chunk } => {
                let (c, mb) = (chunk as usize, mb as usize);
                let (vs, layout, w) = &stage.chunks[c];
                let slot = free[c]
                    .pop()
                    .expect("saved sets sized by the schedule's in-flight count");
                slot_of[c][mb] = slot;
                let (x, y) = (
                    &data.xs[mb * data.bt..(mb + 1) * data.bt],
                    &data.ys[mb * data.bt..(mb + 1) * data.bt],
                );
                let input = if *vs == 0 {
                    StageInput::Tokens(x)
                } else {
                    StageInput::Hidden(act_in)
                };
                let last = *vs + 1 == stage.vstages;
                let loss = with_tp(pipe.as_deref_mut(), |tp| {
                    forward_with(
                        layout,
                        &params[w.clone()],
                        &mut saved[c][slot],
                        scratch,
                        input,
                        last.then_some(y),
                        par,
                        tp,
                    )
                })?;
                if let Some(l) = loss {
                    losses[mb] = l;
                    has_loss = true;
                }
            }
            Op::Backward { mb, chunk } => {
                let (c, mbi) = (chunk as usize, mb as usize);
                let (vs, layout, w) = &stage.chunks[c];
                let slot = slot_of[c][mbi];
                let (x, y) = (
                    &data.xs[mbi * data.bt..(mbi + 1) * data.bt],
                    &data.ys[mbi * data.bt..(mbi + 1) * data.bt],
                );
                let input = if *vs == 0 {
                    StageInput::Tokens(x)
                } else {
                    StageInput::Hidden(&[])
                };
                let grad_input = if *vs + 1 == stage.vstages {
                    GradInput::Loss {
                        targets: y,
                        d_loss: data.d_loss,
                    }
                } else {
                    GradInput::Hidden(grad_in)
                };
                let p = &params[w.clone()];
                // ZeRO-2 keeps no full gradient buffer (`grads` is empty; backward writes into
                // the data-parallel bucket buffers).
                let g = if grads.is_empty() {
                    &mut grads[..]
                } else {
                    &mut grads[w.clone()]
                };
                let st = if staging.is_empty() {
                    &mut staging[..]
                } else {
                    &mut staging[w.clone()]
                };
                let set = &mut saved[c][slot];
                let u = data.unscale;
                let tp_pipe = pipe.as_deref_mut();
                match dp.as_deref_mut() {
                    Some(d) => d.backward(last_bwd[c] == Some(i), g, |sink| {
                        with_tp(tp_pipe, |tp| {
                            E::backward_to(
                                layout, p, sink, st, u, set, scratch, input, grad_input, par, tp,
                            )
                        })
                    })?,
                    None => with_tp(tp_pipe, |tp| {
                        E::backward_to(
                            layout, p, g, st, u, set, scratch, input, grad_input, par, tp,
                        )
                    })?,
                }
                free[c].push(slot);
            }
        }
        if let Some(p) = pipe.as_deref_mut() {
            let (c, fwd) = match *op {
                Op::Forward { chunk, .. } => (chunk, true),
                Op::Backward { chunk, .. } => (chunk, false),
            };
            p.note_compute(c as usize, fwd, t_op.elapsed().as_secs_f64());
        }
        if let Some(tr) = trace.as_deref_mut() {
            let (name, c) = match *op {
                Op::Forward { mb, chunk } => (format!("F{mb}"), chunk),
                Op::Backward { mb, chunk } => (format!("B{mb}"), chunk),
            };
            let name = if stage.chunks.len() > 1 {
                format!("{name}.{c}")
            } else {
                name
            };
            tr.span(crate::trace::MAIN, "compute", &name, t_op, Instant::now());
        }
    }
    if let Some(p) = pipe {
        let bd = bounds[ops.len()];
        if let Some(msg) = bd.send {
            p.exchange(Some((msg, scratch.d_input())), None)?;
        }
        p.flush()?;
    }
    // (After an error the panels stay out: the run ends with it.)
    drop(scope);
    acts.panels = panels;
    Ok(if has_loss { losses } else { Vec::new() })
}

/// "send a3 → 1 / recv g0 ← 1" for the trace (empty when nothing moves).
fn exchange_name(
    send: &Option<(super::Msg, &[f32])>,
    recv: &Option<(super::Msg, &mut [f32])>,
) -> String {
    let k = |m: &super::Msg| match m.kind {
        Kind::Act => 'a',
        Kind::Grad => 'g',
    };
    let s = send
        .as_ref()
        .map(|(m, _)| format!("send {}{} → {}", k(m), m.mb, m.dst));
    let r = recv
        .as_ref()
        .map(|(m, _)| format!("recv {}{} ← {}", k(m), m.mb, m.src));
    match (s, r) {
        (Some(a), Some(b)) => format!("{a} / {b}"),
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (None, None) => String::new(),
    }
}

/// The stage output as `f32` for sending: itself in fp32, else widened into `buf`.
fn widen<'a, E: Storage>(out: &'a [E], buf: &'a mut [f32]) -> &'a [f32] {
    match E::f32s(out) {
        Some(x) => x,
        None => {
            E::load(out, buf);
            buf
        }
    }
}

fn chunk_of(op: &Op) -> usize {
    match *op {
        Op::Forward { chunk, .. } | Op::Backward { chunk, .. } => chunk as usize,
    }
}

/// Forward-only pass of one batch through the pipeline (validation): each chunk in turn
/// receives its input from the previous virtual stage's rank, runs, and sends its output on.
/// Returns the mean loss on the rank that holds the loss, `None` elsewhere.
pub fn forward_only<E: Storage>(
    stage: &StageModel,
    params: &[E],
    acts: &mut StageActs<E>,
    (x, y): (&[u32], &[u32]),
    par: Par,
    mut pipe: Option<&mut Pipeline>,
) -> Result<Option<f32>, TrainError> {
    let me = pipe.as_ref().map_or(0, |p| p.me.pp);
    let pp = pipe.as_ref().map_or(1, |p| p.shape.pp);
    let mut out = None;
    for (c, (vs, layout, w)) in stage.chunks.iter().enumerate() {
        let vs = *vs;
        if vs > 0 {
            let msg = super::Msg {
                kind: Kind::Act,
                mb: 0,
                from_vs: vs as u32 - 1,
                src: (vs - 1) % pp,
                dst: me,
            };
            pipe.as_deref_mut()
                .expect("a later virtual stage has a pipeline")
                .recv_act(msg, &mut acts.act_in)?;
        }
        let input = if vs == 0 {
            StageInput::Tokens(x)
        } else {
            StageInput::Hidden(&acts.act_in)
        };
        let last = vs + 1 == stage.vstages;
        let set = &mut acts.saved[c][0];
        let loss = with_tp(pipe.as_deref_mut(), |tp| {
            forward_with(
                layout,
                &params[w.clone()],
                set,
                &mut acts.scratch,
                input,
                last.then_some(y),
                par,
                tp,
            )
        })?;
        if last {
            out = loss;
        } else {
            let msg = super::Msg {
                kind: Kind::Act,
                mb: 0,
                from_vs: vs as u32,
                src: me,
                dst: (vs + 1) % pp,
            };
            pipe.as_deref_mut()
                .expect("an earlier virtual stage has a pipeline")
                .send_act(msg, widen(set.output(), &mut acts.act_out))?;
        }
    }
    if let Some(p) = pipe {
        p.flush()?;
    }
    Ok(out)
}
