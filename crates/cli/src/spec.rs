//! The flags shared by `estimate` and `plan`, the TOML file that may set any of them, and the
//! step from raw input (`SpecArgs`) to checked specs (`Question`): model, cluster, recipe and
//! layout request. All parse errors name the flag or key and the fix.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use clap::Args;
use plan::hardware::{gpu_preset, validate_gpu, ClusterSpec, GpuSpec};
use plan::layout::LayoutRequest;
use plan::model::ModelSpec;
use plan::recipe::{
    CausalFlops, GradSync, Optimizer, Precision, Recipe, Recompute, Schedule, StateBytes,
};
use plan::units::{parse_count, parse_int};
use plan::{Calibration, Context};
use serde::Deserialize;

/// Model, recipe, layout and hardware flags (every one may also be set in `--config FILE`).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SpecArgs {
    /// TOML file setting any of these flags (keys are the flag names, e.g. `micro-batch = 2`);
    /// command-line flags override it.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    // ---- model ----
    /// Model preset (see `scaletrain presets`), e.g. llama3-8b, gpt3-175b, megatron-1t.
    #[arg(long, help_heading = "Model")]
    pub model: Option<String>,
    /// Target parameter count (e.g. 10B): picks a standard GPT shape and prints it.
    #[arg(long, help_heading = "Model", allow_hyphen_values = true)]
    pub params: Option<String>,
    /// Hugging Face config.json (gpt2, llama, mistral, qwen2).
    #[arg(long, value_name = "FILE", help_heading = "Model")]
    pub hf_config: Option<PathBuf>,
    /// Transformer layers (overrides the preset).
    #[arg(long, help_heading = "Model")]
    pub layers: Option<u64>,
    /// Hidden size.
    #[arg(long, help_heading = "Model")]
    pub hidden: Option<u64>,
    /// Attention heads.
    #[arg(long, help_heading = "Model")]
    pub heads: Option<u64>,
    /// Key/value heads (GQA); default = heads.
    #[arg(long, help_heading = "Model")]
    pub kv_heads: Option<u64>,
    /// MLP hidden size; default 4 x hidden.
    #[arg(long, help_heading = "Model")]
    pub ffn_hidden: Option<u64>,
    /// Vocabulary size.
    #[arg(long, help_heading = "Model")]
    pub vocab: Option<u64>,
    /// Sequence length.
    #[arg(long, help_heading = "Model")]
    pub seq_len: Option<u64>,
    /// Tie the LM head to the embedding (true/false).
    #[arg(long, help_heading = "Model")]
    pub tied_embeddings: Option<bool>,
    /// MLP form: gelu or gated (SwiGLU).
    #[arg(long, help_heading = "Model")]
    pub mlp: Option<String>,
    /// Norm: layernorm or rmsnorm.
    #[arg(long, help_heading = "Model")]
    pub norm: Option<String>,
    /// Mixture of experts: routed experts per MoE layer (with --top-k and --expert-ffn).
    #[arg(long, help_heading = "Model")]
    pub experts: Option<u64>,
    /// Routed experts each token uses (default 2 with --experts).
    #[arg(long, help_heading = "Model")]
    pub top_k: Option<u64>,
    /// FFN width of one routed expert (default: --ffn-hidden).
    #[arg(long, help_heading = "Model")]
    pub expert_ffn: Option<u64>,
    /// Total FFN width of the shared (always active) experts (default 0).
    #[arg(long, help_heading = "Model")]
    pub shared_expert_ffn: Option<u64>,
    /// Expert capacity factor (tokens beyond it are dropped, below it padded); default dropless.
    #[arg(long, help_heading = "Model")]
    pub capacity_factor: Option<f64>,
    /// Leading layers that keep a dense MLP (DeepSeek's first_k_dense_replace; default 0).
    #[arg(long, help_heading = "Model")]
    pub dense_layers: Option<u64>,

    // ---- recipe ----
    /// Training tokens (e.g. 300B). Default: 20 tokens per parameter (Hoffmann et al. 2022).
    #[arg(long, help_heading = "Recipe", allow_hyphen_values = true)]
    pub tokens: Option<String>,
    /// Global batch in sequences (e.g. 1024), or in tokens with a `tok` suffix (e.g. 4Mtok; K/M
    /// are decimal when that gives whole sequences, else powers of two as in papers: 4Mtok = 2^22).
    /// Default 1024 sequences.
    #[arg(long, help_heading = "Recipe", allow_hyphen_values = true)]
    pub global_batch: Option<String>,
    /// Sequences per micro-batch (default 1 for estimate; searched by plan).
    #[arg(long, help_heading = "Recipe")]
    pub micro_batch: Option<u64>,
    /// fp32, bf16-mixed (default), fp16-mixed, or FP8 linears inside bf16-mixed (Transformer
    /// Engine): fp8 (= fp8-delayed), fp8-current, mxfp8.
    #[arg(long, help_heading = "Recipe")]
    pub precision: Option<String>,
    /// adamw (default), sgd, sgd-momentum, adafactor.
    #[arg(long, help_heading = "Recipe")]
    pub optimizer: Option<String>,
    /// Activation recompute: none (default for estimate), selective, full.
    #[arg(long, help_heading = "Recipe")]
    pub recompute: Option<String>,
    /// Fused (flash) attention: true (default) or false.
    #[arg(long, help_heading = "Recipe")]
    pub flash_attention: Option<bool>,
    /// Dropout masks in activations: false (default) or true.
    #[arg(long, help_heading = "Recipe")]
    pub dropout: Option<bool>,
    /// Causal attention FLOPs: full (default, Megatron/PaLM convention) or half.
    #[arg(long, help_heading = "Recipe")]
    pub causal_flops: Option<String>,
    /// Bytes per weight (default 2 mixed, 4 fp32).
    #[arg(long, help_heading = "Recipe")]
    pub weight_bytes: Option<f64>,
    /// Bytes per gradient (default 2 mixed = ZeRO's 16 B/param; 4 = Megatron's 18 B/param).
    #[arg(long, help_heading = "Recipe")]
    pub grad_bytes: Option<f64>,
    /// Bytes per fp32 master weight (default 4 mixed, 0 fp32).
    #[arg(long, help_heading = "Recipe")]
    pub master_bytes: Option<f64>,
    /// Optimizer-state bytes per parameter (default by optimizer: adamw 8, sgd-momentum 4, sgd 0).
    #[arg(long, help_heading = "Recipe")]
    pub optimizer_bytes: Option<f64>,
    /// Data-parallel gradient sync: ring (default), tree, ps.
    #[arg(long, help_heading = "Recipe")]
    pub grad_sync: Option<String>,
    /// Parameter servers for --grad-sync ps (default 1).
    #[arg(long, help_heading = "Recipe")]
    pub ps_servers: Option<u64>,
    /// Do not overlap gradient sync with backward.
    #[arg(long, help_heading = "Recipe")]
    #[serde(default)]
    pub no_overlap: bool,
    /// ZeRO-3: keep the gathered weights across micro-batches (one gather per step, full weights
    /// resident) instead of gathering them for the forward and backward of every micro-batch.
    #[arg(long, help_heading = "Recipe")]
    #[serde(default)]
    pub zero3_keep_weights: bool,
    /// Overlap tensor-parallel collectives with the GEMMs they feed (Transformer Engine
    /// userbuffers, Megatron --tp-comm-overlap).
    #[arg(long, help_heading = "Recipe")]
    #[serde(default)]
    pub tp_comm_overlap: bool,
    /// Overlap the expert-parallel all-to-alls with another micro-batch's compute (Megatron-Core
    /// --overlap-moe-expert-parallel-comm); only what the layer's compute cannot cover is exposed.
    #[arg(long, help_heading = "Recipe")]
    #[serde(default)]
    pub ep_comm_overlap: bool,
    /// ZeRO-1/2: overlap the all-gather of updated weights with the next forward (Megatron
    /// --overlap-param-gather).
    #[arg(long, help_heading = "Recipe")]
    #[serde(default)]
    pub overlap_param_gather: bool,
    /// Keep model states off the GPU: none (default), optimizer (ZeRO-Offload: master weights,
    /// moments, gradients; CPU-Adam), params (ZeRO-Infinity: 16-bit parameter shards, needs
    /// --zero 3), both; `plan` also takes auto (searches none, optimizer, both).
    #[arg(long, help_heading = "Recipe")]
    pub offload: Option<String>,
    /// Where offloaded states live: cpu (default) or nvme.
    #[arg(long, help_heading = "Recipe")]
    pub offload_device: Option<String>,
    /// Fraction of device memory to keep free (default 0): layouts must fit in (1 − margin) of it.
    #[arg(long, help_heading = "Recipe")]
    pub memory_margin: Option<f64>,
    /// Mean hours between failures of one GPU (default 50,700: Llama 3's 419 unexpected
    /// interruptions in 54 days on 16,384 H100s).
    #[arg(long, help_heading = "Failures")]
    pub gpu_mtbf_hours: Option<f64>,
    /// Checkpoint write bandwidth per node, GB/s (default 1).
    #[arg(long, help_heading = "Failures")]
    pub checkpoint_gbps: Option<f64>,
    /// Minutes from a failure to training again (default 10).
    #[arg(long, help_heading = "Failures")]
    pub restart_minutes: Option<f64>,
    /// Training stack profile: megatron (tensor-parallel and weight-gather overlap on), fsdp or
    /// deepspeed (neither; ZeRO-3 re-gathers every micro-batch). Efficiency stays 1.0 unless
    /// --efficiency or --calibration says otherwise.
    #[arg(long, help_heading = "Recipe")]
    pub stack: Option<String>,
    /// Your stack's matmul efficiency relative to Megatron-LM's (the fit of docs/validation.md):
    /// 0.8 = 80% of it. Overrides --calibration's fitted value.
    #[arg(long, help_heading = "Recipe")]
    pub efficiency: Option<f64>,
    /// Calibration file written by `scaletrain calibrate` (efficiency and a 90% prediction
    /// interval for the step time).
    #[arg(long, value_name = "FILE", help_heading = "Recipe")]
    pub calibration: Option<PathBuf>,
    /// Pipeline schedule: 1f1b (default) or gpipe.
    #[arg(long, help_heading = "Recipe")]
    pub schedule: Option<String>,

    // ---- layout ----
    /// Data-parallel degree (default: inferred from --gpus).
    #[arg(long, help_heading = "Layout")]
    pub dp: Option<u64>,
    /// Tensor-parallel degree (default 1).
    #[arg(long, help_heading = "Layout")]
    pub tp: Option<u64>,
    /// Pipeline-parallel degree (default 1).
    #[arg(long, help_heading = "Layout")]
    pub pp: Option<u64>,
    /// Context-parallel degree (default 1): each sequence split across cp ranks (ring attention).
    #[arg(long, help_heading = "Layout")]
    pub cp: Option<u64>,
    /// Expert-parallel degree for MoE models (default 1): divides the experts and tp x cp x dp.
    #[arg(long, help_heading = "Layout")]
    pub ep: Option<u64>,
    /// Virtual pipeline stages per device (default 1).
    #[arg(long, help_heading = "Layout")]
    pub vpp: Option<u64>,
    /// Sequence parallelism (needs --tp > 1).
    #[arg(long, help_heading = "Layout")]
    #[serde(default)]
    pub sequence_parallel: bool,
    /// ZeRO stage 0-3 (default 0).
    #[arg(long, help_heading = "Layout")]
    pub zero: Option<u8>,
    /// Gradient-accumulation steps (default: global batch / (dp x micro-batch)).
    #[arg(long, help_heading = "Layout")]
    pub grad_accum: Option<u64>,
    /// Layers per pipeline stage, e.g. 3,5 (pp x vpp entries; default: balanced from the
    /// predicted stage times, counting the embedding and the LM head).
    #[arg(long, value_name = "LIST", help_heading = "Layout")]
    pub pp_layers: Option<String>,

    // ---- hardware ----
    /// GPU preset: a100-40gb, a100-80gb, h100-sxm (default), h200, b200, mi300x.
    #[arg(long, help_heading = "Hardware")]
    pub gpu: Option<String>,
    /// TOML file describing a custom GPU (fields of `scaletrain presets --gpu h100-sxm --toml`).
    #[arg(long, value_name = "FILE", help_heading = "Hardware")]
    pub gpu_file: Option<PathBuf>,
    /// Number of GPUs (default 64).
    #[arg(long, help_heading = "Hardware")]
    pub gpus: Option<u64>,
    /// GPUs per node (default 8).
    #[arg(long, help_heading = "Hardware")]
    pub gpus_per_node: Option<u64>,
    /// USD per GPU-hour (default: the preset's assumed cloud rate).
    #[arg(long, help_heading = "Hardware")]
    pub price_per_gpu_hour: Option<f64>,
}

macro_rules! take {
    ($cli:ident, $file:ident, $($f:ident),*) => { $( if $cli.$f.is_none() { $cli.$f = $file.$f.clone(); } )* };
}

impl SpecArgs {
    /// Merges `--config FILE` under the command-line flags.
    pub fn with_config_file(mut self) -> Result<Self> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let file: SpecArgs = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "config file {}: {e}keys are the flag names without the leading dashes, e.g. `micro-batch = 2`, `model = \"llama3-8b\"`",
                path.display()
            )
        })?;
        take!(
            self,
            file,
            model,
            params,
            hf_config,
            layers,
            hidden,
            heads,
            kv_heads,
            ffn_hidden,
            vocab,
            seq_len,
            tied_embeddings,
            mlp,
            norm,
            experts,
            top_k,
            expert_ffn,
            shared_expert_ffn,
            capacity_factor,
            dense_layers,
            tokens,
            global_batch,
            micro_batch,
            precision,
            optimizer,
            recompute,
            flash_attention,
            dropout,
            causal_flops,
            weight_bytes,
            grad_bytes,
            master_bytes,
            optimizer_bytes,
            grad_sync,
            ps_servers,
            schedule,
            dp,
            tp,
            pp,
            cp,
            ep,
            vpp,
            zero,
            grad_accum,
            pp_layers,
            efficiency,
            stack,
            calibration,
            memory_margin,
            offload,
            offload_device,
            gpu_mtbf_hours,
            checkpoint_gbps,
            restart_minutes,
            gpu,
            gpu_file,
            gpus,
            gpus_per_node,
            price_per_gpu_hour
        );
        self.no_overlap |= file.no_overlap;
        self.zero3_keep_weights |= file.zero3_keep_weights;
        self.sequence_parallel |= file.sequence_parallel;
        self.tp_comm_overlap |= file.tp_comm_overlap;
        self.ep_comm_overlap |= file.ep_comm_overlap;
        self.overlap_param_gather |= file.overlap_param_gather;
        Ok(self)
    }

    /// The calibration file, read and checked, when `--calibration` is given.
    pub fn calibration_file(&self) -> Result<Option<plan::calibrate::CalibrationFile>> {
        let Some(path) = &self.calibration else {
            return Ok(None);
        };
        let text = read_text(path, "--calibration")?;
        let f: plan::calibrate::CalibrationFile = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "--calibration {}: {e}; write the file with `scaletrain calibrate`",
                path.display()
            )
        })?;
        f.validate()
            .with_context(|| format!("--calibration {}", path.display()))?;
        Ok(Some(f))
    }

    /// The efficiency multiplier in force: `--efficiency`, else the calibration file's.
    pub fn efficiency_used(&self) -> Result<Option<f64>> {
        if let Some(e) = self.efficiency {
            plan::calibrate::check_efficiency(e)?;
            return Ok(Some(e));
        }
        Ok(self.calibration_file()?.map(|f| f.efficiency))
    }

    /// True when the user set any layout flag.
    pub fn has_layout(&self) -> bool {
        self.dp.is_some()
            || self.tp.is_some()
            || self.cp.is_some()
            || self.ep.is_some()
            || self.pp.is_some()
            || self.vpp.is_some()
            || self.sequence_parallel
            || self.zero.is_some()
            || self.micro_batch.is_some()
            || self.grad_accum.is_some()
            || self.pp_layers.is_some()
    }

    /// The GPU: preset or TOML file.
    pub fn gpu(&self) -> Result<GpuSpec> {
        match (&self.gpu, &self.gpu_file) {
            (Some(_), Some(_)) => bail!("give either --gpu or --gpu-file, not both"),
            (_, Some(path)) => {
                let text = read_text(path, "--gpu-file")?;
                let g: GpuSpec = toml::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("--gpu-file {}: {e}", path.display()))?;
                validate_gpu(&g).with_context(|| format!("--gpu-file {}", path.display()))?;
                Ok(g)
            }
            (Some(name), None) => Ok(gpu_preset(name)?),
            (None, None) => Ok(gpu_preset("h100-sxm")?),
        }
    }

    /// The recipe with defaults and overrides.
    pub fn recipe(&self, m: &ModelSpec) -> Result<Recipe> {
        let (precision, fp8) = self
            .precision
            .as_deref()
            .map(plan::recipe::parse_precision)
            .transpose()?
            .unwrap_or((Precision::Bf16Mixed, None));
        let optimizer = self
            .optimizer
            .as_deref()
            .map(Optimizer::parse)
            .transpose()?
            .unwrap_or(Optimizer::Adamw);
        let tokens = match &self.tokens {
            Some(t) => parse_count("--tokens", t)?,
            None => 20.0 * m.params().total as f64,
        };
        let global_batch = match &self.global_batch {
            None => 1024,
            Some(g) => {
                let lower = g.trim().to_ascii_lowercase();
                if let Some(num) = lower
                    .strip_suffix("tokens")
                    .or_else(|| lower.strip_suffix("tok"))
                {
                    token_batch(g, num, m.seq_len)?
                } else {
                    parse_int("--global-batch", g)?
                }
            }
        };
        let mut r = Recipe::new(tokens, global_batch, precision, optimizer);
        if optimizer == Optimizer::Adafactor {
            // Factored second moment: rows + columns per matrix, fp32 (Shazeer & Stern 2018).
            let (h, f, l) = (m.hidden as f64, m.ffn_hidden as f64, m.layers as f64);
            let per_layer = 4.0
                * ((h + h + 2.0 * m.kv_dim() as f64) + (h + h) + m.mlp_matrices() as f64 * (h + f));
            let emb = 4.0 * (m.vocab as f64 + h);
            r.state_bytes = StateBytes::defaults(
                precision,
                optimizer,
                (l * per_layer + emb) / m.params().total as f64,
            );
        }
        if let Some(v) = self.weight_bytes {
            r.state_bytes.weight = v;
        }
        if let Some(v) = self.grad_bytes {
            r.state_bytes.grad = v;
        }
        if let Some(v) = self.master_bytes {
            r.state_bytes.master = v;
        }
        if let Some(v) = self.optimizer_bytes {
            r.state_bytes.optimizer = v;
        }
        r.grad_comm_bytes = r.state_bytes.grad;
        if let Some(v) = &self.recompute {
            r.recompute = Recompute::parse(v)?;
        }
        if let Some(v) = self.flash_attention {
            r.flash_attention = v;
        }
        if let Some(v) = self.dropout {
            r.dropout = v;
        }
        if let Some(v) = &self.causal_flops {
            r.causal_flops = match v.as_str() {
                "full" => CausalFlops::Full,
                "half" => CausalFlops::Half,
                _ => bail!("--causal-flops '{v}' is not one of full, half"),
            };
        }
        if let Some(v) = &self.grad_sync {
            r.grad_sync = GradSync::parse(v)?;
        }
        if let Some(v) = self.ps_servers {
            r.ps_servers = v;
        }
        if let Some(v) = &self.schedule {
            r.schedule = Schedule::parse(v)?;
        }
        r.overlap_grad_reduce = !self.no_overlap;
        r.zero3_keep_weights = self.zero3_keep_weights;
        r.fp8 = fp8;
        if let Some(m) = self.memory_margin {
            r.memory_margin = m;
        }
        if let Some(h) = self.gpu_mtbf_hours {
            if !(h.is_finite() && h > 0.0) {
                bail!("--gpu-mtbf-hours {h} must be a positive number of hours");
            }
            r.failures.failures_per_gpu_hour = 1.0 / h;
        }
        if let Some(g) = self.checkpoint_gbps {
            r.failures.checkpoint_bw_per_node = g * 1e9;
        }
        if let Some(m) = self.restart_minutes {
            r.failures.restart_secs = m * 60.0;
        }
        r.offload = match self.offload.as_deref() {
            // `plan --offload auto` searches; as a recipe it starts from none.
            Some(a) if a.trim().eq_ignore_ascii_case("auto") => {
                plan::recipe::Offload::parse("none", self.offload_device.as_deref())?
            }
            Some(o) => plan::recipe::Offload::parse(o, self.offload_device.as_deref())?,
            None if self.offload_device.is_some() => {
                bail!("--offload-device says where offloaded states go; add --offload optimizer|params|both")
            }
            None => plan::recipe::Offload::default(),
        };
        r.tp_comm_overlap = self.tp_comm_overlap;
        r.ep_comm_overlap = self.ep_comm_overlap;
        r.overlap_param_gather = self.overlap_param_gather;
        match self.stack.as_deref().map(|s| s.trim().to_ascii_lowercase()) {
            None => {}
            Some(s) if s == "megatron" => {
                r.tp_comm_overlap = true;
                r.overlap_param_gather = true;
            }
            Some(s) if s == "fsdp" || s == "deepspeed" => {}
            Some(s) => bail!("--stack '{s}' is not one of megatron, fsdp, deepspeed"),
        }
        r.validate()?;
        Ok(r)
    }

    /// The requested layout (unset degrees inferred later).
    pub fn layout_request(&self) -> Result<LayoutRequest> {
        let pp_layers = match &self.pp_layers {
            Some(text) => {
                let counts = plan::partition::parse(text)?;
                Some(plan::StageLayers::from_counts(&counts)?)
            }
            None => None,
        };
        Ok(LayoutRequest {
            dp: self.dp,
            tp: self.tp,
            pp: self.pp,
            cp: self.cp,
            ep: self.ep,
            vpp: self.vpp,
            sp: self.sequence_parallel,
            zero: self.zero,
            micro_batch: self.micro_batch,
            grad_accum: self.grad_accum,
            pp_layers,
        })
    }

    /// Everything checked, for a cluster of `gpus` GPUs.
    pub fn context(&self, gpus: u64) -> Result<(Context, Option<String>)> {
        let (m, note) = self.model()?;
        let recipe = self.recipe(&m)?;
        let gpu = self.gpu()?;
        if recipe.fp8.is_some() && gpu.peak_fp8_flops <= 0.0 {
            bail!(
                "--precision {}: {} has no FP8 tensor cores (peak_fp8_flops = 0); use bf16-mixed, or a GPU with FP8 (h100-sxm, h200, b200, gb200, mi300x)",
                self.precision.as_deref().unwrap_or("fp8"),
                gpu.name
            );
        }
        let cluster = ClusterSpec::new(gpu, gpus, self.gpus_per_node, self.price_per_gpu_hour)?;
        let mut calib = Calibration::default();
        if let Some(eff) = self.efficiency_used()? {
            calib.matmul_eff *= eff;
        }
        Ok((
            Context {
                model: m,
                cluster,
                recipe,
                calib,
            },
            note,
        ))
    }
}

/// A global batch given in tokens (`4Mtok`): decimal suffixes when that is a whole number of
/// sequences, else binary ones (K = 2^10, M = 2^20: papers' "4M tokens" batches are 2^22 =
/// 2048 sequences of 2048), else an error naming the nearest whole batches.
fn token_batch(given: &str, num: &str, seq_len: u64) -> Result<u64> {
    let decimal = plan::units::parse_count("--global-batch", num)?;
    let t = num.trim();
    let binary_mult = match t.chars().last() {
        Some('k' | 'K') => Some(1024.0),
        Some('m' | 'M') => Some(1024.0 * 1024.0),
        Some('b' | 'B' | 'g' | 'G') => Some(1024.0 * 1024.0 * 1024.0),
        _ => None,
    };
    let whole = |toks: f64| -> Option<u64> {
        (toks.fract() == 0.0 && toks < 9.0e18 && (toks as u64).is_multiple_of(seq_len))
            .then(|| toks as u64 / seq_len)
    };
    if let Some(n) = whole(decimal) {
        return Ok(n);
    }
    let binary = binary_mult.and_then(|mult| {
        let v: f64 = t[..t.len() - 1].trim().parse().ok()?;
        Some(v * mult)
    });
    if let Some(n) = binary.and_then(whole) {
        return Ok(n);
    }
    let near = (decimal / seq_len as f64).round().max(1.0) as u64;
    bail!(
        "--global-batch {given}: {decimal:.0} tokens{} is not a whole number of {seq_len}-token sequences; use e.g. --global-batch {near} ({} tokens)",
        binary.map_or(String::new(), |b| format!(" (or {b:.0} reading the suffix as a power of two)")),
        near * seq_len
    )
}

/// Reads a small text file, naming the flag on failure.
pub fn read_text(path: &Path, flag: &str) -> Result<String> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("{flag} {}: cannot open", path.display()))?;
    if meta.len() > 16 << 20 {
        bail!(
            "{flag} {}: {} bytes is too large for a config file",
            path.display(),
            meta.len()
        );
    }
    std::fs::read_to_string(path)
        .with_context(|| format!("{flag} {}: cannot read as UTF-8 text", path.display()))
}
