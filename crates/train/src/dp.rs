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
//! 4. **Gradient sync** ([`Dp::step`]), once per optimizer step, after the last micro-batch
//!    (micro-steps never communicate): each rank's loss gradient is scaled by
//!    `1/(b·t·K·dp)`, so a *sum* reduction gives the global mean gradient.
//!    - `ring`: ring all-reduce (sum), then every rank runs the same AdamW on the same bits.
//!    - `ps`: push to / pull from the parameter servers (`comm::ps`, synchronous: the servers fold
//!      workers 0, 1, … in order), then as `ring`.
//!    - ZeRO-1/2: reduce-scatter; rank `r` owns `shard_range(len, dp, r)` of `m`, `v` (and, stage
//!      2, of the reduced gradient); the global gradient norm is the rank-ordered f64 sum of the
//!      shards' sums of squares; AdamW runs on the shard; an all-gather rebuilds the parameters.
//!
//! ```text
//!   rank 0: fwd/bwd mb 0..K ─┐                         ┌─ AdamW(all) ── same params
//!                            ├─ all-reduce(sum) ───────┤
//!   rank 1: fwd/bwd mb K..2K ┘                         └─ AdamW(all) ── same params
//!   ZeRO:                      reduce-scatter ─ AdamW(own range) ─ all-gather(params)
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
use model::{AdamW, AdamWConfig, ParamLayout};
use sha2::{Digest, Sha256};
use std::ops::Range;
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
    /// ZeRO-2: this rank's range of the reduced gradient (accumulated over micro-steps).
    grad_shard: Vec<f32>,
    /// Asynchronous parameter server: the weights every rank started from (θ is added to them).
    async_base: Option<Vec<f32>>,
    /// Seconds spent in gradient communication so far.
    pub comm_secs: f64,
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

/// The first `len` bytes of `bytes` as `f32` bit patterns (4 bytes each).
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
            comm_secs: 0.0,
        }
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
            group,
            ps: Some((world, layout)),
            zero: ZeroStage::Off,
            grad_shard: Vec::new(),
            async_base: matches!(mode, PsMode::Async { .. }).then(Vec::new),
            comm_secs: 0.0,
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

    /// This rank's offset range of a `len`-element flat buffer (ZeRO shards).
    pub fn shard(&self, len: usize) -> Range<usize> {
        shard_range(len, self.size(), self.rank())
    }

    /// The offset ranges of the flat buffer whose optimizer state (`m`, `v`) this rank holds,
    /// in order: `opt.m` / `opt.v` are these ranges concatenated. The whole buffer without
    /// ZeRO; this rank's shard under ZeRO-1/2.
    pub fn owned_ranges(&self, len: usize) -> Vec<Range<usize>> {
        match self.zero {
            ZeroStage::Off => vec![0..len],
            _ => vec![self.shard(len)],
        }
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
        let bad = self.differing_ranks(fingerprint, "exchanging the config/data fingerprint")?;
        if !bad.is_empty() {
            return Err(TrainError::Dist(format!(
                "rank(s) {bad:?} started with a different config or data than rank 0 (fingerprint of \
                 the resolved config and the token streams differs); start every rank with the same \
                 --config, --set flags and data files"
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
            self.grad_shard = vec![0.0; self.shard(len).len()];
        }
    }

    /// Bytes this module holds beyond the trainer's buffers (the ZeRO-2 gradient shard).
    pub fn extra_bytes(&self) -> u64 {
        4 * self.grad_shard.len() as u64
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

    /// ZeRO-2 with gradient accumulation: after a micro-step that is not the last, reduce this
    /// micro-step's gradients into the shard accumulator and clear the full buffer.
    pub fn after_micro_step(&mut self, grads: &mut [f32], last: bool) -> Result<(), TrainError> {
        if self.zero != ZeroStage::Two || last {
            return Ok(());
        }
        let t0 = Instant::now();
        let r = self
            .group
            .reduce_scatter(grads, ReduceOp::Sum)
            .map_err(dist("ZeRO-2 gradient reduce-scatter"))?;
        for (a, g) in self.grad_shard.iter_mut().zip(&grads[r]) {
            *a += *g;
        }
        grads.fill(0.0);
        self.comm_secs += t0.elapsed().as_secs_f64();
        Ok(())
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
            self.comm_secs += t1.elapsed().as_secs_f64();
            return Ok(norm);
        }
        if self.zero == ZeroStage::Off {
            match &mut self.ps {
                Some((world, ps)) => comm::ps::worker_step(world, ps, grads)
                    .map_err(dist("parameter-server gradient push/pull"))?,
                None => self
                    .group
                    .all_reduce(grads, ReduceOp::Sum)
                    .map_err(dist("gradient all-reduce"))?,
            }
            self.comm_secs += t0.elapsed().as_secs_f64();
            return Ok(opt.step(layout, params, grads, cfg, par));
        }
        let r = self
            .group
            .reduce_scatter(grads, ReduceOp::Sum)
            .map_err(dist("ZeRO gradient reduce-scatter"))?;
        if self.zero == ZeroStage::Two {
            // Earlier micro-steps' reduced gradients, then this one's (the sum order of a
            // 1-rank run's accumulation is not kept: a tolerance, see the tests).
            for (g, a) in grads[r.clone()].iter_mut().zip(&mut self.grad_shard) {
                *g += *a;
                *a = 0.0;
            }
        }
        self.comm_secs += t0.elapsed().as_secs_f64();
        // Global norm: each rank's f64 sum of squares, combined in rank order on every rank.
        let partial = sum_squares(&grads[r.clone()]);
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
        self.comm_secs += t1.elapsed().as_secs_f64();
        let norm = total.sqrt();
        if let Some(max_norm) = cfg.grad_clip {
            scale_inplace(&mut grads[r.clone()], clip_factor(norm, max_norm));
        }
        opt.step += 1;
        adamw_range(
            layout,
            &mut params[r.clone()],
            &mut opt.m,
            &mut opt.v,
            &grads[r.clone()],
            r.start,
            cfg,
            opt.step,
            par,
        );
        let t2 = Instant::now();
        self.group
            .all_gather(params)
            .map_err(dist("ZeRO parameter all-gather"))?;
        self.comm_secs += t2.elapsed().as_secs_f64();
        Ok(norm)
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
