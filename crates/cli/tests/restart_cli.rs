//! `scaletrain launch --max-restarts`: real 3-rank jobs whose ranks are killed (kill -9) at
//! seeded random points finish with the same weights, bit for bit, as an uninterrupted run.
//! The seed is printed; `SCALETRAIN_FAULT_SEED=N` replays it, `SCALETRAIN_RESTART_KILLS=K`
//! kills K times (default 2; the acceptance run used 5).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_scaletrain");

/// A model slow enough that a kill lands mid-run ([`common::KILLABLE_MODEL`]).
const MODEL: &[&str] = common::KILLABLE_MODEL;

const STEPS: u64 = 300;

/// A small deterministic generator (SplitMix64) for the kill points.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    std::env::var("SCALETRAIN_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

fn launch(out: &Path, extra: &[&str]) -> Child {
    let mut args: Vec<String> = ["launch", "--nproc-per-node", "3"]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    args.extend(["--", "--out"].map(String::from));
    args.push(out.display().to_string());
    args.extend(["--steps".to_string(), STEPS.to_string()]);
    args.extend(MODEL.iter().map(|s| s.to_string()));
    Command::new(BIN)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("launch starts")
}

fn restarts_logged(out: &Path) -> usize {
    std::fs::read_to_string(out.join("restarts.jsonl"))
        .unwrap_or_default()
        .lines()
        .count()
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn finish(mut c: Child, what: &str) -> String {
    let t = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(c.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(s.success(), "{what} failed ({s}):\n{err}");
            return err;
        }
        if t.elapsed() > Duration::from_secs(120) {
            let _ = c.kill();
            panic!("{what} did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn final_files(out: &Path) -> Vec<(String, Vec<u8>)> {
    ["safetensors", "state.safetensors"]
        .iter()
        .map(|ext| {
            let name = format!("step-{STEPS:08}.{ext}");
            let bytes = std::fs::read(out.join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, bytes)
        })
        .collect()
}

#[test]
fn a_3_rank_run_killed_at_random_points_restarts_to_the_same_weights_bitwise() {
    let dir = common::TempDir::new("restart", "bitwise");
    let seed = seed();
    let kills: usize = std::env::var("SCALETRAIN_RESTART_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    println!("seed {seed} (SCALETRAIN_FAULT_SEED={seed} replays it), {kills} kill(s)");
    let mut rng = Rng(seed);
    // Kill points: ascending steps at least 40 apart, inside the run.
    let span = (STEPS - 40) / kills as u64;
    let points: Vec<(u64, usize)> = (0..kills as u64)
        .map(|i| (20 + i * span + rng.below(span - 30), rng.below(3) as usize))
        .collect();
    println!("kill points (step, rank): {points:?}");

    let plain = dir.path().join("plain");
    let err = finish(launch(&plain, &[]), "the uninterrupted run");
    assert!(!err.contains("restarting"), "{err}");

    let out = dir.path().join("killed");
    let max = kills.to_string();
    let job = launch(
        &out,
        &["--max-restarts", &max, "--restart-backoff-secs", "0.1"],
    );
    let pid = job.id();
    for (i, &(step, rank)) in points.iter().enumerate() {
        wait_until(&format!("step {step}"), Duration::from_secs(60), || {
            restarts_logged(&out) == i && common::last_step(&out) >= step
        });
        let victim = common::ranks_of(pid)
            .into_iter()
            .find(|r| r.0 == rank)
            .unwrap_or_else(|| panic!("rank {rank} is not running"));
        // SAFETY: signalling a process this test's launcher started.
        assert_eq!(unsafe { libc::kill(victim.1, libc::SIGKILL) }, 0);
        wait_until("the restart", Duration::from_secs(30), || {
            restarts_logged(&out) == i + 1
        });
    }
    let err = finish(job, "the restarted run");
    assert!(
        err.contains(&format!("finished after {kills} restart(s)")),
        "{err}"
    );
    let log = std::fs::read_to_string(out.join("restarts.jsonl")).unwrap();
    for (line, &(_, rank)) in log.lines().zip(&points) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["failed_rank"], rank, "{line}");
        assert!(v["how"].as_str().unwrap().contains("SIGKILL"), "{line}");
        assert!(v["secs_lost"].as_f64().unwrap() > 0.0, "{line}");
    }
    let (a, b) = (final_files(&plain), final_files(&out));
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{name} differs from the uninterrupted run's");
    }
}

#[test]
fn a_command_that_keeps_failing_gives_up_after_max_restarts_and_says_so() {
    // Rank 1 fails on the first attempt only: one restart completes the job.
    let flaky = "if [ \"$RANK\" = 1 ] && [ \"$SCALETRAIN_RESTART_COUNT\" = 0 ]; then exit 3; fi";
    let (code, _, err) = common::run(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "2",
        "--restart-backoff-secs",
        "0",
        "--",
        "sh",
        "-c",
        flaky,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("rank 1 exited with status 3"), "{err}");
    assert!(err.contains("finished after 1 restart(s)"), "{err}");
    // Always failing: two restarts, then the error says what failed and how often it was tried.
    let (code, _, err) = common::run(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "2",
        "--restart-backoff-secs",
        "0",
        "--",
        "sh",
        "-c",
        "[ \"$RANK\" = 0 ] || exit 4",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("rank 1 exited with status 4")
            && err.contains("gave up after 2 restart(s) (--max-restarts 2)"),
        "{err}"
    );
    let (code, _, err) = common::run(&["launch", "--restart-backoff-secs=-1", "--", "true"]);
    assert_eq!(code, 2);
    assert!(err.contains("--restart-backoff-secs -1"), "{err}");
}
