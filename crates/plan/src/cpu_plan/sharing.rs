//! More ranks than cores: the pipeline under processor sharing, and the constants of the
//! oversubscribed host (docs/cpu-planner-measurements.md, "Ranks sharing cores").
//!
//! With R ranks × n threads on C < R·n cores the operating system shares the cores among the
//! runnable threads (Linux's fair scheduler approximates processor sharing: each of k runnable
//! threads on C cores progresses at min(1, C/k) of a core; Kleinrock 1967 for the discipline).
//! A pipeline stage that waits for its neighbour is not runnable, so its core goes to the
//! others: the bubble of a pipeline on a shared host is not idle time, and the step is not
//! `oversubscription × makespan` (the model of commit 3caacd0, under which 4 and 8 processes on
//! 2 cores measured 1.17–1.44× the prediction for data parallelism alone and 0.54–0.92× for
//! pipelines). [`shared_makespan`] simulates the 1F1B
//! lists with each running operation progressing at that rate; with a core per thread it is
//! `schedule::simulate`'s makespan.

use crate::schedule::Op;

/// Seconds each ring phase of a tensor-parallel collective (`cpu_comm::tp_ring_phases`) adds
/// per extra rank per core (`oversubscription − 1`): a rank that reaches the rendezvous first
/// sleeps in its receive, and the last one to arrive may be waiting for a core. With a core per
/// rank the collectives cost the link's time alone (`CommCalibration::tcp_tensor_parallel`,
/// fitted to measured collective time). Fitted on the tables of `cpu_plan::measured`: 0.02 ms
/// before [`RELOAD_SECS_PER_BYTE`], which charges part of what it stood for (session 8).
pub const TP_WAKE_SECS: f64 = 0.01e-3;

/// Share of its compute a tensor-parallel group loses per extra core's worth of threads
/// (`tp_group_stretch`). Fitted on the eight tp 4 rows of tables C and F of
/// `cpu_plan::measured` (tp 4 alone on 2 cores measured 108.9–110.6 ms against 79.5–85.6
/// predicted without it; two tp 4 groups, as dp 2 or pp 2, lost less).
pub const TP_GROUP_LOSS: f64 = 0.3;

/// Factor on a micro-step of a tensor-parallel group of `group_threads` threads (tp × threads
/// per rank) on `cores` cores, with `groups` such groups on the host: a group wider than the
/// cores never runs at once, so at every collective the ranks that arrived sleep while the
/// others compute and the cores idle in the hand-overs (measured: tp 4 on 2 cores spent 72 ms
/// of a 110 ms step in its collectives). The idle time is shared by the other groups, whose
/// work fills it: `1 + TP_GROUP_LOSS · (group_threads / cores − 1) / groups`, 1 when the group
/// fits.
pub fn tp_group_stretch(group_threads: u64, cores: u64, groups: u64) -> f64 {
    let over = group_threads as f64 / cores.max(1) as f64;
    if over <= 1.0 {
        return 1.0;
    }
    1.0 + TP_GROUP_LOSS * (over - 1.0) / groups.max(1) as f64
}

/// Seconds each pipeline message (an activation forward, a gradient backward) adds to the
/// dependency chain, times the load when it is sent (`shared_makespan`: max(1, runnable threads
/// / cores)): the receiving rank sleeps in its receive and has to be woken and, with more ranks
/// computing than cores, wait for one. Far above a loopback round trip (~30 µs): it also carries
/// per-micro-batch costs of the pipeline runtime that the compute model lacks. Session 6 fitted
/// 1.0 ms × the host's oversubscription on tables A–C; that overcharged pipelines of one
/// micro-batch, which run one stage at a time (dp2 pp4 b4 and pp4 tp2 b8 at N = 8: 81.1 and
/// 75.5 ms measured in table G, 97.1 and 97.4 predicted), so the load is now the one at the
/// message, and 1.2 ms fitted on tables A–G.
pub const P2P_MESSAGE_SECS: f64 = 1.2e-3;

/// Seconds per byte of a stage's fp32 weights that each of its forward and backward operations
/// pays when the ranks outnumber the cores (the weights re-read at 16.7 GB/s): a rank that gets
/// its core back after other ranks ran finds its weights evicted — the host's ranks hold more
/// weights, weight panels, gradients and AdamW state than the 32 MB L3 of the development
/// machine — and the compute model's calibration (one rank per core, weights in cache between
/// kernels) does not charge the re-read. It is work, shared like the compute: full-width stages
/// pay it on twice the bytes of a tensor-parallel pair's, which is what the session-7 tables
/// showed at N = 4 and 8 (pipelines of full-width stages 3–14% slower than predicted, of tp
/// pairs 2–9% faster, the gap growing with the micro-batches). Fitted with TP_WAKE_SECS on
/// tables A–G of `cpu_plan::measured` (session 8; docs/cpu-planner.md has the fresh held-out
/// runs).
pub const RELOAD_SECS_PER_BYTE: f64 = 6e-11;

/// Seconds each data-parallel ring step (one message of a ring all-reduce, reduce-scatter or
/// all-gather) adds per extra rank per core (`oversubscription − 1`): the ring's next rank is
/// runnable only once its predecessor's message arrives and then waits for a core.
pub const DP_WAKE_SECS: f64 = 0.08e-3;

/// Makespan of the 1F1B lists `ops` of `m` micro-batches (one chunk per stage) when each stage
/// is `group` ranks of `threads` threads that run in lockstep (its data- and tensor-parallel
/// copies) and all ranks share `cores` cores: every running operation progresses at
/// min(1, cores / (group · threads · running stages)). Forward `fwd` and backward `bwd` seconds
/// of work per operation; between a stage's operation and the neighbour's that depends on it,
/// `p2p` seconds of transfer plus `wake` seconds times the load when it ends — max(1, runnable
/// threads / cores), the threads of the stages still running and of the receiver: a receiver
/// that has to wait for a core waits longer when more ranks compute. Returns NaN if the lists
/// deadlock (a bug in `schedule::build`).
pub fn shared_makespan(
    ops: &[Vec<Op>],
    m: u32,
    (fwd, bwd, p2p, wake): (f64, f64, f64, f64),
    (group, threads, cores): (u64, u64, u64),
) -> f64 {
    let p = ops.len();
    let idx = |mb: u32, s: usize| mb as usize * p + s;
    // When each operation's result is there: its own stage's (the last stage's forward, for
    // its backward) at once, the neighbour's after the message.
    let mut f_done = vec![f64::NAN; m as usize * p];
    let mut f_sent = vec![f64::NAN; m as usize * p];
    let mut b_sent = vec![f64::NAN; m as usize * p];
    let mut pos = vec![0usize; p];
    // The operation each stage runs and the work it has left.
    let mut running: Vec<Option<(Op, f64)>> = vec![None; p];
    let known = |x: f64| (!x.is_nan()).then_some(x);
    // When stage s's next operation may start (None: a dependency is not done yet).
    let ready = |s: usize, op: &Op, f_done: &[f64], f_sent: &[f64], b_sent: &[f64]| match *op {
        Op::Forward { .. } if s == 0 => Some(0.0),
        Op::Forward { mb, .. } => known(f_sent[idx(mb, s - 1)]),
        Op::Backward { mb, .. } if s + 1 == p => known(f_done[idx(mb, s)]),
        Op::Backward { mb, .. } => known(b_sent[idx(mb, s + 1)]),
    };
    let share = (group.max(1) * threads.max(1)) as f64;
    let mut t = 0.0f64;
    loop {
        let mut next = f64::INFINITY;
        for s in 0..p {
            if running[s].is_some() {
                continue;
            }
            let Some(op) = ops[s].get(pos[s]) else {
                continue;
            };
            match ready(s, op, &f_done, &f_sent, &b_sent) {
                Some(r) if r <= t => {
                    let work = if matches!(op, Op::Forward { .. }) {
                        fwd
                    } else {
                        bwd
                    };
                    running[s] = Some((*op, work));
                }
                Some(r) => next = next.min(r),
                None => {}
            }
        }
        let busy = running.iter().filter(|r| r.is_some()).count();
        if busy == 0 && next.is_infinite() {
            let finished = (0..p).all(|s| pos[s] == ops[s].len());
            return if finished { t } else { f64::NAN };
        }
        let rate = if busy == 0 {
            1.0
        } else {
            (cores.max(1) as f64 / (share * busy as f64)).min(1.0)
        };
        for (_, left) in running.iter().flatten() {
            next = next.min(t + left / rate);
        }
        let dt = next - t;
        t = next;
        let mut ended = Vec::new();
        for s in 0..p {
            let Some((op, left)) = running[s] else {
                continue;
            };
            let left = left - dt * rate;
            if left > 1e-12 * (fwd + bwd) {
                running[s] = Some((op, left));
                continue;
            }
            ended.push((s, op));
            running[s] = None;
            pos[s] += 1;
        }
        // The receivers join the stages still running.
        let still = running.iter().filter(|r| r.is_some()).count() as f64;
        let load = (share * (still + 1.0) / cores.max(1) as f64).max(1.0);
        for (s, op) in ended {
            let sent = t + p2p + wake * load;
            match op {
                Op::Forward { mb, .. } => {
                    f_done[idx(mb, s)] = t;
                    f_sent[idx(mb, s)] = sent;
                }
                Op::Backward { mb, .. } => b_sent[idx(mb, s)] = sent,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{build, simulate, Kind};

    #[test]
    fn a_tp_group_wider_than_the_cores_stretches_less_when_other_groups_fill_in() {
        assert_eq!(tp_group_stretch(2, 2, 1), 1.0);
        assert_eq!(tp_group_stretch(4, 8, 1), 1.0);
        let alone = tp_group_stretch(4, 2, 1);
        assert!((alone - (1.0 + TP_GROUP_LOSS)).abs() < 1e-12);
        let two = tp_group_stretch(4, 2, 2);
        assert!((two - 1.0 - (alone - 1.0) / 2.0).abs() < 1e-12);
        assert!(tp_group_stretch(8, 2, 1) > alone);
    }

    #[test]
    fn with_a_core_per_thread_it_is_the_dedicated_simulation() {
        for (p, m) in [(1, 1), (1, 4), (2, 4), (4, 8), (4, 2), (3, 5)] {
            let lists = build(Kind::OneFOneB, p, m, 1);
            let sim = simulate(&lists, m, 1, 1.0, 2.0, 0.1);
            let shared = shared_makespan(&lists, m, (1.0, 2.0, 0.05, 0.05), (2, 1, 2 * p as u64));
            assert!(
                (shared - sim.makespan).abs() < 1e-9,
                "p{p} m{m}: {shared} vs {}",
                sim.makespan
            );
        }
    }

    #[test]
    fn sharing_cores_costs_the_work_over_the_cores_and_the_bubble_is_lent_out() {
        // One stage, 4 ranks on 2 cores: every operation runs at half speed.
        let one = build(Kind::OneFOneB, 1, 3, 1);
        let t = shared_makespan(&one, 3, (1.0, 2.0, 0.0, 0.0), (4, 1, 2));
        assert!((t - 2.0 * 9.0).abs() < 1e-9, "{t}");
        // Two stages on one core each, 4 micro-batches: dedicated, the bubble is one micro-step
        // (makespan 5 micro-steps); on ONE shared core the work is 2 × 4 micro-steps and the
        // warm-up and cool-down run alone at full speed: between the work over the cores (8)
        // and oversubscription × makespan (10).
        let two = build(Kind::OneFOneB, 2, 4, 1);
        let dedicated = shared_makespan(&two, 4, (1.0, 2.0, 0.0, 0.0), (1, 1, 2));
        assert!((dedicated - 15.0).abs() < 1e-9, "{dedicated}");
        let shared = shared_makespan(&two, 4, (1.0, 2.0, 0.0, 0.0), (1, 1, 1));
        assert!(shared > 24.0 - 1e-9 && shared < 30.0, "{shared}");
    }
}
