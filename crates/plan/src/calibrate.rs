//! Calibration from a user's measured runs: one efficiency multiplier on the time model's
//! matmul efficiency, fitted to measured step times, with a bootstrap confidence interval and a
//! prediction interval from the residuals.
//!
//! Fit: the multiplier `η` (grid 0.20..1.25 by 0.005 of `Calibration::matmul_eff`) minimising
//! Σ ln(predicted/measured)² — symmetric in over- and under-prediction. Confidence interval: the
//! 5th and 95th percentiles of `η` refitted on `bootstrap` resamples of the runs (Efron 1979,
//! percentile bootstrap). Prediction interval for a new run: predicted · (1 + m ± 1.645·sd·√(1 + 1/n))
//! with m, sd the mean and standard deviation of the relative residuals measured/predicted − 1
//! after the fit (a 90% interval assuming normal residuals).

use serde::{Deserialize, Serialize};

use crate::cost::Context;
use crate::error::{invalid, Result};
use crate::explain::NoTrace;
use crate::layout::Layout;

/// One measured run: what was run and how long a step took.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Where the row came from (file and line), for messages.
    pub label: String,
    /// Model, cluster, recipe (its calibration is the starting point).
    pub ctx: Context,
    /// The layout that was run.
    pub layout: Layout,
    /// Measured seconds per optimizer step.
    pub step_secs: f64,
}

/// What `scaletrain calibrate` writes and `estimate --calibration` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationFile {
    /// Always `scaletrain-calibration`.
    pub format: String,
    /// File version (1).
    pub version: u32,
    /// Fitted multiplier on the matmul efficiency (the `--efficiency` it stands for).
    pub efficiency: f64,
    /// 90% bootstrap confidence interval of `efficiency`.
    pub efficiency_ci90: [f64; 2],
    /// Mean relative residual (measured/predicted − 1) after the fit.
    pub residual_mean: f64,
    /// Standard deviation of the relative residuals after the fit.
    pub residual_sd: f64,
    /// Runs fitted on.
    pub runs: usize,
    /// Bootstrap resamples.
    pub bootstrap: usize,
    /// Mean |relative error| of the step time before the fit (efficiency 1).
    pub mean_abs_error_before: f64,
    /// Mean |relative error| after the fit.
    pub mean_abs_error_after: f64,
}

impl CalibrationFile {
    /// Checks a file read from disk; names the field that is wrong.
    pub fn validate(&self) -> Result<()> {
        if self.format != "scaletrain-calibration" || self.version != 1 {
            return Err(invalid(
                "--calibration",
                format!(
                    "format '{}' version {} is not a scaletrain-calibration version 1 file; write one with `scaletrain calibrate`",
                    self.format, self.version
                ),
            ));
        }
        check_efficiency(self.efficiency)?;
        if !(self.residual_sd.is_finite()
            && self.residual_sd >= 0.0
            && self.residual_mean.is_finite())
        {
            return Err(invalid(
                "--calibration",
                "residual_mean / residual_sd must be finite (residual_sd ≥ 0)",
            ));
        }
        Ok(())
    }

    /// 90% prediction interval around a predicted step time.
    pub fn interval(&self, predicted: f64) -> [f64; 2] {
        let n = self.runs.max(1) as f64;
        let half = 1.645 * self.residual_sd * (1.0 + 1.0 / n).sqrt();
        [
            predicted * (1.0 + self.residual_mean - half),
            predicted * (1.0 + self.residual_mean + half),
        ]
    }
}

/// Checks an efficiency multiplier (`--efficiency`, a calibration file).
pub fn check_efficiency(e: f64) -> Result<()> {
    if !(e.is_finite() && (0.05..=1.5).contains(&e)) {
        return Err(invalid(
            "--efficiency",
            format!(
                "{e} must be within 0.05..1.5 (1.0 = Megatron-LM's efficiency; 0.8 = 80% of it)"
            ),
        ));
    }
    Ok(())
}

const GRID_LO: f64 = 0.20;
const GRID_STEP: f64 = 0.005;
const GRID_N: usize = 211; // 0.20 ..= 1.25

fn grid(i: usize) -> f64 {
    ((GRID_LO + i as f64 * GRID_STEP) * 1000.0).round() / 1000.0
}

/// Predicted step time of a run with the efficiency multiplier `eff`.
pub fn predict(m: &Measured, eff: f64) -> f64 {
    let mut ctx = m.ctx.clone();
    ctx.calib.matmul_eff *= eff;
    ctx.evaluate(&m.layout, &mut NoTrace).time.total
}

/// The grid point (column of `table`, one row per run) whose summed loss over the runs `idx`
/// is least; `calibrate` and `cpu_calibrate` fit by it.
pub(crate) fn argmin(table: &[Vec<f64>], idx: &[usize]) -> usize {
    (0..table.first().map_or(0, |r| r.len()))
        .min_by(|&a, &b| {
            let f = |g: usize| idx.iter().map(|&i| table[i][g]).sum::<f64>();
            f(a).total_cmp(&f(b))
        })
        .unwrap_or(0)
}

/// A small deterministic generator (SplitMix64) for the bootstrap, so a file fits the same way
/// every time.
pub(crate) fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fits the efficiency to measured runs (see the module docs).
pub fn fit(runs: &[Measured], bootstrap: usize, seed: u64) -> Result<CalibrationFile> {
    if runs.is_empty() {
        return Err(invalid("calibrate", "no measured runs to fit on"));
    }
    for m in runs {
        if !(m.step_secs.is_finite() && m.step_secs > 0.0) {
            return Err(invalid(
                "step_secs",
                format!(
                    "{}: {} is not a positive number of seconds",
                    m.label, m.step_secs
                ),
            ));
        }
    }
    // Squared log errors of every run at every grid point, computed once.
    let preds: Vec<Vec<f64>> = runs
        .iter()
        .map(|m| (0..GRID_N).map(|g| predict(m, grid(g))).collect())
        .collect();
    let table: Vec<Vec<f64>> = preds
        .iter()
        .zip(runs)
        .map(|(p, m)| p.iter().map(|t| (t / m.step_secs).ln().powi(2)).collect())
        .collect();
    let all: Vec<usize> = (0..runs.len()).collect();
    let best = argmin(&table, &all);
    let mut state = seed;
    let mut boots: Vec<f64> = (0..bootstrap)
        .map(|_| {
            let idx: Vec<usize> = (0..runs.len())
                .map(|_| (splitmix(&mut state) % runs.len() as u64) as usize)
                .collect();
            grid(argmin(&table, &idx))
        })
        .collect();
    boots.sort_by(f64::total_cmp);
    let pct = |q: f64| -> f64 {
        if boots.is_empty() {
            grid(best)
        } else {
            boots[((q * (boots.len() - 1) as f64).round() as usize).min(boots.len() - 1)]
        }
    };
    let before: Vec<f64> = runs
        .iter()
        .map(|m| predict(m, 1.0) / m.step_secs - 1.0)
        .collect();
    let resid: Vec<f64> = preds
        .iter()
        .zip(runs)
        .map(|(p, m)| m.step_secs / p[best] - 1.0)
        .collect();
    let n = resid.len() as f64;
    let mean = resid.iter().sum::<f64>() / n;
    let sd = if resid.len() > 1 {
        (resid.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    let after: Vec<f64> = preds
        .iter()
        .zip(runs)
        .map(|(p, m)| p[best] / m.step_secs - 1.0)
        .collect();
    let mae = |v: &[f64]| v.iter().map(|x| x.abs()).sum::<f64>() / v.len() as f64;
    Ok(CalibrationFile {
        format: "scaletrain-calibration".into(),
        version: 1,
        efficiency: grid(best),
        efficiency_ci90: [pct(0.05), pct(0.95)],
        residual_mean: mean,
        residual_sd: sd,
        runs: runs.len(),
        bootstrap,
        mean_abs_error_before: mae(&before),
        mean_abs_error_after: mae(&after),
    })
}
