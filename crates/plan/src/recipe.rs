//! The training recipe: tokens, batch, precision and the bytes of every state, optimizer,
//! activation recompute, attention kernel.
//!
//! Bytes per parameter are explicit because published tools disagree: the ZeRO paper counts
//! 2 (fp16 weights) + 2 (fp16 gradients) + 12 (fp32 master, momentum, variance) = 16 B/param
//! (Rajbhandari et al. 2019, Section 3.1, K = 12); Megatron-LM keeps fp32 gradient buffers, so
//! 2 + 4 + 12 = 18 B/param (Korthikanti et al. 2022 text; `--grad-bytes 4`). Our default is 16.

use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};

/// Numeric precision of training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// Everything in fp32: 4-byte weights, gradients, activations; no master copy.
    Fp32,
    /// bf16 compute and activations, fp32 master weights and optimizer states.
    Bf16Mixed,
    /// fp16 compute with loss scaling; same bytes as bf16-mixed.
    Fp16Mixed,
}

impl Precision {
    /// Parses `fp32`, `bf16-mixed`, `fp16-mixed`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fp32" => Ok(Self::Fp32),
            "bf16-mixed" | "bf16" => Ok(Self::Bf16Mixed),
            "fp16-mixed" | "fp16" => Ok(Self::Fp16Mixed),
            _ => Err(invalid(
                "--precision",
                format!("'{s}' is not one of fp32, bf16-mixed, fp16-mixed"),
            )),
        }
    }
    /// Bytes of one activation / compute element.
    pub fn compute_bytes(self) -> f64 {
        match self {
            Self::Fp32 => 4.0,
            _ => 2.0,
        }
    }
}

/// FP8 training on top of bf16 mixed precision, as NVIDIA Transformer Engine does it: the
/// inputs and weights of every linear layer (QKV, attention output, MLP) are cast to FP8 (E4M3
/// forward, E5M2 gradients) and multiplied on the FP8 tensor cores; the attention core,
/// norms, softmax, embedding, LM head, gradients, master weights and optimizer stay as in
/// bf16-mixed. The FP8 copy of each linear's input is what backward keeps (1 B/element). Each
/// FP8 tensor carries a scale: delayed scaling keeps an amax history (1,024 fp32 values per
/// tensor by default), current scaling computes the amax of the tensor itself (one extra read
/// of the bf16 tensor), MXFP8 (Blackwell) stores one 8-bit scale per 32 elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fp8 {
    /// Per-tensor scales from the amax history of earlier steps (TE `DelayedScaling`).
    Delayed,
    /// Per-tensor scales from the current tensor's amax (TE `Float8CurrentScaling`).
    Current,
    /// Block scales, one E8M0 scale per 32 elements (OCP MX, TE `MXFP8BlockScaling`).
    Mx,
}

impl Fp8 {
    /// Extra bytes read per cast element beyond the bf16 read and the FP8 write: current
    /// scaling reads the tensor once more for its amax; MX writes one scale byte per 32.
    pub fn extra_cast_bytes(self) -> f64 {
        match self {
            Fp8::Delayed => 0.0,
            Fp8::Current => 2.0,
            Fp8::Mx => 1.0 / 32.0,
        }
    }
}

/// Parses a `--precision` value: `fp8` / `fp8-delayed`, `fp8-current`, `mxfp8` give bf16-mixed
/// with FP8 linears; anything else goes to [`Precision::parse`].
pub fn parse_precision(s: &str) -> Result<(Precision, Option<Fp8>)> {
    match s.trim().to_ascii_lowercase().as_str() {
        "fp8" | "fp8-delayed" => Ok((Precision::Bf16Mixed, Some(Fp8::Delayed))),
        "fp8-current" | "fp8-cs" => Ok((Precision::Bf16Mixed, Some(Fp8::Current))),
        "mxfp8" | "fp8-mx" => Ok((Precision::Bf16Mixed, Some(Fp8::Mx))),
        _ => Precision::parse(s)
            .map(|p| (p, None))
            .map_err(|_| {
                invalid(
                    "--precision",
                    format!("'{s}' is not one of fp32, bf16-mixed, fp16-mixed, fp8 (fp8-delayed), fp8-current, mxfp8"),
                )
            }),
    }
}

/// Optimizer family (decides the optimizer-state bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Optimizer {
    /// Adam with decoupled weight decay: two fp32 moments (8 B/param).
    Adamw,
    /// Plain SGD: no state.
    Sgd,
    /// SGD with momentum: one fp32 buffer (4 B/param).
    SgdMomentum,
    /// Adafactor without momentum: factored second moment, rows + columns per matrix
    /// (Shazeer & Stern 2018) — about 4·(r + c) bytes per r×c matrix.
    Adafactor,
}

impl Optimizer {
    /// Parses `adamw`, `sgd`, `sgd-momentum`, `adafactor`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "adamw" | "adam" => Ok(Self::Adamw),
            "sgd" => Ok(Self::Sgd),
            "sgd-momentum" | "momentum" => Ok(Self::SgdMomentum),
            "adafactor" => Ok(Self::Adafactor),
            _ => Err(invalid(
                "--optimizer",
                format!("'{s}' is not one of adamw, sgd, sgd-momentum, adafactor"),
            )),
        }
    }
}

/// Activation recomputation (checkpointing) policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Recompute {
    /// Keep every activation.
    None,
    /// Recompute only the attention core (QKᵀ, softmax, dropout, ·V) (Korthikanti et al. 2022, §4.3).
    Selective,
    /// Keep only each layer's input; recompute the whole layer forward in backward.
    Full,
}

impl Recompute {
    /// Parses `none`, `selective`, `full`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Self::None),
            "selective" => Ok(Self::Selective),
            "full" => Ok(Self::Full),
            _ => Err(invalid(
                "--recompute",
                format!("'{s}' is not one of none, selective, full"),
            )),
        }
    }
}

/// How attention FLOPs are counted for causal masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CausalFlops {
    /// Count the full s×s score matrix (Megatron / Narayanan et al. 2021 / PaLM MFU convention).
    Full,
    /// Count half of it (what a causal flash-attention kernel actually computes).
    Half,
}

/// How data-parallel gradients are summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GradSync {
    /// Ring all-reduce: reduce-scatter then all-gather, 2(n−1)/n of the data per link.
    Ring,
    /// Double binary tree (NCCL): same bandwidth term as ring, log₂(n) latency.
    Tree,
    /// Parameter server: every worker pushes and pulls its full gradient; K servers share the load.
    ParameterServer,
}

impl GradSync {
    /// Parses `ring`, `tree`, `ps`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ring" => Ok(Self::Ring),
            "tree" => Ok(Self::Tree),
            "ps" | "parameter-server" => Ok(Self::ParameterServer),
            _ => Err(invalid(
                "--grad-sync",
                format!("'{s}' is not one of ring, tree, ps"),
            )),
        }
    }
}

/// Pipeline schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// All forwards, then all backwards (Huang et al. 2019): m micro-batches in flight.
    Gpipe,
    /// One-forward-one-backward (Narayanan et al. 2021, PipeDream-flush); interleaved when vpp > 1.
    OneFOneB,
}

impl Schedule {
    /// Parses `gpipe`, `1f1b`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "gpipe" => Ok(Self::Gpipe),
            "1f1b" => Ok(Self::OneFOneB),
            _ => Err(invalid(
                "--schedule",
                format!("'{s}' is not one of gpipe, 1f1b"),
            )),
        }
    }
}

/// Where offloaded model states live (ZeRO-Offload: CPU memory; ZeRO-Infinity: NVMe as well).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OffloadDevice {
    /// Host (CPU) memory, over the GPU's host link.
    #[default]
    Cpu,
    /// NVMe drives, through host memory (the drive is the slower leg).
    Nvme,
}

/// Which model states live off the GPU (Ren et al. 2021, "ZeRO-Offload", USENIX ATC;
/// Rajbhandari et al. 2021, "ZeRO-Infinity", SC).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offload {
    /// fp32 master weights and optimizer moments on the host; gradients stream there during
    /// backward, the optimizer step runs on the CPU (CPU-Adam) and the updated 16-bit weights
    /// come back.
    pub optimizer: bool,
    /// 16-bit parameter shards on the host (ZeRO-3 only), fetched for the forward and backward
    /// passes that use them.
    pub params: bool,
    /// CPU memory or NVMe.
    pub device: OffloadDevice,
}

impl Offload {
    /// Parses `--offload none|optimizer|params|both` with `--offload-device cpu|nvme`.
    pub fn parse(what: &str, device: Option<&str>) -> Result<Self> {
        let (optimizer, params) = match what.trim().to_ascii_lowercase().as_str() {
            "none" => (false, false),
            "optimizer" => (true, false),
            "params" | "parameters" => (false, true),
            "both" => (true, true),
            _ => {
                return Err(invalid(
                    "--offload",
                    format!("'{what}' is not one of none, optimizer, params, both"),
                ))
            }
        };
        let device = match device.map(|d| d.trim().to_ascii_lowercase()) {
            None => OffloadDevice::Cpu,
            Some(d) if d == "cpu" => OffloadDevice::Cpu,
            Some(d) if d == "nvme" => OffloadDevice::Nvme,
            Some(d) => {
                return Err(invalid(
                    "--offload-device",
                    format!("'{d}' is not one of cpu, nvme"),
                ))
            }
        };
        Ok(Offload {
            optimizer,
            params,
            device,
        })
    }

    /// Anything offloaded.
    pub fn any(&self) -> bool {
        self.optimizer || self.params
    }
}

impl std::fmt::Display for Offload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match (self.optimizer, self.params) {
            (false, false) => return f.write_str("none"),
            (true, false) => "optimizer",
            (false, true) => "params",
            (true, true) => "both",
        };
        let dev = match self.device {
            OffloadDevice::Cpu => "cpu",
            OffloadDevice::Nvme => "nvme",
        };
        write!(f, "{what} to {dev}")
    }
}

/// Bytes stored per parameter for each model state.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StateBytes {
    /// Working weights (2 for bf16/fp16, 4 for fp32).
    pub weight: f64,
    /// Gradients (2 ZeRO convention, 4 Megatron's fp32 grad buffers, 4 for fp32).
    pub grad: f64,
    /// fp32 master weights (4 for mixed precision, 0 for fp32).
    pub master: f64,
    /// Optimizer state bytes per parameter (AdamW 8, SGD momentum 4, SGD 0; Adafactor computed).
    pub optimizer: f64,
}

impl StateBytes {
    /// Defaults for a precision and optimizer (16 B/param for mixed-precision AdamW).
    pub fn defaults(p: Precision, o: Optimizer, adafactor_bytes_per_param: f64) -> Self {
        let (weight, grad, master) = match p {
            Precision::Fp32 => (4.0, 4.0, 0.0),
            _ => (2.0, 2.0, 4.0),
        };
        let optimizer = match o {
            Optimizer::Adamw => 8.0,
            Optimizer::Sgd => 0.0,
            Optimizer::SgdMomentum => 4.0,
            Optimizer::Adafactor => adafactor_bytes_per_param,
        };
        StateBytes {
            weight,
            grad,
            master,
            optimizer,
        }
    }

    /// Total model-state bytes per parameter.
    pub fn total(&self) -> f64 {
        self.weight + self.grad + self.master + self.optimizer
    }
}

/// Everything about *how* we train, apart from the parallel layout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recipe {
    /// Total training tokens.
    pub tokens: f64,
    /// Global batch in sequences.
    pub global_batch: u64,
    /// Precision.
    pub precision: Precision,
    /// Optimizer.
    pub optimizer: Optimizer,
    /// Bytes per parameter for each state.
    pub state_bytes: StateBytes,
    /// Bytes per gradient element on the wire for data-parallel sync (= grad bytes by default).
    pub grad_comm_bytes: f64,
    /// Recompute policy.
    pub recompute: Recompute,
    /// Fused (flash) attention: no s×s matrices stored or moved through memory.
    pub flash_attention: bool,
    /// Dropout on (adds 1-byte masks to activations).
    pub dropout: bool,
    /// Causal attention FLOP convention.
    pub causal_flops: CausalFlops,
    /// Gradient all-reduce overlapped with backward.
    pub overlap_grad_reduce: bool,
    /// Data-parallel gradient algorithm.
    pub grad_sync: GradSync,
    /// Parameter servers (for `GradSync::ParameterServer`).
    pub ps_servers: u64,
    /// Pipeline schedule.
    pub schedule: Schedule,
    /// Fixed per-device overhead: CUDA context, library workspaces, allocator slack, bytes.
    pub runtime_overhead_bytes: f64,
    /// Data-parallel gradient bucket size, bytes (PyTorch DDP's default 25 MB).
    pub bucket_bytes: f64,
    /// ZeRO-3: keep the gathered weights from the first forward until the optimizer step
    /// (FSDP `reshard_after_forward=False` with accumulation, DeepSpeed's parameter persistence)
    /// instead of gathering them again for the forward and the backward of every micro-batch.
    /// One gather per step; the full weights stay resident.
    pub zero3_keep_weights: bool,
    /// FP8 linears (Transformer Engine style) on top of `precision` (bf16-mixed only).
    pub fp8: Option<Fp8>,
    /// Tensor-parallel collectives overlapped with the GEMMs they feed (Transformer Engine
    /// userbuffers, Megatron `--tp-comm-overlap`).
    pub tp_comm_overlap: bool,
    /// Expert-parallel all-to-alls overlapped with the compute of another micro-batch
    /// (Megatron-Core `--overlap-moe-expert-parallel-comm`, Megatron-Bridge `moe_a2a_overlap`:
    /// the forward of one micro-batch runs beside the backward of another, so each one's
    /// dispatch/combine hides behind the other's compute); off, they are exposed.
    pub ep_comm_overlap: bool,
    /// ZeRO-1/2: the all-gather of updated weights overlapped with the next forward (Megatron
    /// distributed optimizer `--overlap-param-gather`); off, it follows the optimizer step.
    pub overlap_param_gather: bool,
    /// Fraction of device memory kept free (`--memory-margin`): a layout fits when its total is
    /// at most (1 − margin) × capacity.
    pub memory_margin: f64,
    /// Failure rate, checkpoint bandwidth and restart time for the whole-run estimate.
    pub failures: crate::goodput::FailureModel,
    /// Model states kept off the GPU (`--offload`).
    pub offload: Offload,
}

impl Recipe {
    /// A recipe with the documented defaults.
    pub fn new(tokens: f64, global_batch: u64, precision: Precision, optimizer: Optimizer) -> Self {
        let sb = StateBytes::defaults(precision, optimizer, 0.0);
        Recipe {
            tokens,
            global_batch,
            precision,
            optimizer,
            state_bytes: sb,
            grad_comm_bytes: sb.grad,
            recompute: Recompute::None,
            flash_attention: true,
            dropout: false,
            causal_flops: CausalFlops::Full,
            overlap_grad_reduce: true,
            grad_sync: GradSync::Ring,
            ps_servers: 1,
            schedule: Schedule::OneFOneB,
            runtime_overhead_bytes: 1.0 * 1024.0 * 1024.0 * 1024.0,
            bucket_bytes: 25e6,
            zero3_keep_weights: false,
            fp8: None,
            tp_comm_overlap: false,
            ep_comm_overlap: false,
            overlap_param_gather: false,
            memory_margin: 0.0,
            failures: crate::goodput::FailureModel::default(),
            offload: Offload::default(),
        }
    }

    /// Checks ranges; names the field.
    pub fn validate(&self) -> Result<()> {
        if !self.tokens.is_finite() || self.tokens <= 0.0 {
            return Err(invalid(
                "--tokens",
                "must be a positive token count, e.g. 300B",
            ));
        }
        if self.tokens > 1e16 {
            return Err(invalid(
                "--tokens",
                format!(
                    "{:.2e} tokens is beyond any corpus; check the suffix",
                    self.tokens
                ),
            ));
        }
        if self.global_batch == 0 {
            return Err(invalid("--global-batch", "must be at least 1 sequence"));
        }
        let sb = &self.state_bytes;
        for (f, v) in [
            ("--weight-bytes", sb.weight),
            ("--grad-bytes", sb.grad),
            ("--master-bytes", sb.master),
            ("--optimizer-bytes", sb.optimizer),
            ("--grad-comm-bytes", self.grad_comm_bytes),
        ] {
            if !v.is_finite() || !(0.0..=64.0).contains(&v) {
                return Err(invalid(
                    f,
                    format!("{v} bytes per parameter must be within 0..64"),
                ));
            }
        }
        if sb.weight == 0.0 {
            return Err(invalid(
                "--weight-bytes",
                "weights need at least some bytes",
            ));
        }
        if self.fp8.is_some() && self.precision != Precision::Bf16Mixed {
            return Err(invalid(
                "--precision",
                "FP8 linears run inside bf16 mixed precision; fp8 cannot be combined with fp32 or fp16",
            ));
        }
        if !(self.memory_margin.is_finite() && (0.0..0.9).contains(&self.memory_margin)) {
            return Err(invalid(
                "--memory-margin",
                format!(
                    "{} must be a fraction of device memory within 0..0.9 (e.g. 0.1 keeps 10% free)",
                    self.memory_margin
                ),
            ));
        }
        self.failures.validate()?;
        if self.ps_servers == 0 {
            return Err(invalid("--ps-servers", "must be at least 1"));
        }
        Ok(())
    }
}

impl Recipe {
    /// The checks that need both the recipe and the layout.
    pub fn check_layout(&self, l: &crate::layout::Layout) -> Result<()> {
        if self.offload.params && l.zero < 3 {
            return Err(crate::error::PlanError::Layout(format!(
                "--offload params keeps each GPU's parameter shard on the host, which needs ZeRO-3 (--zero 3); ZeRO-{} keeps whole weights on every GPU",
                l.zero
            )));
        }
        Ok(())
    }
}

/// User-facing names (the flag spellings), for reports and `--explain`.
macro_rules! display_names {
    ($($ty:ty { $($var:ident => $name:literal),* $(,)? })*) => {$(
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(match self { $(Self::$var => $name),* })
            }
        }
    )*};
}

display_names! {
    Precision { Fp32 => "fp32", Bf16Mixed => "bf16-mixed", Fp16Mixed => "fp16-mixed" }
    Fp8 { Delayed => "fp8 (delayed scaling)", Current => "fp8 (current scaling)", Mx => "mxfp8" }
    Optimizer { Adamw => "adamw", Sgd => "sgd", SgdMomentum => "sgd-momentum", Adafactor => "adafactor" }
    Recompute { None => "none", Selective => "selective", Full => "full" }
    CausalFlops { Full => "full", Half => "half" }
    GradSync { Ring => "ring", Tree => "tree", ParameterServer => "parameter server" }
    Schedule { Gpipe => "gpipe", OneFOneB => "1f1b" }
}
