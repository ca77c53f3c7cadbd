//! The `scaletrain` binary end to end: default run, JSON schema, and clear errors on bad input.

mod common;

use common::run;

fn fails_with(args: &[&str], needles: &[&str]) {
    let (code, out, err) = run(args);
    assert_eq!(
        code, 2,
        "{args:?} should fail with status 2; stdout {out} stderr {err}"
    );
    for n in needles {
        assert!(err.contains(n), "{args:?}: stderr lacks '{n}':\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

fn tmp(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("scaletrain-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    common::remove_at_exit(&dir);
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn default_estimate_is_a_10b_breakdown() {
    let (code, out, err) = run(&["estimate"]);
    assert_eq!(code, 0, "{err}");
    for s in [
        "--params 10B",
        "Memory per device",
        "weights",
        "optimizer states",
        "activations",
        "Step time",
        "MFU",
        "days",
        "GPU-hours",
    ] {
        assert!(out.contains(s), "missing {s}:\n{out}");
    }
}

#[test]
fn json_schema_has_the_documented_fields() {
    let (code, out, err) = run(&[
        "estimate",
        "--model",
        "llama3-8b",
        "--gpus",
        "16",
        "--zero",
        "1",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    assert_eq!(v["parameters"], 8_030_261_248u64);
    for k in [
        "weights",
        "gradients",
        "optimizer_states",
        "master_weights",
        "activations",
        "total",
    ] {
        assert!(
            v["memory_per_device_bytes"][k].as_f64().unwrap() >= 0.0,
            "{k}"
        );
    }
    for k in ["compute", "communication", "bubble", "total"] {
        assert!(v["step_time_secs"][k].as_f64().is_some(), "{k}");
    }
    for k in [
        "fits",
        "flops_per_step",
        "mfu",
        "training_days",
        "gpu_hours",
        "cost_usd",
    ] {
        assert!(!v[k].is_null(), "{k}");
    }
    let m = &v["memory_per_device_bytes"];
    let sum: f64 = [
        "weights",
        "gradients",
        "optimizer_states",
        "master_weights",
        "activations",
        "comm_buffers",
        "runtime_overhead",
    ]
    .iter()
    .map(|k| m[*k].as_f64().unwrap())
    .sum();
    assert!((sum - m["total"].as_f64().unwrap()).abs() < 1.0);
}

#[test]
fn fp32_10b_needs_40gb_weights_and_40gb_gradients() {
    let (code, out, err) = run(&[
        "estimate",
        "--layers",
        "40",
        "--hidden",
        "4096",
        "--heads",
        "32",
        "--vocab",
        "32000",
        "--precision",
        "fp32",
        "--gpus",
        "1",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let p = v["parameters"].as_f64().unwrap();
    assert_eq!(
        v["memory_per_device_bytes"]["weights"].as_f64().unwrap(),
        4.0 * p
    );
    assert_eq!(
        v["memory_per_device_bytes"]["gradients"].as_f64().unwrap(),
        4.0 * p
    );
}

#[test]
fn explain_prints_formulas_and_sources() {
    let (code, out, _) = run(&[
        "estimate",
        "--model",
        "gpt2-124m",
        "--gpus",
        "1",
        "--explain",
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("[memory]")
            && out.contains("[flops]")
            && out.contains("[time]")
            && out.contains("[cost]")
    );
    assert!(out.contains("Korthikanti") && out.contains("source:"));
}

#[test]
fn plan_ranks_and_counts_rejections() {
    let (code, out, err) = run(&[
        "plan",
        "--model",
        "llama2-70b",
        "--gpus",
        "64",
        "--gpu",
        "a100-40gb",
        "--global-batch",
        "512",
        "--top",
        "3",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("Searched")
            && out.contains("Rejected:")
            && out.contains("out of memory on pipeline stage 0"),
        "{out}"
    );
    assert!(out.contains("Best layout in detail"));
    let (code, out, _) = run(&[
        "plan",
        "--model",
        "gpt2-350m",
        "--deadline-days",
        "2",
        "--tokens",
        "10B",
        "--gpu",
        "a100-80gb",
        "--json",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["top"][0]["training_days"].as_f64().unwrap() <= 2.0);
}

#[test]
fn budget_and_inferred_cluster_size() {
    let (code, out, err) = run(&[
        "plan",
        "--model",
        "gpt2-1.5b",
        "--tokens",
        "30B",
        "--gpu",
        "a100-80gb",
        "--budget-usd",
        "20000",
        "--json",
        "--top",
        "3",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let top = v["top"].as_array().unwrap();
    assert!(!top.is_empty());
    assert!(top
        .iter()
        .all(|t| t["cost_usd"].as_f64().unwrap() <= 20000.0));
    let days: Vec<f64> = top
        .iter()
        .map(|t| t["training_days"].as_f64().unwrap())
        .collect();
    assert!(days.windows(2).all(|w| w[0] <= w[1]), "{days:?}");
    // --dp 2 --tp 4 --pp 2 without --gpus means a 16-GPU cluster.
    let (code, out, err) = run(&[
        "estimate",
        "--model",
        "llama2-7b",
        "--dp",
        "2",
        "--tp",
        "4",
        "--pp",
        "2",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["gpus"], 16);
    fails_with(
        &["plan", "--budget-usd", "5", "--deadline-days", "3"],
        &["either --deadline-days or --budget-usd"],
    );
}

#[test]
fn validate_prints_the_table() {
    let (code, out, _) = run(&["validate"]);
    assert_eq!(code, 0);
    assert!(out.contains("Korthikanti") && out.contains("Narayanan") && out.contains("ZeRO"));
}

#[test]
fn config_file_sets_flags_and_rejects_unknown_keys() {
    let good = tmp(
        "good.toml",
        "model = \"llama2-7b\"\ngpus = 8\nzero = 1\nmicro-batch = 2\n",
    );
    let (code, out, err) = run(&["estimate", "--config", good.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["layout"]["micro_batch"], 2);
    assert_eq!(v["layout"]["zero"], 1);
    let bad = tmp("bad.toml", "model = \"llama2-7b\"\nmicro_bach = 2\n");
    fails_with(
        &["estimate", "--config", bad.to_str().unwrap()],
        &["micro_bach"],
    );
    let wrong_type = tmp("wrong.toml", "gpus = \"eight\"\n");
    fails_with(
        &["estimate", "--config", wrong_type.to_str().unwrap()],
        &["gpus"],
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    fails_with(
        &["estimate", "--model", "gpt5"],
        &["unknown model preset 'gpt5'", "llama3-8b"],
    );
    fails_with(
        &["estimate", "--gpu", "v100"],
        &["unknown GPU preset", "h100-sxm"],
    );
    fails_with(
        &[
            "estimate",
            "--model",
            "llama2-7b",
            "--gpus",
            "8",
            "--dp",
            "2",
            "--tp",
            "4",
            "--pp",
            "2",
        ],
        &["dp(2) * tp(4) * pp(2) = 16, but the cluster has 8 GPUs"],
    );
    fails_with(
        &[
            "estimate",
            "--model",
            "gpt2-1.5b",
            "--gpus",
            "8",
            "--tp",
            "2",
        ],
        &["heads (25) is not divisible by tp (2)"],
    );
    fails_with(
        &[
            "estimate",
            "--model",
            "llama2-7b",
            "--gpus",
            "8",
            "--micro-batch",
            "3",
        ],
        &["not divisible by dp(8) * micro-batch(3)"],
    );
    fails_with(
        &["estimate", "--params", "ten"],
        &["--params", "not a number"],
    );
    fails_with(&["estimate", "--tokens=-5B"], &["--tokens"]);
    fails_with(
        &["estimate", "--precision", "fp4"],
        &["--precision", "fp32, bf16-mixed, fp16-mixed, fp8"],
    );
    fails_with(&["estimate", "--gpus", "12"], &["whole nodes of 8"]);
    fails_with(
        &[
            "estimate", "--layers", "0", "--hidden", "64", "--heads", "4",
        ],
        &["layers"],
    );
    let hf = tmp(
        "config.json",
        "{\"model_type\": \"llama\", \"hidden_size\": 4096",
    );
    fails_with(
        &["estimate", "--hf-config", hf.to_str().unwrap()],
        &["--hf-config", "not JSON"],
    );
    fails_with(
        &["estimate", "--hf-config", "/nonexistent/config.json"],
        &["--hf-config", "cannot open"],
    );
    let gpu = tmp("gpu.toml", "name = \"x\"\npeak_bf16_flops = -1.0\n");
    fails_with(
        &["estimate", "--gpu-file", gpu.to_str().unwrap()],
        &["--gpu-file"],
    );
}

#[test]
fn custom_gpu_file_round_trips_from_presets() {
    let (code, toml_text, _) = run(&["presets", "--gpu", "h100-sxm"]);
    assert_eq!(code, 0);
    let edited = toml_text.replace("name = \"h100-sxm\"", "name = \"my-gpu\"");
    let p = tmp("mygpu.toml", &edited);
    let (code, out, err) = run(&[
        "estimate",
        "--model",
        "gpt2-124m",
        "--gpus",
        "8",
        "--gpu-file",
        p.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("my-gpu"));
}

#[test]
fn uneven_pipeline_stages() {
    // 32 layers on 3 stages: balanced by default (no longer refused), shown with the reason.
    let (code, out, err) = run(&[
        "estimate",
        "--model",
        "llama3-8b",
        "--gpus",
        "3",
        "--pp",
        "3",
        "--global-batch",
        "63",
        "--explain",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("Stages      layers per stage ")
            && out.contains("(balanced from predicted stage times)"),
        "{out}"
    );
    assert!(out.contains("pipeline partition"), "{out}");
    // An explicit list is honoured and reported in the JSON.
    let (code, out, err) = run(&[
        "estimate",
        "--model",
        "llama3-8b",
        "--gpus",
        "2",
        "--pp",
        "2",
        "--pp-layers",
        "15,17",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    assert_eq!(v["layout"]["stage_layers"], serde_json::json!([15, 17]));
    assert_eq!(v["layout"]["partition"], "explicit");
    fails_with(
        &[
            "estimate",
            "--model",
            "llama3-8b",
            "--gpus",
            "2",
            "--pp",
            "2",
            "--pp-layers",
            "3,5",
        ],
        &["--pp-layers 3 + 5 = 8, but the model has 32 layers"],
    );
    fails_with(
        &[
            "estimate",
            "--model",
            "llama3-8b",
            "--gpus",
            "2",
            "--pp",
            "2",
            "--pp-layers",
            "16,16,0",
        ],
        &["--pp-layers lists 3 stages, but pp(2) * vpp(1) = 2"],
    );
    fails_with(
        &[
            "estimate",
            "--model",
            "llama3-8b",
            "--gpus",
            "2",
            "--pp",
            "2",
            "--pp-layers",
            "16,x",
        ],
        &["invalid --pp-layers: 'x' is not a whole number"],
    );
    fails_with(
        &[
            "plan",
            "--model",
            "llama3-8b",
            "--gpus",
            "8",
            "--pp-layers",
            "16,16",
        ],
        &["Use --pp-layers with `scaletrain estimate`"],
    );
}

#[test]
fn more_tp_than_gpus_names_the_cause() {
    fails_with(
        &["estimate", "--tp", "16", "--gpus", "8"],
        &["tp(16) * pp(1) = 16 needs more GPUs than the cluster's 8"],
    );
}

#[test]
fn issue_messages_name_the_real_cause() {
    // A negative count is a value error, not an unknown flag.
    fails_with(
        &["estimate", "--tokens", "-5B"],
        &["invalid --tokens: '-5B' must be a positive number"],
    );
    // Papers' "4M tokens" batches are 2^22 tokens: 2048 sequences of 2048.
    let (code, out, err) = run(&["estimate", "--global-batch", "4Mtok"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("global batch 2048 x 2048 tokens"), "{out}");
    fails_with(
        &["estimate", "--global-batch", "5000tok"],
        &["5000 tokens is not a whole number of 2048-token sequences; use e.g. --global-batch 2"],
    );
    // An unmeetable deadline: the best achievable days and layout, and a failing status.
    fails_with(
        &["plan", "--gpus", "64", "--deadline-days", "1"],
        &[
            "no layout meets the deadline of 1 days: the fastest layout that fits takes",
            "64 GPUs: dp",
        ],
    );
    // Nothing passes the batch arithmetic: said so, not "try recompute".
    fails_with(
        &[
            "plan",
            "--gpus",
            "7",
            "--model",
            "llama3-8b",
            "--micro-batch",
            "2",
            "--global-batch",
            "1023",
        ],
        &["No layout divides the global batch"],
    );
    // No Rust enum names in what users read.
    let (code, out, err) = run(&[
        "plan",
        "--gpus",
        "16",
        "--deadline-days",
        "400",
        "--explain",
    ]);
    assert_eq!(code, 0, "{err}");
    for leak in [
        "Bf16Mixed",
        "OneFOneB",
        "Deadline(",
        "Adamw",
        "LayerNorm",
        "None,",
    ] {
        assert!(!out.contains(leak), "'{leak}' in:\n{out}");
    }
    assert!(
        out.contains("objective: cheapest finishing within 400 days"),
        "{out}"
    );
    // --explain under ZeRO-1 does not cite weight or gradient sharding.
    let (code, out, err) = run(&["estimate", "--gpus", "8", "--zero", "1", "--explain"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("keeps the full weights (only ZeRO-3 shards them)"),
        "{out}"
    );
    assert!(
        out.contains("keeps full gradients (ZeRO-2 and -3 shard them)"),
        "{out}"
    );
    assert!(out.contains("outside the tp regions"), "{out}");
}

#[test]
fn zero3_keep_weights_trades_memory_for_gathers() {
    let base = [
        "estimate",
        "--model",
        "llama2-7b",
        "--gpus",
        "16",
        "--zero",
        "3",
        "--micro-batch",
        "1",
        "--json",
    ];
    let get = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let (code, out, err) = run(&args);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).expect("valid JSON")
    };
    let (regather, kept) = (get(&[]), get(&["--zero3-keep-weights"]));
    let f = |v: &serde_json::Value, a: &str, b: &str| v[a][b].as_f64().unwrap();
    assert!(f(&kept, "step_time_secs", "dp_comm") < f(&regather, "step_time_secs", "dp_comm"));
    assert!(
        f(&kept, "memory_per_device_bytes", "weights")
            > f(&regather, "memory_per_device_bytes", "weights")
    );
}

#[test]
fn cost_objective_and_deadline_search_every_node_count() {
    // With --gpus 64, cost considers 8..64 GPUs, so it does not rank like time.
    let (code, out, err) = run(&[
        "plan",
        "--objective",
        "cost",
        "--gpus",
        "64",
        "--top",
        "1",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let cost: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    let (code, out, err) = run(&["plan", "--gpus", "64", "--top", "1", "--json"]);
    assert_eq!(code, 0, "{err}");
    let time: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    assert!(cost["top"][0]["cost_usd"].as_f64() < time["top"][0]["cost_usd"].as_f64());
    assert!(cost["top"][0]["gpus"].as_u64() < Some(64));
    // A deadline search tries every whole number of nodes: only 3 nodes (24 GPUs) meet 13 days
    // within --max-gpus 24 (doubling would have tried 8 and 16 only).
    let (code, out, err) = run(&[
        "plan",
        "--deadline-days",
        "13",
        "--max-gpus",
        "24",
        "--top",
        "1",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    assert_eq!(v["top"][0]["gpus"], 24);
}
