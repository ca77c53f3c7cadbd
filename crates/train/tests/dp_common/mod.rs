//! Helpers of the data-parallel equivalence tests (`dp_equivalence.rs`): tiny configs, ranks as
//! threads over the in-process transport (ring, ZeRO, parameter server), and the comparisons.
#![allow(dead_code)]

pub use std::path::{Path, PathBuf};
pub use std::sync::{Arc, Mutex};
pub use train::dp::{Dp, Role, ZeroStage};
pub use train::{run, Quiet, RunOptions, RunSummary, TrainConfig, TrainError};

pub fn tmp(name: &str) -> PathBuf {
    crate::common::tmp("dp", name)
}

/// The trainer tests' tiny model with 4 sequences per rank, 1 thread per rank.
pub fn tiny(steps: u64) -> TrainConfig {
    let mut c = crate::common::tiny(steps);
    c.train.batch_size = 4;
    c.train.threads = 1;
    c.train.eval_every = 10;
    c
}

pub fn comm_cfg() -> comm::Config {
    comm::Config {
        timeout: std::time::Duration::from_secs(5),
        ..Default::default()
    }
}

pub fn opts(dir: &Path, dp: Option<Dp>) -> RunOptions {
    RunOptions {
        out_dir: dir.to_path_buf(),
        dp: dp.map(|d| Arc::new(Mutex::new(d))),
        ..Default::default()
    }
}

pub fn single(cfg: &TrainConfig, name: &str) -> RunSummary {
    run(cfg, &opts(&tmp(name), None), &mut Quiet).unwrap()
}

/// `n` ring ranks as threads; `per_rank` adjusts rank r's config and options.
pub fn ring_ranks(
    n: usize,
    zero: ZeroStage,
    cfg: &TrainConfig,
    dir: &Path,
    per_rank: impl Fn(usize, &mut TrainConfig, &mut RunOptions) + Sync,
) -> Vec<Result<RunSummary, TrainError>> {
    ranks_with(n, cfg, dir, |c| Dp::ring(Box::new(c), zero), per_rank)
}

/// `n` ranks as threads, each with the `Dp` that `make` builds on its communicator.
pub fn ranks_with(
    n: usize,
    cfg: &TrainConfig,
    dir: &Path,
    make: impl Fn(comm::Comm) -> Dp + Sync,
    per_rank: impl Fn(usize, &mut TrainConfig, &mut RunOptions) + Sync,
) -> Vec<Result<RunSummary, TrainError>> {
    let comms = comm::threads(n, comm_cfg());
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, c)| {
                let (mut cfg, per_rank, make) = (cfg.clone(), &per_rank, &make);
                s.spawn(move || {
                    let mut o = opts(dir, Some(make(c)));
                    per_rank(r, &mut cfg, &mut o);
                    run(&cfg, &o, &mut Quiet)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// `n` ring ranks with gradient buckets of `bucket_bytes`, reduced during backward or after it.
pub fn ring_buckets(
    n: usize,
    zero: ZeroStage,
    (bucket_bytes, overlap): (usize, bool),
    cfg: &TrainConfig,
    name: &str,
) -> Vec<RunSummary> {
    let make = |c| Dp::ring(Box::new(c), zero).with_buckets(bucket_bytes, overlap);
    ranks_with(n, cfg, &tmp(name), make, |_, _, _| {})
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

pub fn ring(n: usize, zero: ZeroStage, cfg: &TrainConfig, name: &str) -> Vec<RunSummary> {
    ring_ranks(n, zero, cfg, &tmp(name), |_, _, _| {})
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

pub fn ps(workers: usize, servers: usize, cfg: &TrainConfig, name: &str) -> Vec<RunSummary> {
    ps_mode(workers, servers, comm::ps::PsMode::Sync, cfg, name)
}

pub fn ps_mode(
    workers: usize,
    servers: usize,
    mode: comm::ps::PsMode,
    cfg: &TrainConfig,
    name: &str,
) -> Vec<RunSummary> {
    let dir = tmp(name);
    let comms = comm::threads(workers + servers, comm_cfg());
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let (cfg, dir) = (cfg.clone(), &dir);
                s.spawn(
                    move || match Dp::parameter_server(c, servers, mode).unwrap() {
                        Role::Worker(d) => {
                            Some(run(&cfg, &opts(dir, Some(d)), &mut Quiet).unwrap())
                        }
                        Role::Server(mut srv) => {
                            assert_eq!(srv.serve().unwrap(), cfg.train.steps);
                            None
                        }
                    },
                )
            })
            .collect();
        hs.into_iter().filter_map(|h| h.join().unwrap()).collect()
    })
}

pub fn losses(s: &RunSummary) -> Vec<f32> {
    s.records.iter().map(|r| r.loss).collect()
}

pub fn assert_ranks_equal(rs: &[RunSummary]) {
    for r in &rs[1..] {
        assert_eq!(r.params, rs[0].params, "ranks ended with different weights");
        assert_eq!(losses(r), losses(&rs[0]));
    }
}

/// `a`'s step records against `b` (the same steps) and its final weights against `b_params`:
/// the first loss bitwise, every loss within 1e-4 relative, the learning rates equal, the
/// weights within 1e-3.
#[track_caller]
pub fn assert_steps_close(a: &RunSummary, b: &[train::StepRecord], b_params: &[f32], what: &str) {
    assert_eq!(a.records.len(), b.len(), "{what}: steps");
    assert_eq!(a.records[0].step, b[0].step, "{what}: first step");
    assert_eq!(a.records[0].loss, b[0].loss, "{what}: first loss");
    for (x, y) in a.records.iter().zip(b) {
        assert!(
            ((x.loss - y.loss) / y.loss).abs() < 1e-4,
            "{what}: step {} loss {} vs {}",
            x.step,
            x.loss,
            y.loss
        );
        assert_eq!(x.lr, y.lr);
    }
    let worst = a
        .params
        .iter()
        .zip(b_params)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0f32, f32::max);
    eprintln!("{what}: parameters differ by up to {worst}");
    assert!(worst < 1e-3, "{what}: parameters differ by up to {worst}");
}

#[track_caller]
pub fn assert_close(a: &RunSummary, b: &RunSummary, what: &str) {
    assert_steps_close(a, &b.records, &b.params, what);
    // Training moved the weights far more than the tolerance.
    assert!(losses(a)[19] < losses(a)[0] - 0.3, "{what}: did not learn");
}
