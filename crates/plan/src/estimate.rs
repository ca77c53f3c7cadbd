//! The estimate report: one layout, every number, stable JSON schema (see docs/estimator.md).

use serde::Serialize;

use crate::cost::{Context, Eval, Memory, StepTime};
use crate::explain::{line, Explain, Line, NoTrace, Trace};
use crate::layout::Layout;
use crate::model::ParamCount;
use crate::units::{count, duration};

/// Memory per device, the JSON `memory_per_device_bytes` object: every field of [`Memory`]
/// plus the headroom.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    /// The itemised bytes.
    #[serde(flatten)]
    pub memory: Memory,
    /// capacity − total (negative when it does not fit).
    pub headroom: f64,
}

/// The full answer for one layout. Field names are the stable `--json` schema.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    /// Schema version of this JSON.
    pub schema_version: u32,
    /// The model's name and shape.
    pub model: crate::model::ModelSpec,
    /// Total parameters.
    pub parameters: u64,
    /// Parameters one token uses (= `parameters` for a dense model; MoE: k of E routed experts).
    pub active_parameters: u64,
    /// Parameters by part.
    pub parameter_breakdown: ParamCount,
    /// GPU name.
    pub gpu: String,
    /// GPUs used.
    pub gpus: u64,
    /// GPUs per node.
    pub gpus_per_node: u64,
    /// Precision of the recipe.
    pub precision: crate::recipe::Precision,
    /// FP8 linears and their scaling (`delayed`, `current`, `mx`), or null.
    pub fp8: Option<crate::recipe::Fp8>,
    /// The layout.
    pub layout: Layout,
    /// Memory per device.
    pub memory_per_device_bytes: MemoryReport,
    /// Fits in device memory.
    pub fits: bool,
    /// Model FLOPs per step.
    pub flops_per_step: f64,
    /// Hardware FLOPs per step (with recompute).
    pub hardware_flops_per_step: f64,
    /// Model FLOPs per token.
    pub flops_per_token: f64,
    /// Model FLOPs for the whole run.
    pub total_flops: f64,
    /// Step time split.
    pub step_time_secs: StepTime,
    /// Model FLOPs utilisation.
    pub mfu: f64,
    /// Hardware FLOPs utilisation.
    pub hfu: f64,
    /// Tokens per second, whole cluster.
    pub tokens_per_sec: f64,
    /// Optimizer steps for the token budget.
    pub steps: f64,
    /// Wall-clock days.
    pub training_days: f64,
    /// GPU-hours.
    pub gpu_hours: f64,
    /// USD.
    pub cost_usd: f64,
    /// Price used, USD per GPU-hour.
    pub price_per_gpu_hour: f64,
    /// The run with failures, checkpoints and restarts (see `goodput`).
    pub goodput: crate::goodput::Goodput,
    /// 90% prediction interval of the step time, seconds, when a calibration file is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_time_interval_90: Option<[f64; 2]>,
    /// Every formula, when asked for (`--explain`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub explain: Vec<Line>,
}

/// Current `--json` schema version.
pub const SCHEMA_VERSION: u32 = 3;

/// Builds the report for one (validated) layout.
pub fn estimate(ctx: &Context, layout: &Layout, explain: bool) -> Estimate {
    let mut ex = Explain::default();
    let eval = if explain {
        parameter_lines(ctx, &mut ex);
        ctx.evaluate(layout, &mut ex)
    } else {
        ctx.evaluate(layout, &mut NoTrace)
    };
    let totals = totals(ctx, layout, &eval);
    if explain {
        partition_lines(ctx, layout, &mut ex);
        pipeline_cross_check(ctx, layout, &eval, &mut ex);
        let (steps, secs, gpu_hours, cost) =
            (totals.steps, totals.secs, totals.gpu_hours, totals.cost);
        let r = &ctx.recipe;
        ex.line(|| {
            line(
                "cost",
                "optimizer steps",
                format!(
                    "{} tokens / ({} seqs x {} tokens)",
                    count(r.tokens),
                    r.global_batch,
                    ctx.model.seq_len
                ),
                steps,
                "steps",
                "tokens / tokens per step",
            )
        });
        ex.line(|| {
            line(
                "cost",
                "training time",
                format!(
                    "{steps:.0} steps x {:.4} s = {}",
                    eval.time.total,
                    duration(secs)
                ),
                secs / 86400.0,
                "days",
                "steps x step time",
            )
        });
        ex.line(|| {
            line(
                "cost",
                "GPU-hours",
                format!("{} GPUs x {:.1} h", layout.world(), secs / 3600.0),
                gpu_hours,
                "GPU-h",
                "GPUs x hours",
            )
        });
        ex.line(|| {
            line(
                "cost",
                "cost",
                format!(
                    "{gpu_hours:.0} GPU-h x ${:.2}/GPU-h",
                    ctx.cluster.price_per_gpu_hour
                ),
                cost,
                "USD",
                "price is an assumption unless set with --price-per-gpu-hour",
            )
        });
    }
    Estimate {
        schema_version: SCHEMA_VERSION,
        model: ctx.model.clone(),
        parameters: ctx.model.params().total,
        active_parameters: ctx.model.params().active,
        parameter_breakdown: ctx.model.params(),
        gpu: ctx.cluster.gpu.name.clone(),
        gpus: layout.world(),
        gpus_per_node: ctx.cluster.gpus_per_node,
        precision: ctx.recipe.precision,
        fp8: ctx.recipe.fp8,
        step_time_interval_90: None,
        goodput: {
            let sb = &ctx.recipe.state_bytes;
            let ckpt = ctx.model.params().total as f64 * (sb.weight + sb.master + sb.optimizer);
            let nodes = layout.world().div_ceil(ctx.cluster.gpus_per_node.max(1));
            crate::goodput::goodput(
                &ctx.recipe.failures,
                totals.secs,
                layout.world(),
                nodes,
                ckpt,
            )
        },
        layout: *layout,
        memory_per_device_bytes: MemoryReport {
            memory: eval.memory,
            headroom: eval.memory.capacity - eval.memory.total,
        },
        fits: eval.fits,
        flops_per_step: eval.flops.model_per_step,
        hardware_flops_per_step: eval.flops.hardware_per_step,
        flops_per_token: eval.flops.per_token,
        total_flops: eval.flops.per_token * ctx.recipe.tokens,
        step_time_secs: eval.time,
        mfu: eval.mfu,
        hfu: eval.hfu,
        tokens_per_sec: totals.tokens_per_step / eval.time.total,
        steps: totals.steps,
        training_days: totals.secs / 86400.0,
        gpu_hours: totals.gpu_hours,
        cost_usd: totals.cost,
        price_per_gpu_hour: ctx.cluster.price_per_gpu_hour,
        explain: ex.lines,
    }
}

/// Whole-run totals derived from one step.
#[derive(Debug, Clone, Copy)]
pub struct Totals {
    /// Tokens per optimizer step.
    pub tokens_per_step: f64,
    /// Steps for the token budget.
    pub steps: f64,
    /// Wall-clock seconds.
    pub secs: f64,
    /// GPU-hours.
    pub gpu_hours: f64,
    /// USD.
    pub cost: f64,
}

/// Steps, seconds, GPU-hours and dollars for the recipe's token budget.
pub fn totals(ctx: &Context, layout: &Layout, eval: &Eval) -> Totals {
    let tokens_per_step = ctx.recipe.global_batch as f64 * ctx.model.seq_len as f64;
    let steps = (ctx.recipe.tokens / tokens_per_step).ceil();
    let secs = steps * eval.time.total;
    let gpu_hours = secs / 3600.0 * layout.world() as f64;
    Totals {
        tokens_per_step,
        steps,
        secs,
        gpu_hours,
        cost: gpu_hours * ctx.cluster.price_per_gpu_hour,
    }
}

fn parameter_lines(ctx: &Context, ex: &mut Explain) {
    let m = &ctx.model;
    let p = m.params();
    let (h, f, kv) = (m.hidden, m.ffn_hidden, m.kv_dim());
    ex.line(|| {
        line(
            "parameters",
            "embedding",
            format!(
                "V({}) x h({h}) + positions({}) x h = {}",
                m.vocab, m.learned_positions, p.embedding
            ),
            p.embedding as f64,
            "params",
            "token + learned position tables",
        )
    });
    ex.line(|| line("parameters", "per layer", format!(
        "attention h(h+2*kv) + h^2 = {h}x({h}+2x{kv}) + {h}^2; MLP {} x h x f = {} x {h} x {f}; norms and biases ({}, {}) -> {}",
        m.mlp_matrices(), m.mlp_matrices(), m.norm, m.bias, p.per_layer), p.per_layer as f64, "params", "12h^2 + 13h for GPT (Narayanan et al. 2021 §5.1)"));
    ex.line(|| {
        line(
            "parameters",
            "total",
            format!(
                "{} + {} x {} + final norm {} + head {} = {}",
                p.embedding, m.layers, p.per_layer, p.final_norm, p.head, p.total
            ),
            p.total as f64,
            "params",
            "sum",
        )
    });
    if let (Some(e), Some((ms, mr, me))) = (m.moe, m.moe_layer_params_split()) {
        ex.line(|| line("parameters", "one MoE layer", format!(
            "attention and norms + shared experts {} x h x f_s({}) (tp-sharded {}) + router h x E ({}) + routed experts E({}) x {} x h x f_e({}) = {}; {} of {} layers are MoE",
            m.mlp_matrices(), e.shared_ffn, ms, mr, e.experts, m.mlp_matrices(), e.expert_ffn, me, m.moe_layers(), m.layers),
            (ms + mr + me) as f64, "params", "Shazeer et al. 2017; Fedus et al. 2021 (Switch); DeepSeekMoE shared experts (Dai et al. 2024)"));
        ex.line(|| {
            line(
                "parameters",
                "active parameters per token",
                format!(
                    "total {} - {} MoE layers x (E - k) = {} unused experts x {} = {}",
                    p.total,
                    m.moe_layers(),
                    e.experts - e.top_k,
                    me / e.experts,
                    p.active
                ),
                p.active as f64,
                "params",
                "each token runs its top-k routed experts",
            )
        });
    }
    let sb = ctx.recipe.state_bytes;
    let n = p.total as f64;
    ex.line(|| line("parameters", "classic answer: model states without sharding", format!(
        "{} params x ({} weights + {} grads + {} master + {} optimizer = {} B/param) = {:.1} GB (weights alone {:.1} GB, gradients {:.1} GB)",
        count(n), sb.weight, sb.grad, sb.master, sb.optimizer, sb.total(), n * sb.total() / 1e9, n * sb.weight / 1e9, n * sb.grad / 1e9),
        n * sb.total(), "bytes", "ZeRO paper counts 16 B/param for mixed-precision Adam; Megatron 18 (fp32 grads)"));
}

/// The pipeline partition and why: per-stage predicted times, and what the even split (when
/// there is one) or the balanced one would give instead.
fn partition_lines(ctx: &Context, layout: &Layout, ex: &mut Explain) {
    let stages = layout.pp * layout.vpp;
    if stages < 2 {
        return;
    }
    let c = ctx.stage_costs(layout);
    let layers = ctx.model.layers;
    let stage_secs = |l: &Layout| -> Vec<f64> {
        (0..stages)
            .map(|i| {
                let mut t = l.virtual_stage_layers(layers, i) as f64 * c.layer;
                if i == 0 {
                    t += c.first_extra;
                }
                if i + 1 == stages {
                    t += c.last_extra;
                }
                t
            })
            .collect()
    };
    let mine = stage_secs(layout);
    let slowest = mine.iter().copied().fold(0.0, f64::max);
    let show = |v: &[f64]| {
        v.iter()
            .map(|t| format!("{:.1}", t * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let list = if layout.stage_layers.is_empty() {
        crate::partition::StageLayers::spread(layers, stages).to_string()
    } else {
        layout.stage_layers.to_string()
    };
    // The alternative: the balanced partition for an explicit or even one, the even split (if
    // any) for a balanced one.
    let other = if layout.partition == crate::partition::Partition::Balanced {
        layers.is_multiple_of(stages).then(|| {
            let mut l = *layout;
            l.stage_layers = crate::partition::StageLayers::spread(layers, stages);
            ("the even split", l)
        })
    } else {
        let mut l = *layout;
        l.partition = crate::partition::Partition::Balanced;
        ctx.balance(&mut l);
        Some(("the balanced partition", l))
    };
    let why = match other {
        Some((name, l)) => {
            let alt = stage_secs(&l).into_iter().fold(0.0, f64::max);
            format!(
                "; {name} {} would have its slowest stage at {:.1} ms",
                l.stage_layers,
                alt * 1e3
            )
        }
        None => String::new(),
    };
    ex.line(|| {
        line(
            "time",
            "pipeline partition",
            format!(
                "{} layers per {}stage [{list}]: per micro-batch (fwd+bwd) stage times [{}] ms = layers x {:.2} ms + embedding {:.2} ms on stage 0 + LM head and loss {:.2} ms on stage {}; slowest {:.1} ms{why}",
                layout.partition.name(),
                if layout.vpp > 1 { "virtual " } else { "" },
                show(&mine),
                c.layer * 1e3,
                c.first_extra * 1e3,
                c.last_extra * 1e3,
                stages - 1,
                slowest * 1e3
            ),
            slowest,
            "s",
            "balanced: least slowest stage, then most even (crates/plan/src/partition.rs); the slowest device sets the pace",
        )
    });
}

/// Simulates the schedule lists the runtime executes (crate::schedule) and reports their bubble
/// and activation count beside the closed forms the cost model and planner use.
fn pipeline_cross_check(ctx: &Context, layout: &Layout, eval: &Eval, ex: &mut Explain) {
    let (p, m, v) = (
        layout.pp as u32,
        layout.grad_accum as u32,
        layout.vpp as u32,
    );
    if p < 2 || (p as u64) * (m as u64) * (v as u64) > 2_000_000 {
        return;
    }
    let kind = match ctx.recipe.schedule {
        crate::recipe::Schedule::Gpipe => crate::schedule::Kind::Gpipe,
        crate::recipe::Schedule::OneFOneB => crate::schedule::Kind::OneFOneB,
    };
    let lt = ctx.layer_times(layout);
    let layers = ctx.model.layers as f64 / layout.pp as f64;
    let fwd = layers * (lt.fwd + lt.tp_fwd) / v as f64;
    let bwd = layers * (lt.bwd + lt.recompute + lt.tp_bwd + lt.tp_recompute) / v as f64;
    let ops = crate::schedule::build(kind, p, m, v);
    let sim = crate::schedule::simulate(&ops, m, v, fwd, bwd, 0.0);
    let peak = sim.peak_in_flight.first().copied().unwrap_or(0) as f64 / v as f64;
    ex.line(|| {
        line(
            "time",
            "pipeline schedule simulation (cross-check)",
            format!(
                "{} lists for p={p}, m={m}, v={v} with uniform stages: bubble {:.4} s (cost model {:.4} s, which also counts uneven first/last stages and sends); stage 0 holds {:.2} micro-batches (cost model {:.2})",
                if v > 1 { "interleaved 1f1b".to_string() } else { ctx.recipe.schedule.to_string() }, sim.bubble, eval.time.bubble, peak, eval.memory.microbatches_in_flight
            ),
            sim.bubble,
            "s",
            "event simulation of the per-device instruction lists (crates/plan/src/schedule.rs)",
        )
    });
}
