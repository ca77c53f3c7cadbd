//! Bytes per device (model states, activations, buffers) and FLOPs per step.

use crate::explain::{line, Trace};
use crate::layout::Layout;
use crate::model::ModelSpec;
use crate::recipe::{OffloadDevice, Recipe, Recompute, Schedule};
use crate::units::{count, gib};

use super::{Context, Memory};

/// Per-device parameters (before ZeRO) of one transformer layer without its routed experts, of
/// one layer's routed experts, of the first stage's extras (embedding shard, learned positions)
/// and of the last stage's extras (final norm, LM head). With one stage both extras sit on it.
/// A MoE model with leading dense layers gets the average layer (the layers of one stage are
/// counted as if dense and MoE layers were spread evenly; docs/estimator.md).
pub(super) fn stage_param_parts(m: &ModelSpec, l: &Layout) -> (f64, f64, f64, f64) {
    let t = l.tp as f64;
    let (sharded, replicated) = m.layer_params_split();
    let dense = sharded as f64 / t + replicated as f64;
    let (per_layer, experts) = match m.moe_layer_params_split() {
        Some((ms, mr, me)) => {
            let moe_share = m.moe_layers() as f64 / m.layers as f64;
            (
                (1.0 - moe_share) * dense + moe_share * (ms as f64 / t + mr as f64),
                moe_share * me as f64 / l.ep as f64,
            )
        }
        None => (dense, 0.0),
    };
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
    (per_layer, experts, first_extra, last_extra)
}

/// Chunk-activations (one micro-batch on one virtual stage) of chunk `k` of `v` that device `d`
/// of `p` keeps alive at its peak; the sum over chunks is the schedule's peak.
/// GPipe keeps all `m`; 1F1B keeps `p − d` (Narayanan et al. 2021 §2.2.1); interleaved 1F1B runs
/// `2(p − d − 1) + (v − 1)p` warm-up forwards before its first backward, visiting chunks in
/// groups of p micro-batches (Narayanan et al. 2021 §2.2.2, as `schedule.rs` builds it), so chunk
/// k holds the forwards at positions x with ⌊x/p⌋ mod v = k.
#[cfg(test)]
pub(super) fn chunk_in_flight(gpipe: bool, p: u64, v: u64, m: u64, d: u64, k: u64) -> f64 {
    chunk_flight(gpipe, p, v, m, d, k, interleaved_split(p, v, m, d))
}

/// Interleaved 1F1B on device d: the warm-up positions as (full rounds of p·v, remainder).
#[inline]
fn interleaved_split(p: u64, v: u64, m: u64, d: u64) -> (u64, u64) {
    if p <= 1 || v <= 1 {
        return (0, 0);
    }
    let total = (2 * (p - d - 1) + (v - 1) * p + 1).min(m * v);
    (total / (p * v), total % (p * v))
}

#[inline]
fn chunk_flight(gpipe: bool, p: u64, v: u64, m: u64, d: u64, k: u64, split: (u64, u64)) -> f64 {
    if p == 1 {
        1.0
    } else if gpipe {
        m as f64
    } else if v <= 1 {
        (p - d).min(m) as f64
    } else {
        // Positions 0..total, chunk of position x = (x / p) mod v.
        let (full, rest) = split;
        (full * p + rest.saturating_sub(k * p).min(p)) as f64
    }
}

/// Activation bytes one layer keeps for one micro-batch until its backward, by recompute policy
/// (Korthikanti et al. 2022, §4, generalised term by term; see docs/estimator.md).
pub fn layer_activation_bytes(m: &ModelSpec, r: &Recipe, l: &Layout, policy: Recompute) -> f64 {
    let (outside, rep, inside, core, t, experts) = layer_activation_terms(m, r, l, policy);
    outside * rep + (inside + core) / t + experts
}

/// The terms of [`layer_activation_bytes`]: bytes outside the tensor-parallel regions, the factor
/// they are kept at (1, or 1/t with sequence parallelism), bytes inside them (Q, K, V, attention
/// output, MLP), the attention core, t, and the routed experts' bytes on this rank. Total =
/// outside · factor + (inside + core) / t + experts. A MoE model's layer is the average layer.
fn layer_activation_terms(
    m: &ModelSpec,
    r: &Recipe,
    l: &Layout,
    policy: Recompute,
) -> (f64, f64, f64, f64, f64, f64) {
    let e = r.precision.compute_bytes();
    // With context parallelism each rank keeps the activations of its s/cp tokens.
    let s_full = m.seq_len as f64;
    let (b, s, h) = (l.micro_batch as f64, s_full / l.cp as f64, m.hidden as f64);
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
        return (e * sbh, rep, 0.0, 0.0, t, 0.0);
    }
    // The inputs of linear layers are kept in FP8 (1 byte) when the linears run in FP8.
    let lin_e = if r.fp8.is_some() { 1.0 } else { e };
    // Norm inputs (2 norms), QKV input, MLP input, two dropout masks.
    let replicated = (2.0 * e + lin_e + lin_e + 2.0 * mask) * sbh;
    // Q, K, V; attention output (input to proj); MLP up output(s) and activation output.
    let q = m.q_dim() as f64;
    let q_k_v = e * s * b * (q + 2.0 * kv);
    let attn_out = lin_e * s * b * q;
    let mats = m.mlp_matrices() as f64;
    let mlp_of = |width: f64| e * s * b * width * (mats - 1.0) + lin_e * s * b * width;
    // MoE layers: the shared experts like a dense MLP of their width (tp-sharded), and on this
    // rank the routed token copies (b·s·k·c tokens, / t with sequence parallelism: each tp rank
    // routes its own tokens): the permuted input, the experts' up and activation outputs, the
    // experts' outputs kept for the weighted combine, plus the router's fp32 probabilities.
    let (mlp, experts) = match &m.moe {
        None => (mlp_of(f), 0.0),
        Some(moe) => {
            let share = m.moe_layers() as f64 / m.layers as f64;
            let toks = s * b * rep;
            let fe = moe.expert_ffn as f64;
            let routed = toks
                * (moe.routed_copies() * ((lin_e + e) * h + (mats - 1.0) * e * fe + lin_e * fe)
                    + 4.0 * moe.experts as f64);
            (
                (1.0 - share) * mlp_of(f) + share * mlp_of(moe.shared_ffn as f64),
                share * routed,
            )
        }
    };
    let sharded = q_k_v + attn_out + mlp;
    // Softmax output, dropout mask and dropout output: a·s²·b each (absent with flash attention,
    // which keeps only the row statistics, 4 bytes per row, and with selective recompute).
    let core = if r.flash_attention {
        4.0 * a * s * b
    } else if policy == Recompute::Selective {
        0.0
    } else {
        (e + mask + if r.dropout { e } else { 0.0 }) * a * s * s_full * b
    };
    (replicated, rep, sharded, core, t, experts)
}

impl Context {
    /// Bytes per device for the worst stage.
    pub fn memory<T: Trace>(&self, l: &Layout, tr: &mut T) -> Memory {
        let m = &self.model;
        let r = &self.recipe;
        let sb = &r.state_bytes;
        let n_dense = l.grad_ranks() as f64;
        let n_experts = l.expert_grad_ranks() as f64;
        let (per_layer_dev, expert_layer_dev, first_extra, last_extra) = stage_param_parts(m, l);
        let zero = l.zero;
        // Model states of p parameters whose replicas (the ZeRO group) number n.
        let raw_states = |p: f64, n: f64| {
            let w = if zero >= 3 && r.zero3_keep_weights {
                // The shard plus the gathered copy kept across micro-batches.
                p * sb.weight / n + p * sb.weight
            } else if zero >= 3 {
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
        // Offload (ZeRO-Offload, Ren et al. 2021 §4; ZeRO-Infinity, Rajbhandari et al. 2021 §5):
        // the optimizer's states and the gradients (streamed out during backward, accumulated on
        // the host) leave the GPU; offloaded parameter shards leave it too (the gathered layers
        // in flight are the communication buffers; a gathered copy kept across micro-batches
        // stays). What leaves is counted as host bytes.
        let off = r.offload;
        let on_gpu = |p: f64, n: f64| {
            let (mut w, mut g, mut o, mut ms) = raw_states(p, n);
            if off.optimizer {
                (g, o, ms) = (0.0, 0.0, 0.0);
            }
            if off.params {
                w = if r.zero3_keep_weights {
                    p * sb.weight
                } else {
                    0.0
                };
            }
            (w, g, o, ms)
        };
        let host = |p: f64, n: f64| {
            let (a, b, c, d) = raw_states(p, n);
            let (x, y, z, u) = on_gpu(p, n);
            (a - x) + (b - y) + (c - z) + (d - u)
        };
        let states = on_gpu;
        // Activations.
        let per_layer = layer_activation_bytes(m, r, l, r.recompute);
        let working = if r.recompute == Recompute::Full {
            layer_activation_bytes(m, r, l, Recompute::None)
        } else {
            0.0
        };
        let e = r.precision.compute_bytes();
        let (b, s, h) = (
            l.micro_batch as f64,
            m.seq_len as f64 / l.cp as f64,
            m.hidden as f64,
        );
        let t = l.tp as f64;
        let emb_out =
            (e + if r.dropout { 1.0 } else { 0.0 }) * s * b * h / if l.sp { t } else { 1.0 };
        let logits = 4.0 * s * b * (m.vocab as f64 / t).ceil() + e * s * b * h;
        // Communication buffers.
        let comm = if l.grad_ranks() > 1 {
            match zero {
                0 => r.bucket_bytes,
                1 | 2 => 2.0 * r.bucket_bytes,
                _ => 2.0 * (per_layer_dev + expert_layer_dev) * sb.weight,
            }
        } else {
            0.0
        };
        // Usable capacity: the device's memory less the safety margin (fragmentation, NCCL and
        // cuBLAS workspaces the model does not itemise, peaks between the counted tensors).
        let cap = self.cluster.gpu.memory_bytes * (1.0 - r.memory_margin);
        // Every device: its layers (the sum of its virtual stages), their activations times the
        // micro-batches each chunk keeps in flight, plus the embedding (device 0) and the LM head
        // and logits (last device). The largest total is reported.
        let (pp, v) = (l.pp, l.vpp.max(1));
        let gpipe = r.schedule == Schedule::Gpipe;
        // Model-state bytes per parameter on this device (linear in the parameters).
        let state_bytes = |n: f64| {
            let (w, g, o, ms) = states(1.0, n);
            w + g + o + ms
        };
        let (dense_state_bytes, expert_state_bytes) =
            (state_bytes(n_dense), state_bytes(n_experts));
        let fixed = comm + r.runtime_overhead_bytes;
        let mut worst = (f64::NEG_INFINITY, 0u64, 0.0, 0.0, 0.0, 0.0);
        for d in 0..pp {
            // A middle device whose chunks have as many layers as the previous device's keeps no
            // more micro-batches in flight per chunk (the counts fall with d) and no embedding or
            // head, so it cannot be worse: skip it.
            if d >= 1
                && d + 1 < pp
                && (0..v).all(|k| {
                    l.virtual_stage_layers(m.layers, d + k * pp)
                        == l.virtual_stage_layers(m.layers, d - 1 + k * pp)
                })
            {
                continue;
            }
            let split = interleaved_split(pp, v, l.grad_accum, d);
            let mut layers_d = 0.0;
            let mut act_layers = 0.0;
            let mut flight_sum = 0.0;
            for k in 0..v {
                let fl = chunk_flight(gpipe, pp, v, l.grad_accum, d, k, split);
                let n = l.virtual_stage_layers(m.layers, d + k * pp) as f64;
                layers_d += n;
                act_layers += n * fl;
                flight_sum += fl;
            }
            let in_flight = flight_sum / v as f64;
            let mut params = per_layer_dev * layers_d;
            let experts = expert_layer_dev * layers_d;
            let mut act = per_layer * act_layers + working;
            if pp == 1 {
                params += first_extra + last_extra;
                act += emb_out.max(logits);
            } else if d == 0 {
                params += first_extra;
                act += emb_out * in_flight;
            } else if d == pp - 1 {
                params += last_extra;
                act += logits;
            }
            let total = params * dense_state_bytes + experts * expert_state_bytes + act + fixed;
            if total > worst.0 {
                worst = (total, d, params, act, layers_d, in_flight);
            }
        }
        let (_, worst_stage, dense_params, act, layers_dev, in_flight) = worst;
        let per_mb = per_layer * layers_dev;
        let expert_params = expert_layer_dev * layers_dev;
        let params = dense_params + expert_params;
        let (w, g, o, ms) = {
            let (a, b, c, d) = states(dense_params, n_dense);
            let (x, y, z, u) = states(expert_params, n_experts);
            (a + x, b + y, c + z, d + u)
        };
        let host_bytes = if off.any() {
            host(dense_params, n_dense) + host(expert_params, n_experts)
        } else {
            0.0
        };
        // The offload target's capacity per GPU: the node's DRAM or NVMe shared by the GPUs of
        // the node it belongs to (the preset's node: a DGX, an NVL72 rack).
        let gpu = &self.cluster.gpu;
        let node_capacity = match off.device {
            OffloadDevice::Cpu => gpu.host_mem_per_node_bytes,
            OffloadDevice::Nvme => gpu.nvme_per_node_bytes,
        };
        let host_capacity = if off.any() {
            node_capacity / gpu.gpus_per_node.max(1) as f64
        } else {
            0.0
        };
        let total = w + g + o + ms + act + comm + r.runtime_overhead_bytes;
        tr.line(|| {
            let experts = if expert_params > 0.0 {
                format!(" + routed experts {} layers x {}/layer (ep {}; their ZeRO group is the expert-data-parallel {} ranks)", layers_dev, count(expert_layer_dev), l.ep, l.expert_grad_ranks())
            } else {
                String::new()
            };
            line("memory", "parameters on the worst device", format!(
                "stage {worst_stage} of {}: {} layers x {} params/layer (tp {}){experts} + embedding/head shards", l.pp, layers_dev, count(per_layer_dev), l.tp),
                params, "params", "Shoeybi et al. 2019 (Megatron column/row split); experts split over ep (Lepikhin et al. 2020, GShard)")
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
                if zero >= 3 {
                    "ZeRO stage 3 shards weights across dp (Rajbhandari et al. 2019 §5.3)"
                } else {
                    "every data-parallel rank keeps the full weights (only ZeRO-3 shards them)"
                },
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
                if zero >= 2 {
                    "ZeRO stage 2 shards gradients across dp (Rajbhandari et al. 2019 §5.2)"
                } else {
                    "every data-parallel rank keeps full gradients (ZeRO-2 and -3 shard them)"
                },
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
                if zero >= 1 {
                    "fp32 masters (Micikevicius et al. 2018), sharded across dp by ZeRO stage 1"
                } else {
                    "fp32 masters (Micikevicius et al. 2018), replicated without ZeRO"
                },
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
                if zero >= 1 {
                    "Adam: 2 fp32 moments, sharded across dp by ZeRO stage 1 (Rajbhandari et al. 2019 §5.1)"
                } else {
                    "Adam: 2 fp32 moments, replicated without ZeRO"
                },
            )
        });
        tr.line(|| {
            let (outside, rep, inside, core, t, experts) = layer_activation_terms(m, r, l, r.recompute);
            let experts = if m.moe.is_some() {
                format!(" + routed experts {:.2} MB (b·s·k·c token copies on this rank)", experts / 1e6)
            } else {
                String::new()
            };
            line("memory", "activations per layer per micro-batch", format!(
            "recompute {}, b={}, s={}, h={}, t={}, sp={}, flash={}: outside the tp regions {:.2} MB x {} + (inside {:.2} MB + attention core {:.2} MB) / {}{experts} = {}",
            r.recompute, l.micro_batch, m.seq_len, m.hidden, l.tp, l.sp, r.flash_attention,
            outside / 1e6, if rep < 1.0 { format!("1/{t}") } else { "1".into() }, inside / 1e6, core / 1e6, t, gib(per_layer)),
            per_layer, "bytes", "Korthikanti et al. 2022 §4: sbh(10 + 24/t + 5as/(ht)) for fp16 MHA with dropout, generalised")
        });
        tr.line(|| line("memory", "activations in flight", format!(
            "{} layers x {} x {:.2} micro-batches in flight ({}, p={}, v={}, m={}) + embedding/logits + one recompute working set {}",
            layers_dev, gib(per_layer), in_flight, r.schedule, l.pp, l.vpp, l.grad_accum, gib(working)),
            act, "bytes", "1F1B keeps p micro-batches on stage 0; interleaving multiplies by 1+(p-1)/(pv) (Korthikanti et al. 2022 §4.2.3)"));
        if off.any() {
            tr.line(|| {
                line(
                    "memory",
                    "offloaded to the host",
                    format!(
                        "{}: {} per GPU leave device memory (optimizer: gradients, master weights, moments; params: the 16-bit shard); {}",
                        off,
                        gib(host_bytes),
                        if host_capacity > 0.0 {
                            format!(
                                "{} per GPU available ({} {} per node / {} GPUs) -> {}",
                                gib(host_capacity),
                                gib(node_capacity),
                                if off.device == OffloadDevice::Cpu { "DRAM" } else { "NVMe" },
                                gpu.gpus_per_node,
                                if host_bytes <= host_capacity {
                                    "fits".to_string()
                                } else {
                                    format!("DOES NOT FIT: {} over", gib(host_bytes - host_capacity))
                                }
                            )
                        } else {
                            format!("{}'s host capacity is unknown: not checked", gpu.name)
                        }
                    ),
                    host_bytes,
                    "bytes",
                    "ZeRO-Offload (Ren et al. 2021 §4), ZeRO-Infinity (Rajbhandari et al. 2021 §5)",
                )
            });
        }
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
            expert_params_on_device: expert_params,
            host_bytes,
            host_capacity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::chunk_in_flight;
    use crate::schedule::{build, simulate, Kind};

    #[test]
    fn chunks_in_flight_match_the_simulated_schedules() {
        for p in 2..=5u32 {
            for v in 1..=3u32 {
                for m in [p, 2 * p, 3 * p] {
                    for (kind, gpipe) in [(Kind::OneFOneB, false), (Kind::Gpipe, true)] {
                        if gpipe && v > 1 {
                            continue;
                        }
                        let sim = simulate(&build(kind, p, m, v), m, v, 1.0, 2.0, 0.0);
                        for d in 0..p {
                            let ours: f64 = (0..v as u64)
                                .map(|k| {
                                    chunk_in_flight(
                                        gpipe, p as u64, v as u64, m as u64, d as u64, k,
                                    )
                                })
                                .sum();
                            assert_eq!(
                                ours, sim.peak_in_flight[d as usize] as f64,
                                "{kind:?} p {p} v {v} m {m} device {d}"
                            );
                        }
                    }
                }
            }
        }
    }
}
