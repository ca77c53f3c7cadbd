//! `scaletrain bench train --precision … --recompute …`: every variant runs in the same process
//! and reports tokens/s, its ratio to the first variant and its predicted memory; bad values
//! are clear errors.

mod common;

use common::run;

const TINY: &[&str] = &[
    "bench",
    "train",
    "--layers",
    "2",
    "--heads",
    "2",
    "--channels",
    "32",
    "--seq-len",
    "16",
    "--batch",
    "2",
    "--vocab",
    "128",
    "--steps",
    "2",
    "--warmup",
    "0",
    "--threads",
    "1",
];

#[test]
fn every_precision_and_recompute_variant_is_timed_and_reported() {
    let mut args = TINY.to_vec();
    args.extend([
        "--precision",
        "fp32,bf16-mixed,fp16-mixed",
        "--recompute",
        "none,full",
        "--json",
    ]);
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "stdout {out} stderr {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    let variants = v["variants"].as_array().expect("variants");
    assert_eq!(variants.len(), 6);
    let key = |x: &serde_json::Value| {
        (
            x["precision"].as_str().unwrap().to_string(),
            x["recompute"].as_str().unwrap().to_string(),
        )
    };
    assert_eq!(key(&variants[0]), ("fp32".into(), "none".into()));
    assert_eq!(key(&variants[5]), ("fp16-mixed".into(), "full".into()));
    assert_eq!(variants[0]["ratio_vs_first"].as_f64(), Some(1.0));
    for x in variants {
        assert!(x["tokens_per_sec"].as_f64().unwrap() > 0.0, "{x}");
        assert!(x["final_loss"].as_f64().unwrap().is_finite(), "{x}");
    }
    let act = |i: usize| variants[i]["activation_bytes"].as_u64().unwrap();
    // fp32 none > fp32 full; bf16 none < fp32 none; bf16 full below bf16 none. (With one
    // layer, full recomputation saves nothing: the workspace is that layer.)
    assert!(act(1) < act(0) && act(2) < act(0) && act(3) < act(2));
    assert!(["amx", "avx512-bf16", "f32-panels"].contains(&v["bf16_matmul"].as_str().unwrap()));
    // Same seed and data: the fp32 variants with and without recomputation end at the same loss.
    assert_eq!(variants[0]["final_loss"], variants[1]["final_loss"]);
}

#[test]
fn unknown_precision_or_recompute_is_a_clear_error() {
    for (flag, value, needle) in [
        (
            "--precision",
            "fp8",
            "not one of fp32, bf16-mixed, fp16-mixed",
        ),
        ("--recompute", "half", "not one of none, selective, full"),
    ] {
        let mut args = TINY.to_vec();
        args.extend([flag, value]);
        let (code, out, err) = run(&args);
        assert_eq!(code, 2, "{flag} {value}: stdout {out} stderr {err}");
        assert!(err.contains(needle), "{flag} {value}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
