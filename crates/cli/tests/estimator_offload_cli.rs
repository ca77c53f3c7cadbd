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
