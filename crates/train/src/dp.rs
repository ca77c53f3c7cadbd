//! Data parallelism: the trainer's hooks for `dp` ranks that each hold the whole model.
//!
//! What this module owns, in the order a run uses it:
//! 1. **Fingerprint** ([`Dp::check_fingerprint`]): every rank hashes its resolved config (kernel
//!    threads excluded) and its token streams; the hashes are all-gathered and any rank that
//!    differs from rank 0 stops the job with an error naming it.
//! 2. **Identical weights** ([`Dp::sync_params`]): rank 0's parameters are broadcast, then every
//!    rank's SHA-256 of its buffer is all-gathered and compared.
//! 3. **Data shards**: a global step is `dp × grad_accum` micro-batches of the *single-process*
//!    batch order; rank `r` trains micro-batches `r·K .. (r+1)·K` (K = `grad_accum`). Every rank
//!    advances the same batcher, so the data position (and a checkpoint) is rank-independent
//!    and the same as a 1-rank run with `grad_accum = dp × K`.
//! 4. **Gradient sync** in gradient **buckets** ([`buckets`]): contiguous ranges of whole layers
//!    of the flat buffer, closed at the first layer boundary past `--bucket-mb`. Backward
//!    reports each region final as it finishes it (`model::GradSink`; head first, the embedding
//!    — tied to the LM head, so final only at the very end — last), and [`Dp::backward`] hands
//!    the bucket to a **communication thread** that reduces it while backward goes on with
//!    earlier layers (`--no-overlap`: on the training thread as each bucket becomes final, same
//!    buckets, same bits). Only the last
//!    micro-step of a step communicates (ZeRO-2: every micro-step). Each rank's loss gradient is
//!    scaled by `1/(b·t·K·dp)`, so a *sum* reduction gives the global mean gradient.
//!    - `ring`: all-reduce (sum) per bucket, then every rank runs the same AdamW on the same bits.
//!    - `ps`: after backward, push to / pull from the parameter servers (`comm::ps`,
//!      synchronous: the servers fold workers 0, 1, … in order), then as `ring`. No overlap.
//!    - ZeRO-1/2: reduce-scatter per bucket; rank `r` owns the piece `shard_range(bucket, dp, r)`
//!      of every bucket ([`Dp::owned_ranges`]) in `m`, `v` (and, stage 2, the reduced gradient,
//!      accumulated over micro-steps); the global gradient norm is the rank-ordered f64 sum of
//!      the pieces' sums of squares; AdamW runs on the pieces; an all-gather per bucket rebuilds
//!      the parameters.
//!
//!    The step report splits the step into compute, communication (on any thread) and
//!    *exposed* communication (what the training thread waited for).
//!
//! ```text
//!   backward:   head+L3 ─ L2 ─ L1 ─ L0 ─ embedding ┐
//!   comm thread:   all-reduce(b0) ─ all-reduce(b1) ─ … all-reduce(b_embed) ┤─ AdamW ─ same params
//!   ZeRO:          reduce-scatter(b_k) … ─ AdamW(own pieces) ─ all-gather(params, per bucket)
//! ```
//! Checkpoints (`checkpoint::save_rank`): rank 0 writes the weights once. Under ZeRO every rank
//! writes the ranges of `m`, `v` it holds ([`Dp::owned_ranges`]) to its own file, the ranks
//! all-gather what they wrote ([`Dp::all_gather_bytes`]), and only then does rank 0 publish the
//! manifest, which lists every file with its ranges; without ZeRO rank 0 writes the whole state.
//! On resume ([`Dp::agree_on_start`] checks that every rank loaded the same step) each rank
//! takes its own ranges out of whichever files hold them, so another `dp` or ZeRO stage
//! re-shards; the global batch (`dp × grad_accum` micro-batches) must stay the same.
//!
//! This module never touches files; it only talks to the other ranks.

use crate::error::TrainError;
use comm::ps::{PsLayout, PsMode};
use comm::{shard_range, Comm, Communicator, ReduceOp};
use kernels::adamw::{adamw_update, clip_factor, scale_inplace, sum_squares, AdamWStep};
use kernels::Par;
use model::{AdamW, AdamWConfig, GradSink, ModelError, ParamLayout};
use sha2::{Digest, Sha256};
use std::ops::Range;
use std::sync::mpsc::{channel, Receiver};
use std::time::Instant;

/// How gradients are combined across data-parallel ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradSync {
    /// All-reduce through the communicator (ring on the built-in transports; MPI's own under mpirun).
    Ring,
    /// Synchronous parameter server: the last `servers` ranks of the world serve.
    Ps {
        /// Server processes.
        servers: usize,
    },
}

/// ZeRO stage (Rajbhandari et al. 2020).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ZeroStage {
    /// Every rank keeps the whole optimizer state.
    #[default]
    Off,
    /// Optimizer state sharded by offset ranges.
    One,
    /// Optimizer state and reduced gradients sharded.
    Two,
}

impl ZeroStage {
    /// 0, 1 or 2.
    pub fn number(self) -> u8 {
        match self {
            ZeroStage::Off => 0,
            ZeroStage::One => 1,
            ZeroStage::Two => 2,
        }
    }
    /// From 0, 1 or 2.
    pub fn from_number(n: u8) -> Option<ZeroStage> {
        match n {
            0 => Some(ZeroStage::Off),
            1 => Some(ZeroStage::One),
            2 => Some(ZeroStage::Two),
            _ => None,
        }
    }
}

/// A data-parallel rank's connection to its peers (a training worker).
pub struct Dp {
    /// The data-parallel group (the world, or the workers' split in parameter-server mode).
    group: Box<dyn Communicator>,
    /// Parameter-server mode: the world communicator and who serves.
    ps: Option<(Comm, PsLayout)>,
    zero: ZeroStage,
    /// ZeRO-2: this rank's pieces of the reduced gradient (accumulated over micro-steps),
    /// concatenated like [`Dp::owned_ranges`].
    grad_shard: Vec<f32>,
    /// Asynchronous parameter server: the weights every rank started from (θ is added to them).
    async_base: Option<Vec<f32>>,
    /// Gradient buckets in the order backward finishes them (highest offsets first); set by
    /// [`Dp::attach`]. Empty = one bucket, the whole buffer.
    buckets: Vec<Range<usize>>,
    /// Target bucket size in bytes (a bucket closes at the first layer boundary past it).
    bucket_bytes: usize,
    /// Reduce buckets on a communication thread while backward goes on.
    overlap: bool,
    /// The host has a core for the communication thread beyond the training threads (only the
    /// step-time prediction uses it).
    spare_core: bool,
    /// Elements of the flat buffer (set by [`Dp::attach`]).
    len: usize,
    /// ZeRO-2: the gradient buffers backward writes into instead of a full-size buffer.
    pool: Zero2Pool,
    /// Seconds spent in gradient communication so far (on any thread).
    pub comm_secs: f64,
    /// Seconds the training thread waited for gradient communication so far (the part of
    /// `comm_secs` not hidden behind backward).
    pub exposed_secs: f64,
}

/// Default gradient bucket size: 512 KiB, under one layer of the default model, so backward's
/// later layers overlap the earlier layers' reduction (PyTorch DDP's default is 25 MiB, sized
/// for GPUs and far larger models).
pub const DEFAULT_BUCKET_BYTES: usize = 512 << 10;

/// Gradient buckets of `layout`: contiguous ranges between the points where backward reports
/// gradients final ([`ParamLayout::ready_points`]), each closed at the first point at least
/// `bucket_elems` below its top, in the order backward finishes them (highest offsets first).
/// They tile `0..layout.len()`.
pub fn buckets(layout: &ParamLayout, bucket_elems: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut hi = layout.len();
    for p in layout.ready_points() {
        if p < hi && hi - p >= bucket_elems.max(1) {
            out.push(p..hi);
            hi = p;
        }
    }
    if hi > 0 {
        out.push(0..hi);
    }
    out
}

impl std::fmt::Debug for Dp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Dp {{ rank {} of {}, ps {:?}, zero {:?} }}",
            self.group.rank(),
            self.group.size(),
            self.ps.as_ref().map(|p| p.1),
            self.zero
        )
    }
}

/// What a process of a parameter-server job is.
pub enum Role {
    /// A training worker.
    Worker(Dp),
    /// A server: call [`PsServer::serve`].
    Server(PsServer),
}

/// A parameter-server process.
pub struct PsServer {
    world: Comm,
    layout: PsLayout,
    mode: PsMode,
}

fn dist(what: &str) -> impl FnOnce(comm::CommError) -> TrainError + '_ {
    move |e| TrainError::Dist(format!("{what}: {e}"))
}

/// `bytes` as `f32` bit patterns, 4 bytes each (the last word zero-padded).
fn bytes_to_words(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            f32::from_bits(u32::from_le_bytes(w))
        })
        .collect()
}

impl Dp {
    /// All-reduce data parallelism over `comm` (every rank of it trains).
    pub fn ring(comm: Box<dyn Communicator>, zero: ZeroStage) -> Dp {
        Dp {
            group: comm,
            ps: None,
            zero,
            grad_shard: Vec::new(),
            async_base: None,
            buckets: Vec::new(),
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            overlap: true,
            spare_core: true,
            len: 0,
            pool: Zero2Pool::default(),
            comm_secs: 0.0,
            exposed_secs: 0.0,
        }
    }

    /// Sets the gradient bucket size and whether buckets are reduced during backward (on a
    /// communication thread) or after it. Every rank must use the same values (they are part
    /// of the fingerprint). Call before [`Dp::attach`].
    pub fn with_buckets(mut self, bucket_bytes: usize, overlap: bool) -> Dp {
        self.bucket_bytes = bucket_bytes.max(4);
        self.overlap = overlap;
        self
    }

    /// Tells the step-time prediction whether the host has a core for the communication thread
    /// beyond the training threads (default yes). Without one, the collectives' CPU work comes
    /// out of compute (`plan::cpu_comm`).
    pub fn with_spare_core(mut self, spare: bool) -> Dp {
        self.spare_core = spare;
        self
    }

    /// Whether buckets are reduced during backward.
    pub fn overlap(&self) -> bool {
        self.overlap
    }

    /// The gradient buckets ([`buckets`]) once attached.
    pub fn bucket_ranges(&self) -> &[Range<usize>] {
        &self.buckets
    }

    /// Lays the gradient buckets (and so the ZeRO pieces) out over `layout`. Call once, before
    /// the optimizer state is sharded or loaded.
    pub fn attach(&mut self, layout: &ParamLayout) {
        self.buckets = buckets(layout, self.bucket_bytes / 4);
        self.len = layout.len();
        if self.zero == ZeroStage::Two {
            self.pool = Zero2Pool::new(&self.buckets);
        }
    }

    /// Whether backward needs the trainer's full-size gradient buffer (not under ZeRO-2).
    pub fn needs_full_grads(&self) -> bool {
        self.zero != ZeroStage::Two
    }

    /// The gradient bucket size in bytes.
    pub fn bucket_bytes(&self) -> usize {
        self.bucket_bytes
    }

    /// The data-parallel group's transport ("tcp", "shm", "threads", "mpi").
    pub fn transport(&self) -> &'static str {
        self.group.transport_name()
    }

    /// Predicted gradient communication of one step (`plan::cpu_comm`), given the predicted
    /// compute of one step of `accum` micro-steps. Parameter servers are not modelled (`None`).
    pub fn predict_comm(
        &self,
        dims: &plan::cpu_runtime::CpuRuntimeDims,
        accum: u64,
        compute: &plan::cpu_time::CpuStepTime,
    ) -> Option<plan::cpu_comm::DpCommTime> {
        if self.ps.is_some() {
            return None;
        }
        let setup = plan::cpu_comm::DpCommSetup {
            dp: self.size() as u64,
            zero: self.zero.number(),
            accum,
            bucket_bytes: self.bucket_bytes as u64,
            overlap: self.overlap,
            spare_core: self.spare_core,
        };
        // Backward is about two thirds of a micro-step's forward + backward.
        let micro = (compute.matmul_secs + compute.memory_secs + compute.overhead_secs)
            / accum.max(1) as f64;
        let k = plan::cpu_comm::CommCalibration::for_transport(self.transport());
        Some(plan::cpu_comm::dp_comm_time(
            dims,
            &setup,
            micro * 2.0 / 3.0,
            &k,
        ))
    }

    /// Parameter-server data parallelism over the world `comm`: the last `servers` ranks serve
    /// (collective over the world: every rank calls it).
    ///
    /// `PsMode::Async { staleness }`: stale-synchronous training (Ho et al. 2013). Each worker
    /// runs AdamW locally on its own gradients, pushes its weight change divided by the number of
    /// workers, and pulls θ, the servers' running sum of every pushed change; its weights become
    /// `w0 + θ`. A worker may run `staleness` steps ahead of the slowest. Not reproducible run
    /// to run, the workers' weights differ, and the reported loss is rank 0's own micro-batches.
    pub fn parameter_server(
        mut world: Comm,
        servers: usize,
        mode: PsMode,
    ) -> Result<Role, TrainError> {
        let layout = PsLayout::new(world.size(), servers).map_err(dist("parameter server"))?;
        let me = world.rank();
        let server = layout.is_server(me);
        let group = world
            .split(u32::from(server), me as u32)
            .map_err(dist("parameter server split"))?;
        if server {
            drop(group);
            return Ok(Role::Server(PsServer {
                world,
                layout,
                mode,
            }));
        }
        Ok(Role::Worker(Dp {
            ps: Some((world, layout)),
            async_base: matches!(mode, PsMode::Async { .. }).then(Vec::new),
            ..Dp::ring(group, ZeroStage::Off)
        }))
    }

    /// This rank in the data-parallel group.
    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    /// Data-parallel ranks.
    pub fn size(&self) -> usize {
        self.group.size()
    }

    /// The ZeRO stage.
    pub fn zero(&self) -> ZeroStage {
        self.zero
    }

    /// The offset ranges of the flat buffer whose optimizer state (`m`, `v`) this rank holds,
    /// in increasing order: `opt.m` / `opt.v` are these ranges concatenated. The whole buffer
    /// without ZeRO; under ZeRO-1/2 this rank's piece `shard_range(bucket, dp, rank)` of every
    /// gradient bucket (so each bucket is reduce-scattered as soon as backward finishes it).
    pub fn owned_ranges(&self, len: usize) -> Vec<Range<usize>> {
        if self.zero == ZeroStage::Off {
            return vec![0..len];
        }
        let whole = [0..len];
        let buckets: &[Range<usize>] = if self.buckets.is_empty() {
            &whole
        } else {
            assert_eq!(
                self.buckets.iter().map(|b| b.len()).sum::<usize>(),
                len,
                "owned_ranges: length vs the attached layout"
            );
            &self.buckets
        };
        let (n, r) = (self.size(), self.rank());
        let mut out: Vec<Range<usize>> = buckets
            .iter()
            .map(|b| {
                let p = shard_range(b.len(), n, r);
                b.start + p.start..b.start + p.end
            })
            .filter(|p| !p.is_empty())
            .collect();
        out.sort_by_key(|p| p.start);
        out
    }

    /// All-gathers a 32-byte digest from every rank; returns the ranks whose digest differs
    /// from rank 0's.
    fn differing_ranks(&mut self, digest: &[u8; 32], what: &str) -> Result<Vec<usize>, TrainError> {
        let n = self.size();
        let words = bytes_to_words(digest);
        let mut all = vec![0.0f32; 8 * n];
        let mine = shard_range(all.len(), n, self.rank());
        all[mine].copy_from_slice(&words);
        self.group.all_gather(&mut all).map_err(dist(what))?;
        let of =
            |r: usize| -> Vec<u32> { all[8 * r..8 * r + 8].iter().map(|x| x.to_bits()).collect() };
        let root = of(0);
        Ok((1..n).filter(|&r| of(r) != root).collect())
    }

    /// Start of a run: every rank must have the same config and data (see the module docs).
    pub fn check_fingerprint(&mut self, fingerprint: &[u8; 32]) -> Result<(), TrainError> {
        // The data-parallel settings that shape the collectives join the config's fingerprint.
        let mut h = Sha256::new();
        h.update(fingerprint);
        h.update([self.zero.number(), u8::from(self.overlap)]);
        h.update((self.bucket_bytes as u64).to_le_bytes());
        let fingerprint: [u8; 32] = h.finalize().into();
        let bad = self.differing_ranks(&fingerprint, "exchanging the config/data fingerprint")?;
        if !bad.is_empty() {
            return Err(TrainError::Dist(format!(
                "rank(s) {bad:?} started with a different config or data than rank 0 (fingerprint of \
                 the resolved config, the token streams and the data-parallel flags differs); start every \
                 rank with the same --config, --set, --zero, --bucket-mb and --no-overlap flags and data files"
            )));
        }
        Ok(())
    }

    /// Broadcast rank 0's parameters, then verify every rank holds the same bits (SHA-256).
    pub fn sync_params(&mut self, params: &mut [f32]) -> Result<(), TrainError> {
        self.group
            .broadcast(params, 0)
            .map_err(dist("broadcasting the initial weights"))?;
        let digest: [u8; 32] = Sha256::digest(bytemuck_bytes(params)).into();
        let bad = self.differing_ranks(&digest, "checking the initial weights")?;
        if !bad.is_empty() {
            return Err(TrainError::Dist(format!(
                "rank(s) {bad:?} hold different initial weights than rank 0 after the broadcast"
            )));
        }
        if let Some(base) = &mut self.async_base {
            *base = params.to_vec();
        }
        Ok(())
    }

    /// In parameter-server mode, rank 0 tells each server the buffer length and the steps.
    pub fn announce(&mut self, len: usize, steps: u64) -> Result<(), TrainError> {
        let Some((world, layout)) = &mut self.ps else {
            return Ok(());
        };
        if world.rank() == 0 {
            let mut msg = [0u8; 16];
            msg[..8].copy_from_slice(&(len as u64).to_le_bytes());
            msg[8..].copy_from_slice(&steps.to_le_bytes());
            for s in 0..layout.servers {
                world
                    .send(layout.workers + s, &msg)
                    .map_err(dist("telling the parameter servers the job"))?;
            }
        }
        Ok(())
    }

    /// Every rank's per-micro-batch losses, in global micro-batch order (rank 0's first), and
    /// whether any rank was asked to stop (Ctrl-C): the ranks agree on the step they stop at,
    /// so they checkpoint together. (Asynchronous workers do not wait for each other: their own
    /// losses stand for all, and the stop request is local.)
    pub fn gather_losses(
        &mut self,
        mine: &[f32],
        stop: bool,
    ) -> Result<(Vec<f32>, bool), TrainError> {
        let n = self.size();
        if self.async_base.is_some() {
            return Ok((mine.repeat(n), stop));
        }
        let k = mine.len() + 1;
        let mut all = vec![0.0f32; k * n];
        let r = shard_range(all.len(), n, self.rank());
        all[r.start..r.end - 1].copy_from_slice(mine);
        all[r.end - 1] = if stop { 1.0 } else { 0.0 };
        self.group
            .all_gather(&mut all)
            .map_err(dist("gathering the losses"))?;
        let any_stop = all.chunks(k).any(|c| c[k - 1] != 0.0);
        let losses = all
            .chunks(k)
            .flat_map(|c| c[..k - 1].iter().copied())
            .collect();
        Ok((losses, any_stop))
    }

    /// Takes this rank's optimizer state for a `len`-element model: `opt.m` and `opt.v` must
    /// already be [`Dp::owned_ranges`]`(len)` concatenated (a fresh zero state, or
    /// `checkpoint::load_ranges`); ZeRO-2 also allocates its gradient shard.
    pub fn shard_optimizer(&mut self, opt: &AdamW, len: usize) {
        let held: usize = self.owned_ranges(len).iter().map(|r| r.len()).sum();
        assert_eq!(
            opt.m.len(),
            held,
            "shard_optimizer: m is not this rank's ranges"
        );
        assert_eq!(
            opt.v.len(),
            held,
            "shard_optimizer: v is not this rank's ranges"
        );
        if self.zero == ZeroStage::Two {
            self.grad_shard = vec![0.0; opt.m.len()];
        }
    }

    /// Bytes this module holds beyond the trainer's buffers (ZeRO-2: the reduced gradient shard
    /// and the bucket buffers).
    pub fn extra_bytes(&self) -> u64 {
        4 * (self.grad_shard.len() + self.pool.elems()) as u64
    }

    /// All-gathers a byte string of any length from every rank; returns them in rank order
    /// (e.g. what each rank wrote into a checkpoint).
    pub fn all_gather_bytes(
        &mut self,
        mine: &[u8],
        what: &str,
    ) -> Result<Vec<Vec<u8>>, TrainError> {
        let (n, me) = (self.size(), self.rank());
        let len = u32::try_from(mine.len())
            .map_err(|_| TrainError::Dist(format!("{what}: {} bytes is too many", mine.len())))?;
        let mut lens = vec![0.0f32; n];
        lens[me] = f32::from_bits(len);
        self.group.all_gather(&mut lens).map_err(dist(what))?;
        let lens: Vec<usize> = lens.iter().map(|x| x.to_bits() as usize).collect();
        const MAX_BYTES: usize = 64 << 20;
        if let Some(r) = lens.iter().position(|&l| l > MAX_BYTES) {
            return Err(TrainError::Dist(format!(
                "{what}: rank {r} announced {} bytes (more than {MAX_BYTES})",
                lens[r]
            )));
        }
        let words = lens.iter().max().map_or(0, |m| m.div_ceil(4)).max(1);
        let mut all = vec![0.0f32; words * n];
        let mut own = bytes_to_words(mine);
        own.resize(words, 0.0);
        all[shard_range(words * n, n, me)].copy_from_slice(&own);
        self.group.all_gather(&mut all).map_err(dist(what))?;
        Ok(lens
            .iter()
            .enumerate()
            .map(|(r, &l)| {
                let bytes = bytemuck_bytes(&all[shard_range(words * n, n, r)]);
                bytes[..l.min(bytes.len())].to_vec()
            })
            .collect())
    }

    /// Start of a run: every rank must start at the same step (resumed from the same
    /// checkpoint, or all fresh). `mine` is this rank's start step, or why it could not load
    /// one; a rank that failed makes every rank fail, naming it.
    pub fn agree_on_start(&mut self, mine: Result<u64, String>) -> Result<(), TrainError> {
        let text = match &mine {
            Ok(step) => format!("ok {step}"),
            Err(e) => format!("error {e}"),
        };
        let all = self.all_gather_bytes(text.as_bytes(), "agreeing on the start step")?;
        let all: Vec<String> = all
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        if mine.is_err() {
            return Ok(()); // the caller returns its own error
        }
        if let Some((r, e)) = all
            .iter()
            .enumerate()
            .find_map(|(r, t)| t.strip_prefix("error ").map(|e| (r, e)))
        {
            return Err(TrainError::Dist(format!("rank {r} could not start: {e}")));
        }
        let differ: Vec<usize> = (1..all.len()).filter(|&r| all[r] != all[0]).collect();
        if !differ.is_empty() {
            return Err(TrainError::Dist(format!(
                "rank(s) {differ:?} start at another step than rank 0 ({}); every rank must resume \
                 from the same checkpoint (or none)",
                all.iter()
                    .enumerate()
                    .map(|(r, t)| format!("rank {r}: step {}", t.trim_start_matches("ok ")))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(())
    }

    /// The attached buckets, or the whole buffer as one.
    fn bucket_list(&self, len: usize) -> Vec<Range<usize>> {
        if self.buckets.is_empty() {
            vec![0..len]
        } else {
            self.buckets.clone()
        }
    }

    /// Runs one micro-step's backward (`f`, e.g. `model::backward_into`) and reduces the
    /// gradients if this micro-step communicates: the last micro-step of a step (ring, ZeRO-1),
    /// or every micro-step (ZeRO-2, whose reduced pieces accumulate in the shard). Each bucket is
    /// reduced as soon as backward reports it final — on a communication thread while backward
    /// goes on (overlap), or right then on this thread. Parameter servers reduce in
    /// [`Dp::step`] instead. Backward writes into `grads` (full size), except under ZeRO-2,
    /// which writes into this rank's bucket buffers and ignores `grads` (pass an empty one).
    pub fn backward<'g, F>(
        &mut self,
        last: bool,
        grads: &'g mut [f32],
        f: F,
    ) -> Result<(), TrainError>
    where
        F: FnOnce(&mut dyn GradSink) -> Result<(), ModelError>,
    {
        let communicate = self.ps.is_none() && (last || self.zero == ZeroStage::Two);
        if !communicate {
            return Ok(f(&mut Flat(grads))?);
        }
        let zero2 = self.zero == ZeroStage::Two;
        assert!(
            !zero2 || !self.buckets.is_empty(),
            "ZeRO-2 needs Dp::attach before backward"
        );
        let len = if zero2 { self.len } else { grads.len() };
        let buckets = self.bucket_list(len);
        let owned = self.owned_ranges(len);
        // Where each bucket's piece starts in the concatenated ZeRO-2 shard.
        let piece_at = piece_offsets(&buckets, &owned);
        let zero = self.zero;
        let group = &mut self.group;
        let shard = &mut self.grad_shard;
        let mut pool = std::mem::take(&mut self.pool);
        let reduce = |group: &mut Box<dyn Communicator>,
                      shard: &mut Vec<f32>,
                      k: usize,
                      buf: &mut [f32]|
         -> Result<f64, TrainError> {
            let t0 = Instant::now();
            match zero {
                ZeroStage::Off => group
                    .all_reduce(buf, ReduceOp::Sum)
                    .map_err(dist("gradient all-reduce"))?,
                ZeroStage::One => {
                    group
                        .reduce_scatter(buf, ReduceOp::Sum)
                        .map_err(dist("ZeRO-1 gradient reduce-scatter"))?;
                }
                ZeroStage::Two => {
                    let p = group
                        .reduce_scatter(buf, ReduceOp::Sum)
                        .map_err(dist("ZeRO-2 gradient reduce-scatter"))?;
                    let at = piece_at[k];
                    for (a, g) in shard[at..at + p.len()].iter_mut().zip(&buf[p]) {
                        *a += *g;
                    }
                }
            }
            Ok(t0.elapsed().as_secs_f64())
        };
        let result = if self.overlap {
            std::thread::scope(|s| -> Result<(f64, f64), TrainError> {
                let (tx, rx) = channel::<(usize, Piece<'_>)>();
                let (back_tx, back_rx) = channel::<(usize, Vec<f32>)>();
                let worker = s.spawn(move || -> Result<f64, TrainError> {
                    let mut secs = 0.0;
                    for (k, mut piece) in rx {
                        secs += reduce(group, shard, k, piece.buf())?;
                        if let Piece::Owned(v) = piece {
                            // The training thread may be gone after an error; nothing to return to.
                            let _ = back_tx.send((k, v));
                        }
                    }
                    Ok(secs)
                });
                let mut handoff = move |k: usize, piece: Piece<'g>| {
                    // A send fails only when the thread stopped on an error, which it reports.
                    let _ = tx.send((k, piece));
                    None
                };
                let (computed, handed) = run_backward(
                    f,
                    zero2,
                    grads,
                    &buckets,
                    &mut pool,
                    Some(&back_rx),
                    &mut handoff,
                );
                drop(handoff); // closes the channel: the worker ends after the last bucket
                let t_wait = Instant::now();
                let comm = worker.join().map_err(|_| {
                    TrainError::Dist("the gradient communication thread panicked".into())
                })?;
                let exposed = t_wait.elapsed().as_secs_f64();
                for (k, v) in back_rx.try_iter() {
                    pool.put_back(k, v);
                }
                computed?;
                assert_eq!(
                    handed,
                    buckets.len(),
                    "backward reported every bucket final"
                );
                Ok((comm?, exposed))
            })
        } else {
            let mut secs = 0.0;
            let mut failed = None;
            let mut handoff = |k: usize, mut piece: Piece<'_>| {
                if failed.is_none() {
                    match reduce(group, shard, k, piece.buf()) {
                        Ok(t) => secs += t,
                        Err(e) => failed = Some(e),
                    }
                }
                match piece {
                    Piece::Owned(v) => Some((k, v)),
                    Piece::Slice(_) => None,
                }
            };
            let (computed, handed) =
                run_backward(f, zero2, grads, &buckets, &mut pool, None, &mut handoff);
            match (computed, failed) {
                (Err(e), _) => Err(e.into()),
                (Ok(()), Some(e)) => Err(e),
                (Ok(()), None) => {
                    assert_eq!(
                        handed,
                        buckets.len(),
                        "backward reported every bucket final"
                    );
                    Ok((secs, secs))
                }
            }
        };
        // Waiting for a free ZeRO-2 buffer (all in flight) is communication the training
        // thread waited for, too.
        let waited = std::mem::take(&mut pool.waited_secs);
        if zero2 {
            // A failed step may leave buffers with the thread: replace them, so a caller that
            // goes on (e.g. after an error it handles) never waits for one that cannot come.
            pool.refill(&buckets);
        }
        self.pool = pool;
        match result {
            Ok((comm, exposed)) => {
                self.comm_secs += comm;
                self.exposed_secs += exposed + waited;
                Ok(())
            }
            Err(e) => {
                // The failed step's partial sums must not leak into the next one.
                self.grad_shard.fill(0.0);
                Err(e)
            }
        }
    }

    /// One optimizer step over the ranks' summed gradients; returns the global gradient norm
    /// before clipping. `grads` holds this rank's (pre-scaled) gradient sum on entry.
    pub fn step(
        &mut self,
        layout: &ParamLayout,
        params: &mut [f32],
        grads: &mut [f32],
        opt: &mut AdamW,
        cfg: &AdamWConfig,
        par: Par,
    ) -> Result<f64, TrainError> {
        let t0 = Instant::now();
        if let (Some(base), Some((world, ps))) = (&self.async_base, &mut self.ps) {
            let w = ps.workers as f32;
            // grads were scaled for a sum over workers: this rank's own mean is w times them.
            scale_inplace(grads, w);
            let before = params.to_vec();
            let norm = opt.step(layout, params, grads, cfg, par);
            let t1 = Instant::now();
            for (g, (p, b)) in grads.iter_mut().zip(params.iter().zip(&before)) {
                *g = (p - b) / w;
            }
            comm::ps::worker_step(world, ps, grads)
                .map_err(dist("asynchronous parameter-server push/pull"))?;
            for (p, (b, theta)) in params.iter_mut().zip(base.iter().zip(grads.iter())) {
                *p = b + theta;
            }
            let secs = t1.elapsed().as_secs_f64();
            self.comm_secs += secs;
            self.exposed_secs += secs;
            return Ok(norm);
        }
        if self.zero == ZeroStage::Off {
            if let Some((world, ps)) = &mut self.ps {
                comm::ps::worker_step(world, ps, grads)
                    .map_err(dist("parameter-server gradient push/pull"))?;
                let secs = t0.elapsed().as_secs_f64();
                self.comm_secs += secs;
                self.exposed_secs += secs;
            }
            // Ring: the buckets were all-reduced in `backward`.
            return Ok(opt.step(layout, params, grads, cfg, par));
        }
        // ZeRO: this rank's pieces of the reduced gradient, reduce-scattered in `backward`:
        // in place in `grads` (stage 1) or accumulated in the shard (stage 2).
        let len = if self.zero == ZeroStage::Two {
            self.len
        } else {
            grads.len()
        };
        let owned = self.owned_ranges(len);
        let zero2 = self.zero == ZeroStage::Two;
        let mut shard = std::mem::take(&mut self.grad_shard);
        let partial: f64 = if zero2 {
            sum_squares(&shard)
        } else {
            owned.iter().map(|r| sum_squares(&grads[r.clone()])).sum()
        };
        // Global norm: each rank's f64 sum of squares, combined in rank order on every rank.
        let n = self.size();
        let bits = partial.to_bits();
        let mut all = vec![0.0f32; 2 * n];
        let mine = shard_range(all.len(), n, self.rank());
        all[mine].copy_from_slice(&[
            f32::from_bits(bits as u32),
            f32::from_bits((bits >> 32) as u32),
        ]);
        let t1 = Instant::now();
        self.group
            .all_gather(&mut all)
            .map_err(dist("gathering the gradient norm"))?;
        let total: f64 = (0..n)
            .map(|k| {
                f64::from_bits(
                    all[2 * k].to_bits() as u64 | (all[2 * k + 1].to_bits() as u64) << 32,
                )
            })
            .sum();
        let secs = t1.elapsed().as_secs_f64();
        self.comm_secs += secs;
        self.exposed_secs += secs;
        let norm = total.sqrt();
        if let Some(max_norm) = cfg.grad_clip {
            let factor = clip_factor(norm, max_norm);
            if zero2 {
                scale_inplace(&mut shard, factor);
            } else {
                owned
                    .iter()
                    .for_each(|r| scale_inplace(&mut grads[r.clone()], factor));
            }
        }
        opt.step += 1;
        let mut at = 0;
        for r in &owned {
            let k = r.len();
            adamw_range(
                layout,
                &mut params[r.clone()],
                &mut opt.m[at..at + k],
                &mut opt.v[at..at + k],
                if zero2 {
                    &shard[at..at + k]
                } else {
                    &grads[r.clone()]
                },
                r.start,
                cfg,
                opt.step,
                par,
            );
            at += k;
        }
        shard.fill(0.0);
        self.grad_shard = shard;
        let t2 = Instant::now();
        for b in self.bucket_list(len) {
            self.group
                .all_gather(&mut params[b])
                .map_err(dist("ZeRO parameter all-gather"))?;
        }
        let secs = t2.elapsed().as_secs_f64();
        self.comm_secs += secs;
        self.exposed_secs += secs;
        Ok(norm)
    }
}

/// Runs backward (`f`) with the sink for the ZeRO stage; returns backward's result and how many
/// buckets it handed off.
fn run_backward<'g, F>(
    f: F,
    zero2: bool,
    grads: &'g mut [f32],
    buckets: &[Range<usize>],
    pool: &mut Zero2Pool,
    back: Option<&Receiver<(usize, Vec<f32>)>>,
    handoff: &mut Handoff<'g, '_>,
) -> (Result<(), ModelError>, usize)
where
    F: FnOnce(&mut dyn GradSink) -> Result<(), ModelError>,
{
    if zero2 {
        let mut sink = Zero2Sink::new(buckets, pool, back, handoff);
        let r = f(&mut sink);
        (r, sink.next)
    } else {
        let mut sink = BucketSink::new(grads, buckets, handoff);
        let r = f(&mut sink);
        (r, sink.next)
    }
}

/// For each bucket, where its piece (its overlap with `owned`) starts in the concatenation of
/// `owned` (0 for buckets without one).
fn piece_offsets(buckets: &[Range<usize>], owned: &[Range<usize>]) -> Vec<usize> {
    let mut starts = Vec::with_capacity(owned.len());
    let mut at = 0;
    for r in owned {
        starts.push((r.start, at));
        at += r.len();
    }
    buckets
        .iter()
        .map(|b| {
            starts
                .iter()
                .find(|(s, _)| b.contains(s))
                .map_or(0, |&(_, at)| at)
        })
        .collect()
}

/// A flat gradient buffer as a [`GradSink`] (no communication).
struct Flat<'g>(&'g mut [f32]);

impl GradSink for Flat<'_> {
    fn slice(&mut self, r: Range<usize>) -> &mut [f32] {
        &mut self.0[r]
    }
    fn ready(&mut self, _from: usize) {}
}

/// A finished gradient bucket on its way to be reduced: a piece of the flat buffer, or (ZeRO-2)
/// a pool buffer, which comes back after the reduction.
enum Piece<'g> {
    Slice(&'g mut [f32]),
    Owned(Vec<f32>),
}

impl Piece<'_> {
    fn buf(&mut self) -> &mut [f32] {
        match self {
            Piece::Slice(s) => s,
            Piece::Owned(v) => v,
        }
    }
}

/// Where a finished bucket goes: to the communication thread (returns `None`), or reduced on
/// the spot (returns a pool buffer for reuse).
type Handoff<'g, 'h> = dyn FnMut(usize, Piece<'g>) -> Option<(usize, Vec<f32>)> + 'h;

/// Hands each bucket of the flat gradient buffer off as soon as backward reports it final:
/// the buffer is split at the bucket's start and the finished tail handed off. Backward keeps
/// writing the part below.
struct BucketSink<'g, 'b, 'h> {
    /// The part of the buffer backward may still write: `0..rest.len()`.
    rest: &'g mut [f32],
    buckets: &'b [Range<usize>],
    /// Buckets handed off so far.
    next: usize,
    handoff: &'h mut Handoff<'g, 'h>,
}

impl<'g, 'b, 'h> BucketSink<'g, 'b, 'h> {
    fn new(
        grads: &'g mut [f32],
        buckets: &'b [Range<usize>],
        handoff: &'h mut Handoff<'g, 'h>,
    ) -> Self {
        BucketSink {
            rest: grads,
            buckets,
            next: 0,
            handoff,
        }
    }
}

impl GradSink for BucketSink<'_, '_, '_> {
    fn slice(&mut self, r: Range<usize>) -> &mut [f32] {
        assert!(
            r.end <= self.rest.len(),
            "backward wrote gradients {r:?} after reporting them final"
        );
        &mut self.rest[r]
    }

    fn ready(&mut self, from: usize) {
        while let Some(b) = self.buckets.get(self.next).filter(|b| b.start >= from) {
            debug_assert_eq!(b.end, self.rest.len(), "buckets tile the buffer top down");
            let (below, tail) = std::mem::take(&mut self.rest).split_at_mut(b.start);
            self.rest = below;
            (self.handoff)(self.next, Piece::Slice(tail));
            self.next += 1;
        }
    }
}

/// ZeRO-2's gradient buffers (`plan::cpu_runtime::zero2_buffer_elems`): one for the last
/// bucket (the tied embedding's, written by the LM head first and final only at the end), and
/// rotating buffers as large as the largest other bucket.
#[derive(Default)]
struct Zero2Pool {
    /// Index of the last bucket.
    last_index: usize,
    last: Option<Vec<f32>>,
    free: Vec<Vec<f32>>,
    /// Capacity of a rotating buffer.
    cap: usize,
    /// Seconds backward waited for a buffer to come back from the communication thread.
    waited_secs: f64,
}

impl Zero2Pool {
    fn new(buckets: &[Range<usize>]) -> Zero2Pool {
        let Some((last, others)) = buckets.split_last() else {
            return Zero2Pool::default();
        };
        let cap = others.iter().map(|b| b.len()).max().unwrap_or(0);
        let n = (plan::cpu_runtime::ZERO2_GRAD_BUFFERS as usize).min(others.len());
        Zero2Pool {
            last_index: buckets.len() - 1,
            last: Some(Vec::with_capacity(last.len())),
            free: (0..n).map(|_| Vec::with_capacity(cap)).collect(),
            cap,
            waited_secs: 0.0,
        }
    }

    /// Allocates the buffers a failed step did not return (nothing after a good step).
    fn refill(&mut self, buckets: &[Range<usize>]) {
        let Some((last, others)) = buckets.split_last() else {
            return;
        };
        if self.last.is_none() {
            self.last = Some(Vec::with_capacity(last.len()));
        }
        let n = (plan::cpu_runtime::ZERO2_GRAD_BUFFERS as usize).min(others.len());
        while self.free.len() < n {
            self.free.push(Vec::with_capacity(self.cap));
        }
    }

    fn elems(&self) -> usize {
        self.last.as_ref().map_or(0, |v| v.capacity())
            + self.free.iter().map(|v| v.capacity()).sum::<usize>()
    }

    fn put_back(&mut self, k: usize, v: Vec<f32>) {
        if k == self.last_index {
            self.last = Some(v);
        } else {
            self.free.push(v);
        }
    }

    /// A zeroed buffer of `len` for bucket `k`, waiting for one to come back from the
    /// communication thread if all are in flight.
    fn take(
        &mut self,
        k: usize,
        len: usize,
        back: Option<&Receiver<(usize, Vec<f32>)>>,
    ) -> Vec<f32> {
        let mut buf = loop {
            if k == self.last_index {
                if let Some(v) = self.last.take() {
                    break v;
                }
            } else if let Some(v) = self.free.pop() {
                break v;
            }
            let t0 = Instant::now();
            let got = back.map(|r| r.recv());
            self.waited_secs += t0.elapsed().as_secs_f64();
            match got {
                Some(Ok((j, v))) => self.put_back(j, v),
                // No buffer can come back (no thread, or it stopped on an error it reports):
                // a fresh one keeps backward going.
                _ => break Vec::with_capacity(len.max(self.cap)),
            }
        };
        buf.clear();
        buf.resize(len, 0.0);
        buf
    }
}

/// ZeRO-2's sink: each bucket's gradient goes into a pool buffer while backward writes it, and
/// the buffer is handed off (reduce-scattered into the rank's shard, then reused) once final.
struct Zero2Sink<'a, 'g, 'h> {
    buckets: &'a [Range<usize>],
    open: Vec<Option<Vec<f32>>>,
    next: usize,
    pool: &'a mut Zero2Pool,
    back: Option<&'a Receiver<(usize, Vec<f32>)>>,
    handoff: &'h mut Handoff<'g, 'h>,
}

impl<'a, 'g, 'h> Zero2Sink<'a, 'g, 'h> {
    fn new(
        buckets: &'a [Range<usize>],
        pool: &'a mut Zero2Pool,
        back: Option<&'a Receiver<(usize, Vec<f32>)>>,
        handoff: &'h mut Handoff<'g, 'h>,
    ) -> Self {
        Zero2Sink {
            buckets,
            open: vec![None; buckets.len()],
            next: 0,
            pool,
            back,
            handoff,
        }
    }
}

impl GradSink for Zero2Sink<'_, '_, '_> {
    fn slice(&mut self, r: Range<usize>) -> &mut [f32] {
        let k = self
            .buckets
            .iter()
            .position(|b| b.contains(&r.start))
            .expect("a gradient range inside the buffer");
        let b = &self.buckets[k];
        assert!(
            k >= self.next && r.end <= b.end,
            "backward wrote gradients {r:?} after reporting them final"
        );
        if self.open[k].is_none() {
            self.open[k] = Some(self.pool.take(k, b.len(), self.back));
        }
        let buf = self.open[k].as_mut().expect("opened above");
        &mut buf[r.start - b.start..r.end - b.start]
    }

    fn ready(&mut self, from: usize) {
        while let Some(b) = self.buckets.get(self.next).filter(|b| b.start >= from) {
            let k = self.next;
            let buf = match self.open[k].take() {
                Some(v) => v,
                None => self.pool.take(k, b.len(), self.back),
            };
            if let Some((j, v)) = (self.handoff)(k, Piece::Owned(buf)) {
                self.pool.put_back(j, v);
            }
            self.next += 1;
        }
    }
}

/// AdamW on the offset range starting at `start` (the slices are that range of the flat
/// buffers), with the same per-tensor decay rule as `model::AdamW::step`.
#[allow(clippy::too_many_arguments)]
fn adamw_range(
    layout: &ParamLayout,
    params: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    grads: &[f32],
    start: usize,
    cfg: &AdamWConfig,
    step: u32,
    par: Par,
) {
    let end = start + params.len();
    for t in &layout.tensors {
        let tr = t.range();
        let (lo, hi) = (tr.start.max(start), tr.end.min(end));
        if lo >= hi {
            continue;
        }
        let l = lo - start..hi - start;
        let hp = AdamWStep {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: if t.decay { cfg.weight_decay } else { 0.0 },
            step,
        };
        let par = if l.len() >= 65_536 { par } else { Par::Seq };
        adamw_update(
            &mut params[l.clone()],
            &mut m[l.clone()],
            &mut v[l.clone()],
            &grads[l],
            hp,
            par,
        );
    }
}

fn bytemuck_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl PsServer {
    /// Serves the whole run: waits for rank 0's announcement of the buffer length and step
    /// count, then serves every step synchronously (sum). Returns the steps served.
    pub fn serve(&mut self) -> Result<u64, TrainError> {
        let mut msg = [0u8; 16];
        self.world
            .recv(0, &mut msg)
            .map_err(dist("waiting for the job from rank 0"))?;
        let len = u64::from_le_bytes(msg[..8].try_into().expect("8 bytes")) as usize;
        let steps = u64::from_le_bytes(msg[8..].try_into().expect("8 bytes"));
        comm::ps::serve(
            &mut self.world,
            &self.layout,
            self.mode,
            ReduceOp::Sum,
            len,
            steps as usize,
        )
        .map_err(dist("parameter server"))?;
        Ok(steps)
    }
}

/// SHA-256 over the resolved config (kernel threads excluded: they may differ per rank) and the
/// token streams.
pub fn fingerprint(cfg: &crate::TrainConfig, train: &[u32], val: &[u32]) -> [u8; 32] {
    let mut c = cfg.clone();
    c.train.threads = 0;
    let mut h = Sha256::new();
    h.update(c.to_toml().as_bytes());
    for stream in [train, val] {
        h.update((stream.len() as u64).to_le_bytes());
        for chunk in stream.chunks(4096) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
            h.update(&bytes);
        }
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{ModelConfig, Shard};

    fn layout(n_layer: usize) -> ParamLayout {
        let cfg = ModelConfig {
            vocab_size: 50,
            max_seq_len: 8,
            n_layer,
            n_head: 2,
            channels: 16,
        };
        ParamLayout::new(&cfg, &Shard::full(&cfg)).unwrap()
    }

    #[test]
    fn buckets_tile_the_buffer_top_down_on_layer_boundaries() {
        let l = layout(4);
        let per_layer = l.layer_range(0).len();
        for elems in [1, per_layer, 2 * per_layer + 1, usize::MAX] {
            let bs = buckets(&l, elems);
            assert_eq!(bs.first().unwrap().end, l.len());
            assert_eq!(bs.last().unwrap().start, 0);
            assert!(bs.windows(2).all(|w| w[1].end == w[0].start), "{bs:?}");
            let points = l.ready_points();
            assert!(bs.iter().all(|b| points.contains(&b.start)), "{bs:?}");
        }
        // Tiny buckets: one per ready point (head, 4 layers, embedding).
        assert_eq!(buckets(&l, 1).len(), 6);
        assert_eq!(buckets(&l, usize::MAX), vec![0..l.len()]);
        // Two layers' worth: the head joins the last layer, then pairs of layers.
        let bs = buckets(&l, 2 * per_layer);
        assert_eq!(bs[0], l.layer_range(2).start..l.len());
    }

    #[test]
    fn plan_predicts_the_same_buckets_for_every_stage_shape() {
        let cfg = ModelConfig {
            vocab_size: 50,
            max_seq_len: 8,
            n_layer: 5,
            n_head: 2,
            channels: 16,
        };
        let full = Shard::full(&cfg);
        let shards = [
            full.clone(),
            Shard {
                layers: 0..2,
                has_head: false,
                ..full.clone()
            },
            Shard {
                layers: 2..5,
                has_embedding: false,
                ..full.clone()
            },
            Shard {
                layers: 1..3,
                has_embedding: false,
                has_head: false,
                ..full.clone()
            },
            Shard {
                tp_rank: 1,
                tp_size: 2,
                ..full.clone()
            },
        ];
        for shard in shards {
            let l = ParamLayout::new(&cfg, &shard).unwrap();
            for elems in [1, 500, 3000, 7000, usize::MAX] {
                let ours: Vec<u64> = buckets(&l, elems).iter().map(|b| b.len() as u64).collect();
                let plan = plan::cpu_runtime::grad_bucket_lens(&shard.dims(&cfg), elems as u64);
                assert_eq!(ours, plan, "{shard:?}, {elems} elements");
            }
        }
    }

    #[test]
    fn zero_pieces_cover_every_element_once_across_ranks() {
        let l = layout(3);
        for n in 1..=4 {
            let comms = comm::threads(n, comm::Config::default());
            let mut seen = vec![0u8; l.len()];
            for c in comms {
                let mut d = Dp::ring(Box::new(c), ZeroStage::One).with_buckets(256, true);
                d.attach(&l);
                let owned = d.owned_ranges(l.len());
                assert!(owned.windows(2).all(|w| w[0].end <= w[1].start));
                for r in owned {
                    seen[r].iter_mut().for_each(|x| *x += 1);
                }
            }
            assert!(seen.iter().all(|&x| x == 1), "{n} ranks");
        }
    }

    /// One ZeRO-2 step on both ranks (threads); `fail_first` makes each rank's first backward
    /// take two buffers, hand one bucket off and then fail, as a bad batch would, before the
    /// real step. Returns rank 0's parameters after the step.
    fn zero2_step(fail_first: bool) -> Vec<f32> {
        use model::{backward_into, forward, Activations, GradInput, NoTp, StageInput};
        let l = layout(3);
        let (b, t) = (2, 8);
        let tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % 50) as u32).collect();
        let comms = comm::threads(2, comm::Config::default());
        std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    let (l, tokens) = (&l, &tokens);
                    s.spawn(move || {
                        let mut d = Dp::ring(Box::new(c), ZeroStage::Two).with_buckets(256, true);
                        d.attach(l);
                        let held = d.owned_ranges(l.len()).iter().map(|r| r.len()).sum();
                        let mut opt = AdamW {
                            m: vec![0.0; held],
                            v: vec![0.0; held],
                            step: 0,
                        };
                        d.shard_optimizer(&opt, l.len());
                        let mut params = l.init_params(3);
                        let mut acts = Activations::new(l, b, t);
                        if fail_first {
                            let head = d.bucket_ranges()[0].clone();
                            let e = d.backward(true, &mut [], |g| {
                                g.slice(0..4)[0] += 1.0; // the embedding's bucket (LM head)
                                g.slice(head.start..head.start + 4)[0] += 1.0;
                                g.ready(head.start);
                                Err(ModelError::Config {
                                    field: "test",
                                    reason: "fails mid-backward".into(),
                                })
                            });
                            assert!(e.is_err());
                        }
                        let x = StageInput::Tokens(tokens);
                        forward(l, &params, &mut acts, x, Some(tokens), Par::Seq, &mut NoTp)
                            .unwrap();
                        let gi = GradInput::Loss {
                            targets: tokens,
                            d_loss: 1.0 / (2 * b * t) as f32,
                        };
                        d.backward(true, &mut [], |g| {
                            backward_into(l, &params, g, &mut acts, x, gi, Par::Seq, &mut NoTp)
                        })
                        .unwrap();
                        let cfg = AdamWConfig {
                            lr: 1e-2,
                            beta1: 0.9,
                            beta2: 0.95,
                            eps: 1e-8,
                            weight_decay: 0.1,
                            grad_clip: Some(1.0),
                        };
                        d.step(l, &mut params, &mut [], &mut opt, &cfg, Par::Seq)
                            .unwrap();
                        params
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).next().unwrap()
        })
    }

    #[test]
    fn a_failed_zero2_backward_leaves_the_next_step_exact() {
        // Without the pool refilled and the shard cleared, the second backward would wait
        // forever for a buffer or add the failed step's partial sums.
        assert_eq!(zero2_step(true), zero2_step(false));
    }
}
