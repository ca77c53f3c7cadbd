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
//!
//! Vocabulary-parallel form (Shoeybi et al. 2019, "Megatron-LM", §3): a rank holds the logit
//! columns `first..first + vpl` of the padded vocabulary, of which the first `vl` are real
//! tokens (`vl = clamp(v − first, 0, vpl)`). [`crossentropy_shard_stats`] reads the rank's
//! logits once (local max, Σ exp relative to it, the target's logit where the rank owns it);
//! the caller reduces them over the group (max, then the sums rescaled to the global max,
//! then a sum) and finishes with [`crossentropy_shard_finish`]. Backward
//! ([`crossentropy_softmax_backward_shard`]) needs only the global log-sum-exp.

use crate::elem::{with_f32, with_f32_mut, Elem};
use crate::fastmath::{self, exp, vectorized};
use crate::{check_len, par_rows, par_rows2, par_rows3, Par};

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
    crossentropy_softmax_backward_shard(logits_to_d_logits, lse, targets, d_loss, n, 0, v, vp, par)
}

/// [`crossentropy_softmax_backward_inplace`] on one rank's columns `first..first + vpl` (`vl`
/// of them real): `lse` is the log-sum-exp over the whole vocabulary. Columns `vl..vpl` become
/// 0; the target's column gets the `− d_loss` only on the rank that owns it.
#[track_caller]
pub fn crossentropy_softmax_backward_shard<E: Elem>(
    logits_to_d_logits: &mut [E],
    lse: &[f32],
    targets: &[u32],
    d_loss: f32,
    n: usize,
    first: usize,
    vl: usize,
    vpl: usize,
    par: Par,
) {
    assert!(
        vl <= vpl,
        "crossentropy backward: need vl ({vl}) <= vpl ({vpl})"
    );
    check_len(
        "crossentropy backward logits",
        logits_to_d_logits.len(),
        n * vpl,
    );
    check_len("crossentropy backward lse", lse.len(), n);
    check_len("crossentropy backward targets", targets.len(), n);
    par_rows(par, logits_to_d_logits, vpl, 16, |rows, chunk| {
        for (local, i) in rows.enumerate() {
            let row = &mut chunk[local * vpl..(local + 1) * vpl];
            let l = lse[i];
            let tgt = (targets[i] as usize).wrapping_sub(first);
            with_f32_mut(row, true, |row| {
                vectorized(|| {
                    for x in row[..vl].iter_mut() {
                        *x = d_loss * exp(*x - l);
                    }
                });
                if tgt < vl {
                    row[tgt] -= d_loss;
                }
                row[vl..].fill(0.0);
            });
        }
    });
}

/// Vocabulary-parallel forward, the local pass over one rank's logits (n, vpl) holding columns
/// `first..first + vpl`, `vl` of them real. Per row `i`: `max[i]` = max of the real columns
/// (−∞ when `vl = 0`), `sums[i] = Σ exp(logit − max[i])` over them, `picked[i]` = the target's
/// logit when this rank owns it, else 0. Overwrites all three.
#[track_caller]
pub fn crossentropy_shard_stats<E: Elem>(
    max: &mut [f32],
    sums: &mut [f32],
    picked: &mut [f32],
    logits: &[E],
    targets: &[u32],
    n: usize,
    first: usize,
    vl: usize,
    vpl: usize,
    par: Par,
) {
    assert!(
        vl <= vpl,
        "crossentropy_shard_stats: need vl ({vl}) <= vpl ({vpl})"
    );
    check_len("crossentropy_shard_stats max", max.len(), n);
    check_len("crossentropy_shard_stats sums", sums.len(), n);
    check_len("crossentropy_shard_stats picked", picked.len(), n);
    check_len("crossentropy_shard_stats logits", logits.len(), n * vpl);
    check_len("crossentropy_shard_stats targets", targets.len(), n);
    par_rows3(
        par,
        n,
        16,
        (max, 1),
        (sums, 1),
        (picked, 1),
        |rows, max, sums, picked| {
            for (local, i) in rows.enumerate() {
                if vl == 0 {
                    (max[local], sums[local], picked[local]) = (f32::NEG_INFINITY, 0.0, 0.0);
                    continue;
                }
                with_f32(&logits[i * vpl..i * vpl + vl], |row| {
                    let m = fastmath::max(row);
                    max[local] = m;
                    sums[local] = fastmath::exp_sum(row, m);
                    let tgt = (targets[i] as usize).wrapping_sub(first);
                    picked[local] = if tgt < vl { row[tgt] } else { 0.0 };
                });
            }
        },
    );
}

/// Rescales this rank's `sums` (relative to its own `local_max`) to the group's `global_max`:
/// `sums[i] *= exp(local_max[i] − global_max[i])`, so that summing them over the group gives
/// the normaliser Σ exp(logit − global max) over the whole vocabulary.
#[track_caller]
pub fn crossentropy_shard_rescale(sums: &mut [f32], local_max: &[f32], global_max: &[f32]) {
    check_len(
        "crossentropy_shard_rescale local_max",
        local_max.len(),
        sums.len(),
    );
    check_len(
        "crossentropy_shard_rescale global_max",
        global_max.len(),
        sums.len(),
    );
    for ((s, &m), &g) in sums.iter_mut().zip(local_max).zip(global_max) {
        *s *= (m - g).exp(); // a rank without real columns: −∞ → 0
    }
}

/// Finishes the vocabulary-parallel forward from the group-reduced statistics:
/// `lse[i] = global_max[i] + ln(sums[i])`, `losses[i] = lse[i] − picked[i]`. Overwrites both.
#[track_caller]
pub fn crossentropy_shard_finish(
    losses: &mut [f32],
    lse: &mut [f32],
    global_max: &[f32],
    sums: &[f32],
    picked: &[f32],
) {
    let n = losses.len();
    check_len("crossentropy_shard_finish lse", lse.len(), n);
    check_len("crossentropy_shard_finish global_max", global_max.len(), n);
    check_len("crossentropy_shard_finish sums", sums.len(), n);
    check_len("crossentropy_shard_finish picked", picked.len(), n);
    for i in 0..n {
        lse[i] = global_max[i] + sums[i].ln();
        losses[i] = lse[i] - picked[i];
    }
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

    #[test]
    fn vocabulary_shards_reproduce_the_full_loss_and_gradient() {
        let (n, v, vp) = (20, 41, 64);
        let mut rng = Rng::new(14);
        let mut logits = randn(&mut rng, n * vp, 3.0);
        for i in 0..n {
            logits[i * vp + v..(i + 1) * vp].fill(1e4); // masked padding
        }
        let targets: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
        let (mut losses, mut lse) = (vec![0.0; n], vec![0.0; n]);
        crossentropy_forward(&mut losses, &mut lse, &logits, &targets, n, v, vp, Par::Seq);
        let mut want_grad = logits.clone();
        let d_loss = 0.5;
        crossentropy_softmax_backward_inplace(
            &mut want_grad,
            &lse,
            &targets,
            d_loss,
            n,
            v,
            vp,
            Par::Seq,
        );
        // tp 4 leaves the last rank only padding (41 real of 64: 16 + 16 + 9 + 0)
        for tp in [2, 4] {
            let vpl = vp / tp;
            let shard = |r: usize| -> Vec<f32> {
                (0..n)
                    .flat_map(|i| logits[i * vp + r * vpl..i * vp + (r + 1) * vpl].to_vec())
                    .collect()
            };
            let vl = |r: usize| v.saturating_sub(r * vpl).min(vpl);
            let mut stats = Vec::new();
            for r in 0..tp {
                let (mut m, mut s, mut p) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
                let sh = shard(r);
                crossentropy_shard_stats(
                    &mut m,
                    &mut s,
                    &mut p,
                    &sh,
                    &targets,
                    n,
                    r * vpl,
                    vl(r),
                    vpl,
                    Par::Threads(2),
                );
                stats.push((m, s, p));
            }
            let gmax: Vec<f32> = (0..n)
                .map(|i| {
                    stats
                        .iter()
                        .map(|st| st.0[i])
                        .fold(f32::NEG_INFINITY, f32::max)
                })
                .collect();
            let (mut sum, mut picked) = (vec![0.0; n], vec![0.0; n]);
            for (m, s, p) in &mut stats {
                crossentropy_shard_rescale(s, m, &gmax);
                for i in 0..n {
                    sum[i] += s[i];
                    picked[i] += p[i];
                }
            }
            let (mut l2, mut lse2) = (vec![0.0; n], vec![0.0; n]);
            crossentropy_shard_finish(&mut l2, &mut lse2, &gmax, &sum, &picked);
            assert_close("losses", &l2, &losses, 1e-5, 1e-5);
            for r in 0..tp {
                let mut g = shard(r);
                crossentropy_softmax_backward_shard(
                    &mut g,
                    &lse2,
                    &targets,
                    d_loss,
                    n,
                    r * vpl,
                    vl(r),
                    vpl,
                    Par::Seq,
                );
                for i in 0..n {
                    let want = &want_grad[i * vp + r * vpl..i * vp + (r + 1) * vpl];
                    assert_close("d_logits", &g[i * vpl..(i + 1) * vpl], want, 1e-5, 1e-6);
                }
            }
        }
    }
}
