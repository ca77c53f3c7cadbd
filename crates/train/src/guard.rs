//! Training stability guards: a step whose loss or gradients are not finite never reaches the
//! weights (skipped and counted; `max_bad_in_a_row` in a row stop the run with an error naming
//! the step), and loss spikes are detected against a running statistic: an exponential moving
//! mean and variance of the loss (West 1979's weighted update), a spike being a loss above
//! `mean + margin·std` (with at least `warmup` clean steps seen). The configured action is
//! `Log`, `Skip` (drop the batch's update), or `Rollback` (the caller restores the last
//! checkpoint and skips the offending data, as large-model teams report doing, e.g. Chowdhery
//! et al. 2022, PaLM §5.1). Gradient-norm spikes (same statistic, on the norm) are reported.

use serde::{Deserialize, Serialize};

/// What to do when the loss spikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpikeAction {
    /// Record it and go on.
    Log,
    /// Do not apply this batch's update.
    Skip,
    /// Restore the last checkpoint and skip the batches since (the caller does it).
    Rollback,
}

/// Guard settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuardConfig {
    /// Stop after this many non-finite steps in a row (default 5).
    pub max_bad_in_a_row: u32,
    /// A loss above `mean + margin · std` of the running statistic is a spike (default 6).
    pub spike_margin: f64,
    /// Weight of the newest value in the running statistic (default 0.02: ~50 steps).
    pub ema_weight: f64,
    /// Clean steps before spikes are judged (default 20).
    pub warmup: u32,
    /// What a loss spike does (default `Log`).
    pub spike_action: SpikeAction,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            max_bad_in_a_row: 5,
            spike_margin: 6.0,
            ema_weight: 0.02,
            warmup: 20,
            spike_action: SpikeAction::Log,
        }
    }
}

/// The guard's decision for one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    /// Apply the update.
    Apply,
    /// Do not apply it (non-finite values, or a spike with `Skip`).
    Skip(SkipReason),
    /// A spike with `Rollback`: restore the last checkpoint, skip the data since.
    Rollback { loss: f32, threshold: f64 },
}

/// Why a step was skipped.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SkipReason {
    /// The loss or a gradient was inf/NaN.
    NonFinite,
    /// The loss exceeded the spike threshold.
    LossSpike { loss: f32, threshold: f64 },
}

/// Too many non-finite steps in a row.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "training diverged: {count} steps in a row (the last at step {step}) had a non-finite loss or \
     gradient; lower the learning rate, enable gradient clipping, or for fp16 check the loss scale"
)]
pub struct Diverged {
    /// Steps in a row.
    pub count: u32,
    /// The last of them.
    pub step: u64,
}

/// What a checkpoint keeps of the stability machinery, so a resumed run judges spikes and
/// scales the loss exactly as the uninterrupted one would.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StabilityState {
    /// The guard's running statistics and counts.
    pub guard: Guard,
    /// fp16: the dynamic loss scale (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<crate::loss_scale::LossScaleState>,
    /// Steps rolled back so far (loss spikes with `rollback`).
    #[serde(default)]
    pub rollbacks: u64,
}

/// A running mean and variance with exponential weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Running {
    mean: f64,
    var: f64,
    n: u32,
}

impl Running {
    fn push(&mut self, x: f64, w: f64) {
        if self.n == 0 {
            self.mean = x;
            self.var = 0.0;
        } else {
            let d = x - self.mean;
            self.mean += w * d;
            self.var = (1.0 - w) * (self.var + w * d * d);
        }
        self.n = self.n.saturating_add(1);
    }
    fn threshold(&self, margin: f64) -> f64 {
        self.mean + margin * self.var.sqrt()
    }
}

/// Counters the run reports (in `metrics.jsonl`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GuardCounts {
    /// Steps skipped for non-finite values.
    pub nonfinite_skipped: u64,
    /// Loss spikes seen.
    pub loss_spikes: u64,
    /// Gradient-norm spikes seen.
    pub grad_norm_spikes: u64,
}

/// The guard's state (checkpointable).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Guard {
    cfg: GuardConfig,
    loss: Running,
    norm: Running,
    bad_in_a_row: u32,
    /// What happened so far.
    pub counts: GuardCounts,
}

impl Guard {
    /// The same statistics and counts under new settings (a resumed run may change them).
    pub fn with_config(mut self, cfg: GuardConfig) -> Guard {
        self.cfg = cfg;
        self
    }

    /// Non-finite steps in a row so far.
    pub fn bad_in_a_row(&self) -> u32 {
        self.bad_in_a_row
    }

    /// A fresh guard.
    pub fn new(cfg: GuardConfig) -> Guard {
        Guard {
            cfg,
            loss: Running::default(),
            norm: Running::default(),
            bad_in_a_row: 0,
            counts: GuardCounts::default(),
        }
    }

    /// Judges step `step` from its loss, gradient norm and whether every gradient is finite.
    /// Only applied steps update the running statistics. Errors after too many non-finite steps
    /// in a row.
    pub fn check(
        &mut self,
        step: u64,
        loss: f32,
        grad_norm: f64,
        grads_finite: bool,
    ) -> Result<Verdict, Diverged> {
        if !(loss.is_finite() && grad_norm.is_finite() && grads_finite) {
            self.bad_in_a_row += 1;
            self.counts.nonfinite_skipped += 1;
            if self.bad_in_a_row >= self.cfg.max_bad_in_a_row {
                return Err(Diverged {
                    count: self.bad_in_a_row,
                    step,
                });
            }
            return Ok(Verdict::Skip(SkipReason::NonFinite));
        }
        self.bad_in_a_row = 0;
        let judged = self.loss.n >= self.cfg.warmup;
        if judged && grad_norm > self.norm.threshold(self.cfg.spike_margin) {
            self.counts.grad_norm_spikes += 1;
        }
        let threshold = self.loss.threshold(self.cfg.spike_margin);
        if judged && loss as f64 > threshold {
            self.counts.loss_spikes += 1;
            match self.cfg.spike_action {
                SpikeAction::Log => {}
                SpikeAction::Skip => {
                    return Ok(Verdict::Skip(SkipReason::LossSpike { loss, threshold }))
                }
                SpikeAction::Rollback => return Ok(Verdict::Rollback { loss, threshold }),
            }
        }
        self.loss.push(loss as f64, self.cfg.ema_weight);
        self.norm.push(grad_norm, self.cfg.ema_weight);
        Ok(Verdict::Apply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slowly falling loss with small noise.
    fn loss_at(i: u64) -> f32 {
        3.0 - 0.001 * i as f32 + 0.01 * ((i * 7919 % 13) as f32 / 13.0 - 0.5)
    }

    #[test]
    fn non_finite_steps_are_skipped_and_k_in_a_row_stop() {
        let mut g = Guard::new(GuardConfig::default());
        for i in 0..30 {
            assert_eq!(g.check(i, loss_at(i), 1.0, true), Ok(Verdict::Apply));
        }
        let nan = g.check(30, f32::NAN, 1.0, true).unwrap();
        assert_eq!(nan, Verdict::Skip(SkipReason::NonFinite));
        // An inf gradient (norm finite but a gradient not) is caught too.
        assert_eq!(
            g.check(31, 2.9, 1.0, false).unwrap(),
            Verdict::Skip(SkipReason::NonFinite)
        );
        assert_eq!(g.check(32, 2.9, 1.0, true).unwrap(), Verdict::Apply);
        for i in 33..37 {
            assert!(g.check(i, 2.9, f64::INFINITY, true).is_ok());
        }
        let err = g.check(37, 2.9, f64::NAN, true).unwrap_err();
        assert_eq!(err, Diverged { count: 5, step: 37 });
        assert!(err.to_string().contains("5 steps in a row"));
        assert_eq!(g.counts.nonfinite_skipped, 7);
    }

    #[test]
    fn an_injected_bad_batch_is_a_spike_with_the_configured_action() {
        for (action, want) in [
            (SpikeAction::Log, "apply"),
            (SpikeAction::Skip, "skip"),
            (SpikeAction::Rollback, "rollback"),
        ] {
            let mut g = Guard::new(GuardConfig {
                spike_action: action,
                ..GuardConfig::default()
            });
            for i in 0..100 {
                assert_eq!(g.check(i, loss_at(i), 1.0, true), Ok(Verdict::Apply), "{i}");
            }
            // A bad batch: loss 6 (vs ~2.9), gradient norm 50.
            let v = g.check(100, 6.0, 50.0, true).unwrap();
            let got = match v {
                Verdict::Apply => "apply",
                Verdict::Skip(SkipReason::LossSpike { loss, threshold }) => {
                    assert!(loss == 6.0 && threshold < 3.5, "{threshold}");
                    "skip"
                }
                Verdict::Rollback { .. } => "rollback",
                other => panic!("{other:?}"),
            };
            assert_eq!(got, want);
            assert_eq!(g.counts.loss_spikes, 1);
            assert_eq!(g.counts.grad_norm_spikes, 1);
            // Normal steps after it are not spikes.
            assert_eq!(g.check(101, loss_at(101), 1.0, true), Ok(Verdict::Apply));
        }
    }

    #[test]
    fn no_spikes_are_judged_during_warmup() {
        let mut g = Guard::new(GuardConfig::default());
        assert_eq!(g.check(0, 10.0, 1.0, true), Ok(Verdict::Apply));
        assert_eq!(g.check(1, 100.0, 1.0, true), Ok(Verdict::Apply));
        assert_eq!(g.counts.loss_spikes, 0);
    }
}
