//! Mixture-of-experts end to end: a Mixtral config.json, `--ep`, the expert flags, the JSON
//! fields, the planner's ep axis and the errors a user hits.

mod common;

use common::{run, TempDir};

const MIXTRAL: &str = r#"{"model_type":"mixtral","num_hidden_layers":32,"hidden_size":4096,
    "num_attention_heads":32,"num_key_value_heads":8,"intermediate_size":14336,
    "vocab_size":32000,"max_position_embeddings":4096,"num_local_experts":8,
    "num_experts_per_tok":2,"tie_word_embeddings":false}"#;

fn json(args: &[&str]) -> serde_json::Value {
    let (code, out, err) = run(args);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn mixtral_estimate_counts_active_parameters_and_the_all_to_all() {
    let dir = TempDir::new("moe-cli", "mixtral");
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, MIXTRAL).unwrap();
    let cfg = cfg.to_str().unwrap();
    let base = [
        "estimate",
        "--hf-config",
        cfg,
        "--gpus",
        "16",
        "--zero",
        "1",
        "--global-batch",
        "64",
        "--json",
    ];
    let e1 = json(&[&base[..], &["--ep", "1"]].concat());
    let e8 = json(&[&base[..], &["--ep", "8"]].concat());
    assert_eq!(e8["schema_version"], 3);
    assert_eq!(e8["parameters"], 46_702_792_704u64);
    assert_eq!(e8["active_parameters"], 12_879_925_248u64);
    assert_eq!(e8["model"]["moe"]["experts"], 8);
    assert_eq!(e8["layout"]["ep"], 8);
    assert_eq!(e1["step_time_secs"]["ep_comm"], 0.0);
    assert!(e8["step_time_secs"]["ep_comm"].as_f64().unwrap() > 0.0);
    let w = |e: &serde_json::Value| e["memory_per_device_bytes"]["weights"].as_f64().unwrap();
    assert!(w(&e8) < w(&e1) / 4.0, "{} vs {}", w(&e8), w(&e1));
    // Overlapping the all-to-alls with compute (--ep-comm-overlap) exposes less of them.
    let o8 = json(&[&base[..], &["--ep", "8", "--ep-comm-overlap"]].concat());
    let ep = |e: &serde_json::Value| e["step_time_secs"]["ep_comm"].as_f64().unwrap();
    assert!(ep(&o8) < ep(&e8), "{} vs {}", ep(&o8), ep(&e8));
    // FLOPs per token are the active parameters' (hand-derived in crates/plan/tests/moe.rs).
    assert_eq!(e8["flops_per_token"], 82_933_972_992.0);

    let (code, out, err) = run(&[
        "estimate",
        "--hf-config",
        cfg,
        "--gpus",
        "16",
        "--ep",
        "8",
        "--global-batch",
        "64",
        "--explain",
    ]);
    assert_eq!(code, 0, "{err}");
    for want in [
        "Experts     8 routed experts of ffn 14336, top-2, dropless",
        "expert all-to-all",
        "active parameters per token",
        "expert-parallel all-to-all per step",
        "routed experts",
        // 4096 tokens x top-2 = 8192 copies x H100's fitted 2.920e-7 s.
        "8192 token copies per rank and MoE layer x 2.920e-7 s (h100-sxm's expert_secs_per_copy)",
    ] {
        assert!(out.contains(want), "missing '{want}' in:\n{out}");
    }

    // The planner searches ep for a MoE model and shows it.
    let (code, out, err) = run(&[
        "plan",
        "--hf-config",
        cfg,
        "--gpus",
        "16",
        "--global-batch",
        "64",
        "--top",
        "40",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let p: serde_json::Value = serde_json::from_str(&out).unwrap();
    let eps: std::collections::BTreeSet<u64> = p["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["layout"]["ep"].as_u64().unwrap())
        .collect();
    assert!(eps.len() > 1, "the planner tried one ep only: {eps:?}");
}

#[test]
fn expert_flags_make_a_moe_model_and_bad_ones_are_named() {
    let e = json(&[
        "estimate",
        "--model",
        "llama3-8b",
        "--experts",
        "8",
        "--top-k",
        "2",
        "--expert-ffn",
        "7168",
        "--gpus",
        "8",
        "--ep",
        "4",
        "--json",
    ]);
    assert_eq!(e["model"]["moe"]["expert_ffn"], 7168);
    assert!(e["model"]["name"].as_str().unwrap().contains("modified"));
    assert!(e["active_parameters"].as_u64() < e["parameters"].as_u64());
    for (args, want) in [
        (
            vec![
                "estimate",
                "--model",
                "llama3-8b",
                "--gpus",
                "8",
                "--ep",
                "2",
            ],
            "needs a mixture-of-experts model",
        ),
        (
            vec!["plan", "--model", "llama3-8b", "--gpus", "8", "--ep", "2"],
            "needs a mixture-of-experts model",
        ),
        (
            vec!["estimate", "--model", "llama3-8b", "--top-k", "2"],
            "add --experts N",
        ),
        (
            vec![
                "estimate",
                "--model",
                "llama3-8b",
                "--experts",
                "8",
                "--top-k",
                "9",
            ],
            "top_k",
        ),
        (
            vec![
                "estimate",
                "--model",
                "llama3-8b",
                "--experts",
                "8",
                "--gpus",
                "8",
                "--ep",
                "3",
            ],
            "experts (8) are not divisible by ep(3)",
        ),
    ] {
        let (code, _, err) = run(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
