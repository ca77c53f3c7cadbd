//! The run folder after interruptions and for other tools: leftovers of interrupted writes are
//! removed (and reported) when the next run starts; the folder holds the Hugging Face files
//! (`config.json`, `model.safetensors.index.json`) that make it a model folder, checked against
//! a `config.json` written by `transformers` itself (`reference/fixtures/hf_gpt2_tiny`); and
//! `--init-from` takes such a folder, refusing one whose `config.json` describes another model.

mod common;

use std::path::{Path, PathBuf};
use train::{checkpoint, run, Quiet, RunOptions, TrainConfig};

/// Deletes the folder when the test ends, passed or failed.
struct Tmp(PathBuf);
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
fn tmp(name: &str) -> Tmp {
    Tmp(common::tmp("run-folder", name))
}

fn opts(dir: &Path) -> RunOptions {
    RunOptions {
        out_dir: dir.to_path_buf(),
        ..Default::default()
    }
}

/// The error as the binary prints it (anyhow's `{:#}`: every error of the chain, joined by
/// ": ", nothing left out or merged).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        text = format!("{text}: {s}");
        cur = s.source();
    }
    text
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../reference/fixtures/hf_gpt2_tiny")
}

/// A model of the fixture's shape (transformers' tiny GPT-2: 2 layers, 4 heads, 32 channels,
/// 16 positions, vocabulary 40).
fn fixture_shaped(steps: u64) -> TrainConfig {
    let mut c = common::tiny(steps);
    c.model.n_layer = 2;
    c.model.n_head = 4;
    c.model.channels = 32;
    c.model.seq_len = 16;
    c.data.synthetic.vocab_size = 40;
    c
}

#[test]
fn the_next_run_removes_leftovers_of_interrupted_writes_and_says_so() {
    let mut cfg = common::tiny(8);
    cfg.train.checkpoint_every = 4;
    let d = tmp("leftovers");
    let dir = &d.0;
    run(&cfg, &opts(dir), &mut Quiet).unwrap();
    // What a kill leaves: temporary files of atomic writes, the data files of a checkpoint
    // whose manifest was never written (newer and older than the newest published).
    let leftovers = [
        ".step-00000008.safetensors.tmp-4242",
        ".config.toml.tmp-77",
        "step-00000010.safetensors",
        "step-00000010.optim-rank-1-of-2.safetensors",
        "step-00000006.state.safetensors",
    ];
    for f in leftovers {
        std::fs::write(dir.join(f), b"partial").unwrap();
    }
    let keep = dir.join("notes.txt");
    std::fs::write(&keep, b"mine").unwrap();
    cfg.train.steps = 12;
    let s = run(
        &cfg,
        &RunOptions {
            resume: true,
            ..opts(dir)
        },
        &mut Quiet,
    )
    .unwrap();
    for f in leftovers {
        assert!(!dir.join(f).exists(), "{f} was left behind");
        assert!(
            s.start.warnings.iter().any(|w| w.contains(f)),
            "{f} not reported: {:?}",
            s.start.warnings
        );
    }
    assert!(keep.exists());
    assert_eq!(s.steps_done, 12);
    // The published checkpoints are intact.
    checkpoint::load(&checkpoint::manifest_path(dir, 12)).unwrap();
    checkpoint::load(&checkpoint::manifest_path(dir, 8)).unwrap();
}

#[test]
fn the_run_folder_is_a_hugging_face_model_folder() {
    let mut cfg = fixture_shaped(6);
    cfg.train.checkpoint_every = 3;
    let d = tmp("hf-folder");
    let dir = &d.0;
    run(&cfg, &opts(dir), &mut Quiet).unwrap();

    // config.json: every key we write is one transformers wrote for GPT2Config, with the same
    // value for a model of the same shape.
    let read = |p: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
    };
    let ours = read(dir.join("config.json"));
    let theirs = read(fixture().join("config.json"));
    let ours = ours.as_object().unwrap();
    assert!(ours.len() >= 10, "{ours:?}");
    for (k, v) in ours {
        assert_eq!(
            Some(v),
            theirs.get(k),
            "config.json key {k}: ours {v}, transformers wrote {:?}",
            theirs.get(k)
        );
    }

    // The index names every tensor of the model, in the newest checkpoint's weights file.
    let index = read(dir.join(checkpoint::HF_INDEX));
    let map = index["weight_map"].as_object().unwrap();
    let m = checkpoint::read_manifest(&checkpoint::manifest_path(dir, 6)).unwrap();
    let (_, layout, state) = checkpoint::load(&checkpoint::manifest_path(dir, 6)).unwrap();
    let names: Vec<String> = checkpoint::hf_names(&layout)
        .into_iter()
        .map(|n| n.0)
        .collect();
    assert_eq!(map.len(), names.len(), "{map:?}");
    for n in &names {
        assert_eq!(map[n], serde_json::json!(m.model_file.name), "{n}");
    }

    // The folder loads as --init-from (through the index), giving the newest weights.
    let w = checkpoint::load_init_weights(dir, &layout).unwrap();
    assert!(w == state.params, "the folder's weights are not step 6's");

    // Starting afresh (keep 0) removes the files with the checkpoints.
    checkpoint::prune(dir, 0);
    assert!(!dir.join("config.json").exists());
    assert!(!dir.join(checkpoint::HF_INDEX).exists());
}

#[test]
fn init_from_a_transformers_folder_checks_its_config() {
    // transformers' own folder (config.json + model.safetensors) starts a run of its shape.
    let d = tmp("init-ok");
    let s = run(
        &fixture_shaped(1),
        &RunOptions {
            init_from: Some(fixture()),
            ..opts(&d.0)
        },
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(s.steps_done, 1);

    // Another head count: every tensor has the right shape, so only config.json can tell.
    let mut cfg = fixture_shaped(1);
    cfg.model.n_head = 2;
    let d = tmp("init-heads");
    let e = run(
        &cfg,
        &RunOptions {
            init_from: Some(fixture()),
            ..opts(&d.0)
        },
        &mut Quiet,
    )
    .unwrap_err();
    let e = chain(&e);
    assert!(
        e.contains("n_head is 4, but the run's model.n_head is 2")
            && e.contains("--set model.n_head=4"),
        "{e}"
    );
    // Several differences are all named.
    let mut cfg = fixture_shaped(1);
    cfg.model.n_layer = 3;
    cfg.model.channels = 64;
    let e = run(
        &cfg,
        &RunOptions {
            init_from: Some(fixture()),
            ..opts(&d.0)
        },
        &mut Quiet,
    )
    .unwrap_err();
    let e = chain(&e);
    assert!(
        e.contains("n_layer is 2")
            && e.contains("n_embd is 32, but the run's model.channels is 64"),
        "{e}"
    );
    // A folder without config.json says what to do.
    let bare = tmp("init-bare");
    std::fs::copy(
        fixture().join("model.safetensors"),
        bare.0.join("model.safetensors"),
    )
    .unwrap();
    let e = run(
        &fixture_shaped(1),
        &RunOptions {
            init_from: Some(bare.0.clone()),
            ..opts(&d.0)
        },
        &mut Quiet,
    )
    .unwrap_err();
    let e = chain(&e);
    assert!(e.contains("needs config.json"), "{e}");
}

#[test]
fn an_os_error_is_printed_once() {
    let d = tmp("os-error");
    let e = run(
        &common::tiny(1),
        &RunOptions {
            init_from: Some(d.0.join("missing.safetensors")),
            ..opts(&d.0)
        },
        &mut Quiet,
    )
    .unwrap_err();
    let e = chain(&e);
    assert_eq!(e.matches("os error 2").count(), 1, "{e}");
    assert!(e.contains("missing.safetensors"), "{e}");
}

#[test]
fn a_model_too_large_for_the_machine_is_refused_before_allocating() {
    // 2,000 layers of 4,096 channels: about 400 billion parameters (6.5 TB with gradients,
    // AdamW and activations), which used to abort in the allocator.
    let mut cfg = common::tiny(1);
    cfg.model.n_layer = 2000;
    cfg.model.channels = 4096;
    cfg.model.n_head = 32;
    let d = tmp("too-large");
    let e = run(&cfg, &opts(&d.0), &mut Quiet).unwrap_err();
    let e = chain(&e);
    assert!(
        e.contains("does not fit in memory")
            && e.contains("GiB per rank")
            && e.contains("this machine offers")
            && e.contains("--pp"),
        "{e}"
    );
}
