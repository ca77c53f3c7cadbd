//! What a run predicts for this rank before its first step: buffer memory
//! (`plan::cpu_runtime`, by layout), step time (`plan::cpu_time`, under the run's precision
//! and recomputation) and, in a pipeline, the
//! stage's place and the schedule's wait ([`pipeline_info`]). The end-of-run report sets
//! the measurements beside these.

use super::records::PipelineInfo;
use crate::config::TrainConfig;
use crate::dp::Dp;
use crate::pipeline::{Pipeline, StageActs, StageModel};
use crate::precision::Storage;
use plan::cpu_runtime::{CpuRuntimeDims, CpuRuntimeMemory};
use plan::cpu_time::CpuStepTime;

/// The start report's predictions for this rank.
pub(super) struct Predictions {
    /// The plan crate's view of everything this rank holds (all its chunks as one).
    pub dims: CpuRuntimeDims,
    /// Step time of this rank's compute.
    pub step: CpuStepTime,
    /// Buffer memory of this rank.
    pub memory: CpuRuntimeMemory,
    /// The pipeline part of the start report.
    pub pipeline: Option<PipelineInfo>,
}

/// Predicts this rank's memory and step time for micro-batches of `b` sequences of `t` tokens,
/// `accum` per step, on `threads` threads.
pub(super) fn predict<E: Storage>(
    cfg: &TrainConfig,
    stage: &StageModel,
    acts: &StageActs<E>,
    dp: Option<&Dp>,
    pipe: Option<&Pipeline>,
    (b, t, accum, threads): (usize, usize, usize, usize),
) -> Predictions {
    let mcfg = &stage.chunks[0].1.cfg;
    let dims = crate::fits::stage_dims(stage);
    let predicted_step = plan::cpu_time::step_time_as(
        &dims,
        b as u64,
        t as u64,
        accum as u64,
        threads as u64,
        (cfg.train.precision, cfg.train.recompute),
        &plan::cpu_time::CpuCalibration {
            weight_panels: acts.panel_bytes() > 0,
            ..Default::default()
        },
    );
    let modes = (cfg.train.precision, cfg.train.recompute);
    let pipeline = pipe.map(|p| pipeline_info(p, acts, mcfg, (accum, b, t, threads), modes));
    let memory = crate::fits::rank_memory(
        stage,
        (b, t),
        &acts.sets(),
        dp,
        pipe,
        (cfg.train.precision, cfg.train.recompute),
        acts.panel_bytes() > 0,
    );
    Predictions {
        dims,
        step: predicted_step,
        memory,
        pipeline,
    }
}

/// What the start report says about the pipeline.
pub(super) fn pipeline_info<E: crate::precision::Storage>(
    p: &Pipeline,
    acts: &StageActs<E>,
    mcfg: &model::ModelConfig,
    (m, b, t, threads): (usize, usize, usize, usize),
    modes: (plan::recipe::Precision, plan::recipe::Recompute),
) -> PipelineInfo {
    let wait = p.predicted_wait(mcfg, (m, b, t, threads), modes);
    PipelineInfo {
        stage: p.stage(),
        stages: p.shape.pp,
        tp: p.tp(),
        schedule: p.schedule.name(),
        microbatches: m,
        parts: p.parts.clone(),
        chunks: p.chunks().into_iter().zip(acts.sets()).collect(),
        simulated_bubble: wait.equal_stages,
        predicted_wait: wait.stage,
        sequence_parallel: p.sequence_parallel,
        transport: p.transport(),
    }
}
