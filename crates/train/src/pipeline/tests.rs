use super::*;
use plan::schedule::{build, Kind as SchedKind};

/// Replays every stage's boundary exchanges with unbuffered messages: a send completes only
/// when its receiver is waiting for a message from that sender (and both sides of a boundary
/// are posted together, as `sendrecv` does). Fails if the stages wait on each other forever,
/// or a receive would get another message than the one its operation needs.
fn replay(kind: SchedKind, p: usize, m: usize, v: usize) {
    let lists = build(kind, p as u32, m as u32, v as u32);
    let bounds: Vec<Vec<Boundary>> = lists
        .iter()
        .enumerate()
        .map(|(d, ops)| boundaries(ops, d, p, p * v))
        .collect();
    // Per stage: the boundary it is at, and which of its two halves are done.
    let mut at = vec![0usize; p];
    let mut sent = vec![false; p];
    let mut got = vec![false; p];
    let done = |d: usize, at: &[usize]| at[d] == bounds[d].len();
    loop {
        let mut progressed = false;
        for d in 0..p {
            if done(d, &at) {
                continue;
            }
            let bd = bounds[d][at[d]];
            if let (Some(s), false) = (bd.send, sent[d]) {
                let r = s.dst;
                assert_ne!(r, d, "a stage sends to itself: {s:?}");
                if !done(r, &at) {
                    if let (Some(want), false) = (bounds[r][at[r]].recv, got[r]) {
                        if want.src == d {
                            assert_eq!(
                                want, s,
                                "{kind:?} p={p} m={m} v={v}: stage {r} expects {want:?}, stage {d} sends {s:?}"
                            );
                            sent[d] = true;
                            got[r] = true;
                            progressed = true;
                        }
                    }
                }
            }
            let bd = bounds[d][at[d]];
            if (bd.send.is_none() || sent[d]) && (bd.recv.is_none() || got[d]) {
                at[d] += 1;
                sent[d] = false;
                got[d] = false;
                progressed = true;
            }
        }
        if (0..p).all(|d| done(d, &at)) {
            return;
        }
        assert!(
            progressed,
            "{kind:?} p={p} m={m} v={v}: the stages wait on each other at boundaries {at:?}"
        );
    }
}

#[test]
fn every_schedule_exchanges_without_deadlock_or_mismatch() {
    for p in 1..=5 {
        for m in 1..=9 {
            replay(SchedKind::Gpipe, p, m, 1);
            replay(SchedKind::OneFOneB, p, m, 1);
        }
    }
}

#[test]
fn one_f_one_b_pairs_sends_with_receives_as_megatron_does() {
    let lists = build(SchedKind::OneFOneB, 2, 4, 1);
    let b0 = boundaries(&lists[0], 0, 2, 2);
    // F0 F1 B0 F2 B1 F3 B2 B3: after F1 the stage sends a1 and receives g0 in one exchange.
    let (s, r) = (b0[2].send.unwrap(), b0[2].recv.unwrap());
    assert_eq!((s.kind, s.mb, r.kind, r.mb), (Kind::Act, 1, Kind::Grad, 0));
    let b1 = boundaries(&lists[1], 1, 2, 2);
    assert_eq!(b1[0].recv.unwrap().mb, 0);
    assert!(b1[0].send.is_none() && b1[1].send.is_none() && b1[1].recv.is_none());
    let last = b1.last().unwrap();
    assert_eq!(
        (last.send.unwrap().kind, last.send.unwrap().mb),
        (Kind::Grad, 3)
    );
}

#[test]
fn in_flight_sets_follow_the_schedule() {
    use super::exec::in_flight;
    for d in 0..4u32 {
        let l = &build(SchedKind::OneFOneB, 4, 8, 1)[d as usize];
        assert_eq!(in_flight(l, 0), (4 - d) as usize);
        let g = &build(SchedKind::Gpipe, 4, 8, 1)[d as usize];
        assert_eq!(in_flight(g, 0), 8);
    }
}

/// Replays the lists with buffered sends (a send never waits) and per-edge FIFO delivery:
/// a stage blocks only on a receive, which takes the oldest message on its edge. Fails on a
/// deadlock, or when the oldest message is not the one the operation needs.
fn replay_buffered(kind: SchedKind, p: usize, m: usize, v: usize) {
    use std::collections::VecDeque;
    let lists = build(kind, p as u32, m as u32, v as u32);
    let bounds: Vec<Vec<Boundary>> = lists
        .iter()
        .enumerate()
        .map(|(d, ops)| boundaries(ops, d, p, p * v))
        .collect();
    // One queue per (kind, src, dst).
    let key = |msg: &Msg| (msg.kind == Kind::Act, msg.src, msg.dst);
    let mut queues: std::collections::HashMap<(bool, usize, usize), VecDeque<Msg>> =
        Default::default();
    let mut at = vec![0usize; p];
    let mut sent = vec![false; p];
    loop {
        let mut progressed = false;
        for d in 0..p {
            while at[d] < bounds[d].len() {
                let bd = bounds[d][at[d]];
                if let (Some(s), false) = (bd.send, sent[d]) {
                    queues.entry(key(&s)).or_default().push_back(s);
                    sent[d] = true;
                    progressed = true;
                }
                if let Some(r) = bd.recv {
                    match queues.get_mut(&key(&r)).and_then(|q| q.pop_front()) {
                        Some(got) => {
                            assert_eq!(got, r, "{kind:?} p={p} m={m} v={v}: FIFO order differs")
                        }
                        None => break,
                    }
                }
                at[d] += 1;
                sent[d] = false;
                progressed = true;
            }
        }
        if (0..p).all(|d| at[d] == bounds[d].len()) {
            return;
        }
        assert!(progressed, "{kind:?} p={p} m={m} v={v}: deadlock at {at:?}");
    }
}

#[test]
fn buffered_sends_run_every_schedule_including_interleaved() {
    for p in 1..=5 {
        for m in 1..=9 {
            replay_buffered(SchedKind::Gpipe, p, m, 1);
            replay_buffered(SchedKind::OneFOneB, p, m, 1);
            if p > 1 && m % p == 0 {
                for v in 2..=3 {
                    replay_buffered(SchedKind::OneFOneB, p, m, v);
                }
            }
        }
    }
}
