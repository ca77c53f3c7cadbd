//! Causal multi-head self-attention core (Vaswani et al. 2017), GPT-2 style: the projections
//! live in `matmul`; this kernel goes from `qkv` to the per-head outputs.
//!
//! Shapes: `qkv` (b, t, 3·cl) laid out `[q | k | v]` per token, head `h` at columns
//! `h·hs..(h+1)·hs` of each part (PyTorch's `split` + `view(b, t, nh, hs)`); `out` (b, t, cl);
//! `att` (b, nh, t, t) softmax probabilities (zero above the diagonal); `cl = nh·hs` is the
//! *local* channel count (all heads, or one tensor-parallel rank's heads).
//!
//! Each (batch, head) pair uses strided GEMMs over causal blocks of `BLOCK` query rows (a block
//! of rows i0..i1 only needs keys 0..i1), so the work approaches the causal half of the t×t
//! square as t grows. Threads split the batch.

use crate::fastmath::{self, exp, vectorized};
use crate::matmul::{gemm, View};
use crate::{check_len, par_rows2, Par};

/// Rows (queries) per causal block: a block of rows i0..i1 only multiplies key columns 0..i1,
/// which with t = 128 does 62.5% of the full-square work.
const BLOCK: usize = 32;

/// The share of the full t×t square that the causal blocks compute (1 for t ≤ `BLOCK`, → ½ as
/// t grows); the attention GEMM FLOPs are this times `4·b·t²·cl` forward, `8·b·t²·cl` backward.
pub fn causal_work_fraction(t: usize) -> f64 {
    let work: usize = (0..t)
        .step_by(BLOCK)
        .map(|i0| ((i0 + BLOCK).min(t) - i0) * (i0 + BLOCK).min(t))
        .sum();
    work as f64 / (t * t) as f64
}

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
    par_rows2(par, b, 1, out, t * cl, att, nh * t * t, |rows, out, att| {
        for (local, bi) in rows.enumerate() {
            let x = &qkv[bi * t * 3 * cl..(bi + 1) * t * 3 * cl];
            let out_b = &mut out[local * t * cl..(local + 1) * t * cl];
            for h in 0..nh {
                let a = &mut att[(local * nh + h) * t * t..(local * nh + h + 1) * t * t];
                // Row blocks: rows i0..i1 only need key columns 0..i1 (causal).
                for i0 in (0..t).step_by(BLOCK) {
                    let i1 = (i0 + BLOCK).min(t);
                    let rows = i1 - i0;
                    // scores = q · kᵀ / √hs
                    gemm(
                        &mut a[i0 * t..],
                        View::rm(rows, i1, t),
                        &x[i0 * 3 * cl + h * hs..],
                        View::rm(rows, hs, 3 * cl),
                        &x[cl + h * hs..],
                        View::rm(i1, hs, 3 * cl).t(),
                        scale,
                        0.0,
                    );
                    for i in i0..i1 {
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
                        &mut out_b[i0 * cl + h * hs..],
                        View::rm(rows, hs, cl),
                        &a[i0 * t..],
                        View::rm(rows, i1, t),
                        &x[2 * cl + h * hs..],
                        View::rm(i1, hs, 3 * cl),
                        1.0,
                        0.0,
                    );
                }
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
                    // Row blocks i0..i1 (causal: key columns 0..i1 only): d_att, the softmax
                    // backward in place (d_pre), then d_q.
                    for i0 in (0..t).step_by(BLOCK) {
                        let i1 = (i0 + BLOCK).min(t);
                        let rows = i1 - i0;
                        // d_att = d_out_h · vᵀ
                        gemm(
                            &mut d_a[i0 * t..],
                            View::rm(rows, i1, t),
                            &dy[i0 * cl + h * hs..],
                            View::rm(rows, hs, cl),
                            &x[2 * cl + h * hs..],
                            View::rm(i1, hs, 3 * cl).t(),
                            1.0,
                            0.0,
                        );
                        // d_pre_ij = a_ij (d_att_ij − Σ_k a_ik d_att_ik), zero above the diagonal.
                        for i in i0..i1 {
                            let ar = &a[i * t..(i + 1) * t];
                            let dr = &mut d_a[i * t..(i + 1) * t];
                            let s: f32 = ar[..=i].iter().zip(&dr[..=i]).map(|(&p, &g)| p * g).sum();
                            for (g, &p) in dr[..=i].iter_mut().zip(&ar[..=i]) {
                                *g = p * (*g - s);
                            }
                            dr[i + 1..].fill(0.0);
                        }
                        // d_q = scale · d_pre · k
                        gemm(
                            &mut dx[i0 * 3 * cl + h * hs..],
                            View::rm(rows, hs, 3 * cl),
                            &d_a[i0 * t..],
                            View::rm(rows, i1, t),
                            &x[cl + h * hs..],
                            View::rm(i1, hs, 3 * cl),
                            scale,
                            0.0,
                        );
                    }
                    // Column blocks j0..j1 (causal: query rows j0..t only): d_v and d_k.
                    for j0 in (0..t).step_by(BLOCK) {
                        let j1 = (j0 + BLOCK).min(t);
                        let (cols, below) = (j1 - j0, t - j0);
                        // d_v = attᵀ · d_out_h
                        gemm(
                            &mut dx[j0 * 3 * cl + 2 * cl + h * hs..],
                            View::rm(cols, hs, 3 * cl),
                            &a[j0 * t + j0..],
                            View::rm(below, cols, t).t(),
                            &dy[j0 * cl + h * hs..],
                            View::rm(below, hs, cl),
                            1.0,
                            0.0,
                        );
                        // d_k = scale · d_preᵀ · q
                        gemm(
                            &mut dx[j0 * 3 * cl + cl + h * hs..],
                            View::rm(cols, hs, 3 * cl),
                            &d_a[j0 * t + j0..],
                            View::rm(below, cols, t).t(),
                            &x[j0 * 3 * cl + h * hs..],
                            View::rm(below, hs, 3 * cl),
                            scale,
                            0.0,
                        );
                    }
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
    fn causal_fraction_counts_blocks() {
        assert_eq!(causal_work_fraction(7), 1.0);
        assert_eq!(causal_work_fraction(128), 0.625); // 32·(32+64+96+128)/128²
    }

    #[test]
    fn forward_matches_naive_f64() {
        // t = 70 spans three causal blocks, the last one partial.
        for (b, t, cl, nh) in [(3, 7, 12, 3), (2, 70, 8, 2)] {
            forward_case(b, t, cl, nh);
        }
    }

    fn forward_case(b: usize, t: usize, cl: usize, nh: usize) {
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
        for (b, t, cl, nh) in [(2, 4, 6, 2), (1, 70, 4, 2)] {
            backward_case(b, t, cl, nh);
        }
    }

    fn backward_case(b: usize, t: usize, cl: usize, nh: usize) {
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
