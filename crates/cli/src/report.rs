//! Human-readable rendering of estimates, plans and explanations.

use std::fmt::Write as _;

use plan::estimate::Estimate;
use plan::explain::Line;
use plan::search::{Candidate, Reject, SearchResult};
use plan::units::{count, duration, gib};

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// The default table for `scaletrain estimate`.
pub fn estimate_table(e: &Estimate, recipe: &plan::Recipe) -> String {
    let mut s = String::new();
    let l = &e.layout;
    let m = &e.memory_per_device_bytes.memory;
    let headroom = e.memory_per_device_bytes.headroom;
    let p = &e.parameter_breakdown;
    let _ = writeln!(
        s,
        "Model       {} — {} layers, hidden {}, {} heads ({} KV), ffn {}, vocab {}, seq {}",
        e.model.name,
        e.model.layers,
        e.model.hidden,
        e.model.heads,
        e.model.kv_heads,
        e.model.ffn_hidden,
        e.model.vocab,
        e.model.seq_len
    );
    let _ = writeln!(
        s,
        "Parameters  {} ({}) = embedding {} + {} layers x {} + final norm {} + head {}",
        count(e.parameters as f64),
        e.parameters,
        count(p.embedding as f64),
        e.model.layers,
        count(p.per_layer as f64),
        p.final_norm,
        count(p.head as f64)
    );
    if let Some(moe) = &e.model.moe {
        let _ = writeln!(
            s,
            "Experts     {} routed experts of ffn {}, top-{}{}{}, {} of {} layers MoE; {} active parameters per token ({} in routed experts)",
            moe.experts,
            moe.expert_ffn,
            moe.top_k,
            if moe.shared_ffn > 0 { format!(", shared experts ffn {}", moe.shared_ffn) } else { String::new() },
            match moe.capacity_factor { Some(c) => format!(", capacity factor {c}"), None => ", dropless".into() },
            e.model.layers - moe.dense_layers,
            e.model.layers,
            count(p.active as f64),
            count(p.routed_experts as f64)
        );
    }
    let _ = writeln!(
        s,
        "Cluster     {} x {} ({} per node), ${:.2}/GPU-hour",
        e.gpus, e.gpu, e.gpus_per_node, e.price_per_gpu_hour
    );
    let _ = writeln!(s, "Recipe      {}, {}, {} tokens, global batch {} x {} tokens, recompute {}, flash attention {}{}", match recipe.fp8 { Some(f) => format!("{} with {f} linears", recipe.precision), None => recipe.precision.to_string() }, recipe.optimizer, count(recipe.tokens), recipe.global_batch, e.model.seq_len, recipe.recompute, recipe.flash_attention, if recipe.offload.any() { format!(", offload {}", recipe.offload) } else { String::new() });
    let _ = writeln!(s, "Layout      dp {} x tp {} x pp {}{} (vpp {}), sequence parallel {}, ZeRO-{}, micro-batch {}, grad-accum {}", l.dp, l.tp, l.pp, if l.cp > 1 { format!(" x cp {}", l.cp) } else { String::new() } + &if l.ep > 1 { format!(", ep {}", l.ep) } else { String::new() }, l.vpp, if l.sp { "on" } else { "off" }, l.zero, l.micro_batch, l.grad_accum);
    if l.pp * l.vpp > 1 {
        let how = match l.partition {
            plan::Partition::Even => "even",
            plan::Partition::Balanced => "balanced from predicted stage times",
            plan::Partition::Explicit => "as given",
        };
        let _ = writeln!(
            s,
            "Stages      layers per {}stage {} ({how})",
            if l.vpp > 1 { "virtual " } else { "" },
            l.stage_layers
        );
    }
    let sb = recipe.state_bytes;
    let _ = writeln!(
        s,
        "\nMemory per device (worst: pipeline stage {}), model states {} B/param before sharding",
        m.worst_stage,
        sb.total()
    );
    let row = |s: &mut String, name: &str, v: f64, note: String| {
        let _ = writeln!(s, "  {name:<24}{:>12}  {note}", gib(v));
    };
    row(
        &mut s,
        "weights",
        m.weights,
        format!("{} B/param", sb.weight),
    );
    row(
        &mut s,
        "gradients",
        m.gradients,
        format!("{} B/param", sb.grad),
    );
    row(
        &mut s,
        "master weights",
        m.master_weights,
        format!("{} B/param", sb.master),
    );
    row(
        &mut s,
        "optimizer states",
        m.optimizer_states,
        format!("{} B/param", sb.optimizer),
    );
    row(
        &mut s,
        "activations",
        m.activations,
        format!(
            "{} per micro-batch x {:.2} in flight (+ embedding/logits)",
            gib(m.activations_per_microbatch),
            m.microbatches_in_flight
        ),
    );
    row(
        &mut s,
        "communication buffers",
        m.comm_buffers,
        String::new(),
    );
    if m.host_bytes > 0.0 {
        row(
            &mut s,
            "(on the host)",
            m.host_bytes,
            if m.host_capacity > 0.0 {
                format!(
                    "offloaded ({}), not in the total; {} per GPU available on the host -> {}",
                    recipe.offload,
                    gib(m.host_capacity),
                    if m.host_fits() {
                        "fits".to_string()
                    } else {
                        format!(
                            "DOES NOT FIT on the host: {} over",
                            gib(m.host_bytes - m.host_capacity)
                        )
                    }
                )
            } else {
                format!(
                    "offloaded ({}), not in the total; host capacity unknown, not checked",
                    recipe.offload
                )
            },
        );
    }
    row(
        &mut s,
        "runtime overhead",
        m.runtime_overhead,
        "assumed".into(),
    );
    let verdict = if e.fits {
        format!("fits, headroom {}", gib(headroom))
    } else if headroom >= 0.0 {
        format!(
            "fits on the GPU, but the offloaded states DO NOT FIT on the host ({} of {} per GPU; use NVMe, more nodes or ZeRO-3)",
            gib(m.host_bytes),
            gib(m.host_capacity)
        )
    } else {
        format!("DOES NOT FIT: {} over", gib(-headroom))
    };
    let _ = writeln!(
        s,
        "  {:<24}{:>12}  of {}{} -> {verdict}",
        "total",
        gib(m.total),
        gib(m.capacity),
        if recipe.memory_margin > 0.0 {
            format!(" (after a {:.0}% margin)", recipe.memory_margin * 100.0)
        } else {
            String::new()
        }
    );
    let _ = writeln!(s, "\nFLOPs       {:.3e} per token (model), {:.3e} per step (model), {:.3e} per step (hardware, with recompute), {:.3e} total", e.flops_per_token, e.flops_per_step, e.hardware_flops_per_step, e.total_flops);
    let t = &e.step_time_secs;
    let _ = writeln!(
        s,
        "Step time   {} = compute {} + communication {} + bubble {} + optimizer {}",
        duration(t.total),
        duration(t.compute),
        duration(t.communication),
        duration(t.bubble),
        duration(t.optimizer)
    );
    let _ = writeln!(s, "            communication: tensor-parallel {}{}, pipeline {}, data-parallel {} exposed of {}", duration(t.tp_comm), if t.ep_comm > 0.0 { format!(" (of which expert all-to-all {})", duration(t.ep_comm)) } else { String::new() }, duration(t.pp_comm), duration(t.dp_exposed), duration(t.dp_comm));
    let _ = writeln!(
        s,
        "            MFU {}, HFU {}, {:.0} tokens/s",
        pct(e.mfu),
        pct(e.hfu),
        e.tokens_per_sec
    );
    let _ = writeln!(
        s,
        "Training    {:.0} steps, {:.1} days, {:.0} GPU-hours, ${:.0}",
        e.steps, e.training_days, e.gpu_hours, e.cost_usd
    );
    let g = &e.goodput;
    if g.expected_days.is_finite() {
        let _ = writeln!(
            s,
            "Failures    {:.1} days expected with failures (goodput {}): cluster MTBF {:.1} h, ~{:.0} failures; checkpoint {} in {:.0} s every {:.0} min (Young/Daly); restart {:.0} min",
            g.expected_days,
            pct(g.goodput),
            g.cluster_mtbf_hours,
            g.expected_failures,
            gib(g.checkpoint_bytes),
            g.checkpoint_secs,
            g.checkpoint_interval_secs / 60.0,
            g.restart_secs / 60.0
        );
    } else {
        let _ = writeln!(
            s,
            "Failures    the run never finishes: restarts and lost work ({:.0} min restart, checkpoint every {:.0} min) exceed the cluster MTBF of {:.2} h; lower --restart-minutes or use fewer GPUs",
            g.restart_secs / 60.0,
            g.checkpoint_interval_secs / 60.0,
            g.cluster_mtbf_hours
        );
    }
    s
}

/// `--explain`: every formula with its numbers and source, by section.
pub fn explain(lines: &[Line]) -> String {
    let mut s = String::from("\nHow each number was computed\n");
    let mut section = "";
    for l in lines {
        if l.section != section {
            section = l.section;
            let _ = writeln!(s, "\n[{section}]");
        }
        let value = match l.unit {
            "bytes" => gib(l.value),
            "s" => duration(l.value),
            "ratio" => pct(l.value),
            "params" => count(l.value),
            u => format!(
                "{} {u}",
                if l.value.abs() >= 1e6 {
                    format!("{:.4e}", l.value)
                } else {
                    format!("{:.4}", l.value)
                }
            ),
        };
        let _ = writeln!(
            s,
            "  {} = {value}\n      = {}\n      source: {}",
            l.quantity, l.formula, l.source
        );
    }
    s
}

fn candidate_row(i: usize, c: &Candidate) -> String {
    let l = &c.layout;
    let t = &c.eval.time;
    format!(
        "{:>3}  {:>5} {:>3} {:>3} {:>3} {:>3} {:>3} {:>3} {:>4} {:>3} {:>4} {:<10} {:>8} {:>10} {:>10} {:>10} {:>10} {:>6} {:>8} {:>12}",
        i + 1, l.world(), l.dp, l.tp, l.pp, l.cp, l.ep, l.vpp, if l.sp { "on" } else { "off" }, l.zero, l.micro_batch, c.recompute.to_string(),
        format!("{:.1}", c.eval.memory.total / plan::units::GIB), duration(t.total), duration(t.compute), duration(t.communication), duration(t.bubble), pct(c.eval.mfu), format!("{:.1}", c.days), format!("${:.0}", c.cost_usd)
    )
}

/// The planner's report.
pub fn plan_table(r: &SearchResult, secs: f64, breakdown_of_best: Option<String>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Searched {} candidate layouts ({} costed) in {:.3} s: {} fit{}",
        r.candidates,
        r.evaluated,
        secs,
        r.accepted,
        if r.candidates > 0 {
            format!(
                " ({:.2} M layouts/s)",
                r.candidates as f64 / secs.max(1e-9) / 1e6
            )
        } else {
            String::new()
        }
    );
    if r.top.is_empty() {
        let _ = writeln!(s, "\n{}", no_fit_hint(r));
    } else {
        let _ = writeln!(s, "\n{:>3}  {:>5} {:>3} {:>3} {:>3} {:>3} {:>3} {:>3} {:>4} {:>3} {:>4} {:<10} {:>8} {:>10} {:>10} {:>10} {:>10} {:>6} {:>8} {:>12}", "#", "gpus", "dp", "tp", "pp", "cp", "ep", "vpp", "sp", "zero", "mb", "recompute", "GiB/GPU", "step", "compute", "comm", "bubble", "MFU", "days", "cost");
        for (i, c) in r.top.iter().enumerate() {
            let _ = writeln!(s, "{}", candidate_row(i, c));
        }
    }
    if !r.rejected.is_empty() {
        let _ = writeln!(s, "\nRejected:");
        for reason in Reject::ALL {
            if let Some((_, n)) = r.rejected.iter().find(|(x, _)| *x == reason) {
                let _ = writeln!(s, "  {n:>10} layouts: {}", reason.describe());
            }
        }
    }
    if let Some(b) = breakdown_of_best {
        let _ = writeln!(s, "\nBest layout in detail:\n{b}");
    }
    s
}

/// Why nothing was accepted, from the rejection counts: the batch arithmetic, memory, or the
/// deadline/budget (those are answered with the best achievable result by the caller).
pub fn no_fit_hint(r: &SearchResult) -> String {
    let count = |k: Reject| {
        r.rejected
            .iter()
            .find(|(x, _)| *x == k)
            .map_or(0, |(_, n)| *n)
    };
    let arithmetic = count(Reject::BatchNotDivisible) + count(Reject::InterleaveMicroBatches);
    let oom =
        count(Reject::OomFirstStage) + count(Reject::OomMiddleStage) + count(Reject::OomLastStage);
    if r.candidates == 0 {
        "No layout to try: no tensor/pipeline degree fits this model on this cluster size.".into()
    } else if oom == 0 && arithmetic == r.candidates {
        "No layout divides the global batch: dp x micro-batch must divide it (and, when interleaving, the micro-batches must divide by pp). Pick a GPU count whose data-parallel degree divides the global batch, or change --global-batch.".into()
    } else if count(Reject::HostCapacity) > 0
        && oom + arithmetic + count(Reject::HostCapacity) == r.candidates
    {
        "No layout fits: the ones that fit on the GPUs offload more than the host holds (DRAM or NVMe per node, shared by its GPUs). Offload to NVMe (--offload-device nvme), use more nodes, or shard the states with ZeRO-3.".into()
    } else if count(Reject::MissesDeadline) + count(Reject::OverBudget) == 0 {
        "No layout fits in memory. Try more GPUs, a GPU with more memory, ZeRO-3, recompute, or a smaller micro-batch.".into()
    } else {
        "No layout meets the constraint.".into()
    }
}
