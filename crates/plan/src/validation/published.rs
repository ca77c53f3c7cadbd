//! Published H100 / B200 / GB200 training runs (`crates/plan/data/published_h100_b200.csv`,
//! every row with its layout and citation) and the per-GPU FP8 efficiency fitted on part of
//! them. The rows marked `fit` (one 8-GPU run per GPU type, two for H100) set
//! `GpuSpec::fp8_matmul_scale`; every other row is predicted out of sample.
//!
//! Predicted throughput: tokens/s/GPU = global batch · sequence / (step time · GPUs), with the
//! published layout, sequence parallelism on with tp > 1, Megatron's distributed optimizer
//! (ZeRO-1) or FSDP (ZeRO-3) as the row says, flash attention, no dropout, no recompute and the
//! gradient reduction overlapped with backward, the weight all-gather with the next forward and
//! the tensor-parallel collectives with their GEMMs (the NeMo / Megatron-Bridge performance
//! recipes: `overlap_grad_reduce`, `overlap_param_gather`, `tp_comm_overlap`).

use serde::Serialize;

use crate::cost::{Calibration, Context};
use crate::explain::NoTrace;
use crate::hardware::{gpu_preset, ClusterSpec, GpuSpec};
use crate::layout::LayoutRequest;
use crate::model::{gpt, llama, ModelSpec};
use crate::recipe::{parse_precision, Optimizer, Recipe, Recompute};

use super::Row;

const CSV: &str = include_str!("../../data/published_h100_b200.csv");

/// The GPU types with published rows, with the heading used for them.
pub const SYSTEMS: [(&str, &str); 3] = [
    ("h100-sxm", "DGX-H100"),
    ("b200", "DGX-B200"),
    ("gb200", "DGX-GB200 (NVL72)"),
];

/// One published run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Row id.
    pub id: &'static str,
    /// GPU preset.
    pub system: &'static str,
    /// `--precision` spelling.
    pub precision: &'static str,
    /// The model's shape.
    pub model: ModelSpec,
    /// GPUs.
    pub gpus: u64,
    /// Global batch (sequences).
    pub gbs: u64,
    /// Micro-batch.
    pub mbs: u64,
    /// Tensor parallel.
    pub tp: u64,
    /// Pipeline parallel.
    pub pp: u64,
    /// Context parallel.
    pub cp: u64,
    /// Virtual stages per pipeline device.
    pub vp: u64,
    /// Fully sharded data parallel (ZeRO-3) instead of the distributed optimizer (ZeRO-1).
    pub fsdp: bool,
    /// Published tokens/s/GPU.
    pub tokens_per_sec_per_gpu: f64,
    /// Published model TFLOP/s/GPU.
    pub model_tflops_per_gpu: f64,
    /// Whether the FP8 efficiency is fitted on this row.
    pub fit: bool,
    /// Citation.
    pub source: &'static str,
}

fn num<T: std::str::FromStr>(id: &str, col: &str, v: &str) -> Result<T, String> {
    v.trim()
        .parse()
        .map_err(|_| format!("row {id}: column {col} = '{v}' is not a number"))
}

/// Parses the data file. Errors name the row and column.
pub fn runs() -> Result<Vec<Run>, String> {
    let mut sources: Vec<(&'static str, &'static str)> = Vec::new();
    for line in CSV.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some((key, text)) = rest.split_once(": ") {
                if !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
                {
                    sources.push((key, text));
                }
            }
        }
    }
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
        let get = |name: &str| -> &'static str {
            header
                .iter()
                .position(|h| *h == name)
                .map_or("", |i| cells[i])
        };
        let id = get("id");
        let u = |name: &str| num::<u64>(id, name, get(name));
        let (layers, hidden, heads, kv, ffn, vocab, seq) = (
            u("layers")?,
            u("hidden")?,
            u("heads")?,
            u("kv_heads")?,
            u("ffn")?,
            u("vocab")?,
            u("seq")?,
        );
        let name = get("model");
        let model = match get("arch") {
            "gpt" => {
                let mut m = gpt(name, layers, hidden, heads, vocab, seq);
                m.kv_heads = kv;
                m.ffn_hidden = ffn;
                m
            }
            "llama" => llama(name, layers, hidden, heads, kv, ffn, vocab, seq),
            other => return Err(format!("row {id}: arch '{other}' is not gpt or llama")),
        };
        let key = get("source");
        let source = sources
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, t)| *t)
            .ok_or_else(|| format!("row {id}: source key '{key}' has no '# {key}: …' line"))?;
        out.push(Run {
            id,
            system: get("system"),
            precision: get("precision"),
            model,
            gpus: u("gpus")?,
            gbs: u("gbs")?,
            mbs: u("mbs")?,
            tp: u("tp")?,
            pp: u("pp")?,
            cp: u("cp")?,
            vp: u("vp")?,
            fsdp: u("fsdp")? == 1,
            tokens_per_sec_per_gpu: num(
                id,
                "tokens_per_sec_per_gpu",
                get("tokens_per_sec_per_gpu"),
            )?,
            model_tflops_per_gpu: num(id, "model_tflops_per_gpu", get("model_tflops_per_gpu"))?,
            fit: match get("split") {
                "fit" => true,
                "test" => false,
                other => return Err(format!("row {id}: split '{other}' is not fit or test")),
            },
            source,
        });
    }
    Ok(out)
}

/// The recipe of the NeMo / Megatron-Bridge performance runs (see the module docs).
pub fn recipe(run: &Run) -> Result<Recipe, String> {
    let (precision, fp8) = parse_precision(run.precision).map_err(|e| e.to_string())?;
    let mut r = Recipe::new(1e12, run.gbs, precision, Optimizer::Adamw);
    r.fp8 = fp8;
    r.recompute = Recompute::None;
    r.flash_attention = true;
    r.dropout = false;
    r.overlap_grad_reduce = true;
    r.overlap_param_gather = true;
    r.tp_comm_overlap = true;
    Ok(r)
}

/// NVLink domain of the run: the preset's node, or for rack-scale NVLink (GB200 NVL72) the
/// largest divisor of the job not above the rack (a 256-GPU job as four domains of 64).
pub(super) fn nvlink_domain(gpu: &GpuSpec, gpus: u64) -> u64 {
    let gpn = gpu.gpus_per_node;
    if gpus <= gpn || gpus.is_multiple_of(gpn) {
        return gpn;
    }
    (1..=gpn)
        .rev()
        .find(|d| gpus.is_multiple_of(*d))
        .unwrap_or(1)
}

/// Predicted tokens/s/GPU for a run on `gpu` (its `fp8_matmul_scale` as given).
pub fn predict(run: &Run, gpu: &GpuSpec, calib: &Calibration) -> Result<f64, String> {
    let cluster = ClusterSpec::new(
        gpu.clone(),
        run.gpus,
        Some(nvlink_domain(gpu, run.gpus)),
        None,
    )
    .map_err(|e| format!("{}: {e}", run.id))?;
    let dp = run.gpus / (run.tp * run.pp * run.cp);
    let zero = if run.fsdp {
        3
    } else if dp > 1 {
        1
    } else {
        0
    };
    let req = LayoutRequest {
        dp: Some(dp),
        tp: Some(run.tp),
        pp: Some(run.pp),
        cp: Some(run.cp),
        ep: None,
        vpp: Some(run.vp),
        sp: run.tp > 1,
        zero: Some(zero),
        micro_batch: Some(run.mbs),
        grad_accum: None,
        pp_layers: None,
    };
    let mut layout = req
        .resolve(&run.model, run.gpus, run.gbs)
        .map_err(|e| format!("{}: {e}", run.id))?;
    let ctx = Context {
        model: run.model.clone(),
        cluster,
        recipe: recipe(run)?,
        calib: *calib,
    };
    ctx.balance(&mut layout);
    let ev = ctx.evaluate(&layout, &mut NoTrace);
    Ok((run.gbs * run.model.seq_len) as f64 / (ev.time.total * run.gpus as f64))
}

/// The GPU preset of a system with its FP8 efficiency replaced.
fn gpu_with(system: &str, fp8_scale: Option<f64>) -> GpuSpec {
    let mut g = gpu_preset(system).expect("systems are presets");
    if let Some(s) = fp8_scale {
        g.fp8_matmul_scale = s;
    }
    g
}

/// Rows for one system, with `fp8_scale` (the preset's when `None`).
pub fn rows(system: &str, fit: bool, fp8_scale: Option<f64>, calib: &Calibration) -> Vec<Row> {
    let gpu = gpu_with(system, fp8_scale);
    runs()
        .expect("the data file parses (test `published_rows_parse`)")
        .into_iter()
        .filter(|r| r.system == system && r.fit == fit)
        .map(|r| {
            let predicted = predict(&r, &gpu, calib).expect("published layouts are valid");
            let published = r.tokens_per_sec_per_gpu;
            Row {
                id: r.id,
                metric: r.precision,
                published,
                predicted,
                unit: "tok/s/GPU",
                rel_error: (predicted - published) / published,
                source: r.source,
            }
        })
        .collect()
}

/// Fits `fp8_matmul_scale` for each system: grid 0.30..1.50 by 0.01, least mean |error| over
/// the system's `fit` rows. Returns (system, scale, mean |error| on the fit rows).
pub fn fit_fp8_scales(calib: &Calibration) -> Vec<(&'static str, f64, f64)> {
    SYSTEMS
        .iter()
        .map(|(system, _)| {
            let mut best = (0.0, f64::INFINITY);
            for pct in 30..=150 {
                let s = pct as f64 / 100.0;
                let err = super::mean_abs_error(&rows(system, true, Some(s), calib));
                if err < best.1 {
                    best = (s, err);
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
    fn published_rows_parse() {
        let runs = runs().unwrap();
        assert!(runs.len() >= 15, "{} rows", runs.len());
        for (system, _) in SYSTEMS {
            assert!(
                runs.iter().any(|r| r.system == system && r.fit),
                "{system} has no fit row"
            );
            assert!(
                runs.iter().any(|r| r.system == system && !r.fit),
                "{system} has no test row"
            );
        }
        for r in &runs {
            assert!(
                r.source.contains("github.com/NVIDIA"),
                "{}: {}",
                r.id,
                r.source
            );
        }
    }

    #[test]
    fn fp8_defaults_are_the_fit() {
        for (system, scale, _) in fit_fp8_scales(&Calibration::default()) {
            let preset = gpu_preset(system).unwrap().fp8_matmul_scale;
            assert_eq!(
                scale, preset,
                "{system}: the fit gives {scale}; update the FP8_SCALE constant in hardware.rs"
            );
        }
    }
}
