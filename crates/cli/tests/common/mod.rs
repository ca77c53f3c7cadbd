//! Helpers shared by the CLI's end-to-end tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// Runs `scaletrain ARGS` with extra environment variables; returns (status, stdout, stderr).
pub fn run_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_scaletrain"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `scaletrain ARGS`; returns (status, stdout, stderr).
pub fn run(args: &[&str]) -> (i32, String, String) {
    run_env(args, &[])
}

/// Folders made by [`tmp_dir`] in this test process, removed when it exits (`atexit`), so a test
/// run leaves nothing in the temporary folder; `SCALETRAIN_KEEP_TEST_DIRS=1` keeps them for a
/// look after a failure.
static CREATED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

extern "C" fn remove_created() {
    if std::env::var_os("SCALETRAIN_KEEP_TEST_DIRS").is_some() {
        return;
    }
    if let Ok(dirs) = CREATED.lock() {
        for d in dirs.iter() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Registers `d` for removal at exit (installing the hook once).
pub fn remove_at_exit(d: &std::path::Path) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    extern "C" {
        fn atexit(f: extern "C" fn()) -> std::os::raw::c_int;
    }
    // SAFETY: registers a function with the C runtime; it runs once, at normal exit.
    HOOK.call_once(|| unsafe {
        atexit(remove_created);
    });
    if let Ok(mut dirs) = CREATED.lock() {
        dirs.push(d.to_path_buf());
    }
}

/// A fresh, empty temporary folder named after the test file (`prefix`) and the test.
pub fn tmp_dir(prefix: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("st-cli-{prefix}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    remove_at_exit(&d);
    d
}

/// A fresh temporary folder (as [`tmp_dir`]) that is deleted when the value is dropped, also
/// when the test fails.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates it, empty.
    pub fn new(prefix: &str, name: &str) -> TempDir {
        TempDir(tmp_dir(prefix, name))
    }
    /// Its path.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Flags for a model and corpus small enough for a training step to take about a millisecond
/// (1 layer, 32 channels, sequence 16, batch 4, 1,000 validation tokens, no progress bar); each
/// test file adds its own evaluation interval and corpus size.
pub const TINY_MODEL: &[&str] = &[
    "--set",
    "model.n_layer=1",
    "--set",
    "model.channels=32",
    "--set",
    "model.n_head=2",
    "--set",
    "model.seq_len=16",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.eval_batches=2",
    "--set",
    "data.synthetic.val_tokens=1000",
    "--no-progress",
];

/// fp16's loss scale set to overflow: it starts near the top of the scale and grows every 2
/// clean steps, so a run overflows (skips, halves) and grows again.
pub const FP16_OVERFLOWS: &[&str] = &[
    "--set",
    "stability.loss_scale_init=4194304",
    "--set",
    "stability.loss_scale_growth_interval=2",
];

/// [`TINY_MODEL`] followed by `extra`.
pub fn tiny_with(extra: &[&'static str]) -> Vec<&'static str> {
    TINY_MODEL.iter().chain(extra).copied().collect()
}

/// The newest step in a run folder's `metrics.jsonl` (0 if none yet).
pub fn last_step(out: &std::path::Path) -> u64 {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get("step")?.as_u64())
        .unwrap_or(0)
}

/// The children of process `parent` that have `RANK` in their environment, as (rank, pid).
pub fn ranks_of(parent: u32) -> Vec<(usize, i32)> {
    let kids = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
        .unwrap_or_default();
    kids.split_whitespace()
        .filter_map(|p| {
            let pid: i32 = p.parse().ok()?;
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let rank = env
                .split(|b| *b == 0)
                .find_map(|kv| kv.strip_prefix(b"RANK="))
                .and_then(|r| std::str::from_utf8(r).ok()?.parse().ok())?;
            Some((rank, pid))
        })
        .collect()
}

/// Whether process `pid` still exists (a zombie counts as gone).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Polls `f` every 5 ms until it holds; false after `limit`.
pub fn poll(limit: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = std::time::Instant::now();
    while !f() {
        if t.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    true
}

/// A run folder's training losses (one per step) and validation losses, from `metrics.jsonl`.
pub fn read_losses(dir: &std::path::Path) -> (Vec<f64>, Vec<f64>) {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let (mut l, mut v) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let j: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(x) = j.get("loss") {
            l.push(x.as_f64().unwrap());
        }
        if let Some(x) = j.get("val_loss") {
            v.push(x.as_f64().unwrap());
        }
    }
    (l, v)
}

/// Asserts `a` and `b` have the same length and every pair is within `tol` relative (of `a`);
/// returns the largest relative difference seen.
#[track_caller]
pub fn assert_close(what: &str, a: &[f64], b: &[f64], tol: f64) -> f64 {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let mut worst = 0.0f64;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let rel = (x - y).abs() / x.abs().max(1e-12);
        assert!(
            rel <= tol,
            "{what}: step {} differs: {x} vs {y} (relative {rel:e})",
            i + 1
        );
        worst = worst.max(rel);
    }
    worst
}

/// A model slow enough (about 6 ms a step for 3 ranks on 2 cores) that a kill lands mid-run, with
/// a checkpoint every 20 steps: the restart and elastic tests' model.
pub const KILLABLE_MODEL: &[&str] = &[
    "--set",
    "model.n_layer=2",
    "--set",
    "model.channels=64",
    "--set",
    "model.n_head=2",
    "--set",
    "model.seq_len=32",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.eval_batches=2",
    "--set",
    "train.eval_every=100",
    "--set",
    "train.checkpoint_every=20",
    "--set",
    "data.synthetic.val_tokens=1000",
    "--no-progress",
];

/// Per step of `metrics.jsonl`: the data-parallel time in collectives and the part of it spent
/// waiting for the other ranks (`None` where the line has none).
pub fn comm_and_wait(dir: &std::path::Path) -> Vec<(f64, Option<f64>)> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|line| {
            let j: serde_json::Value = serde_json::from_str(line).unwrap();
            let comm = j.get("comm_secs")?.as_f64().unwrap();
            Some((comm, j.get("comm_wait_secs").map(|w| w.as_f64().unwrap())))
        })
        .collect()
}

/// Every step of a data-parallel run folder records its wait for the other ranks, and the wait
/// is part of the time in collectives: 0 ≤ wait ≤ comm (so transfer = comm − wait ≥ 0).
/// Returns the mean (comm, wait) per step.
#[track_caller]
pub fn assert_wait_within_comm(dir: &std::path::Path, steps: usize) -> (f64, f64) {
    let xs = comm_and_wait(dir);
    assert_eq!(xs.len(), steps, "steps with comm_secs in {}", dir.display());
    let (mut c, mut w) = (0.0, 0.0);
    for (i, (comm, wait)) in xs.iter().enumerate() {
        let wait = wait.unwrap_or_else(|| panic!("step {}: no comm_wait_secs", i + 1));
        assert!(
            (0.0..=*comm + 1e-9).contains(&wait),
            "step {}: waited {wait} s of {comm} s in collectives",
            i + 1
        );
        c += comm;
        w += wait;
    }
    (c / steps as f64, w / steps as f64)
}
