//! `scaletrain calibrate --cpu RUN_DIR…`: fits the CPU runtime's step-time constants
//! (`plan::cpu_calibrate`) to this machine's own `scaletrain train` runs, and the record that
//! makes a run folder usable for it: `run-layout.json`, written by rank 0 at the end of every
//! run whose layout `plan --cpu` models (data parallel, and pipeline/tensor meshes with one chunk
//! per stage, 1F1B and the balanced stages).
//!
//! Each folder gives its layout (`run-layout.json`), its model (`config.toml`, which must agree
//! with the layout record) and its measured median step (`metrics.jsonl`, the first step left
//! out: it includes warm-up).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use plan::cpu_calibrate::{fit_cpu, CpuCalibrationFile, CpuRun};
use plan::cpu_comm::CommCalibration;
use plan::cpu_plan::{predict, CpuHost, CpuLayout, CpuModel};
use serde::{Deserialize, Serialize};
use train::StartInfo;

/// File name of the layout record in a run folder.
pub const RUN_LAYOUT: &str = "run-layout.json";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct ModelRecord {
    padded_vocab: u64,
    seq_len: u64,
    channels: u64,
    heads: u64,
    layers: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct LayoutRecord {
    dp: u64,
    pp: u64,
    tp: u64,
    batch: u64,
    microbatches: u64,
    zero: u8,
    sp: bool,
}

/// What `run-layout.json` holds: enough to predict the run with `plan::cpu_plan::predict`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct RunLayout {
    format: String,
    version: u32,
    model: ModelRecord,
    layout: LayoutRecord,
    /// Threads per rank.
    threads: u64,
    /// Cores the run's ranks × threads used (at most the machine's).
    cores: u64,
    /// "tcp", "shm", "mpi" or "threads".
    transport: String,
    bucket_bytes: u64,
    overlap: bool,
    /// Whether rank 0 packed its weights once per step (records written before this field
    /// existed come from runs without weight panels).
    #[serde(default)]
    weight_panels: bool,
}

/// The layout record of this run, when `plan --cpu`'s model covers it; `None` otherwise.
fn record(a: &crate::train::TrainArgs, st: &StartInfo) -> Option<RunLayout> {
    let d = &a.dp;
    if d.servers > 1 || d.staleness.is_some() || d.vpp > 1 || d.pp_layers.is_some() {
        return None;
    }
    let c = &st.config;
    let m = crate::train_report::cpu_model(st)?;
    let (dp, zero) = st.dp.map_or((1, 0), |(_, n, z)| (n as u64, z));
    let (pp, tp, microbatches, sp, transport) = match &st.pipeline {
        Some(pi) => {
            if pi.chunks.len() != 1 || (pi.stages > 1 && pi.schedule != "1f1b") {
                return None;
            }
            let layers: Vec<u64> = pi.parts.iter().map(|r| r.len() as u64).collect();
            if layers
                != plan::cpu_plan::stage_layers(&m, c.train.batch_size as u64, pi.stages as u64)
            {
                return None;
            }
            (
                pi.stages as u64,
                pi.tp.1 as u64,
                pi.microbatches as u64,
                pi.sequence_parallel,
                pi.transport.to_string(),
            )
        }
        // Data parallel alone: self-launched over loopback TCP.
        None => (1, 1, c.train.grad_accum as u64, false, "tcp".to_string()),
    };
    let ranks = dp * pp * tp;
    let machine = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    Some(RunLayout {
        format: "scaletrain-run-layout".into(),
        version: 1,
        model: ModelRecord {
            padded_vocab: m.padded_vocab,
            seq_len: m.seq_len,
            channels: m.channels,
            heads: m.heads,
            layers: m.layers,
        },
        layout: LayoutRecord {
            dp,
            pp,
            tp,
            batch: c.train.batch_size as u64,
            microbatches,
            zero,
            sp,
        },
        threads: st.threads as u64,
        cores: (ranks * st.threads as u64).min(machine).max(1),
        transport,
        bucket_bytes: (d.bucket_mb * 1048576.0) as u64,
        overlap: !d.no_overlap,
        weight_panels: st.weight_panels,
    })
}

/// Writes `run-layout.json` into the run folder (rank 0 only; a failure is a warning: the run
/// itself succeeded).
pub fn write_run_layout(a: &crate::train::TrainArgs, st: &StartInfo) {
    let rank0 = st.dp.is_none_or(|d| d.0 == 0)
        && st
            .pipeline
            .as_ref()
            .is_none_or(|p| p.stage == 0 && p.tp.0 == 0);
    if !rank0 {
        return;
    }
    let Some(r) = record(a, st) else {
        return;
    };
    let path = a.out.join(RUN_LAYOUT);
    let text = serde_json::to_string_pretty(&r).unwrap_or_default() + "\n";
    if let Err(e) = std::fs::write(&path, text) {
        eprintln!(
            "warning: cannot write {} ({e}); `scaletrain calibrate --cpu` will not read this run",
            path.display()
        );
    }
}

/// Median step of a run folder's `metrics.jsonl`, the first step left out.
fn median_step(dir: &Path) -> Result<f64> {
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{}: no metrics.jsonl; give folders that `scaletrain train --out` wrote",
            dir.display()
        )
    })?;
    let mut xs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON line", path.display(), i + 1))?;
        if let Some(s) = v.get("step_secs").and_then(|s| s.as_f64()) {
            xs.push(s);
        }
    }
    if xs.len() < 2 {
        bail!(
            "{}: {} step record(s); calibration needs at least 2 (the first is left out as warm-up): train for more --steps",
            path.display(),
            xs.len()
        );
    }
    let mut xs = xs.split_off(1);
    xs.sort_by(f64::total_cmp);
    Ok(xs[xs.len() / 2])
}

/// Reads one run folder into a measured run.
fn read_run(dir: &Path) -> Result<CpuRun> {
    if !dir.is_dir() {
        bail!(
            "{}: not a folder; --cpu takes run folders of `scaletrain train`",
            dir.display()
        );
    }
    let path = dir.join(RUN_LAYOUT);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{}: no {RUN_LAYOUT}: not a run folder of `scaletrain train`, or of a layout `plan --cpu` does not model (parameter server, interleaved or GPipe schedule, --pp-layers), or of an older version; train it again",
            dir.display()
        )
    })?;
    let r: RunLayout = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a run-layout record", path.display()))?;
    if r.format != "scaletrain-run-layout" || r.version != 1 {
        bail!(
            "{}: format {:?} version {}, expected \"scaletrain-run-layout\" version 1",
            path.display(),
            r.format,
            r.version
        );
    }
    let cfg = train::TrainConfig::load(Some(&dir.join("config.toml")), &[])
        .with_context(|| format!("{}: reading its config.toml", dir.display()))?;
    let m = &cfg.model;
    let theirs = (
        m.n_layer as u64,
        m.channels as u64,
        m.n_head as u64,
        m.seq_len as u64,
    );
    let ours = (
        r.model.layers,
        r.model.channels,
        r.model.heads,
        r.model.seq_len,
    );
    if theirs != ours || cfg.train.batch_size as u64 != r.layout.batch {
        bail!(
            "{}: config.toml (L{} C{} H{} T{}, batch {}) and {RUN_LAYOUT} (L{} C{} H{} T{}, batch {}) disagree: the folder mixes two runs; train into an empty --out",
            dir.display(),
            theirs.0, theirs.1, theirs.2, theirs.3, cfg.train.batch_size,
            ours.0, ours.1, ours.2, ours.3, r.layout.batch
        );
    }
    let l = &r.layout;
    Ok(CpuRun {
        label: dir.display().to_string(),
        model: CpuModel {
            padded_vocab: r.model.padded_vocab,
            seq_len: r.model.seq_len,
            channels: r.model.channels,
            heads: r.model.heads,
            layers: r.model.layers,
            // The run's own: its prediction follows them (a bf16-mixed run's linear layers at
            // the bf16 rate, which the fit leaves at its default).
            precision: cfg.train.precision,
            recompute: cfg.train.recompute,
        },
        layout: CpuLayout {
            dp: l.dp,
            pp: l.pp,
            tp: l.tp,
            batch: l.batch,
            microbatches: l.microbatches,
            zero: l.zero,
            sp: l.sp,
        },
        host: CpuHost {
            cores: r.cores,
            compute: plan::cpu_time::CpuCalibration {
                weight_panels: r.weight_panels,
                ..Default::default()
            },
            link: CommCalibration::for_transport(&r.transport),
            tp_link: CommCalibration::tensor_parallel_for_transport(&r.transport),
            bucket_bytes: r.bucket_bytes,
            overlap: r.overlap,
        },
        step_secs: median_step(dir)?,
    })
}

/// `scaletrain calibrate --cpu DIR…`: fit, print before/after, write the file.
pub fn run(dirs: &[PathBuf], out: &Path, bootstrap: usize) -> Result<()> {
    let runs: Vec<CpuRun> = dirs.iter().map(|d| read_run(d)).collect::<Result<_>>()?;
    let f = fit_cpu(&runs, bootstrap, 0x5ca1e).map_err(anyhow::Error::msg)?;
    let k = f.compute();
    println!("run | layout | measured ms | predicted before | after");
    for r in &runs {
        let l = &r.layout;
        let after = CpuHost {
            compute: plan::cpu_calibrate::with_run_settings(k, r),
            ..r.host
        };
        println!(
            "{} | dp{} pp{} tp{} b{}×{} zero{}{} | {:.1} | {:.1} | {:.1}",
            r.label,
            l.dp,
            l.pp,
            l.tp,
            l.batch,
            l.microbatches,
            l.zero,
            if l.sp { " sp" } else { "" },
            1e3 * r.step_secs,
            1e3 * predict(&r.model, l, &r.host).step_secs,
            1e3 * predict(&r.model, l, &after).step_secs
        );
    }
    println!(
        "matmul {:.1} GFLOP/s per thread (90% bootstrap CI [{:.1}, {:.1}]), bandwidth {:.2} GB/s per thread ([{:.2}, {:.2}]), {} resamples, {} runs",
        f.matmul_flops_per_thread / 1e9,
        f.matmul_flops_per_thread_ci90[0] / 1e9,
        f.matmul_flops_per_thread_ci90[1] / 1e9,
        f.bandwidth_bytes_per_thread / 1e9,
        f.bandwidth_bytes_per_thread_ci90[0] / 1e9,
        f.bandwidth_bytes_per_thread_ci90[1] / 1e9,
        f.bootstrap,
        f.runs
    );
    if let (Some(r), Some(ci)) = (
        f.bf16_matmul_flops_per_thread,
        f.bf16_matmul_flops_per_thread_ci90,
    ) {
        println!(
            "bf16-mixed matmul {:.1} GFLOP/s per thread ([{:.1}, {:.1}]), fitted in turn with the two above",
            r / 1e9,
            ci[0] / 1e9,
            ci[1] / 1e9
        );
    }
    println!(
        "step-time error: mean |error| {:.1}% before (default constants), {:.1}% after; RMS log error (what the fit minimises) {:.3} before, {:.3} after",
        100.0 * f.mean_abs_error_before,
        100.0 * f.mean_abs_error_after,
        f.rms_log_error_before,
        f.rms_log_error_after
    );
    for (name, ci) in [
        ("matmul rate", Some(f.matmul_flops_per_thread_ci90)),
        ("bandwidth", Some(f.bandwidth_bytes_per_thread_ci90)),
        (
            "bf16-mixed matmul rate",
            f.bf16_matmul_flops_per_thread_ci90,
        ),
    ]
    .into_iter()
    .filter_map(|(name, ci)| Some((name, ci?)))
    {
        if ci[1] > 4.0 * ci[0] {
            println!(
                "note: these runs barely determine the {name} (its interval spans more than 4×): add runs that differ in width, micro-batch count or threads"
            );
        }
    }
    std::fs::write(out, serde_json::to_string_pretty(&f)? + "\n")
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "wrote {} (use: scaletrain plan --cpu --calibration {} …)",
        out.display(),
        out.display()
    );
    Ok(())
}

/// Reads a CPU calibration file for `plan --cpu --calibration`.
pub fn read_calibration(path: &Path) -> Result<plan::cpu_time::CpuCalibration> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the calibration file {}", path.display()))?;
    let f = CpuCalibrationFile::parse(&text, &path.display().to_string())
        .map_err(anyhow::Error::msg)?;
    Ok(f.compute())
}
