//! Refusing a model that cannot fit, before allocating it: the runtime's own memory prediction
//! (`plan::cpu_runtime`, the formulas its buffers are sized by) against the memory this process
//! may use — the cgroup limit (v2 `memory.max`, v1 `memory.limit_in_bytes`) or the physical
//! memory (`MemTotal`), whichever is smaller — shared by the ranks of this host.

use crate::error::TrainError;

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

/// [`check_fits`] for a rank holding `stage` (micro-batch `b` × `t`) in `precision` with
/// `recompute`, with its AdamW state sharded over `zero_dp = (stage, dp size)` under ZeRO,
/// sharing this host with `LOCAL_WORLD_SIZE` ranks. The prediction is the runtime's
/// (`plan::cpu_runtime::memory` of the stage's layers, then `trainer_memory` for the
/// precision's working copies and the recomputation's activations; one saved activation set
/// per chunk: a lower bound for a pipeline stage, whose schedule may keep more in flight).
pub fn check_stage(
    stage: &crate::pipeline::StageModel,
    mcfg: &model::ModelConfig,
    (b, t): (usize, usize),
    zero_dp: Option<(u8, usize)>,
    prec: (plan::recipe::Precision, plan::recipe::Recompute),
) -> Result<(), TrainError> {
    let ranks_here = std::env::var("LOCAL_WORLD_SIZE")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1);
    check_fits(
        stage_bytes(stage, mcfg, (b, t), zero_dp, prec),
        ranks_here,
        memory_limit_bytes(),
    )
}

/// The bytes [`check_stage`] compares with the machine's memory.
pub fn stage_bytes(
    stage: &crate::pipeline::StageModel,
    mcfg: &model::ModelConfig,
    (b, t): (usize, usize),
    zero_dp: Option<(u8, usize)>,
    (precision, recompute): (plan::recipe::Precision, plan::recipe::Recompute),
) -> u64 {
    let held: Vec<model::Shard> = stage
        .chunks
        .iter()
        .map(|(_, l, _)| l.shard.clone())
        .collect();
    let (Some(first), Some(last)) = (held.first(), held.last()) else {
        return 0;
    };
    let dims = model::Shard {
        layers: first.layers.start..last.layers.end,
        has_embedding: held.iter().any(|s| s.has_embedding),
        has_head: held.iter().any(|s| s.has_head),
        ..first.clone()
    }
    .dims(mcfg);
    let mut m = plan::cpu_runtime::memory(&dims, b as u64, t as u64);
    if let Some((zero, dp)) = zero_dp {
        if zero > 0 {
            m.optimizer_bytes /= dp.max(1) as u64;
        }
    }
    let chunks: Vec<_> = held.iter().map(|s| (s.dims(mcfg), 1)).collect();
    let m = plan::cpu_runtime::trainer_memory(
        m,
        &chunks,
        b as u64,
        t as u64,
        stage.vstages > 1,
        precision,
        recompute,
    );
    m.total_bytes()
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

/// Refuses `predicted_bytes` per rank × `ranks_here` ranks on this host when that exceeds
/// `limit` (from [`memory_limit_bytes`]), naming both numbers and what would shrink it.
pub fn check_fits(
    predicted_bytes: u64,
    ranks_here: usize,
    limit: Option<(u64, String)>,
) -> Result<(), TrainError> {
    let Some((limit, what)) = limit else {
        return Ok(());
    };
    let need = predicted_bytes.saturating_mul(ranks_here.max(1) as u64);
    if need <= limit {
        return Ok(());
    }
    Err(TrainError::DoesNotFit {
        reason: format!(
            "the model needs {} per rank{} (predicted: weights, gradients, AdamW state and \
             activations), but this machine offers {} ({what}); nothing was allocated. Make it \
             fit with a smaller model (model.n_layer, model.channels), a smaller \
             train.batch_size or model.seq_len, activation recomputation (--recompute full), \
             pipeline stages or tensor-parallel ranks on more machines (--pp, --tp), or ZeRO \
             optimizer sharding across data-parallel ranks (--zero 1 or 2); bf16/fp16 mixed \
             precision shrinks activations but keeps fp32 master weights beside the 16-bit copy",
            gib(predicted_bytes),
            if ranks_here > 1 {
                format!(" × {ranks_here} ranks on this host = {}", gib(need))
            } else {
                String::new()
            },
            gib(limit),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_with_both_numbers_and_passes_what_fits() {
        let lim = || Some((8u64 << 30, "physical memory (MemTotal)".to_string()));
        assert!(check_fits(1 << 30, 2, lim()).is_ok());
        let e = check_fits(1_611_040_849_920, 1, lim())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("1500.4 GiB per rank") && e.contains("offers 8.0 GiB"),
            "{e}"
        );
        let e = check_fits(3 << 30, 3, lim()).unwrap_err().to_string();
        assert!(e.contains("× 3 ranks on this host = 9.0 GiB"), "{e}");
        assert!(check_fits(u64::MAX, 1, None).is_ok());
        let (b, what) = memory_limit_bytes().expect("Linux has /proc/meminfo");
        assert!(b > 1 << 20, "{b} from {what}");
    }

    #[test]
    fn the_prediction_follows_precision_and_recomputation() {
        use plan::recipe::{Precision, Recompute};
        let cfg = model::ModelConfig {
            vocab_size: 64,
            max_seq_len: 64,
            n_layer: 4,
            n_head: 4,
            channels: 64,
        };
        let full = model::ParamLayout::new(&cfg, &model::Shard::full(&cfg)).unwrap();
        let stage = crate::pipeline::StageModel::whole(full);
        let bytes = |p, r| stage_bytes(&stage, &cfg, (8, 64), None, (p, r));
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
