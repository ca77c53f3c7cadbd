//! `plan --objective goodput` end to end, and the README's default-estimate numbers (issue 14:
//! "10B, 200B tokens" was really 9.712B / 194.2B) checked against what the command prints.

mod common;

use common::run;

#[test]
fn goodput_objective_ranks_by_expected_days_over_cluster_sizes() {
    let args = [
        "plan",
        "--model",
        "llama2-7b",
        "--global-batch",
        "256",
        "--objective",
        "goodput",
        "--max-gpus",
        "256",
        "--gpu-mtbf-hours",
        "50",
        "--json",
        "--top",
        "3",
    ];
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    let p: serde_json::Value = serde_json::from_str(&out).unwrap();
    let top = p["top"].as_array().unwrap();
    let days: Vec<f64> = top
        .iter()
        .map(|e| e["goodput"]["expected_days"].as_f64().unwrap())
        .collect();
    assert!(days.windows(2).all(|w| w[0] <= w[1]), "{days:?}");
    // With a failure every 50 GPU-hours, the largest cluster is not the best.
    assert!(top[0]["gpus"].as_u64().unwrap() < 256, "{}", top[0]["gpus"]);
    let (code, out, err) = run(&args[..args.len() - 3]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("objective: shortest expected time with failures"),
        "{out}"
    );
    let (code, _, err) = run(&["plan", "--objective", "speed"]);
    assert_eq!(code, 2);
    assert!(err.contains("not one of time, cost, goodput"), "{err}");
}

#[test]
fn readme_default_numbers_are_what_estimate_prints() {
    let readme = include_str!("../../../README.md");
    assert!(
        readme.contains("9.712B parameters") && readme.contains("194.2B tokens"),
        "README no longer states the default model's real size"
    );
    let (code, out, err) = run(&["estimate"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(9.712B parameters)"), "{out}");
    assert!(out.contains("194.236B tokens"), "{out}");
}
