//! The held-out checks of session 8's model (`sharing::RELOAD_SECS_PER_BYTE`, fitted on tables
//! A–G): four fresh quiet runs of `bench/cpu_plan_check.sh` on a clean clone of main at 52e5514,
//! 2026-12-06, after the last constant was fixed — J (11:51 UTC) and K (11:56) with `TOP=5
//! STEPS=40 ROUNDS=5`, M (12:05) with `TOP=8 STEPS=20 ROUNDS=3`, N (12:08) as J. No constant was
//! fitted to them. A fifth run (L, 12:01, as M) was disturbed at N = 2 and 4 by load from
//! outside the benchmark (rounds of one layout 72–95 ms) and is only in
//! docs/cpu-planner-measurements.md.
//! P, Q and R (12:53–12:56, `NPROCS=2`, as J) repeat N = 2 alone, in a slower phase of the
//! machine (every layout 3–16% above its prediction).
//!
//! Session 9 (same model, a build of main at b2a2ee4): S (14:08 UTC, `NPROCS=2 TOP=5 STEPS=40
//! ROUNDS=15`), T (14:16) and U (14:29, both `NPROCS="2 4 8" TOP=5 STEPS=40 ROUNDS=9`), quiet;
//! V (15:22, as T) after the session's last change to the planner (its fp32 predictions the
//! same).
//! From them on, the benchmark prints the measurement's own reproducibility (the medians of the
//! odd and of the even rounds ranked against each other): S 1.00, T 0.90 / 1.00 / 0.90, U 1.00 /
//! 0.90 / 1.00, V 0.80 / 0.80 / 0.90. Recomputed from the rounds of the earlier runs: N = 2 J 0.90, K 0.90, N 0.30,
//! P 0.10, Q 0.50, R 0.90.

use super::{all_within_15_percent, check, host, predicted, Row};

/// Table J (11:51 UTC): the model's top 5 per N, five rounds of 40 steps.
const J: &[Row] = &[
    (2, 1, 1, 2, 8, 1, 0, true, 68.4),
    (2, 1, 1, 2, 4, 2, 0, true, 68.2),
    (2, 2, 1, 1, 4, 1, 1, false, 69.8),
    (2, 2, 1, 1, 2, 2, 1, false, 73.1),
    (2, 1, 1, 2, 2, 4, 0, true, 72.8),
    (4, 1, 2, 2, 8, 1, 0, true, 70.6),
    (4, 1, 2, 2, 4, 2, 0, true, 73.4),
    (4, 2, 2, 1, 4, 1, 1, false, 78.1),
    (4, 2, 2, 1, 2, 2, 1, false, 79.0),
    (4, 2, 1, 2, 4, 1, 1, true, 79.3),
    (8, 1, 4, 2, 8, 1, 0, true, 77.6),
    (8, 2, 4, 1, 4, 1, 1, false, 78.7),
    (8, 1, 4, 2, 4, 2, 0, true, 78.3),
    (8, 2, 4, 1, 2, 2, 1, false, 84.0),
    (8, 2, 2, 2, 4, 1, 1, true, 83.4),
];

/// Table K (11:56 UTC): as J.
const K: &[Row] = &[
    (2, 1, 1, 2, 8, 1, 0, true, 68.4),
    (2, 1, 1, 2, 4, 2, 0, true, 69.3),
    (2, 2, 1, 1, 4, 1, 1, false, 70.5),
    (2, 2, 1, 1, 2, 2, 1, false, 74.6),
    (2, 1, 1, 2, 2, 4, 0, true, 72.7),
    (4, 1, 2, 2, 8, 1, 0, true, 72.5),
    (4, 1, 2, 2, 4, 2, 0, true, 73.2),
    (4, 2, 2, 1, 4, 1, 1, false, 78.9),
    (4, 2, 2, 1, 2, 2, 1, false, 78.9),
    (4, 2, 1, 2, 4, 1, 1, true, 81.1),
    (8, 1, 4, 2, 8, 1, 0, true, 83.4),
    (8, 2, 4, 1, 4, 1, 1, false, 84.2),
    (8, 1, 4, 2, 4, 2, 0, true, 89.4),
    (8, 2, 4, 1, 2, 2, 1, false, 92.1),
    (8, 2, 2, 2, 4, 1, 1, true, 91.8),
];

/// Table M (12:05 UTC): the model's top 8 per N, three rounds of 20 steps.
const M: &[Row] = &[
    (2, 1, 1, 2, 8, 1, 0, true, 78.5),
    (2, 1, 1, 2, 4, 2, 0, true, 72.0),
    (2, 2, 1, 1, 4, 1, 1, false, 76.2),
    (2, 2, 1, 1, 2, 2, 1, false, 74.9),
    (2, 1, 1, 2, 2, 4, 0, true, 76.4),
    (2, 2, 1, 1, 1, 4, 1, false, 79.2),
    (2, 1, 1, 2, 1, 8, 0, true, 82.9),
    (2, 1, 2, 1, 2, 4, 0, false, 89.6),
    (4, 1, 2, 2, 8, 1, 0, true, 74.0),
    (4, 1, 2, 2, 4, 2, 0, true, 78.4),
    (4, 2, 2, 1, 4, 1, 1, false, 82.2),
    (4, 2, 2, 1, 2, 2, 1, false, 81.7),
    (4, 2, 1, 2, 4, 1, 1, true, 83.5),
    (4, 1, 2, 2, 2, 4, 0, true, 72.6),
    (4, 2, 1, 2, 2, 2, 1, true, 88.2),
    (4, 1, 4, 1, 2, 4, 0, false, 89.4),
    (8, 1, 4, 2, 8, 1, 0, true, 75.2),
    (8, 2, 4, 1, 4, 1, 1, false, 78.5),
    (8, 1, 4, 2, 4, 2, 0, true, 76.6),
    (8, 2, 4, 1, 2, 2, 1, false, 83.1),
    (8, 2, 2, 2, 4, 1, 1, true, 83.4),
    (8, 2, 4, 1, 1, 4, 1, false, 86.7),
    (8, 1, 4, 2, 2, 4, 0, true, 81.7),
    (8, 2, 2, 2, 2, 2, 1, true, 91.5),
];

/// Table N (12:08 UTC): as J.
const N: &[Row] = &[
    (2, 1, 1, 2, 8, 1, 0, true, 72.8),
    (2, 1, 1, 2, 4, 2, 0, true, 71.4),
    (2, 2, 1, 1, 4, 1, 1, false, 70.6),
    (2, 2, 1, 1, 2, 2, 1, false, 73.1),
    (2, 1, 1, 2, 2, 4, 0, true, 72.7),
    (4, 1, 2, 2, 8, 1, 0, true, 76.5),
    (4, 1, 2, 2, 4, 2, 0, true, 76.9),
    (4, 2, 2, 1, 4, 1, 1, false, 80.7),
    (4, 2, 2, 1, 2, 2, 1, false, 82.3),
    (4, 2, 1, 2, 4, 1, 1, true, 83.4),
    (8, 1, 4, 2, 8, 1, 0, true, 80.9),
    (8, 2, 4, 1, 4, 1, 1, false, 81.9),
    (8, 1, 4, 2, 4, 2, 0, true, 80.6),
    (8, 2, 4, 1, 2, 2, 1, false, 86.8),
    (8, 2, 2, 2, 4, 1, 1, true, 87.6),
];

/// Tables P, Q and R (12:53, 12:55, 12:56 UTC): N = 2 alone, as J.
const P: &[Row] = &[
    (2, 1, 1, 2, 8, 1, 0, true, 77.4),
    (2, 1, 1, 2, 4, 2, 0, true, 73.8),
    (2, 2, 1, 1, 4, 1, 1, false, 75.7),
    (2, 2, 1, 1, 2, 2, 1, false, 77.7),
    (2, 1, 1, 2, 2, 4, 0, true, 77.1),
];
const Q: &[Row] = &[
    (2, 1, 1, 2, 8, 1, 0, true, 70.8),
    (2, 1, 1, 2, 4, 2, 0, true, 72.0),
    (2, 2, 1, 1, 4, 1, 1, false, 73.8),
    (2, 2, 1, 1, 2, 2, 1, false, 75.3),
    (2, 1, 1, 2, 2, 4, 0, true, 73.4),
];
const R: &[Row] = &[
    (2, 1, 1, 2, 8, 1, 0, true, 75.3),
    (2, 1, 1, 2, 4, 2, 0, true, 70.6),
    (2, 2, 1, 1, 4, 1, 1, false, 75.8),
    (2, 2, 1, 1, 2, 2, 1, false, 79.4),
    (2, 1, 1, 2, 2, 4, 0, true, 74.4),
];

/// Table S (14:08 UTC): N = 2 alone, fifteen rounds of 40 steps.
const S: &[Row] = &[
    (2, 1, 1, 2, 8, 1, 0, true, 67.0),
    (2, 1, 1, 2, 4, 2, 0, true, 67.4),
    (2, 2, 1, 1, 4, 1, 1, false, 68.9),
    (2, 2, 1, 1, 2, 2, 1, false, 72.3),
    (2, 1, 1, 2, 2, 4, 0, true, 70.8),
];

/// Table T (14:16 UTC): the model's top 5 per N, nine rounds of 40 steps (two decimals where
/// one would tie: N = 8's second and third, 73.488 and 73.522).
const T: &[Row] = &[
    (2, 1, 1, 2, 8, 1, 0, true, 68.9),
    (2, 1, 1, 2, 4, 2, 0, true, 69.2),
    (2, 2, 1, 1, 4, 1, 1, false, 71.5),
    (2, 2, 1, 1, 2, 2, 1, false, 72.6),
    (2, 1, 1, 2, 2, 4, 0, true, 72.7),
    (4, 1, 2, 2, 8, 1, 0, true, 69.2),
    (4, 1, 2, 2, 4, 2, 0, true, 70.6),
    (4, 2, 2, 1, 4, 1, 1, false, 73.9),
    (4, 2, 2, 1, 2, 2, 1, false, 76.4),
    (4, 2, 1, 2, 4, 1, 1, true, 77.7),
    (8, 1, 4, 2, 8, 1, 0, true, 71.4),
    (8, 2, 4, 1, 4, 1, 1, false, 73.49),
    (8, 1, 4, 2, 4, 2, 0, true, 73.52),
    (8, 2, 4, 1, 2, 2, 1, false, 77.5),
    (8, 2, 2, 2, 4, 1, 1, true, 78.5),
];

/// Table U (14:29 UTC): as T.
const U: &[Row] = &[
    (2, 1, 1, 2, 8, 1, 0, true, 68.2),
    (2, 1, 1, 2, 4, 2, 0, true, 67.6),
    (2, 2, 1, 1, 4, 1, 1, false, 69.8),
    (2, 2, 1, 1, 2, 2, 1, false, 71.7),
    (2, 1, 1, 2, 2, 4, 0, true, 69.6),
    (4, 1, 2, 2, 8, 1, 0, true, 69.8),
    (4, 1, 2, 2, 4, 2, 0, true, 70.0),
    (4, 2, 2, 1, 4, 1, 1, false, 73.7),
    (4, 2, 2, 1, 2, 2, 1, false, 76.5),
    (4, 2, 1, 2, 4, 1, 1, true, 78.2),
    (8, 1, 4, 2, 8, 1, 0, true, 72.1),
    (8, 2, 4, 1, 4, 1, 1, false, 75.6),
    (8, 1, 4, 2, 4, 2, 0, true, 74.5),
    (8, 2, 4, 1, 2, 2, 1, false, 80.8),
    (8, 2, 2, 2, 4, 1, 1, true, 80.3),
];

/// Table V (15:22 UTC, after every change of session 9; `plan --cpu`'s fp32 predictions are
/// unchanged): as T. Two decimals at N = 2, where the first three lie within 0.3 ms.
const V: &[Row] = &[
    (2, 1, 1, 2, 8, 1, 0, true, 69.57),
    (2, 1, 1, 2, 4, 2, 0, true, 69.71),
    (2, 2, 1, 1, 4, 1, 1, false, 69.44),
    (2, 2, 1, 1, 2, 2, 1, false, 72.3),
    (2, 1, 1, 2, 2, 4, 0, true, 72.5),
    (4, 1, 2, 2, 8, 1, 0, true, 71.9),
    (4, 1, 2, 2, 4, 2, 0, true, 72.4),
    (4, 2, 2, 1, 4, 1, 1, false, 74.5),
    (4, 2, 2, 1, 2, 2, 1, false, 77.1),
    (4, 2, 1, 2, 4, 1, 1, true, 78.0),
    (8, 1, 4, 2, 8, 1, 0, true, 74.0),
    (8, 2, 4, 1, 4, 1, 1, false, 75.5),
    (8, 1, 4, 2, 4, 2, 0, true, 75.7),
    (8, 2, 4, 1, 2, 2, 1, false, 81.7),
    (8, 2, 2, 2, 4, 1, 1, true, 81.1),
];

/// The rows of `rows` more than 15% off their prediction.
fn outside_15_percent(rows: &[Row]) -> Vec<Row> {
    let h = host(true);
    rows.iter()
        .filter(|row| (row.8 / predicted(row, &h).1 - 1.0).abs() > 0.15)
        .copied()
        .collect()
}

#[test]
fn the_fresh_runs_steps_are_within_15_percent() {
    for (table, rows) in [
        ("J", J),
        ("K", K),
        ("N", N),
        ("S", S),
        ("T", T),
        ("U", U),
        ("V", V),
    ] {
        let rms = all_within_15_percent(table, rows);
        assert!(rms < 0.07, "table {table}: RMS log error {rms:.3}");
    }
    // Q and R ran in the machine's slower phase: all within 15%, RMS 0.06 and 0.09.
    for (table, rows) in [("Q", Q), ("R", R)] {
        let rms = all_within_15_percent(table, rows);
        assert!(rms < 0.1, "table {table}: RMS log error {rms:.3}");
    }
    // M: 23 of 24, P: 4 of 5. The one outside is tp2 b8 at N = 2 both times (78.5 and 77.4 ms
    // against 66.9 predicted; J, K, N and Q measured it at 68.4–72.8).
    assert_eq!(outside_15_percent(M), [(2, 1, 1, 2, 8, 1, 0, true, 78.5)]);
    assert_eq!(outside_15_percent(P), [(2, 1, 1, 2, 8, 1, 0, true, 77.4)]);
}

#[test]
fn the_fresh_runs_rank_the_top_5_at_4_and_8_processes() {
    // Top-5 ρ as measured (N = 2, 4, 8): J 0.80 / 1.00 / 0.80, K 0.90 / 0.90 / 0.90,
    // M −0.10 / 0.90 / 0.90, N 0.10 / 1.00 / 0.70; N = 2 alone P 0.20, Q 0.70, R 0.20. N = 2 is
    // not asserted: its five lie within 6.6% predicted and tp2 b8 alone moved 68.4 → 78.5 ms
    // between runs (docs/cpu-planner.md).
    for (table, rows, at_least) in [
        ("J", J, [0.99, 0.79]),
        ("K", K, [0.89, 0.89]),
        ("M", M, [0.89, 0.89]),
        ("N", N, [0.99, 0.69]),
    ] {
        let scores = check(rows, true);
        for (s, min) in scores[1..].iter().zip(at_least) {
            assert!(s.top5_rho >= min, "table {table}: {s:?}");
        }
    }
}

#[test]
fn session_9s_quiet_runs_rank_the_top_5() {
    // Top-5 ρ at N = 2 / 4 / 8: S 0.90 (N = 2 alone), T 1.00 / 1.00 / 1.00, U 0.60 / 1.00 /
    // 0.80, V 0.70 / 1.00 / 0.90. U's N = 2 misses: tp2 b2×4 measured third (69.6 ms),
    // predicted fifth, 3.3% behind dp2 b4 (69.8 ms) — closer than the planner's resolution.
    // V's: its first three measured within 0.3 ms of each other (69.44–69.71), dp2 b4 first.
    let s = check(S, true);
    assert!(s[0].top5_rho >= 0.89, "table S: {s:?}");
    for (table, rows, at_least) in [
        ("T", T, [0.99, 0.99, 0.99]),
        ("U", U, [0.59, 0.99, 0.79]),
        ("V", V, [0.69, 0.99, 0.89]),
    ] {
        for (score, min) in check(rows, true).iter().zip(at_least) {
            assert!(score.top5_rho >= min, "table {table}: {score:?}");
        }
    }
}

/// The claim behind [`super::super::RESOLUTION`]: in the held-out runs whose rounds agreed with
/// themselves (split-half ρ ≥ 0.8: J, K, S, T, U, V), every pair of rows of one N predicted
/// more than 4 % apart measured in the predicted order. 3 % held on J, K, S and T and then
/// broke on U (pairs 3.4 % and 3.7 % apart, measured 0.2 and 0.5 ms the other way); V, measured
/// after the value was set, kept it. Not in a slow phase
/// of the machine: R's rounds agreed (ρ 0.90) but tp2 b8 measured slower than tp2 b2×4,
/// predicted 6.6% faster.
#[test]
fn pairs_predicted_further_apart_than_the_resolution_measure_in_order() {
    let h = host(true);
    let resolution = super::super::RESOLUTION;
    let out_of_order = |rows: &[Row], by: f64| -> Vec<(Row, Row)> {
        let mut v = Vec::new();
        for a in rows {
            for b in rows.iter().filter(|b| b.0 == a.0) {
                if predicted(b, &h).1 > predicted(a, &h).1 * (1.0 + by) && a.8 >= b.8 {
                    v.push((*a, *b));
                }
            }
        }
        v
    };
    let mut pairs = 0;
    for (table, rows) in [("J", J), ("K", K), ("S", S), ("T", T), ("U", U), ("V", V)] {
        assert_eq!(out_of_order(rows, resolution), [], "table {table}");
        pairs += rows
            .iter()
            .flat_map(|a| rows.iter().map(move |b| (a, b)))
            .filter(|(a, b)| {
                a.0 == b.0 && predicted(b, &h).1 > predicted(a, &h).1 * (1.0 + resolution)
            })
            .count();
    }
    assert_eq!(pairs, 68);
    // What set it at 4 %: U at 3 %, and R, the slow phase, at 4 %.
    assert_eq!(
        out_of_order(U, 0.03).len(),
        2,
        "{:?}",
        out_of_order(U, 0.03)
    );
    assert!(!out_of_order(R, resolution).is_empty());
}

/// Each layout's median over the tables that measured it (the mean of the middle two for an
/// even count): the measured ranking estimated from every run rather than one.
fn pooled(tables: &[&[Row]]) -> Vec<Row> {
    let mut out: Vec<Row> = Vec::new();
    for row in tables.iter().flat_map(|t| t.iter()) {
        let key = |r: &Row| (r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7);
        if out.iter().any(|o| key(o) == key(row)) {
            continue;
        }
        let mut v: Vec<f64> = tables
            .iter()
            .flat_map(|t| t.iter())
            .filter(|r| key(r) == key(row))
            .map(|r| r.8)
            .collect();
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            0.5 * (v[mid - 1] + v[mid])
        };
        out.push((
            row.0, row.1, row.2, row.3, row.4, row.5, row.6, row.7, median,
        ));
    }
    out
}

#[test]
fn pooled_over_every_held_out_run_the_top_5_rank_as_predicted() {
    // One run's ranking of layouts this close is mostly that run's noise (at N = 2 two runs
    // agree with each other at a median ρ of 0.40). The medians over all of them — eleven runs
    // at N = 2 (slow phases included), seven at N = 4 and 8 — rank the model's top 5 at ρ
    // 0.90 / 1.00 / 0.90; each swap is of two layouts predicted closer than the 4% resolution
    // (N = 2: dp2 b2×2 and tp2 b2×4, 0.8% apart; N = 8: dp2 pp4 b4 and pp4 tp2 b4×2, 0.2%).
    // Before V, the last run, N = 8 pooled to 0.80.
    let all = pooled(&[J, K, M, N, P, Q, R, S, T, U, V]);
    let scores = check(&all, true);
    for (score, (n, expected)) in scores.iter().zip([(2, 0.9), (4, 1.0), (8, 0.9)]) {
        assert_eq!(score.n, n);
        assert!(score.top5_rho >= expected - 1e-9, "N = {n}: {score:?}");
    }
    assert_eq!(
        all.iter().filter(|r| r.0 == 2).count(),
        8,
        "M's three extra rows at N = 2 pool too (only M ran them)"
    );
}
