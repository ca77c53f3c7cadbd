//! Unit tests of the prediction of one layout (`cpu_plan::predict`).

use super::*;
use crate::cpu_time::{matmul_flops, step_time};

pub(super) fn model() -> CpuModel {
    CpuModel {
        padded_vocab: 8192,
        seq_len: 128,
        channels: 256,
        heads: 4,
        layers: 4,
        precision: crate::recipe::Precision::Fp32,
        recompute: crate::recipe::Recompute::None,
    }
}

pub(super) fn host(cores: u64) -> CpuHost {
    CpuHost {
        cores,
        compute: CpuCalibration::default(),
        link: CommCalibration::tcp(),
        tp_link: CommCalibration::tcp_tensor_parallel(),
        bucket_bytes: 1 << 21,
        overlap: true,
    }
}

pub(crate) fn layout(dp: u64, pp: u64, tp: u64, batch: u64, microbatches: u64) -> CpuLayout {
    CpuLayout {
        dp,
        pp,
        tp,
        batch,
        microbatches,
        zero: 0,
        sp: false,
    }
}

#[test]
fn one_process_is_the_cpu_time_step() {
    let (m, h) = (model(), host(2));
    let p = predict(&m, &layout(1, 1, 1, 8, 2), &h);
    let d = stage_dims(&m, 4, 0, 1, 1);
    let s = step_time(&d, 8, 128, 2, 2, &h.compute);
    assert!((p.step_secs - s.total_secs).abs() < 1e-12 * s.total_secs);
    assert_eq!(p.threads, 2);
    assert_eq!(p.bubble_secs, 0.0);
    // Two micro-batches: the runtime packs the weights into panels once per step and
    // holds them (as train's report and buffers count them).
    assert_eq!(
        p.memory_bytes,
        crate::cpu_runtime::memory(&d, 8, 128).total_bytes()
            + crate::cpu_runtime::weight_panel_bytes(&d)
    );
    let one = predict(&m, &layout(1, 1, 1, 8, 1), &h);
    assert_eq!(
        one.memory_bytes,
        crate::cpu_runtime::memory(&d, 8, 128).total_bytes()
    );
}

#[test]
fn tensor_parallel_rank_does_half_the_layer_work_plus_its_collectives() {
    let (m, h) = (model(), host(4));
    let p = predict(&m, &layout(1, 1, 2, 8, 1), &h);
    // 2 ranks on 4 cores: 2 threads each, no oversubscription.
    assert_eq!(p.threads, 2);
    let d = stage_dims(&m, 4, 0, 1, 2);
    let full = stage_dims(&m, 4, 0, 1, 1);
    assert_eq!(matmul_flops(&d, 8, 128), matmul_flops(&full, 8, 128) / 2.0);
    let s = step_time(&d, 8, 128, 1, 2, &h.compute);
    // A core per rank: the link's time alone, no rendezvous waits.
    let tp = tp_comm_secs(&d, 8, 128, 1, false, &h.tp_link);
    assert!((p.tp_comm_secs - tp).abs() < 1e-15);
    assert!((p.step_secs - (s.total_secs + tp)).abs() < 1e-12);
}

#[test]
fn with_ranks_sharing_cores_the_bubble_is_a_share_of_the_pipeline() {
    // dp2 × pp4 of one micro-batch on 2 cores: with a core per rank the busiest stage
    // would idle (p − 1)/p of its list, longer than the shared makespan itself.
    let l = layout(2, 4, 1, 4, 1);
    let p = predict(&model(), &l, &host(2));
    assert!(p.bubble_secs > 0.5 * p.pipeline_secs, "{p:?}");
    assert!(p.bubble_secs < p.pipeline_secs, "{p:?}");
}

#[test]
fn the_pipeline_bubble_is_the_simulated_one() {
    let (m, h) = (model(), host(2));
    let l = layout(1, 2, 1, 2, 4);
    let p = predict(&m, &l, &h);
    assert_eq!(p.stage_layers.iter().sum::<u64>(), 4);
    // The head makes the last stage heavier: the balanced split gives it fewer layers.
    assert!(p.stage_layers[1] <= p.stage_layers[0]);
    let micro = (0..2)
        .map(|s| {
            let d = stage_dims(&m, p.stage_layers[s], s as u64, 2, 1);
            let t = step_time(&d, 2, 128, 1, 1, &h.compute);
            // 4 micro-batches: the weights are packed once per step, outside them; each
            // micro-batch keeps the residual.
            assert!(h.compute.weight_panels);
            let k = &h.compute;
            t.matmul_secs + t.memory_secs + t.overhead_secs
                - weight_pass_secs(&d, 1, k)
                    * (1.0 - k.panel_bytes_per_param_per_micro / k.weight_bytes_per_param)
        })
        .fold(0.0, f64::max);
    let p2p = h.link.latency_secs
        + (2 * 128 * 256 * 4) as f64 / h.link.bus_bytes_per_sec
        + sharing::P2P_MESSAGE_SECS;
    let sim = simulate(
        &build(Kind::OneFOneB, 2, 4, 1),
        4,
        1,
        micro / 3.0,
        2.0 * micro / 3.0,
        p2p,
    );
    // 2 ranks on 2 cores: no sharing, the dedicated simulation's makespan.
    assert!((p.pipeline_secs - sim.makespan).abs() < 1e-12 * sim.makespan);
    assert!((p.bubble_secs - sim.bubble).abs() < 1e-12 * sim.makespan);
    // 1F1B over 2 stages and 4 micro-batches without transfer time: the bubble is
    // (p − 1)·(forward + backward) = one micro-step; transfers only add to it.
    let free = simulate(
        &build(Kind::OneFOneB, 2, 4, 1),
        4,
        1,
        micro / 3.0,
        2.0 * micro / 3.0,
        0.0,
    );
    assert!((free.bubble - micro).abs() < 1e-9 * micro, "{free:?}");
    assert!((free.makespan - 5.0 * micro).abs() < 1e-9 * micro);
    assert!(sim.bubble > free.bubble);
}

#[test]
fn zero3_is_its_own_memory_and_per_micro_batch_communication() {
    // Twelve layers of vocabulary 32: ZeRO-3 keeps two gather and two gradient buffers of
    // a layer (and embedding-sized ones), so it saves over ZeRO-2 only when the layers
    // outnumber those (at 4 layers and dp 2 the two are within 0.2%; with 8192 rows the
    // embedding-sized buffers outweigh the savings).
    let (m, h) = (
        CpuModel {
            padded_vocab: 64,
            layers: 12,
            ..model()
        },
        host(2),
    );
    let l = |zero, microbatches| CpuLayout {
        zero,
        ..layout(2, 1, 1, 4 / microbatches, microbatches)
    };
    let (z2, z3) = (predict(&m, &l(2, 1), &h), predict(&m, &l(3, 1), &h));
    let d = stage_dims(&m, 12, 0, 1, 1);
    // Memory: the ZeRO-3 formula with the activations of one micro-batch, below ZeRO-2's.
    let want = crate::cpu_runtime::CpuRuntimeMemory {
        activation_bytes: crate::cpu_runtime::activation_bytes_sp(
            &d,
            4,
            128,
            Precision::Fp32,
            Recompute::None,
            1,
            false,
        ),
        ..crate::cpu_runtime::zero3_memory(&d, 4, 128, 2, 0, true)
    };
    assert_eq!(z3.memory_bytes, want.total_bytes());
    assert!(
        z3.memory_bytes < z2.memory_bytes,
        "{} {}",
        z3.memory_bytes,
        z2.memory_bytes
    );
    // AdamW on the rank's half, as ZeRO-2.
    assert!((z3.optimizer_secs - z2.optimizer_secs).abs() < 1e-12);
    // Its gathers repeat in every micro-batch: more micro-batches cost ZeRO-3 more
    // communication than ZeRO-2 (which reduce-scatters per micro-batch too but gathers
    // once per step).
    let (z2m, z3m) = (predict(&m, &l(2, 4), &h), predict(&m, &l(3, 4), &h));
    assert!(z3m.step_secs - z3.step_secs > z2m.step_secs - z2.step_secs);
    // Without weight panels: a further micro-batch pays the whole weight pass.
    assert!(z3m.optimizer_secs < z2m.optimizer_secs);
}
