//! Helpers shared by the trainer's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use train::TrainConfig;

/// A fresh, empty temporary folder named after the test file (`prefix`) and the test.
pub fn tmp(prefix: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("st-{prefix}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A model and corpus small enough for a step to take about a millisecond.
pub fn tiny(steps: u64) -> TrainConfig {
    let mut c = TrainConfig::default();
    c.model.n_layer = 1;
    c.model.n_head = 2;
    c.model.channels = 32;
    c.model.seq_len = 16;
    c.data.synthetic.vocab_size = 16;
    c.data.synthetic.order = 1;
    c.data.synthetic.branching = 2;
    c.data.synthetic.train_tokens = 50_000;
    c.data.synthetic.val_tokens = 4_000;
    c.train.steps = steps;
    c.train.batch_size = 8;
    c.train.threads = 2;
    c.train.eval_every = 5;
    c.train.eval_batches = 4;
    c.train.checkpoint_every = 0;
    c.optim.warmup_steps = 5;
    c.optim.lr = 1e-2;
    c.optim.min_lr = 1e-3;
    c
}
