//! Forward and backward over a shard's layer range, read top to bottom (llm.c style).
//!
//! Legend: b = batch, t = sequence, bt = b*t, c = channels, cl = c / tp, nhl = heads / tp,
//! v = vocabulary, vp = padded vocabulary, vpl = vp / tp.
//!
//! One block (pre-norm GPT-2, `layer.rs`), with Megatron's tensor-parallel operators (Shoeybi
//! et al. 2019, §3): `f` = identity forward / all-reduce backward at the input of the
//! column-parallel matmuls, `g` = all-reduce forward / identity backward after the row-parallel
//! ones.
//!
//! Vocabulary parallelism (the same paper, §3, "input embedding" and "output embedding"): a
//! rank holds the rows [`ParamLayout::vocab_rows`] of the tied `wte`. The embedding looks up
//! only the tokens in that range (others contribute 0) and all-reduces (a `g`); backward
//! scatters into the rank's own rows. The head computes the logits of the rank's `vpl`
//! columns only; the cross-entropy reduces per token the max (all-reduce max) and then the
//! normaliser and the target's logit (one all-reduce sum of 2·bt floats), and the head's input
//! gradient is all-reduced (an `f`). No rank ever holds full logits.
//!
//! Every function is generic over the storage type `E` of the weights, saved activations and
//! gradients (`f32`, `Bf16`, `F16`); the kernels compute in `f32`. Hidden states crossing a stage
//! boundary and the gradient scratch are `f32`.

use crate::layer::{
    add_f32_into, gather_rows, layer_backward, layer_forward, reduce_partial, Dims, GradScratch,
    LayerRefs,
};
use crate::source::Fetches;
use crate::{ActSaved, ActScratch, Activations, ModelError, ParamLayout, ParamSource, Unit, Whole};
use kernels::crossentropy::{
    crossentropy_forward, crossentropy_shard_finish, crossentropy_shard_rescale,
    crossentropy_shard_stats, crossentropy_softmax_backward_shard,
};
use kernels::encoder::{
    embedding_rows_forward, encoder_backward_rows, encoder_forward, position_add_forward,
};
use kernels::layernorm::{layernorm_backward, layernorm_forward};
use kernels::matmul::{matmul_backward, matmul_forward};
use kernels::{Elem, Par};
use plan::recipe::Recompute;
use std::ops::Range;

/// What a collective failed with (the caller's communicator error, kept as the source).
pub type TpError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The tensor-parallel collectives over this rank's group. Supplied by the caller so this crate
/// never talks to the network. Every rank of the group makes the same calls in the same order
/// with the same lengths.
pub trait TpReduce {
    /// Ranks in the tensor-parallel group (1 = none).
    fn size(&self) -> usize;
    /// This rank's index in the group, `0..size()`.
    fn rank(&self) -> usize;
    /// `buf` ← elementwise sum over the group (every rank the same bits).
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), TpError>;
    /// `buf` ← elementwise max over the group.
    fn all_reduce_max(&mut self, buf: &mut [f32]) -> Result<(), TpError>;
    /// Sum over the group; afterwards `buf[shard_range(buf.len(), size, rank)]` holds this
    /// rank's shard of the sum (see [`shard_range`]); the rest is scratch.
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<(), TpError>;
    /// Each rank contributes `buf[shard_range(buf.len(), size, rank)]`; afterwards every rank
    /// holds all shards.
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), TpError>;
}

/// The shard of `len` elements that rank `r` of `n` owns in [`TpReduce::reduce_scatter_sum`] and
/// [`TpReduce::all_gather`]: contiguous, in rank order, the first `len % n` shards one longer
/// (the same formula as `comm::shard_range`).
pub fn shard_range(len: usize, n: usize, r: usize) -> Range<usize> {
    let (base, extra) = (len / n, len % n);
    let start = r * base + r.min(extra);
    start..start + base + usize::from(r < extra)
}

/// A single tensor-parallel rank: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoTp;

impl TpReduce for NoTp {
    fn size(&self) -> usize {
        1
    }
    fn rank(&self) -> usize {
        0
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), TpError> {
        Ok(())
    }
    fn all_reduce_max(&mut self, _buf: &mut [f32]) -> Result<(), TpError> {
        Ok(())
    }
    fn reduce_scatter_sum(&mut self, _buf: &mut [f32]) -> Result<(), TpError> {
        Ok(())
    }
    fn all_gather(&mut self, _buf: &mut [f32]) -> Result<(), TpError> {
        Ok(())
    }
}

/// Runs one collective, naming it in the error.
pub(crate) fn tp_op(op: &'static str, r: Result<(), TpError>) -> Result<(), ModelError> {
    r.map_err(|source| ModelError::TensorParallel { op, source })
}

/// Where [`backward_into`] accumulates parameter gradients, and who hears when a region of them
/// is final. Offsets are the [`ParamLayout`]'s. Backward asks for one layer's range, the
/// embedding's (`wte..wpe`), the head's norm (`ln_f.w..ln_f.b`) or the LM head at a time, and
/// after [`GradSink::ready`]`(p)` never touches offsets `≥ p` again in that call: a data-parallel
/// caller can reduce `[p, previous p)` while backward goes on (the points are
/// [`ParamLayout::ready_points`]).
pub trait GradSink<E = f32> {
    /// Storage for the gradient of the flat range `r`; backward adds (`+=`) into it.
    fn slice(&mut self, r: Range<usize>) -> &mut [E];
    /// The gradients at offsets `≥ from` are final for this backward call. Successive points
    /// never increase; one may repeat (a stage without layers reports its head start and 0).
    fn ready(&mut self, from: usize);
}

/// A flat gradient buffer laid out like the parameters.
impl<E: Elem> GradSink<E> for [E] {
    fn slice(&mut self, r: Range<usize>) -> &mut [E] {
        &mut self[r]
    }
    fn ready(&mut self, _from: usize) {}
}

/// What a stage starts from.
#[derive(Clone, Copy, Debug)]
pub enum StageInput<'a> {
    /// Token ids (b, t), for the first stage.
    Tokens(&'a [u32]),
    /// Hidden state (b, t, c) from the previous stage.
    Hidden(&'a [f32]),
}

/// Where a stage's backward starts.
#[derive(Clone, Copy, Debug)]
pub enum GradInput<'a> {
    /// Last stage: targets (b, t) and the gradient of the objective w.r.t. each token's loss
    /// (`1/(b·t)` for the mean over this micro-batch; divide further for accumulation).
    Loss { targets: &'a [u32], d_loss: f32 },
    /// Gradient (b, t, c) w.r.t. this stage's output, from the next stage.
    Hidden(&'a [f32]),
}

/// The shapes a pass works with (legend at the top of this file) and `[v, vpl]`, after checking
/// that `params` fits the layout and the buffers agree (a caller bug otherwise).
fn shapes<E: Elem>(
    layout: &ParamLayout,
    saved: &ActSaved<E>,
    scratch: &ActScratch<E>,
    pass: &str,
) -> (Dims, [usize; 2]) {
    assert_eq!(
        (saved.b, saved.t),
        (scratch.b, scratch.t),
        "{pass}: saved activations and scratch built for different (b, t)"
    );
    assert_eq!(
        saved.recompute, scratch.recompute,
        "{pass}: saved activations and scratch built for different recomputation"
    );
    assert_eq!(
        saved.sp, scratch.sp,
        "{pass}: saved activations and scratch built for different sequence parallelism"
    );
    let cfg = &layout.cfg;
    let (b, t, c, tpn) = (saved.b, saved.t, cfg.channels, layout.shard.tp_size);
    let btl = saved.input.len() / c;
    let d = Dims {
        b,
        t,
        c,
        bt: b * t,
        cl: c / tpn,
        nhl: cfg.n_head / tpn,
        sp: saved.sp,
        btl,
        row0: if saved.sp {
            layout.shard.tp_rank * btl
        } else {
            0
        },
    };
    (d, [cfg.vocab_size, cfg.padded_vocab() / tpn])
}

fn check_tokens<E: Elem>(
    what: &'static str,
    ids: &[u32],
    acts: &ActSaved<E>,
    vocab: usize,
) -> Result<(), ModelError> {
    let expected = acts.b * acts.t;
    if ids.len() != expected {
        return Err(ModelError::InputShape {
            what,
            got: ids.len(),
            expected,
            b: acts.b,
            t: acts.t,
        });
    }
    match ids.iter().position(|&x| x as usize >= vocab) {
        Some(index) => Err(ModelError::TokenOutOfRange {
            what,
            index,
            token: ids[index],
            vocab,
        }),
        None => Ok(()),
    }
}

/// A hidden state or its gradient at a stage boundary: this rank's rows (all of them without
/// sequence parallelism) × c.
fn check_hidden<E: Elem>(
    what: &'static str,
    x: &[f32],
    acts: &ActSaved<E>,
) -> Result<(), ModelError> {
    let expected = acts.input.len();
    if x.len() != expected {
        return Err(ModelError::InputShape {
            what,
            got: x.len(),
            expected,
            b: acts.b,
            t: acts.t,
        });
    }
    Ok(())
}

/// Forward over the shard. Fills `acts`; on the last stage computes the loss for `targets` and
/// returns the mean over the b·t tokens. Panics on a caller bug (wrong buffer sizes, a hidden
/// input on the first stage, missing targets on the last); returns an error for bad data.
pub fn forward(
    layout: &ParamLayout,
    params: &[f32],
    acts: &mut Activations,
    input: StageInput<'_>,
    targets: Option<&[u32]>,
    par: Par,
    tp: &mut dyn TpReduce,
) -> Result<Option<f32>, ModelError> {
    let Activations { saved, scratch } = acts;
    forward_with(layout, params, saved, scratch, input, targets, par, tp)
}

/// [`forward`] with one micro-batch's saved activations and a scratch that other micro-batches
/// share (a pipeline stage keeps one [`ActSaved`] per micro-batch in flight). Fills `saved`;
/// uses `scratch` only while it runs. Both must be built for the same (b, t), storage type and
/// recomputation policy; `params` are the weights in that storage type (the working copy under
/// mixed precision). A hidden input is rounded to the storage type.
#[allow(clippy::too_many_arguments)]
pub fn forward_with<E: Elem>(
    layout: &ParamLayout,
    params: &[E],
    saved: &mut ActSaved<E>,
    scratch: &mut ActScratch<E>,
    input: StageInput<'_>,
    targets: Option<&[u32]>,
    par: Par,
    tp: &mut dyn TpReduce,
) -> Result<Option<f32>, ModelError> {
    assert_eq!(
        params.len(),
        layout.len(),
        "forward: params length vs layout"
    );
    let mut src = Whole(params);
    forward_sourced(layout, &mut src, saved, scratch, input, targets, par, tp)
}

/// [`forward_with`] taking the weights from `src`, one [`Unit`] at a time in
/// [`ParamLayout::forward_fetches`] order, each released after use.
#[allow(clippy::too_many_arguments)]
pub fn forward_sourced<E: Elem>(
    layout: &ParamLayout,
    src: &mut dyn ParamSource<E>,
    saved: &mut ActSaved<E>,
    scratch: &mut ActScratch<E>,
    input: StageInput<'_>,
    targets: Option<&[u32]>,
    par: Par,
    tp: &mut dyn TpReduce,
) -> Result<Option<f32>, ModelError> {
    let (d, [v, vpl]) = shapes(layout, saved, scratch, "forward");
    let Dims { b, t, c, bt, .. } = d;
    let vocab_parallel = layout.shard.tp_size > 1;
    let mut fetches = Fetches::new(layout.forward_fetches());
    let acts = saved;
    // Stage input.
    match (input, &layout.embed) {
        (StageInput::Tokens(tokens), Some(e)) => {
            check_tokens("tokens", tokens, acts, v)?;
            fetches.fetch(src, Unit::Embed)?;
            let p = |r: &Range<usize>| src.get(r.clone());
            if vocab_parallel {
                let sum = &mut scratch.tmp;
                let first = layout.vocab_rows().start;
                embedding_rows_forward(sum, tokens, p(&e.wte), first, c);
                let ops = [
                    "all_reduce_sum (g, vocabulary-parallel embedding)",
                    "reduce_scatter_sum (g, vocabulary-parallel embedding)",
                ];
                let part = reduce_partial(sum, d, tp, ops)?;
                position_add_forward(&mut acts.input, part, p(&e.wpe), d.row0, t, c);
            } else {
                encoder_forward(&mut acts.input, tokens, p(&e.wte), p(&e.wpe), b, t, c);
            }
            src.release(Unit::Embed);
        }
        (StageInput::Hidden(x), None) => {
            check_hidden("hidden input", x, acts)?;
            E::store(x, &mut acts.input);
        }
        (StageInput::Tokens(_), None) => {
            panic!("forward: tokens given to a stage without the embedding")
        }
        (StageInput::Hidden(_), Some(_)) => {
            panic!("forward: hidden input given to the first stage")
        }
    }
    if let Some(tg) = targets {
        check_tokens("targets", tg, acts, v)?;
    }
    // Blocks.
    for (i, lp) in layout.layers.iter().enumerate() {
        let (done, rest) = acts.layers.split_at_mut(i);
        let x: &[E] = done.last().map_or(&acts.input, |prev| &prev.res3);
        let mut a = LayerRefs::new(&mut rest[0], &mut scratch.work);
        fetches.fetch(src, Unit::Layer(i))?;
        let lr = layout.layer_range(i);
        let (lp, w) = (lp.rebased(lr.start), src.get(lr));
        layer_forward(&lp, w, x, &mut a, &mut scratch.tmp, d, true, par, tp)?;
        src.release(Unit::Layer(i));
    }
    // Head and loss.
    let Some(hp) = &layout.head else {
        assert!(
            targets.is_none(),
            "forward: targets given to a stage without the head"
        );
        return Ok(None);
    };
    let targets = targets.expect("forward: the last stage needs targets");
    fetch_head(layout, &mut fetches, src)?;
    let p = |r: &Range<usize>| src.get(r.clone());
    let x: &[E] = acts.layers.last().map_or(&acts.input, |l| &l.res3);
    let h = acts.head.as_mut().expect("activations built for a head");
    layernorm_forward(
        &mut h.lnf,
        &mut h.lnf_mean,
        &mut h.lnf_rstd,
        x,
        p(&hp.lnf_w),
        p(&hp.lnf_b),
        d.btl,
        c,
        par,
    );
    if d.sp {
        let op = "all_gather (f, LM head)";
        gather_rows(&mut scratch.tmp, &h.lnf, d, tp, op)?;
        matmul_forward(
            &mut h.logits,
            &scratch.tmp,
            p(&hp.wte),
            None,
            bt,
            c,
            vpl,
            par,
        );
    } else {
        matmul_forward(&mut h.logits, &h.lnf, p(&hp.wte), None, bt, c, vpl, par);
    }
    if vocab_parallel {
        // d_big1 (≥ 4·bt floats) is backward scratch, free during forward.
        let (gmax, rest) = scratch.d_big1.split_at_mut(bt);
        let sums_picked = &mut rest[..2 * bt];
        let (sums, picked) = sums_picked.split_at_mut(bt);
        let (first, vl) = (layout.vocab_rows().start, layout.vocab_rows_real());
        // lse holds this rank's max until the finish
        let local_max = &mut h.lse;
        crossentropy_shard_stats(
            local_max, sums, picked, &h.logits, targets, bt, first, vl, vpl, par,
        );
        gmax.copy_from_slice(local_max);
        tp_op(
            "all_reduce_max (vocabulary-parallel loss)",
            tp.all_reduce_max(gmax),
        )?;
        crossentropy_shard_rescale(sums, local_max, gmax);
        tp_op(
            "all_reduce_sum (vocabulary-parallel loss)",
            tp.all_reduce_sum(sums_picked),
        )?;
        let (sums, picked) = sums_picked.split_at(bt);
        crossentropy_shard_finish(&mut h.losses, &mut h.lse, gmax, sums, picked);
    } else {
        crossentropy_forward(
            &mut h.losses,
            &mut h.lse,
            &h.logits,
            targets,
            bt,
            v,
            vpl,
            par,
        );
    }
    release_head(layout, src);
    let mean = h.losses.iter().map(|&l| l as f64).sum::<f64>() / bt as f64;
    Ok(Some(mean as f32))
}

/// Backward over the shard, after [`forward`] on the same `acts`. **Accumulates** (`+=`) into
/// `grads` (laid out like `params`), so micro-batches accumulate without an extra buffer; zero
/// `grads` yourself between optimizer steps. Overwrites the activation gradients in `acts` (and
/// the logits). On a non-first stage, [`Activations::d_input`] then holds the gradient to send
/// back. `input` must be the forward's input (the first stage needs the tokens again).
// Outputs first, then inputs, then execution settings: the llm.c shape, kept on purpose.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    layout: &ParamLayout,
    params: &[f32],
    grads: &mut [f32],
    acts: &mut Activations,
    input: StageInput<'_>,
    grad_in: GradInput<'_>,
    par: Par,
    tp: &mut dyn TpReduce,
) -> Result<(), ModelError> {
    assert_eq!(
        grads.len(),
        layout.len(),
        "backward: grads length vs layout"
    );
    backward_into(layout, params, grads, acts, input, grad_in, par, tp)
}

/// [`backward`] into any [`GradSink`]: the same arithmetic in the same order, with the sink told
/// after the head, each layer and the embedding which gradients are final (for overlapping
/// their reduction with the rest of backward).
#[allow(clippy::too_many_arguments)]
pub fn backward_into<G: GradSink + ?Sized>(
    layout: &ParamLayout,
    params: &[f32],
    grads: &mut G,
    acts: &mut Activations,
    input: StageInput<'_>,
    grad_in: GradInput<'_>,
    par: Par,
    tp: &mut dyn TpReduce,
) -> Result<(), ModelError> {
    let Activations { saved, scratch } = acts;
    backward_with(
        layout, params, grads, saved, scratch, input, grad_in, par, tp,
    )
}

/// [`backward_into`] for one micro-batch's saved activations (after [`forward_with`] on the same
/// `saved`) and a shared scratch, in storage type `E` (gradients accumulate in `E`). Overwrites
/// the logits in `saved` and all of `scratch`; on a non-first stage, [`ActScratch::d_input`]
/// then holds the gradient to send back. Under recomputation it first rebuilds what the layer
/// did not keep (bitwise what forward computed).
#[allow(clippy::too_many_arguments)]
pub fn backward_with<E: Elem, G: GradSink<E> + ?Sized>(
    layout: &ParamLayout,
    params: &[E],
    grads: &mut G,
    saved: &mut ActSaved<E>,
    scratch: &mut ActScratch<E>,
    input: StageInput<'_>,
    grad_in: GradInput<'_>,
    par: Par,
    tp: &mut dyn TpReduce,
) -> Result<(), ModelError> {
    assert_eq!(
        params.len(),
        layout.len(),
        "backward: params length vs layout"
    );
    let mut src = Whole(params);
    backward_sourced(
        layout, &mut src, grads, saved, scratch, input, grad_in, par, tp,
    )
}

/// [`backward_with`] taking the weights from `src`, one [`Unit`] at a time in
/// [`ParamLayout::backward_fetches`] order, each released after use.
#[allow(clippy::too_many_arguments)]
pub fn backward_sourced<E: Elem, G: GradSink<E> + ?Sized>(
    layout: &ParamLayout,
    src: &mut dyn ParamSource<E>,
    grads: &mut G,
    saved: &mut ActSaved<E>,
    scratch: &mut ActScratch<E>,
    input: StageInput<'_>,
    grad_in: GradInput<'_>,
    par: Par,
    tp: &mut dyn TpReduce,
) -> Result<(), ModelError> {
    let (d, [v, vpl]) = shapes(layout, saved, scratch, "backward");
    let Dims { b, t, c, bt, .. } = d;
    let (first, vl) = (layout.vocab_rows().start, layout.vocab_rows_real());
    let mut fetches = Fetches::new(layout.backward_fetches());
    let nl = layout.layers.len();
    let acts = saved;
    let recompute = acts.recompute;
    let ActScratch {
        tmp,
        d_res,
        d_ln,
        d_big1,
        d_big2,
        d_att,
        rep_grads,
        work,
        ..
    } = scratch;
    // Head: d_res ← ∂loss/∂(last block output).
    match (grad_in, &layout.head) {
        (GradInput::Loss { targets, d_loss }, Some(hp)) => {
            check_tokens("targets", targets, acts, v)?;
            fetch_head(layout, &mut fetches, src)?;
            let p = |r: &Range<usize>| src.get(r.clone());
            let x: &[E] = acts.layers.last().map_or(&acts.input, |l| &l.res3);
            let h = acts.head.as_mut().expect("activations built for a head");
            crossentropy_softmax_backward_shard(
                &mut h.logits,
                &h.lse,
                targets,
                d_loss,
                bt,
                first,
                vl,
                vpl,
                par,
            );
            let g_wte = grads.slice(hp.wte.clone());
            let (wte, logits) = (p(&hp.wte), &h.logits);
            if d.sp {
                let op = "all_gather (f, LM head, again in backward)";
                gather_rows(tmp, &h.lnf, d, tp, op)?;
                matmul_backward(d_ln, g_wte, None, logits, &tmp[..], wte, bt, c, vpl, par);
            } else {
                matmul_backward(d_ln, g_wte, None, logits, &h.lnf, wte, bt, c, vpl, par);
            }
            let ops = [
                "all_reduce_sum (f backward, LM head)",
                "reduce_scatter_sum (f backward, LM head)",
            ];
            let d_ln = reduce_partial(d_ln, d, tp, ops)?;
            let (w, mean, rstd) = (p(&hp.lnf_w), &h.lnf_mean, &h.lnf_rstd);
            if d.sp {
                // partial over this rank's rows: all-reduce, then add
                let (rw, rb) = rep_grads[..2 * c].split_at_mut(c);
                rw.fill(0.0);
                rb.fill(0.0);
                layernorm_backward(d_res, rw, rb, d_ln, x, w, mean, rstd, d.btl, c);
                let op = "all_reduce_sum (sequence-parallel ln_f gradients)";
                tp_op(op, tp.all_reduce_sum(&mut rep_grads[..2 * c]))?;
                let (d_w, d_b) = grads
                    .slice(hp.lnf_w.start..hp.lnf_b.end)
                    .split_at_mut(hp.lnf_w.len());
                add_f32_into(d_w, &rep_grads[..c]);
                add_f32_into(d_b, &rep_grads[c..2 * c]);
            } else {
                let (d_w, d_b) = grads
                    .slice(hp.lnf_w.start..hp.lnf_b.end)
                    .split_at_mut(hp.lnf_w.len());
                layernorm_backward(d_res, d_w, d_b, d_ln, x, w, mean, rstd, bt, c);
            }
            release_head(layout, src);
        }
        (GradInput::Hidden(d_out), None) => {
            check_hidden("output gradient", d_out, acts)?;
            d_res.copy_from_slice(d_out);
        }
        (GradInput::Loss { .. }, None) => {
            panic!("backward: loss gradient given to a stage without the head")
        }
        (GradInput::Hidden(_), Some(_)) => {
            panic!("backward: hidden gradient given to the last stage")
        }
    }
    grads.ready(layout.head_start());
    // Blocks, last to first. d_res holds ∂loss/∂(block output) on entry, ∂loss/∂(block input) on exit.
    let mut s = GradScratch {
        tmp,
        d_res,
        d_ln,
        d_big1,
        d_big2,
        d_att,
        rep: rep_grads,
    };
    for i in (0..nl).rev() {
        let lp = &layout.layers[i];
        let (done, rest) = acts.layers.split_at_mut(i);
        let x: &[E] = done.last().map_or(&acts.input, |prev| &prev.res3);
        let mut a = LayerRefs::new(&mut rest[0], work);
        fetches.fetch(src, Unit::Layer(i))?;
        let lr = layout.layer_range(i);
        let base = lr.start;
        let (lp, params) = (lp.rebased(base), src.get(lr.clone()));
        if recompute == Recompute::Full {
            layer_forward(&lp, params, x, &mut a, s.tmp, d, false, par, tp)?;
        }
        let selective = recompute == Recompute::Selective;
        layer_backward(
            &lp,
            params,
            grads.slice(lr),
            0,
            x,
            &mut a,
            &mut s,
            d,
            selective,
            par,
            tp,
        )?;
        src.release(Unit::Layer(i));
        grads.ready(base);
    }
    // Embedding.
    match (input, &layout.embed) {
        (StageInput::Tokens(tokens), Some(e)) => {
            check_tokens("tokens", tokens, acts, v)?;
            let (d_wte, d_wpe) = grads
                .slice(e.wte.start..e.wpe.end)
                .split_at_mut(e.wte.len());
            let d_emb: &[f32] = if d.sp {
                // every rank scatters every token's gradient into its rows (and wpe)
                let op = "all_gather (g backward, vocabulary-parallel embedding)";
                gather_rows(s.d_ln, &*s.d_res, d, tp, op)?;
                s.d_ln
            } else {
                s.d_res
            };
            encoder_backward_rows(d_wte, first, d_wpe, d_emb, tokens, b, t, c);
        }
        (StageInput::Hidden(_), None) => {} // d_res is the gradient to send back
        _ => panic!("backward: stage input kind does not match the layout"),
    }
    grads.ready(0);
    Ok(())
}

/// Fetches what the head reads: `ln_f` (and a last stage's own LM head), then — tied to it —
/// the embedding's `wte`.
fn fetch_head<E: Elem>(
    layout: &ParamLayout,
    fetches: &mut Fetches,
    src: &mut dyn ParamSource<E>,
) -> Result<(), ModelError> {
    fetches.fetch(src, Unit::Head)?;
    if layout.embed.is_some() {
        fetches.fetch(src, Unit::Embed)?;
    }
    Ok(())
}

fn release_head<E: Elem>(layout: &ParamLayout, src: &mut dyn ParamSource<E>) {
    src.release(Unit::Head);
    if layout.embed.is_some() {
        src.release(Unit::Embed);
    }
}
