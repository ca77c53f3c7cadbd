//! Dynamic loss scaling for fp16 training (Micikevicius et al. 2018, "Mixed Precision
//! Training", §3.2; the schedule of PyTorch's `GradScaler`): the loss gradient is multiplied by
//! `scale` so small gradients stay above fp16's subnormals; a step whose gradients overflow
//! (inf/NaN) is skipped and the scale halved; after `growth_interval` clean steps in a row the
//! scale doubles. bf16 has fp32's exponent range and needs none (its scale stays 1).
//!
//! The state is part of a checkpoint ([`LossScaleState`]), so a resumed run continues with the
//! same scale and count and stays bit-exact.

use serde::{Deserialize, Serialize};

/// Settings of the dynamic loss scale.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaleConfig {
    /// Initial scale (PyTorch's default 2^16).
    pub init: f32,
    /// Multiply by this after `growth_interval` clean steps (2).
    pub growth_factor: f32,
    /// Multiply by this after an overflow (0.5).
    pub backoff_factor: f32,
    /// Clean steps in a row before growing (2000; PyTorch's default).
    pub growth_interval: u32,
    /// The scale never goes below this (1) or above `max` (2^24).
    pub min: f32,
    /// Upper bound of the scale.
    pub max: f32,
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        LossScaleConfig {
            init: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            min: 1.0,
            max: 16_777_216.0,
        }
    }
}

/// What the scaler carries from step to step (checkpointed).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaleState {
    /// The current scale.
    pub scale: f32,
    /// Clean steps since the last overflow or growth.
    pub clean_steps: u32,
    /// Steps skipped for overflow so far.
    pub skipped: u64,
}

/// What to do with this step's gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleVerdict {
    /// Apply them (divided by the scale used for this step).
    Apply,
    /// They overflowed: skip the optimizer step (the scale was halved for the next one).
    Skip,
}

/// A dynamic loss scale.
#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    cfg: LossScaleConfig,
    state: LossScaleState,
}

impl LossScaler {
    /// A scaler at `cfg.init`.
    pub fn new(cfg: LossScaleConfig) -> LossScaler {
        LossScaler {
            cfg,
            state: LossScaleState {
                scale: cfg.init.clamp(cfg.min, cfg.max),
                clean_steps: 0,
                skipped: 0,
            },
        }
    }

    /// A scaler continuing from a checkpointed state.
    pub fn resume(cfg: LossScaleConfig, state: LossScaleState) -> LossScaler {
        LossScaler { cfg, state }
    }

    /// The scale to multiply this step's loss gradient by.
    pub fn scale(&self) -> f32 {
        self.state.scale
    }

    /// The state to checkpoint.
    pub fn state(&self) -> LossScaleState {
        self.state
    }

    /// Records whether this step's gradients were all finite and says whether to apply them;
    /// updates the scale for the next step.
    pub fn update(&mut self, grads_finite: bool) -> ScaleVerdict {
        let s = &mut self.state;
        if !grads_finite {
            s.scale = (s.scale * self.cfg.backoff_factor).max(self.cfg.min);
            s.clean_steps = 0;
            s.skipped += 1;
            return ScaleVerdict::Skip;
        }
        s.clean_steps += 1;
        if s.clean_steps >= self.cfg.growth_interval {
            s.scale = (s.scale * self.cfg.growth_factor).min(self.cfg.max);
            s.clean_steps = 0;
        }
        ScaleVerdict::Apply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LossScaleConfig {
        LossScaleConfig {
            growth_interval: 3,
            ..LossScaleConfig::default()
        }
    }

    #[test]
    fn overflow_halves_and_skips_clean_steps_grow() {
        let mut s = LossScaler::new(cfg());
        assert_eq!(s.scale(), 65536.0);
        assert_eq!(s.update(false), ScaleVerdict::Skip);
        assert_eq!(s.scale(), 32768.0);
        for _ in 0..2 {
            assert_eq!(s.update(true), ScaleVerdict::Apply);
            assert_eq!(s.scale(), 32768.0);
        }
        assert_eq!(s.update(true), ScaleVerdict::Apply);
        assert_eq!(
            s.scale(),
            65536.0,
            "grows after growth_interval clean steps"
        );
        // An overflow resets the clean count.
        s.update(true);
        s.update(false);
        s.update(true);
        s.update(true);
        assert_eq!(s.scale(), 32768.0);
        assert_eq!(s.state().skipped, 2);
    }

    #[test]
    fn bounds_hold_and_state_round_trips() {
        let mut s = LossScaler::new(LossScaleConfig {
            init: 2.0,
            growth_interval: 1,
            max: 8.0,
            ..LossScaleConfig::default()
        });
        for _ in 0..10 {
            s.update(false);
        }
        assert_eq!(s.scale(), 1.0, "never below min");
        for _ in 0..10 {
            s.update(true);
        }
        assert_eq!(s.scale(), 8.0, "never above max");
        let json = serde_json::to_string(&s.state()).unwrap();
        let back: LossScaleState = serde_json::from_str(&json).unwrap();
        let r = LossScaler::resume(s.cfg, back);
        assert_eq!(r, s);
    }
}
