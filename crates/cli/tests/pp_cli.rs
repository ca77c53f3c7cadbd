//! Pipeline-parallel training as real processes over loopback TCP (`train --pp N` launches its
//! own ranks): every layout against the one-process run with the same global batch, resume
//! within a layout and at another one, and bad layouts.
//!
//! Tolerance: the runs are not bitwise equal to one process. Every layer's gradient is (the
//! same kernels on the same inputs), but the tied embedding's gradient is summed in another
//! order — one process adds the LM head's and the embedding's contribution per micro-batch,
//! a pipeline sums each over all micro-batches on its own stage and then adds the two — and
//! the gradient norm is summed per stage. Both are f32/f64 rounding; we require 1e-6 relative
//! on every step's loss (observed: up to 6e-8 over 20 steps).

use std::path::Path;

mod common;

fn run(args: &[&str]) -> (i32, String, String) {
    common::run_env(args, &[("SCALETRAIN_COMM_TIMEOUT_SECS", "20")])
}

fn tmp(name: &str) -> common::TempDir {
    common::TempDir::new("pp", name)
}

/// A 4-layer model (so 2 and 4 stages split it evenly), 20 steps.
fn model(layers: &'static str) -> Vec<&'static str> {
    vec![
        "--set",
        layers,
        "--set",
        "model.channels=32",
        "--set",
        "model.n_head=2",
        "--set",
        "model.seq_len=16",
        "--set",
        "train.batch_size=2",
        "--set",
        "train.eval_every=10",
        "--set",
        "train.eval_batches=2",
        "--set",
        "data.synthetic.train_tokens=20000",
        "--set",
        "data.synthetic.val_tokens=1000",
        "--threads",
        "1",
        "--no-progress",
    ]
}

/// Trains into `dir` with `extra` flags; returns (loss per step, validation losses).
fn train(dir: &Path, layers: &'static str, steps: &str, extra: &[&str]) -> (Vec<f64>, Vec<f64>) {
    let mut args = vec!["train", "--out", dir.to_str().unwrap(), "--steps", steps];
    args.extend(model(layers));
    args.extend_from_slice(extra);
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{args:?}\n{out}\n{err}");
    // Every rank's start report: the buffers allocated are the predicted ones (to 0.1 MiB; the
    // exact check is train's pipeline_memory test), ZeRO-1's sharded AdamW included.
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("predicted (plan::cpu_runtime):"))
        .collect();
    assert!(!lines.is_empty(), "no memory line:\n{out}");
    for l in lines {
        let w: Vec<&str> = l.split_whitespace().collect();
        let after = |k: &str| w[w.iter().position(|x| *x == k).unwrap() + 1];
        assert_eq!(
            after("(plan::cpu_runtime):"),
            after("allocated:"),
            "{args:?}: {l}"
        );
    }
    common::read_losses(dir)
}

#[test]
fn every_pipeline_layout_trains_the_one_process_model() {
    let d = tmp("layouts");
    let base = train(
        &d.path().join("one"),
        "model.n_layer=4",
        "20",
        &["--set", "train.grad_accum=4"],
    );
    assert_eq!(base.0.len(), 20);
    let layouts: &[(&str, &[&str])] = &[
        ("pp2-1f1b", &["--pp", "2", "--microbatches", "4"]),
        (
            "pp2-gpipe",
            &["--pp", "2", "--microbatches", "4", "--schedule", "gpipe"],
        ),
        (
            "pp3-uneven",
            &["--pp", "3", "--microbatches", "4", "--pp-layers", "1,2,1"],
        ),
        ("pp4-1f1b", &["--pp", "4", "--microbatches", "4"]),
        (
            "pp2-interleaved",
            &[
                "--pp",
                "2",
                "--vpp",
                "2",
                "--schedule",
                "interleaved",
                "--microbatches",
                "4",
            ],
        ),
        (
            "dp2-pp2",
            &["--dp", "2", "--pp", "2", "--microbatches", "2"],
        ),
        // Data parallelism over interleaved chunks (gradients reduced after the step's list).
        (
            "dp2-pp2-interleaved",
            &[
                "--dp",
                "2",
                "--pp",
                "2",
                "--vpp",
                "2",
                "--schedule",
                "interleaved",
                "--microbatches",
                "2",
            ],
        ),
        // ZeRO-1 in a pipeline: optimizer state sharded over dp within each stage.
        (
            "dp2-pp2-zero1",
            &[
                "--dp",
                "2",
                "--pp",
                "2",
                "--microbatches",
                "2",
                "--zero",
                "1",
            ],
        ),
    ];
    for (name, flags) in layouts {
        let got = train(&d.path().join(name), "model.n_layer=4", "20", flags);
        common::assert_close(name, &base.0, &got.0, 1e-6);
        common::assert_close(&format!("{name} validation"), &base.1, &got.1, 1e-6);
    }
}

#[test]
fn five_layers_on_two_stages() {
    let d = tmp("uneven");
    let base = train(
        &d.path().join("one"),
        "model.n_layer=5",
        "20",
        &["--set", "train.grad_accum=4"],
    );
    let got = train(
        &d.path().join("pp2"),
        "model.n_layer=5",
        "20",
        &["--pp", "2", "--microbatches", "4", "--pp-layers", "2,3"],
    );
    common::assert_close("5 layers as 2+3", &base.0, &got.0, 1e-6);
    // Without --pp-layers the planner balances: the last stage also runs the LM head.
    let dir = d.path().join("balanced");
    let trace = d.path().join("trace.json");
    let mut args = vec!["train", "--out", dir.to_str().unwrap(), "--steps", "2"];
    args.extend(model("model.n_layer=5"));
    args.extend([
        "--pp",
        "2",
        "--microbatches",
        "2",
        "--trace",
        trace.to_str().unwrap(),
    ]);
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("layers per stage 3+2"), "{out}");
    // The report's wait: measured, simulated with the run's own stage times and with the
    // predicted ones, and the schedule's bubble for equal stages, (p − 1)/(m + p − 1) = 1/3.
    let line = out
        .lines()
        .find(|l| l.contains("pipeline: stage 0 of 2 waited"))
        .unwrap_or_else(|| panic!("no pipeline wait line in\n{out}"));
    let pcts: Vec<f64> = line
        .split('%')
        .filter_map(|s| s.rsplit([' ', '(']).next()?.parse().ok())
        .collect();
    assert_eq!(pcts.len(), 4, "{line}");
    assert!(pcts.iter().all(|p| (0.0..100.0).contains(p)), "{line}");
    assert_eq!(pcts[3], 33.3, "{line}");
    // The trace: both ranks, a forward and a backward per micro-batch and step, the exchanges.
    let text = std::fs::read_to_string(&trace).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ev = v["traceEvents"].as_array().unwrap();
    for pid in 0..2 {
        let names: Vec<&str> = ev
            .iter()
            .filter(|e| e["pid"] == pid && e["ph"] == "X")
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        for op in ["F0", "F1", "B0", "B1"] {
            let n = names.iter().filter(|&&x| x == op).count();
            assert_eq!(n, 2, "rank {pid}: {op} in {names:?}");
        }
        assert!(
            names.iter().any(|n| n.contains("recv")),
            "rank {pid}: {names:?}"
        );
        assert!(names.contains(&"clip + AdamW"), "rank {pid}");
    }
}

#[test]
fn resume_is_bit_exact_within_a_layout_and_reshards_across_layouts() {
    let d = tmp("resume");
    let pp2 = ["--pp", "2", "--microbatches", "4"];
    let straight = train(&d.path().join("straight"), "model.n_layer=4", "20", &pp2);
    // Interrupted after 10 steps, then resumed with the same layout: the same bits.
    let part = d.path().join("part");
    train(&part, "model.n_layer=4", "10", &pp2);
    let mut resumed: Vec<&str> = pp2.to_vec();
    resumed.push("--resume");
    let again = train(&part, "model.n_layer=4", "20", &resumed);
    assert_eq!(straight.0, again.0, "losses after a pp=2 resume");
    let w = |dir: &Path, s: usize| {
        std::fs::read(dir.join(format!("step-00000020.stage-{s}-of-2.safetensors"))).unwrap()
    };
    assert_eq!(
        w(&d.path().join("straight"), 0),
        w(&part, 0),
        "stage 0 weights"
    );
    assert_eq!(
        w(&d.path().join("straight"), 1),
        w(&part, 1),
        "stage 1 weights"
    );
    // The same checkpoint resumed as one process, and as dp 2 × pp 2: the global batch is
    // kept, the weights and AdamW state re-shard; the losses follow the pp=2 run to rounding.
    for (name, flags) in [
        ("as-one", vec!["--resume", "--set", "train.grad_accum=4"]),
        ("as-dp2-pp2", vec!["--resume", "--dp", "2", "--pp", "2"]),
    ] {
        let dir = d.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(&part).unwrap().flatten() {
            let n = e.file_name();
            if n.to_string_lossy().starts_with("step-00000010")
                || n == "metrics.jsonl"
                || n == "config.toml"
            {
                std::fs::copy(e.path(), dir.join(&n)).unwrap();
            }
        }
        let got = train(&dir, "model.n_layer=4", "20", &flags);
        common::assert_close(name, &straight.0, &got.0, 1e-6);
    }
}

#[test]
fn bad_pipeline_layouts_are_refused_with_the_arithmetic() {
    let d = tmp("bad");
    let out = d.path().join("x");
    let try_ = |extra: &[&str]| {
        let mut args = vec!["train", "--out", out.to_str().unwrap(), "--steps", "1"];
        args.extend(model("model.n_layer=5"));
        args.extend_from_slice(extra);
        let (code, o, e) = run(&args);
        assert_eq!(code, 2, "{extra:?}: {o}\n{e}");
        e
    };
    let e = try_(&["--pp", "2", "--pp-layers", "2,2"]);
    assert!(e.contains("2 + 2 = 4, but the model has 5 layers"), "{e}");
    let e = try_(&["--pp", "6", "--microbatches", "2"]);
    assert!(e.contains("no layers"), "{e}");
    let e = try_(&["--pp", "0"]);
    assert!(e.contains("--pp must be at least 1"), "{e}");
    let e = try_(&["--pp", "2", "--pp-layers", "2,3", "--schedule", "zigzag"]);
    assert!(e.contains("unknown schedule"), "{e}");
    let e = try_(&["--pp", "2", "--pp-layers", "2,3", "--zero", "2"]);
    assert!(
        e.contains("--zero 2 with --pp 2") && e.contains("use --zero 1"),
        "{e}"
    );
    let e = try_(&[
        "--pp",
        "2",
        "--vpp",
        "2",
        "--zero",
        "1",
        "--microbatches",
        "2",
    ]);
    assert!(e.contains("ZeRO over interleaved chunks"), "{e}");
    let e = try_(&["--pp-layers", "2,3"]);
    assert!(e.contains("--pp-layers needs --pp > 1"), "{e}");
}

#[test]
fn zero1_pipeline_checkpoints_resume_bit_exact_and_as_one_process() {
    let d = tmp("zero1");
    let zero1: &[&str] = &[
        "--dp",
        "2",
        "--pp",
        "2",
        "--microbatches",
        "2",
        "--zero",
        "1",
    ];
    let straight = train(&d.path().join("straight"), "model.n_layer=4", "20", zero1);
    // Interrupted after 10 steps and resumed in the same layout: the same bits (each rank's
    // AdamW ranges come back from its own file).
    let part = d.path().join("part");
    train(&part, "model.n_layer=4", "10", zero1);
    let mut resumed = zero1.to_vec();
    resumed.push("--resume");
    let again = train(&part, "model.n_layer=4", "20", &resumed);
    assert_eq!(straight.0, again.0, "losses after a ZeRO-1 pipeline resume");
    // The 10-step checkpoint as one process (4 micro-batches keep the global batch).
    let one = d.path().join("one");
    std::fs::create_dir_all(&one).unwrap();
    train(&one, "model.n_layer=4", "10", zero1);
    let got = train(
        &one,
        "model.n_layer=4",
        "20",
        &["--resume", "--set", "train.grad_accum=4"],
    );
    common::assert_close(
        "ZeRO-1 pipeline checkpoint as one process",
        &straight.0,
        &got.0,
        1e-6,
    );
}
