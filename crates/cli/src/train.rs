//! `scaletrain train`: flags → config, a progress bar, and the predicted-versus-measured report.
//! The loop itself is `train::run`.

use anyhow::{anyhow, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use train::{Observer, RunOptions, StartInfo, StepRecord, TrainConfig, TrainError};

/// Arguments of `scaletrain train`.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// TOML config (sections [model], [data], [optim], [train]; see docs/training.md). Without
    /// it, every field takes its default: a small GPT on the built-in synthetic corpus.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Run folder: checkpoints, metrics.jsonl, loss.svg, config.toml.
    #[arg(long, default_value = "runs/default")]
    pub out: PathBuf,
    /// Total optimizer steps (train.steps).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Continue from the newest valid checkpoint in --out. At another --dp, train.grad_accum is
    /// set to keep the checkpoint's global batch unless --global-batch or train.grad_accum is given.
    #[arg(long)]
    pub resume: bool,
    /// Start from Hugging Face GPT-2 safetensors weights of the shape the config describes: a
    /// file, or a model folder (config.json + model.safetensors) whose config.json must match.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Stop after this many steps in total (with a checkpoint), as an interruption would;
    /// continue later with --resume.
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// Start afresh even if --out holds checkpoints (they are deleted).
    #[arg(long)]
    pub overwrite: bool,
    /// Write a Chrome trace (Perfetto / chrome://tracing) of every rank's steps to this file:
    /// forward/backward per micro-batch, exchanges between pipeline stages, data-parallel
    /// buckets, optimizer, validation, checkpoints. Meant for short runs (--steps 20).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Override any config field: --set optim.lr=1e-3 --set model.n_layer=4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Kernel threads (train.threads; 0 = all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seed of weights and batch order (train.seed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Storage precision (train.precision): fp32, bf16-mixed or fp16-mixed. Mixed precision
    /// keeps fp32 master weights and AdamW state; fp16 adds a dynamic loss scale.
    #[arg(long)]
    pub precision: Option<String>,
    /// Activation recomputation (train.recompute): none, selective (the attention softmax)
    /// or full (whole layers).
    #[arg(long)]
    pub recompute: Option<String>,
    /// Data parallel: name a rank whose busy time per step is this fraction above the median
    /// rank's (train.straggler_margin, default 0.2).
    #[arg(long)]
    pub straggler_margin: Option<f64>,
    /// Steps the straggler medians are taken over; 0 turns detection off
    /// (train.straggler_window, default 20).
    #[arg(long)]
    pub straggler_window: Option<usize>,
    /// CPU calibration file (`scaletrain calibrate --cpu RUN_DIR…`, as `plan --cpu
    /// --calibration` takes it): the end-of-run report predicts the step with its fitted
    /// matmul rate and bandwidth instead of the defaults.
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
    /// No progress bar (it is hidden anyway when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// Set by `scaletrain launch` on its default command, so that hints name launch's way of
    /// passing these flags (`scaletrain launch -- --resume`).
    #[arg(long, hide = true)]
    pub via_launch: bool,
    /// Data parallelism: --dp, --grad-sync, --servers, --zero, --global-batch.
    #[command(flatten)]
    pub dp: crate::train_dp::DpArgs,
}

struct Progress {
    bar: Option<ProgressBar>,
    last_val: Option<f64>,
}

impl Observer for Progress {
    fn on_start(&mut self, info: &StartInfo) {
        print_start(info);
        if let Some(bar) = &self.bar {
            bar.set_length(info.config.train.steps);
            bar.set_position(info.start_step);
            bar.reset_eta();
        }
    }
    fn on_step(&mut self, r: &StepRecord, _total: u64) {
        if let Some(bar) = &self.bar {
            let val = self
                .last_val
                .map_or(String::new(), |v| format!(" val {v:.4}"));
            bar.set_message(format!(
                "loss {:.4}{val} | {:.0} tok/s",
                r.loss, r.tokens_per_sec
            ));
            bar.set_position(r.step);
        }
    }
    fn on_eval(&mut self, step: u64, val_loss: f64) {
        self.last_val = Some(val_loss);
        let line = format!("step {step:>6}: val_loss {val_loss:.4}");
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.println(line),
            _ => println!("{line}"),
        }
    }
    fn on_checkpoint(&mut self, step: u64, manifest: &Path) {
        let line = format!("step {step:>6}: checkpoint {}", manifest.display());
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.println(line),
            _ => println!("{line}"),
        }
    }
}

pub(crate) fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn print_start(info: &StartInfo) {
    let c = &info.config;
    let m = &c.model;
    println!(
        "model: GPT-2, {} layers, {} heads, {} channels, seq {}, vocab {} -> {} parameters",
        m.n_layer,
        m.n_head,
        m.channels,
        m.seq_len,
        m.vocab_size.unwrap_or(0),
        if info.params == info.model_params {
            info.model_params.to_string()
        } else {
            format!("{} (this rank {})", info.model_params, info.params)
        }
    );
    match c.data.source {
        train::config::DataSource::Synthetic => {
            let s = &c.data.synthetic;
            println!(
                "data: synthetic Markov corpus (vocab {}, order {}, branching {}, smoothing {}, seed {}), {} train / {} validation tokens",
                s.vocab_size, s.order, s.branching, s.smoothing, s.seed, s.train_tokens, s.val_tokens
            );
        }
        train::config::DataSource::Files => println!(
            "data: {} / {}",
            c.data
                .train_file
                .as_deref()
                .unwrap_or(Path::new("?"))
                .display(),
            c.data
                .val_file
                .as_deref()
                .unwrap_or(Path::new("?"))
                .display()
        ),
    }
    if let Some(f) = info.loss_floor {
        println!("best achievable loss (the corpus's floor): {f:.4} nats/token");
    }
    println!(
        "run: {} steps x {} sequences x {} tokens (x{} accumulation), {} threads{}",
        c.train.steps,
        c.train.batch_size,
        m.seq_len,
        c.train.grad_accum,
        info.threads,
        if info.start_step > 0 {
            format!(", resuming at step {}", info.start_step)
        } else {
            String::new()
        }
    );
    for w in &info.warnings {
        println!("warning: {w}");
    }
    let p = &info.predicted;
    let t = &info.predicted_step;
    println!(
        "predicted (plan::cpu_runtime): {} = weights {}{} + gradients {} + AdamW {} + activations {}; allocated: {}",
        mib(p.total_bytes()),
        mib(p.param_bytes),
        if p.weight_panel_bytes > 0 {
            format!(" + weight panels {}", mib(p.weight_panel_bytes))
        } else {
            String::new()
        },
        mib(p.grad_bytes),
        mib(p.optimizer_bytes),
        mib(p.activation_bytes),
        mib(info.allocated_bytes)
    );
    println!(
        "predicted (plan::cpu_time):    {:.1} ms/step = matmul {:.1} + elementwise {:.1} + AdamW {:.1} + threads {:.1}",
        1e3 * t.total_secs,
        1e3 * t.matmul_secs,
        1e3 * t.memory_secs,
        1e3 * t.optimizer_secs,
        1e3 * t.overhead_secs
    );
    if let Some(pi) = info.pipeline.as_ref().filter(|pi| pi.tp.1 > 1) {
        println!(
            "tensor parallel: {} ranks per group (this rank {}): every layer's attention heads and MLP columns split {} ways (Megatron-LM), two all-reduces per layer forward and two backward",
            pi.tp.1, pi.tp.0, pi.tp.1
        );
    }
    if let Some(pi) = info.pipeline.as_ref().filter(|pi| pi.stages > 1) {
        let layers = |k: usize| {
            let r = &pi.parts[k];
            format!("layers {}..{}", r.start, r.end)
        };
        println!(
            "pipeline: {} stages, schedule {}, {} micro-batches per step; layers per stage {}",
            pi.stages,
            pi.schedule,
            pi.microbatches,
            pi.parts
                .iter()
                .map(|r| r.len().to_string())
                .collect::<Vec<_>>()
                .join("+")
        );
        for (vs, sets) in &pi.chunks {
            println!(
                "  this rank: stage {} ({}{}{}), {sets} saved activation set(s) in flight (the schedule's)",
                pi.stage,
                layers(*vs),
                if *vs == 0 { ", embedding" } else { "" },
                if vs + 1 == pi.parts.len() { ", LM head + loss" } else { "" }
            );
        }
        println!(
            "predicted (plan::schedule):    bubble {:.1}% of the step (simulated list, equal stages); step = stage compute / (1 - bubble)",
            100.0 * pi.simulated_bubble
        );
    }
    if let Some(c) = &info.predicted_comm {
        println!(
            "predicted (plan::cpu_comm):    {:.1} ms/step in collectives over {} gradient buckets, {:.1} ms of it exposed{}",
            1e3 * c.comm_secs,
            c.buckets,
            1e3 * c.exposed_secs,
            if c.contention_secs > 0.0 {
                format!(
                    ", {:.1} ms taken from compute (no core to spare for the communication thread)",
                    1e3 * c.contention_secs
                )
            } else {
                String::new()
            }
        );
    }
}

/// A flag set by the first Ctrl-C (the run then checkpoints and stops); a second Ctrl-C exits
/// at once. If the handler cannot be installed, Ctrl-C keeps its default meaning.
fn stop_on_ctrl_c() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let _ = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: finishing this step and writing a checkpoint (Ctrl-C again to quit now)");
    });
    flag
}

/// Whether `train.grad_accum` was set by a `--set` or the `--config` file (not defaulted).
fn grad_accum_given(a: &TrainArgs) -> bool {
    let by_flag = a
        .set
        .iter()
        .any(|s| s.split('=').next().map(str::trim) == Some("train.grad_accum"));
    let by_file = a.config.as_ref().is_some_and(|p| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| t.parse::<toml::Table>().ok())
            .is_some_and(|t| t.get("train").and_then(|s| s.get("grad_accum")).is_some())
    });
    by_flag || by_file
}

/// Rephrases the library's hints, which name `scaletrain train`'s flags, for a run started by
/// `scaletrain launch` without a command (it passes the flags after `--` on to train).
fn hint(e: TrainError, via_launch: bool) -> anyhow::Error {
    match e {
        TrainError::RunFolderInUse { dir, newest_step } if via_launch => anyhow!(
            "{} already holds checkpoints (newest: step {newest_step}); add --resume after `--` to \
             continue that run (scaletrain launch -- --resume), --overwrite to start afresh \
             (scaletrain launch -- --overwrite), or --out DIR for another folder \
             (scaletrain launch -- --out DIR); flags after `--` go to scaletrain train",
            dir.display()
        ),
        e => e.into(),
    }
}

/// Runs `scaletrain train`.
pub fn run(a: &TrainArgs) -> Result<()> {
    let calibration = crate::train_report::read(a.calibration.as_deref())?;
    let mut overrides = Vec::new();
    if let Some(s) = a.steps {
        overrides.push(format!("train.steps={s}"));
    }
    if let Some(t) = a.threads {
        overrides.push(format!("train.threads={t}"));
    }
    if let Some(s) = a.seed {
        overrides.push(format!("train.seed={s}"));
    }
    if let Some(p) = &a.precision {
        let p = plan::recipe::Precision::parse(p)?;
        overrides.push(format!("train.precision={}", serde_json::to_string(&p)?));
    }
    if let Some(r) = &a.recompute {
        let r = plan::recipe::Recompute::parse(r)?;
        overrides.push(format!("train.recompute={}", serde_json::to_string(&r)?));
    }
    if let Some(m) = a.straggler_margin {
        overrides.push(format!("train.straggler_margin={m:?}"));
    }
    if let Some(w) = a.straggler_window {
        overrides.push(format!("train.straggler_window={w}"));
    }
    overrides.extend(a.set.iter().cloned());
    let mut cfg = TrainConfig::load(a.config.as_deref(), &overrides)?;
    crate::train_dp::check_layout(&a.dp, &mut cfg)?;
    let kept = if a.resume {
        crate::train_dp::keep_global_batch(&a.dp, grad_accum_given(a), &a.out, &mut cfg)
    } else {
        None
    };
    let dp = match crate::train_dp::setup(&a.dp, &mut cfg).map_err(crate::train_dp::fail)? {
        crate::train_dp::Setup::Launch => return crate::train_dp::launch_self(&a.dp),
        crate::train_dp::Setup::Server(mut s) => {
            let steps = s
                .serve()
                .context("parameter server failed")
                .map_err(crate::train_dp::fail)?;
            println!("parameter server: served {steps} steps");
            return Ok(());
        }
        crate::train_dp::Setup::Worker { dp, pipeline } => (dp, pipeline),
        crate::train_dp::Setup::Single => (None, None),
    };
    let (dp, pipeline) = dp;
    if dp.is_some() || pipeline.is_some() {
        // The communicator's flight recorder: every rank's recent calls go to the run folder
        // when a call fails or times out, or on SIGUSR1 (`kill -USR1 <pid>` on a stuck job);
        // SCALETRAIN_FLIGHT_DIR chooses another folder.
        if comm::flight::dump_dir().is_none() {
            comm::flight::set_dump_dir(Some(a.out.clone()));
        }
        if let Err(e) = comm::flight::install_signal_handler() {
            eprintln!("warning: no SIGUSR1 flight-recorder dumps: {e}");
        }
    }
    // Rank 0 of the job (first stage, data-parallel rank 0) reports for it.
    let rank = dp.as_ref().map_or(0, |d| d.lock().map_or(0, |d| d.rank()))
        + pipeline
            .as_ref()
            .map_or(0, |p| p.lock().map_or(0, |p| p.stage()));
    if let (Some(note), 0) = (&kept, rank) {
        println!("{note}");
    }
    if rank > 0 {
        // Rank 0 reports for the job; the others train silently and print one line at the end.
        let opts = RunOptions {
            out_dir: a.out.clone(),
            resume: a.resume,
            init_from: a.init_from.clone(),
            stop_after: a.stop_after,
            overwrite: a.overwrite,
            stop: Some(stop_on_ctrl_c()),
            dp,
            pipeline,
            trace: a.trace.clone(),
        };
        let s = train::run(&cfg, &opts, &mut train::Quiet)
            .map_err(|e| hint(e, a.via_launch))
            .context("training failed")
            .map_err(crate::train_dp::fail)?;
        println!(
            "done: {} steps, final train loss {:.4}{}",
            s.steps_done,
            s.records.last().map_or(f32::NAN, |r| r.loss),
            s.start.pipeline.as_ref().map_or(String::new(), |pi| {
                let mut xs: Vec<f64> = s.records.iter().filter_map(|r| r.p2p_secs.map(|p| p / r.step_secs)).collect();
                xs.sort_by(f64::total_cmp);
                format!(
                    "; stage {} ({}, recompute {}): memory predicted {} | allocated {}; waiting/exchanging {:.1}% of the step (simulated {} with this run's stage times, {:.1}% with the predicted ones)",
                    pi.stage,
                    precision_name(s.config.train.precision),
                    recompute_name(s.config.train.recompute),
                    mib(s.start.predicted.total_bytes()),
                    mib(s.start.allocated_bytes),
                    100.0 * xs.get(xs.len() / 2).copied().unwrap_or(0.0),
                    s.simulated_wait_secs.map_or("-".into(), |w| format!("{:.1}%", 100.0 * w / s.median_step_secs)),
                    100.0 * pi.predicted_wait
                )
            })
        );
        return Ok(());
    }
    let dp_handle = dp.clone();
    let opts = RunOptions {
        out_dir: a.out.clone(),
        resume: a.resume,
        init_from: a.init_from.clone(),
        stop_after: a.stop_after,
        overwrite: a.overwrite,
        stop: Some(stop_on_ctrl_c()),
        dp,
        pipeline,
        trace: a.trace.clone(),
    };
    let bar = (!a.no_progress).then(|| {
        let bar = ProgressBar::new(cfg.train.steps);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} | ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    let mut obs = Progress {
        bar: bar.clone(),
        last_val: None,
    };
    let s = train::run(&cfg, &opts, &mut obs)
        .map_err(|e| hint(e, a.via_launch))
        .context("training failed")
        .map_err(crate::train_dp::fail)?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let last = s.records.last();
    let val = s.val_losses.last().map(|v| v.1);
    println!(
        "done: {} steps in {:.1} s ({:.0} tokens/s){}",
        s.steps_done,
        s.wall_secs,
        s.tokens_per_sec,
        if s.early_stopped {
            " - stopped early: validation loss stopped improving"
        } else if s.interrupted {
            " - interrupted; continue with --resume"
        } else {
            ""
        }
    );
    if let Some(r) = last {
        print!("final train loss {:.4}", r.loss);
    }
    if let Some(v) = val {
        print!(", validation loss {v:.4}");
    }
    if let (Some(f), Some(v)) = (s.loss_floor, val) {
        print!(
            ", floor {f:.4} (gap {:.4} nats, {:.1}%)",
            v - f,
            100.0 * (v - f) / f
        );
    }
    println!();
    let st = &s.start;
    crate::train_report::predicted_vs_measured(&s, dp_handle.as_ref(), calibration.as_ref());
    crate::calibrate_cpu::write_run_layout(a, st);
    println!(
        "run folder: {} (metrics.jsonl, loss.svg, config.toml{})",
        a.out.display(),
        s.last_checkpoint
            .as_ref()
            .map_or(String::new(), |p| format!(", {}", p.display()))
    );
    Ok(())
}

/// The estimator's name of a precision (`bf16-mixed`).
pub(crate) fn precision_name(p: plan::recipe::Precision) -> String {
    serde_json::to_value(p)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The estimator's name of a recomputation policy (`selective`).
pub(crate) fn recompute_name(r: plan::recipe::Recompute) -> String {
    serde_json::to_value(r)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}
