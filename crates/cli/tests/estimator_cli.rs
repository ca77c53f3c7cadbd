//! The estimator's 2026 options end to end: FP8 precisions, overlap flags, and `validate`'s
//! H100 / B200 / GB200 tables with their split stated.

mod common;

use common::run;

#[test]
fn fp8_estimate_reports_the_scaling_and_is_faster() {
    let base = [
        "estimate",
        "--model",
        "llama3-8b",
        "--gpu",
        "h100-sxm",
        "--gpus",
        "8",
    ];
    let (code, out, err) = run(&[&base[..], &["--json"]].concat());
    assert_eq!(code, 0, "{err}");
    let bf16: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(bf16["schema_version"], 3);
    assert!(bf16["fp8"].is_null());
    let (code, out, err) = run(&[&base[..], &["--json", "--precision", "fp8-current"]].concat());
    assert_eq!(code, 0, "{err}");
    let fp8: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(fp8["fp8"], "current");
    assert_eq!(fp8["precision"], "bf16-mixed");
    let t = |v: &serde_json::Value| v["step_time_secs"]["total"].as_f64().unwrap();
    assert!(t(&fp8) < t(&bf16), "{} vs {}", t(&fp8), t(&bf16));
    let (code, out, err) = run(&[&base[..], &["--precision", "mxfp8"]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("bf16-mixed with mxfp8 linears"), "{out}");
}

#[test]
fn fp8_on_a100_is_refused_with_the_reason() {
    let (code, _, err) = run(&["estimate", "--gpu", "a100-80gb", "--precision", "fp8"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no FP8 tensor cores") && err.contains("h100-sxm"),
        "{err}"
    );
    let (code, _, err) = run(&["estimate", "--precision", "fp4"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("fp8-current") && err.contains("mxfp8"),
        "{err}"
    );
}

#[test]
fn validate_states_the_split_for_every_gpu_type() {
    let (code, out, err) = run(&["validate"]);
    assert_eq!(code, 0, "{err}");
    for heading in ["DGX-H100", "DGX-B200", "DGX-GB200 (NVL72)"] {
        assert!(
            out.contains(&format!(
                "### {heading}, published FP8 runs: the rows the FP8 efficiency is fitted on"
            )),
            "{heading}"
        );
        assert!(
            out.contains(&format!("### {heading}, published runs: out of sample")),
            "{heading}"
        );
    }
    assert!(out.contains("In sample: `fp8_matmul_scale` of `h100-sxm`"));
}

#[test]
fn cp_layout_is_reported_and_checked() {
    let args = [
        "estimate",
        "--model",
        "llama3-70b",
        "--gpus",
        "64",
        "--tp",
        "8",
        "--cp",
        "2",
        "--pp",
        "2",
        "--micro-batch",
        "1",
    ];
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("dp 2 x tp 8 x pp 2 x cp 2"), "{out}");
    let (code, _, err) = run(&[
        "estimate",
        "--model",
        "llama3-8b",
        "--gpus",
        "8",
        "--cp",
        "3",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("cp(3)") && err.contains("not divisible"),
        "{err}"
    );
}

/// Step times 25% slower than predicted at efficiency 1 fit to an efficiency below 1; the
/// calibrated estimate is within a few percent of the "measurement" and prints its interval.
#[test]
fn calibrate_round_trip_through_the_cli() {
    let dir = common::tmp_dir("estimator", "calibrate");
    let layouts = [
        ("llama2-7b", "8", "1", "1", "64"),
        ("llama2-13b", "16", "2", "1", "64"),
        ("llama3-8b", "16", "2", "2", "128"),
    ];
    let mut csv =
        String::from("# measured\nmodel,gpu,gpus,tp,micro_batch,global_batch,step_secs\n");
    let mut measured = Vec::new();
    for (m, g, tp, mb, gb) in layouts {
        let args = [
            "estimate",
            "--json",
            "--model",
            m,
            "--gpu",
            "h100-sxm",
            "--gpus",
            g,
            "--tp",
            tp,
            "--micro-batch",
            mb,
            "--global-batch",
            gb,
        ];
        let (code, out, err) = run(&args);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let t = v["step_time_secs"]["total"].as_f64().unwrap() * 1.25;
        measured.push((args, t));
        csv.push_str(&format!("{m},h100-sxm,{g},{tp},{mb},{gb},{t}\n"));
    }
    let file = dir.join("runs.csv");
    std::fs::write(&file, csv).unwrap();
    let cal = dir.join("cal.json");
    let (code, out, err) = run(&[
        "calibrate",
        file.to_str().unwrap(),
        "--out",
        cal.to_str().unwrap(),
        "--bootstrap",
        "100",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("efficiency 0.") && out.contains("90% bootstrap CI"),
        "{out}"
    );
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cal).unwrap()).unwrap();
    let eff = f["efficiency"].as_f64().unwrap();
    assert!(eff < 0.9 && eff > 0.6, "{eff}");
    assert!(f["mean_abs_error_after"].as_f64().unwrap() < 0.05);
    let (args, t) = &measured[0];
    let (code, out, err) = run(&[&args[..], &["--calibration", cal.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let p = v["step_time_secs"]["total"].as_f64().unwrap();
    assert!((p - t).abs() / t < 0.05, "{p} vs {t}");
    let iv = v["step_time_interval_90"].as_array().unwrap();
    assert!(iv[0].as_f64().unwrap() < p && p < iv[1].as_f64().unwrap());
    // Bad input: no step_secs column, and a row without its layout.
    std::fs::write(&file, "model,gpus\nllama2-7b,8\n").unwrap();
    let (code, _, err) = run(&["calibrate", file.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("step_secs"), "{err}");
    std::fs::write(&file, "model,gpus,step_secs\nllama2-7b,8,3.0\n").unwrap();
    let (code, _, err) = run(&["calibrate", file.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("layout"), "{err}");
    let (code, _, err) = run(&["estimate", "--efficiency", "3"]);
    assert_eq!(code, 2);
    assert!(err.contains("--efficiency"), "{err}");
    let (code, _, err) = run(&["estimate", "--stack", "jax"]);
    assert_eq!(code, 2);
    assert!(err.contains("megatron, fsdp, deepspeed"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn memory_margin_is_reported_and_checked() {
    let (code, out, err) = run(&[
        "estimate",
        "--gpus",
        "8",
        "--tp",
        "8",
        "--memory-margin",
        "0.1",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(after a 10% margin)"), "{out}");
    let (code, _, err) = run(&["estimate", "--memory-margin", "1.5"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--memory-margin") && err.contains("0..0.9"),
        "{err}"
    );
}

#[test]
fn goodput_is_printed_and_in_the_json() {
    let base = [
        "estimate",
        "--model",
        "llama3-70b",
        "--gpus",
        "1024",
        "--tp",
        "8",
        "--pp",
        "4",
        "--global-batch",
        "1024",
    ];
    let (code, out, err) = run(&base);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("days expected with failures") && out.contains("(Young/Daly)"),
        "{out}"
    );
    let (code, out, err) = run(&[
        &base[..],
        &[
            "--json",
            "--gpu-mtbf-hours",
            "25000",
            "--restart-minutes",
            "20",
        ],
    ]
    .concat());
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let g = &v["goodput"];
    // 1,024 GPUs at one failure per 25,000 GPU-hours: MTBF 24.4 h.
    assert!((g["cluster_mtbf_hours"].as_f64().unwrap() - 25000.0 / 1024.0).abs() < 1e-9);
    assert_eq!(g["restart_secs"].as_f64().unwrap(), 1200.0);
    assert!(g["expected_days"].as_f64().unwrap() > v["training_days"].as_f64().unwrap());
    let (code, _, err) = run(&["estimate", "--checkpoint-gbps", "0"]);
    assert_eq!(code, 2);
    assert!(err.contains("--checkpoint-gbps"), "{err}");
}
