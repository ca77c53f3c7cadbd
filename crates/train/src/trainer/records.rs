//! What a run is told (options), reports as it goes (step records, the start report, the
//! observer) and returns (the summary).

use crate::config::TrainConfig;
use std::path::{Path, PathBuf};

/// How to run (beyond the config).
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Run folder: checkpoints, `metrics.jsonl`, `loss.svg`, `config.toml`.
    pub out_dir: PathBuf,
    /// Continue from the newest valid checkpoint in `out_dir`.
    pub resume: bool,
    /// Start from these HF GPT-2 safetensors weights instead of a fresh initialisation.
    pub init_from: Option<PathBuf>,
    /// Stop (with a checkpoint) after this many steps in total, as an interruption would.
    pub stop_after: Option<u64>,
    /// Allow starting afresh in a folder that already holds checkpoints (they are deleted).
    pub overwrite: bool,
    /// Checked after every step: when set (e.g. by a Ctrl-C handler), the run writes a
    /// checkpoint and returns, so `--resume` loses nothing.
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Data parallelism (`crate::dp`): this rank's connection to its peers. `None` = one rank.
    /// Only data-parallel rank 0 writes into `out_dir`.
    pub dp: Option<std::sync::Arc<std::sync::Mutex<crate::dp::Dp>>>,
    /// Pipeline parallelism (`crate::pipeline`): this rank's stage, schedule and connections
    /// to the other stages. `None` = the whole model on this rank. With both set, `dp` is this
    /// rank's data-parallel group (same stage, other pipelines).
    pub pipeline: Option<std::sync::Arc<std::sync::Mutex<crate::pipeline::Pipeline>>>,
    /// Write a Chrome trace of every rank's steps (`crate::trace`) to this file at the end.
    pub trace: Option<PathBuf>,
}

/// One optimizer step's numbers (a `metrics.jsonl` line).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StepRecord {
    /// Steps completed (1-based).
    pub step: u64,
    /// Mean training loss of the step's micro-batches (nats/token).
    pub loss: f32,
    /// Learning rate used.
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Training tokens per second of this step.
    pub tokens_per_sec: f64,
    /// Wall time of the step.
    pub step_secs: f64,
    /// Data parallel: seconds of this step spent in gradient communication, on any thread
    /// (`None` for one rank).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm_secs: Option<f64>,
    /// Data parallel: seconds of this step the training thread waited for communication (the
    /// part of `comm_secs` that overlap did not hide); compute = `step_secs` minus this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exposed_comm_secs: Option<f64>,
    /// Data parallel: seconds of `comm_secs` spent waiting for the other ranks to reach the
    /// same collective (from entering it to the peer's first frame,
    /// `comm::Communicator::peer_wait_secs`); `comm_secs` minus this is the transfer, the
    /// quantity the link model predicts. `None` for one rank, MPI and parameter servers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm_wait_secs: Option<f64>,
    /// Pipeline: seconds of this step this rank spent in exchanges with other stages, waiting
    /// included (the bubble and the transfers); `None` without a pipeline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p2p_secs: Option<f64>,
    /// Tensor parallel: seconds of this step this rank spent in the tensor-parallel group's
    /// collectives, waiting included; `None` without tensor parallelism.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tp_secs: Option<f64>,
    /// fp16: the loss scale this step's loss gradient was multiplied by (`None` otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f32>,
    /// The update was not applied (overflow, non-finite values, a loss spike, a rollback).
    pub skipped: bool,
    /// Why: `"overflow"` (fp16), `"non-finite"`, `"loss-spike"` or `"rollback"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_reason: Option<&'static str>,
    /// The loss was above the running statistic's threshold (`[stability]`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub loss_spike: bool,
    /// The gradient norm was above its running statistic's threshold (logged only).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub grad_norm_spike: bool,
}

/// What the run knows before its first step.
#[derive(Clone, Debug)]
pub struct StartInfo {
    /// The resolved config.
    pub config: TrainConfig,
    /// Parameters this rank holds (its pipeline stage's; the whole model without a pipeline).
    pub params: usize,
    /// Parameters of the whole model.
    pub model_params: usize,
    /// Step the loop starts at (0, or the checkpoint's).
    pub start_step: u64,
    /// Loss floor of the synthetic corpus, if known.
    pub loss_floor: Option<f64>,
    /// Threads.
    pub threads: usize,
    /// Predicted memory of the runtime's buffers (plan's CPU profile).
    pub predicted: plan::cpu_runtime::CpuRuntimeMemory,
    /// Predicted step time (plan's CPU time model), communication excluded.
    pub predicted_step: plan::cpu_time::CpuStepTime,
    /// Data parallel (ring/MPI): predicted gradient communication per step (plan's model).
    pub predicted_comm: Option<plan::cpu_comm::DpCommTime>,
    /// Bytes actually allocated for parameters, gradients, AdamW and activations.
    pub allocated_bytes: u64,
    /// Resident memory after the data was loaded, before the model was allocated, bytes
    /// (Linux; 0 elsewhere).
    pub rss_before_model_bytes: u64,
    /// Whether this rank packs its weights once per step (`kernels::panels`), which the step
    /// prediction counts (`plan::cpu_time::CpuCalibration::weight_panels`).
    pub weight_panels: bool,
    /// Checkpoints skipped while resuming, with the reason.
    pub warnings: Vec<String>,
    /// Data parallel: (rank, ranks, ZeRO stage); `None` for one rank.
    pub dp: Option<(usize, usize, u8)>,
    /// Pipeline: this rank's stage and what its schedule implies; `None` without a pipeline.
    pub pipeline: Option<PipelineInfo>,
}

/// A pipeline rank's stage, as the start report shows it.
#[derive(Clone, Debug)]
pub struct PipelineInfo {
    /// This rank's stage and the number of stages.
    pub stage: usize,
    /// Stages.
    pub stages: usize,
    /// This rank's tensor-parallel index and the tensor-parallel degree (0, 1 without).
    pub tp: (usize, usize),
    /// Schedule name.
    pub schedule: &'static str,
    /// Micro-batches per step.
    pub microbatches: usize,
    /// Layers of every virtual stage.
    pub parts: Vec<std::ops::Range<usize>>,
    /// Per chunk of this stage: (virtual stage, saved activation sets its list keeps in flight).
    pub chunks: Vec<(usize, usize)>,
    /// `plan::schedule::simulate`'s bubble of the busiest stage, as a fraction of the makespan,
    /// for equal per-layer forward/backward times.
    pub simulated_bubble: f64,
    /// This stage's wait as a fraction of its predicted step, simulated with every virtual
    /// stage's predicted time and the link's transfer delay (see `setup::pipeline_info`): the
    /// figure to compare with the measured wait.
    pub predicted_wait: f64,
    /// Sequence parallelism in the tensor-parallel group.
    pub sequence_parallel: bool,
    /// The job's transport ("tcp", "shm", "mpi", "threads").
    pub transport: &'static str,
}

/// Receives progress; every method has a no-op default.
pub trait Observer {
    /// Before the first step.
    fn on_start(&mut self, _info: &StartInfo) {}
    /// After each optimizer step.
    fn on_step(&mut self, _r: &StepRecord, _total_steps: u64) {}
    /// After each validation.
    fn on_eval(&mut self, _step: u64, _val_loss: f64) {}
    /// After each checkpoint.
    fn on_checkpoint(&mut self, _step: u64, _manifest: &Path) {}
    /// After a loss spike at step `from` rolled the run back to the checkpoint at `to`.
    fn on_rollback(&mut self, _from: u64, _to: u64, _loss: f32, _threshold: f64) {}
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {}

/// What a run did.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// The resolved config.
    pub config: TrainConfig,
    /// Steps completed in total (including those before a resume).
    pub steps_done: u64,
    /// Every step of this invocation.
    pub records: Vec<StepRecord>,
    /// Every validation of this invocation: (step, loss).
    pub val_losses: Vec<(u64, f64)>,
    /// Final parameters.
    pub params: Vec<f32>,
    /// Loss floor of the synthetic corpus, if known.
    pub loss_floor: Option<f64>,
    /// Stopped by early stopping.
    pub early_stopped: bool,
    /// Stopped by [`RunOptions::stop`].
    pub interrupted: bool,
    /// Wall time of this invocation's loop.
    pub wall_secs: f64,
    /// Training tokens per second: tokens trained / summed step wall time (evaluation and
    /// checkpoint pauses excluded).
    pub tokens_per_sec: f64,
    /// Median step wall time.
    pub median_step_secs: f64,
    /// Pipeline: seconds per step this stage waits in the schedule simulated with every
    /// stage's measured forward/backward times (`Pipeline::simulated_wait`).
    pub simulated_wait_secs: Option<f64>,
    /// Peak resident memory of the process, bytes (Linux; 0 elsewhere).
    pub peak_rss_bytes: u64,
    /// What `on_start` reported.
    pub start: StartInfo,
    /// The newest checkpoint's manifest.
    pub last_checkpoint: Option<PathBuf>,
    /// What the stability guards saw (whole run, resumes included).
    pub guard: crate::guard::GuardCounts,
    /// Steps whose update was skipped (whole run): fp16 overflows, non-finite values, spikes.
    pub skipped_steps: u64,
    /// Rollbacks to the last checkpoint (whole run).
    pub rollbacks: u64,
    /// fp16: the loss scale at the end.
    pub final_loss_scale: Option<f32>,
    /// Data parallel, on rank 0: every rank's mean busy and waiting time per step, and how
    /// often it was named a straggler (`crate::straggler`); empty otherwise.
    pub rank_times: Vec<crate::straggler::RankTimes>,
}

/// `VmHWM` / `VmRSS` from /proc/self/status in bytes (0 when unavailable).
pub fn proc_status_bytes(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
