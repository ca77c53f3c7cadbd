//! Frames over links: the one place that builds headers, checks them, counts sequence numbers,
//! moves several transfers at once without blocking, spins briefly before sleeping, and turns
//! "no progress for `timeout`" into an error that names the peers it was waiting on.
//!
//! **Groups progress independently.** The world communicator and every group split from it share
//! one [`Core`] (the links of the world) behind one mutex, but a call holds that mutex only for one
//! pass over its transfers (a few non-blocking reads and writes), never while it waits. So two
//! threads can drive two groups at once (a communication thread reducing gradient buckets on the
//! data-parallel group while the training thread exchanges activations on the pipeline group),
//! and neither waits for the other's whole collective.
//!
//! Groups that share a link take turns on it a frame at a time:
//! ```text
//!  write side, per peer:  tx_owner = the transfer whose frame is half written (others wait for
//!                         the frame boundary, then start their own frame)
//!  read side, per peer:   between frames, whoever reads the next header routes the frame:
//!                           its own group ──► read straight into the destination (rx = Owned)
//!                           another group ─► kept whole in `kept[(peer, group)]` (rx = Keeping)
//!                         a receive takes its group's kept frames first, in order, then the link
//! ```
//! Per (group, peer) frames stay in sequence-number order, so the checks of every header (op, call
//! counter, sequence number, length) are unchanged.
mod ops;
mod recv;

use ops::Source;
pub(crate) use ops::{Combine, Dest, RecvOp, SendOp};

use crate::error::{CommError, Result};
use crate::frame::{Header, Op, HEADER_BYTES};
use crate::link::{Link, LinkError};
use crate::Config;
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Per-communicator counters (one set per group id).
pub(crate) struct Counters {
    send_seq: Vec<u64>,
    recv_seq: Vec<u64>,
    /// Collective calls made on this group so far.
    pub(crate) call: u64,
}

/// The read side of the link from one peer.
struct RxLink {
    /// Header bytes read so far (between frames; any group's receive may continue them).
    hdr: [u8; HEADER_BYTES],
    hdr_got: usize,
    state: RxState,
}

enum RxState {
    /// At a frame boundary (possibly with part of the next header in `hdr`).
    Between,
    /// The receive with this id is reading the payload of its frame straight into its destination.
    Owned(u64),
    /// The payload of another group's frame is being read into a buffer kept for that group; the
    /// buffer grows with the bytes that arrive, not with the length the header claims.
    Keeping { hdr: Header, buf: Vec<u8> },
}

/// A whole frame read for a group that was not receiving at the time.
struct Kept {
    hdr: Header,
    payload: Vec<u8>,
}

/// A kept frame's buffer grows by at most this much per read.
const KEEP_CHUNK: usize = 64 << 10;

/// At most this many bytes of frames kept for groups that have not asked for them yet; more is
/// reported as an error rather than allowed to grow without bound.
const KEPT_LIMIT: usize = 1 << 30;

/// Everything behind one world of links: shared by the world communicator and its splits.
pub(crate) struct Core {
    pub(crate) link: Box<dyn Link>,
    pub(crate) cfg: Config,
    counters: HashMap<u32, Counters>,
    /// The first error, latched: every later call of every group reports it.
    pub(crate) failed: Option<String>,
    /// The rank the first error blames, if any (a lost peer).
    pub(crate) failed_root: Option<usize>,
    /// Whether any call was made: a rank that never communicated skips the final barrier (no
    /// peer can be waiting for it in a correct program, and dropping unused communicators one by
    /// one from a single thread must not stall).
    pub(crate) used: bool,
    /// Per world peer: the transfer whose outgoing frame is half written (no other frame, and no
    /// Abort frame, may start before it ends).
    tx_owner: Vec<Option<u64>>,
    /// Per world peer: the read side.
    rx: Vec<RxLink>,
    /// Frames read for (world peer, group) before that group asked for them, oldest first.
    kept: HashMap<(usize, u32), VecDeque<Kept>>,
    kept_bytes: usize,
}

const STAGING_FLOATS: usize = 16 * 1024;

/// A staging buffer for one communicator handle.
pub(crate) fn staging() -> Vec<f32> {
    vec![0.0; STAGING_FLOATS]
}

/// How often an idle call checks that its peers are alive (dead process, closed link).
const LIVENESS_EVERY: Duration = Duration::from_millis(2);

impl Core {
    fn new(link: Box<dyn Link>, cfg: Config) -> Core {
        let n = link.size();
        Core {
            link,
            cfg,
            counters: HashMap::new(),
            failed: None,
            failed_root: None,
            used: false,
            tx_owner: vec![None; n],
            rx: (0..n)
                .map(|_| RxLink {
                    hdr: [0; HEADER_BYTES],
                    hdr_got: 0,
                    state: RxState::Between,
                })
                .collect(),
            kept: HashMap::new(),
            kept_bytes: 0,
        }
    }

    #[cfg(test)]
    pub(crate) fn kept_bytes(&self) -> usize {
        self.kept_bytes
    }

    pub(crate) fn counters(&mut self, gid: u32) -> &mut Counters {
        let n = self.link.size();
        self.counters.entry(gid).or_insert_with(|| Counters {
            send_seq: vec![0; n],
            recv_seq: vec![0; n],
            call: 0,
        })
    }

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
        for p in (0..self.link.size()).filter(|&p| p != me && self.tx_owner[p].is_none()) {
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

/// The [`Core`] of one world, shared (through an `Arc`) by its communicators, and the rank's
/// flight recorder.
pub(crate) struct Shared {
    core: Mutex<Core>,
    pub(crate) flight: std::sync::Arc<crate::flight::Recorder>,
}

/// Lock a core, ignoring poisoning: a panic in another thread's call is reported by that thread,
/// and the state here stays consistent pass by pass.
fn lock(core: &Mutex<Core>) -> MutexGuard<'_, Core> {
    core.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(crate) fn new(link: Box<dyn Link>, cfg: Config) -> Shared {
        let flight = crate::flight::Recorder::new(link.rank());
        if crate::flight::dump_dir().is_some() {
            // Best effort: a job that asked for dumps also gets them on SIGUSR1.
            let _ = crate::flight::install_signal_handler();
        }
        Shared {
            core: Mutex::new(Core::new(link, cfg)),
            flight,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Core> {
        lock(&self.core)
    }

    /// The call context for one call on group `gid`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn ctx<'c>(
        &'c self,
        cfg: &Config,
        gid: u32,
        ranks: &'c [usize],
        me: usize,
        op: Op,
        algo: u8,
        staging: Vec<f32>,
    ) -> Ctx<'c> {
        Ctx {
            core: &self.core,
            cfg: cfg.clone(),
            gid,
            ranks,
            me,
            world_me: ranks[me],
            op,
            algo,
            staging,
            first_frame: None,
        }
    }
}

impl Drop for Shared {
    /// A clean exit: a final barrier over the world (so nobody closes while a peer still needs it),
    /// then close. After an error, or while panicking, just close.
    fn drop(&mut self) {
        let (used, ok, n, me, mut cfg) = {
            let c = self.lock();
            (
                c.used,
                c.failed.is_none(),
                c.link.size(),
                c.link.rank(),
                c.cfg.clone(),
            )
        };
        if used && ok && n > 1 && !std::thread::panicking() {
            let ranks: Vec<usize> = (0..n).collect();
            cfg.timeout = cfg.timeout.min(Duration::from_secs(10));
            {
                let mut c = self.lock();
                c.link.set_closing();
                c.counters(0).call += 1;
            }
            let mut ctx = self.ctx(&cfg, 0, &ranks, me, Op::Barrier, 0, Vec::new());
            let _ = crate::algo::tree_all_reduce(&mut ctx, &mut [], Combine::BitOr);
        }
        let core = self.core.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(reason) = core.failed.clone() {
            let root = core.failed_root;
            core.link.announce_failure(root);
            core.send_aborts(&reason);
        }
        core.link.shutdown();
    }
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

/// One collective (or p2p) call in progress on one group.
pub(crate) struct Ctx<'c> {
    core: &'c Mutex<Core>,
    cfg: Config,
    pub(crate) gid: u32,
    /// Group rank → world rank.
    pub(crate) ranks: &'c [usize],
    /// This process's group rank.
    pub(crate) me: usize,
    world_me: usize,
    pub(crate) op: Op,
    pub(crate) algo: u8,
    /// Received bytes waiting to be folded (reductions that cannot fold from transport memory).
    staging: Vec<f32>,
    /// When this call accepted the first frame a peer sent for it (`None` until then): the
    /// end of its wait for the peers (see [`crate::Communicator::peer_wait_secs`]).
    pub(crate) first_frame: Option<Instant>,
}

/// What the next frame for a receive is.
enum Next {
    /// Nothing readable yet (the link has no bytes).
    Wait,
    /// Another transfer is in the middle of a frame on this link.
    Busy,
    /// A frame of this group: its header and where its payload is.
    Frame(Header, Source),
}

impl Ctx<'_> {
    pub(crate) fn n(&self) -> usize {
        self.ranks.len()
    }
    pub(crate) fn cfg(&self) -> &Config {
        &self.cfg
    }
    /// The staging buffer, for the communicator to reuse in its next call.
    pub(crate) fn into_staging(self) -> Vec<f32> {
        self.staging
    }

    fn lost(&self, e: LinkError) -> CommError {
        lost_error(self.world_me, self.op, e)
    }

    fn desync(&self, peer: usize, detail: String) -> CommError {
        CommError::Desync {
            rank: self.world_me,
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
        self.exchange_inner(sends, recvs, Mode::All).map(|_| ())
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
        self.exchange_inner(sends, recvs, Mode::Chain).map(|_| ())
    }

    /// Progress the receives until the first of them completes (unfinished ones keep their
    /// state and can be passed again); returns its index.
    pub(crate) fn recv_any(&mut self, recvs: &mut [RecvOp]) -> Result<usize> {
        if let Some(i) = recvs.iter().position(|r| r.done) {
            return Ok(i);
        }
        self.exchange_inner(&mut [], recvs, Mode::Any)
            .map(|i| i.unwrap_or(0))
    }

    fn exchange_inner(
        &mut self,
        sends: &mut [SendOp],
        recvs: &mut [RecvOp],
        mode: Mode,
    ) -> Result<Option<usize>> {
        let timeout = self.cfg.timeout;
        let spin = self.cfg.spin;
        let chain = mode == Mode::Chain;
        let shared = self.core;
        let mut last_progress = Instant::now();
        let mut last_live: Option<Instant> = None;
        loop {
            // One pass under the lock; every wait below happens without it.
            let mut core = lock(shared);
            if let Some(first) = &core.failed {
                return Err(CommError::Latched {
                    rank: self.world_me,
                    op: self.op.name(),
                    first: first.clone(),
                });
            }
            let mut progressed = false;
            for (i, r) in recvs.iter_mut().enumerate() {
                if r.done {
                    continue;
                }
                progressed |= self.progress_recv(&mut core, r)?;
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
                progressed |= self.progress_send(&mut core, s)?;
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
                drop(core);
                if idle < Duration::from_micros(20) {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
            // Whom we wait on: the link (readers, writers), or another group's half-done frame.
            let (mut readers, mut writers, mut busy) = (Vec::new(), Vec::new(), Vec::new());
            for r in recvs
                .iter()
                .filter(|r| !r.done)
                .take(if chain { 1 } else { usize::MAX })
            {
                let p = self.ranks[r.peer];
                match core.rx[p].state {
                    RxState::Owned(id) if id != r.id => busy.push(p),
                    _ => readers.push(p),
                }
            }
            // A chained send that waits for its bytes is not waiting on the link.
            for s in sends
                .iter()
                .filter(|s| !s.done)
                .take(if chain { 1 } else { usize::MAX })
                .filter(|s| s.can_write())
            {
                let p = self.ranks[s.peer];
                match core.tx_owner[p] {
                    Some(id) if id != s.id => busy.push(p),
                    _ => writers.push(p),
                }
            }
            if idle >= timeout {
                let mut peers: Vec<usize> = readers
                    .iter()
                    .chain(&writers)
                    .chain(&busy)
                    .copied()
                    .collect();
                peers.sort_unstable();
                peers.dedup();
                return Err(CommError::Timeout {
                    rank: self.world_me,
                    op: self.op.name(),
                    peers,
                    secs: idle.as_secs_f64(),
                });
            }
            // Liveness checks (a dead or departed peer is an error now), without sleeping; every
            // couple of milliseconds while idle, not on every wake-up.
            if last_live.is_none_or(|t| t.elapsed() >= LIVENESS_EVERY) {
                last_live = Some(Instant::now());
                core.link
                    .wait(&readers, &writers, Duration::ZERO)
                    .map_err(|e| self.lost(e))?;
            }
            let mut fds = Vec::new();
            if busy.is_empty() {
                for (peers, events) in [(&readers, libc::POLLIN), (&writers, libc::POLLOUT)] {
                    for &p in peers.iter() {
                        if let Some(fd) = core.link.raw_fd(p) {
                            fds.push(libc::pollfd {
                                fd,
                                events,
                                revents: 0,
                            });
                        }
                    }
                }
            }
            drop(core);
            // Short naps: another thread may read this call's next frame off a shared link and
            // keep it (no descriptor wakes us for that), so look again every few milliseconds.
            nap(&mut fds, (timeout - idle).min(Duration::from_millis(5)));
        }
    }

    fn progress_send(&mut self, core: &mut Core, s: &mut SendOp) -> Result<bool> {
        let mut progressed = false;
        let world_peer = self.ranks[s.peer];
        while !s.done {
            if !s.in_frame {
                if core.tx_owner[world_peer].is_some_and(|id| id != s.id) {
                    break; // another group's frame is half written on this link
                }
                let max = self.cfg.max_frame_bytes as usize;
                s.frame_len = (s.len - s.sent).min(max);
                let (gid, op, algo) = (self.gid, self.op, self.algo);
                let c = core.counters(gid);
                let seq = c.send_seq[world_peer];
                c.send_seq[world_peer] += 1;
                let call = c.call as u32;
                s.hdr = Header {
                    op,
                    algo,
                    sender: self.world_me as u32,
                    group: gid,
                    seq,
                    len: s.frame_len as u32,
                    call,
                }
                .encode();
                s.hdr_off = 0;
                s.frame_off = 0;
                s.in_frame = true;
                core.tx_owner[world_peer] = Some(s.id);
            }
            if s.hdr_off < HEADER_BYTES {
                let k = core
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
                let k = core
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
            core.tx_owner[world_peer] = None;
            s.done = s.sent == s.len;
        }
        Ok(progressed)
    }
}

/// A link error as this crate's error, for rank `rank` in `op`.
fn lost_error(rank: usize, op: Op, e: LinkError) -> CommError {
    let op = op.name();
    match e {
        LinkError::Closed { peer, detail } => CommError::PeerLost {
            rank,
            op,
            peer,
            detail,
        },
        LinkError::Aborted { peer, reason } => CommError::PeerAborted {
            rank,
            op,
            peer,
            reason,
        },
        LinkError::Io { peer, source } => CommError::PeerLost {
            rank,
            op,
            peer,
            detail: source.to_string(),
        },
        LinkError::Corrupt { peer, detail } => CommError::Corrupt {
            rank,
            op,
            peer,
            detail,
        },
    }
}

/// Sleep until a polled descriptor is ready or `dur` passes; without descriptors (memory rings,
/// or a link another transfer is using), a short sleep.
fn nap(fds: &mut [libc::pollfd], dur: Duration) {
    if fds.is_empty() {
        std::thread::sleep(dur.min(Duration::from_micros(20)));
        return;
    }
    let ms = dur.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: `fds` is a valid array of pollfd for the duration of the call; the descriptors
    // belong to sockets the core keeps open while this communicator (and so the core) lives.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
}

#[cfg(test)]
mod tests;
