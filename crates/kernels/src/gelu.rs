//! GELU, tanh approximation as GPT-2 uses it (Hendrycks & Gimpel 2016, eq. for
//! `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`; PyTorch `GELU(approximate="tanh")`).
//!
//! Shapes: `inp`, `out`, `d_inp`, `d_out` all (n) — any flat tensor, e.g. (b*t, 4c).

use crate::elem::{with_f32, with_f32_mut, Elem};
use crate::fastmath::{tanh, vectorized};
use crate::{check_len, par_rows, Par};

const SQRT_2_OVER_PI: f32 = 0.797_884_6; // √(2/π)
const COEF: f32 = 0.044_715;
/// Elements per parallel chunk; GELU is cheap, so chunks are large.
const CHUNK: usize = 4096;

/// Forward: `out[i] = gelu(inp[i])`. Overwrites `out`.
#[track_caller]
pub fn gelu_forward<E: Elem>(out: &mut [E], inp: &[E], par: Par) {
    check_len("gelu_forward out", out.len(), inp.len());
    let n = inp.len();
    let (body, tail) = out.split_at_mut(n - n % CHUNK);
    let run = |o: &mut [f32], x_in: &[f32]| {
        for (y, &x) in o.iter_mut().zip(x_in) {
            let u = SQRT_2_OVER_PI * (x + COEF * x * x * x);
            *y = 0.5 * x * (1.0 + tanh(u));
        }
    };
    // 16-bit storage is staged through f32 CHUNK elements at a time.
    let staged = |start: usize, o: &mut [E]| {
        for (i, o) in o.chunks_mut(CHUNK).enumerate() {
            let s = start + i * CHUNK;
            with_f32(&inp[s..s + o.len()], |x| {
                with_f32_mut(o, false, |o| vectorized(|| run(o, x)))
            });
        }
    };
    par_rows(par, body, CHUNK, 4, |rows, o| staged(rows.start * CHUNK, o));
    staged(n - n % CHUNK, tail);
}

/// Backward: `d_inp[i] = d_out[i] · gelu'(inp[i])`. Overwrites `d_inp`.
#[track_caller]
pub fn gelu_backward<E: Elem>(d_inp: &mut [f32], inp: &[E], d_out: &[f32], par: Par) {
    check_len("gelu_backward d_inp", d_inp.len(), inp.len());
    check_len("gelu_backward d_out", d_out.len(), inp.len());
    let n = inp.len();
    let (body, tail) = d_inp.split_at_mut(n - n % CHUNK);
    // Iterators, not indices: no bounds checks, so the loop vectorises.
    let run = |d: &mut [f32], x_in: &[f32], g_in: &[f32]| {
        for ((dx, &x), &g) in d.iter_mut().zip(x_in).zip(g_in) {
            let u = SQRT_2_OVER_PI * (x + COEF * x * x * x);
            let th = tanh(u);
            let sech2 = 1.0 - th * th;
            let du = SQRT_2_OVER_PI * (1.0 + 3.0 * COEF * x * x);
            *dx = g * (0.5 * (1.0 + th) + 0.5 * x * sech2 * du);
        }
    };
    let staged = |start: usize, d: &mut [f32]| {
        for (i, d) in d.chunks_mut(CHUNK).enumerate() {
            let s = start + i * CHUNK;
            let g_in = &d_out[s..s + d.len()];
            with_f32(&inp[s..s + d.len()], |x| vectorized(|| run(d, x, g_in)));
        }
    };
    par_rows(par, body, CHUNK, 4, |rows, d| staged(rows.start * CHUNK, d));
    staged(n - n % CHUNK, tail);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::testutil::{assert_close, check_grad, dot, randn};

    #[test]
    fn forward_matches_naive_f64_all_thread_counts() {
        let mut rng = Rng::new(6);
        let inp = randn(&mut rng, 3 * CHUNK * 4 + 17, 3.0);
        let want: Vec<f32> = inp
            .iter()
            .map(|&x| {
                let x = x as f64;
                let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3));
                (0.5 * x * (1.0 + u.tanh())) as f32
            })
            .collect();
        for par in [Par::Seq, Par::Threads(2), Par::Threads(3)] {
            let mut out = vec![f32::NAN; inp.len()];
            gelu_forward(&mut out, &inp, par);
            assert_close("gelu out", &out, &want, 1e-5, 1e-6);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(7);
        let mut inp = randn(&mut rng, 50, 2.0);
        let r = randn(&mut rng, 50, 1.0);
        let mut d_inp = vec![f32::NAN; 50];
        gelu_backward(&mut d_inp, &inp, &r, Par::Seq);
        check_grad("d_inp", &mut inp, &d_inp, 50, 1e-2, 2e-3, |x| {
            let mut out = vec![0.0; 50];
            gelu_forward(&mut out, x, Par::Seq);
            dot(&out, &r)
        });
    }
}
