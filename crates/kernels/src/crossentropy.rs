//! Fused softmax + cross-entropy over a padded vocabulary.
//!
//! Shapes: `logits` (n, vp) where n = b*t; `targets`, `losses`, `lse` (n); only the first `v`
//! columns are real tokens. Padded columns `v..vp` exist so the LM-head matmul has a friendly
//! width (GPT-2's 50257 → 50304); they are **masked**: excluded from the softmax, and their
//! gradient is exactly zero.
//!
//! Forward stores the per-row log-sum-exp (`lse`, one float per row), so backward turns the
//! logits into `softmax − one_hot` in place with a single `exp` per element and no buffer of
//! probabilities.

use crate::elem::{with_f32, with_f32_mut, Elem};
use crate::fastmath::{self, exp, vectorized};
use crate::{check_len, par_rows, par_rows2, Par};

/// Forward: `losses[i] = lse_i − logits[i, targets[i]]` with `lse_i = log Σ_{j<v} exp(logits[i,j])`.
/// Overwrites `losses` and `lse`. Targets must be < `v` (validated by the caller).
#[track_caller]
pub fn crossentropy_forward<E: Elem>(
    losses: &mut [f32],
    lse: &mut [f32],
    logits: &[E],
    targets: &[u32],
    n: usize,
    v: usize,
    vp: usize,
    par: Par,
) {
    assert!(
        v >= 1 && v <= vp,
        "crossentropy_forward: need 1 <= v ({v}) <= vp ({vp})"
    );
    check_len("crossentropy_forward losses", losses.len(), n);
    check_len("crossentropy_forward lse", lse.len(), n);
    check_len("crossentropy_forward logits", logits.len(), n * vp);
    check_len("crossentropy_forward targets", targets.len(), n);
    par_rows2(par, n, 16, losses, 1, lse, 1, |rows, losses, lse| {
        for (local, i) in rows.enumerate() {
            with_f32(&logits[i * vp..i * vp + v], |row| {
                let max = fastmath::max(row);
                let sum = fastmath::exp_sum(row, max);
                let l = max + sum.ln();
                let tgt = targets[i] as usize;
                assert!(
                    tgt < v,
                    "crossentropy_forward: target {tgt} >= vocabulary {v}"
                );
                lse[local] = l;
                losses[local] = l - row[tgt];
            });
        }
    });
}

/// Backward, in place: `logits[i, j] ← d_loss_i · (softmax_ij − [j = target_i])` for `j < v`,
/// and `0` for padded columns. Overwrites the logits (they are not needed after the loss).
/// `d_loss` is the gradient of the objective w.r.t. each row's loss, e.g. `1/(b·t)` for a mean.
#[track_caller]
pub fn crossentropy_softmax_backward_inplace<E: Elem>(
    logits_to_d_logits: &mut [E],
    lse: &[f32],
    targets: &[u32],
    d_loss: f32,
    n: usize,
    v: usize,
    vp: usize,
    par: Par,
) {
    assert!(
        v >= 1 && v <= vp,
        "crossentropy backward: need 1 <= v ({v}) <= vp ({vp})"
    );
    check_len(
        "crossentropy backward logits",
        logits_to_d_logits.len(),
        n * vp,
    );
    check_len("crossentropy backward lse", lse.len(), n);
    check_len("crossentropy backward targets", targets.len(), n);
    par_rows(par, logits_to_d_logits, vp, 16, |rows, chunk| {
        for (local, i) in rows.enumerate() {
            let row = &mut chunk[local * vp..(local + 1) * vp];
            let l = lse[i];
            with_f32_mut(row, true, |row| {
                vectorized(|| {
                    for x in row[..v].iter_mut() {
                        *x = d_loss * exp(*x - l);
                    }
                });
                row[targets[i] as usize] -= d_loss;
                row[v..].fill(0.0);
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::testutil::{assert_close, check_grad, randn};

    #[test]
    fn forward_matches_naive_and_ignores_padding() {
        let (n, v, vp) = (40, 13, 16);
        let mut rng = Rng::new(11);
        let mut logits = randn(&mut rng, n * vp, 3.0);
        for i in 0..n {
            for j in v..vp {
                logits[i * vp + j] = 1e4; // would dominate if not masked
            }
        }
        let targets: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
        let want: Vec<f32> = (0..n)
            .map(|i| {
                let row = &logits[i * vp..i * vp + v];
                let s: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
                (s.ln() - row[targets[i] as usize] as f64) as f32
            })
            .collect();
        for par in [Par::Seq, Par::Threads(2)] {
            let (mut losses, mut lse) = (vec![0.0; n], vec![0.0; n]);
            crossentropy_forward(&mut losses, &mut lse, &logits, &targets, n, v, vp, par);
            assert_close("losses", &losses, &want, 1e-5, 1e-5);
        }
    }

    #[test]
    fn backward_matches_finite_differences_and_zeroes_padding() {
        let (n, v, vp) = (3, 5, 8);
        let mut rng = Rng::new(12);
        let mut logits = randn(&mut rng, n * vp, 1.0);
        let targets = [4u32, 0, 2];
        let d_loss = 1.0 / n as f32;
        let (mut losses, mut lse) = (vec![0.0; n], vec![0.0; n]);
        crossentropy_forward(&mut losses, &mut lse, &logits, &targets, n, v, vp, Par::Seq);
        let mut grad = logits.clone();
        crossentropy_softmax_backward_inplace(
            &mut grad,
            &lse,
            &targets,
            d_loss,
            n,
            v,
            vp,
            Par::Seq,
        );
        for i in 0..n {
            assert!(grad[i * vp + v..(i + 1) * vp].iter().all(|&g| g == 0.0));
        }
        check_grad("d_logits", &mut logits, &grad, 100, 1e-2, 1e-3, |x| {
            let (mut losses, mut lse) = (vec![0.0; n], vec![0.0; n]);
            crossentropy_forward(&mut losses, &mut lse, x, &targets, n, v, vp, Par::Seq);
            losses.iter().map(|&l| l as f64 * d_loss as f64).sum()
        });
    }
}
