//! Data parallelism against the single-process trainer, ranks as threads over the in-process
//! transport (`comm::threads`), 20 steps of a tiny model.
//!
//! What is bitwise and what is a tolerance, and why:
//! - every rank of a run ends with bitwise identical parameters (all ranks apply the same
//!   update to the same reduced bits);
//! - DP=2 ring vs DP=2 synchronous parameter server: **bitwise** (two summands: `g0 + g1` is the
//!   same float whichever rank or server adds it);
//! - DP=2 ZeRO-1 vs DP=2 ring with clipping off: **bitwise** (reduce-scatter gives the same sums,
//!   AdamW is elementwise); with clipping on the global norm is summed shard by shard (f64),
//!   which moves the clip factor by an ulp: tolerance;
//! - DP=2 (ring, PS, ZeRO-1, ZeRO-2) vs 1 rank at the same global batch, and 1 rank with
//!   grad-accum 2 vs 1 rank with the doubled batch: **tolerance** (losses within 1e-4 relative,
//!   parameters within 1e-3 absolute after 20 steps at lr 1e-2, where AdamW moves a weight by up
//!   to ~0.1: Adam divides by √v, so gradients near zero turn last-bit differences into
//!   visible ones; measured worst 1.1e-4). The 1-rank run accumulates micro-batch 1's
//!   gradients into micro-batch 0's inside the kernels (`+=` over the batch rows), the DP run adds
//!   two separately computed sums, so the f32 rounding differs in the last bits. Step 1's
//!   training loss (before any update) is bitwise equal in every layout: the same forward passes
//!   summed in the same f64 order.
mod common;
mod dp_common;

use dp_common::*;

#[test]
fn dp2_ring_ps_zero_and_accumulation_reproduce_one_rank() {
    let cfg = tiny(20);
    // One rank, global batch 2 × 4 as two micro-batches of 4 (the DP order of micro-batches).
    let mut one_cfg = cfg.clone();
    one_cfg.train.grad_accum = 2;
    let one = single(&one_cfg, "one");

    let ring2 = ring(2, ZeroStage::Off, &cfg, "ring");
    assert_ranks_equal(&ring2);
    assert_close(&ring2[0], &one, "DP=2 ring vs 1 rank");

    let ps2 = ps(2, 1, &cfg, "ps");
    assert_ranks_equal(&ps2);
    assert_eq!(
        ps2[0].params, ring2[0].params,
        "PS sync must equal ring bitwise"
    );
    assert_eq!(losses(&ps2[0]), losses(&ring2[0]));
    // Two servers: each owns half the buffer; same sums.
    let ps22 = ps(2, 2, &cfg, "ps2");
    assert_eq!(ps22[0].params, ring2[0].params);

    let z1 = ring(2, ZeroStage::One, &cfg, "z1");
    assert_ranks_equal(&z1);
    assert_close(&z1[0], &one, "DP=2 ZeRO-1 vs 1 rank");
    let z2 = ring(2, ZeroStage::Two, &cfg, "z2");
    assert_ranks_equal(&z2);
    assert_close(&z2[0], &one, "DP=2 ZeRO-2 vs 1 rank");

    // One rank, grad-accum 2 of batch 4 vs one batch of 8 (same windows, same order).
    let mut big = cfg.clone();
    big.train.batch_size = 8;
    let big = single(&big, "big");
    assert_close(&one, &big, "1 rank grad-accum 2 vs batch 8");
}

#[test]
fn zero1_equals_ring_bitwise_without_clipping_and_accumulates_like_one_rank() {
    let mut cfg = tiny(20);
    cfg.optim.grad_clip = 0.0;
    let r = ring(2, ZeroStage::Off, &cfg, "noclip-ring");
    let z = ring(2, ZeroStage::One, &cfg, "noclip-z1");
    assert_eq!(z[0].params, r[0].params);
    assert_eq!(losses(&z[0]), losses(&r[0]));
    // With accumulation (2 micro-steps per rank): ZeRO-2 reduces each micro-step; 1 rank × 4.
    cfg.train.grad_accum = 2;
    let z2 = ring(2, ZeroStage::Two, &cfg, "accum-z2");
    let r2 = ring(2, ZeroStage::Off, &cfg, "accum-ring");
    let mut one = cfg.clone();
    one.train.grad_accum = 4;
    let one = single(&one, "accum-one");
    assert_ranks_equal(&z2);
    assert_close(&r2[0], &one, "DP=2 × accum 2 vs 1 rank × accum 4");
    assert_close(&z2[0], &one, "DP=2 ZeRO-2 × accum 2 vs 1 rank × accum 4");
}

#[test]
fn zero_memory_matches_plan_and_halves_adamw() {
    let cfg = tiny(2);
    let mut by_stage = Vec::new();
    for zero in [ZeroStage::Off, ZeroStage::One, ZeroStage::Two] {
        let rs = ring(2, zero, &cfg, &format!("mem{}", zero.number()));
        for r in &rs {
            assert_eq!(r.start.allocated_bytes, r.start.predicted.total_bytes());
        }
        by_stage.push(rs[0].start.predicted);
    }
    // With 2 micro-batches per step the weights are packed once per step into panels
    // (kernels::panels, on our AVX-512 kernel), counted by the prediction.
    let mut accum = cfg.clone();
    accum.train.grad_accum = 2;
    for zero in [ZeroStage::Off, ZeroStage::Two] {
        let rs = ring(2, zero, &accum, &format!("mem-accum{}", zero.number()));
        for r in &rs {
            assert_eq!(r.start.allocated_bytes, r.start.predicted.total_bytes());
        }
        let i = zero.number() as usize;
        let (with, without) = (rs[0].start.predicted, by_stage[i]);
        // The panels are a category of their own; the weights stay the weights.
        assert_eq!(with.param_bytes, without.param_bytes);
        let extra = with.weight_panel_bytes;
        if kernels::panels::WeightPanels::available() {
            // Both packings of every linear weight and of the tied head: at least twice the
            // layers' 12·c² weights each, at most twice all parameters.
            let (l, c) = (accum.model.n_layer as u64, accum.model.channels as u64);
            assert!(
                extra >= 4 * 2 * 12 * l * c * c,
                "ZeRO-{i}: panels {extra} B"
            );
            assert!(
                extra <= 2 * rs[0].start.params as u64 * 4,
                "ZeRO-{i}: panels {extra} B"
            );
        } else {
            assert_eq!(extra, 0, "ZeRO-{i}: no panels without our AVX-512 kernel");
        }
        assert_eq!(with.activation_bytes, without.activation_bytes);
    }
    let full = by_stage[0].optimizer_bytes;
    assert!(by_stage[1].optimizer_bytes * 2 <= full + 8);
    assert!(by_stage[1].optimizer_bytes * 2 >= full);
    assert_eq!(by_stage[2].optimizer_bytes, by_stage[1].optimizer_bytes);
}

#[test]
fn different_config_on_one_rank_is_refused_with_its_rank() {
    let cfg = tiny(3);
    let out = ring_ranks(2, ZeroStage::Off, &cfg, &tmp("fp"), |r, c, _| {
        if r == 1 {
            c.optim.lr = 2e-2;
        }
    });
    for o in out {
        let e = o.unwrap_err().to_string();
        assert!(
            e.contains("rank(s) [1]") && e.contains("different config"),
            "{e}"
        );
    }
}

#[test]
fn a_rank_that_stops_fails_the_job_and_keeps_the_last_checkpoint() {
    let mut cfg = tiny(20);
    cfg.train.checkpoint_every = 5;
    let dir = tmp("dies");
    let out = ring_ranks(2, ZeroStage::Off, &cfg, &dir, |r, _, o| {
        if r == 1 {
            o.stop_after = Some(7); // then it leaves the job, as a crashed rank would
        }
    });
    let e = out[0].as_ref().unwrap_err().to_string();
    assert!(e.contains("data parallel"), "{e}");
    let newest = train::checkpoint::list(&dir);
    assert_eq!(newest[0].0, 5);
    train::checkpoint::load(&newest[0].1).expect("the last checkpoint is intact");
}

fn copy_dir(from: &Path, name: &str) -> PathBuf {
    let to = tmp(name);
    for f in std::fs::read_dir(from).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
    to
}

fn resume_on(
    n: usize,
    zero: ZeroStage,
    cfg: &TrainConfig,
    dir: &Path,
    stop: Option<u64>,
) -> Vec<RunSummary> {
    ring_ranks(n, zero, cfg, dir, |_, _, o| {
        o.resume = true;
        o.stop_after = stop;
    })
    .into_iter()
    .map(Result::unwrap)
    .collect()
}

/// `(step, loss bits, val_loss bits)` of every `metrics.jsonl` line.
fn loss_lines(dir: &Path) -> Vec<(u64, Option<u64>, Option<u64>)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        // A straggler warning depends on timing, not on the maths (crate::straggler).
        .filter(|v| v.get("straggler").is_none())
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().map(f64::to_bits),
                v["val_loss"].as_f64().map(f64::to_bits),
            )
        })
        .collect()
}

/// A resumed run against the tail of the uninterrupted one, when the two sum gradients in a
/// different order (another dp × grad_accum split of the same global batch): the first resumed
/// step starts from the checkpoint's bits and sums the same forward losses in the same f64
/// order, so its loss is bitwise equal; after that the tolerance of [`assert_close`] (and for
/// the same reason: DP adds separately rounded per-rank sums, one rank accumulates in-kernel).
#[track_caller]
fn assert_resumed_close(resumed: &RunSummary, straight: &RunSummary, what: &str) {
    let tail = &straight.records[straight.records.len() - resumed.records.len()..];
    assert_steps_close(resumed, tail, &straight.params, what);
}

fn resume_single(cfg: &TrainConfig, dir: &Path) -> Result<RunSummary, TrainError> {
    let o = RunOptions {
        resume: true,
        ..opts(dir, None)
    };
    run(cfg, &o, &mut Quiet)
}

#[test]
fn dp_resume_is_bit_exact_and_resharding_zero_state_works() {
    let cfg = tiny(20);
    let straight_dir = tmp("straight");
    let straight: Vec<RunSummary> =
        ring_ranks(2, ZeroStage::One, &cfg, &straight_dir, |_, _, _| {})
            .into_iter()
            .map(Result::unwrap)
            .collect();
    let dir = tmp("halves");
    for r in ring_ranks(2, ZeroStage::One, &cfg, &dir, |_, _, o| {
        o.stop_after = Some(10)
    }) {
        r.unwrap();
    }
    // Weights once, one optimizer file per rank, each listed with the ranges it holds.
    let m10 = train::checkpoint::manifest_path(&dir, 10);
    let manifest = train::checkpoint::read_manifest(&m10).unwrap();
    let o = &manifest.optimizer;
    assert_eq!((o.dp_size, o.zero_stage), (2, 1));
    assert_eq!(manifest.global_micro_batches, 2);
    let names: Vec<&str> = o.shards.iter().map(|s| s.file.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "step-00000010.optim-rank-0-of-2.safetensors",
            "step-00000010.optim-rank-1-of-2.safetensors"
        ]
    );
    for s in &o.shards {
        assert_eq!(
            std::fs::metadata(dir.join(&s.file.name)).unwrap().len(),
            s.file.bytes
        );
        assert!(s.ranges.iter().map(|r| r.len()).sum::<usize>() < o.len);
    }
    let covered: usize = o
        .shards
        .iter()
        .flat_map(|s| &s.ranges)
        .map(|r| r.len())
        .sum();
    assert_eq!(covered, o.len);
    assert!(!dir.join("step-00000010.state.safetensors").exists());
    let (to1, to1_refused, to3) = (
        copy_dir(&dir, "to1"),
        copy_dir(&dir, "to1-refused"),
        copy_dir(&dir, "to3-refused"),
    );

    // Same size: bit for bit (losses, metrics lines, weights, the final optimizer state).
    let resumed = resume_on(2, ZeroStage::One, &cfg, &dir, None);
    assert_ranks_equal(&resumed);
    assert_eq!(
        resumed[0].params, straight[0].params,
        "same-size resume must be bit-exact"
    );
    assert_eq!(losses(&resumed[0]), losses(&straight[0])[10..]);
    assert_eq!(loss_lines(&dir), loss_lines(&straight_dir));
    let final_state = |d: &Path| {
        train::checkpoint::load(&train::checkpoint::manifest_path(d, 20))
            .unwrap()
            .2
    };
    assert_eq!(final_state(&dir), final_state(&straight_dir));

    // dp 2 → 1: the same global batch needs grad_accum 2; keeping grad_accum 1 is refused.
    let e = resume_single(&cfg, &to1_refused).unwrap_err().to_string();
    assert!(
        e.contains("global batch")
            && e.contains("dp 2 × grad_accum 1")
            && e.contains("dp 1 × grad_accum 1")
            && e.contains("--global-batch 8"),
        "{e}"
    );
    let mut accum2 = cfg.clone();
    accum2.train.grad_accum = 2;
    let one = resume_single(&accum2, &to1).unwrap();
    assert_eq!(one.start.start_step, 10);
    assert_resumed_close(&one, &straight[0], "DP=2 ZeRO-1 -> 1 rank × accum 2");
    // dp 2 → 3: 2 micro-batches per step cannot be split over 3 ranks.
    for r in ring_ranks(3, ZeroStage::One, &cfg, &to3, |_, _, o| o.resume = true) {
        let e = r.unwrap_err().to_string();
        assert!(e.contains("not a multiple of 3"), "{e}");
    }

    // dp 1 → 2: a 1-rank checkpoint (one whole-state file) re-sharded into ZeRO-1 ranges.
    let one_straight = single(&accum2, "one-straight");
    let one_half = tmp("one-half");
    run(
        &accum2,
        &RunOptions {
            stop_after: Some(10),
            ..opts(&one_half, None)
        },
        &mut Quiet,
    )
    .unwrap();
    let two = resume_on(2, ZeroStage::One, &cfg, &one_half, None);
    assert_ranks_equal(&two);
    assert_resumed_close(&two[0], &one_straight, "1 rank × accum 2 -> DP=2 ZeRO-1");
}

#[test]
fn zero_state_is_resharded_over_three_ranks() {
    // Global batch 6 micro-batches: dp 2 × grad_accum 3, then dp 3 × grad_accum 2. The 3-rank
    // ranges cut across the 2-rank files. ZeRO-1 (its own ranges from both files) and plain
    // ring (the whole state assembled from both files) run the same sums, and differ only by
    // the clip factor's shard-wise norm (an ulp): 1e-5 after 3 steps. A wrongly assembled
    // m or v moves AdamW's update by about lr = 1e-2.
    let mut cfg = tiny(8);
    cfg.train.grad_accum = 3;
    let dir = tmp("g6");
    for r in ring_ranks(2, ZeroStage::One, &cfg, &dir, |_, _, o| {
        o.stop_after = Some(5)
    }) {
        r.unwrap();
    }
    let (dir_z3, dir_r3) = (copy_dir(&dir, "z3"), copy_dir(&dir, "r3"));
    cfg.train.grad_accum = 2;
    let z3 = resume_on(3, ZeroStage::One, &cfg, &dir_z3, None);
    assert_ranks_equal(&z3);
    let r3 = resume_on(3, ZeroStage::Off, &cfg, &dir_r3, None);
    assert_eq!(r3[0].records.len(), 3);
    assert_eq!(z3[0].records[0].loss, r3[0].records[0].loss);
    let worst = z3[0]
        .params
        .iter()
        .zip(&r3[0].params)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0f32, f32::max);
    eprintln!("dp 2 -> 3, ZeRO-1 vs ring: parameters differ by up to {worst}");
    assert!(worst < 1e-5, "re-sharded resume differs by {worst}");
    // The continued runs wrote their own layouts: three shards, and one whole-state file.
    let shards = |d: &Path| {
        train::checkpoint::read_manifest(&train::checkpoint::manifest_path(d, 8))
            .unwrap()
            .optimizer
            .shards
            .len()
    };
    assert_eq!((shards(&dir_z3), shards(&dir_r3)), (3, 1));
}

#[test]
fn a_missing_truncated_or_unlisted_optimizer_shard_is_refused_naming_it() {
    let mut cfg = tiny(6);
    cfg.train.checkpoint_every = 3;
    cfg.train.keep_checkpoints = 5;
    let dir = tmp("shard-bad");
    for r in ring_ranks(2, ZeroStage::One, &cfg, &dir, |_, _, _| {}) {
        r.unwrap();
    }
    let (m3, m6) = (
        train::checkpoint::manifest_path(&dir, 3),
        train::checkpoint::manifest_path(&dir, 6),
    );
    let shard = |step: u64, rank: usize| {
        dir.join(format!("step-{step:08}.optim-rank-{rank}-of-2.safetensors"))
    };
    // Truncated: refused by name; resume falls back to step 3 on every rank, with a warning.
    let bytes = std::fs::read(shard(6, 1)).unwrap();
    std::fs::write(shard(6, 1), &bytes[..bytes.len() / 2]).unwrap();
    let e = train::checkpoint::load(&m6).unwrap_err().to_string();
    assert!(
        e.contains("optim-rank-1-of-2") && e.contains("truncated"),
        "{e}"
    );
    let resumed = resume_on(2, ZeroStage::One, &cfg, &dir, None);
    for r in &resumed {
        assert_eq!(r.start.start_step, 3);
        assert!(
            r.start
                .warnings
                .iter()
                .any(|w| w.contains("optim-rank-1-of-2") && w.contains("truncated")),
            "{:?}",
            r.start.warnings
        );
    }
    // Missing (the resumed run rewrote step 6 whole): refused by name.
    train::checkpoint::load(&m6).unwrap();
    std::fs::remove_file(shard(6, 0)).unwrap();
    let e = train::checkpoint::load(&m6).unwrap_err().to_string();
    assert!(
        e.contains("step-00000006.optim-rank-0-of-2.safetensors") && e.contains("missing"),
        "{e}"
    );
    // Unlisted: a manifest that lost a shard's entry does not cover m and v.
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&m3).unwrap()).unwrap();
    json["optimizer"]["shards"].as_array_mut().unwrap().pop();
    std::fs::write(&m3, json.to_string()).unwrap();
    let e = train::checkpoint::load(&m3).unwrap_err().to_string();
    assert!(e.contains("no optimizer file of rank 1 of 2"), "{e}");
    // No valid checkpoint left: every rank stops with every reason.
    for r in ring_ranks(2, ZeroStage::One, &cfg, &dir, |_, _, o| o.resume = true) {
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("cannot resume") && e.contains("missing") && e.contains("rank 1 of 2"),
            "{e}"
        );
    }
}

#[test]
fn no_manifest_is_published_when_a_rank_cannot_write_its_shard() {
    let cfg = tiny(3);
    let dir = tmp("shard-unwritable");
    // Rank 1's shard path is a folder: its atomic rename fails.
    std::fs::create_dir(dir.join("step-00000003.optim-rank-1-of-2.safetensors")).unwrap();
    for r in ring_ranks(2, ZeroStage::One, &cfg, &dir, |_, _, _| {}) {
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("rank 1 could not write its part") || e.contains("optim-rank-1-of-2"),
            "{e}"
        );
    }
    assert!(train::checkpoint::list(&dir).is_empty());
}

#[test]
fn asynchronous_parameter_server_trains_about_as_well_as_synchronous() {
    let cfg = tiny(60);
    let sync = ps(2, 1, &cfg, "ps-sync60");
    let asy = ps_mode(
        2,
        1,
        comm::ps::PsMode::Async { staleness: 2 },
        &cfg,
        "ps-async60",
    );
    let (vs, va) = (
        sync[0].val_losses.last().unwrap().1,
        asy[0].val_losses.last().unwrap().1,
    );
    let start = asy[0].records[0].loss as f64;
    assert!(va < start - 0.5, "async did not learn: {start} -> {va}");
    assert!((va - vs).abs() < 0.15, "async {va} vs sync {vs}");
}

#[test]
fn a_stop_request_on_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint() {
    let mut cfg = tiny(50);
    cfg.optim.grad_clip = 1.0;
    let dir = tmp("stop");
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let out: Vec<_> = ring_ranks(2, ZeroStage::One, &cfg, &dir, |r, _, o| {
        if r == 1 {
            o.stop = Some(flag.clone()); // Ctrl-C reached rank 1 only
        }
    })
    .into_iter()
    .map(Result::unwrap)
    .collect();
    for s in &out {
        assert!(s.interrupted);
        assert_eq!(s.steps_done, 1);
    }
    assert_eq!(train::checkpoint::list(&dir)[0].0, 1);
    let resumed = resume_on(2, ZeroStage::One, &cfg, &dir, Some(3));
    assert_eq!(resumed[0].steps_done, 3);
}

#[test]
fn any_disjoint_ranges_round_trip_through_the_shard_files() {
    // Bucketed ZeRO layouts give a rank several pieces: two ranks holding interleaved pieces
    // write a checkpoint; it is read back as the whole state and as other interleaved pieces.
    let mut cfg = tiny(1);
    cfg.model.vocab_size = Some(16);
    let mcfg = train::trainer::model_config(&cfg, 16);
    let layout = model::ParamLayout::new(&mcfg, &model::Shard::full(&mcfg)).unwrap();
    let n = layout.len();
    let (a, b, c, d) = (n / 7, n / 3, n / 2, n - 5);
    let held = [vec![0..a, b..c, d..n], vec![a..b, c..d]];
    let dir = tmp("pieces");
    let comms = comm::threads(2, comm_cfg());
    std::thread::scope(|s| {
        for (rank, comm) in comms.into_iter().enumerate() {
            let (cfg, layout, dir, ranges) = (&cfg, &layout, &dir, &held[rank]);
            s.spawn(move || {
                let mut dp = Dp::ring(Box::new(comm), ZeroStage::One);
                let values = |sign: f32| -> Vec<f32> {
                    ranges
                        .iter()
                        .flat_map(|r| r.clone())
                        .map(|i| sign * i as f32)
                        .collect()
                };
                let state = train::checkpoint::TrainState {
                    step: 7,
                    params: layout.init_params(1),
                    m: values(1.0),
                    v: values(-1.0),
                    adam_step: 7,
                    data_position: Default::default(),
                    tokens_seen: 0,
                    best_val_loss: None,
                    evals_without_improvement: 0,
                    stability: None,
                };
                let part = train::checkpoint::RankPart {
                    rank,
                    dp_size: 2,
                    zero_stage: 1,
                    ranges,
                };
                let saved =
                    train::checkpoint::save_rank(dir, cfg, layout, &state, &part, &mut |b| {
                        dp.all_gather_bytes(b, "test")
                    })
                    .unwrap();
                assert_eq!(saved.is_some(), rank == 0);
            });
        }
    });
    let path = train::checkpoint::manifest_path(&dir, 7);
    let manifest = train::checkpoint::read_manifest(&path).unwrap();
    assert_eq!(manifest.optimizer.shards[0].ranges, held[0]);
    assert_eq!(manifest.optimizer.shards[1].ranges, held[1]);
    let (_, _, full) = train::checkpoint::load(&path).unwrap();
    assert!(full.m.iter().enumerate().all(|(i, &x)| x == i as f32));
    assert!(full.v.iter().enumerate().all(|(i, &x)| x == -(i as f32)));
    let want = vec![n - 3..n, 2..a + 3, c - 1..c + 1];
    let (_, _, part) = train::checkpoint::load_ranges(&path, &|_| want.clone()).unwrap();
    let expected: Vec<f32> = want
        .iter()
        .flat_map(|r| r.clone())
        .map(|i| i as f32)
        .collect();
    assert_eq!(part.m, expected);
    assert_eq!(part.v, expected.iter().map(|x| -x).collect::<Vec<_>>());
}

#[test]
fn zero2_with_accumulation_resumes_bit_exact() {
    let mut cfg = tiny(6);
    cfg.train.grad_accum = 2;
    let straight = ring(2, ZeroStage::Two, &cfg, "z2-straight");
    let dir = tmp("z2-halves");
    for r in ring_ranks(2, ZeroStage::Two, &cfg, &dir, |_, _, o| {
        o.stop_after = Some(3)
    }) {
        r.unwrap();
    }
    let resumed = resume_on(2, ZeroStage::Two, &cfg, &dir, None);
    assert_eq!(resumed[0].params, straight[0].params);
    assert_eq!(losses(&resumed[0]), losses(&straight[0])[3..]);
}

/// Small buckets (one per layer, reduced on the communication thread while backward goes on, or
/// after it) change when and in what pieces gradients travel, not the sums: every variant
/// equals the one-bucket run bitwise (two summands per element; ZeRO's pieces are elementwise).
#[test]
fn bucketed_overlapped_reduction_equals_one_bucket_bitwise() {
    let mut cfg = tiny(12);
    cfg.model.n_layer = 3;
    cfg.optim.grad_clip = 0.0;
    let small = 4096; // below one layer (~50 KB): a bucket per layer, the head and the embedding
    for zero in [ZeroStage::Off, ZeroStage::One, ZeroStage::Two] {
        for accum in [1, 2] {
            cfg.train.grad_accum = accum;
            let tag = format!("z{}a{accum}", zero.number());
            let whole = ring_buckets(2, zero, (usize::MAX / 2, false), &cfg, &format!("{tag}-1b"));
            for overlap in [true, false] {
                let b = ring_buckets(2, zero, (small, overlap), &cfg, &format!("{tag}-{overlap}"));
                assert_ranks_equal(&b);
                assert_eq!(
                    b[0].params,
                    whole[0].params,
                    "ZeRO-{} accum {accum} overlap {overlap}",
                    zero.number()
                );
                assert_eq!(losses(&b[0]), losses(&whole[0]));
                for r in &b[0].records {
                    let (c, e) = (r.comm_secs.unwrap(), r.exposed_comm_secs.unwrap());
                    assert!(c > 0.0 && e >= 0.0, "step {}: comm {c} exposed {e}", r.step);
                    let w = r
                        .comm_wait_secs
                        .expect("the threads transport measures waits");
                    assert!((0.0..=c).contains(&w), "step {}: waited {w} of {c}", r.step);
                }
            }
        }
    }
    // And the ring one-bucket run is the 1-rank run (within the documented tolerance).
    cfg.train.grad_accum = 2;
    let one = single(&cfg, "bucket-one");
    cfg.train.grad_accum = 1;
    let b = ring_buckets(2, ZeroStage::Off, (small, true), &cfg, "bucket-vs-one");
    assert_eq!(b[0].records[0].loss, one.records[0].loss);
    assert!(losses(&b[0])
        .iter()
        .zip(losses(&one))
        .all(|(x, y)| ((x - y) / y).abs() < 1e-4));
}

/// `n` ZeRO ranks with `bucket_bytes` buckets into `dir`, resuming or not, stopping after `stop`.
fn ring_bucket_ranks(
    n: usize,
    zero: ZeroStage,
    bucket_bytes: usize,
    cfg: &TrainConfig,
    dir: &Path,
    (resume, stop): (bool, Option<u64>),
) -> Vec<RunSummary> {
    let comms = comm::threads(n, comm_cfg());
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let d = Dp::ring(Box::new(c), zero).with_buckets(bucket_bytes, true);
                    let o = RunOptions {
                        resume,
                        stop_after: stop,
                        ..opts(dir, Some(d))
                    };
                    run(cfg, &o, &mut Quiet).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn bucketed_zero_shards_hold_several_pieces_and_resume_under_another_bucket_layout() {
    // Small buckets give each rank one piece per bucket. Bucketing does not change the sums
    // (see bucketed_overlapped_reduction_equals_one_bucket_bitwise; clipping off), so a run
    // checkpointed with small buckets and resumed with one bucket (other pieces, cut out of
    // the small-bucket files) must equal the uninterrupted small-bucket run bitwise.
    let mut cfg = tiny(12);
    cfg.model.n_layer = 3;
    cfg.optim.grad_clip = 0.0;
    let (small, whole) = (4096, usize::MAX / 2);
    let straight = ring_bucket_ranks(
        2,
        ZeroStage::One,
        small,
        &cfg,
        &tmp("bk-straight"),
        (false, None),
    );
    let dir = tmp("bk-halves");
    ring_bucket_ranks(2, ZeroStage::One, small, &cfg, &dir, (false, Some(6)));
    let manifest =
        train::checkpoint::read_manifest(&train::checkpoint::manifest_path(&dir, 6)).unwrap();
    for s in &manifest.optimizer.shards {
        assert!(s.ranges.len() > 2, "rank {}: {:?}", s.rank, s.ranges);
    }
    let resumed = ring_bucket_ranks(2, ZeroStage::One, whole, &cfg, &dir, (true, None));
    assert_ranks_equal(&resumed);
    assert_eq!(resumed[0].params, straight[0].params);
    assert_eq!(losses(&resumed[0]), losses(&straight[0])[6..]);
}
