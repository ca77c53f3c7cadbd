//! Seconds per step: per-op roofline for compute, α-β collectives, pipeline bubble, optimizer.

use crate::explain::{line, Trace};
use crate::layout::Layout;
use crate::recipe::{GradSync, OffloadDevice, Precision, Recompute};
use crate::units::count;

use crate::partition::{balanced_uniform, Partition};

use super::{Context, LayerTimes, Memory, StageCosts, StepTime};

use super::layer::{all_reduce_secs, gather_secs};

impl Context {
    /// What a pipeline stage costs per micro-batch (forward + backward), for balancing: one
    /// layer (compute and tensor-parallel communication), the embedding (first stage) and the LM
    /// head with its loss (last stage). Depends on tp, micro-batch, sp and the recipe, not on
    /// pp, vpp or dp.
    pub fn stage_costs(&self, l: &Layout) -> StageCosts {
        let lt = self.layer_times(l);
        let (embed, head, head_comm) = self.end_stage_secs(l, lt.tp_bw, lt.peak);
        StageCosts {
            layer: lt.fwd + lt.bwd + lt.recompute + lt.tp_fwd + lt.tp_bwd + lt.tp_recompute,
            first_extra: embed,
            last_extra: head + head_comm,
        }
    }

    /// Replaces a non-explicit partition by the balanced one for this layout's predicted stage
    /// costs ([`crate::partition::balanced_uniform`] over pp·vpp virtual stages).
    pub fn balance(&self, l: &mut Layout) {
        let stages = l.pp * l.vpp;
        if l.partition == Partition::Explicit || stages <= 1 {
            return;
        }
        let c = self.stage_costs(l);
        self.balance_with(l, &c);
    }

    /// [`Context::balance`] with costs already computed (the planner caches them).
    #[inline]
    pub fn balance_with(&self, l: &mut Layout, c: &StageCosts) {
        let stages = l.pp * l.vpp;
        if l.partition == Partition::Explicit || stages <= 1 {
            return;
        }
        l.stage_layers = balanced_uniform(
            stages,
            self.model.layers,
            c.layer,
            c.first_extra,
            c.last_extra,
        );
        l.partition = Partition::Balanced;
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
            ep_fwd,
            ep_bwd,
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
        let bw = g.memory_bw;
        let membw = bw * c.mem_eff;
        let t = l.tp as f64;
        let tok = l.micro_batch as f64 * m.seq_len as f64 / l.cp as f64;
        let gpn = self.cluster.gpus_per_node;
        let layer_compute = fwd + bwd + recompute;
        let layer_comm = tp_fwd + tp_bwd + tp_recompute;
        let (embed, head, head_comm) = self.end_stage_secs(l, tp_bw, peak);
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
        // Per device per micro-batch: its layers (the sum of its virtual stages) plus the
        // embedding on device 0 and the LM head and loss on the last device. The slowest device
        // sets the pipeline's pace; the others add fill and drain:
        // bubble = (Σ_d t_d − t_max) / v (uniform middle stages give (p−1)·t/v, Narayanan et al.
        // 2021 §2.2).
        let pp = l.pp;
        // Middle devices differ only in their layer count: the one with the most layers (the
        // first such) is the slowest of them, and Σ_d t_d needs only the total.
        let mut mid = (0u64, 0u64);
        if pp > 2 {
            for d in 1..pp - 1 {
                let n = l.device_layers(m.layers, d);
                if n > mid.0 || mid.1 == 0 {
                    mid = (n, d);
                }
            }
        }
        let device = |d: u64| -> (f64, f64, f64) {
            let n = l.device_layers(m.layers, d) as f64;
            let (mut comp, mut comm) = (n * layer_compute, n * layer_comm);
            if pp == 1 {
                comp += embed + head;
                comm += head_comm;
            } else if d == 0 {
                comp += embed;
            } else if d == pp - 1 {
                comp += head;
                comm += head_comm;
            }
            (comp, comm, n)
        };
        // (t, compute, communication, layers, device); ties go to the later device.
        let mut worst = (f64::NEG_INFINITY, 0.0, 0.0, 0.0, 0u64);
        let mut consider = |d: u64| {
            let (comp, comm, n) = device(d);
            let t_d = comp + comm + p2p;
            if t_d > worst.0 || (d == pp - 1 && t_d >= worst.0) {
                worst = (t_d, comp, comm, n, d);
            }
        };
        consider(0);
        if mid.1 > 0 {
            consider(mid.1);
        }
        if pp > 1 {
            consider(pp - 1);
        }
        let sum_t = if pp > 1 {
            m.layers as f64 * (layer_compute + layer_comm)
                + embed
                + head
                + head_comm
                + pp as f64 * p2p
        } else {
            worst.0
        };
        let (t_max, mb_compute, mb_comm, slow_layers, slow_device) = worst;
        let mbs = l.grad_accum as f64;
        let compute = mbs * mb_compute;
        let tp_comm = mbs * mb_comm;
        let pp_comm = mbs * p2p;
        let ep_recompute = if r.recompute == Recompute::Full {
            ep_fwd
        } else {
            0.0
        };
        let ep_comm = mbs * slow_layers * (ep_fwd + ep_bwd + ep_recompute);
        let v = l.vpp as f64;
        let bubble = if l.pp > 1 { (sum_t - t_max) / v } else { 0.0 };
        // Data-parallel gradient sync of the worst device's parameters.
        let n = l.grad_ranks() as f64;
        // Routed experts are summed over their own expert-data-parallel group (n_e ranks).
        let n_e = l.expert_grad_ranks() as f64;
        let experts = mem.expert_params_on_device;
        let pdev = mem.params_on_device - experts;
        let sb = &r.state_bytes;
        let world = l.world();
        let dp_intra = world <= gpn;
        // Across nodes a collective's bandwidth is the network per GPU times the k members of
        // the group inside one node (NCCL runs one ring channel per NIC, so every NIC of the
        // group carries 1/k of the buffer), capped by the intra-node link: nccl-tests' bus
        // bandwidth on multi-node DGX systems. With tp·pp filling a node, k = 1.
        let (dp_bw, dp_alpha) = if dp_intra {
            (g.intra_node_bw * c.intra_eff, g.intra_node_latency)
        } else {
            let k = (gpn / (l.tp * l.pp)).clamp(1, l.grad_ranks()) as f64;
            (
                (k * g.network_bw * c.net_eff).min(g.intra_node_bw * c.intra_eff),
                g.network_latency,
            )
        };
        let gbytes = pdev * r.grad_comm_bytes;
        let wbytes = pdev * sb.weight;
        // ZeRO-3 gathers the weights for every pass that uses them: the forward and the backward
        // of every micro-batch (FSDP's reshard-after-forward, DeepSpeed's default), or once per
        // step when the gathered weights are kept (Rajbhandari et al. 2019 §5.3: 1.5x the
        // all-reduce volume per step without accumulation).
        let mbs_f = l.grad_accum as f64;
        let zero3 = l.grad_ranks() > 1 && l.zero >= 3 && r.grad_sync != GradSync::ParameterServer;
        let gathers = if !zero3 {
            0.0
        } else if r.zero3_keep_weights {
            1.0
        } else {
            2.0 * mbs_f
        };
        let ring_lat = if r.grad_sync == GradSync::Ring {
            2.0 * (n - 1.0)
        } else {
            2.0 * n.log2().ceil()
        } * dp_alpha;
        let expert_gather = if experts > 0.0 {
            gather_secs(n_e, experts * sb.weight, dp_bw, 0.0)
        } else {
            0.0
        };
        // Offloaded parameters (ZeRO-Infinity): each gather first fetches this rank's shard from
        // host memory (or NVMe through it) over the host link, pipelined layer by layer like the
        // gather itself.
        let off = r.offload;
        let host_fetch = if off.params && zero3 {
            let shard = (wbytes / n + experts * sb.weight / n_e).max(0.0);
            let bw = match off.device {
                OffloadDevice::Cpu => g.host_link_bw,
                OffloadDevice::Nvme => g.host_link_bw.min(g.nvme_bw),
            };
            shard / bw
        } else {
            0.0
        };
        let one_gather =
            gather_secs(n, wbytes, dp_bw, 0.0) + 0.5 * ring_lat + expert_gather + host_fetch;
        let zero3_gathers = gathers * one_gather;
        let sync = |n: f64, gbytes: f64, wbytes: f64| -> f64 {
            if n <= 1.0 {
                return 0.0;
            }
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
                        // The gradients' reduce-scatter; the weight gathers are added below.
                        _ => gather_secs(n, gbytes, dp_bw, 0.0) + 0.5 * lat,
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
        let dp_comm = sync(n, gbytes, wbytes)
            + if experts > 0.0 {
                sync(n_e, experts * r.grad_comm_bytes, experts * sb.weight)
            } else {
                0.0
            };
        let mem_layers = l.device_layers(m.layers, mem.worst_stage) as f64;
        let bwd_window = if r.overlap_grad_reduce {
            mem_layers * (bwd + recompute + tp_bwd + tp_recompute)
        } else {
            0.0
        };
        let bucket_floor = if gbytes > 0.0 {
            dp_comm * (r.bucket_bytes / gbytes).min(1.0)
        } else {
            0.0
        };
        // ZeRO-1/2 with Megatron's `overlap_param_gather`: the all-gather of the updated weights
        // runs behind the next step's first forward, bucket by bucket; the gradients'
        // reduce-scatter stays behind the last backward.
        let param_gather = if l.grad_ranks() > 1
            && matches!(l.zero, 1 | 2)
            && r.overlap_param_gather
            && r.overlap_grad_reduce
            && r.grad_sync != GradSync::ParameterServer
        {
            gather_secs(n, wbytes, dp_bw, 0.0) + 0.5 * ring_lat
        } else {
            0.0
        };
        let param_exposed = if param_gather > 0.0 {
            let fwd_window = mem_layers * (fwd + tp_fwd);
            (param_gather - fwd_window).max(param_gather * (r.bucket_bytes / wbytes).min(1.0))
        } else {
            0.0
        };
        let grad_exposed = if r.overlap_grad_reduce {
            (dp_comm - param_gather - bwd_window).max(bucket_floor) + param_exposed
        } else {
            dp_comm
        };
        // Each gather is prefetched layer by layer behind the pass it serves; the first layer's
        // share can never hide.
        let gather_floor = one_gather / mem_layers.max(1.0);
        let fwd_window = mem_layers * (fwd + tp_fwd);
        let gather_exposed = if !zero3 {
            0.0
        } else if !r.overlap_grad_reduce {
            zero3_gathers
        } else if r.zero3_keep_weights {
            (one_gather - fwd_window).max(gather_floor)
        } else {
            mbs_f
                * ((one_gather - fwd_window).max(gather_floor)
                    + (one_gather - bwd_window).max(gather_floor))
        };
        let dp_exposed = grad_exposed + gather_exposed;
        let dp_comm = dp_comm + zero3_gathers;
        // Optimizer step, memory-bound, per parameter (sharded by ZeRO): gradient norm (read g),
        // clipping (read + write g), fp16 unscale and overflow check (read + write g), the fused
        // Adam update (read g, master, moments; write master, moments), the copy of the masters
        // into the working weights (read master, write weights) and zeroing the gradients.
        let opt_params = if l.zero >= 1 {
            pdev / n + experts / n_e
        } else {
            pdev + experts
        };
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
        // Offloaded optimizer (ZeRO-Offload, Ren et al. 2021 §4–5): the gradient shard streams to
        // the host during backward (exposed beyond the backward window), CPU-Adam updates it —
        // bound by host memory bandwidth: read the gradient, read and write master and moments,
        // write the 16-bit weight — with NVMe the states are read and written once per step,
        // pipelined with the CPU work (ZeRO-Infinity's overlap-centric design, Rajbhandari et
        // al. 2021 §6); then the updated 16-bit weights go back to the GPU.
        let offload = if off.optimizer {
            let d2h = opt_params * sb.grad / g.host_link_bw;
            let d2h_exposed = if r.overlap_grad_reduce {
                (d2h - bwd_window).max(0.0)
            } else {
                d2h
            };
            let cpu = opt_params * (sb.grad + 2.0 * sb.master + 2.0 * sb.optimizer + sb.weight)
                / (g.host_mem_bw * c.mem_eff);
            let nvme = if off.device == OffloadDevice::Nvme {
                opt_params * 2.0 * (sb.master + sb.optimizer) / g.nvme_bw
            } else {
                0.0
            };
            let h2d = opt_params * sb.weight / g.host_link_bw;
            d2h_exposed + cpu.max(nvme) + h2d
        } else {
            0.0
        };
        let gpu_opt = if off.optimizer {
            0.0
        } else {
            opt_bytes / membw
        };
        let optimizer = gpu_opt + offload + c.step_overhead_secs;
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
        if l.ep > 1 {
            tr.line(|| line("time", "expert-parallel all-to-all per step", format!(
                "2 all-to-alls (dispatch, combine) per MoE layer forward and 2 backward among ep({}) ranks, each (ep-1)/ep of tokens x k x c x h x {} B: fwd {:.3} + bwd {:.3} ms per layer (MoE share of the layers included) x {} layers x {} micro-batches",
                l.ep, r.precision.compute_bytes(), ep_fwd * 1e3, ep_bwd * 1e3, slow_layers, l.grad_accum),
                ep_comm, "s", if r.ep_comm_overlap {
                    "GShard (Lepikhin et al. 2020) dispatch/combine; overlapped with another micro-batch's compute (--ep-comm-overlap): only max(0, 4 all-to-alls - layer fwd - bwd) is exposed"
                } else {
                    "GShard (Lepikhin et al. 2020) dispatch/combine; link: intra-node share over NVLink, the rest over the GPU's network port"
                }));
        }
        if let Some(moe) = &self.model.moe {
            let per_copy = self.cluster.gpu.expert_secs_per_copy;
            let tok = (l.micro_batch * self.model.seq_len) as f64 / l.cp as f64;
            let tok_moe = if l.sp { tok / l.tp as f64 } else { tok };
            let share = self.model.moe_layers() as f64 / self.model.layers as f64;
            let copies = tok_moe * moe.routed_copies();
            tr.line(|| line("time", "routed-expert cost beyond the roofline, per layer", format!(
                "{copies:.0} token copies per rank and MoE layer x {per_copy:.3e} s ({}'s expert_secs_per_copy) x MoE share {share:.3} = {:.3} ms per layer and micro-batch (in the compute above; a third in forward)",
                self.cluster.gpu.name, share * copies * per_copy * 1e3),
                share * copies * per_copy, "s", "empirical, fitted per GPU on published Qwen3-30B-A3B runs (docs/validation.md)"));
        }
        tr.line(|| {
            line(
                "time",
                "compute per step",
                format!(
                    "{} micro-batches x {:.4} s (slowest device {slow_device}: {} layers{})",
                    l.grad_accum,
                    mb_compute,
                    slow_layers,
                    if pp == 1 {
                        " + embedding + head"
                    } else if slow_device == 0 {
                        " + embedding"
                    } else if slow_device == pp - 1 {
                        " + head and loss"
                    } else {
                        ""
                    }
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
                    "(sum of device times {:.4} - slowest {:.4}) / v with p={}, v={}: {:.4} s",
                    sum_t, t_max, l.pp, l.vpp, bubble
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
            "{}, ZeRO-{}, dp {}: {} grads x {} B over {} at {:.0} GB/s = {:.4} s; exposed {:.4} s (overlap {})",
            r.grad_sync, l.zero, l.dp, count(pdev), r.grad_comm_bytes, if dp_intra { "intra-node links" } else { "network" }, dp_bw / 1e9, dp_comm - zero3_gathers, grad_exposed, r.overlap_grad_reduce),
            grad_exposed, "s", "ring all-reduce 2(n-1)/n; ZeRO-1/2 reduce-scatter + all-gather of the updated weights; ZeRO-3 reduce-scatter only (Rajbhandari et al. 2019 §7)"));
        if zero3 {
            tr.line(|| line("time", "ZeRO-3 weight gathers", format!(
                "{gathers} all-gathers of {} params x {} B ({}) x {:.4} s = {:.4} s; exposed {:.4} s (each prefetched behind the pass it serves, at least one layer's share)",
                count(pdev), sb.weight,
                if r.zero3_keep_weights { "gathered once per step and kept".to_string() } else { format!("forward and backward of each of {} micro-batches", l.grad_accum) },
                one_gather, zero3_gathers, gather_exposed),
                gather_exposed, "s", "FSDP / DeepSpeed ZeRO-3 re-gather per pass unless the gathered weights are kept (Rajbhandari et al. 2019 §5.3)"));
        }
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
        if off.optimizer {
            tr.line(|| line("time", "offloaded optimizer step", format!(
                "{} params: gradients {} B down and weights {} B up over the host link at {:.0} GB/s, CPU-Adam {:.0} B/param at {:.0} GB/s x {}{} (gradient download hidden behind backward where it fits)",
                count(opt_params), sb.grad, sb.weight, g.host_link_bw / 1e9,
                sb.grad + 2.0 * sb.master + 2.0 * sb.optimizer + sb.weight, g.host_mem_bw / 1e9, c.mem_eff,
                if off.device == OffloadDevice::Nvme { format!(", NVMe {:.0} B/param at {:.1} GB/s pipelined with it", 2.0 * (sb.master + sb.optimizer), g.nvme_bw / 1e9) } else { String::new() }),
                offload, "s", "ZeRO-Offload (Ren et al. 2021 §4-5), ZeRO-Infinity (Rajbhandari et al. 2021 §6)"));
        }
        if host_fetch > 0.0 {
            tr.line(|| line("time", "offloaded parameter fetch per gather", format!(
                "this rank's 16-bit shard from {} before each all-gather: {:.4} s (inside the ZeRO-3 gather time above)",
                if off.device == OffloadDevice::Nvme { "NVMe" } else { "host memory" }, host_fetch),
                host_fetch, "s", "ZeRO-Infinity (Rajbhandari et al. 2021 §5)"));
        }
        tr.line(|| line("time", "step total", format!("compute {compute:.4} + communication {communication:.4} + bubble {bubble:.4} + optimizer {optimizer:.4}"), total, "s", "sum"));
        StepTime {
            compute,
            communication,
            bubble,
            optimizer,
            offload,
            total,
            tp_comm,
            ep_comm,
            pp_comm,
            dp_comm,
            dp_exposed,
        }
    }
}
