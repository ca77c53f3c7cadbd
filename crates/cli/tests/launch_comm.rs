//! `scaletrain launch` and `scaletrain bench comm`, run as real processes.
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_scaletrain")
}

fn run(args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let out = Command::new(bin())
        .args(args)
        .env_remove("SCALETRAIN_JOB_TOKEN")
        .output()
        .expect("run scaletrain");
    (out, t.elapsed())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn launch_sets_torchrun_environment_and_prefixes_output() {
    let (out, _) = run(&["launch", "--nproc-per-node", "3", "--", "sh", "-c", "echo rank=$RANK local=$LOCAL_RANK world=$WORLD_SIZE lw=$LOCAL_WORLD_SIZE addr=$MASTER_ADDR port=${MASTER_PORT:+set} token=${#SCALETRAIN_JOB_TOKEN}"]);
    let so = text(&out.stdout);
    assert!(out.status.success(), "{so}\n{}", text(&out.stderr));
    for r in 0..3 {
        let want =
            format!("[rank {r}] rank={r} local={r} world=3 lw=3 addr=127.0.0.1 port=set token=32");
        assert!(so.lines().any(|l| l == want), "missing {want:?} in\n{so}");
    }
}

#[test]
fn launch_stops_the_job_when_a_rank_fails() {
    let (out, took) = run(&[
        "launch",
        "--nproc-per-node",
        "3",
        "--grace-secs",
        "1",
        "--",
        "sh",
        "-c",
        "if [ $RANK = 1 ]; then exit 7; fi; sleep 30",
    ]);
    let se = text(&out.stderr);
    assert!(!out.status.success());
    assert!(se.contains("rank 1 exited with status 7"), "{se}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn launch_reports_a_rank_killed_by_a_signal() {
    let (out, took) = run(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--grace-secs",
        "1",
        "--",
        "sh",
        "-c",
        "if [ $RANK = 0 ]; then kill -9 $$; fi; sleep 30",
    ]);
    let se = text(&out.stderr);
    assert!(!out.status.success());
    assert!(se.contains("rank 0 was killed by signal 9"), "{se}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn ctrl_c_stops_every_process() {
    let dir = std::env::temp_dir().join(format!("st-launch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!("echo $$ > {}/$RANK.pid; exec sleep 30", dir.display());
    let mut child = Command::new(bin())
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--grace-secs",
            "1",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while (0..2).any(|r| !dir.join(format!("{r}.pid")).exists()) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "children never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(t.elapsed() < Duration::from_secs(10));
    for r in 0..2 {
        let pid: i32 = std::fs::read_to_string(dir.join(format!("{r}.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: probing a pid with signal 0.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "rank {r} (pid {pid}) survived Ctrl-C");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn results(json_text: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(json_text).unwrap_or_else(|e| panic!("{e}: {json_text}"));
    v["results"].as_array().expect("results array").clone()
}

#[test]
fn bench_comm_json_schema_threads() {
    let (out, _) = run(&[
        "bench",
        "comm",
        "--transport",
        "threads",
        "--nproc",
        "3",
        "--sizes",
        "4K,1M",
        "--iters",
        "2",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows = results(&text(&out.stdout));
    assert_eq!(rows.len(), 2);
    for (row, bytes) in rows.iter().zip([4096, 1 << 20]) {
        assert_eq!(row["bytes"], bytes);
        assert_eq!(row["algo"], "ring");
        assert_eq!(row["transport"], "threads");
        for k in ["latency_us", "algbw_gbps", "busbw_gbps"] {
            assert!(row[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {row}");
        }
        let (alg, bus) = (
            row["algbw_gbps"].as_f64().unwrap(),
            row["busbw_gbps"].as_f64().unwrap(),
        );
        assert!(
            (bus / alg - 4.0 / 3.0).abs() < 1e-9,
            "busbw = algbw * 2(n-1)/n"
        );
    }
}

#[test]
fn bench_comm_processes_every_transport_and_algo() {
    for (transport, algo) in [
        ("tcp", "ring"),
        ("shm", "tree"),
        ("tcp", "ps"),
        ("shm", "auto"),
    ] {
        let (out, _) = run(&[
            "bench",
            "comm",
            "--transport",
            transport,
            "--algo",
            algo,
            "--nproc",
            "2",
            "--sizes",
            "1K..64K",
            "--factor",
            "8",
            "--iters",
            "3",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{transport}/{algo}: {}",
            text(&out.stderr)
        );
        let rows = results(&text(&out.stdout));
        assert_eq!(rows.len(), 3, "{transport}/{algo}");
        assert!(rows
            .iter()
            .all(|r| r["transport"] == transport && r["algo"] == algo));
    }
}

#[test]
fn launch_runs_a_communicating_job_with_servers() {
    let (out, _) = run(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--servers",
        "1",
        "--",
        bin(),
        "bench",
        "comm",
        "--worker",
        "--algo",
        "ps",
        "--servers",
        "1",
        "--sizes",
        "4K",
        "--iters",
        "2",
    ]);
    let so = text(&out.stdout);
    assert!(out.status.success(), "{so}\n{}", text(&out.stderr));
    assert!(
        so.lines()
            .any(|l| l.starts_with("[rank 0] [{") && l.contains("\"algo\":\"ps\"")),
        "{so}"
    );
}

#[test]
fn bench_comm_async_parameter_server() {
    let (out, _) = run(&[
        "bench",
        "comm",
        "--transport",
        "shm",
        "--algo",
        "ps",
        "--servers",
        "2",
        "--nproc",
        "2",
        "--staleness",
        "1",
        "--sizes",
        "4K,256K",
        "--iters",
        "4",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows = results(&text(&out.stdout));
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["algo"] == "ps"
        && r["nproc"] == 2
        && r["latency_us"].as_f64().is_some_and(|x| x > 0.0)));
}
