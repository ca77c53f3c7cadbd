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

use serde::Serialize;

use crate::explain::{line, Trace};
use crate::hardware::ClusterSpec;
use crate::layout::Layout;
use crate::model::ModelSpec;
use crate::recipe::{CausalFlops, GradSync, Precision, Recipe, Recompute, Schedule};
use crate::units::{count, gib};

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
    /// Parameters held by that device (before ZeRO sharding).
    pub params_on_device: f64,
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
    /// Sum.
    pub total: f64,
    /// Part of `communication`: tensor-parallel collectives.
    pub tp_comm: f64,
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

/// The result of evaluating one layout.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Eval {
    /// Memory per device.
    pub memory: Memory,
    /// Fits in device memory.
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

/// Time of one (batched) matmul: roofline of FLOPs at a shape-dependent efficiency and the bytes
/// of its operands at memory bandwidth.
#[inline]
#[allow(clippy::too_many_arguments)]
fn matmul_secs(
    c: &Calibration,
    scale: f64,
    peak: f64,
    bw: f64,
    e: f64,
    batch: f64,
    m: f64,
    n: f64,
    k: f64,
) -> f64 {
    let knee = c.matmul_knee;
    let eff = c.matmul_eff * scale * (m / (m + knee)) * (n / (n + knee)) * (k / (k + knee));
    let compute = 2.0 * batch * m * n * k / (peak * eff);
    let memory = e * batch * (m * k + k * n + m * n) / (bw * c.mem_eff);
    compute.max(memory)
}

/// Ring all-reduce: 2(n−1)/n·bytes at the link's bus bandwidth plus 2(n−1) latencies.
#[inline]
fn all_reduce_secs(n: f64, bytes: f64, bw: f64, alpha: f64) -> f64 {
    if n <= 1.0 {
        return 0.0;
    }
    2.0 * (n - 1.0) / n * bytes / bw + 2.0 * (n - 1.0) * alpha
}

/// Ring all-gather or reduce-scatter of a `bytes`-sized (gathered) buffer.
#[inline]
fn gather_secs(n: f64, bytes: f64, bw: f64, alpha: f64) -> f64 {
    if n <= 1.0 {
        return 0.0;
    }
    (n - 1.0) / n * bytes / bw + (n - 1.0) * alpha
}

/// Per-device parameter counts of the first and last pipeline stage (before ZeRO).
fn stage_params(m: &ModelSpec, l: &Layout) -> (f64, f64, f64) {
    let t = l.tp as f64;
    let (sharded, replicated) = m.layer_params_split();
    let per_layer = sharded as f64 / t + replicated as f64;
    let layers_dev = (m.layers / l.pp) as f64;
    let h = m.hidden as f64;
    let vocab_shard = (m.vocab as f64 / t).ceil() * h;
    let first_extra = vocab_shard + (m.learned_positions as f64) * h;
    // The last stage holds the final norm and the LM head; with tied embeddings across stages it
    // keeps its own copy of the embedding (Megatron's shared word embeddings).
    let head = if !m.tied_embeddings || l.pp > 1 {
        vocab_shard
    } else {
        0.0
    };
    let last_extra = m.norm_params() as f64 + head;
    let body = per_layer * layers_dev;
    if l.pp == 1 {
        let all = body + first_extra + last_extra;
        (all, all, per_layer)
    } else {
        (body + first_extra, body + last_extra, per_layer)
    }
}

/// Activation bytes one layer keeps for one micro-batch until its backward, by recompute policy
/// (Korthikanti et al. 2022, §4, generalised term by term; see docs/estimator.md).
pub fn layer_activation_bytes(m: &ModelSpec, r: &Recipe, l: &Layout, policy: Recompute) -> f64 {
    let e = r.precision.compute_bytes();
    let (b, s, h) = (l.micro_batch as f64, m.seq_len as f64, m.hidden as f64);
    let t = l.tp as f64;
    let a = m.heads as f64;
    let f = m.ffn_hidden as f64;
    let kv = m.kv_dim() as f64;
    let sbh = s * b * h;
    let mask = if r.dropout { 1.0 } else { 0.0 };
    // Tensors outside the tp-sharded regions: replicated without SP, split across tp with SP.
    let rep = if l.sp { 1.0 / t } else { 1.0 };
    if policy == Recompute::Full {
        // Only the layer input survives (2sbh for fp16 in Korthikanti's notation).
        return e * sbh * rep;
    }
    // Norm inputs (2 norms), QKV input, MLP input, two dropout masks.
    let replicated = (2.0 * e + e + e + 2.0 * mask) * sbh;
    // Q, K, V; attention output (input to proj); MLP up output(s) and activation output.
    let q_k_v = e * s * b * (h + 2.0 * kv);
    let attn_out = e * sbh;
    let mlp = e * s * b * f * (m.mlp_matrices() as f64 - 1.0) + e * s * b * f;
    let sharded = q_k_v + attn_out + mlp;
    // Softmax output, dropout mask and dropout output: a·s²·b each (absent with flash attention,
    // which keeps only the row statistics, 4 bytes per row, and with selective recompute).
    let core = if r.flash_attention {
        4.0 * a * s * b
    } else if policy == Recompute::Selective {
        0.0
    } else {
        (e + mask + if r.dropout { e } else { 0.0 }) * a * s * s * b
    };
    replicated * rep + (sharded + core) / t
}

impl Context {
    /// Times of one transformer layer for one micro-batch on one device (Korthikanti et al. 2022
    /// Table 4 measures exactly this).
    pub fn layer_times(&self, l: &Layout) -> LayerTimes {
        let m = &self.model;
        let r = &self.recipe;
        let c = &self.calib;
        let g = &self.cluster.gpu;
        let e = r.precision.compute_bytes();
        let peak = if r.precision == Precision::Fp32 {
            g.peak_fp32_flops
        } else {
            g.peak_bf16_flops
        };
        let bw = g.memory_bw;
        let membw = bw * c.mem_eff;
        let (b, s, h, f) = (
            l.micro_batch as f64,
            m.seq_len as f64,
            m.hidden as f64,
            m.ffn_hidden as f64,
        );
        let (t, kv, a, d) = (
            l.tp as f64,
            m.kv_dim() as f64,
            m.heads as f64,
            m.head_dim() as f64,
        );
        let tok = b * s;
        let mats = m.mlp_matrices() as f64;
        let mm = |batch: f64, mm_: f64, n: f64, k: f64| {
            matmul_secs(c, g.matmul_scale, peak, bw, e, batch, mm_, n, k)
        };
        // Forward matmuls of one layer on one tp rank.
        let proj = mm(1.0, tok, (h + 2.0 * kv) / t, h)
            + mm(1.0, tok, h, h / t)
            + mm(1.0, tok, (mats - 1.0) * f / t, h)
            + mm(1.0, tok, h, f / t);
        let heads_dev = b * a / t;
        // Attention core: QKᵀ and ·V. Flash kernels skip masked blocks (half the work, causal).
        let core_scale = if r.flash_attention { 0.5 } else { 1.0 };
        let core_mm = core_scale * (mm(heads_dev, s, s, d) + mm(heads_dev, s, d, s));
        // Memory-bound kernels of one layer, forward (bytes moved).
        let rows = if l.sp { tok / t } else { tok };
        let mask = if r.dropout { 1.0 } else { 0.0 };
        let norms = 2.0 * 2.0 * e * rows * h;
        let residual = 2.0 * (3.0 * e + mask) * rows * h;
        let act_fn = e * tok * f * mats / t;
        let rotary = if m.learned_positions == 0 {
            2.0 * e * tok * (h + kv) / t
        } else {
            0.0
        };
        let softmax = if r.flash_attention {
            0.0
        } else {
            (2.0 * e + if r.dropout { 2.0 * e + 1.0 } else { 0.0 }) * heads_dev * s * s
        };
        let mem_fwd = (norms + residual + act_fn + rotary) / membw;
        let core_mem = softmax / membw;
        // Backward: matmuls twice the forward (data and weight gradients; flash backward does
        // 2.5x its forward), element-wise kernels read input and output gradient and write one (1.5x).
        let core_bwd_factor = if r.flash_attention { 2.5 } else { 2.0 };
        let fwd = proj + core_mm + mem_fwd + core_mem;
        let bwd = 2.0 * proj + core_bwd_factor * core_mm + 1.5 * (mem_fwd + core_mem);
        let recompute = match r.recompute {
            Recompute::None => 0.0,
            Recompute::Selective => {
                if r.flash_attention {
                    0.0
                } else {
                    core_mm + core_mem
                }
            }
            Recompute::Full => fwd,
        };
        // Tensor-parallel collectives of one layer (activation T·h·e bytes).
        let gpn = self.cluster.gpus_per_node;
        let (tp_bw, tp_alpha) = if l.tp <= gpn {
            (g.intra_node_bw * c.intra_eff, g.intra_node_latency)
        } else {
            (g.network_bw * c.net_eff, g.network_latency)
        };
        let act_bytes = tok * h * e;
        let (tp_fwd, tp_bwd) = if l.tp == 1 {
            (0.0, 0.0)
        } else if l.sp {
            let ag = gather_secs(t, act_bytes, tp_bw, tp_alpha);
            // fwd: 2 all-gathers + 2 reduce-scatters; bwd: the same plus 2 re-gathers for weight
            // gradients (Korthikanti et al. 2022 §4.2.2).
            (4.0 * ag, 6.0 * ag)
        } else {
            let ar = all_reduce_secs(t, act_bytes, tp_bw, tp_alpha);
            (2.0 * ar, 2.0 * ar)
        };
        let tp_recompute = if r.recompute == Recompute::Full {
            tp_fwd
        } else {
            0.0
        };
        LayerTimes {
            fwd,
            bwd,
            recompute,
            tp_fwd,
            tp_bwd,
            tp_recompute,
            proj,
            core_mm,
            mem_fwd,
            core_mem,
            norms_bytes: norms + residual + act_fn + rotary,
            softmax_bytes: softmax,
            act_bytes,
            tp_bw,
            peak,
        }
    }

    /// Bytes per device for the worst stage.
    pub fn memory<T: Trace>(&self, l: &Layout, tr: &mut T) -> Memory {
        let m = &self.model;
        let r = &self.recipe;
        let sb = &r.state_bytes;
        let n = l.dp as f64;
        let (first, last, per_layer_dev) = stage_params(m, l);
        let zero = l.zero;
        let states = |p: f64| {
            let w = if zero >= 3 {
                p * sb.weight / n
            } else {
                p * sb.weight
            };
            let g = if zero >= 2 {
                p * sb.grad / n
            } else {
                p * sb.grad
            };
            let o = if zero >= 1 {
                p * sb.optimizer / n
            } else {
                p * sb.optimizer
            };
            let ms = if zero >= 1 {
                p * sb.master / n
            } else {
                p * sb.master
            };
            (w, g, o, ms)
        };
        // Activations.
        let layers_dev = (m.layers / l.pp) as f64;
        let per_layer = layer_activation_bytes(m, r, l, r.recompute);
        let working = if r.recompute == Recompute::Full {
            layer_activation_bytes(m, r, l, Recompute::None)
        } else {
            0.0
        };
        let e = r.precision.compute_bytes();
        let (b, s, h) = (l.micro_batch as f64, m.seq_len as f64, m.hidden as f64);
        let t = l.tp as f64;
        let p = l.pp as f64;
        let mb = l.grad_accum as f64;
        let in_flight = if l.pp == 1 {
            1.0
        } else {
            match r.schedule {
                Schedule::Gpipe => mb,
                Schedule::OneFOneB if l.vpp > 1 => (p + (p - 1.0) / l.vpp as f64).min(mb),
                Schedule::OneFOneB => p.min(mb),
            }
        };
        let per_mb = per_layer * layers_dev;
        let emb_out =
            (e + if r.dropout { 1.0 } else { 0.0 }) * s * b * h / if l.sp { t } else { 1.0 };
        let logits = 4.0 * s * b * (m.vocab as f64 / t).ceil() + e * s * b * h;
        let act_first = per_mb * in_flight + emb_out * in_flight + working;
        let last_in_flight = if l.pp == 1 {
            1.0
        } else if r.schedule == Schedule::Gpipe {
            mb
        } else {
            1.0
        };
        let act_last = per_mb * last_in_flight + logits + working;
        // Communication buffers.
        let comm = if l.dp > 1 {
            match zero {
                0 => r.bucket_bytes,
                1 | 2 => 2.0 * r.bucket_bytes,
                _ => 2.0 * per_layer_dev * sb.weight,
            }
        } else {
            0.0
        };
        let cap = self.cluster.gpu.memory_bytes;
        let total_for = |params: f64, act: f64| {
            let (w, g, o, ms) = states(params);
            w + g + o + ms + act + comm + r.runtime_overhead_bytes
        };
        let t_first = total_for(first, act_first);
        let t_last = total_for(last, act_last);
        let (worst_stage, params, act) = if t_last > t_first && l.pp > 1 {
            (l.pp - 1, last, act_last)
        } else if l.pp == 1 {
            (0, first, act_first.max(act_last))
        } else {
            (0, first, act_first)
        };
        let (w, g, o, ms) = states(params);
        let total = w + g + o + ms + act + comm + r.runtime_overhead_bytes;
        tr.line(|| {
            line("memory", "parameters on the worst device", format!(
                "stage {worst_stage} of {}: {} layers x {} params/layer (tp {}) + embedding/head shards", l.pp, layers_dev, count(per_layer_dev), l.tp),
                params, "params", "Shoeybi et al. 2019 (Megatron column/row split)")
        });
        let zdiv = |on: bool| {
            if on {
                format!(" / dp({})", l.dp)
            } else {
                String::new()
            }
        };
        tr.line(|| {
            line(
                "memory",
                "weights",
                format!(
                    "{} params x {} B{} = {}",
                    count(params),
                    sb.weight,
                    zdiv(zero >= 3),
                    gib(w)
                ),
                w,
                "bytes",
                "ZeRO stage 3 shards weights (Rajbhandari et al. 2019)",
            )
        });
        tr.line(|| {
            line(
                "memory",
                "gradients",
                format!(
                    "{} params x {} B{} = {}",
                    count(params),
                    sb.grad,
                    zdiv(zero >= 2),
                    gib(g)
                ),
                g,
                "bytes",
                "ZeRO stage 2 shards gradients",
            )
        });
        tr.line(|| {
            line(
                "memory",
                "master weights",
                format!(
                    "{} params x {} B{} = {}",
                    count(params),
                    sb.master,
                    zdiv(zero >= 1),
                    gib(ms)
                ),
                ms,
                "bytes",
                "mixed precision keeps fp32 masters (Micikevicius et al. 2018)",
            )
        });
        tr.line(|| {
            line(
                "memory",
                "optimizer states",
                format!(
                    "{} params x {} B{} = {}",
                    count(params),
                    sb.optimizer,
                    zdiv(zero >= 1),
                    gib(o)
                ),
                o,
                "bytes",
                "Adam: 2 fp32 moments; ZeRO stage 1 shards them",
            )
        });
        tr.line(|| line("memory", "activations per layer per micro-batch", format!(
            "recompute {:?}, b={}, s={}, h={}, t={}, sp={}, flash={}: {}", r.recompute, l.micro_batch, m.seq_len, m.hidden, l.tp, l.sp, r.flash_attention, gib(per_layer)),
            per_layer, "bytes", "Korthikanti et al. 2022 §4: sbh(10 + 24/t + 5as/(ht)) for fp16 MHA with dropout, generalised"));
        tr.line(|| line("memory", "activations in flight", format!(
            "{} layers x {} x {:.2} micro-batches in flight ({:?}, p={}, v={}, m={}) + embedding/logits + one recompute working set {}",
            layers_dev, gib(per_layer), in_flight, r.schedule, l.pp, l.vpp, l.grad_accum, gib(working)),
            act, "bytes", "1F1B keeps p micro-batches on stage 0; interleaving multiplies by 1+(p-1)/(pv) (Korthikanti et al. 2022 §4.2.3)"));
        tr.line(|| {
            line(
                "memory",
                "communication buffers",
                format!("ZeRO-{zero}, dp {}: {}", l.dp, gib(comm)),
                comm,
                "bytes",
                "DDP 25 MB buckets; ZeRO-3 prefetches 2 layers of full weights",
            )
        });
        tr.line(|| {
            line(
                "memory",
                "runtime overhead",
                gib(r.runtime_overhead_bytes),
                r.runtime_overhead_bytes,
                "bytes",
                "assumed CUDA context + workspaces (setting runtime_overhead_bytes)",
            )
        });
        tr.line(|| {
            line(
                "memory",
                "total per device",
                format!(
                    "{} of {} ({})",
                    gib(total),
                    gib(cap),
                    if total <= cap { "fits" } else { "does NOT fit" }
                ),
                total,
                "bytes",
                "sum of the above",
            )
        });
        Memory {
            weights: w,
            gradients: g,
            optimizer_states: o,
            master_weights: ms,
            activations: act,
            activations_per_microbatch: per_mb,
            microbatches_in_flight: in_flight,
            comm_buffers: comm,
            runtime_overhead: r.runtime_overhead_bytes,
            total,
            capacity: cap,
            worst_stage,
            params_on_device: params,
        }
    }

    /// Model and hardware FLOPs of one step (global batch), whole cluster.
    pub fn flops<T: Trace>(&self, tr: &mut T) -> Flops {
        let m = &self.model;
        let r = &self.recipe;
        let (s, h, f, kv, v) = (
            m.seq_len as f64,
            m.hidden as f64,
            m.ffn_hidden as f64,
            m.kv_dim() as f64,
            m.vocab as f64,
        );
        let tokens = r.global_batch as f64 * s;
        let causal = match r.causal_flops {
            CausalFlops::Full => 1.0,
            CausalFlops::Half => 0.5,
        };
        // Forward FLOPs per token of one layer: projections 2h(h+2kv) + 2h², MLP 2·mats·h·f,
        // attention scores and ·V 4·s·h (×causal).
        let proj = 2.0 * h * (h + 2.0 * kv) + 2.0 * h * h;
        let mlp = 2.0 * m.mlp_matrices() as f64 * h * f;
        let attn = 4.0 * s * h * causal;
        let layer_fwd = proj + mlp + attn;
        let head_fwd = 2.0 * h * v;
        let l = m.layers as f64;
        let fwd_per_token = l * layer_fwd + head_fwd;
        let model_per_token = 3.0 * fwd_per_token;
        let recompute_per_token = match r.recompute {
            Recompute::None => 0.0,
            Recompute::Selective => {
                if r.flash_attention {
                    0.0
                } else {
                    l * attn
                }
            }
            Recompute::Full => l * layer_fwd,
        };
        let model = model_per_token * tokens;
        let hw = (model_per_token + recompute_per_token) * tokens;
        let n_params = m.params().total as f64;
        tr.line(|| line("flops", "forward FLOPs per token per layer", format!(
            "2h(h+2kv)+2h^2 + 2*{}*h*f + 4*s*h*{causal} = {:.4e} (h={h}, kv={kv}, f={f}, s={s})", m.mlp_matrices(), layer_fwd), layer_fwd, "FLOP",
            "Narayanan et al. 2021 eq. 3 (24h^2 + 4sh per token for GPT)"));
        tr.line(|| line("flops", "model FLOPs per token", format!(
            "3 x (l({l}) x {layer_fwd:.4e} + 2hV {head_fwd:.4e}) = {model_per_token:.4e}; the 6N rule gives 6 x {} = {:.4e}", count(n_params), 6.0 * n_params),
            model_per_token, "FLOP", "backward = 2x forward (Kaplan et al. 2020)"));
        tr.line(|| {
            line(
                "flops",
                "model FLOPs per step",
                format!("{model_per_token:.4e} x {tokens} tokens = {model:.4e}"),
                model,
                "FLOP",
                "global batch x sequence",
            )
        });
        tr.line(|| {
            line(
                "flops",
                "hardware FLOPs per step",
                format!(
                    "model + recompute ({:?}) {:.4e}/token = {hw:.4e}",
                    r.recompute, recompute_per_token
                ),
                hw,
                "FLOP",
                "Korthikanti et al. 2022 §6 (HFU counts the recomputed forward)",
            )
        });
        Flops {
            model_per_step: model,
            hardware_per_step: hw,
            per_token: model_per_token,
        }
    }

    /// Seconds per step, split into compute, exposed communication, bubble and optimizer.
    pub fn step_time<T: Trace>(&self, l: &Layout, mem: &Memory, tr: &mut T) -> StepTime {
        let m = &self.model;
        let r = &self.recipe;
        let c = &self.calib;
        let g = &self.cluster.gpu;
        let LayerTimes {
            fwd,
            bwd,
            recompute,
            tp_fwd,
            tp_bwd,
            tp_recompute,
            proj,
            core_mm,
            mem_fwd,
            core_mem,
            norms_bytes,
            softmax_bytes,
            act_bytes,
            tp_bw,
            peak,
            ..
        } = self.layer_times(l);
        let e = r.precision.compute_bytes();
        let bw = g.memory_bw;
        let membw = bw * c.mem_eff;
        let (b, s, h) = (l.micro_batch as f64, m.seq_len as f64, m.hidden as f64);
        let t = l.tp as f64;
        let tok = b * s;
        let mm = |batch: f64, mm_: f64, n: f64, k: f64| {
            matmul_secs(c, g.matmul_scale, peak, bw, e, batch, mm_, n, k)
        };
        let gpn = self.cluster.gpus_per_node;
        let tp_alpha = if l.tp <= gpn {
            g.intra_node_latency
        } else {
            g.network_latency
        };
        let layers_dev = (m.layers / l.pp) as f64;
        let layer_compute = fwd + bwd + recompute;
        let layer_comm = tp_fwd + tp_bwd + tp_recompute;
        // Head and loss on the last stage; embedding on the first.
        let vshard = (m.vocab as f64 / t).ceil();
        let head = 3.0 * mm(1.0, tok, vshard, h) + tok * vshard * (2.0 * e + 8.0) / membw;
        let head_comm = if l.tp > 1 {
            3.0 * all_reduce_secs(t, tok * 4.0, tp_bw, tp_alpha)
        } else {
            0.0
        };
        let embed = tok * h * (e + 4.0 + 2.0 * e) / membw;
        // Pipeline sends of one micro-batch: activation forward, gradient backward, scattered
        // across the tp group (Narayanan et al. 2021 §4.1 scatter/gather).
        let pp_link_intra = l.tp * l.pp <= gpn;
        let (pp_bw, pp_alpha) = if pp_link_intra {
            (g.intra_node_bw * c.intra_eff, g.intra_node_latency)
        } else {
            (g.network_bw * c.net_eff, g.network_latency)
        };
        let p2p = if l.pp > 1 {
            2.0 * l.vpp as f64 * (pp_alpha + act_bytes / t / pp_bw)
        } else {
            0.0
        };
        let body = layers_dev * layer_compute;
        let body_comm = layers_dev * layer_comm;
        let first_c = body + embed;
        let last_c = body + head;
        let last_k = body_comm + head_comm;
        let (mb_compute, mb_comm) = if l.pp == 1 {
            (body + embed + head, last_k)
        } else if last_c + last_k >= first_c + body_comm {
            (last_c, last_k)
        } else {
            (first_c, body_comm)
        };
        let mbs = l.grad_accum as f64;
        let compute = mbs * mb_compute;
        let tp_comm = mbs * mb_comm;
        let pp_comm = mbs * p2p;
        // Bubble: (Σ_i t_i − t_max)/v, stages uniform except first/last.
        let p = l.pp as f64;
        let v = l.vpp as f64;
        let t_mid = body + body_comm + p2p;
        let t_first = first_c + body_comm + p2p;
        let t_last = last_c + last_k + p2p;
        let t_max = t_first.max(t_last).max(t_mid);
        let bubble = if l.pp > 1 {
            ((p - 2.0) * t_mid + t_first + t_last - t_max) / v
        } else {
            0.0
        };
        // Data-parallel gradient sync of the worst device's parameters.
        let n = l.dp as f64;
        let pdev = mem.params_on_device;
        let sb = &r.state_bytes;
        let world = l.dp * l.tp * l.pp;
        let dp_intra = world <= gpn;
        let (dp_bw, dp_alpha) = if dp_intra {
            (g.intra_node_bw * c.intra_eff, g.intra_node_latency)
        } else {
            (g.network_bw * c.net_eff, g.network_latency)
        };
        let gbytes = pdev * r.grad_comm_bytes;
        let wbytes = pdev * sb.weight;
        let dp_comm = if l.dp == 1 {
            0.0
        } else {
            match r.grad_sync {
                GradSync::Ring | GradSync::Tree => {
                    let alpha_count = if r.grad_sync == GradSync::Ring {
                        2.0 * (n - 1.0)
                    } else {
                        2.0 * n.log2().ceil()
                    };
                    let lat = alpha_count * dp_alpha;
                    match l.zero {
                        0 => all_reduce_secs(n, gbytes, dp_bw, 0.0) + lat,
                        1 | 2 => {
                            gather_secs(n, gbytes, dp_bw, 0.0)
                                + gather_secs(n, wbytes, dp_bw, 0.0)
                                + lat
                        }
                        _ => {
                            gather_secs(n, gbytes, dp_bw, 0.0)
                                + 2.0 * gather_secs(n, wbytes, dp_bw, 0.0)
                                + 1.5 * lat
                        }
                    }
                }
                GradSync::ParameterServer => {
                    // Each worker pushes its gradient and pulls the result; K servers, each with a
                    // node's worth of network bandwidth, receive and send n·bytes/K.
                    let k = r.ps_servers as f64;
                    let worker = (gbytes + wbytes) / dp_bw;
                    let server = n * (gbytes + wbytes) / (k * dp_bw * gpn as f64);
                    worker.max(server) + 2.0 * dp_alpha
                }
            }
        };
        let bwd_window = if r.overlap_grad_reduce {
            layers_dev * (bwd + recompute + tp_bwd + tp_recompute)
        } else {
            0.0
        };
        let bucket_floor = if gbytes > 0.0 {
            dp_comm * (r.bucket_bytes / gbytes).min(1.0)
        } else {
            0.0
        };
        let dp_exposed = if r.overlap_grad_reduce {
            (dp_comm - bwd_window).max(bucket_floor)
        } else {
            dp_comm
        };
        // Optimizer step, memory-bound, per parameter (sharded by ZeRO): gradient norm (read g),
        // clipping (read + write g), fp16 unscale and overflow check (read + write g), the fused
        // Adam update (read g, master, moments; write master, moments), the copy of the masters
        // into the working weights (read master, write weights) and zeroing the gradients.
        let opt_params = if l.zero >= 1 { pdev / n } else { pdev };
        let unscale = if r.precision == Precision::Fp16Mixed {
            2.0 * sb.grad
        } else {
            0.0
        };
        let per_param = sb.grad
            + 2.0 * sb.grad
            + unscale
            + (sb.grad + 2.0 * sb.master + 2.0 * sb.optimizer)
            + (sb.master + sb.weight)
            + sb.grad;
        let opt_bytes = opt_params * per_param;
        let optimizer = opt_bytes / membw + c.step_overhead_secs;
        let communication = tp_comm + pp_comm + dp_exposed;
        let total = compute + communication + bubble + optimizer;
        tr.line(|| line("time", "forward matmuls per layer per micro-batch", format!(
            "QKV, out, MLP on T={tok} tokens / tp {}: {:.3} ms; attention core {:.3} ms (eff = {} x x/(x+{}) per dim, peak {:.0} TFLOP/s)",
            l.tp, proj * 1e3, core_mm * 1e3, c.matmul_eff, c.matmul_knee, peak / 1e12), proj + core_mm, "s", "roofline with shape-dependent efficiency (fitted to Korthikanti et al. 2022 Table 4)"));
        tr.line(|| line("time", "memory-bound kernels per layer (forward)", format!(
            "norms+residual+activation {:.1} MB + softmax {:.1} MB at {:.0} GB/s x {} = {:.3} ms",
            norms_bytes / 1e6, softmax_bytes / 1e6, bw / 1e9, c.mem_eff, (mem_fwd + core_mem) * 1e3), mem_fwd + core_mem, "s", "bytes / achieved bandwidth"));
        tr.line(|| {
            line(
                "time",
                "layer compute per micro-batch",
                format!(
                    "fwd {:.3} + bwd {:.3} + recompute {:.3} ms",
                    fwd * 1e3,
                    bwd * 1e3,
                    recompute * 1e3
                ),
                layer_compute,
                "s",
                "backward = 2x forward matmuls, 1.5x element-wise bytes",
            )
        });
        tr.line(|| line("time", "tensor-parallel communication per layer", format!(
            "{} on {} bytes over {} at {:.0} GB/s: fwd {:.3} + bwd {:.3} + recompute {:.3} ms",
            if l.sp { "all-gather/reduce-scatter" } else { "all-reduce" }, act_bytes, if l.tp <= gpn { "intra-node links" } else { "network" }, tp_bw / 1e9, tp_fwd * 1e3, tp_bwd * 1e3, tp_recompute * 1e3),
            layer_comm, "s", "alpha-beta ring: 2(n-1)/n bytes/bw + 2(n-1) alpha (nccl-tests bus bandwidth)"));
        tr.line(|| {
            line(
                "time",
                "compute per step",
                format!(
                    "{} micro-batches x {:.4} s (worst stage, {} layers + embedding/head)",
                    l.grad_accum, mb_compute, layers_dev
                ),
                compute,
                "s",
                "sum of per-op times",
            )
        });
        tr.line(|| {
            line(
                "time",
                "pipeline bubble",
                format!(
                    "((p-2) t_mid + t_first + t_last - t_max) / v with p={}, v={}: {:.4} s",
                    l.pp, l.vpp, bubble
                ),
                bubble,
                "s",
                "1F1B / interleaved bubble (p-1)/(v m) (Narayanan et al. 2021 §2.2)",
            )
        });
        tr.line(|| {
            line(
                "time",
                "pipeline sends",
                format!(
                    "{} micro-batches x 2 x v({}) x {:.1} MB over {}",
                    l.grad_accum,
                    l.vpp,
                    act_bytes / t / 1e6,
                    if pp_link_intra {
                        "intra-node links"
                    } else {
                        "network"
                    }
                ),
                pp_comm,
                "s",
                "scatter/gather across tp (Narayanan et al. 2021 §4.1)",
            )
        });
        tr.line(|| line("time", "data-parallel gradient sync", format!(
            "{:?}, ZeRO-{}, dp {}: {} grads x {} B over {} at {:.0} GB/s = {:.4} s; exposed {:.4} s (overlap {})",
            r.grad_sync, l.zero, l.dp, count(pdev), r.grad_comm_bytes, if dp_intra { "intra-node links" } else { "network" }, dp_bw / 1e9, dp_comm, dp_exposed, r.overlap_grad_reduce),
            dp_exposed, "s", "ring 2(n-1)/n; ZeRO-1/2 reduce-scatter + all-gather; ZeRO-3 1.5x (Rajbhandari et al. 2019 §7)"));
        tr.line(|| {
            line(
                "time",
                "optimizer step",
                format!(
                    "{} params x {:.0} B moved at {:.0} GB/s",
                    count(opt_params),
                    opt_bytes / opt_params.max(1.0),
                    membw / 1e9
                ),
                optimizer,
                "s",
                "memory-bound fused Adam",
            )
        });
        tr.line(|| line("time", "step total", format!("compute {compute:.4} + communication {communication:.4} + bubble {bubble:.4} + optimizer {optimizer:.4}"), total, "s", "sum"));
        StepTime {
            compute,
            communication,
            bubble,
            optimizer,
            total,
            tp_comm,
            pp_comm,
            dp_comm,
            dp_exposed,
        }
    }

    /// Memory, FLOPs and time for one layout.
    pub fn evaluate<T: Trace>(&self, l: &Layout, tr: &mut T) -> Eval {
        let memory = self.memory(l, tr);
        self.evaluate_with_memory(l, memory, tr)
    }

    /// [`Context::evaluate`] when the memory part is already known (the planner checks memory
    /// first and costs time only for layouts that fit).
    pub fn evaluate_with_memory<T: Trace>(&self, l: &Layout, memory: Memory, tr: &mut T) -> Eval {
        let fits = memory.total <= memory.capacity;
        let flops = self.flops(tr);
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
