//! A pipeline stage's memory, measured with a counting global allocator against
//! `plan::cpu_runtime::stage_memory`: for every stage of 1F1B and GPipe pipelines (even and
//! uneven partitions), the bytes the runtime allocates for the stage — parameters, gradients,
//! AdamW state, the saved activation sets its schedule keeps in flight, the shared scratch and
//! the receive buffers — equal the prediction within 1%. One #[test] only: the allocator
//! counts every thread of this test binary.

use kernels::Bf16;
use model::ModelConfig;
use plan::recipe::{Precision, Recompute};
use plan::schedule::{build, Kind};
use train::pipeline::{StageActs, StageModel};

#[path = "../../model/tests/common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::live;

#[test]
fn stage_buffers_match_plan_including_the_in_flight_sets() {
    let cfg = ModelConfig {
        vocab_size: 256,
        max_seq_len: 32,
        n_layer: 5,
        n_head: 4,
        channels: 64,
    };
    let (b, t, m) = (2usize, 32usize, 6u32);
    let mut checked = 0;
    for (kind, pp, counts) in [
        (Kind::OneFOneB, 2, vec![3, 2]),
        (Kind::OneFOneB, 3, vec![2, 2, 1]),
        (Kind::Gpipe, 2, vec![2, 3]),
    ] {
        let parts = train::mesh::partition(&cfg, (b, t), pp, Some(&counts)).unwrap();
        let lists = build(kind, pp as u32, m, 1);
        for (s, ops) in lists.iter().enumerate() {
            let before = live();
            let stage = StageModel::new(&cfg, &parts, &[s]).unwrap();
            let n = stage.len();
            let state: Vec<Vec<f32>> = (0..4).map(|_| vec![0.0f32; n]).collect(); // params, grads, m, v
            let acts = StageActs::new(&stage, ops, b, t);
            let measured = live() - before;
            let sets = acts.sets();
            let chunks: Vec<_> = stage
                .chunks
                .iter()
                .zip(&sets)
                .map(|((_, l, _), &k)| (l.shard.dims(&cfg), k as u64))
                .collect();
            let predicted = plan::cpu_runtime::stage_memory(&chunks, b as u64, t as u64, true);
            let p = predicted.total_bytes() as i64;
            eprintln!(
                "{kind:?} pp {pp} stage {s} ({:?} layers): {sets:?} saved sets, measured {measured} B, predicted {p} B",
                counts[s]
            );
            // The schedule's in-flight count: pp − stage for 1F1B, m for GPipe.
            let expect = match kind {
                Kind::OneFOneB => pp - s,
                Kind::Gpipe => m as usize,
            };
            assert_eq!(sets, [expect]);
            // Beyond the buffers: the layout's tensor list and the set bookkeeping (small).
            let rel = (measured - p) as f64 / p as f64;
            assert!(
                (0.0..0.01).contains(&rel),
                "stage {s}: measured {measured} B vs predicted {p} B"
            );
            drop((acts, state, stage));
            checked += 1;
        }
    }
    assert_eq!(checked, 7);
    // Tensor parallelism, with and without sequence parallelism: every rank of tp 2 and 4, a
    // whole model and both stages of pp 2 (1F1B), against `stage_memory_sp`.
    let mut saved_sp = Vec::new();
    for tp in [2usize, 4] {
        for pp in [1usize, 2] {
            let parts = train::mesh::partition(&cfg, (b, t), pp, None).unwrap();
            let lists = build(Kind::OneFOneB, pp as u32, m, 1);
            for (s, ops) in lists.iter().enumerate() {
                for sp in [false, true] {
                    for r in 0..tp {
                        let before = live();
                        let stage = StageModel::new_tp(&cfg, &parts, &[s], (r, tp)).unwrap();
                        let n = stage.len();
                        let state: Vec<Vec<f32>> = (0..4).map(|_| vec![0.0f32; n]).collect();
                        let acts = StageActs::new_sp(&stage, ops, b, t, sp).unwrap();
                        let measured = live() - before;
                        let chunks: Vec<_> = stage
                            .chunks
                            .iter()
                            .zip(acts.sets())
                            .map(|((_, l, _), k)| (l.shard.dims(&cfg), k as u64))
                            .collect();
                        let predicted = plan::cpu_runtime::stage_memory_sp(
                            &chunks,
                            b as u64,
                            t as u64,
                            pp > 1,
                            sp,
                        );
                        let p = predicted.total_bytes() as i64;
                        let rel = (measured - p) as f64 / p as f64;
                        assert!(
                            (0.0..0.01).contains(&rel),
                            "tp {tp} rank {r} pp {pp} stage {s} sp {sp}: measured {measured} B vs predicted {p} B"
                        );
                        if r == 0 && s == 0 {
                            saved_sp.push((tp, pp, sp, predicted.activation_bytes));
                        }
                        drop((acts, state, stage));
                    }
                }
            }
        }
    }
    // Mixed precision × recomputation with sequence parallelism: the 16-bit working copy and
    // gradient, the 16-bit saved sets and scratch of b·t/tp rows, against `trainer_memory_sp`.
    for (pp, tp) in [(1usize, 2usize), (2, 2)] {
        let parts = train::mesh::partition(&cfg, (b, t), pp, None).unwrap();
        let lists = build(Kind::OneFOneB, pp as u32, m, 1);
        for (s, ops) in lists.iter().enumerate() {
            for rc in [Recompute::None, Recompute::Selective, Recompute::Full] {
                for sp in [false, true] {
                    let before = live();
                    let stage = StageModel::new_tp(&cfg, &parts, &[s], (0, tp)).unwrap();
                    let n = stage.len();
                    let state: Vec<Vec<f32>> = (0..4).map(|_| vec![0.0f32; n]).collect();
                    let work: Vec<Vec<Bf16>> = (0..2).map(|_| vec![Bf16::default(); n]).collect();
                    let acts = StageActs::<Bf16>::with_sp(&stage, ops, b, t, rc, sp).unwrap();
                    let measured = live() - before;
                    let chunks: Vec<_> = stage
                        .chunks
                        .iter()
                        .zip(acts.sets())
                        .map(|((_, l, _), k)| (l.shard.dims(&cfg), k as u64))
                        .collect();
                    let base =
                        plan::cpu_runtime::stage_memory_sp(&chunks, b as u64, t as u64, pp > 1, sp);
                    let predicted = plan::cpu_runtime::trainer_memory_sp(
                        base,
                        &chunks,
                        b as u64,
                        t as u64,
                        pp > 1,
                        (Precision::Bf16Mixed, rc),
                        sp,
                    );
                    let p = predicted.total_bytes() as i64;
                    let rel = (measured - p) as f64 / p as f64;
                    assert!(
                        (0.0..0.01).contains(&rel),
                        "bf16 {rc:?} tp {tp} pp {pp} stage {s} sp {sp}: measured {measured} B vs predicted {p} B"
                    );
                    drop((acts, work, state, stage));
                }
            }
        }
    }
    // Sequence parallelism's saving shows in the activation bytes of every layout.
    for w in saved_sp.chunks(2) {
        let [(tp, pp, false, off), (_, _, true, on)] = w else {
            panic!("pairs of sp off/on: {w:?}")
        };
        eprintln!("tp {tp} pp {pp}: activations {off} B without sequence parallelism, {on} B with");
        assert!(
            on < off,
            "tp {tp} pp {pp}: {on} B with sp vs {off} B without"
        );
    }
}
