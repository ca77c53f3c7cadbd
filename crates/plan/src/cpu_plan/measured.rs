//! The layout model against the quiet measurements of docs/cpu-planner-measurements.md (2026-12-06,
//! `bench/cpu_plan_check.sh`, L4 H4 C256 T128, vocabulary 32, global batch 8, 2-core AMD Zen 5
//! VM): table A (02:03 UTC, 15 layouts, one round), table B (04:42, the top 5 of the model then,
//! two rounds), table C (05:55, its top 12, three rounds), all before the runtime's weight
//! panels; E1 (07:38) and E2 (07:44), the model's top 5 with panels, two rounds of 10 steps; D
//! (08:36, session 7), its top 8, three rounds of 20 steps; F (09:37), probes of tp 4, tp
//! without sequence parallelism and ZeRO-2/3; G (09:42), the first out-of-sample check of the
//! session's model, its top 8. The two per-parameter constants of `cpu_time` were fitted to
//! A, `DP_WAKE_SECS` to A–C, the tensor-parallel link to D's measured collective time,
//! `TP_GROUP_LOSS` to the tp 4 rows of C and F, `P2P_MESSAGE_SECS` to A–G, and
//! `RELOAD_SECS_PER_BYTE` with `TP_WAKE_SECS` to A–G (session 8): this is an in-sample check
//! (H and I too, since session 8). The held-out checks are in docs/cpu-planner.md.

use super::*;

mod held_out;

/// (N, dp, pp, tp, micro-batch, micro-batches, ZeRO, sp, measured median step ms).
type Row = (u64, u64, u64, u64, u64, u64, u8, bool, f64);

/// A row's layout and its predicted step in ms (checking that the row's N is its ranks).
fn predicted(
    &(n, dp, pp, tp, batch, microbatches, zero, sp, _): &Row,
    h: &CpuHost,
) -> (CpuLayout, f64) {
    let l = CpuLayout {
        dp,
        pp,
        tp,
        batch,
        microbatches,
        zero,
        sp,
    };
    assert_eq!(l.ranks(), n);
    (l, 1e3 * predict(&model(), &l, h).step_secs)
}

/// Every row of `rows` within 15% of its prediction; the RMS log error of measured/predicted.
fn all_within_15_percent(table: &str, rows: &[Row]) -> f64 {
    let h = host(true);
    let mut sq = 0.0;
    for row in rows {
        let (l, ms) = predicted(row, &h);
        let r = row.8 / ms;
        assert!(
            (r - 1.0).abs() <= 0.15,
            "table {table} {l:?}: measured/predicted {r:.3}"
        );
        sq += r.ln().powi(2);
    }
    (sq / rows.len() as f64).sqrt()
}

/// Table A (02:03 UTC).
const A: &[Row] = &[
    (2, 1, 2, 1, 1, 8, 0, false, 87.0),
    (2, 2, 1, 1, 1, 4, 0, false, 85.7),
    (2, 2, 1, 1, 2, 2, 0, false, 77.1),
    (2, 2, 1, 1, 4, 1, 0, false, 75.1),
    (2, 2, 1, 1, 1, 4, 1, false, 83.8),
    (4, 1, 4, 1, 1, 8, 0, false, 105.6),
    (4, 2, 2, 1, 1, 4, 0, false, 95.8),
    (4, 2, 2, 1, 1, 4, 1, false, 89.8),
    (4, 2, 1, 2, 4, 1, 0, true, 83.7),
    (4, 2, 1, 2, 4, 1, 0, false, 85.6),
    (8, 4, 1, 2, 2, 1, 0, true, 113.3),
    (8, 4, 1, 2, 2, 1, 0, false, 112.7),
    (8, 4, 1, 2, 2, 1, 2, true, 101.0),
    (8, 4, 1, 2, 2, 1, 1, true, 105.1),
    (8, 4, 1, 2, 2, 1, 2, false, 102.4),
];

/// Table B (04:42 UTC).
const B: &[Row] = &[
    (2, 2, 1, 1, 4, 1, 1, false, 74.4),
    (2, 2, 1, 1, 2, 2, 1, false, 81.0),
    (2, 2, 1, 1, 1, 4, 1, false, 91.1),
    (2, 1, 1, 2, 8, 1, 0, true, 76.1),
    (2, 1, 2, 1, 2, 4, 0, false, 94.4),
    (4, 4, 1, 1, 2, 1, 2, false, 94.5),
    (4, 4, 1, 1, 1, 2, 1, false, 102.3),
    (4, 2, 1, 2, 4, 1, 1, true, 88.5),
    (4, 2, 1, 2, 2, 2, 1, true, 92.5),
    (4, 2, 2, 1, 1, 4, 1, false, 92.4),
    (8, 8, 1, 1, 1, 1, 2, false, 127.7),
    (8, 4, 1, 2, 2, 1, 2, true, 112.7),
    (8, 4, 1, 2, 1, 2, 1, true, 125.5),
    (8, 4, 2, 1, 1, 2, 1, false, 107.2),
    (8, 2, 2, 2, 1, 4, 1, true, 124.5),
];

/// Table C (05:55 UTC).
const C: &[Row] = &[
    (2, 2, 1, 1, 4, 1, 1, false, 73.2),
    (2, 2, 1, 1, 2, 2, 1, false, 77.6),
    (2, 2, 1, 1, 1, 4, 1, false, 88.6),
    (2, 1, 1, 2, 8, 1, 0, true, 70.3),
    (2, 1, 2, 1, 2, 4, 0, false, 90.8),
    (2, 1, 2, 1, 1, 8, 0, false, 95.1),
    (2, 1, 1, 2, 4, 2, 0, true, 71.2),
    (2, 1, 1, 2, 2, 4, 0, true, 76.4),
    (2, 1, 2, 1, 4, 2, 0, false, 98.7),
    (2, 1, 1, 2, 1, 8, 0, true, 91.7),
    (2, 1, 2, 1, 8, 1, 0, false, 127.9),
    (4, 4, 1, 1, 2, 1, 2, false, 88.3),
    (4, 4, 1, 1, 1, 2, 1, false, 100.8),
    (4, 2, 1, 2, 4, 1, 1, true, 82.7),
    (4, 2, 1, 2, 2, 2, 1, true, 88.5),
    (4, 2, 2, 1, 1, 4, 1, false, 87.7),
    (4, 2, 2, 1, 2, 2, 1, false, 79.1),
    (4, 1, 4, 1, 1, 8, 0, false, 97.0),
    (4, 2, 1, 2, 1, 4, 1, true, 103.6),
    (4, 1, 2, 2, 2, 4, 0, true, 81.6),
    (4, 1, 2, 2, 1, 8, 0, true, 98.5),
    (4, 1, 4, 1, 2, 4, 0, false, 91.2),
    (4, 1, 1, 4, 8, 1, 0, true, 110.6),
    (8, 8, 1, 1, 1, 1, 2, false, 123.0),
    (8, 4, 1, 2, 2, 1, 2, true, 104.0),
    (8, 4, 1, 2, 1, 2, 1, true, 118.0),
    (8, 4, 2, 1, 1, 2, 1, false, 106.5),
    (8, 2, 2, 2, 1, 4, 1, true, 113.5),
    (8, 2, 4, 1, 1, 4, 1, false, 96.4),
    (8, 4, 2, 1, 2, 1, 1, false, 92.7),
    (8, 2, 1, 4, 4, 1, 1, true, 104.5),
    (8, 2, 2, 2, 2, 2, 1, true, 94.1),
    (8, 1, 4, 2, 1, 8, 0, true, 116.0),
    (8, 2, 1, 4, 2, 2, 1, true, 126.0),
    (8, 1, 4, 2, 2, 4, 0, true, 90.8),
];

/// Table E1 (07:38 UTC, with weight panels: the runtime packs each weight once per step; the
/// model's top 5 per N then, two rounds of 10 steps).
const E1: &[Row] = &[
    (2, 2, 1, 1, 1, 4, 1, false, 75.9),
    (2, 2, 1, 1, 2, 2, 1, false, 71.8),
    (2, 2, 1, 1, 4, 1, 1, false, 70.1),
    (2, 1, 1, 2, 8, 1, 0, true, 69.0),
    (2, 1, 1, 2, 4, 2, 0, true, 68.7),
    (4, 2, 2, 1, 1, 4, 1, false, 87.3),
    (4, 2, 2, 1, 2, 2, 1, false, 78.4),
    (4, 2, 2, 1, 4, 1, 1, false, 76.6),
    (4, 1, 2, 2, 4, 2, 0, true, 74.1),
    (4, 1, 2, 2, 8, 1, 0, true, 73.2),
    (8, 2, 4, 1, 2, 2, 1, false, 86.6),
    (8, 1, 4, 2, 4, 2, 0, true, 80.6),
    (8, 2, 4, 1, 1, 4, 1, false, 92.4),
    (8, 2, 2, 2, 2, 2, 1, true, 92.0),
    (8, 2, 2, 2, 4, 1, 1, true, 87.3),
];

/// Table E2 (07:44 UTC, weight panels, the top 5 of the model with the per-micro-batch
/// residual, two rounds of 10 steps).
const E2: &[Row] = &[
    (2, 2, 1, 1, 4, 1, 1, false, 71.8),
    (2, 2, 1, 1, 2, 2, 1, false, 72.7),
    (2, 1, 1, 2, 8, 1, 0, true, 68.5),
    (2, 1, 1, 2, 4, 2, 0, true, 68.6),
    (2, 2, 1, 1, 1, 4, 1, false, 75.6),
    (4, 2, 2, 1, 2, 2, 1, false, 82.8),
    (4, 2, 2, 1, 4, 1, 1, false, 80.7),
    (4, 1, 2, 2, 8, 1, 0, true, 76.0),
    (4, 1, 2, 2, 4, 2, 0, true, 73.4),
    (4, 2, 2, 1, 1, 4, 1, false, 89.9),
    (8, 2, 4, 1, 2, 2, 1, false, 85.3),
    (8, 1, 4, 2, 4, 2, 0, true, 93.4),
    (8, 2, 2, 2, 4, 1, 1, true, 96.4),
    (8, 2, 2, 2, 2, 2, 1, true, 96.6),
    (8, 2, 4, 1, 1, 4, 1, false, 94.2),
];

/// Table D (2026-12-06 08:36 UTC, weight panels, the model's top 8 per N then, three rounds of
/// 20 steps).
const D: &[Row] = &[
    (2, 2, 1, 1, 4, 1, 1, false, 70.0),
    (2, 2, 1, 1, 2, 2, 1, false, 73.2),
    (2, 1, 1, 2, 8, 1, 0, true, 70.3),
    (2, 1, 1, 2, 4, 2, 0, true, 68.8),
    (2, 2, 1, 1, 1, 4, 1, false, 76.7),
    (2, 1, 1, 2, 2, 4, 0, true, 71.6),
    (2, 1, 2, 1, 2, 4, 0, false, 86.2),
    (2, 1, 2, 1, 1, 8, 0, false, 77.9),
    (4, 2, 2, 1, 2, 2, 1, false, 78.0),
    (4, 2, 2, 1, 4, 1, 1, false, 73.2),
    (4, 1, 2, 2, 8, 1, 0, true, 68.8),
    (4, 1, 2, 2, 4, 2, 0, true, 71.7),
    (4, 2, 2, 1, 1, 4, 1, false, 87.4),
    (4, 2, 1, 2, 4, 1, 1, true, 78.3),
    (4, 1, 2, 2, 2, 4, 0, true, 72.6),
    (4, 1, 4, 1, 2, 4, 0, false, 85.9),
    (8, 2, 4, 1, 2, 2, 1, false, 84.6),
    (8, 1, 4, 2, 4, 2, 0, true, 86.1),
    (8, 2, 2, 2, 4, 1, 1, true, 87.8),
    (8, 2, 2, 2, 2, 2, 1, true, 88.8),
    (8, 2, 4, 1, 1, 4, 1, false, 89.7),
    (8, 2, 4, 1, 4, 1, 1, false, 78.9),
    (8, 4, 2, 1, 1, 2, 1, false, 104.0),
    (8, 4, 2, 1, 2, 1, 1, false, 94.0),
];

/// Table F (2026-12-06 09:37 UTC, session 7, weight panels): layouts chosen to probe what the
/// tables above lack — tensor parallelism over more ranks than cores (tp 4), tp without
/// sequence parallelism, ZeRO-3 — three rounds of 20 steps.
const F: &[Row] = &[
    (4, 1, 1, 4, 8, 1, 0, true, 110.5),
    (4, 1, 1, 4, 4, 2, 0, true, 108.9),
    (8, 1, 2, 4, 8, 1, 0, true, 109.8),
    (8, 1, 2, 4, 4, 2, 0, true, 114.6),
    (8, 2, 1, 4, 4, 1, 1, true, 108.4),
    (2, 1, 1, 2, 8, 1, 0, false, 73.1),
    (4, 2, 1, 2, 4, 1, 1, false, 83.0),
    (4, 2, 1, 2, 4, 1, 3, true, 86.4),
    (2, 2, 1, 1, 4, 1, 3, false, 75.0),
    (2, 2, 1, 1, 2, 2, 3, false, 85.5),
    (2, 2, 1, 1, 4, 1, 2, false, 72.2),
    (4, 2, 2, 1, 2, 2, 1, false, 77.6),
    (4, 1, 2, 2, 4, 2, 0, true, 73.9),
];

/// Table G (2026-12-06 09:42 UTC, session 7): the first out-of-sample check of the model with
/// the tensor-parallel link and TP_GROUP_LOSS, its top 8 per N, three rounds of 20 steps.
const G: &[Row] = &[
    (2, 1, 1, 2, 8, 1, 0, true, 70.8),
    (2, 1, 1, 2, 4, 2, 0, true, 69.3),
    (2, 2, 1, 1, 4, 1, 1, false, 72.2),
    (2, 2, 1, 1, 2, 2, 1, false, 73.6),
    (2, 1, 1, 2, 2, 4, 0, true, 72.0),
    (2, 2, 1, 1, 1, 4, 1, false, 76.7),
    (2, 1, 1, 2, 1, 8, 0, true, 80.0),
    (2, 1, 2, 1, 2, 4, 0, false, 84.0),
    (4, 1, 2, 2, 8, 1, 0, true, 76.9),
    (4, 1, 2, 2, 4, 2, 0, true, 75.6),
    (4, 2, 2, 1, 2, 2, 1, false, 82.3),
    (4, 2, 2, 1, 4, 1, 1, false, 77.0),
    (4, 2, 1, 2, 4, 1, 1, true, 84.6),
    (4, 2, 2, 1, 1, 4, 1, false, 90.6),
    (4, 1, 2, 2, 2, 4, 0, true, 77.7),
    (4, 2, 1, 2, 2, 2, 1, true, 86.0),
    (8, 2, 4, 1, 2, 2, 1, false, 90.1),
    (8, 1, 4, 2, 4, 2, 0, true, 85.5),
    (8, 2, 2, 2, 4, 1, 1, true, 85.7),
    (8, 2, 4, 1, 1, 4, 1, false, 91.3),
    (8, 2, 2, 2, 2, 2, 1, true, 93.2),
    (8, 2, 4, 1, 4, 1, 1, false, 81.1),
    (8, 4, 2, 1, 1, 2, 1, false, 103.4),
    (8, 1, 4, 2, 8, 1, 0, true, 75.5),
];

/// Tables H and I (2026-12-06 09:48 and 09:51 UTC, session 7): the out-of-sample checks of the
/// final model (after P2P_MESSAGE_SECS was refitted with G), its top 8 per N, three rounds of
/// 20 steps each. No constant was fitted to them.
const H: &[Row] = &[
    (2, 1, 1, 2, 8, 1, 0, true, 71.4),
    (2, 1, 1, 2, 4, 2, 0, true, 69.7),
    (2, 2, 1, 1, 4, 1, 1, false, 71.6),
    (2, 2, 1, 1, 2, 2, 1, false, 73.5),
    (2, 1, 1, 2, 2, 4, 0, true, 72.4),
    (2, 2, 1, 1, 1, 4, 1, false, 75.7),
    (2, 1, 1, 2, 1, 8, 0, true, 78.2),
    (2, 1, 2, 1, 2, 4, 0, false, 82.6),
    (4, 1, 2, 2, 8, 1, 0, true, 72.1),
    (4, 1, 2, 2, 4, 2, 0, true, 73.2),
    (4, 2, 2, 1, 4, 1, 1, false, 75.0),
    (4, 2, 2, 1, 2, 2, 1, false, 79.5),
    (4, 2, 1, 2, 4, 1, 1, true, 79.2),
    (4, 2, 2, 1, 1, 4, 1, false, 87.7),
    (4, 1, 2, 2, 2, 4, 0, true, 74.5),
    (4, 1, 4, 1, 2, 4, 0, false, 86.7),
    (8, 2, 4, 1, 2, 2, 1, false, 85.4),
    (8, 2, 4, 1, 4, 1, 1, false, 79.6),
    (8, 1, 4, 2, 8, 1, 0, true, 76.5),
    (8, 1, 4, 2, 4, 2, 0, true, 79.0),
    (8, 2, 4, 1, 1, 4, 1, false, 88.5),
    (8, 2, 2, 2, 4, 1, 1, true, 86.2),
    (8, 1, 4, 2, 2, 4, 0, true, 83.7),
    (8, 2, 2, 2, 2, 2, 1, true, 87.1),
];

/// Table I: see table H.
const I: &[Row] = &[
    (2, 1, 1, 2, 8, 1, 0, true, 74.9),
    (2, 1, 1, 2, 4, 2, 0, true, 70.8),
    (2, 2, 1, 1, 4, 1, 1, false, 70.4),
    (2, 2, 1, 1, 2, 2, 1, false, 74.8),
    (2, 1, 1, 2, 2, 4, 0, true, 74.7),
    (2, 2, 1, 1, 1, 4, 1, false, 77.7),
    (2, 1, 1, 2, 1, 8, 0, true, 85.1),
    (2, 1, 2, 1, 2, 4, 0, false, 85.1),
    (4, 1, 2, 2, 8, 1, 0, true, 75.5),
    (4, 1, 2, 2, 4, 2, 0, true, 76.2),
    (4, 2, 2, 1, 4, 1, 1, false, 78.7),
    (4, 2, 2, 1, 2, 2, 1, false, 81.8),
    (4, 2, 1, 2, 4, 1, 1, true, 83.6),
    (4, 2, 2, 1, 1, 4, 1, false, 90.2),
    (4, 1, 2, 2, 2, 4, 0, true, 78.1),
    (4, 1, 4, 1, 2, 4, 0, false, 87.2),
    (8, 2, 4, 1, 2, 2, 1, false, 87.6),
    (8, 2, 4, 1, 4, 1, 1, false, 82.9),
    (8, 1, 4, 2, 8, 1, 0, true, 78.9),
    (8, 1, 4, 2, 4, 2, 0, true, 82.4),
    (8, 2, 4, 1, 1, 4, 1, false, 90.4),
    (8, 2, 2, 2, 4, 1, 1, true, 89.2),
    (8, 1, 4, 2, 2, 4, 0, true, 87.5),
    (8, 2, 2, 2, 2, 2, 1, true, 92.7),
];

/// Ranks 1..n with ties sharing their mean rank.
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        for &k in &order[i..=j] {
            r[k] = (i + j) as f64 / 2.0 + 1.0;
        }
        i = j + 1;
    }
    r
}

/// Spearman's ρ: Pearson's correlation of the ranks.
pub(super) fn spearman(a: &[f64], b: &[f64]) -> f64 {
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

#[test]
fn spearman_of_hand_ranked_cases() {
    assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), 1.0);
    assert_eq!(spearman(&[1.0, 2.0, 3.0], &[30.0, 20.0, 10.0]), -1.0);
    // Ranks (1, 2, 3) against (1, 3, 2): 1 − 6·2 / (3·8) = 0.5.
    assert!((spearman(&[1.0, 2.0, 3.0], &[1.0, 3.0, 2.0]) - 0.5).abs() < 1e-12);
}

/// `cpu_plan`'s test model with the benchmark's vocabulary (32, padded to 64).
fn model() -> CpuModel {
    CpuModel {
        padded_vocab: 64,
        ..super::tests::model()
    }
}

/// The development machine as the runs used it; `panels`: the runtime packed each weight once
/// per step (tables E1, E2 and D; A–C were measured before it did).
fn host(panels: bool) -> CpuHost {
    CpuHost {
        cores: 2,
        compute: crate::cpu_time::CpuCalibration {
            weight_panels: panels,
            ..Default::default()
        },
        link: CommCalibration::tcp(),
        tp_link: CommCalibration::tcp_tensor_parallel(),
        // The runtime's default gradient bucket (`train::dp::DEFAULT_BUCKET_BYTES`, which every
        // run of the tables used and `plan --cpu` predicts with; until session 9 this harness
        // had 2 MiB, so its dp predictions were up to ~1% off the printed ones).
        bucket_bytes: 512 << 10,
        overlap: true,
    }
}

/// One N of one table against the model.
#[derive(Debug)]
struct Score {
    n: u64,
    /// Spearman's ρ over all rows of N.
    rho: f64,
    /// Spearman's ρ over the model's top 5 of those rows (issue 11's measure; all rows when
    /// there are at most 5).
    top5_rho: f64,
    /// Rows within 15% of the prediction.
    within: usize,
    rows: usize,
    /// Largest |log(measured / predicted)|.
    worst: f64,
}

fn check(rows: &[Row], panels: bool) -> Vec<Score> {
    let h = host(panels);
    let mut out = Vec::new();
    for n in [2, 4, 8] {
        let (mut pred, mut meas) = (Vec::new(), Vec::new());
        for row in rows.iter().filter(|r| r.0 == n) {
            pred.push(predicted(row, &h).1);
            meas.push(row.8);
        }
        let mut top: Vec<usize> = (0..pred.len()).collect();
        top.sort_by(|&a, &b| pred[a].total_cmp(&pred[b]));
        top.truncate(5);
        let (p5, m5): (Vec<f64>, Vec<f64>) = top.iter().map(|&i| (pred[i], meas[i])).unzip();
        out.push(Score {
            n,
            rho: spearman(&pred, &meas),
            top5_rho: spearman(&p5, &m5),
            within: pred
                .iter()
                .zip(&meas)
                .filter(|(p, m)| (*m / *p - 1.0).abs() <= 0.15)
                .count(),
            rows: pred.len(),
            worst: pred
                .iter()
                .zip(&meas)
                .map(|(p, m)| (m / p).ln().abs())
                .fold(0.0, f64::max),
        });
    }
    out
}

#[test]
fn the_measured_tables_rank_and_their_steps_are_within_15_percent() {
    // Per table and N = 2, 4, 8: (least ρ over all rows, least top-5 ρ, least rows within 15%),
    // what the model scores with the shipped constants (every row within 15%), and every row
    // within 20%. In sample: RELOAD_SECS_PER_BYTE and TP_WAKE_SECS were fitted to tables A–G
    // (session 8), TP_GROUP_LOSS to the tp 4 rows of C and F, P2P_MESSAGE_SECS to A–G, the
    // tensor-parallel link to table D's measured collective time, DP_WAKE_SECS and the
    // per-parameter constants to A–C; docs/cpu-planner.md has the held-out checks. Table A
    // N = 8: one shape in five ZeRO/sp variants. Tables B, C N = 4, C N = 8 and D, G N = 2: the
    // model's top 5 lie within 5–7% of each other, measured or predicted, and are ordered by
    // noise (ρ over all rows 0.86–0.97). Session 9 gave this harness the runtime's 512 KiB
    // gradient bucket (it had 2 MiB): C N = 8's ρ over all rows fell from ≥ 0.95 to 0.94; every
    // other bound holds.
    type Expect<'a> = (&'a str, &'a [Row], bool, [(f64, f64, usize); 3]);
    let expect: [Expect; 7] = [
        (
            "A",
            A,
            false,
            [(0.99, 0.99, 5), (0.99, 0.99, 5), (0.71, 0.71, 5)],
        ),
        (
            "B",
            B,
            false,
            [(0.89, 0.89, 5), (0.69, 0.69, 5), (0.89, 0.89, 5)],
        ),
        (
            "C",
            C,
            false,
            [(0.97, 0.79, 11), (0.86, 0.69, 12), (0.94, 0.69, 12)],
        ),
        (
            "E1",
            E1,
            true,
            [(0.89, 0.89, 5), (0.99, 0.99, 5), (0.89, 0.89, 5)],
        ),
        (
            "E2",
            E2,
            true,
            [(0.99, 0.99, 5), (0.89, 0.89, 5), (0.79, 0.79, 5)],
        ),
        (
            "D",
            D,
            true,
            [(0.88, 0.59, 8), (0.85, 0.99, 8), (0.95, 0.89, 8)],
        ),
        (
            "G",
            G,
            true,
            [(0.9, 0.59, 8), (0.9, 0.89, 8), (0.97, 0.89, 8)],
        ),
    ];
    for (table, rows, panels, per_n) in expect {
        for (s, (min_rho, min_top5, min_within)) in check(rows, panels).into_iter().zip(per_n) {
            let n = s.n;
            assert!(s.rows >= 5, "table {table} N={n}: a top 5 needs 5 rows");
            assert!(s.rho >= min_rho, "table {table} N={n}: {s:?}");
            assert!(s.top5_rho >= min_top5, "table {table} N={n}: {s:?}");
            assert!(s.within >= min_within, "table {table} N={n}: {s:?}");
            assert!(s.worst < 0.2, "table {table} N={n}: {s:?}");
        }
    }
}

#[test]
fn table_f_steps_are_within_15_percent() {
    // Table F's probes (tp 4 over more ranks than cores, tp without sequence parallelism,
    // ZeRO-2/3) are not a ranking: every row within 15%, and the RMS log error below 6%.
    let rms = all_within_15_percent("F", F);
    assert!(rms < 0.06, "RMS log error {rms:.3}");
}

#[test]
fn the_held_out_checks_are_within_15_percent() {
    // Tables H and I were measured after session 7's last constant was fitted: every one of
    // their 48 rows within 15% of the prediction. Session 8's reload term was fitted to A–G,
    // but its form was chosen after studying H and I's residuals, so they are no longer held
    // out (top-5 ρ 0.80 / 0.90 / 0.90 and −0.20 / 1.00 / 0.90 now, 0.80 / 0.90 / 0.10 and
    // −0.20 / 1.00 / 0.10 before); the fresh held-out runs are in `held_out`.
    for (table, rows) in [("H", H), ("I", I)] {
        let rms = all_within_15_percent(table, rows);
        assert!(rms < 0.06, "table {table}: RMS log error {rms:.3}");
    }
}
