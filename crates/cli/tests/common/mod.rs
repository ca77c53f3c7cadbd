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

/// A fresh, empty temporary folder named after the test file (`prefix`) and the test.
pub fn tmp_dir(prefix: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("st-cli-{prefix}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
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

/// [`TINY_MODEL`] followed by `extra`.
pub fn tiny_with(extra: &[&'static str]) -> Vec<&'static str> {
    TINY_MODEL.iter().chain(extra).copied().collect()
}
