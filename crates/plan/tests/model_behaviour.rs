//! Behavioural checks of the cost model and the search: directions that must hold whatever the
//! calibration (more sharding → less memory, recompute → less activation memory and more FLOPs,
//! every planner answer is a layout `Layout::validate` accepts).

use plan::explain::NoTrace;
use plan::recipe::{Optimizer, Precision, Recompute};
use plan::search::{search, Objective, SearchSpace};
use plan::{gpu_preset, preset, Calibration, ClusterSpec, Context, Layout, Recipe};

fn ctx(model: &str, gpus: u64, precision: Precision) -> Context {
    let m = preset(model).unwrap();
    let cluster = ClusterSpec::new(gpu_preset("a100-80gb").unwrap(), gpus, None, None).unwrap();
    Context {
        model: m,
        cluster,
        recipe: Recipe::new(1e11, 64, precision, Optimizer::Adamw),
        calib: Calibration::default(),
    }
}

fn layout(dp: u64, tp: u64, pp: u64, zero: u8, mb: u64, gb: u64) -> Layout {
    Layout {
        dp,
        tp,
        pp,
        cp: 1,
        ep: 1,
        vpp: 1,
        sp: false,
        zero,
        micro_batch: mb,
        grad_accum: gb / (dp * mb),
        // Empty: the even split of whatever model the layout is costed for.
        stage_layers: plan::StageLayers::default(),
        partition: plan::Partition::Even,
    }
}

#[test]
fn classic_answers_fp32_and_mixed() {
    // Any model: fp32 weights are 4 B/param and gradients 4 B/param; mixed-precision Adam is
    // 16 B/param of model states (ZeRO paper's K = 12 plus 2 + 2).
    let c = ctx("llama2-7b", 1, Precision::Fp32);
    let p = c.model.params().total as f64;
    let m = c.memory(&layout(1, 1, 1, 0, 1, 64), &mut NoTrace);
    assert_eq!(m.weights, 4.0 * p);
    assert_eq!(m.gradients, 4.0 * p);
    assert_eq!(m.master_weights, 0.0);
    let c = ctx("llama2-7b", 1, Precision::Bf16Mixed);
    let m = c.memory(&layout(1, 1, 1, 0, 1, 64), &mut NoTrace);
    assert_eq!(
        m.weights + m.gradients + m.master_weights + m.optimizer_states,
        16.0 * p
    );
}

#[test]
fn zero_stages_shrink_memory_monotonically() {
    let c = ctx("llama2-13b", 64, Precision::Bf16Mixed);
    let totals: Vec<f64> = (0..=3)
        .map(|z| c.memory(&layout(64, 1, 1, z, 1, 64), &mut NoTrace))
        .map(|m| m.weights + m.gradients + m.master_weights + m.optimizer_states)
        .collect();
    assert!(totals.windows(2).all(|w| w[1] < w[0]), "{totals:?}");
}

#[test]
fn recompute_trades_memory_for_flops() {
    let mut c = ctx("megatron-22b", 8, Precision::Bf16Mixed);
    c.recipe.flash_attention = false;
    let l = layout(1, 8, 1, 0, 4, 64);
    let mut acts = Vec::new();
    let mut flops = Vec::new();
    for r in [Recompute::None, Recompute::Selective, Recompute::Full] {
        c.recipe.recompute = r;
        let e = c.evaluate(&l, &mut NoTrace);
        acts.push(e.memory.activations);
        flops.push(e.flops.hardware_per_step);
    }
    assert!(acts[0] > acts[1] && acts[1] > acts[2], "{acts:?}");
    assert!(flops[0] < flops[1] && flops[1] < flops[2], "{flops:?}");
    // Korthikanti et al. 2022 eq. (no recompute, no SP, tp t): sbh(10 + 24/t + 5as/(ht)) bytes.
    c.recipe.recompute = Recompute::None;
    c.recipe.dropout = true;
    let (s, b, h, a, t) = (2048.0, 4.0, 6144.0, 64.0, 8.0);
    let paper = s * b * h * (10.0 + 24.0 / t + 5.0 * a * s / (h * t));
    let ours = plan::cost::layer_activation_bytes(&c.model, &c.recipe, &l, Recompute::None);
    assert!((ours - paper).abs() / paper < 1e-9, "{ours} vs {paper}");
    // With SP and selective recompute: 34 sbh / t.
    let l_sp = Layout { sp: true, ..l };
    let ours = plan::cost::layer_activation_bytes(&c.model, &c.recipe, &l_sp, Recompute::Selective);
    assert!((ours - 34.0 * s * b * h / t).abs() < 1.0, "{ours}");
}

#[test]
fn tensor_and_pipeline_parallel_shard_weights() {
    let c = ctx("llama2-70b", 64, Precision::Bf16Mixed);
    let w = |l: Layout| c.memory(&l, &mut NoTrace).weights;
    let base = w(layout(64, 1, 1, 0, 1, 64));
    assert!(w(layout(8, 8, 1, 0, 1, 64)) < base / 7.0);
    assert!(w(layout(8, 1, 8, 0, 1, 64)) < base / 7.0);
}

#[test]
fn more_gpus_train_faster_but_not_cheaper_per_token() {
    let a = ctx("megatron-7.5b", 8, Precision::Bf16Mixed);
    let b = ctx("megatron-7.5b", 64, Precision::Bf16Mixed);
    let ta = a
        .evaluate(&layout(8, 1, 1, 1, 1, 64), &mut NoTrace)
        .time
        .total;
    let tb = b
        .evaluate(&layout(64, 1, 1, 1, 1, 64), &mut NoTrace)
        .time
        .total;
    assert!(tb < ta, "{tb} vs {ta}");
    assert!(
        tb * 64.0 >= ta * 8.0 * 0.999,
        "scaling cannot be superlinear: {tb} x 64 vs {ta} x 8"
    );
}

#[test]
fn every_planner_answer_is_a_valid_layout_and_sorted() {
    let c = ctx("llama2-13b", 32, Precision::Bf16Mixed);
    let space = SearchSpace::for_gpus(vec![32], 8);
    let r = search(&c, &space, Objective::Time, 50, (0, 1));
    assert!(r.accepted > 0 && r.candidates > r.accepted);
    for cand in &r.top {
        cand.layout.validate(&c.model, 32, 64).unwrap();
        assert!(cand.eval.fits);
    }
    assert!(r
        .top
        .windows(2)
        .all(|w| w[0].eval.time.total <= w[1].eval.time.total));
    // Sharding the search changes nothing.
    let parts = (0..3)
        .map(|i| search(&c, &space, Objective::Time, 50, (i, 3)))
        .collect();
    let merged = plan::search::SearchResult::merge(parts, Objective::Time, 50);
    assert_eq!(
        (merged.candidates, merged.accepted),
        (r.candidates, r.accepted)
    );
    assert_eq!(
        merged.top.first().map(|c| c.layout),
        r.top.first().map(|c| c.layout)
    );
    let rejected: u64 = r.rejected.iter().map(|(_, n)| n).sum();
    assert_eq!(rejected + r.accepted, r.candidates);
}

#[test]
fn deadline_objective_returns_the_cheapest_on_time() {
    let c = ctx("megatron-7.5b", 8, Precision::Bf16Mixed);
    let space = SearchSpace::for_gpus(vec![8, 16, 32, 64, 128], 8);
    let r = search(&c, &space, Objective::Deadline(30.0), 5, (0, 1));
    assert!(!r.top.is_empty());
    assert!(r.top.iter().all(|x| x.days <= 30.0));
    assert!(r.top.windows(2).all(|w| w[0].cost_usd <= w[1].cost_usd));
}

/// An explicit uneven partition, costed by hand from the per-layer and end-stage costs: the
/// slowest device sets the pace, the others add fill and drain, and the memory is that of the
/// device with the largest total.
#[test]
fn uneven_stages_cost_the_slowest_device() {
    let c = ctx("llama2-7b", 2, Precision::Bf16Mixed);
    let mut l = layout(1, 1, 2, 0, 1, 64);
    l.stage_layers = plan::StageLayers::from_counts(&[12, 20]).unwrap();
    l.partition = plan::Partition::Explicit;
    l.validate(&c.model, 2, 64).unwrap();
    let ev = c.evaluate(&l, &mut NoTrace);
    let sc = c.stage_costs(&l);
    // Device 1: 20 layers + LM head; device 0: 12 layers + embedding. Both add the same sends.
    let (t0, t1) = (
        12.0 * sc.layer + sc.first_extra,
        20.0 * sc.layer + sc.last_extra,
    );
    assert!(t1 > t0);
    let p2p = ev.time.pp_comm / 64.0;
    let per_mb = ev.time.compute / 64.0 + ev.time.tp_comm / 64.0;
    assert!((per_mb - t1).abs() / t1 < 1e-12, "{per_mb} vs {t1}");
    // Bubble (Σ t_d − t_max) / v = t0 + p2p.
    let bubble = t0 + p2p;
    assert!((ev.time.bubble - bubble).abs() / bubble < 1e-12);
    // Memory: device 0 keeps 2 micro-batches of 12 layers, device 1 one of 20 plus the head and
    // logits; parameters 12 vs 20 layers plus their embedding/head shards.
    let lt = plan::cost::layer_activation_bytes(&c.model, &c.recipe, &l, c.recipe.recompute);
    assert_eq!(ev.memory.worst_stage, 1);
    let per_layer = c.model.params().per_layer as f64;
    let head = c.model.params().head as f64 + c.model.params().final_norm as f64;
    assert!((ev.memory.params_on_device - (20.0 * per_layer + head)).abs() < 1.0);
    assert!(ev.memory.activations >= 20.0 * lt);
    // The balanced default puts no more layers on the head's stage and is faster.
    let mut b = l;
    b.partition = plan::Partition::Balanced;
    c.balance(&mut b);
    assert_eq!(b.stage_layers.total(), 32);
    assert!(b.stage_layers.as_slice()[1] <= b.stage_layers.as_slice()[0]);
    let eb = c.evaluate(&b, &mut NoTrace);
    assert!(eb.time.total < ev.time.total);
}

/// Layer counts pp does not divide are planned (balanced), not refused.
#[test]
fn planner_searches_layer_counts_pp_does_not_divide() {
    // llama2-7b has 32 layers; 24 GPUs allow pp = 3 (32 / 3 is not whole).
    let mut c = ctx("llama2-7b", 24, Precision::Bf16Mixed);
    c.recipe.global_batch = 48;
    let space = SearchSpace::for_gpus(vec![24], 8);
    let r = search(&c, &space, Objective::Time, 100_000, (0, 1));
    let uneven: Vec<_> = r.top.iter().filter(|x| x.layout.pp == 3).collect();
    assert!(!uneven.is_empty());
    for x in uneven {
        x.layout.validate(&c.model, 24, 48).unwrap();
        assert_eq!(x.layout.stage_layers.total(), 32);
    }
}

/// Llama 3 405B (126 layers) on 16 pipeline stages: Meta's run took one layer off the first and
/// the last stage (Dubey et al. 2024, "The Llama 3 Herd of Models", §3.3.2); the balanced
/// partition, counting the embedding and the 128K-vocabulary LM head as stage work, is the same.
#[test]
fn balanced_partition_reproduces_llama3_405b_pipeline() {
    let m = preset("llama3-405b").unwrap();
    let cluster = ClusterSpec::new(gpu_preset("h100-sxm").unwrap(), 8192, None, None).unwrap();
    let c = Context {
        model: m,
        cluster,
        recipe: Recipe::new(1e12, 2048, Precision::Bf16Mixed, Optimizer::Adamw),
        calib: Calibration::default(),
    };
    let mut l = layout(64, 8, 16, 1, 1, 2048);
    l.partition = plan::Partition::Balanced;
    c.balance(&mut l);
    let mut want = [8u16; 16];
    want[0] = 7;
    want[15] = 7;
    assert_eq!(l.stage_layers.as_slice(), &want[..]);
    l.validate(&c.model, 8192, 2048).unwrap();
}

/// ZeRO-3 gathers the weights for the forward and the backward of every micro-batch, so its
/// data-parallel time grows with accumulation; keeping the gathered weights gathers once per step
/// and costs the full weights in memory. Hand-derived: one all-gather of P·2 bytes over n = 64
/// ranks, 8 of them per node, is (n−1)/n · 2P / bw + (n−1)·α with the multi-node bus bandwidth
/// bw = min(8 · network bw · 0.8, NVLink bw · 0.77) (one NCCL ring channel per NIC).
#[test]
fn zero3_gathers_weights_every_micro_batch_unless_kept() {
    let mut c = ctx("megatron-7.5b", 64, Precision::Bf16Mixed);
    c.recipe.overlap_grad_reduce = false;
    let g = c.cluster.gpu.clone();
    let run = |c: &mut Context, ga: u64, keep: bool| {
        c.recipe.zero3_keep_weights = keep;
        c.recipe.global_batch = 64 * ga;
        c.evaluate(&layout(64, 1, 1, 3, 1, 64 * ga), &mut NoTrace)
    };
    let e1 = run(&mut c, 1, false);
    let e4 = run(&mut c, 4, false);
    let k4 = run(&mut c, 4, true);
    let p = e1.memory.params_on_device;
    let n = 64.0;
    let bw = (8.0 * g.network_bw * c.calib.net_eff).min(g.intra_node_bw * c.calib.intra_eff);
    let ag = (n - 1.0) / n * 2.0 * p / bw + (n - 1.0) * g.network_latency;
    // 8 gathers instead of 2: six more.
    let grown = e4.time.dp_comm - e1.time.dp_comm;
    assert!(
        (grown - 6.0 * ag).abs() / (6.0 * ag) < 1e-9,
        "{grown} vs {}",
        6.0 * ag
    );
    // Kept: one gather per step, seven fewer than re-gathering.
    let saved = e4.time.dp_comm - k4.time.dp_comm;
    assert!(
        (saved - 7.0 * ag).abs() / (7.0 * ag) < 1e-9,
        "{saved} vs {}",
        7.0 * ag
    );
    assert!(k4.time.total < e4.time.total);
    // ... at the price of the full weights resident: 2 B/param more (less the shard's share).
    let extra = k4.memory.weights - e4.memory.weights;
    assert!((extra - 2.0 * p).abs() < 1.0, "{extra} vs {}", 2.0 * p);
    // With overlap on, the gathers hide behind compute but never below one layer's share each.
    c.recipe.overlap_grad_reduce = true;
    let o4 = run(&mut c, 4, false);
    assert!(o4.time.dp_exposed >= 8.0 * ag / c.model.layers as f64 * 0.999);
    assert!(o4.time.dp_exposed <= e4.time.dp_exposed);
}
