//! What activation recomputation adds to a micro-batch of the CPU runtime, by counting what
//! `model::step`'s backward runs again (`crates/model/src/step.rs`, `layer.rs`):
//!
//! - full (`Recompute::Full`): before each layer's backward, `layer_forward` of that layer
//!   from its saved input (the embedding and the LM head are not recomputed): its linear
//!   layers (24·bt·c²/tp), attention's two forward products (4·b·t²·c/tp), its forward
//!   elementwise passes (a third of the layer's, the 1:2 forward/backward split `cpu_plan`
//!   uses), and — without weight panels — the packing of the layers' weights for the forward
//!   GEMMs again (two thirds of a weight pass: the session-6 profile in docs/performance.md,
//!   "Weights packed once per step", put 6.0% of a step in packing `wᵀ` for the forward and
//!   2.9% in packing `w` for the input gradients). Its tensor-parallel collectives (the
//!   forward's two per layer) are `cpu_plan`'s.
//! - selective (`Recompute::Selective`): `kernels::attention_probs` before each layer's
//!   attention backward: the score product QKᵀ (2·b·t²·c/tp) and the softmax over the
//!   b·(h/tp)·t² scores, counted as three 4-byte passes (write the scores, read them for the
//!   row maximum and exponentials, write the probabilities).
//!
//! Counted, not fitted. Measured against it (`bench/precision_plan_check.sh`, four quiet runs
//! of sessions 8 and 9, docs/cpu-planner.md, "Step times under bf16-mixed and
//! recomputation"): full recomputation cost +14–28% of the fp32 step (median +22%) where this
//! counts +27–33%, so `cpu_time` charges its seconds at the fitted
//! `CpuCalibration::full_recompute_time_share` (0.74) of the count; selective's +4% is within
//! those runs' noise (−6% to +9%; +3% in all four layouts in session 9's two runs) and is
//! charged whole.

use super::CpuRuntimeDims;
use crate::recipe::Recompute;

/// Work recomputation adds to one micro-batch (zero for `Recompute::None`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RecomputeWork {
    /// Linear-layer FLOPs recomputed (full: the layers' forward).
    pub linear_flops: f64,
    /// Attention score/value FLOPs recomputed.
    pub attention_flops: f64,
    /// Share of the layers' elementwise passes run again.
    pub elementwise_share: f64,
    /// Bytes of the recomputed softmax (selective).
    pub score_bytes: f64,
    /// Share of a pass over the layers' weights packed again when the step keeps no panels.
    pub weight_pass_share: f64,
    /// Kernel calls per layer run again (waking the pool's workers).
    pub calls_per_layer: f64,
}

/// Bytes per attention score of the recomputed softmax (see the module docs).
pub const SOFTMAX_BYTES_PER_SCORE: f64 = 12.0;

/// What `recompute` adds to one micro-batch of (`batch`, `seq`) on `d` (module docs).
pub fn recompute_work(
    d: &CpuRuntimeDims,
    batch: u64,
    seq: u64,
    recompute: Recompute,
) -> RecomputeWork {
    let (c, l, tp) = (d.channels as f64, d.layers as f64, d.tp.max(1) as f64);
    let (b, t) = (batch as f64, seq as f64);
    match recompute {
        Recompute::None => RecomputeWork::default(),
        Recompute::Full => RecomputeWork {
            linear_flops: l * 24.0 * b * t * c * c / tp,
            attention_flops: l * 4.0 * b * t * t * c / tp,
            elementwise_share: 1.0 / 3.0,
            score_bytes: 0.0,
            weight_pass_share: 2.0 / 3.0,
            calls_per_layer: 22.0 / 3.0,
        },
        Recompute::Selective => RecomputeWork {
            linear_flops: 0.0,
            attention_flops: l * 2.0 * b * t * t * c / tp,
            elementwise_share: 0.0,
            score_bytes: l * b * (d.heads / d.tp.max(1)) as f64 * t * t * SOFTMAX_BYTES_PER_SCORE,
            weight_pass_share: 0.0,
            calls_per_layer: 1.0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::super::{layer_params, step_time, step_time_as, CpuCalibration};
    use super::*;
    use crate::recipe::Precision;

    /// `bench train`'s default model (docs/performance.md): L4 H4 C256 T128, vocabulary 8192.
    fn bench_model() -> CpuRuntimeDims {
        CpuRuntimeDims {
            padded_vocab: 8192,
            max_seq_len: 128,
            channels: 256,
            heads: 4,
            layers: 4,
            has_embedding: true,
            has_head: true,
            tp: 1,
        }
    }

    const NONE: Recompute = Recompute::None;

    #[test]
    fn fp32_without_recomputation_is_step_time_bit_for_bit() {
        let k = CpuCalibration::default();
        for (accum, threads, panels) in [(1, 1, true), (4, 2, true), (3, 2, false)] {
            let k = CpuCalibration {
                weight_panels: panels,
                ..k
            };
            let d = bench_model();
            assert_eq!(
                step_time(&d, 2, 128, accum, threads, &k),
                step_time_as(&d, 2, 128, accum, threads, (Precision::Fp32, NONE), &k)
            );
        }
    }

    #[test]
    fn bf16_mixed_is_faster_than_fp32_by_the_measured_ratio() {
        // Quiet, docs/performance.md "Quiet run of the peers, 2026-12-06 07:32–07:38 UTC
        // (session 6)": bench train's default model, batch 8, one micro-batch (no panels),
        // ours bf16 / ours fp32 = 1.73× at 1 thread and 1.79× at 2 (medians of 3 rounds;
        // round 1's tokens/s 8,384 / 4,918 = 1.705× at 1 thread, the rate's fit point).
        // Tolerance 10%: the precision runs' per-round ratios in the quiet reruns moved by up
        // to ±10% around their medians (session 7: 1.54–1.82 against 1.67), and at 2 threads
        // the model has nothing that sets the precisions apart from 1 thread.
        let k = CpuCalibration {
            weight_panels: false,
            ..CpuCalibration::default()
        };
        let d = bench_model();
        for (threads, measured) in [(1, 1.73), (2, 1.79)] {
            let fp32 = step_time(&d, 8, 128, 1, threads, &k);
            let bf16 = step_time_as(&d, 8, 128, 1, threads, (Precision::Bf16Mixed, NONE), &k);
            let r = fp32.total_secs / bf16.total_secs;
            assert!(
                (r / measured - 1.0).abs() < 0.10,
                "{threads} threads: {r:.3}× predicted, {measured}× measured"
            );
            // The step's FLOPs are the same; only their rate and the bytes differ.
            assert_eq!(fp32.matmul_flops, bf16.matmul_flops);
            assert!(bf16.matmul_secs < 0.5 * fp32.matmul_secs);
        }
        // The fit point: 122.1 ms measured at 1 thread (8,384 tokens/s of 1,024 tokens).
        let ms = 1e3 * step_time_as(&d, 8, 128, 1, 1, (Precision::Bf16Mixed, NONE), &k).total_secs;
        assert!((ms / 122.1 - 1.0).abs() < 0.03, "{ms:.1} ms");
    }

    #[test]
    fn mixed_precision_streams_its_working_copy_and_packs_no_panels() {
        // Four micro-batches: fp32 packs the weights once (panels), bf16 in each of them, at
        // half the bytes; AdamW writes the 16-bit copy too; the elementwise passes convert.
        let k = CpuCalibration::default();
        let d = bench_model();
        let p = crate::cpu_runtime::param_count(&d) as f64;
        let one = step_time_as(&d, 2, 128, 1, 1, (Precision::Bf16Mixed, NONE), &k);
        let four = step_time_as(&d, 2, 128, 4, 1, (Precision::Bf16Mixed, NONE), &k);
        let per_micro = one.memory_secs;
        assert!((four.memory_secs - 4.0 * per_micro).abs() < 1e-12);
        let weights = 3.4 * p / 6e9;
        let fp16 = step_time_as(&d, 2, 128, 1, 1, (Precision::Fp16Mixed, NONE), &k);
        assert!((fp16.memory_secs - one.memory_secs).abs() < 1e-15);
        let f32_one = CpuCalibration {
            weight_panels: false,
            ..k
        };
        let fp32 = step_time(&d, 2, 128, 1, 1, &f32_one);
        // The elementwise passes cost 1.4× fp32's (the casts): 4 layers · 140 bytes · bt · c.
        let casts = 0.4 * 4.0 * 140.0 * 256.0 * 256.0 / 6e9;
        assert!(
            (fp32.memory_secs - one.memory_secs - (6.8 * p / 6e9 - weights) + casts).abs() < 1e-12
        );
        assert!((one.optimizer_secs - 16.0 * 38.0 / 36.0 * p / 6e9).abs() < 1e-12);
        // fp16 has no 16-bit matmul kernel: its products run at the f32 rate.
        assert!((fp16.matmul_secs - fp32.matmul_secs).abs() < 1e-15);
    }

    #[test]
    fn full_recomputation_adds_about_a_forward_of_the_layers() {
        // Vocabulary 64: the layers are nearly all of the work, so the recomputed forward is
        // nearly a third of the micro-step (forward : backward = 1 : 2).
        let d = CpuRuntimeDims {
            padded_vocab: 64,
            ..bench_model()
        };
        let (b, t) = (8.0, 128.0);
        for (precision, panels, accum) in [
            (Precision::Fp32, false, 1),
            (Precision::Fp32, true, 4),
            (Precision::Bf16Mixed, false, 2),
        ] {
            // The count itself: the whole of the recomputed work charged.
            let k = CpuCalibration {
                weight_panels: panels,
                full_recompute_time_share: 1.0,
                ..CpuCalibration::default()
            };
            let none = step_time_as(&d, 8, 128, accum, 2, (precision, NONE), &k);
            let full = step_time_as(&d, 8, 128, accum, 2, (precision, Recompute::Full), &k);
            let a = accum as f64;
            // Exactly the layers' forward FLOPs: 4·(24·bt·c² + 4·b·t²·c) per micro-batch.
            let fwd = 4.0 * (24.0 * b * t * 256.0 * 256.0 + 4.0 * b * t * t * 256.0);
            assert!((full.matmul_flops - none.matmul_flops - a * fwd).abs() < 1e-3);
            let micro = none.total_secs - none.optimizer_secs;
            let extra = (full.total_secs - none.total_secs) / (micro / 3.0);
            assert!(
                (0.8..1.05).contains(&extra),
                "{precision:?}: {extra:.3} forwards"
            );
            assert_eq!(full.optimizer_secs, none.optimizer_secs);
            // The default charges the fitted share of it: the FLOPs stay counted.
            let fitted = CpuCalibration {
                full_recompute_time_share: CpuCalibration::default().full_recompute_time_share,
                ..k
            };
            let charged = step_time_as(&d, 8, 128, accum, 2, (precision, Recompute::Full), &fitted);
            assert_eq!(charged.matmul_flops, full.matmul_flops);
            let share =
                (charged.total_secs - none.total_secs) / (full.total_secs - none.total_secs);
            assert!((share - 0.74).abs() < 1e-9, "{precision:?}: {share}");
        }
        // Without panels the recomputed forward packs the layers' weights again (2/3 of a
        // pass), with them it reuses the step's panels.
        let k = CpuCalibration {
            weight_panels: false,
            full_recompute_time_share: 1.0,
            ..CpuCalibration::default()
        };
        let none = step_time(&d, 8, 128, 1, 1, &k);
        let full = step_time_as(&d, 8, 128, 1, 1, (Precision::Fp32, Recompute::Full), &k);
        let elementwise = 4.0 * 140.0 * 1024.0 * 256.0 / 3.0;
        let weights = 2.0 / 3.0 * 6.8 * layer_params(&d);
        assert!(
            (full.memory_secs - none.memory_secs - (elementwise + weights) / 6e9).abs() < 1e-12
        );
        assert_eq!(layer_params(&d), 4.0 * (12.0 * 65536.0 + 13.0 * 256.0));
    }

    #[test]
    fn selective_recomputation_redoes_only_the_attention_scores() {
        let k = CpuCalibration::default();
        let d = bench_model();
        let none = step_time(&d, 8, 128, 1, 1, &k);
        let sel = step_time_as(
            &d,
            8,
            128,
            1,
            1,
            (Precision::Fp32, Recompute::Selective),
            &k,
        );
        let full = step_time_as(&d, 8, 128, 1, 1, (Precision::Fp32, Recompute::Full), &k);
        // QKᵀ: 4 layers · 2·b·t²·c; the softmax over b·h·t² scores, 12 bytes each.
        assert_eq!(
            sel.matmul_flops - none.matmul_flops,
            4.0 * 2.0 * 8.0 * 16384.0 * 256.0
        );
        let scores = 4.0 * 8.0 * 4.0 * 16384.0 * 12.0;
        assert!((sel.memory_secs - none.memory_secs - scores / 6e9).abs() < 1e-12);
        assert!(none.total_secs < sel.total_secs && sel.total_secs < full.total_secs);
        // A tensor-parallel rank recomputes its heads only.
        let tp2 = CpuRuntimeDims { tp: 2, ..d };
        let w = recompute_work(&tp2, 8, 128, Recompute::Selective);
        assert_eq!(w.score_bytes, scores / 2.0);
        assert_eq!(recompute_work(&d, 8, 128, NONE), RecomputeWork::default());
    }
}
