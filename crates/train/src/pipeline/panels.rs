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

/// The one decision whether a rank packs weight panels (the allocation, the start report, the
/// fit check before allocating and `plan --cpu` all ask here): `f32` storage (`f32_storage`:
/// an fp32 run) on our AVX-512 kernel, more than one micro-batch per chunk and step
/// (`micro_batches`, [`micro_batches`] of the step list: each weight is then packed once per
/// step instead of twice per micro-batch), not under ZeRO-3 (`zero3`: its layers are gathered
/// into shared buffers), and not turned off by the environment variable
/// `SCALETRAIN_NO_WEIGHT_PANELS=1` (saves their memory, about twice the linear weights; for
/// measurements and tight machines).
pub fn weight_panels_wanted(f32_storage: bool, micro_batches: usize, zero3: bool) -> bool {
    let off = std::env::var("SCALETRAIN_NO_WEIGHT_PANELS").is_ok_and(|v| v.trim() == "1");
    !off && f32_storage && !zero3 && micro_batches >= 2 && WeightPanels::available()
}

/// Micro-batches each chunk of `stage` runs in the step list `ops`.
pub fn micro_batches(stage: &StageModel, ops: &[Op]) -> usize {
    ops.len() / (2 * stage.chunks.len()).max(1)
}

/// The step list of this rank: the pipeline schedule's for its stage, or with one stage (no
/// `pipe`, or one without pipeline stages) forward and backward of each of the `accum`
/// micro-batches in turn.
pub fn step_ops(pipe: Option<&super::Pipeline>, accum: usize) -> Vec<Op> {
    match pipe {
        Some(p) => p.ops(accum),
        None => {
            plan::schedule::build(plan::schedule::Kind::OneFOneB, 1, accum as u32, 1).swap_remove(0)
        }
    }
}

/// Bytes of the weight panels of `stage` when [`weight_panels_wanted`] says yes: every chunk's
/// `plan::cpu_runtime::weight_panel_bytes`, what [`StageActs::use_weight_panels`] allocates.
pub fn stage_panel_bytes(stage: &StageModel) -> u64 {
    stage
        .chunks
        .iter()
        .map(|(_, l, _)| plan::cpu_runtime::weight_panel_bytes(&l.shard.dims(&l.cfg)))
        .sum()
}

impl<E: Storage> StageActs<E> {
    /// Allocates the weight panels of `stage` when [`weight_panels_wanted`] says so for this
    /// storage type and the step list `ops` (`zero3`: the run is ZeRO-3). Returns whether it
    /// did.
    pub fn use_weight_panels(&mut self, stage: &StageModel, ops: &[Op], zero3: bool) -> bool {
        let micro = micro_batches(stage, ops);
        if !weight_panels_wanted(E::f32s(&[]).is_some(), micro, zero3) {
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
