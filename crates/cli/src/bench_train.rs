//! `scaletrain bench train`: tokens per second of a full training step (forward, backward,
//! clip + AdamW) of the CPU runtime for one GPT-2 config, plus the matmul kernel's GFLOP/s on
//! the model's own shapes. With `--torch PYTHON` it also runs `bench/torch_train_bench.py` (the
//! same model in PyTorch eager, same threads) in the same run, alternating round by round
//! (`--rounds`), and reports the median per-round ratio: this machine is shared, so only
//! measurements taken side by side are comparable.
//! The JSON output feeds the estimator's calibration.
//!
//! `--precision fp32,bf16-mixed` (and/or several `--recompute` policies) times each variant in
//! every round, back to back, and reports each one's median tokens/s and its median per-round
//! ratio to the first variant, with its predicted activation and state bytes.

use anyhow::{bail, Context};
use kernels::matmul::{matmul_backward, matmul_forward};
use kernels::rng::Rng;
use kernels::Par;
use model::{
    backward, backward_with, forward, forward_with, Activations, AdamW, AdamWConfig, Bf16, Elem,
    GradInput, ModelConfig, NoTp, ParamLayout, Precision, Recompute, Shard, StageInput, F16,
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
    /// Precisions to time, comma-separated: fp32, bf16-mixed, fp16-mixed (each round runs
    /// every variant back to back; ratios are against the first).
    #[arg(long, default_value = "fp32", value_delimiter = ',', value_parser = parse_precision)]
    pub precision: Vec<Precision>,
    /// Activation recomputation policies to time, comma-separated: none, selective, full.
    #[arg(long, default_value = "none", value_delimiter = ',', value_parser = parse_recompute)]
    pub recompute: Vec<Recompute>,
    /// Run bf16 matmuls on f32 panels even where the CPU has AMX or AVX512_BF16 (to compare).
    #[arg(long)]
    pub no_amx: bool,
}

fn parse_precision(s: &str) -> Result<Precision, String> {
    Precision::parse(s).map_err(|e| e.to_string())
}

fn parse_recompute(s: &str) -> Result<Recompute, String> {
    Recompute::parse(s).map_err(|e| e.to_string())
}

/// The estimator's name of a precision.
fn precision_name(p: Precision) -> &'static str {
    match p {
        Precision::Fp32 => "fp32",
        Precision::Bf16Mixed => "bf16-mixed",
        Precision::Fp16Mixed => "fp16-mixed",
    }
}

/// The estimator's name of a recomputation policy.
fn recompute_name(r: Recompute) -> &'static str {
    match r {
        Recompute::None => "none",
        Recompute::Selective => "selective",
        Recompute::Full => "full",
    }
}

/// Static loss scale of the fp16 variant (a benchmark runs a dozen steps; the trainer's scale is
/// dynamic). 2^12 keeps the per-token gradients above fp16's subnormals.
const FP16_LOSS_SCALE: f32 = 4096.0;

/// One variant's model state: fp32 master weights and AdamW; weights, gradients and
/// activations in `E`.
struct Mixed<E: Elem> {
    master: Vec<f32>,
    working: Vec<E>,
    grads: Vec<E>,
    opt: AdamW,
    acts: Activations<E>,
    loss_scale: f32,
}

impl<E: Elem> Mixed<E> {
    fn new(layout: &ParamLayout, b: usize, t: usize, r: Recompute, loss_scale: f32) -> Self {
        let master = layout.init_params(1337);
        Mixed {
            working: master.iter().map(|&x| E::from_f32(x)).collect(),
            master,
            grads: vec![E::default(); layout.len()],
            opt: AdamW::new(layout),
            acts: Activations::with(layout, b, t, r),
            loss_scale,
        }
    }

    /// One step; returns the loss and the forward/backward/optimizer end times.
    fn step(&mut self, s: &Step<'_>) -> anyhow::Result<(f32, [Instant; 3])> {
        self.grads.fill(E::default());
        let Activations { saved, scratch } = &mut self.acts;
        let x = StageInput::Tokens(s.tokens);
        let loss = forward_with(
            s.layout,
            &self.working,
            saved,
            scratch,
            x,
            Some(s.targets),
            s.par,
            &mut NoTp,
        )?;
        let t1 = Instant::now();
        let gi = GradInput::Loss {
            targets: s.targets,
            d_loss: s.d_loss * self.loss_scale,
        };
        backward_with(
            s.layout,
            &self.working,
            &mut self.grads[..],
            saved,
            scratch,
            x,
            gi,
            s.par,
            &mut NoTp,
        )?;
        let t2 = Instant::now();
        let scale = 1.0 / self.loss_scale;
        self.opt.step_mixed(
            s.layout,
            &mut self.master,
            &mut self.working,
            &self.grads,
            scale,
            s.opt_cfg,
            s.par,
        );
        Ok((loss.unwrap_or(f32::NAN), [t1, t2, Instant::now()]))
    }
}

/// The plain fp32 runtime (what `scaletrain train` runs): params, grads, AdamW, activations.
struct Fp32 {
    params: Vec<f32>,
    grads: Vec<f32>,
    opt: AdamW,
    acts: Activations,
}

/// What every variant's step shares.
struct Step<'a> {
    layout: &'a ParamLayout,
    tokens: &'a [u32],
    targets: &'a [u32],
    d_loss: f32,
    par: Par,
    opt_cfg: &'a AdamWConfig,
}

/// One timed configuration.
enum Variant {
    Fp32(Box<Fp32>),
    Fp32Recompute(Box<Mixed<f32>>),
    Bf16(Box<Mixed<Bf16>>),
    F16(Box<Mixed<F16>>),
}

impl Variant {
    fn new(layout: &ParamLayout, b: usize, t: usize, p: Precision, r: Recompute) -> Variant {
        match (p, r) {
            (Precision::Fp32, Recompute::None) => Variant::Fp32(Box::new(Fp32 {
                params: layout.init_params(1337),
                grads: vec![0.0f32; layout.len()],
                opt: AdamW::new(layout),
                acts: Activations::new(layout, b, t),
            })),
            (Precision::Fp32, r) => {
                Variant::Fp32Recompute(Box::new(Mixed::new(layout, b, t, r, 1.0)))
            }
            (Precision::Bf16Mixed, r) => Variant::Bf16(Box::new(Mixed::new(layout, b, t, r, 1.0))),
            (Precision::Fp16Mixed, r) => {
                Variant::F16(Box::new(Mixed::new(layout, b, t, r, FP16_LOSS_SCALE)))
            }
        }
    }

    fn step(&mut self, s: &Step<'_>) -> anyhow::Result<(f32, [Instant; 3])> {
        match self {
            Variant::Fp32(v) => {
                v.grads.fill(0.0);
                let x = StageInput::Tokens(s.tokens);
                let loss = forward(
                    s.layout,
                    &v.params,
                    &mut v.acts,
                    x,
                    Some(s.targets),
                    s.par,
                    &mut NoTp,
                )?;
                let t1 = Instant::now();
                let gi = GradInput::Loss {
                    targets: s.targets,
                    d_loss: s.d_loss,
                };
                backward(
                    s.layout,
                    &v.params,
                    &mut v.grads,
                    &mut v.acts,
                    x,
                    gi,
                    s.par,
                    &mut NoTp,
                )?;
                let t2 = Instant::now();
                v.opt
                    .step(s.layout, &mut v.params, &mut v.grads, s.opt_cfg, s.par);
                Ok((loss.unwrap_or(f32::NAN), [t1, t2, Instant::now()]))
            }
            Variant::Fp32Recompute(v) => v.step(s),
            Variant::Bf16(v) => v.step(s),
            Variant::F16(v) => v.step(s),
        }
    }
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
    let opt_cfg = AdamWConfig::default();
    let mut rng = Rng::new(7);
    let tokens: Vec<u32> = (0..b * t)
        .map(|_| rng.below(args.vocab as u64) as u32)
        .collect();
    let targets: Vec<u32> = (0..b * t)
        .map(|_| rng.below(args.vocab as u64) as u32)
        .collect();
    let d_loss = 1.0 / (b * t) as f32;
    let combos: Vec<(Precision, Recompute)> = args
        .precision
        .iter()
        .flat_map(|&p| args.recompute.iter().map(move |&r| (p, r)))
        .collect();
    if combos.is_empty() {
        bail!("--precision and --recompute need at least one value each");
    }
    let mut variants: Vec<Variant> = combos
        .iter()
        .map(|&(p, r)| Variant::new(&layout, b, t, p, r))
        .collect();
    let step_args = Step {
        layout: &layout,
        tokens: &tokens,
        targets: &targets,
        d_loss,
        par,
        opt_cfg: &opt_cfg,
    };

    if args.no_amx {
        kernels::matmul::set_amx(false);
        kernels::matmul::set_avx512_bf16(false);
    }
    let bf16_matmul = kernels::matmul::bf16_matmul_kind();
    let mm_gflops = matmul_gflops(&cfg, b, t, par);
    // rounds[i][v]: variant v's median phases in round i; torch[i]: the peer's round.
    let mut rounds: Vec<Vec<[f64; 4]>> = Vec::new();
    let mut torch_rounds: Vec<Option<serde_json::Value>> = Vec::new();
    let mut last_loss = vec![f32::NAN; variants.len()];
    for _ in 0..args.rounds.max(1) {
        let mut this_round = Vec::new();
        for (v, variant) in variants.iter_mut().enumerate() {
            let (mut step_secs, mut fwd_secs, mut bwd_secs, mut opt_secs) =
                (vec![], vec![], vec![], vec![]);
            for i in 0..args.warmup + args.steps {
                let t0 = Instant::now();
                let (loss, [t1, t2, t3]) = variant.step(&step_args)?;
                last_loss[v] = loss;
                if i >= args.warmup {
                    step_secs.push((t3 - t0).as_secs_f64());
                    fwd_secs.push((t1 - t0).as_secs_f64());
                    bwd_secs.push((t2 - t1).as_secs_f64());
                    opt_secs.push((t3 - t2).as_secs_f64());
                }
            }
            this_round.push([
                median(&mut step_secs),
                median(&mut fwd_secs),
                median(&mut bwd_secs),
                median(&mut opt_secs),
            ]);
        }
        rounds.push(this_round);
        torch_rounds.push(match &args.torch {
            Some(python) => Some(run_torch(python, args)?),
            None => None,
        });
    }
    let dims = layout.shard.dims(&cfg);
    let variant_reports: Vec<serde_json::Value> = combos
        .iter()
        .enumerate()
        .map(|(v, &(p, r))| {
            let mut steps: Vec<f64> = rounds.iter().map(|x| x[v][0]).collect();
            let step = median(&mut steps);
            let mut ratios: Vec<f64> = rounds.iter().map(|x| x[0][0] / x[v][0]).collect();
            let mem = plan::cpu_runtime::memory_with(&dims, b as u64, t as u64, p, r);
            serde_json::json!({
                "precision": precision_name(p),
                "recompute": recompute_name(r),
                "tokens_per_sec": (b * t) as f64 / step,
                "step_secs": step,
                "rounds_tokens_per_sec": rounds.iter().map(|x| (b * t) as f64 / x[v][0]).collect::<Vec<_>>(),
                "ratio_vs_first": median(&mut ratios),
                "final_loss": last_loss[v],
                "activation_bytes": mem.activation_bytes,
                "state_bytes": mem.param_bytes + mem.grad_bytes + mem.optimizer_bytes,
                "loss_scale": if p == Precision::Fp16Mixed { FP16_LOSS_SCALE } else { 1.0 },
            })
        })
        .collect();
    // The first variant is the headline (fp32 by default), as before.
    let rounds: Vec<([f64; 4], Option<serde_json::Value>)> = rounds
        .iter()
        .zip(torch_rounds)
        .map(|(r, tv)| (r[0], tv))
        .collect();
    let last_loss = last_loss[0];
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
        "variants": variant_reports,
        "bf16_matmul": bf16_matmul,
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
        if variant_reports.len() > 1 {
            println!(
                "variants, each round back to back (ratio: median of per-round ratios to the first; bf16 matmuls on {bf16_matmul}):"
            );
            for v in &variant_reports {
                println!(
                    "  {:>10} recompute {:>9}: {:>7.0} tokens/s, ratio {:.3}, activations {:.1} MiB, weights+grads+AdamW {:.1} MiB, final loss {:.4}",
                    v["precision"].as_str().unwrap_or("?"),
                    v["recompute"].as_str().unwrap_or("?"),
                    v["tokens_per_sec"].as_f64().unwrap_or(0.0),
                    v["ratio_vs_first"].as_f64().unwrap_or(0.0),
                    v["activation_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                    v["state_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                    v["final_loss"].as_f64().unwrap_or(f64::NAN),
                );
            }
        }
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
