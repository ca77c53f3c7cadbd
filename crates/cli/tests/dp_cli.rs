//! Data-parallel training as real processes over loopback TCP: `scaletrain launch -- scaletrain
//! train --dp 2`, the self-launching `train --dp 2 --grad-sync ps`, a killed rank, bad layouts.

use std::path::{Path, PathBuf};

const BIN: &str = env!("CARGO_BIN_EXE_scaletrain");

mod common;

fn run(args: &[&str]) -> (i32, String, String) {
    common::run_env(args, &[("SCALETRAIN_COMM_TIMEOUT_SECS", "10")])
}

fn tmp(name: &str) -> PathBuf {
    common::tmp_dir("dp", name)
}

/// The shared tiny model with this file's evaluation interval and corpus size.
fn tiny() -> Vec<&'static str> {
    common::tiny_with(&[
        "--set",
        "train.eval_every=5",
        "--set",
        "data.synthetic.train_tokens=20000",
        "--threads",
        "1",
    ])
}

fn losses(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v.get("loss").map(|x| x.to_string())
        })
        .collect()
}

#[test]
fn launch_dp2_ring_and_self_launched_ps_train_the_same_model() {
    let d = tmp("ring");
    let ring = d.join("ring");
    let mut args = vec![
        "launch",
        "--nproc-per-node",
        "2",
        "--",
        BIN,
        "train",
        "--dp",
        "2",
    ];
    args.extend_from_slice(&["--out", ring.to_str().unwrap(), "--steps", "10"]);
    args.extend(tiny());
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("[rank 0] done: 10 steps"), "{out}");
    assert!(out.contains("[rank 1] done: 10 steps"), "{out}");
    assert!(out.contains("data parallel: 2 ranks"), "{out}");
    assert!(ring.join("step-00000010.json").exists());
    // The time in collectives splits into waiting for the other rank and transfer.
    let (comm, wait) = common::assert_wait_within_comm(&ring, 10);
    eprintln!(
        "dp 2 ring: {:.2} ms in collectives per step, {:.2} ms of it waiting",
        1e3 * comm,
        1e3 * wait
    );
    assert!(out.contains("waiting for the other ranks"), "{out}");

    let ps = d.join("ps");
    let mut args = vec!["train", "--dp", "2", "--grad-sync", "ps", "--servers", "1"];
    args.extend_from_slice(&["--out", ps.to_str().unwrap(), "--steps", "10"]);
    args.extend(tiny());
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("parameter server: served 10 steps"), "{out}");
    // The parameter server's push and pull do not split their time.
    assert!(common::comm_and_wait(&ps).iter().all(|x| x.1.is_none()));
    let (lr, lp) = (losses(&ring), losses(&ps));
    assert_eq!(lr.len(), 10);
    assert_eq!(
        lr, lp,
        "synchronous PS must reproduce the ring run bit for bit"
    );
}

#[test]
fn launch_passes_flags_to_train_and_its_hints_say_how() {
    let d = tmp("launch-flags");
    let out = d.join("run");
    let o = out.to_str().unwrap();
    let launch = ["launch", "--nproc-per-node", "2", "--"];
    let mut args = launch.to_vec();
    args.extend_from_slice(&["--out", o, "--steps", "2"]);
    args.extend(tiny());
    let (code, stdout, err) = run(&args);
    assert_eq!(code, 0, "{stdout}\n{err}");
    assert!(stdout.contains("[rank 0] done: 2 steps"), "{stdout}");
    assert!(out.join("step-00000002.json").exists());

    // The same launch again is refused, and the hint says how to pass train's flags via launch.
    let (code, stdout, err) = run(&args);
    assert_eq!(code, 2, "{stdout}\n{err}");
    assert!(
        err.contains("already holds checkpoints (newest: step 2)"),
        "{err}"
    );
    for s in [
        "scaletrain launch -- --resume",
        "scaletrain launch -- --overwrite",
        "scaletrain launch -- --out DIR",
    ] {
        assert!(err.contains(s), "missing {s}:\n{err}");
    }
    assert!(!err.contains("pass --resume"), "train's phrasing: {err}");
    assert!(!out.join("step-00000004.json").exists());

    // Following the hint continues the run.
    let mut resume = launch.to_vec();
    resume.extend_from_slice(&["--resume", "--out", o, "--steps", "4"]);
    resume.extend(tiny());
    let (code, stdout, err) = run(&resume);
    assert_eq!(code, 0, "{stdout}\n{err}");
    assert!(stdout.contains("resuming at step 2"), "{stdout}");
    assert!(out.join("step-00000004.json").exists());

    // Launch sets --dp itself.
    let (code, _, err) = run(&["launch", "--", "--dp", "3", "--out", o]);
    assert_eq!(code, 2);
    assert!(err.contains("--dp after `--`"), "{err}");
}

#[test]
fn a_killed_rank_stops_the_job_with_a_clear_error_and_the_checkpoint_survives() {
    let d = tmp("kill");
    let out_dir = d.join("run");
    let o = out_dir.to_str().unwrap().to_string();
    let tiny = tiny().join(" ");
    let script = format!(
        "if [ \"$RANK\" = 1 ]; then exec timeout -s KILL 3 {BIN} train --dp 2 --out {o} --steps 1000000 --set train.checkpoint_every=20 {tiny}; \
         else exec {BIN} train --dp 2 --out {o} --steps 1000000 --set train.checkpoint_every=20 {tiny}; fi"
    );
    let (code, out, err) = run(&["launch", "--nproc-per-node", "2", "--", "sh", "-c", &script]);
    assert_ne!(code, 0, "{out}\n{err}");
    assert!(err.contains("rank 1"), "{err}");
    let ckpts = train::checkpoint::list(&out_dir);
    assert!(
        !ckpts.is_empty(),
        "no checkpoint was written before the kill"
    );
    train::checkpoint::load(&ckpts[0].1).expect("the newest checkpoint is intact");
}

#[test]
fn bad_layouts_are_refused_with_the_arithmetic() {
    let d = tmp("layout");
    let o = d.join("x");
    let mut args = vec!["train", "--dp", "2", "--global-batch", "10"];
    args.extend_from_slice(&["--out", o.to_str().unwrap()]);
    args.extend(tiny());
    let (code, _, err) = run(&args);
    assert_ne!(code, 0);
    assert!(
        err.contains("--global-batch 10 is not a multiple of dp(2) × batch_size(4) = 8"),
        "{err}"
    );
    let (code, _, err) = run(&[
        "train",
        "--dp",
        "2",
        "--zero",
        "4",
        "--out",
        o.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("--zero 4: expected 0, 1, 2 or 3"), "{err}");
    let (code, _, err) = run(&[
        "train",
        "--dp",
        "2",
        "--grad-sync",
        "ps",
        "--zero",
        "1",
        "--out",
        o.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("needs --grad-sync ring"), "{err}");
    // MPI's ranks come from mpirun; train does not start them itself.
    let (code, _, err) = run(&[
        "train",
        "--dp",
        "2",
        "--grad-sync",
        "mpi",
        "--out",
        o.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--grad-sync mpi: start the ranks with mpirun (mpirun -n 2 scaletrain train"),
        "{err}"
    );
    assert!(!o.exists(), "nothing was written");
}

#[test]
fn zero_checkpoints_are_sharded_and_resume_at_another_dp_keeps_the_global_batch() {
    let d = tmp("reshard");
    let out = d.join("run");
    let o = out.to_str().unwrap();
    let mut args = vec!["train", "--dp", "2", "--zero", "1", "--out", o];
    args.extend_from_slice(&["--steps", "6", "--stop-after", "3"]);
    args.extend(tiny());
    let (code, stdout, err) = run(&args);
    assert_eq!(code, 0, "{stdout}\n{err}");
    for r in 0..2 {
        let f = format!("step-00000003.optim-rank-{r}-of-2.safetensors");
        assert!(out.join(&f).exists(), "{f} missing");
    }
    // One rank keeping grad_accum 1 would halve the global batch: refused, with the fix.
    let mut args = vec!["train", "--out", o, "--steps", "6", "--resume"];
    args.extend_from_slice(&["--set", "train.grad_accum=1"]);
    args.extend(tiny());
    let (code, _, err) = run(&args);
    assert_ne!(code, 0);
    assert!(
        err.contains("global batch") && err.contains("--global-batch 8"),
        "{err}"
    );
    // Without an explicit grad_accum, the global batch is kept: grad_accum 2 at dp 1.
    let mut args = vec!["train", "--out", o, "--steps", "6", "--resume"];
    args.extend(tiny());
    let (code, stdout, err) = run(&args);
    assert_eq!(code, 0, "{stdout}\n{err}");
    assert!(
        stdout.contains("train.grad_accum = 2 keeps") && stdout.contains("resuming at step 3"),
        "{stdout}"
    );
    assert_eq!(losses(&out).len(), 6);
    assert!(out.join("step-00000006.state.safetensors").exists());
}

/// ZeRO-2 over two real processes: every step records its wait for the other rank within its
/// time in collectives, and the trace draws each wait inside its bucket's collective, at its
/// start.
#[test]
fn zero2_splits_waiting_from_transfer_in_metrics_and_trace() {
    let d = tmp("wait");
    let out = d.join("z2");
    let trace = d.join("trace.json");
    let mut args = vec!["train", "--dp", "2", "--zero", "2", "--steps", "6"];
    args.extend_from_slice(&["--out", out.to_str().unwrap()]);
    args.extend_from_slice(&["--trace", trace.to_str().unwrap()]);
    args.extend(tiny());
    let (code, stdout, err) = run(&args);
    assert_eq!(code, 0, "{stdout}\n{err}");
    common::assert_wait_within_comm(&out, 6);
    let line = stdout
        .lines()
        .find(|l| l.contains("communication: predicted transfer"))
        .unwrap_or_else(|| panic!("no communication line:\n{stdout}"));
    assert!(line.contains("+ waiting for the other ranks"), "{line}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let ev = v["traceEvents"].as_array().unwrap();
    for pid in 0..2 {
        let spans: Vec<(&str, f64, f64)> = ev
            .iter()
            .filter(|e| e["pid"] == pid && e["ph"] == "X" && e["cat"] == "dp")
            .map(|e| {
                let ts = e["ts"].as_f64().unwrap();
                (
                    e["name"].as_str().unwrap(),
                    ts,
                    ts + e["dur"].as_f64().unwrap(),
                )
            })
            .collect();
        let buckets: Vec<_> = spans
            .iter()
            .filter(|s| s.0.starts_with("bucket "))
            .collect();
        assert!(buckets.len() >= 6, "rank {pid}: {spans:?}");
        for w in spans
            .iter()
            .filter(|s| s.0 == "waiting for the other ranks")
        {
            let b = buckets
                .iter()
                .find(|b| (b.1 - w.1).abs() < 1.0)
                .unwrap_or_else(|| panic!("rank {pid}: a wait at no bucket's start: {w:?}"));
            assert!(w.2 <= b.2 + 1.0, "rank {pid}: wait {w:?} outlasts {b:?}");
        }
    }
}

/// The communication settings from the environment are checked: a bad value stops the job with
/// the variable's name, and a good one trains (a run without the yield phase of the poll).
#[test]
fn comm_environment_variables_are_checked() {
    let dir = tmp("spin-env");
    let out = dir.join("run");
    let mut args = vec![
        "train",
        "--dp",
        "2",
        "--steps",
        "2",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(tiny());
    let (code, stdout, stderr) = common::run_env(&args, &[("SCALETRAIN_COMM_SPIN_US", "lots")]);
    assert_ne!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("SCALETRAIN_COMM_SPIN_US") && stderr.contains("microseconds"),
        "{stderr}"
    );
    let (code, stdout, stderr) = common::run_env(&args, &[("SCALETRAIN_COMM_SPIN_US", "20")]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
