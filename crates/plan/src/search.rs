//! The planner: enumerate every valid layout, keep those that fit, rank them.
//!
//! For each cluster size N the search walks tp | N (tp dividing heads, KV heads and the FFN),
//! pp | N/tp (pp·vpp dividing layers), dp = N/(tp·pp), then virtual stages, micro-batch, ZeRO
//! stage, recompute policy and sequence parallelism. Rejections are counted by reason with a
//! cheap code (no strings in the loop); [`Reject::describe`] names them for the report.
//! The search is single-threaded and pure; `shard = (i, n)` lets a caller split it across
//! threads (candidate k belongs to shard k mod n) and [`SearchResult::merge`] the parts.

use serde::Serialize;

use crate::cost::{Context, Eval, Flops, StageCosts};
use crate::estimate::totals;
use crate::explain::NoTrace;
use crate::layout::Layout;
use crate::model::ModelSpec;
use crate::partition::{Partition, StageLayers, MAX_STAGES};
use crate::recipe::{Offload, Recompute};

/// What to optimise.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Objective {
    /// Shortest step time (then fewest GPUs).
    Time,
    /// Lowest total cost for the token budget.
    Cost,
    /// Cheapest layout whose training finishes within this many days.
    Deadline(f64),
    /// Fastest layout whose training costs at most this many USD.
    Budget(f64),
    /// Shortest expected wall time with failures, checkpoints and restarts (`goodput.rs`):
    /// more GPUs finish sooner but fail more often.
    Goodput,
}

impl std::fmt::Display for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Objective::Time => f.write_str("fastest step"),
            Objective::Cost => f.write_str("lowest cost"),
            Objective::Deadline(d) => write!(f, "cheapest finishing within {d} days"),
            Objective::Budget(b) => write!(f, "fastest costing at most ${b:.0}"),
            Objective::Goodput => f.write_str("shortest expected time with failures"),
        }
    }
}

/// Why a candidate was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Reject {
    /// Global batch not divisible by dp × micro-batch.
    BatchNotDivisible,
    /// Interleaving needs micro-batches divisible by pp.
    InterleaveMicroBatches,
    /// Out of memory on the first pipeline stage.
    OomFirstStage,
    /// Out of memory on the last pipeline stage.
    OomLastStage,
    /// Out of memory on a pipeline stage between the first and the last.
    OomMiddleStage,
    /// The offloaded states exceed the host DRAM or NVMe per node.
    HostCapacity,
    /// Fits but misses the deadline.
    MissesDeadline,
    /// Fits but costs more than the budget.
    OverBudget,
}

impl Reject {
    /// All reasons, in report order.
    pub const ALL: [Reject; 8] = [
        Reject::OomFirstStage,
        Reject::OomLastStage,
        Reject::OomMiddleStage,
        Reject::HostCapacity,
        Reject::BatchNotDivisible,
        Reject::InterleaveMicroBatches,
        Reject::MissesDeadline,
        Reject::OverBudget,
    ];

    /// Human text for the report.
    pub fn describe(self) -> String {
        match self {
            Reject::BatchNotDivisible => "global batch not divisible by dp x micro-batch".into(),
            Reject::InterleaveMicroBatches => {
                "interleaved schedule needs micro-batches divisible by pp".into()
            }
            Reject::OomFirstStage => "out of memory on pipeline stage 0".into(),
            Reject::OomLastStage => {
                "out of memory on the last pipeline stage (LM head and logits)".into()
            }
            Reject::OomMiddleStage => {
                "out of memory on a middle pipeline stage (more layers than stage 0)".into()
            }
            Reject::HostCapacity => {
                "offloaded states exceed the host's DRAM or NVMe per node".into()
            }
            Reject::MissesDeadline => "fits, but training would miss the deadline".into(),
            Reject::OverBudget => "fits, but training would cost more than the budget".into(),
        }
    }
}

/// The knobs the search may turn.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchSpace {
    /// Cluster sizes to consider (one entry for a fixed cluster).
    pub gpus: Vec<u64>,
    /// Micro-batch sizes to try.
    pub micro_batches: Vec<u64>,
    /// ZeRO stages to try.
    pub zero: Vec<u8>,
    /// Recompute policies to try.
    pub recompute: Vec<Recompute>,
    /// Virtual pipeline stages to try.
    pub vpp: Vec<u64>,
    /// Context-parallel degrees to try (those whose 2·cp chunks divide the sequence).
    pub cp: Vec<u64>,
    /// Expert-parallel degrees to try (MoE models; those dividing the experts and tp·cp·dp).
    pub ep: Vec<u64>,
    /// Offload settings to try (empty: the recipe's). Offloading parameters needs ZeRO-3.
    pub offload: Vec<Offload>,
    /// Try sequence parallelism (when tp > 1).
    pub sequence_parallel: bool,
    /// Largest tensor-parallel degree (default: one node).
    pub max_tp: u64,
    /// Cost the step time even of layouts that do not fit (benchmarks use it to time full
    /// evaluations; the planner leaves it off).
    pub cost_all: bool,
}

impl SearchSpace {
    /// Adds the axes a model calls for: expert parallelism 1, 2, 4, … up to the experts for a
    /// MoE model, and context parallelism 1, 2, 4, 8 for sequences of 8,192 tokens or more
    /// (shorter ones do not need it: the activations of one sequence are small and the ring's
    /// transfers have little attention work to hide behind).
    pub fn with_model_axes(mut self, m: &ModelSpec) -> Self {
        if let Some(moe) = &m.moe {
            self.ep = (0..17)
                .map(|i| 1u64 << i)
                .take_while(|&e| e <= moe.experts)
                .collect();
        }
        if m.seq_len >= 8192 {
            self.cp = vec![1, 2, 4, 8];
        }
        self
    }

    /// The default space for a fixed cluster.
    pub fn for_gpus(gpus: Vec<u64>, max_tp: u64) -> Self {
        SearchSpace {
            gpus,
            micro_batches: vec![1, 2, 4, 8, 16, 32],
            zero: vec![0, 1, 2, 3],
            recompute: vec![Recompute::None, Recompute::Selective, Recompute::Full],
            vpp: vec![1, 2, 3, 4],
            cp: vec![1],
            ep: vec![1],
            offload: Vec::new(),
            sequence_parallel: true,
            max_tp,
            cost_all: false,
        }
    }
}

/// One ranked layout.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Candidate {
    /// The layout.
    pub layout: Layout,
    /// Recompute policy.
    pub recompute: Recompute,
    /// Offload (the recipe's, or what `plan --offload auto` chose).
    pub offload: Offload,
    /// Everything the cost model said.
    pub eval: Eval,
    /// Training days for the token budget.
    pub days: f64,
    /// USD for the token budget.
    pub cost_usd: f64,
    /// Expected days with failures, checkpoints and restarts (`goodput.rs`; infinite when
    /// failures outpace progress).
    pub expected_days: f64,
}

/// The outcome of a search (or of one shard of it).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SearchResult {
    /// Candidate layouts looked at (structurally valid degrees × knobs).
    pub candidates: u64,
    /// Candidates fully costed (memory and time).
    pub evaluated: u64,
    /// Candidates that fit (and meet the deadline, if any).
    pub accepted: u64,
    /// Rejections by reason.
    pub rejected: Vec<(Reject, u64)>,
    /// Best first.
    pub top: Vec<Candidate>,
}

fn key(obj: Objective, c: &Candidate) -> (f64, f64) {
    match obj {
        Objective::Time => (c.eval.time.total, c.layout.world() as f64),
        Objective::Cost | Objective::Deadline(_) => (c.cost_usd, c.days),
        Objective::Budget(_) => (c.days, c.cost_usd),
        Objective::Goodput => (c.expected_days, c.cost_usd),
    }
}

fn insert_top(top: &mut Vec<Candidate>, n: usize, obj: Objective, c: Candidate) {
    let k = key(obj, &c);
    if top.len() == n && top.last().is_some_and(|l| key(obj, l) <= k) {
        return;
    }
    let pos = top.partition_point(|x| key(obj, x) <= k);
    top.insert(pos, c);
    top.truncate(n);
}

impl SearchResult {
    fn bump(&mut self, r: Reject) {
        match self.rejected.iter_mut().find(|(x, _)| *x == r) {
            Some((_, n)) => *n += 1,
            None => self.rejected.push((r, 1)),
        }
    }

    /// Combines shard results.
    pub fn merge(parts: Vec<SearchResult>, obj: Objective, top_n: usize) -> SearchResult {
        let mut out = SearchResult::default();
        for p in parts {
            out.candidates += p.candidates;
            out.evaluated += p.evaluated;
            out.accepted += p.accepted;
            for (r, n) in p.rejected {
                match out.rejected.iter_mut().find(|(x, _)| *x == r) {
                    Some((_, m)) => *m += n,
                    None => out.rejected.push((r, n)),
                }
            }
            for c in p.top {
                insert_top(&mut out.top, top_n, obj, c);
            }
        }
        out.rejected.sort();
        out
    }
}

fn divisors(n: u64) -> Vec<u64> {
    (1..=n).filter(|d| n.is_multiple_of(*d)).collect()
}

/// Structural constraints on (tp, pp, vpp) that do not depend on the batch. Layer counts that
/// pp·vpp does not divide are searched too (balanced partitions); every virtual stage gets at
/// least one layer.
fn degrees_ok(m: &ModelSpec, tp: u64, pp: u64, vpp: u64) -> bool {
    m.heads.is_multiple_of(tp)
        && m.kv_heads.is_multiple_of(tp)
        && m.ffn_hidden.is_multiple_of(tp)
        && pp * vpp <= m.layers
        && pp * vpp <= MAX_STAGES as u64
        && (vpp == 1 || pp > 1)
}

/// Runs the search. `base` supplies model, recipe (its recompute is overridden by the space),
/// calibration and GPU; the cluster size comes from `space.gpus`.
pub fn search(
    base: &Context,
    space: &SearchSpace,
    obj: Objective,
    top_n: usize,
    shard: (u64, u64),
) -> SearchResult {
    let mut res = SearchResult::default();
    let m = &base.model;
    let gb = base.recipe.global_batch;
    let mut k: u64 = 0;
    // With flash attention the attention core is already recomputed inside its backward, so
    // selective recompute equals none: search it once.
    let flash = base.recipe.flash_attention;
    let offloads = if space.offload.is_empty() {
        vec![base.recipe.offload]
    } else {
        space.offload.clone()
    };
    type Ctxs = Vec<(Recompute, Offload, Vec<(Context, Flops)>)>;
    let ctxs: Ctxs = space
        .recompute
        .iter()
        .filter(|&&rc| {
            !(flash && rc == Recompute::Selective && space.recompute.contains(&Recompute::None))
        })
        .flat_map(|&rc| offloads.iter().map(move |&off| (rc, off)))
        .map(|(rc, off)| {
            let per_size = space
                .gpus
                .iter()
                .map(|&n| {
                    let mut c = base.clone();
                    c.recipe.recompute = rc;
                    c.recipe.offload = off;
                    c.cluster.gpus = n;
                    let flops = c.flops(&mut NoTrace);
                    (c, flops)
                })
                .collect();
            (rc, off, per_size)
        })
        .collect();
    // Checkpoint: 16-bit weights, fp32 masters and optimizer states of the whole model (as
    // `estimate` counts it).
    let ckpt_bytes = {
        let sb = &base.recipe.state_bytes;
        m.params().total as f64 * (sb.weight + sb.master + sb.optimizer)
    };
    let mut stage_cost_cache: Vec<Option<StageCosts>> = Vec::new();
    let mut part_cache: Vec<Option<StageLayers>> = Vec::new();
    type PartKey = (u64, u64, u64, usize, usize, bool, u64);
    let mut shared_parts: std::collections::HashMap<PartKey, StageLayers> =
        std::collections::HashMap::new();
    for (gi, &n) in space.gpus.iter().enumerate() {
        for tp in divisors(n) {
            if tp > space.max_tp {
                continue;
            }
            for &cp in &space.cp {
                if cp == 0 || (n / tp) % cp != 0 || (cp > 1 && !m.seq_len.is_multiple_of(2 * cp)) {
                    continue;
                }
                // Stage costs depend on (micro-batch, recompute, sp, ep) for this tp and cp, not on
                // pp, vpp or dp: computed once each, on first use.
                let n_ep = space.ep.len().max(1);
                stage_cost_cache.clear();
                stage_cost_cache.resize(space.micro_batches.len() * ctxs.len() * 2 * n_ep, None);
                for pp in divisors(n / (tp * cp)) {
                    let dp = n / (tp * pp * cp);
                    for &vpp in &space.vpp {
                        if !degrees_ok(m, tp, pp, vpp) {
                            continue;
                        }
                        part_cache.clear();
                        part_cache.resize(stage_cost_cache.len(), None);
                        for (mi, &mb) in space.micro_batches.iter().enumerate() {
                            for &zero in &space.zero {
                                if zero >= 2 && pp > 1 {
                                    continue;
                                }
                                if zero > 0 && dp == 1 {
                                    continue;
                                }
                                for (ri, (rc, off, per_size)) in ctxs.iter().enumerate() {
                                    if off.params && zero < 3 {
                                        continue;
                                    }
                                    let ri = &ri;
                                    let sps: &[bool] = if tp > 1 && space.sequence_parallel {
                                        &[false, true]
                                    } else {
                                        &[false]
                                    };
                                    for &sp in sps {
                                        for (ei, &ep) in space.ep.iter().enumerate() {
                                            let ep_ok = ep == 1
                                                || m.moe.is_some_and(|e| {
                                                    e.experts % ep == 0
                                                        && (tp * cp * dp) % ep == 0
                                                        && (tp == 1 || sp)
                                                });
                                            if !ep_ok {
                                                continue;
                                            }
                                            k += 1;
                                            if k % shard.1 != shard.0 {
                                                continue;
                                            }
                                            res.candidates += 1;
                                            if !gb.is_multiple_of(dp * mb) {
                                                res.bump(Reject::BatchNotDivisible);
                                                continue;
                                            }
                                            let ga = gb / (dp * mb);
                                            if vpp > 1 && !ga.is_multiple_of(pp) {
                                                res.bump(Reject::InterleaveMicroBatches);
                                                continue;
                                            }
                                            let mut layout = Layout {
                                                dp,
                                                tp,
                                                pp,
                                                cp,
                                                ep,
                                                vpp,
                                                sp,
                                                zero,
                                                micro_batch: mb,
                                                grad_accum: ga,
                                                stage_layers: StageLayers::default(),
                                                partition: Partition::Balanced,
                                            };
                                            let (ctx, flops) = &per_size[gi];
                                            if pp * vpp > 1 {
                                                // Balanced partition: depends on (pp, vpp) and the
                                                // cached stage costs, not on dp or ZeRO.
                                                let slot = ((mi * ctxs.len() + ri) * 2
                                                    + usize::from(sp))
                                                    * n_ep
                                                    + ei;
                                                if let Some(part) = part_cache[slot] {
                                                    layout.stage_layers = part;
                                                } else {
                                                    // Stage costs do not depend on the cluster size, so
                                                    // partitions are shared across sizes too.
                                                    let key = (tp, cp, ep, mi, *ri, sp, pp * vpp);
                                                    if let Some(part) = shared_parts.get(&key) {
                                                        layout.stage_layers = *part;
                                                    } else {
                                                        let costs = *stage_cost_cache[slot]
                                                            .get_or_insert_with(|| {
                                                                ctx.stage_costs(&layout)
                                                            });
                                                        ctx.balance_with(&mut layout, &costs);
                                                        shared_parts
                                                            .insert(key, layout.stage_layers);
                                                    }
                                                    part_cache[slot] = Some(layout.stage_layers);
                                                }
                                            } else {
                                                layout.stage_layers =
                                                    StageLayers::spread(m.layers, 1);
                                                layout.partition = Partition::Even;
                                            }
                                            let mem = ctx.memory(&layout, &mut NoTrace);
                                            res.evaluated += 1;
                                            if space.cost_all {
                                                let eval = ctx.evaluate_parts(
                                                    &layout,
                                                    mem,
                                                    *flops,
                                                    &mut NoTrace,
                                                );
                                                std::hint::black_box(eval);
                                            }
                                            if mem.total > mem.capacity {
                                                res.bump(if mem.worst_stage == 0 {
                                                    Reject::OomFirstStage
                                                } else if mem.worst_stage + 1 == pp {
                                                    Reject::OomLastStage
                                                } else {
                                                    Reject::OomMiddleStage
                                                });
                                                continue;
                                            }
                                            if !mem.host_fits() {
                                                res.bump(Reject::HostCapacity);
                                                continue;
                                            }
                                            let eval = ctx.evaluate_parts(
                                                &layout,
                                                mem,
                                                *flops,
                                                &mut NoTrace,
                                            );
                                            let t = totals(ctx, &layout, &eval);
                                            let days = t.secs / 86400.0;
                                            match obj {
                                                Objective::Deadline(d) if days > d => {
                                                    res.bump(Reject::MissesDeadline);
                                                    continue;
                                                }
                                                Objective::Budget(b) if t.cost > b => {
                                                    res.bump(Reject::OverBudget);
                                                    continue;
                                                }
                                                _ => {}
                                            }
                                            res.accepted += 1;
                                            insert_top(
                                                &mut res.top,
                                                top_n,
                                                obj,
                                                Candidate {
                                                    layout,
                                                    recompute: *rc,
                                                    offload: *off,
                                                    eval,
                                                    days,
                                                    cost_usd: t.cost,
                                                    expected_days: crate::goodput::goodput(
                                                        &ctx.recipe.failures,
                                                        t.secs,
                                                        layout.world(),
                                                        layout
                                                            .world()
                                                            .div_ceil(ctx.cluster.gpus_per_node),
                                                        ckpt_bytes,
                                                    )
                                                    .expected_days,
                                                },
                                            );
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    res.rejected.sort();
    res
}
