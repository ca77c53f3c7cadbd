//! What a run predicts for this rank before its first step: buffer memory
//! (`plan::cpu_runtime`, by layout), step time (`plan::cpu_time`) and, in a pipeline, the
//! stage's place and the schedule's wait ([`pipeline_info`]). The end-of-run report sets
//! the measurements beside these.

use super::records::PipelineInfo;
use crate::config::TrainConfig;
use crate::dp::{Dp, ZeroStage};
use crate::pipeline::{Pipeline, StageActs, StageModel};
use crate::precision::Storage;
use model::Shard;
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
    let (dp_rank, dp_size) = dp.map_or((0, 1), |d| (d.rank(), d.size()));
    let sp = pipe.is_some_and(|p| p.sequence_parallel);
    let held: Vec<Shard> = stage
        .chunks
        .iter()
        .map(|(_, l, _)| l.shard.clone())
        .collect();
    let dims = Shard {
        layers: held[0].layers.start..held.last().expect("a chunk").layers.end,
        has_embedding: held.iter().any(|s| s.has_embedding),
        has_head: held.iter().any(|s| s.has_head),
        ..held[0].clone()
    }
    .dims(mcfg);
    let predicted_step = plan::cpu_time::step_time(
        &dims,
        b as u64,
        t as u64,
        accum as u64,
        threads as u64,
        &plan::cpu_time::CpuCalibration {
            weight_panels: acts.panel_bytes() > 0,
            ..Default::default()
        },
    );
    let pipeline = pipe.map(|p| pipeline_info(p, acts, mcfg, (accum, b, t, threads)));
    let base = match (dp, pipe) {
        // ZeRO-3 runs one stage (tensor parallelism or not): its own formula, for this rank's
        // tensor-parallel shard (sequence parallelism splits the activations along the
        // sequence).
        (Some(d), _) if d.zero() == ZeroStage::Three => plan::cpu_runtime::zero3_memory_sp(
            &dims,
            (b as u64, t as u64),
            (dp_size as u64, dp_rank as u64),
            d.overlap(),
            (cfg.train.precision, cfg.train.recompute),
            sp,
        ),
        (Some(d), None) => plan::cpu_runtime::zero_memory(
            &dims,
            b as u64,
            t as u64,
            d.zero().number(),
            dp_size as u64,
            dp_rank as u64,
            d.bucket_bytes() as u64,
        ),
        (_, Some(_)) => {
            let chunks: Vec<_> = held
                .iter()
                .zip(acts.sets())
                .map(|(s, k)| (s.dims(mcfg), k as u64))
                .collect();
            plan::cpu_runtime::stage_memory_sp(&chunks, b as u64, t as u64, stage.vstages > 1, sp)
        }
        (None, None) => plan::cpu_runtime::memory(&dims, b as u64, t as u64),
    };
    let chunk_sets: Vec<_> = match pipe {
        Some(_) => held
            .iter()
            .zip(acts.sets())
            .map(|(s, k)| (s.dims(mcfg), k as u64))
            .collect(),
        None => vec![(dims, 1)],
    };
    let zero3 = dp.is_some_and(|d| d.zero() == ZeroStage::Three);
    // ZeRO-3's own formula counts its precision and recomputation already.
    let mut predicted = if zero3 {
        base
    } else {
        plan::cpu_runtime::trainer_memory_sp(
            base,
            &chunk_sets,
            b as u64,
            t as u64,
            stage.vstages > 1,
            (cfg.train.precision, cfg.train.recompute),
            sp,
        )
    };
    if acts.panel_bytes() > 0 {
        // The weight panels packed once per step (`kernels::panels`), a category of their own.
        predicted.weight_panel_bytes = crate::pipeline::stage_panel_bytes(stage);
    }
    Predictions {
        dims,
        step: predicted_step,
        memory: predicted,
        pipeline,
    }
}

/// What the start report says about the pipeline.
pub(super) fn pipeline_info<E: crate::precision::Storage>(
    p: &Pipeline,
    acts: &StageActs<E>,
    mcfg: &model::ModelConfig,
    (m, b, t, threads): (usize, usize, usize, usize),
) -> PipelineInfo {
    let wait = p.predicted_wait(mcfg, (m, b, t, threads));
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
