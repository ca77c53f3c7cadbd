//! `--offload` end to end: memory shrinks and time grows in the JSON, the host bytes are shown,
//! `plan --offload auto` finds a layout where nothing fits without it, and bad flags are named.

mod common;

use common::run;

fn json(args: &[&str]) -> serde_json::Value {
    let (code, out, err) = run(args);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn offload_shrinks_memory_adds_time_and_is_checked() {
    let base = [
        "estimate",
        "--model",
        "llama2-7b",
        "--gpus",
        "8",
        "--zero",
        "1",
        "--json",
    ];
    let plain = json(&base);
    let off = json(&[&base[..], &["--offload", "optimizer"]].concat());
    let mem = |v: &serde_json::Value, k: &str| v["memory_per_device_bytes"][k].as_f64().unwrap();
    assert!(mem(&off, "total") < mem(&plain, "total") - 20e9);
    assert!(mem(&off, "host_bytes") > 20e9);
    assert_eq!(mem(&plain, "host_bytes"), 0.0);
    let t = |v: &serde_json::Value, k: &str| v["step_time_secs"][k].as_f64().unwrap();
    assert!(t(&off, "offload") > 0.0 && t(&off, "total") > t(&plain, "total"));

    let (code, out, err) = run(&[
        "estimate",
        "--model",
        "llama2-7b",
        "--gpus",
        "8",
        "--zero",
        "3",
        "--offload",
        "both",
        "--offload-device",
        "nvme",
        "--explain",
    ]);
    assert_eq!(code, 0, "{err}");
    for want in [
        "offload both to nvme",
        "(on the host)",
        "offloaded optimizer step",
        "offloaded parameter fetch",
    ] {
        assert!(out.contains(want), "missing '{want}':\n{out}");
    }

    for (args, want) in [
        (
            vec![
                "estimate",
                "--model",
                "llama2-7b",
                "--gpus",
                "8",
                "--zero",
                "1",
                "--offload",
                "params",
            ],
            "needs ZeRO-3",
        ),
        (
            vec![
                "plan",
                "--model",
                "llama2-7b",
                "--gpus",
                "8",
                "--zero",
                "1",
                "--offload",
                "params",
            ],
            "needs ZeRO-3",
        ),
        (
            vec![
                "estimate",
                "--model",
                "llama2-7b",
                "--offload-device",
                "nvme",
            ],
            "add --offload",
        ),
        (
            vec!["estimate", "--model", "llama2-7b", "--offload", "gpu"],
            "not one of none, optimizer, params, both",
        ),
    ] {
        let (code, _, err) = run(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }

    // Llama 2 13B on one H100 fits only with the optimizer offloaded.
    let (code, _, _) = run(&[
        "plan",
        "--model",
        "llama2-13b",
        "--gpus",
        "1",
        "--global-batch",
        "8",
    ]);
    assert_eq!(code, 2);
    let p = json(&[
        "plan",
        "--model",
        "llama2-13b",
        "--gpus",
        "1",
        "--global-batch",
        "8",
        "--offload",
        "auto",
        "--json",
    ]);
    let top = &p["top"][0];
    assert!(
        top["memory_per_device_bytes"]["host_bytes"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{top}"
    );
}

/// Offloaded states are checked against the host: GPT-3 175B on one DGX H100 with weights and
/// optimizer offloaded to CPU needs 2·P ≈ 349 GB per GPU of the node's 2 TB / 8 = 250 GB
/// (232.83 GiB); `estimate` says so in the table, the JSON and `--explain`, NVMe fits, and
/// `plan` refuses with the reason and a non-zero status.
#[test]
fn offload_is_checked_against_host_dram_and_nvme() {
    let base = [
        "estimate",
        "--model",
        "gpt3-175b",
        "--gpus",
        "8",
        "--zero",
        "3",
        "--recompute",
        "full",
        "--micro-batch",
        "1",
        "--global-batch",
        "64",
        "--offload",
        "both",
    ];
    let (code, out, err) = run(&base);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("232.83 GiB per GPU available on the host -> DOES NOT FIT on the host"),
        "{out}"
    );
    assert!(
        out.contains("offloaded states DO NOT FIT on the host"),
        "{out}"
    );
    let v = json(&[&base[..], &["--json"]].concat());
    assert_eq!(v["fits"], false);
    assert_eq!(v["memory_per_device_bytes"]["host_capacity"], 250e9);
    let (code, out, err) = run(&[&base[..], &["--explain"]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(
            "232.83 GiB per GPU available (1862.65 GiB DRAM per node / 8 GPUs) -> DOES NOT FIT"
        ),
        "{out}"
    );
    let v = json(&[&base[..], &["--offload-device", "nvme", "--json"]].concat());
    assert_eq!(v["fits"], true);
    assert_eq!(v["memory_per_device_bytes"]["host_capacity"], 3.84e12);

    let (code, out, err) = run(&[
        "plan",
        "--model",
        "gpt3-175b",
        "--gpus",
        "8",
        "--offload",
        "both",
        "--global-batch",
        "64",
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("offload more than the host holds") && err.contains("--offload-device nvme"),
        "{err}"
    );
    assert!(
        out.contains("offloaded states exceed the host's DRAM or NVMe per node"),
        "{out}"
    );
}
