//! The `scaletrain` binary: `estimate`, `plan`, `validate`, `presets`, `launch`, `bench`, `serve`.
//!
//! Logic a library user would need lives in the crates; this file parses flags, reads files and
//! prints. Errors print with their whole chain (`{:#}`) and exit with status 2.

mod bench_comm;
mod bench_plan;
mod bench_serve;
mod bench_train;
mod calibrate;
mod calibrate_cpu;
mod data;
mod launch;
mod plan_cpu;
mod report;
mod sample;
mod serve;
mod spec;
mod spec_model;
mod train;
mod train_dp;
mod train_report;

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use plan::search::{search, Objective, Reject, SearchResult, SearchSpace};
use plan::Context;

use crate::spec::SpecArgs;

/// Plan and run LLM training: how much it takes, and the layout that does it fastest.
#[derive(Debug, Parser)]
#[command(
    name = "scaletrain",
    version,
    about = "Plan LLM training (memory, FLOPs, time, cost, the best parallel layout) and run it on CPUs across processes",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Memory per device, FLOPs, step time, days, GPU-hours and cost for one layout.
    Estimate(EstimateArgs),
    /// Search every valid layout; rank those that fit by time, cost or deadline.
    Plan(PlanArgs),
    /// Compare the estimator with published measurements (prints docs/validation.md's table).
    Validate(ValidateArgs),
    /// Fit the efficiency to your measured step times (CSV) and write a calibration file.
    Calibrate(calibrate::CalibrateArgs),
    /// List model and GPU presets.
    Presets(PresetArgs),
    /// Start a multi-process job on this node (torchrun-style environment); see docs/comm.md.
    Launch(launch::LaunchCmd),
    /// Benchmarks that print figures.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Train a GPT on the CPU (default: a small model on the built-in synthetic corpus).
    Train(Box<train::TrainArgs>),
    /// Generate text from a checkpoint.
    Sample(sample::SampleArgs),
    /// Data preparation.
    #[command(subcommand)]
    Data(DataCmd),
    /// The planner page: a local web server with the estimator and planner (docs/planner-page.md).
    Serve(serve::ServeArgs),
}

#[derive(Debug, Subcommand)]
enum DataCmd {
    /// Train (or load) a byte-level BPE tokenizer and write train/validation token files.
    Prepare(data::PrepareArgs),
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Planner speed: candidate layouts evaluated per second.
    Plan(Box<bench_plan::BenchPlanArgs>),
    /// Tokens/s of a full CPU training step (forward, backward, AdamW) for one GPT-2 config.
    Train(bench_train::BenchTrainArgs),
    /// All-reduce latency, algorithm and bus bandwidth per message size (nccl-tests definitions).
    Comm(bench_comm::BenchCommArgs),
    /// The planner page's API: latency over loopback and a bounded mixed load (docs/planner-page.md).
    Serve(bench_serve::BenchServeArgs),
}

#[derive(Debug, Args)]
struct EstimateArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// Print the stable JSON schema instead of the table.
    #[arg(long)]
    json: bool,
    /// Print every formula with its numbers substituted and its source.
    #[arg(long)]
    explain: bool,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct PlanArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// Rank by: time (default), cost (with --gpus N: the cheapest layout on up to N GPUs), or
    /// goodput (shortest expected days with failures, checkpoints and restarts, over cluster
    /// sizes up to --gpus or --max-gpus: more GPUs are faster but fail more often).
    #[arg(long, default_value = "time")]
    objective: String,
    /// Cheapest layout (over cluster sizes) that trains within this many days.
    #[arg(long)]
    deadline_days: Option<f64>,
    /// Fastest layout (over cluster sizes, unless --gpus) whose training costs at most this many USD.
    #[arg(long)]
    budget_usd: Option<f64>,
    /// Largest cluster to consider with --deadline-days or --budget-usd and no --gpus (every whole
    /// number of nodes up to it is tried).
    #[arg(long, default_value_t = 4096)]
    max_gpus: u64,
    /// Layouts to show.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Search threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// JSON output.
    #[arg(long)]
    json: bool,
    /// Explain the best layout formula by formula.
    #[arg(long)]
    explain: bool,
}

#[derive(Debug, Args)]
struct ValidateArgs {
    /// Rerun the fit of the matmul efficiency constants and print it.
    #[arg(long)]
    fit: bool,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct PresetArgs {
    /// Print one GPU preset as a TOML file to start a custom `--gpu-file` from.
    #[arg(long)]
    gpu: Option<String>,
    /// JSON output: every model preset (shape, parameters) and GPU preset (all fields).
    #[arg(long)]
    json: bool,
}

/// Report commands end quietly when their reader goes away (`scaletrain plan | head`), as
/// Unix tools do: the default SIGPIPE action instead of Rust's ignored SIGPIPE, whose write
/// error makes `println!` panic. Training, launching and serving keep Rust's default: a
/// closed terminal pipe must not kill a run without its checkpoint.
fn quiet_broken_pipe_for_reports() {
    let report = matches!(
        std::env::args().nth(1).as_deref(),
        Some("estimate" | "plan" | "validate" | "calibrate" | "presets" | "bench")
    );
    if report {
        // SAFETY: called once at the start of main, before any thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
}

fn main() -> ExitCode {
    quiet_broken_pipe_for_reports();
    if plan_cpu::wanted() {
        return plan_cpu::main();
    }
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Estimate(a) => run_estimate(a),
        Cmd::Plan(a) => run_plan(a),
        Cmd::Validate(a) => run_validate(a),
        Cmd::Calibrate(a) => calibrate::run(&a),
        Cmd::Presets(a) => run_presets(a),
        Cmd::Bench(BenchCmd::Plan(a)) => bench_plan::run(*a),
        Cmd::Bench(BenchCmd::Train(a)) => bench_train::run(&a),
        Cmd::Launch(a) => launch::run_cmd(&a),
        Cmd::Bench(BenchCmd::Comm(a)) => bench_comm::run(&a),
        Cmd::Train(a) => train::run(&a),
        Cmd::Sample(a) => sample::run(&a),
        Cmd::Data(DataCmd::Prepare(a)) => data::prepare(&a),
        Cmd::Bench(BenchCmd::Serve(a)) => bench_serve::run(&a),
        Cmd::Serve(a) => serve::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `--gpus`, else dp·tp·pp when --dp is given, else 64.
pub(crate) fn default_gpus(spec: &SpecArgs) -> u64 {
    match (spec.gpus, spec.dp) {
        (Some(g), _) => g,
        (None, Some(dp)) => dp * spec.tp.unwrap_or(1) * spec.pp.unwrap_or(1),
        (None, None) => 64,
    }
}

/// What `estimate` answers: the estimate (`--json` prints it) and the notes printed above the
/// table. `serve`'s `/api/estimate` calls this same function.
pub(crate) struct EstimateAnswer {
    /// The report; its serialisation is the `--json` schema.
    pub est: plan::Estimate,
    /// The checked model, cluster and recipe.
    pub ctx: Context,
    /// Lines printed as `note: …` before the table.
    pub notes: Vec<String>,
}

pub(crate) fn estimate_answer(spec: &SpecArgs, explain: bool) -> Result<EstimateAnswer> {
    let (ctx, note) = spec.context(default_gpus(spec))?;
    let mut notes = Vec::new();
    let layout = if spec.has_layout() {
        let mut l = spec.layout_request()?.resolve(
            &ctx.model,
            ctx.cluster.gpus,
            ctx.recipe.global_batch,
        )?;
        ctx.recipe.check_layout(&l)?;
        // Without --pp-layers the stages are balanced from their predicted times.
        ctx.balance(&mut l);
        l
    } else {
        // No layout flags: take the fastest layout that fits, as `plan` would (recompute as given).
        let mut space = SearchSpace::for_gpus(vec![ctx.cluster.gpus], ctx.cluster.gpus_per_node)
            .with_model_axes(&ctx.model);
        space.recompute = vec![ctx.recipe.recompute];
        if ctx.recipe.offload.params {
            space.zero = vec![3];
        }
        let r = parallel_search(&ctx, &space, Objective::Time, 1, None);
        match r.top.first() {
            Some(c) => {
                notes.push("no layout flags given; using the fastest layout that fits (what `scaletrain plan` ranks first).".into());
                c.layout
            }
            None => {
                notes.push(format!(
                    "on {} x {}: {} Showing the default layout.",
                    ctx.cluster.gpus,
                    ctx.cluster.gpu.name,
                    report::no_fit_hint(&r)
                ));
                let mut req = spec.layout_request()?;
                if ctx.recipe.offload.params {
                    req.zero = Some(3);
                }
                let mut l = req.resolve(&ctx.model, ctx.cluster.gpus, ctx.recipe.global_batch)?;
                ctx.balance(&mut l);
                l
            }
        }
    };
    notes.extend(note);
    let mut est = plan::estimate(&ctx, &layout, explain);
    if let (Some(f), None) = (spec.calibration_file()?, spec.efficiency) {
        let [lo, hi] = f.interval(est.step_time_secs.total);
        est.step_time_interval_90 = Some([lo, hi]);
        notes.push(format!(
            "step time {:.3} s [{lo:.3}, {hi:.3}] 90% prediction interval (calibration: efficiency {} [{}, {}] 90% CI from {} runs)",
            est.step_time_secs.total, f.efficiency, f.efficiency_ci90[0], f.efficiency_ci90[1], f.runs
        ));
    }
    Ok(EstimateAnswer { est, ctx, notes })
}

fn run_estimate(a: EstimateArgs) -> Result<()> {
    let spec = a.spec.with_config_file()?;
    let ans = estimate_answer(&spec, a.explain)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&ans.est)?);
        return Ok(());
    }
    for n in &ans.notes {
        println!("note: {n}");
    }
    print!("{}", report::estimate_table(&ans.est, &ans.ctx.recipe));
    if a.explain {
        print!("{}", report::explain(&ans.est.explain));
    }
    Ok(())
}

/// Splits the search across threads (the plan crate itself spawns none).
fn parallel_search(
    ctx: &Context,
    space: &SearchSpace,
    obj: Objective,
    top: usize,
    threads: Option<usize>,
) -> SearchResult {
    let n = threads
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|x| x.get())
                .unwrap_or(1)
        })
        .max(1) as u64;
    let parts: Vec<SearchResult> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| s.spawn(move || search(ctx, space, obj, top, (i, n))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("search thread panicked"))
            .collect()
    });
    SearchResult::merge(parts, obj, top)
}

/// What `plan` answers. `serve`'s `/api/plan` calls this same function and [`plan_json`].
pub(crate) struct PlanAnswer {
    /// The checked model, cluster and recipe (cluster size: the first searched).
    pub ctx: Context,
    /// Cluster sizes searched.
    pub gpus: Vec<u64>,
    /// What was ranked by.
    pub obj: Objective,
    /// The ranked layouts and the rejection counts.
    pub result: SearchResult,
    /// Seconds the search took.
    pub secs: f64,
    /// A note about the model (e.g. the shape `--params` chose).
    pub note: Option<String>,
    /// The space searched.
    pub space: SearchSpace,
}

pub(crate) fn plan_answer(a: &PlanArgs, spec: &SpecArgs) -> Result<PlanAnswer> {
    let obj = match (a.deadline_days, a.objective.as_str()) {
        (Some(_), _) if a.budget_usd.is_some() => {
            bail!("give either --deadline-days or --budget-usd, not both")
        }
        (None, _) if a.budget_usd.is_some() => {
            let b = a.budget_usd.unwrap_or_default();
            if !b.is_finite() || b <= 0.0 {
                bail!("--budget-usd must be a positive number of US dollars");
            }
            Objective::Budget(b)
        }
        (Some(d), _) => {
            if !d.is_finite() || d <= 0.0 {
                bail!("--deadline-days must be a positive number of days");
            }
            Objective::Deadline(d)
        }
        (None, "time") => Objective::Time,
        (None, "cost") => Objective::Cost,
        (None, "goodput") => Objective::Goodput,
        (None, o) => bail!("--objective '{o}' is not one of time, cost, goodput"),
    };
    if a.top == 0 {
        bail!("--top must be at least 1");
    }
    let (ctx, note) = spec.context(default_gpus(spec))?;
    let gpn = ctx.cluster.gpus_per_node;
    let sizes = match (spec.gpus, obj) {
        (None, Objective::Deadline(_) | Objective::Budget(_) | Objective::Goodput) => {
            if a.max_gpus > 1_000_000 {
                bail!(
                    "--max-gpus {}: beyond any cluster (at most 1,000,000); check the value",
                    a.max_gpus
                );
            }
            // Every whole number of nodes up to --max-gpus.
            (1..=a.max_gpus / gpn).map(|k| k * gpn).collect()
        }
        // With a fixed cluster, cost can differ from time only by using fewer GPUs: every
        // whole number of nodes up to --gpus (and --gpus itself).
        (Some(g), Objective::Cost | Objective::Goodput) => {
            let mut v: Vec<u64> = (1..=g / gpn).map(|k| k * gpn).collect();
            if v.last() != Some(&g) {
                v.push(g);
            }
            v
        }
        _ => vec![ctx.cluster.gpus],
    };
    if spec.pp_layers.is_some() {
        bail!("--pp-layers fixes one layout's stages; `plan` balances the stages of every layout it tries from their predicted times. Use --pp-layers with `scaletrain estimate`");
    }
    if sizes.is_empty() {
        bail!(
            "--max-gpus {} is smaller than one node ({gpn} GPUs); raise --max-gpus or lower --gpus-per-node",
            a.max_gpus
        );
    }
    let mut space = SearchSpace::for_gpus(sizes, gpn).with_model_axes(&ctx.model);
    if let Some(cp) = spec.cp {
        if cp == 0 || (cp > 1 && ctx.model.seq_len % (2 * cp) != 0) {
            bail!(
                "--cp {cp}: context parallelism splits each sequence into 2·cp chunks; the sequence ({}) is not divisible by {}",
                ctx.model.seq_len,
                2 * cp
            );
        }
        space.cp = vec![cp];
    }
    if let Some(ep) = spec.ep {
        match &ctx.model.moe {
            _ if ep == 0 => bail!("--ep must be at least 1"),
            None if ep > 1 => bail!(
                "--ep {ep}: expert parallelism needs a mixture-of-experts model (this one is dense); drop --ep or add --experts"
            ),
            Some(e) if e.experts % ep != 0 => bail!(
                "--ep {ep}: the {} experts are not divisible by it; pick ep dividing {}",
                e.experts,
                e.experts
            ),
            _ => {}
        }
        space.ep = vec![ep];
    }
    if let Some(mb) = spec.micro_batch {
        space.micro_batches = vec![mb];
    }
    if let Some(z) = spec.zero {
        space.zero = vec![z];
    }
    if let Some(v) = spec.vpp {
        space.vpp = vec![v];
    }
    let off = ctx.recipe.offload;
    if spec
        .offload
        .as_deref()
        .is_some_and(|o| o.trim().eq_ignore_ascii_case("auto"))
    {
        use plan::recipe::Offload;
        space.offload = vec![
            Offload::default(),
            Offload {
                optimizer: true,
                ..off
            },
            Offload {
                optimizer: true,
                params: true,
                ..off
            },
        ];
    } else if off.params {
        if let Some(z) = spec.zero.filter(|&z| z < 3) {
            bail!("--offload params keeps each GPU's parameter shard on the host, which needs ZeRO-3; drop --zero {z} or use --zero 3");
        }
        space.zero = vec![3];
    }
    if spec.recompute.is_some() {
        space.recompute = vec![ctx.recipe.recompute];
    }
    let start = Instant::now();
    let result = parallel_search(&ctx, &space, obj, a.top, a.threads);
    let secs = start.elapsed().as_secs_f64();
    Ok(PlanAnswer {
        ctx,
        gpus: space.gpus.clone(),
        obj,
        result,
        secs,
        note,
        space,
    })
}

/// `plan --json`.
pub(crate) fn plan_json(p: &PlanAnswer) -> serde_json::Value {
    let (r, ctx) = (&p.result, &p.ctx);
    serde_json::json!({
        "candidates": r.candidates, "evaluated": r.evaluated, "accepted": r.accepted, "search_secs": p.secs,
        "rejected": r.rejected.iter().map(|(k, n)| serde_json::json!({"reason": k.describe(), "count": n})).collect::<Vec<_>>(),
        "top": r.top.iter().map(|c| {
            let mut cc = ctx.clone();
            cc.recipe.recompute = c.recompute;
            cc.recipe.offload = c.offload;
            cc.cluster.gpus = c.layout.world();
            plan::estimate(&cc, &c.layout, false)
        }).collect::<Vec<_>>(),
    })
}

fn run_plan(a: PlanArgs) -> Result<()> {
    let spec = a.spec.clone().with_config_file()?;
    let p = plan_answer(&a, &spec)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&plan_json(&p))?);
        return Ok(());
    }
    let (ctx, r, secs) = (&p.ctx, &p.result, p.secs);
    if let Some(n) = &p.note {
        println!("note: {n}");
    }
    println!(
        "Plan for {} on {} ({} per node), global batch {} x {} tokens, {} tokens, objective: {}",
        ctx.model.name,
        if p.gpus.len() == 1 {
            format!("{} x {}", p.gpus[0], ctx.cluster.gpu.name)
        } else {
            format!(
                "{}..{} x {}",
                p.gpus[0],
                p.gpus[p.gpus.len() - 1],
                ctx.cluster.gpu.name
            )
        },
        ctx.cluster.gpus_per_node,
        ctx.recipe.global_batch,
        ctx.model.seq_len,
        plan::units::count(ctx.recipe.tokens),
        p.obj
    );
    let detail = r.top.first().map(|c| {
        let mut cc = ctx.clone();
        cc.recipe.recompute = c.recompute;
        cc.recipe.offload = c.offload;
        cc.cluster.gpus = c.layout.world();
        let est = plan::estimate(&cc, &c.layout, a.explain);
        let mut s = report::estimate_table(&est, &cc.recipe);
        if a.explain {
            s.push_str(&report::explain(&est.explain));
        }
        s
    });
    print!("{}", report::plan_table(r, secs, detail));
    if r.top.is_empty() {
        return Err(no_layout_error(&a, &p));
    }
    Ok(())
}

/// Why `plan` found nothing, as an error (exit status 2): for an unmeetable deadline or budget,
/// the best achievable result with its layout; otherwise the cause from the rejection counts.
fn no_layout_error(a: &PlanArgs, p: &PlanAnswer) -> anyhow::Error {
    let r = &p.result;
    let missed = r
        .rejected
        .iter()
        .any(|(k, _)| matches!(k, Reject::MissesDeadline | Reject::OverBudget));
    if missed {
        let space = &p.space;
        let (best_obj, what) = match p.obj {
            Objective::Deadline(_) => (Objective::Time, "the fastest layout that fits"),
            _ => (Objective::Cost, "the cheapest layout that fits"),
        };
        let best = parallel_search(&p.ctx, space, best_obj, 1, a.threads);
        if let Some(c) = best.top.first() {
            let l = &c.layout;
            return anyhow::anyhow!(
                "no layout meets the {}: {what} takes {:.1} days and costs ${:.0} ({} GPUs: dp {} x tp {} x pp {}, vpp {}, ZeRO-{}, micro-batch {}, recompute {}); {}",
                match p.obj {
                    Objective::Deadline(d) => format!("deadline of {d} days"),
                    Objective::Budget(b) => format!("budget of ${b:.0}"),
                    _ => "constraint".into(),
                },
                c.days,
                c.cost_usd,
                l.world(),
                l.dp,
                l.tp,
                l.pp,
                l.vpp,
                l.zero,
                l.micro_batch,
                c.recompute,
                match p.obj {
                    Objective::Deadline(_) => "raise --deadline-days, or --max-gpus / --gpus for a larger cluster",
                    _ => "raise --budget-usd",
                }
            );
        }
    }
    anyhow::anyhow!("{}", report::no_fit_hint(r))
}

fn run_validate(a: ValidateArgs) -> Result<()> {
    let c = plan::Calibration::default();
    if a.fit {
        let (fit, err) = plan::validation::fit_matmul();
        println!("fit over Korthikanti Tables 4+5: matmul_eff = {}, matmul_knee = {} (mean abs error {:.2}%); defaults: {} / {}",
            fit.matmul_eff, fit.matmul_knee, err * 100.0, c.matmul_eff, c.matmul_knee);
        for (system, scale, err) in plan::validation::published::fit_fp8_scales(&c) {
            let preset = plan::gpu_preset(system)?.fp8_matmul_scale;
            println!("fit over the {system} rows marked `fit` in crates/plan/data/published_h100_b200.csv: fp8_matmul_scale = {scale} (mean abs error {:.2}%); preset: {preset}", err * 100.0);
        }
        for (system, secs, err) in plan::validation::moe::fit_expert_secs_per_copy(&c) {
            let preset = plan::gpu_preset(system)?.expert_secs_per_copy;
            println!("fit over the {system} rows marked `fit` in crates/plan/data/published_moe.csv: expert_secs_per_copy = {secs:.3e} (mean abs error {:.2}%); preset: {preset:.3e}", err * 100.0);
        }
    }
    let tables = plan::validation::all_tables(&c);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&tables)?);
        return Ok(());
    }
    print!("{}", plan::validation::markdown(&tables));
    Ok(())
}

/// `presets --json`: `{"models": [{"name", "parameters", "spec"}], "gpus": [GpuSpec]}`.
pub(crate) fn presets_json() -> Result<serde_json::Value> {
    let mut models = Vec::new();
    for name in plan::model::MODEL_PRESETS {
        let m = plan::preset(name)?;
        models.push(serde_json::json!({"name": name, "parameters": m.params().total, "spec": m}));
    }
    let gpus = plan::hardware::GPU_PRESETS
        .iter()
        .map(|g| plan::gpu_preset(g))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(serde_json::json!({"models": models, "gpus": gpus}))
}

fn run_presets(a: PresetArgs) -> Result<()> {
    if let Some(g) = a.gpu {
        let gpu = plan::gpu_preset(&g)?;
        print!("{}", toml::to_string(&gpu)?);
        return Ok(());
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&presets_json()?)?);
        return Ok(());
    }
    println!("Models:");
    for name in plan::model::MODEL_PRESETS {
        let m = plan::preset(name)?;
        println!(
            "  {name:<18} {:>16} params  l={:<4} h={:<6} a={:<4} kv={:<4} f={:<6} V={:<7} s={}",
            m.params().total,
            m.layers,
            m.hidden,
            m.heads,
            m.kv_heads,
            m.ffn_hidden,
            m.vocab,
            m.seq_len
        );
    }
    println!("GPUs:");
    for name in plan::hardware::GPU_PRESETS {
        let g = plan::gpu_preset(name)?;
        println!("  {name:<10} {:>7.0} TFLOP/s bf16, {:>6.1} GiB, {:>5.0} GB/s HBM, {:>4.0} GB/s link, {:>3.0} GB/s net, ${:.2}/h (assumed)",
            g.peak_bf16_flops / 1e12, g.memory_bytes / plan::units::GIB, g.memory_bw / 1e9, g.intra_node_bw / 1e9, g.network_bw / 1e9, g.price_per_gpu_hour);
        println!("             source: {}", g.source);
    }
    Ok(())
}
