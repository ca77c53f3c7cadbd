//! Parameter server with threads as ranks: sync equals its sequential reference bit for bit;
//! async respects the staleness bound.
mod common;
use comm::ps::{reference_sync, serve, worker_step, PsLayout, PsMode};
use comm::{threads, Config, ReduceOp};
use std::time::Duration;

fn cfg() -> Config {
    Config {
        timeout: Duration::from_secs(10),
        max_frame_bytes: 16 << 10,
        ring_bytes: 64 << 10,
        ..Config::default()
    }
}

fn sync_case(workers: usize, servers: usize, len: usize, op: ReduceOp) {
    let layout = PsLayout::new(workers + servers, servers).unwrap();
    let steps = 3;
    let handles: Vec<_> = threads(workers + servers, cfg())
        .into_iter()
        .enumerate()
        .map(|(r, mut c)| {
            std::thread::spawn(move || {
                if layout.is_server(r) {
                    serve(&mut c, &layout, PsMode::Sync, op, len, steps).expect("serve");
                    Vec::new()
                } else {
                    (0..steps)
                        .map(|step| {
                            let mut b = common::input(r, len, 10 + step as u64);
                            worker_step(&mut c, &layout, &mut b).expect("worker step");
                            b
                        })
                        .collect::<Vec<_>>()
                }
            })
        })
        .collect();
    let results: Vec<Vec<Vec<f32>>> = handles
        .into_iter()
        .map(|h| h.join().expect("rank panicked"))
        .collect();
    for step in 0..steps {
        let grads: Vec<Vec<f32>> = (0..workers)
            .map(|r| common::input(r, len, 10 + step as u64))
            .collect();
        let want = reference_sync(&grads, op);
        for (r, res) in results.iter().enumerate().take(workers) {
            let same = res[step]
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "worker {r} step {step}: differs from the sequential reference"
            );
        }
    }
}

#[test]
fn sync_equals_reference() {
    sync_case(3, 2, 1001, ReduceOp::Sum);
    sync_case(2, 1, 70_003, ReduceOp::Average);
    sync_case(4, 3, 2, ReduceOp::Max); // fewer elements than servers
    sync_case(2, 2, 0, ReduceOp::Sum);
}

#[test]
fn async_respects_staleness() {
    let (workers, servers, len, steps, s) = (3, 2, 257, 8, 1);
    let layout = PsLayout::new(workers + servers, servers).unwrap();
    let handles: Vec<_> = threads(workers + servers, cfg())
        .into_iter()
        .enumerate()
        .map(|(r, mut c)| {
            std::thread::spawn(move || {
                if layout.is_server(r) {
                    let theta = serve(
                        &mut c,
                        &layout,
                        PsMode::Async { staleness: s },
                        ReduceOp::Sum,
                        len,
                        steps,
                    )
                    .expect("serve");
                    vec![vec![theta[0]]]
                } else {
                    (0..steps)
                        .map(|t| {
                            // Uneven speeds, so staleness actually comes into play.
                            std::thread::sleep(Duration::from_millis(
                                (r as u64 * 3 * (t as u64 % 3)) % 7,
                            ));
                            let mut b = vec![1.0f32; len];
                            worker_step(&mut c, &layout, &mut b).expect("worker step");
                            // Each server answers with one version of its shard; servers move independently.
                            (0..servers)
                                .map(|s| {
                                    let sh = &b[comm::shard_range(len, servers, s)];
                                    assert!(
                                        sh.iter().all(|&x| x == sh[0]),
                                        "server {s}: one pull, one version"
                                    );
                                    sh[0]
                                })
                                .collect::<Vec<f32>>()
                        })
                        .collect::<Vec<Vec<f32>>>()
                }
            })
        })
        .collect();
    let results: Vec<Vec<Vec<f32>>> = handles
        .into_iter()
        .map(|h| h.join().expect("rank panicked"))
        .collect();
    for (r, pulls) in results.iter().enumerate().take(workers) {
        for (t, per_server) in pulls.iter().enumerate() {
            for &v in per_server {
                // After its push t, this worker's own t+1 deltas are in, and every other worker's
                // first t+1-S at least; never more than everything.
                let lower = (t + 1) + (workers - 1) * (t + 1).saturating_sub(s);
                assert!(
                    v as usize >= lower,
                    "worker {r} step {t}: θ = {v} < {lower}: staleness bound broken"
                );
                assert!(
                    v as usize <= workers * steps,
                    "worker {r} step {t}: θ = {v}"
                );
            }
        }
    }
    for srv in &results[workers..] {
        assert_eq!(
            srv[0][0] as usize,
            workers * steps,
            "every delta applied exactly once"
        );
    }
}
