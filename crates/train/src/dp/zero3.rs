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

use super::{dist, Dp, ZeroStage};
use crate::error::TrainError;
use comm::{shard_range, Communicator, ReduceOp};
use kernels::adamw::{clip_factor, scale_inplace, sum_squares};
use kernels::Par;
use model::{
    ActSaved, ActScratch, AdamW, AdamWConfig, GradInput, GradSink, ModelError, NoTp, ParamLayout,
    ParamSource, StageInput, TpError, Unit,
};
use std::ops::Range;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Instant;

/// Layer/head gradient buffers: one backward fills while the other is reduced.
const GRAD_BUFFERS: usize = 2;

/// A rank's ZeRO-3 state.
pub(super) struct Zero3 {
    /// The units in buffer order and their flat ranges.
    units: Vec<Unit>,
    ranges: Vec<Range<usize>>,
    /// Where each unit's piece starts in the concatenated shards, and its range in the unit
    /// (`shard_range(unit length, dp, rank)`).
    piece_at: Vec<usize>,
    piece: Vec<Range<usize>>,
    /// This rank's pieces of the weights and of the reduced gradient (summed over micro-steps).
    params: Vec<f32>,
    grad: Vec<f32>,
    /// Gather buffers: `embed` (embedding-sized), `small` (largest layer/head).
    gather_embed: Option<Vec<f32>>,
    gather_small: Vec<Vec<f32>>,
    /// Gradient buffers, the same sizes.
    grad_embed: Option<Vec<f32>>,
    grad_small: Vec<Vec<f32>>,
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
        let n = self.params.len()
            + self.grad.len()
            + 2 * self.embed_len
            + (self.small_slots + GRAD_BUFFERS) * self.small_len;
        4 * n as u64
    }
}

/// Work for the communication thread, in the order every rank asks for it.
enum Job {
    /// All-gather unit `k` into the buffer.
    Gather(usize, Vec<f32>),
    /// Reduce-scatter unit `k`'s gradient in the buffer; add this rank's piece to the shard.
    Reduce(usize, Vec<f32>),
}

/// What the communication thread works with.
struct Worker<'a> {
    group: &'a mut Box<dyn Communicator>,
    params: &'a [f32],
    grad: &'a mut [f32],
    ranges: &'a [Range<usize>],
    piece_at: &'a [usize],
    piece: &'a [Range<usize>],
}

impl Worker<'_> {
    /// Runs the jobs until the channel closes; returns the seconds spent in collectives.
    fn run(
        self,
        jobs: Receiver<Job>,
        gathered: Sender<(usize, Vec<f32>)>,
        reduced: Sender<(usize, Vec<f32>)>,
    ) -> Result<f64, TrainError> {
        let mut secs = 0.0;
        for job in jobs {
            let t0 = Instant::now();
            match job {
                Job::Gather(k, mut buf) => {
                    let len = self.ranges[k].len();
                    let (at, p) = (self.piece_at[k], self.piece[k].clone());
                    buf[p.clone()].copy_from_slice(&self.params[at..at + p.len()]);
                    self.group
                        .all_gather(&mut buf[..len])
                        .map_err(dist("ZeRO-3 weight all-gather"))?;
                    secs += t0.elapsed().as_secs_f64();
                    // The training thread may be gone after an error; nothing to return to.
                    let _ = gathered.send((k, buf));
                }
                Job::Reduce(k, mut buf) => {
                    let len = self.ranges[k].len();
                    let p = self
                        .group
                        .reduce_scatter(&mut buf[..len], ReduceOp::Sum)
                        .map_err(dist("ZeRO-3 gradient reduce-scatter"))?;
                    debug_assert_eq!(p, self.piece[k]);
                    let at = self.piece_at[k];
                    for (a, g) in self.grad[at..at + p.len()].iter_mut().zip(&buf[p]) {
                        *a += *g;
                    }
                    secs += t0.elapsed().as_secs_f64();
                    let _ = reduced.send((k, buf));
                }
            }
        }
        Ok(secs)
    }
}

/// The communication thread stopped (its own error is reported when it is joined).
fn stopped() -> TpError {
    "the ZeRO-3 communication thread stopped".into()
}

/// The training thread's side of the gathers: a [`ParamSource`].
struct Source<'z> {
    z: &'z Zero3,
    jobs: Sender<Job>,
    gathered: Receiver<(usize, Vec<f32>)>,
    /// Units gathered (fetched or prefetched) and not released, with their buffers.
    ready: Vec<(usize, Vec<f32>)>,
    /// Units asked for and not yet back, in order.
    in_flight: Vec<usize>,
    free_embed: Option<Vec<f32>>,
    free_small: Vec<Vec<f32>>,
    /// Seconds the training thread waited for a gather.
    waited: f64,
    gathers: u64,
    gathered_elems: u64,
}

impl Source<'_> {
    /// Sends unit `k`'s gather if a buffer is free; false otherwise.
    fn request(&mut self, k: usize) -> Result<bool, TpError> {
        let buf = if self.z.is_embed(k) {
            self.free_embed.take()
        } else {
            self.free_small.pop()
        };
        let Some(buf) = buf else { return Ok(false) };
        self.jobs.send(Job::Gather(k, buf)).map_err(|_| stopped())?;
        self.in_flight.push(k);
        self.gathers += 1;
        self.gathered_elems += self.z.ranges[k].len() as u64;
        Ok(true)
    }

    fn known(&self, k: usize) -> bool {
        self.in_flight.contains(&k) || self.ready.iter().any(|r| r.0 == k)
    }
}

impl ParamSource<f32> for Source<'_> {
    fn fetch(&mut self, unit: Unit, next: Option<Unit>) -> Result<(), TpError> {
        let k = self.z.index(unit);
        if !self.known(k) && !self.request(k)? {
            panic!("ZeRO-3: no free gather buffer for {unit:?} (buffers are sized for the fetch order)");
        }
        // Prefetch: the next unit's gather queues behind this one while this one computes.
        if let Some(n) = next.filter(|_| self.z.prefetch) {
            let n = self.z.index(n);
            if !self.known(n) {
                self.request(n)?;
            }
        }
        let t0 = Instant::now();
        while self.in_flight.contains(&k) {
            let (j, buf) = self.gathered.recv().map_err(|_| stopped())?;
            self.in_flight.retain(|&x| x != j);
            self.ready.push((j, buf));
        }
        self.waited += t0.elapsed().as_secs_f64();
        Ok(())
    }

    fn get(&self, r: Range<usize>) -> &[f32] {
        let k = self.z.unit_at(r.start);
        let base = self.z.ranges[k].start;
        let (_, buf) = self
            .ready
            .iter()
            .find(|x| x.0 == k)
            .unwrap_or_else(|| panic!("ZeRO-3: {r:?} read without fetching its unit"));
        &buf[r.start - base..r.end - base]
    }

    fn release(&mut self, unit: Unit) {
        let k = self.z.index(unit);
        let i = self
            .ready
            .iter()
            .position(|x| x.0 == k)
            .expect("ZeRO-3: released a unit not fetched");
        let (_, buf) = self.ready.swap_remove(i);
        if self.z.is_embed(k) {
            self.free_embed = Some(buf);
        } else {
            self.free_small.push(buf);
        }
    }
}

/// The training thread's side of the gradient reduction: a [`GradSink`] writing each unit into
/// a buffer that goes to the communication thread once the unit is final.
struct Sink<'z> {
    z: &'z Zero3,
    jobs: Sender<Job>,
    reduced: Receiver<(usize, Vec<f32>)>,
    /// Per unit, the buffer backward is writing.
    writing: Vec<Option<Vec<f32>>>,
    /// Units handed off so far (from the top of the buffer down).
    handed: usize,
    free_embed: Option<Vec<f32>>,
    free_small: Vec<Vec<f32>>,
    waited: f64,
    /// The first error (the channel closed): backward cannot fail through a sink, so it is kept
    /// and reported after backward.
    failed: Option<TpError>,
}

impl Sink<'_> {
    fn take_buffer(&mut self, k: usize) -> Vec<f32> {
        let mut buf = if self.z.is_embed(k) {
            self.free_embed
                .take()
                .expect("one embedding gradient buffer")
        } else {
            loop {
                if let Some(b) = self.free_small.pop() {
                    break b;
                }
                // Wait for a reduced buffer to come back (the embedding's goes to its place).
                let t0 = Instant::now();
                let back = self.reduced.recv();
                self.waited += t0.elapsed().as_secs_f64();
                match back {
                    Ok((j, b)) if self.z.is_embed(j) => self.free_embed = Some(b),
                    Ok((_, b)) => break b,
                    Err(_) => {
                        // The thread stopped: write into a scratch buffer; the error is
                        // reported after backward.
                        self.failed.get_or_insert_with(stopped);
                        break vec![0.0; self.z.small_len];
                    }
                }
            }
        };
        buf[..self.z.ranges[k].len()].fill(0.0);
        buf
    }
}

impl GradSink for Sink<'_> {
    fn slice(&mut self, r: Range<usize>) -> &mut [f32] {
        let k = self.z.unit_at(r.start);
        let base = self.z.ranges[k].start;
        assert!(
            r.end <= self.z.ranges[k].end,
            "ZeRO-3: a gradient slice across units"
        );
        if self.writing[k].is_none() {
            let buf = self.take_buffer(k);
            self.writing[k] = Some(buf);
        }
        let buf = self.writing[k].as_mut().expect("just set");
        &mut buf[r.start - base..r.end - base]
    }

    fn ready(&mut self, from: usize) {
        let n = self.z.units.len();
        while self.handed < n && self.z.ranges[n - 1 - self.handed].start >= from {
            let k = n - 1 - self.handed;
            let buf = match self.writing[k].take() {
                Some(b) => b,
                None => self.take_buffer(k), // a unit backward did not touch: zeros
            };
            if self.jobs.send(Job::Reduce(k, buf)).is_err() {
                self.failed.get_or_insert_with(stopped);
            }
            self.handed += 1;
        }
    }
}

impl Dp {
    /// Takes this rank's pieces of the weights out of the whole buffer `params` (identical on
    /// every rank: after [`Dp::sync_params`]) and frees it; allocates the gradient shard and the
    /// gather and gradient buffers. Call after [`Dp::attach`] under ZeRO-3.
    pub fn zero3_shard_params(&mut self, layout: &ParamLayout, params: &mut Vec<f32>) {
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
        self.z3 = Some(Box::new(Zero3 {
            units,
            ranges,
            piece_at,
            piece,
            params: shard,
            grad,
            gather_embed: Some(vec![0.0; embed_len]),
            gather_small: (0..small_slots).map(|_| vec![0.0; small_len]).collect(),
            grad_embed: Some(vec![0.0; embed_len]),
            grad_small: (0..GRAD_BUFFERS).map(|_| vec![0.0; small_len]).collect(),
            embed_len,
            small_len,
            small_slots,
            prefetch: self.overlap,
            gathers: 0,
            gathered_elems: 0,
            micro_batches: 0,
        }));
    }

    /// ZeRO-3: gathers and elements gathered per micro-batch so far (mean), or `None` before
    /// the first micro-batch or without ZeRO-3.
    pub fn zero3_gathers_per_micro_batch(&self) -> Option<(f64, f64)> {
        let z = self.z3.as_ref()?;
        (z.micro_batches > 0).then(|| {
            let m = z.micro_batches as f64;
            (z.gathers as f64 / m, z.gathered_elems as f64 / m)
        })
    }

    /// One micro-batch under ZeRO-3: forward on tokens `x` with targets `y` (returns the mean
    /// loss) and, with `d_loss`, backward, whose gradients are reduce-scattered unit by unit
    /// into this rank's gradient shard. `saved` and `scratch` are built for the whole model.
    #[allow(clippy::too_many_arguments)]
    pub fn zero3_micro_batch(
        &mut self,
        layout: &ParamLayout,
        saved: &mut ActSaved<f32>,
        scratch: &mut ActScratch<f32>,
        x: &[u32],
        y: &[u32],
        d_loss: Option<f32>,
        par: Par,
    ) -> Result<f32, TrainError> {
        let mut z = self
            .z3
            .take()
            .expect("ZeRO-3 state: call zero3_shard_params first");
        let r = self.zero3_run(&mut z, layout, saved, scratch, x, y, d_loss, par);
        if d_loss.is_some() {
            z.micro_batches += 1;
        }
        if r.is_err() {
            // Buffers may be left with the stopped thread; a partial gradient must not leak.
            z.grad.fill(0.0);
        }
        z.gather_embed.get_or_insert_with(|| vec![0.0; z.embed_len]);
        z.grad_embed.get_or_insert_with(|| vec![0.0; z.embed_len]);
        debug_assert!(z.gather_small.len() <= z.small_slots && z.grad_small.len() <= GRAD_BUFFERS);
        while z.gather_small.len() < z.small_slots {
            z.gather_small.push(vec![0.0; z.small_len]);
        }
        while z.grad_small.len() < GRAD_BUFFERS {
            z.grad_small.push(vec![0.0; z.small_len]);
        }
        self.z3 = Some(z);
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn zero3_run(
        &mut self,
        z: &mut Zero3,
        layout: &ParamLayout,
        saved: &mut ActSaved<f32>,
        scratch: &mut ActScratch<f32>,
        x: &[u32],
        y: &[u32],
        d_loss: Option<f32>,
        par: Par,
    ) -> Result<f32, TrainError> {
        let (job_tx, job_rx) = channel::<Job>();
        let (gathered_tx, gathered_rx) = channel();
        let (reduced_tx, reduced_rx) = channel();
        let mut params = std::mem::take(&mut z.params);
        let mut grad = std::mem::take(&mut z.grad);
        let free_gather = (z.gather_embed.take(), std::mem::take(&mut z.gather_small));
        let free_grad = (z.grad_embed.take(), std::mem::take(&mut z.grad_small));
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
                    &mut NoTp,
                )?
                .expect("the whole model has the head");
                if let Some(d_loss) = d_loss {
                    let gi = GradInput::Loss { targets: y, d_loss };
                    model::backward_sourced(
                        layout, &mut src, &mut sink, saved, scratch, input, gi, par, &mut NoTp,
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
                (gathers, gathered_elems),
            )
        });
        let (pass, comm, failed, bufs, exposed, (gathers, elems)) = out;
        z.params = std::mem::take(&mut params);
        z.grad = std::mem::take(&mut grad);
        (z.gather_embed, z.gather_small, z.grad_embed, z.grad_small) = bufs;
        if d_loss.is_some() {
            // Training micro-batches only (validation forwards gather half as much).
            z.gathers += gathers;
            z.gathered_elems += elems;
        }
        let comm_secs = comm??;
        self.comm_secs += comm_secs;
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
        apply: &mut dyn FnMut(f64) -> Result<bool, TrainError>,
    ) -> Result<f64, TrainError> {
        let mut z = self.z3.take().expect("ZeRO-3 state");
        let partial = sum_squares(&z.grad);
        let total = match self.global_sum_squares(partial) {
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
/// gradients); returns their losses. ZeRO-3 trains in fp32 (refused otherwise at setup).
pub(crate) fn zero3_micro_batches<E: crate::precision::Storage>(
    d: &mut Dp,
    layout: &ParamLayout,
    acts: &mut crate::pipeline::StageActs<E>,
    mb: &crate::pipeline::MicroBatches<'_>,
    par: Par,
) -> Result<Vec<f32>, TrainError> {
    let acts = (acts as &mut dyn std::any::Any)
        .downcast_mut::<crate::pipeline::StageActs<f32>>()
        .expect("ZeRO-3 trains in fp32 (mixed precision is refused at setup)");
    let (saved, scratch) = acts.first_set();
    let m = mb.xs.len() / mb.bt;
    (0..m)
        .map(|k| {
            let r = k * mb.bt..(k + 1) * mb.bt;
            d.zero3_micro_batch(
                layout,
                saved,
                scratch,
                &mb.xs[r.clone()],
                &mb.ys[r],
                Some(mb.d_loss),
                par,
            )
        })
        .collect()
}
