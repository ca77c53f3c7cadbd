//! Straggler detection: the data-parallel rank that is consistently slower than the others.
//!
//! Every step, each rank measures how long it was **busy**: the step's wall time up to the
//! moment it hands its losses to the others, minus the gradient communication its training
//! thread waited for. The all-gather of the step's losses (`crate::dp::Dp::gather_losses`),
//! which every synchronous data-parallel step does anyway, carries that number to every rank,
//! so detection costs no extra message. The rest of a rank's step is **waiting** (for the
//! slowest peer, in the collectives).
//!
//! Data-parallel rank 0 keeps the last `window` steps. Once the window is full, it takes each
//! rank's median busy time over the window, and the median of those over the ranks; a rank
//! whose median is more than `margin` above it (0.2: 20 % slower), and by at least
//! [`MIN_GAP_SECS`], is a straggler. Medians, so
//! that one slow step (a page fault, a checkpoint) names nobody; "consistently" means over
//! most of the window. A rank is named when it becomes a straggler and again every `window`
//! steps while it stays one: a warning on stderr and a `straggler` line in `metrics.jsonl`.
//!
//! `SCALETRAIN_INJECT_SLOW_RANK=R:MS` (a fault drill, like `stability.inject_nan_steps`) makes
//! data-parallel rank R sleep MS milliseconds of every step, as busy time.

use crate::error::TrainError;
use std::collections::VecDeque;
use std::time::Duration;

/// A straggler is also at least this much slower per step than the median rank: on a shared
/// machine, ranks of a few milliseconds a step differ by a millisecond or two for tens of
/// steps at a time (scheduling), which is not worth a warning.
pub const MIN_GAP_SECS: f64 = 0.005;

/// Detection settings (`train.straggler_margin`, `train.straggler_window`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StragglerConfig {
    /// How much slower than the median rank a rank must be (0.2 = 20 %).
    pub margin: f64,
    /// Steps the medians are taken over; 0 turns detection off.
    pub window: usize,
}

/// A rank found slower than the others (one `straggler` line of `metrics.jsonl`).
#[derive(Clone, Debug, PartialEq)]
pub struct Straggler {
    /// Step at which it was judged.
    pub step: u64,
    /// Data-parallel rank.
    pub rank: usize,
    /// Its median busy seconds per step over the window.
    pub busy_secs: f64,
    /// The median over the ranks of their median busy seconds.
    pub median_secs: f64,
    /// Every rank's median busy seconds per step over the window, in rank order.
    pub ranks_busy_secs: Vec<f64>,
    /// The settings it was judged by.
    pub cfg: StragglerConfig,
}

impl Straggler {
    /// `busy_secs / median_secs`.
    pub fn ratio(&self) -> f64 {
        self.busy_secs / self.median_secs.max(f64::MIN_POSITIVE)
    }

    /// The `metrics.jsonl` line.
    pub fn record(&self) -> serde_json::Value {
        serde_json::json!({
            "step": self.step,
            "straggler": self.rank,
            "busy_secs": self.busy_secs,
            "median_busy_secs": self.median_secs,
            "ratio": self.ratio(),
            "ranks_busy_secs": self.ranks_busy_secs,
            "window": self.cfg.window,
            "margin": self.cfg.margin,
        })
    }

    /// The warning printed.
    pub fn message(&self) -> String {
        let ranks: Vec<String> = self
            .ranks_busy_secs
            .iter()
            .enumerate()
            .map(|(r, s)| format!("{r}: {:.1}", 1e3 * s))
            .collect();
        format!(
            "warning: straggler: data-parallel rank {} was busy {:.1} ms per step, {:.2}× the \
             median rank's {:.1} ms (median of the last {} steps; margin {:.0}%), so the others \
             waited for it; busy ms per rank: {}",
            self.rank,
            1e3 * self.busy_secs,
            self.ratio(),
            1e3 * self.median_secs,
            self.cfg.window,
            100.0 * self.cfg.margin,
            ranks.join(", ")
        )
    }
}

/// One rank's times over a whole invocation, for the end-of-run report.
#[derive(Clone, Debug, PartialEq)]
pub struct RankTimes {
    /// Data-parallel rank.
    pub rank: usize,
    /// Mean busy seconds per step.
    pub busy_secs: f64,
    /// Mean waiting seconds per step (rank 0's step time minus this rank's busy time).
    pub wait_secs: f64,
    /// Times it was named a straggler.
    pub named: u64,
}

/// The median of `xs` (the mean of the two middle values for an even count); 0 when empty.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// Rank 0's detector: fed every step's busy times of all ranks.
#[derive(Debug)]
pub struct Detector {
    cfg: StragglerConfig,
    window: VecDeque<Vec<f64>>,
    busy_sum: Vec<f64>,
    step_sum: f64,
    steps: u64,
    named: Vec<u64>,
    last_named: Vec<Option<u64>>,
}

impl Detector {
    /// A detector for `ranks` data-parallel ranks.
    pub fn new(cfg: StragglerConfig, ranks: usize) -> Detector {
        Detector {
            cfg,
            window: VecDeque::new(),
            busy_sum: vec![0.0; ranks],
            step_sum: 0.0,
            steps: 0,
            named: vec![0; ranks],
            last_named: vec![None; ranks],
        }
    }

    /// Adds step `step`'s busy seconds of every rank (`busy`, rank order) and the step's wall
    /// time; returns the ranks to name now.
    pub fn observe(&mut self, step: u64, busy: &[f64], step_secs: f64) -> Vec<Straggler> {
        if busy.len() != self.busy_sum.len() {
            return Vec::new();
        }
        for (s, b) in self.busy_sum.iter_mut().zip(busy) {
            *s += b;
        }
        self.step_sum += step_secs;
        self.steps += 1;
        let w = self.cfg.window;
        if w == 0 || busy.len() < 2 {
            return Vec::new();
        }
        self.window.push_back(busy.to_vec());
        if self.window.len() > w {
            self.window.pop_front();
        }
        if self.window.len() < w {
            return Vec::new();
        }
        let per_rank: Vec<f64> = (0..busy.len())
            .map(|r| median(&self.window.iter().map(|s| s[r]).collect::<Vec<_>>()))
            .collect();
        let mid = median(&per_rank);
        let mut out = Vec::new();
        for (r, &b) in per_rank.iter().enumerate() {
            if b > (1.0 + self.cfg.margin) * mid && b - mid >= MIN_GAP_SECS {
                let due = self.last_named[r].is_none_or(|at| step >= at + w as u64);
                if due {
                    self.last_named[r] = Some(step);
                    self.named[r] += 1;
                    out.push(Straggler {
                        step,
                        rank: r,
                        busy_secs: b,
                        median_secs: mid,
                        ranks_busy_secs: per_rank.clone(),
                        cfg: self.cfg,
                    });
                }
            } else {
                // It caught up: the next time it falls behind is news again.
                self.last_named[r] = None;
            }
        }
        out
    }

    /// Every rank's mean busy and waiting time per step so far.
    pub fn summary(&self) -> Vec<RankTimes> {
        let n = self.steps.max(1) as f64;
        self.busy_sum
            .iter()
            .enumerate()
            .map(|(rank, s)| RankTimes {
                rank,
                busy_secs: s / n,
                wait_secs: ((self.step_sum - s) / n).max(0.0),
                named: self.named[rank],
            })
            .collect()
    }
}

/// The fault drill `SCALETRAIN_INJECT_SLOW_RANK=R:MS`: the extra busy time of data-parallel
/// rank `dp_rank` per step (`None`: not this rank, or unset).
pub fn injected_delay(dp_rank: usize) -> Result<Option<Duration>, TrainError> {
    const VAR: &str = "SCALETRAIN_INJECT_SLOW_RANK";
    let Some(v) = std::env::var(VAR).ok().filter(|v| !v.trim().is_empty()) else {
        return Ok(None);
    };
    let parsed = v.split_once(':').and_then(|(r, ms)| {
        let ms: f64 = ms.trim().parse().ok()?;
        (ms.is_finite() && ms >= 0.0).then_some((r.trim().parse::<usize>().ok()?, ms))
    });
    match parsed {
        Some((r, ms)) => Ok((r == dp_rank).then(|| Duration::from_secs_f64(ms / 1e3))),
        None => Err(TrainError::Config {
            origin: format!("environment variable {VAR}"),
            field: VAR.into(),
            reason: format!(
                "{v:?} is not RANK:MILLISECONDS (e.g. 2:30 slows data-parallel rank 2 by 30 ms a step)"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(window: usize) -> StragglerConfig {
        StragglerConfig {
            margin: 0.2,
            window,
        }
    }

    #[test]
    fn a_consistently_slow_rank_is_named_once_per_window() {
        let mut d = Detector::new(cfg(4), 3);
        let mut named = Vec::new();
        for step in 1..=12 {
            named.extend(d.observe(step, &[0.010, 0.011, 0.020], 0.021));
        }
        // Full window at step 4, then every 4 steps while it lasts.
        let at: Vec<(u64, usize)> = named.iter().map(|s| (s.step, s.rank)).collect();
        assert_eq!(at, [(4, 2), (8, 2), (12, 2)]);
        let s = &named[0];
        assert!((s.median_secs - 0.011).abs() < 1e-12);
        assert!((s.ratio() - 0.020 / 0.011).abs() < 1e-9);
        assert!(s.message().contains("rank 2"), "{}", s.message());
        assert_eq!(s.record()["straggler"], 2);
        let sum = d.summary();
        assert_eq!(sum[2].named, 3);
        assert!((sum[2].busy_secs - 0.020).abs() < 1e-12);
        assert!((sum[0].wait_secs - 0.011).abs() < 1e-12);
    }

    #[test]
    fn a_balanced_run_or_one_slow_step_names_nobody() {
        let mut d = Detector::new(cfg(5), 3);
        for step in 1..=20 {
            // Jitter under the margin, and one very slow step on rank 1.
            let spike = if step == 7 { 0.5 } else { 0.0 };
            let b = [0.010 + 0.001 * (step % 2) as f64, 0.0105 + spike, 0.0095];
            assert!(d.observe(step, &b, 0.012).is_empty(), "step {step}");
        }
        // Detection off.
        let mut off = Detector::new(cfg(0), 2);
        assert!((1..50).all(|s| off.observe(s, &[0.01, 0.09], 0.09).is_empty()));
    }

    #[test]
    fn a_gap_of_a_few_milliseconds_is_noise() {
        // 40 % slower, but 2 ms: not named; 40 % of 50 ms: named.
        let mut d = Detector::new(cfg(3), 3);
        assert!((1..=6).all(|s| d.observe(s, &[0.005, 0.005, 0.007], 0.007).is_empty()));
        let mut d = Detector::new(cfg(3), 3);
        let n: usize = (1..=3)
            .map(|s| d.observe(s, &[0.050, 0.050, 0.070], 0.07).len())
            .sum();
        assert_eq!(n, 1);
    }

    #[test]
    fn two_ranks_are_judged_against_their_mean() {
        let mut d = Detector::new(cfg(3), 2);
        let found: Vec<_> = (1..=3)
            .flat_map(|s| d.observe(s, &[0.010, 0.030], 0.03))
            .collect();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].rank, 1);
        assert!((found[0].median_secs - 0.020).abs() < 1e-12);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
