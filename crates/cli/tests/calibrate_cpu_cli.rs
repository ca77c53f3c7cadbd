//! `scaletrain calibrate --cpu RUN_DIR…`: real short runs of `scaletrain train` (one process,
//! data parallel, a pipeline) are fitted, the file is read back by `plan --cpu --calibration`,
//! and bad folders get errors that name the folder and what is wrong.

mod common;

fn train(out: &std::path::Path, layout: &[&str]) -> String {
    let mut args = vec!["train", "--out", out.to_str().unwrap(), "--steps", "4"];
    args.extend(common::tiny_with(&[
        "--set",
        "model.n_layer=2",
        "--set",
        "train.eval_every=100",
        "--set",
        "data.synthetic.train_tokens=20000",
        "--threads",
        "1",
    ]));
    args.extend_from_slice(layout);
    let (code, stdout, stderr) = common::run_env(&args, &[("SCALETRAIN_COMM_TIMEOUT_SECS", "60")]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(out.join("run-layout.json").is_file(), "{stdout}");
    stdout
}

/// The report's predicted step, ms.
fn predicted_ms(report: &str) -> f64 {
    let line = report
        .lines()
        .find(|l| l.contains("step time: predicted"))
        .unwrap_or_else(|| panic!("no step time line: {report}"));
    line.split("predicted ")
        .nth(1)
        .unwrap()
        .split(" ms")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// `scaletrain calibrate --bootstrap N --out OUT RUN…`, which must succeed; its stdout.
fn calibrate(out: &std::path::Path, bootstrap: &str, runs: &[std::path::PathBuf]) -> String {
    let mut args = vec![
        "calibrate",
        "--bootstrap",
        bootstrap,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(runs.iter().map(|r| r.to_str().unwrap()));
    let (code, stdout, stderr) = common::run(&args);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    stdout
}

#[test]
fn calibrate_cpu_fits_real_runs_and_plan_reads_the_file() {
    let dir = common::TempDir::new("calcpu", "fit");
    let runs = [
        dir.path().join("one"),
        dir.path().join("dp2"),
        dir.path().join("pp2"),
    ];
    train(&runs[0], &[]);
    train(&runs[1], &["--dp", "2", "--set", "train.batch_size=2"]);
    train(
        &runs[2],
        &[
            "--pp",
            "2",
            "--microbatches",
            "4",
            "--set",
            "train.batch_size=1",
        ],
    );
    let layout = std::fs::read_to_string(runs[2].join("run-layout.json")).unwrap();
    assert!(
        layout.contains("\"pp\": 2") && layout.contains("\"microbatches\": 4"),
        "{layout}"
    );
    let cal = dir.path().join("cal.json");
    let stdout = calibrate(&cal, "50", &runs);
    assert!(
        stdout.contains("mean |error|") && stdout.contains("after"),
        "{stdout}"
    );
    assert_eq!(
        stdout.matches(" | dp").count(),
        3,
        "one line per run: {stdout}"
    );
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cal).unwrap()).unwrap();
    assert_eq!(file["format"], "scaletrain-cpu-calibration");
    assert_eq!(file["runs"], 3);
    let ci = file["matmul_flops_per_thread_ci90"].as_array().unwrap();
    let m = file["matmul_flops_per_thread"].as_f64().unwrap();
    assert!(
        ci[0].as_f64().unwrap() <= m && m <= ci[1].as_f64().unwrap(),
        "{file}"
    );
    // The fit minimises the log error: never worse than the defaults on its own runs.
    assert!(
        file["rms_log_error_after"].as_f64().unwrap()
            <= file["rms_log_error_before"].as_f64().unwrap() + 1e-12,
        "{file}"
    );
    // plan --cpu predicts with the fitted constants: other step times than the defaults'.
    let plan = |extra: &[&str]| {
        let mut a = vec![
            "plan",
            "--cpu",
            "--nproc",
            "2",
            "--cores",
            "2",
            "--commands",
        ];
        a.extend(common::TINY_MODEL.iter().filter(|x| **x != "--no-progress"));
        a.extend_from_slice(extra);
        let (code, stdout, stderr) = common::run(&a);
        assert_eq!(code, 0, "{stdout}\n{stderr}");
        stdout
    };
    let default = plan(&[]);
    let fitted = plan(&["--calibration", cal.to_str().unwrap()]);
    assert_ne!(default, fitted);

    // train --calibration: the end-of-run report predicts with the file's constants, without
    // a pipeline (the whole model's compute) and in a mesh (plan --cpu's prediction).
    // A machine 8× slower than the defaults' (the fitted file, its constants replaced).
    let mut slow: serde_json::Value = file.clone();
    slow["matmul_flops_per_thread"] = (240e9 / 8.0).into();
    slow["bandwidth_bytes_per_thread"] = (6e9 / 8.0).into();
    let slow_path = dir.path().join("slow.json");
    std::fs::write(&slow_path, slow.to_string()).unwrap();
    let c = slow_path.to_str().unwrap();
    // One process: all compute, 8× the step; the tiny pipeline's step is mostly its messages.
    for (name, layout, factor) in [
        ("one", vec![], 4.0),
        (
            "pp2",
            vec![
                "--pp",
                "2",
                "--microbatches",
                "4",
                "--set",
                "train.batch_size=1",
            ],
            1.2,
        ),
    ] {
        let plain = train(&dir.path().join(format!("{name}-plain")), &layout);
        let mut with = layout.clone();
        with.extend(["--calibration", c]);
        let calibrated = train(&dir.path().join(format!("{name}-cal")), &with);
        assert!(!plain.contains("constants:"), "{plain}");
        assert!(
            calibrated.contains(&format!("constants: {c} (calibrate --cpu)"))
                && !calibrated.contains("not applied"),
            "{calibrated}"
        );
        let (p, q) = (predicted_ms(&plain), predicted_ms(&calibrated));
        assert!(
            q > factor * p,
            "{name}: predicted {p} ms, with the slow constants {q} ms"
        );
    }

    // Bad input: a wrong calibration file, a folder that is no run, a mixed folder, no metrics.
    let (code, _, stderr) = common::run(&[
        "plan",
        "--cpu",
        "--nproc",
        "2",
        "--calibration",
        runs[0].join("run-layout.json").to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("not a CPU calibration file"), "{stderr}");
    // train refuses the same file before it trains.
    let bad = dir.path().join("bad");
    let (code, _, stderr) = common::run(&[
        "train",
        "--out",
        bad.to_str().unwrap(),
        "--calibration",
        runs[0].join("run-layout.json").to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("--calibration") && stderr.contains("not a CPU calibration file"),
        "{stderr}"
    );
    assert!(!bad.join("metrics.jsonl").exists());
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (code, _, stderr) = common::run(&["calibrate", "--cpu", empty.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("empty") && stderr.contains("no run-layout.json"),
        "{stderr}"
    );
    let text = std::fs::read_to_string(runs[1].join("run-layout.json")).unwrap();
    std::fs::write(
        runs[1].join("run-layout.json"),
        text.replace("\"layers\": 2", "\"layers\": 3"),
    )
    .unwrap();
    let (code, _, stderr) = common::run(&["calibrate", "--cpu", runs[1].to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("dp2") && stderr.contains("disagree"),
        "{stderr}"
    );
    std::fs::remove_file(runs[0].join("metrics.jsonl")).unwrap();
    let (code, _, stderr) = common::run(&["calibrate", "--cpu", runs[0].to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(stderr.contains("no metrics.jsonl"), "{stderr}");
}

#[test]
fn calibrate_cpu_fits_the_bf16_rate_from_bf16_runs() {
    // One fp32 run and two bf16-mixed runs fit the matmul rate, bandwidth and bf16 rate.
    let dir = common::TempDir::new("calcpu", "bf16");
    let runs = [
        dir.path().join("fp32"),
        dir.path().join("bf16"),
        dir.path().join("bf16-dp2"),
    ];
    let bf16 = ["--set", "train.precision=bf16-mixed"];
    train(&runs[0], &[]);
    train(&runs[1], &bf16);
    train(
        &runs[2],
        &[bf16[0], bf16[1], "--dp", "2", "--set", "train.batch_size=2"],
    );
    let cal = dir.path().join("cal.json");
    let stdout = calibrate(&cal, "30", &runs);
    assert!(stdout.contains("bf16-mixed matmul"), "{stdout}");
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cal).unwrap()).unwrap();
    let rate = file["bf16_matmul_flops_per_thread"].as_f64().unwrap();
    let ci = file["bf16_matmul_flops_per_thread_ci90"]
        .as_array()
        .unwrap();
    assert!(
        ci[0].as_f64().unwrap() <= rate && rate <= ci[1].as_f64().unwrap(),
        "{file}"
    );
    // fp32 runs alone fit no bf16 rate: the file has none.
    let only = dir.path().join("fp32.json");
    let stdout = calibrate(&only, "30", &runs[..1]);
    assert!(!stdout.contains("bf16-mixed matmul"), "{stdout}");
    let text = std::fs::read_to_string(&only).unwrap();
    assert!(!text.contains("bf16_matmul"), "{text}");
    // plan --cpu reads the file for a bf16-mixed model.
    let (code, stdout, stderr) = common::run(&[
        "plan",
        "--cpu",
        "--nproc",
        "1",
        "--calibration",
        cal.to_str().unwrap(),
        "--set",
        "train.precision=bf16-mixed",
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
}
