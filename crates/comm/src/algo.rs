//! The collective algorithms, written once over [`Ctx`] so every transport runs the same code.
//! n = ranks in the group, r = this rank, S = message bytes; `shard(c)` = [`crate::shard_range`].
use crate::engine::{Combine, Ctx, Dest, RecvOp, SendOp};
use crate::error::Result;
use crate::shard_range;
use std::ops::Range;

fn as_bytes(x: &[f32]) -> &[u8] {
    bytemuck::cast_slice(x)
}

/// Borrow two disjoint ranges of one buffer: the first shared, the second mutable.
fn split_pair(buf: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&[f32], &mut [f32]) {
    assert!(a.end <= b.start || b.end <= a.start, "ranges overlap");
    if a.start < b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        let hi: &[f32] = hi;
        (&hi[..a.end - a.start], &mut lo[b])
    }
}

/// Ring reduce-scatter: after it, rank r holds the reduction of shard r.
///
/// ```text
///  n = 3, shards A B C; step s: rank r sends shard (r-s-1) to r+1 and folds shard (r-s-2) from r-1
///           rank 0          rank 1          rank 2
///  s=0:   send C ──►1     send A ──►2     send B ──►0      (ring: 0 → 1 → 2 → 0)
///         B = B2+B0       C = C0+C1       A = A1+A2
///  s=1:   send B ──►1     send C ──►2     send A ──►0
///         A = (A1+A2)+A0  B = (B2+B0)+B1  C = (C0+C1)+C2   rank r owns shard r, fully reduced
/// ```
/// Shard c is folded left to right starting at rank c+1: ((x[c+1] ⊕ x[c+2]) ⊕ …) ⊕ x[c].
/// Each rank sends and receives (n-1)/n · S. Chunked and pipelined: shards travel as frames, and
/// the steps overlap, since the shard a rank forwards at step s+1 is the one it folds at step s,
/// each frame leaves as soon as it is folded (`Ctx::exchange_chain`):
///
/// ```text
///  rank r:  recv+fold shard rc(s)  ██████████░░░░░░          (frames arriving from r-1)
///           send shard rc(s)       ░░░░██████████░░          (to r+1, trailing the fold)
/// ```
pub(crate) fn ring_reduce_scatter(ctx: &mut Ctx, buf: &mut [f32], combine: Combine) -> Result<()> {
    let (n, r) = (ctx.n(), ctx.me);
    let (right, left) = ((r + 1) % n, (r + n - 1) % n);
    let len = buf.len();
    let base = buf.as_mut_ptr();
    let (mut sends, mut recvs) = (Vec::new(), Vec::new());
    for s in 0..n.saturating_sub(1) {
        let sc = shard_range(len, n, (r + 2 * n - s - 1) % n);
        let rc = shard_range(len, n, (r + 2 * n - s - 2) % n);
        // SAFETY: every shard lies inside `buf`, which is not touched otherwise while the ops live.
        // Step s folds into shard rc(s) and step s+1 sends shard sc(s+1) = rc(s): the chain lets
        // that send read only the prefix the fold has finished. Step 0 sends shard r-1, which no
        // step folds into, and every other shard is folded by exactly one step.
        unsafe {
            let avail = if s == 0 { sc.len() * 4 } else { 0 };
            sends.push(SendOp::raw(
                right,
                base.add(sc.start) as *const u8,
                sc.len() * 4,
                avail,
            ));
            recvs.push(RecvOp::raw_reduce(
                left,
                base.add(rc.start),
                rc.len(),
                combine,
                true,
            ));
        }
    }
    ctx.exchange_chain(&mut sends, &mut recvs)
}

/// Ring all-gather: rank r starts with shard r and ends with all of them.
///
/// ```text
///  step s: rank r sends shard (r-s) to r+1 and receives shard (r-s-1) from r-1
///           rank 0        rank 1        rank 2
///  s=0:   A ──►1        B ──►2        C ──►0
///  s=1:   C ──►1        A ──►2        B ──►0       every rank holds A B C
/// ```
/// Pipelined like the reduce-scatter: the shard received at step s is forwarded frame by frame.
pub(crate) fn ring_all_gather(ctx: &mut Ctx, buf: &mut [f32]) -> Result<()> {
    // SAFETY: `buf` is `buf.len()` elements of 4 bytes, borrowed mutably for the call.
    unsafe { ring_all_gather_raw(ctx, buf.as_mut_ptr() as *mut u8, buf.len(), 4) }
}

/// [`ring_all_gather`] of 16-bit elements (bf16 / fp16 bit patterns): half the bytes.
pub(crate) fn ring_all_gather_u16(ctx: &mut Ctx, buf: &mut [u16]) -> Result<()> {
    // SAFETY: `buf` is `buf.len()` elements of 2 bytes, borrowed mutably for the call.
    unsafe { ring_all_gather_raw(ctx, buf.as_mut_ptr() as *mut u8, buf.len(), 2) }
}

/// The ring all-gather over `len` elements of `elem` bytes at `base`; shards are
/// `shard_range(len, n, rank)` in elements. Only bytes move, so any element type gathers
/// exactly.
///
/// # Safety
/// `base` must point to `len * elem` bytes that nothing else reads or writes during the call.
unsafe fn ring_all_gather_raw(ctx: &mut Ctx, base: *mut u8, len: usize, elem: usize) -> Result<()> {
    let (n, r) = (ctx.n(), ctx.me);
    let (right, left) = ((r + 1) % n, (r + n - 1) % n);
    let (mut sends, mut recvs) = (Vec::new(), Vec::new());
    for s in 0..n.saturating_sub(1) {
        let sc = shard_range(len, n, (r + n - s) % n);
        let rc = shard_range(len, n, (r + 2 * n - s - 1) % n);
        // SAFETY: as in `ring_reduce_scatter`: step s+1 forwards shard rc(s) as it arrives; step 0
        // sends our own shard r, which no step receives into.
        unsafe {
            let avail = if s == 0 { sc.len() * elem } else { 0 };
            sends.push(SendOp::raw(
                right,
                base.add(sc.start * elem) as *const u8,
                sc.len() * elem,
                avail,
            ));
            recvs.push(RecvOp::raw_bytes(
                left,
                base.add(rc.start * elem),
                rc.len() * elem,
            ));
        }
    }
    ctx.exchange_chain(&mut sends, &mut recvs)
}

/// Largest power of two ≤ n (n ≥ 1).
fn pow2_floor(n: usize) -> usize {
    1 << (usize::BITS - 1 - n.leading_zeros())
}

/// Butterfly tree (recursive doubling) all-reduce: log2 n exchanges of the whole buffer.
///
/// ```text
///  p = largest power of two ≤ n; ranks p..n-1 ("extras") first fold into ranks 0..n-p-1
///  fold-in:   r+p ──► r            v[r] = x[r] ⊕ x[r+p]          (only when n is not a power of two)
///  mask=1:    0 ◄─► 1   2 ◄─► 3    v = v[lower] ⊕ v[higher]    (same expression on both partners)
///  mask=2:    0 ◄─► 2   1 ◄─► 3    v = v[lower] ⊕ v[higher]
///  fold-out:  r ──► r+p            extras receive the result
/// ```
/// Latency 2·log2 n hops at most, but each rank moves S·log2 n bytes: the small-message algorithm.
pub(crate) fn tree_all_reduce(ctx: &mut Ctx, buf: &mut [f32], combine: Combine) -> Result<()> {
    let (n, r) = (ctx.n(), ctx.me);
    let p = pow2_floor(n);
    let extras = n - p;
    if r >= p {
        ctx.sendrecv(Some((r - p, as_bytes(buf))), None)?;
        return ctx.sendrecv(
            None,
            Some((r - p, Dest::Bytes(bytemuck::cast_slice_mut(buf)))),
        );
    }
    if r < extras {
        ctx.sendrecv(
            None,
            Some((
                r + p,
                Dest::Reduce {
                    dst: buf,
                    combine,
                    recv_first: false,
                },
            )),
        )?;
    }
    let mut copy = Vec::new();
    let mut mask = 1;
    while mask < p {
        let partner = r ^ mask;
        copy.clear();
        copy.extend_from_slice(buf);
        ctx.sendrecv(
            Some((partner, as_bytes(&copy))),
            Some((
                partner,
                Dest::Reduce {
                    dst: buf,
                    combine,
                    recv_first: partner < r,
                },
            )),
        )?;
        mask <<= 1;
    }
    if r < extras {
        ctx.sendrecv(Some((r + p, as_bytes(buf))), None)?;
    }
    Ok(())
}

/// Pipelined chain broadcast: segments of one frame flow root → root+1 → … → root-1.
///
/// ```text
///  root ──seg0──► a ──seg0──► b          while a forwards seg k it already receives seg k+1
///  root ──seg1──► a ──seg1──► b          time ≈ (n-2 + segments) · frame time: bandwidth-optimal
/// ```
pub(crate) fn ring_broadcast(ctx: &mut Ctx, buf: &mut [f32], root: usize) -> Result<()> {
    let (n, r) = (ctx.n(), ctx.me);
    if n == 1 {
        return Ok(());
    }
    let pos = (r + n - root) % n;
    let (right, left) = ((r + 1) % n, (r + n - 1) % n);
    let seg = (ctx.cfg().max_frame_bytes as usize / 4).max(1);
    let segs: Vec<Range<usize>> = if buf.is_empty() {
        std::iter::once(0..0).collect()
    } else {
        (0..buf.len())
            .step_by(seg)
            .map(|s| s..(s + seg).min(buf.len()))
            .collect()
    };
    if pos == 0 {
        for s in &segs {
            ctx.sendrecv(Some((right, as_bytes(&buf[s.clone()]))), None)?;
        }
    } else if pos == n - 1 {
        for s in &segs {
            ctx.sendrecv(
                None,
                Some((
                    left,
                    Dest::Bytes(bytemuck::cast_slice_mut(&mut buf[s.clone()])),
                )),
            )?;
        }
    } else {
        ctx.sendrecv(
            None,
            Some((
                left,
                Dest::Bytes(bytemuck::cast_slice_mut(&mut buf[segs[0].clone()])),
            )),
        )?;
        for k in 0..segs.len() {
            if k + 1 < segs.len() {
                let (send, recv) = split_pair(buf, segs[k].clone(), segs[k + 1].clone());
                ctx.sendrecv(
                    Some((right, as_bytes(send))),
                    Some((left, Dest::Bytes(bytemuck::cast_slice_mut(recv)))),
                )?;
            } else {
                ctx.sendrecv(Some((right, as_bytes(&buf[segs[k].clone()]))), None)?;
            }
        }
    }
    Ok(())
}

/// Binomial-tree broadcast: the set of ranks holding the data doubles each round.
///
/// ```text
///  relative rank v = r - root;  round k: v < 2^k sends to v + 2^k
///  round 0:  0 ──► 1
///  round 1:  0 ──► 2     1 ──► 3
///  round 2:  0 ──► 4     1 ──► 5     2 ──► 6     3 ──► 7        ceil(log2 n) rounds
/// ```
pub(crate) fn tree_broadcast(ctx: &mut Ctx, buf: &mut [f32], root: usize) -> Result<()> {
    let (n, r) = (ctx.n(), ctx.me);
    let v = (r + n - root) % n;
    let mut mask = 1;
    while mask < n {
        if v & mask != 0 {
            let from = (v - mask + root) % n;
            ctx.sendrecv(
                None,
                Some((from, Dest::Bytes(bytemuck::cast_slice_mut(buf)))),
            )?;
            break;
        }
        mask <<= 1;
    }
    mask >>= 1;
    while mask > 0 {
        if v + mask < n {
            ctx.sendrecv(Some(((v + mask + root) % n, as_bytes(buf))), None)?;
        }
        mask >>= 1;
    }
    Ok(())
}
