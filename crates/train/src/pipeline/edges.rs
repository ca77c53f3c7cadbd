//! Sends that never wait, for the interleaved schedule: a sender thread per rank and one
//! two-rank group per directed edge of the pipeline ring.
//!
//! Interleaved 1F1B is deadlock-free when a send never waits for its receiver (a unit test
//! replays every list so), but not with paired exchanges. So each rank hands its outgoing
//! messages to a thread of its own, which sends them in order, while the training thread only
//! receives. Each direction of each pair of neighbouring stages (activations d → d+1, gradients
//! d → d−1, around the ring) is a group of its own, so on every rank every group is used by one
//! thread only: the sender thread sends on the groups of the edges that leave its stage, the
//! training thread receives on those that arrive. The communicator's groups progress
//! independently, so neither thread waits for the other.
//!
//! ```text
//! act edges (colour by the source stage):  0 → 1   1 → 2   …   pp−1 → 0
//! labels, so no rank is in two edges of one split:  source % 2 (and 2 for the edge from the
//! last stage when pp is odd, which would otherwise share a label with the edge from stage 0)
//! ```

use super::{comm_err, Kind};
use crate::error::TrainError;
use crate::mesh::{Coords, MeshShape};
use comm::Communicator;
use std::sync::mpsc::{channel, Sender};
use std::thread::JoinHandle;

enum Job {
    Send(Kind, Vec<u8>, String),
    Flush(Sender<Result<(), TrainError>>),
}

/// A rank's incoming edges and its sender thread.
pub(super) struct Edges {
    act_in: Box<dyn Communicator>,
    grad_in: Box<dyn Communicator>,
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Edges {
    /// Forms the edge groups (collective over `world`: every rank makes the same splits) and
    /// starts the sender thread. Needs pp ≥ 2.
    pub(super) fn connect(
        world: &mut dyn Communicator,
        shape: MeshShape,
        me: Coords,
    ) -> Result<Edges, TrainError> {
        let pp = shape.pp;
        assert!(pp >= 2, "edges need two stages");
        let label = |d: usize| if pp % 2 == 1 && d == pp - 1 { 2 } else { d % 2 };
        let labels = if pp % 2 == 1 { 3 } else { 2 };
        let pipeline = me.dp * shape.tp + me.tp;
        let members = shape.dp * shape.tp * pp;
        let s = me.pp;
        let mut split = |src_in: usize, what: &str| -> Result<_, TrainError> {
            // (the group of the edge leaving s, the group of the edge arriving from src_in)
            let (mut out, mut inn) = (None, None);
            for l in 0..labels {
                let (color, key) = if label(s) == l {
                    (pipeline * pp + s, 0)
                } else if label(src_in) == l {
                    (pipeline * pp + src_in, 1)
                } else {
                    (members + world.rank(), 0)
                };
                let g = world
                    .split(color as u32, key)
                    .map_err(comm_err(format!("forming the {what} edge groups")))?;
                if label(s) == l {
                    out = Some(g);
                } else if label(src_in) == l {
                    inn = Some(g);
                }
            }
            Ok((
                out.expect("the edge leaving this stage"),
                inn.expect("the edge arriving at this stage"),
            ))
        };
        let (act_out, act_in) = split((s + pp - 1) % pp, "activation")?;
        let (grad_out, grad_in) = split((s + 1) % pp, "gradient")?;
        let (tx, rx) = channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("pipeline sends".into())
            .spawn(move || {
                let (mut act_out, mut grad_out) = (act_out, grad_out);
                let mut failed: Option<TrainError> = None;
                for job in rx {
                    match job {
                        Job::Send(kind, bytes, label) => {
                            if failed.is_none() {
                                let g = match kind {
                                    Kind::Act => &mut act_out,
                                    Kind::Grad => &mut grad_out,
                                };
                                if let Err(e) = g.send(1, &bytes) {
                                    failed = Some(comm_err(label)(e));
                                }
                            }
                        }
                        Job::Flush(reply) => {
                            let _ = reply.send(failed.take().map_or(Ok(()), Err));
                        }
                    }
                }
            })
            .map_err(|e| TrainError::Pipeline(format!("starting the sender thread: {e}")))?;
        Ok(Edges {
            act_in,
            grad_in,
            jobs: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues `bytes` for the next stage (activations) or the previous one (gradients).
    pub(super) fn send(
        &mut self,
        kind: Kind,
        bytes: Vec<u8>,
        label: String,
    ) -> Result<(), TrainError> {
        self.jobs
            .as_ref()
            .and_then(|j| j.send(Job::Send(kind, bytes, label)).ok())
            .ok_or_else(|| TrainError::Pipeline("the sender thread has stopped".into()))
    }

    /// Receives the next message from the previous stage (activations) or the next one
    /// (gradients).
    pub(super) fn recv(&mut self, kind: Kind, buf: &mut [u8]) -> comm::Result<()> {
        match kind {
            Kind::Act => self.act_in.recv(0, buf),
            Kind::Grad => self.grad_in.recv(0, buf),
        }
    }

    /// Waits until every queued message has been sent; the first send error, if any.
    pub(super) fn flush(&mut self) -> Result<(), TrainError> {
        let (tx, rx) = channel();
        let gone = || TrainError::Pipeline("the sender thread has stopped".into());
        self.jobs
            .as_ref()
            .ok_or_else(gone)?
            .send(Job::Flush(tx))
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
}

impl Drop for Edges {
    fn drop(&mut self) {
        self.jobs = None; // ends the thread's loop
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
