//! `predict` under the model's precision and recomputation: what full recomputation adds to a
//! tensor-parallel rank's collectives, and tests that the layout ranking and the run report
//! follow `CpuModel::precision` and `CpuModel::recompute`.

use super::{sharing, CpuLayout, CpuModel};
use crate::cpu_comm::{tp_comm_secs, tp_ring_phases, CommCalibration};
use crate::cpu_runtime::CpuRuntimeDims;
use crate::recipe::Recompute;

/// Full recomputation runs each layer's forward again in backward, its two tensor-parallel
/// collectives per layer included (`model::step`'s backward calls `layer_forward` with the
/// rank's `TpReduce`): half of the layers' share of `tp_comm_secs` and of the ring phases.
pub(super) fn recomputed_tp_secs(
    m: &CpuModel,
    d: &CpuRuntimeDims,
    l: &CpuLayout,
    oversub: f64,
    link: &CommCalibration,
) -> f64 {
    if m.recompute != Recompute::Full || d.tp <= 1 {
        return 0.0;
    }
    let layers = CpuRuntimeDims {
        has_embedding: false,
        has_head: false,
        ..*d
    };
    0.5 * (tp_comm_secs(&layers, l.batch, d.max_seq_len, 1, l.sp, link)
        + sharing::TP_WAKE_SECS * tp_ring_phases(&layers, 1) * (oversub - 1.0))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{host, layout, model};
    use super::super::*;

    fn with(precision: Precision, recompute: Recompute) -> CpuModel {
        CpuModel {
            precision,
            recompute,
            ..model()
        }
    }

    #[test]
    fn predict_follows_the_precision_and_recomputation() {
        let h = host(2);
        let fp32 = with(Precision::Fp32, Recompute::None);
        let bf16 = with(Precision::Bf16Mixed, Recompute::None);
        let full = with(Precision::Fp32, Recompute::Full);
        for l in [
            layout(1, 1, 1, 8, 1),
            layout(1, 1, 1, 2, 4),
            layout(2, 1, 1, 4, 1),
            layout(1, 2, 1, 2, 4),
            layout(1, 1, 2, 8, 1),
            CpuLayout {
                zero: 3,
                ..layout(2, 1, 1, 4, 1)
            },
        ] {
            let (a, b, f) = (
                predict(&fp32, &l, &h),
                predict(&bf16, &l, &h),
                predict(&full, &l, &h),
            );
            let r = a.step_secs / b.step_secs;
            // Communication and bubbles do not shrink with the compute: a smaller speed-up than
            // one process's 1.7×, but a speed-up.
            assert!((1.2..1.9).contains(&r), "{l:?}: bf16 {r:.2}× fp32");
            // The recomputed forward of the layers (not of the head, which on this vocabulary of
            // 8192 is 40% of the linear work and, in a pipeline, the last stage's most).
            assert!(f.step_secs > a.step_secs * 1.05, "{l:?}");
            assert!(f.step_secs < a.step_secs * 1.4, "{l:?}");
        }
    }

    #[test]
    fn one_process_is_step_time_as_and_tensor_parallel_recomputes_its_collectives() {
        let h = host(2);
        for (p, r) in [
            (Precision::Bf16Mixed, Recompute::None),
            (Precision::Bf16Mixed, Recompute::Full),
            (Precision::Fp32, Recompute::Selective),
            (Precision::Fp32, Recompute::Full),
        ] {
            let m = with(p, r);
            let got = predict(&m, &layout(1, 1, 1, 8, 1), &h);
            let d = stage_dims(&m, 4, 0, 1, 1);
            // One micro-batch: no weight panels, so a recomputed forward packs the weights
            // again.
            let k = CpuCalibration {
                weight_panels: false,
                ..h.compute
            };
            let want = step_time_as(&d, 8, 128, 1, 2, (p, r), &k);
            assert!((got.step_secs - want.total_secs).abs() < 1e-12 * want.total_secs);
            if r == Recompute::Full && p == Precision::Fp32 {
                let reused = step_time_as(&d, 8, 128, 1, 2, (p, r), &h.compute);
                assert!(got.step_secs > reused.total_secs);
            }
        }
        // tp2 on 4 cores: full recomputation adds the layers' forward collectives, half of the
        // layers' tp_comm_secs.
        let h = host(4);
        let l = layout(1, 1, 2, 8, 1);
        let none = predict(&with(Precision::Fp32, Recompute::None), &l, &h);
        let full = predict(&with(Precision::Fp32, Recompute::Full), &l, &h);
        let d = stage_dims(&model(), 4, 0, 1, 2);
        let layers = CpuRuntimeDims {
            has_embedding: false,
            has_head: false,
            ..d
        };
        let extra = 0.5 * tp_comm_secs(&layers, 8, 128, 1, false, &h.tp_link);
        assert!(extra > 0.0);
        assert!((full.tp_comm_secs - none.tp_comm_secs - extra).abs() < 1e-12);
    }

    #[test]
    fn zero3_in_bf16_against_fp32_as_measured() {
        // Held out (not used by any fit): docs/performance.md, "Quiet run of the peers,
        // 2026-12-06 07:32–07:38 UTC (session 6)", bench/fsdp_bench.sh: `--dp 2 --zero 3`, L4 H4
        // C256 T128, vocabulary 32 (padded 64), 4 sequences per rank, 1 thread each: 20,823
        // tokens/s in bf16-mixed against 13,166 in fp32 (round 1), 1.58×; the table's 1.61×.
        let m = |precision| CpuModel {
            padded_vocab: 64,
            ..with(precision, Recompute::None)
        };
        let h = host(2);
        let l = CpuLayout {
            zero: 3,
            ..layout(2, 1, 1, 4, 1)
        };
        let (a, b) = (
            predict(&m(Precision::Fp32), &l, &h),
            predict(&m(Precision::Bf16Mixed), &l, &h),
        );
        let r = a.step_secs / b.step_secs;
        eprintln!(
            "zero3 fp32 {:.1} ms bf16 {:.1} ms ratio {r:.3}",
            1e3 * a.step_secs,
            1e3 * b.step_secs
        );
        assert!((r / 1.58 - 1.0).abs() < 0.15, "{r:.2}×");
    }
}
