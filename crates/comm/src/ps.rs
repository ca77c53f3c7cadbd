//! The parameter server: a *role*, not a collective. The last `K` ranks of the world are servers;
//! server `s` owns `shard_range(len, K, s)` of the flat buffer. Workers push their shards to every
//! server and pull results back.
//!
//! ```text
//!  workers 0..W-1                        servers W..W+K-1
//!  push shard s of the buffer ─────────► server s   Sync:  acc = ((g0 ⊕ g1) ⊕ g2) …  (worker order)
//!                                                   Async: θ += Δ as each push arrives
//!  pull shard s  ◄─────────────────────  server s   Sync:  when every worker pushed this step
//!                                                   Async: when this worker is at most S steps
//!                                                          ahead of the slowest (bounded staleness)
//! ```
//! Synchronous mode equals an all-reduce (sum, average or max) up to the order of summation: the
//! server folds workers 0, 1, …, W-1 left to right ([`reference_sync`]). Each server moves W times
//! its shard in and out per step, so with K servers each server link carries W/K of the buffer:
//! the servers, not the workers, become the bottleneck as W grows (ring all-reduce moves
//! 2(W-1)/W per worker, flat in W).
//!
//! Asynchronous mode (stale-synchronous parallel, Ho et al. 2013): workers push *deltas* (e.g.
//! `-lr · grad`) and pull the server's parameters θ. A worker that has pushed `c` times gets its
//! pull answered once every worker has pushed at least `c - S` times, so the parameters it computes
//! with miss at most `S` steps of every other worker. Convergence caveats: stale gradients act like
//! extra momentum / a larger effective learning rate, so large `S` needs a smaller learning rate;
//! SGD converges for bounded staleness under the usual smoothness assumptions, but results are
//! not reproducible run to run (the fold order follows arrival order), and adaptive optimisers
//! (Adam) on the server side are outside this module.
use crate::comm::Comm;
use crate::engine::{Combine, Dest, RecvOp, SendOp};
use crate::error::{CommError, Result};
use crate::frame::Op;
use crate::{shard_range, Algorithm, Communicator, ReduceOp};

/// Frame-stream id of parameter-server traffic (separate from the world's collectives).
const PS_GID: u32 = 0x5053_0000;

/// Synchronous or bounded-staleness asynchronous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsMode {
    /// Every pull waits for every worker's push of the same step: an all-reduce.
    Sync,
    /// Pulls may miss at most `staleness` steps of the slowest worker.
    Async {
        /// `S`: how many steps a worker may run ahead of the slowest one.
        staleness: usize,
    },
}

/// Who is a worker and who is a server: the last `servers` ranks serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PsLayout {
    /// Worker ranks `0..workers`.
    pub workers: usize,
    /// Server ranks `workers..workers+servers`.
    pub servers: usize,
}

impl PsLayout {
    /// `servers` of a world of `world` ranks serve; at least one of each.
    pub fn new(world: usize, servers: usize) -> Result<PsLayout> {
        if servers == 0 || servers >= world {
            return Err(CommError::InvalidArgument {
                rank: 0,
                op: "ps",
                detail: format!(
                    "{servers} server(s) in a world of {world}: need 1 ≤ servers < world"
                ),
            });
        }
        Ok(PsLayout {
            workers: world - servers,
            servers,
        })
    }

    /// From `SCALETRAIN_NUM_SERVERS` (set by `scaletrain launch --servers K`).
    pub fn from_env(world: usize) -> Result<PsLayout> {
        let k = std::env::var("SCALETRAIN_NUM_SERVERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        PsLayout::new(world, k)
    }

    /// Whether world rank `r` is a server.
    pub fn is_server(&self, r: usize) -> bool {
        r >= self.workers
    }
}

fn check(comm: &Comm, layout: &PsLayout, want_server: bool) -> Result<()> {
    if !comm.is_world() || comm.size() != layout.workers + layout.servers {
        return Err(comm.invalid(
            Op::PsPush,
            format!(
                "the parameter server runs on the world communicator of {} ranks",
                layout.workers + layout.servers
            ),
        ));
    }
    if layout.is_server(comm.rank()) != want_server {
        return Err(comm.invalid(
            Op::PsPush,
            format!(
                "rank {} is not a {} in this layout",
                comm.rank(),
                if want_server { "server" } else { "worker" }
            ),
        ));
    }
    Ok(())
}

/// Worker side of one step: push `buf` (gradients, or deltas in async mode) shard by shard, then
/// pull the result into `buf` (the reduction in sync mode, the parameters in async mode).
pub fn worker_step(comm: &mut Comm, layout: &PsLayout, buf: &mut [f32]) -> Result<()> {
    check(comm, layout, false)?;
    let (w, k) = (layout.workers, layout.servers);
    let servers: Vec<usize> = (w..w + k).collect();
    let bytes = buf.len() * 4;
    comm.run_in(
        PS_GID,
        Op::PsPush,
        Algorithm::Auto,
        false,
        (bytes, &servers),
        |ctx| {
            let mut sends: Vec<SendOp> = (0..k)
                .map(|s| {
                    SendOp::new(
                        w + s,
                        bytemuck::cast_slice(&buf[shard_range(buf.len(), k, s)]),
                    )
                })
                .collect();
            ctx.exchange(&mut sends, &mut [])?;
            ctx.op = Op::PsPull;
            let len = buf.len();
            let mut rest: &mut [f32] = buf;
            let mut recvs = Vec::with_capacity(k);
            for s in 0..k {
                let (mine, tail) =
                    std::mem::take(&mut rest).split_at_mut(shard_range(len, k, s).len());
                recvs.push(RecvOp::new(
                    w + s,
                    Dest::Bytes(bytemuck::cast_slice_mut(mine)),
                ));
                rest = tail;
            }
            ctx.exchange(&mut [], &mut recvs)
        },
    )
}

/// Server side: serve `steps` steps of every worker for a `len`-element buffer; returns this
/// server's shard after the last step (the last reduction in sync mode, θ in async mode, which
/// starts at zero).
pub fn serve(
    comm: &mut Comm,
    layout: &PsLayout,
    mode: PsMode,
    op: ReduceOp,
    len: usize,
    steps: usize,
) -> Result<Vec<f32>> {
    check(comm, layout, true)?;
    let (w, k) = (layout.workers, layout.servers);
    let s = comm.rank() - w;
    let shard = shard_range(len, k, s).len();
    let combine = match op {
        ReduceOp::Max => Combine::Max,
        _ => Combine::Sum,
    };
    let workers: Vec<usize> = (0..w).collect();
    comm.run_in(
        PS_GID,
        Op::PsPush,
        Algorithm::Auto,
        false,
        (shard * 4 * steps, &workers),
        |ctx| match mode {
            PsMode::Sync => {
                let mut acc = vec![0.0f32; shard];
                for _ in 0..steps {
                    ctx.op = Op::PsPush;
                    ctx.sendrecv(
                        None,
                        Some((0, Dest::Bytes(bytemuck::cast_slice_mut(&mut acc)))),
                    )?;
                    for worker in 1..w {
                        ctx.sendrecv(
                            None,
                            Some((
                                worker,
                                Dest::Reduce {
                                    dst: &mut acc,
                                    combine,
                                    recv_first: false,
                                },
                            )),
                        )?;
                    }
                    if op == ReduceOp::Average {
                        acc.iter_mut().for_each(|x| *x /= w as f32);
                    }
                    ctx.op = Op::PsPull;
                    let mut sends: Vec<SendOp> = (0..w)
                        .map(|worker| SendOp::new(worker, bytemuck::cast_slice(&acc)))
                        .collect();
                    ctx.exchange(&mut sends, &mut [])?;
                }
                Ok(acc)
            }
            PsMode::Async { staleness } => {
                let mut theta = vec![0.0f32; shard];
                let mut clock = vec![0usize; w];
                let mut waiting = vec![false; w];
                // One pending receive per worker that still has pushes to make (`who[j]` is the
                // worker of `pushes[j]`); a finished worker's link is left alone, since its next
                // frames belong to whatever it does after the parameter server.
                let mut who: Vec<usize> = (0..w).filter(|_| steps > 0).collect();
                let mut pushes: Vec<RecvOp<'static>> = who
                    .iter()
                    .map(|&worker| RecvOp::new(worker, Dest::Owned(vec![0.0; shard])))
                    .collect();
                loop {
                    let slowest = clock.iter().copied().min().unwrap_or(0);
                    for worker in 0..w {
                        if waiting[worker] && clock[worker] <= slowest + staleness {
                            ctx.op = Op::PsPull;
                            ctx.sendrecv(Some((worker, bytemuck::cast_slice(&theta))), None)?;
                            waiting[worker] = false;
                        }
                    }
                    if clock.iter().all(|&c| c >= steps) && !waiting.iter().any(|&x| x) {
                        return Ok(theta);
                    }
                    ctx.op = Op::PsPush;
                    let j = ctx.recv_any(&mut pushes)?;
                    let i = who[j];
                    let delta = pushes[j].take_owned();
                    combine.apply(&mut theta, &delta, false);
                    clock[i] += 1;
                    waiting[i] = true;
                    if clock[i] < steps {
                        pushes[j] = RecvOp::new(i, Dest::Owned(delta));
                    } else {
                        pushes.swap_remove(j);
                        who.swap_remove(j);
                    }
                }
            }
        },
    )
}

/// What synchronous mode returns, computed sequentially: per element, workers folded in order
/// 0, 1, …, W-1 (left to right), then divided by W for `Average`.
pub fn reference_sync(grads: &[Vec<f32>], op: ReduceOp) -> Vec<f32> {
    let w = grads.len();
    (0..grads[0].len())
        .map(|i| {
            let mut acc = grads[0][i];
            for g in &grads[1..] {
                acc = match op {
                    ReduceOp::Max => crate::reference::max_of(acc, g[i]),
                    _ => acc + g[i],
                };
            }
            if op == ReduceOp::Average {
                acc / w as f32
            } else {
                acc
            }
        })
        .collect()
}
