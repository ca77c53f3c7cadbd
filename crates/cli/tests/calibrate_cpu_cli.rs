//! `scaletrain calibrate --cpu RUN_DIR…`: real short runs of `scaletrain train` (one process,
//! data parallel, a pipeline) are fitted, the file is read back by `plan --cpu --calibration`,
//! and bad folders get errors that name the folder and what is wrong.

mod common;

fn train(out: &std::path::Path, layout: &[&'static str]) {
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
    let mut args = vec![
        "calibrate",
        "--bootstrap",
        "50",
        "--out",
        cal.to_str().unwrap(),
    ];
    args.extend(runs.iter().map(|r| r.to_str().unwrap()));
    let (code, stdout, stderr) = common::run(&args);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
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
