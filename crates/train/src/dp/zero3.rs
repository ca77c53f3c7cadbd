//! ZeRO-3 / fully sharded data parallelism (Rajbhandari et al. 2020, §5.3, "P_os+g+p"): each
//! data-parallel rank keeps only its piece of every *unit* of the flat buffer — the embedding,
//! each layer, the head ([`model::Unit`]; the gradient buckets are these units, so the pieces
//! are [`Dp::owned_ranges`]) — of the weights, the reduced gradient and AdamW's `m`, `v`.
//!
//! A micro-batch's forward and backward take their weights from a [`model::ParamSource`] that
//! all-gathers each unit just before use into a reusable buffer and frees it after
//! ([`model::ParamLayout::forward_fetches`], [`model::ParamLayout::backward_fetches`]); while
//! the current unit computes, the communication thread already gathers the next one (prefetch;
//! not with `--no-overlap`). Backward writes each unit's gradient into a reusable buffer that
//! is reduce-scattered as soon as the unit is final (as ZeRO-2 does), and this rank's piece is
//! added to its gradient shard. Every collective — gathers and reduce-scatters — runs on one
//! communication thread in the order the training thread asks for them, which is the same on
//! every rank. The optimizer step is AdamW on the owned pieces; no parameter all-gather follows
//! (the next forward gathers what it needs).
//!
//! Buffers (`plan::cpu_runtime::zero3_memory` counts the same): the weight, gradient, `m` and
//! `v` pieces; gather buffers: one the size of the embedding unit and two (one without
//! prefetch) the size of the largest layer or head unit; gradient buffers: one embedding-sized
//! (the tied `wte` is written by the head first and final only at the end) and two layer-sized
//! (one being written while the other is reduced).
//!
//! Files: this one (the state, the micro-batch, the step, whole weights for checkpoints) and
//! `zero3/exchange.rs` (the jobs, the communication thread, the source and the sink).

use super::{dist, Dp, ZeroStage};
use crate::error::TrainError;
use crate::precision::Storage;
use comm::shard_range;
use kernels::adamw::{clip_factor, scale_inplace};
use kernels::Par;
use model::{
    ActSaved, ActScratch, AdamW, AdamWConfig, GradInput, ModelError, ParamLayout, StageInput,
    TpReduce, Unit,
};
use std::any::Any;
use std::ops::Range;
use std::sync::mpsc::channel;
use std::time::Instant;

/// Layer/head gradient buffers: one backward fills while the other is reduced.
const GRAD_BUFFERS: usize = 2;

mod exchange;
use exchange::{Job, Sink, Source, Worker};

/// A rank's ZeRO-3 state.
pub(super) struct Zero3 {
    /// The units in buffer order and their flat ranges.
    units: Vec<Unit>,
    ranges: Vec<Range<usize>>,
    /// Where each unit's piece starts in the concatenated shards, and its range in the unit
    /// (`shard_range(unit length, dp, rank)`).
    piece_at: Vec<usize>,
    piece: Vec<Range<usize>>,
    /// This rank's pieces of the weights (fp32 master) and of the reduced gradient (summed
    /// over micro-steps, `f32`).
    params: Vec<f32>,
    grad: Vec<f32>,
    /// The gather and gradient buffers, in the run's storage type: a [`Bufs<E>`].
    bufs: Box<dyn Any + Send>,
    /// Bytes per element of the storage type (4, or 2 under mixed precision).
    elem_bytes: usize,
    /// The embedding's gather buffer holds the embedding unit's current weights: gathered
    /// once per optimizer step and kept (the buffer is the embedding's own, and its weights
    /// change only at the step), so the tied LM head and backward fetch it without a gather.
    embed_cached: bool,
    /// Sizes, to replace buffers a failed pass left with the communication thread.
    embed_len: usize,
    small_len: usize,
    small_slots: usize,
    prefetch: bool,
    /// Gathers run and elements gathered by training micro-batches since the start.
    pub(super) gathers: u64,
    pub(super) gathered_elems: u64,
    /// Micro-batches (forward + backward) run since the start.
    pub(super) micro_batches: u64,
}

impl Zero3 {
    fn index(&self, unit: Unit) -> usize {
        self.units
            .iter()
            .position(|&u| u == unit)
            .expect("a unit of this layout")
    }

    /// The unit holding flat offset `at`.
    fn unit_at(&self, at: usize) -> usize {
        self.ranges.partition_point(|r| r.end <= at)
    }

    fn is_embed(&self, k: usize) -> bool {
        self.units[k] == Unit::Embed
    }

    /// Bytes of every buffer above.
    fn bytes(&self) -> u64 {
        let f32s = self.params.len() + self.grad.len() + self.wide_len();
        let elems = 2 * self.embed_len + (self.small_slots + GRAD_BUFFERS) * self.small_len;
        (4 * f32s + self.elem_bytes * elems) as u64
    }

    /// Length of the `f32` buffer 16-bit gradients are widened into (0 in fp32).
    fn wide_len(&self) -> usize {
        if self.elem_bytes == 4 {
            0
        } else {
            self.embed_len.max(self.small_len)
        }
    }
}

/// The gather and gradient buffers in storage type `E`: gather buffers `embed`
/// (embedding-sized) and `small` (largest layer/head; two with prefetch), gradient buffers the
/// same sizes, and under mixed precision the `f32` buffer the reduction widens into.
struct Bufs<E> {
    gather_embed: Option<Vec<E>>,
    gather_small: Vec<Vec<E>>,
    grad_embed: Option<Vec<E>>,
    grad_small: Vec<Vec<E>>,
    wide: Vec<f32>,
}

impl<E: Storage> Bufs<E> {
    fn new(z: &Zero3) -> Bufs<E> {
        Bufs {
            gather_embed: Some(vec![E::default(); z.embed_len]),
            gather_small: (0..z.small_slots)
                .map(|_| vec![E::default(); z.small_len])
                .collect(),
            grad_embed: Some(vec![E::default(); z.embed_len]),
            grad_small: (0..GRAD_BUFFERS)
                .map(|_| vec![E::default(); z.small_len])
                .collect(),
            wide: vec![0.0; z.wide_len()],
        }
    }

    /// Replaces buffers a failed pass left with the communication thread.
    fn refill(&mut self, z: &Zero3) {
        self.gather_embed
            .get_or_insert_with(|| vec![E::default(); z.embed_len]);
        self.grad_embed
            .get_or_insert_with(|| vec![E::default(); z.embed_len]);
        debug_assert!(
            self.gather_small.len() <= z.small_slots && self.grad_small.len() <= GRAD_BUFFERS
        );
        while self.gather_small.len() < z.small_slots {
            self.gather_small.push(vec![E::default(); z.small_len]);
        }
        while self.grad_small.len() < GRAD_BUFFERS {
            self.grad_small.push(vec![E::default(); z.small_len]);
        }
    }
}

impl Dp {
    /// Takes this rank's pieces of the weights out of the whole buffer `params` (identical on
    /// every rank: after [`Dp::sync_params`]) and frees it; allocates the gradient shard and the
    /// gather and gradient buffers. Call after [`Dp::attach`] under ZeRO-3.
    /// `E` is the run's storage type: the weights are gathered and the gradients written in
    /// it (fp32 master pieces, `f32` reduction and AdamW either way).
    pub fn zero3_shard_params<E: Storage>(&mut self, layout: &ParamLayout, params: &mut Vec<f32>) {
        assert_eq!(
            self.zero,
            ZeroStage::Three,
            "zero3_shard_params needs ZeRO-3"
        );
        assert_eq!(
            params.len(),
            layout.len(),
            "zero3_shard_params: params length"
        );
        let units = layout.units();
        let ranges: Vec<Range<usize>> = units.iter().map(|&u| layout.unit_range(u)).collect();
        assert_eq!(
            ranges,
            self.bucket_list(layout.len())
                .into_iter()
                .rev()
                .collect::<Vec<_>>(),
            "ZeRO-3 buckets are the units"
        );
        let (n, r) = (self.size(), self.rank());
        let piece: Vec<Range<usize>> = ranges.iter().map(|u| shard_range(u.len(), n, r)).collect();
        let mut piece_at = Vec::with_capacity(units.len());
        let mut shard = Vec::with_capacity(piece.iter().map(|p| p.len()).sum());
        for (u, p) in ranges.iter().zip(&piece) {
            piece_at.push(shard.len());
            shard.extend_from_slice(&params[u.start + p.start..u.start + p.end]);
        }
        *params = Vec::new();
        let embed_len = units
            .iter()
            .zip(&ranges)
            .find(|(u, _)| **u == Unit::Embed)
            .map_or(0, |(_, r)| r.len());
        let small_len = units
            .iter()
            .zip(&ranges)
            .filter(|(u, _)| **u != Unit::Embed)
            .map(|(_, r)| r.len())
            .max()
            .unwrap_or(0);
        let small_slots = if self.overlap { 2 } else { 1 };
        let grad = vec![0.0; shard.len()];
        let mut z = Box::new(Zero3 {
            units,
            ranges,
            piece_at,
            piece,
            params: shard,
            grad,
            bufs: Box::new(()),
            elem_bytes: E::BYTES,
            embed_cached: false,
            embed_len,
            small_len,
            small_slots,
            prefetch: self.overlap,
            gathers: 0,
            gathered_elems: 0,
            micro_batches: 0,
        });
        z.bufs = Box::new(Bufs::<E>::new(&z));
        self.z3 = Some(z);
    }

    /// ZeRO-3: gathers and bytes gathered (in the storage type) per micro-batch so far
    /// (mean), or `None` before the first micro-batch or without ZeRO-3.
    pub fn zero3_gathers_per_micro_batch(&self) -> Option<(f64, f64)> {
        let z = self.z3.as_ref()?;
        (z.micro_batches > 0).then(|| {
            let m = z.micro_batches as f64;
            (
                z.gathers as f64 / m,
                (z.gathered_elems * z.elem_bytes as u64) as f64 / m,
            )
        })
    }

    /// One micro-batch under ZeRO-3: forward on tokens `x` with targets `y` (returns the mean
    /// loss) and, with `d_loss`, backward, whose gradients are reduce-scattered unit by unit
    /// into this rank's gradient shard (16-bit gradients widened times `unscale` first).
    /// `saved` and `scratch` are built for the whole model, in the storage type given to
    /// [`Dp::zero3_shard_params`].
    #[allow(clippy::too_many_arguments)]
    pub fn zero3_micro_batch<E: Storage>(
        &mut self,
        layout: &ParamLayout,
        saved: &mut ActSaved<E>,
        scratch: &mut ActScratch<E>,
        x: &[u32],
        y: &[u32],
        (d_loss, unscale): (Option<f32>, f32),
        par: Par,
        tp: &mut dyn TpReduce,
    ) -> Result<f32, TrainError> {
        let mut z = self
            .z3
            .take()
            .expect("ZeRO-3 state: call zero3_shard_params first");
        let mut bufs = std::mem::replace(&mut z.bufs, Box::new(()))
            .downcast::<Bufs<E>>()
            .expect("ZeRO-3 buffers in the storage type given to zero3_shard_params");
        let r = self.zero3_run(
            &mut z,
            &mut bufs,
            layout,
            saved,
            scratch,
            x,
            y,
            (d_loss, unscale),
            par,
            tp,
        );
        if d_loss.is_some() {
            z.micro_batches += 1;
        }
        if r.is_err() {
            // Buffers may be left with the stopped thread; a partial gradient must not leak.
            z.grad.fill(0.0);
            z.embed_cached = false;
        }
        bufs.refill(&z);
        z.bufs = bufs;
        self.z3 = Some(z);
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn zero3_run<E: Storage>(
        &mut self,
        z: &mut Zero3,
        bufs: &mut Bufs<E>,
        layout: &ParamLayout,
        saved: &mut ActSaved<E>,
        scratch: &mut ActScratch<E>,
        x: &[u32],
        y: &[u32],
        (d_loss, unscale): (Option<f32>, f32),
        par: Par,
        tp: &mut dyn TpReduce,
    ) -> Result<f32, TrainError> {
        let (job_tx, job_rx) = channel::<Job<E>>();
        let (gathered_tx, gathered_rx) = channel();
        let (reduced_tx, reduced_rx) = channel();
        let mut params = std::mem::take(&mut z.params);
        let mut grad = std::mem::take(&mut z.grad);
        let free_gather = (
            bufs.gather_embed.take(),
            std::mem::take(&mut bufs.gather_small),
        );
        let free_grad = (bufs.grad_embed.take(), std::mem::take(&mut bufs.grad_small));
        let wide = &mut bufs.wide;
        let group = &mut self.group;
        let zr = &*z;
        let out = std::thread::scope(|s| {
            let worker = Worker {
                group,
                params: &params,
                grad: &mut grad,
                ranges: &zr.ranges,
                piece_at: &zr.piece_at,
                piece: &zr.piece,
                wide,
                unscale,
            };
            let thread = s.spawn(move || worker.run(job_rx, gathered_tx, reduced_tx));
            let mut src = Source {
                z: zr,
                jobs: job_tx.clone(),
                gathered: gathered_rx,
                ready: Vec::new(),
                in_flight: Vec::new(),
                free_embed: free_gather.0,
                free_small: free_gather.1,
                embed_cached: zr.embed_cached,
                waited: 0.0,
                gathers: 0,
                gathered_elems: 0,
            };
            let mut sink = Sink {
                z: zr,
                jobs: job_tx,
                reduced: reduced_rx,
                writing: vec![None; zr.units.len()],
                handed: 0,
                free_embed: free_grad.0,
                free_small: free_grad.1,
                waited: 0.0,
                failed: None,
            };
            let input = StageInput::Tokens(x);
            let pass = (|| -> Result<f32, ModelError> {
                let loss = model::forward_sourced(
                    layout,
                    &mut src,
                    saved,
                    scratch,
                    input,
                    Some(y),
                    par,
                    &mut *tp,
                )?
                .expect("the whole model has the head");
                if let Some(d_loss) = d_loss {
                    let gi = GradInput::Loss { targets: y, d_loss };
                    model::backward_sourced(
                        layout, &mut src, &mut sink, saved, scratch, input, gi, par, &mut *tp,
                    )?;
                }
                Ok(loss)
            })();
            // Close the channel: the thread ends after the last job.
            let Sink {
                jobs,
                free_embed: mut grad_embed,
                free_small: mut grad_small,
                waited: sink_waited,
                failed,
                reduced,
                ..
            } = sink;
            drop(jobs);
            let Source {
                jobs,
                free_embed: gather_embed,
                free_small: gather_small,
                embed_cached,
                waited: src_waited,
                gathers,
                gathered_elems,
                ..
            } = src;
            drop(jobs);
            let t_wait = Instant::now();
            let comm = thread
                .join()
                .map_err(|_| TrainError::Dist("the ZeRO-3 communication thread panicked".into()));
            let tail = t_wait.elapsed().as_secs_f64();
            for (j, b) in reduced.try_iter() {
                if zr.is_embed(j) {
                    grad_embed = Some(b);
                } else {
                    grad_small.push(b);
                }
            }
            (
                pass,
                comm,
                failed,
                (gather_embed, gather_small, grad_embed, grad_small),
                src_waited + sink_waited + tail,
                (gathers, gathered_elems, embed_cached),
            )
        });
        let (pass, comm, failed, out_bufs, exposed, (gathers, elems, embed_cached)) = out;
        z.embed_cached = embed_cached && out_bufs.0.is_some();
        z.params = std::mem::take(&mut params);
        z.grad = std::mem::take(&mut grad);
        (
            bufs.gather_embed,
            bufs.gather_small,
            bufs.grad_embed,
            bufs.grad_small,
        ) = out_bufs;
        if d_loss.is_some() {
            // Training micro-batches only (validation forwards gather half as much).
            z.gathers += gathers;
            z.gathered_elems += elems;
        }
        let comm_secs = comm??;
        self.comm_secs += comm_secs.total;
        self.comm_wait_secs += comm_secs.wait;
        self.exposed_secs += exposed;
        // A model error from a fetch or the sink means the thread stopped: its error (above)
        // is the cause; otherwise report the model's own.
        let loss = pass?;
        if let Some(e) = failed {
            return Err(TrainError::Dist(e.to_string()));
        }
        Ok(loss)
    }

    /// The whole weights, all-gathered unit by unit (every rank calls it: a checkpoint, the
    /// run's summary). Temporarily the full model's size.
    pub fn zero3_full_params(&mut self) -> Result<Vec<f32>, TrainError> {
        let z = self.z3.as_ref().expect("ZeRO-3 state");
        let len = z.ranges.last().map_or(0, |r| r.end);
        let mut full = vec![0.0f32; len];
        for (k, u) in z.ranges.iter().enumerate() {
            let (at, p) = (z.piece_at[k], z.piece[k].clone());
            let buf = &mut full[u.clone()];
            buf[p.clone()].copy_from_slice(&z.params[at..at + p.len()]);
            self.group
                .all_gather(buf)
                .map_err(dist("ZeRO-3: gathering the whole weights"))?;
        }
        Ok(full)
    }

    /// Replaces this rank's weight pieces with its pieces of `full` (a rollback to a
    /// checkpoint's weights) and clears the gradient shard.
    pub fn zero3_set_params(&mut self, full: &[f32]) {
        let z = self.z3.as_mut().expect("ZeRO-3 state");
        for (k, u) in z.ranges.iter().enumerate() {
            let (at, p) = (z.piece_at[k], z.piece[k].clone());
            z.params[at..at + p.len()].copy_from_slice(&full[u.start + p.start..u.start + p.end]);
        }
        z.grad.fill(0.0);
        z.embed_cached = false;
    }

    /// Bytes ZeRO-3 holds beyond the trainer's buffers (its weight and gradient pieces and the
    /// gather and gradient buffers).
    pub(super) fn zero3_bytes(&self) -> u64 {
        self.z3.as_ref().map_or(0, |z| z.bytes())
    }

    /// [`Dp::step`] under ZeRO-3: the global norm from every rank's gradient piece, then
    /// clipping and AdamW on the owned pieces of the weights.
    pub(super) fn zero3_step(
        &mut self,
        layout: &ParamLayout,
        opt: &mut AdamW,
        cfg: &AdamWConfig,
        par: Par,
        mesh: super::MeshNorm<'_>,
        apply: &mut dyn FnMut(f64) -> Result<bool, TrainError>,
    ) -> Result<f64, TrainError> {
        let mut z = self.z3.take().expect("ZeRO-3 state");
        // The weights change below (or a skipped step leaves them): the next step gathers
        // the embedding afresh either way, so every step gathers alike.
        z.embed_cached = false;
        // Only what this rank counts: its pieces less the tensors another tensor-parallel
        // rank counts (replicated norms and biases), as ZeRO-1/2 do.
        let owned = self.owned_ranges(layout.len());
        let partial = super::zero::shard_sum_squares(&owned, mesh.copies, &z.grad);
        let total = match self
            .global_sum_squares(partial)
            .and_then(|t| (mesh.combine)(t))
        {
            Ok(t) => t,
            Err(e) => {
                self.z3 = Some(z);
                return Err(e);
            }
        };
        let norm = total.sqrt();
        let r = (|| {
            if !apply(norm)? {
                return Ok(norm); // skipped on every rank alike (the norm is global)
            }
            if let Some(max_norm) = cfg.grad_clip {
                scale_inplace(&mut z.grad, clip_factor(norm, max_norm));
            }
            opt.step += 1;
            let owned = self.owned_ranges(layout.len());
            let mut at = 0;
            for r in &owned {
                let k = r.len();
                model::adamw_update_range(
                    layout,
                    r.start,
                    &mut z.params[at..at + k],
                    &mut opt.m[at..at + k],
                    &mut opt.v[at..at + k],
                    &z.grad[at..at + k],
                    cfg,
                    opt.step,
                    par,
                );
                at += k;
            }
            Ok(norm)
        })();
        z.grad.fill(0.0);
        self.z3 = Some(z);
        r
    }
}

/// The trainer's micro-batches of one step under ZeRO-3 (every one reduce-scatters its
/// gradients); returns their losses. `pipe` is the mesh of a tensor-parallel run (one stage):
/// the model's tensor-parallel collectives run over its group.
pub(crate) fn zero3_micro_batches<E: Storage>(
    d: &mut Dp,
    layout: &ParamLayout,
    acts: &mut crate::pipeline::StageActs<E>,
    mb: &crate::pipeline::MicroBatches<'_>,
    par: Par,
    mut pipe: Option<&mut crate::pipeline::Pipeline>,
) -> Result<Vec<f32>, TrainError> {
    let (saved, scratch) = acts.first_set();
    let m = mb.xs.len() / mb.bt;
    // Each step gathers the embedding once, whatever validation did since the last step.
    if let Some(z) = d.z3.as_mut() {
        z.embed_cached = false;
    }
    (0..m)
        .map(|k| {
            let r = k * mb.bt..(k + 1) * mb.bt;
            crate::pipeline::with_tp(pipe.as_deref_mut(), |tp| {
                d.zero3_micro_batch(
                    layout,
                    saved,
                    scratch,
                    &mb.xs[r.clone()],
                    &mb.ys[r],
                    (Some(mb.d_loss), mb.unscale),
                    par,
                    tp,
                )
            })
        })
        .collect()
}
