//! Rendezvous (TCP and shared memory) with real processes (this test binary re-runs itself as the ranks, as
//! `processes.rs` does): a rank that joins late is waited for, and a second process claiming a
//! rank that has already joined is refused with an error that says so.
use comm::{init_from_env, ReduceOp};
use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The child side: join, all-reduce once, print the result. Without `RDV_TEST_ROLE` (a normal
/// test run) it does nothing.
#[test]
fn rank_entry() {
    if std::env::var("RDV_TEST_ROLE").is_err() {
        return;
    }
    let mut c = match init_from_env() {
        Ok(c) => c,
        Err(e) => {
            println!("ERROR {e}");
            return;
        }
    };
    let mut b = vec![1.0f32; 100];
    match c.all_reduce(&mut b, ReduceOp::Sum) {
        Ok(()) => println!("OK {}", b[0]),
        Err(e) => println!("ERROR {e}"),
    }
}

/// Children killed on drop, so a failing test leaves no processes behind.
struct Ranks(Vec<Child>);

impl Drop for Ranks {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(transport: &str, rank: usize, n: usize, port: u16, token: &str) -> Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "rank_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "--quiet",
        ])
        .env("RDV_TEST_ROLE", "join")
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", n.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("SCALETRAIN_JOB_TOKEN", token)
        .env("SCALETRAIN_TRANSPORT", transport)
        .env("SCALETRAIN_COMM_TIMEOUT_SECS", "30")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn rank")
}

/// Our line of a child's output (`OK …` or `ERROR …`), once it has exited.
fn result(c: &mut Child, limit: Duration) -> String {
    let t = Instant::now();
    while c.try_wait().expect("wait").is_none() {
        assert!(t.elapsed() < limit, "a rank did not finish in {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    c.stdout
        .as_mut()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    out.lines()
        .find(|l| l.starts_with("OK") || l.starts_with("ERROR"))
        .unwrap_or("")
        .to_string()
}

fn late_and_duplicate(transport: &str, refused_by: &str) {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let token = format!("tok-{port}-{}", std::process::id());
    let mut ranks = Ranks(Vec::new());
    ranks.0.push(spawn(transport, 0, 3, port, &token));
    ranks.0.push(spawn(transport, 1, 3, port, &token));
    // The second "rank 1" comes while rank 0 still waits for rank 2, which comes last, late.
    std::thread::sleep(Duration::from_millis(1000));
    ranks.0.push(spawn(transport, 1, 3, port, &token));
    std::thread::sleep(Duration::from_millis(1500));
    ranks.0.push(spawn(transport, 2, 3, port, &token));
    let limit = Duration::from_secs(60);
    let got: Vec<String> = ranks.0.iter_mut().map(|c| result(c, limit)).collect();
    // The job of ranks 0, 1 (the first) and 2 ran: 1 + 1 + 1.
    for i in [0, 1, 3] {
        assert_eq!(got[i], "OK 3", "{got:?}");
    }
    let dup = &got[2];
    assert!(
        dup.starts_with("ERROR")
            && dup.contains(refused_by)
            && dup.contains("rank 1 already joined")
            && dup.contains("RANK=1"),
        "{dup}"
    );
}

#[test]
fn tcp_a_late_rank_is_waited_for_and_a_duplicate_rank_is_refused() {
    late_and_duplicate("tcp", "rank 0 refused us");
}

#[test]
fn shm_a_late_rank_is_waited_for_and_a_duplicate_rank_is_refused() {
    late_and_duplicate("shm", "(process ");
}
