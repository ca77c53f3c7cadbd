//! Pipeline schedules as data, and their simulation.
//!
//! A schedule is, for each pipeline device, the ordered list of work it performs: forward or
//! backward of one micro-batch on one model chunk (a virtual stage). The runtime will execute these
//! lists; the planner simulates them here to get the makespan, the bubble and the number of
//! micro-batches whose activations are alive at once. Sends and receives are implicit in the
//! dependencies: forward of (mb, virtual stage k) needs forward of (mb, k − 1); backward of (mb, k)
//! needs backward of (mb, k + 1) and its own forward. Crossing devices costs `p2p_secs`.
//!
//! ```text
//! 1F1B, p = 4 devices, m = 6 micro-batches (F = forward, B = backward, digit = micro-batch):
//! dev 0: F0 F1 F2 F3 .. B0 F4 B1 F5 B2 .. B3 .. B4 .. B5
//! dev 1:    F0 F1 F2 .. B0 F3 B1 F4 B2 F5 B3 .. B4 .. B5
//! dev 2:       F0 F1 .. B0 F2 B1 F3 B2 F4 B3 F5 B4 .. B5
//! dev 3:          F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5
//! warm-up p−1−d forwards, then one forward / one backward, then the remaining backwards;
//! device d holds at most p − d micro-batches (Narayanan et al. 2021, §2.2).
//! GPipe: all forwards, then all backwards (Huang et al. 2019): m in flight.
//! Interleaved 1F1B (v chunks per device, chunk c of device d is virtual stage c·p + d):
//! forwards walk micro-batches in groups of p through chunks 0..v, warm-up (p−d−1)·2 + (v−1)·p
//! (Narayanan et al. 2021, §2.2.2); bubble shrinks by v.
//! ```

use serde::Serialize;

/// One unit of pipeline work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Op {
    /// Forward of micro-batch `mb` on chunk `chunk` of this device.
    Forward {
        /// Micro-batch index.
        mb: u32,
        /// Model chunk on this device (0 without interleaving).
        chunk: u32,
    },
    /// Backward of micro-batch `mb` on chunk `chunk`.
    Backward {
        /// Micro-batch index.
        mb: u32,
        /// Model chunk on this device.
        chunk: u32,
    },
}

/// Which schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    /// All forwards then all backwards.
    Gpipe,
    /// One-forward-one-backward; interleaved when `v > 1`.
    OneFOneB,
}

/// Per-device instruction lists for `p` devices, `m` micro-batches, `v` chunks per device.
/// Interleaving (v > 1) needs `m` divisible by `p` (Megatron-LM's rule); callers validate.
pub fn build(kind: Kind, p: u32, m: u32, v: u32) -> Vec<Vec<Op>> {
    assert!(p >= 1 && m >= 1 && v >= 1, "degrees must be positive");
    (0..p)
        .map(|d| match kind {
            Kind::Gpipe => {
                let mut ops = Vec::with_capacity((2 * m * v) as usize);
                for chunk in 0..v {
                    ops.extend((0..m).map(|mb| Op::Forward { mb, chunk }));
                }
                for chunk in (0..v).rev() {
                    ops.extend((0..m).map(|mb| Op::Backward { mb, chunk }));
                }
                ops
            }
            Kind::OneFOneB => one_f_one_b(d, p, m, v),
        })
        .collect()
}

fn one_f_one_b(d: u32, p: u32, m: u32, v: u32) -> Vec<Op> {
    let total = m * v;
    // k-th forward/backward op on this device → (micro-batch, chunk).
    let fwd = |k: u32| {
        if v == 1 {
            return Op::Forward { mb: k, chunk: 0 };
        }
        let group = k / (p * v);
        Op::Forward {
            mb: group * p + k % p,
            chunk: (k / p) % v,
        }
    };
    let bwd = |k: u32| {
        if v == 1 {
            return Op::Backward { mb: k, chunk: 0 };
        }
        let group = k / (p * v);
        Op::Backward {
            mb: group * p + k % p,
            chunk: v - 1 - (k / p) % v,
        }
    };
    let warmup = if v == 1 {
        (p - d - 1).min(total)
    } else {
        ((p - d - 1) * 2 + (v - 1) * p).min(total)
    };
    let mut ops = Vec::with_capacity(2 * total as usize);
    ops.extend((0..warmup).map(fwd));
    let (mut f, mut b) = (warmup, 0);
    while f < total {
        ops.push(fwd(f));
        f += 1;
        ops.push(bwd(b));
        b += 1;
    }
    ops.extend((b..total).map(bwd));
    ops
}

/// Result of simulating a schedule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Simulation {
    /// Time from the first forward to the last backward, seconds.
    pub makespan: f64,
    /// Idle time of the busiest device (makespan − its busy time), seconds.
    pub bubble: f64,
    /// Per device, the most chunk-activations alive at once (forwards not yet backwarded),
    /// in units of one micro-batch on one chunk.
    pub peak_in_flight: Vec<u32>,
    /// Per device, the seconds it waited between the list's start and the end of its own last
    /// operation (what a device can measure while it runs its list: the wait after its last
    /// backward, for the stages before it to finish, falls outside).
    pub idle_in_list: Vec<f64>,
    /// Per device, the seconds it computed.
    pub busy: Vec<f64>,
}

/// Simulates per-device lists with forward/backward times per chunk (same on every device) and a
/// point-to-point delay between devices. Panics if the lists deadlock (a bug in `build`).
pub fn simulate(
    ops: &[Vec<Op>],
    m: u32,
    v: u32,
    fwd_secs: f64,
    bwd_secs: f64,
    p2p_secs: f64,
) -> Simulation {
    let n = ops.len() * v as usize;
    simulate_stages(ops, m, v, &vec![fwd_secs; n], &vec![bwd_secs; n], p2p_secs)
}

/// As [`simulate`], with each virtual stage's own forward and backward time (`fwd_secs[s]`,
/// `bwd_secs[s]` for virtual stage `s = chunk · p + device`): unequal stages, such as a last
/// stage that also holds the LM head and the loss.
pub fn simulate_stages(
    ops: &[Vec<Op>],
    m: u32,
    v: u32,
    fwd_secs: &[f64],
    bwd_secs: &[f64],
    p2p_secs: f64,
) -> Simulation {
    let p = ops.len() as u32;
    let stages = (p * v) as usize;
    assert!(
        fwd_secs.len() == stages && bwd_secs.len() == stages,
        "one forward and one backward time per virtual stage"
    );
    let idx = |mb: u32, vs: usize| mb as usize * stages + vs;
    let mut f_done = vec![f64::NAN; m as usize * stages];
    let mut b_done = vec![f64::NAN; m as usize * stages];
    let mut pos = vec![0usize; p as usize];
    let mut free = vec![0.0f64; p as usize];
    let mut busy = vec![0.0f64; p as usize];
    let mut alive = vec![0u32; p as usize];
    let mut peak = vec![0u32; p as usize];
    let total_ops: usize = ops.iter().map(|o| o.len()).sum();
    let mut done = 0;
    while done < total_ops {
        let mut progressed = false;
        for d in 0..p as usize {
            while let Some(op) = ops[d].get(pos[d]) {
                let (mb, chunk, is_fwd) = match *op {
                    Op::Forward { mb, chunk } => (mb, chunk, true),
                    Op::Backward { mb, chunk } => (mb, chunk, false),
                };
                let vs = (chunk * p) as usize + d;
                let ready = if is_fwd {
                    if vs == 0 {
                        Some(0.0)
                    } else {
                        ready_at(f_done[idx(mb, vs - 1)], p2p_secs)
                    }
                } else if vs + 1 == stages {
                    ready_at(f_done[idx(mb, vs)], 0.0)
                } else {
                    ready_at(b_done[idx(mb, vs + 1)], p2p_secs)
                        .and_then(|t| ready_at(f_done[idx(mb, vs)], 0.0).map(|u| t.max(u)))
                };
                let Some(ready) = ready else { break };
                let start = ready.max(free[d]);
                let dur = if is_fwd { fwd_secs[vs] } else { bwd_secs[vs] };
                free[d] = start + dur;
                busy[d] += dur;
                if is_fwd {
                    f_done[idx(mb, vs)] = free[d];
                    alive[d] += 1;
                    peak[d] = peak[d].max(alive[d]);
                } else {
                    b_done[idx(mb, vs)] = free[d];
                    alive[d] -= 1;
                }
                pos[d] += 1;
                done += 1;
                progressed = true;
            }
        }
        assert!(progressed, "pipeline schedule deadlocked");
    }
    let makespan = free.iter().copied().fold(0.0, f64::max);
    let max_busy = busy.iter().copied().fold(0.0, f64::max);
    Simulation {
        makespan,
        bubble: makespan - max_busy,
        peak_in_flight: peak,
        idle_in_list: free.iter().zip(&busy).map(|(f, b)| f - b).collect(),
        busy,
    }
}

fn ready_at(done: f64, delay: f64) -> Option<f64> {
    if done.is_nan() {
        None
    } else {
        Some(done + delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_complete(ops: &[Vec<Op>], m: u32, v: u32) {
        for dev in ops {
            assert_eq!(dev.len() as u32, 2 * m * v);
            for mb in 0..m {
                for chunk in 0..v {
                    let f = dev
                        .iter()
                        .position(|o| *o == Op::Forward { mb, chunk })
                        .expect("forward present");
                    let b = dev
                        .iter()
                        .position(|o| *o == Op::Backward { mb, chunk })
                        .expect("backward present");
                    assert!(f < b);
                }
            }
        }
    }

    #[test]
    fn unequal_stages_move_the_wait_to_the_faster_stage() {
        // 1F1B, p = 2, m = 4; stage 1 takes (1 + x) per forward and 2(1 + x) per backward.
        // Stage 1 is busy 12(1 + x); it starts after stage 0's first forward (1) and, in the
        // steady state, never waits again: makespan = 1 + 12(1 + x) + 2 (stage 0's last
        // backward after it). Stage 0 is busy 12, so it waits 3 + 12x within its list;
        // stage 1 waits 1 within its list (then 2 after it, outside).
        let ops = build(Kind::OneFOneB, 2, 4, 1);
        let x = 0.25;
        let s = simulate_stages(&ops, 4, 1, &[1.0, 1.0 + x], &[2.0, 2.0 * (1.0 + x)], 0.0);
        assert!(
            (s.makespan - (3.0 + 12.0 * (1.0 + x))).abs() < 1e-9,
            "{s:?}"
        );
        assert!((s.idle_in_list[0] - (3.0 + 12.0 * x)).abs() < 1e-9, "{s:?}");
        assert!((s.idle_in_list[1] - 1.0).abs() < 1e-9, "{s:?}");
        assert!((s.makespan - s.busy[1] - 3.0).abs() < 1e-9, "{s:?}");
        // Equal stages: both wait (p − 1)(tf + tb) = 3 in all; the last stage 1 of it in its list.
        let e = simulate(&ops, 4, 1, 1.0, 2.0, 0.0);
        assert!((e.idle_in_list[0] - 3.0).abs() < 1e-9 && (e.idle_in_list[1] - 1.0).abs() < 1e-9);
    }

    #[test]
    fn one_f_one_b_matches_the_closed_forms() {
        for (p, m) in [(1, 1), (1, 8), (2, 1), (4, 4), (4, 6), (8, 32), (3, 7)] {
            let ops = build(Kind::OneFOneB, p, m, 1);
            check_complete(&ops, m, 1);
            let (tf, tb) = (1.0, 2.0);
            let s = simulate(&ops, m, 1, tf, tb, 0.0);
            // (m + p − 1)(tf + tb): bubble (p − 1)(tf + tb).
            assert!(
                (s.makespan - (m + p - 1) as f64 * (tf + tb)).abs() < 1e-9,
                "p={p} m={m}: {}",
                s.makespan
            );
            assert!((s.bubble - (p - 1) as f64 * (tf + tb)).abs() < 1e-9);
            for (d, &peak) in s.peak_in_flight.iter().enumerate() {
                assert_eq!(peak, (p - d as u32).min(m), "device {d}");
            }
        }
    }

    #[test]
    fn gpipe_has_the_same_bubble_but_keeps_every_micro_batch() {
        let (p, m) = (4, 8);
        let s = simulate(&build(Kind::Gpipe, p, m, 1), m, 1, 1.0, 2.0, 0.0);
        assert!((s.bubble - 3.0 * 3.0).abs() < 1e-9, "{}", s.bubble);
        assert!(s.peak_in_flight.iter().all(|&x| x == m));
    }

    #[test]
    fn interleaving_divides_the_bubble_by_v() {
        for (p, m, v) in [(2, 4, 2), (4, 8, 2), (4, 8, 3), (8, 16, 4)] {
            let ops = build(Kind::OneFOneB, p, m, v);
            check_complete(&ops, m, v);
            // Chunk times are a v-th of a device's full stage time.
            let (tf, tb) = (1.0 / v as f64, 2.0 / v as f64);
            let s = simulate(&ops, m, v, tf, tb, 0.0);
            let expected = (p - 1) as f64 * 3.0 / v as f64;
            assert!(
                (s.bubble - expected).abs() < 1e-9,
                "p={p} m={m} v={v}: bubble {} vs {expected}",
                s.bubble
            );
            // Device 0 keeps p·(1 + (p−1)/(p·v)) micro-batches' worth of its layers
            // (Korthikanti et al. 2022 §4.2.3): p·v + p − 1 chunk units. The simulation of the
            // schedule we build reproduces the paper's count exactly.
            let units = s.peak_in_flight[0] as f64 / v as f64;
            let paper = p as f64 + (p as f64 - 1.0) / v as f64;
            assert!(
                (units - paper).abs() < 1e-9,
                "p={p} v={v}: {units} vs {paper}"
            );
        }
    }

    #[test]
    fn p2p_delay_lengthens_the_fill() {
        let (p, m) = (4, 8);
        let ops = build(Kind::OneFOneB, p, m, 1);
        let a = simulate(&ops, m, 1, 1.0, 2.0, 0.0).makespan;
        let b = simulate(&ops, m, 1, 1.0, 2.0, 0.1).makespan;
        // The first forward and the last backward each cross p − 1 links.
        assert!(b >= a + 2.0 * (p - 1) as f64 * 0.1 - 1e-9, "{a} {b}");
    }
}
