//! A bounded load generator for a running server: a fixed mix of good and bad requests (bad
//! JSON, huge numbers, absurd shapes, unknown flags, wrong methods, malformed HTTP) sent by a
//! few keep-alive clients, with each answer's status checked against what that kind must get.
//! `scaletrain bench serve` runs it; so does a test, with fewer requests.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::client::Client;

/// One kind of request in the mix.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    /// Short name for the report.
    pub name: &'static str,
    /// Method.
    pub method: &'static str,
    /// Path and query.
    pub path: &'static str,
    /// JSON body for POST (sent as `application/json`).
    pub body: Option<&'static str>,
    /// Raw bytes written to a fresh socket instead of a well-formed request.
    pub raw: Option<&'static str>,
    /// The status class it must get: 2 (2xx) or 4 (4xx).
    pub expect_class: u16,
}

const fn get(name: &'static str, path: &'static str, expect_class: u16) -> Kind {
    Kind {
        name,
        method: "GET",
        path,
        body: None,
        raw: None,
        expect_class,
    }
}

const fn post(
    name: &'static str,
    path: &'static str,
    body: &'static str,
    expect_class: u16,
) -> Kind {
    Kind {
        name,
        method: "POST",
        path,
        body: Some(body),
        raw: None,
        expect_class,
    }
}

const fn raw(name: &'static str, bytes: &'static str) -> Kind {
    Kind {
        name,
        method: "RAW",
        path: "",
        body: None,
        raw: Some(bytes),
        expect_class: 4,
    }
}

/// The mixed workload: request `i` is `MIX[i % MIX.len()]`.
pub const MIX: &[Kind] = &[
    get("estimate", "/api/estimate?model=llama3-8b&gpus=16&zero=1&micro-batch=2", 2),
    post("estimate-post", "/api/estimate", r#"{"params":"70B","gpus":256,"tp":8,"pp":4,"sequence-parallel":true,"recompute":"selective","explain":true}"#, 2),
    get("estimate-search", "/api/estimate?model=gpt2-1.5b&gpus=8", 2),
    get("plan", "/api/plan?model=llama3-8b&gpus=64&top=5", 2),
    get("page", "/", 2),
    get("presets", "/api/presets", 2),
    get("validate", "/api/validate", 2),
    post("bad-json", "/api/estimate", r#"{"model": "llama3-8b", "gpus": }"#, 4),
    post("json-array", "/api/plan", "[1, 2, 3]", 4),
    get("huge-number", "/api/estimate?model=llama3-8b&gpus=99999999999999999999999", 4),
    get("huge-batch", "/api/estimate?model=llama3-8b&gpus=8&global-batch=18446744073709551615", 4),
    get("huge-cluster", "/api/estimate?model=llama3-8b&gpus=18446744073709551615", 4),
    get("absurd-shape", "/api/estimate?layers=1000000000&hidden=3&heads=7", 4),
    get("zero-heads", "/api/estimate?layers=2&hidden=64&heads=0", 4),
    get("negative", "/api/estimate?model=llama3-8b&gpus=-4", 4),
    get("bad-layout", "/api/estimate?model=llama3-8b&gpus=8&tp=3", 4),
    get("unknown-flag", "/api/estimate?modle=llama3-8b", 4),
    get("file-flag", "/api/estimate?hf-config=/etc/passwd", 4),
    get("huge-sweep", "/api/plan?model=llama3-8b&deadline-days=30&max-gpus=18446744073709551615", 4),
    get("bad-escape", "/api/estimate?model=%zz", 4),
    post("unknown-preset", "/api/plan", r#"{"model":"llama9-1t"}"#, 4),
    get("not-found", "/api/nothing", 4),
    post("wrong-method", "/api/presets", "{}", 4),
    raw("garbage", "\x00\x01 not http at all\r\n\r\n"),
    raw("chunked", "POST /api/estimate HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    raw("oversized-body", "POST /api/estimate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 999999999\r\n\r\n{"),
];

/// What one kind got.
#[derive(Debug, Clone, Default)]
pub struct KindStats {
    /// Requests sent.
    pub sent: u64,
    /// Responses by status.
    pub statuses: BTreeMap<u16, u64>,
    /// Responses outside the expected class (or transport failures).
    pub unexpected: u64,
    /// Latencies, seconds.
    pub latencies: Vec<f64>,
    /// The first unexpected answer, for the report.
    pub first_unexpected: Option<String>,
}

/// The whole run.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Per kind, in [`MIX`] order.
    pub kinds: Vec<(&'static str, KindStats)>,
    /// Wall-clock seconds.
    pub secs: f64,
}

impl LoadReport {
    /// Requests sent.
    pub fn sent(&self) -> u64 {
        self.kinds.iter().map(|(_, k)| k.sent).sum()
    }

    /// Answers outside their expected class, plus transport errors.
    pub fn unexpected(&self) -> u64 {
        self.kinds.iter().map(|(_, k)| k.unexpected).sum()
    }
}

/// Sends one raw, malformed request on a fresh socket; returns the status it was answered with.
fn send_raw(addr: &str, bytes: &str, timeout: Duration) -> Result<u16, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(bytes.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    // The server answers and closes; a reset after the answer is fine.
    let _ = s.take(1 << 16).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.split(' ')
        .nth(1)
        .and_then(|x| x.parse().ok())
        .ok_or_else(|| {
            format!(
                "no status line in {:?}",
                text.chars().take(80).collect::<String>()
            )
        })
}

/// Sends `total` requests from `clients` threads (each on its own keep-alive connection),
/// cycling through [`MIX`].
pub fn run(addr: &str, total: usize, clients: usize, timeout: Duration) -> LoadReport {
    let clients = clients.max(1);
    let start = Instant::now();
    let parts: Vec<Vec<KindStats>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || {
                    let mut stats = vec![KindStats::default(); MIX.len()];
                    let mut client = Client::new(addr, timeout);
                    for i in (c..total).step_by(clients) {
                        let k = &MIX[i % MIX.len()];
                        let t = Instant::now();
                        let got = match k.raw {
                            Some(bytes) => send_raw(addr, bytes, timeout),
                            None => client
                                .request(
                                    k.method,
                                    k.path,
                                    k.body.map(|b| ("application/json", b.as_bytes())),
                                )
                                .map(|r| r.status)
                                .map_err(|e| crate::error::chain(&e)),
                        };
                        let st = &mut stats[i % MIX.len()];
                        st.sent += 1;
                        st.latencies.push(t.elapsed().as_secs_f64());
                        let ok = match got {
                            Ok(code) => {
                                *st.statuses.entry(code).or_default() += 1;
                                (code / 100 == k.expect_class)
                                    .then_some(())
                                    .ok_or(format!("status {code}"))
                            }
                            Err(e) => Err(e),
                        };
                        if let Err(e) = ok {
                            st.unexpected += 1;
                            st.first_unexpected.get_or_insert(e);
                        }
                    }
                    stats
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec![KindStats::default(); MIX.len()])
            })
            .collect()
    });
    let mut kinds: Vec<(&'static str, KindStats)> =
        MIX.iter().map(|k| (k.name, KindStats::default())).collect();
    for part in parts {
        for (acc, p) in kinds.iter_mut().zip(part) {
            let a = &mut acc.1;
            a.sent += p.sent;
            a.unexpected += p.unexpected;
            a.latencies.extend(p.latencies);
            for (code, n) in p.statuses {
                *a.statuses.entry(code).or_default() += n;
            }
            if a.first_unexpected.is_none() {
                a.first_unexpected = p.first_unexpected;
            }
        }
    }
    LoadReport {
        kinds,
        secs: start.elapsed().as_secs_f64(),
    }
}

/// The `q`-quantile (0..=1) of `xs` (sorted copy; nearest rank).
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize]
}
