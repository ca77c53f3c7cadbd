//! `scaletrain train`, `sample` and `data prepare` end to end (tiny configs, seconds).

use std::path::PathBuf;

mod common;

use common::run;

fn tmp(name: &str) -> PathBuf {
    common::tmp_dir("train", name)
}

/// The shared tiny model with this file's evaluation interval and corpus size.
fn tiny() -> Vec<&'static str> {
    common::tiny_with(&[
        "--set",
        "train.eval_every=2",
        "--set",
        "data.synthetic.train_tokens=5000",
    ])
}

#[test]
fn train_resume_and_sample_from_the_command_line() {
    let d = tmp("run");
    let out = d.join("run");
    let o = out.to_str().unwrap();
    let mut args = vec!["train", "--out", o, "--steps", "6", "--stop-after", "3"];
    args.extend(tiny());
    let (code, stdout, err) = run(&args);
    assert_eq!(code, 0, "{stdout}\n{err}");
    for s in [
        "best achievable loss",
        "predicted (plan::cpu_runtime)",
        "predicted vs measured",
        "step time: predicted",
        "tokens/s",
    ] {
        assert!(stdout.contains(s), "missing {s}:\n{stdout}");
    }
    for f in [
        "metrics.jsonl",
        "loss.svg",
        "config.toml",
        "step-00000003.json",
        "step-00000003.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    // Running again without --resume refuses to mix runs.
    let (code, _, err) = run(&args);
    assert_eq!(code, 2);
    assert!(err.contains("--resume"), "{err}");
    let mut resume = vec!["train", "--out", o, "--steps", "6", "--resume"];
    resume.extend(tiny());
    let (code, stdout, err) = run(&resume);
    assert_eq!(code, 0, "{stdout}\n{err}");
    assert!(stdout.contains("resuming at step 3"), "{stdout}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    // Resuming with another model is refused, saying why.
    let mut other = resume.clone();
    other.extend_from_slice(&["--set", "model.n_layer=2"]);
    let (code, _, err) = run(&other);
    assert_eq!(code, 2);
    assert!(err.contains("model.n_layer: 1 vs 2"), "{err}");
    // Sampling prints synthetic symbols.
    let (code, stdout, err) = run(&[
        "sample",
        "--checkpoint",
        o,
        "--tokens",
        "10",
        "--prompt",
        "ab",
    ]);
    assert_eq!(code, 0, "{err}");
    let line = stdout.trim();
    assert_eq!(line.len(), 12, "{line}");
    assert!(line.starts_with("ab"), "{line}");
}

#[test]
fn bad_config_and_data_are_clear_errors() {
    let d = tmp("bad");
    let cfg = d.join("bad.toml");
    std::fs::write(&cfg, "[train]\nstepz = 3\n").unwrap();
    let (code, _, err) = run(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        d.join("r").to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("bad.toml") && err.contains("train.stepz"),
        "{err}"
    );
    let (code, _, err) = run(&[
        "train",
        "--set",
        "optim.lr=\"fast\"",
        "--out",
        d.join("r").to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("optim.lr") && err.contains("invalid type"),
        "{err}"
    );
    let (code, _, err) = run(&[
        "data",
        "prepare",
        d.join("missing.txt").to_str().unwrap(),
        "--out",
        d.join("data").to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("missing.txt"), "{err}");
    let (code, _, err) = run(&["sample", "--checkpoint", d.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("no checkpoint"), "{err}");
    assert!(!err.contains("panicked"));
}
