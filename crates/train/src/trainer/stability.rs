//! What the loop asks before an update reaches the weights: the fp16 loss scale
//! (`crate::loss_scale`) and the stability guards (`crate::guard`), combined into one decision
//! per step; and the rollback to the last checkpoint.
//!
//! Every rank decides alike without extra messages: the loss is shared by every rank before
//! the decision, and the gradient norm is global (all-reduced gradients under data
//! parallelism, ZeRO's gathered norm, the pipeline's sum over stages), so a non-finite value on
//! any rank or stage makes the norm non-finite everywhere.

use crate::checkpoint::{self, TrainState};
use crate::config::{StabilitySection, TrainConfig};
use crate::error::TrainError;
use crate::guard::{Guard, GuardCounts, SkipReason, StabilityState, Verdict};
use crate::loss_scale::{LossScaler, ScaleVerdict};
use crate::pipeline::StageModel;
use model::{ModelConfig, ParamLayout, Shard};
use std::ops::Range;
use std::path::Path;

/// The loop's decision for one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Decision {
    /// Apply the update.
    Apply,
    /// Drop it; the reason as `metrics.jsonl` names it.
    Skip(&'static str),
    /// Drop it, restore the last checkpoint and skip the data since (a loss spike).
    Rollback { loss: f32, threshold: f64 },
}

/// The guard, the fp16 loss scale and the fault injection of one run.
pub(super) struct Stability {
    guard: Guard,
    scaler: Option<LossScaler>,
    cfg: StabilitySection,
    /// Rollbacks so far.
    pub(super) rollbacks: u64,
    /// Steps skipped so far for any reason (overflow, non-finite, spike).
    pub(super) skipped: u64,
    /// Injected bad batches already served: a rollback re-runs the step numbers, but the bad
    /// data is gone.
    served: Vec<u64>,
    /// The checkpoint step of the last rollback and how many times in a row it was the target.
    last_rollback: Option<(u64, u32)>,
}

/// Rollbacks in a row to the same checkpoint before the run stops.
const MAX_ROLLBACKS_TO_ONE_CHECKPOINT: u32 = 3;

impl Stability {
    /// Fresh, or continuing from a checkpoint's `saved` state (the settings are always the
    /// config's).
    pub(super) fn new(cfg: &TrainConfig, saved: Option<StabilityState>) -> Stability {
        let st = &cfg.stability;
        let fp16 = cfg.train.precision == crate::config::Precision::Fp16Mixed;
        let (guard, scale_state, rollbacks) = match saved {
            Some(s) => (s.guard.with_config(st.guard()), s.loss_scale, s.rollbacks),
            None => (Guard::new(st.guard()), None, 0),
        };
        let scaler = fp16.then(|| match scale_state {
            Some(s) => LossScaler::resume(st.loss_scale(), s),
            None => LossScaler::new(st.loss_scale()),
        });
        let skipped =
            guard.counts.nonfinite_skipped + scaler.as_ref().map_or(0, |s| s.state().skipped);
        Stability {
            guard,
            scaler,
            cfg: st.clone(),
            rollbacks,
            skipped,
            served: Vec::new(),
            last_rollback: None,
        }
    }

    /// Records a rollback from step `from` to the checkpoint at `to`; errors when the run has
    /// gone back to the same checkpoint too many times in a row (the spikes are not the data's).
    pub(super) fn rolled_back(&mut self, from: u64, to: u64) -> Result<(), TrainError> {
        self.rollbacks += 1;
        let n = match self.last_rollback {
            Some((at, n)) if at == to => n + 1,
            _ => 1,
        };
        self.last_rollback = Some((to, n));
        if n >= MAX_ROLLBACKS_TO_ONE_CHECKPOINT {
            return Err(TrainError::Data(format!(
                "loss spikes rolled the run back to the checkpoint at step {to} {n} times in a \
                 row (the last from step {from}), though each rollback skips the data since: \
                 lower optim.lr, raise stability.spike_margin, or set stability.spike_action = \"skip\""
            )));
        }
        Ok(())
    }

    /// What a checkpoint keeps.
    pub(super) fn state(&self) -> StabilityState {
        StabilityState {
            guard: self.guard.clone(),
            loss_scale: self.scaler.as_ref().map(|s| s.state()),
            rollbacks: self.rollbacks,
        }
    }

    /// The loss scale of this step (fp16), `None` otherwise.
    pub(super) fn loss_scale(&self) -> Option<f32> {
        self.scaler.as_ref().map(|s| s.scale())
    }

    /// The guard's counters.
    pub(super) fn counts(&self) -> GuardCounts {
        self.guard.counts
    }

    /// Whether step `step` (1-based) gets a NaN loss gradient (fault injection).
    pub(super) fn inject_nan(&self, step: u64) -> bool {
        self.cfg.inject_nan_steps.contains(&step)
    }

    /// Whether step `step` (1-based) trains on a corrupt batch (fault injection; once per
    /// step number, so a rollback does not meet it again).
    pub(super) fn inject_bad_batch(&mut self, step: u64) -> bool {
        if self.cfg.inject_bad_batch_steps.contains(&step) && !self.served.contains(&step) {
            self.served.push(step);
            return true;
        }
        false
    }

    /// Decides step `step` (1-based) from its shared loss and global gradient norm (of the
    /// unscaled gradients). Under fp16 a non-finite gradient with a finite loss is an
    /// overflow: the loss scale halves and the step is skipped without counting towards
    /// divergence, unless the scale is already at its minimum. Errors when the guard has seen
    /// too many non-finite steps in a row.
    pub(super) fn decide(
        &mut self,
        step: u64,
        loss: f32,
        norm: f64,
    ) -> Result<Decision, TrainError> {
        let finite = norm.is_finite();
        if let (Some(s), true) = (self.scaler.as_mut(), loss.is_finite()) {
            let at_min = s.scale() <= crate::loss_scale::LossScaleConfig::default().min;
            if s.update(finite) == ScaleVerdict::Skip && !at_min {
                self.skipped += 1;
                return Ok(Decision::Skip("overflow"));
            }
        }
        Ok(match self.guard.check(step, loss, norm, finite)? {
            Verdict::Apply => Decision::Apply,
            Verdict::Skip(SkipReason::NonFinite) => {
                self.skipped += 1;
                Decision::Skip("non-finite")
            }
            Verdict::Skip(SkipReason::LossSpike { .. }) => {
                self.skipped += 1;
                Decision::Skip("loss-spike")
            }
            Verdict::Rollback { loss, threshold } => {
                self.skipped += 1;
                Decision::Rollback { loss, threshold }
            }
        })
    }
}

/// The newest checkpoint in `out`, loaded for this rank (its chunks' weights, the optimizer
/// ranges `owned` of its flat buffer), for a rollback; `None` when the run has none yet.
pub(super) fn load_last_checkpoint(
    out: &Path,
    rcfg: &TrainConfig,
    mcfg: &ModelConfig,
    stage: &StageModel,
    dp_size: usize,
    owned: &[Range<usize>],
) -> Result<Option<TrainState>, TrainError> {
    if checkpoint::list(out).is_empty() {
        return Ok(None);
    }
    let full = ParamLayout::new(mcfg, &Shard::full(mcfg))?;
    let segments = crate::pipeline::full_segments(stage, &full);
    let want_full: Vec<Range<usize>> = crate::pipeline::to_full(&segments, owned)
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    let (_m, _l, mut st, _w) = checkpoint::find_resume(out, rcfg, dp_size, &|_| want_full.clone())?;
    st.params = crate::pipeline::slice_full(stage, &full, &st.params);
    Ok(Some(st))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_batch_is_served_once_and_repeated_rollbacks_stop() {
        let mut cfg = TrainConfig::default();
        cfg.stability.inject_bad_batch_steps = vec![7];
        let mut s = Stability::new(&cfg, None);
        assert!(!s.inject_bad_batch(6));
        assert!(s.inject_bad_batch(7));
        assert!(
            !s.inject_bad_batch(7),
            "gone after a rollback re-runs step 7"
        );
        s.rolled_back(9, 5).unwrap();
        s.rolled_back(8, 4).unwrap();
        s.rolled_back(9, 4).unwrap();
        let e = s.rolled_back(9, 4).unwrap_err().to_string();
        assert!(e.contains("step 4 3 times in a row"), "{e}");
        assert_eq!(s.rollbacks, 4);
    }
}
