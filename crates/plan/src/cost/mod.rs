//! The cost model: bytes per device, FLOPs, and seconds per step for one layout.
//!
//! Legend: b = micro-batch (sequences), s = sequence, T = b·s tokens, h = hidden, a = heads,
//! d = head dim, g·d = K/V width, f = FFN hidden, V = vocabulary, l = layers, t = tp, p = pp,
//! v = virtual stages, n = dp, m = micro-batches per step (gradient accumulation), e = bytes per
//! activation element.
//!
//! Sources: activation bytes per layer follow Korthikanti et al. 2022 (arXiv 2205.05198), §4,
//! generalised term by term to GQA, gated MLPs, flash attention and no dropout; model states
//! follow Rajbhandari et al. 2019 (ZeRO, §3–5); FLOPs follow Narayanan et al. 2021 (eq. 3) and
//! Korthikanti et al. 2022 (§6, MFU/HFU); collectives use the α-β model with the nccl-tests bus
//! bandwidth convention (ring all-reduce moves 2(n−1)/n of the buffer per rank).

//!
//! Split by concern: `memory.rs` (bytes per device, FLOPs), `time.rs` (seconds per step).

use serde::Serialize;

use crate::explain::{line, Trace};
use crate::hardware::ClusterSpec;
use crate::layout::Layout;
use crate::model::ModelSpec;
use crate::recipe::{Precision, Recipe};

mod flops;
mod layer;
mod memory;
mod time;

pub use memory::layer_activation_bytes;

/// Efficiency constants of the time model. Every field says where its value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Calibration {
    /// Best fraction of peak a large matmul reaches. Fitted to Korthikanti et al. 2022, Table 4
    /// (one 22B layer on 8 A100s, forward 7.7 ms / backward 11.9 ms).
    pub matmul_eff: f64,
    /// Knee of the size penalty x/(x + knee) applied to each matmul dimension (small head dims
    /// and thin shards run slower); same fit.
    pub matmul_knee: f64,
    /// Achieved fraction of memory bandwidth for element-wise kernels (norms, softmax, GELU,
    /// optimizer). 0.8 is the STREAM-like figure seen on A100/H100 for large fused kernels.
    pub mem_eff: f64,
    /// Achieved fraction of the intra-node link for collectives (nccl-tests on DGX A100 reach
    /// about 230 of 300 GB/s bus bandwidth for large all-reduces: 0.77).
    pub intra_eff: f64,
    /// Achieved fraction of the network per GPU for collectives (nccl-tests across HDR/NDR
    /// InfiniBand nodes: about 0.8 of line rate).
    pub net_eff: f64,
    /// Fixed time per step not modelled by the above (data loading, logging, kernel-launch gaps),
    /// seconds. Fitted together with `matmul_eff`.
    pub step_overhead_secs: f64,
}

impl Default for Calibration {
    fn default() -> Self {
        Calibration {
            matmul_eff: 0.79,
            matmul_knee: 64.0,
            mem_eff: 0.8,
            intra_eff: 0.77,
            net_eff: 0.8,
            step_overhead_secs: 0.0,
        }
    }
}

/// Everything fixed across the layouts of one question: model, cluster, recipe, calibration.
#[derive(Debug, Clone)]
pub struct Context {
    /// The model.
    pub model: ModelSpec,
    /// The cluster.
    pub cluster: ClusterSpec,
    /// The recipe.
    pub recipe: Recipe,
    /// Efficiency constants.
    pub calib: Calibration,
}

/// Bytes per device, itemised, for the device with the largest total (the worst stage).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Memory {
    /// Working weights.
    pub weights: f64,
    /// Gradients.
    pub gradients: f64,
    /// Optimizer states (moments).
    pub optimizer_states: f64,
    /// fp32 master weights.
    pub master_weights: f64,
    /// Activations of all micro-batches in flight (plus logits on the last stage).
    pub activations: f64,
    /// Activations of one micro-batch on this device's layers.
    pub activations_per_microbatch: f64,
    /// Micro-batches whose activations are alive at the peak.
    pub microbatches_in_flight: f64,
    /// Communication buffers (DDP buckets, ZeRO gather buffers).
    pub comm_buffers: f64,
    /// Fixed runtime overhead (CUDA context, workspaces).
    pub runtime_overhead: f64,
    /// Sum of the above.
    pub total: f64,
    /// Device capacity.
    pub capacity: f64,
    /// Which pipeline stage is the worst (0-based).
    pub worst_stage: u64,
    /// Parameters held by that device (before ZeRO sharding), routed experts included.
    pub params_on_device: f64,
    /// Of those, routed-expert parameters (sharded over ep; 0 for a dense model).
    pub expert_params_on_device: f64,
    /// Model-state bytes of this device kept in host memory or NVMe (`--offload`; 0 without).
    pub host_bytes: f64,
    /// This device's share of the node's offload target: host DRAM (CPU offload) or NVMe (NVMe
    /// offload) per node ÷ GPUs per node; 0 when unknown (not checked) or without offload.
    pub host_capacity: f64,
}

impl Memory {
    /// The offloaded states fit in this device's share of the host (always true without
    /// offload or when the capacity is unknown).
    pub fn host_fits(&self) -> bool {
        self.host_capacity <= 0.0 || self.host_bytes <= self.host_capacity
    }
}

/// Seconds per optimizer step, split the way users reason about it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StepTime {
    /// Matmuls and memory-bound kernels of all micro-batches (incl. recompute).
    pub compute: f64,
    /// Exposed communication: tensor-parallel collectives, pipeline sends, exposed gradient sync.
    pub communication: f64,
    /// Pipeline fill and drain.
    pub bubble: f64,
    /// Optimizer step (memory-bound) and fixed overhead.
    pub optimizer: f64,
    /// Part of `optimizer`: with `--offload optimizer`, the exposed gradient download, CPU
    /// optimizer step, NVMe traffic and weight upload.
    pub offload: f64,
    /// Sum.
    pub total: f64,
    /// Part of `communication`: tensor-parallel collectives (with the context-parallel ring and
    /// the expert-parallel all-to-alls).
    pub tp_comm: f64,
    /// Part of `tp_comm`: the expert-parallel all-to-alls.
    pub ep_comm: f64,
    /// Part of `communication`: pipeline point-to-point sends.
    pub pp_comm: f64,
    /// Full data-parallel gradient-sync time (before overlap).
    pub dp_comm: f64,
    /// Part of `communication`: the data-parallel time not hidden behind backward.
    pub dp_exposed: f64,
}

/// FLOPs per step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Flops {
    /// Model FLOPs per step (forward + backward, no recompute).
    pub model_per_step: f64,
    /// Hardware FLOPs per step (with recompute).
    pub hardware_per_step: f64,
    /// Model FLOPs per token.
    pub per_token: f64,
}

/// Times of one layer for one micro-batch on one device, seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LayerTimes {
    /// Forward compute (matmuls + element-wise).
    pub fwd: f64,
    /// Backward compute.
    pub bwd: f64,
    /// Recompute in backward.
    pub recompute: f64,
    /// Tensor-parallel communication in forward.
    pub tp_fwd: f64,
    /// Tensor-parallel communication in backward.
    pub tp_bwd: f64,
    /// Tensor-parallel communication of the recomputed forward.
    pub tp_recompute: f64,
    /// Part of `tp_fwd`: the expert-parallel all-to-alls of the forward (dispatch, combine).
    pub ep_fwd: f64,
    /// Part of `tp_bwd`: the expert-parallel all-to-alls of the backward.
    pub ep_bwd: f64,
    /// Forward projection + MLP matmuls.
    pub proj: f64,
    /// Forward attention-core matmuls.
    pub core_mm: f64,
    /// Forward element-wise kernels outside the attention core.
    pub mem_fwd: f64,
    /// Forward softmax/dropout of the attention core.
    pub core_mem: f64,
    /// Bytes moved by `mem_fwd`.
    pub norms_bytes: f64,
    /// Bytes moved by `core_mem`.
    pub softmax_bytes: f64,
    /// One activation tensor T·h·e, bytes.
    pub act_bytes: f64,
    /// Bandwidth used by the tp collectives, bytes/s.
    pub tp_bw: f64,
    /// Peak FLOP/s used.
    pub peak: f64,
}

/// Per micro-batch cost of pipeline-stage work (forward + backward), seconds: what
/// [`crate::partition::balanced`] balances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StageCosts {
    /// One transformer layer, with its tensor-parallel collectives and recompute.
    pub layer: f64,
    /// The embedding, on the first stage.
    pub first_extra: f64,
    /// The LM head and loss with their collectives, on the last stage.
    pub last_extra: f64,
}

/// The result of evaluating one layout.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Eval {
    /// Memory per device.
    pub memory: Memory,
    /// Fits in device memory and, with offload, in the host's share ([`Memory::host_fits`]).
    pub fits: bool,
    /// Step time.
    pub time: StepTime,
    /// FLOPs.
    pub flops: Flops,
    /// Model FLOPs utilisation.
    pub mfu: f64,
    /// Hardware FLOPs utilisation.
    pub hfu: f64,
}

impl Context {
    /// Memory, FLOPs and time for one layout.
    pub fn evaluate<T: Trace>(&self, l: &Layout, tr: &mut T) -> Eval {
        let memory = self.memory(l, tr);
        self.evaluate_with_memory(l, memory, tr)
    }

    /// [`Context::evaluate`] when the memory part is already known (the planner checks memory
    /// first and costs time only for layouts that fit).
    pub fn evaluate_with_memory<T: Trace>(&self, l: &Layout, memory: Memory, tr: &mut T) -> Eval {
        let flops = self.flops(tr);
        self.evaluate_parts(l, memory, flops, tr)
    }

    /// [`Context::evaluate`] from known memory and FLOPs (FLOPs depend only on the context, so
    /// the planner computes them once per context rather than once per layout).
    pub fn evaluate_parts<T: Trace>(
        &self,
        l: &Layout,
        memory: Memory,
        flops: Flops,
        tr: &mut T,
    ) -> Eval {
        let fits = memory.total <= memory.capacity && memory.host_fits();
        let time = self.step_time(l, &memory, tr);
        let g = &self.cluster.gpu;
        let peak = if self.recipe.precision == Precision::Fp32 {
            g.peak_fp32_flops
        } else {
            g.peak_bf16_flops
        };
        let denom = time.total * l.world() as f64 * peak;
        let mfu = flops.model_per_step / denom;
        let hfu = flops.hardware_per_step / denom;
        tr.line(|| {
            line(
                "time",
                "MFU",
                format!(
                    "{:.4e} FLOP / ({:.4} s x {} GPUs x {:.0} TFLOP/s)",
                    flops.model_per_step,
                    time.total,
                    l.world(),
                    peak / 1e12
                ),
                mfu,
                "ratio",
                "Chowdhery et al. 2022 (PaLM) Appendix B",
            )
        });
        Eval {
            memory,
            fits,
            time,
            flops,
            mfu,
            hfu,
        }
    }
}
