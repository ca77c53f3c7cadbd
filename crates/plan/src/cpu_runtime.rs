//! Memory profile of the scaletrain CPU runtime (`crates/model`): exactly the `f32` buffers it
//! allocates, as pure functions over plain numbers. `crates/model` sizes its buffers from its
//! own layout walk and a test (`model/tests/allocation.rs`, counting global allocator) checks
//! real allocations against these formulas within 1%.
//!
//! Legend: b = micro-batch, t = sequence, c = channels, cl = c / tp (local channels),
//! nhl = heads / tp, vp = vocabulary padded to a multiple of 64, vpl = vp / tp (the rows of the
//! tied `wte` one tensor-parallel rank holds: vocabulary-parallel embedding and LM head,
//! Shoeybi et al. 2019 §3), L = layers held by this stage.
//!
//! What the runtime stores (GPT-2, pre-norm, tied LM head; Radford et al. 2019):
//! - parameters, gradients: one `f32` each per parameter; AdamW moments: two (Loshchilov &
//!   Hutter 2019). No master copies: the runtime trains in f32.
//! - activations saved for backward, per layer (cf. Korthikanti et al. 2022, §4.1, which counts
//!   the same tensors for half precision; we keep f32 and store the softmax probabilities but
//!   not the pre-softmax scores, and no dropout masks):
//!   `ln1, res2, ln2, res3` (4·btc) + `ln1/ln2 mean, rstd` (4·bt) + `qkv` (3·bt·cl) +
//!   `atty` (bt·cl) + `att` (b·nhl·t²) + `fch, fch_gelu` (8·bt·cl).
//! - the stage input (btc); on the last stage `lnf` (btc), its mean/rstd (2·bt), `logits`
//!   (bt·vpl, turned into their gradient in place), per-token `losses` and `lse` (2·bt).
//! - scratch shared by all layers: `tmp` (btc, the row-parallel partial in forward, the
//!   layernorm input gradient in backward), `d_res`, `d_ln` (2·btc), two (bt·4cl) buffers for
//!   MLP/attention gradients and `d_att` (b·t²).

use crate::recipe::{Precision, Recompute};

mod panels;
mod zero3;
pub use panels::{weight_panel_bytes, weight_panel_floats};
pub use zero3::{
    zero3_comm_time, zero3_comm_time_with, zero3_gathers_per_step, zero3_memory, zero3_memory_sp,
    zero3_memory_with, zero3_unit_lens, ZERO3_GATHER_SLOTS,
};

/// Model dimensions as the CPU runtime sees them for one pipeline stage and one
/// tensor-parallel rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuRuntimeDims {
    /// Vocabulary padded to a multiple of 64 (`vp`).
    pub padded_vocab: u64,
    /// Maximum sequence length (rows of the position embedding).
    pub max_seq_len: u64,
    /// Model width `c`.
    pub channels: u64,
    /// Attention heads in the whole model.
    pub heads: u64,
    /// Transformer layers held by this stage.
    pub layers: u64,
    /// Whether this stage holds the token/position embeddings (first stage).
    pub has_embedding: bool,
    /// Whether this stage holds the final norm, LM head and loss (last stage). When it does not
    /// also hold the embedding, it keeps its own copy of the tied `wte` for the head.
    pub has_head: bool,
    /// Tensor-parallel degree `tp` (heads, MLP columns and the vocabulary split `tp` ways).
    pub tp: u64,
}

/// Bytes per stored element (`f32`).
pub const F32_BYTES: u64 = 4;

/// `vocab` rounded up to a multiple of 64, as the runtime pads it.
pub fn padded_vocab(vocab: u64) -> u64 {
    vocab.div_ceil(64) * 64
}

/// Parameters held by this stage/rank (elements).
pub fn param_count(d: &CpuRuntimeDims) -> u64 {
    let (c, cl, vpl) = (d.channels, d.channels / d.tp, d.padded_vocab / d.tp);
    let embedding = vpl * c + d.max_seq_len * c; // wte rows split, wpe replicated
    let per_layer = 2 * c          // ln_1 weight, bias
        + 3 * cl * c + 3 * cl      // c_attn weight (3cl, c), bias
        + c * cl + c               // attn c_proj weight (c, cl), bias (replicated)
        + 2 * c                    // ln_2
        + 4 * cl * c + 4 * cl      // c_fc weight (4cl, c), bias
        + c * 4 * cl + c; // mlp c_proj weight (c, 4cl), bias (replicated)
    let mut n = d.layers * per_layer;
    if d.has_embedding {
        n += embedding;
    }
    if d.has_head {
        n += 2 * c; // ln_f
        if !d.has_embedding {
            n += vpl * c; // own copy of the tied wte (this rank's rows)
        }
    }
    n
}

/// Bytes of the parameter buffer.
pub fn param_bytes(d: &CpuRuntimeDims) -> u64 {
    F32_BYTES * param_count(d)
}

/// Bytes of the gradient buffer (same layout as the parameters).
pub fn grad_bytes(d: &CpuRuntimeDims) -> u64 {
    F32_BYTES * param_count(d)
}

/// Bytes of the AdamW state (`m` and `v`).
pub fn optimizer_bytes(d: &CpuRuntimeDims) -> u64 {
    2 * F32_BYTES * param_count(d)
}

/// Elements of the activation buffers saved between forward and backward.
pub fn saved_activation_count(d: &CpuRuntimeDims, batch: u64, seq: u64) -> u64 {
    let (c, cl, nhl) = (d.channels, d.channels / d.tp, d.heads / d.tp);
    let bt = batch * seq;
    let per_layer =
        4 * bt * c + 4 * bt + 3 * bt * cl + bt * cl + batch * nhl * seq * seq + 8 * bt * cl;
    let mut n = bt * c + d.layers * per_layer;
    if d.has_head {
        n += bt * c + 2 * bt + bt * (d.padded_vocab / d.tp) + 2 * bt;
    }
    n
}

/// Elements of the scratch buffers shared across layers (forward partials, backward gradients).
pub fn scratch_activation_count(d: &CpuRuntimeDims, batch: u64, seq: u64) -> u64 {
    let (c, cl) = (d.channels, d.channels / d.tp);
    let bt = batch * seq;
    3 * bt * c + 2 * bt * 4 * cl + batch * seq * seq
}

/// Bytes of all activation buffers for one (micro-batch, sequence) shape: saved + scratch.
pub fn activation_bytes(d: &CpuRuntimeDims, batch: u64, seq: u64) -> u64 {
    F32_BYTES * (saved_activation_count(d, batch, seq) + scratch_activation_count(d, batch, seq))
}

/// The CPU runtime's memory for one stage/rank, by category.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuRuntimeMemory {
    /// Parameter buffer.
    pub param_bytes: u64,
    /// Gradient buffer.
    pub grad_bytes: u64,
    /// AdamW `m` and `v`.
    pub optimizer_bytes: u64,
    /// Activations for one micro-batch shape (saved + scratch).
    pub activation_bytes: u64,
    /// Packed weight panels ([`weight_panel_bytes`]): 0 unless the runtime packs them (fp32
    /// on its AVX-512 kernel with more than one micro-batch per step; the trainer decides and
    /// fills this in).
    pub weight_panel_bytes: u64,
}

impl CpuRuntimeMemory {
    /// Sum of all categories.
    pub fn total_bytes(&self) -> u64 {
        self.param_bytes
            + self.grad_bytes
            + self.optimizer_bytes
            + self.activation_bytes
            + self.weight_panel_bytes
    }
}

/// The "scaletrain CPU runtime" memory profile for one stage/rank and micro-batch shape.
pub fn memory(d: &CpuRuntimeDims, batch: u64, seq: u64) -> CpuRuntimeMemory {
    CpuRuntimeMemory {
        param_bytes: param_bytes(d),
        grad_bytes: grad_bytes(d),
        optimizer_bytes: optimizer_bytes(d),
        activation_bytes: activation_bytes(d, batch, seq),
        weight_panel_bytes: 0,
    }
}

/// The CPU runtime's memory for one pipeline rank holding the model chunks `chunks` (one per
/// virtual stage it runs), each with the number of saved activation sets its schedule keeps in
/// flight (`plan::schedule` lists: at most pp − stage for 1F1B, m for GPipe): parameters,
/// gradients and AdamW state of every chunk, `sets` saved sets per chunk, one scratch shared by
/// all, and — between stages — one receive buffer each for an activation and a gradient
/// (b·t·c each).
pub fn stage_memory(
    chunks: &[(CpuRuntimeDims, u64)],
    batch: u64,
    seq: u64,
    pipelined: bool,
) -> CpuRuntimeMemory {
    let sum = |f: &dyn Fn(&CpuRuntimeDims) -> u64| chunks.iter().map(|(d, _)| f(d)).sum::<u64>();
    let saved: u64 = chunks
        .iter()
        .map(|(d, sets)| sets.max(&1) * saved_activation_count(d, batch, seq))
        .sum();
    let scratch = chunks
        .first()
        .map_or(0, |(d, _)| scratch_activation_count(d, batch, seq));
    let recv = if pipelined {
        2 * batch * seq * chunks.first().map_or(0, |(d, _)| d.channels)
    } else {
        0
    };
    CpuRuntimeMemory {
        param_bytes: sum(&param_bytes),
        grad_bytes: sum(&grad_bytes),
        optimizer_bytes: sum(&optimizer_bytes),
        activation_bytes: F32_BYTES * (saved + scratch + recv),
        weight_panel_bytes: 0,
    }
}

/// [`stage_memory`] for a tensor-parallel rank with sequence parallelism on or off
/// ([`saved_activation_elems_sp`], [`scratch_activation_elems_sp`]; the receive buffers hold
/// this rank's b·t/tp rows under it).
pub fn stage_memory_sp(
    chunks: &[(CpuRuntimeDims, u64)],
    batch: u64,
    seq: u64,
    pipelined: bool,
    sequence_parallel: bool,
) -> CpuRuntimeMemory {
    let sum = |f: &dyn Fn(&CpuRuntimeDims) -> u64| chunks.iter().map(|(d, _)| f(d)).sum::<u64>();
    let sp = sequence_parallel;
    let saved: u64 = chunks
        .iter()
        .map(|(d, sets)| {
            sets.max(&1) * saved_activation_elems_sp(d, batch, seq, Recompute::None, sp).bytes(4)
        })
        .sum();
    let scratch = chunks.first().map_or(0, |(d, _)| {
        scratch_activation_elems_sp(d, batch, seq, Recompute::None, sp).bytes(4)
    });
    let recv = match chunks.first() {
        Some((d, _)) if pipelined => {
            let rows = if sp { batch * seq / d.tp } else { batch * seq };
            F32_BYTES * 2 * rows * d.channels
        }
        _ => 0,
    };
    CpuRuntimeMemory {
        param_bytes: sum(&param_bytes),
        grad_bytes: sum(&grad_bytes),
        optimizer_bytes: sum(&optimizer_bytes),
        activation_bytes: saved + scratch + recv,
        weight_panel_bytes: 0,
    }
}

/// Elements of rank `rank`'s shard when a `len`-element flat buffer is split over `dp` ranks by
/// contiguous offset ranges, the first `len % dp` shards one element longer (the split
/// `comm::shard_range` and the trainer's ZeRO use).
pub fn shard_len(len: u64, dp: u64, rank: u64) -> u64 {
    len / dp + u64::from(rank < len % dp)
}

/// Rotating gradient buffers ZeRO-2 keeps in place of a full-size gradient buffer (besides one
/// for the last bucket, which holds the tied embedding: the LM head writes it first and it is
/// final only after the embedding): one that backward fills while the other is reduced on the
/// communication thread.
pub const ZERO2_GRAD_BUFFERS: u64 = 2;

/// Elements of the runtime's gradient buckets for `d`, in the order backward finishes them:
/// the flat buffer's regions (head: `ln_f` plus, without the embedding, the LM head's own
/// `wte`; then each layer, last to first; then the embedding) are grouped, each bucket closing
/// at the first region boundary where it holds at least `bucket_elems`. The runtime's
/// `train::dp::buckets` computes the same split from the parameter layout (a test compares them).
pub fn grad_bucket_lens(d: &CpuRuntimeDims, bucket_elems: u64) -> Vec<u64> {
    let per_layer = CpuRuntimeDims {
        layers: 1,
        has_embedding: false,
        has_head: false,
        ..*d
    };
    let mut regions = Vec::new();
    if d.has_head {
        regions.push(
            2 * d.channels
                + if d.has_embedding {
                    0
                } else {
                    d.padded_vocab / d.tp * d.channels
                },
        );
    }
    regions.extend((0..d.layers).map(|_| param_count(&per_layer)));
    if d.has_embedding {
        regions.push(d.padded_vocab / d.tp * d.channels + d.max_seq_len * d.channels);
    }
    let mut out = Vec::new();
    let mut acc = 0;
    for r in regions {
        acc += r;
        if acc > 0 && acc >= bucket_elems.max(1) {
            out.push(acc);
            acc = 0;
        }
    }
    if acc > 0 {
        out.push(acc);
    }
    out
}

/// Elements of ZeRO-2's gradient buffers for buckets `lens` (in backward's order): the last
/// bucket's own buffer plus [`ZERO2_GRAD_BUFFERS`] rotating buffers as large as the largest
/// other bucket.
pub fn zero2_buffer_elems(lens: &[u64]) -> u64 {
    let Some((last, others)) = lens.split_last() else {
        return 0;
    };
    let largest = others.iter().copied().max().unwrap_or(0);
    last + ZERO2_GRAD_BUFFERS.min(others.len() as u64) * largest
}

/// The CPU runtime's memory of data-parallel rank `rank` of `dp` under ZeRO `stage` (0, 1 or 2;
/// Rajbhandari et al. 2020, §5) with gradient buckets of `bucket_bytes`. A rank owns the piece
/// `shard_len(bucket, dp, rank)` of every bucket. Stage 1 keeps only those pieces of AdamW `m`
/// and `v`; stage 2 also keeps only its pieces of the *reduced* gradient, and backward writes
/// into one buffer for the last bucket plus [`ZERO2_GRAD_BUFFERS`] buffers the size of the
/// largest other bucket (fewer when there are fewer buckets) instead of a full-size gradient
/// buffer. Parameters stay replicated.
pub fn zero_memory(
    d: &CpuRuntimeDims,
    batch: u64,
    seq: u64,
    stage: u8,
    dp: u64,
    rank: u64,
    bucket_bytes: u64,
) -> CpuRuntimeMemory {
    let mut m = memory(d, batch, seq);
    let buckets = grad_bucket_lens(d, bucket_bytes / F32_BYTES);
    let owned: u64 = buckets.iter().map(|&b| shard_len(b, dp.max(1), rank)).sum();
    if stage >= 1 {
        m.optimizer_bytes = 2 * F32_BYTES * owned;
    }
    if stage >= 2 {
        m.grad_bytes = F32_BYTES * (zero2_buffer_elems(&buckets) + owned);
    }
    m
}

/// Activation elements of one kind of buffer, split by element type: `compute` elements are
/// stored in the run's precision (4 bytes fp32, 2 bytes bf16/fp16), `f32` elements are always
/// 4 bytes (layernorm mean/rstd, per-token losses and log-sum-exps, the gradient scratch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActivationElems {
    /// Elements in the compute precision.
    pub compute: u64,
    /// Elements always kept in `f32`.
    pub f32: u64,
}

impl ActivationElems {
    /// Bytes at `compute_bytes` per compute element.
    pub fn bytes(&self, compute_bytes: u64) -> u64 {
        compute_bytes * self.compute + F32_BYTES * self.f32
    }
    /// All elements.
    pub fn total(&self) -> u64 {
        self.compute + self.f32
    }
}

/// Bytes of one stored element in `precision` (activations, working weights, gradients).
pub fn compute_bytes(precision: Precision) -> u64 {
    match precision {
        Precision::Fp32 => 4,
        Precision::Bf16Mixed | Precision::Fp16Mixed => 2,
    }
}

/// Saved activations of one micro-batch under `recompute` (Korthikanti et al. 2022, §4):
/// - `None`: as [`saved_activation_count`];
/// - `Selective`: without the softmax probabilities `att` (b·nhl·t² per layer), rebuilt from
///   `qkv` in backward;
/// - `Full`: per layer only its output (bt·c; the next layer's input), plus the stage input and
///   the head's tensors.
pub fn saved_activation_elems(
    d: &CpuRuntimeDims,
    batch: u64,
    seq: u64,
    recompute: Recompute,
) -> ActivationElems {
    saved_activation_elems_sp(d, batch, seq, recompute, false)
}

/// [`saved_activation_elems`] with sequence parallelism on or off (Korthikanti et al. 2022,
/// §4.2.2): with it the layer norms' outputs and statistics, the residual stream (`res2`,
/// `res3`, the stage input) and `lnf` hold `btl = bt/tp` rows; `qkv`, `atty`, `att`, the MLP
/// tensors and the logits keep all bt rows (they are split by heads, columns or vocabulary
/// instead). `tp` must divide b·t.
pub fn saved_activation_elems_sp(
    d: &CpuRuntimeDims,
    batch: u64,
    seq: u64,
    recompute: Recompute,
    sequence_parallel: bool,
) -> ActivationElems {
    let (c, cl, nhl) = (d.channels, d.channels / d.tp, d.heads / d.tp);
    let bt = batch * seq;
    let btl = if sequence_parallel { bt / d.tp } else { bt };
    let att = batch * nhl * seq * seq;
    let body = 3 * btl * c + 3 * bt * cl + bt * cl + 8 * bt * cl; // ln1, res2, ln2, qkv, atty, fch, fch_gelu
    let (per_layer, per_layer_f32) = match recompute {
        Recompute::None => (body + att + btl * c, 4 * btl),
        Recompute::Selective => (body + btl * c, 4 * btl),
        Recompute::Full => (btl * c, 0),
    };
    let mut e = ActivationElems {
        compute: btl * c + d.layers * per_layer,
        f32: d.layers * per_layer_f32,
    };
    if d.has_head {
        e.compute += btl * c + bt * (d.padded_vocab / d.tp); // lnf, this rank's logit columns
        e.f32 += 2 * btl + 2 * bt; // lnf mean/rstd, losses, lse
    }
    e
}

/// Scratch shared by the layers and micro-batches under `recompute`: the `f32` gradient
/// buffers of [`scratch_activation_count`], plus a one-layer workspace for what backward
/// rebuilds (`att` for `Selective`; every layer tensor but its output for `Full`).
pub fn scratch_activation_elems(
    d: &CpuRuntimeDims,
    batch: u64,
    seq: u64,
    recompute: Recompute,
) -> ActivationElems {
    scratch_activation_elems_sp(d, batch, seq, recompute, false)
}

/// [`scratch_activation_elems`] with sequence parallelism on or off: with it the residual
/// gradient `d_res` holds btl·c, the workspace's norm/residual tensors btl rows, and a 6c
/// buffer holds one layer's partial norm/bias gradients; `tmp` and `d_ln` stay bt·c (they
/// receive the all-gathers).
pub fn scratch_activation_elems_sp(
    d: &CpuRuntimeDims,
    batch: u64,
    seq: u64,
    recompute: Recompute,
    sequence_parallel: bool,
) -> ActivationElems {
    let (c, cl, nhl) = (d.channels, d.channels / d.tp, d.heads / d.tp);
    let bt = batch * seq;
    let btl = if sequence_parallel { bt / d.tp } else { bt };
    let att = batch * nhl * seq * seq;
    let rep = if sequence_parallel { 6 * c } else { 0 };
    let mut e = ActivationElems {
        compute: 0,
        f32: 2 * bt * c + btl * c + 2 * bt * 4 * cl + batch * seq * seq + rep,
    };
    if d.layers > 0 {
        match recompute {
            Recompute::None => {}
            Recompute::Selective => e.compute += att,
            Recompute::Full => {
                e.compute += 3 * btl * c + 3 * bt * cl + bt * cl + 8 * bt * cl + att;
                e.f32 += 4 * btl;
            }
        }
    }
    e
}

/// Bytes of the activation buffers (saved + scratch) for `precision` and `recompute`, with
/// `in_flight` micro-batches' saved sets and one scratch.
pub fn activation_bytes_with(
    d: &CpuRuntimeDims,
    batch: u64,
    seq: u64,
    precision: Precision,
    recompute: Recompute,
    in_flight: u64,
) -> u64 {
    activation_bytes_sp(d, batch, seq, precision, recompute, in_flight, false)
}

/// [`activation_bytes_with`] with sequence parallelism on or off (per tensor-parallel rank).
pub fn activation_bytes_sp(
    d: &CpuRuntimeDims,
    batch: u64,
    seq: u64,
    precision: Precision,
    recompute: Recompute,
    in_flight: u64,
    sequence_parallel: bool,
) -> u64 {
    let e = compute_bytes(precision);
    in_flight * saved_activation_elems_sp(d, batch, seq, recompute, sequence_parallel).bytes(e)
        + scratch_activation_elems_sp(d, batch, seq, recompute, sequence_parallel).bytes(e)
}

/// The runtime's memory for `precision` and `recompute` (one micro-batch in flight). fp32:
/// as [`memory`]. Mixed precision: `param_bytes` = fp32 master (4 B) + working copy in 16 bits
/// (2 B) per parameter, gradients 2 B, AdamW `m`, `v` 8 B: 16 B/param, the ZeRO paper's count
/// (Rajbhandari et al. 2020, §3.1).
pub fn memory_with(
    d: &CpuRuntimeDims,
    batch: u64,
    seq: u64,
    precision: Precision,
    recompute: Recompute,
) -> CpuRuntimeMemory {
    let n = param_count(d);
    let e = compute_bytes(precision);
    let (param_bytes, grad_bytes) = match precision {
        Precision::Fp32 => (F32_BYTES * n, F32_BYTES * n),
        _ => ((F32_BYTES + e) * n, e * n),
    };
    CpuRuntimeMemory {
        param_bytes,
        grad_bytes,
        optimizer_bytes: optimizer_bytes(d),
        activation_bytes: activation_bytes_with(d, batch, seq, precision, recompute, 1),
        weight_panel_bytes: 0,
    }
}

/// The trainer's buffers on one rank under `precision` and `recompute`, from the fp32 profile
/// `base` of the same rank ([`memory`], [`zero_memory`] or [`stage_memory`]) for the chunks
/// `chunks` (each with the saved activation sets its schedule keeps in flight):
/// - activations re-counted by element type: the saved sets and the scratch of
///   [`activation_bytes_with`], plus between pipeline stages (`pipelined`) the two `f32`
///   receive buffers and, under mixed precision, one `f32` buffer the outgoing 16-bit
///   activation is widened into (b·t·c each);
/// - under mixed precision, a 16-bit working copy of the weights (beside the fp32 master in
///   `base`) and a 16-bit gradient buffer that backward writes one micro-batch into before it
///   is added to the `f32` gradients of `base`, which the data-parallel reduction and AdamW
///   read (Megatron-LM's fp32 gradient buffers: 4 + 2 + 2 + 4 + 8 = 20 B/param before
///   ZeRO; ZeRO-2's `f32` buckets replace the full `f32` buffer as in [`zero_memory`]).
///
/// For fp32 without recomputation this is `base` unchanged; otherwise activations are counted
/// without sequence parallelism ([`trainer_memory_sp`] counts them with it).
pub fn trainer_memory(
    base: CpuRuntimeMemory,
    chunks: &[(CpuRuntimeDims, u64)],
    batch: u64,
    seq: u64,
    pipelined: bool,
    precision: Precision,
    recompute: Recompute,
) -> CpuRuntimeMemory {
    trainer_memory_sp(
        base,
        chunks,
        batch,
        seq,
        pipelined,
        (precision, recompute),
        false,
    )
}

/// [`trainer_memory`] for a tensor-parallel rank with sequence parallelism on or off: the saved
/// sets and scratch of [`saved_activation_elems_sp`] / [`scratch_activation_elems_sp`], and the
/// stage-boundary buffers hold this rank's b·t/tp rows under it.
pub fn trainer_memory_sp(
    base: CpuRuntimeMemory,
    chunks: &[(CpuRuntimeDims, u64)],
    batch: u64,
    seq: u64,
    pipelined: bool,
    (precision, recompute): (Precision, Recompute),
    sequence_parallel: bool,
) -> CpuRuntimeMemory {
    if precision == Precision::Fp32 && recompute == Recompute::None {
        return base;
    }
    let sp = sequence_parallel;
    let e = compute_bytes(precision);
    let mixed = precision != Precision::Fp32;
    let n: u64 = chunks.iter().map(|(d, _)| param_count(d)).sum();
    let saved: u64 = chunks
        .iter()
        .map(|(d, sets)| {
            sets.max(&1) * saved_activation_elems_sp(d, batch, seq, recompute, sp).bytes(e)
        })
        .sum();
    let scratch = chunks.first().map_or(0, |(d, _)| {
        scratch_activation_elems_sp(d, batch, seq, recompute, sp).bytes(e)
    });
    let boundary = match chunks.first() {
        Some((d, _)) if pipelined => {
            let rows = if sp { batch * seq / d.tp } else { batch * seq };
            F32_BYTES * rows * d.channels * if mixed { 3 } else { 2 }
        }
        _ => 0,
    };
    CpuRuntimeMemory {
        param_bytes: base.param_bytes + if mixed { e * n } else { 0 },
        grad_bytes: base.grad_bytes + if mixed { e * n } else { 0 },
        optimizer_bytes: base.optimizer_bytes,
        activation_bytes: saved + scratch + boundary,
        weight_panel_bytes: base.weight_panel_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt2_small() -> CpuRuntimeDims {
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

    #[test]
    fn gpt2_small_has_124m_parameters_plus_padding() {
        // GPT-2 small: 124,439,808 parameters with vocab 50257 (nanoGPT); padding to 50304
        // adds 47 · 768 = 36,096.
        assert_eq!(padded_vocab(50257), 50304);
        assert_eq!(param_count(&gpt2_small()), 124_439_808 + 47 * 768);
    }

    #[test]
    fn tensor_parallel_shards_split_the_layer_matrices() {
        let full = gpt2_small();
        let shard = CpuRuntimeDims { tp: 4, ..full };
        let c = 768;
        // matrices + column-split biases; norms, row-parallel biases and wpe stay replicated,
        // the tied wte's rows are split too.
        let per_layer_split = 12 * c * c + 3 * c + 4 * c;
        let wte = 50304 * c;
        let expected = param_count(&full) - (12 * per_layer_split + wte) * 3 / 4;
        assert_eq!(param_count(&shard), expected);
    }

    #[test]
    fn precision_and_recompute_formulas_reduce_to_the_fp32_counts() {
        let d = gpt2_small();
        let saved = saved_activation_elems(&d, 2, 256, Recompute::None);
        let scratch = scratch_activation_elems(&d, 2, 256, Recompute::None);
        assert_eq!(saved.total(), saved_activation_count(&d, 2, 256));
        assert_eq!(scratch.total(), scratch_activation_count(&d, 2, 256));
        let fp32 = memory_with(&d, 2, 256, Precision::Fp32, Recompute::None);
        assert_eq!(fp32, memory(&d, 2, 256));
        // bf16: activations shrink (not quite by 2: statistics and the scratch stay f32),
        // weights + gradients + AdamW stay 16 B/param.
        let bf = memory_with(&d, 2, 256, Precision::Bf16Mixed, Recompute::None);
        assert!(bf.activation_bytes < fp32.activation_bytes);
        assert!(2 * bf.activation_bytes > fp32.activation_bytes);
        let n = param_count(&d);
        assert_eq!(bf.param_bytes + bf.grad_bytes + bf.optimizer_bytes, 16 * n);
        // Recomputation: full < selective < none.
        let f = |r| activation_bytes_with(&d, 2, 256, Precision::Bf16Mixed, r, 1);
        assert!(f(Recompute::Full) < f(Recompute::Selective));
        assert!(f(Recompute::Selective) < f(Recompute::None));
    }

    #[test]
    fn sequence_parallelism_shrinks_only_the_sequence_split_tensors() {
        let full = gpt2_small();
        let d = CpuRuntimeDims { tp: 4, ..full };
        for r in [Recompute::None, Recompute::Selective, Recompute::Full] {
            // off: the existing formulas
            assert_eq!(
                saved_activation_elems_sp(&d, 2, 256, r, false),
                saved_activation_elems(&d, 2, 256, r)
            );
            let f = |sp| activation_bytes_sp(&d, 2, 256, Precision::Fp32, r, 1, sp);
            assert!(f(true) < f(false), "{r:?}");
        }
        // saved, no recomputation, per layer: 4 btc + 4 bt of the 4 btc + 4 bt shrink by tp
        let (bt, c) = (512, 768);
        let per_layer_saving = (4 * bt * c + 4 * bt) * 3 / 4;
        let saved = |sp| saved_activation_elems_sp(&d, 2, 256, Recompute::None, sp).total();
        let head_and_input = (bt * c + bt * c + 2 * bt) * 3 / 4;
        assert_eq!(
            saved(false) - saved(true),
            12 * per_layer_saving + head_and_input
        );
    }

    #[test]
    fn activations_grow_linearly_in_batch() {
        let d = gpt2_small();
        let a1 = activation_bytes(&d, 1, 256);
        let a2 = activation_bytes(&d, 2, 256);
        assert_eq!(a2, 2 * a1);
    }

    #[test]
    fn buckets_cover_the_parameters_and_zero2_keeps_three_buckets_plus_a_shard() {
        let d = CpuRuntimeDims {
            layers: 8,
            ..gpt2_small()
        };
        let per_layer = (param_count(&d) - param_count(&CpuRuntimeDims { layers: 0, ..d })) / 8;
        for elems in [1, per_layer, 3 * per_layer, u64::MAX] {
            let b = grad_bucket_lens(&d, elems);
            assert_eq!(b.iter().sum::<u64>(), param_count(&d), "{elems}");
        }
        // One bucket per region: head, 8 layers, embedding.
        assert_eq!(grad_bucket_lens(&d, 1).len(), 10);
        let z0 = zero_memory(&d, 1, 64, 0, 4, 0, 4 * per_layer);
        let z2 = zero_memory(&d, 1, 64, 2, 4, 0, 4 * per_layer);
        // Buckets: ln_f + layer 8, then layers one by one, then the embedding.
        let embedding = d.padded_vocab * d.channels + d.max_seq_len * d.channels;
        let owned = z2.optimizer_bytes / 8;
        let buffers = embedding + 2 * (per_layer + 2 * d.channels);
        assert_eq!(z2.grad_bytes, 4 * (buffers + owned));
        assert!(z2.grad_bytes < z0.grad_bytes);
        assert!(owned.abs_diff(param_count(&d) / 4) <= 10);
    }
}
