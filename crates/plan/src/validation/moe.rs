//! Published mixture-of-experts runs (`crates/plan/data/published_moe.csv`: Qwen3-30B-A3B and
//! Qwen3-235B-A22B on H100, B200 and GB200 from the Megatron-Bridge 25.11 and 26.02 performance
//! summaries).
//!
//! Two comparisons:
//! - FLOPs per token: the summary's model TFLOP/s/GPU ÷ its tokens/s/GPU is the FLOP count per
//!   token it uses; ours is [`crate::cost::Context::flops`] with causal attention counted half
//!   (`--causal-flops half`), which is how these MoE figures are counted (the full count would be
//!   18–21% higher). It checks the active-parameter FLOPs (k of E experts, router, decoupled
//!   head_dim) independently of any time model.
//! - Throughput: tokens/s/GPU predicted with the published layout and the recipe of
//!   [`super::published`] (no recompute, distributed optimizer, overlaps on), expert parallelism
//!   with the all-to-all of docs/estimator.md (overlapped where the row's recipe says so),
//!   balanced routing (as the runs force it). One constant per GPU, `expert_secs_per_copy`, is
//!   fitted on the 25.11 Qwen3-30B-A3B row of that GPU ([`fit_expert_secs_per_copy`]); the Qwen3-235B-A22B
//!   rows and the 26.02 rows are out of sample.

use crate::cost::{Calibration, Context};
use crate::explain::NoTrace;
use crate::hardware::{gpu_preset, ClusterSpec, GpuSpec};
use crate::layout::LayoutRequest;
use crate::model::{llama, ModelSpec};
use crate::moe::MoeSpec;
use crate::recipe::{parse_precision, CausalFlops, Optimizer, Recipe, Recompute};

use super::Row;

const CSV: &str = include_str!("../../data/published_moe.csv");

/// The citation of every row.
pub const SOURCE: &str = "Megatron-Bridge performance summaries, 25.11 and 26.02 NeMo containers (github.com/NVIDIA-NeMo/Megatron-Bridge docs/performance-summary.md at 00b7660, docs/performance-summary-archive.md at 0a25f91)";

/// One published MoE run.
#[derive(Debug, Clone)]
pub struct MoeRun {
    /// Row id.
    pub id: &'static str,
    /// GPU preset.
    pub system: &'static str,
    /// `--precision` spelling.
    pub precision: &'static str,
    /// The model.
    pub model: ModelSpec,
    /// (gpus, gbs, mbs, tp, pp, cp, vp, ep).
    pub layout: [u64; 8],
    /// Published tokens/s/GPU.
    pub tokens_per_sec_per_gpu: f64,
    /// Published model TFLOP/s/GPU.
    pub model_tflops_per_gpu: f64,
    /// The recipe overlaps the expert-parallel all-to-alls (`moe_a2a_overlap`).
    pub ep_overlap: bool,
    /// A row `expert_secs_per_copy` is fitted on.
    pub fit: bool,
}

/// Parses the data file; errors name the row and column.
pub fn runs() -> Result<Vec<MoeRun>, String> {
    let mut lines = CSV
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty());
    let header: Vec<&str> = lines.next().ok_or("empty data file")?.split(',').collect();
    let mut out = Vec::new();
    for line in lines {
        let cells: Vec<&'static str> = line.split(',').collect();
        if cells.len() != header.len() {
            return Err(format!(
                "row '{line}': {} cells, header has {}",
                cells.len(),
                header.len()
            ));
        }
        let get = |name: &str| {
            header
                .iter()
                .position(|h| *h == name)
                .map_or("", |i| cells[i])
        };
        let id = get("id");
        let u = |name: &str| -> Result<u64, String> {
            get(name).trim().parse().map_err(|_| {
                format!(
                    "row {id}: column {name} = '{}' is not a whole number",
                    get(name)
                )
            })
        };
        let f = |name: &str| -> Result<f64, String> {
            get(name)
                .trim()
                .parse()
                .map_err(|_| format!("row {id}: column {name} = '{}' is not a number", get(name)))
        };
        let mut model = llama(
            get("model"),
            u("layers")?,
            u("hidden")?,
            u("heads")?,
            u("kv_heads")?,
            u("ffn")?,
            u("vocab")?,
            u("seq")?,
        );
        model.head_dim = Some(u("head_dim")?);
        model.qk_norm = true;
        model.moe = Some(MoeSpec {
            experts: u("experts")?,
            top_k: u("top_k")?,
            expert_ffn: u("expert_ffn")?,
            shared_ffn: 0,
            shared_gate: false,
            capacity_factor: None,
            dense_layers: 0,
        });
        model.validate().map_err(|e| format!("row {id}: {e}"))?;
        let mut layout = [0u64; 8];
        for (i, col) in ["gpus", "gbs", "mbs", "tp", "pp", "cp", "vp", "ep"]
            .iter()
            .enumerate()
        {
            layout[i] = u(col)?;
        }
        out.push(MoeRun {
            id,
            system: get("system"),
            precision: get("precision"),
            model,
            layout,
            tokens_per_sec_per_gpu: f("tokens_per_sec_per_gpu")?,
            model_tflops_per_gpu: f("model_tflops_per_gpu")?,
            ep_overlap: match get("ep_overlap") {
                "0" => false,
                "1" => true,
                v => return Err(format!("row {id}: column ep_overlap = '{v}' is not 0 or 1")),
            },
            fit: match get("split") {
                "fit" => true,
                "out" => false,
                v => return Err(format!("row {id}: column split = '{v}' is not fit or out")),
            },
        });
    }
    Ok(out)
}

fn context(run: &MoeRun, calib: &Calibration, overhead: Option<f64>) -> Result<Context, String> {
    let [gpus, gbs, ..] = run.layout;
    let gpu = gpu_with(run.system, overhead)?;
    let domain = super::published::nvlink_domain(&gpu, gpus);
    let cluster = ClusterSpec::new(gpu, gpus, Some(domain), None).map_err(|e| e.to_string())?;
    let (precision, fp8) = parse_precision(run.precision).map_err(|e| e.to_string())?;
    let mut r = Recipe::new(1e12, gbs, precision, Optimizer::Adamw);
    r.fp8 = fp8;
    r.recompute = Recompute::None;
    r.flash_attention = true;
    r.dropout = false;
    r.overlap_grad_reduce = true;
    r.overlap_param_gather = true;
    r.tp_comm_overlap = true;
    r.ep_comm_overlap = run.ep_overlap;
    r.causal_flops = CausalFlops::Half;
    Ok(Context {
        model: run.model.clone(),
        cluster,
        recipe: r,
        calib: *calib,
    })
}

/// Model FLOPs per token: ours against the published TFLOP/s ÷ tokens/s.
pub fn flops_rows(calib: &Calibration) -> Vec<Row> {
    runs()
        .expect("the MoE data file parses (test `moe_rows_parse`)")
        .iter()
        .map(|run| {
            let ctx = context(run, calib, None).expect("published systems are presets");
            let ours = ctx.flops(&mut NoTrace).per_token;
            let published = run.model_tflops_per_gpu * 1e12 / run.tokens_per_sec_per_gpu;
            Row {
                id: run.id,
                metric: "model GFLOP per token",
                published: published / 1e9,
                predicted: ours / 1e9,
                unit: "GFLOP",
                rel_error: (ours - published) / published,
                source: SOURCE,
            }
        })
        .collect()
}

/// The preset of `system`, with `expert_secs_per_copy` replaced when given.
fn gpu_with(system: &str, overhead: Option<f64>) -> Result<GpuSpec, String> {
    let mut g = gpu_preset(system).map_err(|e| e.to_string())?;
    if let Some(x) = overhead {
        g.expert_secs_per_copy = x;
    }
    Ok(g)
}

/// Predicted tokens/s/GPU for one run (the preset's `expert_secs_per_copy` unless `overhead`).
pub fn predict(run: &MoeRun, calib: &Calibration, overhead: Option<f64>) -> Result<f64, String> {
    let [gpus, gbs, mbs, tp, pp, cp, vp, ep] = run.layout;
    let ctx = context(run, calib, overhead)?;
    let dp = gpus / (tp * pp * cp);
    let mut layout = LayoutRequest {
        dp: Some(dp),
        tp: Some(tp),
        pp: Some(pp),
        cp: Some(cp),
        ep: Some(ep),
        vpp: Some(vp),
        sp: tp > 1,
        zero: Some(if dp * cp > 1 { 1 } else { 0 }),
        micro_batch: Some(mbs),
        grad_accum: None,
        pp_layers: None,
    }
    .resolve(&run.model, gpus, gbs)
    .map_err(|e| format!("{}: {e}", run.id))?;
    ctx.balance(&mut layout);
    let ev = ctx.evaluate(&layout, &mut NoTrace);
    Ok((gbs * run.model.seq_len) as f64 / (ev.time.total * gpus as f64))
}

/// Throughput rows: the `fit` rows or the out-of-sample ones.
pub fn throughput_rows(calib: &Calibration, fit: bool) -> Vec<Row> {
    runs()
        .expect("the MoE data file parses (test `moe_rows_parse`)")
        .iter()
        .filter(|run| run.fit == fit)
        .map(|run| {
            let predicted = predict(run, calib, None).expect("published layouts are valid");
            let published = run.tokens_per_sec_per_gpu;
            Row {
                id: run.id,
                metric: run.precision,
                published,
                predicted,
                unit: "tok/s/GPU",
                rel_error: (predicted - published) / published,
                source: SOURCE,
            }
        })
        .collect()
}

/// `x` rounded to three significant digits.
fn sig3(x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    let scale = 10f64.powi(2 - x.log10().floor() as i32);
    (x * scale).round() / scale
}

/// GPUs with a MoE row to fit `expert_secs_per_copy` on.
pub const MOE_SYSTEMS: [&str; 3] = ["h100-sxm", "b200", "gb200"];

/// Fits `expert_secs_per_copy` for each of [`MOE_SYSTEMS`] on its `fit` rows: grid 0..1 µs by
/// 0.01 ns (three significant digits), least mean |error| of tokens/s/GPU. Returns (system,
/// seconds, mean |error|).
pub fn fit_expert_secs_per_copy(calib: &Calibration) -> Vec<(&'static str, f64, f64)> {
    let runs = runs().expect("the MoE data file parses (test `moe_rows_parse`)");
    MOE_SYSTEMS
        .iter()
        .map(|system| {
            let rows: Vec<&MoeRun> = runs
                .iter()
                .filter(|r| r.fit && r.system == *system)
                .collect();
            let mean_err = |x: f64| {
                rows.iter()
                    .map(|r| {
                        let p = predict(r, calib, Some(x)).expect("published layouts are valid");
                        (p / r.tokens_per_sec_per_gpu - 1.0).abs()
                    })
                    .sum::<f64>()
                    / rows.len().max(1) as f64
            };
            let mut best = (0.0, f64::INFINITY);
            for step in 0..=1000 {
                let x = step as f64 * 1e-9;
                let err = mean_err(x);
                if err < best.1 {
                    best = (x, err);
                }
            }
            // Then to three significant digits around the best whole nanosecond.
            let coarse = best.0;
            for step in -100..=100 {
                let x = sig3(coarse + step as f64 * 1e-11);
                if x < 0.0 {
                    continue;
                }
                let err = mean_err(x);
                if err < best.1 {
                    best = (x, err);
                }
            }
            (*system, best.0, best.1)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moe_rows_parse() {
        let runs = runs().unwrap();
        assert_eq!(runs.len(), 12);
        // The shapes are the real checkpoints: 30.5B total / 3.3B active and 235B / 22B.
        let p = runs[0].model.params();
        assert_eq!((p.total, p.active), (30_532_122_624, 3_353_032_704));
        let p = runs[3].model.params();
        assert_eq!(runs[3].model.name, "Qwen3-235B-A22B");
        assert!((p.total as f64 / 1e9 - 235.1).abs() < 0.1, "{}", p.total);
        assert!((p.active as f64 / 1e9 - 22.1).abs() < 0.2, "{}", p.active);
        for system in MOE_SYSTEMS {
            assert!(runs.iter().any(|r| r.system == system && r.fit), "{system}");
            assert!(
                runs.iter().any(|r| r.system == system && !r.fit),
                "{system}"
            );
        }
    }

    #[test]
    fn expert_defaults_are_the_fit() {
        for (system, secs, _) in fit_expert_secs_per_copy(&Calibration::default()) {
            let preset = gpu_preset(system).unwrap().expert_secs_per_copy;
            assert!(
                (secs - preset).abs() <= 1e-3 * preset,
                "{system}: fit {secs}, preset {preset}; update hardware.rs"
            );
        }
    }
}
