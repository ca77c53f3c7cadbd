//! [`Comm`]: the communicator of the built-in transports (threads, TCP, shared memory).
use crate::algo;
use crate::engine::{Combine, Ctx, Dest, Shared};
use crate::error::{CommError, Result};
use crate::frame::Op;
use crate::ring::{Liveness, Region, RingLink};
use crate::{shard_range, Algorithm, Communicator, Config, ReduceOp};
use std::ops::Range;
use std::sync::Arc;

/// A group of ranks over one of the built-in transports. Splits share the parent's links, and
/// each group progresses on its own: a split may move to another thread and run its calls while
/// the parent or a sibling runs theirs (see `engine` for how they share a link).
pub struct Comm {
    shared: Arc<Shared>,
    cfg: Config,
    /// Scratch for reductions, reused from call to call (allocated with the communicator, so
    /// steps allocate nothing for it).
    staging: Vec<f32>,
    gid: u32,
    /// Group rank → world rank.
    ranks: Vec<usize>,
    me: usize,
    algo: Algorithm,
    splits: u32,
    /// Point-to-point calls made on this group (the flight recorder's number for them).
    p2p_calls: u64,
    /// Seconds this group's collectives waited for their peers' first frame, in total
    /// ([`Communicator::peer_wait_secs`]).
    peer_wait_secs: f64,
}

/// `n` communicators connected through memory, one per thread: move each into its own thread.
pub fn threads(n: usize, cfg: Config) -> Vec<Comm> {
    assert!(n >= 1, "need at least one rank");
    let cap = crate::ring::ring_capacity(cfg.ring_bytes, n);
    let region = Arc::new(Region::heap(Region::bytes(n, cap)));
    (0..n)
        .map(|r| {
            Comm::new(
                Box::new(RingLink::new(
                    region.clone(),
                    r,
                    n,
                    cap,
                    "threads",
                    Liveness::Flags,
                )),
                cfg.clone(),
            )
        })
        .collect()
}

impl Comm {
    pub(crate) fn new(link: Box<dyn crate::link::Link>, cfg: Config) -> Comm {
        let (me, n) = (link.rank(), link.size());
        Comm {
            shared: Arc::new(Shared::new(link, cfg.clone())),
            cfg,
            staging: crate::engine::staging(),
            gid: 0,
            ranks: (0..n).collect(),
            me,
            algo: Algorithm::Auto,
            splits: 0,
            p2p_calls: 0,
            peer_wait_secs: 0.0,
        }
    }

    /// Bytes of frames read for groups that have not asked for them yet (tests).
    #[cfg(test)]
    pub(crate) fn kept_bytes(&self) -> usize {
        self.shared.lock().kept_bytes()
    }

    /// This rank's flight recorder (shared by the world and its splits; see [`crate::flight`]).
    pub fn flight_recorder(&self) -> Arc<crate::flight::Recorder> {
        self.shared.flight.clone()
    }

    /// The transport's name ("threads", "tcp", "shm").
    pub fn transport(&self) -> &'static str {
        self.shared.lock().link.name()
    }

    /// This process's rank in the world (the group of all ranks).
    pub fn world_rank(&self) -> usize {
        self.ranks[self.me]
    }

    fn pick(&self, bytes: usize) -> Algorithm {
        match self.algo {
            Algorithm::Auto if bytes <= self.cfg.auto_threshold_bytes => Algorithm::Tree,
            Algorithm::Auto => Algorithm::Ring,
            a => a,
        }
    }

    /// Run one call: refuse if an error is latched, count the call, record it in the flight
    /// recorder (`bytes` of the caller's buffer, group ranks `peers` for point to point), latch
    /// the first error.
    fn run<T>(
        &mut self,
        op: Op,
        algo: Algorithm,
        collective: bool,
        (bytes, peers): (usize, &[usize]),
        f: impl FnOnce(&mut Ctx) -> Result<T>,
    ) -> Result<T> {
        let gid = self.gid;
        self.run_in(gid, op, algo, collective, (bytes, peers), f)
    }

    /// `run` on the frame stream of communicator id `gid` (the parameter server uses its own).
    pub(crate) fn run_in<T>(
        &mut self,
        gid: u32,
        op: Op,
        algo: Algorithm,
        collective: bool,
        (bytes, peers): (usize, &[usize]),
        f: impl FnOnce(&mut Ctx) -> Result<T>,
    ) -> Result<T> {
        let entered = std::time::Instant::now();
        let call = {
            let mut core = self.shared.lock();
            if let Some(first) = &core.failed {
                return Err(CommError::Latched {
                    rank: self.ranks[self.me],
                    op: op.name(),
                    first: first.clone(),
                });
            }
            core.used = true;
            if collective {
                core.counters(gid).call += 1;
                core.counters(gid).call
            } else {
                self.p2p_calls += 1;
                self.p2p_calls
            }
        };
        let mut world_peers = [0usize; 2];
        for (w, &p) in world_peers.iter_mut().zip(peers) {
            *w = self.ranks[p];
        }
        let seq = self.shared.flight.begin(crate::flight::CallInfo {
            group: gid,
            members: &self.ranks,
            group_rank: self.me,
            op: op.name(),
            call,
            bytes,
            peers: &world_peers[..peers.len().min(2)],
        });
        let staging = std::mem::take(&mut self.staging);
        let mut ctx = self.shared.ctx(
            &self.cfg,
            gid,
            &self.ranks,
            self.me,
            op,
            algo.code(),
            staging,
        );
        let out = f(&mut ctx);
        if collective {
            // Entering the call until a peer's first frame for it was accepted: the peers
            // reaching this call (and this thread getting a core to read it). A call that
            // receives nothing (one rank) waited for nobody.
            if let Some(t) = ctx.first_frame {
                self.peer_wait_secs += t.saturating_duration_since(entered).as_secs_f64();
            }
        }
        self.staging = ctx.into_staging();
        self.shared.flight.end(
            seq,
            out.as_ref()
                .map(|_| ())
                .map_err(|e| e as &dyn std::fmt::Display),
        );
        if let Err(e) = &out {
            // Latch the first error of any group, but keep the links open until this communicator
            // is dropped: a survivor that closed at once could be blamed by its neighbours for the
            // failure it only observed.
            let first = {
                let mut core = self.shared.lock();
                let first = core.failed.is_none();
                if first {
                    core.failed = Some(e.to_string());
                    core.failed_root = root_of(e);
                }
                first
            };
            if first {
                self.shared.flight.dump_on_error(&e.to_string());
            }
        }
        out
    }

    /// Whether this is the world communicator (not a split).
    pub(crate) fn is_world(&self) -> bool {
        self.gid == 0
    }

    pub(crate) fn invalid(&self, op: Op, detail: String) -> CommError {
        CommError::InvalidArgument {
            rank: self.ranks[self.me],
            op: op.name(),
            detail,
        }
    }
}

/// The rank an error blames: a lost peer, or the one a peer's abort reason names.
fn root_of(e: &CommError) -> Option<usize> {
    match e {
        CommError::PeerLost { peer, .. } => Some(*peer),
        CommError::PeerAborted { reason, .. } => {
            let (_, after) = reason.split_once("peer rank ")?;
            let digits: String = after.chars().take_while(|c| c.is_ascii_digit()).collect();
            after[digits.len()..]
                .starts_with(" is gone")
                .then(|| digits.parse().ok())
                .flatten()
        }
        _ => None,
    }
}

fn combine_of(op: ReduceOp) -> Combine {
    match op {
        ReduceOp::Sum | ReduceOp::Average => Combine::Sum,
        ReduceOp::Max => Combine::Max,
    }
}

fn divide(op: ReduceOp, xs: &mut [f32], n: usize) {
    if op == ReduceOp::Average {
        xs.iter_mut().for_each(|x| *x /= n as f32);
    }
}

impl Communicator for Comm {
    fn transport_name(&self) -> &'static str {
        self.transport()
    }
    fn peer_wait_secs(&self) -> Option<f64> {
        Some(self.peer_wait_secs)
    }
    fn rank(&self) -> usize {
        self.me
    }

    fn size(&self) -> usize {
        self.ranks.len()
    }

    fn set_algorithm(&mut self, algo: Algorithm) {
        self.algo = algo;
    }

    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let algo = self.pick(buf.len() * 4);
        let n = self.size();
        let bytes = buf.len() * 4;
        self.run(Op::AllReduce, algo, true, (bytes, &[]), |ctx| match algo {
            Algorithm::Ring => {
                algo::ring_reduce_scatter(ctx, buf, combine_of(op))?;
                let mine = shard_range(buf.len(), n, ctx.me);
                divide(op, &mut buf[mine], n);
                algo::ring_all_gather(ctx, buf)
            }
            _ => {
                algo::tree_all_reduce(ctx, buf, combine_of(op))?;
                divide(op, buf, n);
                Ok(())
            }
        })
    }

    fn reduce_scatter(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<Range<usize>> {
        let algo = self.pick(buf.len() * 4);
        let n = self.size();
        let mine = shard_range(buf.len(), n, self.me);
        let bytes = buf.len() * 4;
        self.run(
            Op::ReduceScatter,
            algo,
            true,
            (bytes, &[]),
            |ctx| match algo {
                Algorithm::Ring => algo::ring_reduce_scatter(ctx, buf, combine_of(op)),
                _ => algo::tree_all_reduce(ctx, buf, combine_of(op)),
            },
        )?;
        divide(op, &mut buf[mine.clone()], n);
        Ok(mine)
    }

    fn all_gather(&mut self, buf: &mut [f32]) -> Result<()> {
        let algo = self.pick(buf.len() * 4);
        let n = self.size();
        let mine = shard_range(buf.len(), n, self.me);
        let bytes = buf.len() * 4;
        self.run(Op::AllGather, algo, true, (bytes, &[]), |ctx| match algo {
            Algorithm::Ring => algo::ring_all_gather(ctx, buf),
            _ => {
                // Zeros everywhere but our shard, then a bitwise-OR all-reduce assembles the shards exactly.
                buf[..mine.start].fill(0.0);
                buf[mine.end..].fill(0.0);
                algo::tree_all_reduce(ctx, buf, Combine::BitOr)
            }
        })
    }

    fn all_gather_u16(&mut self, buf: &mut [u16]) -> Result<()> {
        let algo = self.pick(buf.len() * 2);
        if algo != Algorithm::Ring {
            // The tree assembles shards with a bitwise OR of 32-bit words: widen (exact).
            return crate::all_gather_u16_widened(self, buf);
        }
        let bytes = buf.len() * 2;
        self.run(Op::AllGather, algo, true, (bytes, &[]), |ctx| {
            algo::ring_all_gather_u16(ctx, buf)
        })
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.size() {
            return Err(self.invalid(
                Op::Broadcast,
                format!("root {root} is not a rank of a group of {}", self.size()),
            ));
        }
        let algo = self.pick(buf.len() * 4);
        let bytes = buf.len() * 4;
        self.run(Op::Broadcast, algo, true, (bytes, &[]), |ctx| match algo {
            Algorithm::Ring => algo::ring_broadcast(ctx, buf, root),
            _ => algo::tree_broadcast(ctx, buf, root),
        })
    }

    fn send(&mut self, dst: usize, data: &[u8]) -> Result<()> {
        if dst >= self.size() || dst == self.me {
            return Err(self.invalid(
                Op::P2p,
                format!(
                    "cannot send to rank {dst} from rank {} of {}",
                    self.me,
                    self.size()
                ),
            ));
        }
        let bytes = data.len();
        self.run(Op::P2p, Algorithm::Auto, false, (bytes, &[dst]), |ctx| {
            ctx.sendrecv(Some((dst, data)), None)
        })
    }

    fn recv(&mut self, src: usize, buf: &mut [u8]) -> Result<()> {
        if src >= self.size() || src == self.me {
            return Err(self.invalid(
                Op::P2p,
                format!(
                    "cannot receive from rank {src} on rank {} of {}",
                    self.me,
                    self.size()
                ),
            ));
        }
        let bytes = buf.len();
        self.run(Op::P2p, Algorithm::Auto, false, (bytes, &[src]), |ctx| {
            ctx.sendrecv(None, Some((src, Dest::Bytes(buf))))
        })
    }

    fn sendrecv(&mut self, dst: usize, data: &[u8], src: usize, buf: &mut [u8]) -> Result<()> {
        let n = self.size();
        if dst >= n || dst == self.me || src >= n || src == self.me {
            return Err(self.invalid(
                Op::P2p,
                format!(
                    "cannot send to rank {dst} and receive from rank {src} on rank {} of {n}",
                    self.me
                ),
            ));
        }
        let bytes = data.len() + buf.len();
        self.run(
            Op::P2p,
            Algorithm::Auto,
            false,
            (bytes, &[dst, src]),
            |ctx| ctx.sendrecv(Some((dst, data)), Some((src, Dest::Bytes(buf)))),
        )
    }

    fn barrier(&mut self) -> Result<()> {
        self.run(Op::Barrier, Algorithm::Tree, true, (0, &[]), |ctx| {
            algo::tree_all_reduce(ctx, &mut [], Combine::BitOr)
        })
    }

    fn split(&mut self, color: u32, key: u32) -> Result<Box<dyn Communicator>> {
        let n = self.size();
        let mut table = vec![0.0f32; 2 * n];
        table[2 * self.me] = f32::from_bits(color);
        table[2 * self.me + 1] = f32::from_bits(key);
        self.run(Op::Split, Algorithm::Tree, true, (8 * n, &[]), |ctx| {
            algo::tree_all_reduce(ctx, &mut table, Combine::BitOr)
        })?;
        let mut members: Vec<(u32, usize)> = (0..n)
            .filter(|&r| table[2 * r].to_bits() == color)
            .map(|r| (table[2 * r + 1].to_bits(), r))
            .collect();
        members.sort_unstable();
        let me = members
            .iter()
            .position(|&(_, r)| r == self.me)
            .ok_or_else(|| {
                self.invalid(Op::Split, "this rank is missing from its own color".into())
            })?;
        self.splits += 1;
        // Same on every member: derived from the parent id, the split count and the color.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for x in [self.gid as u64, self.splits as u64, color as u64] {
            h = (h ^ x).wrapping_mul(0x0100_0000_01b3);
        }
        let gid = ((h >> 32) as u32 ^ h as u32) | 1;
        Ok(Box::new(Comm {
            shared: self.shared.clone(),
            cfg: self.cfg.clone(),
            staging: crate::engine::staging(),
            gid,
            ranks: members.iter().map(|&(_, r)| self.ranks[r]).collect(),
            me,
            algo: self.algo,
            splits: 0,
            p2p_calls: 0,
            peer_wait_secs: 0.0,
        }))
    }
}
