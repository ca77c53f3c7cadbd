//! Straggler detection on real 3-rank jobs (`scaletrain launch`, TCP): a rank slowed by the
//! fault drill `SCALETRAIN_INJECT_SLOW_RANK` is named in the log, in `metrics.jsonl` and in the
//! report; the same job without the drill names nobody.

mod common;

use std::path::Path;

const BIN: &str = env!("CARGO_BIN_EXE_scaletrain");

/// About 2–5 ms a step per rank here; the drill adds 40 ms to one rank. The margin is 100 %
/// (not the default 20 %): on this shared 2-core machine three balanced ranks of a few
/// milliseconds a step differ by 20–70 % for tens of steps at a time (seen while building
/// this), which the default margin rightly reports; the test is about telling a slowed rank
/// from scheduling noise.
fn job(out: &Path, slow: Option<&str>) -> (i32, String, String) {
    let out = out.display().to_string();
    let mut args = vec!["launch", "--nproc-per-node", "3", "--", "--out", &out];
    args.extend([
        "--steps",
        "80",
        "--threads",
        "1",
        "--straggler-margin",
        "1.0",
        "--straggler-window",
        "20",
        "--set",
        "model.n_layer=2",
        "--set",
        "model.channels=64",
        "--set",
        "model.n_head=2",
        "--set",
        "model.seq_len=32",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.eval_batches=2",
        "--set",
        "train.eval_every=100",
        "--set",
        "data.synthetic.val_tokens=1000",
        "--no-progress",
    ]);
    let env: Vec<(&str, &str)> = slow
        .map(|s| ("SCALETRAIN_INJECT_SLOW_RANK", s))
        .into_iter()
        .collect();
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(&args).envs(env);
    let o = cmd.output().expect("launch runs");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn straggler_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("straggler").is_some())
        .collect()
}

#[test]
fn a_slowed_rank_is_named_and_a_balanced_job_names_nobody() {
    let dir = common::TempDir::new("straggler", "named");
    // Sequential, not two tests: two jobs at once would slow each other unevenly.
    let slow = dir.path().join("slow");
    let (code, stdout, stderr) = job(&slow, Some("1:40"));
    assert_eq!(code, 0, "{stderr}");
    let lines = straggler_lines(&slow);
    // 80 steps, window 20: judged from step 20, named again every 20 steps.
    assert!(lines.len() >= 3, "{lines:?}\n{stderr}");
    for l in &lines {
        assert_eq!(l["straggler"], 1, "{l}");
        assert!(l["ratio"].as_f64().unwrap() > 2.0, "{l}");
        let busy = l["ranks_busy_secs"].as_array().unwrap();
        assert_eq!(busy.len(), 3);
        assert!(busy[1].as_f64().unwrap() >= 0.040, "{l}");
    }
    assert!(
        stderr.contains("warning: straggler: data-parallel rank 1 was busy"),
        "{stderr}"
    );
    let report = stdout
        .lines()
        .find(|l| l.contains("per-rank step time"))
        .unwrap_or_else(|| panic!("no per-rank line:\n{stdout}"));
    assert!(
        report.contains("rank 0 busy")
            && report.contains("rank 2 busy")
            && report.contains("rank 1 busy"),
        "{report}"
    );
    assert!(report.contains("named a straggler"), "{report}");
    // The training itself is what it would be without the drill: same losses.
    let balanced = dir.path().join("balanced");
    let (code, stdout, stderr) = job(&balanced, None);
    assert_eq!(code, 0, "{stderr}");
    assert!(straggler_lines(&balanced).is_empty(), "{stderr}");
    assert!(!stderr.contains("warning: straggler"), "{stderr}");
    let report = stdout
        .lines()
        .find(|l| l.contains("per-rank step time"))
        .unwrap_or_else(|| panic!("no per-rank line:\n{stdout}"));
    assert!(!report.contains("named"), "{report}");
    let losses = |d: &Path| -> Vec<String> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                v.get("loss").map(|x| x.to_string())
            })
            .collect()
    };
    assert_eq!(losses(&slow), losses(&balanced));
}

#[test]
fn a_malformed_drill_is_refused_naming_the_variable() {
    let dir = common::TempDir::new("straggler", "bad");
    let out = dir.path().join("r").display().to_string();
    let (code, _, stderr) = common::run_env(
        &[
            "launch",
            "--nproc-per-node",
            "2",
            "--",
            "--out",
            &out,
            "--steps",
            "2",
            "--threads",
            "1",
            "--set",
            "model.n_layer=1",
            "--set",
            "model.channels=32",
            "--set",
            "model.n_head=2",
            "--set",
            "model.seq_len=16",
            "--set",
            "data.synthetic.val_tokens=1000",
            "--no-progress",
        ],
        &[("SCALETRAIN_INJECT_SLOW_RANK", "one")],
    );
    assert_ne!(code, 0);
    assert!(
        stderr.contains("SCALETRAIN_INJECT_SLOW_RANK") && stderr.contains("RANK:MILLISECONDS"),
        "{stderr}"
    );
    let (code, _, stderr) = common::run(&["train", "--straggler-margin=-1", "--out", &out]);
    assert_ne!(code, 0);
    assert!(stderr.contains("train.straggler_margin"), "{stderr}");
}
