//! Residual adds. The attention and MLP output projections are row-parallel under tensor
//! parallelism (Shoeybi et al. 2019, "Megatron-LM", §3): each rank produces a *partial*
//! projection without bias; after the (later) all-reduce, [`bias_residual_forward`] adds the
//! replicated bias and the residual in one pass.
//!
//! Shapes: `residual`, `partial`, `out` (n, c); `bias` (c).

use crate::elem::{with_f32, with_f32_mut, Elem};
use crate::{check_len, par_rows, Par};

/// Forward: `out = residual + partial + bias` (bias broadcast over rows). Overwrites `out`.
#[track_caller]
pub fn bias_residual_forward<E: Elem, W: Elem>(
    out: &mut [E],
    residual: &[E],
    partial: &[f32],
    bias: &[W],
    n: usize,
    c: usize,
    par: Par,
) {
    check_len("bias_residual_forward out", out.len(), n * c);
    check_len("bias_residual_forward residual", residual.len(), n * c);
    check_len("bias_residual_forward partial", partial.len(), n * c);
    check_len("bias_residual_forward bias", bias.len(), c);
    par_rows(par, out, c, 256, |rows, o| {
        let base = rows.start * c;
        with_f32(bias, |bias| {
            for (i, row) in o.chunks_exact_mut(c).enumerate() {
                let off = base + i * c;
                let (res, part) = (&residual[off..off + c], &partial[off..off + c]);
                with_f32(res, |res| {
                    with_f32_mut(row, false, |row| {
                        for j in 0..c {
                            row[j] = res[j] + part[j] + bias[j];
                        }
                    })
                });
            }
        });
    });
}

/// Backward of [`bias_residual_forward`]: the gradient flows unchanged to `residual` and
/// `partial` (the caller reuses `d_out` for both, no copy), and **accumulates**
/// `d_bias += Σ_rows d_out`.
#[track_caller]
pub fn bias_residual_backward<W: Elem>(d_bias: &mut [W], d_out: &[f32], n: usize, c: usize) {
    check_len("bias_residual_backward d_bias", d_bias.len(), c);
    check_len("bias_residual_backward d_out", d_out.len(), n * c);
    with_f32_mut(d_bias, true, |d_bias| {
        for row in d_out.chunks_exact(c) {
            for (acc, &g) in d_bias.iter_mut().zip(row) {
                *acc += g;
            }
        }
    });
}

/// `acc += x` elementwise (used to merge a branch's input gradient into the residual stream).
#[track_caller]
pub fn add_inplace(acc: &mut [f32], x: &[f32], par: Par) {
    check_len("add_inplace x", x.len(), acc.len());
    const CHUNK: usize = 4096;
    let n = acc.len();
    let (body, tail) = acc.split_at_mut(n - n % CHUNK);
    par_rows(par, body, CHUNK, 8, |rows, a| {
        for (y, &v) in a.iter_mut().zip(&x[rows.start * CHUNK..]) {
            *y += v;
        }
    });
    for (y, &v) in tail.iter_mut().zip(&x[n - n % CHUNK..]) {
        *y += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::testutil::{assert_close, check_grad, dot, randn};

    #[test]
    fn forward_and_add_match_naive() {
        let (n, c) = (600, 7);
        let mut rng = Rng::new(8);
        let res = randn(&mut rng, n * c, 1.0);
        let part = randn(&mut rng, n * c, 1.0);
        let bias = randn(&mut rng, c, 1.0);
        let want: Vec<f32> = (0..n * c).map(|i| res[i] + part[i] + bias[i % c]).collect();
        let mut out = vec![0.0; n * c];
        bias_residual_forward(&mut out, &res, &part, &bias, n, c, Par::Threads(2));
        assert_close("out", &out, &want, 0.0, 0.0);
        let mut acc = res.clone();
        add_inplace(&mut acc, &part, Par::Threads(2));
        let want: Vec<f32> = (0..n * c).map(|i| res[i] + part[i]).collect();
        assert_close("add_inplace", &acc, &want, 0.0, 0.0);
    }

    #[test]
    fn bias_backward_matches_finite_differences() {
        let (n, c) = (4, 5);
        let mut rng = Rng::new(9);
        let res = randn(&mut rng, n * c, 1.0);
        let part = randn(&mut rng, n * c, 1.0);
        let mut bias = randn(&mut rng, c, 1.0);
        let r = randn(&mut rng, n * c, 1.0);
        let mut d_bias = vec![0.0; c];
        bias_residual_backward(&mut d_bias, &r, n, c);
        check_grad("d_bias", &mut bias, &d_bias, 10, 1e-2, 1e-3, |b| {
            let mut out = vec![0.0; n * c];
            bias_residual_forward(&mut out, &res, &part, b, n, c, Par::Seq);
            dot(&out, &r)
        });
    }
}
