//! Frames over links: the one place that builds headers, checks them, counts sequence numbers,
//! moves several transfers at once without blocking, spins briefly before sleeping, and turns
//! "no progress for `timeout`" into an error that names the peers it was waiting on.
use crate::error::{CommError, Result};
use crate::frame::{Header, Op, HEADER_BYTES};
use crate::link::{Link, LinkError};
use crate::Config;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

/// How a received f32 stream is folded into the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Combine {
    /// `a + b`.
    Sum,
    /// `if b > a { b } else { a }` (see [`crate::reference::max_of`]).
    Max,
    /// Bitwise OR of the f32 bit patterns: exact assembly of disjoint pieces over zeros.
    BitOr,
}

impl Combine {
    /// `dst[i] = first ⊕ second` where (first, second) is (recv, dst) or (dst, recv).
    #[inline]
    #[allow(clippy::assign_op_pattern)] // `*r + *d` spells out the documented operand order
    pub(crate) fn apply(self, dst: &mut [f32], recv: &[f32], recv_first: bool) {
        debug_assert_eq!(dst.len(), recv.len());
        match (self, recv_first) {
            (Combine::Sum, true) => dst.iter_mut().zip(recv).for_each(|(d, r)| *d = *r + *d),
            (Combine::Sum, false) => dst.iter_mut().zip(recv).for_each(|(d, r)| *d += *r),
            (Combine::Max, true) => dst
                .iter_mut()
                .zip(recv)
                .for_each(|(d, r)| *d = crate::reference::max_of(*r, *d)),
            (Combine::Max, false) => dst
                .iter_mut()
                .zip(recv)
                .for_each(|(d, r)| *d = crate::reference::max_of(*d, *r)),
            (Combine::BitOr, _) => dst
                .iter_mut()
                .zip(recv)
                .for_each(|(d, r)| *d = f32::from_bits(d.to_bits() | r.to_bits())),
        }
    }
}

/// Per-communicator counters (one set per group id).
pub(crate) struct Counters {
    send_seq: Vec<u64>,
    recv_seq: Vec<u64>,
    /// Collective calls made on this group so far.
    pub(crate) call: u64,
}

/// Everything behind one world of links: shared by the world communicator and its splits.
pub(crate) struct Core {
    pub(crate) link: Box<dyn Link>,
    pub(crate) cfg: Config,
    counters: HashMap<u32, Counters>,
    /// The first error, latched: every later call reports it.
    pub(crate) failed: Option<String>,
    /// The rank the first error blames, if any (a lost peer).
    pub(crate) failed_root: Option<usize>,
    /// Whether any call was made: a rank that never communicated skips the final barrier (no
    /// peer can be waiting for it in a correct program, and dropping unused communicators one by
    /// one from a single thread must not stall).
    pub(crate) used: bool,
    staging: Vec<f32>,
    /// Per world peer: an outgoing frame is half written (no Abort frame can follow it).
    mid_frame: Vec<bool>,
}

const STAGING_FLOATS: usize = 16 * 1024;

impl Core {
    pub(crate) fn new(link: Box<dyn Link>, cfg: Config) -> Core {
        let n = link.size();
        Core {
            link,
            cfg,
            counters: HashMap::new(),
            failed: None,
            failed_root: None,
            used: false,
            staging: vec![0.0; STAGING_FLOATS],
            mid_frame: vec![false; n],
        }
    }

    pub(crate) fn counters(&mut self, gid: u32) -> &mut Counters {
        let n = self.link.size();
        self.counters.entry(gid).or_insert_with(|| Counters {
            send_seq: vec![0; n],
            recv_seq: vec![0; n],
            call: 0,
        })
    }
}

impl Core {
    /// Best effort: tell every peer whose stream is at a frame boundary why this rank gives up,
    /// so that survivors can name the rank that failed first rather than the one that left last.
    fn send_aborts(&mut self, reason: &str) {
        let me = self.link.rank();
        let mut text = reason.as_bytes().to_vec();
        text.truncate(1024);
        let h = Header {
            op: Op::Abort,
            algo: 0,
            sender: me as u32,
            group: 0,
            seq: 0,
            len: text.len() as u32,
            call: 0,
        };
        let mut frame = h.encode().to_vec();
        frame.extend_from_slice(&text);
        let deadline = Instant::now() + Duration::from_millis(200);
        for p in (0..self.link.size()).filter(|&p| p != me && !self.mid_frame[p]) {
            let mut off = 0;
            while off < frame.len() && Instant::now() < deadline {
                match self.link.try_write(p, &frame[off..]) {
                    Ok(0) => std::thread::sleep(Duration::from_micros(100)),
                    Ok(k) => off += k,
                    Err(_) => break,
                }
            }
        }
    }
}

impl Drop for Core {
    /// A clean exit: a final barrier over the world (so nobody closes while a peer still needs it),
    /// then close. After an error, or while panicking, just close.
    fn drop(&mut self) {
        if self.used && self.failed.is_none() && self.link.size() > 1 && !std::thread::panicking() {
            self.link.set_closing();
            let ranks: Vec<usize> = (0..self.link.size()).collect();
            let me = self.link.rank();
            self.cfg.timeout = self.cfg.timeout.min(Duration::from_secs(10));
            let mut ctx = Ctx {
                core: self,
                gid: 0,
                ranks: &ranks,
                me,
                op: Op::Barrier,
                algo: 0,
            };
            ctx.core.counters(0).call += 1;
            let _ = crate::algo::tree_all_reduce(&mut ctx, &mut [], Combine::BitOr);
        }
        if let Some(reason) = self.failed.clone() {
            let root = self.failed_root;
            self.link.announce_failure(root);
            self.send_aborts(&reason);
        }
        self.link.shutdown();
    }
}

/// One outgoing transfer to group rank `peer`, cut into frames of at most `max_frame_bytes`.
///
/// The bytes are held as a pointer so that a chained transfer (see [`Ctx::exchange_chain`]) can send
/// the prefix of a chunk that an earlier receive of the same call has finished writing, while that
/// receive still writes the rest: the two never touch the same bytes (`avail` ≤ bytes completed).
pub(crate) struct SendOp<'a> {
    peer: usize,
    ptr: *const u8,
    len: usize,
    /// Bytes that may be sent so far (`len` unless chained).
    avail: usize,
    sent: usize,
    hdr: [u8; HEADER_BYTES],
    hdr_off: usize,
    frame_len: usize,
    frame_off: usize,
    in_frame: bool,
    done: bool,
    _data: PhantomData<&'a [u8]>,
}

impl SendOp<'_> {
    /// Whether the link is what holds this send back (not bytes still to be received).
    fn can_write(&self) -> bool {
        !self.in_frame || self.hdr_off < HEADER_BYTES || self.sent + self.frame_off < self.avail
    }
}

impl<'a> SendOp<'a> {
    pub(crate) fn new(peer: usize, data: &'a [u8]) -> Self {
        // SAFETY: the whole slice is readable for 'a.
        unsafe { Self::raw(peer, data.as_ptr(), data.len(), data.len()) }
    }

    /// # Safety
    /// `ptr..ptr+len` must stay allocated for 'a, and bytes below `avail` (as raised by the chain)
    /// must not be written while this operation lives.
    pub(crate) unsafe fn raw(peer: usize, ptr: *const u8, len: usize, avail: usize) -> Self {
        SendOp {
            peer,
            ptr,
            len,
            avail,
            sent: 0,
            hdr: [0; HEADER_BYTES],
            hdr_off: 0,
            frame_len: 0,
            frame_off: 0,
            in_frame: false,
            done: false,
            _data: PhantomData,
        }
    }
}

/// Where received bytes go.
pub(crate) enum Dest<'a> {
    /// Copied as they are.
    Bytes(&'a mut [u8]),
    /// Copied into a buffer the operation owns (parameter-server queues).
    Owned(Vec<f32>),
    /// Folded into these floats; `recv_first` puts the received value on the left of the operator.
    Reduce {
        dst: &'a mut [f32],
        combine: Combine,
        recv_first: bool,
    },
}

/// A destination as pointers: only the range being written is ever turned into a slice.
enum Target {
    Bytes {
        ptr: *mut u8,
    },
    Owned(Vec<f32>),
    Reduce {
        ptr: *mut f32,
        combine: Combine,
        recv_first: bool,
    },
}

/// How `exchange_inner` drives its operations.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// All at once, each independent.
    All,
    /// Until the first receive completes.
    Any,
    /// One ordered stream each way, `sends[k + 1]` fed by `recvs[k]`.
    Chain,
}

/// One incoming transfer from group rank `peer`.
pub(crate) struct RecvOp<'a> {
    peer: usize,
    target: Target,
    total: usize,
    got: usize,
    hdr: [u8; HEADER_BYTES],
    hdr_got: usize,
    frame_len: usize,
    frame_got: usize,
    in_frame: bool,
    done: bool,
    /// Bytes held in the staging buffer (Reduce only), and floats already folded into `dst`.
    fill: usize,
    folded: usize,
    _dest: PhantomData<&'a mut [u8]>,
}

impl RecvOp<'_> {
    /// The buffer of a completed `Dest::Owned` transfer.
    pub(crate) fn take_owned(&mut self) -> Vec<f32> {
        match &mut self.target {
            Target::Owned(v) => std::mem::take(v),
            _ => Vec::new(),
        }
    }

    /// Bytes of the destination that hold their final value (copied, or folded).
    fn completed(&self) -> usize {
        match self.target {
            Target::Reduce { .. } => self.folded * 4,
            _ => self.got + if self.in_frame { self.frame_got } else { 0 },
        }
    }
}

impl<'a> RecvOp<'a> {
    pub(crate) fn new(peer: usize, dest: Dest<'a>) -> Self {
        let (target, total) = match dest {
            Dest::Bytes(b) => (
                Target::Bytes {
                    ptr: b.as_mut_ptr(),
                },
                b.len(),
            ),
            Dest::Owned(v) => {
                let n = v.len() * 4;
                (Target::Owned(v), n)
            }
            Dest::Reduce {
                dst,
                combine,
                recv_first,
            } => (
                Target::Reduce {
                    ptr: dst.as_mut_ptr(),
                    combine,
                    recv_first,
                },
                dst.len() * 4,
            ),
        };
        // SAFETY: built from a borrow that lives for 'a.
        unsafe { Self::with_target(peer, target, total) }
    }

    /// A receive folding into `len` floats at `ptr`.
    ///
    /// # Safety
    /// The floats must stay allocated for 'a and be written by nothing else while this lives,
    /// except that a chained send may read the prefix this operation has completed.
    pub(crate) unsafe fn raw_reduce(
        peer: usize,
        ptr: *mut f32,
        len: usize,
        combine: Combine,
        recv_first: bool,
    ) -> Self {
        Self::with_target(
            peer,
            Target::Reduce {
                ptr,
                combine,
                recv_first,
            },
            len * 4,
        )
    }

    /// A receive copying `len` bytes to `ptr` (same contract as `raw_reduce`).
    pub(crate) unsafe fn raw_bytes(peer: usize, ptr: *mut u8, len: usize) -> Self {
        Self::with_target(peer, Target::Bytes { ptr }, len)
    }

    unsafe fn with_target(peer: usize, target: Target, total: usize) -> Self {
        RecvOp {
            peer,
            target,
            total,
            got: 0,
            hdr: [0; HEADER_BYTES],
            hdr_got: 0,
            frame_len: 0,
            frame_got: 0,
            in_frame: false,
            done: false,
            fill: 0,
            folded: 0,
            _dest: PhantomData,
        }
    }
}

/// One collective (or p2p) call in progress on one group.
pub(crate) struct Ctx<'c> {
    pub(crate) core: &'c mut Core,
    pub(crate) gid: u32,
    /// Group rank → world rank.
    pub(crate) ranks: &'c [usize],
    /// This process's group rank.
    pub(crate) me: usize,
    pub(crate) op: Op,
    pub(crate) algo: u8,
}

impl Ctx<'_> {
    pub(crate) fn n(&self) -> usize {
        self.ranks.len()
    }
    pub(crate) fn world_rank(&self) -> usize {
        self.core.link.rank()
    }
    pub(crate) fn cfg(&self) -> &Config {
        &self.core.cfg
    }

    fn lost(&self, e: LinkError) -> CommError {
        let rank = self.world_rank();
        match e {
            LinkError::Closed { peer, detail } => CommError::PeerLost {
                rank,
                op: self.op.name(),
                peer,
                detail,
            },
            LinkError::Aborted { peer, reason } => CommError::PeerAborted {
                rank,
                op: self.op.name(),
                peer,
                reason,
            },
            LinkError::Io { peer, source } => CommError::PeerLost {
                rank,
                op: self.op.name(),
                peer,
                detail: source.to_string(),
            },
        }
    }

    fn desync(&self, peer: usize, detail: String) -> CommError {
        CommError::Desync {
            rank: self.world_rank(),
            op: self.op.name(),
            peer,
            detail,
        }
    }

    /// Shorthand: at most one send and one receive, concurrently.
    pub(crate) fn sendrecv(
        &mut self,
        send: Option<(usize, &[u8])>,
        recv: Option<(usize, Dest<'_>)>,
    ) -> Result<()> {
        let mut sends: Vec<SendOp> = send.into_iter().map(|(p, d)| SendOp::new(p, d)).collect();
        let mut recvs: Vec<RecvOp> = recv.into_iter().map(|(p, d)| RecvOp::new(p, d)).collect();
        self.exchange(&mut sends, &mut recvs)
    }

    /// Drive every transfer to completion, interleaving them so that no pair of ranks can deadlock
    /// on full buffers. Errors on a bad or unexpected frame, on a lost peer, and after
    /// `cfg.timeout` without progress.
    pub(crate) fn exchange(&mut self, sends: &mut [SendOp], recvs: &mut [RecvOp]) -> Result<()> {
        self.run_exchange(sends, recvs, Mode::All).map(|_| ())
    }

    /// A pipeline along one link each way: `sends` go out in order (all to one peer), `recvs`
    /// come in in order (all from one peer), and `sends[k + 1]` carries the bytes that `recvs[k]`
    /// produces, each as soon as it has been received (and folded). This is how the ring's steps
    /// overlap: a rank forwards the first frames of a chunk while the rest is still arriving.
    pub(crate) fn exchange_chain(
        &mut self,
        sends: &mut [SendOp],
        recvs: &mut [RecvOp],
    ) -> Result<()> {
        self.run_exchange(sends, recvs, Mode::Chain).map(|_| ())
    }

    /// Progress the receives until the first of them completes (unfinished ones keep their
    /// state and can be passed again); returns its index.
    pub(crate) fn recv_any(&mut self, recvs: &mut [RecvOp]) -> Result<usize> {
        if let Some(i) = recvs.iter().position(|r| r.done) {
            return Ok(i);
        }
        self.run_exchange(&mut [], recvs, Mode::Any)
            .map(|i| i.unwrap_or(0))
    }

    fn run_exchange(
        &mut self,
        sends: &mut [SendOp],
        recvs: &mut [RecvOp],
        mode: Mode,
    ) -> Result<Option<usize>> {
        let mut staging = std::mem::take(&mut self.core.staging);
        let out = self.exchange_inner(sends, recvs, &mut staging, mode);
        self.core.staging = staging;
        out
    }

    fn exchange_inner(
        &mut self,
        sends: &mut [SendOp],
        recvs: &mut [RecvOp],
        staging: &mut [f32],
        mode: Mode,
    ) -> Result<Option<usize>> {
        let timeout = self.core.cfg.timeout;
        let spin = self.core.cfg.spin;
        let chain = mode == Mode::Chain;
        let mut last_progress = Instant::now();
        loop {
            let mut progressed = false;
            for (i, r) in recvs.iter_mut().enumerate() {
                if r.done {
                    continue;
                }
                progressed |= self.progress_recv(r, staging)?;
                if mode == Mode::Any && r.done {
                    return Ok(Some(i));
                }
                if chain {
                    break; // one stream: only the oldest unfinished receive may read
                }
            }
            if chain {
                for k in 0..recvs.len().min(sends.len().saturating_sub(1)) {
                    let ready = if recvs[k].done {
                        sends[k + 1].len
                    } else {
                        recvs[k].completed()
                    };
                    sends[k + 1].avail = ready.min(sends[k + 1].len);
                }
            }
            for s in sends.iter_mut() {
                if s.done {
                    continue;
                }
                progressed |= self.progress_send(s)?;
                if chain {
                    break;
                }
            }
            if sends.iter().all(|s| s.done) && recvs.iter().all(|r| r.done) {
                return Ok(None);
            }
            if progressed {
                last_progress = Instant::now();
                continue;
            }
            let idle = last_progress.elapsed();
            if idle < spin {
                if idle < Duration::from_micros(20) {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
            let readers: Vec<usize> = recvs
                .iter()
                .filter(|r| !r.done)
                .take(if chain { 1 } else { usize::MAX })
                .map(|r| self.ranks[r.peer])
                .collect();
            // A chained send that waits for its bytes is not waiting on the link.
            let writers: Vec<usize> = sends
                .iter()
                .filter(|s| !s.done)
                .take(if chain { 1 } else { usize::MAX })
                .filter(|s| s.can_write())
                .map(|s| self.ranks[s.peer])
                .collect();
            if idle >= timeout {
                let mut peers: Vec<usize> = readers.iter().chain(&writers).copied().collect();
                peers.sort_unstable();
                peers.dedup();
                return Err(CommError::Timeout {
                    rank: self.world_rank(),
                    op: self.op.name(),
                    peers,
                    secs: idle.as_secs_f64(),
                });
            }
            let left = timeout - idle;
            self.core
                .link
                .wait(&readers, &writers, left.min(Duration::from_millis(50)))
                .map_err(|e| self.lost(e))?;
        }
    }

    fn progress_send(&mut self, s: &mut SendOp) -> Result<bool> {
        let mut progressed = false;
        let world_peer = self.ranks[s.peer];
        while !s.done {
            if !s.in_frame {
                let max = self.core.cfg.max_frame_bytes as usize;
                s.frame_len = (s.len - s.sent).min(max);
                let me = self.world_rank() as u32;
                let (gid, op, algo) = (self.gid, self.op, self.algo);
                let c = self.core.counters(gid);
                let seq = c.send_seq[world_peer];
                c.send_seq[world_peer] += 1;
                let call = c.call as u32;
                s.hdr = Header {
                    op,
                    algo,
                    sender: me,
                    group: gid,
                    seq,
                    len: s.frame_len as u32,
                    call,
                }
                .encode();
                s.hdr_off = 0;
                s.frame_off = 0;
                s.in_frame = true;
                self.core.mid_frame[world_peer] = true;
            }
            if s.hdr_off < HEADER_BYTES {
                let k = self
                    .core
                    .link
                    .try_write(world_peer, &s.hdr[s.hdr_off..])
                    .map_err(|e| self.lost(e))?;
                if k == 0 {
                    break;
                }
                s.hdr_off += k;
                progressed = true;
                continue;
            }
            if s.frame_off < s.frame_len {
                let at = s.sent + s.frame_off;
                let end = (s.sent + s.frame_len).min(s.avail);
                if at >= end {
                    break; // a chained send waiting for its bytes to be received
                }
                // SAFETY: [at, end) lies in the source and below `avail`, so nothing writes it now.
                let bytes = unsafe { std::slice::from_raw_parts(s.ptr.add(at), end - at) };
                let k = self
                    .core
                    .link
                    .try_write(world_peer, bytes)
                    .map_err(|e| self.lost(e))?;
                if k == 0 {
                    break;
                }
                s.frame_off += k;
                progressed = true;
                continue;
            }
            s.sent += s.frame_len;
            s.in_frame = false;
            self.core.mid_frame[world_peer] = false;
            s.done = s.sent == s.len;
        }
        Ok(progressed)
    }

    fn check_header(&mut self, r: &RecvOp) -> Result<usize> {
        let world_peer = self.ranks[r.peer];
        let max = self.core.cfg.max_frame_bytes;
        let h = Header::decode(&r.hdr, max.max(4096)).map_err(|source| CommError::BadFrame {
            rank: self.world_rank(),
            op: self.op.name(),
            peer: world_peer,
            source,
        })?;
        let expect_len = (r.total - r.got).min(max as usize);
        let (gid, op, algo) = (self.gid, self.op, self.algo);
        let c = self.core.counters(gid);
        let (seq, call) = (c.recv_seq[world_peer], c.call as u32);
        if h.sender as usize != world_peer {
            return Err(self.desync(world_peer, format!("frame claims sender rank {}", h.sender)));
        }
        if h.op == Op::Abort {
            let reason = self.read_reason(world_peer, h.len as usize);
            return Err(CommError::PeerAborted {
                rank: self.world_rank(),
                op: op.name(),
                peer: world_peer,
                reason,
            });
        }
        if h.group != gid {
            return Err(self.desync(world_peer, format!("it sent a frame for communicator {:#x}, this rank expects communicator {gid:#x}", h.group)));
        }
        if h.op != op || h.call != call {
            return Err(self.desync(
                world_peer,
                format!(
                    "it is in {} (call {}), this rank is in {} (call {call})",
                    h.op.name(),
                    h.call,
                    op.name()
                ),
            ));
        }
        if h.algo != algo {
            return Err(self.desync(
                world_peer,
                format!(
                    "it uses algorithm {}, this rank uses {}",
                    crate::Algorithm::name_of(h.algo),
                    crate::Algorithm::name_of(algo)
                ),
            ));
        }
        if h.seq != seq {
            return Err(self.desync(
                world_peer,
                format!("frame sequence number {} where {seq} was expected", h.seq),
            ));
        }
        if h.len as usize != expect_len {
            return Err(self.desync(
                world_peer,
                format!(
                    "frame of {} bytes where {expect_len} were expected (message sizes differ)",
                    h.len
                ),
            ));
        }
        self.core.counters(gid).recv_seq[world_peer] += 1;
        Ok(expect_len)
    }

    /// The payload of an Abort frame (best effort, bounded wait).
    fn read_reason(&mut self, peer: usize, len: usize) -> String {
        let mut buf = vec![0u8; len];
        let (mut got, deadline) = (0, Instant::now() + Duration::from_millis(500));
        while got < len && Instant::now() < deadline {
            match self.core.link.try_read(peer, &mut buf[got..]) {
                Ok(0) => std::thread::sleep(Duration::from_micros(100)),
                Ok(k) => got += k,
                Err(_) => break,
            }
        }
        String::from_utf8_lossy(&buf[..got]).into_owned()
    }

    fn progress_recv(&mut self, r: &mut RecvOp, staging: &mut [f32]) -> Result<bool> {
        let mut progressed = false;
        let world_peer = self.ranks[r.peer];
        while !r.done {
            if !r.in_frame {
                if r.hdr_got < HEADER_BYTES {
                    let mut hdr = r.hdr;
                    let k = self
                        .core
                        .link
                        .try_read(world_peer, &mut hdr[r.hdr_got..])
                        .map_err(|e| self.lost(e))?;
                    r.hdr = hdr;
                    if k == 0 {
                        break;
                    }
                    r.hdr_got += k;
                    progressed = true;
                    continue;
                }
                r.frame_len = self.check_header(r)?;
                r.frame_got = 0;
                r.in_frame = true;
            }
            if r.frame_got < r.frame_len {
                let want = r.frame_len - r.frame_got;
                let at = r.got + r.frame_got;
                let k = match &mut r.target {
                    Target::Bytes { ptr } => {
                        // SAFETY: [at, at+want) lies in the destination; only this op writes it.
                        let b = unsafe { std::slice::from_raw_parts_mut(ptr.add(at), want) };
                        self.core
                            .link
                            .try_read(world_peer, b)
                            .map_err(|e| self.lost(e))?
                    }
                    Target::Owned(v) => {
                        let b: &mut [u8] = bytemuck::cast_slice_mut(v);
                        self.core
                            .link
                            .try_read(world_peer, &mut b[at..at + want])
                            .map_err(|e| self.lost(e))?
                    }
                    Target::Reduce {
                        ptr,
                        combine,
                        recv_first,
                    } => {
                        let (dst, c, first) = (*ptr, *combine, *recv_first);
                        // SAFETY (both folds): floats [folded, folded + n) lie in the destination,
                        // at or above what a chained send may read, and only this op writes them.
                        let fold_at = |folded: usize, x: &[f32]| {
                            c.apply(
                                unsafe { std::slice::from_raw_parts_mut(dst.add(folded), x.len()) },
                                x,
                                first,
                            )
                        };
                        // Fold straight out of transport memory when it allows (shared memory):
                        // one pass over the bytes instead of a copy then a fold.
                        if r.fill == 0 {
                            let folded = &mut r.folded;
                            let mut fold = |x: &[f32]| {
                                fold_at(*folded, x);
                                *folded += x.len();
                            };
                            let direct = self
                                .core
                                .link
                                .read_f32_with(world_peer, want, &mut fold)
                                .map_err(|e| self.lost(e))?;
                            if let Some(k) = direct {
                                if k == 0 {
                                    break;
                                }
                                r.frame_got += k;
                                progressed = true;
                                continue;
                            }
                        }
                        let bytes: &mut [u8] = bytemuck::cast_slice_mut(staging);
                        let room = (bytes.len() - r.fill).min(want);
                        let k = self
                            .core
                            .link
                            .try_read(world_peer, &mut bytes[r.fill..r.fill + room])
                            .map_err(|e| self.lost(e))?;
                        r.fill += k;
                        let whole = r.fill / 4;
                        if whole > 0 {
                            fold_at(r.folded, &staging[..whole]);
                            r.folded += whole;
                            let bytes: &mut [u8] = bytemuck::cast_slice_mut(staging);
                            bytes.copy_within(whole * 4..r.fill, 0);
                            r.fill -= whole * 4;
                        }
                        k
                    }
                };
                if k == 0 {
                    break;
                }
                r.frame_got += k;
                progressed = true;
                continue;
            }
            r.got += r.frame_len;
            r.in_frame = false;
            r.hdr_got = 0;
            r.done = r.got == r.total;
        }
        Ok(progressed)
    }
}
