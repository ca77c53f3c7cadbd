//! `scaletrain serve`'s API against the command line: the same JSON for the same flags, the same
//! error text for the same bad flags, 4xx (never a 5xx or a crash) for malformed requests, and a
//! short mixed load after which the server still answers. The page itself is driven in a real
//! browser by `page.rs`.

mod common;
mod serve_util;

use std::time::Duration;

use common::run;
use serde_json::Value;
use serve_util::Server;

fn cli_json(args: &[&str]) -> Value {
    let (code, out, err) = run(args);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

fn query(kv: &[(&str, &str)]) -> String {
    kv.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn flags<'a>(cmd: &'a str, kv: &[(&'a str, &'a str)]) -> Vec<String> {
    let mut v = vec![cmd.to_string()];
    for (k, val) in kv {
        v.push(format!("--{k}"));
        if *val != "true" {
            v.push(val.to_string());
        }
    }
    v
}

#[test]
fn api_answers_equal_the_command_lines_json() {
    let s = Server::start();
    let mut c = s.client();
    let cases: [&[(&str, &str)]; 3] = [
        &[
            ("model", "llama3-8b"),
            ("gpus", "16"),
            ("zero", "1"),
            ("micro-batch", "2"),
        ],
        &[
            ("params", "70B"),
            ("gpus", "256"),
            ("tp", "8"),
            ("pp", "4"),
            ("sequence-parallel", "true"),
            ("recompute", "selective"),
        ],
        &[("model", "gpt2-1.5b"), ("gpus", "8"), ("gpu", "a100-80gb")],
    ];
    for kv in cases {
        let mut args = flags("estimate", kv);
        args.push("--json".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let want = cli_json(&args);
        let r = c.get(&format!("/api/estimate?{}", query(kv))).unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            serde_json::from_str::<Value>(&r.body).unwrap(),
            want,
            "{kv:?}"
        );
        // The same flags as a JSON body.
        let body: serde_json::Map<String, Value> = kv
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        let r = c
            .post_json("/api/estimate", &Value::Object(body).to_string())
            .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&r.body).unwrap(),
            want,
            "{kv:?} (POST)"
        );
    }
    // plan --json, apart from the time the search took.
    let kv = [
        ("model", "llama3-8b"),
        ("gpus", "64"),
        ("top", "5"),
        ("objective", "cost"),
    ];
    let mut args = flags("plan", &kv);
    args.push("--json".into());
    let mut want = cli_json(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let r = c.get(&format!("/api/plan?{}", query(&kv))).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let mut got: Value = serde_json::from_str(&r.body).unwrap();
    for v in [&mut want, &mut got] {
        assert!(v["search_secs"].as_f64().unwrap() >= 0.0);
        v["search_secs"] = Value::Null;
    }
    assert_eq!(got["top"].as_array().unwrap().len(), 5);
    assert_eq!(got, want);
    for (path, cmd) in [("/api/presets", "presets"), ("/api/validate", "validate")] {
        let r = c.get(path).unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let want = cli_json(&[cmd, "--json"]);
        assert_eq!(
            serde_json::from_str::<Value>(&r.body).unwrap(),
            want,
            "{path}"
        );
    }
    // The page's files are embedded.
    for (path, needle) in [
        ("/", "<title>scaletrain planner"),
        ("/app.js", "/api/estimate"),
        ("/charts.js", "paretoFront"),
        ("/style.css", "font"),
    ] {
        let r = c.get(path).unwrap();
        assert!(
            r.status == 200 && r.body.contains(needle),
            "{path}: {}",
            r.status
        );
    }
}

#[test]
fn bad_inputs_get_the_command_lines_error_next_to_their_field() {
    let s = Server::start();
    let mut c = s.client();
    // (query, the CLI's flags, the field the error must name)
    let cases: [(&str, &[&str], Option<&str>); 7] = [
        (
            "model=llama3-8b&gpus=abc",
            &["--model", "llama3-8b", "--gpus", "abc"],
            Some("gpus"),
        ),
        ("model=llama9", &["--model", "llama9"], Some("model")),
        (
            "model=llama3-8b&gpus=8&tp=3",
            &["--model", "llama3-8b", "--gpus", "8", "--tp", "3"],
            Some("tp"),
        ),
        (
            "layers=2&hidden=64&heads=0",
            &["--layers", "2", "--hidden", "64", "--heads", "0"],
            Some("heads"),
        ),
        (
            "model=llama3-8b&gpus=18446744073709551615",
            &["--model", "llama3-8b", "--gpus", "18446744073709551615"],
            Some("gpus"),
        ),
        (
            "model=llama3-8b&tokens=1e300",
            &["--model", "llama3-8b", "--tokens", "1e300"],
            Some("tokens"),
        ),
        (
            "model=llama3-8b&gpus=8&pp=2&pp-layers=10,10",
            &[
                "--model",
                "llama3-8b",
                "--gpus",
                "8",
                "--pp",
                "2",
                "--pp-layers",
                "10,10",
            ],
            Some("pp-layers"),
        ),
    ];
    for (q, args, field) in cases {
        let mut a = vec!["estimate"];
        a.extend_from_slice(args);
        let (code, _, err) = run(&a);
        assert_eq!(code, 2, "{a:?}");
        let first = err.lines().next().unwrap().trim_start_matches("error: ");
        let r = c.get(&format!("/api/estimate?{q}")).unwrap();
        assert_eq!(r.status, 400, "{q}: {}", r.body);
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert!(
            v["error"].as_str().unwrap().contains(first),
            "{q}: API says {:?}, the command line {first:?}",
            v["error"]
        );
        assert_eq!(v["field"].as_str(), field, "{q}: {v}");
    }
    // A pasted config.json is checked by the same parser; the temporary file's path is hidden.
    let r = c
        .post_json(
            "/api/estimate",
            r#"{"hf-config-json": "{\"model_type\": \"llama\"}"}"#,
        )
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(
        r.body.contains("--hf-config config.json: ") && r.body.contains("num_attention_heads"),
        "{}",
        r.body
    );
    assert!(!r.body.contains("scaletrain-serve-"), "{}", r.body);
    let llama = r#"{"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 8192}"#;
    let r = c
        .post_json(
            "/api/estimate",
            &serde_json::json!({"hf-config-json": llama, "gpus": 8}).to_string(),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        v["parameters"], 8_030_261_248u64,
        "Llama-3-8B's exact count"
    );
    // Files on the server are not the API's to read.
    for q in [
        "hf-config=/etc/passwd",
        "gpu-file=/etc/passwd",
        "config=/etc/passwd",
    ] {
        let r = c.get(&format!("/api/estimate?{q}")).unwrap();
        assert_eq!(r.status, 400, "{q}");
        assert!(!r.body.contains("root:"), "{}", r.body);
    }
}

#[test]
fn malformed_requests_get_4xx_and_the_server_survives_a_mixed_load() {
    let s = Server::start();
    let mut c = s.client();
    let r = c.request("GET", "/api/presets", None).unwrap();
    assert_eq!(r.status, 200);
    let cases: [(&str, &str, Option<&str>, u16); 5] = [
        ("POST", "/api/plan", Some("{\"gpus\": [1]}"), 400),
        ("POST", "/api/estimate", Some("not json"), 400),
        ("DELETE", "/api/estimate", None, 405),
        ("GET", "/nope", None, 404),
        ("POST", "/api/validate", Some("{}"), 405),
    ];
    for (m, path, body, want) in cases {
        let r = c
            .request(m, path, body.map(|b| ("application/json", b.as_bytes())))
            .unwrap();
        assert_eq!(r.status, want, "{m} {path}: {}", r.body);
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert!(!v["error"].as_str().unwrap().is_empty());
    }
    let r = c
        .request("POST", "/api/estimate", Some(("text/plain", b"{}")))
        .unwrap();
    assert_eq!(r.status, 415, "cross-site form posts are refused");
    // The mix includes bad JSON, huge numbers, absurd shapes, unknown flags, raw garbage.
    let n = 2 * serve::load::MIX.len();
    let report = serve::load::run(&s.addr, n, 3, Duration::from_secs(60));
    assert_eq!(report.sent(), n as u64);
    for (name, k) in &report.kinds {
        assert_eq!(
            k.unexpected, 0,
            "{name}: {:?} {:?}",
            k.statuses, k.first_unexpected
        );
    }
    let mut s = s;
    assert!(
        s.child.try_wait().unwrap().is_none(),
        "the server is still running"
    );
    assert_eq!(c.get("/api/presets").unwrap().status, 200);
}
