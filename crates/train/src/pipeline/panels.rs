//! Which weights of a stage get panels packed once per step (`kernels::panels`): every
//! linear layer's weight and the tied LM head, at their offsets in the stage's flat buffer.
//! `plan::cpu_runtime::weight_panel_bytes` predicts what they hold.

use super::exec::{StageActs, StageModel};
use crate::precision::Storage;
use kernels::panels::WeightPanels;
use plan::schedule::Op;

/// `(offset, n, k)` of each `(n, k)` weight the stage's matmuls use, per chunk.
pub(super) fn stage_weights(stage: &StageModel) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    for (_, layout, window) in &stage.chunks {
        let c = layout.cfg.channels;
        let base = window.start;
        for lp in &layout.layers {
            // c_attn and c_fc are (·, c); the two projections are (c, ·).
            for r in [&lp.qkv_w, &lp.fc_w] {
                out.push((base + r.start, r.len() / c, c));
            }
            for r in [&lp.proj_w, &lp.fcproj_w] {
                out.push((base + r.start, c, r.len() / c));
            }
        }
        if let Some(h) = &layout.head {
            out.push((base + h.wte.start, h.wte.len() / c, c));
        }
    }
    out
}

impl<E: Storage> StageActs<E> {
    /// Allocates the weight panels when they pay: `f32` storage on our AVX-512 kernel and more
    /// than one micro-batch per chunk in the step list `ops` (each weight is then packed once
    /// per step instead of twice per micro-batch), unless the environment variable
    /// `SCALETRAIN_NO_WEIGHT_PANELS` is `1` (saves their memory, about twice the linear
    /// weights; for measurements). Returns whether it did.
    pub fn use_weight_panels(&mut self, stage: &StageModel, ops: &[Op]) -> bool {
        let micro = ops.len() / (2 * stage.chunks.len()).max(1);
        let off = std::env::var("SCALETRAIN_NO_WEIGHT_PANELS").is_ok_and(|v| v.trim() == "1");
        if off || E::f32s(&[]).is_none() || !WeightPanels::available() || micro < 2 {
            return false;
        }
        self.panels = WeightPanels::new(&stage_weights(stage));
        true
    }

    /// Bytes of the weight panels (0 without them).
    pub fn panel_bytes(&self) -> usize {
        self.panels.bytes()
    }
}
