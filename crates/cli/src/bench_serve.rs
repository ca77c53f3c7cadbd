//! `scaletrain bench serve`: starts `scaletrain serve --port 0` as a child process, times the
//! API over loopback (an estimate, an estimate that searches for its layout, the plan for a
//! 70B model on 1,024 GPUs and a deadline search over cluster sizes), then sends a bounded mix of good and malformed requests and checks
//! every answer's status class and that the server is still up afterwards.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Args;
use serve::client::Client;
use serve::load::{self, quantile};

#[derive(Debug, Args)]
pub struct BenchServeArgs {
    /// Timed calls per API request (median, p90 and max are printed).
    #[arg(long, default_value_t = 30)]
    pub rounds: usize,
    /// Requests in the mixed load (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    pub requests: usize,
    /// Concurrent client connections for the load.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
}

/// Kills the child server when dropped (also on an early error).
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server() -> Result<(ServerProcess, String)> {
    let exe = std::env::current_exe().context("finding the scaletrain binary")?;
    let mut child = Command::new(exe)
        .args(["serve", "--port", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting `scaletrain serve --port 0`")?;
    let out = child.stdout.take().context("no stdout from the server")?;
    let proc = ServerProcess(child);
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .context("reading the server's address")?;
    let Some(port) = line
        .split("http://localhost:")
        .nth(1)
        .and_then(|r| r.split('/').next())
    else {
        bail!("the server printed {line:?}, not its address");
    };
    Ok((proc, format!("127.0.0.1:{port}")))
}

fn ms(x: f64) -> String {
    format!("{:.2} ms", x * 1e3)
}

pub fn run(a: &BenchServeArgs) -> Result<()> {
    let (mut proc, addr) = start_server()?;
    let mut c = Client::new(&addr, Duration::from_secs(60));
    let timed: [(&str, &str); 4] = [
        (
            "estimate llama3-8b, 16 GPUs, layout given",
            "/api/estimate?model=llama3-8b&gpus=16&zero=1&micro-batch=2",
        ),
        (
            "estimate llama3-70b, 256 GPUs, layout searched",
            "/api/estimate?model=llama3-70b&gpus=256",
        ),
        (
            "plan llama3-70b on 1024 GPUs (top 10)",
            "/api/plan?model=llama3-70b&gpus=1024&top=10",
        ),
        (
            "plan llama3-70b, 30-day deadline, 8..4096 GPUs",
            "/api/plan?model=llama3-70b&deadline-days=30&top=20",
        ),
    ];
    println!(
        "API latency over loopback ({} calls each, one connection; {} cores):",
        a.rounds,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for (name, path) in timed {
        let mut t = Vec::with_capacity(a.rounds);
        for _ in 0..a.rounds.max(1) {
            let s = Instant::now();
            let r = c.get(path)?;
            t.push(s.elapsed().as_secs_f64());
            if r.status != 200 {
                bail!("{path}: status {} {}", r.status, r.body);
            }
        }
        println!(
            "  {name:<48} median {:>10}  p90 {:>10}  max {:>10}",
            ms(quantile(&t, 0.5)),
            ms(quantile(&t, 0.9)),
            ms(quantile(&t, 1.0))
        );
    }
    if a.requests > 0 {
        let r = load::run(&addr, a.requests, a.clients, Duration::from_secs(60));
        println!(
            "\nMixed load: {} requests from {} clients in {:.2} s ({:.0} requests/s), {} answered outside their expected status class",
            r.sent(),
            a.clients,
            r.secs,
            r.sent() as f64 / r.secs,
            r.unexpected()
        );
        println!(
            "  {:<16} {:>6} {:>10} {:>10}  statuses",
            "kind", "sent", "median", "max"
        );
        for (name, k) in &r.kinds {
            let st: Vec<String> = k
                .statuses
                .iter()
                .map(|(c, n)| format!("{c} x{n}"))
                .collect();
            println!(
                "  {name:<16} {:>6} {:>10} {:>10}  {}{}",
                k.sent,
                ms(quantile(&k.latencies, 0.5)),
                ms(quantile(&k.latencies, 1.0)),
                st.join(", "),
                k.first_unexpected
                    .as_ref()
                    .map(|e| format!("  UNEXPECTED: {e}"))
                    .unwrap_or_default()
            );
        }
        let alive = proc.0.try_wait()?.is_none() && c.get("/api/presets")?.status == 200;
        println!(
            "server after the load: {}",
            if alive { "up, answering" } else { "DOWN" }
        );
        if !alive || r.unexpected() > 0 {
            bail!("the load found problems (see above)");
        }
    }
    Ok(())
}
