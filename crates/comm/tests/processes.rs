//! Real processes: this test binary re-runs itself as the ranks of a job (`worker_entry` with
//! `COMM_TEST_ROLE` set) over TCP and shared memory, on loopback with ephemeral ports.
mod common;
use comm::{init_from_env, Algorithm, ReduceOp};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The child side. Without `COMM_TEST_ROLE` (a normal test run) it does nothing.
#[test]
fn worker_entry() {
    let Ok(role) = std::env::var("COMM_TEST_ROLE") else {
        return;
    };
    if role == "ps" {
        return ps_worker();
    }
    let mut c = match init_from_env() {
        Ok(c) => c,
        Err(e) => {
            println!("ERROR {e}");
            return;
        }
    };
    match role.as_str() {
        "suite" => {
            for (case, h) in common::run_suite(c.as_mut()) {
                println!("CASE {case} {h}");
            }
        }
        "smoke" => {
            let mut b = vec![c.rank() as f32; 1000];
            c.all_reduce(&mut b, ReduceOp::Sum).expect("all_reduce");
            println!("OK {}", b[0]);
        }
        "loop" => {
            // All-reduce until something breaks; used to kill a rank mid-collective.
            c.set_algorithm(Algorithm::Ring);
            let mut b = vec![1.0f32; 1 << 20];
            let mut i = 0u64;
            loop {
                if let Err(e) = c.all_reduce(&mut b, ReduceOp::Max) {
                    println!("ERROR {e}");
                    break;
                }
                if i == 0 {
                    println!("READY");
                }
                i += 1;
            }
        }
        "mesh" => match common::mesh_2x2(c.as_mut(), 3, 8 << 20) {
            Ok(()) => println!("OK"),
            Err(e) => println!("ERROR {e}"),
        },
        "shared_link" => match common::shared_link_2(c.as_mut(), 3) {
            Ok(()) => println!("OK"),
            Err(e) => println!("ERROR {e}"),
        },
        "sendrecv" => match common::sendrecv_ring(c.as_mut(), 8 << 20) {
            Ok(()) => println!("OK"),
            Err(e) => println!("ERROR {e}"),
        },
        "flight" => {
            // Five all-reduces, then rank 3 stops itself (SIGSTOP) before the sixth, and once
            // continued "computes" for 3 s; the others go on into all-reduce #6 and time out.
            let mut b = vec![1.0f32; 1000];
            for i in 0..8 {
                if i == 5 && c.rank() == 3 {
                    println!("STOPPING");
                    let _ = std::io::stdout().flush();
                    // SAFETY: raising a signal on our own process.
                    unsafe { libc::raise(libc::SIGSTOP) };
                    std::thread::sleep(Duration::from_secs(3));
                }
                if let Err(e) = c.all_reduce(&mut b, ReduceOp::Sum) {
                    println!("ERROR {e}");
                    break;
                }
            }
        }
        "desync" => {
            let mut b = vec![1.0f32; 1000];
            let r = if c.rank() == 0 {
                c.all_reduce(&mut b, ReduceOp::Sum)
            } else {
                c.broadcast(&mut b, 1)
            };
            match r {
                Ok(()) => println!("OK"),
                Err(e) => println!("ERROR {e}"),
            }
        }
        other => panic!("unknown role {other}"),
    }
    let _ = std::io::stdout().flush();
}

/// Where rank `rank` of the job on `port` writes its stderr (shown when a test fails).
fn stderr_path(port: u16, rank: usize) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("scaletrain-comm-test-{port}-{rank}.err"))
}

fn stderr_of(port: u16, rank: usize) -> String {
    let text = std::fs::read_to_string(stderr_path(port, rank)).unwrap_or_default();
    text.lines()
        .filter(|l| {
            !l.trim_start().starts_with("at ")
                && !l.contains(": 0x")
                && !l
                    .trim_start()
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_digit())
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The parameter-server role: the last rank serves, the others push and pull (synchronous).
fn ps_worker() {
    let env = comm::JobEnv::from_env().expect("env");
    let connect = || match env.transport {
        comm::Transport::Shm => comm::shm::connect(&env),
        _ => comm::tcp::connect(&env),
    };
    let mut c = connect().unwrap_or_else(|e| panic!("join: {e}"));
    if env.transport == comm::Transport::Shm {
        // Leave and join again on the same port: the stale segment must not be mistaken for the
        // new one. (Not over TCP, where re-binding a released port could race other tests.)
        drop(c);
        c = connect().unwrap_or_else(|e| panic!("rejoin: {e}"));
    }
    let layout = comm::ps::PsLayout::new(env.world_size, 1).expect("layout");
    let len = 70_003;
    if layout.is_server(env.rank) {
        comm::ps::serve(
            &mut c,
            &layout,
            comm::ps::PsMode::Sync,
            ReduceOp::Sum,
            len,
            2,
        )
        .expect("serve");
    } else {
        for step in 0..2 {
            let mut b = common::input(env.rank, len, 20 + step);
            comm::ps::worker_step(&mut c, &layout, &mut b).expect("worker step");
            println!("CASE ps/{step} {}", common::fnv(bytemuck::cast_slice(&b)));
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("ephemeral port")
}

/// Children killed on drop, so a failing test leaves no processes behind.
struct Job {
    port: u16,
    children: Vec<Child>,
    lines: Vec<mpsc::Receiver<String>>,
}

impl Drop for Job {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for r in 0..self.children.len() {
            let _ = std::fs::remove_file(stderr_path(self.port, r));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_rank_env(
    role: &str,
    transport: &str,
    rank: usize,
    n: usize,
    port: u16,
    token: &str,
    timeout_secs: &str,
    extra_env: &[(&str, &str)],
) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "worker_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "--quiet",
        ])
        .env("COMM_TEST_ROLE", role)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", n.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("LOCAL_WORLD_SIZE", n.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("SCALETRAIN_JOB_TOKEN", token)
        .env("SCALETRAIN_TRANSPORT", transport)
        .env("SCALETRAIN_COMM_TIMEOUT_SECS", timeout_secs)
        .envs(extra_env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(
            std::fs::File::create(stderr_path(port, rank))
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
        )
        .spawn()
        .expect("spawn rank");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Only our own lines: the test harness prints its own chatter around them.
        let ours = |l: &String| {
            ["CASE ", "OK", "ERROR", "READY", "STOPPING"]
                .iter()
                .any(|p| l.starts_with(p))
        };
        for line in BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .filter(ours)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn spawn_rank(
    role: &str,
    transport: &str,
    rank: usize,
    n: usize,
    port: u16,
    token: &str,
    timeout_secs: &str,
) -> (Child, mpsc::Receiver<String>) {
    spawn_rank_env(role, transport, rank, n, port, token, timeout_secs, &[])
}

fn start(role: &str, transport: &str, n: usize, timeout_secs: &str) -> (Job, u16, String) {
    let port = free_port();
    let token = format!("tok-{port}-{}", std::process::id());
    let mut job = Job {
        port,
        children: Vec::new(),
        lines: Vec::new(),
    };
    for r in 0..n {
        let (c, l) = spawn_rank(role, transport, r, n, port, &token, timeout_secs);
        job.children.push(c);
        job.lines.push(l);
    }
    (job, port, token)
}

/// Collect every line of rank `r` until its stdout closes or the deadline passes.
fn collect(rx: &mpsc::Receiver<String>, deadline: Instant) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) => out.push(l),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("rank did not finish in time; output so far: {out:?}")
            }
        }
    }
    out
}

fn suite(transport: &str, n: usize) {
    let (job, _, _) = start("suite", transport, n, "20");
    let deadline = Instant::now() + Duration::from_secs(90);
    for r in 0..n {
        let lines = collect(&job.lines[r], deadline);
        let got: Vec<(String, u64)> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("CASE "))
            .map(|l| {
                let (name, h) = l.rsplit_once(' ').expect("case line");
                (name.to_string(), h.parse().expect("hash"))
            })
            .collect();
        assert!(!got.is_empty(), "rank {r} printed no results: {lines:?}");
        common::assert_suite(n, r, &got);
    }
}

#[test]
fn tcp_suite_2() {
    suite("tcp", 2);
}
#[test]
fn tcp_suite_3() {
    suite("tcp", 3);
}
#[test]
fn tcp_suite_4() {
    suite("tcp", 4);
}

fn kill_one(transport: &str) {
    let n = 4;
    let (mut job, _, _) = start("loop", transport, n, "5");
    let deadline = Instant::now() + Duration::from_secs(30);
    for r in 0..n {
        let l = job.lines[r]
            .recv_timeout(deadline - Instant::now())
            .expect("READY");
        assert_eq!(l, "READY", "rank {r}");
    }
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    job.children[2].kill().expect("kill -9 rank 2");
    for r in [0, 1, 3] {
        let lines = collect(&job.lines[r], Instant::now() + Duration::from_secs(8));
        let err = lines
            .iter()
            .find(|l| l.starts_with("ERROR"))
            .unwrap_or_else(|| panic!("rank {r}: no error in {lines:?}"));
        assert!(err.contains(&format!("rank {r}:")), "rank {r}: {err}");
        assert!(
            err.contains("peer rank 2 is gone"),
            "rank {r} does not name the dead rank: {err}"
        );
    }
    // Within the 5 s timeout: detection is by connection loss / process death, not by timing out.
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "survivors took {:?}",
        t.elapsed()
    );
}

#[test]
fn tcp_kill_9_names_the_dead_rank() {
    kill_one("tcp");
}

fn desync(transport: &str) {
    let (job, _, _) = start("desync", transport, 2, "5");
    let deadline = Instant::now() + Duration::from_secs(20);
    let l0 = collect(&job.lines[0], deadline);
    let l1 = collect(&job.lines[1], deadline);
    let e0 = l0
        .iter()
        .find(|l| l.starts_with("ERROR"))
        .unwrap_or_else(|| panic!("rank 0: {l0:?}"));
    assert!(
        e0.contains("desynchronised with rank 1")
            && e0.contains("broadcast")
            && e0.contains("all_reduce"),
        "{e0}"
    );
    assert!(!l1.is_empty(), "rank 1 said nothing");
}

#[test]
fn tcp_desync_is_reported() {
    desync("tcp");
}

#[test]
fn tcp_garbage_and_wrong_token_cannot_join() {
    let n = 2;
    let port = free_port();
    let token = format!("right-{port}");
    let mut job = Job {
        port,
        children: Vec::new(),
        lines: Vec::new(),
    };
    let (c0, l0) = spawn_rank("smoke", "tcp", 0, n, port, &token, "20");
    job.children.push(c0);
    job.lines.push(l0);
    // Random bytes at rank 0's port, while it waits for rank 1.
    let t = Instant::now();
    let mut s = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) if t.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("rank 0 never listened: {e}"),
        }
    };
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let junk: Vec<u8> = (0..8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let _ = s.write_all(&junk);
    drop(s);
    // A process with the wrong token claiming rank 1 is refused and told so.
    let (mut bad, bad_lines) = spawn_rank("smoke", "tcp", 1, n, port, "wrong-token", "20");
    let lines = collect(&bad_lines, Instant::now() + Duration::from_secs(20));
    let _ = bad.wait();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ERROR") && l.contains("wrong job token")),
        "intruder: {lines:?}"
    );
    // The real rank 1 joins and the job completes correctly.
    let (c1, l1) = spawn_rank("smoke", "tcp", 1, n, port, &token, "20");
    job.children.push(c1);
    job.lines.push(l1);
    let deadline = Instant::now() + Duration::from_secs(20);
    assert_eq!(collect(&job.lines[0], deadline), vec!["OK 1".to_string()]);
    assert_eq!(collect(&job.lines[1], deadline), vec!["OK 1".to_string()]);
}

#[test]
fn shm_suite_2() {
    suite("shm", 2);
}
#[test]
fn shm_suite_3() {
    suite("shm", 3);
}
#[test]
fn shm_suite_4() {
    suite("shm", 4);
}
#[test]
fn shm_kill_9_names_the_dead_rank() {
    kill_one("shm");
}
#[test]
fn shm_desync_is_reported() {
    desync("shm");
}
#[test]
fn shm_wrong_token_cannot_join() {
    let port = free_port();
    let mut job = Job {
        port,
        children: Vec::new(),
        lines: Vec::new(),
    };
    let (c0, l0) = spawn_rank("smoke", "shm", 0, 2, port, "right", "2");
    job.children.push(c0);
    job.lines.push(l0);
    let (c1, l1) = spawn_rank("smoke", "shm", 1, 2, port, "wrong", "2");
    job.children.push(c1);
    job.lines.push(l1);
    let deadline = Instant::now() + Duration::from_secs(15);
    let out1 = collect(&job.lines[1], deadline);
    assert!(
        out1.iter()
            .any(|l| l.starts_with("ERROR") && l.contains("wrong job token")),
        "{out1:?}"
    );
    let out0 = collect(&job.lines[0], deadline);
    assert!(
        out0.iter()
            .any(|l| l.starts_with("ERROR") && l.contains("timed out waiting for rank(s) [1]")),
        "{out0:?}"
    );
}

fn ps(transport: &str) {
    let n = 4; // 3 workers, 1 server
    let (job, port, _) = start("ps", transport, n, "20");
    let deadline = Instant::now() + Duration::from_secs(60);
    for r in 0..n - 1 {
        let lines = collect(&job.lines[r], deadline);
        if lines.is_empty() {
            let errs: Vec<String> = (0..n)
                .map(|k| format!("rank {k}: {}", stderr_of(port, k)))
                .collect();
            panic!("worker {r} printed nothing; stderr:\n{}", errs.join("\n"));
        }
        for step in 0..2u64 {
            let grads: Vec<Vec<f32>> = (0..n - 1)
                .map(|k| common::input(k, 70_003, 20 + step))
                .collect();
            let want = common::fnv(bytemuck::cast_slice(&comm::ps::reference_sync(
                &grads,
                ReduceOp::Sum,
            )));
            assert!(
                lines.contains(&format!("CASE ps/{step} {want}")),
                "worker {r} step {step}: {lines:?}"
            );
        }
    }
}

#[test]
fn tcp_parameter_server() {
    ps("tcp");
}
#[test]
fn shm_parameter_server() {
    ps("shm");
}

/// Every rank of a `role` job prints `OK` (with the 5 s timeout, a hang fails fast).
fn all_ok(role: &str, transport: &str, n: usize) {
    let (job, port, _) = start(role, transport, n, "5");
    let deadline = Instant::now() + Duration::from_secs(40);
    for r in 0..n {
        let lines = collect(&job.lines[r], deadline);
        if lines != ["OK"] {
            let errs: Vec<String> = (0..n)
                .map(|k| format!("rank {k}: {}", stderr_of(port, k)))
                .collect();
            panic!(
                "{role} over {transport}, rank {r}: {lines:?}\n{}",
                errs.join("\n")
            );
        }
    }
}

#[test]
fn tcp_sendrecv_8mb_both_ways() {
    all_ok("sendrecv", "tcp", 2);
    all_ok("sendrecv", "tcp", 3);
}
#[test]
fn shm_sendrecv_8mb_both_ways() {
    all_ok("sendrecv", "shm", 2);
    all_ok("sendrecv", "shm", 3);
}
#[test]
fn tcp_groups_progress_independently_in_a_2x2_mesh() {
    all_ok("mesh", "tcp", 4);
}
#[test]
fn shm_groups_progress_independently_in_a_2x2_mesh() {
    all_ok("mesh", "shm", 4);
}
#[test]
fn tcp_two_groups_on_one_link() {
    all_ok("shared_link", "tcp", 2);
}
#[test]
fn shm_two_groups_on_one_link() {
    all_ok("shared_link", "shm", 2);
}

/// Rank 3 of 4 stops (SIGSTOP) between all-reduce #5 and #6: the others time out in #6 and dump
/// their flight recorders, which name rank 3 and the call; then SIGUSR1 + SIGCONT make rank 3
/// dump too (it is "computing" for 3 s), and the four dumps together say it never entered #6.
fn flight_recorder_names_the_stopped_rank(transport: &str) {
    let n = 4;
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("scaletrain-flight-{port}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let token = format!("tok-{port}");
    let mut job = Job {
        port,
        children: Vec::new(),
        lines: Vec::new(),
    };
    let dir_s = dir.to_string_lossy().to_string();
    for r in 0..n {
        let env = [("SCALETRAIN_FLIGHT_DIR", dir_s.as_str())];
        let (c, l) = spawn_rank_env("flight", transport, r, n, port, &token, "2", &env);
        job.children.push(c);
        job.lines.push(l);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for r in 0..3 {
        let lines = collect(&job.lines[r], deadline);
        assert!(
            lines.iter().any(|l| l.starts_with("ERROR")),
            "rank {r}: {lines:?}"
        );
    }
    let read = |ranks: &[usize]| -> Vec<comm::flight::Dump> {
        ranks
            .iter()
            .map(|r| {
                comm::flight::read_dump(&dir.join(format!("flight-rank-{r}.jsonl")))
                    .unwrap_or_else(|e| panic!("rank {r}: {e}"))
            })
            .collect()
    };
    let dumps = read(&[0, 1, 2]);
    for d in &dumps {
        let last = d.records.last().expect("records");
        assert_eq!((last.op.as_str(), last.call), ("all_reduce", 6), "{last:?}");
        assert_ne!(last.status, "ok", "{last:?}");
        assert_eq!(d.records.iter().filter(|r| r.status == "ok").count(), 5);
    }
    let why = comm::flight::diagnose(&dumps);
    assert!(
        why.iter()
            .any(|l| l.starts_with("rank 3 left no dump") && l.contains("all_reduce #6")),
        "{why:#?}"
    );
    // Rank 3 is still stopped: SIGUSR1 waits until SIGCONT, then its watcher thread dumps.
    let pid = job.children[3].id() as i32;
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(pid, libc::SIGUSR1);
        libc::kill(pid, libc::SIGCONT);
    }
    let f3 = dir.join("flight-rank-3.jsonl");
    let t = Instant::now();
    while !f3.exists() && t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100)); // let the writer finish the file
    let all = read(&[0, 1, 2, 3]);
    assert_eq!(all[3].header.reason, "SIGUSR1");
    let why = comm::flight::diagnose(&all);
    assert!(
        why.iter()
            .any(|l| l.starts_with("rank 3 never entered all_reduce #6")
                && l.contains("its last call there: all_reduce #5 (ok)")),
        "{why:#?}"
    );
    drop(job);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tcp_flight_recorder_names_the_stopped_rank() {
    flight_recorder_names_the_stopped_rank("tcp");
}
#[test]
fn shm_flight_recorder_names_the_stopped_rank() {
    flight_recorder_names_the_stopped_rank("shm");
}

/// Rank 1 reaches rank 0 through a recording proxy; the job completes, and the token appears
/// nowhere in the bytes that crossed the wire (both ends proved it with HMACs instead).
#[test]
fn tcp_job_token_never_crosses_the_wire() {
    use std::sync::{Arc, Mutex};
    let port0 = free_port();
    let proxy = TcpListener::bind("127.0.0.1:0").expect("proxy listener");
    let proxy_port = proxy.local_addr().expect("addr").port();
    let token = format!("secret-token-{port0}-do-not-leak");
    let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
    let relay = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let (from1, _) = proxy.accept().expect("rank 1 connects");
            let t = Instant::now();
            let to0 = loop {
                match TcpStream::connect(("127.0.0.1", port0)) {
                    Ok(s) => break s,
                    Err(e) if t.elapsed() > Duration::from_secs(10) => panic!("rank 0: {e}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            let pump = |mut a: TcpStream, mut b: TcpStream, seen: Arc<Mutex<Vec<u8>>>| {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        match std::io::Read::read(&mut a, &mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(k) => {
                                seen.lock().unwrap().extend_from_slice(&buf[..k]);
                                if b.write_all(&buf[..k]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = b.shutdown(std::net::Shutdown::Write);
                })
            };
            let up = pump(
                from1.try_clone().unwrap(),
                to0.try_clone().unwrap(),
                seen.clone(),
            );
            let down = pump(to0, from1, seen);
            let _ = up.join();
            let _ = down.join();
        })
    };
    let mut job = Job {
        port: port0,
        children: Vec::new(),
        lines: Vec::new(),
    };
    let (c0, l0) = spawn_rank("smoke", "tcp", 0, 2, port0, &token, "10");
    job.children.push(c0);
    job.lines.push(l0);
    let (c1, l1) = spawn_rank("smoke", "tcp", 1, 2, proxy_port, &token, "10");
    job.children.push(c1);
    job.lines.push(l1);
    let deadline = Instant::now() + Duration::from_secs(30);
    assert_eq!(collect(&job.lines[0], deadline), vec!["OK 1".to_string()]);
    assert_eq!(collect(&job.lines[1], deadline), vec!["OK 1".to_string()]);
    drop(job);
    let _ = std::fs::remove_file(stderr_path(proxy_port, 1));
    relay.join().expect("relay");
    let seen = seen.lock().unwrap();
    assert!(seen.len() > 4000, "only {} bytes crossed", seen.len());
    assert!(
        !seen.windows(token.len()).any(|w| w == token.as_bytes()),
        "the job token crossed the wire"
    );
}

/// A listener that does not know the token (here: answers the hello with a made-up challenge)
/// is refused by the joiner, which sends no proof.
#[test]
fn tcp_impostor_rank_0_is_refused() {
    use comm::frame::{Header, Op, HEADER_BYTES};
    let fake = TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = fake.local_addr().expect("addr").port();
    let mut job = Job {
        port,
        children: Vec::new(),
        lines: Vec::new(),
    };
    let (c1, l1) = spawn_rank("smoke", "tcp", 1, 2, port, "the-real-token", "10");
    job.children.push(c1);
    job.lines.push(l1);
    let (mut s, _) = fake.accept().expect("joiner connects");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hdr = [0u8; HEADER_BYTES];
    std::io::Read::read_exact(&mut s, &mut hdr).expect("hello header");
    let h = Header::decode(&hdr, 4096).expect("a valid header");
    assert_eq!(h.op, Op::Hello);
    let mut hello = vec![0u8; h.len as usize];
    std::io::Read::read_exact(&mut s, &mut hello).expect("hello");
    let payload = [7u8; 48]; // a nonce and a MAC made without the token
    let reply = Header {
        op: Op::Challenge,
        algo: 0,
        sender: 0,
        group: 0,
        seq: 0,
        len: payload.len() as u32,
        call: 0,
    };
    s.write_all(&reply.encode()).unwrap();
    s.write_all(&payload).unwrap();
    let lines = collect(&job.lines[0], Instant::now() + Duration::from_secs(20));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ERROR") && l.contains("does not prove the job token")),
        "{lines:?}"
    );
    // Nothing after the hello: no proof for an impostor to replay.
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut rest);
    assert!(rest.is_empty(), "joiner sent {} more bytes", rest.len());
}
