//! Which layouts `scaletrain plan --cpu` considers and how it lists them: the candidates of N
//! processes with one global batch, the ranking by predicted step, and one row per
//! (dp, pp, tp, micro-batch) shape (docs/cpu-planner.md, "One row per choice").

use super::{predict, CpuHost, CpuLayout, CpuModel, CpuPrediction};

/// Candidate layouts of `nproc` processes training `global_batch` sequences per step: every
/// dp·pp·tp = nproc with tp dividing the heads and channels and pp at most the layers, every
/// micro-batch size dividing global_batch / dp, ZeRO 0–3 with dp > 1 (ZeRO-1 at most with
/// pp > 1), sequence
/// parallelism on and off with tp > 1 (when tp divides b·t). The runtime may refuse some
/// further (`scaletrain plan --cpu` asks its layout check).
pub fn candidates(m: &CpuModel, nproc: u64, global_batch: u64) -> Vec<CpuLayout> {
    let divisors = |n: u64| (1..=n).filter(move |d| n.is_multiple_of(*d));
    let mut out = Vec::new();
    for tp in divisors(nproc) {
        if !m.heads.is_multiple_of(tp) || !m.channels.is_multiple_of(tp) {
            continue;
        }
        for pp in divisors(nproc / tp) {
            if pp > m.layers {
                continue;
            }
            let dp = nproc / tp / pp;
            if !global_batch.is_multiple_of(dp) {
                continue;
            }
            let per = global_batch / dp;
            for batch in divisors(per) {
                // ZeRO-2 and 3 are refused inside pipelines (they communicate every
                // micro-batch).
                let zeros: &[u8] = match (dp > 1, pp == 1) {
                    (false, _) => &[0],
                    (true, true) => &[0, 1, 2, 3],
                    (true, false) => &[0, 1],
                };
                for &zero in zeros {
                    for sp in [false, true] {
                        if sp && (tp == 1 || !(batch * m.seq_len).is_multiple_of(tp)) {
                            continue;
                        }
                        out.push(CpuLayout {
                            dp,
                            pp,
                            tp,
                            batch,
                            microbatches: per / batch,
                            zero,
                            sp,
                        });
                    }
                }
            }
        }
    }
    out
}

/// `layouts` with their predictions, fastest first (ties: less memory).
pub fn rank(
    m: &CpuModel,
    layouts: &[CpuLayout],
    host: &CpuHost,
) -> Vec<(CpuLayout, CpuPrediction)> {
    let mut v: Vec<_> = layouts.iter().map(|l| (*l, predict(m, l, host))).collect();
    v.sort_by(|a, b| {
        a.1.step_secs
            .total_cmp(&b.1.step_secs)
            .then(a.1.memory_bytes.cmp(&b.1.memory_bytes))
    });
    v
}

/// One genuinely different choice of the ranking: a (dp, pp, tp, micro-batch) shape shown by
/// its best variant, with the variants that differ only in ZeRO stage or sequence parallelism.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuChoice {
    /// The variant shown: the fastest predicted, or among those within [`TIE`] of it the one
    /// with the least memory per rank.
    pub layout: CpuLayout,
    /// Its prediction.
    pub prediction: CpuPrediction,
    /// The other variants of the same shape, fastest first.
    pub variants: Vec<(CpuLayout, CpuPrediction)>,
}

/// Relative step-time difference under which two variants of one shape count as the same
/// speed (below the ±5 % spread of repeated measurements of one layout, docs/cpu-planner.md).
pub const TIE: f64 = 0.01;

/// Relative step-time difference under which the measured order of two layouts on this
/// development machine is not reliable, so `plan --cpu` names the rows that close to the best
/// as near ties. Held-out runs of `bench/cpu_plan_check.sh` (`measured::held_out`): in the
/// quiet ones every pair of the top 5 predicted more than 4 % apart measured in the predicted
/// order; pairs closer than that traded places between runs (the relative speed of two layouts
/// moves by 1–3 % from one run to the next, even where each run's rounds agree with each other).
pub const RESOLUTION: f64 = 0.04;

/// How many of `choices` (fastest first) lie within [`RESOLUTION`] of the first, the first
/// included.
pub fn near_ties(choices: &[CpuChoice]) -> usize {
    let best = match choices.first() {
        Some(c) => c.prediction.step_secs,
        None => return 0,
    };
    choices
        .iter()
        .take_while(|c| c.prediction.step_secs <= best * (1.0 + RESOLUTION))
        .count()
}

/// Collapses a ranking (fastest first, as [`rank`] returns it) to one row per (dp, pp, tp,
/// micro-batch size): the variants that differ only in ZeRO stage or sequence parallelism
/// change memory far more than time, and five of them in a top 5 are not five choices.
/// The rows keep the order of their shown variant.
pub fn collapse(ranked: &[(CpuLayout, CpuPrediction)]) -> Vec<CpuChoice> {
    let shape = |l: &CpuLayout| (l.dp, l.pp, l.tp, l.batch);
    let mut out: Vec<CpuChoice> = Vec::new();
    for (l, p) in ranked {
        if out.iter().any(|c| shape(&c.layout) == shape(l)) {
            continue;
        }
        let mut group: Vec<(CpuLayout, CpuPrediction)> = ranked
            .iter()
            .filter(|(o, _)| shape(o) == shape(l))
            .cloned()
            .collect();
        let fastest = p.step_secs;
        let shown = (0..group.len())
            .filter(|&i| group[i].1.step_secs <= fastest * (1.0 + TIE))
            .min_by_key(|&i| group[i].1.memory_bytes)
            .unwrap_or(0);
        let (layout, prediction) = group.remove(shown);
        out.push(CpuChoice {
            layout,
            prediction,
            variants: group,
        });
    }
    out.sort_by(|a, b| a.prediction.step_secs.total_cmp(&b.prediction.step_secs));
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::{host, model};
    use super::*;

    #[test]
    fn candidates_keep_the_global_batch_and_respect_the_degrees() {
        let m = model();
        let c = candidates(&m, 4, 8);
        assert!(!c.is_empty());
        for l in &c {
            assert_eq!(l.ranks(), 4);
            assert_eq!(l.dp * l.microbatches * l.batch, 8);
            assert_eq!(m.heads % l.tp, 0);
            assert!(!l.sp || l.tp > 1);
            assert!(l.zero == 0 || l.dp > 1);
            assert!(l.zero <= 1 || l.pp == 1, "ZeRO-2/3 only without a pipeline");
        }
        // dp4 tp1 pp1 with micro-batch 2: ZeRO 0, 1, 2, 3.
        assert_eq!(
            c.iter()
                .filter(|l| (l.dp, l.tp, l.batch) == (4, 1, 2))
                .count(),
            4
        );
        // ZeRO-2 and 3 only without a pipeline.
        assert!(c.iter().all(|l| l.zero <= 1 || l.pp == 1));
        let ranked = rank(&m, &c, &host(2));
        assert!(ranked
            .windows(2)
            .all(|w| w[0].1.step_secs <= w[1].1.step_secs));
    }

    #[test]
    fn collapsing_keeps_one_row_per_shape_and_the_lean_variant_of_a_tie() {
        let (m, h) = (model(), host(2));
        let ranked = rank(&m, &candidates(&m, 4, 8), &h);
        let choices = collapse(&ranked);
        // Every candidate is in exactly one row.
        let n: usize = choices.iter().map(|c| 1 + c.variants.len()).sum();
        assert_eq!(n, ranked.len());
        let shapes: std::collections::HashSet<_> = choices
            .iter()
            .map(|c| (c.layout.dp, c.layout.pp, c.layout.tp, c.layout.batch))
            .collect();
        assert_eq!(shapes.len(), choices.len(), "one row per shape");
        for c in &choices {
            for (v, p) in &c.variants {
                assert_eq!(
                    (v.dp, v.pp, v.tp, v.batch),
                    (c.layout.dp, c.layout.pp, c.layout.tp, c.layout.batch)
                );
                // Nothing hidden is clearly faster than what is shown...
                assert!(p.step_secs >= c.prediction.step_secs / (1.0 + TIE));
                // ...and what is shown is the leanest of the variants that tie with the fastest.
                if p.step_secs <= c.prediction.step_secs * (1.0 + TIE) {
                    assert!(p.memory_bytes >= c.prediction.memory_bytes, "{v:?}");
                }
            }
        }
        assert!(choices
            .windows(2)
            .all(|w| w[0].prediction.step_secs <= w[1].prediction.step_secs));
        // dp2 tp2 b4 comes as ZeRO 0/1/2/3 × sp on/off: eight variants, one row; sequence
        // parallelism costs the same time and saves activations, so the row shows it on.
        let row = choices
            .iter()
            .find(|c| (c.layout.dp, c.layout.tp, c.layout.batch) == (2, 2, 4))
            .expect("dp2 tp2 b4 is a candidate");
        assert_eq!(row.variants.len(), 7);
        assert!(row.layout.sp);
    }
}
