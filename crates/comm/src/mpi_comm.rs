//! MPI transport (feature `mpi`): the collectives run in the MPI library (Open MPI from Debian in
//! CI), so jobs run under `mpirun`/`srun` on clusters. Rank and size come from MPI, not from the
//! torchrun variables. There are no scaletrain frames here: failure detection, timeouts and
//! desync checking are the MPI runtime's (by default it aborts the whole job on an error).
use crate::error::{CommError, Result};
use crate::flight::Recorder;
use crate::{shard_range, Algorithm, Communicator, ReduceOp};
use ::mpi::collective::SystemOperation;
use ::mpi::topology::{Color, SimpleCommunicator};
use ::mpi::traits::Communicator as _;
use ::mpi::traits::*;
use std::mem::ManuallyDrop;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

/// Taken around every MPI call when the library provides only `MPI_THREAD_SERIALIZED`.
static SERIAL: Mutex<()> = Mutex::new(());

/// A communicator backed by MPI.
pub struct MpiComm {
    comm: ManuallyDrop<SimpleCommunicator>,
    rank: usize,
    size: usize,
    /// Whether MPI runs calls from several threads at once (`MPI_THREAD_MULTIPLE`); otherwise
    /// every call of this process takes [`SERIAL`].
    multiple: bool,
    /// This rank's flight recorder (shared with splits), this group's id in it (0 = the world,
    /// splits derived like the built-in transports'), its members' world ranks, and call counts.
    flight: Arc<Recorder>,
    gid: u32,
    members: Vec<usize>,
    calls: u64,
    p2p_calls: u64,
    splits: u32,
    /// Keeps MPI initialised (MPI_Finalize runs when the last communicator is dropped).
    _universe: Arc<::mpi::environment::Universe>,
}

// SAFETY: MPI is initialised with at least MPI_THREAD_SERIALIZED (checked in `init`). With
// MPI_THREAD_MULTIPLE any thread may call MPI at any time; with MPI_THREAD_SERIALIZED every MPI
// call this type makes (rank and size are cached at construction) holds the process-wide
// `SERIAL` lock, so no two calls overlap, whichever threads the communicators live on.
unsafe impl Send for MpiComm {}

impl MpiComm {
    /// Initialise MPI (once per process) and return the world communicator.
    ///
    /// Requests `MPI_THREAD_MULTIPLE`, so that two groups used from two threads progress
    /// independently (a communication thread reducing on the data-parallel group while the
    /// training thread exchanges activations on the pipeline group). A library that provides only
    /// `MPI_THREAD_SERIALIZED` is accepted, with every MPI call of the process taking one lock:
    /// then a blocking call (a receive waiting for its peer) holds up the other thread, so such a
    /// library cannot run groups concurrently ([`MpiComm::concurrent`] says which case holds).
    /// Less than `MPI_THREAD_SERIALIZED` is refused. `MPI_Finalize` runs when the last
    /// communicator is dropped and, by the MPI standard, must run on the thread that called
    /// `init`, so drop the last communicator there.
    pub fn init() -> Result<MpiComm> {
        let (universe, level) = ::mpi::initialize_with_threading(::mpi::Threading::Multiple)
            .ok_or_else(|| CommError::Rendezvous {
                rank: 0,
                detail: "MPI is already initialised".into(),
            })?;
        if level < ::mpi::Threading::Serialized {
            return Err(CommError::Rendezvous {
                rank: 0,
                detail: format!(
                    "the MPI library provides thread level {level:?}; scaletrain needs Multiple \
                     (MPI_THREAD_MULTIPLE) or at least Serialized (calls from any thread, one at \
                     a time). Use an MPI built with thread support (Open MPI: ompi_info | grep -i \
                     thread)"
                ),
            });
        }
        let comm = universe.world();
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        if crate::flight::dump_dir().is_some() {
            let _ = crate::flight::install_signal_handler();
        }
        Ok(MpiComm {
            rank,
            size,
            comm: ManuallyDrop::new(comm),
            multiple: level >= ::mpi::Threading::Multiple,
            flight: Recorder::new(rank),
            gid: 0,
            members: (0..size).collect(),
            calls: 0,
            p2p_calls: 0,
            splits: 0,
            _universe: Arc::new(universe),
        })
    }

    /// Whether groups of this process may run calls from several threads at once
    /// (`MPI_THREAD_MULTIPLE`); `false`: calls run one at a time under a process-wide lock.
    pub fn concurrent(&self) -> bool {
        self.multiple
    }

    /// This rank's flight recorder (see [`crate::flight`]): MPI has no timeouts, so its dumps come
    /// from `SIGUSR1` or [`crate::flight::dump_all`].
    pub fn flight_recorder(&self) -> Arc<Recorder> {
        self.flight.clone()
    }

    /// Record the start of a call (`peers`: group ranks).
    fn begin(&mut self, op: &'static str, collective: bool, bytes: usize, peers: &[usize]) -> u64 {
        let call = if collective {
            self.calls += 1;
            self.calls
        } else {
            self.p2p_calls += 1;
            self.p2p_calls
        };
        let mut world = [0usize; 2];
        for (w, &p) in world.iter_mut().zip(peers) {
            *w = self.members[p];
        }
        self.flight.begin(crate::flight::CallInfo {
            group: self.gid,
            members: &self.members,
            group_rank: self.rank,
            op,
            call,
            bytes,
            peers: &world[..peers.len().min(2)],
        })
    }

    /// Record the end of call `seq` and pass its result on.
    fn end<T>(&self, seq: u64, r: Result<T>) -> Result<T> {
        self.flight.end(
            seq,
            r.as_ref()
                .map(|_| ())
                .map_err(|e| e as &dyn std::fmt::Display),
        );
        r
    }

    /// The lock an MPI call must hold (none with `MPI_THREAD_MULTIPLE`).
    fn serial(&self) -> Option<MutexGuard<'static, ()>> {
        (!self.multiple).then(|| SERIAL.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn op(op: ReduceOp) -> SystemOperation {
        match op {
            ReduceOp::Max => SystemOperation::max(),
            _ => SystemOperation::sum(),
        }
    }

    fn reduce(&self, buf: &mut [f32], op: ReduceOp) {
        let send = buf.to_vec();
        {
            let _serial = self.serial();
            self.comm.all_reduce_into(&send[..], buf, Self::op(op));
        }
        if op == ReduceOp::Average {
            let n = self.size as f32;
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
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn set_algorithm(&mut self, _algo: Algorithm) {}

    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let t = self.begin("all_reduce", true, buf.len() * 4, &[]);
        self.reduce(buf, op);
        self.end(t, Ok(()))
    }

    fn reduce_scatter(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<Range<usize>> {
        let t = self.begin("reduce_scatter", true, buf.len() * 4, &[]);
        self.reduce(buf, op);
        self.end(t, Ok(shard_range(buf.len(), self.size(), self.rank())))
    }

    fn all_gather(&mut self, buf: &mut [f32]) -> Result<()> {
        let t = self.begin("all_gather", true, buf.len() * 4, &[]);
        // Disjoint shards over zeros, assembled exactly with a bitwise OR of the f32 bit patterns.
        let mine = shard_range(buf.len(), self.size(), self.rank());
        let send: Vec<u32> = buf
            .iter()
            .enumerate()
            .map(|(i, x)| if mine.contains(&i) { x.to_bits() } else { 0 })
            .collect();
        let mut recv = vec![0u32; buf.len()];
        let serial = self.serial();
        self.comm
            .all_reduce_into(&send[..], &mut recv[..], SystemOperation::bitwise_or());
        drop(serial);
        buf.iter_mut()
            .zip(recv)
            .for_each(|(x, b)| *x = f32::from_bits(b));
        self.end(t, Ok(()))
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.size() {
            return Err(CommError::InvalidArgument {
                rank: self.rank(),
                op: "broadcast",
                detail: format!("root {root} is not a rank of a group of {}", self.size()),
            });
        }
        let t = self.begin("broadcast", true, buf.len() * 4, &[]);
        let serial = self.serial();
        self.comm.process_at_rank(root as i32).broadcast_into(buf);
        drop(serial);
        self.end(t, Ok(()))
    }

    fn send(&mut self, dst: usize, data: &[u8]) -> Result<()> {
        if dst >= self.size() || dst == self.rank() {
            return Err(CommError::InvalidArgument {
                rank: self.rank(),
                op: "send/recv",
                detail: format!("cannot send to rank {dst}"),
            });
        }
        let t = self.begin("send/recv", false, data.len(), &[dst]);
        let serial = self.serial();
        self.comm.process_at_rank(dst as i32).send(data);
        drop(serial);
        self.end(t, Ok(()))
    }

    fn recv(&mut self, src: usize, buf: &mut [u8]) -> Result<()> {
        if src >= self.size() || src == self.rank() {
            return Err(CommError::InvalidArgument {
                rank: self.rank(),
                op: "send/recv",
                detail: format!("cannot receive from rank {src}"),
            });
        }
        let t = self.begin("send/recv", false, buf.len(), &[src]);
        let serial = self.serial();
        let status = self.comm.process_at_rank(src as i32).receive_into(buf);
        let got = status.count(u8::equivalent_datatype()) as usize; // MPI_Get_count
        drop(serial);
        let r = if got != buf.len() {
            Err(CommError::Desync {
                rank: self.rank(),
                op: "send/recv",
                peer: src,
                detail: format!("received {got} bytes where {} were expected", buf.len()),
            })
        } else {
            Ok(())
        };
        self.end(t, r)
    }

    fn sendrecv(&mut self, dst: usize, data: &[u8], src: usize, buf: &mut [u8]) -> Result<()> {
        let (n, me) = (self.size(), self.rank());
        if dst >= n || dst == me || src >= n || src == me {
            return Err(CommError::InvalidArgument {
                rank: me,
                op: "send/recv",
                detail: format!(
                    "cannot send to rank {dst} and receive from rank {src} on rank {me} of {n}"
                ),
            });
        }
        // MPI_Sendrecv: the library progresses both at once, so neighbours calling it towards
        // each other cannot deadlock whatever the message size.
        let t = self.begin("send/recv", false, data.len() + buf.len(), &[dst, src]);
        let serial = self.serial();
        let status = ::mpi::point_to_point::send_receive_into(
            data,
            &self.comm.process_at_rank(dst as i32),
            buf,
            &self.comm.process_at_rank(src as i32),
        );
        let got = status.count(u8::equivalent_datatype()) as usize; // MPI_Get_count
        drop(serial);
        let r = if got != buf.len() {
            Err(CommError::Desync {
                rank: me,
                op: "send/recv",
                peer: src,
                detail: format!("received {got} bytes where {} were expected", buf.len()),
            })
        } else {
            Ok(())
        };
        self.end(t, r)
    }

    fn barrier(&mut self) -> Result<()> {
        let t = self.begin("barrier", true, 0, &[]);
        let serial = self.serial();
        self.comm.barrier();
        drop(serial);
        self.end(t, Ok(()))
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
        let t = self.begin("split", true, 8, &[]);
        let serial = self.serial();
        let Some(sub) = self
            .comm
            .split_by_color_with_key(Color::with_value(color), key)
        else {
            drop(serial);
            let e = CommError::InvalidArgument {
                rank: self.rank(),
                op: "split",
                detail: "MPI returned no communicator".into(),
            };
            return self.end(t, Err(e));
        };
        let (rank, size) = (sub.rank() as usize, sub.size() as usize);
        // The new group's members as world ranks, for the flight recorder's dumps.
        let mine = self.members[self.rank] as u64;
        let mut members = vec![0u64; size];
        sub.all_gather_into(&mine, &mut members[..]);
        drop(serial);
        self.splits += 1;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for x in [self.gid as u64, self.splits as u64, color as u64] {
            h = (h ^ x).wrapping_mul(0x0100_0000_01b3);
        }
        let sub = MpiComm {
            comm: ManuallyDrop::new(sub),
            rank,
            size,
            multiple: self.multiple,
            flight: self.flight.clone(),
            gid: ((h >> 32) as u32 ^ h as u32) | 1,
            members: members.into_iter().map(|m| m as usize).collect(),
            calls: 0,
            p2p_calls: 0,
            splits: 0,
            _universe: self._universe.clone(),
        };
        self.end(t, Ok(Box::new(sub) as Box<dyn Communicator>))
    }
}

impl Drop for MpiComm {
    /// Frees the MPI communicator (`MPI_Comm_free` for a split) under the same rule as every call.
    fn drop(&mut self) {
        let _serial = self.serial();
        // SAFETY: dropped exactly once, here; the field is not used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.comm) };
    }
}
