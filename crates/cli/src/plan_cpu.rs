//! `scaletrain plan --cpu --nproc N`: ranks the layouts of `scaletrain train` on N local
//! processes (dp × pp × tp, micro-batch size and count, ZeRO 0–3, sequence parallelism) for the
//! model of a train config by predicted tokens/s (`plan::cpu_plan`), keeping only layouts that
//! `train`'s own flag parser and layout check accept and whose buffers fit the host's memory
//! (`--memory-mib`), and prints the `scaletrain train` command
//! of each (`--run` runs the best). See docs/cpu-planner.md.

use anyhow::{bail, Context, Result};
use clap::Parser;
use plan::cpu_plan::{
    candidates, collapse, rank, CpuChoice, CpuHost, CpuLayout, CpuModel, CpuPrediction,
};
use std::path::PathBuf;
use std::process::ExitCode;
use train::TrainConfig;

/// Whether the command line asks for this planner (`scaletrain plan --cpu …`).
pub fn wanted() -> bool {
    let mut args = std::env::args().skip(1);
    args.next().as_deref() == Some("plan") && args.any(|a| a == "--cpu")
}

/// `scaletrain plan --cpu`: the CPU runtime's layouts on this host's processes.
#[derive(Debug, Parser)]
#[command(
    name = "scaletrain plan --cpu",
    about = "Rank the layouts of `scaletrain train` on N local processes by predicted tokens/s"
)]
pub struct PlanCpuArgs {
    /// Plan the CPU runtime's layouts (without it, `plan` is the GPU-cluster planner).
    #[arg(long)]
    pub cpu: bool,
    /// Local processes (ranks) the layout uses: dp × pp × tp = N.
    #[arg(long)]
    pub nproc: usize,
    /// Train config (TOML), as `scaletrain train --config` takes it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Config override KEY=VALUE, as `scaletrain train --set` takes it (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Global batch in sequences (default: the config's train.batch_size × train.grad_accum).
    #[arg(long)]
    pub global_batch: Option<usize>,
    /// Cores of the host (default: all this machine has).
    #[arg(long)]
    pub cores: Option<usize>,
    /// Layouts to show.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// `--steps` for the printed commands (default: the config's).
    #[arg(long)]
    pub steps: Option<u64>,
    /// `--out` for the printed commands.
    #[arg(long, default_value = "runs/cpu-plan")]
    pub out: PathBuf,
    /// Print only the top layouts, one a line: predicted step ms, a tab, then the train
    /// arguments (for scripts).
    #[arg(long)]
    pub commands: bool,
    /// Run the best layout (`scaletrain train` with the printed arguments).
    #[arg(long)]
    pub run: bool,
    /// CPU calibration file (`scaletrain calibrate --cpu RUN_DIR…`): its fitted matmul rate and
    /// bandwidth replace the defaults.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Memory the N ranks' buffers may use together, MiB (default: what `train` checks a run
    /// against: the cgroup limit or the physical memory, whichever is smaller). Layouts whose
    /// predicted per-rank buffers × N exceed it are left out.
    #[arg(long)]
    pub memory_mib: Option<f64>,
    /// List every ZeRO / sequence-parallel variant as its own row (default: one row per
    /// dp × pp × tp × micro-batch shape, its other variants named in the last column).
    #[arg(long)]
    pub all_variants: bool,
}

/// `train`'s data-parallel flags alone, parsed as `train` parses them.
#[derive(Debug, Parser)]
struct DpOnly {
    #[command(flatten)]
    dp: crate::train_dp::DpArgs,
}

/// Entry point from `main` when [`wanted`].
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, a)| a)
        .collect();
    let a = match PlanCpuArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    match run(&a) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The layout's flags for `scaletrain train` (after the config's own flags).
fn layout_flags(l: &CpuLayout, threads: u64) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--set".into(),
        format!("train.batch_size={}", l.batch),
        "--dp".into(),
        l.dp.to_string(),
        "--pp".into(),
        l.pp.to_string(),
        "--tp".into(),
        l.tp.to_string(),
        "--microbatches".into(),
        l.microbatches.to_string(),
    ];
    if l.zero > 0 {
        v.extend(["--zero".into(), l.zero.to_string()]);
    }
    if l.sp {
        v.push("--sequence-parallel".into());
    }
    v.extend(["--threads".into(), threads.to_string()]);
    v
}

fn dp_flags(l: &CpuLayout) -> Vec<String> {
    let mut v = vec!["dp-only".to_string()];
    // The flags without --threads and --set: those are train's, not DpArgs'.
    v.extend(layout_flags(l, 1).into_iter().skip(2));
    v.truncate(v.len() - 2);
    v
}

/// Whether `train` accepts layout `l` for `cfg` (its flag parser and `check_layout`).
fn accepted(l: &CpuLayout, cfg: &TrainConfig) -> bool {
    let Ok(d) = DpOnly::try_parse_from(dp_flags(l)) else {
        return false;
    };
    let mut c = cfg.clone();
    c.train.batch_size = l.batch as usize;
    crate::train_dp::check_layout(&d.dp, &mut c).is_ok()
}

fn train_args(a: &PlanCpuArgs, l: &CpuLayout, p: &CpuPrediction) -> Vec<String> {
    let mut v = vec!["train".to_string()];
    if let Some(c) = &a.config {
        v.extend(["--config".into(), c.display().to_string()]);
    }
    for s in &a.set {
        v.extend(["--set".into(), s.clone()]);
    }
    if let Some(s) = a.steps {
        v.extend(["--steps".into(), s.to_string()]);
    }
    v.extend(["--out".into(), a.out.display().to_string()]);
    v.extend(layout_flags(l, p.threads));
    v
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=./,:".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The other variants of a row: "zero1 sp +0.2% 40.7, …" (time relative to the row's).
fn variants_text(c: &CpuChoice) -> String {
    c.variants
        .iter()
        .map(|(l, p)| {
            let mut name = format!("zero{}", l.zero);
            if l.sp {
                name.push_str(" sp");
            }
            format!(
                "{name} {:+.1}% {:.1}",
                100.0 * (p.step_secs / c.prediction.step_secs - 1.0),
                p.memory_bytes as f64 / 1048576.0
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn run(a: &PlanCpuArgs) -> Result<ExitCode> {
    if a.nproc == 0 {
        bail!("--nproc must be at least 1 (the local processes of the layout)");
    }
    if a.top == 0 {
        bail!("--top must be at least 1");
    }
    let cfg = TrainConfig::load(a.config.as_deref(), &a.set).context("reading the train config")?;
    let vocab = cfg.model.vocab_size.unwrap_or(match cfg.data.source {
        train::config::DataSource::Synthetic => cfg.data.synthetic.vocab_size,
        // Token files: GPT-2's vocabulary, as the runtime's stage balance assumes.
        train::config::DataSource::Files => 50257,
    });
    let m = CpuModel {
        padded_vocab: plan::cpu_runtime::padded_vocab(vocab as u64),
        seq_len: cfg.model.seq_len as u64,
        channels: cfg.model.channels as u64,
        heads: cfg.model.n_head as u64,
        layers: cfg.model.n_layer as u64,
        precision: cfg.train.precision,
        recompute: cfg.train.recompute,
    };
    let global = a
        .global_batch
        .unwrap_or(cfg.train.batch_size * cfg.train.grad_accum);
    if global == 0 {
        bail!("--global-batch must be at least 1");
    }
    let cores = a
        .cores
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if cores == 0 {
        bail!("--cores must be at least 1");
    }
    let host = CpuHost {
        cores: cores as u64,
        compute: plan::cpu_time::CpuCalibration {
            // `train` packs fp32 weights once per step on our AVX-512 kernel (with more than
            // one micro-batch, which `plan::cpu_plan` checks per layout; not under ZeRO-3),
            // unless SCALETRAIN_NO_WEIGHT_PANELS=1.
            weight_panels: train::pipeline::weight_panels_wanted(
                cfg.train.precision == plan::recipe::Precision::Fp32,
                2,
                false,
            ),
            ..match &a.calibration {
                Some(f) => crate::calibrate_cpu::read_calibration(f)?,
                None => plan::cpu_time::CpuCalibration::default(),
            }
        },
        link: plan::cpu_comm::CommCalibration::tcp(),
        tp_link: plan::cpu_comm::CommCalibration::tcp_tensor_parallel(),
        bucket_bytes: train::dp::DEFAULT_BUCKET_BYTES as u64,
        overlap: true,
    };
    let all = candidates(&m, a.nproc as u64, global as u64);
    let ok: Vec<CpuLayout> = all.iter().copied().filter(|l| accepted(l, &cfg)).collect();
    if ok.is_empty() {
        bail!(
            "no layout of {} processes trains this model with global batch {global}: dp × pp × tp = {} needs tp dividing n_head ({}), pp at most n_layer ({}) and dp dividing the global batch; try another --nproc or --global-batch",
            a.nproc, a.nproc, m.heads, m.layers
        );
    }
    let (limit, limit_what) = match a.memory_mib {
        Some(mib) if !(mib.is_finite() && mib > 0.0) => {
            bail!("--memory-mib must be a positive number of MiB, got {mib}")
        }
        Some(mib) => ((mib * 1048576.0) as u64, "--memory-mib".to_string()),
        None => {
            train::fits::memory_limit_bytes().unwrap_or((u64::MAX, "no known limit".to_string()))
        }
    };
    let every = rank(&m, &ok, &host);
    let need = |p: &CpuPrediction| p.memory_bytes.saturating_mul(a.nproc as u64);
    let ranked: Vec<(CpuLayout, CpuPrediction)> = every
        .iter()
        .filter(|(_, p)| need(p) <= limit)
        .cloned()
        .collect();
    if ranked.is_empty() {
        let least = every.iter().map(|(_, p)| need(p)).min().unwrap_or(0);
        bail!(
            "no layout of {} processes fits in {:.0} MiB ({limit_what}): the leanest needs {:.0} MiB of buffers for its {} ranks; try more processes (--nproc), a smaller global batch (--global-batch), a smaller model, or --memory-mib if more memory is available",
            a.nproc,
            limit as f64 / 1048576.0,
            least as f64 / 1048576.0,
            a.nproc
        );
    }
    let choices: Vec<CpuChoice> = if a.all_variants {
        ranked
            .iter()
            .map(|(l, p)| CpuChoice {
                layout: *l,
                prediction: p.clone(),
                variants: Vec::new(),
            })
            .collect()
    } else {
        collapse(&ranked)
    };
    let top: Vec<(CpuLayout, CpuPrediction)> = choices
        .iter()
        .take(a.top)
        .map(|c| (c.layout, c.prediction.clone()))
        .collect();
    if a.commands {
        for (l, p) in &top {
            println!(
                "{:.3}\t{}",
                1e3 * p.step_secs,
                train_args(a, l, p).join(" ")
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "CPU layouts of {} processes on {cores} cores: L{} H{} C{} T{}, vocabulary {} (padded {}), {}, recompute {}, global batch {global} sequences; {} candidates, {} accepted by train, {} fit in {:.0} MiB ({limit_what}), {} shapes",
        a.nproc, m.layers, m.heads, m.channels, m.seq_len, vocab, m.padded_vocab,
        crate::train::precision_name(m.precision), crate::train::recompute_name(m.recompute), all.len(), ok.len(),
        ranked.len(), limit as f64 / 1048576.0, collapse(&ranked).len()
    );
    if m.precision != plan::recipe::Precision::Fp32 || m.recompute != plan::recipe::Recompute::None
    {
        println!(
            "note: memory and step times are this precision's and recomputation's (bf16-mixed: linear layers on the bf16 kernel, fitted to one quiet run; fp16-mixed: f32 matmuls; recomputation: the layers' forward or attention scores again, counted, not measured: docs/cpu-planner.md)"
        );
    }
    println!(
        "{:>3} {:>3} {:>3} {:>3} {:>5} {:>3} {:>4} {:>3} {:>3} {:>10} {:>9} {:>8} {:>8} {:>8} {:>10}  also (step %, MiB/rank)",
        "#", "dp", "pp", "tp", "batch", "mb", "zero", "sp", "thr", "step ms", "tokens/s", "bubble", "tp ms", "dp ms", "MiB/rank"
    );
    for (i, c) in choices.iter().take(a.top).enumerate() {
        let (l, p) = (&c.layout, &c.prediction);
        println!(
            "{:>3} {:>3} {:>3} {:>3} {:>5} {:>3} {:>4} {:>3} {:>3} {:>10.1} {:>9.0} {:>7.1}% {:>8.1} {:>8.1} {:>10.1}  {}",
            i + 1,
            l.dp,
            l.pp,
            l.tp,
            l.batch,
            l.microbatches,
            l.zero,
            if l.sp { "on" } else { "-" },
            p.threads,
            1e3 * p.step_secs,
            p.tokens_per_sec,
            100.0 * p.bubble_secs / p.pipeline_secs.max(f64::MIN_POSITIVE),
            1e3 * p.tp_comm_secs,
            1e3 * p.dp_comm_secs,
            p.memory_bytes as f64 / 1048576.0,
            variants_text(c)
        );
    }
    let ties = plan::cpu_plan::near_ties(&choices[..choices.len().min(a.top)]);
    if ties > 1 {
        println!(
            "note: #1-#{ties} are within {:.0}% of the best predicted step, the planner's resolution: layouts that close measured in either order from run to run on the machine its constants come from (docs/cpu-planner.md, \"How close is a tie\"); if the choice matters, time them (bench/cpu_plan_check.sh)",
            100.0 * plan::cpu_plan::RESOLUTION
        );
    }
    let (best, bp) = &top[0];
    let args = train_args(a, best, bp);
    println!(
        "best: scaletrain {}",
        args.iter()
            .map(|s| shell_quote(s))
            .collect::<Vec<_>>()
            .join(" ")
    );
    if !a.run {
        return Ok(ExitCode::SUCCESS);
    }
    let exe = std::env::current_exe().context("finding this program to run the best layout")?;
    let status = std::process::Command::new(exe)
        .args(&args)
        .status()
        .context("starting scaletrain train")?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(status.code().unwrap_or(1).clamp(1, 255) as u8)
    })
}
