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

use crate::elem::{with_f32, with_f32_mut, Elem};
use crate::fastmath::{self, exp, vectorized};
use crate::matmul::{gemm, View};
use crate::{check_len, par_rows, par_rows2, Par};

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

/// Scores and softmax of query rows `i0..i1` of one (batch row, head): writes rows `i0..i1` of
/// `a` (t×t, zero above the diagonal) from `x` (t, 3·cl), the batch row's `qkv`.
fn probs_block(a: &mut [f32], x: &[f32], i0: usize, t: usize, cl: usize, hs: usize, h: usize) {
    let i1 = (i0 + BLOCK).min(t);
    let rows = i1 - i0;
    let scale = 1.0 / (hs as f32).sqrt();
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
}

/// Forward of one (batch row, head): `a` (t×t) and head `h`'s columns of `out_b` (t, cl).
fn head_forward(
    out_b: &mut [f32],
    a: &mut [f32],
    x: &[f32],
    t: usize,
    cl: usize,
    hs: usize,
    h: usize,
) {
    for i0 in (0..t).step_by(BLOCK) {
        let i1 = (i0 + BLOCK).min(t);
        let rows = i1 - i0;
        probs_block(a, x, i0, t, cl, hs, h);
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

/// Backward of one (batch row, head), given its probabilities `a` (t×t), the batch row's `x`
/// (t, 3·cl) and `dy` (t, cl): writes head `h`'s columns of `dx` (t, 3·cl), using `d_a` (t×t).
#[allow(clippy::too_many_arguments)]
fn head_backward(
    dx: &mut [f32],
    d_a: &mut [f32],
    dy: &[f32],
    x: &[f32],
    a: &[f32],
    t: usize,
    cl: usize,
    hs: usize,
    h: usize,
) {
    let scale = 1.0 / (hs as f32).sqrt();
    for i0 in (0..t).step_by(BLOCK) {
        let i1 = (i0 + BLOCK).min(t);
        let rows = i1 - i0;
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
        for i in i0..i1 {
            let ar = &a[i * t..(i + 1) * t];
            let dr = &mut d_a[i * t..(i + 1) * t];
            let s: f32 = ar[..=i].iter().zip(&dr[..=i]).map(|(&p, &g)| p * g).sum();
            for (g, &p) in dr[..=i].iter_mut().zip(&ar[..=i]) {
                *g = p * (*g - s);
            }
            dr[i + 1..].fill(0.0);
        }
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
    for j0 in (0..t).step_by(BLOCK) {
        let j1 = (j0 + BLOCK).min(t);
        let (cols, below) = (j1 - j0, t - j0);
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

#[track_caller]
fn check_heads(what: &str, cl: usize, nh: usize) -> usize {
    assert!(
        nh >= 1 && cl.is_multiple_of(nh),
        "{what}: cl ({cl}) not divisible by nh ({nh})"
    );
    cl / nh
}

/// Forward. Overwrites `out` and `att` (saved for backward; `att` is what PyTorch's softmax
/// returns, masked entries exactly 0). 16-bit storage is converted per batch row (`qkv`,
/// `out`) and per head (`att`); the arithmetic is the `f32` path's.
#[track_caller]
pub fn attention_forward<E: Elem>(
    out: &mut [E],
    att: &mut [E],
    qkv: &[E],
    b: usize,
    t: usize,
    cl: usize,
    nh: usize,
    par: Par,
) {
    let hs = check_heads("attention_forward", cl, nh);
    check_len("attention_forward out", out.len(), b * t * cl);
    check_len("attention_forward att", att.len(), b * nh * t * t);
    check_len("attention_forward qkv", qkv.len(), b * t * 3 * cl);
    par_rows2(par, b, 1, out, t * cl, att, nh * t * t, |rows, out, att| {
        for (local, bi) in rows.enumerate() {
            let xs = &qkv[bi * t * 3 * cl..(bi + 1) * t * 3 * cl];
            with_f32(xs, |x| {
                let out_b = &mut out[local * t * cl..(local + 1) * t * cl];
                with_f32_mut(out_b, false, |out_b| {
                    for h in 0..nh {
                        let a = &mut att[(local * nh + h) * t * t..(local * nh + h + 1) * t * t];
                        with_f32_mut(a, false, |a| head_forward(out_b, a, x, t, cl, hs, h));
                    }
                })
            });
        }
    });
}

/// The softmax probabilities `att` (b, nh, t, t) alone, computed exactly as
/// [`attention_forward`] computes them (bitwise): selective activation recomputation rebuilds
/// them in backward instead of saving them.
#[track_caller]
pub fn attention_probs<E: Elem>(
    att: &mut [E],
    qkv: &[E],
    b: usize,
    t: usize,
    cl: usize,
    nh: usize,
    par: Par,
) {
    let hs = check_heads("attention_probs", cl, nh);
    check_len("attention_probs att", att.len(), b * nh * t * t);
    check_len("attention_probs qkv", qkv.len(), b * t * 3 * cl);
    par_rows(par, att, nh * t * t, 1, |rows, att| {
        for (local, bi) in rows.enumerate() {
            let xs = &qkv[bi * t * 3 * cl..(bi + 1) * t * 3 * cl];
            with_f32(xs, |x| {
                for h in 0..nh {
                    let a = &mut att[(local * nh + h) * t * t..(local * nh + h + 1) * t * t];
                    with_f32_mut(a, false, |a| {
                        for i0 in (0..t).step_by(BLOCK) {
                            probs_block(a, x, i0, t, cl, hs, h);
                        }
                    });
                }
            });
        }
    });
}

/// Backward. Overwrites `d_qkv`; `d_att` (b, t, t) is scratch (one t×t per batch row, reused
/// across heads). `qkv` and `att` may be 16-bit (converted per batch row / head).
#[track_caller]
pub fn attention_backward<E: Elem>(
    d_qkv: &mut [f32],
    d_att: &mut [f32],
    d_out: &[f32],
    qkv: &[E],
    att: &[E],
    b: usize,
    t: usize,
    cl: usize,
    nh: usize,
    par: Par,
) {
    let hs = check_heads("attention_backward", cl, nh);
    check_len("attention_backward d_qkv", d_qkv.len(), b * t * 3 * cl);
    check_len("attention_backward d_att", d_att.len(), b * t * t);
    check_len("attention_backward d_out", d_out.len(), b * t * cl);
    check_len("attention_backward qkv", qkv.len(), b * t * 3 * cl);
    check_len("attention_backward att", att.len(), b * nh * t * t);
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
                let xs = &qkv[bi * t * 3 * cl..(bi + 1) * t * 3 * cl];
                let dy = &d_out[bi * t * cl..(bi + 1) * t * cl];
                let dx = &mut d_qkv[local * t * 3 * cl..(local + 1) * t * 3 * cl];
                with_f32(xs, |x| {
                    for h in 0..nh {
                        let a = &att[(bi * nh + h) * t * t..(bi * nh + h + 1) * t * t];
                        with_f32(a, |a| head_backward(dx, d_a, dy, x, a, t, cl, hs, h));
                    }
                });
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
