//! The conformance suite shared by the threads, TCP and shared-memory tests: every algorithm ×
//! operation on awkward sizes, each result hashed so that processes can report it on stdout.
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
