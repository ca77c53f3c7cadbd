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
//!
//! Files: `agree.rs` (fingerprint, identical weights, losses, start step: what the ranks agree
//! on), `buckets.rs` (gradient buckets, their sinks and the communication thread), `zero.rs`
//! (ZeRO-1/2: owned ranges, the sharded optimizer step), `zero3.rs` (ZeRO-3: weights sharded
//! too, each unit gathered just before use), `ps.rs` (the parameter-server role).

mod agree;
mod buckets;
mod ps;
mod zero;
mod zero3;

pub use agree::{agree_on_start, all_gather_bytes, differing_ranks, fingerprint, Gathered};
pub use buckets::buckets;
pub use ps::{PsServer, Role};
pub(crate) use zero::subtract;
pub(crate) use zero3::zero3_micro_batches;

use crate::error::TrainError;
use buckets::Zero2Pool;
use comm::ps::PsLayout;
use comm::{Comm, Communicator};
use kernels::Par;
use model::{AdamW, AdamWConfig, ParamLayout};
use std::ops::Range;

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
    /// Weights too: each layer gathered just before use (`zero3.rs`).
    Three,
}

impl ZeroStage {
    /// 0, 1, 2 or 3.
    pub fn number(self) -> u8 {
        match self {
            ZeroStage::Off => 0,
            ZeroStage::One => 1,
            ZeroStage::Two => 2,
            ZeroStage::Three => 3,
        }
    }
    /// From 0, 1, 2 or 3.
    pub fn from_number(n: u8) -> Option<ZeroStage> {
        match n {
            0 => Some(ZeroStage::Off),
            1 => Some(ZeroStage::One),
            2 => Some(ZeroStage::Two),
            3 => Some(ZeroStage::Three),
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
    /// ZeRO-3: the sharded weights, gradient shard and gather buffers (`zero3.rs`).
    z3: Option<Box<zero3::Zero3>>,
    /// When each gradient bucket was reduced, on the communication thread or not, since
    /// [`Dp::take_bucket_spans`] last emptied it (the trace).
    bucket_spans: Vec<BucketSpan>,
    /// Seconds spent in gradient communication so far (on any thread).
    pub comm_secs: f64,
    /// Seconds the training thread waited for gradient communication so far (the part of
    /// `comm_secs` not hidden behind backward).
    pub exposed_secs: f64,
    /// Seconds of `comm_secs` spent waiting for the other ranks to reach the same collective
    /// (`comm::Communicator::peer_wait_secs`); the rest is transfer. Stays 0 where the
    /// transport cannot tell ([`Dp::measures_peer_wait`]).
    pub comm_wait_secs: f64,
}

/// One gradient bucket's collective: (bucket, start, end, seconds of it spent waiting for the
/// other ranks' first frame, which come first).
pub type BucketSpan = (usize, std::time::Instant, std::time::Instant, f64);

/// Default gradient bucket size: 512 KiB, under one layer of the default model, so backward's
/// later layers overlap the earlier layers' reduction (PyTorch DDP's default is 25 MiB, sized
/// for GPUs and far larger models).
pub const DEFAULT_BUCKET_BYTES: usize = 512 << 10;

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

fn dist(what: &str) -> impl FnOnce(comm::CommError) -> TrainError + '_ {
    move |source| TrainError::Comm {
        what: format!("data parallel: {what}"),
        source,
    }
}

/// What the global gradient norm needs beyond the data-parallel group (tensor parallelism):
/// the ranges of this rank's buffer another rank counts (`StageModel::copies`), and the sum of
/// the data-parallel groups' totals over the other mesh axes (the identity without them).
pub struct MeshNorm<'a> {
    /// Ranges not counted here.
    pub copies: &'a [std::ops::Range<usize>],
    /// The group's sum of squares → the job's.
    pub combine: &'a mut dyn FnMut(f64) -> Result<f64, TrainError>,
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
            z3: None,
            bucket_spans: Vec::new(),
            comm_secs: 0.0,
            exposed_secs: 0.0,
            comm_wait_secs: 0.0,
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
        // ZeRO-3 gathers and reduces per unit (embedding, layer, head): one bucket each.
        let elems = if self.zero == ZeroStage::Three {
            1
        } else {
            self.bucket_bytes / 4
        };
        self.buckets = buckets(layout, elems);
        self.len = layout.len();
        if self.zero == ZeroStage::Two {
            self.pool = Zero2Pool::new(&self.buckets);
        }
    }

    /// [`Dp::attach`] for a stage of several model chunks (interleaved pipelines): chunk `c`'s
    /// layout at offset `at` of the stage's flat buffer, the chunks consecutive in the order
    /// given. The buckets of each chunk, shifted to its window, highest offsets first, so they
    /// tile the stage's buffer top down as [`buckets`] does for one layout.
    pub fn attach_windows(&mut self, chunks: &[(&ParamLayout, usize)]) {
        let mut all = Vec::new();
        let mut len = 0;
        for &(layout, at) in chunks.iter().rev() {
            debug_assert!(all
                .last()
                .is_none_or(|b: &Range<usize>| b.start == at + layout.len()));
            all.extend(
                buckets(layout, self.bucket_bytes / 4)
                    .into_iter()
                    .map(|b| b.start + at..b.end + at),
            );
            len += layout.len();
        }
        self.buckets = all;
        self.len = len;
        if self.zero == ZeroStage::Two {
            self.pool = Zero2Pool::new(&self.buckets);
        }
    }

    /// Reduces the whole gradient buffer now (every bucket, as the last micro-step's backward
    /// would): for steps whose backward ran without [`Dp::backward`] — interleaved chunks,
    /// and ZeRO-1 in a pipeline, whose tied embedding must be summed over its stages first.
    pub fn reduce_all(&mut self, grads: &mut [f32]) -> Result<(), TrainError> {
        assert!(
            !matches!(self.zero, ZeroStage::Two | ZeroStage::Three),
            "ZeRO-2/3 reduce every micro-step inside backward"
        );
        self.backward(true, grads, |sink| {
            sink.ready(0);
            Ok(())
        })
    }

    /// Whether backward needs the trainer's full-size gradient buffer (not under ZeRO-2/3).
    pub fn needs_full_grads(&self) -> bool {
        !matches!(self.zero, ZeroStage::Two | ZeroStage::Three)
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
        precision: plan::recipe::Precision,
    ) -> Option<plan::cpu_comm::DpCommTime> {
        // Parameter servers are not modelled.
        if self.ps.is_some() {
            return None;
        }
        let k = plan::cpu_comm::CommCalibration::for_transport(self.transport());
        if self.zero == ZeroStage::Three {
            let micro = (compute.matmul_secs + compute.memory_secs + compute.overhead_secs)
                / accum.max(1) as f64;
            return Some(plan::cpu_runtime::zero3_comm_time_with(
                dims,
                (accum, self.size() as u64),
                micro,
                (self.overlap, self.spare_core),
                precision,
                &k,
            ));
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
        Some(plan::cpu_comm::dp_comm_time(
            dims,
            &setup,
            micro * 2.0 / 3.0,
            &k,
        ))
    }

    /// Whether [`Dp::comm_wait_secs`] is measured: the built-in transports' collectives (not
    /// MPI's, not the parameter server's push and pull).
    pub fn measures_peer_wait(&self) -> bool {
        self.ps.is_none() && self.group.peer_wait_secs().is_some()
    }

    /// This rank in the data-parallel group.
    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    /// Data-parallel ranks.
    pub fn size(&self) -> usize {
        self.group.size()
    }

    /// The gradient buckets reduced since the last call.
    pub fn take_bucket_spans(&mut self) -> Vec<BucketSpan> {
        std::mem::take(&mut self.bucket_spans)
    }

    /// Whether gradients go through parameter servers.
    pub fn is_parameter_server(&self) -> bool {
        self.ps.is_some()
    }

    /// The ZeRO stage.
    pub fn zero(&self) -> ZeroStage {
        self.zero
    }

    /// One optimizer step over the ranks' summed gradients; returns the global gradient norm
    /// before clipping. `grads` holds this rank's (pre-scaled) gradient sum on entry: after
    /// [`Dp::backward`] it is the all-reduced sum (ring), this rank's reduce-scattered pieces
    /// (ZeRO-1; ZeRO-2 keeps them in its shard), or still local (parameter servers, which
    /// reduce here).
    pub fn step(
        &mut self,
        layout: &ParamLayout,
        params: &mut [f32],
        grads: &mut [f32],
        opt: &mut AdamW,
        cfg: &AdamWConfig,
        par: Par,
    ) -> Result<f64, TrainError> {
        let mut same = Ok;
        let mesh = MeshNorm {
            copies: &[],
            combine: &mut same,
        };
        self.step_in_mesh(layout, params, grads, opt, cfg, par, mesh, &mut |_| {
            Ok(true)
        })
    }

    /// [`Dp::step`] for a rank of a mesh with other axes (tensor parallelism): the global norm
    /// leaves out `mesh.copies` and sums over the other axes with `mesh.combine`. Before
    /// anything reaches the weights it asks `apply(global gradient norm)`: `false` skips the
    /// update (the step's gradients are dropped, the optimizer state is left as it was). Under
    /// ZeRO and the synchronous parameter server every rank sees the same norm, so every rank
    /// decides alike (the trainer's stability guards and loss scale).
    #[allow(clippy::too_many_arguments)]
    pub fn step_in_mesh(
        &mut self,
        layout: &ParamLayout,
        params: &mut [f32],
        grads: &mut [f32],
        opt: &mut AdamW,
        cfg: &AdamWConfig,
        par: Par,
        mesh: MeshNorm<'_>,
        apply: &mut dyn FnMut(f64) -> Result<bool, TrainError>,
    ) -> Result<f64, TrainError> {
        if self.ps.is_some() {
            return self.ps_step(layout, params, grads, opt, cfg, par, apply);
        }
        match self.zero {
            // Ring: the buckets were all-reduced in `backward`.
            ZeroStage::Off => {
                let norm = AdamW::grad_norm(grads);
                if !apply(norm)? {
                    return Ok(norm);
                }
                Ok(opt.step(layout, params, grads, cfg, par))
            }
            ZeroStage::One | ZeroStage::Two => {
                self.zero_step(layout, params, grads, opt, cfg, par, mesh, apply)
            }
            // ZeRO-3 keeps its own weight pieces (`params` is empty) and gradient shard.
            ZeroStage::Three => self.zero3_step(layout, opt, cfg, par, mesh, apply),
        }
    }
}
