//! Whole-run wall time with failures: the cluster's mean time between failures, the checkpoint
//! each restart falls back to, the interval between checkpoints, and the expected days.
//!
//! - Failure rate: per GPU-hour, default from Dubey et al. 2024 ("The Llama 3 Herd of Models",
//!   arXiv 2407.21783, §3.3.4): 419 unexpected interruptions in a 54-day snapshot of pre-training
//!   on 16,384 H100s, i.e. 419 / (54 · 24 · 16,384) = 1.97e-5 per GPU-hour (one per ~50,700
//!   GPU-hours). The cluster's MTBF is M = 1 / (rate · GPUs).
//! - Checkpoint: every rank writes its shard of the model states (weights, fp32 master weights,
//!   optimizer moments), δ = bytes / (nodes · write bandwidth per node); default 1 GB/s per node
//!   (Llama 3's Tectonic storage: 2 TB/s sustained for 2,048 nodes, §3.3.1).
//! - Interval: Daly's higher-order optimum (Daly 2006, "A higher order estimate of the optimum
//!   checkpoint interval for restart dumps", FGCS 22(3)), τ = √(2δM)·[1 + ⅓·√(δ/2M) + (δ/2M)/9] − δ
//!   for δ < 2M, else τ = M; to first order Young's τ = √(2δM) (Young 1974, CACM 17(9)).
//! - Expected wall time (first-order, as in Daly 2006): each interval of τ seconds of work costs
//!   τ + δ; each failure costs the restart R plus on average half an interval of lost work,
//!   (τ + δ)/2. With T the failure-free time:
//!   `T_wall = T·(1 + δ/τ) / (1 − (R + (τ + δ)/2) / M)`.

use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};

/// The failure and checkpoint assumptions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FailureModel {
    /// Failures per GPU-hour.
    pub failures_per_gpu_hour: f64,
    /// Checkpoint write bandwidth per node, bytes/s.
    pub checkpoint_bw_per_node: f64,
    /// Time from a failure to training again (detect, reschedule, load the checkpoint), seconds.
    pub restart_secs: f64,
}

impl Default for FailureModel {
    fn default() -> Self {
        FailureModel {
            failures_per_gpu_hour: 419.0 / (54.0 * 24.0 * 16384.0),
            checkpoint_bw_per_node: 1e9,
            restart_secs: 600.0,
        }
    }
}

impl FailureModel {
    /// Checks the numbers; names the flag.
    pub fn validate(&self) -> Result<()> {
        if !(self.failures_per_gpu_hour.is_finite() && self.failures_per_gpu_hour >= 0.0) {
            return Err(invalid(
                "--gpu-mtbf-hours",
                "must be a positive number of hours",
            ));
        }
        if !(self.checkpoint_bw_per_node.is_finite() && self.checkpoint_bw_per_node > 0.0) {
            return Err(invalid(
                "--checkpoint-gbps",
                "must be a positive write bandwidth per node in GB/s",
            ));
        }
        if !(self.restart_secs.is_finite() && self.restart_secs >= 0.0) {
            return Err(invalid("--restart-minutes", "must be zero or more minutes"));
        }
        Ok(())
    }
}

/// The run with failures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Goodput {
    /// Mean time between failures of the whole cluster, hours.
    pub cluster_mtbf_hours: f64,
    /// Bytes of one checkpoint (whole model).
    pub checkpoint_bytes: f64,
    /// Seconds to write one checkpoint (δ).
    pub checkpoint_secs: f64,
    /// Recommended seconds of training between checkpoints (Daly's τ).
    pub checkpoint_interval_secs: f64,
    /// Restart cost per failure, seconds.
    pub restart_secs: f64,
    /// Days without failures (the estimate's training days).
    pub days_without_failures: f64,
    /// Expected days with checkpoints and failures (infinite when failures outpace progress).
    pub expected_days: f64,
    /// Expected failures over the run.
    pub expected_failures: f64,
    /// Useful share of the wall time: days without failures / expected days.
    pub goodput: f64,
}

/// Daly's optimum checkpoint interval for save time δ and MTBF M (seconds).
pub fn daly_interval(delta: f64, mtbf: f64) -> f64 {
    if delta <= 0.0 {
        return 0.0;
    }
    if delta >= 2.0 * mtbf {
        return mtbf;
    }
    let x = delta / (2.0 * mtbf);
    (2.0 * delta * mtbf).sqrt() * (1.0 + x.sqrt() / 3.0 + x / 9.0) - delta
}

/// Whole-run time with failures for `train_secs` of failure-free training on `gpus` GPUs in
/// `nodes` nodes, with checkpoints of `checkpoint_bytes`.
pub fn goodput(
    fm: &FailureModel,
    train_secs: f64,
    gpus: u64,
    nodes: u64,
    checkpoint_bytes: f64,
) -> Goodput {
    let rate = fm.failures_per_gpu_hour * gpus as f64 / 3600.0; // per second
    let mtbf = if rate > 0.0 {
        1.0 / rate
    } else {
        f64::INFINITY
    };
    let delta = checkpoint_bytes / (nodes.max(1) as f64 * fm.checkpoint_bw_per_node);
    let tau = if mtbf.is_finite() {
        daly_interval(delta, mtbf).max(1.0)
    } else {
        f64::INFINITY
    };
    let wall = if !mtbf.is_finite() {
        train_secs
    } else {
        let lost = (fm.restart_secs + (tau + delta) / 2.0) / mtbf;
        if lost >= 1.0 {
            f64::INFINITY
        } else {
            train_secs * (1.0 + delta / tau) / (1.0 - lost)
        }
    };
    Goodput {
        cluster_mtbf_hours: mtbf / 3600.0,
        checkpoint_bytes,
        checkpoint_secs: delta,
        checkpoint_interval_secs: tau,
        restart_secs: fm.restart_secs,
        days_without_failures: train_secs / 86400.0,
        expected_days: wall / 86400.0,
        expected_failures: if mtbf.is_finite() { wall / mtbf } else { 0.0 },
        goodput: if wall > 0.0 { train_secs / wall } else { 1.0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-derived: 16,384 GPUs at the default rate fail every 1 / (1.973e-5 · 16,384) = 3.09 h
    /// (Llama 3 saw 419 in 54 days: one per 3.09 h). A 1 TB checkpoint from 2,048 nodes at
    /// 1 GB/s each takes δ = 1e12 / 2.048e12 = 0.488 s; Young's τ = √(2 · 0.488 · 11,134) = 104 s,
    /// Daly's higher-order correction is within 1% of it.
    #[test]
    fn llama3_scale_numbers() {
        let fm = FailureModel::default();
        let g = goodput(&fm, 54.0 * 86400.0, 16384, 2048, 1e12);
        assert!(
            (g.cluster_mtbf_hours - 3.093).abs() < 0.01,
            "{}",
            g.cluster_mtbf_hours
        );
        assert!((g.checkpoint_secs - 0.48828).abs() < 1e-4);
        let young = (2.0 * g.checkpoint_secs * g.cluster_mtbf_hours * 3600.0).sqrt();
        assert!((young - 104.3).abs() < 0.5, "{young}");
        assert!((g.checkpoint_interval_secs - young).abs() / young < 0.01);
        // T_wall = T(1 + δ/τ) / (1 − (R + (τ+δ)/2)/M): 600 s restarts every 11,134 s cost 5.4%.
        let m = g.cluster_mtbf_hours * 3600.0;
        let tau = g.checkpoint_interval_secs;
        let d = 1e12 / 2.048e12;
        let want = 54.0 * (1.0 + d / tau) / (1.0 - (600.0 + (tau + d) / 2.0) / m);
        assert!(
            (g.expected_days - want).abs() < 1e-9,
            "{} vs {want}",
            g.expected_days
        );
        assert!(g.expected_days > 54.0 && g.goodput < 0.95 && g.goodput > 0.9);
        assert!((g.expected_failures - g.expected_days * 24.0 / 3.093).abs() < 1.0);
    }

    #[test]
    fn no_failures_no_overhead_and_overload_is_infinite() {
        let fm = FailureModel {
            failures_per_gpu_hour: 0.0,
            ..FailureModel::default()
        };
        let g = goodput(&fm, 86400.0, 8, 1, 1e9);
        assert_eq!(g.expected_days, 1.0);
        let bad = FailureModel {
            failures_per_gpu_hour: 1.0,
            restart_secs: 3600.0,
            ..FailureModel::default()
        };
        assert!(goodput(&bad, 86400.0, 64, 8, 1e12)
            .expected_days
            .is_infinite());
    }
}
