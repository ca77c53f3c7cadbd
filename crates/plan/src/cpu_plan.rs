//! The layout planner of the CPU runtime: predicted step time, tokens/s and per-rank memory of a
//! (dp, pp, tp, micro-batch, ZeRO, sequence-parallel) layout of `scaletrain train` on the local
//! processes of one host, and the enumeration of the layouts of N processes with one global batch.
//! Pure functions; `scaletrain plan --cpu` filters the candidates through `train`'s own layout
//! check and prints the ranking (docs/cpu-planner.md).
//!
//! Legend: b = micro-batch, t = sequence, m = micro-batches per step and pipeline, G = global
//! batch in sequences = dp·m·b, R = dp·pp·tp ranks, n = threads per rank = max(1, cores / R).
//!
//! ```text
//! stages      = the runtime's balanced split (train::mesh::partition): identical layers of
//!               3·24·b·t·c² + 12·b·t²·c FLOPs, the last stage also the head's 3·2·b·t·c·vp
//! micro(s)    = cpu_time::step_time_as(stage s, b, t, 1, n, precision, recompute) without
//!               AdamW (bf16-mixed: linear layers and head on the bf16 kernel, the 16-bit
//!               working copy packed per micro-batch; full/selective recomputation: the
//!               layers' forward / attention scores again, cpu_time::recompute_work)
//!               (− sp: the layer norms' and residuals' elementwise passes split over tp too)
//!               + cpu_comm::tp_comm_secs(stage s, b, t, 1, sp) over the tp link
//!               (+ full recomputation: the layers' forward collectives again, half of theirs)
//!               + TP_WAKE_SECS · cpu_comm::tp_ring_phases(stage s) · (oversub − 1)
//!               then × (1 + TP_GROUP_LOSS · (tp·n/cores − 1) / (R/tp)) when tp·n > cores
//! reload      = RELOAD_SECS_PER_BYTE · 4 (mixed precision: 2) · params(slowest stage) when
//!               oversub > 1 (a rank back on a shared core re-reads its weights), else 0
//! pipeline    = sharing::shared_makespan(1F1B, pp, m, forward = ⅓ of the slowest micro(s)
//!               without what recomputation adds + reload, backward = the rest (the
//!               recomputed forward runs there) + reload, p2p = α + b·t·c·4 / β + P2P_MESSAGE_SECS · load when
//!               sent (max(1, threads of the running stages and the receiver / cores)),
//!               dp·tp ranks per stage on `cores`)  (pp = 1: oversub · m · micro; a core per
//!               thread: schedule::simulate's makespan)
//! AdamW(s)    = cpu_time's optimizer term of stage s, / dp under ZeRO-1/2/3 (the rank's
//!               shard) + with weight panels and m > 1: the stage's weight pass, once per step
//!               (and not in micro(s)); ZeRO-3 has no panels (its weights are gathered anew)
//! dp(s)       = oversub · (exposed dp comm(s) + contention)
//!               + DP_WAKE_SECS · ring steps(s) · (oversub − 1)
//!               (dp comm: cpu_comm::dp_comm_time's buckets; ZeRO-3:
//!               cpu_runtime::zero3_comm_time's per-micro-batch gathers and reduce-scatters
//!               behind micro(s))
//! step        = pipeline + oversub · max_s AdamW(s) + max_s dp(s)
//! oversub     = max(1, R·n / cores)               (more ranks than cores share them)
//! tokens/s    = G·t / step
//! memory      = max over stages of cpu_runtime::stage_memory_sp with the simulated peak of
//!               micro-batches in flight; ZeRO 1/2 shard AdamW state / gradients as
//!               cpu_runtime::zero_memory does (rank 0, the largest shard); ZeRO-3 (one stage)
//!               is cpu_runtime::zero3_memory_sp; the precision's working copies and the
//!               recomputation's activations as cpu_runtime::trainer_memory_sp; + the weight
//!               panels (cpu_runtime::weight_panel_bytes) when the step packs them (fp32)
//! time        = the model's precision and recomputation (`CpuModel`): bf16-mixed at
//!               cpu_time's bf16 constants (fitted to the quiet 1.7× of docs/performance.md),
//!               fp16-mixed with 16-bit bytes but f32 matmuls; ZeRO-3 gathers 16-bit weights
//!               under mixed precision (cpu_runtime::zero3_comm_time_with)
//! ```

use crate::cpu_comm::{dp_comm_time, tp_comm_secs, tp_ring_phases, CommCalibration, DpCommSetup};
use crate::cpu_runtime::{
    param_count, stage_memory_sp, trainer_memory_sp, weight_panel_bytes, zero3_comm_time_with,
    zero3_memory_sp, zero_memory, CpuRuntimeDims, CpuRuntimeMemory,
};
use crate::cpu_time::{
    elementwise_secs_as, step_time_as, tp_elementwise_share, weight_pass_secs, CpuCalibration,
};
use crate::recipe::{Precision, Recompute};
use crate::schedule::{build, simulate, Kind};

/// The model as the runtime builds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuModel {
    /// Vocabulary padded to a multiple of 64.
    pub padded_vocab: u64,
    /// Sequence length of training (and of the position embedding).
    pub seq_len: u64,
    /// Width.
    pub channels: u64,
    /// Attention heads.
    pub heads: u64,
    /// Transformer layers.
    pub layers: u64,
    /// Storage precision of training (`train.precision`): 16-bit working copies and
    /// activations under mixed precision, and no weight panels.
    pub precision: Precision,
    /// Activation recomputation (`train.recompute`).
    pub recompute: Recompute,
}

/// One layout of `scaletrain train` (`--dp --pp --tp --microbatches --zero
/// [--sequence-parallel]`, `train.batch_size = batch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CpuLayout {
    /// Data-parallel ranks.
    pub dp: u64,
    /// Pipeline stages.
    pub pp: u64,
    /// Tensor-parallel degree.
    pub tp: u64,
    /// Micro-batch size in sequences (`train.batch_size`).
    pub batch: u64,
    /// Micro-batches per step and rank (`--microbatches`, = `train.grad_accum`).
    pub microbatches: u64,
    /// ZeRO stage 0–3 (3: one pipeline stage).
    pub zero: u8,
    /// Sequence parallelism (tp > 1).
    pub sp: bool,
}

impl CpuLayout {
    /// Processes of the layout.
    pub fn ranks(&self) -> u64 {
        self.dp * self.pp * self.tp
    }
}

/// The host and the runtime's settings the prediction depends on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuHost {
    /// Cores of the host.
    pub cores: u64,
    /// Compute constants.
    pub compute: CpuCalibration,
    /// Link constants of the transport between local ranks (data-parallel buckets and
    /// pipeline messages).
    pub link: CommCalibration,
    /// Link constants of the tensor-parallel collectives on the training thread.
    pub tp_link: CommCalibration,
    /// Data-parallel gradient bucket size in bytes.
    pub bucket_bytes: u64,
    /// Buckets reduced on a communication thread during backward.
    pub overlap: bool,
}

/// Predicted step of one layout.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CpuPrediction {
    /// Threads per rank (`--threads`).
    pub threads: u64,
    /// Layers per pipeline stage.
    pub stage_layers: Vec<u64>,
    /// Predicted step time, seconds.
    pub step_secs: f64,
    /// Pipeline makespan of forward/backward (with tp collectives), seconds.
    pub pipeline_secs: f64,
    /// Idle time of the busiest stage, seconds: its idle share of the schedule simulated with a
    /// core per rank, of `pipeline_secs` (with ranks sharing cores a waiting stage lends its
    /// core out, so the shared makespan is not the dedicated one plus this idle time; the
    /// dedicated bubble itself can exceed the shared makespan).
    pub bubble_secs: f64,
    /// Tensor-parallel collectives of the slowest stage (part of `pipeline_secs`), seconds.
    pub tp_comm_secs: f64,
    /// Data-parallel communication the training thread waits for, plus contention, seconds.
    pub dp_comm_secs: f64,
    /// AdamW on the slowest stage (its ZeRO shard), and with weight panels the weight packing
    /// done once per step.
    pub optimizer_secs: f64,
    /// Tokens per second of the job.
    pub tokens_per_sec: f64,
    /// Largest per-rank buffer memory (parameters, gradients, AdamW, activations), bytes.
    pub memory_bytes: u64,
}

/// Layers per stage as the runtime splits them (`train::mesh::partition` without
/// `--pp-layers`).
pub fn stage_layers(m: &CpuModel, batch: u64, pp: u64) -> Vec<u64> {
    let (c, vp) = (m.channels as f64, m.padded_vocab as f64);
    let (b, t) = (batch as f64, m.seq_len as f64);
    let layer = 3.0 * 24.0 * b * t * c * c + 12.0 * b * t * t * c;
    let head = 3.0 * 2.0 * b * t * c * vp;
    crate::partition::balanced(pp as usize, &vec![layer; m.layers as usize], 0.0, head)
        .into_iter()
        .map(|n| n as u64)
        .collect()
}

fn stage_dims(m: &CpuModel, layers: u64, stage: u64, pp: u64, tp: u64) -> CpuRuntimeDims {
    CpuRuntimeDims {
        padded_vocab: m.padded_vocab,
        max_seq_len: m.seq_len,
        channels: m.channels,
        heads: m.heads,
        layers,
        has_embedding: stage == 0,
        has_head: stage + 1 == pp,
        tp,
    }
}

/// Predicts layout `l` of model `m` on `host` (see the module formulas).
pub fn predict(m: &CpuModel, l: &CpuLayout, host: &CpuHost) -> CpuPrediction {
    let ranks = l.ranks().max(1);
    let threads = (host.cores / ranks).max(1);
    let oversub = ((ranks * threads) as f64 / host.cores.max(1) as f64).max(1.0);
    let t = m.seq_len;
    let mb = l.microbatches.max(1);
    let layers = stage_layers(m, l.batch, l.pp);
    let dims: Vec<CpuRuntimeDims> = layers
        .iter()
        .enumerate()
        .map(|(s, &n)| stage_dims(m, n, s as u64, l.pp, l.tp))
        .collect();
    // ZeRO-1/2 run AdamW on this rank's 1/dp shard of the stage's parameters.
    let shard = if l.zero > 0 && l.dp > 1 { l.dp } else { 1 } as f64;
    // ZeRO-3 gathers each unit's weights per micro-batch into buffers it frees again: no
    // weight panels.
    let zero3 = l.zero == 3 && l.dp > 1;
    // (With one micro-batch the runtime keeps none either: a recomputed forward then packs
    // the weights again; the micro-step's own weight pass is the same with or without.)
    let compute = CpuCalibration {
        weight_panels: host.compute.weight_panels
            && !zero3
            && m.precision == Precision::Fp32
            && l.microbatches > 1,
        ..host.compute
    };
    // With weight panels and several micro-batches, each rank packs its weights once per step
    // (counted beside AdamW) instead of in every micro-batch.
    let panels = compute.weight_panels && mb > 1;
    // Per stage: (micro-step compute + tp collectives, tp collectives, AdamW + weight packing,
    // what recomputation adds to the micro-step: it runs in the backward).
    let per: Vec<(f64, f64, f64, f64)> = dims
        .iter()
        .map(|d| {
            let s = step_time_as(
                d,
                l.batch,
                t,
                1,
                threads,
                (m.precision, m.recompute),
                &compute,
            );
            let recomputed = if m.recompute == Recompute::None {
                0.0
            } else {
                let plain = step_time_as(
                    d,
                    l.batch,
                    t,
                    1,
                    threads,
                    (m.precision, Recompute::None),
                    &compute,
                );
                (s.matmul_secs + s.memory_secs + s.overhead_secs)
                    - (plain.matmul_secs + plain.memory_secs + plain.overhead_secs)
                    + modes::recomputed_tp_secs(m, d, l, oversub, &host.tp_link)
            };
            // Once per step: the pass less what every micro-batch still pays (which stays in
            // the micro-step), so m micro-batches cost one pass + (m − 1) residuals.
            let packing = if panels {
                let k = &compute;
                weight_pass_secs(d, threads, k)
                    * (1.0 - k.panel_bytes_per_param_per_micro / k.weight_bytes_per_param)
            } else {
                0.0
            };
            let tp = tp_comm_secs(d, l.batch, t, 1, l.sp, &host.tp_link)
                + sharing::TP_WAKE_SECS * tp_ring_phases(d, 1) * (oversub - 1.0)
                + modes::recomputed_tp_secs(m, d, l, oversub, &host.tp_link);
            // Sequence parallelism also splits the layer norms' and residuals' passes (and
            // those of the recomputed forward).
            let sp_saving = if l.sp {
                elementwise_secs_as(d, l.batch, t, threads, (m.precision, m.recompute), &compute)
                    * (tp_elementwise_share(d.tp, false) - tp_elementwise_share(d.tp, true))
            } else {
                0.0
            };
            (
                s.matmul_secs + s.memory_secs - packing - sp_saving + s.overhead_secs + tp,
                tp,
                s.optimizer_secs / shard + packing,
                recomputed,
            )
        })
        .collect();
    let slowest = (0..per.len())
        .max_by(|&a, &b| per[a].0.total_cmp(&per[b].0))
        .unwrap_or(0);
    // A tensor-parallel group with more threads than cores never runs at once: its compute
    // (and collectives) stretch by TP_GROUP_LOSS per extra core's worth of threads, shared
    // by the host's R/tp groups (another group's work fills the idle cores).
    let stretch = sharing::tp_group_stretch(l.tp * threads, host.cores, ranks / l.tp.max(1));
    let micro = per[slowest].0 * stretch;
    // Forward: a third of the micro-step without recomputation; the backward the rest, the
    // recomputed forward included.
    let forward = (per[slowest].0 - per[slowest].3) * stretch / 3.0;
    let backward = micro - forward;
    // Ranks sharing cores re-read their stage's weights in each forward and backward: the
    // fp32 weights, or under mixed precision the 16-bit working copy the GEMMs read.
    let weight_bytes = if m.precision == Precision::Fp32 { 4 } else { 2 };
    let reload = if oversub > 1.0 {
        sharing::RELOAD_SECS_PER_BYTE * (param_count(&dims[slowest]) * weight_bytes) as f64
    } else {
        0.0
    };
    // A pipeline message: its transfer, and a wake-up that waits longer for a core the more
    // ranks compute meanwhile (in the shared simulation the load when it is sent, in the
    // dedicated one the whole host's oversubscription).
    let (p2p, wake) = if l.pp > 1 {
        let rows = if l.sp {
            l.batch * t / l.tp
        } else {
            l.batch * t
        };
        (
            host.link.latency_secs + (rows * m.channels * 4) as f64 / host.link.bus_bytes_per_sec,
            sharing::P2P_MESSAGE_SECS,
        )
    } else {
        (0.0, 0.0)
    };
    let lists = build(Kind::OneFOneB, l.pp as u32, mb as u32, 1);
    // Dedicated cores: the bubble and the activations in flight.
    let sim = simulate(
        &lists,
        mb as u32,
        1,
        forward,
        backward,
        p2p + wake * oversub,
    );
    // Shared cores: a waiting stage lends its core to the other ranks.
    let makespan = sharing::shared_makespan(
        &lists,
        mb as u32,
        (forward + reload, backward + reload, p2p, wake),
        (l.dp * l.tp, threads, host.cores),
    );
    let optimizer_secs = per.iter().map(|p| p.2).fold(0.0, f64::max);
    let spare_core = host.cores > ranks * threads;
    let dp_comm_secs = if l.dp > 1 {
        dims.iter()
            .zip(&per)
            .map(|(d, p)| {
                let setup = DpCommSetup {
                    dp: l.dp,
                    zero: l.zero,
                    accum: mb,
                    bucket_bytes: host.bucket_bytes,
                    // ZeRO-1 in a pipeline reduces after the step's list (the tied embedding
                    // is summed first), not during backward.
                    overlap: host.overlap && !(l.zero > 0 && l.pp > 1),
                    spare_core,
                };
                let c = if zero3 {
                    // Gathers before each unit's forward and backward, reduce-scatters after
                    // its backward, in every micro-batch (hidden behind the micro-step's
                    // compute with prefetch).
                    zero3_comm_time_with(
                        d,
                        (mb, l.dp),
                        p.0,
                        (host.overlap, spare_core),
                        m.precision,
                        &host.link,
                    )
                } else {
                    dp_comm_time(d, &setup, p.0 * 2.0 / 3.0, &host.link)
                };
                // All ranks communicate at once after backward: the collectives' CPU work
                // shares the cores too, and every ring step waits for its rank to get one.
                let rounds = if l.zero == 2 { mb } else { 1 } as f64;
                let buckets = c.buckets as f64;
                let ring_steps = (l.dp - 1) as f64
                    * match l.zero {
                        0 => 2.0 * buckets,
                        // The embedding's gather once, then per micro-batch two gathers of
                        // every other unit and a reduce-scatter of every unit; the norm.
                        3 => {
                            let e = if d.has_embedding { 1.0 } else { 0.0 };
                            e + mb as f64 * (2.0 * (buckets - e) + buckets) + 1.0
                        }
                        _ => buckets * rounds + buckets + 1.0,
                    };
                oversub * (c.exposed_secs + c.contention_secs)
                    + sharing::DP_WAKE_SECS * ring_steps * (oversub - 1.0)
            })
            .fold(0.0, f64::max)
    } else {
        0.0
    };
    let step_secs = makespan + oversub * optimizer_secs + dp_comm_secs;
    let memory_bytes = dims
        .iter()
        .zip(&sim.peak_in_flight)
        .map(|(d, &sets)| {
            let mut mem = rank_memory(m, d, l, sets as u64, (host.bucket_bytes, host.overlap));
            if panels {
                mem.weight_panel_bytes = weight_panel_bytes(d);
            }
            mem.total_bytes()
        })
        .max()
        .unwrap_or(0);
    CpuPrediction {
        threads,
        stage_layers: layers,
        step_secs,
        pipeline_secs: makespan,
        bubble_secs: if sim.makespan > 0.0 {
            sim.bubble / sim.makespan * makespan
        } else {
            0.0
        },
        tp_comm_secs: mb as f64 * per[slowest].1,
        dp_comm_secs,
        optimizer_secs,
        tokens_per_sec: (l.dp * mb * l.batch * t) as f64 / step_secs,
        memory_bytes,
    }
}

/// Buffer memory of rank 0 of a stage with `sets` micro-batches in flight (`overlap`: ZeRO-3
/// prefetches the next unit into a second gather buffer).
fn rank_memory(
    m: &CpuModel,
    d: &CpuRuntimeDims,
    l: &CpuLayout,
    sets: u64,
    (bucket_bytes, overlap): (u64, bool),
) -> CpuRuntimeMemory {
    let t = d.max_seq_len;
    if l.zero == 3 && l.dp > 1 {
        // One stage; the activations of one micro-batch, split along the sequence with sp.
        return zero3_memory_sp(
            d,
            (l.batch, t),
            (l.dp, 0),
            overlap,
            (m.precision, m.recompute),
            l.sp,
        );
    }
    let mut mem = stage_memory_sp(&[(*d, sets)], l.batch, t, l.pp > 1, l.sp);
    if l.zero > 0 && l.dp > 1 {
        let z = zero_memory(d, l.batch, t, l.zero, l.dp, 0, bucket_bytes);
        mem.optimizer_bytes = z.optimizer_bytes;
        mem.grad_bytes = z.grad_bytes;
    }
    // Mixed precision's 16-bit working copies, and the activations saved under the precision
    // and recomputation, as train's report and buffers count them.
    trainer_memory_sp(
        mem,
        &[(*d, sets)],
        l.batch,
        t,
        l.pp > 1,
        (m.precision, m.recompute),
        l.sp,
    )
}

mod choices;
#[cfg(test)]
mod measured;
mod modes;
pub mod sharing;
pub use choices::{candidates, collapse, near_ties, rank, CpuChoice, RESOLUTION, TIE};

#[cfg(test)]
pub(crate) mod tests;
