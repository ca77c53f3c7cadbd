//! Causal multi-head self-attention core (Vaswani et al. 2017), GPT-2 style: the projections
//! live in `matmul`; this kernel goes from `qkv` to the per-head outputs.
//!
//! Shapes: `qkv` (b, t, 3·cl) laid out `[q | k | v]` per token, head `h` at columns
//! `h·hs..(h+1)·hs` of each part (PyTorch's `split` + `view(b, t, nh, hs)`); `out` (b, t, cl);
//! `att` (b, nh, t, t) softmax probabilities (zero above the diagonal); `cl = nh·hs` is the
//! *local* channel count (all heads, or one tensor-parallel rank's heads).
//!
//! Each (batch, head) pair uses two (forward) or four (backward) strided GEMMs; the scores are computed for the
//! full t×t square and masked (2× the causal FLOPs in the score/value products, which are a
//! small share of the model at our sequence lengths). Threads split the batch.

use crate::fastmath::{self, exp, vectorized};
use crate::matmul::{gemm, View};
use crate::{check_len, par_rows2, Par};

/// Forward. Overwrites `out` and `att` (saved for backward; `att` is what PyTorch's softmax
/// returns, masked entries exactly 0).
#[track_caller]
pub fn attention_forward(
    out: &mut [f32],
    att: &mut [f32],
    qkv: &[f32],
    b: usize,
    t: usize,
    cl: usize,
    nh: usize,
    par: Par,
) {
    assert!(
        nh >= 1 && cl % nh == 0,
        "attention_forward: cl ({cl}) not divisible by nh ({nh})"
    );
    check_len("attention_forward out", out.len(), b * t * cl);
    check_len("attention_forward att", att.len(), b * nh * t * t);
    check_len("attention_forward qkv", qkv.len(), b * t * 3 * cl);
    let hs = cl / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let qkv_v = View::rm(t, hs, 3 * cl);
    par_rows2(par, b, 1, out, t * cl, att, nh * t * t, |rows, out, att| {
        for (local, bi) in rows.enumerate() {
            let x = &qkv[bi * t * 3 * cl..(bi + 1) * t * 3 * cl];
            let out_b = &mut out[local * t * cl..(local + 1) * t * cl];
            for h in 0..nh {
                let a = &mut att[(local * nh + h) * t * t..(local * nh + h + 1) * t * t];
                // scores = q · kᵀ / √hs
                gemm(
                    a,
                    View::rm(t, t, t),
                    &x[h * hs..],
                    qkv_v,
                    &x[cl + h * hs..],
                    qkv_v.t(),
                    scale,
                    0.0,
                );
                for i in 0..t {
                    let row = &mut a[i * t..(i + 1) * t];
                    let max = fastmath::max(&row[..=i]);
                    vectorized(|| {
                        for s in row[..=i].iter_mut() {
                            *s = exp(*s - max);
                        }
                    });
                    let sum: f32 = row[..=i].iter().sum();
                    let inv = 1.0 / sum;
                    for s in row[..=i].iter_mut() {
                        *s *= inv;
                    }
                    row[i + 1..].fill(0.0);
                }
                // out_h = att · v
                gemm(
                    &mut out_b[h * hs..],
                    View::rm(t, hs, cl),
                    a,
                    View::rm(t, t, t),
                    &x[2 * cl + h * hs..],
                    qkv_v,
                    1.0,
                    0.0,
                );
            }
        }
    });
}

/// Backward. Overwrites `d_qkv`; `d_att` (b, t, t) is scratch (one head at a time per batch
/// row, so it is t×t per batch element, not per head).
#[track_caller]
pub fn attention_backward(
    d_qkv: &mut [f32],
    d_att: &mut [f32],
    d_out: &[f32],
    qkv: &[f32],
    att: &[f32],
    b: usize,
    t: usize,
    cl: usize,
    nh: usize,
    par: Par,
) {
    assert!(
        nh >= 1 && cl % nh == 0,
        "attention_backward: cl ({cl}) not divisible by nh ({nh})"
    );
    check_len("attention_backward d_qkv", d_qkv.len(), b * t * 3 * cl);
    check_len("attention_backward d_att", d_att.len(), b * t * t);
    check_len("attention_backward d_out", d_out.len(), b * t * cl);
    check_len("attention_backward qkv", qkv.len(), b * t * 3 * cl);
    check_len("attention_backward att", att.len(), b * nh * t * t);
    let hs = cl / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let qkv_v = View::rm(t, hs, 3 * cl);
    let out_v = View::rm(t, hs, cl);
    let sq = View::rm(t, t, t);
    par_rows2(
        par,
        b,
        1,
        d_qkv,
        t * 3 * cl,
        d_att,
        t * t,
        |rows, d_qkv, d_a| {
            for (local, bi) in rows.enumerate() {
                let x = &qkv[bi * t * 3 * cl..(bi + 1) * t * 3 * cl];
                let dy = &d_out[bi * t * cl..(bi + 1) * t * cl];
                let dx = &mut d_qkv[local * t * 3 * cl..(local + 1) * t * 3 * cl];
                for h in 0..nh {
                    let a = &att[(bi * nh + h) * t * t..(bi * nh + h + 1) * t * t];
                    // d_att = d_out_h · vᵀ ; d_v = attᵀ · d_out_h
                    gemm(
                        d_a,
                        sq,
                        &dy[h * hs..],
                        out_v,
                        &x[2 * cl + h * hs..],
                        qkv_v.t(),
                        1.0,
                        0.0,
                    );
                    gemm(
                        &mut dx[2 * cl + h * hs..],
                        qkv_v,
                        a,
                        sq.t(),
                        &dy[h * hs..],
                        out_v,
                        1.0,
                        0.0,
                    );
                    // softmax backward: d_pre_ij = a_ij (d_att_ij − Σ_k a_ik d_att_ik), causal.
                    for i in 0..t {
                        let ar = &a[i * t..(i + 1) * t];
                        let dr = &mut d_a[i * t..(i + 1) * t];
                        let s: f32 = ar[..=i].iter().zip(&dr[..=i]).map(|(&p, &g)| p * g).sum();
                        for (g, &p) in dr[..=i].iter_mut().zip(&ar[..=i]) {
                            *g = p * (*g - s);
                        }
                        dr[i + 1..].fill(0.0);
                    }
                    // d_q = scale · d_pre · k ; d_k = scale · d_preᵀ · q
                    gemm(
                        &mut dx[h * hs..],
                        qkv_v,
                        d_a,
                        sq,
                        &x[cl + h * hs..],
                        qkv_v,
                        scale,
                        0.0,
                    );
                    gemm(
                        &mut dx[cl + h * hs..],
                        qkv_v,
                        d_a,
                        sq.t(),
                        &x[h * hs..],
                        qkv_v,
                        scale,
                        0.0,
                    );
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::testutil::{assert_close, check_grad, dot, randn};

    /// Straight from the definition, in f64.
    fn naive(qkv: &[f32], b: usize, t: usize, cl: usize, nh: usize) -> Vec<f32> {
        let hs = cl / nh;
        let mut out = vec![0.0; b * t * cl];
        for bi in 0..b {
            for h in 0..nh {
                for i in 0..t {
                    let q = |d: usize| qkv[(bi * t + i) * 3 * cl + h * hs + d] as f64;
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..hs)
                                .map(|d| q(d) * qkv[(bi * t + j) * 3 * cl + cl + h * hs + d] as f64)
                                .sum::<f64>()
                                / (hs as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                    for d in 0..hs {
                        let mut acc = 0.0;
                        for (j, s) in scores.iter().enumerate() {
                            acc += (s - max).exp() / z
                                * qkv[(bi * t + j) * 3 * cl + 2 * cl + h * hs + d] as f64;
                        }
                        out[(bi * t + i) * cl + h * hs + d] = acc as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_naive_f64() {
        let (b, t, cl, nh) = (3, 7, 12, 3);
        let mut rng = Rng::new(13);
        let qkv = randn(&mut rng, b * t * 3 * cl, 1.0);
        let want = naive(&qkv, b, t, cl, nh);
        for par in [Par::Seq, Par::Threads(2)] {
            let mut out = vec![f32::NAN; b * t * cl];
            let mut att = vec![f32::NAN; b * nh * t * t];
            attention_forward(&mut out, &mut att, &qkv, b, t, cl, nh, par);
            assert_close("attention out", &out, &want, 1e-4, 1e-5);
            // rows of att sum to one, masked entries are zero
            for row in 0..b * nh * t {
                let i = row % t;
                let r = &att[row * t..(row + 1) * t];
                assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                assert!(r[i + 1..].iter().all(|&x| x == 0.0));
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (b, t, cl, nh) = (2, 4, 6, 2);
        let mut rng = Rng::new(14);
        let mut qkv = randn(&mut rng, b * t * 3 * cl, 1.0);
        let r = randn(&mut rng, b * t * cl, 1.0);
        let mut out = vec![0.0; b * t * cl];
        let mut att = vec![0.0; b * nh * t * t];
        attention_forward(&mut out, &mut att, &qkv, b, t, cl, nh, Par::Seq);
        for par in [Par::Seq, Par::Threads(2)] {
            let mut d_qkv = vec![f32::NAN; qkv.len()];
            let mut d_att = vec![f32::NAN; b * t * t];
            attention_backward(&mut d_qkv, &mut d_att, &r, &qkv, &att, b, t, cl, nh, par);
            check_grad("d_qkv", &mut qkv, &d_qkv, 200, 1e-2, 2e-3, |x| {
                let mut out = vec![0.0; b * t * cl];
                let mut att = vec![0.0; b * nh * t * t];
                attention_forward(&mut out, &mut att, x, b, t, cl, nh, Par::Seq);
                dot(&out, &r)
            });
        }
    }
}
