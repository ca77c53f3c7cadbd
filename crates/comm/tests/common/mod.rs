//! The conformance suite shared by the threads, TCP and shared-memory tests: every algorithm ×
//! operation on awkward sizes, each result hashed so that processes can report it on stdout; and
//! the point-to-point and several-groups-at-once scenarios of a pipeline-parallel mesh.
#![allow(dead_code)]
use comm::{reference, shard_range, Algorithm, Communicator, ReduceOp};

pub fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn hash_f32(x: &[f32]) -> u64 {
    fnv(bytemuck::cast_slice(x))
}

/// Inputs whose sums depend on the order of addition (mixed magnitudes and signs).
pub fn input(rank: usize, len: usize, seed: u64) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let h = fnv(&[
                seed.to_le_bytes(),
                (rank as u64).to_le_bytes(),
                (i as u64).to_le_bytes(),
            ]
            .concat());
            let mant = ((h % 2001) as f32 - 1000.0) / 7.0;
            let exp = ((h >> 20) % 24) as i32 - 12;
            mant * 2f32.powi(exp)
        })
        .collect()
}

/// 16-bit patterns (bf16 / fp16 bits), every value including NaN and infinity patterns: an
/// all-gather must move them unchanged.
pub fn input_u16(rank: usize, len: usize, seed: u64) -> Vec<u16> {
    (0..len)
        .map(|i| {
            (fnv(&[
                seed.to_le_bytes(),
                (rank as u64).to_le_bytes(),
                (i as u64).to_le_bytes(),
            ]
            .concat())
                >> 13) as u16
        })
        .collect()
}

fn hash_u16(x: &[u16]) -> u64 {
    fnv(bytemuck::cast_slice(x))
}

pub fn sizes(n: usize) -> Vec<usize> {
    let mut s = vec![0, 1, n - 1, n + 1, 1001, 70_003];
    s.dedup();
    s
}

const ALGOS: [Algorithm; 3] = [Algorithm::Ring, Algorithm::Tree, Algorithm::Auto];

fn algo_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::Ring => "ring",
        Algorithm::Tree => "tree",
        Algorithm::Auto => "auto",
    }
}

/// What `Auto` resolves to with the test configuration (threshold 64 KiB).
fn resolve(a: Algorithm, len: usize) -> Algorithm {
    match a {
        Algorithm::Auto if len * 4 <= 64 << 10 => Algorithm::Tree,
        Algorithm::Auto => Algorithm::Ring,
        a => a,
    }
}

/// Run every case on this rank; returns (case, hash of this rank's result).
pub fn run_suite(c: &mut dyn Communicator) -> Vec<(String, u64)> {
    let (n, r) = (c.size(), c.rank());
    let mut out = Vec::new();
    for algo in ALGOS {
        c.set_algorithm(algo);
        for len in sizes(n) {
            let tag = format!("{}/{len}", algo_name(algo));
            for (op, name) in [
                (ReduceOp::Sum, "sum"),
                (ReduceOp::Average, "avg"),
                (ReduceOp::Max, "max"),
            ] {
                let mut b = input(r, len, 1);
                c.all_reduce(&mut b, op).expect("all_reduce");
                out.push((format!("all_reduce-{name}/{tag}"), hash_f32(&b)));
            }
            let mut b = input(r, len, 2);
            let mine = c
                .reduce_scatter(&mut b, ReduceOp::Sum)
                .expect("reduce_scatter");
            assert_eq!(mine, shard_range(len, n, r));
            out.push((format!("reduce_scatter/{tag}"), hash_f32(&b[mine])));
            let mut b = input(r, len, 3);
            c.all_gather(&mut b).expect("all_gather");
            out.push((format!("all_gather/{tag}"), hash_f32(&b)));
            let mut h = input_u16(r, len, 7);
            c.all_gather_u16(&mut h).expect("all_gather_u16");
            out.push((format!("all_gather_u16/{tag}"), hash_u16(&h)));
            let root = len % n;
            let mut b = input(r, len, 4);
            c.broadcast(&mut b, root).expect("broadcast");
            out.push((format!("broadcast/{tag}"), hash_f32(&b)));
        }
    }
    // Point to point around the ring, even ranks sending first.
    if n > 1 {
        let msg = fnv_bytes(r, 100_003);
        let mut got = vec![0u8; 100_003];
        let (right, left) = ((r + 1) % n, (r + n - 1) % n);
        if r % 2 == 0 {
            c.send(right, &msg).expect("send");
            c.recv(left, &mut got).expect("recv");
        } else {
            c.recv(left, &mut got).expect("recv");
            c.send(right, &msg).expect("send");
        }
        out.push(("p2p".into(), fnv(&got)));
    }
    c.barrier().expect("barrier");
    // Split into odd and even ranks, in reverse rank order.
    let mut sub = c.split((r % 2) as u32, (n - r) as u32).expect("split");
    let mut b = input(r, 1003, 5);
    sub.set_algorithm(Algorithm::Ring);
    sub.all_reduce(&mut b, ReduceOp::Sum)
        .expect("split all_reduce");
    out.push((
        format!("split/{}of{}", sub.rank(), sub.size()),
        hash_f32(&b),
    ));
    // The parent still works after the split.
    let mut b = input(r, 10, 6);
    c.all_reduce(&mut b, ReduceOp::Sum)
        .expect("all_reduce after split");
    out.push(("after_split".into(), hash_f32(&b)));
    out
}

fn fnv_bytes(r: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (fnv(&[(r as u64).to_le_bytes(), (i as u64).to_le_bytes()].concat()) >> 7) as u8)
        .collect()
}

/// What `run_suite` must return on rank `r` of `n`, computed sequentially.
pub fn expected_suite(n: usize, r: usize) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let all = |len: usize, seed: u64| (0..n).map(|k| input(k, len, seed)).collect::<Vec<_>>();
    for algo in ALGOS {
        for len in sizes(n) {
            let tag = format!("{}/{len}", algo_name(algo));
            let eff = resolve(algo, len);
            for (op, name) in [
                (ReduceOp::Sum, "sum"),
                (ReduceOp::Average, "avg"),
                (ReduceOp::Max, "max"),
            ] {
                out.push((
                    format!("all_reduce-{name}/{tag}"),
                    hash_f32(&reference::all_reduce(&all(len, 1), op, eff)),
                ));
            }
            let full = reference::all_reduce(&all(len, 2), ReduceOp::Sum, eff);
            out.push((
                format!("reduce_scatter/{tag}"),
                hash_f32(&full[shard_range(len, n, r)]),
            ));
            let ins = all(len, 3);
            let gathered: Vec<f32> = (0..n)
                .flat_map(|k| ins[k][shard_range(len, n, k)].to_vec())
                .collect();
            out.push((format!("all_gather/{tag}"), hash_f32(&gathered)));
            let gathered: Vec<u16> = (0..n)
                .flat_map(|k| input_u16(k, len, 7)[shard_range(len, n, k)].to_vec())
                .collect();
            out.push((format!("all_gather_u16/{tag}"), hash_u16(&gathered)));
            out.push((
                format!("broadcast/{tag}"),
                hash_f32(&input(len % n, len, 4)),
            ));
        }
    }
    if n > 1 {
        out.push(("p2p".into(), fnv(&fnv_bytes((r + n - 1) % n, 100_003))));
    }
    let mut members: Vec<usize> = (0..n).filter(|k| k % 2 == r % 2).collect();
    members.sort_by_key(|&k| n - k);
    let me = members.iter().position(|&k| k == r).unwrap_or(0);
    let ins: Vec<Vec<f32>> = members.iter().map(|&k| input(k, 1003, 5)).collect();
    out.push((
        format!("split/{me}of{}", members.len()),
        hash_f32(&reference::all_reduce(&ins, ReduceOp::Sum, Algorithm::Ring)),
    ));
    out.push((
        "after_split".into(),
        hash_f32(&reference::all_reduce(
            &all(10, 6),
            ReduceOp::Sum,
            Algorithm::Tree,
        )),
    ));
    out
}

/// Compare, naming the first mismatching cases.
pub fn assert_suite(n: usize, r: usize, got: &[(String, u64)]) {
    let want = expected_suite(n, r);
    let names = |v: &[(String, u64)]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(got),
        names(&want),
        "rank {r} of {n}: case lists differ"
    );
    let bad: Vec<&String> = got
        .iter()
        .zip(&want)
        .filter(|(g, w)| g.1 != w.1)
        .map(|(g, _)| &g.0)
        .collect();
    assert!(
        bad.is_empty(),
        "rank {r} of {n}: results differ from the sequential reference in {bad:?}"
    );
}

/// Bytes that name their sender, round and position (so a misrouted message is caught).
pub fn pattern(from: usize, round: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64 * 31 + from as u64 * 7 + round as u64 * 13 + (i >> 12) as u64) as u8)
        .collect()
}

/// Small integers, so every summation order gives the same bits.
pub fn small_ints(rank: usize, round: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((rank * 7 + round * 3 + i) % 97) as f32)
        .collect()
}

/// Sleep so that one of two threads of a rank surely enters its first call first.
fn head_start() {
    std::thread::sleep(std::time::Duration::from_millis(100));
}

/// A 2×2 mesh on a world of 4: rank r is stage r / 2, data-parallel index r % 2. A scoped
/// communication thread all-reduces on the data-parallel group (same stage) while this thread
/// exchanges 8 MB messages with the other stage on the pipeline group (same index), `rounds`
/// times. Ranks 0 and 3 start with the collective, ranks 1 and 2 with the exchange: with one lock
/// per process held for a whole call, this order closes a cycle of waits (0 reduce → 1 reduce,
/// blocked by 1's exchange → 3's exchange, blocked by 3's reduce → 2's reduce, blocked by 2's
/// exchange → 0's exchange, blocked by 0's reduce) and every rank times out.
pub fn mesh_2x2(
    world: &mut dyn Communicator,
    rounds: usize,
    p2p_bytes: usize,
) -> Result<(), String> {
    let r = world.rank();
    assert_eq!(world.size(), 4, "mesh_2x2 needs 4 ranks");
    let (stage, d) = (r / 2, r % 2);
    let mut dp = world
        .split(stage as u32, d as u32)
        .map_err(|e| e.to_string())?;
    let mut pp = world
        .split(10 + d as u32, stage as u32)
        .map_err(|e| e.to_string())?;
    world.barrier().map_err(|e| e.to_string())?;
    let collective_first = (stage + d) % 2 == 0;
    std::thread::scope(|s| {
        let comm_thread = s.spawn(move || -> Result<(), String> {
            if !collective_first {
                head_start();
            }
            for round in 0..rounds {
                let len = 256 << 10;
                let mut b = small_ints(r, round, len);
                dp.all_reduce(&mut b, ReduceOp::Sum)
                    .map_err(|e| e.to_string())?;
                let other = stage * 2 + (1 - d);
                let want: Vec<f32> = small_ints(r, round, len)
                    .iter()
                    .zip(small_ints(other, round, len))
                    .map(|(a, b)| a + b)
                    .collect();
                if b != want {
                    return Err(format!(
                        "rank {r}: data-parallel sum of round {round} is wrong"
                    ));
                }
            }
            Ok(())
        });
        if collective_first {
            head_start();
        }
        let peer = 1 - pp.rank();
        let mut got = vec![0u8; p2p_bytes];
        let mut out = Ok(());
        for round in 0..rounds {
            let msg = pattern(r, round, p2p_bytes);
            let res = if stage == 0 {
                pp.send(peer, &msg).and_then(|_| pp.recv(peer, &mut got))
            } else {
                pp.recv(peer, &mut got).and_then(|_| pp.send(peer, &msg))
            };
            if let Err(e) = res {
                out = Err(e.to_string());
                break;
            }
            if got != pattern((1 - stage) * 2 + d, round, p2p_bytes) {
                out = Err(format!(
                    "rank {r}: pipeline message of round {round} is wrong"
                ));
                break;
            }
        }
        let comm = comm_thread
            .join()
            .unwrap_or_else(|_| Err("communication thread panicked".into()));
        out.and(comm)
    })
}

/// Two groups over the same pair of ranks, used at once from two threads of each rank: frames of
/// both groups interleave on one link, and each must reach its own group. Rank 0 starts with the
/// collectives, rank 1 with the exchanges (a one-lock-per-call engine deadlocks on that order).
pub fn shared_link_2(world: &mut dyn Communicator, rounds: usize) -> Result<(), String> {
    let r = world.rank();
    let mut a = world.split(1, 0).map_err(|e| e.to_string())?;
    let mut b = world.split(2, 0).map_err(|e| e.to_string())?;
    world.barrier().map_err(|e| e.to_string())?;
    std::thread::scope(|s| {
        let comm_thread = s.spawn(move || -> Result<(), String> {
            if r == 1 {
                head_start();
            }
            for round in 0..rounds {
                let len = 300_001; // > 1 frame, not a multiple of anything
                let mut x = small_ints(r, round, len);
                a.all_reduce(&mut x, ReduceOp::Sum)
                    .map_err(|e| e.to_string())?;
                let want: Vec<f32> = small_ints(0, round, len)
                    .iter()
                    .zip(small_ints(1, round, len))
                    .map(|(p, q)| p + q)
                    .collect();
                if x != want {
                    return Err(format!("rank {r}: sum of round {round} is wrong"));
                }
            }
            Ok(())
        });
        if r == 0 {
            head_start();
        }
        let mut out = Ok(());
        let len = 3 << 20;
        let mut got = vec![0u8; len];
        for round in 0..rounds {
            if let Err(e) = b.sendrecv(1 - r, &pattern(r, round, len), 1 - r, &mut got) {
                out = Err(e.to_string());
                break;
            }
            if got != pattern(1 - r, round, len) {
                out = Err(format!("rank {r}: exchange of round {round} is wrong"));
                break;
            }
        }
        let comm = comm_thread
            .join()
            .unwrap_or_else(|_| Err("communication thread panicked".into()));
        out.and(comm)
    })
}

/// `sendrecv` around the ring (to the right, from the left) and, with 2 ranks, to and from the
/// same peer, with messages far larger than any socket or ring buffer; every rank at once.
pub fn sendrecv_ring(c: &mut dyn Communicator, bytes: usize) -> Result<(), String> {
    let (n, r) = (c.size(), c.rank());
    let (right, left) = ((r + 1) % n, (r + n - 1) % n);
    let mut got = vec![0u8; bytes];
    for round in 0..2 {
        c.sendrecv(right, &pattern(r, round, bytes), left, &mut got)
            .map_err(|e| e.to_string())?;
        if got != pattern(left, round, bytes) {
            return Err(format!(
                "rank {r}: sendrecv round {round} got the wrong bytes"
            ));
        }
    }
    // f32 convenience, the other direction.
    let xs = small_ints(r, 9, bytes / 4);
    let mut ys = vec![0.0f32; bytes / 4];
    c.sendrecv_f32(left, &xs, right, &mut ys)
        .map_err(|e| e.to_string())?;
    if ys != small_ints(right, 9, bytes / 4) {
        return Err(format!("rank {r}: sendrecv_f32 got the wrong floats"));
    }
    Ok(())
}
