//! Mixed precision, recomputation and the stability guards as real runs (`scaletrain train`
//! processes, real run folders): bit-exact resume under bf16/fp16 at pp 1 and 2, the fp16 loss
//! scale at work and restored, recomputation bitwise equal to none in fp32, an injected NaN
//! skipped on every rank and stage (and K in a row stopping the run), and an injected bad batch
//! logged, skipped or rolled back.

use std::path::Path;

mod common;

fn run(args: &[&str]) -> (i32, String, String) {
    common::run_env(args, &[("SCALETRAIN_COMM_TIMEOUT_SECS", "20")])
}

fn tmp(name: &str) -> common::TempDir {
    common::TempDir::new("mixed", name)
}

/// A 2-layer model (so 2 stages split it evenly), tiny corpus, one thread.
fn model() -> Vec<&'static str> {
    vec![
        "--set",
        "model.n_layer=2",
        "--set",
        "model.channels=32",
        "--set",
        "model.n_head=2",
        "--set",
        "model.seq_len=16",
        "--set",
        "train.batch_size=4",
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

/// Trains into `dir` for `steps` with `extra` flags; returns stdout.
fn train(dir: &Path, steps: &str, extra: &[&str]) -> String {
    let mut args = vec!["train", "--out", dir.to_str().unwrap(), "--steps", steps];
    args.extend(model());
    args.extend_from_slice(extra);
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{args:?}\n{out}\n{err}");
    out
}

/// Every line of `metrics.jsonl`.
fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The step lines (those with a training loss).
fn steps(dir: &Path) -> Vec<serde_json::Value> {
    metrics(dir)
        .into_iter()
        .filter(|j| j.get("loss").is_some())
        .collect()
}

/// The metrics without the timings.
fn deterministic(dir: &Path) -> Vec<serde_json::Value> {
    metrics(dir)
        .into_iter()
        .map(|mut j| {
            if let Some(o) = j.as_object_mut() {
                o.retain(|k, _| !k.ends_with("_secs") && k != "tokens_per_sec");
            }
            j
        })
        .collect()
}

fn losses(dir: &Path) -> Vec<f64> {
    steps(dir)
        .iter()
        .map(|j| j["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn mixed_precision_resumes_bit_exact_at_pp1_and_pp2() {
    let d = tmp("resume");
    // fp16 starts near the top of the scale and grows every 2 clean steps, so the run
    // overflows (skips, halves) and grows again: the restored scale matters for the bits.
    for precision in ["bf16-mixed", "fp16-mixed"] {
        for (layout, flags) in [
            ("pp1", vec!["--set", "train.grad_accum=2"]),
            ("pp2", vec!["--pp", "2", "--microbatches", "2"]),
        ] {
            let mut extra = vec!["--precision", precision, "--set", "train.eval_every=4"];
            extra.extend(&flags);
            if precision == "fp16-mixed" {
                extra.extend(common::FP16_OVERFLOWS);
            }
            let what = format!("{precision} {layout}");
            let straight = d.path().join(format!("{precision}-{layout}-straight"));
            train(&straight, "12", &extra);
            let part = d.path().join(format!("{precision}-{layout}-part"));
            train(&part, "5", &extra);
            let mut resumed = extra.clone();
            resumed.push("--resume");
            train(&part, "12", &resumed);
            // (The interrupted run also validated at its last step, 5.)
            let keep = |v: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
                v.into_iter()
                    .filter(|j| j.get("loss").is_some() || j["step"] != 5)
                    .collect()
            };
            let (a, b) = (keep(deterministic(&straight)), keep(deterministic(&part)));
            assert_eq!(
                a, b,
                "{what}: metrics after a resume (loss, val loss, scale, skips)"
            );
            let l = losses(&straight);
            assert_eq!(l.len(), 12, "{what}");
            assert!(l.iter().all(|x| x.is_finite()), "{what}: {l:?}");
            assert!(l[11] < l[0], "{what}: it learns: {l:?}");
            let files: Vec<String> = match layout {
                "pp1" => vec!["step-00000012.safetensors".into()],
                _ => (0..2)
                    .map(|s| format!("step-00000012.stage-{s}-of-2.safetensors"))
                    .collect(),
            };
            for f in files {
                assert_eq!(
                    std::fs::read(straight.join(&f)).unwrap(),
                    std::fs::read(part.join(&f)).unwrap(),
                    "{what}: {f} (fp32 master weights)"
                );
            }
            if precision == "fp16-mixed" {
                let s = steps(&straight);
                let scales: Vec<f64> = s
                    .iter()
                    .map(|j| j["loss_scale"].as_f64().unwrap())
                    .collect();
                let overflows = s.iter().filter(|j| j["skip_reason"] == "overflow").count();
                assert!(overflows >= 1, "{what}: the scale overflowed: {scales:?}");
                assert!(
                    scales.windows(2).any(|w| w[1] > w[0])
                        && scales.windows(2).any(|w| w[1] < w[0]),
                    "{what}: the scale grew and backed off: {scales:?}"
                );
                assert!(s
                    .iter()
                    .all(|j| j["skipped"] == (j.get("skip_reason").is_some())));
            } else {
                assert!(steps(&straight)
                    .iter()
                    .all(|j| j.get("loss_scale").is_none()));
            }
        }
    }
}

#[test]
fn recomputation_gives_bitwise_the_same_run_in_fp32() {
    let d = tmp("recompute");
    let mut runs = Vec::new();
    for r in ["none", "selective", "full"] {
        let dir = d.path().join(r);
        let out = train(
            &dir,
            "8",
            &["--recompute", r, "--set", "train.eval_every=4"],
        );
        assert!(
            out.contains(&format!("memory (fp32, recompute {r}): predicted buffers")),
            "{out}"
        );
        let vals: Vec<f64> = metrics(&dir)
            .iter()
            .filter_map(|j| j.get("val_loss").and_then(|v| v.as_f64()))
            .collect();
        runs.push((
            losses(&dir),
            vals,
            std::fs::read(dir.join("step-00000008.safetensors")).unwrap(),
        ));
    }
    for k in 1..3 {
        assert_eq!(runs[0].0, runs[k].0, "training losses, run {k}");
        assert_eq!(runs[0].1, runs[k].1, "validation losses, run {k}");
        assert!(runs[0].2 == runs[k].2, "final weights, run {k}");
    }
}

#[test]
fn an_injected_nan_is_skipped_on_every_rank_and_stage() {
    let d = tmp("nan");
    let inject = [
        "--set",
        "stability.inject_nan_steps=[3]",
        "--set",
        "train.eval_every=0",
    ];
    let mut one = inject.to_vec();
    one.extend(["--set", "train.grad_accum=2"]);
    let dp2 = [inject.as_slice(), &["--dp", "2"]].concat();
    let pp2 = [inject.as_slice(), &["--pp", "2", "--microbatches", "2"]].concat();
    let mut all = Vec::new();
    for (name, flags) in [("one", one), ("dp2", dp2), ("pp2", pp2)] {
        let dir = d.path().join(name);
        let out = train(&dir, "6", &flags);
        let s = steps(&dir);
        assert_eq!(s[2]["skipped"], true, "{name}: {:?}", s[2]);
        assert_eq!(s[2]["skip_reason"], "non-finite", "{name}");
        assert!(s[2]["grad_norm"].is_null() || !s[2]["grad_norm"].as_f64().unwrap().is_finite());
        assert!(
            s.iter()
                .enumerate()
                .all(|(i, j)| i == 2 || j["skipped"] == false),
            "{name}"
        );
        // Had any rank or stage applied the NaN, every later loss would be NaN.
        let l = losses(&dir);
        assert!(l.iter().all(|x| x.is_finite()), "{name}: {l:?}");
        assert!(
            out.contains("1 steps skipped (1 non-finite)"),
            "{name}: {out}"
        );
        all.push(l);
    }
    // The layouts train the same model (to the pipeline's rounding of the tied embedding).
    for (k, l) in all.iter().enumerate().skip(1) {
        for (a, b) in all[0].iter().zip(l) {
            assert!((a - b).abs() <= 1e-5 * a.abs(), "layout {k}: {a} vs {b}");
        }
    }

    // Too many in a row stop the run with an error naming the step.
    let mut args = vec!["train", "--out"];
    let dir = d.path().join("diverged");
    args.push(dir.to_str().unwrap());
    args.extend(["--steps", "8"]);
    args.extend(model());
    args.extend([
        "--set",
        "stability.inject_nan_steps=[2,3,4]",
        "--set",
        "stability.max_bad_steps=3",
    ]);
    let (code, out, err) = run(&args);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("3 steps in a row (the last at step 4)"),
        "{err}"
    );
}

#[test]
fn an_injected_bad_batch_is_a_spike_that_is_logged_skipped_or_rolled_back() {
    let d = tmp("spike");
    // A bigram corpus the tiny model learns within 100 steps, so a corrupt batch (every
    // target off by one token) stands out against the settled running statistic.
    let base = [
        "--set",
        "data.synthetic.order=1",
        "--set",
        "data.synthetic.branching=2",
        "--set",
        "data.synthetic.smoothing=0.01",
        "--set",
        "optim.lr=1e-2",
        "--set",
        "optim.warmup_steps=5",
        "--set",
        "optim.decay_steps=1000",
        "--set",
        "stability.inject_bad_batch_steps=[150]",
        "--set",
        "stability.spike_warmup=10",
        "--set",
        "train.checkpoint_every=140",
        "--set",
        "train.eval_every=0",
    ];
    for action in ["log", "skip", "rollback"] {
        let dir = d.path().join(action);
        let set = format!("stability.spike_action=\"{action}\"");
        let mut flags = base.to_vec();
        flags.extend(["--set", &set]);
        let out = train(&dir, "156", &flags);
        let m = metrics(&dir);
        let s = steps(&dir);
        assert_eq!(
            s.len(),
            156,
            "{action}: one line per step after any rollback"
        );
        let spikes: Vec<&serde_json::Value> =
            m.iter().filter(|j| j["loss_spike"] == true).collect();
        match action {
            "log" => {
                assert_eq!(spikes.len(), 1, "{action}: {spikes:?}");
                assert_eq!(spikes[0]["step"], 150);
                assert_eq!(spikes[0]["skipped"], false);
            }
            "skip" => {
                assert_eq!(s[149]["skip_reason"], "loss-spike", "{:?}", s[149]);
                assert!(out.contains("1 steps skipped"), "{out}");
            }
            _ => {
                let ev: Vec<&serde_json::Value> = m
                    .iter()
                    .filter(|j| j.get("rollback_from").is_some())
                    .collect();
                assert_eq!(ev.len(), 1, "{m:?}");
                assert_eq!(ev[0]["rollback_from"], 150);
                assert_eq!(ev[0]["step"], 140, "back to the checkpoint at step 140");
                assert!(
                    ev[0]["spike_loss"].as_f64().unwrap() > ev[0]["threshold"].as_f64().unwrap()
                );
                assert!(out.contains("1 rollbacks"), "{out}");
                // Steps 141.. were trained again on later data: not the log run's losses.
                let log = losses(&d.path().join("log"));
                let l = losses(&dir);
                assert_eq!(l[..140], log[..140]);
                assert_ne!(l[140], log[140]);
            }
        }
    }
}

#[test]
fn bf16_data_parallel_layouts_train_the_one_process_model() {
    // Gradients are reduced in f32 (the 16-bit ones are widened first), so ring, ZeRO-1 and
    // ZeRO-2 at dp 2 follow the one-process run with the same global batch.
    let d = tmp("dp");
    let common = ["--precision", "bf16-mixed", "--set", "train.eval_every=0"];
    let run_losses = |name: &str, flags: &[&str]| {
        let dir = d.path().join(name);
        train(&dir, "6", &[common.as_slice(), flags].concat());
        losses(&dir)
    };
    let one = run_losses("one", &["--set", "train.grad_accum=2"]);
    for (name, flags) in [
        ("ring", vec!["--dp", "2"]),
        ("zero1", vec!["--dp", "2", "--zero", "1"]),
        ("zero2", vec!["--dp", "2", "--zero", "2"]),
    ] {
        let got = run_losses(name, &flags);
        assert_eq!(got.len(), 6, "{name}");
        for (i, (a, b)) in one.iter().zip(&got).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs(),
                "{name}: step {}: {a} vs {b}",
                i + 1
            );
        }
    }
}
