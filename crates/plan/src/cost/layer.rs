//! Times of one transformer layer and of the embedding / LM head for one micro-batch on one
//! device: per-op roofline for compute, α-β collectives (tensor, context and expert parallel).

use crate::layout::Layout;
use crate::recipe::{Precision, Recompute};

use super::{Calibration, Context, LayerTimes};

/// Time of one (batched) matmul: roofline of FLOPs at a shape-dependent efficiency and the bytes
/// of its operands at memory bandwidth.
#[inline]
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_secs(
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
pub(super) fn all_reduce_secs(n: f64, bytes: f64, bw: f64, alpha: f64) -> f64 {
    if n <= 1.0 {
        return 0.0;
    }
    2.0 * (n - 1.0) / n * bytes / bw + 2.0 * (n - 1.0) * alpha
}

/// Ring all-gather or reduce-scatter of a `bytes`-sized (gathered) buffer.
#[inline]
pub(super) fn gather_secs(n: f64, bytes: f64, bw: f64, alpha: f64) -> f64 {
    if n <= 1.0 {
        return 0.0;
    }
    (n - 1.0) / n * bytes / bw + (n - 1.0) * alpha
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
        // Context parallelism: this rank's s/cp tokens (queries) against all s keys.
        let s_full = m.seq_len as f64;
        let (b, s, h, f) = (
            l.micro_batch as f64,
            s_full / l.cp as f64,
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
        // FP8 linears (Transformer Engine): 1-byte operands on the FP8 peak at the GPU's fitted
        // FP8 efficiency; a GPU without FP8 tensor cores keeps bf16 (the CLI refuses that case).
        let fp8 = r.fp8.filter(|_| g.peak_fp8_flops > 0.0);
        let lin = |mm_: f64, n: f64, k: f64| match fp8 {
            Some(_) => matmul_secs(
                c,
                g.fp8_matmul_scale,
                g.peak_fp8_flops,
                bw,
                1.0,
                1.0,
                mm_,
                n,
                k,
            ),
            None => mm(1.0, mm_, n, k),
        };
        let q = m.q_dim() as f64;
        // Forward matmuls of one layer on one tp rank.
        let mut proj = lin(tok, (q + 2.0 * kv) / t, h)
            + lin(tok, h, q / t)
            + lin(tok, (mats - 1.0) * f / t, h)
            + lin(tok, h, f / t);
        // Mixture of experts (the average layer: a `share` of the layers is MoE). Each tp rank
        // routes its own tok/t tokens with sequence parallelism (all tok without it, repeating
        // the work); the rank's E/ep experts receive, balanced, as many token copies as it sends
        // (tok_moe·k·c) and run them as a grouped GEMM. The shared experts are a tp-sharded MLP.
        let moe = m.moe.map(|moe| {
            let share = m.moe_layers() as f64 / m.layers as f64;
            let tok_moe = if l.sp { tok / t } else { tok };
            let copies = tok_moe * moe.routed_copies();
            let local = moe.experts as f64 / l.ep as f64;
            let (fe, fs) = (moe.expert_ffn as f64, moe.shared_ffn as f64);
            let glin = |rows: f64, n: f64, k: f64| match fp8 {
                Some(_) => matmul_secs(
                    c,
                    g.fp8_matmul_scale,
                    g.peak_fp8_flops,
                    bw,
                    1.0,
                    local,
                    rows,
                    n,
                    k,
                ),
                None => mm(local, rows, n, k),
            };
            let routed = glin(copies / local, (mats - 1.0) * fe, h) + glin(copies / local, h, fe);
            let shared = if fs > 0.0 {
                lin(tok, (mats - 1.0) * fs / t, h) + lin(tok, h, fs / t)
            } else {
                0.0
            };
            let router = mm(1.0, tok_moe, moe.experts as f64, h);
            let dense_mlp = lin(tok, (mats - 1.0) * f / t, h) + lin(tok, h, f / t);
            // Bytes: router softmax/top-k (fp32 logits read and written), permute and unpermute
            // (read + write each copy), the experts' activation function, FP8 casts of their
            // inputs; the shared experts' activation function.
            let bytes = tok_moe * moe.experts as f64 * 8.0
                + 4.0 * e * copies * h
                + e * copies * fe * mats
                + e * tok * fs * mats / t
                + fp8.map_or(0.0, |f8| {
                    (e + 1.0 + f8.extra_cast_bytes()) * copies * (h + fe)
                });
            // All-to-all: dispatch and combine each send the token copies to the other ep − 1
            // ranks, (ep−1)/ep of tok_moe·k·c·h·e bytes per rank.
            let a2a_bytes = copies * h * e * (l.ep as f64 - 1.0) / l.ep as f64;
            // What the routed path costs beyond the roofline above, per token copy this rank's
            // experts compute (GpuSpec::expert_secs_per_copy, forward + backward; a third of it
            // in forward, like the GEMMs).
            let overhead = copies * g.expert_secs_per_copy;
            (
                share,
                shared + router + routed - dense_mlp,
                bytes,
                a2a_bytes,
                overhead,
            )
        });
        if let Some((share, extra, ..)) = moe {
            proj += share * extra;
        }
        let heads_dev = b * a / t;
        // Attention core: QKᵀ and ·V. Flash kernels skip masked blocks (half the work, causal).
        let core_scale = if r.flash_attention { 0.5 } else { 1.0 };
        let core_mm = core_scale * (mm(heads_dev, s, s_full, d) + mm(heads_dev, s, d, s_full));
        // Memory-bound kernels of one layer, forward (bytes moved).
        let rows = if l.sp { tok / t } else { tok };
        let mask = if r.dropout { 1.0 } else { 0.0 };
        let norms = 2.0 * 2.0 * e * rows * h;
        let residual = 2.0 * (3.0 * e + mask) * rows * h;
        let act_fn = e * tok * f * mats / t;
        let rotary = if m.learned_positions == 0 {
            2.0 * e * tok * (q + kv) / t
        } else {
            0.0
        };
        let softmax = if r.flash_attention {
            0.0
        } else {
            (2.0 * e + if r.dropout { 2.0 * e + 1.0 } else { 0.0 }) * heads_dev * s * s_full
        };
        // FP8 casts of the four linears' inputs (read e, write 1 byte, plus the scaling's own
        // traffic); backward casts the output gradients (covered by the 1.5x below).
        let cast = match fp8 {
            Some(f8) => (e + 1.0 + f8.extra_cast_bytes()) * tok * (2.0 * h + q + f) / t,
            None => 0.0,
        };
        // A MoE layer replaces the dense MLP's activation function and casts by its own bytes.
        let moe_bytes = moe.map_or(0.0, |(share, _, bytes, ..)| {
            let dense_cast = fp8.map_or(0.0, |f8| (e + 1.0 + f8.extra_cast_bytes()) * tok * f / t);
            share * (bytes - act_fn - dense_cast)
        });
        let mem_fwd = (norms + residual + act_fn + rotary + cast + moe_bytes) / membw;
        let core_mem = softmax / membw;
        // Backward: matmuls twice the forward (data and weight gradients; flash backward does
        // 2.5x its forward), element-wise kernels read input and output gradient and write one (1.5x).
        let core_bwd_factor = if r.flash_attention { 2.5 } else { 2.0 };
        let expert_fixed = moe.map_or(0.0, |(share, .., overhead)| share * overhead);
        let fwd = proj + core_mm + mem_fwd + core_mem + expert_fixed / 3.0;
        let bwd = 2.0 * proj
            + core_bwd_factor * core_mm
            + 1.5 * (mem_fwd + core_mem)
            + 2.0 * expert_fixed / 3.0;
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
        // Userbuffers-style overlap (Transformer Engine `tp_comm_overlap`; Wang et al. 2023,
        // "Overlap Communication with Dependent Computation via Decomposition", ASPLOS): each
        // all-gather / reduce-scatter is split into tp chunks pipelined with the GEMM that
        // consumes or produces it, so only the larger of (communication − GEMM) and one chunk
        // stays exposed.
        let (tp_fwd, tp_bwd) = if r.tp_comm_overlap && l.tp > 1 {
            (
                (tp_fwd - proj).max(tp_fwd / t),
                (tp_bwd - 2.0 * proj).max(tp_bwd / t),
            )
        } else {
            (tp_fwd, tp_bwd)
        };
        // Context parallelism (ring attention, Liu et al. 2023; Megatron-LM's cp): cp − 1 steps
        // each pass this rank's K and V chunk (b·s/cp·2·kv/t elements) to the next rank, behind
        // the attention core of the chunk in hand; backward passes K, V and their gradients.
        // Only what the core cannot cover is exposed.
        let (cp_fwd, cp_bwd) = if l.cp > 1 {
            let (cp_bw, cp_alpha) = if l.tp * l.cp <= gpn {
                (g.intra_node_bw * c.intra_eff, g.intra_node_latency)
            } else {
                (g.network_bw * c.net_eff, g.network_latency)
            };
            let steps = l.cp as f64 - 1.0;
            let chunk = b * s * 2.0 * kv / t * e;
            let fwd_comm = steps * (chunk / cp_bw + cp_alpha);
            (
                (fwd_comm - core_mm).max(0.0),
                (2.0 * fwd_comm - core_bwd_factor * core_mm).max(0.0),
            )
        } else {
            (0.0, 0.0)
        };
        // Expert parallelism: 2 all-to-alls per MoE layer forward (dispatch, combine) and 2 in
        // backward (their gradients), not overlapped (Lepikhin et al. 2020, GShard §2.2). With
        // `ep_comm_overlap` a micro-batch's forward runs beside another's backward, so the
        // four all-to-alls hide behind the layer's forward + backward compute; only the excess
        // is exposed, split like the all-to-alls.
        let (ep_fwd, ep_bwd) = match moe {
            Some((share, _, _, bytes, _)) if l.ep > 1 => {
                let one = share * 2.0 * self.all_to_all_secs(l, bytes);
                if r.ep_comm_overlap {
                    let exposed = (2.0 * one - fwd - bwd).max(0.0) / 2.0;
                    (exposed, exposed)
                } else {
                    (one, one)
                }
            }
            _ => (0.0, 0.0),
        };
        let (tp_fwd, tp_bwd) = (tp_fwd + cp_fwd + ep_fwd, tp_bwd + cp_bwd + ep_bwd);
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
            ep_fwd,
            ep_bwd,
            proj,
            core_mm,
            mem_fwd,
            core_mem,
            norms_bytes: norms + residual + act_fn + rotary + cast,
            softmax_bytes: softmax,
            act_bytes,
            tp_bw,
            peak,
        }
    }

    /// Per micro-batch (forward + backward), seconds: the embedding (first stage), the LM head
    /// and loss (last stage), and the head's tensor-parallel collectives.
    pub(super) fn end_stage_secs(&self, l: &Layout, tp_bw: f64, peak: f64) -> (f64, f64, f64) {
        let m = &self.model;
        let c = &self.calib;
        let g = &self.cluster.gpu;
        let e = self.recipe.precision.compute_bytes();
        let membw = g.memory_bw * c.mem_eff;
        let (h, t) = (m.hidden as f64, l.tp as f64);
        let tok = l.micro_batch as f64 * m.seq_len as f64 / l.cp as f64;
        let tp_alpha = if l.tp <= self.cluster.gpus_per_node {
            g.intra_node_latency
        } else {
            g.network_latency
        };
        let vshard = (m.vocab as f64 / t).ceil();
        let head = 3.0 * matmul_secs(c, g.matmul_scale, peak, g.memory_bw, e, 1.0, tok, vshard, h)
            + tok * vshard * (2.0 * e + 8.0) / membw;
        let head_comm = if l.tp > 1 {
            3.0 * all_reduce_secs(t, tok * 4.0, tp_bw, tp_alpha)
        } else {
            0.0
        };
        let embed = tok * h * (e + 4.0 + 2.0 * e) / membw;
        (embed, head, head_comm)
    }

    /// One all-to-all among the ep ranks of a layout, each rank sending `bytes` to the others
    /// (already the (ep−1)/ep share). The expert group is ep consecutive ranks (Megatron-Core's
    /// default rank order tp-cp-ep-dp-pp keeps pipeline stages outermost), so it stays inside
    /// a node (NVLink domain) when ep ≤ GPUs per node. Across nodes the data for peers in the
    /// same node crosses the intra-node links and the rest the GPU's own network port,
    /// concurrently; the slower sets the time, plus ep − 1 latencies.
    pub(super) fn all_to_all_secs(&self, l: &Layout, bytes: f64) -> f64 {
        if l.ep <= 1 {
            return 0.0;
        }
        let g = &self.cluster.gpu;
        let c = &self.calib;
        let gpn = self.cluster.gpus_per_node;
        let ep = l.ep as f64;
        let in_node = gpn.clamp(1, l.ep) as f64;
        // bytes covers ep − 1 peers; in_node − 1 of them are in this node.
        let per_peer = bytes / (ep - 1.0);
        let intra = per_peer * (in_node - 1.0) / (g.intra_node_bw * c.intra_eff);
        let net = per_peer * (ep - in_node) / (g.network_bw * c.net_eff);
        let alpha = if in_node < ep {
            g.network_latency
        } else {
            g.intra_node_latency
        };
        intra.max(net) + (ep - 1.0) * alpha
    }
}
