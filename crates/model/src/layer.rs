//! One transformer block, forward and backward, over any storage type (llm.c style, read top to
//! bottom). Legend as in `step.rs`.
//!
//! ```text
//! x ─► ln_1 ─f─► c_attn (cols) ─► attention ─► c_proj (rows, no bias) ─g─► + bias + x ─► res2
//! res2 ─► ln_2 ─f─► c_fc (cols) ─► GELU ─► c_proj (rows, no bias) ─g─► + bias + res2 ─► res3
//! ```

use crate::activations::LayerActs;
use crate::step::tp_op;
use crate::{LayerParams, ModelError, TpReduce};
use kernels::attention::{attention_backward, attention_forward, attention_probs};
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
    } = d;
    let p = |r: &Range<usize>| &params[r.clone()];
    layernorm_forward(
        a.ln1,
        a.ln1_mean,
        a.ln1_rstd,
        x,
        p(&lp.ln1_w),
        p(&lp.ln1_b),
        bt,
        c,
        par,
    );
    matmul_forward(
        a.qkv,
        a.ln1,
        p(&lp.qkv_w),
        Some(p(&lp.qkv_b)),
        bt,
        c,
        3 * cl,
        par,
    );
    attention_forward(a.atty, a.att, a.qkv, b, t, cl, nhl, par);
    matmul_forward(tmp, a.atty, p(&lp.proj_w), None, bt, cl, c, par);
    tp_op("all_reduce_sum (g, attention)", tp.all_reduce_sum(tmp))?;
    bias_residual_forward(a.res2, x, tmp, p(&lp.proj_b), bt, c, par);
    layernorm_forward(
        a.ln2,
        a.ln2_mean,
        a.ln2_rstd,
        a.res2,
        p(&lp.ln2_w),
        p(&lp.ln2_b),
        bt,
        c,
        par,
    );
    matmul_forward(
        a.fch,
        a.ln2,
        p(&lp.fc_w),
        Some(p(&lp.fc_b)),
        bt,
        c,
        4 * cl,
        par,
    );
    gelu_forward(a.fch_gelu, a.fch, par);
    if to_res3 {
        matmul_forward(tmp, a.fch_gelu, p(&lp.fcproj_w), None, bt, 4 * cl, c, par);
        tp_op("all_reduce_sum (g, mlp)", tp.all_reduce_sum(tmp))?;
        bias_residual_forward(a.res3, a.res2, tmp, p(&lp.fcproj_b), bt, c, par);
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
}

/// Backward of one block. `s.d_res` holds ∂loss/∂(block output) on entry and ∂loss/∂(block
/// input) on exit; `g` is the layer's gradient region (offsets relative to `base`). With
/// `recompute_att`, the softmax probabilities are rebuilt from `qkv` first (selective
/// recomputation: bitwise the forward's).
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
    let Dims {
        b,
        t,
        c,
        bt,
        cl,
        nhl,
    } = d;
    let p = |r: &Range<usize>| &params[r.clone()];
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
    let d_fch_gelu = &mut s.d_big1[..bt * 4 * cl];
    let d_fch = &mut s.d_big2[..bt * 4 * cl];
    // MLP: res3 = res2 + c_proj(gelu(c_fc(ln_2(res2)))) + bias
    bias_residual_backward(g_fcproj_b, s.d_res, bt, c);
    matmul_backward(
        d_fch_gelu,
        g_fcproj_w,
        None,
        &*s.d_res,
        &*a.fch_gelu,
        p(&lp.fcproj_w),
        bt,
        4 * cl,
        c,
        par,
    );
    gelu_backward(d_fch, &*a.fch, d_fch_gelu, par);
    matmul_backward(
        s.d_ln,
        g_fc_w,
        Some(g_fc_b),
        &*d_fch,
        &*a.ln2,
        p(&lp.fc_w),
        bt,
        c,
        4 * cl,
        par,
    );
    tp_op(
        "all_reduce_sum (f backward, mlp)",
        tp.all_reduce_sum(s.d_ln),
    )?;
    layernorm_backward(
        s.tmp,
        g_ln2_w,
        g_ln2_b,
        s.d_ln,
        &*a.res2,
        p(&lp.ln2_w),
        a.ln2_mean,
        a.ln2_rstd,
        bt,
        c,
    );
    add_inplace(s.d_res, s.tmp, par);
    // Attention: res2 = x + c_proj(attention(c_attn(ln_1(x)))) + bias
    let d_atty = &mut s.d_big1[..bt * cl];
    let d_qkv = &mut s.d_big2[..bt * 3 * cl];
    bias_residual_backward(g_proj_b, s.d_res, bt, c);
    matmul_backward(
        d_atty,
        g_proj_w,
        None,
        &*s.d_res,
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
    matmul_backward(
        s.d_ln,
        g_qkv_w,
        Some(g_qkv_b),
        &*d_qkv,
        &*a.ln1,
        p(&lp.qkv_w),
        bt,
        c,
        3 * cl,
        par,
    );
    tp_op(
        "all_reduce_sum (f backward, attention)",
        tp.all_reduce_sum(s.d_ln),
    )?;
    layernorm_backward(
        s.tmp,
        g_ln1_w,
        g_ln1_b,
        s.d_ln,
        x,
        p(&lp.ln1_w),
        a.ln1_mean,
        a.ln1_rstd,
        bt,
        c,
    );
    add_inplace(s.d_res, s.tmp, par);
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
