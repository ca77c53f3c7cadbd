//! `scaletrain bench train`: tokens per second of a full training step (forward, backward,
//! clip + AdamW) of the CPU runtime for one GPT-2 config, plus the matmul kernel's GFLOP/s on
//! the model's own shapes. With `--torch PYTHON` it also runs `bench/torch_train_bench.py` (the
//! same model in PyTorch eager, same threads) in the same run, alternating round by round
//! (`--rounds`), and reports the median per-round ratio: this machine is shared, so only
//! measurements taken side by side are comparable.
//! The JSON output feeds the estimator's calibration.

use anyhow::{bail, Context};
use kernels::matmul::{matmul_backward, matmul_forward};
use kernels::rng::Rng;
use kernels::Par;
use model::{
    backward, forward, Activations, AdamW, AdamWConfig, GradInput, ModelConfig, NoTp, ParamLayout,
    Shard, StageInput,
};
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `scaletrain bench train`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchTrainArgs {
    /// Transformer layers.
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// Attention heads (must divide --channels).
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Model width.
    #[arg(long, default_value_t = 256)]
    pub channels: usize,
    /// Sequence length (also the position-embedding size).
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Micro-batch size.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Vocabulary size (padded to a multiple of 64 internally).
    #[arg(long, default_value_t = 8192)]
    pub vocab: usize,
    /// Threads for every kernel (explicit; no global pool).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Timed steps (after warm-up); the median is reported.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// This machine's peak f32 GFLOP/s per core, to report the matmul fraction of peak
    /// (about 100 on the AVX2-FMA development machine).
    #[arg(long, default_value_t = 100.0)]
    pub peak_gflops_per_core: f64,
    /// Also run the PyTorch peer with this Python interpreter (needs torch installed).
    #[arg(long)]
    pub torch: Option<PathBuf>,
    /// Measurement rounds; with --torch each round runs scaletrain then PyTorch, so both see
    /// the same machine load. Medians over rounds are reported.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Median of a non-empty list.
fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    }
}

/// Matmul FLOPs of one training step (forward + backward = 3× forward for the linear layers;
/// attention's products run over causal blocks: forward 2 and backward 4 GEMMs per head, each
/// `causal_work_fraction(t)` of the t×t square).
fn matmul_flops_per_step(cfg: &ModelConfig, b: usize, t: usize) -> f64 {
    let (c, vp, l) = (
        cfg.channels as f64,
        cfg.padded_vocab() as f64,
        cfg.n_layer as f64,
    );
    let bt = (b * t) as f64;
    let linear_fwd = l * 2.0 * bt * 12.0 * c * c + 2.0 * bt * c * vp;
    let attention =
        l * 6.0 * 2.0 * b as f64 * (t * t) as f64 * c * kernels::attention::causal_work_fraction(t);
    3.0 * linear_fwd + attention
}

/// GFLOP/s of the matmul kernel on the model's linear shapes, forward and backward, weighted by
/// their FLOPs (what the estimator calibrates against).
fn matmul_gflops(cfg: &ModelConfig, b: usize, t: usize, par: Par) -> f64 {
    let (c, vp, m) = (cfg.channels, cfg.padded_vocab(), b * t);
    let shapes = [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c), (c, vp)]; // (k, n)
    let mut rng = Rng::new(3);
    let (mut flops, mut secs) = (0.0, 0.0);
    for (k, n) in shapes {
        let mut inp = vec![0.0f32; m * k];
        let mut w = vec![0.0f32; n * k];
        rng.fill_uniform(&mut inp, -1.0, 1.0);
        rng.fill_uniform(&mut w, -1.0, 1.0);
        let mut out = vec![0.0f32; m * n];
        let (mut d_inp, mut d_w) = (vec![0.0f32; m * k], vec![0.0f32; n * k]);
        let reps = 3;
        matmul_forward(&mut out, &inp, &w, None, m, k, n, par); // warm
        let start = Instant::now();
        for _ in 0..reps {
            matmul_forward(&mut out, &inp, &w, None, m, k, n, par);
            matmul_backward(&mut d_inp, &mut d_w, None, &out, &inp, &w, m, k, n, par);
        }
        secs += start.elapsed().as_secs_f64();
        flops += reps as f64 * 3.0 * 2.0 * (m * k * n) as f64;
    }
    flops / secs / 1e9
}

/// Runs the benchmark and prints text or JSON.
pub fn run(args: &BenchTrainArgs) -> anyhow::Result<()> {
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    if args.steps == 0 || args.batch == 0 || args.seq_len == 0 {
        bail!("--steps, --batch and --seq-len must be at least 1");
    }
    let cfg = ModelConfig {
        vocab_size: args.vocab,
        max_seq_len: args.seq_len,
        n_layer: args.layers,
        n_head: args.heads,
        channels: args.channels,
    };
    let layout = ParamLayout::new(&cfg, &Shard::full(&cfg)).context("model config")?;
    let (b, t, par) = (args.batch, args.seq_len, Par::Threads(args.threads));
    let mut params = layout.init_params(1337);
    let mut grads = vec![0.0f32; layout.len()];
    let mut opt = AdamW::new(&layout);
    let mut acts = Activations::new(&layout, b, t);
    let opt_cfg = AdamWConfig::default();
    let mut rng = Rng::new(7);
    let tokens: Vec<u32> = (0..b * t)
        .map(|_| rng.below(args.vocab as u64) as u32)
        .collect();
    let targets: Vec<u32> = (0..b * t)
        .map(|_| rng.below(args.vocab as u64) as u32)
        .collect();
    let d_loss = 1.0 / (b * t) as f32;

    let mm_gflops = matmul_gflops(&cfg, b, t, par);
    let mut rounds: Vec<([f64; 4], Option<serde_json::Value>)> = Vec::new();
    let mut last_loss = f32::NAN;
    for _ in 0..args.rounds.max(1) {
        let (mut step_secs, mut fwd_secs, mut bwd_secs, mut opt_secs) =
            (vec![], vec![], vec![], vec![]);
        for i in 0..args.warmup + args.steps {
            let t0 = Instant::now();
            grads.fill(0.0);
            let loss = forward(
                &layout,
                &params,
                &mut acts,
                StageInput::Tokens(&tokens),
                Some(&targets),
                par,
                &mut NoTp,
            )?;
            let t1 = Instant::now();
            let gi = GradInput::Loss {
                targets: &targets,
                d_loss,
            };
            backward(
                &layout,
                &params,
                &mut grads,
                &mut acts,
                StageInput::Tokens(&tokens),
                gi,
                par,
                &mut NoTp,
            )?;
            let t2 = Instant::now();
            opt.step(&layout, &mut params, &mut grads, &opt_cfg, par);
            let t3 = Instant::now();
            last_loss = loss.unwrap_or(f32::NAN);
            if i >= args.warmup {
                step_secs.push((t3 - t0).as_secs_f64());
                fwd_secs.push((t1 - t0).as_secs_f64());
                bwd_secs.push((t2 - t1).as_secs_f64());
                opt_secs.push((t3 - t2).as_secs_f64());
            }
        }
        let phases = [
            median(&mut step_secs),
            median(&mut fwd_secs),
            median(&mut bwd_secs),
            median(&mut opt_secs),
        ];
        let torch = match &args.torch {
            Some(python) => Some(run_torch(python, args)?),
            None => None,
        };
        rounds.push((phases, torch));
    }
    let phase = |k: usize| median(&mut rounds.iter().map(|r| r.0[k]).collect::<Vec<_>>());
    let step = phase(0);
    let tokens_per_sec = (b * t) as f64 / step;
    let step_flops = matmul_flops_per_step(&cfg, b, t);
    let peak = args.peak_gflops_per_core * args.threads as f64;
    let round_ratios: Vec<f64> = rounds
        .iter()
        .filter_map(|(p, tv)| {
            tv.as_ref()?["tokens_per_sec"]
                .as_f64()
                .map(|x| (b * t) as f64 / p[0] / x)
        })
        .collect();
    let torch_tps: Vec<f64> = rounds
        .iter()
        .filter_map(|(_, tv)| tv.as_ref()?["tokens_per_sec"].as_f64())
        .collect();
    let torch_median = (!torch_tps.is_empty()).then(|| median(&mut torch_tps.clone()));
    let ratio = (!round_ratios.is_empty()).then(|| median(&mut round_ratios.clone()));
    let torch = torch_median.map(|tps| {
        serde_json::json!({
            "tokens_per_sec": tps,
            "rounds_tokens_per_sec": torch_tps,
            "torch_version": rounds[0].1.as_ref().map(|v| v["torch_version"].clone()),
        })
    });
    let torch_tps = torch_median;

    let report = serde_json::json!({
        "config": {
            "layers": args.layers, "heads": args.heads, "channels": args.channels,
            "seq_len": t, "batch": b, "vocab": args.vocab, "padded_vocab": cfg.padded_vocab(),
            "threads": args.threads, "params": layout.len(),
        },
        "tokens_per_sec": tokens_per_sec,
        "step_secs": step,
        "forward_secs": phase(1),
        "backward_secs": phase(2),
        "optimizer_secs": phase(3),
        "rounds": rounds.len(),
        "rounds_tokens_per_sec": rounds.iter().map(|r| (b * t) as f64 / r.0[0]).collect::<Vec<_>>(),
        "matmul_gflops": mm_gflops,
        "matmul_peak_fraction": mm_gflops / peak,
        "step_matmul_gflops": step_flops / step / 1e9,
        "final_loss": last_loss,
        "torch": torch,
        "ratio_vs_torch": ratio,
        "rounds_ratio_vs_torch": round_ratios,
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "config: {} layers, {} heads, {} channels, seq {}, batch {}, vocab {} (padded {}), {} params, {} threads",
            args.layers, args.heads, args.channels, t, b, args.vocab, cfg.padded_vocab(), layout.len(), args.threads
        );
        println!(
            "step {:.1} ms (forward {:.1}, backward {:.1}, AdamW {:.1}), median of {} steps x {} rounds: {:.0} tokens/s",
            1e3 * step,
            1e3 * report["forward_secs"].as_f64().unwrap_or(0.0),
            1e3 * report["backward_secs"].as_f64().unwrap_or(0.0),
            1e3 * report["optimizer_secs"].as_f64().unwrap_or(0.0),
            args.steps,
            rounds.len(),
            tokens_per_sec
        );
        println!(
            "matmul kernel {:.1} GFLOP/s on the model's shapes ({:.0}% of {:.0} peak); whole step {:.1} GFLOP/s of matmul work",
            mm_gflops,
            100.0 * mm_gflops / peak,
            peak,
            step_flops / step / 1e9
        );
        if let (Some(tt), Some(r)) = (torch_tps, ratio) {
            println!(
                "PyTorch eager, same run: {tt:.0} tokens/s; ratio scaletrain / PyTorch = {r:.2} \
                 (median of per-round ratios {round_ratios:.2?})"
            );
        }
    }
    Ok(())
}

/// Runs the PyTorch peer script and parses its JSON line.
fn run_torch(python: &std::path::Path, args: &BenchTrainArgs) -> anyhow::Result<serde_json::Value> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench/torch_train_bench.py");
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(["--layers", &args.layers.to_string()])
        .args(["--heads", &args.heads.to_string()])
        .args(["--channels", &args.channels.to_string()])
        .args(["--seq-len", &args.seq_len.to_string()])
        .args(["--batch", &args.batch.to_string()])
        .args(["--vocab", &args.vocab.to_string()])
        .args(["--threads", &args.threads.to_string()])
        .args(["--steps", &args.steps.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .output()
        .with_context(|| format!("running {} {}", python.display(), script.display()))?;
    if !out.status.success() {
        bail!(
            "PyTorch bench failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .last()
        .context("PyTorch bench printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("parsing PyTorch bench output {line:?}"))
}
