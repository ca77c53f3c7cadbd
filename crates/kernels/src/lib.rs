//! scaletrain-kernels: CPU kernels over flat slices of `f32`, bf16 or fp16 ([`Elem`]); every
//! kernel computes in `f32` (16-bit data is converted on load and rounded on store; bf16
//! matmuls run on AMX where the CPU has it). See `docs/runtime.md`, "Mixed precision".
//!
//! Shape legend used throughout (llm.c's): `b` = batch, `t` = sequence, `c` = channels,
//! `nh` = heads, `hs` = head size (`c / nh`), `v` = vocabulary, `vp` = padded vocabulary,
//! `m, k, n` = matmul dims.
//!
//! Every op is a pair of free functions, outputs first. Conventions, stated once:
//! - forward functions overwrite their outputs;
//! - backward functions **accumulate** (`+=`) into parameter gradients (so gradient
//!   accumulation needs no extra buffer) and **overwrite** activation gradients;
//! - mismatched slice lengths are bugs and panic with a message naming the slice.
//!
//! Parallelism is always an explicit [`Par`] argument; there is no process-wide pool. A
//! `Par::Threads(n)` call splits its rows into `n` chunks (`split_rows`, the same split at every
//! call), runs the first on the calling thread and hands the others to that thread's own
//! persistent workers (`pool`: created on its first call, woken per call, parked when idle), so a
//! call no longer pays a thread spawn + join (75–165 µs on the development VM). Kernels still
//! skip threading below a minimum amount of work. See `docs/runtime.md`.
//!
//! This crate knows nothing about layers, ranks or models. It has no error enum: nothing a user
//! supplies reaches these functions unchecked (the `model` crate validates), so every failure
//! here is a bug and panics.

// Kernels take many slices by design (outputs first, then inputs, then dims), as llm.c does.
#![allow(clippy::too_many_arguments)]

pub mod adamw;
mod amx;
pub mod attention;
mod avx512;
mod avx512bf16;
pub mod crossentropy;
pub mod elem;
pub mod encoder;
pub mod fastmath;
pub mod gelu;
pub mod gemm;
pub mod layernorm;
pub mod matmul;
pub mod panels;
pub mod residual;
pub mod rng;

mod pool;

/// Runs `f(job)` for every job in parallel, the first on the calling thread and the others on
/// its persistent kernel workers (see `pool.rs`), and returns when all have finished; a panic
/// in a job is re-raised here. For callers outside this crate that split their own work (e.g.
/// an optimizer over a flat buffer); one job per thread.
pub fn par_jobs<J: Send, F: Fn(J) + Sync>(jobs: Vec<J>, f: F) {
    pool::run_jobs(jobs, f)
}

#[cfg(test)]
mod mixed_tests;
#[cfg(test)]
pub(crate) mod testutil;

use std::ops::Range;

pub use elem::{Bf16, Elem, F16};

/// True when `T` is `f32` (the kernels then take their plain `f32` path, unchanged).
#[inline]
pub(crate) fn is_f32<T: 'static>() -> bool {
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
}

/// How many threads a kernel may use. Always passed explicitly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Par {
    /// Run on the calling thread only.
    Seq,
    /// Split the work over this many threads (the caller's thread counts as one); must be ≥ 1.
    Threads(usize),
}

impl Par {
    /// The number of threads this value allows (≥ 1).
    pub fn threads(self) -> usize {
        match self {
            Par::Seq => 1,
            Par::Threads(n) => {
                assert!(n >= 1, "Par::Threads(n) needs n >= 1, got {n}");
                n
            }
        }
    }
}

/// Panics with a clear message when `slice_len != expected`.
#[track_caller]
pub(crate) fn check_len(name: &str, slice_len: usize, expected: usize) {
    assert!(
        slice_len == expected,
        "{name}: length {slice_len}, expected {expected}"
    );
}

/// Splits `rows` rows into at most `parts` contiguous ranges of near-equal size.
pub(crate) fn split_rows(rows: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, rows.max(1));
    let base = rows / parts;
    let extra = rows % parts;
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for p in 0..parts {
        let len = base + usize::from(p < extra);
        out.push(start..start + len);
        start += len;
    }
    out
}

/// Runs `f(row_range, out_rows)` over disjoint row chunks of `out` (row length `row_len`), on up
/// to `par.threads()` threads, but only as many as keep each chunk at least `min_rows` rows.
pub(crate) fn par_rows<T: Send, F>(par: Par, out: &mut [T], row_len: usize, min_rows: usize, f: F)
where
    F: Fn(Range<usize>, &mut [T]) + Sync,
{
    let rows = out.len().checked_div(row_len).unwrap_or(0);
    let threads = par.threads().min(rows / min_rows.max(1)).max(1);
    if threads == 1 {
        f(0..rows, out);
        return;
    }
    let ranges = split_rows(rows, threads);
    let mut rest = out;
    let mut jobs = Vec::with_capacity(ranges.len());
    for r in ranges {
        let (head, tail) = rest.split_at_mut(r.len() * row_len);
        rest = tail;
        jobs.push((r, head));
    }
    pool::run_jobs(jobs, |(r, chunk)| f(r, chunk));
}

/// Like [`par_rows`], but over two outputs split by the same row ranges (row lengths `len_a`
/// and `len_b`).
pub(crate) fn par_rows2<A: Send, B: Send, F>(
    par: Par,
    rows: usize,
    min_rows: usize,
    a: &mut [A],
    len_a: usize,
    b: &mut [B],
    len_b: usize,
    f: F,
) where
    F: Fn(Range<usize>, &mut [A], &mut [B]) + Sync,
{
    let threads = par.threads().min(rows / min_rows.max(1)).max(1);
    if threads == 1 {
        f(0..rows, a, b);
        return;
    }
    let ranges = split_rows(rows, threads);
    let (mut rest_a, mut rest_b) = (a, b);
    let mut jobs = Vec::with_capacity(ranges.len());
    for r in ranges {
        let (ha, ta) = rest_a.split_at_mut(r.len() * len_a);
        let (hb, tb) = rest_b.split_at_mut(r.len() * len_b);
        rest_a = ta;
        rest_b = tb;
        jobs.push((r, ha, hb));
    }
    pool::run_jobs(jobs, |(r, ca, cb)| f(r, ca, cb));
}

/// Like [`par_rows2`], with three outputs, each given as `(slice, row_len)`.
pub(crate) fn par_rows3<A: Send, B: Send, C: Send, F>(
    par: Par,
    rows: usize,
    min_rows: usize,
    a: (&mut [A], usize),
    b: (&mut [B], usize),
    c: (&mut [C], usize),
    f: F,
) where
    F: Fn(Range<usize>, &mut [A], &mut [B], &mut [C]) + Sync,
{
    let threads = par.threads().min(rows / min_rows.max(1)).max(1);
    let ((a, la), (b, lb), (c, lc)) = (a, b, c);
    if threads == 1 {
        f(0..rows, a, b, c);
        return;
    }
    let ranges = split_rows(rows, threads);
    let (mut ra, mut rb, mut rc) = (a, b, c);
    let mut jobs = Vec::with_capacity(ranges.len());
    for r in ranges {
        let (ha, ta) = ra.split_at_mut(r.len() * la);
        let (hb, tb) = rb.split_at_mut(r.len() * lb);
        let (hc, tc) = rc.split_at_mut(r.len() * lc);
        (ra, rb, rc) = (ta, tb, tc);
        jobs.push((r, ha, hb, hc));
    }
    pool::run_jobs(jobs, |(r, ja, jb, jc)| f(r, ja, jb, jc));
}
