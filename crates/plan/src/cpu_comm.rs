//! Gradient communication of the CPU runtime's data parallelism (`train::dp`): how long the
//! collectives of one optimizer step take, and how much of that the training thread waits for
//! (*exposed*) when buckets are reduced on a communication thread while backward goes on.
//!
//! Legend: n = data-parallel ranks, B_k = bytes of gradient bucket k (in the order backward
//! finishes them, `cpu_runtime::grad_bucket_lens`), α = per-message latency, β = bus bandwidth
//! (nccl-tests' definition: algorithm bandwidth × 2(n−1)/n for an all-reduce), a = micro-steps.
//!
//! ```text
//! ring all-reduce(B)      = 2(n−1)·α + 2(n−1)/n · B / β        (Patarasuk & Yuan 2009; Thakur et al. 2005)
//! reduce-scatter(B)       = all-gather(B) = (n−1)·α + (n−1)/n · B / β
//! ZeRO-0 step comm        = Σ_k all-reduce(B_k)
//! ZeRO-1 step comm        = Σ_k reduce-scatter(B_k) + Σ_k all-gather(B_k) + norm all-gather
//! ZeRO-2 step comm        = a · Σ_k reduce-scatter(B_k) + Σ_k all-gather(B_k) + norm all-gather
//! exposed (overlap)       = end of the last bucket's reduction − end of backward, where bucket k
//!                           is ready when backward has covered its share of the parameters and
//!                           the communication thread reduces buckets one after another
//!                           + the all-gathers and the norm (after backward, never hidden)
//! exposed (no overlap)    = all of it
//! contention              = the hidden part, when the host has no core beyond the training
//!                           threads: the communication thread takes it from compute
//! ```
//!
//! The MPI transport builds reduce-scatter and all-gather from whole all-reduces, so there they
//! cost an all-reduce each. Buckets under 64 KiB use the tree algorithm on the built-in
//! transports (a whole all-reduce too); they are small enough to ignore here.
//!
//! Backward time is spread over the buckets in proportion to their parameters, a simplification
//! (the LM head's matmul sits in the embedding's bucket's tensor but runs first). On a machine
//! with fewer cores than ranks × threads + communication threads, the communication thread
//! competes with compute for cores; the constants below are the *effective* α and β measured in
//! training runs on the 2-core development machine, not a free link's.

use crate::cpu_runtime::{grad_bucket_lens, F32_BYTES};

/// Effective link constants of one transport.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CommCalibration {
    /// Seconds per message (one ring step).
    pub latency_secs: f64,
    /// Bus bandwidth, bytes per second.
    pub bus_bytes_per_sec: f64,
    /// Reduce-scatter and all-gather cost a whole all-reduce (the MPI transport builds them
    /// from `MPI_Allreduce`), not half of one.
    pub halves_are_all_reduces: bool,
}

impl CommCalibration {
    /// Loopback TCP on the development machine, fitted to the time in collectives of
    /// `scaletrain launch --transport tcp -- --no-overlap` runs: 8 layers × 256 channels, 25.4 MB
    /// of gradients in 9 buckets per step, 9.9 ms measured (9.6 ms modelled); the default model,
    /// 1.65 MB in 3 buckets, 1.1 ms (0.8 ms modelled). See `docs/performance.md`, "Overlap".
    pub fn tcp() -> CommCalibration {
        CommCalibration {
            latency_secs: 30e-6,
            bus_bytes_per_sec: 2.8e9,
            halves_are_all_reduces: false,
        }
    }

    /// Shared memory on the development machine (same runs: 12.0 ms measured, 11.6 modelled;
    /// slower than TCP here, as in `bench comm`'s loaded run B at ≥ 16 MB).
    pub fn shm() -> CommCalibration {
        CommCalibration {
            latency_secs: 5e-6,
            bus_bytes_per_sec: 2.2e9,
            halves_are_all_reduces: false,
        }
    }

    /// MPI (Open MPI over shared memory): the shared-memory constants, not fitted separately;
    /// the ZeRO collectives are whole all-reduces in the MPI transport.
    pub fn mpi() -> CommCalibration {
        CommCalibration {
            halves_are_all_reduces: true,
            ..CommCalibration::shm()
        }
    }

    /// Tensor-parallel collectives over loopback TCP on the development machine: they run on
    /// the training thread, small (b·t·c floats) and with the peer arriving at the same point,
    /// so neither the communication thread's competition for a core nor its waits for a peer
    /// that is still in backward slow them, as they do the data-parallel buckets [`Self::tcp`]
    /// is fitted to. Fitted to the time in tensor-parallel collectives that `scaletrain train`
    /// measures (`tp_secs` in metrics.jsonl, waits included): `--tp 2 --sequence-parallel`, L4
    /// C256 T128, global batch 8 as b8×1 / b4×2 / b2×4 (40 ring messages per micro-batch, 18.9 MB
    /// per step at every split), 4.5 / 5.0 / 6.3 ms (medians of three quiet rounds of 20 steps,
    /// 2026-12-06 08:36 UTC): least squares on the count of micro-batches gives 0.59 ms per
    /// micro-batch (α = 15 µs) and 3.9 ms for the bytes (β = 4.8 GB/s). The earlier model, the
    /// data-parallel link × 1.2, predicted 9.5 / 11.0 / 13.9 ms.
    pub fn tcp_tensor_parallel() -> CommCalibration {
        CommCalibration {
            latency_secs: 15e-6,
            bus_bytes_per_sec: 4.8e9,
            halves_are_all_reduces: false,
        }
    }

    /// The tensor-parallel calibration for a transport name: [`Self::tcp_tensor_parallel`]
    /// (shared memory is not fitted separately), with MPI's halves as whole all-reduces.
    pub fn tensor_parallel_for_transport(name: &str) -> CommCalibration {
        CommCalibration {
            halves_are_all_reduces: name == "mpi",
            ..CommCalibration::tcp_tensor_parallel()
        }
    }

    /// The calibration for a transport name ("tcp", "shm", "threads", "mpi"; others as TCP).
    pub fn for_transport(name: &str) -> CommCalibration {
        match name {
            "mpi" => CommCalibration::mpi(),
            "shm" | "threads" => CommCalibration::shm(),
            _ => CommCalibration::tcp(),
        }
    }

    /// A ring all-reduce of `bytes` over `n` ranks.
    pub fn all_reduce_secs(&self, bytes: f64, n: u64) -> f64 {
        if n <= 1 {
            return 0.0;
        }
        2.0 * self.ring_half(bytes, n)
    }

    /// A ring reduce-scatter (or all-gather) of `bytes` over `n` ranks.
    pub fn half_secs(&self, bytes: f64, n: u64) -> f64 {
        if n <= 1 {
            return 0.0;
        }
        if self.halves_are_all_reduces {
            return self.ring_half(bytes, n) * 2.0;
        }
        self.ring_half(bytes, n)
    }

    fn ring_half(&self, bytes: f64, n: u64) -> f64 {
        let steps = (n - 1) as f64;
        steps * self.latency_secs + steps / n as f64 * bytes / self.bus_bytes_per_sec
    }
}

/// Predicted gradient communication of one optimizer step.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct DpCommTime {
    /// Time inside collectives, on any thread.
    pub comm_secs: f64,
    /// Time the training thread waits for them.
    pub exposed_secs: f64,
    /// Compute time lost to the communication thread when no core is spare for it (the
    /// collectives' copying and summing run on the training threads' cores).
    pub contention_secs: f64,
    /// Gradient buckets.
    pub buckets: usize,
}

/// What a data-parallel step communicates (see the module formulas).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpCommSetup {
    /// Data-parallel ranks.
    pub dp: u64,
    /// ZeRO stage 0, 1 or 2.
    pub zero: u8,
    /// Micro-steps per optimizer step (ZeRO-2 communicates in each).
    pub accum: u64,
    /// Gradient bucket size in bytes.
    pub bucket_bytes: u64,
    /// Buckets reduced on a communication thread during backward.
    pub overlap: bool,
    /// The host has a core for the communication thread beyond the training threads.
    pub spare_core: bool,
}

/// Communication of one step for model `d`, given the backward time of one micro-step.
pub fn dp_comm_time(
    d: &crate::cpu_runtime::CpuRuntimeDims,
    s: &DpCommSetup,
    backward_secs: f64,
    k: &CommCalibration,
) -> DpCommTime {
    let lens = grad_bucket_lens(d, s.bucket_bytes / F32_BYTES);
    let n = s.dp;
    let per_bucket: Vec<f64> = lens
        .iter()
        .map(|&e| {
            let bytes = (e * F32_BYTES) as f64;
            match s.zero {
                0 => k.all_reduce_secs(bytes, n),
                _ => k.half_secs(bytes, n),
            }
        })
        .collect();
    // After backward, never hidden: ZeRO's parameter all-gathers and the norm exchange.
    let after: f64 = if s.zero == 0 {
        0.0
    } else {
        let gathers: f64 = lens
            .iter()
            .map(|&e| k.half_secs((e * F32_BYTES) as f64, n))
            .sum();
        gathers + k.half_secs((2 * F32_BYTES * n) as f64, n)
    };
    let during: f64 = per_bucket.iter().sum();
    // Micro-steps that communicate during their backward.
    let communicating = if s.zero == 2 { s.accum.max(1) } else { 1 } as f64;
    let exposed_one = if s.overlap {
        let total: u64 = lens.iter().sum();
        let (mut ready, mut end) = (0.0f64, 0.0f64);
        for (&e, &t) in lens.iter().zip(&per_bucket) {
            ready += backward_secs * e as f64 / total.max(1) as f64;
            end = end.max(ready) + t;
        }
        (end - backward_secs).max(0.0)
    } else {
        during
    };
    // Without a spare core, overlap moves the collectives' CPU time into compute instead of
    // hiding it (measured: docs/performance.md, "Overlap").
    let contention_secs = if s.overlap && !s.spare_core {
        communicating * (during - exposed_one).max(0.0)
    } else {
        0.0
    };
    DpCommTime {
        comm_secs: communicating * during + after,
        exposed_secs: communicating * exposed_one + after,
        contention_secs,
        buckets: lens.len(),
    }
}

/// Tensor-parallel collectives of one optimizer step on one rank (Shoeybi et al. 2019, §3;
/// Korthikanti et al. 2022, §4.2.2 for sequence parallelism), with X = b·t·c f32 bytes:
///
/// ```text
/// per layer and micro-batch: 2 all-reduces(X) forward + 2 backward
///                            (sp: 4 all-gathers(X) + 4 reduce-scatters(X): the same bytes)
/// first stage (vocabulary-parallel embedding): 1 all-reduce(X) forward
/// last stage (vocabulary-parallel head): 1 all-reduce(X) backward (the input gradient), and the
///                            cross-entropy's per-token max and sum: 2 all-reduces(b·t·4)
/// tp comm = a · Σ (all on the training thread's critical path: nothing hides them)
/// ```
/// Ring phases (all-gathers, reduce-scatters; an all-reduce is two) of the tensor-parallel
/// collectives of one optimizer step on one rank, as [`tp_comm_secs`] counts them: every phase
/// is a rendezvous of the tp group. Zero without tensor parallelism.
pub fn tp_ring_phases(d: &crate::cpu_runtime::CpuRuntimeDims, accum: u64) -> f64 {
    if d.tp <= 1 {
        return 0.0;
    }
    // Per layer 4 all-reduces (sp: 4 all-gathers + 4 reduce-scatters); the embedding one
    // all-reduce; the head one all-reduce and the loss's two.
    let micro = 8.0 * d.layers as f64
        + if d.has_embedding { 2.0 } else { 0.0 }
        + if d.has_head { 6.0 } else { 0.0 };
    accum.max(1) as f64 * micro
}

pub fn tp_comm_secs(
    d: &crate::cpu_runtime::CpuRuntimeDims,
    batch: u64,
    seq: u64,
    accum: u64,
    sequence_parallel: bool,
    k: &CommCalibration,
) -> f64 {
    let n = d.tp;
    if n <= 1 {
        return 0.0;
    }
    let x = (batch * seq * d.channels * F32_BYTES) as f64;
    let layer = if sequence_parallel {
        4.0 * (k.half_secs(x, n) + k.half_secs(x, n))
    } else {
        4.0 * k.all_reduce_secs(x, n)
    };
    let mut micro = d.layers as f64 * layer;
    if d.has_embedding {
        micro += k.all_reduce_secs(x, n);
    }
    if d.has_head {
        micro +=
            k.all_reduce_secs(x, n) + 2.0 * k.all_reduce_secs((batch * seq * F32_BYTES) as f64, n);
    }
    accum.max(1) as f64 * micro
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_runtime::CpuRuntimeDims;

    fn dims() -> CpuRuntimeDims {
        CpuRuntimeDims {
            padded_vocab: 64,
            max_seq_len: 64,
            channels: 256,
            heads: 4,
            layers: 8,
            has_embedding: true,
            has_head: true,
            tp: 1,
        }
    }

    #[test]
    fn ring_formulas_and_overlap_hide_all_but_the_last_bucket() {
        let k = CommCalibration {
            latency_secs: 1e-5,
            bus_bytes_per_sec: 1e9,
            halves_are_all_reduces: false,
        };
        // 2 ranks: all-reduce = 2α + B/β.
        assert!((k.all_reduce_secs(1e6, 2) - (2e-5 + 1e-3)).abs() < 1e-12);
        assert_eq!(k.all_reduce_secs(1e6, 1), 0.0);
        let s = DpCommSetup {
            dp: 2,
            zero: 0,
            accum: 1,
            bucket_bytes: 1 << 20,
            overlap: false,
            spare_core: true,
        };
        let after = dp_comm_time(&dims(), &s, 0.5, &k);
        assert_eq!(after.exposed_secs, after.comm_secs);
        let over = dp_comm_time(&dims(), &DpCommSetup { overlap: true, ..s }, 0.5, &k);
        assert_eq!(over.comm_secs, after.comm_secs);
        // A long backward hides every layer's bucket but the first layer's, which becomes ready
        // just before the (small) embedding's: both are reduced after backward's end.
        let lens = grad_bucket_lens(&dims(), (1 << 20) / 4);
        let total: u64 = lens.iter().sum();
        let nb = lens.len();
        let (l0, emb) = (lens[nb - 2], lens[nb - 1]);
        let t = |e: u64| k.all_reduce_secs((e * 4) as f64, 2);
        let l0_ready = 0.5 * (1.0 - emb as f64 / total as f64);
        let expected = l0_ready + t(l0) + t(emb) - 0.5;
        assert!(
            (over.exposed_secs - expected).abs() < 1e-9,
            "{over:?} vs {expected}"
        );
        assert!(over.exposed_secs < 0.1 * over.comm_secs);
        assert_eq!(over.contention_secs, 0.0);
        // Without a spare core the hidden part comes back as lost compute.
        let busy = dp_comm_time(
            &dims(),
            &DpCommSetup {
                overlap: true,
                spare_core: false,
                ..s
            },
            0.5,
            &k,
        );
        assert!((busy.contention_secs + busy.exposed_secs - after.exposed_secs).abs() < 1e-12);
        // A backward shorter than the communication hides less.
        let short = dp_comm_time(&dims(), &DpCommSetup { overlap: true, ..s }, 1e-4, &k);
        assert!(short.exposed_secs > over.exposed_secs);
        // ZeRO-2 with 4 micro-steps reduce-scatters 4 times, all-gathers once.
        let z1 = dp_comm_time(&dims(), &DpCommSetup { zero: 1, ..s }, 0.5, &k);
        let z2 = dp_comm_time(
            &dims(),
            &DpCommSetup {
                zero: 2,
                accum: 4,
                ..s
            },
            0.5,
            &k,
        );
        assert!(z2.comm_secs > 2.0 * z1.comm_secs);
        // Over MPI the ZeRO collectives are whole all-reduces: twice the time.
        let m = CommCalibration {
            halves_are_all_reduces: true,
            ..k
        };
        let z1m = dp_comm_time(&dims(), &DpCommSetup { zero: 1, ..s }, 0.5, &m);
        assert!((z1m.comm_secs - 2.0 * z1.comm_secs).abs() < 1e-12);
    }

    #[test]
    fn tensor_parallel_comm_is_four_all_reduces_per_layer_and_micro_batch() {
        let k = CommCalibration {
            latency_secs: 1e-5,
            bus_bytes_per_sec: 1e9,
            halves_are_all_reduces: false,
        };
        let d = CpuRuntimeDims {
            tp: 2,
            has_embedding: false,
            has_head: false,
            layers: 3,
            ..dims()
        };
        // X = 4·64·256·4 bytes; tp 2: all-reduce = 2α + X/β.
        let x = 4.0 * 64.0 * 256.0 * 4.0;
        let ar = 2e-5 + x / 1e9;
        let one = tp_comm_secs(&d, 4, 64, 1, false, &k);
        assert!((one - 3.0 * 4.0 * ar).abs() < 1e-12, "{one}");
        assert!((tp_comm_secs(&d, 4, 64, 3, false, &k) - 3.0 * one).abs() < 1e-12);
        // Sequence parallelism moves the same bytes in twice the messages.
        let sp = tp_comm_secs(&d, 4, 64, 1, true, &k);
        assert!((sp - 3.0 * 8.0 * (1e-5 + x / 2e9)).abs() < 1e-12, "{sp}");
        // The embedding and head add one all-reduce of X each, the loss two of b·t floats.
        let both = CpuRuntimeDims {
            has_embedding: true,
            has_head: true,
            ..d
        };
        let small = 2e-5 + 4.0 * 64.0 * 4.0 / 1e9;
        let extra = tp_comm_secs(&both, 4, 64, 1, false, &k) - one;
        assert!((extra - (2.0 * ar + 2.0 * small)).abs() < 1e-12, "{extra}");
        assert_eq!(tp_comm_secs(&dims(), 4, 64, 1, false, &k), 0.0);
        // Phases: with free bandwidth every phase of tp 2 costs one message's latency.
        let free = CommCalibration {
            bus_bytes_per_sec: f64::INFINITY,
            ..k
        };
        for (dims, sp) in [(d, false), (d, true), (both, false), (both, true)] {
            let phases = tp_ring_phases(&dims, 3);
            let t = tp_comm_secs(&dims, 4, 64, 3, sp, &free);
            assert!((t - phases * 1e-5).abs() < 1e-15, "{phases} {t}");
        }
        assert_eq!(tp_ring_phases(&dims(), 1), 0.0);
    }
}
