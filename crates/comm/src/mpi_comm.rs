//! MPI transport (feature `mpi`): the collectives run in the MPI library (Open MPI from Debian in
//! CI), so jobs run under `mpirun`/`srun` on clusters. Rank and size come from MPI, not from the
//! torchrun variables. There are no scaletrain frames here: failure detection, timeouts and
//! desync checking are the MPI runtime's (by default it aborts the whole job on an error).
use crate::error::{CommError, Result};
use crate::{shard_range, Algorithm, Communicator, ReduceOp};
use ::mpi::collective::SystemOperation;
use ::mpi::topology::{Color, SimpleCommunicator};
use ::mpi::traits::Communicator as _;
use ::mpi::traits::*;
use std::ops::Range;
use std::sync::Arc;

/// A communicator backed by MPI.
pub struct MpiComm {
    comm: SimpleCommunicator,
    /// Keeps MPI initialised (MPI_Finalize runs when the last communicator is dropped).
    _universe: Arc<::mpi::environment::Universe>,
}

// SAFETY: MPI is initialised with at least MPI_THREAD_SERIALIZED (checked in `init`), so any
// thread may call MPI as long as no two calls overlap in time: a communicator may move to another
// thread (a communication thread, say) while the thread that initialised MPI makes no MPI calls.
// `&mut self` on every call serialises the calls on one communicator; a program that uses two
// communicators (or this one and `split` results) from two threads must serialise them itself.
unsafe impl Send for MpiComm {}

impl MpiComm {
    /// Initialise MPI (once per process) and return the world communicator.
    ///
    /// Requests `MPI_THREAD_SERIALIZED`: MPI calls may come from any thread, one at a time (what a
    /// communication thread beside the training loop needs; `MPI_THREAD_FUNNELED` would allow only
    /// the thread that called this). `MPI_Finalize` runs when the last communicator is dropped
    /// and, by the MPI standard, must run on the thread that called `init`, so drop the last
    /// communicator there.
    pub fn init() -> Result<MpiComm> {
        let (universe, level) = ::mpi::initialize_with_threading(::mpi::Threading::Serialized)
            .ok_or_else(|| CommError::Rendezvous {
                rank: 0,
                detail: "MPI is already initialised".into(),
            })?;
        if level < ::mpi::Threading::Serialized {
            return Err(CommError::Rendezvous {
                rank: 0,
                detail: format!(
                    "the MPI library provides thread level {level:?}; scaletrain needs Serialized \
                     (MPI_THREAD_SERIALIZED: calls from any thread, one at a time). Use an MPI \
                     built with thread support (Open MPI: ompi_info | grep -i thread)"
                ),
            });
        }
        let comm = universe.world();
        Ok(MpiComm {
            comm,
            _universe: Arc::new(universe),
        })
    }

    fn op(op: ReduceOp) -> SystemOperation {
        match op {
            ReduceOp::Max => SystemOperation::max(),
            _ => SystemOperation::sum(),
        }
    }

    fn reduce(&self, buf: &mut [f32], op: ReduceOp) {
        let send = buf.to_vec();
        self.comm.all_reduce_into(&send[..], buf, Self::op(op));
        if op == ReduceOp::Average {
            let n = self.comm.size() as f32;
            buf.iter_mut().for_each(|x| *x /= n);
        }
    }
}

/// Whether MPI is initialised and not yet finalised in this process.
pub fn is_running() -> bool {
    ::mpi::environment::is_initialized() && !::mpi::environment::is_finalized()
}

/// Stops every process of the MPI job with exit status `code` (`MPI_Abort` on the world), if MPI
/// is running in this process; otherwise returns. For errors after the job has formed: MPI has
/// no timeouts, so a peer that did not fail would wait in its next collective forever, and
/// `MPI_Finalize` (run when the failing rank drops its communicator) may wait for them too.
pub fn abort_job(code: i32) {
    if is_running() {
        // SAFETY: MPI is initialised and not finalised, and RSMPI_COMM_WORLD is a constant handle.
        unsafe {
            ::mpi::ffi::MPI_Abort(::mpi::ffi::RSMPI_COMM_WORLD, code);
        }
    }
}

impl Communicator for MpiComm {
    fn transport_name(&self) -> &'static str {
        "mpi"
    }
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn set_algorithm(&mut self, _algo: Algorithm) {}

    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.reduce(buf, op);
        Ok(())
    }

    fn reduce_scatter(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<Range<usize>> {
        self.reduce(buf, op);
        Ok(shard_range(buf.len(), self.size(), self.rank()))
    }

    fn all_gather(&mut self, buf: &mut [f32]) -> Result<()> {
        // Disjoint shards over zeros, assembled exactly with a bitwise OR of the f32 bit patterns.
        let mine = shard_range(buf.len(), self.size(), self.rank());
        let send: Vec<u32> = buf
            .iter()
            .enumerate()
            .map(|(i, x)| if mine.contains(&i) { x.to_bits() } else { 0 })
            .collect();
        let mut recv = vec![0u32; buf.len()];
        self.comm
            .all_reduce_into(&send[..], &mut recv[..], SystemOperation::bitwise_or());
        buf.iter_mut()
            .zip(recv)
            .for_each(|(x, b)| *x = f32::from_bits(b));
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.size() {
            return Err(CommError::InvalidArgument {
                rank: self.rank(),
                op: "broadcast",
                detail: format!("root {root} is not a rank of a group of {}", self.size()),
            });
        }
        self.comm.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }

    fn send(&mut self, dst: usize, data: &[u8]) -> Result<()> {
        if dst >= self.size() || dst == self.rank() {
            return Err(CommError::InvalidArgument {
                rank: self.rank(),
                op: "send/recv",
                detail: format!("cannot send to rank {dst}"),
            });
        }
        self.comm.process_at_rank(dst as i32).send(data);
        Ok(())
    }

    fn recv(&mut self, src: usize, buf: &mut [u8]) -> Result<()> {
        if src >= self.size() || src == self.rank() {
            return Err(CommError::InvalidArgument {
                rank: self.rank(),
                op: "send/recv",
                detail: format!("cannot receive from rank {src}"),
            });
        }
        let status = self.comm.process_at_rank(src as i32).receive_into(buf);
        let got = status.count(u8::equivalent_datatype()) as usize;
        if got != buf.len() {
            return Err(CommError::Desync {
                rank: self.rank(),
                op: "send/recv",
                peer: src,
                detail: format!("received {got} bytes where {} were expected", buf.len()),
            });
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.comm.barrier();
        Ok(())
    }

    fn split(&mut self, color: u32, key: u32) -> Result<Box<dyn Communicator>> {
        let color = i32::try_from(color).map_err(|_| CommError::InvalidArgument {
            rank: self.rank(),
            op: "split",
            detail: format!("color {color} does not fit MPI's int"),
        })?;
        let key = i32::try_from(key).map_err(|_| CommError::InvalidArgument {
            rank: self.rank(),
            op: "split",
            detail: format!("key {key} does not fit MPI's int"),
        })?;
        let sub = self
            .comm
            .split_by_color_with_key(Color::with_value(color), key)
            .ok_or_else(|| CommError::InvalidArgument {
                rank: self.rank(),
                op: "split",
                detail: "MPI returned no communicator".into(),
            })?;
        Ok(Box::new(MpiComm {
            comm: sub,
            _universe: self._universe.clone(),
        }))
    }
}
