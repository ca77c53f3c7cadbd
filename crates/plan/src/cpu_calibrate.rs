//! Calibration of the CPU runtime's step-time model (`cpu_time`, through `cpu_plan::predict`) to
//! measured runs of `scaletrain train` on this machine: `scaletrain calibrate --cpu RUN_DIR…`.
//!
//! Two constants are fitted, as factors on the defaults: the matmul rate
//! (`matmul_flops_per_thread`, scale `f_m`) and the streaming bandwidth
//! (`bandwidth_bytes_per_thread`, scale `f_b`, which also scales the elementwise, weight-pass and
//! AdamW terms). The others (elementwise bytes, spawn cost, the second thread's share, the weight
//! and AdamW bytes per parameter, the link constants) stay as `cpu_time` / `cpu_comm` fitted them:
//! a handful of runs does not identify them.
//!
//! ```text
//! fit      = argmin over the grid f_m, f_b ∈ {2^(k/8), k = −24…24} of
//!            Σ_runs (ln predicted(f_m, f_b) − ln measured)²   (least squares on log time)
//! CI 90%   = 5th and 95th percentiles of each factor refitted on `bootstrap` resamples of the
//!            runs with replacement (Efron 1979, percentile bootstrap), the same grid
//! ```
//!
//! When the runs do not separate the two (all of one shape), the bootstrap intervals say so by
//! being wide along the direction the data cannot see.
//!
//! bf16-mixed runs add a third constant to the same fit, the bf16 kernel's rate
//! (`bf16_matmul_flops_per_thread`, scale `f_16` on the same grid: 49³ points). A host without
//! AVX512-BF16, where the runtime converts bf16 operands to `f32` panels, runs its bf16
//! matmuls several times slower than the default 790 GFLOP/s; without bf16 runs the default
//! stays. Alternation from the defaults until it settles (at most 8 rounds): the matmul rate and
//! bandwidth on all the runs with the bf16 rate held, then the bf16 rate on the bf16 runs with
//! those held. Neither the joint minimum (on eight real runs of one width it traded the two,
//! which such runs do not separate, for a bf16 rate of 3.9 TFLOP/s) nor the first two from the
//! fp32 runs alone (four of them put the matmul rate at the grid's corner, and the bf16 runs
//! 40% off) gave physical constants.

use crate::calibrate::{argmin, splitmix};
use crate::cpu_plan::{predict, CpuHost, CpuLayout, CpuModel};
use crate::cpu_time::CpuCalibration;

/// One measured run: the model, layout and host it ran on and its median step time.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuRun {
    /// Where it came from (a run folder), for messages.
    pub label: String,
    /// The model as the runtime built it.
    pub model: CpuModel,
    /// The layout it ran.
    pub layout: CpuLayout,
    /// Host and runtime settings (the `compute` field is replaced by the fit's constants).
    pub host: CpuHost,
    /// Measured median step time, seconds.
    pub step_secs: f64,
}

/// A CPU calibration: the fitted constants, their intervals and the fit's quality.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CpuCalibrationFile {
    /// "scaletrain-cpu-calibration".
    pub format: String,
    /// 1.
    pub version: u32,
    /// Fitted matmul FLOP/s of one thread.
    pub matmul_flops_per_thread: f64,
    /// 90% bootstrap confidence interval of it.
    pub matmul_flops_per_thread_ci90: [f64; 2],
    /// Fitted streamed bytes/s of one thread.
    pub bandwidth_bytes_per_thread: f64,
    /// 90% bootstrap confidence interval of it.
    pub bandwidth_bytes_per_thread_ci90: [f64; 2],
    /// Fitted bf16-mixed matmul FLOP/s of one thread, when bf16-mixed runs were given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bf16_matmul_flops_per_thread: Option<f64>,
    /// 90% bootstrap confidence interval of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bf16_matmul_flops_per_thread_ci90: Option<[f64; 2]>,
    /// Runs fitted on.
    pub runs: usize,
    /// Bootstrap resamples.
    pub bootstrap: usize,
    /// Mean |predicted / measured − 1| with the default constants.
    pub mean_abs_error_before: f64,
    /// The same with the fitted constants.
    pub mean_abs_error_after: f64,
    /// √(mean (ln predicted − ln measured)²) with the default constants.
    pub rms_log_error_before: f64,
    /// The same with the fitted constants (what the fit minimises).
    pub rms_log_error_after: f64,
}

impl CpuCalibrationFile {
    /// The compute constants with this file's fitted values.
    pub fn compute(&self) -> CpuCalibration {
        let d = CpuCalibration::default();
        CpuCalibration {
            matmul_flops_per_thread: self.matmul_flops_per_thread,
            bandwidth_bytes_per_thread: self.bandwidth_bytes_per_thread,
            bf16_matmul_flops_per_thread: self
                .bf16_matmul_flops_per_thread
                .unwrap_or(d.bf16_matmul_flops_per_thread),
            ..d
        }
    }

    /// Reads and checks a calibration file's text (`what` names it in errors).
    pub fn parse(text: &str, what: &str) -> Result<CpuCalibrationFile, String> {
        let f: CpuCalibrationFile = serde_json::from_str(text).map_err(|e| {
            format!("{what}: not a CPU calibration file ({e}); write one with `scaletrain calibrate --cpu RUN_DIR…`")
        })?;
        if f.format != "scaletrain-cpu-calibration" || f.version != 1 {
            return Err(format!(
                "{what}: format {:?} version {}, expected \"scaletrain-cpu-calibration\" version 1",
                f.format, f.version
            ));
        }
        let ok = |x: f64| x.is_finite() && x > 0.0;
        if !ok(f.matmul_flops_per_thread)
            || !ok(f.bandwidth_bytes_per_thread)
            || !f.bf16_matmul_flops_per_thread.is_none_or(ok)
        {
            return Err(format!(
                "{what}: the fitted constants must be positive numbers (matmul {}, bandwidth {}, bf16 matmul {:?})",
                f.matmul_flops_per_thread, f.bandwidth_bytes_per_thread, f.bf16_matmul_flops_per_thread
            ));
        }
        Ok(f)
    }
}

/// `k`'s fitted constants with what the run itself did (whether it packed weight panels).
pub fn with_run_settings(k: CpuCalibration, r: &CpuRun) -> CpuCalibration {
    CpuCalibration {
        weight_panels: r.host.compute.weight_panels,
        ..k
    }
}

const STEPS: i32 = 24;
const SIDE: usize = (2 * STEPS + 1) as usize;

fn factor(i: usize) -> f64 {
    2f64.powf((i as i32 - STEPS) as f64 / 8.0)
}

fn constants(g: usize) -> CpuCalibration {
    let d = CpuCalibration::default();
    CpuCalibration {
        matmul_flops_per_thread: d.matmul_flops_per_thread * factor(g / SIDE),
        bandwidth_bytes_per_thread: d.bandwidth_bytes_per_thread * factor(g % SIDE),
        ..d
    }
}

/// `constants(g)` with the bf16 rate at grid step `b` (`STEPS`: the default).
fn constants16(g: usize, b: usize) -> CpuCalibration {
    let d = CpuCalibration::default();
    CpuCalibration {
        bf16_matmul_flops_per_thread: d.bf16_matmul_flops_per_thread * factor(b),
        ..constants(g)
    }
}

fn is_bf16(r: &CpuRun) -> bool {
    r.model.precision == crate::recipe::Precision::Bf16Mixed
}

fn predicted(r: &CpuRun, k: CpuCalibration) -> f64 {
    let host = CpuHost {
        compute: with_run_settings(k, r),
        ..r.host
    };
    predict(&r.model, &r.layout, &host).step_secs
}

/// Fits the constants to `runs` (see the module docs).
pub fn fit_cpu(runs: &[CpuRun], bootstrap: usize, seed: u64) -> Result<CpuCalibrationFile, String> {
    if runs.is_empty() {
        return Err("no runs to fit on: give run folders of `scaletrain train`".into());
    }
    for r in runs {
        if !(r.step_secs.is_finite() && r.step_secs > 0.0) {
            return Err(format!(
                "{}: measured step {} s is not a positive number of seconds",
                r.label, r.step_secs
            ));
        }
    }
    // With bf16-mixed runs the grid has a third axis, the bf16 rate (runs in other precisions
    // do not depend on it: their error is computed once per point of the other two).
    let any_bf16 = runs.iter().any(is_bf16);
    let side16 = if any_bf16 { SIDE } else { 1 };
    let point = |x: usize| -> (usize, usize) {
        if any_bf16 {
            (x / SIDE, x % SIDE)
        } else {
            (x, STEPS as usize)
        }
    };
    let table: Vec<Vec<f64>> = runs
        .iter()
        .map(|r| {
            if is_bf16(r) {
                (0..SIDE * SIDE * side16)
                    .map(|x| {
                        let (g, b) = point(x);
                        (predicted(r, constants16(g, b)) / r.step_secs).ln().powi(2)
                    })
                    .collect()
            } else {
                (0..SIDE * SIDE)
                    .flat_map(|g| {
                        let e = (predicted(r, constants(g)) / r.step_secs).ln().powi(2);
                        std::iter::repeat_n(e, side16)
                    })
                    .collect()
            }
        })
        .collect();
    // Not the joint minimum over the three: on real runs of one width (which do not separate
    // the matmul rate from the bandwidth) it traded them for a bf16 rate of 3.9 TFLOP/s.
    // Alternation from the defaults instead, until it settles (at most 8 rounds): the matmul
    // rate and bandwidth on all runs with the bf16 rate held, then the bf16 rate on the bf16
    // runs with those held.
    let fit = |idx: &[usize]| -> (usize, usize) {
        if !any_bf16 {
            return point(argmin(&table, idx));
        }
        let sum = |g: usize, b: usize| idx.iter().map(|&i| table[i][g * SIDE + b]).sum::<f64>();
        let least = |n: usize, f: &dyn Fn(usize) -> f64| {
            (0..n).min_by(|&x, &y| f(x).total_cmp(&f(y))).unwrap_or(0)
        };
        let (mut g, mut b) = (usize::MAX, STEPS as usize);
        for _ in 0..8 {
            let g1 = least(SIDE * SIDE, &|g| sum(g, b));
            let b1 = if idx.iter().any(|&i| is_bf16(&runs[i])) {
                least(SIDE, &|b| sum(g1, b))
            } else {
                b
            };
            if (g1, b1) == (g, b) {
                break;
            }
            (g, b) = (g1, b1);
        }
        (g, b)
    };
    let all: Vec<usize> = (0..runs.len()).collect();
    let (best, best16) = fit(&all);
    let mut state = seed;
    let mut samples: Vec<(f64, f64, Option<f64>)> = Vec::with_capacity(bootstrap);
    for _ in 0..bootstrap {
        let idx: Vec<usize> = (0..runs.len())
            .map(|_| (splitmix(&mut state) % runs.len() as u64) as usize)
            .collect();
        let (g, b) = fit(&idx);
        let k = constants16(g, b);
        // A resample without bf16 runs says nothing of the bf16 rate: left out of its interval.
        let has16 = idx.iter().any(|&i| is_bf16(&runs[i]));
        samples.push((
            k.matmul_flops_per_thread,
            k.bandwidth_bytes_per_thread,
            has16.then_some(k.bf16_matmul_flops_per_thread),
        ));
    }
    let mut ms: Vec<f64> = samples.iter().map(|s| s.0).collect();
    let mut bs: Vec<f64> = samples.iter().map(|s| s.1).collect();
    let mut b16: Vec<f64> = samples.iter().filter_map(|s| s.2).collect();
    let k = constants16(best, best16);
    let ci = |v: &mut Vec<f64>, at: f64| -> [f64; 2] {
        if v.is_empty() {
            return [at, at];
        }
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v[((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
        [q(0.05), q(0.95)]
    };
    let mae = |k: CpuCalibration| {
        runs.iter()
            .map(|r| (predicted(r, k) / r.step_secs - 1.0).abs())
            .sum::<f64>()
            / runs.len() as f64
    };
    let rms_log = |k: CpuCalibration| {
        (runs
            .iter()
            .map(|r| (predicted(r, k) / r.step_secs).ln().powi(2))
            .sum::<f64>()
            / runs.len() as f64)
            .sqrt()
    };
    Ok(CpuCalibrationFile {
        format: "scaletrain-cpu-calibration".into(),
        version: 1,
        matmul_flops_per_thread: k.matmul_flops_per_thread,
        matmul_flops_per_thread_ci90: ci(&mut ms, k.matmul_flops_per_thread),
        bandwidth_bytes_per_thread: k.bandwidth_bytes_per_thread,
        bandwidth_bytes_per_thread_ci90: ci(&mut bs, k.bandwidth_bytes_per_thread),
        bf16_matmul_flops_per_thread: any_bf16.then_some(k.bf16_matmul_flops_per_thread),
        bf16_matmul_flops_per_thread_ci90: any_bf16
            .then(|| ci(&mut b16, k.bf16_matmul_flops_per_thread)),
        runs: runs.len(),
        bootstrap,
        mean_abs_error_before: mae(CpuCalibration::default()),
        mean_abs_error_after: mae(k),
        rms_log_error_before: rms_log(CpuCalibration::default()),
        rms_log_error_after: rms_log(k),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_comm::CommCalibration;
    use crate::cpu_plan::tests::layout;

    fn run(
        layers: u64,
        channels: u64,
        seq: u64,
        l: CpuLayout,
        cores: u64,
        k: CpuCalibration,
    ) -> CpuRun {
        let model = CpuModel {
            padded_vocab: 64,
            seq_len: seq,
            channels,
            heads: 4,
            layers,
            precision: crate::recipe::Precision::Fp32,
            recompute: crate::recipe::Recompute::None,
        };
        let host = CpuHost {
            cores,
            compute: k,
            link: CommCalibration::tcp(),
            tp_link: CommCalibration::tcp_tensor_parallel(),
            bucket_bytes: 1 << 21,
            overlap: true,
        };
        let step_secs = predict(&model, &l, &host).step_secs;
        CpuRun {
            label: format!("L{layers} C{channels} {l:?}"),
            model,
            layout: l,
            host,
            step_secs,
        }
    }

    #[test]
    fn synthetic_runs_give_back_the_constants_they_were_made_with() {
        // A machine with half the default matmul rate and 1.5× its bandwidth: 2^(−8/8) and
        // 2^(4.68/8) ≈ 1.5 — the bandwidth is off the grid, so the fit lands on a neighbour.
        // Without weight panels (a machine without AVX-512, as SCALETRAIN_NO_AVX512=1 runs
        // are): every micro-batch streams the weights, so the bandwidth shows.
        let truth = CpuCalibration {
            matmul_flops_per_thread: 120e9,
            bandwidth_bytes_per_thread: 9e9,
            weight_panels: false,
            ..CpuCalibration::default()
        };
        // Wide models are matmul-bound, narrow ones with many micro-batches bandwidth-bound.
        let mut runs = vec![
            run(4, 256, 128, layout(1, 1, 1, 8, 1), 2, truth),
            run(4, 256, 128, layout(2, 1, 1, 4, 1), 2, truth),
            run(4, 256, 128, layout(1, 2, 1, 1, 8), 2, truth),
            run(4, 256, 128, layout(2, 1, 2, 4, 1), 4, truth),
            run(2, 64, 64, layout(1, 1, 1, 1, 8), 1, truth),
            run(2, 64, 64, layout(2, 1, 1, 1, 4), 2, truth),
            run(2, 32, 32, layout(1, 1, 1, 2, 4), 1, truth),
            run(2, 32, 32, layout(1, 1, 1, 1, 8), 2, truth),
            run(3, 128, 64, layout(1, 1, 2, 4, 2), 2, truth),
            run(3, 128, 64, layout(1, 3, 1, 1, 6), 4, truth),
        ];
        // Measurement noise of ±3 %, deterministic.
        for (i, r) in runs.iter_mut().enumerate() {
            r.step_secs *= 1.0 + 0.03 * (2.3 * i as f64).sin();
        }
        let f = fit_cpu(&runs, 200, 7).unwrap();
        assert!(
            (f.matmul_flops_per_thread / 120e9 - 1.0).abs() < 0.05,
            "{f:?}"
        );
        assert!(
            (f.bandwidth_bytes_per_thread / 9e9 - 1.0).abs() < 0.05,
            "{f:?}"
        );
        // Inside the intervals, widened by one grid step (2^(1/8): the truth is off the grid).
        let step = 2f64.powf(1.0 / 8.0);
        let inside = |x: f64, ci: [f64; 2]| ci[0] / step <= x && x <= ci[1] * step;
        assert!(inside(120e9, f.matmul_flops_per_thread_ci90), "{f:?}");
        assert!(inside(9e9, f.bandwidth_bytes_per_thread_ci90), "{f:?}");
        // Noise makes the intervals more than a point.
        assert!(
            f.matmul_flops_per_thread_ci90[0] < f.matmul_flops_per_thread_ci90[1],
            "{f:?}"
        );
        assert!(f.mean_abs_error_before > 0.15, "{f:?}");
        assert!(f.mean_abs_error_after < 0.04, "{f:?}");
        assert!(f.rms_log_error_after < f.rms_log_error_before, "{f:?}");
        // The file reads back; a wrong format is refused with what it expected.
        let text = serde_json::to_string(&f).unwrap();
        let back = CpuCalibrationFile::parse(&text, "x").unwrap();
        assert!(
            (back.compute().bandwidth_bytes_per_thread / f.bandwidth_bytes_per_thread - 1.0).abs()
                < 1e-12
        );
        assert_eq!(back.runs, 10);
        let bad = text.replace("scaletrain-cpu-calibration", "other");
        assert!(CpuCalibrationFile::parse(&bad, "x")
            .unwrap_err()
            .contains("expected \"scaletrain-cpu-calibration\""));
    }

    /// `r` as a bf16-mixed run on a machine with constants `k`.
    fn as_bf16(mut r: CpuRun, k: CpuCalibration) -> CpuRun {
        r.model.precision = crate::recipe::Precision::Bf16Mixed;
        r.host.compute = k;
        r.step_secs = predict(&r.model, &r.layout, &r.host).step_secs;
        r
    }

    #[test]
    fn bf16_runs_fit_the_bf16_rate_with_the_other_two() {
        // A host without AVX512-BF16: its bf16 matmuls on f32 panels at 200 GFLOP/s, a third of
        // a quarter of the default 790, while its f32 rate and bandwidth are the defaults' halves.
        let truth = CpuCalibration {
            matmul_flops_per_thread: 120e9,
            bandwidth_bytes_per_thread: 3e9,
            bf16_matmul_flops_per_thread: 200e9,
            weight_panels: false,
            ..CpuCalibration::default()
        };
        let fp32 = [
            run(4, 256, 128, layout(1, 1, 1, 8, 1), 2, truth),
            run(4, 256, 128, layout(2, 1, 1, 4, 1), 2, truth),
            run(2, 64, 64, layout(1, 1, 1, 1, 8), 1, truth),
            run(2, 32, 32, layout(1, 1, 1, 2, 4), 1, truth),
            run(3, 128, 64, layout(1, 1, 2, 4, 2), 2, truth),
        ];
        let bf16: Vec<CpuRun> = [
            run(4, 256, 128, layout(1, 1, 1, 8, 1), 2, truth),
            run(4, 256, 128, layout(1, 2, 1, 2, 4), 2, truth),
            run(3, 192, 64, layout(2, 1, 1, 4, 1), 2, truth),
            run(4, 256, 128, layout(1, 1, 2, 8, 1), 2, truth),
        ]
        .into_iter()
        .map(|r| as_bf16(r, truth))
        .collect();
        let mut runs: Vec<CpuRun> = fp32.iter().cloned().chain(bf16.iter().cloned()).collect();
        for (i, r) in runs.iter_mut().enumerate() {
            r.step_secs *= 1.0 + 0.03 * (1.7 * i as f64).sin();
        }
        let f = fit_cpu(&runs, 200, 11).unwrap();
        let rate = f
            .bf16_matmul_flops_per_thread
            .expect("bf16 runs fit the bf16 rate");
        assert!((rate / 200e9 - 1.0).abs() < 0.1, "{f:?}");
        let ci = f.bf16_matmul_flops_per_thread_ci90.unwrap();
        let step = 2f64.powf(1.0 / 8.0);
        assert!(ci[0] / step <= 200e9 && 200e9 <= ci[1] * step, "{f:?}");
        assert!(
            (f.matmul_flops_per_thread / 120e9 - 1.0).abs() < 0.1,
            "{f:?}"
        );
        // The default rate would have had the bf16 runs three times too fast.
        assert!(
            f.mean_abs_error_before > 0.3 && f.mean_abs_error_after < 0.05,
            "{f:?}"
        );
        // The fp32 runs alone fit no bf16 rate.
        let alone = fit_cpu(&runs[..5], 50, 11).unwrap();
        assert_eq!(alone.bf16_matmul_flops_per_thread, None);
        // The file carries it; `compute` applies it; a file without it keeps the default.
        let back = CpuCalibrationFile::parse(&serde_json::to_string(&f).unwrap(), "x").unwrap();
        assert_eq!(back.compute().bf16_matmul_flops_per_thread, rate);
        let old = serde_json::to_string(&alone).unwrap();
        assert!(!old.contains("bf16_matmul"), "{old}");
        assert_eq!(
            CpuCalibrationFile::parse(&old, "x")
                .unwrap()
                .compute()
                .bf16_matmul_flops_per_thread,
            CpuCalibration::default().bf16_matmul_flops_per_thread
        );
        // A negative bf16 rate in a file is refused.
        let bad = serde_json::to_string(&f).unwrap().replace(
            &format!("\"bf16_matmul_flops_per_thread\":{rate:?}"),
            "\"bf16_matmul_flops_per_thread\":-1.0",
        );
        assert!(
            CpuCalibrationFile::parse(&bad, "x")
                .unwrap_err()
                .contains("bf16 matmul"),
            "{bad}"
        );
    }

    #[test]
    fn no_runs_or_a_bad_time_is_an_error_naming_the_run() {
        assert!(fit_cpu(&[], 10, 1).unwrap_err().contains("run folders"));
        let mut r = run(
            2,
            64,
            64,
            layout(1, 1, 1, 2, 1),
            1,
            CpuCalibration::default(),
        );
        r.step_secs = f64::NAN;
        let e = fit_cpu(&[r], 10, 1).unwrap_err();
        assert!(e.contains("L2 C64") && e.contains("positive"), "{e}");
    }
}
