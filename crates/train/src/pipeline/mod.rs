//! Pipeline parallelism: a rank runs its stage's list of `plan::schedule::build` — the very
//! lists the planner simulates — forward and backward per micro-batch and model chunk, and
//! exchanges activations and activation gradients with the neighbouring stages.
//!
//! ```text
//! 1F1B, pp = 2, m = 4:            boundary exchanges (one sendrecv each; s = send, r = receive)
//! stage 0: F0 F1 B0 F2 B1 F3 B2 B3     s a0 | s a1 r g0 | - | s a2 r g1 | - | s a3 r g2 | r g3
//! stage 1: F0 B0 F1 B1 F2 B2 F3 B3     r a0 | - | s g0 r a1 | s g1 r a2 | s g2 r a3 | s g3
//! ```
//!
//! Between two operations of its list a stage sends what the first produced (the activation
//! to the next stage after a forward, the input gradient to the previous one after a backward)
//! and receives what the second needs, in one `sendrecv` (Megatron-LM pairs them the same way:
//! `send_forward_recv_backward`, …). [`boundaries`] derives these exchanges from the list;
//! a test replays every schedule with unbuffered (rendezvous) messages and checks that no
//! stage waits forever and that each receive gets the message it expects. At run time every
//! message carries a header (kind, micro-batch, virtual stage, step) that the receiver checks,
//! so a mismatch is an error naming both, never a silently wrong gradient.
//!
//! Across stages the whole model also needs: the tied embedding / LM head (its gradient summed
//! over the first and last stage, as Megatron-LM's embedding group does), one global gradient
//! norm (each stage's sum of squares, the LM head copy excluded, summed in stage order), and the
//! loss and stop requests known on every rank ([`Pipeline::share`]).

mod bubble;
mod ckpt;
mod edges;
mod exec;
mod panels;

pub use bubble::PredictedWait;
pub use ckpt::{full_segments, save_checkpoint, slice_full, to_full};

pub use exec::{
    activation_sets, forward_only, in_flight, run_ops, MicroBatches, StageActs, StageModel,
};
pub use panels::{micro_batches, stage_panel_bytes, step_ops, weight_panels_wanted};

use crate::error::TrainError;
use crate::mesh::{Coords, MeshShape};
use comm::{Communicator, ReduceOp};
use sha2::Digest;
use std::ops::Range;
use std::time::Instant;

/// Which pipeline schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Schedule {
    /// All forwards, then all backwards (Huang et al. 2019): m micro-batches in flight.
    Gpipe,
    /// One forward, one backward (Narayanan et al. 2021): at most pp − stage in flight.
    #[default]
    OneFOneB,
    /// 1F1B over `vpp` model chunks per stage (Narayanan et al. 2021, §2.2.2): the bubble
    /// shrinks by `vpp`.
    Interleaved,
}

impl Schedule {
    /// The planner's schedule kind.
    pub fn kind(self) -> plan::schedule::Kind {
        match self {
            Schedule::Gpipe => plan::schedule::Kind::Gpipe,
            Schedule::OneFOneB | Schedule::Interleaved => plan::schedule::Kind::OneFOneB,
        }
    }

    /// The flag value.
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Gpipe => "gpipe",
            Schedule::OneFOneB => "1f1b",
            Schedule::Interleaved => "interleaved",
        }
    }
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "gpipe" => Ok(Schedule::Gpipe),
            "1f1b" => Ok(Schedule::OneFOneB),
            "interleaved" => Ok(Schedule::Interleaved),
            _ => Err(format!(
                "unknown schedule {s:?} (expected gpipe, 1f1b or interleaved)"
            )),
        }
    }
}

/// What a message between stages carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A stage's output activation, to the next virtual stage.
    Act,
    /// The gradient w.r.t. a stage's input, to the previous virtual stage.
    Grad,
}

/// One message between stages: what it is and who sends / receives it (pipeline stages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msg {
    /// Activation or gradient.
    pub kind: Kind,
    /// Micro-batch.
    pub mb: u32,
    /// The virtual stage that produced it.
    pub from_vs: u32,
    /// Sending stage.
    pub src: usize,
    /// Receiving stage.
    pub dst: usize,
}

/// The exchange before operation `i` of a list (index `len` = after the last): the message the
/// previous operation produced, and the one the next operation needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Boundary {
    /// Sent to the next / previous stage.
    pub send: Option<Msg>,
    /// Received before the next operation runs.
    pub recv: Option<Msg>,
}

/// The exchanges of stage `stage`'s list `ops` in a pipeline of `pp` stages and `vstages`
/// virtual stages (`pp · vpp`): `ops.len() + 1` boundaries.
pub fn boundaries(
    ops: &[plan::schedule::Op],
    stage: usize,
    pp: usize,
    vstages: usize,
) -> Vec<Boundary> {
    use plan::schedule::Op;
    let vs_of = |chunk: u32| chunk as usize * pp + stage;
    let dev = |vs: usize| vs % pp;
    // What op i produces for another stage, and what it needs from one.
    let produced = |op: &Op| -> Option<Msg> {
        match *op {
            Op::Forward { mb, chunk } => {
                let vs = vs_of(chunk);
                (vs + 1 < vstages).then(|| Msg {
                    kind: Kind::Act,
                    mb,
                    from_vs: vs as u32,
                    src: stage,
                    dst: dev(vs + 1),
                })
            }
            Op::Backward { mb, chunk } => {
                let vs = vs_of(chunk);
                (vs > 0).then(|| Msg {
                    kind: Kind::Grad,
                    mb,
                    from_vs: vs as u32,
                    src: stage,
                    dst: dev(vs - 1),
                })
            }
        }
    };
    let needed = |op: &Op| -> Option<Msg> {
        match *op {
            Op::Forward { mb, chunk } => {
                let vs = vs_of(chunk);
                (vs > 0).then(|| Msg {
                    kind: Kind::Act,
                    mb,
                    from_vs: vs as u32 - 1,
                    src: dev(vs - 1),
                    dst: stage,
                })
            }
            Op::Backward { mb, chunk } => {
                let vs = vs_of(chunk);
                (vs + 1 < vstages).then(|| Msg {
                    kind: Kind::Grad,
                    mb,
                    from_vs: vs as u32 + 1,
                    src: dev(vs + 1),
                    dst: stage,
                })
            }
        }
    };
    (0..=ops.len())
        .map(|i| Boundary {
            send: i.checked_sub(1).and_then(|j| produced(&ops[j])),
            recv: ops.get(i).and_then(needed),
        })
        .collect()
}

/// Bytes of a message header: kind, micro-batch, producing virtual stage, step (u32 each).
const HEADER_BYTES: usize = 16;

/// This rank's pipeline: its place, the schedule, the layers of every virtual stage, and its
/// connections to the other stages.
pub struct Pipeline {
    /// The mesh's degrees.
    pub shape: MeshShape,
    /// This rank's coordinates.
    pub me: Coords,
    /// The schedule.
    pub schedule: Schedule,
    /// Layers of every virtual stage (`pp · vpp` ranges, in order).
    pub parts: Vec<Range<usize>>,
    /// Sequence parallelism over the tensor-parallel group (Korthikanti et al. 2022).
    pub sequence_parallel: bool,
    /// The pipeline group: rank `s` is stage `s` (same data-parallel index).
    group: Box<dyn Communicator>,
    /// First and last stage (the tied embedding / LM head); `None` on the stages between.
    tie: Option<Box<dyn Communicator>>,
    /// Every rank of the job (checkpoint reports).
    world: Box<dyn Communicator>,
    /// The tensor-parallel group: same (dp, pp), rank `t` is tensor-parallel rank `t`.
    tp_group: Box<dyn Communicator>,
    /// Seconds spent in stage-to-stage exchanges so far (waiting included).
    pub p2p_secs: f64,
    /// Seconds spent in tensor-parallel collectives so far (waiting included).
    pub tp_secs: f64,
    /// Per chunk: seconds in forwards and backwards so far, and how many ran.
    compute: Vec<([f64; 2], [u64; 2])>,
    /// Step number stamped on messages (checked by the receiver).
    step: u32,
    send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
    /// Interleaved schedules: sends handed to a sender thread, one group per directed edge.
    edges: Option<edges::Edges>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Pipeline {{ {:?} at {:?}, {} }}",
            self.shape,
            self.me,
            self.schedule.name()
        )
    }
}

fn comm_err(what: String) -> impl FnOnce(comm::CommError) -> TrainError {
    move |source| TrainError::Comm {
        what: format!("pipeline: {what}"),
        source,
    }
}

impl Pipeline {
    /// Splits `world` (every rank of the mesh, ranked as [`crate::mesh`] orders them) into this
    /// rank's pipeline group and, on the first and last stage, the embedding group; returns the
    /// pipeline and this rank's data-parallel group. Collective over `world`.
    pub fn connect(
        mut world: Box<dyn Communicator>,
        shape: MeshShape,
        schedule: Schedule,
        parts: Vec<Range<usize>>,
    ) -> Result<(Pipeline, Box<dyn Communicator>), TrainError> {
        if world.size() != shape.world() {
            return Err(TrainError::Layout(format!(
                "dp({}) * tp({}) * pp({}) = {}, but the job has {} ranks",
                shape.dp,
                shape.tp,
                shape.pp,
                shape.world(),
                world.size()
            )));
        }
        assert_eq!(
            parts.len(),
            shape.virtual_stages(),
            "one part per virtual stage"
        );
        let me = shape.coords(world.rank());
        let key = |k: usize| k as u32;
        // Same (dp, tp): one pipeline. Same (pp, tp): one data-parallel group.
        let group = world
            .split(key(me.dp * shape.tp + me.tp), key(me.pp))
            .map_err(comm_err("forming the pipeline groups".into()))?;
        let dp = world
            .split(key(me.pp * shape.tp + me.tp), key(me.dp))
            .map_err(comm_err("forming the data-parallel groups".into()))?;
        // Same (pp, dp): one tensor-parallel group (adjacent world ranks).
        let tp_group = world
            .split(key(me.pp * shape.dp + me.dp), key(me.tp))
            .map_err(comm_err("forming the tensor-parallel groups".into()))?;
        // First and last stage of a pipeline share the embedding; the others get a group of
        // their own (split is collective), which they drop.
        let ends = me.pp == 0 || me.pp + 1 == shape.pp;
        let color = if ends {
            me.dp * shape.tp + me.tp
        } else {
            shape.dp * shape.tp + world.rank()
        };
        let tie = world
            .split(key(color), key(me.pp))
            .map_err(comm_err("forming the embedding groups".into()))?;
        let tie = (ends && shape.pp > 1).then_some(tie);
        let edges = if shape.vpp > 1 {
            Some(edges::Edges::connect(world.as_mut(), shape, me)?)
        } else {
            None
        };
        Ok((
            Pipeline {
                shape,
                me,
                schedule,
                parts,
                sequence_parallel: false,
                group,
                tie,
                world,
                tp_group,
                p2p_secs: 0.0,
                tp_secs: 0.0,
                compute: vec![([0.0; 2], [0; 2]); shape.vpp],
                step: 0,
                send_buf: Vec::new(),
                recv_buf: Vec::new(),
                edges,
            },
            dp,
        ))
    }

    /// Turns sequence parallelism on or off (needs tp > 1 to mean anything).
    pub fn with_sequence_parallel(mut self, on: bool) -> Pipeline {
        self.sequence_parallel = on;
        self
    }

    /// This rank's stage.
    pub fn stage(&self) -> usize {
        self.me.pp
    }

    /// Whether this rank holds the last virtual stage (the loss).
    pub fn has_loss(&self) -> bool {
        (self.shape.virtual_stages() - 1) % self.shape.pp == self.me.pp
    }

    /// The global virtual stages this stage runs, in chunk order.
    pub fn chunks(&self) -> Vec<usize> {
        (0..self.shape.vpp)
            .map(|c| c * self.shape.pp + self.me.pp)
            .collect()
    }

    /// This stage's operation list for `m` micro-batches.
    pub fn ops(&self, m: usize) -> Vec<plan::schedule::Op> {
        let all = plan::schedule::build(
            self.schedule.kind(),
            self.shape.pp as u32,
            m as u32,
            self.shape.vpp as u32,
        );
        all.into_iter().nth(self.me.pp).expect("a list per stage")
    }

    /// Sets the step number stamped on this step's messages.
    pub fn begin_step(&mut self, step: u64) {
        self.step = step as u32;
    }

    /// One boundary exchange: sends `send` (its payload `data`) and receives `recv` into `out`,
    /// together, so two stages sending to each other never wait on each other.
    pub fn exchange(
        &mut self,
        send: Option<(Msg, &[f32])>,
        recv: Option<(Msg, &mut [f32])>,
    ) -> Result<(), TrainError> {
        if send.is_none() && recv.is_none() {
            return Ok(());
        }
        let t0 = Instant::now();
        let header = |m: &Msg, step: u32| -> [u8; HEADER_BYTES] {
            let mut h = [0u8; HEADER_BYTES];
            let kind = match m.kind {
                Kind::Act => 1u32,
                Kind::Grad => 2,
            };
            for (k, v) in [kind, m.mb, m.from_vs, step].into_iter().enumerate() {
                h[4 * k..4 * k + 4].copy_from_slice(&v.to_le_bytes());
            }
            h
        };
        if let Some((m, data)) = &send {
            self.send_buf.clear();
            self.send_buf.extend_from_slice(&header(m, self.step));
            for x in data.iter() {
                self.send_buf.extend_from_slice(&x.to_le_bytes());
            }
        }
        let what = |s: &Option<(Msg, &[f32])>, r: &Option<(Msg, &mut [f32])>| {
            let d = |m: &Msg| {
                format!(
                    "{:?} of micro-batch {} (virtual stage {})",
                    m.kind, m.mb, m.from_vs
                )
            };
            match (s, r) {
                (Some((a, _)), Some((b, _))) => format!(
                    "stage {} sending {} to stage {} and receiving {} from stage {}",
                    self.me.pp,
                    d(a),
                    a.dst,
                    d(b),
                    b.src
                ),
                (Some((a, _)), None) => {
                    format!("stage {} sending {} to stage {}", self.me.pp, d(a), a.dst)
                }
                (None, Some((b, _))) => {
                    format!(
                        "stage {} receiving {} from stage {}",
                        self.me.pp,
                        d(b),
                        b.src
                    )
                }
                (None, None) => String::new(),
            }
        };
        let label = what(&send, &recv);
        let recv_len = recv.as_ref().map_or(0, |(_, o)| HEADER_BYTES + 4 * o.len());
        self.recv_buf.resize(recv_len, 0);
        if let Some(edges) = self.edges.as_mut() {
            // Interleaved: the send is queued (it never waits), only the receive blocks.
            if let Some((m, _)) = &send {
                edges.send(m.kind, self.send_buf.clone(), label.clone())?;
            }
            if let Some((r, _)) = &recv {
                edges
                    .recv(r.kind, &mut self.recv_buf)
                    .map_err(comm_err(label.clone()))?;
            }
        } else {
            match (&send, &recv) {
                (Some((m, _)), Some((r, _))) => self
                    .group
                    .sendrecv(m.dst, &self.send_buf, r.src, &mut self.recv_buf)
                    .map_err(comm_err(label.clone()))?,
                (Some((m, _)), None) => self
                    .group
                    .send(m.dst, &self.send_buf)
                    .map_err(comm_err(label.clone()))?,
                (None, Some((r, _))) => self
                    .group
                    .recv(r.src, &mut self.recv_buf)
                    .map_err(comm_err(label.clone()))?,
                (None, None) => {}
            }
        }
        if let Some((m, out)) = recv {
            let expected = header(&m, self.step);
            if self.recv_buf[..HEADER_BYTES] != expected {
                let got: Vec<u32> = self.recv_buf[..HEADER_BYTES]
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                return Err(TrainError::Pipeline(format!(
                    "{label}: got a message with header (kind {}, micro-batch {}, virtual stage {}, step {}); \
                     the stages run different schedules or steps",
                    got[0], got[1], got[2], got[3]
                )));
            }
            for (o, c) in out
                .iter_mut()
                .zip(self.recv_buf[HEADER_BYTES..].chunks_exact(4))
            {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        self.p2p_secs += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Waits until this rank's queued sends have gone (interleaved schedules; a no-op
    /// otherwise): the end of a step's exchanges.
    pub fn flush(&mut self) -> Result<(), TrainError> {
        match self.edges.as_mut() {
            Some(e) => {
                let t0 = Instant::now();
                let r = e.flush();
                self.p2p_secs += t0.elapsed().as_secs_f64();
                r
            }
            None => Ok(()),
        }
    }

    /// Sums the tied embedding's gradient over the first and last stage (`grad` is `wte`'s
    /// gradient on the first stage, the LM head copy's on the last); both end with the same
    /// bits. A no-op on the stages between and without pipelining.
    pub fn reduce_tied(&mut self, grad: &mut [f32]) -> Result<(), TrainError> {
        let Some(tie) = self.tie.as_mut() else {
            return Ok(());
        };
        let t0 = Instant::now();
        tie.all_reduce(grad, ReduceOp::Sum)
            .map_err(comm_err("summing the tied embedding's gradient".into()))?;
        self.p2p_secs += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// The global sum of squares from each stage's own (`mine`): every stage's value, summed in
    /// stage order in f64, so every rank gets the same bits.
    pub fn sum_over_stages(&mut self, mine: f64) -> Result<f64, TrainError> {
        let all = gather_f64(self.group.as_mut(), mine)
            .map_err(comm_err("gathering the gradient norm".into()))?;
        Ok(all.iter().sum())
    }

    /// The global sum of squares from each rank's own: summed over the tensor-parallel group
    /// in rank order (f64), then over the stages ([`Pipeline::sum_over_stages`]).
    pub fn sum_over_mesh(&mut self, mine: f64) -> Result<f64, TrainError> {
        let mine = if self.shape.tp > 1 {
            let t0 = Instant::now();
            let all = gather_f64(self.tp_group.as_mut(), mine).map_err(comm_err(
                "gathering the gradient norm over tensor parallelism".into(),
            ))?;
            self.tp_secs += t0.elapsed().as_secs_f64();
            all.iter().sum()
        } else {
            mine
        };
        self.sum_over_stages(mine)
    }

    /// This rank's tensor-parallel index and the degree.
    pub fn tp(&self) -> (usize, usize) {
        (self.me.tp, self.shape.tp)
    }

    /// Whether this rank writes the run folder's files (metrics, config): the first stage's
    /// tensor-parallel rank 0 (data-parallel rank 0 is checked by the caller).
    pub fn is_writer(&self) -> bool {
        self.me.pp == 0 && self.me.tp == 0
    }

    /// The tensor-parallel group as the model's collectives, timed into `tp_secs`.
    pub fn tp_reduce(&mut self) -> TpGroup<'_> {
        TpGroup {
            comm: self.tp_group.as_mut(),
            secs: &mut self.tp_secs,
        }
    }

    /// All-gathers `buf` over the tensor-parallel group (each rank's part at
    /// `comm::shard_range`), timed into `tp_secs`.
    pub fn tp_all_gather(&mut self, buf: &mut [f32], what: &str) -> Result<(), TrainError> {
        let t0 = Instant::now();
        self.tp_group
            .all_gather(buf)
            .map_err(comm_err(what.to_string()))?;
        self.tp_secs += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// The stage that holds the loss (the last virtual stage).
    pub fn loss_stage(&self) -> usize {
        (self.shape.virtual_stages() - 1) % self.shape.pp
    }

    /// Copies `buf` from the stage that holds the loss to every stage, bit for bit (losses,
    /// the validation loss).
    /// (A stage that finished its list early waits here for the others: counted as waiting
    /// for other stages, `p2p_secs`.)
    pub fn share(&mut self, buf: &mut [f32], what: &str) -> Result<(), TrainError> {
        let root = self.loss_stage();
        let t0 = Instant::now();
        let r = self
            .group
            .broadcast(buf, root)
            .map_err(comm_err(what.to_string()));
        self.p2p_secs += t0.elapsed().as_secs_f64();
        r
    }

    /// Whether any rank of the job says yes (e.g. was asked to stop). Waiting here for the
    /// other stages counts in `p2p_secs`.
    pub fn any(&mut self, mine: bool, what: &str) -> Result<bool, TrainError> {
        let mut buf = [if mine { 1.0f32 } else { 0.0 }];
        let t0 = Instant::now();
        let r = self
            .world
            .all_reduce(&mut buf, ReduceOp::Max)
            .map_err(comm_err(what.to_string()));
        self.p2p_secs += t0.elapsed().as_secs_f64();
        r?;
        Ok(buf[0] != 0.0)
    }

    /// The job's transport ("tcp", "shm", "mpi", "threads").
    pub fn transport(&self) -> &'static str {
        self.world.transport_name()
    }

    /// Start of a run: every rank of the job must have the same config, data and pipeline
    /// (schedule, partition); a rank that differs from rank 0 stops the job, named.
    pub fn check_fingerprint(&mut self, fingerprint: &[u8; 32]) -> Result<(), TrainError> {
        // The mesh settings that shape the exchanges join the config's fingerprint.
        let mut h = sha2::Sha256::new();
        h.update(fingerprint);
        h.update(format!(
            "{:?} {:?} {}",
            self.shape,
            self.parts,
            self.schedule.name()
        ));
        h.update([u8::from(self.sequence_parallel)]);
        let digest: [u8; 32] = h.finalize().into();
        let bad = crate::dp::differing_ranks(self.world.as_mut(), &digest).map_err(comm_err(
            "pipeline: exchanging the config fingerprint".into(),
        ))?;
        if !bad.is_empty() {
            return Err(TrainError::Pipeline(format!(
                "rank(s) {bad:?} started with a different config, data, schedule or layer partition \
                 than rank 0; start every rank with the same flags and data files"
            )));
        }
        Ok(())
    }

    /// Start of a run: every rank starts at the same step (from the same checkpoint), or every
    /// rank stops, naming the one that could not start.
    pub fn agree_on_start(&mut self, mine: Result<u64, String>) -> Result<(), TrainError> {
        crate::dp::agree_on_start(self.world.as_mut(), mine, TrainError::Pipeline)
    }

    /// Every rank's bytes, in world-rank order (checkpoint reports).
    pub fn world_gather_bytes(
        &mut self,
        mine: &[u8],
        what: &str,
    ) -> Result<Vec<Vec<u8>>, TrainError> {
        crate::dp::all_gather_bytes(self.world.as_mut(), mine, what)
    }

    /// Forward-only send of a stage output (validation): plain send, the receiver waits for it.
    pub fn send_act(&mut self, m: Msg, data: &[f32]) -> Result<(), TrainError> {
        self.exchange(Some((m, data)), None)
    }

    /// Forward-only receive of a stage input (validation).
    pub fn recv_act(&mut self, m: Msg, out: &mut [f32]) -> Result<(), TrainError> {
        self.exchange(None, Some((m, out)))
    }
}

/// Every rank's `mine`, in rank order, bit for bit (two f32 words each).
fn gather_f64(group: &mut dyn Communicator, mine: f64) -> Result<Vec<f64>, comm::CommError> {
    let n = group.size();
    let mut all = vec![0.0f32; 2 * n];
    let bits = mine.to_bits();
    let r = group.rank();
    all[2 * r] = f32::from_bits(bits as u32);
    all[2 * r + 1] = f32::from_bits((bits >> 32) as u32);
    group.all_gather(&mut all)?;
    Ok((0..n)
        .map(|k| {
            f64::from_bits(all[2 * k].to_bits() as u64 | (all[2 * k + 1].to_bits() as u64) << 32)
        })
        .collect())
}

/// A rank's tensor-parallel group lent to the model (`model::TpReduce`): Megatron-LM's f / g
/// operators and the vocabulary-parallel loss run their collectives through it.
pub struct TpGroup<'a> {
    comm: &'a mut dyn Communicator,
    secs: &'a mut f64,
}

impl TpGroup<'_> {
    fn timed(
        &mut self,
        f: impl FnOnce(&mut dyn Communicator) -> Result<(), comm::CommError>,
    ) -> Result<(), model::TpError> {
        let t0 = Instant::now();
        let r = f(&mut *self.comm);
        *self.secs += t0.elapsed().as_secs_f64();
        r.map_err(|e| Box::new(e) as model::TpError)
    }
}

impl model::TpReduce for TpGroup<'_> {
    fn size(&self) -> usize {
        self.comm.size()
    }
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), model::TpError> {
        self.timed(|c| c.all_reduce(buf, ReduceOp::Sum))
    }
    fn all_reduce_max(&mut self, buf: &mut [f32]) -> Result<(), model::TpError> {
        self.timed(|c| c.all_reduce(buf, ReduceOp::Max))
    }
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<(), model::TpError> {
        self.timed(|c| c.reduce_scatter(buf, ReduceOp::Sum).map(|_| ()))
    }
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), model::TpError> {
        self.timed(|c| c.all_gather(buf))
    }
}

/// Runs `f` with the tensor-parallel collectives of `pipe` (the identity without tensor
/// parallelism, so a one-rank group costs nothing).
pub fn with_tp<R>(pipe: Option<&mut Pipeline>, f: impl FnOnce(&mut dyn model::TpReduce) -> R) -> R {
    match pipe {
        Some(p) if p.shape.tp > 1 => f(&mut p.tp_reduce()),
        _ => f(&mut model::NoTp),
    }
}

#[cfg(test)]
mod tests;
