//! Offload (ZeRO-Offload / ZeRO-Infinity) and the goodput objective against hand-derived cases:
//! the bytes that leave the GPU, the time the transfers and the CPU optimizer add, the ZeRO-3
//! requirement for parameters, the planner finding the offloaded layout when nothing else fits,
//! and the goodput objective choosing fewer GPUs when failures dominate.

use plan::explain::NoTrace;
use plan::recipe::{Offload, OffloadDevice, Optimizer, Precision};
use plan::search::{search, Objective, SearchSpace};
use plan::{gpu_preset, preset, Calibration, ClusterSpec, Context, Layout, LayoutRequest, Recipe};

fn ctx(model: &str, gpus: u64) -> Context {
    Context {
        model: preset(model).unwrap(),
        cluster: ClusterSpec::new(gpu_preset("h100-sxm").unwrap(), gpus, None, None).unwrap(),
        recipe: Recipe::new(1e11, 64, Precision::Bf16Mixed, Optimizer::Adamw),
        calib: Calibration::default(),
    }
}

fn layout(c: &Context, zero: u8) -> Layout {
    LayoutRequest {
        zero: Some(zero),
        ..Default::default()
    }
    .resolve(&c.model, c.cluster.gpus, c.recipe.global_batch)
    .unwrap()
}

const P: f64 = 6_738_415_616.0; // Llama 2 7B

/// Llama 2 7B, dp 8, ZeRO-1, optimizer offloaded to CPU. Leaving the GPU: the gradients
/// (P·2 B, streamed out) and the shard of masters and moments (P·12/8 B). Time: the gradient
/// download (P/8·2 B at 64 GB/s, 26 ms) hides behind a backward of seconds; CPU-Adam moves
/// 2 + 2·4 + 2·8 + 2 = 28 B per parameter of its shard at 76.8 GB/s × 0.8; the updated weights
/// come back (P/8·2 B at 64 GB/s). The GPU's own optimizer step disappears.
#[test]
fn optimizer_offload_moves_states_and_adds_the_cpu_step() {
    let mut c = ctx("llama2-7b", 8);
    let l = layout(&c, 1);
    let plain = c.evaluate(&l, &mut NoTrace);
    c.recipe.offload = Offload::parse("optimizer", None).unwrap();
    let off = c.evaluate(&l, &mut NoTrace);
    let host = P * 2.0 + P * 12.0 / 8.0;
    assert!((off.memory.host_bytes - host).abs() < 1e-6 * host);
    assert!(((plain.memory.total - off.memory.total) - host).abs() < 1e-6 * host);
    assert_eq!(
        (
            off.memory.gradients,
            off.memory.master_weights,
            off.memory.optimizer_states
        ),
        (0.0, 0.0, 0.0)
    );
    let shard = P / 8.0;
    let want = shard * 28.0 / (76.8e9 * 0.8) + shard * 2.0 / 64e9;
    assert!(
        (off.time.offload - want).abs() < 1e-9 * want,
        "{} vs {want}",
        off.time.offload
    );
    assert!(off.time.total > plain.time.total);
    // The GPU optimizer step (memory-bound on HBM) is gone; the step grows by less than the
    // offload time.
    assert!(off.time.total - plain.time.total < off.time.offload);

    // NVMe: the 12 B/param of masters and moments are read and written once per step at
    // 3 GB/s, slower than the CPU step it pipelines with.
    c.recipe.offload.device = OffloadDevice::Nvme;
    let nvme = c.evaluate(&l, &mut NoTrace);
    let want = shard * 24.0 / 3e9 + shard * 2.0 / 64e9;
    assert!((nvme.time.offload - want).abs() < 1e-9 * want);
    assert_eq!(nvme.memory.total, off.memory.total);
}

/// Parameters offloaded (ZeRO-3): the 16-bit weight shard leaves the GPU (P·2/8 B more on the
/// host) and every gather first fetches it over the host link, so the step gets slower.
#[test]
fn param_offload_needs_zero3_and_costs_gather_time() {
    let mut c = ctx("llama2-7b", 8);
    let l3 = layout(&c, 3);
    let opt_only = {
        c.recipe.offload = Offload::parse("optimizer", None).unwrap();
        c.evaluate(&l3, &mut NoTrace)
    };
    c.recipe.offload = Offload::parse("both", None).unwrap();
    let both = c.evaluate(&l3, &mut NoTrace);
    let w = P * 2.0 / 8.0;
    assert!(((both.memory.host_bytes - opt_only.memory.host_bytes) - w).abs() < 1e-6 * w);
    assert_eq!(both.memory.weights, 0.0);
    assert!(both.time.dp_comm > opt_only.time.dp_comm);
    let e = c
        .recipe
        .check_layout(&layout(&c, 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs ZeRO-3 (--zero 3)"), "{e}");
    assert!(c.recipe.check_layout(&l3).is_ok());
    let e = Offload::parse("gpu", None).unwrap_err().to_string();
    assert!(e.contains("--offload") && e.contains("optimizer"), "{e}");
    let e = Offload::parse("optimizer", Some("tape"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--offload-device"), "{e}");
}

/// Llama 2 13B on one H100: 13B parameters × 16 B do not fit in 80 GB in any layout, so
/// without offload nothing is accepted; with the optimizer offloaded (26 GB of weights left on
/// the GPU) the planner finds layouts, and every accepted one offloads.
#[test]
fn planner_offloads_when_nothing_else_fits() {
    let c = ctx("llama2-13b", 1);
    let mut space = SearchSpace::for_gpus(vec![1], 8);
    let plain = search(&c, &space, Objective::Time, 5, (0, 1));
    assert_eq!(plain.accepted, 0);
    space.offload = vec![
        Offload::default(),
        Offload::parse("optimizer", None).unwrap(),
    ];
    let r = search(&c, &space, Objective::Time, 5, (0, 1));
    assert!(r.accepted > 0);
    assert!(r.top.iter().all(|t| t.offload.optimizer));
}

/// `Objective::Goodput` ranks by expected days with failures: with one failure per 50 GPU-hours
/// and 10-minute restarts, 256 GPUs fail every ~12 minutes and barely progress, so the goodput
/// plan uses fewer GPUs than the fastest-step plan, and its expected days are the shorter.
#[test]
fn goodput_objective_trades_speed_for_fewer_failures() {
    let mut c = ctx("llama2-7b", 8);
    c.recipe.global_batch = 256;
    c.recipe.failures.failures_per_gpu_hour = 1.0 / 50.0;
    let space = SearchSpace::for_gpus((1..=32).map(|k| 8 * k).collect(), 8);
    let fast = search(&c, &space, Objective::Time, 1, (0, 1)).top[0];
    let good = search(&c, &space, Objective::Goodput, 1, (0, 1)).top[0];
    assert!(
        good.layout.world() < fast.layout.world(),
        "{} vs {}",
        good.layout.world(),
        fast.layout.world()
    );
    assert!(good.expected_days < fast.expected_days);
    assert!(good.eval.time.total > fast.eval.time.total);
}

/// Offloaded states must fit in the host. GPT-3 175B (P parameters), ZeRO-3 over dp 8, weights
/// and optimizer offloaded: each GPU's share on the host is (2 B gradients + 4 master + 8
/// moments + 2 weights) · P/8 = 2·P ≈ 349 GB, more than a DGX H100's 2 TB of DRAM ÷ 8 GPUs =
/// 250 GB, so the layout does not fit although the GPU holds only ~14 GB. To NVMe (8 × 3.84 TB
/// = 30.72 TB ÷ 8 = 3.84 TB per GPU) it fits; on 16 GPUs (two nodes) the share halves to
/// P ≈ 175 GB and CPU offload fits too.
#[test]
fn offload_must_fit_in_the_hosts_dram_or_nvme() {
    let run = |gpus: u64, device: Option<&str>| {
        let mut c = ctx("gpt3-175b", gpus);
        c.recipe.recompute = plan::recipe::Recompute::Full;
        c.recipe.offload = Offload::parse("both", device).unwrap();
        let l = LayoutRequest {
            zero: Some(3),
            micro_batch: Some(1),
            ..Default::default()
        }
        .resolve(&c.model, gpus, c.recipe.global_batch)
        .unwrap();
        (c.model.params().total as f64, c.evaluate(&l, &mut NoTrace))
    };
    let (p, cpu8) = run(8, None);
    assert!((cpu8.memory.host_bytes - 2.0 * p).abs() < 1e-6 * p);
    assert_eq!(cpu8.memory.host_capacity, 2e12 / 8.0);
    assert!(cpu8.memory.total <= cpu8.memory.capacity);
    assert!(!cpu8.memory.host_fits() && !cpu8.fits);
    let (_, nvme8) = run(8, Some("nvme"));
    assert_eq!(nvme8.memory.host_capacity, 30.72e12 / 8.0);
    assert!(nvme8.memory.host_fits() && nvme8.fits);
    let (_, cpu16) = run(16, None);
    assert!((cpu16.memory.host_bytes - p).abs() < 1e-6 * p);
    assert!(cpu16.memory.host_fits() && cpu16.fits);
    // Without offload there is nothing to check: the capacity is 0 and does not reject.
    let mut c = ctx("llama2-7b", 8);
    let plain = c.evaluate(&layout(&c, 1), &mut NoTrace);
    assert_eq!(plain.memory.host_capacity, 0.0);
    assert!(plain.memory.host_fits());
    // A GPU spec without host figures (0 = unknown) is not checked.
    c.cluster.gpu.host_mem_per_node_bytes = 0.0;
    c.recipe.offload = Offload::parse("optimizer", None).unwrap();
    let unknown = c.evaluate(&layout(&c, 1), &mut NoTrace);
    assert!(unknown.memory.host_bytes > 0.0 && unknown.memory.host_fits());
}

/// The planner drops layouts whose offloaded states overflow the host and counts them: GPT-3
/// 175B on one DGX H100 with weights and optimizer offloaded to CPU finds nothing (each GPU's
/// share is at least 2·P/8 ≈ 349 GB of 250 GB), to NVMe it does.
#[test]
fn planner_drops_layouts_that_overflow_the_host() {
    let mut c = ctx("gpt3-175b", 8);
    let mut space = SearchSpace::for_gpus(vec![8], 8);
    space.offload = vec![Offload::parse("both", None).unwrap()];
    let r = search(&c, &space, Objective::Time, 5, (0, 1));
    assert_eq!(r.accepted, 0);
    let host = r
        .rejected
        .iter()
        .find(|(k, _)| *k == plan::search::Reject::HostCapacity)
        .map_or(0, |(_, n)| *n);
    assert!(host > 0, "{:?}", r.rejected);
    c.recipe.offload = Offload::parse("both", Some("nvme")).unwrap();
    space.offload = vec![Offload::parse("both", Some("nvme")).unwrap()];
    let r = search(&c, &space, Objective::Time, 5, (0, 1));
    assert!(r.accepted > 0, "{:?}", r.rejected);
}
