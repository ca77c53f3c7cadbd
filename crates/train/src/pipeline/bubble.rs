//! The pipeline's wait, simulated beside the measured one.
//!
//! A stage measures the seconds it spends in exchanges with the other stages (waiting for a
//! neighbour included) and, after its list, in agreeing with every stage on the losses and a
//! stop request, which waits for the last stage to finish (and, on the first and last stage,
//! summing the tied embedding's gradient). The report sets two simulations
//! of the very lists the stages ran (`plan::schedule::simulate_stages`) beside it:
//!
//! - **predicted**: every virtual stage's micro-batch time from `plan::cpu_time` under the
//!   run's precision and recomputation (forward a third, backward two thirds, plus the
//!   recomputed forward; the first stage also embeds, the last also runs the final layer
//!   norm, the LM head and the loss), a fraction of the predicted step (list plus AdamW);
//! - **from measured stage times**: every stage's own mean forward and backward time of this
//!   run (gathered over the pipeline group at the end), in seconds per step — what the schedule
//!   implies for these stage costs, so the remaining difference is the executor's and the
//!   transfers', not the cost model's.
//!
//! Both add the link's delay (`plan::cpu_comm`, latency plus bytes over bandwidth) to every
//! transfer between stages.

use super::{comm_err, gather_f64, Pipeline};
use crate::error::TrainError;
use plan::schedule::{build, simulate, simulate_stages, Simulation};

/// What the start report prints about the pipeline's wait.
pub struct PredictedWait {
    /// The schedule's own bubble (equal stages, no transfer time), a fraction of the makespan.
    pub equal_stages: f64,
    /// This stage's wait with the stages' predicted times, a fraction of its predicted step.
    pub stage: f64,
}

/// Seconds stage `me` waits in `sim`: within its list, and after it until the last stage is
/// done (every stage then agrees on the losses and a stop, which waits for all of them).
fn stage_wait(sim: &Simulation, me: usize) -> f64 {
    sim.makespan - sim.busy[me]
}

impl Pipeline {
    /// The link's delay for one activation (or activation gradient) of `b · t` rows of
    /// `channels` f32 values (`b · t / tp` rows under sequence parallelism).
    fn transfer_secs(&self, b: usize, t: usize, channels: usize) -> f64 {
        let rows = if self.sequence_parallel {
            b * t / self.shape.tp
        } else {
            b * t
        };
        let link = plan::cpu_comm::CommCalibration::for_transport(self.transport());
        link.latency_secs + (rows * channels * 4) as f64 / link.bus_bytes_per_sec
    }

    /// The start report's simulations for `m` micro-batches of `b` sequences of `t` tokens on
    /// `threads` threads per rank.
    /// The stages' times follow the run's precision and recomputation (`modes`); a recomputed
    /// forward counts in the backward, which runs it.
    pub fn predicted_wait(
        &self,
        mcfg: &model::ModelConfig,
        (m, b, t, threads): (usize, usize, usize, usize),
        modes: (plan::recipe::Precision, plan::recipe::Recompute),
    ) -> PredictedWait {
        let (pp, v) = (self.shape.pp as u32, self.shape.vpp as u32);
        let lists = build(self.schedule.kind(), pp, m as u32, v);
        let equal = simulate(&lists, m as u32, v, 1.0, 2.0, 0.0);
        let last = self.parts.len() - 1;
        let without = (modes.0, plan::recipe::Recompute::None);
        let recomputes = modes.1 != plan::recipe::Recompute::None;
        let stage_times = |modes: (plan::recipe::Precision, plan::recipe::Recompute)| -> Vec<plan::cpu_time::CpuStepTime> {
            self.parts
                .iter()
                .enumerate()
                .map(|(vs, layers)| {
                let dims = plan::cpu_runtime::CpuRuntimeDims {
                    padded_vocab: mcfg.padded_vocab() as u64,
                    max_seq_len: mcfg.max_seq_len as u64,
                    channels: mcfg.channels as u64,
                    heads: mcfg.n_head as u64,
                    layers: layers.len() as u64,
                    has_embedding: vs == 0,
                    has_head: vs == last,
                    tp: self.shape.tp as u64,
                };
                plan::cpu_time::step_time_as(
                    &dims,
                    b as u64,
                    t as u64,
                    1,
                    threads as u64,
                    modes,
                    &plan::cpu_time::CpuCalibration::default(),
                )
            })
            .collect()
        };
        let micro_of = |costs: &[plan::cpu_time::CpuStepTime]| -> Vec<f64> {
            costs
                .iter()
                .map(|c| c.total_secs - c.optimizer_secs)
                .collect()
        };
        let costs = stage_times(modes);
        let micro = micro_of(&costs);
        let (fwd, bwd): (Vec<f64>, Vec<f64>) = if recomputes {
            // The forward as without recomputation; the backward also runs it again.
            let base = micro_of(&stage_times(without));
            base.iter()
                .zip(&micro)
                .map(|(b, x)| (b / 3.0, x - b / 3.0))
                .unzip()
        } else {
            (
                micro.iter().map(|x| x / 3.0).collect(),
                micro.iter().map(|x| 2.0 * x / 3.0).collect(),
            )
        };
        let p2p = self.transfer_secs(b, t, mcfg.channels);
        let sim = simulate_stages(&lists, m as u32, v, &fwd, &bwd, p2p);
        let me = self.stage();
        let optimizer: f64 = self
            .chunks()
            .iter()
            .map(|&vs| costs[vs].optimizer_secs)
            .sum();
        PredictedWait {
            equal_stages: equal.bubble / equal.makespan,
            stage: stage_wait(&sim, me) / (sim.makespan + optimizer),
        }
    }

    /// Adds one forward (`fwd`) or backward of chunk `chunk` that took `secs` to this rank's
    /// measured stage times.
    pub(crate) fn note_compute(&mut self, chunk: usize, fwd: bool, secs: f64) {
        let k = usize::from(!fwd);
        self.compute[chunk].0[k] += secs;
        self.compute[chunk].1[k] += 1;
    }

    /// This rank's measured stage times so far (per chunk: seconds and operations, forward
    /// and backward); [`Pipeline::simulated_wait`] takes the difference from such a snapshot.
    pub fn compute_totals(&self) -> Vec<([f64; 2], [u64; 2])> {
        self.compute.clone()
    }

    /// Seconds per step this stage waits when the lists of `m` micro-batches run with every
    /// stage's mean forward and backward time since `since` (a [`Pipeline::compute_totals`]
    /// snapshot). Collective over the pipeline group: every stage calls it at the same point.
    pub fn simulated_wait(
        &mut self,
        since: &[([f64; 2], [u64; 2])],
        (m, b, t, channels): (usize, usize, usize, usize),
    ) -> Result<f64, TrainError> {
        let (pp, v) = (self.shape.pp, self.shape.vpp);
        let mut fwd = vec![0.0; pp * v];
        let mut bwd = vec![0.0; pp * v];
        for c in 0..v {
            for (k, out) in [&mut fwd, &mut bwd].into_iter().enumerate() {
                let (now, then) = (self.compute[c], since[c]);
                let ops = now.1[k] - then.1[k];
                let mean = if ops == 0 {
                    0.0
                } else {
                    (now.0[k] - then.0[k]) / ops as f64
                };
                let all = gather_f64(self.group.as_mut(), mean).map_err(comm_err(
                    "gathering the stages' forward/backward times".into(),
                ))?;
                for (s, x) in all.into_iter().enumerate() {
                    out[c * pp + s] = x;
                }
            }
        }
        let lists = build(self.schedule.kind(), pp as u32, m as u32, v as u32);
        let p2p = self.transfer_secs(b, t, channels);
        let sim = simulate_stages(&lists, m as u32, v as u32, &fwd, &bwd, p2p);
        Ok(stage_wait(&sim, self.stage()))
    }
}
