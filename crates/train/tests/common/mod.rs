//! Helpers shared by the trainer's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use train::TrainConfig;

/// Folders made by [`tmp`] in this test process, removed when it exits (`atexit`), so a test
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
pub fn tmp(prefix: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("st-{prefix}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    remove_at_exit(&d);
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

/// The model of the counting-allocator memory tests (`zero_memory.rs`, `zero3_memory.rs`,
/// `zero3_tp_memory.rs`): eight layers, so that what sharding saves shows, small enough to run
/// in seconds.
pub fn memory_test_model() -> model::ModelConfig {
    model::ModelConfig {
        vocab_size: 256,
        max_seq_len: 32,
        n_layer: 8,
        n_head: 4,
        channels: 128,
    }
}

/// Ends the process on any thread's panic: a rank that panics would leave the others waiting
/// at a barrier.
pub fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
}

/// A fresh AdamW state of zeros for exactly the ranges data-parallel rank `d` holds of a
/// `len`-parameter model, registered with it (`Dp::shard_optimizer`).
pub fn fresh_sharded_adamw(d: &mut train::dp::Dp, len: usize) -> model::AdamW {
    let held = d.owned_ranges(len).iter().map(|r| r.len()).sum();
    let opt = model::AdamW {
        m: vec![0.0; held],
        v: vec![0.0; held],
        step: 0,
    };
    d.shard_optimizer(&opt, len);
    opt
}

/// The memory tests' AdamW settings (GPT-2-like; `grad_clip` as the test needs).
pub fn memory_test_adamw(grad_clip: Option<f32>) -> model::AdamWConfig {
    model::AdamWConfig {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        grad_clip,
    }
}
