//! ZeRO-3's traffic between the training thread and the communication thread: the jobs (gather
//! a unit, reduce-scatter a unit's gradient), the thread that runs them in order, and the
//! training thread's two ends — a [`ParamSource`] for the weights and a [`GradSink`] for the
//! gradients.

use super::Zero3;
use crate::dp::buckets::{peer_wait, CommSecs};
use crate::dp::dist;
use crate::error::TrainError;
use crate::precision::{add_widened, Storage};
use comm::{Communicator, ReduceOp};
use model::{GradSink, ParamSource, TpError, Unit};
use std::ops::Range;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

/// Work for the communication thread, in the order every rank asks for it.
pub(super) enum Job<E> {
    /// All-gather unit `k` into the buffer (in the storage type: 16-bit weights move 2 bytes
    /// each).
    Gather(usize, Vec<E>),
    /// Reduce-scatter unit `k`'s gradient in the buffer; add this rank's piece to the shard.
    /// A 16-bit gradient is first widened (times the loss scale's inverse) into `f32`.
    Reduce(usize, Vec<E>),
}

/// What the communication thread works with.
pub(super) struct Worker<'a> {
    pub(super) group: &'a mut Box<dyn Communicator>,
    /// This rank's fp32 master pieces and gradient pieces.
    pub(super) params: &'a [f32],
    pub(super) grad: &'a mut [f32],
    pub(super) ranges: &'a [Range<usize>],
    pub(super) piece_at: &'a [usize],
    pub(super) piece: &'a [Range<usize>],
    /// Mixed precision: the `f32` buffer a 16-bit unit gradient is widened into (the
    /// reduction is in `f32`, as every other layout's); empty in fp32.
    pub(super) wide: &'a mut [f32],
    /// `1 / loss scale` (fp16), applied while widening.
    pub(super) unscale: f32,
}

impl Worker<'_> {
    /// Runs the jobs until the channel closes; returns the seconds spent in collectives and
    /// those of them spent waiting for the peers.
    pub(super) fn run<E: Storage>(
        self,
        jobs: Receiver<Job<E>>,
        gathered: Sender<(usize, Vec<E>)>,
        reduced: Sender<(usize, Vec<E>)>,
    ) -> Result<CommSecs, TrainError> {
        let mut secs = 0.0;
        let w0 = peer_wait(self.group.as_ref());
        for job in jobs {
            let t0 = Instant::now();
            match job {
                Job::Gather(k, mut buf) => {
                    let len = self.ranges[k].len();
                    let (at, p) = (self.piece_at[k], self.piece[k].clone());
                    // The piece in the storage type: the same rounding as the whole-model
                    // working copy of the other layouts (element by element).
                    E::store(&self.params[at..at + p.len()], &mut buf[p.clone()]);
                    E::all_gather(self.group.as_mut(), &mut buf[..len])
                        .map_err(dist("ZeRO-3 weight all-gather"))?;
                    secs += t0.elapsed().as_secs_f64();
                    // The training thread may be gone after an error; nothing to return to.
                    let _ = gathered.send((k, buf));
                }
                Job::Reduce(k, mut buf) => {
                    let len = self.ranges[k].len();
                    let f: &mut [f32] = match E::as_f32_mut(&mut buf[..len]) {
                        Some(f) => f,
                        None => {
                            let w = &mut self.wide[..len];
                            w.fill(0.0);
                            add_widened(w, &buf[..len], self.unscale);
                            w
                        }
                    };
                    let p = self
                        .group
                        .reduce_scatter(f, ReduceOp::Sum)
                        .map_err(dist("ZeRO-3 gradient reduce-scatter"))?;
                    debug_assert_eq!(p, self.piece[k]);
                    let at = self.piece_at[k];
                    for (a, g) in self.grad[at..at + p.len()].iter_mut().zip(&f[p]) {
                        *a += *g;
                    }
                    secs += t0.elapsed().as_secs_f64();
                    let _ = reduced.send((k, buf));
                }
            }
        }
        Ok(CommSecs {
            total: secs,
            // Only this thread calls the group while it runs.
            wait: peer_wait(self.group.as_ref()) - w0,
        })
    }
}

/// The communication thread stopped (its own error is reported when it is joined).
pub(super) fn stopped() -> TpError {
    "the ZeRO-3 communication thread stopped".into()
}

/// The training thread's side of the gathers: a [`ParamSource`].
pub(super) struct Source<'z, E> {
    pub(super) z: &'z Zero3,
    pub(super) jobs: Sender<Job<E>>,
    pub(super) gathered: Receiver<(usize, Vec<E>)>,
    /// Units gathered (fetched or prefetched) and not released, with their buffers.
    pub(super) ready: Vec<(usize, Vec<E>)>,
    /// Units asked for and not yet back, in order.
    pub(super) in_flight: Vec<usize>,
    pub(super) free_embed: Option<Vec<E>>,
    pub(super) free_small: Vec<Vec<E>>,
    /// The free embedding buffer holds the embedding's current weights (`Zero3::embed_cached`).
    pub(super) embed_cached: bool,
    /// Seconds the training thread waited for a gather.
    pub(super) waited: f64,
    pub(super) gathers: u64,
    pub(super) gathered_elems: u64,
}

impl<E> Source<'_, E> {
    /// Sends unit `k`'s gather if a buffer is free; false otherwise.
    fn request(&mut self, k: usize) -> Result<bool, TpError> {
        if self.z.is_embed(k) && self.embed_cached {
            // Gathered earlier this step and unchanged: no collective (every rank alike).
            let Some(buf) = self.free_embed.take() else {
                return Ok(false);
            };
            self.ready.push((k, buf));
            return Ok(true);
        }
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

impl<E> ParamSource<E> for Source<'_, E> {
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
            self.embed_cached |= self.z.is_embed(j);
            self.ready.push((j, buf));
        }
        self.waited += t0.elapsed().as_secs_f64();
        Ok(())
    }

    fn get(&self, r: Range<usize>) -> &[E] {
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
pub(super) struct Sink<'z, E> {
    pub(super) z: &'z Zero3,
    pub(super) jobs: Sender<Job<E>>,
    pub(super) reduced: Receiver<(usize, Vec<E>)>,
    /// Per unit, the buffer backward is writing.
    pub(super) writing: Vec<Option<Vec<E>>>,
    /// Units handed off so far (from the top of the buffer down).
    pub(super) handed: usize,
    pub(super) free_embed: Option<Vec<E>>,
    pub(super) free_small: Vec<Vec<E>>,
    pub(super) waited: f64,
    /// The first error (the channel closed): backward cannot fail through a sink, so it is kept
    /// and reported after backward.
    pub(super) failed: Option<TpError>,
}

impl<E: Storage> Sink<'_, E> {
    fn take_buffer(&mut self, k: usize) -> Vec<E> {
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
                        break vec![E::default(); self.z.small_len];
                    }
                }
            }
        };
        buf[..self.z.ranges[k].len()].fill(E::default());
        buf
    }
}

impl<E: Storage> GradSink<E> for Sink<'_, E> {
    fn slice(&mut self, r: Range<usize>) -> &mut [E] {
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
