//! Single-producer single-consumer byte rings in one memory region, one ring per ordered pair of
//! ranks: the link layer of the in-process (threads) transport, where the region is heap memory,
//! and of the shared-memory transport, where it is a file in `/dev/shm` mapped by every process.
//!
//! ```text
//!  region: [ control: 64 B global + 64 B per rank (pid, closed, joined) | pad to 4 KiB ]
//!          [ ring(0→0) | ring(0→1) | … | ring(n-1→n-1) ]      ring(a→b) written by a, read by b
//!  ring:   [ head u64 (pad 64 B) | tail u64 (pad 64 B) | data: cap bytes, cap a power of two ]
//! ```
//! `head` and `tail` count bytes ever written and read; the writer publishes with a Release store of
//! `head` after copying, the reader with a Release store of `tail`. Rings are small (default 1 MiB)
//! so that on one host the bytes in flight stay in cache and a transfer costs about one copy in and
//! one copy out.
use crate::link::{Link, LinkError};
use std::alloc::Layout;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) const REGION_MAGIC: u64 = 0x5343_414c_4552_5453; // "STRELACS"
const RING_HDR: usize = 128;

/// Owned memory holding the control block and the rings.
pub(crate) struct Region {
    ptr: *mut u8,
    len: usize,
    heap: Option<Layout>,
}

// SAFETY: the region is plain memory; all shared mutation goes through atomics or through the
// single-writer / single-reader discipline of the rings.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    /// Bytes needed for `n` ranks with rings of `cap` bytes.
    pub(crate) fn bytes(n: usize, cap: usize) -> usize {
        rings_offset(n) + n * n * (RING_HDR + cap)
    }

    /// Zeroed heap memory.
    pub(crate) fn heap(len: usize) -> Region {
        let layout = Layout::from_size_align(len.max(4096), 4096).expect("region layout");
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Region {
            ptr,
            len,
            heap: Some(layout),
        }
    }

    /// Memory mapped from a file (the shared-memory transport); unmapped on drop.
    ///
    /// # Safety
    /// `ptr` must be a live `mmap` of `len` bytes that nothing else unmaps.
    pub(crate) unsafe fn mapped(ptr: *mut u8, len: usize) -> Region {
        Region {
            ptr,
            len,
            heap: None,
        }
    }

    fn at<T>(&self, off: usize) -> &T {
        assert!(
            off + std::mem::size_of::<T>() <= self.len,
            "region access out of bounds"
        );
        // SAFETY: in bounds, aligned by construction of the layout (all offsets are multiples of 8),
        // and T is an atomic integer, valid for any bit pattern.
        unsafe { &*(self.ptr.add(off) as *const T) }
    }

    pub(crate) fn magic(&self) -> &AtomicU64 {
        self.at(0)
    }
    pub(crate) fn word(&self, i: usize) -> &AtomicU64 {
        self.at(8 * i)
    }
    pub(crate) fn pid(&self, r: usize) -> &AtomicU32 {
        self.at(64 * (1 + r))
    }
    pub(crate) fn closed(&self, r: usize) -> &AtomicU32 {
        self.at(64 * (1 + r) + 4)
    }
    pub(crate) fn joined(&self, r: usize) -> &AtomicU32 {
        self.at(64 * (1 + r) + 8)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        match self.heap {
            // SAFETY: allocated in `heap` with this layout.
            Some(layout) => unsafe { std::alloc::dealloc(self.ptr, layout) },
            // SAFETY: mapped by the caller of `mapped` with this length.
            None => unsafe {
                libc::munmap(self.ptr as *mut libc::c_void, self.len);
            },
        }
    }
}

/// The ring capacity for `n` ranks: the configured size rounded to a power of two, shrunk so the
/// n² rings stay under 256 MiB (64 ranks get 64 KiB rings), never below 4 KiB.
pub(crate) fn ring_capacity(configured: usize, n: usize) -> usize {
    let budget = ((256usize << 20) / (n * n).max(1)).max(1);
    let budget_pow2 = 1usize << (usize::BITS - 1 - budget.leading_zeros());
    configured
        .next_power_of_two()
        .min(budget_pow2)
        .clamp(4096, 1 << 30)
}

fn rings_offset(n: usize) -> usize {
    (64 * (1 + n)).div_ceil(4096) * 4096
}

/// How a ring link learns that a peer process died without saying goodbye.
pub(crate) enum Liveness {
    /// Threads of one process: a peer is gone only when it set its `closed` flag.
    Flags,
    /// Processes: also look at the peer's pid (dead or zombie means gone).
    Pids,
}

/// A [`Link`] over the rings of a [`Region`].
pub(crate) struct RingLink {
    region: Arc<Region>,
    rank: usize,
    n: usize,
    cap: usize,
    name: &'static str,
    liveness: Liveness,
    closing: bool,
    last_pid_check: Instant,
}

impl RingLink {
    pub(crate) fn new(
        region: Arc<Region>,
        rank: usize,
        n: usize,
        cap: usize,
        name: &'static str,
        liveness: Liveness,
    ) -> RingLink {
        assert!(cap.is_power_of_two());
        assert!(Region::bytes(n, cap) <= region.len);
        RingLink {
            region,
            rank,
            n,
            cap,
            name,
            liveness,
            closing: false,
            last_pid_check: Instant::now(),
        }
    }

    fn ring(&self, from: usize, to: usize) -> (&AtomicU64, &AtomicU64, *mut u8) {
        let base = rings_offset(self.n) + (from * self.n + to) * (RING_HDR + self.cap);
        let head: &AtomicU64 = self.region.at(base);
        let tail: &AtomicU64 = self.region.at(base + 64);
        // SAFETY: base + RING_HDR + cap is within the region (checked in `new`).
        let data = unsafe { self.region.ptr.add(base + RING_HDR) };
        (head, tail, data)
    }

    /// Unread bytes from `peer`, without consuming them.
    fn peek(&self, peer: usize) -> Vec<u8> {
        let (head, tail, data) = self.ring(peer, self.rank);
        let (t, h) = (tail.load(Ordering::Relaxed), head.load(Ordering::Acquire));
        let Ok(len) = self.filled(peer, h, t) else {
            return Vec::new();
        };
        let pos = (t as usize) & (self.cap - 1);
        let first = len.min(self.cap - pos);
        let mut out = vec![0u8; len];
        // SAFETY: as in try_read; nothing is released to the writer.
        unsafe {
            std::ptr::copy_nonoverlapping(data.add(pos), out.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(data, out.as_mut_ptr().add(first), len - first);
        }
        out
    }

    /// Unread bytes in a ring from its head and tail counters, checked: these live in memory every
    /// process of the job can write, so a value outside `tail ≤ head ≤ tail + cap` (a stray write,
    /// a process that is not ours) is an error, never an index.
    fn filled(&self, peer: usize, head: u64, tail: u64) -> Result<usize, LinkError> {
        match head.checked_sub(tail) {
            Some(k) if k <= self.cap as u64 => Ok(k as usize),
            _ => Err(LinkError::Corrupt {
                peer,
                detail: format!(
                    "ring counters head {head}, tail {tail} do not fit a ring of {} bytes",
                    self.cap
                ),
            }),
        }
    }

    fn pid_dead(&self, peer: usize) -> Option<String> {
        let pid = self.region.pid(peer).load(Ordering::Acquire);
        if pid == 0 {
            return None;
        }
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => Some(format!("process {pid} has exited")),
            Ok(stat) => {
                // Field 3 (after the parenthesised command name) is the state.
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|s| s.split_whitespace().next());
                match state {
                    Some("Z") | Some("X") | Some("x") => Some(format!("process {pid} died")),
                    _ => None,
                }
            }
        }
    }
}

impl Link for RingLink {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.n
    }
    fn name(&self) -> &'static str {
        self.name
    }

    fn try_write(&mut self, peer: usize, buf: &[u8]) -> Result<usize, LinkError> {
        let (head, tail, data) = self.ring(self.rank, peer);
        let h = head.load(Ordering::Relaxed);
        let t = tail.load(Ordering::Acquire);
        let free = self.cap - self.filled(peer, h, t)?;
        let len = free.min(buf.len());
        if len == 0 {
            return Ok(0);
        }
        let pos = (h as usize) & (self.cap - 1);
        let first = len.min(self.cap - pos);
        // SAFETY: [pos, pos+first) and [0, len-first) lie inside the ring's data, in the part the
        // reader has released (free space); only this rank writes this ring.
        unsafe {
            std::ptr::copy_nonoverlapping(buf.as_ptr(), data.add(pos), first);
            std::ptr::copy_nonoverlapping(buf.as_ptr().add(first), data, len - first);
        }
        head.store(h + len as u64, Ordering::Release);
        Ok(len)
    }

    fn try_read(&mut self, peer: usize, buf: &mut [u8]) -> Result<usize, LinkError> {
        let (head, tail, data) = self.ring(peer, self.rank);
        let t = tail.load(Ordering::Relaxed);
        let h = head.load(Ordering::Acquire);
        let len = self.filled(peer, h, t)?.min(buf.len());
        if len == 0 {
            return Ok(0);
        }
        let pos = (t as usize) & (self.cap - 1);
        let first = len.min(self.cap - pos);
        // SAFETY: the bytes [t, t+len) were published by the writer's Release store of head;
        // only this rank reads this ring.
        unsafe {
            std::ptr::copy_nonoverlapping(data.add(pos), buf.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(data, buf.as_mut_ptr().add(first), len - first);
        }
        tail.store(t + len as u64, Ordering::Release);
        Ok(len)
    }

    fn read_f32_with(
        &mut self,
        peer: usize,
        max_bytes: usize,
        f: &mut dyn FnMut(&[f32]),
    ) -> Result<Option<usize>, LinkError> {
        let (head, tail, data) = self.ring(peer, self.rank);
        let t = tail.load(Ordering::Relaxed);
        let h = head.load(Ordering::Acquire);
        let filled = self.filled(peer, h, t)?;
        if t % 4 != 0 {
            return Ok(None);
        }
        let len = filled.min(max_bytes) / 4 * 4;
        if len == 0 {
            return Ok(Some(0));
        }
        let pos = (t as usize) & (self.cap - 1);
        let first = len.min(self.cap - pos);
        // SAFETY: the bytes [t, t+len) were published by the writer (Release store of head) and
        // are not overwritten until we advance tail; `data` is 64-byte aligned and pos, first and
        // len are multiples of 4, so the f32 views are aligned and in bounds.
        unsafe {
            f(std::slice::from_raw_parts(
                data.add(pos) as *const f32,
                first / 4,
            ));
            f(std::slice::from_raw_parts(
                data as *const f32,
                (len - first) / 4,
            ));
        }
        tail.store(t + len as u64, Ordering::Release);
        Ok(Some(len))
    }

    fn wait(
        &mut self,
        readers: &[usize],
        writers: &[usize],
        dur: Duration,
    ) -> Result<(), LinkError> {
        let peers = (0..self.n).filter(|&p| p != self.rank);
        let any_closed = peers
            .clone()
            .any(|p| self.region.closed(p).load(Ordering::Acquire) != 0);
        let check_pids = matches!(self.liveness, Liveness::Pids)
            && (any_closed || self.last_pid_check.elapsed() >= Duration::from_millis(5));
        if check_pids {
            self.last_pid_check = Instant::now();
            // A process that died without closing is the root cause: report it before any peer
            // that closed after noticing it.
            for p in peers.clone() {
                let involved = readers.contains(&p) || writers.contains(&p);
                if self.region.closed(p).load(Ordering::Acquire) == 0 && (involved || !self.closing)
                {
                    if let Some(detail) = self.pid_dead(p) {
                        return Err(LinkError::Closed { peer: p, detail });
                    }
                }
            }
        }
        let mut aborted = None;
        for p in peers {
            if self.region.closed(p).load(Ordering::Acquire) == 0 {
                continue;
            }
            let involved = readers.contains(&p) || writers.contains(&p);
            // A close is an error if we still need this peer and nothing is left to read, or if it
            // happened outside the final barrier (where only a failing rank closes early).
            let (head, tail, _) = self.ring(p, self.rank);
            let drained = head.load(Ordering::Acquire) == tail.load(Ordering::Relaxed);
            let needed = writers.contains(&p)
                || (readers.contains(&p) && drained)
                || (!involved && !self.closing);
            if needed {
                match (involved, crate::link::find_abort(&self.peek(p))) {
                    (false, Some(reason)) => {
                        aborted = aborted.or(Some(LinkError::Aborted { peer: p, reason }))
                    }
                    _ => {
                        return Err(LinkError::Closed {
                            peer: p,
                            detail: "it closed its communicator".into(),
                        })
                    }
                }
            }
        }
        if let Some(e) = aborted {
            return Err(e);
        }
        if dur > Duration::ZERO {
            std::thread::sleep(dur.min(Duration::from_micros(20)));
        }
        Ok(())
    }

    fn set_closing(&mut self) {
        self.closing = true;
    }

    fn shutdown(&mut self) {
        self.region.closed(self.rank).store(1, Ordering::Release);
    }
}

impl Drop for RingLink {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ranks' links over one heap region, and the region.
    fn pair(cap: usize) -> (RingLink, RingLink, Arc<Region>) {
        let region = Arc::new(Region::heap(Region::bytes(2, cap)));
        let link = |r| RingLink::new(region.clone(), r, 2, cap, "threads", Liveness::Flags);
        (link(0), link(1), region)
    }

    #[test]
    fn corrupt_ring_counters_are_errors_not_indices() {
        let cap = 4096;
        for (name, head_delta, tail_delta) in [
            ("head behind tail", 0i64, 200i64),
            ("more than a ring unread", cap as i64 + 1, 0),
            ("head far ahead", 1 << 40, 0),
        ] {
            let (mut w, mut r, _region) = pair(cap);
            assert_eq!(w.try_write(1, &[7u8; 100]).unwrap(), 100);
            let (head, tail, _) = w.ring(0, 1);
            let (h, t) = (head.load(Ordering::Relaxed), tail.load(Ordering::Relaxed));
            head.store((h as i64 + head_delta) as u64, Ordering::Release);
            tail.store((t as i64 + tail_delta) as u64, Ordering::Release);
            let mut buf = vec![0u8; 3 * cap];
            for e in [
                r.try_read(0, &mut buf).map(|_| ()),
                r.read_f32_with(0, 3 * cap, &mut |_| {}).map(|_| ()),
                w.try_write(1, &[1u8; 10]).map(|_| ()),
            ] {
                match e {
                    Err(LinkError::Corrupt { peer, detail }) => {
                        assert!(
                            peer <= 1 && detail.contains("do not fit"),
                            "{name}: {detail}"
                        )
                    }
                    other => panic!("{name}: expected a corrupt-ring error, got {other:?}"),
                }
            }
            assert!(r.peek(0).is_empty(), "{name}");
        }
    }

    #[test]
    fn ring_capacity_is_bounded() {
        assert_eq!(ring_capacity(1 << 20, 2), 1 << 20);
        assert_eq!(ring_capacity(1000, 2), 1024 * 4); // at least 4 KiB, a power of two
        for n in [2, 8, 16, 64, 256] {
            let cap = ring_capacity(1 << 20, n);
            assert!(
                cap.is_power_of_two() && cap * n * n <= (256 << 20),
                "n = {n}: {cap}"
            );
        }
    }
}
