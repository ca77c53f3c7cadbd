//! The conformance suite with n threads as peers, plus failure behaviour in one process.
mod common;
use comm::{threads, Algorithm, CommError, Communicator, Config, ReduceOp};
use std::time::{Duration, Instant};

fn test_cfg() -> Config {
    Config {
        timeout: Duration::from_secs(10),
        max_frame_bytes: 64 << 10,
        ring_bytes: 64 << 10,
        ..Config::default()
    }
}

fn run_threads(n: usize) {
    let comms = threads(n, test_cfg());
    let handles: Vec<_> = comms
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let r = c.rank();
                (r, common::run_suite(&mut c))
            })
        })
        .collect();
    for h in handles {
        let (r, got) = h.join().expect("rank thread panicked");
        common::assert_suite(n, r, &got);
    }
}

#[test]
fn suite_1_rank() {
    run_threads(1);
}
#[test]
fn suite_2_ranks() {
    run_threads(2);
}
#[test]
fn suite_3_ranks() {
    run_threads(3);
}
#[test]
fn suite_4_ranks() {
    run_threads(4);
}
#[test]
fn suite_5_ranks() {
    run_threads(5);
}

#[test]
fn desync_is_reported_not_hung() {
    let cfg = Config {
        timeout: Duration::from_secs(5),
        ..test_cfg()
    };
    let mut comms = threads(2, cfg);
    let mut c1 = comms.pop().unwrap();
    let mut c0 = comms.pop().unwrap();
    let t = Instant::now();
    let h = std::thread::spawn(move || {
        let mut b = vec![1.0f32; 100];
        c1.broadcast(&mut b, 1)
    });
    let mut b = vec![1.0f32; 100];
    c0.set_algorithm(Algorithm::Ring);
    let e0 = c0
        .all_reduce(&mut b, ReduceOp::Sum)
        .expect_err("rank 0 must fail");
    let msg = e0.to_string();
    assert!(
        matches!(
            e0,
            CommError::Desync {
                rank: 0,
                peer: 1,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("broadcast") && msg.contains("all_reduce"),
        "{msg}"
    );
    // The latched error is reported again, naming the first one.
    let again = c0.barrier().expect_err("latched").to_string();
    assert!(
        again.contains("earlier error") && again.contains("desynchronised"),
        "{again}"
    );
    drop(c0);
    let _ = h.join().expect("rank 1 thread");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn size_mismatch_is_a_desync() {
    let mut comms = threads(2, test_cfg());
    let mut c1 = comms.pop().unwrap();
    let mut c0 = comms.pop().unwrap();
    let h = std::thread::spawn(move || c1.all_reduce(&mut [1.0f32; 7], ReduceOp::Sum));
    let e = c0
        .all_reduce(&mut [1.0f32; 9], ReduceOp::Sum)
        .expect_err("size mismatch");
    drop(c0);
    let e1 = h.join().unwrap().expect_err("size mismatch on rank 1");
    let both = format!("{e} | {e1}");
    assert!(both.contains("message sizes differ"), "{both}");
}

#[test]
fn silent_peer_times_out_naming_it() {
    let cfg = Config {
        timeout: Duration::from_millis(300),
        ..test_cfg()
    };
    let mut comms = threads(3, cfg);
    let c2 = comms.pop().unwrap();
    let mut c1 = comms.pop().unwrap();
    let mut c0 = comms.pop().unwrap();
    // Rank 2 never calls; ranks 0 and 1 must give up and say whom they were waiting for.
    let h = std::thread::spawn(move || {
        c1.set_algorithm(Algorithm::Ring);
        c1.all_reduce(&mut [1.0f32; 30], ReduceOp::Sum)
            .map_err(|e| e.to_string())
    });
    c0.set_algorithm(Algorithm::Ring);
    let t = Instant::now();
    let e0 = c0
        .all_reduce(&mut [1.0f32; 30], ReduceOp::Sum)
        .expect_err("must time out")
        .to_string();
    assert!(t.elapsed() < Duration::from_secs(3));
    let e1 = h.join().unwrap().expect_err("must fail");
    assert!(
        e0.contains("rank 0") && (e0.contains("timed out") || e0.contains("gone")),
        "{e0}"
    );
    assert!(e1.contains("rank 1"), "{e1}");
    assert!(format!("{e0} {e1}").contains('2'), "{e0} / {e1}");
    drop(c2);
}

#[test]
fn panicking_peer_is_named() {
    let mut comms = threads(3, test_cfg());
    let c2 = comms.pop().unwrap();
    let c1 = comms.pop().unwrap();
    let mut c0 = comms.pop().unwrap();
    // Rank 1 panics without calling: its communicator closes during unwinding, skipping the
    // final barrier, and both survivors must name it (rank 2 is not even its ring neighbour
    // on the receiving side).
    let h1 = std::thread::spawn(move || {
        let _c = c1;
        std::thread::sleep(Duration::from_millis(100));
        panic!("rank 1 crashes on purpose");
    });
    let h2 = std::thread::spawn(move || {
        let mut c2 = c2;
        c2.set_algorithm(Algorithm::Ring);
        c2.all_reduce(&mut [1.0f32; 3000], ReduceOp::Sum)
            .map_err(|e| e.to_string())
    });
    c0.set_algorithm(Algorithm::Ring);
    let t = Instant::now();
    let e0 = c0
        .all_reduce(&mut [1.0f32; 3000], ReduceOp::Sum)
        .expect_err("peer crashed")
        .to_string();
    assert!(h1.join().is_err());
    let e2 = h2.join().unwrap().expect_err("peer crashed");
    assert!(e0.contains("peer rank 1 is gone"), "{e0}");
    assert!(
        e2.contains("peer rank 1 is gone") || e2.contains("peer rank 0 is gone"),
        "{e2}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn reference_orders_really_differ() {
    // Guards the suite's sensitivity: with these inputs the ring and tree orders give different
    // bits, so an implementation that summed in another order would fail the bitwise checks.
    let ins: Vec<Vec<f32>> = (0..3).map(|r| common::input(r, 1001, 1)).collect();
    let ring = comm::reference::all_reduce(&ins, ReduceOp::Sum, Algorithm::Ring);
    let tree = comm::reference::all_reduce(&ins, ReduceOp::Sum, Algorithm::Tree);
    let differ = ring
        .iter()
        .zip(&tree)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert!(differ > 10, "only {differ} elements differ");
}

#[test]
fn unused_communicators_drop_at_once() {
    let t = Instant::now();
    drop(threads(4, test_cfg()));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

/// Run `f` on every rank of `n` threads (config with a short timeout); every rank must succeed.
fn all_ranks(
    n: usize,
    timeout: Duration,
    f: impl Fn(&mut dyn Communicator) -> Result<(), String> + Send + Sync + Copy + 'static,
) {
    let cfg = Config {
        timeout,
        ..test_cfg()
    };
    let handles: Vec<_> = threads(n, cfg)
        .into_iter()
        .map(|mut c| std::thread::spawn(move || f(&mut c)))
        .collect();
    let errors: Vec<String> = handles
        .into_iter()
        .filter_map(|h| h.join().expect("rank thread panicked").err())
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn sendrecv_never_deadlocks_with_large_messages() {
    for n in [2, 3] {
        all_ranks(n, Duration::from_secs(10), |c| {
            common::sendrecv_ring(c, 8 << 20)
        });
    }
}

#[test]
fn sendrecv_checks_its_arguments() {
    let mut comms = threads(2, test_cfg());
    let e = comms[0]
        .sendrecv(0, &[1], 1, &mut [0])
        .expect_err("send to self");
    assert!(
        matches!(e, CommError::InvalidArgument { rank: 0, .. }),
        "{e}"
    );
    let e = comms[1]
        .sendrecv(0, &[1], 2, &mut [0])
        .expect_err("rank 2 of 2");
    assert!(e.to_string().contains("receive from rank 2"), "{e}");
}

#[test]
fn groups_progress_independently_in_a_2x2_mesh() {
    let t = Instant::now();
    all_ranks(4, Duration::from_secs(5), |c| {
        common::mesh_2x2(c, 3, 8 << 20)
    });
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn two_groups_on_one_link_keep_their_frames_apart() {
    all_ranks(2, Duration::from_secs(5), |c| common::shared_link_2(c, 3));
}

/// `peer_wait_secs` counts, per collective, the time from entering it until the peer's first
/// frame: a rank that enters 200 ms before its peer waits about 200 ms; the late rank finds the
/// frame there and hardly waits; and the wait is part of the call's time. Ring and tree.
#[test]
fn peer_wait_is_the_time_until_the_late_peer_arrives() {
    const LATE: Duration = Duration::from_millis(200);
    for (algo, elems) in [(Algorithm::Ring, 256 << 10), (Algorithm::Tree, 1024)] {
        let handles: Vec<_> = threads(2, test_cfg())
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    c.set_algorithm(algo);
                    let mut buf = vec![1.0f32; elems];
                    let mut out = Vec::new();
                    for late in [1, 0] {
                        // Both ranks start together, then the late one sleeps.
                        c.barrier().map_err(|e| e.to_string())?;
                        if c.rank() == late {
                            std::thread::sleep(LATE);
                        }
                        let w0 = c.peer_wait_secs().expect("the engine measures waits");
                        let t0 = Instant::now();
                        c.all_reduce(&mut buf, ReduceOp::Sum)
                            .map_err(|e| e.to_string())?;
                        let secs = t0.elapsed().as_secs_f64();
                        let w = c.peer_wait_secs().unwrap() - w0;
                        out.push((c.rank() == late, w, secs));
                    }
                    Ok::<_, String>(out)
                })
            })
            .collect();
        for h in handles {
            for (late, wait, secs) in h.join().expect("rank thread panicked").unwrap() {
                assert!(
                    wait >= 0.0 && wait <= secs + 1e-6,
                    "{algo:?}: {wait} of {secs}"
                );
                if late {
                    assert!(
                        wait < 0.5 * LATE.as_secs_f64(),
                        "{algo:?}: late rank waited {wait}"
                    );
                } else {
                    assert!(
                        wait > 0.8 * LATE.as_secs_f64(),
                        "{algo:?}: early rank waited {wait}"
                    );
                }
            }
        }
    }
    // One rank has no peer to wait for.
    let mut one = threads(1, test_cfg()).pop().unwrap();
    one.all_reduce(&mut [1.0; 16], ReduceOp::Sum).unwrap();
    assert_eq!(one.peer_wait_secs(), Some(0.0));
}
