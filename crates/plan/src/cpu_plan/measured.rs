//! The layout model against the quiet measurements of docs/cpu-planner.md (2026-12-06,
//! `bench/cpu_plan_check.sh`, L4 H4 C256 T128, vocabulary 32, global batch 8, 2-core AMD Zen 5
//! VM): table A (02:03 UTC, 15 layouts, one round), table B (04:42, the top 5 of the model then,
//! two rounds), table C (05:55, its top 12, three rounds). The two per-parameter constants of
//! `cpu_time` were fitted to A, the three constants of `sharing` to all three tables: this is
//! an in-sample check. The held-out checks (the constants fitted to A and B and checked on C;
//! leaving one N out) are in docs/cpu-planner.md; the lead's quiet rerun of the new top 5 is
//! the next out-of-sample one.

use super::*;

/// (N, dp, pp, tp, micro-batch, micro-batches, ZeRO, sp, measured median step ms).
type Row = (u64, u64, u64, u64, u64, u64, u8, bool, f64);

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

fn model() -> CpuModel {
    CpuModel {
        padded_vocab: 64,
        seq_len: 128,
        channels: 256,
        heads: 4,
        layers: 4,
    }
}

fn host() -> CpuHost {
    CpuHost {
        cores: 2,
        // Measured before the runtime packed weight panels once per step.
        compute: crate::cpu_time::CpuCalibration {
            weight_panels: false,
            ..Default::default()
        },
        link: CommCalibration::tcp(),
        bucket_bytes: 1 << 21,
        overlap: true,
    }
}

/// Per N: (Spearman's ρ, rows within 15%, rows, largest |log(measured/predicted)|).
fn check(rows: &[Row]) -> Vec<(u64, f64, usize, usize, f64)> {
    let (m, h) = (model(), host());
    let mut out = Vec::new();
    for n in [2, 4, 8] {
        let (mut pred, mut meas) = (Vec::new(), Vec::new());
        for &(_, dp, pp, tp, batch, microbatches, zero, sp, ms) in rows.iter().filter(|r| r.0 == n)
        {
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
            pred.push(1e3 * predict(&m, &l, &h).step_secs);
            meas.push(ms);
        }
        let within = pred
            .iter()
            .zip(&meas)
            .filter(|(p, m)| (*m / *p - 1.0).abs() <= 0.15)
            .count();
        let worst = pred
            .iter()
            .zip(&meas)
            .map(|(p, m)| (m / p).ln().abs())
            .fold(0.0, f64::max);
        out.push((n, spearman(&pred, &meas), within, pred.len(), worst));
    }
    out
}

#[test]
fn the_three_tables_rank_and_their_steps_are_within_15_percent() {
    // (table, rows, per N = 2, 4, 8: least ρ, least rows within 15%). What the model achieved
    // when its constants were fitted (to all three tables: in sample); docs/cpu-planner.md has
    // the held-out checks (fitted to A and B with C left out; leaving one N out).
    // Table A N = 4: five rows within 6% of each other measured in one round (±5% is the
    // spread of repeated runs); N = 8: one shape in five ZeRO/sp variants. Table B N = 8:
    // dp2 pp2 tp2 b1 measured 124.5 ms there and 113.5 ms in table C (predicted 106.8).
    // Table C N = 4: tp4 b8 measured 110.6 ms (predicted 95.4).
    type Expect<'a> = (&'a str, &'a [Row], [(f64, usize); 3]);
    let expect: [Expect; 3] = [
        ("A", A, [(0.99, 5), (0.49, 5), (0.71, 5)]),
        ("B", B, [(0.99, 5), (0.89, 5), (0.99, 4)]),
        ("C", C, [(0.9, 11), (0.92, 11), (0.85, 12)]),
    ];
    for (table, rows, per_n) in expect {
        for ((n, rho, within, k, worst), (min_rho, min_within)) in
            check(rows).into_iter().zip(per_n)
        {
            assert!(
                rho >= min_rho,
                "table {table} N={n}: rho {rho:.2} < {min_rho}"
            );
            assert!(
                within >= min_within,
                "table {table} N={n}: {within} of {k} within 15%"
            );
            assert!(
                worst < 0.2,
                "table {table} N={n}: worst log ratio {worst:.3}"
            );
        }
    }
}
