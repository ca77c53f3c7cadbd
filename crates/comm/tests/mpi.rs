//! The MPI transport under `mpirun` (see `.ci/mpi-tests.sh`). Inputs are small integers, so every
//! summation order gives the same bits and results can be compared exactly. Without `mpirun` it
//! runs as a single MPI process.
#![cfg(feature = "mpi")]
mod common;
use comm::mpi_comm::MpiComm;
use comm::{shard_range, Communicator, ReduceOp};

fn input(rank: usize, len: usize, seed: u64) -> Vec<f32> {
    (0..len)
        .map(|i| (((rank as u64 + 1) * 7919 + i as u64 * 104_729 + seed * 31) % 201) as f32 - 100.0)
        .collect()
}

fn check(c: &mut dyn Communicator) {
    let (n, r) = (c.size(), c.rank());
    for len in [0, 1, n.saturating_sub(1), n + 1, 1001, 70_003] {
        let all: Vec<Vec<f32>> = (0..n).map(|k| input(k, len, 1)).collect();
        let sum: Vec<f32> = (0..len).map(|i| all.iter().map(|x| x[i]).sum()).collect();
        let mut b = input(r, len, 1);
        c.all_reduce(&mut b, ReduceOp::Sum).unwrap();
        assert_eq!(b, sum, "all_reduce sum, len {len}");
        let mut b = input(r, len, 1);
        c.all_reduce(&mut b, ReduceOp::Average).unwrap();
        assert_eq!(
            b,
            sum.iter().map(|s| s / n as f32).collect::<Vec<_>>(),
            "average, len {len}"
        );
        let mut b = input(r, len, 1);
        c.all_reduce(&mut b, ReduceOp::Max).unwrap();
        let max: Vec<f32> = (0..len)
            .map(|i| all.iter().map(|x| x[i]).fold(f32::MIN, f32::max))
            .collect();
        assert_eq!(b, max, "max, len {len}");
        let mut b = input(r, len, 1);
        let mine = c.reduce_scatter(&mut b, ReduceOp::Sum).unwrap();
        assert_eq!(mine, shard_range(len, n, r));
        assert_eq!(b[mine.clone()], sum[mine], "reduce_scatter, len {len}");
        let mut b = input(r, len, 2);
        c.all_gather(&mut b).unwrap();
        let want: Vec<f32> = (0..n)
            .flat_map(|k| input(k, len, 2)[shard_range(len, n, k)].to_vec())
            .collect();
        assert_eq!(b, want, "all_gather, len {len}");
        let root = len % n;
        let mut b = input(r, len, 3);
        c.broadcast(&mut b, root).unwrap();
        assert_eq!(b, input(root, len, 3), "broadcast, len {len}");
    }
    if n > 1 {
        let msg = vec![r as u8; 100_003];
        let mut got = vec![0u8; 100_003];
        let (right, left) = ((r + 1) % n, (r + n - 1) % n);
        if r % 2 == 0 {
            c.send(right, &msg).unwrap();
            c.recv(left, &mut got).unwrap();
        } else {
            c.recv(left, &mut got).unwrap();
            c.send(right, &msg).unwrap();
        }
        assert!(got.iter().all(|&x| x as usize == left));
    }
    c.barrier().unwrap();
    let mut sub = c.split((r % 2) as u32, (n - r) as u32).unwrap();
    let members: Vec<usize> = (0..n).rev().filter(|k| k % 2 == r % 2).collect();
    assert_eq!(sub.size(), members.len());
    assert_eq!(members[sub.rank()], r, "split orders by key");
    let mut b = vec![r as f32; 10];
    sub.all_reduce(&mut b, ReduceOp::Sum).unwrap();
    assert_eq!(b[0], members.iter().sum::<usize>() as f32);
}

/// One test function: MPI is initialised once per process.
#[test]
fn mpi_collectives_match_sequential_results() {
    let mut c = MpiComm::init().expect("MPI init");
    check(&mut c);
    if c.size() > 1 {
        // MPI_Sendrecv with 8 MB both ways around the ring.
        common::sendrecv_ring(&mut c, 8 << 20).unwrap();
    }
    if c.size() == 2 {
        assert!(
            c.concurrent(),
            "Open MPI should provide MPI_THREAD_MULTIPLE"
        );
        common::shared_link_2(&mut c, 3).unwrap();
    }
    if c.size() == 4 {
        // Two threads per rank on two groups at once: needs MPI_THREAD_MULTIPLE.
        common::mesh_2x2(&mut c, 3, 8 << 20).unwrap();
    }
    // The flight recorder numbered the world's collectives on every rank alike, and dumps.
    let recs = c.flight_recorder().records();
    let world_calls: Vec<u64> = recs
        .iter()
        .filter(|r| r.group == 0 && r.op != "send/recv")
        .map(|r| r.call)
        .collect();
    assert!(world_calls.len() > 20 && world_calls.windows(2).all(|w| w[1] == w[0] + 1));
    assert!(recs.iter().all(|r| r.status == "ok"), "{recs:?}");
    let dir = std::env::temp_dir().join(format!("scaletrain-mpi-flight-{}", std::process::id()));
    comm::flight::set_dump_dir(Some(dir.clone()));
    let written: Vec<_> = comm::flight::dump_all("test").into_iter().collect();
    assert_eq!(written.len(), 1);
    let dump = comm::flight::read_dump(written[0].as_ref().unwrap()).unwrap();
    assert_eq!(dump.header.rank, c.rank());
    assert!(comm::flight::diagnose(&[dump]).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
    println!("mpi: rank {} of {} passed", c.rank(), c.size());
}
