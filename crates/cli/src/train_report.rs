//! The end of `scaletrain train`'s report: predicted versus measured memory, step time (with
//! the constants of `--calibration`, a `scaletrain calibrate --cpu` file, or the defaults),
//! data-parallel and tensor-parallel communication and the pipeline's waits.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use plan::cpu_time::CpuCalibration;
use train::dp::Dp;
use train::{RunSummary, StartInfo};

/// The compute constants of `train --calibration FILE`.
#[derive(Clone, Debug)]
pub(crate) struct ReportCalibration {
    /// The file, as given.
    pub path: PathBuf,
    /// Its constants.
    pub compute: CpuCalibration,
}

/// Reads `--calibration FILE` before training starts, so that a bad file fails at once.
pub(crate) fn read(path: Option<&Path>) -> Result<Option<ReportCalibration>> {
    let Some(path) = path else {
        return Ok(None);
    };
    let compute = crate::calibrate_cpu::read_calibration(path)
        .map_err(|e| anyhow::anyhow!("--calibration: {e:#}"))?;
    Ok(Some(ReportCalibration {
        path: path.to_path_buf(),
        compute,
    }))
}

/// Prints the "predicted vs measured" part of rank 0's report.
pub(crate) fn predicted_vs_measured(
    s: &RunSummary,
    dp_handle: Option<&Arc<Mutex<Dp>>>,
    calibration: Option<&ReportCalibration>,
) {
    let st = &s.start;
    println!("predicted vs measured:");
    println!(
        "  memory ({}, recompute {}): predicted buffers {} | allocated buffers {} | process peak RSS {} = {} before the model (program + token streams) + {} after",
        crate::train::precision_name(st.config.train.precision),
        crate::train::recompute_name(st.config.train.recompute),
        crate::train::mib(st.predicted.total_bytes()),
        crate::train::mib(st.allocated_bytes),
        crate::train::mib(s.peak_rss_bytes),
        crate::train::mib(st.rss_before_model_bytes),
        crate::train::mib(s.peak_rss_bytes.saturating_sub(st.rss_before_model_bytes))
    );
    if s.skipped_steps > 0 || s.final_loss_scale.is_some() || s.guard.loss_spikes > 0 {
        println!(
            "  stability: {} steps skipped ({} non-finite), {} loss spikes, {} gradient-norm spikes, {} rollbacks{}",
            s.skipped_steps,
            s.guard.nonfinite_skipped,
            s.guard.loss_spikes,
            s.guard.grad_norm_spikes,
            s.rollbacks,
            s.final_loss_scale
                .map_or(String::new(), |x| format!("; fp16 loss scale now {x}"))
        );
    }
    // Compute plus the communication the training thread waits for: for a mesh the very
    // prediction `plan --cpu` ranks layouts by, else this rank's compute and its
    // data-parallel communication.
    let compute = CpuCalibration {
        weight_panels: st.weight_panels,
        ..calibration.map_or_else(CpuCalibration::default, |c| c.compute)
    };
    let mesh = mesh_prediction(st, &compute);
    // Without a pipeline the rank runs the whole model: its compute again with the file's
    // constants. Other pipelines (GPipe, interleaved, --pp-layers) keep the defaults.
    let applied = calibration.is_some() && (mesh.is_some() || st.pipeline.is_none());
    let compute_secs = match (&mesh, &st.pipeline, calibration) {
        (None, None, Some(_)) => whole_model_step(st, &compute).total_secs,
        _ => st.predicted_step.total_secs,
    };
    let predicted_step = match &mesh {
        Some(p) => p.step_secs,
        None => {
            compute_secs / (1.0 - st.pipeline.as_ref().map_or(0.0, |p| p.simulated_bubble))
                + st.predicted_comm
                    .map_or(0.0, |c| c.exposed_secs + c.contention_secs)
        }
    };
    println!(
        "  step time: predicted {:.1} ms | measured {:.1} ms (median over {} steps), ratio measured/predicted {:.2}",
        1e3 * predicted_step,
        1e3 * s.median_step_secs,
        s.records.len(),
        s.median_step_secs / predicted_step
    );
    if let Some(c) = calibration {
        println!(
            "  constants: {} (calibrate --cpu): matmul {:.1} GFLOP/s and bandwidth {:.2} GB/s per thread{}{}",
            c.path.display(),
            c.compute.matmul_flops_per_thread / 1e9,
            c.compute.bandwidth_bytes_per_thread / 1e9,
            if c.compute.bf16_matmul_flops_per_thread
                == plan::cpu_time::CpuCalibration::default().bf16_matmul_flops_per_thread
            {
                String::new()
            } else {
                format!(
                    ", bf16-mixed matmul {:.1} GFLOP/s",
                    c.compute.bf16_matmul_flops_per_thread / 1e9
                )
            },
            if applied {
                ""
            } else {
                "; not applied: this pipeline (GPipe, interleaved or --pp-layers) keeps the default constants"
            }
        );
    }
    if let Some(p) = &mesh {
        println!(
            "  layout model (plan --cpu): pipeline {:.1} ms of which idle {:.1} ms, tensor-parallel collectives {:.1} ms, data-parallel exposed {:.1} ms, AdamW {:.1} ms, {} thread(s)/rank",
            1e3 * p.pipeline_secs,
            1e3 * p.bubble_secs,
            1e3 * p.tp_comm_secs,
            1e3 * p.dp_comm_secs,
            1e3 * p.optimizer_secs,
            p.threads
        );
    }
    if let Some((_, n, zero)) = st.dp {
        // Means, not medians: the three must add up (a median of each does not), and the
        // exposed part is often bimodal (a peer a little late or not).
        let mean = |f: &dyn Fn(&train::StepRecord) -> Option<f64>| {
            let xs: Vec<f64> = s.records.iter().filter_map(f).collect();
            xs.iter().sum::<f64>() / xs.len().max(1) as f64
        };
        let comm = mean(&|r| r.comm_secs);
        let exposed = mean(&|r| r.exposed_comm_secs);
        // Measured where the transport can tell (not MPI's collectives, not parameter servers).
        let wait = s
            .records
            .iter()
            .all(|r| r.comm_wait_secs.is_some())
            .then(|| mean(&|r| r.comm_wait_secs));
        let compute = mean(&|r| r.exposed_comm_secs.map(|e| r.step_secs - e));
        println!(
            "  data parallel: {n} ranks, ZeRO {zero}; per step (mean): compute {:.1} ms | communication {:.1} ms | exposed communication {:.1} ms ({:.0}% hidden behind backward)",
            1e3 * compute,
            1e3 * comm,
            1e3 * exposed,
            if comm > 0.0 { 100.0 * (1.0 - exposed / comm).max(0.0) } else { 0.0 }
        );
        let gathers = dp_handle.and_then(|d| {
            d.lock()
                .ok()
                .and_then(|d| d.zero3_gathers_per_micro_batch())
        });
        if let Some((count, bytes)) = gathers {
            // ZeRO-3 runs one stage: this rank's tensor-parallel shard of the whole model.
            let tp = st.pipeline.as_ref().map_or(1, |p| p.tp.1 as u64);
            let dims = model_dims(&s.config, tp);
            let a = s.config.train.grad_accum as u64;
            let (pc, pe) = plan::cpu_runtime::zero3_gathers_per_step(&dims, a);
            println!(
                "  ZeRO-3 weight gathers per micro-batch (forward + backward; the embedding once per step): measured {count:.2} gathers, {:.2} MiB | predicted {:.2} gathers, {:.2} MiB",
                bytes / 1048576.0,
                pc as f64 / a as f64,
                (pe * plan::cpu_runtime::compute_bytes(s.config.train.precision)) as f64
                    / a as f64
                    / 1048576.0
            );
        }
        if let Some(p) = st.predicted_comm {
            // The link model predicts the transfer; the wait for the other ranks to reach the
            // same collective is measured beside it (docs/training.md, "Predicted versus
            // measured").
            let measured = match wait {
                Some(w) if !s.records.is_empty() => format!(
                    "measured transfer {:.1} ms + waiting for the other ranks {:.1} ms = {:.1} ms, exposed {:.1} ms",
                    1e3 * (comm - w),
                    1e3 * w,
                    1e3 * comm,
                    1e3 * exposed
                ),
                _ => format!(
                    "measured {:.1} ms (waiting included), exposed {:.1} ms",
                    1e3 * comm,
                    1e3 * exposed
                ),
            };
            println!(
                "  communication: predicted transfer {:.1} ms, exposed {:.1} ms ({} buckets) | {measured}",
                1e3 * p.comm_secs,
                1e3 * p.exposed_secs,
                p.buckets,
            );
            if wait.is_some() {
                println!(
                    "    (waiting: from entering a collective until the other rank's first frame arrives, i.e. the ranks reaching the same bucket at different times and the communication thread getting a core; the link model leaves it out)"
                );
            }
        }
    }
    if let Some(line) = crate::train_dp::rank_times_line(&s.rank_times) {
        println!("{line}");
    }
    if let Some(pi) = st.pipeline.as_ref().filter(|pi| pi.tp.1 > 1) {
        let mut xs: Vec<f64> = s
            .records
            .iter()
            .filter_map(|r| r.tp_secs.map(|x| x / r.step_secs))
            .collect();
        xs.sort_by(f64::total_cmp);
        let median = xs.get(xs.len() / 2).copied().unwrap_or(0.0);
        let mut ms: Vec<f64> = s.records.iter().filter_map(|r| r.tp_secs).collect();
        ms.sort_by(f64::total_cmp);
        let measured = ms.get(ms.len() / 2).copied().unwrap_or(0.0);
        println!(
            "  tensor parallel: rank {} of {} spent {:.1}% of the step in its group's collectives (median; waiting included): measured {:.1} ms{}",
            pi.tp.0,
            pi.tp.1,
            100.0 * median,
            1e3 * measured,
            mesh.as_ref()
                .map_or(String::new(), |p| format!(" | predicted {:.1} ms", 1e3 * p.tp_comm_secs))
        );
    }
    if let Some(pi) = st.pipeline.as_ref().filter(|pi| pi.stages > 1) {
        let mut xs: Vec<f64> = s
            .records
            .iter()
            .filter_map(|r| r.p2p_secs.map(|p| p / r.step_secs))
            .collect();
        xs.sort_by(f64::total_cmp);
        let median = xs.get(xs.len() / 2).copied().unwrap_or(0.0);
        println!(
            "  pipeline: stage {} of {} waited for or exchanged with other stages {:.1}% of the step (median; the bubble plus transfers) | simulated {} with this run's stage times, {:.1}% with the predicted ones ({:.1}% for equal stages)",
            pi.stage,
            pi.stages,
            100.0 * median,
            s.simulated_wait_secs.map_or("-".into(), |w| format!("{:.1}%", 100.0 * w / s.median_step_secs)),
            100.0 * pi.predicted_wait,
            100.0 * pi.simulated_bubble
        );
    }
}

/// The dimensions of the whole model of `c` (every layer, embedding and head) on one of `tp`
/// tensor-parallel ranks.
fn model_dims(c: &train::config::TrainConfig, tp: u64) -> plan::cpu_runtime::CpuRuntimeDims {
    let m = &c.model;
    plan::cpu_runtime::CpuRuntimeDims {
        padded_vocab: plan::cpu_runtime::padded_vocab(m.vocab_size.unwrap_or(0) as u64),
        max_seq_len: m.seq_len as u64,
        channels: m.channels as u64,
        heads: m.n_head as u64,
        layers: m.n_layer as u64,
        has_embedding: true,
        has_head: true,
        tp,
    }
}

/// `plan::cpu_time::step_time_as` of the whole model (a run without a pipeline) with
/// `compute`, under the run's precision and recomputation.
fn whole_model_step(st: &StartInfo, compute: &CpuCalibration) -> plan::cpu_time::CpuStepTime {
    let c = &st.config;
    let dims = model_dims(c, 1);
    plan::cpu_time::step_time_as(
        &dims,
        c.train.batch_size as u64,
        c.model.seq_len as u64,
        c.train.grad_accum as u64,
        st.threads as u64,
        (c.train.precision, c.train.recompute),
        compute,
    )
}

/// The run's model as `plan --cpu` sees it (`None` before the vocabulary is known).
pub(crate) fn cpu_model(st: &StartInfo) -> Option<plan::cpu_plan::CpuModel> {
    let c = &st.config.model;
    Some(plan::cpu_plan::CpuModel {
        padded_vocab: plan::cpu_runtime::padded_vocab(c.vocab_size? as u64),
        seq_len: c.seq_len as u64,
        channels: c.channels as u64,
        heads: c.n_head as u64,
        layers: c.n_layer as u64,
        precision: st.config.train.precision,
        recompute: st.config.train.recompute,
    })
}

/// `plan::cpu_plan::predict` for this run's layout, when the run is a mesh (pipeline and/or
/// tensor parallel) that the planner's model covers: one chunk per stage, 1F1B (or no
/// pipeline), the default balanced stages. Cores: those the run's ranks × threads use, at most
/// the machine's; compute constants `compute`.
fn mesh_prediction(
    st: &StartInfo,
    compute: &CpuCalibration,
) -> Option<plan::cpu_plan::CpuPrediction> {
    use plan::cpu_plan::{predict, stage_layers, CpuHost, CpuLayout};
    let pi = st.pipeline.as_ref()?;
    if pi.chunks.len() != 1 || (pi.stages > 1 && pi.schedule != "1f1b") {
        return None;
    }
    let c = &st.config;
    let m = cpu_model(st)?;
    let (dp, zero) = st.dp.map_or((1, 0), |(_, n, z)| (n as u64, z));
    let l = CpuLayout {
        dp,
        pp: pi.stages as u64,
        tp: pi.tp.1 as u64,
        batch: c.train.batch_size as u64,
        microbatches: pi.microbatches as u64,
        zero,
        sp: pi.sequence_parallel,
    };
    let layers: Vec<u64> = pi.parts.iter().map(|r| r.len() as u64).collect();
    if layers != stage_layers(&m, l.batch, l.pp) {
        return None;
    }
    let machine = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let host = CpuHost {
        cores: (l.ranks() * st.threads as u64).min(machine).max(1),
        compute: *compute,
        link: plan::cpu_comm::CommCalibration::for_transport(pi.transport),
        tp_link: plan::cpu_comm::CommCalibration::tensor_parallel_for_transport(pi.transport),
        bucket_bytes: train::dp::DEFAULT_BUCKET_BYTES as u64,
        overlap: true,
    };
    Some(predict(&m, &l, &host))
}
