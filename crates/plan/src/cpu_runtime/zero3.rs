//! ZeRO-3 (Rajbhandari et al. 2020, §5.3): the CPU runtime's memory per data-parallel rank and
//! its weight gathers per micro-batch (`train::dp` ZeRO-3 allocates and gathers exactly this).
//!
//! The flat buffer is split into *units* — the embedding (`wte`, `wpe`), each layer, the head
//! (`ln_f`) — and a rank owns the piece `shard_len(unit, dp, rank)` of each, of the weights,
//! the reduced gradient and AdamW's `m`, `v`. Beside them it allocates:
//! - gather buffers: one the size of the embedding unit, and [`ZERO3_GATHER_SLOTS`] (with
//!   prefetch: the current unit and the next; one without) the size of the largest layer or
//!   head unit;
//! - gradient buffers: one embedding-sized (the tied `wte` is written by the LM head first and
//!   final only after the embedding's backward) and [`super::ZERO2_GRAD_BUFFERS`] layer-sized
//!   (one filled by backward while the other is reduce-scattered);
//! - one micro-batch's activations, as without ZeRO.

use super::{
    activation_bytes_sp, activation_bytes_with, compute_bytes, param_count, shard_len,
    CpuRuntimeDims, CpuRuntimeMemory, F32_BYTES, ZERO2_GRAD_BUFFERS,
};
use crate::recipe::{Precision, Recompute};

/// Layer-sized gather buffers with prefetch (the unit computing and the next one arriving).
pub const ZERO3_GATHER_SLOTS: u64 = 2;

/// Elements of the units of `d` in buffer order: embedding (first stage), each layer, head
/// (last stage: `ln_f`, plus the LM head's own `wte` without the embedding).
pub fn zero3_unit_lens(d: &CpuRuntimeDims) -> Vec<u64> {
    let layer = param_count(&CpuRuntimeDims {
        layers: 1,
        has_embedding: false,
        has_head: false,
        ..*d
    });
    let vpl_c = d.padded_vocab / d.tp * d.channels;
    let mut out = Vec::new();
    if d.has_embedding {
        out.push(vpl_c + d.max_seq_len * d.channels);
    }
    out.extend((0..d.layers).map(|_| layer));
    if d.has_head {
        out.push(2 * d.channels + if d.has_embedding { 0 } else { vpl_c });
    }
    out
}

/// Weight all-gathers of one optimizer step of `accum` micro-batches (forward + backward) and
/// the elements they move into this rank's buffers. Forward fetches the embedding, each layer,
/// the head and — the LM head is tied to `wte` — the embedding again; backward the head and
/// the embedding, then each layer (the embedding's backward reads no weights). The embedding
/// has a gather buffer of its own and its weights change only at the optimizer step, so the
/// runtime gathers it once per step and keeps it (as FSDP keeps the root module's weights
/// gathered between forward and backward); every other unit is gathered at each fetch:
/// `1 + a · (2L + 2)` gathers on a whole model.
pub fn zero3_gathers_per_step(d: &CpuRuntimeDims, accum: u64) -> (u64, u64) {
    let units = zero3_unit_lens(d);
    let embed = if d.has_embedding { units[0] } else { 0 };
    let head = if d.has_head {
        units[units.len() - 1]
    } else {
        0
    };
    let layers: u64 = units.iter().sum::<u64>() - embed - head;
    let (e, h) = (u64::from(d.has_embedding), u64::from(d.has_head));
    let a = accum.max(1);
    // per micro-batch: forward layers + head, backward head + layers; once: the embedding
    let count = e + a * (2 * d.layers + 2 * h);
    let elems = e * embed + a * (2 * layers + 2 * h * head);
    (count, elems)
}

/// ZeRO-3's communication of one optimizer step of `accum` micro-batches over `dp` ranks, given
/// one micro-batch's compute (forward + backward) `micro_secs`. With g(u) the time of one ring
/// all-gather (or reduce-scatter) of a unit of u f32 (`CommCalibration::half_secs`):
///
/// ```text
/// gathers  = g(E) + a · Σ_layers,head 2·g(u)      (the embedding once per step, see above)
/// reduces  = a · Σ_units g(u)                      (every unit's gradient, every micro-batch)
/// comm     = gathers + reduces + the norm's exchange
/// exposed  = comm                                  without prefetch (--no-overlap)
///          = g(E) + a · (g(L) + g(H) + max(0, C − micro))   with prefetch, C = one micro-batch's
///            collectives: the first layer's gather of forward and the head's of backward wait
///            (nothing computes before them), the rest queue behind the compute
/// contention = a · (C − max(0, C − micro))         with prefetch and no spare core: the hidden
///            collectives' copying and summing run on the training threads' cores
/// ```
///
/// One communication thread runs every collective in order, so gathers and reduce-scatters
/// share its time (no concurrency between them).
pub fn zero3_comm_time(
    d: &CpuRuntimeDims,
    accum: u64,
    dp: u64,
    micro_secs: f64,
    (prefetch, spare_core): (bool, bool),
    k: &crate::cpu_comm::CommCalibration,
) -> crate::cpu_comm::DpCommTime {
    zero3_comm_time_with(
        d,
        (accum, dp),
        micro_secs,
        (prefetch, spare_core),
        Precision::Fp32,
        k,
    )
}

/// [`zero3_comm_time`] under `precision`: mixed precision gathers 16-bit weights (half the
/// bytes of each gather; the exposed first gathers too) and reduce-scatters `f32` gradients.
pub fn zero3_comm_time_with(
    d: &CpuRuntimeDims,
    (accum, dp): (u64, u64),
    micro_secs: f64,
    (prefetch, spare_core): (bool, bool),
    precision: Precision,
    k: &crate::cpu_comm::CommCalibration,
) -> crate::cpu_comm::DpCommTime {
    let units = zero3_unit_lens(d);
    let e = compute_bytes(precision);
    let g = |u: u64| k.half_secs((u * e) as f64, dp);
    let r = |u: u64| k.half_secs((u * F32_BYTES) as f64, dp);
    let a = accum.max(1) as f64;
    let first = usize::from(d.has_embedding);
    let last = units.len() - usize::from(d.has_head);
    let once = if d.has_embedding { g(units[0]) } else { 0.0 };
    let gathers: f64 = units[first..].iter().map(|&u| 2.0 * g(u)).sum();
    let reduces: f64 = units.iter().map(|&u| r(u)).sum();
    let per_micro = gathers + reduces;
    let norm = k.half_secs((2 * F32_BYTES * dp) as f64, dp);
    let comm = once + a * per_micro + norm;
    let (exposed, contention) = if prefetch {
        let waited_first = units.get(first).map_or(0.0, |&u| g(u))
            + if d.has_head && last < units.len() {
                g(units[last])
            } else {
                0.0
            };
        let queued = (per_micro - micro_secs).max(0.0);
        let hidden = per_micro - queued;
        (
            once + a * (waited_first + queued) + norm,
            if spare_core { 0.0 } else { a * hidden },
        )
    } else {
        (comm, 0.0)
    };
    crate::cpu_comm::DpCommTime {
        comm_secs: comm,
        exposed_secs: exposed,
        contention_secs: contention,
        buckets: units.len(),
    }
}

/// The CPU runtime's memory on data-parallel rank `rank` of `dp` under ZeRO-3, with
/// (`prefetch`) or without prefetching the next unit; fp32, one micro-batch in flight.
pub fn zero3_memory(
    d: &CpuRuntimeDims,
    batch: u64,
    seq: u64,
    dp: u64,
    rank: u64,
    prefetch: bool,
) -> CpuRuntimeMemory {
    zero3_memory_with(
        d,
        (batch, seq),
        (dp, rank),
        prefetch,
        (Precision::Fp32, Recompute::None),
    )
}

/// [`zero3_memory`] for `precision` and `recompute`. Under mixed precision (FSDP's "param
/// dtype" bf16/fp16 with an fp32 reduction): the owned pieces stay fp32 (master weights, the
/// reduced gradient, `m`, `v`: 16 B per owned parameter), the gather and gradient buffers hold
/// 16-bit elements (the weights move at 2 bytes each), and one `f32` buffer the size of the
/// largest unit receives each 16-bit unit gradient widened for the `f32` reduce-scatter. No
/// whole-model working copy or gradient staging exists (unlike [`super::trainer_memory`]'s
/// other layouts). Activations as [`super::activation_bytes_with`].
pub fn zero3_memory_with(
    d: &CpuRuntimeDims,
    (batch, seq): (u64, u64),
    (dp, rank): (u64, u64),
    prefetch: bool,
    (precision, recompute): (Precision, Recompute),
) -> CpuRuntimeMemory {
    let e = compute_bytes(precision);
    let units = zero3_unit_lens(d);
    let owned: u64 = units.iter().map(|&u| shard_len(u, dp.max(1), rank)).sum();
    let embed = if d.has_embedding { units[0] } else { 0 };
    let small = units
        .iter()
        .skip(usize::from(d.has_embedding))
        .copied()
        .max()
        .unwrap_or(0);
    let slots = if prefetch { ZERO3_GATHER_SLOTS } else { 1 };
    let wide = if precision == Precision::Fp32 {
        0
    } else {
        embed.max(small)
    };
    CpuRuntimeMemory {
        param_bytes: F32_BYTES * owned + e * (embed + slots * small),
        grad_bytes: F32_BYTES * (owned + wide) + e * (embed + ZERO2_GRAD_BUFFERS * small),
        optimizer_bytes: 2 * F32_BYTES * owned,
        activation_bytes: activation_bytes_with(d, batch, seq, precision, recompute, 1),
        weight_panel_bytes: 0,
    }
}

/// [`zero3_memory_with`] for a tensor-parallel rank (`d` its shard: every unit holds the
/// rank's part of the split tensors) with sequence parallelism on or off: the activations as
/// [`super::activation_bytes_sp`] (one micro-batch in flight). What the trainer's report
/// predicts for `--zero 3 --tp N`.
pub fn zero3_memory_sp(
    d: &CpuRuntimeDims,
    (batch, seq): (u64, u64),
    (dp, rank): (u64, u64),
    prefetch: bool,
    (precision, recompute): (Precision, Recompute),
    sequence_parallel: bool,
) -> CpuRuntimeMemory {
    CpuRuntimeMemory {
        activation_bytes: activation_bytes_sp(
            d,
            batch,
            seq,
            precision,
            recompute,
            1,
            sequence_parallel,
        ),
        ..zero3_memory_with(
            d,
            (batch, seq),
            (dp, rank),
            prefetch,
            (precision, recompute),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::{padded_vocab, zero_memory};
    use super::*;

    fn dims() -> CpuRuntimeDims {
        CpuRuntimeDims {
            padded_vocab: padded_vocab(50257),
            max_seq_len: 1024,
            channels: 768,
            heads: 12,
            layers: 12,
            has_embedding: true,
            has_head: true,
            tp: 1,
        }
    }

    /// A link of 1 ms latency and 1 GB/s.
    fn link() -> crate::cpu_comm::CommCalibration {
        crate::cpu_comm::CommCalibration {
            latency_secs: 1e-3,
            bus_bytes_per_sec: 1e9,
            halves_are_all_reduces: false,
        }
    }

    #[test]
    fn zero3_communication_by_hand() {
        // A link of 1 ms latency and 1 GB/s: g(u) = (dp − 1)·1e-3 + (dp − 1)/dp · 4u / 1e9.
        let k = link();
        let d = dims();
        let u = zero3_unit_lens(&d);
        let g = |x: u64| 1e-3 + 0.5 * (4 * x) as f64 / 1e9;
        let (e, l, h) = (g(u[0]), g(u[1]), g(u[13]));
        let per_micro = 12.0 * 2.0 * l + 2.0 * h + (e + 12.0 * l + h);
        let norm = 1e-3 + 0.5 * 16.0 / 1e9;
        // Without prefetch everything waits: 1 + 4·(2·12 + 2) gathers and 4·14 reduce-scatters.
        let t = zero3_comm_time(&d, 4, 2, 0.5, (false, true), &k);
        assert!((t.comm_secs - (e + 4.0 * per_micro + norm)).abs() < 1e-12);
        assert_eq!(t.exposed_secs, t.comm_secs);
        assert_eq!(t.contention_secs, 0.0);
        // With prefetch and compute longer than the collectives: only the first gathers wait;
        // without a spare core the hidden part is lost compute.
        let t = zero3_comm_time(&d, 4, 2, 10.0, (true, false), &k);
        assert!((t.exposed_secs - (e + 4.0 * (l + h) + norm)).abs() < 1e-12);
        assert!((t.contention_secs - 4.0 * per_micro).abs() < 1e-12);
        // Compute shorter than the collectives: the rest queues.
        let t = zero3_comm_time(&d, 1, 2, 0.01, (true, true), &k);
        let want = e + l + h + (per_micro - 0.01) + norm;
        assert!((t.exposed_secs - want).abs() < 1e-12, "{t:?}");
    }

    #[test]
    fn zero3_mixed_precision_by_hand() {
        // bf16: gathers move 2 bytes per weight, reduce-scatters 4 per gradient.
        let k = link();
        let d = dims();
        let u = zero3_unit_lens(&d);
        let g = |x: u64, b: u64| 1e-3 + 0.5 * (b * x) as f64 / 1e9;
        let per_micro = 12.0 * 2.0 * g(u[1], 2)
            + 2.0 * g(u[13], 2)
            + (g(u[0], 4) + 12.0 * g(u[1], 4) + g(u[13], 4));
        let norm = 1e-3 + 0.5 * 16.0 / 1e9;
        let t = zero3_comm_time_with(&d, (4, 2), 0.5, (false, true), Precision::Bf16Mixed, &k);
        assert!((t.comm_secs - (g(u[0], 2) + 4.0 * per_micro + norm)).abs() < 1e-12);
        // Memory: fp32 pieces (weights, gradient, m, v), 16-bit gather and gradient buffers,
        // one f32 widening buffer of the largest unit; bf16 activations.
        let (embed, small) = (u[0], *u[1..].iter().max().unwrap());
        let owned: u64 = u.iter().map(|x| x.div_ceil(2)).sum();
        let m = zero3_memory_with(
            &d,
            (4, 1024),
            (2, 0),
            true,
            (Precision::Bf16Mixed, Recompute::None),
        );
        assert_eq!(m.param_bytes, 4 * owned + 2 * (embed + 2 * small));
        assert_eq!(
            m.grad_bytes,
            4 * (owned + embed.max(small)) + 2 * (embed + 2 * small)
        );
        assert_eq!(m.optimizer_bytes, 8 * owned);
        assert_eq!(
            m.activation_bytes,
            activation_bytes_with(&d, 4, 1024, Precision::Bf16Mixed, Recompute::None, 1)
        );
        // fp32 through the general form is the fp32 formula.
        assert_eq!(
            zero3_memory_with(
                &d,
                (4, 1024),
                (2, 1),
                false,
                (Precision::Fp32, Recompute::None)
            ),
            zero3_memory(&d, 4, 1024, 2, 1, false)
        );
    }

    #[test]
    fn units_tile_the_model_and_zero3_holds_less_than_zero2() {
        let d = dims();
        let p = param_count(&d);
        let u = zero3_unit_lens(&d);
        assert_eq!(u.len(), 14);
        assert_eq!(u.iter().sum::<u64>(), p);
        // The embedding once per step; per micro-batch forward layers + H, backward H +
        // layers: 1 + a(2·12 + 2) gathers. Elements: E + a(2·(p − E − H) + 2H) = E + a(2p − 2E).
        for a in [1, 4] {
            assert_eq!(
                zero3_gathers_per_step(&d, a),
                (1 + a * (2 * 12 + 2), u[0] + a * (2 * p - 2 * u[0]))
            );
        }
        for dp in [2, 4, 8] {
            let z2 = zero_memory(&d, 4, 1024, 2, dp, 0, 512 << 10);
            let z3 = zero3_memory(&d, 4, 1024, dp, 0, true);
            assert!(z3.param_bytes < z2.param_bytes, "dp {dp}");
            assert!(z3.total_bytes() < z2.total_bytes(), "dp {dp}");
            // rank 0 owns ⌈unit/dp⌉ of each unit
            let owned: u64 = u.iter().map(|x| x.div_ceil(dp)).sum();
            assert_eq!(z3.optimizer_bytes, 8 * owned);
            assert_eq!(z3.param_bytes, 4 * (owned + u[0] + 2 * u[1]));
        }
        // one rank: nothing sharded, the buffers come on top; no prefetch: one layer slot less
        let one = zero3_memory(&d, 4, 1024, 1, 0, false);
        assert_eq!(one.optimizer_bytes, 8 * p);
        assert_eq!(one.param_bytes, 4 * (p + u[0] + u[1]));
    }
}
