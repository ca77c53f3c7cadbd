//! LayerNorm (Ba, Kiros & Hinton 2016) over the last dimension, eps = 1e-5 as PyTorch.
//!
//! Shapes: `inp`, `out` (n, c) where n = b*t rows; `mean`, `rstd` (n); `w`, `b` (c).
//! Forward saves `mean` and `rstd` (2 floats per row) so backward need not recompute them.

use crate::elem::{with_f32, with_f32_mut, Elem};
use crate::{check_len, par_rows3, Par};

/// PyTorch's default LayerNorm epsilon.
pub const LN_EPS: f32 = 1e-5;

/// Forward: `out = (inp - mean) * rstd * w + b`, row by row. Overwrites `out`, `mean`, `rstd`.
#[track_caller]
pub fn layernorm_forward<E: Elem, W: Elem>(
    out: &mut [E],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[E],
    w: &[W],
    b: &[W],
    n: usize,
    c: usize,
    par: Par,
) {
    check_len("layernorm_forward out", out.len(), n * c);
    check_len("layernorm_forward mean", mean.len(), n);
    check_len("layernorm_forward rstd", rstd.len(), n);
    check_len("layernorm_forward inp", inp.len(), n * c);
    check_len("layernorm_forward w", w.len(), c);
    check_len("layernorm_forward b", b.len(), c);
    par_rows3(
        par,
        n,
        64,
        (out, c),
        (mean, 1),
        (rstd, 1),
        |rows, out_rows, mean_rows, rstd_rows| {
            with_f32(w, |w| {
                with_f32(b, |b| {
                    for (local, row) in rows.enumerate() {
                        with_f32(&inp[row * c..(row + 1) * c], |x| {
                            let mut sum = 0.0f32;
                            for &v in x {
                                sum += v;
                            }
                            let m = sum / c as f32;
                            let mut var = 0.0f32;
                            for &v in x {
                                let d = v - m;
                                var += d * d;
                            }
                            let s = 1.0 / (var / c as f32 + LN_EPS).sqrt();
                            let o = &mut out_rows[local * c..(local + 1) * c];
                            // Elementwise, zipped and vectorised: the same bits as indexed.
                            with_f32_mut(o, false, |o| {
                                crate::fastmath::vectorized(|| {
                                    let xwb = x.iter().zip(w).zip(b);
                                    for (o, ((&x, &w), &b)) in o.iter_mut().zip(xwb) {
                                        *o = (x - m) * s * w + b;
                                    }
                                })
                            });
                            mean_rows[local] = m;
                            rstd_rows[local] = s;
                        });
                    }
                })
            });
        },
    );
}

/// Backward. Overwrites `d_inp`; **accumulates** `d_w += Σ d_out·x̂`, `d_b += Σ d_out` (the
/// gradients may be stored in another type than the weights, e.g. an `f32` partial sum).
/// Single-threaded: `d_w`/`d_b` reduce over rows and the whole pass is memory-bound.
#[track_caller]
pub fn layernorm_backward<E: Elem, W: Elem, G: Elem>(
    d_inp: &mut [f32],
    d_w: &mut [G],
    d_b: &mut [G],
    d_out: &[f32],
    inp: &[E],
    w: &[W],
    mean: &[f32],
    rstd: &[f32],
    n: usize,
    c: usize,
) {
    check_len("layernorm_backward d_inp", d_inp.len(), n * c);
    check_len("layernorm_backward d_w", d_w.len(), c);
    check_len("layernorm_backward d_b", d_b.len(), c);
    check_len("layernorm_backward d_out", d_out.len(), n * c);
    check_len("layernorm_backward inp", inp.len(), n * c);
    check_len("layernorm_backward w", w.len(), c);
    check_len("layernorm_backward mean", mean.len(), n);
    check_len("layernorm_backward rstd", rstd.len(), n);
    with_f32(w, |w| {
        with_f32_mut(d_w, true, |d_w| {
            with_f32_mut(d_b, true, |d_b| {
                for row in 0..n {
                    with_f32(&inp[row * c..(row + 1) * c], |x| {
                        let dy = &d_out[row * c..(row + 1) * c];
                        let (m, s) = (mean[row], rstd[row]);
                        // Two reductions: mean(dy·w) and mean(dy·w·x̂).
                        let mut dnorm_mean = 0.0f32;
                        let mut dnorm_norm_mean = 0.0f32;
                        for j in 0..c {
                            let xhat = (x[j] - m) * s;
                            let dnorm = dy[j] * w[j];
                            dnorm_mean += dnorm;
                            dnorm_norm_mean += dnorm * xhat;
                        }
                        dnorm_mean /= c as f32;
                        dnorm_norm_mean /= c as f32;
                        let dx = &mut d_inp[row * c..(row + 1) * c];
                        // Elementwise per column (each d_w[j], d_b[j] gains one term per row, in
                        // row order): zipped and vectorised, the same bits as indexed.
                        crate::fastmath::vectorized(|| {
                            let cols = dx.iter_mut().zip(d_w.iter_mut()).zip(d_b.iter_mut());
                            for (((dx, (dw, db)), &x), (&dy, &w)) in cols
                                .map(|((dx, dw), db)| (dx, (dw, db)))
                                .zip(x)
                                .zip(dy.iter().zip(w))
                            {
                                let xhat = (x - m) * s;
                                *db += dy;
                                *dw += dy * xhat;
                                *dx = (dy * w - dnorm_mean - xhat * dnorm_norm_mean) * s;
                            }
                        });
                    });
                }
            })
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::testutil::{assert_close, check_grad, dot, randn};

    #[test]
    fn forward_matches_naive_f64() {
        let (n, c) = (70, 24);
        let mut rng = Rng::new(4);
        let inp = randn(&mut rng, n * c, 2.0);
        let w = randn(&mut rng, c, 1.0);
        let b = randn(&mut rng, c, 1.0);
        let mut want = vec![0.0; n * c];
        for r in 0..n {
            let x = &inp[r * c..(r + 1) * c];
            let m: f64 = x.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            let var: f64 = x.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / c as f64;
            let s = 1.0 / (var + LN_EPS as f64).sqrt();
            for j in 0..c {
                want[r * c + j] = ((x[j] as f64 - m) * s * w[j] as f64 + b[j] as f64) as f32;
            }
        }
        for par in [Par::Seq, Par::Threads(2)] {
            let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
            layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &b, n, c, par);
            assert_close("layernorm out", &out, &want, 1e-4, 1e-5);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (n, c) = (3, 8);
        let mut rng = Rng::new(5);
        let mut inp = randn(&mut rng, n * c, 1.0);
        let mut w = randn(&mut rng, c, 1.0);
        let mut b = randn(&mut rng, c, 1.0);
        let r = randn(&mut rng, n * c, 1.0);
        let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &b, n, c, Par::Seq);
        let mut d_inp = vec![f32::NAN; n * c];
        let (mut d_w, mut d_b) = (vec![0.0; c], vec![0.0; c]);
        layernorm_backward(
            &mut d_inp, &mut d_w, &mut d_b, &r, &inp, &w, &mean, &rstd, n, c,
        );
        let f = |inp: &[f32], w: &[f32], b: &[f32]| {
            let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
            layernorm_forward(&mut out, &mut mean, &mut rstd, inp, w, b, n, c, Par::Seq);
            dot(&out, &r)
        };
        let (w0, b0) = (w.clone(), b.clone());
        check_grad("d_inp", &mut inp, &d_inp, 100, 1e-2, 5e-3, |x| {
            f(x, &w0, &b0)
        });
        let (i0, b0) = (inp.clone(), b.clone());
        check_grad("d_w", &mut w, &d_w, 100, 1e-2, 5e-3, |x| f(&i0, x, &b0));
        let (i0, w0) = (inp.clone(), w.clone());
        check_grad("d_b", &mut b, &d_b, 100, 1e-2, 5e-3, |x| f(&i0, &w0, x));
    }
}
