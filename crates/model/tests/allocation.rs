//! Real allocations vs `plan::cpu_runtime`'s prediction, with a counting global allocator.
//! One #[test] only: the allocator counts every thread of this test binary.

use kernels::Par;
use model::{
    backward, forward, ActSaved, ActScratch, Activations, AdamW, AdamWConfig, GradInput,
    ModelConfig, NoTp, ParamLayout, Shard, StageInput,
};
use plan::cpu_runtime;

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
                layers: 1..3,
                has_embedding: false,
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
    }
}
