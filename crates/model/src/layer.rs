//! One transformer block, forward and backward, over any storage type (llm.c style, read top to
//! bottom). Legend as in `step.rs`.
//!
//! ```text
//! x ─► ln_1 ─f─► c_attn (cols) ─► attention ─► c_proj (rows, no bias) ─g─► + bias + x ─► res2
//! res2 ─► ln_2 ─f─► c_fc (cols) ─► GELU ─► c_proj (rows, no bias) ─g─► + bias + res2 ─► res3
//! ```
//!
//! Sequence parallelism (Korthikanti et al. 2022, §4.2.2): `x`, the norms and the residual
//! adds hold this rank's `btl` rows; `f` becomes an all-gather of the norm output (into the
//! scratch `tmp`) forward and a reduce-scatter of its gradient backward, `g` a reduce-scatter
//! forward and an all-gather of the residual gradient backward. Backward all-gathers the saved
//! local norm output again instead of keeping the full one (the memory saving). The norms' and
//! row-parallel biases' gradients are then partial per rank: they are summed into `rep` (6c),
//! all-reduced once per layer and added to the gradient buffer, so replicated gradients stay
//! identical on every rank.

use crate::activations::LayerActs;
use crate::step::tp_op;
use crate::{LayerParams, ModelError, TpReduce};
use kernels::attention::{attention_backward, attention_forward, attention_probs};
use kernels::elem::with_f32_mut;
use kernels::gelu::{gelu_backward, gelu_forward};
use kernels::layernorm::{layernorm_backward, layernorm_forward};
use kernels::matmul::{matmul_backward, matmul_forward};
use kernels::residual::{add_inplace, bias_residual_backward, bias_residual_forward};
use kernels::{Elem, Par};
use std::ops::Range;

/// The shapes of a pass (legend in `step.rs`).
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub b: usize,
    pub t: usize,
    pub c: usize,
    pub bt: usize,
    pub cl: usize,
    pub nhl: usize,
    /// Sequence parallelism on.
    pub sp: bool,
    /// Rows of the sequence-split tensors (`bt / tp` with sequence parallelism, else `bt`).
    pub btl: usize,
    /// This rank's first row of the flattened sequence (0 without sequence parallelism).
    pub row0: usize,
}

impl Dims {
    /// This rank's rows of a (bt, c) buffer, as element offsets: `shard_range(bt·c, tp, rank)`
    /// because tp divides bt.
    pub fn mine(&self) -> Range<usize> {
        self.row0 * self.c..(self.row0 + self.btl) * self.c
    }
}

/// Sequence-parallel `f` forward: puts the local rows `local` into their place in `buf` (bt, c)
/// and all-gathers the rest.
pub(crate) fn gather_rows<E: Elem>(
    buf: &mut [f32],
    local: &[E],
    d: Dims,
    tp: &mut dyn TpReduce,
    op: &'static str,
) -> Result<(), ModelError> {
    E::load(local, &mut buf[d.mine()]);
    tp_op(op, tp.all_gather(buf))
}

/// `g` forward on a row-parallel partial (bt, c): an all-reduce, or with sequence parallelism a
/// reduce-scatter. Returns this rank's rows of the sum.
pub(crate) fn reduce_partial<'a>(
    buf: &'a mut [f32],
    d: Dims,
    tp: &mut dyn TpReduce,
    ops: [&'static str; 2],
) -> Result<&'a [f32], ModelError> {
    if d.sp {
        tp_op(ops[1], tp.reduce_scatter_sum(buf))?;
        Ok(&buf[d.mine()])
    } else {
        tp_op(ops[0], tp.all_reduce_sum(buf))?;
        Ok(buf)
    }
}

/// `dst += src` for a gradient stored in any type.
pub(crate) fn add_f32_into<E: Elem>(dst: &mut [E], src: &[f32]) {
    with_f32_mut(dst, true, |d| {
        for (a, &x) in d.iter_mut().zip(src) {
            *a += x;
        }
    });
}

/// One layer's activations, each taken from the layer's own saved set or, when that does not
/// keep it (recomputation), from the shared workspace.
pub(crate) struct LayerRefs<'a, E> {
    pub ln1: &'a mut [E],
    pub ln1_mean: &'a mut [f32],
    pub ln1_rstd: &'a mut [f32],
    pub qkv: &'a mut [E],
    pub atty: &'a mut [E],
    pub att: &'a mut [E],
    pub res2: &'a mut [E],
    pub ln2: &'a mut [E],
    pub ln2_mean: &'a mut [f32],
    pub ln2_rstd: &'a mut [f32],
    pub fch: &'a mut [E],
    pub fch_gelu: &'a mut [E],
    pub res3: &'a mut [E],
}

fn pick<'a, T>(own: &'a mut [T], work: &'a mut [T]) -> &'a mut [T] {
    if own.is_empty() {
        work
    } else {
        own
    }
}

impl<'a, E> LayerRefs<'a, E> {
    pub fn new(own: &'a mut LayerActs<E>, work: &'a mut LayerActs<E>) -> LayerRefs<'a, E> {
        LayerRefs {
            ln1: pick(&mut own.ln1, &mut work.ln1),
            ln1_mean: pick(&mut own.ln1_mean, &mut work.ln1_mean),
            ln1_rstd: pick(&mut own.ln1_rstd, &mut work.ln1_rstd),
            qkv: pick(&mut own.qkv, &mut work.qkv),
            atty: pick(&mut own.atty, &mut work.atty),
            att: pick(&mut own.att, &mut work.att),
            res2: pick(&mut own.res2, &mut work.res2),
            ln2: pick(&mut own.ln2, &mut work.ln2),
            ln2_mean: pick(&mut own.ln2_mean, &mut work.ln2_mean),
            ln2_rstd: pick(&mut own.ln2_rstd, &mut work.ln2_rstd),
            fch: pick(&mut own.fch, &mut work.fch),
            fch_gelu: pick(&mut own.fch_gelu, &mut work.fch_gelu),
            res3: pick(&mut own.res3, &mut work.res3),
        }
    }
}

/// Forward of one block from `x` into `a`. With `to_res3 = false` it stops after the GELU (what
/// backward needs; full recomputation rebuilds exactly that), skipping the last projection.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_forward<E: Elem>(
    lp: &LayerParams,
    params: &[E],
    x: &[E],
    a: &mut LayerRefs<'_, E>,
    tmp: &mut [f32],
    d: Dims,
    to_res3: bool,
    par: Par,
    tp: &mut dyn TpReduce,
) -> Result<(), ModelError> {
    let Dims {
        b,
        t,
        c,
        bt,
        cl,
        nhl,
        sp,
        btl,
        ..
    } = d;
    let p = |r: &Range<usize>| &params[r.clone()];
    layernorm_forward(
        a.ln1,
        a.ln1_mean,
        a.ln1_rstd,
        x,
        p(&lp.ln1_w),
        p(&lp.ln1_b),
        btl,
        c,
        par,
    );
    let (qkv_w, qkv_b) = (p(&lp.qkv_w), Some(p(&lp.qkv_b)));
    if sp {
        gather_rows(tmp, a.ln1, d, tp, "all_gather (f, attention)")?;
        matmul_forward(a.qkv, &*tmp, qkv_w, qkv_b, bt, c, 3 * cl, par);
    } else {
        matmul_forward(a.qkv, a.ln1, qkv_w, qkv_b, bt, c, 3 * cl, par);
    }
    attention_forward(a.atty, a.att, a.qkv, b, t, cl, nhl, par);
    matmul_forward(tmp, a.atty, p(&lp.proj_w), None, bt, cl, c, par);
    let ops = [
        "all_reduce_sum (g, attention)",
        "reduce_scatter_sum (g, attention)",
    ];
    let part = reduce_partial(tmp, d, tp, ops)?;
    bias_residual_forward(a.res2, x, part, p(&lp.proj_b), btl, c, par);
    layernorm_forward(
        a.ln2,
        a.ln2_mean,
        a.ln2_rstd,
        a.res2,
        p(&lp.ln2_w),
        p(&lp.ln2_b),
        btl,
        c,
        par,
    );
    let (fc_w, fc_b) = (p(&lp.fc_w), Some(p(&lp.fc_b)));
    if sp {
        gather_rows(tmp, a.ln2, d, tp, "all_gather (f, mlp)")?;
        matmul_forward(a.fch, &*tmp, fc_w, fc_b, bt, c, 4 * cl, par);
    } else {
        matmul_forward(a.fch, a.ln2, fc_w, fc_b, bt, c, 4 * cl, par);
    }
    gelu_forward(a.fch_gelu, a.fch, par);
    if to_res3 {
        matmul_forward(tmp, a.fch_gelu, p(&lp.fcproj_w), None, bt, 4 * cl, c, par);
        let ops = ["all_reduce_sum (g, mlp)", "reduce_scatter_sum (g, mlp)"];
        let part = reduce_partial(tmp, d, tp, ops)?;
        bias_residual_forward(a.res3, a.res2, part, p(&lp.fcproj_b), btl, c, par);
    }
    Ok(())
}

/// The gradient scratch of one backward.
pub(crate) struct GradScratch<'a> {
    pub tmp: &'a mut [f32],
    pub d_res: &'a mut [f32],
    pub d_ln: &'a mut [f32],
    pub d_big1: &'a mut [f32],
    pub d_big2: &'a mut [f32],
    pub d_att: &'a mut [f32],
    /// (6c) with sequence parallelism: the partial replicated gradients of one layer.
    pub rep: &'a mut [f32],
}

/// Backward of one block. `s.d_res` holds ∂loss/∂(block output) on entry and ∂loss/∂(block
/// input) on exit (this rank's rows with sequence parallelism); `g` is the layer's gradient
/// region (offsets relative to `base`). With `recompute_att`, the softmax probabilities are
/// rebuilt from `qkv` first (selective recomputation: bitwise the forward's).
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_backward<E: Elem>(
    lp: &LayerParams,
    params: &[E],
    g: &mut [E],
    base: usize,
    x: &[E],
    a: &mut LayerRefs<'_, E>,
    s: &mut GradScratch<'_>,
    d: Dims,
    recompute_att: bool,
    par: Par,
    tp: &mut dyn TpReduce,
) -> Result<(), ModelError> {
    let at = |r: &Range<usize>| r.start - base..r.end - base;
    let [g_ln1_w, g_ln1_b, g_qkv_w, g_qkv_b, g_proj_w, g_proj_b, g_ln2_w, g_ln2_b, g_fc_w, g_fc_b, g_fcproj_w, g_fcproj_b] =
        disjoint_mut(
            g,
            [
                at(&lp.ln1_w),
                at(&lp.ln1_b),
                at(&lp.qkv_w),
                at(&lp.qkv_b),
                at(&lp.proj_w),
                at(&lp.proj_b),
                at(&lp.ln2_w),
                at(&lp.ln2_b),
                at(&lp.fc_w),
                at(&lp.fc_b),
                at(&lp.fcproj_w),
                at(&lp.fcproj_b),
            ],
        );
    let split = [g_qkv_w, g_qkv_b, g_proj_w, g_fc_w, g_fc_b, g_fcproj_w];
    if !d.sp {
        let rep = [g_ln1_w, g_ln1_b, g_proj_b, g_ln2_w, g_ln2_b, g_fcproj_b];
        return layer_backward_body(lp, params, split, rep, x, a, s, d, recompute_att, par, tp);
    }
    // Sequence parallelism: the replicated gradients are partial sums over this rank's rows.
    let c = d.c;
    let rep_buf = std::mem::take(&mut s.rep);
    rep_buf.fill(0.0);
    {
        let [r0, r1, r2, r3, r4, r5] =
            disjoint_mut(&mut *rep_buf, std::array::from_fn(|k| k * c..(k + 1) * c));
        layer_backward_body(
            lp,
            params,
            split,
            [r0, r1, r2, r3, r4, r5],
            x,
            a,
            s,
            d,
            recompute_att,
            par,
            tp,
        )?;
    }
    tp_op(
        "all_reduce_sum (sequence-parallel norm and bias gradients)",
        tp.all_reduce_sum(rep_buf),
    )?;
    for (dst, k) in [g_ln1_w, g_ln1_b, g_proj_b, g_ln2_w, g_ln2_b, g_fcproj_b]
        .into_iter()
        .zip(0..)
    {
        add_f32_into(dst, &rep_buf[k * c..(k + 1) * c]);
    }
    s.rep = rep_buf;
    Ok(())
}

/// The arithmetic of [`layer_backward`], with the replicated tensors' gradients `rep`
/// (`ln_1.w, ln_1.b, attn.c_proj.b, ln_2.w, ln_2.b, mlp.c_proj.b`) in type `G`: the gradient
/// buffer itself, or the `f32` partial sums under sequence parallelism.
#[allow(clippy::too_many_arguments)]
fn layer_backward_body<E: Elem, G: Elem>(
    lp: &LayerParams,
    params: &[E],
    split: [&mut [E]; 6],
    rep: [&mut [G]; 6],
    x: &[E],
    a: &mut LayerRefs<'_, E>,
    s: &mut GradScratch<'_>,
    d: Dims,
    recompute_att: bool,
    par: Par,
    tp: &mut dyn TpReduce,
) -> Result<(), ModelError> {
    let Dims {
        b,
        t,
        c,
        bt,
        cl,
        nhl,
        sp,
        btl,
        ..
    } = d;
    let p = |r: &Range<usize>| &params[r.clone()];
    let [g_qkv_w, g_qkv_b, g_proj_w, g_fc_w, g_fc_b, g_fcproj_w] = split;
    let [g_ln1_w, g_ln1_b, g_proj_b, g_ln2_w, g_ln2_b, g_fcproj_b] = rep;
    let d_fch_gelu = &mut s.d_big1[..bt * 4 * cl];
    let d_fch = &mut s.d_big2[..bt * 4 * cl];
    // MLP: res3 = res2 + c_proj(gelu(c_fc(ln_2(res2)))) + bias
    bias_residual_backward(g_fcproj_b, s.d_res, btl, c);
    let d_out: &[f32] = if sp {
        let op = "all_gather (g backward, mlp)";
        gather_rows(s.d_ln, s.d_res, d, tp, op)?;
        s.d_ln
    } else {
        s.d_res
    };
    matmul_backward(
        d_fch_gelu,
        g_fcproj_w,
        None,
        d_out,
        &*a.fch_gelu,
        p(&lp.fcproj_w),
        bt,
        4 * cl,
        c,
        par,
    );
    gelu_backward(d_fch, &*a.fch, d_fch_gelu, par);
    let (fc_w, fc_b) = (p(&lp.fc_w), Some(g_fc_b));
    if sp {
        gather_rows(
            s.tmp,
            a.ln2,
            d,
            tp,
            "all_gather (f, mlp, again in backward)",
        )?;
        matmul_backward(
            s.d_ln,
            g_fc_w,
            fc_b,
            &*d_fch,
            &*s.tmp,
            fc_w,
            bt,
            c,
            4 * cl,
            par,
        );
    } else {
        matmul_backward(
            s.d_ln,
            g_fc_w,
            fc_b,
            &*d_fch,
            &*a.ln2,
            fc_w,
            bt,
            c,
            4 * cl,
            par,
        );
    }
    let ops = [
        "all_reduce_sum (f backward, mlp)",
        "reduce_scatter_sum (f backward, mlp)",
    ];
    let d_ln = reduce_partial(s.d_ln, d, tp, ops)?;
    let d_inp = &mut s.tmp[..btl * c];
    layernorm_backward(
        d_inp,
        g_ln2_w,
        g_ln2_b,
        d_ln,
        &*a.res2,
        p(&lp.ln2_w),
        a.ln2_mean,
        a.ln2_rstd,
        btl,
        c,
    );
    add_inplace(s.d_res, d_inp, par);
    // Attention: res2 = x + c_proj(attention(c_attn(ln_1(x)))) + bias
    let d_atty = &mut s.d_big1[..bt * cl];
    let d_qkv = &mut s.d_big2[..bt * 3 * cl];
    bias_residual_backward(g_proj_b, s.d_res, btl, c);
    let d_out: &[f32] = if sp {
        let op = "all_gather (g backward, attention)";
        gather_rows(s.d_ln, s.d_res, d, tp, op)?;
        s.d_ln
    } else {
        s.d_res
    };
    matmul_backward(
        d_atty,
        g_proj_w,
        None,
        d_out,
        &*a.atty,
        p(&lp.proj_w),
        bt,
        cl,
        c,
        par,
    );
    if recompute_att {
        attention_probs(a.att, a.qkv, b, t, cl, nhl, par);
    }
    attention_backward(d_qkv, s.d_att, d_atty, &*a.qkv, &*a.att, b, t, cl, nhl, par);
    let (qkv_w, qkv_b) = (p(&lp.qkv_w), Some(g_qkv_b));
    if sp {
        let op = "all_gather (f, attention, again in backward)";
        gather_rows(s.tmp, a.ln1, d, tp, op)?;
        matmul_backward(
            s.d_ln,
            g_qkv_w,
            qkv_b,
            &*d_qkv,
            &*s.tmp,
            qkv_w,
            bt,
            c,
            3 * cl,
            par,
        );
    } else {
        matmul_backward(
            s.d_ln,
            g_qkv_w,
            qkv_b,
            &*d_qkv,
            &*a.ln1,
            qkv_w,
            bt,
            c,
            3 * cl,
            par,
        );
    }
    let ops = [
        "all_reduce_sum (f backward, attention)",
        "reduce_scatter_sum (f backward, attention)",
    ];
    let d_ln = reduce_partial(s.d_ln, d, tp, ops)?;
    let d_inp = &mut s.tmp[..btl * c];
    layernorm_backward(
        d_inp,
        g_ln1_w,
        g_ln1_b,
        d_ln,
        x,
        p(&lp.ln1_w),
        a.ln1_mean,
        a.ln1_rstd,
        btl,
        c,
    );
    add_inplace(s.d_res, d_inp, par);
    Ok(())
}

/// Disjoint mutable sub-slices of `buf` for ranges given in increasing, non-overlapping order.
#[track_caller]
pub(crate) fn disjoint_mut<T, const N: usize>(
    buf: &mut [T],
    ranges: [Range<usize>; N],
) -> [&mut [T]; N] {
    let mut rest = buf;
    let mut consumed = 0;
    let mut out: [&mut [T]; N] = std::array::from_fn(|_| Default::default());
    for (slot, r) in out.iter_mut().zip(ranges) {
        assert!(
            r.start >= consumed && r.start <= r.end,
            "disjoint_mut: ranges must increase"
        );
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.start - consumed);
        let (mid, tail) = tail.split_at_mut(r.len());
        *slot = mid;
        rest = tail;
        consumed = r.end;
    }
    out
}
