//! scaletrain-comm: collective communication for data-, tensor- and pipeline-parallel training.
//!
//! One trait, [`Communicator`], with collectives on `&mut [f32]` and point-to-point bytes. The
//! built-in transports ([`threads`], [`tcp`], [`shm`]) share one frame engine and one set of
//! algorithms ([`Algorithm`]); MPI (feature `mpi`) hands the collectives to the MPI library.
//! This crate knows nothing about models: buffers are flat `f32` slices and offset ranges.
//!
//! Guarantees on the built-in transports:
//! - results are bitwise identical on every rank and equal to [`mod@reference`] (a fixed order of
//!   summation per algorithm);
//! - every frame carries magic, version, op, sequence number, sender rank and a bounded length;
//! - every blocking call gives up after [`Config::timeout`] without progress; the first error is
//!   latched and every later call reports it, with the rank and the operation.
pub mod error;
pub mod flight;
pub mod frame;
#[cfg(feature = "mpi")]
pub mod mpi_comm;
pub mod ps;
pub mod reference;
pub mod rendezvous;
pub mod shm;
pub mod tcp;

mod algo;
mod auth;
mod comm;
mod engine;
mod link;
mod ring;

pub use comm::{threads, Comm};
pub use error::{CommError, Result};

use std::ops::Range;
use std::time::Duration;

/// How values from different ranks are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// Sum.
    Sum,
    /// Sum, then divide by the number of ranks.
    Average,
    /// Maximum (`if b > a { b } else { a }`).
    Max,
}

/// Which collective algorithm runs a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Pick by message size: `Tree` up to [`Config::auto_threshold_bytes`], `Ring` above.
    Auto,
    /// Ring: reduce-scatter then all-gather, each rank moving 2(n-1)/n of the data; for large messages.
    Ring,
    /// Butterfly tree (recursive doubling): log2 n exchanges of the whole message; for small messages.
    Tree,
}

impl Algorithm {
    pub(crate) fn code(self) -> u8 {
        match self {
            Algorithm::Auto => 0,
            Algorithm::Ring => 1,
            Algorithm::Tree => 2,
        }
    }
    pub(crate) fn name_of(code: u8) -> &'static str {
        match code {
            0 => "none",
            1 => "ring",
            2 => "tree",
            _ => "unknown",
        }
    }
}

impl std::str::FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Algorithm::Auto),
            "ring" => Ok(Algorithm::Ring),
            "tree" => Ok(Algorithm::Tree),
            _ => Err(format!(
                "unknown algorithm {s:?} (expected auto, ring or tree)"
            )),
        }
    }
}

/// Tunables shared by the built-in transports.
#[derive(Clone, Debug)]
pub struct Config {
    /// Give up when a blocking call makes no progress for this long. Default 60 s
    /// (`SCALETRAIN_COMM_TIMEOUT_SECS`).
    pub timeout: Duration,
    /// Largest frame payload in bytes; larger messages are cut into frames. Default 1 MiB.
    /// Must agree on every rank (checked at rendezvous for TCP).
    pub max_frame_bytes: u32,
    /// `Algorithm::Auto` uses `Tree` up to this many bytes and `Ring` above. Default 64 KiB,
    /// from `scaletrain bench comm` (docs/comm.md).
    pub auto_threshold_bytes: usize,
    /// Poll for this long without progress before sleeping in the kernel (spinning for the first
    /// 20 µs, yielding the core after that). A wake-up costs ~50 µs on a VM; if both sides of an
    /// exchange give up sooner than that, they take turns sleeping. Default 1 ms.
    pub spin: Duration,
    /// Capacity of each ring of the threads / shared-memory transports (power of two). Default
    /// 1 MiB: 1.3–1.5× the bandwidth of 256 KiB rings at 16 MiB messages (docs/comm.md), still
    /// cache-sized.
    pub ring_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            timeout: Duration::from_secs(60),
            max_frame_bytes: 1 << 20,
            auto_threshold_bytes: 64 << 10,
            spin: Duration::from_millis(1),
            ring_bytes: 1 << 20,
        }
    }
}

impl Config {
    /// Defaults, with `SCALETRAIN_COMM_TIMEOUT_SECS` and `SCALETRAIN_COMM_SPIN_US` (how long a
    /// waiting call polls before it sleeps, [`Config::spin`]) applied when set.
    pub fn from_env() -> Result<Config> {
        let mut cfg = Config::default();
        if let Ok(v) = std::env::var("SCALETRAIN_COMM_TIMEOUT_SECS") {
            let secs: f64 = v.parse().map_err(|_| CommError::Env {
                var: "SCALETRAIN_COMM_TIMEOUT_SECS",
                detail: format!("{v:?} is not a number of seconds"),
            })?;
            if !(secs > 0.0 && secs.is_finite()) {
                return Err(CommError::Env {
                    var: "SCALETRAIN_COMM_TIMEOUT_SECS",
                    detail: format!("{v:?} must be positive"),
                });
            }
            cfg.timeout = Duration::from_secs_f64(secs);
        }
        if let Ok(v) = std::env::var("SCALETRAIN_COMM_SPIN_US") {
            let us: u64 = v.trim().parse().map_err(|_| CommError::Env {
                var: "SCALETRAIN_COMM_SPIN_US",
                detail: format!("{v:?} is not a whole number of microseconds"),
            })?;
            cfg.spin = Duration::from_micros(us);
        }
        Ok(cfg)
    }
}

/// The shard of a `len`-element buffer that rank `r` of `n` owns in `reduce_scatter` / `all_gather`:
/// contiguous, in rank order, the first `len % n` shards one element longer.
pub fn shard_range(len: usize, n: usize, r: usize) -> Range<usize> {
    let (base, extra) = (len / n, len % n);
    let start = r * base + r.min(extra);
    start..start + base + usize::from(r < extra)
}

/// [`Communicator::all_gather_u16`] through the 32-bit all-gather: each element widened into
/// the low half of a word (exact), gathered, narrowed back.
pub(crate) fn all_gather_u16_widened<C: Communicator + ?Sized>(
    c: &mut C,
    buf: &mut [u16],
) -> Result<()> {
    let mut wide: Vec<f32> = buf.iter().map(|&x| f32::from_bits(u32::from(x))).collect();
    c.all_gather(&mut wide)?;
    for (d, w) in buf.iter_mut().zip(&wide) {
        // Only the low 16 bits were ever set: every shard is some rank's widened u16.
        *d = w.to_bits() as u16;
    }
    Ok(())
}

/// A group of ranks that run collectives together.
///
/// All ranks of a group must make the same sequence of collective calls with the same lengths and
/// (for `Auto`) the same configuration; a mismatch is reported as [`CommError::Desync`], not a hang.
pub trait Communicator: Send {
    /// This process's rank in the group, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// Choose the algorithm for later collectives (ignored by transports that pick their own).
    fn set_algorithm(&mut self, algo: Algorithm);
    /// Reduce `buf` over all ranks, in place; every rank ends with the same bits.
    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()>;
    /// Reduce `buf` over all ranks; afterwards `buf[shard_range(len, size, rank)]` holds this
    /// rank's shard of the result (returned), and the rest of `buf` is scratch.
    fn reduce_scatter(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<Range<usize>>;
    /// Each rank contributes `buf[shard_range(len, size, rank)]`; afterwards every rank holds all shards.
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<()>;
    /// [`Communicator::all_gather`] of 16-bit elements (bf16 / fp16 bit patterns), shards in
    /// elements. Bytes move unchanged. This default widens every element into a 32-bit word and
    /// gathers those (exact, twice the bytes); transports override it to send 2 bytes each.
    fn all_gather_u16(&mut self, buf: &mut [u16]) -> Result<()> {
        all_gather_u16_widened(self, buf)
    }
    /// Copy `buf` from `root` to every rank.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Send bytes to `dst`; the matching `recv` must ask for exactly `data.len()` bytes.
    fn send(&mut self, dst: usize, data: &[u8]) -> Result<()>;
    /// Receive exactly `buf.len()` bytes from `src`.
    fn recv(&mut self, src: usize, buf: &mut [u8]) -> Result<()>;
    /// Send `data` to `dst` while receiving exactly `buf.len()` bytes from `src`, both at once
    /// (`dst` and `src` may be the same rank). Two ranks that call it towards each other at the
    /// same time cannot deadlock, however large the messages: what a pipeline's steady state
    /// needs (an activation goes forward while a gradient comes back). Matches a plain `send` /
    /// `recv` on the other side; messages between two ranks of a group arrive in the order sent.
    fn sendrecv(&mut self, dst: usize, data: &[u8], src: usize, buf: &mut [u8]) -> Result<()>;
    /// [`Communicator::send`] of floats (their native-endian bytes).
    fn send_f32(&mut self, dst: usize, data: &[f32]) -> Result<()> {
        self.send(dst, bytemuck::cast_slice(data))
    }
    /// [`Communicator::recv`] of floats.
    fn recv_f32(&mut self, src: usize, buf: &mut [f32]) -> Result<()> {
        self.recv(src, bytemuck::cast_slice_mut(buf))
    }
    /// [`Communicator::sendrecv`] of floats.
    fn sendrecv_f32(
        &mut self,
        dst: usize,
        data: &[f32],
        src: usize,
        buf: &mut [f32],
    ) -> Result<()> {
        self.sendrecv(
            dst,
            bytemuck::cast_slice(data),
            src,
            bytemuck::cast_slice_mut(buf),
        )
    }
    /// Return only when every rank has entered the barrier.
    fn barrier(&mut self) -> Result<()>;
    /// Collective: ranks with the same `color` form a new group, ordered by `(key, old rank)`.
    fn split(&mut self, color: u32, key: u32) -> Result<Box<dyn Communicator>>;
    /// The transport's name ("threads", "tcp", "shm", "mpi"), for reports and cost models.
    fn transport_name(&self) -> &'static str {
        "unknown"
    }
    /// Seconds this group's collective calls have spent, in total since it was made, between
    /// entering the call and accepting the first frame a peer sent for it: waiting for the
    /// peers to reach the same call (plus one frame's latency, and any delay before this
    /// thread got a core to read it). The rest of a call's time is the transfer: moving and
    /// reducing the bytes (in a ring of more than two ranks this includes waits for a late
    /// rank further round, so the split is exact at two ranks and a lower bound on waiting
    /// beyond). Read it before and after a call for that call's wait. `None` where the
    /// transport cannot tell (MPI, whose collectives are the library's).
    fn peer_wait_secs(&self) -> Option<f64> {
        None
    }
}

pub use rendezvous::{init_from_env, JobEnv, Transport};
