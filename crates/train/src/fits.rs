//! Refusing a model that cannot fit, before allocating it: the runtime's own memory prediction
//! (`plan::cpu_runtime`, the formulas its buffers are sized by) against the memory this process
//! may use — the cgroup limit (v2 `memory.max`, v1 `memory.limit_in_bytes`) or the physical
//! memory (`MemTotal`), whichever is smaller — shared by the ranks of this host.

use crate::dp::{Dp, ZeroStage};
use crate::error::TrainError;
use crate::pipeline::{Pipeline, StageModel};
use plan::cpu_runtime::CpuRuntimeMemory;
use plan::recipe::{Precision, Recompute};

/// The memory this process may use and where that number comes from.
pub fn memory_limit_bytes() -> Option<(u64, String)> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let mut best: Option<(u64, String)> = None;
    let mut offer = |bytes: u64, what: String| {
        if best.as_ref().is_none_or(|b| bytes < b.0) {
            best = Some((bytes, what));
        }
    };
    if let Some(kib) = read("/proc/meminfo").and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    }) {
        offer(kib * 1024, "physical memory (MemTotal)".into());
    }
    for p in [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ] {
        // "max" (no limit) does not parse; v1's "no limit" is a huge number, above MemTotal.
        if let Some(b) = read(p).and_then(|t| t.trim().parse::<u64>().ok()) {
            offer(b, format!("the cgroup limit ({p})"));
        }
    }
    best
}

/// [`check_fits`] for this rank's `predicted` buffers ([`rank_memory`]), sharing this host
/// with `LOCAL_WORLD_SIZE` ranks.
pub fn check_stage(predicted: &CpuRuntimeMemory) -> Result<(), TrainError> {
    let ranks_here = std::env::var("LOCAL_WORLD_SIZE")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1);
    check_fits(predicted, ranks_here, memory_limit_bytes())
}

/// The plan crate's view of everything a rank holding `stage` holds (all its chunks as one).
pub fn stage_dims(stage: &StageModel) -> plan::cpu_runtime::CpuRuntimeDims {
    let held: Vec<&model::Shard> = stage.chunks.iter().map(|(_, l, _)| &l.shard).collect();
    let first = held[0];
    model::Shard {
        layers: first.layers.start..held[held.len() - 1].layers.end,
        has_embedding: held.iter().any(|s| s.has_embedding),
        has_head: held.iter().any(|s| s.has_head),
        ..first.clone()
    }
    .dims(&stage.chunks[0].1.cfg)
}

/// The buffers a rank holding `stage` allocates for micro-batches of (`b`, `t`), by category:
/// `plan::cpu_runtime`'s formulas (the ones the buffers are sized by) for its layout — ZeRO-3
/// (`zero3_memory_sp`, tensor-parallel or not), ZeRO-0/1/2 data parallelism alone
/// (`zero_memory`), a pipeline or tensor-parallel stage (`stage_memory_sp`), one process
/// (`memory`) — then the precision's working copies and the recomputation's activations
/// (`trainer_memory_sp`; ZeRO-3's formula counts them itself), and the weight panels when
/// `panels` (`weight_panel_bytes` per chunk). `sets`: the saved activation sets each chunk
/// keeps in flight ([`crate::pipeline::activation_sets`]). The start report prints it, and
/// [`check_stage`] compares it with the machine before anything is allocated, so the check
/// and the allocation count the same bytes.
pub fn rank_memory(
    stage: &StageModel,
    (b, t): (usize, usize),
    sets: &[usize],
    dp: Option<&Dp>,
    pipe: Option<&Pipeline>,
    (precision, recompute): (Precision, Recompute),
    panels: bool,
) -> CpuRuntimeMemory {
    use plan::cpu_runtime as rt;
    if stage.chunks.is_empty() {
        return CpuRuntimeMemory::default();
    }
    let mcfg = &stage.chunks[0].1.cfg;
    let dims = stage_dims(stage);
    let (bu, tu) = (b as u64, t as u64);
    let (dp_rank, dp_size) = dp.map_or((0, 1), |d| (d.rank() as u64, d.size() as u64));
    let sp = pipe.is_some_and(|p| p.sequence_parallel);
    let pipelined = stage.vstages > 1;
    let zero3 = dp.is_some_and(|d| d.zero() == ZeroStage::Three);
    let chunk_sets: Vec<_> = stage
        .chunks
        .iter()
        .zip(sets)
        .map(|((_, l, _), &k)| (l.shard.dims(mcfg), k as u64))
        .collect();
    // ZeRO-3 runs one stage (tensor parallelism or not): its own formula, for this rank's
    // tensor-parallel shard, precision and recomputation included.
    if let Some(d) = dp.filter(|_| zero3) {
        let mut m = rt::zero3_memory_sp(
            &dims,
            (bu, tu),
            (dp_size, dp_rank),
            d.overlap(),
            (precision, recompute),
            sp,
        );
        if panels {
            m.weight_panel_bytes = crate::pipeline::stage_panel_bytes(stage);
        }
        return m;
    }
    // The fp32 buffers of the layout and the chunks whose activations it saves.
    let (base, chunks) = match (dp, pipe) {
        (Some(d), None) => (
            rt::zero_memory(
                &dims,
                bu,
                tu,
                d.zero().number(),
                dp_size,
                dp_rank,
                d.bucket_bytes() as u64,
            ),
            vec![(dims, 1)],
        ),
        (_, Some(_)) => {
            let mut m = rt::stage_memory_sp(&chunk_sets, bu, tu, pipelined, sp);
            if let Some(d) = dp.filter(|d| d.zero() != ZeroStage::Off) {
                // ZeRO-1 in a mesh: this rank's pieces of each chunk's buckets.
                m.optimizer_bytes = chunk_sets
                    .iter()
                    .map(|(c, _)| {
                        let z = d.zero().number();
                        rt::zero_memory(c, bu, tu, z, dp_size, dp_rank, d.bucket_bytes() as u64)
                            .optimizer_bytes
                    })
                    .sum();
            }
            (m, chunk_sets)
        }
        (None, None) => (rt::memory(&dims, bu, tu), vec![(dims, 1)]),
    };
    // The precision's working copies and the recomputation's activations.
    let mut m = rt::trainer_memory_sp(base, &chunks, bu, tu, pipelined, (precision, recompute), sp);
    if panels {
        // The weight panels packed once per step (`kernels::panels`), a category of their own.
        m.weight_panel_bytes = crate::pipeline::stage_panel_bytes(stage);
    }
    m
}

/// `b` bytes in GiB, or in MiB below one GiB.
fn size(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// Refuses `predicted` bytes per rank × `ranks_here` ranks on this host when that exceeds
/// `limit` (from [`memory_limit_bytes`]), naming both numbers, the weight panels when the
/// prediction holds some, and what would shrink it.
pub fn check_fits(
    predicted: &CpuRuntimeMemory,
    ranks_here: usize,
    limit: Option<(u64, String)>,
) -> Result<(), TrainError> {
    let Some((limit, what)) = limit else {
        return Ok(());
    };
    let per_rank = predicted.total_bytes();
    let need = per_rank.saturating_mul(ranks_here.max(1) as u64);
    if need <= limit {
        return Ok(());
    }
    let panels = predicted.weight_panel_bytes;
    Err(TrainError::DoesNotFit {
        reason: format!(
            "the model needs {} per rank{} (predicted: weights, gradients, AdamW state and \
             activations{}), but this machine offers {} ({what}); nothing was allocated. Make it \
             fit with a smaller model (model.n_layer, model.channels), a smaller \
             train.batch_size or model.seq_len, activation recomputation (--recompute full), \
             pipeline stages or tensor-parallel ranks on more machines (--pp, --tp), or ZeRO \
             sharding across data-parallel ranks (--zero 1, 2 or 3); bf16/fp16 mixed \
             precision shrinks activations but keeps fp32 master weights beside the 16-bit copy{}",
            size(per_rank),
            if ranks_here > 1 {
                format!(" × {ranks_here} ranks on this host = {}", size(need))
            } else {
                String::new()
            },
            if panels > 0 {
                format!(", and {} of weight panels", size(panels))
            } else {
                String::new()
            },
            size(limit),
            if panels > 0 {
                format!(
                    ". The weight panels ({}: both packings of every linear weight, kept for a \
                     step of several micro-batches in fp32 on the AVX-512 kernel) go with one \
                     micro-batch per step (train.grad_accum=1, a larger train.batch_size \
                     instead) or SCALETRAIN_NO_WEIGHT_PANELS=1 (each weight is then packed \
                     again for every micro-batch: slower steps)",
                    size(panels)
                )
            } else {
                String::new()
            },
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prediction of `bytes` weights.
    fn weights(bytes: u64) -> plan::cpu_runtime::CpuRuntimeMemory {
        plan::cpu_runtime::CpuRuntimeMemory {
            param_bytes: bytes,
            ..Default::default()
        }
    }

    #[test]
    fn refuses_with_both_numbers_and_passes_what_fits() {
        let lim = || Some((8u64 << 30, "physical memory (MemTotal)".to_string()));
        assert!(check_fits(&weights(1 << 30), 2, lim()).is_ok());
        let e = check_fits(&weights(1_611_040_849_920), 1, lim())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("1500.4 GiB per rank") && e.contains("offers 8.0 GiB"),
            "{e}"
        );
        assert!(!e.contains("weight panels"), "{e}");
        let e = check_fits(&weights(3 << 30), 3, lim())
            .unwrap_err()
            .to_string();
        assert!(e.contains("× 3 ranks on this host = 9.0 GiB"), "{e}");
        assert!(check_fits(&weights(u64::MAX), 1, None).is_ok());
        let (b, what) = memory_limit_bytes().expect("Linux has /proc/meminfo");
        assert!(b > 1 << 20, "{b} from {what}");
    }

    #[test]
    fn the_check_counts_the_weight_panels_the_runtime_allocates() {
        use crate::pipeline::{activation_sets, micro_batches, weight_panels_wanted, StageActs};
        use plan::schedule::{build, Kind};
        // 80 channels: panels padded to the kernel's 32 columns.
        let cfg = model::ModelConfig {
            vocab_size: 64,
            max_seq_len: 16,
            n_layer: 2,
            n_head: 4,
            channels: 80,
        };
        let fp32 = (Precision::Fp32, Recompute::None);
        let off = std::env::var("SCALETRAIN_NO_WEIGHT_PANELS").is_ok_and(|v| v.trim() == "1");
        let expect_panels = kernels::panels::WeightPanels::available() && !off;
        // The whole model, tensor-parallel rank 1 of 2, a pipeline's last stage of 2.
        let full = model::ParamLayout::new(&cfg, &model::Shard::full(&cfg)).unwrap();
        let stages = [
            (StageModel::whole(full), 1),
            (StageModel::new_tp(&cfg, &[0..2], &[0], (1, 2)).unwrap(), 1),
            (StageModel::new(&cfg, &[0..1, 1..2], &[1]).unwrap(), 2),
        ];
        for (k, (stage, pp)) in stages.iter().enumerate() {
            let (b, t, accum) = (2, 16, 3);
            let ops = build(Kind::OneFOneB, *pp, accum as u32, 1).swap_remove(*pp as usize - 1);
            let mut acts = StageActs::<f32>::new(stage, &ops, b, t);
            let used = acts.use_weight_panels(stage, &ops, false);
            // What the check counts (the decision and the bytes) is what the runtime allocated.
            let memory = |ops: &[plan::schedule::Op]| {
                let panels = weight_panels_wanted(true, micro_batches(stage, ops), false);
                rank_memory(
                    stage,
                    (b, t),
                    &activation_sets(stage, ops),
                    None,
                    None,
                    fp32,
                    panels,
                )
            };
            let m = memory(&ops);
            assert_eq!(m.weight_panel_bytes, acts.panel_bytes() as u64, "stage {k}");
            assert_eq!(used, expect_panels, "stage {k}");
            assert_eq!(used, m.weight_panel_bytes > 0, "stage {k}");
            // One micro-batch per step, mixed precision and ZeRO-3 pack none, on both sides.
            let one_ops = build(Kind::OneFOneB, *pp, 1, 1).swap_remove(*pp as usize - 1);
            let one = memory(&one_ops);
            assert_eq!(one.weight_panel_bytes, 0);
            assert_eq!(one.total_bytes() + m.weight_panel_bytes, m.total_bytes());
            let mut acts1 = StageActs::<f32>::new(stage, &one_ops, b, t);
            assert!(!acts1.use_weight_panels(stage, &one_ops, false));
            assert!(!weight_panels_wanted(
                false,
                micro_batches(stage, &ops),
                false
            ));
            let mut acts16 =
                StageActs::<kernels::Bf16>::with_sp(stage, &ops, b, t, Recompute::None, false)
                    .unwrap();
            assert!(!acts16.use_weight_panels(stage, &ops, false));
            assert!(!weight_panels_wanted(
                true,
                micro_batches(stage, &ops),
                true
            ));
            let mut acts_z3 = StageActs::<f32>::new(stage, &ops, b, t);
            assert!(!acts_z3.use_weight_panels(stage, &ops, true));
            if !used {
                eprintln!("no weight panels here (no AVX-512 or SCALETRAIN_NO_WEIGHT_PANELS=1)");
                continue;
            }
            // A limit between the totals without and with the panels: refused, naming them
            // and how to do without.
            let limit = one.total_bytes() + m.weight_panel_bytes / 2;
            let lim = || Some((limit, "a test limit".to_string()));
            assert!(check_fits(&one, 1, lim()).is_ok());
            let e = check_fits(&m, 1, lim()).unwrap_err().to_string();
            let panels = size(m.weight_panel_bytes);
            for want in [
                format!("and {panels} of weight panels"),
                "train.grad_accum=1".to_string(),
                "SCALETRAIN_NO_WEIGHT_PANELS=1".to_string(),
                size(m.total_bytes()),
            ] {
                assert!(e.contains(&want), "stage {k}: {want:?} missing from {e}");
            }
        }
    }

    #[test]
    fn the_prediction_follows_precision_and_recomputation() {
        let cfg = model::ModelConfig {
            vocab_size: 64,
            max_seq_len: 64,
            n_layer: 4,
            n_head: 4,
            channels: 64,
        };
        let full = model::ParamLayout::new(&cfg, &model::Shard::full(&cfg)).unwrap();
        let stage = StageModel::whole(full);
        let bytes =
            |p, r| rank_memory(&stage, (8, 64), &[1], None, None, (p, r), false).total_bytes();
        let fp32 = bytes(Precision::Fp32, Recompute::None);
        // fp32 without recomputation: the runtime's plain memory formula.
        let dims = model::Shard::full(&cfg).dims(&cfg);
        assert_eq!(fp32, plan::cpu_runtime::memory(&dims, 8, 64).total_bytes());
        // Mixed precision adds the 16-bit weight copy and gradient (4 B/param) and halves the
        // 16-bit activations (here activations dominate, so it needs less); full
        // recomputation keeps far fewer activations.
        let n = stage.len() as u64;
        let bf16 = bytes(Precision::Bf16Mixed, Recompute::None);
        assert_ne!(bf16, fp32);
        let full_rc = bytes(Precision::Fp32, Recompute::Full);
        assert!(full_rc < fp32, "{full_rc} vs {fp32}");
        let bf16_full = bytes(Precision::Bf16Mixed, Recompute::Full);
        assert!(
            bf16_full < bf16,
            "fp32 {fp32} bf16 {bf16} full {full_rc} bf16+full {bf16_full}, {n} params"
        );
    }
}
