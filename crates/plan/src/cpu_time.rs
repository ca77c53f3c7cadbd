//! Step time of the scaletrain CPU runtime (`crates/model` on `crates/kernels`): a roofline-style
//! sum of four parts, pure functions over plain numbers, with constants measured on the
//! development machine (2-core AMD EPYC, AVX2 + FMA) by `scaletrain bench train --json` and
//! `scaletrain train` runs (see `docs/training.md`, "Predicted versus measured").
//!
//! Legend: b = micro-batch, t = sequence, c = channels, L = layers, vp = padded vocabulary,
//! bt = b·t, P = parameters, n = threads, a = micro-batches per optimizer step,
//! nₑ = 1 + (n − 1) · extra_thread_efficiency (effective threads), tp = tensor-parallel degree,
//! vₕ = vp/tp on the stage holding the LM head, 0 on the other pipeline stages.
//!
//! ```text
//! matmul    = a · (3 · (L · 24·bt·c²/tp + 2·bt·c·vₕ) + L · 12·b·t²·c/tp) / (nₑ · matmul_flops_per_thread)
//!             (linear layers: forward 2·m·k·n, backward twice that; attention's score and value
//!              products on the full t×t square, forward 2 gemms, backward 4: Kaplan et al. 2020
//!              count the same terms)
//! memory    = a · (L · elementwise_bytes_per_token_channel · bt·c · (10 + 24/tp)/34 + 16·bt·vₕ
//!                  ) + w · weight_bytes_per_param · P) / (nₑ · bandwidth)
//!             (w = a without the runtime's weight panels; with them, packed once per step,
//!              w·weight_bytes_per_param = weight_bytes_per_param + (a − 1)·panel_bytes_per_param_per_micro)
//!             (layernorm, GELU, residuals, softmax: streamed f32 passes, the replicated 10 of
//!              Korthikanti et al.'s 34 activation units whole on a tensor-parallel rank, the other
//!              24 split; sequence parallelism splits all, see `cpu_plan`; cross-entropy reads and
//!              writes the logits twice; every micro-batch packs the weights again for its
//!              forward and input-gradient GEMMs and accumulates into the weight gradient)
//! optimizer = optimizer_bytes_per_param · P / (nₑ · bandwidth)
//!             (AdamW reads p, g, m, v and writes p, m, v = 28 bytes, the gradient norm reads g
//!              and zeroing writes it: 8 more, 36 by count; measured 16, see below)
//! overhead  = a · (L · 22 + 12) · (n − 1) · spawn_secs   (waking the kernel pool's workers per
//!              call; the calling thread is one of the n, so one thread wakes nothing)
//! ```
//!
//! That is fp32 without recomputation ([`step_time`]). [`step_time_as`] follows the run's
//! precision and recomputation:
//!
//! ```text
//! bf16-mixed  matmul: the linear layers and head (3·linear_fwd) at bf16_matmul_flops_per_thread,
//!             attention at matmul_flops_per_thread; no weight panels, every micro-batch packs
//!             the 16-bit working copy (mixed_weight_bytes_per_param); AdamW at
//!             mixed_optimizer_bytes_per_param (it writes the copy too); cross-entropy bytes
//!             as fp32, the elementwise passes × mixed_elementwise_factor (1.4, profiled: the
//!             casts)
//! fp16-mixed  the same bytes, the matmuls at the f32 rate (no fp16 kernel: f32 panels)
//! recompute   + a · modes::recompute_work per micro-batch, its seconds × full_recompute_time_share
//!             (0.74, fitted) for full recomputation: full = the layers' forward again
//!             (24·bt·c²/tp + 4·b·t²·c/tp FLOPs, ⅓ of their elementwise passes, ⅔ of a pass
//!             over their weights without panels, ⅓ of their kernel calls); selective = QKᵀ
//!             (2·b·t²·c/tp) and the softmax (12 bytes per score)
//! ```
//!
//! The constants are per thread so the model extrapolates to other thread counts. They were
//! fitted (least squares on log time, grid search over matmul rate, bandwidth, elementwise bytes
//! and the second thread's share) to the median step (steps 4–14) of `scaletrain train` runs of
//! thirteen configs on the development machine while it was quiet (2026-12-06 02:00 UTC, load
//! average 1.0, 2-core AMD Zen 5 VM, the AVX-512F f32 matmul kernel of `crates/kernels`),
//! vocabulary 32:
//!
//! ```text
//! L  c    t    b   threads  measured ms  predicted ms
//! 2  128  64   16     2         12.0         13.5
//! 2  64   64   16     2          6.33         4.90
//! 1  32   16   8      2          0.31         0.34
//! 4  256  128  8      2         83.4         88.2
//! 3  192  64   16     2         37.2         39.2
//! 4  128  128  8      2         30.0         27.8
//! 2  128  64   16     1         20.1         19.9
//! 2  64   64   16     1          8.22         6.92
//! 1  32   16   8      1          0.26         0.26
//! 4  256  128  8      1        127.9        131.6
//! 3  192  64   16     1         57.3         58.3
//! 4  128  128  8      1         43.1         41.0
//! 2  128  64   8      1         10.2         11.2     (a rank of the data-parallel default)
//! ```
//!
//! RMS error of log time 10.6 %, largest 26 % (the narrowest model, whose elementwise share is
//! largest). A second thread adds half a thread (`extra_thread_efficiency`; 128 → 83 ms on the
//! largest config): the AVX-512 kernels leave less for the second vCPU than the earlier AVX2
//! ones did (0.9 in the 2026-11-29 fit, with matmul at 92 GFLOP/s per thread on the `gemm`
//! crate). The elementwise term is not separable from the matmul term in these data (its
//! constant is a fitted ~35 f32 passes, not a count). A machine loaded by other work measured
//! up to ~2× slower steps.
//!
//! The two per-parameter constants are not identifiable from one-micro-batch, one-process runs
//! (they scale with the matmul work there). They were fitted (weighted least squares, with the
//! constants above held) to the fifteen layouts of `bench/cpu_plan_check.sh` on the same quiet
//! machine (2026-12-06 02:03 UTC, docs/cpu-planner-measurements.md): micro-batch count at equal tokens
//! separates the weight passes (dp2 b1×4 85.7 ms, b2×2 77.1, b4×1 75.1: ~3.5 ms per extra
//! micro-batch of 3.2 M parameters = 6.8 bytes per parameter), ZeRO's sharded AdamW separates
//! the optimizer (ZeRO-1/2 saved 2–12 ms where 36 bytes per parameter predicted 10–39 ms: 16
//! bytes, i.e. AdamW streams at ~2.2× the elementwise kernels' rate). With them the table above
//! is still within 26 % (a one-micro-batch step moves 1–6 % between the two terms).

use crate::cpu_runtime::CpuRuntimeDims;
use crate::recipe::{Precision, Recompute};

/// Measured constants of the CPU runtime on one machine.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuCalibration {
    /// Sustained matmul FLOP/s of one thread on transformer shapes.
    pub matmul_flops_per_thread: f64,
    /// Streamed bytes per second of one thread for the elementwise kernels and AdamW.
    pub bandwidth_bytes_per_thread: f64,
    /// f32 bytes moved per (token, channel) per layer by the elementwise kernels, forward and
    /// backward (layernorm ×2, GELU, residual adds, bias gradients, attention softmax rows).
    pub elementwise_bytes_per_token_channel: f64,
    /// Cost of handing one kernel call's chunk to one pool worker (waking it).
    pub spawn_secs: f64,
    /// Throughput each thread beyond the first adds, as a fraction of the first's.
    pub extra_thread_efficiency: f64,
    /// Bytes streamed per parameter in every micro-batch beyond the activations' traffic:
    /// packing the weights for the forward and input-gradient GEMMs and accumulating the
    /// weight gradient.
    pub weight_bytes_per_param: f64,
    /// Effective bytes streamed per parameter by AdamW, the gradient norm and zeroing, once
    /// per optimizer step.
    pub optimizer_bytes_per_param: f64,
    /// The runtime packs each linear weight once per step and reuses the panels in every
    /// micro-batch (`kernels::panels`: fp32 on the AVX-512 kernel, more than one micro-batch
    /// per step): the weight pass is then paid once per step instead of once per micro-batch.
    /// Off for runs without them (16-bit storage, ZeRO-3, no AVX-512, and every run before
    /// 2026-12-06 07:00 UTC, which the fits above measured). [`step_time_as`] takes it as
    /// what the run does even for one micro-batch (`cpu_plan::predict` passes one micro-batch
    /// at a time): a recomputed forward reuses the panels, else packs the weights again.
    pub weight_panels: bool,
    /// With weight panels, bytes per parameter that every micro-batch beyond the first still
    /// costs (fitted, not counted: the GEMMs' per-call work that scales with the weights rather
    /// than the rows — packing the activation gradients for the weight gradients, edge tiles,
    /// accumulating into it). Fitted on one-process fp32 runs of L4 C256 T128, global batch 8 as
    /// b8×1 / b4×2 / b2×4 / b1×8 (125.7 / 123.5 / 128.5 / 139.7 ms, quiet, 2026-12-06 07:44
    /// UTC): 1.77 ms per extra micro-batch of 3.2 M parameters at 6 GB/s = 3.3 bytes.
    pub panel_bytes_per_param_per_micro: f64,
    /// bf16-mixed: sustained FLOP/s of one thread for the linear layers and the LM head on the
    /// bf16 matmul kernel (`vdpbf16ps` on AVX512-BF16), packing included; attention's score and
    /// value products stay `f32` GEMMs on converted heads at `matmul_flops_per_thread`. Fitted
    /// (not counted) so that the rest of the model, unchanged or counted as below, gives the
    /// quiet bf16 step of docs/performance.md, "Quiet run of the peers, 2026-12-06 07:32–07:38
    /// UTC (session 6)" (`bench/precision_bench.sh 3 5` at fe6522b, L4 H4 C256 T128 B8,
    /// vocabulary 8192, 1 thread: 8,384 tokens/s = 122.1 ms against fp32's 4,918 = 208.2 ms,
    /// which the fp32 constants predict as 207.9 ms): 635 GFLOP/s, rounded to 640 (session 8);
    /// refitted to 790 (121.7 ms predicted) in session 9, when `mixed_elementwise_factor`
    /// started charging the casts a profile measured. The profile in docs/performance.md
    /// ("bf16-mixed step, session 6") sampled the micro-kernel alone at about 520 GFLOP/s
    /// (session 9's: 541 on the vocabulary-32 model); the effective rate is higher because the
    /// memory terms, fitted on fp32 runs, charge the cross-entropy and AdamW more than that
    /// profile measured (the fit puts the sum right, not each part). The two points it now
    /// meets: the vocabulary-8192 step above, and the vocabulary-32 speed-up of the
    /// session-9 precision checks (1.56–1.60 measured, 1.62–1.63 predicted; 1.71 before).
    pub bf16_matmul_flops_per_thread: f64,
    /// Mixed precision without weight panels: bytes per parameter of the per-micro-batch
    /// weight pass (packing the 16-bit working copy for the forward and input-gradient GEMMs):
    /// `weight_bytes_per_param` at half the element size, 3.4 (counted, not fitted).
    pub mixed_weight_bytes_per_param: f64,
    /// Mixed precision: AdamW's effective bytes per parameter. AdamW over the `f32` master
    /// weights also writes the 16-bit working copy: 38 bytes by count against fp32's 36, at
    /// fp32's measured ratio of 16 effective to 36 counted: 16.9 (counted, not fitted).
    pub mixed_optimizer_bytes_per_param: f64,
    /// Full recomputation: the share of its counted work (`modes::recompute_work`: the
    /// layers' forward again) that the measured step pays. Fitted, not counted: four quiet
    /// runs of `bench/precision_plan_check.sh` (sessions 8 and 9, 16 layout pairs: one process
    /// at 2 threads, tp2, pp2 b2×4, dp2 b4) measured full recomputation's extra step time at
    /// 0.42–0.97 of the counted extra, median 0.74 (the recomputed forward writes into the
    /// same, cache-warm scratch rather than the saved activations).
    pub full_recompute_time_share: f64,
    /// Mixed precision: the elementwise passes (layer norms, GELU, residuals, softmax) cost
    /// this many times fp32's. Measured, not fitted to step times: a perf profile (cpu-clock,
    /// 2026-12-06 15:44 UTC, quiet) of one process at 1 thread, L4 H4 C256 T128 b8,
    /// vocabulary 32, had those kernels at 15.6 ms of a 79.4 ms bf16-mixed step (fastmath
    /// 8.5, `elem::with_f32` 4.4, row loops 2.2, widening adds 0.5) against 11.0 ms of the
    /// 126.7 ms fp32 step: they read and write 16-bit activations but convert every element
    /// both ways.
    pub mixed_elementwise_factor: f64,
}

impl Default for CpuCalibration {
    fn default() -> Self {
        CpuCalibration {
            matmul_flops_per_thread: 240e9,
            bandwidth_bytes_per_thread: 6e9,
            elementwise_bytes_per_token_channel: 140.0,
            spawn_secs: 5e-6,
            extra_thread_efficiency: 0.5,
            weight_bytes_per_param: 6.8,
            optimizer_bytes_per_param: 16.0,
            weight_panels: true,
            panel_bytes_per_param_per_micro: 3.3,
            bf16_matmul_flops_per_thread: 790e9,
            mixed_weight_bytes_per_param: 3.4,
            mixed_optimizer_bytes_per_param: 16.0 * 38.0 / 36.0,
            full_recompute_time_share: 0.74,
            mixed_elementwise_factor: 1.4,
        }
    }
}

/// Predicted step time, by part.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct CpuStepTime {
    /// Matrix products (linear layers, LM head, attention scores and values).
    pub matmul_secs: f64,
    /// Elementwise kernels and the per-micro-batch weight passes (memory-bound).
    pub memory_secs: f64,
    /// AdamW, gradient norm and zeroing.
    pub optimizer_secs: f64,
    /// Thread start-up per kernel call.
    pub overhead_secs: f64,
    /// Sum of the parts.
    pub total_secs: f64,
    /// Matmul FLOPs of the step.
    pub matmul_flops: f64,
}

/// Matmul FLOPs of one micro-batch, forward + backward (see the module formula).
pub fn matmul_flops(d: &CpuRuntimeDims, batch: u64, seq: u64) -> f64 {
    3.0 * linear_forward_flops(d, batch, seq) + attention_flops(d, batch, seq)
}

/// Forward FLOPs of one micro-batch's linear layers and LM head (backward is twice that).
pub fn linear_forward_flops(d: &CpuRuntimeDims, batch: u64, seq: u64) -> f64 {
    let (c, l) = (d.channels as f64, d.layers as f64);
    let bt = batch as f64 * seq as f64;
    l * 24.0 * bt * c * c / d.tp as f64 + 2.0 * bt * c * head_columns(d)
}

/// Attention's score and value products of one micro-batch, forward (2 GEMMs) and backward
/// (4), on the full t×t square.
pub fn attention_flops(d: &CpuRuntimeDims, batch: u64, seq: u64) -> f64 {
    let (c, l) = (d.channels as f64, d.layers as f64);
    let (b, t) = (batch as f64, seq as f64);
    l * 12.0 * b * t * t * c / d.tp as f64
}

/// Parameters of `d`'s transformer layers alone (what recomputation's forward multiplies by):
/// `param_count` without embedding and head.
pub fn layer_params(d: &CpuRuntimeDims) -> f64 {
    crate::cpu_runtime::param_count(&CpuRuntimeDims {
        has_embedding: false,
        has_head: false,
        ..*d
    }) as f64
}

/// Columns of the LM head this stage/rank multiplies: vp/tp on the last pipeline stage (the
/// vocabulary-parallel head holds vp/tp rows of the tied `wte`), none on the others.
pub fn head_columns(d: &CpuRuntimeDims) -> f64 {
    if d.has_head {
        (d.padded_vocab / d.tp.max(1)) as f64
    } else {
        0.0
    }
}

/// Share of a layer's elementwise traffic that one of `tp` tensor-parallel ranks streams.
/// Korthikanti et al. 2022 (§4, Table 2) count a layer's activations as 34·s·b·h, of which 10
/// (layer norms, residual adds, dropout) stay whole under tensor parallelism and 24 (attention
/// and MLP internals) split over tp; sequence parallelism splits all 34. The elementwise passes
/// follow the activations they read and write.
pub fn tp_elementwise_share(tp: u64, sequence_parallel: bool) -> f64 {
    let t = tp.max(1) as f64;
    if sequence_parallel {
        1.0 / t
    } else {
        (10.0 + 24.0 / t) / 34.0
    }
}

/// Seconds of one micro-batch's elementwise passes over `d`'s layers at the whole width
/// (before [`tp_elementwise_share`]).
pub fn elementwise_secs(
    d: &CpuRuntimeDims,
    batch: u64,
    seq: u64,
    threads: u64,
    k: &CpuCalibration,
) -> f64 {
    let n = 1.0 + (threads.max(1) as f64 - 1.0) * k.extra_thread_efficiency;
    d.layers as f64 * k.elementwise_bytes_per_token_channel * (batch * seq * d.channels) as f64
        / (n * k.bandwidth_bytes_per_thread)
}

/// The elementwise passes of one micro-batch as [`step_time_as`] charges them under
/// `precision` and `recompute` (the casts' factor, the recomputed forward's share of them),
/// before the tensor-parallel share: what `cpu_plan` splits further under sequence
/// parallelism.
pub fn elementwise_secs_as(
    d: &CpuRuntimeDims,
    batch: u64,
    seq: u64,
    threads: u64,
    (precision, recompute): (Precision, Recompute),
    k: &CpuCalibration,
) -> f64 {
    let re = recompute_work(d, batch, seq, recompute);
    elementwise_secs(d, batch, seq, threads, k)
        * elementwise_factor(precision, k)
        * (1.0 + recompute_time_share(recompute, k) * re.elementwise_share)
}

/// Seconds of one pass over `d`'s weights (packing them for the forward and input-gradient
/// GEMMs): once per micro-batch, or once per step with the runtime's weight panels.
pub fn weight_pass_secs(d: &CpuRuntimeDims, threads: u64, k: &CpuCalibration) -> f64 {
    let n = 1.0 + (threads.max(1) as f64 - 1.0) * k.extra_thread_efficiency;
    k.weight_bytes_per_param * crate::cpu_runtime::param_count(d) as f64
        / (n * k.bandwidth_bytes_per_thread)
}

/// Predicted time of one optimizer step of `accum` micro-batches of (`batch`, `seq`) on
/// `threads` threads, in fp32 without recomputation.
pub fn step_time(
    d: &CpuRuntimeDims,
    batch: u64,
    seq: u64,
    accum: u64,
    threads: u64,
    k: &CpuCalibration,
) -> CpuStepTime {
    step_time_as(
        d,
        batch,
        seq,
        accum,
        threads,
        (Precision::Fp32, Recompute::None),
        k,
    )
}

/// [`step_time`] under a storage precision and an activation recomputation policy (see the
/// module formulas and [`modes`]): bf16-mixed runs the linear layers and the LM head on the
/// bf16 kernel, packs its 16-bit working copy in every micro-batch (no weight panels) and
/// writes it in AdamW; recomputation adds [`recompute_work`] to every micro-batch.
pub fn step_time_as(
    d: &CpuRuntimeDims,
    batch: u64,
    seq: u64,
    accum: u64,
    threads: u64,
    (precision, recompute): (Precision, Recompute),
    k: &CpuCalibration,
) -> CpuStepTime {
    let n_threads = threads.max(1) as f64;
    let n = 1.0 + (n_threads - 1.0) * k.extra_thread_efficiency;
    let a = accum.max(1) as f64;
    let (c, l) = (d.channels as f64, d.layers as f64);
    let bt = (batch * seq) as f64;
    let mixed = precision != Precision::Fp32;
    let bf16 = precision == Precision::Bf16Mixed;
    let re = recompute_work(d, batch, seq, recompute);
    // Seconds of the recomputation's work are charged at this share of what it counts.
    let share = recompute_time_share(recompute, k);
    let flops = a * (matmul_flops(d, batch, seq) + re.linear_flops + re.attention_flops);
    let matmul_secs = if bf16 {
        // Linear layers and head on the bf16 kernel, attention's products in f32.
        let linear = 3.0 * linear_forward_flops(d, batch, seq) + share * re.linear_flops;
        let attention = attention_flops(d, batch, seq) + share * re.attention_flops;
        a * (linear / (n * k.bf16_matmul_flops_per_thread)
            + attention / (n * k.matmul_flops_per_thread))
    } else {
        a * (matmul_flops(d, batch, seq) + share * (re.linear_flops + re.attention_flops))
            / (n * k.matmul_flops_per_thread)
    };
    let p = crate::cpu_runtime::param_count(d) as f64;
    // The weight pass: once per step with panels (plus what each further micro-batch still
    // pays), else once per micro-batch. The runtime packs no panels for 16-bit storage.
    let weight_bytes = if k.weight_panels && !mixed {
        k.weight_bytes_per_param + (a - 1.0) * k.panel_bytes_per_param_per_micro
    } else if mixed {
        a * k.mixed_weight_bytes_per_param
    } else {
        a * k.weight_bytes_per_param
    };
    let casts = elementwise_factor(precision, k);
    let mut mem_bytes = a
        * (casts
            * l
            * k.elementwise_bytes_per_token_channel
            * bt
            * c
            * tp_elementwise_share(d.tp, false)
            + 16.0 * bt * head_columns(d))
        + weight_bytes * p;
    if recompute != Recompute::None {
        // The recomputed forward's passes, and without panels its packing of the layers'
        // weights again.
        let per_param = if k.weight_panels && !mixed {
            0.0
        } else if mixed {
            k.mixed_weight_bytes_per_param
        } else {
            k.weight_bytes_per_param
        };
        mem_bytes += a
            * share
            * (casts
                * re.elementwise_share
                * l
                * k.elementwise_bytes_per_token_channel
                * bt
                * c
                * tp_elementwise_share(d.tp, false)
                + re.score_bytes
                + re.weight_pass_share * per_param * layer_params(d));
    }
    let memory_secs = mem_bytes / (n * k.bandwidth_bytes_per_thread);
    let optimizer_bytes = if mixed {
        k.mixed_optimizer_bytes_per_param
    } else {
        k.optimizer_bytes_per_param
    };
    let optimizer_secs = optimizer_bytes * p / (n * k.bandwidth_bytes_per_thread);
    let overhead_secs =
        a * (l * (22.0 + share * re.calls_per_layer) + 12.0) * (n_threads - 1.0) * k.spawn_secs;
    CpuStepTime {
        matmul_secs,
        memory_secs,
        optimizer_secs,
        overhead_secs,
        total_secs: matmul_secs + memory_secs + optimizer_secs + overhead_secs,
        matmul_flops: flops,
    }
}

/// What the elementwise passes cost under `precision`, relative to fp32's:
/// `mixed_elementwise_factor` for the mixed precisions (the casts), 1 for fp32.
pub fn elementwise_factor(precision: Precision, k: &CpuCalibration) -> f64 {
    if precision == Precision::Fp32 {
        1.0
    } else {
        k.mixed_elementwise_factor
    }
}

/// The share of `recompute`'s counted work its seconds are charged at: full recomputation's
/// fitted `full_recompute_time_share`, selective's counted work whole (its +4% is inside the
/// measurements' noise).
pub fn recompute_time_share(recompute: Recompute, k: &CpuCalibration) -> f64 {
    match recompute {
        Recompute::Full => k.full_recompute_time_share,
        Recompute::None | Recompute::Selective => 1.0,
    }
}

mod modes;
pub use modes::{recompute_work, RecomputeWork};

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(layers: u64) -> CpuRuntimeDims {
        CpuRuntimeDims {
            padded_vocab: 8192,
            max_seq_len: 128,
            channels: 256,
            heads: 4,
            layers,
            has_embedding: true,
            has_head: true,
            tp: 1,
        }
    }

    #[test]
    fn time_grows_with_work_and_shrinks_with_threads() {
        let k = CpuCalibration::default();
        let one = step_time(&dims(4), 8, 128, 1, 1, &k);
        let two = step_time(&dims(4), 8, 128, 1, 2, &k);
        assert!(two.total_secs < one.total_secs);
        let deeper = step_time(&dims(8), 8, 128, 1, 2, &k);
        assert!(deeper.total_secs > two.total_secs);
        let accum = step_time(&dims(4), 8, 128, 2, 2, &k);
        assert!((accum.matmul_secs - 2.0 * two.matmul_secs).abs() < 1e-12);
        assert!((accum.optimizer_secs - two.optimizer_secs).abs() < 1e-12);
        // The bench config's matmul work: 3·(4·24·1024·256² + 2·1024·256·8192) + 4·12·8·128²·256.
        let f = matmul_flops(&dims(4), 8, 128);
        let expected = 3.0 * (4.0 * 24.0 * 1024.0 * 65536.0 + 2.0 * 1024.0 * 256.0 * 8192.0)
            + 4.0 * 12.0 * 8.0 * 16384.0 * 256.0;
        assert_eq!(f, expected);
    }

    #[test]
    fn default_constants_reproduce_the_calibration_table() {
        // (L, c, t, b, threads, measured ms) from the module docs; vocabulary 32 → padded 64.
        let table = [
            (2, 128, 64, 16, 2, 12.04),
            (2, 64, 64, 16, 2, 6.327),
            (1, 32, 16, 8, 2, 0.305),
            (4, 256, 128, 8, 2, 83.394),
            (3, 192, 64, 16, 2, 37.178),
            (4, 128, 128, 8, 2, 29.997),
            (2, 128, 64, 16, 1, 20.05),
            (2, 64, 64, 16, 1, 8.219),
            (1, 32, 16, 8, 1, 0.26),
            (4, 256, 128, 8, 1, 127.9),
            (3, 192, 64, 16, 1, 57.267),
            (4, 128, 128, 8, 1, 43.102),
            (2, 128, 64, 8, 1, 10.225),
        ];
        let k = CpuCalibration::default();
        let mut sq = 0.0;
        for (l, c, t, b, n, ms) in table {
            let d = CpuRuntimeDims {
                padded_vocab: 64,
                max_seq_len: t,
                channels: c,
                heads: 4,
                layers: l,
                has_embedding: true,
                has_head: true,
                tp: 1,
            };
            let p = 1e3 * step_time(&d, b, t, 1, n, &k).total_secs;
            let r = (p / ms).ln();
            assert!(
                r.abs() < 0.3,
                "L={l} c={c} n={n}: predicted {p:.2} ms, measured {ms} ms"
            );
            sq += r * r;
        }
        let rms = (sq / table.len() as f64).sqrt();
        assert!(rms < 0.12, "RMS log error {rms}");
    }

    #[test]
    fn tensor_parallel_halves_the_layer_work_and_the_head_counts_once_at_vp_over_tp() {
        // L4 C256 T128 B8, vp 8192: per micro-batch forward, layer linears 4·24·1024·256²,
        // attention 4·12·8·128²·256, head 2·1024·256·8192.
        let (lin, att, head) = (
            4.0 * 24.0 * 1024.0 * 65536.0,
            4.0 * 12.0 * 8.0 * 16384.0 * 256.0,
            2.0 * 1024.0 * 256.0 * 8192.0,
        );
        let tp2 = CpuRuntimeDims { tp: 2, ..dims(4) };
        assert_eq!(
            matmul_flops(&tp2, 8, 128),
            3.0 * (lin / 2.0 + head / 2.0) + att / 2.0
        );
        // Without the head (a first pipeline stage of two, 2 layers): layers only.
        let first = CpuRuntimeDims {
            layers: 2,
            has_head: false,
            ..tp2
        };
        assert_eq!(matmul_flops(&first, 8, 128), 3.0 * lin / 4.0 + att / 4.0);
        let last = CpuRuntimeDims {
            has_embedding: false,
            has_head: true,
            ..first
        };
        assert_eq!(
            matmul_flops(&last, 8, 128) - matmul_flops(&first, 8, 128),
            3.0 * head / 2.0
        );
        // The cross-entropy's logits passes follow the head: 16·bt·vp/tp bytes on the last stage.
        let k = CpuCalibration::default();
        let mem = |d: &CpuRuntimeDims| step_time(d, 8, 128, 1, 1, &k).memory_secs;
        // Their parameters differ too (the last holds ln_f, the first the position
        // embedding): the weight passes follow.
        let dp = crate::cpu_runtime::param_count(&last) as f64
            - crate::cpu_runtime::param_count(&first) as f64;
        let expected =
            (16.0 * 1024.0 * 4096.0 + k.weight_bytes_per_param * dp) / k.bandwidth_bytes_per_thread;
        assert!((mem(&last) - mem(&first) - expected).abs() < 1e-15);
    }

    #[test]
    fn tensor_parallel_ranks_stream_their_share_of_the_elementwise_passes() {
        // Korthikanti et al. 2022: 10 of 34 activation units replicated, 24 split; sp splits all.
        assert_eq!(tp_elementwise_share(1, false), 1.0);
        assert!((tp_elementwise_share(2, false) - 22.0 / 34.0).abs() < 1e-15);
        assert_eq!(tp_elementwise_share(4, true), 0.25);
        let k = CpuCalibration::default();
        let tp2 = CpuRuntimeDims { tp: 2, ..dims(4) };
        let ew = elementwise_secs(&tp2, 8, 128, 1, &k);
        assert!((ew - 4.0 * 140.0 * 1024.0 * 256.0 / 6e9).abs() < 1e-15);
        // A tp2 stage without embedding or head: its memory term is the weight passes plus
        // 22/34 of the whole width's elementwise passes.
        let no_head = CpuRuntimeDims {
            has_head: false,
            has_embedding: false,
            ..tp2
        };
        let m = step_time(&no_head, 8, 128, 1, 1, &k).memory_secs;
        let weights = k.weight_bytes_per_param * crate::cpu_runtime::param_count(&no_head) as f64
            / k.bandwidth_bytes_per_thread;
        assert!((m - weights - ew * 22.0 / 34.0).abs() < 1e-12, "{m}");
    }

    #[test]
    fn more_micro_batches_of_the_same_tokens_pay_the_weight_passes_again() {
        // L4 C256 T128, vp 8192: P = 8192·256 (wte) + 128·256 (wpe) + 4·(12·256² + 13·256)
        // + 2·256 (ln_f) = 5 289 472. Four micro-batches of 1 sequence against one of 4: the
        // same matmul FLOPs (attention is linear in b), the same elementwise bytes, three more
        // weight passes of 6.8 bytes per parameter without weight panels, none with them;
        // AdamW once either way.
        let panels = CpuCalibration::default();
        let d = dims(4);
        let one = step_time(&d, 4, 128, 1, 1, &panels);
        let four = step_time(&d, 1, 128, 4, 1, &panels);
        let residual = 3.0 * 3.3 * 5_289_472.0 / 6e9;
        assert!((four.memory_secs - one.memory_secs - residual).abs() < 1e-12);
        let k = CpuCalibration {
            weight_panels: false,
            ..panels
        };
        let d = dims(4);
        assert_eq!(crate::cpu_runtime::param_count(&d), 5_289_472);
        let one = step_time(&d, 4, 128, 1, 1, &k);
        let four = step_time(&d, 1, 128, 4, 1, &k);
        assert!((four.matmul_secs - one.matmul_secs).abs() < 1e-12 * one.matmul_secs);
        let extra = 3.0 * 6.8 * 5_289_472.0 / 6e9;
        assert!(
            (four.memory_secs - one.memory_secs - extra).abs() < 1e-12,
            "{} vs {extra}",
            four.memory_secs - one.memory_secs
        );
        assert_eq!(four.optimizer_secs, one.optimizer_secs);
        // AdamW: 16 bytes per parameter at 6 GB/s on one thread.
        assert!((one.optimizer_secs - 16.0 * 5_289_472.0 / 6e9).abs() < 1e-12);
    }
}
