//! Real allocations vs `plan::cpu_runtime`'s prediction, with a counting global allocator.
//! One #[test] only: the allocator counts every thread of this test binary.

use kernels::Par;
use model::{
    backward, forward, ActSaved, ActScratch, Activations, AdamW, AdamWConfig, Bf16, Elem,
    GradInput, ModelConfig, NoTp, ParamLayout, Precision, Recompute, Shard, StageInput, F16,
};
use plan::cpu_runtime::{self, CpuRuntimeDims};

#[path = "common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{live, peak, reset_peak};

#[track_caller]
fn within_1pct(what: String, measured: i64, predicted: u64) {
    let (m, p) = (measured as f64, predicted as f64);
    eprintln!("{what}: measured {measured} B, predicted {predicted} B");
    assert!(
        (m - p).abs() <= 0.01 * p,
        "{what}: measured {measured} B vs predicted {predicted} B (> 1% apart)"
    );
}

#[test]
fn allocations_match_the_plan_prediction() {
    let cfg = ModelConfig {
        vocab_size: 1000,
        max_seq_len: 64,
        n_layer: 3,
        n_head: 4,
        channels: 64,
    };
    let full = Shard::full(&cfg);
    let cases = [
        (full.clone(), 4, 32),
        (
            Shard {
                tp_rank: 1,
                tp_size: 2,
                ..full.clone()
            },
            2,
            64,
        ),
        (
            Shard {
                tp_rank: 0,
                tp_size: 4,
                ..full.clone()
            },
            2,
            32,
        ),
        // vocabulary 1000 → 1024 padded: rank 3 of 4 holds rows 768..1024, 232 of them real
        (
            Shard {
                tp_rank: 3,
                tp_size: 4,
                ..full.clone()
            },
            2,
            32,
        ),
        (
            Shard {
                layers: 1..3,
                has_embedding: false,
                ..full.clone()
            },
            3,
            16,
        ),
        (
            Shard {
                layers: 2..3,
                has_embedding: false,
                tp_rank: 1,
                tp_size: 2,
                ..full.clone()
            },
            3,
            16,
        ),
        (
            Shard {
                layers: 0..1,
                has_head: false,
                ..full.clone()
            },
            3,
            16,
        ),
    ];
    for (shard, b, t) in cases {
        let layout = ParamLayout::new(&cfg, &shard).unwrap();
        let dims = shard.dims(&cfg);
        let predicted = cpu_runtime::memory(&dims, b as u64, t as u64);
        let tag = format!(
            "{:?} tp {}/{} b {b} t {t}",
            shard.layers, shard.tp_rank, shard.tp_size
        );

        let before = live();
        let mut params = layout.init_params(1);
        let measured = live() - before;
        within_1pct(format!("{tag}: params"), measured, predicted.param_bytes);
        let before = live();
        let mut grads = vec![0.0f32; layout.len()];
        let measured = live() - before;
        within_1pct(format!("{tag}: grads"), measured, predicted.grad_bytes);
        let before = live();
        let mut opt = AdamW::new(&layout);
        let measured = live() - before;
        within_1pct(format!("{tag}: AdamW"), measured, predicted.optimizer_bytes);
        let before = live();
        let mut acts = Activations::new(&layout, b, t);
        let measured = live() - before;
        within_1pct(
            format!("{tag}: activations"),
            measured,
            predicted.activation_bytes,
        );

        // A pipeline stage with K micro-batches in flight: K saved sets plus one scratch.
        let k = 3u64;
        let before = live();
        let saved: Vec<ActSaved> = (0..k).map(|_| ActSaved::new(&layout, b, t)).collect();
        let scratch = ActScratch::new(&layout, b, t);
        let measured = live() - before;
        let (saved_n, scratch_n) = (
            cpu_runtime::saved_activation_count(&dims, b as u64, t as u64),
            cpu_runtime::scratch_activation_count(&dims, b as u64, t as u64),
        );
        assert_eq!(saved[0].len() as u64, saved_n, "{tag}: ActSaved::len");
        assert_eq!(scratch.len() as u64, scratch_n, "{tag}: ActScratch::len");
        within_1pct(
            format!("{tag}: {k} saved sets + 1 scratch"),
            measured,
            cpu_runtime::F32_BYTES * (k * saved_n + scratch_n),
        );
        drop((saved, scratch));

        // A full step allocates nothing that outlives it. Its transient peak is thread spawns and
        // the gemm crate's per-call packing buffers, sized by the CPU caches, not the model
        // (~1 MB per thread measured); we bound it by 2 MiB per thread.
        if shard.tp_size == 1 && shard.has_embedding && shard.has_head {
            let tokens: Vec<u32> = (0..b * t)
                .map(|i| (i * 7 % cfg.vocab_size) as u32)
                .collect();
            let targets: Vec<u32> = (0..b * t)
                .map(|i| (i * 13 % cfg.vocab_size) as u32)
                .collect();
            // Step 0 warms one-time lazy state (CPU feature detection, thread-local setup).
            let mut steady = live();
            for i in 0..3 {
                if i == 1 {
                    steady = live();
                    reset_peak();
                }
                forward(
                    &layout,
                    &params,
                    &mut acts,
                    StageInput::Tokens(&tokens),
                    Some(&targets),
                    Par::Threads(2),
                    &mut NoTp,
                )
                .unwrap();
                let gi = GradInput::Loss {
                    targets: &targets,
                    d_loss: 1.0 / (b * t) as f32,
                };
                backward(
                    &layout,
                    &params,
                    &mut grads,
                    &mut acts,
                    StageInput::Tokens(&tokens),
                    gi,
                    Par::Threads(2),
                    &mut NoTp,
                )
                .unwrap();
                opt.step(
                    &layout,
                    &mut params,
                    &mut grads,
                    &AdamWConfig::default(),
                    Par::Threads(2),
                );
            }
            // A scoped thread frees its last bookkeeping (~100 B) as it exits, which can land just
            // after the join returns; anything model-sized would be kilobytes.
            let kept = live() - steady;
            assert!(kept.abs() <= 1024, "a training step kept {kept} B");
            let transient = peak() - steady;
            eprintln!("{tag}: step transient peak {transient} B");
            assert!(
                transient <= 2 * 2 * 1024 * 1024,
                "step transient {transient} B > 2 MiB x 2 threads"
            );
        }
        drop((params, grads, opt, acts));
        if shard.tp_size == 1 && shard.has_embedding && shard.has_head {
            mixed_steps_keep_nothing::<Bf16>(&layout, &cfg, b, t, &tag);
            mixed_steps_keep_nothing::<F16>(&layout, &cfg, b, t, &tag);
        }
        let sps: &[bool] = if shard.tp_size > 1 {
            &[false, true]
        } else {
            &[false]
        };
        for &sp in sps {
            for r in [Recompute::None, Recompute::Selective, Recompute::Full] {
                let tag = format!("{tag}{}", if sp { " sp" } else { "" });
                let run = (b, t, r, sp);
                let m32 = precision_case::<f32>(&layout, &dims, run, Precision::Fp32, &tag);
                let mbf = precision_case::<Bf16>(&layout, &dims, run, Precision::Bf16Mixed, &tag);
                precision_case::<F16>(&layout, &dims, run, Precision::Fp16Mixed, &tag);
                if sp {
                    // sequence parallelism's saving shows in what is really allocated
                    let off32 = precision_case::<f32>(
                        &layout,
                        &dims,
                        (b, t, r, false),
                        Precision::Fp32,
                        &tag,
                    );
                    eprintln!(
                        "{tag} {r:?}: fp32 activations with sequence parallelism {:.3}x of without",
                        m32 as f64 / off32 as f64
                    );
                    assert!(m32 < off32 && mbf < off32, "{tag}: no saving");
                }
            }
        }
    }
    full_recompute_ratio_of_the_bench_model();
}

/// Mixed-precision training steps with full recomputation allocate nothing that outlives them
/// once the first step has grown the per-thread staging and packing buffers (kept by each
/// kernel thread); the transient peak is the gemm crate's packing and thread bookkeeping.
fn mixed_steps_keep_nothing<E: Elem>(
    layout: &ParamLayout,
    cfg: &ModelConfig,
    b: usize,
    t: usize,
    tag: &str,
) {
    use model::{backward_with, forward_with, ActSaved, ActScratch};
    let mut master = layout.init_params(1);
    let mut working: Vec<E> = master.iter().map(|&x| E::from_f32(x)).collect();
    let mut grads = vec![E::default(); layout.len()];
    let mut opt = AdamW::new(layout);
    let mut saved = ActSaved::<E>::with(layout, b, t, Recompute::Full);
    let mut scratch = ActScratch::<E>::with(layout, b, t, Recompute::Full);
    let tokens: Vec<u32> = (0..b * t)
        .map(|i| (i * 7 % cfg.vocab_size) as u32)
        .collect();
    let targets: Vec<u32> = (0..b * t)
        .map(|i| (i * 13 % cfg.vocab_size) as u32)
        .collect();
    let scale = 1024.0;
    let mut steady = live();
    for i in 0..3 {
        if i == 1 {
            steady = live();
            reset_peak();
        }
        let x = StageInput::Tokens(&tokens);
        let par = Par::Threads(2);
        grads.fill(E::default());
        forward_with(
            layout,
            &working,
            &mut saved,
            &mut scratch,
            x,
            Some(&targets),
            par,
            &mut NoTp,
        )
        .unwrap();
        let gi = GradInput::Loss {
            targets: &targets,
            d_loss: scale / (b * t) as f32,
        };
        backward_with(
            layout,
            &working,
            &mut grads[..],
            &mut saved,
            &mut scratch,
            x,
            gi,
            par,
            &mut NoTp,
        )
        .unwrap();
        let cfg = AdamWConfig::default();
        opt.step_mixed(
            layout,
            &mut master,
            &mut working,
            &grads,
            1.0 / scale,
            &cfg,
            par,
        );
    }
    let kept = live() - steady;
    let transient = peak() - steady;
    eprintln!(
        "{tag} {}: full-recompute step transient peak {transient} B",
        E::NAME
    );
    assert!(
        kept.abs() <= 1024,
        "{tag} {}: a step kept {kept} B",
        E::NAME
    );
    assert!(
        transient <= 2 * 2 * 1024 * 1024,
        "{tag} {}: step transient {transient} B > 2 MiB x 2 threads",
        E::NAME
    );
}

/// Activations (saved + scratch), working weights and gradients in storage type `E` under
/// `recompute` and sequence parallelism `sp`, against `plan::cpu_runtime::memory_with` and
/// `activation_bytes_sp`. Returns the activation bytes allocated.
fn precision_case<E: Elem>(
    layout: &ParamLayout,
    dims: &CpuRuntimeDims,
    (b, t, recompute, sp): (usize, usize, Recompute, bool),
    precision: Precision,
    tag: &str,
) -> i64 {
    let tag = format!("{tag} {} {recompute:?}", E::NAME);
    let predicted = cpu_runtime::memory_with(dims, b as u64, t as u64, precision, recompute);
    let predicted_acts =
        cpu_runtime::activation_bytes_sp(dims, b as u64, t as u64, precision, recompute, 1, sp);
    let before = live();
    let saved = ActSaved::<E>::with_sp(layout, b, t, recompute, sp).unwrap();
    let scratch = ActScratch::<E>::with_sp(layout, b, t, recompute, sp).unwrap();
    let acts = live() - before;
    within_1pct(format!("{tag}: activations"), acts, predicted_acts);
    assert_eq!(
        (saved.bytes() + scratch.bytes()) as u64,
        predicted_acts,
        "{tag}: buffer sizes"
    );
    let before = live();
    let master = vec![0.0f32; if E::BYTES == 4 { 0 } else { layout.len() }];
    let working = vec![E::default(); layout.len()];
    let measured = live() - before;
    within_1pct(format!("{tag}: weights"), measured, predicted.param_bytes);
    let before = live();
    let grads = vec![E::default(); layout.len()];
    let measured = live() - before;
    within_1pct(format!("{tag}: grads"), measured, predicted.grad_bytes);
    drop((saved, scratch, master, working, grads));
    acts
}

/// The bench model (L4 H4 C256 T128 B8, vocabulary 8192): activation bytes of every precision
/// × recompute, predicted and allocated (printed as the table in docs/runtime.md), and bytes
/// per parameter of the model state.
fn full_recompute_ratio_of_the_bench_model() {
    let cfg = ModelConfig {
        vocab_size: 8192,
        max_seq_len: 128,
        n_layer: 4,
        n_head: 4,
        channels: 256,
    };
    let layout = ParamLayout::new(&cfg, &Shard::full(&cfg)).unwrap();
    let dims = layout.shard.dims(&cfg);
    fn alloc<E: Elem>(layout: &ParamLayout, r: Recompute) -> i64 {
        let before = live();
        let a = model::Activations::<E>::with(layout, 8, 128, r);
        let m = live() - before;
        drop(a);
        m
    }
    let mut bytes = std::collections::HashMap::new();
    eprintln!("| precision | recompute | activations predicted | allocated | state B/param |");
    for p in [Precision::Fp32, Precision::Bf16Mixed, Precision::Fp16Mixed] {
        for r in [Recompute::None, Recompute::Selective, Recompute::Full] {
            let predicted = cpu_runtime::activation_bytes_with(&dims, 8, 128, p, r, 1);
            let measured = match p {
                Precision::Fp32 => alloc::<f32>(&layout, r),
                Precision::Bf16Mixed => alloc::<Bf16>(&layout, r),
                Precision::Fp16Mixed => alloc::<F16>(&layout, r),
            };
            within_1pct(format!("bench model {p:?} {r:?}"), measured, predicted);
            let m = cpu_runtime::memory_with(&dims, 8, 128, p, r);
            let per_param =
                (m.param_bytes + m.grad_bytes + m.optimizer_bytes) as f64 / layout.len() as f64;
            eprintln!("| {p:?} | {r:?} | {predicted} | {measured} | {per_param} |");
            bytes.insert((format!("{p:?}"), format!("{r:?}")), measured as f64);
        }
    }
    let b = |p: &str, r: &str| bytes[&(p.to_string(), r.to_string())];
    eprintln!(
        "bench model activations: full/none fp32 {:.3}, bf16 {:.3}; bf16+full / fp32 none {:.3}",
        b("Fp32", "Full") / b("Fp32", "None"),
        b("Bf16Mixed", "Full") / b("Bf16Mixed", "None"),
        b("Bf16Mixed", "Full") / b("Fp32", "None"),
    );
    for p in ["Fp32", "Bf16Mixed", "Fp16Mixed"] {
        assert!(b(p, "Full") < b(p, "Selective") && b(p, "Selective") < b(p, "None"));
    }
    assert!(b("Bf16Mixed", "None") < b("Fp32", "None"));
}
