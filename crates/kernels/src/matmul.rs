//! Matmul forward/backward for a linear layer `out = inp · wᵀ + bias` (PyTorch's `nn.Linear`
//! weight layout: `w` is (n, k), row-major).
//!
//! Shapes: `inp` (m, k), `w` (n, k), `bias` (n), `out` (m, n); `m` is usually `b*t`.
//!
//! The inner product is a single-threaded GEMM on strided views (`gemm.rs`: our AVX-512F
//! kernel, or the `gemm` crate's), so the transposes of backward are only strides. We split the
//! *output rows* across `Par` threads ourselves; every thread packs its own panels, which for
//! our shapes (m = b*t ≥ 256) costs a few percent at most, except a weight packed once per step
//! by `crate::panels`, which all threads and micro-batches share. See `docs/runtime.md`.

pub use crate::gemm::{
    amx_active, avx512_active, avx512_bf16_active, bf16_matmul_kind, set_amx, set_avx512,
    set_avx512_bf16,
};
pub(crate) use crate::gemm::{gemm, gemm_mixed, gemm_packed, View};
use crate::panels::{with_packed, Dir};

use crate::elem::{with_f32, with_f32_mut, with_staging, Elem};
use crate::{check_len, is_f32, par_rows, par_rows2, Par};

/// Minimum output rows per thread before we bother splitting.
const MIN_ROWS: usize = 16;

/// Forward: `out (m, n) = inp (m, k) · w (n, k)ᵀ + bias (n)`. Overwrites `out`. Any mix of
/// storage types; all-`f32` runs [`gemm`] directly, otherwise operands are staged to `f32` in
/// blocks ([`gemm_mixed`]) and `out` is rounded once per block.
#[track_caller]
pub fn matmul_forward<O: Elem, I: Elem, W: Elem>(
    out: &mut [O],
    inp: &[I],
    w: &[W],
    bias: Option<&[W]>,
    m: usize,
    k: usize,
    n: usize,
    par: Par,
) {
    if is_f32::<O>() && is_f32::<I>() && is_f32::<W>() {
        let out = O::f32s_mut(out).unwrap();
        let (inp, w) = (I::f32s(inp).unwrap(), W::f32s(w).unwrap());
        let bias = bias.map(|b| W::f32s(b).unwrap());
        return matmul_forward_f32(out, inp, w, bias, m, k, n, par);
    }
    check_len("matmul_forward out", out.len(), m * n);
    check_len("matmul_forward inp", inp.len(), m * k);
    check_len("matmul_forward w", w.len(), n * k);
    if let Some(b) = bias {
        check_len("matmul_forward bias", b.len(), n);
    }
    par_rows(par, out, n, MIN_ROWS, |rows, out_rows| {
        let beta = match bias {
            Some(b) => {
                with_f32(b, |b| {
                    for row in out_rows.chunks_exact_mut(n) {
                        O::store(b, row);
                    }
                });
                1.0
            }
            None => 0.0,
        };
        gemm_mixed(
            out_rows,
            View::rm(rows.len(), n, n),
            &inp[rows.start * k..rows.end * k],
            View::rm(rows.len(), k, k),
            w,
            View::rm(n, k, k).t(),
            1.0,
            beta,
        );
    });
}

#[track_caller]
fn matmul_forward_f32(
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
    par: Par,
) {
    check_len("matmul_forward out", out.len(), m * n);
    check_len("matmul_forward inp", inp.len(), m * k);
    check_len("matmul_forward w", w.len(), n * k);
    if let Some(b) = bias {
        check_len("matmul_forward bias", b.len(), n);
    }
    // The weight's panels packed once per step when `crate::panels` holds them.
    with_packed(w, (n, k), Dir::Fwd, |wp| {
        par_rows(par, out, n, MIN_ROWS, |rows, out_rows| {
            let beta = match bias {
                Some(b) => {
                    for row in out_rows.chunks_exact_mut(n) {
                        row.copy_from_slice(b);
                    }
                    1.0
                }
                None => 0.0,
            };
            let inp_rows = &inp[rows.start * k..rows.end * k];
            let (cv, av) = (View::rm(rows.len(), n, n), View::rm(rows.len(), k, k));
            match wp {
                Some(wp) => gemm_packed(out_rows, cv, inp_rows, av, wp, 1.0, beta),
                None => gemm(
                    out_rows,
                    cv,
                    inp_rows,
                    av,
                    w,
                    View::rm(n, k, k).t(),
                    1.0,
                    beta,
                ),
            }
        })
    });
}

/// Backward of [`matmul_forward`]. Overwrites `d_inp (m, k) = d_out · w`; **accumulates**
/// `d_w (n, k) += d_outᵀ · inp` and `d_bias (n) += Σ_rows d_out`. Any mix of storage types, as
/// in [`matmul_forward`] (a 16-bit `d_w` is rounded once per block and call).
#[track_caller]
pub fn matmul_backward<DI: Elem, G: Elem, DO: Elem, I: Elem, W: Elem>(
    d_inp: &mut [DI],
    d_w: &mut [G],
    d_bias: Option<&mut [G]>,
    d_out: &[DO],
    inp: &[I],
    w: &[W],
    m: usize,
    k: usize,
    n: usize,
    par: Par,
) {
    if is_f32::<DI>() && is_f32::<G>() && is_f32::<DO>() && is_f32::<I>() && is_f32::<W>() {
        return matmul_backward_f32(
            DI::f32s_mut(d_inp).unwrap(),
            G::f32s_mut(d_w).unwrap(),
            d_bias.map(|b| G::f32s_mut(b).unwrap()),
            DO::f32s(d_out).unwrap(),
            I::f32s(inp).unwrap(),
            W::f32s(w).unwrap(),
            m,
            k,
            n,
            par,
        );
    }
    check_len("matmul_backward d_inp", d_inp.len(), m * k);
    check_len("matmul_backward d_w", d_w.len(), n * k);
    check_len("matmul_backward d_out", d_out.len(), m * n);
    check_len("matmul_backward inp", inp.len(), m * k);
    check_len("matmul_backward w", w.len(), n * k);
    par_rows(par, d_inp, k, MIN_ROWS, |rows, d_rows| {
        gemm_mixed(
            d_rows,
            View::rm(rows.len(), k, k),
            &d_out[rows.start * n..rows.end * n],
            View::rm(rows.len(), n, n),
            w,
            View::rm(n, k, k),
            1.0,
            0.0,
        );
    });
    let dw_rows = |rows: std::ops::Range<usize>, dw: &mut [G]| {
        gemm_mixed(
            dw,
            View::rm(rows.len(), k, k),
            &d_out[rows.start..],
            View::rm(m, rows.len(), n).t(),
            inp,
            View::rm(m, k, k),
            1.0,
            1.0,
        );
    };
    match d_bias {
        Some(db) => {
            check_len("matmul_backward d_bias", db.len(), n);
            par_rows2(par, n, MIN_ROWS, d_w, k, db, 1, |rows, dw, db| {
                dw_rows(rows.clone(), dw);
                with_f32_mut(db, true, |db| match DO::f32s(d_out) {
                    // f32 `d_out` (the mixed layers'): summed in place, no staged copy.
                    Some(d_out) => crate::fastmath::vectorized(|| {
                        for row in d_out.chunks_exact(n) {
                            for (acc, &x) in db.iter_mut().zip(&row[rows.clone()]) {
                                *acc += x;
                            }
                        }
                    }),
                    None => with_staging(rows.len(), |g| {
                        for row in d_out.chunks_exact(n) {
                            DO::load(&row[rows.clone()], g);
                            for (acc, &x) in db.iter_mut().zip(g.iter()) {
                                *acc += x;
                            }
                        }
                    }),
                });
            });
        }
        None => par_rows(par, d_w, k, MIN_ROWS, dw_rows),
    }
}

#[track_caller]
fn matmul_backward_f32(
    d_inp: &mut [f32],
    d_w: &mut [f32],
    d_bias: Option<&mut [f32]>,
    d_out: &[f32],
    inp: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    par: Par,
) {
    check_len("matmul_backward d_inp", d_inp.len(), m * k);
    check_len("matmul_backward d_w", d_w.len(), n * k);
    check_len("matmul_backward d_out", d_out.len(), m * n);
    check_len("matmul_backward inp", inp.len(), m * k);
    check_len("matmul_backward w", w.len(), n * k);
    // d_inp rows split across threads: (m, n) · (n, k), `w`'s panels packed once per step
    // when `crate::panels` holds them.
    with_packed(w, (n, k), Dir::Bwd, |wp| {
        par_rows(par, d_inp, k, MIN_ROWS, |rows, d_rows| {
            let (cv, av) = (View::rm(rows.len(), k, k), View::rm(rows.len(), n, n));
            let d_out_rows = &d_out[rows.start * n..rows.end * n];
            match wp {
                Some(wp) => gemm_packed(d_rows, cv, d_out_rows, av, wp, 1.0, 0.0),
                None => gemm(d_rows, cv, d_out_rows, av, w, View::rm(n, k, k), 1.0, 0.0),
            }
        })
    });
    // d_w rows (output features) split across threads: (n, m) · (m, k), beta = 1 accumulates.
    let dw_rows = |rows: std::ops::Range<usize>, dw: &mut [f32]| {
        gemm(
            dw,
            View::rm(rows.len(), k, k),
            &d_out[rows.start..],
            View::rm(m, rows.len(), n).t(),
            inp,
            View::rm(m, k, k),
            1.0,
            1.0,
        );
    };
    match d_bias {
        Some(db) => {
            check_len("matmul_backward d_bias", db.len(), n);
            par_rows2(par, n, MIN_ROWS, d_w, k, db, 1, |rows, dw, db| {
                dw_rows(rows.clone(), dw);
                for row in d_out.chunks_exact(n) {
                    for (acc, &g) in db.iter_mut().zip(&row[rows.clone()]) {
                        *acc += g;
                    }
                }
            });
        }
        None => par_rows(par, d_w, k, MIN_ROWS, dw_rows),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::testutil::{assert_close, check_grad, dot, randn};

    fn naive_forward(
        inp: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = bias.map_or(0.0f64, |b| b[j] as f64);
                for p in 0..k {
                    acc += inp[i * k + p] as f64 * w[j * k + p] as f64;
                }
                out[i * n + j] = acc as f32;
            }
        }
        out
    }

    #[test]
    fn forward_matches_naive_for_all_thread_counts() {
        let (m, k, n) = (67, 33, 45);
        let mut rng = Rng::new(1);
        let inp = randn(&mut rng, m * k, 1.0);
        let w = randn(&mut rng, n * k, 1.0);
        let b = randn(&mut rng, n, 1.0);
        let want = naive_forward(&inp, &w, Some(&b), m, k, n);
        for par in [Par::Seq, Par::Threads(2), Par::Threads(3)] {
            let mut out = vec![f32::NAN; m * n];
            matmul_forward(&mut out, &inp, &w, Some(&b), m, k, n, par);
            assert_close("matmul out", &out, &want, 1e-5, 1e-5);
        }
        let mut out = vec![f32::NAN; m * n];
        matmul_forward(&mut out, &inp, &w, None, m, k, n, Par::Threads(2));
        assert_close(
            "matmul out (no bias)",
            &out,
            &naive_forward(&inp, &w, None, m, k, n),
            1e-5,
            1e-5,
        );
    }

    #[test]
    fn backward_matches_naive_and_accumulates() {
        let (m, k, n) = (40, 19, 37);
        let mut rng = Rng::new(2);
        let inp = randn(&mut rng, m * k, 1.0);
        let w = randn(&mut rng, n * k, 1.0);
        let d_out = randn(&mut rng, m * n, 1.0);
        let prior_dw = randn(&mut rng, n * k, 1.0);
        let prior_db = randn(&mut rng, n, 1.0);
        for par in [Par::Seq, Par::Threads(2), Par::Threads(4)] {
            let mut d_inp = vec![f32::NAN; m * k];
            let mut d_w = prior_dw.clone();
            let mut d_b = prior_db.clone();
            matmul_backward(
                &mut d_inp,
                &mut d_w,
                Some(&mut d_b),
                &d_out,
                &inp,
                &w,
                m,
                k,
                n,
                par,
            );
            let mut want_inp = vec![0.0; m * k];
            let mut want_w = prior_dw.clone();
            let mut want_b = prior_db.clone();
            for i in 0..m {
                for j in 0..n {
                    let g = d_out[i * n + j];
                    want_b[j] += g;
                    for p in 0..k {
                        want_inp[i * k + p] += g * w[j * k + p];
                        want_w[j * k + p] += g * inp[i * k + p];
                    }
                }
            }
            assert_close("d_inp", &d_inp, &want_inp, 1e-4, 1e-4);
            assert_close("d_w", &d_w, &want_w, 1e-4, 1e-4);
            assert_close("d_b", &d_b, &want_b, 1e-4, 1e-4);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (m, k, n) = (5, 4, 3);
        let mut rng = Rng::new(3);
        let mut inp = randn(&mut rng, m * k, 1.0);
        let mut w = randn(&mut rng, n * k, 1.0);
        let mut b = randn(&mut rng, n, 1.0);
        let r = randn(&mut rng, m * n, 1.0);
        let mut d_inp = vec![0.0; m * k];
        let mut d_w = vec![0.0; n * k];
        let mut d_b = vec![0.0; n];
        matmul_backward(
            &mut d_inp,
            &mut d_w,
            Some(&mut d_b),
            &r,
            &inp,
            &w,
            m,
            k,
            n,
            Par::Seq,
        );
        let f = |inp: &[f32], w: &[f32], b: &[f32]| {
            let mut out = vec![0.0; m * n];
            matmul_forward(&mut out, inp, w, Some(b), m, k, n, Par::Seq);
            dot(&out, &r)
        };
        let (w0, b0) = (w.clone(), b.clone());
        check_grad("d_inp", &mut inp, &d_inp, 100, 1e-2, 1e-3, |x| {
            f(x, &w0, &b0)
        });
        let (i0, b0) = (inp.clone(), b.clone());
        check_grad("d_w", &mut w, &d_w, 100, 1e-2, 1e-3, |x| f(&i0, x, &b0));
        let (i0, w0) = (inp.clone(), w.clone());
        check_grad("d_b", &mut b, &d_b, 100, 1e-2, 1e-3, |x| f(&i0, &w0, x));
    }

    #[test]
    #[should_panic(expected = "matmul_forward w: length")]
    fn mismatched_sizes_panic_with_name() {
        let mut out = vec![0.0; 4];
        matmul_forward(&mut out, &[0.0; 4], &[0.0; 3], None, 2, 2, 2, Par::Seq);
    }
}
