//! The trainer end to end, on real files in temporary folders: bit-exact resume, learning to
//! the synthetic corpus's floor, checkpoint integrity, config mismatch, bad inputs.

use std::path::PathBuf;
use train::checkpoint;
use train::config::DataSource;
use train::{run, Quiet, RunOptions, TrainConfig};

mod common;

fn tmp(name: &str) -> PathBuf {
    common::tmp("train", name)
}

fn tiny(steps: u64) -> TrainConfig {
    common::tiny(steps)
}

fn opts(dir: &std::path::Path) -> RunOptions {
    RunOptions {
        out_dir: dir.to_path_buf(),
        ..Default::default()
    }
}

#[test]
fn twenty_steps_equal_ten_plus_resume_plus_ten_bit_for_bit() {
    let cfg = tiny(20);
    let a_dir = tmp("straight");
    let straight = run(&cfg, &opts(&a_dir), &mut Quiet).unwrap();
    assert_eq!(straight.steps_done, 20);

    let b_dir = tmp("resumed");
    let first = run(
        &cfg,
        &RunOptions {
            stop_after: Some(10),
            ..opts(&b_dir)
        },
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(first.steps_done, 10);
    let second = run(
        &cfg,
        &RunOptions {
            resume: true,
            ..opts(&b_dir)
        },
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(second.start.start_step, 10);
    assert_eq!(second.steps_done, 20);
    let losses = |r: &[train::StepRecord]| {
        r.iter()
            .map(|x| {
                (
                    x.step,
                    x.loss.to_bits(),
                    x.lr.to_bits(),
                    x.grad_norm.to_bits(),
                )
            })
            .collect::<Vec<_>>()
    };
    let mut resumed = losses(&first.records);
    resumed.extend(losses(&second.records));
    assert_eq!(
        losses(&straight.records),
        resumed,
        "losses, lr and gradient norms must be identical"
    );
    assert!(
        straight
            .params
            .iter()
            .zip(&second.params)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "final weights differ"
    );
    // The validation at step 20 is the same too, and the metrics files agree line for line on
    // every step's loss.
    assert_eq!(straight.val_losses.last(), second.val_losses.last());
    let loss_lines = |d: &std::path::Path| {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["step"].as_u64().unwrap(),
                    v["loss"].as_f64().map(f64::to_bits),
                    v["val_loss"].as_f64().map(f64::to_bits),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(loss_lines(&a_dir), loss_lines(&b_dir));
    // The final checkpoints hold the same weights and optimizer state.
    let (_, _, sa) = checkpoint::load(&checkpoint::manifest_path(&a_dir, 20)).unwrap();
    let (_, _, sb) = checkpoint::load(&checkpoint::manifest_path(&b_dir, 20)).unwrap();
    assert_eq!(sa, sb);
    assert!(a_dir.join("loss.svg").exists());
}

#[test]
fn the_model_learns_the_markov_source_down_to_its_floor() {
    let mut cfg = tiny(300);
    cfg.train.eval_every = 0;
    cfg.train.eval_batches = 30;
    let dir = tmp("learn");
    let s = run(&cfg, &opts(&dir), &mut Quiet).unwrap();
    let floor = s.loss_floor.unwrap();
    let uniform = (16f64).ln();
    let val = s.val_losses.last().unwrap().1;
    eprintln!("floor {floor:.4}, uniform {uniform:.4}, val {val:.4}");
    assert!(
        floor < 0.7 * uniform,
        "the source must be learnable: floor {floor}"
    );
    // Most of the learnable gap is closed: within 0.05 nats of the floor.
    assert!(
        val < floor + 0.05,
        "validation loss {val} is not near the floor {floor}"
    );
    assert!(
        val > floor - 0.05,
        "validation loss {val} below the floor {floor}: floor is wrong"
    );
}

#[test]
fn tampered_or_truncated_checkpoints_are_refused() {
    let cfg = tiny(4);
    let dir = tmp("tamper");
    run(&cfg, &opts(&dir), &mut Quiet).unwrap();
    let manifest = checkpoint::manifest_path(&dir, 4);
    checkpoint::load(&manifest).unwrap();
    let model = dir.join("step-00000004.safetensors");
    let good = std::fs::read(&model).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 3] ^= 0x40;
    std::fs::write(&model, &bad).unwrap();
    let e = checkpoint::load(&manifest).unwrap_err().to_string();
    assert!(
        e.contains("SHA-256 mismatch") && e.contains("step-00000004.safetensors"),
        "{e}"
    );
    let e = run(
        &cfg,
        &RunOptions {
            resume: true,
            ..opts(&dir)
        },
        &mut Quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("cannot resume") && e.contains("SHA-256 mismatch"),
        "{e}"
    );
    std::fs::write(&model, &good).unwrap();
    let state = dir.join("step-00000004.state.safetensors");
    let s = std::fs::read(&state).unwrap();
    std::fs::write(&state, &s[..s.len() / 2]).unwrap();
    let e = checkpoint::load(&manifest).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
    std::fs::write(&state, &s).unwrap();
    std::fs::write(&manifest, "{ not json").unwrap();
    let e = checkpoint::load(&manifest).unwrap_err().to_string();
    assert!(e.contains("manifest is not valid"), "{e}");
}

#[test]
fn resume_skips_a_broken_newest_checkpoint_and_refuses_another_config() {
    let mut cfg = tiny(6);
    cfg.train.checkpoint_every = 3;
    cfg.train.keep_checkpoints = 5;
    let dir = tmp("mismatch");
    run(&cfg, &opts(&dir), &mut Quiet).unwrap();
    assert_eq!(checkpoint::list(&dir).len(), 2);
    // A different model width is refused, naming the field and both values.
    let mut other = cfg.clone();
    other.model.channels = 64;
    let e = run(
        &other,
        &RunOptions {
            resume: true,
            ..opts(&dir)
        },
        &mut Quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("different config") && e.contains("model.channels: 32 vs 64"),
        "{e}"
    );
    // More steps is fine; the newest (step 6) is truncated, so the run continues from step 3.
    let m6 = dir.join("step-00000006.safetensors");
    let b = std::fs::read(&m6).unwrap();
    std::fs::write(&m6, &b[..100]).unwrap();
    let mut longer = cfg.clone();
    longer.train.steps = 8;
    let s = run(
        &longer,
        &RunOptions {
            resume: true,
            ..opts(&dir)
        },
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(s.start.start_step, 3);
    assert!(
        s.start.warnings.iter().any(|w| w.contains("truncated")),
        "{:?}",
        s.start.warnings
    );
    assert_eq!(s.steps_done, 8);
    // Starting afresh over existing checkpoints needs --overwrite.
    let e = run(&cfg, &opts(&dir), &mut Quiet).unwrap_err().to_string();
    assert!(
        e.contains("already holds checkpoints") && e.contains("--resume"),
        "{e}"
    );
}

#[test]
fn early_stopping_stops_when_validation_stalls() {
    let mut cfg = tiny(100);
    cfg.optim.lr = 0.0;
    cfg.optim.min_lr = 0.0;
    cfg.train.patience = 2;
    let dir = tmp("early");
    let s = run(&cfg, &opts(&dir), &mut Quiet).unwrap();
    assert!(s.early_stopped);
    // Evaluations at 5 (best), 10 (no gain), 15 (no gain → stop).
    assert_eq!(s.steps_done, 15);
    assert!(checkpoint::manifest_path(&dir, 15).exists());
}

#[test]
fn bad_inputs_are_clear_errors() {
    // Unwritable output folder: its parent is a regular file.
    let d = tmp("bad");
    let file = d.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let e = run(&tiny(2), &opts(&file.join("run")), &mut Quiet).unwrap_err();
    // The path, then the reason (the error's source, as `{:#}` prints it).
    let e = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(e.contains("a-file") && e.contains("output folder"), "{e}");
    // Missing and corrupt token files name the file.
    let mut cfg = tiny(2);
    cfg.data.source = DataSource::Files;
    cfg.data.train_file = Some(d.join("nope.tok"));
    cfg.data.val_file = Some(d.join("nope.tok"));
    let e = run(&cfg, &opts(&d.join("r1")), &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.tok"), "{e}");
    let junk = d.join("junk.tok");
    std::fs::write(&junk, vec![7u8; 200]).unwrap();
    cfg.data.train_file = Some(junk.clone());
    let e = run(&cfg, &opts(&d.join("r2")), &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("junk.tok") && e.contains("wrong magic"), "{e}");
    // A model vocabulary that differs from the data's.
    let mut cfg = tiny(2);
    cfg.model.vocab_size = Some(50);
    let e = run(&cfg, &opts(&d.join("r3")), &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.vocab_size") && e.contains("16"), "{e}");
    // Too little data for one batch.
    let mut cfg = tiny(2);
    cfg.data.synthetic.val_tokens = 20;
    let e = run(&cfg, &opts(&d.join("r4")), &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("validation stream has 20 tokens"), "{e}");
}

#[test]
fn hf_weights_roundtrip_and_init_from_checks_shapes() {
    let cfg = tiny(3);
    let dir = tmp("hf");
    let s = run(&cfg, &opts(&dir), &mut Quiet).unwrap();
    let hf = dir.join("step-00000003.safetensors");
    // init-from the checkpoint's weights: the first step starts from them.
    let mut c2 = cfg.clone();
    c2.optim.lr = 0.0;
    c2.optim.min_lr = 0.0;
    c2.optim.weight_decay = 0.0;
    let d2 = tmp("hf2");
    let s2 = run(
        &c2,
        &RunOptions {
            init_from: Some(hf.clone()),
            ..opts(&d2)
        },
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(s2.params, s.params, "lr 0 keeps the loaded weights exactly");
    // A config of another shape is refused, naming the tensor and both shapes.
    let mut c3 = cfg.clone();
    c3.model.channels = 64;
    let e = run(
        &c3,
        &RunOptions {
            init_from: Some(hf),
            ..opts(&tmp("hf3"))
        },
        &mut Quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("wte.weight has shape [16, 32], the config describes [16, 64]"),
        "{e}"
    );
}

#[test]
fn data_prepare_then_train_then_sample_with_a_tokenizer() {
    let d = tmp("prep");
    let text: String = (0..400)
        .map(|i| {
            format!(
                "the quick brown fox {} jumps over the lazy dog number {}. ",
                i % 7,
                i % 13
            )
        })
        .collect();
    let f = d.join("corpus.txt");
    std::fs::write(&f, &text).unwrap();
    let p = train::tokenizer::prepare(std::slice::from_ref(&f), None, 300, 0.1, &d.join("data"))
        .unwrap();
    assert!(
        p.vocab_size <= 300 && p.vocab_size > 257,
        "{}",
        p.vocab_size
    );
    let t = train::tokens::read_tokens(&p.train_file).unwrap();
    assert_eq!(t.vocab_size as usize, p.vocab_size);
    let tok = train::tokenizer::load(&p.tokenizer).unwrap();
    assert_eq!(
        tok.decode(&t.tokens[..20], false).unwrap(),
        text.chars()
            .take(tok.decode(&t.tokens[..20], false).unwrap().chars().count())
            .collect::<String>()
    );
    let mut cfg = tiny(3);
    cfg.data.source = DataSource::Files;
    cfg.data.train_file = Some(p.train_file.clone());
    cfg.data.val_file = Some(p.val_file.clone());
    cfg.data.tokenizer = Some(p.tokenizer.clone());
    cfg.train.batch_size = 2;
    cfg.train.eval_batches = 1;
    let run_dir = d.join("run");
    run(&cfg, &opts(&run_dir), &mut Quiet).unwrap();
    let mut sampler = train::sample::Sampler::load(&run_dir).unwrap();
    let o = train::sample::SampleOptions {
        tokens: 5,
        temperature: 1.0,
        top_k: 10,
        seed: 3,
        threads: 1,
    };
    let out = sampler.generate(&[1, 2, 3], &o).unwrap();
    assert_eq!(out.len(), 5);
    assert!(out.iter().all(|&x| (x as usize) < p.vocab_size));
    // A tokenizer with another vocabulary than the data is refused.
    let other =
        train::tokenizer::prepare(std::slice::from_ref(&f), None, 270, 0.1, &d.join("data2"))
            .unwrap();
    assert_ne!(other.vocab_size, p.vocab_size);
    cfg.data.tokenizer = Some(other.tokenizer.clone());
    let e = run(&cfg, &opts(&d.join("run2")), &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("but the model/data vocabulary is"),
        "{e}"
    );
}

#[test]
fn a_stop_request_checkpoints_and_resume_continues() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let cfg = tiny(10);
    let dir = tmp("stop");
    let flag = Arc::new(AtomicBool::new(true));
    let s = run(
        &cfg,
        &RunOptions {
            stop: Some(flag),
            ..opts(&dir)
        },
        &mut Quiet,
    )
    .unwrap();
    assert!(s.interrupted);
    assert_eq!(s.steps_done, 1);
    assert!(checkpoint::manifest_path(&dir, 1).exists());
    let s = run(
        &cfg,
        &RunOptions {
            resume: true,
            ..opts(&dir)
        },
        &mut Quiet,
    )
    .unwrap();
    assert_eq!((s.start.start_step, s.steps_done), (1, 10));
}

#[test]
fn gradient_accumulation_matches_one_big_batch() {
    // batch 8 × 1 and batch 4 × 2 see the same 8 windows per step (the epoch order depends only
    // on the seed), so the trajectories agree up to float summation order.
    let mut big = tiny(8);
    big.train.eval_every = 0;
    let mut acc = big.clone();
    acc.train.batch_size = 4;
    acc.train.grad_accum = 2;
    let a = run(&big, &opts(&tmp("accum-a")), &mut Quiet).unwrap();
    let b = run(&acc, &opts(&tmp("accum-b")), &mut Quiet).unwrap();
    for (x, y) in a.records.iter().zip(&b.records) {
        assert!(
            (x.loss - y.loss).abs() < 1e-4,
            "step {}: {} vs {}",
            x.step,
            x.loss,
            y.loss
        );
        assert!(
            (x.grad_norm - y.grad_norm).abs() < 1e-4 * x.grad_norm,
            "step {}",
            x.step
        );
    }
    let max_diff = a
        .params
        .iter()
        .zip(&b.params)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f32::max);
    assert!(max_diff < 1e-4, "weights differ by {max_diff}");
}

/// A checkpoint in the previous manifest format (version 1: one `state_file` with the whole
/// AdamW state, no optimizer file list or global batch), made by rewriting a fresh one's
/// manifest the way version 1 wrote it, resumes bit for bit, with a warning about the
/// unrecorded global batch.
#[test]
fn a_version_1_checkpoint_still_resumes_bit_for_bit() {
    let cfg = tiny(12);
    let straight = run(&cfg, &opts(&tmp("v1-straight")), &mut Quiet).unwrap();
    let dir = tmp("v1");
    let stop6 = RunOptions {
        stop_after: Some(6),
        ..opts(&dir)
    };
    run(&cfg, &stop6, &mut Quiet).unwrap();
    let manifest = checkpoint::manifest_path(&dir, 6);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    let obj = v.as_object_mut().unwrap();
    let optimizer = obj.remove("optimizer").unwrap();
    assert_eq!(optimizer["shards"].as_array().unwrap().len(), 1);
    obj.insert("state_file".into(), optimizer["shards"][0]["file"].clone());
    obj.remove("global_micro_batches").unwrap();
    obj.insert("version".into(), 1.into());
    std::fs::write(&manifest, serde_json::to_string_pretty(&v).unwrap()).unwrap();

    let resume = RunOptions {
        resume: true,
        ..opts(&dir)
    };
    let resumed = run(&cfg, &resume, &mut Quiet).unwrap();
    assert_eq!(resumed.start.start_step, 6);
    assert!(
        resumed
            .start
            .warnings
            .iter()
            .any(|w| w.contains("manifest version 1")),
        "{:?}",
        resumed.start.warnings
    );
    assert_eq!(resumed.params, straight.params, "final weights");
    let tail: Vec<f32> = straight.records[6..].iter().map(|r| r.loss).collect();
    let got: Vec<f32> = resumed.records.iter().map(|r| r.loss).collect();
    assert_eq!(got, tail);
    // A manifest of an unknown version is still refused by name.
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    v["version"] = 9.into();
    std::fs::write(&manifest, v.to_string()).unwrap();
    let e = checkpoint::read_manifest(&manifest)
        .unwrap_err()
        .to_string();
    assert!(e.contains("version 9"), "{e}");
}

/// Pruning also removes the data files of a checkpoint that was never published (a rank died
/// while the ranks wrote it) once a later checkpoint exists, and keeps everything else.
#[test]
fn prune_removes_unpublished_checkpoint_files() {
    let mut cfg = tiny(8);
    cfg.train.checkpoint_every = 4;
    let dir = tmp("orphans");
    run(&cfg, &opts(&dir), &mut Quiet).unwrap();
    let orphan = dir.join("step-00000002.optim-rank-1-of-2.safetensors");
    let later = dir.join("step-00000099.optim-rank-0-of-2.safetensors");
    let other = dir.join("notes.txt");
    for f in [&orphan, &later, &other] {
        std::fs::write(f, b"x").unwrap();
    }
    checkpoint::prune(&dir, 2);
    assert!(
        !orphan.exists(),
        "an unpublished checkpoint older than step 8 is removed"
    );
    assert!(
        later.exists(),
        "files of a step after the newest checkpoint may be in progress"
    );
    assert!(other.exists());
    assert_eq!(checkpoint::list(&dir).len(), 2);
    checkpoint::load(&checkpoint::manifest_path(&dir, 4)).unwrap();
    // Starting afresh (keep 0) removes every checkpoint file.
    checkpoint::prune(&dir, 0);
    assert!(!later.exists());
    assert!(checkpoint::list(&dir).is_empty());
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(other.exists());
}
