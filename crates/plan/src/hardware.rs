//! Accelerators and clusters: peak FLOP/s, memory, links, price.
//!
//! Every preset number cites its datasheet. "Dense" means without 2:4 structured sparsity.
//! Link bandwidths are **per direction, per GPU**: NVIDIA quotes NVLink totals as bidirectional
//! (A100: 600 GB/s = 300 GB/s each way). Network bandwidth is per GPU (one NIC per GPU in DGX/HGX
//! nodes). Latencies (α) are not datasheet figures: they are assumed from the small-message
//! times nccl-tests reports (a few µs over NVLink, ~10–15 µs across InfiniBand). Prices are *assumptions* (typical 2026 on-demand cloud rates), not quotes: set
//! `--price-per-gpu-hour` for your contract. `matmul_scale` (large-GEMM efficiency relative to
//! the A100 fit) is 1.0 for A100s, where it is validated; 0.85 for H100/H200 (large bf16 GEMMs
//! reach roughly 75% of the 989 TFLOP/s peak against roughly 88% of 312 on A100), 0.8 for B200
//! and GB200 and 0.7 for MI300X are assumptions, not fits. `fp8_matmul_scale` (FP8 GEMM
//! efficiency on the FP8 peak) is fitted per GPU for H100, B200 and GB200 on published NeMo /
//! Megatron-Bridge runs (`validation`); H200 takes H100's, MI300X's 0.7 is assumed.

use serde::{Deserialize, Serialize};

use crate::error::{invalid, PlanError, Result};

/// One accelerator type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    /// Preset or custom name.
    pub name: String,
    /// Peak dense bf16/fp16 tensor FLOP/s.
    pub peak_bf16_flops: f64,
    /// Peak fp32 FLOP/s used for fp32 training (TF32 tensor cores where the framework allows
    /// them is a user choice: set this field to the TF32 figure to model it).
    pub peak_fp32_flops: f64,
    /// Device memory in bytes.
    pub memory_bytes: f64,
    /// Device memory bandwidth, bytes/s.
    pub memory_bw: f64,
    /// Intra-node link (NVLink / Infinity Fabric) bandwidth per GPU, per direction, bytes/s.
    pub intra_node_bw: f64,
    /// Network bandwidth per GPU, per direction, bytes/s.
    pub network_bw: f64,
    /// Latency of one intra-node message (α), seconds.
    pub intra_node_latency: f64,
    /// Latency of one inter-node message (α), seconds.
    pub network_latency: f64,
    /// Default GPUs per node.
    pub gpus_per_node: u64,
    /// Assumed price per GPU-hour, USD.
    pub price_per_gpu_hour: f64,
    /// Large-matmul efficiency relative to the A100 fit of the time model (1.0 = as efficient as
    /// an A100 with Megatron-LM in Korthikanti et al. 2022). Without published iteration times to
    /// fit on, newer GPUs carry an assumption: large bf16 GEMMs reach a smaller fraction of their
    /// (much higher) peak; set it from your own `nvidia-smi`/cuBLAS measurements.
    #[serde(default = "one")]
    pub matmul_scale: f64,
    /// Peak dense FP8 tensor FLOP/s (0 = no FP8 tensor cores: `--precision fp8` is refused).
    #[serde(default)]
    pub peak_fp8_flops: f64,
    /// Large FP8-matmul efficiency relative to the A100 bf16 fit, as a share of the FP8 peak:
    /// FP8 GEMMs run at `matmul_eff · fp8_matmul_scale` of `peak_fp8_flops`. Fitted per GPU on
    /// published NeMo / Megatron-Bridge FP8 runs (see `validation::fit_fp8_scales`).
    #[serde(default = "one")]
    pub fp8_matmul_scale: f64,
    /// GPU ↔ host link per direction, bytes/s (PCIe, or NVLink-C2C on Grace superchips):
    /// what CPU offload moves over.
    #[serde(default = "default_host_link")]
    pub host_link_bw: f64,
    /// Host DRAM bandwidth available to this GPU's share of the CPU, bytes/s (the node's
    /// channels × rate ÷ GPUs per node): what the CPU optimizer step is bound by.
    #[serde(default = "default_host_mem")]
    pub host_mem_bw: f64,
    /// NVMe bandwidth per GPU, bytes/s (an assumption: one PCIe Gen4 drive's sustained ~3 GB/s
    /// per GPU; set it from `fio` on your nodes).
    #[serde(default = "default_nvme")]
    pub nvme_bw: f64,
    /// Host DRAM per node, bytes: the capacity CPU offload (`--offload … --offload-device cpu`)
    /// fills. The node is the preset's `gpus_per_node` GPUs (a DGX; a GB200 NVL72 rack).
    /// 0 = unknown: offload is not checked against it.
    #[serde(default)]
    pub host_mem_per_node_bytes: f64,
    /// Local NVMe per node, bytes: the capacity NVMe offload fills (0 = unknown, not checked).
    #[serde(default)]
    pub nvme_per_node_bytes: f64,
    /// Time per routed token copy per MoE layer, forward + backward, seconds, beyond the
    /// roofline of the expert GEMMs, the router, the permutation bytes and the all-to-alls:
    /// what grouped GEMMs over many small experts, per-expert FP8 quantisation and the token
    /// dispatcher cost in practice. Empirical, fitted per GPU on a published Qwen3-30B-A3B run
    /// (`validation::moe::fit_expert_secs_per_copy`); 0 = not modelled.
    #[serde(default)]
    pub expert_secs_per_copy: f64,
    /// Citation for the numbers above.
    pub source: String,
}

fn default_host_link() -> f64 {
    64e9
}

fn default_host_mem() -> f64 {
    76.8e9
}

fn default_nvme() -> f64 {
    3e9
}

/// A cluster: a GPU type, how many, and how they are grouped.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterSpec {
    /// The accelerator.
    pub gpu: GpuSpec,
    /// Total GPUs.
    pub gpus: u64,
    /// GPUs per node (NVLink domain).
    pub gpus_per_node: u64,
    /// USD per GPU-hour.
    pub price_per_gpu_hour: f64,
}

impl ClusterSpec {
    /// Builds and checks a cluster.
    pub fn new(
        gpu: GpuSpec,
        gpus: u64,
        gpus_per_node: Option<u64>,
        price: Option<f64>,
    ) -> Result<Self> {
        let gpn = gpus_per_node.unwrap_or(gpu.gpus_per_node);
        if gpus == 0 {
            return Err(invalid("--gpus", "must be at least 1"));
        }
        if gpn == 0 {
            return Err(invalid("--gpus-per-node", "must be at least 1"));
        }
        if gpus > 1_000_000 {
            return Err(invalid(
                "--gpus",
                format!("{gpus} GPUs is beyond any cluster; check the value"),
            ));
        }
        if gpus > gpn && !gpus.is_multiple_of(gpn) {
            return Err(invalid(
                "--gpus",
                format!("{gpus} GPUs do not fill whole nodes of {gpn}; use a multiple of {gpn} or set --gpus-per-node"),
            ));
        }
        let price = price.unwrap_or(gpu.price_per_gpu_hour);
        if !price.is_finite() || price < 0.0 {
            return Err(invalid(
                "--price-per-gpu-hour",
                "must be a non-negative number of USD",
            ));
        }
        Ok(ClusterSpec {
            gpu,
            gpus,
            gpus_per_node: gpn.min(gpus),
            price_per_gpu_hour: price,
        })
    }

    /// Number of nodes (rounded up).
    pub fn nodes(&self) -> u64 {
        self.gpus.div_ceil(self.gpus_per_node)
    }
}

fn one() -> f64 {
    1.0
}

const GB: f64 = 1e9;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
const T: f64 = 1e12;
/// Decimal terabytes (drive and DIMM capacities as sold).
const TB_: f64 = 1e12;

/// Fitted FP8 GEMM efficiencies (`fp8_matmul_scale`) per GPU: the least mean |error| fit over
/// the published rows marked `fit` in `data/published_h100_b200.csv` (rerun with
/// `scaletrain validate --fit`; the test `fp8_defaults_are_the_fit` keeps these equal to it).
pub const FP8_SCALE_H100: f64 = 0.67;
/// See [`FP8_SCALE_H100`].
pub const FP8_SCALE_B200: f64 = 0.73;
/// See [`FP8_SCALE_H100`].
pub const FP8_SCALE_GB200: f64 = 0.68;

/// Fitted time per routed token copy per MoE layer (`expert_secs_per_copy`): the least |error|
/// fit on each GPU's 25.11 Qwen3-30B-A3B row of `data/published_moe.csv` (rerun with
/// `scaletrain validate --fit`; the test `expert_defaults_are_the_fit` keeps these equal to
/// it). H200, A100 and MI300X take H100's value, an assumption.
pub const EXPERT_SECS_PER_COPY_H100: f64 = 2.92e-7;
/// See [`EXPERT_SECS_PER_COPY_H100`].
pub const EXPERT_SECS_PER_COPY_B200: f64 = 1.97e-7;
/// See [`EXPERT_SECS_PER_COPY_H100`].
pub const EXPERT_SECS_PER_COPY_GB200: f64 = 3.16e-8;

// Host side of the presets (for offload): PCIe per direction from the datasheets (A100: PCIe
// Gen4 64 GB/s bidirectional; H100/H200/B200/MI300X: PCIe Gen5 128 GB/s bidirectional); GB200:
// NVLink-C2C 900 GB/s bidirectional per Grace–Blackwell superchip of 2 GPUs (225 GB/s per GPU
// per direction). Host memory per GPU: DGX A100 2× EPYC 7742, 16 channels DDR4-3200 (409.6 GB/s
// per node); DGX H100/H200 2× Xeon 8480C, 16 channels DDR5-4800 (614.4 GB/s); DGX B200 2× Xeon
// 8570, 16 channels DDR5-5600 (716.8 GB/s); MI300X platforms 2× EPYC 9004, 24 channels DDR5-4800
// (921.6 GB/s); all ÷ 8 GPUs; GB200: Grace LPDDR5X 512 GB/s per 2 GPUs. NVMe 3 GB/s per GPU is an
// assumption (see `GpuSpec::nvme_bw`).
// Host capacity per node (offload checks): DGX A100 320GB (a100-40gb) 1 TB DRAM and 15 TB NVMe
// (4x 3.84 TB U.2), DGX A100 640GB (a100-80gb) 2 TB and 30 TB (8x 3.84 TB); DGX H100, DGX H200 and
// DGX B200 2 TB DRAM and 8x 3.84 TB NVMe U.2 (30.72 TB) as shipped (DGX H100/H200 and DGX B200
// datasheets and user guides); GB200 NVL72: 36 Grace CPUs with 480 GB LPDDR5X each (17.28 TB per
// 72-GPU rack, datasheet "up to 17 TB LPDDR5X"); its local NVMe (E1.S drives per compute tray)
// is an assumption of 4x 3.84 TB per 4-GPU tray (276.5 TB per rack). MI300X platforms: 2 TB DRAM
// and 8x 3.84 TB NVMe assumed, as a DGX.

/// Every GPU preset name.
pub const GPU_PRESETS: &[&str] = &[
    "a100-40gb",
    "a100-80gb",
    "h100-sxm",
    "h200",
    "b200",
    "gb200",
    "mi300x",
];

/// Looks up a GPU preset.
pub fn gpu_preset(name: &str) -> Result<GpuSpec> {
    let n = name.trim().to_ascii_lowercase();
    let nv_a100 = "NVIDIA A100 Tensor Core GPU datasheet (2021): 312 TFLOP/s bf16 dense, 19.5 TFLOP/s fp32, NVLink 600 GB/s bidirectional; DGX A100 datasheet: 8x 200 Gb/s HDR InfiniBand per node";
    let g = match n.as_str() {
        "a100-40gb" => GpuSpec {
            name: n.clone(),
            peak_bf16_flops: 312.0 * T,
            peak_fp32_flops: 19.5 * T,
            memory_bytes: 40.0 * GIB,
            memory_bw: 1555.0 * GB,
            intra_node_bw: 300.0 * GB,
            network_bw: 25.0 * GB,
            intra_node_latency: 8e-6,
            network_latency: 15e-6,
            gpus_per_node: 8,
            price_per_gpu_hour: 1.6,
            matmul_scale: 1.0,
            peak_fp8_flops: 0.0,
            fp8_matmul_scale: 1.0,
            host_link_bw: 32.0 * GB,
            host_mem_bw: 51.2 * GB,
            nvme_bw: 3.0 * GB,
            host_mem_per_node_bytes: 1.0 * TB_,
            nvme_per_node_bytes: 15.36 * TB_,
            expert_secs_per_copy: EXPERT_SECS_PER_COPY_H100,
            source: format!("{nv_a100}; 40 GB HBM2 at 1,555 GB/s"),
        },
        "a100-80gb" => GpuSpec {
            name: n.clone(),
            peak_bf16_flops: 312.0 * T,
            peak_fp32_flops: 19.5 * T,
            memory_bytes: 80.0 * GIB,
            memory_bw: 2039.0 * GB,
            intra_node_bw: 300.0 * GB,
            network_bw: 25.0 * GB,
            intra_node_latency: 8e-6,
            network_latency: 15e-6,
            gpus_per_node: 8,
            price_per_gpu_hour: 2.0,
            matmul_scale: 1.0,
            peak_fp8_flops: 0.0,
            fp8_matmul_scale: 1.0,
            host_link_bw: 32.0 * GB,
            host_mem_bw: 51.2 * GB,
            nvme_bw: 3.0 * GB,
            host_mem_per_node_bytes: 2.0 * TB_,
            nvme_per_node_bytes: 30.72 * TB_,
            expert_secs_per_copy: EXPERT_SECS_PER_COPY_H100,
            source: format!("{nv_a100}; 80 GB HBM2e at 2,039 GB/s (SXM)"),
        },
        "h100-sxm" => GpuSpec {
            name: n.clone(),
            peak_bf16_flops: 989.0 * T,
            peak_fp32_flops: 67.0 * T,
            memory_bytes: 80.0 * GIB,
            memory_bw: 3350.0 * GB,
            intra_node_bw: 450.0 * GB,
            network_bw: 50.0 * GB,
            intra_node_latency: 6e-6,
            network_latency: 12e-6,
            gpus_per_node: 8,
            price_per_gpu_hour: 3.0,
            matmul_scale: 0.85,
            peak_fp8_flops: 1979.0 * T,
            fp8_matmul_scale: FP8_SCALE_H100,
            host_link_bw: 64.0 * GB,
            host_mem_bw: 76.8 * GB,
            nvme_bw: 3.0 * GB,
            host_mem_per_node_bytes: 2.0 * TB_,
            nvme_per_node_bytes: 30.72 * TB_,
            expert_secs_per_copy: EXPERT_SECS_PER_COPY_H100,
            source: "NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOP/s bf16 dense (1,979 sparse), 1,979 TFLOP/s FP8 dense (3,958 sparse), 67 TFLOP/s fp32, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s bidirectional; DGX H100 datasheet: 8x 400 Gb/s ConnectX-7 per node".into(),
        },
        "h200" => GpuSpec {
            name: n.clone(),
            peak_bf16_flops: 989.0 * T,
            peak_fp32_flops: 67.0 * T,
            memory_bytes: 141.0 * GB,
            memory_bw: 4800.0 * GB,
            intra_node_bw: 450.0 * GB,
            network_bw: 50.0 * GB,
            intra_node_latency: 6e-6,
            network_latency: 12e-6,
            gpus_per_node: 8,
            price_per_gpu_hour: 3.5,
            matmul_scale: 0.85,
            peak_fp8_flops: 1979.0 * T,
            fp8_matmul_scale: FP8_SCALE_H100,
            host_link_bw: 64.0 * GB,
            host_mem_bw: 76.8 * GB,
            nvme_bw: 3.0 * GB,
            host_mem_per_node_bytes: 2.0 * TB_,
            nvme_per_node_bytes: 30.72 * TB_,
            expert_secs_per_copy: EXPERT_SECS_PER_COPY_H100,
            source: "NVIDIA H200 Tensor Core GPU datasheet (SXM): 989 TFLOP/s bf16 and 1,979 TFLOP/s FP8 dense, 67 TFLOP/s fp32, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s bidirectional; DGX H200: 8x 400 Gb/s ConnectX-7 per node".into(),
        },
        "b200" => GpuSpec {
            name: n.clone(),
            peak_bf16_flops: 2250.0 * T,
            peak_fp32_flops: 75.0 * T,
            memory_bytes: 180.0 * GB,
            memory_bw: 8000.0 * GB,
            intra_node_bw: 900.0 * GB,
            network_bw: 50.0 * GB,
            intra_node_latency: 5e-6,
            network_latency: 12e-6,
            gpus_per_node: 8,
            price_per_gpu_hour: 5.0,
            matmul_scale: 0.8,
            peak_fp8_flops: 4500.0 * T,
            fp8_matmul_scale: FP8_SCALE_B200,
            host_link_bw: 64.0 * GB,
            host_mem_bw: 89.6 * GB,
            nvme_bw: 3.0 * GB,
            host_mem_per_node_bytes: 2.0 * TB_,
            nvme_per_node_bytes: 30.72 * TB_,
            expert_secs_per_copy: EXPERT_SECS_PER_COPY_B200,
            source: "NVIDIA DGX B200 datasheet: 72 PFLOP/s FP8 training per 8 GPUs (sparse) -> 4.5 PFLOP/s FP8 and 2.25 PFLOP/s bf16 dense per GPU, 1,440 GB HBM3e per node (180 GB/GPU), 64 TB/s per node (8 TB/s/GPU), NVLink 5 at 1.8 TB/s bidirectional, 8x 400 Gb/s ConnectX-7; fp32 75 TFLOP/s from the HGX B200 spec sheet".into(),
        },
        "gb200" => GpuSpec {
            name: n.clone(),
            peak_bf16_flops: 2500.0 * T,
            peak_fp32_flops: 80.0 * T,
            memory_bytes: 186.0 * GB,
            memory_bw: 8000.0 * GB,
            intra_node_bw: 900.0 * GB,
            network_bw: 50.0 * GB,
            intra_node_latency: 5e-6,
            network_latency: 12e-6,
            gpus_per_node: 72,
            price_per_gpu_hour: 6.0,
            matmul_scale: 0.8,
            peak_fp8_flops: 5000.0 * T,
            fp8_matmul_scale: FP8_SCALE_GB200,
            host_link_bw: 225.0 * GB,
            host_mem_bw: 256.0 * GB,
            nvme_bw: 3.0 * GB,
            host_mem_per_node_bytes: 17.28 * TB_,
            nvme_per_node_bytes: 276.48 * TB_,
            expert_secs_per_copy: EXPERT_SECS_PER_COPY_GB200,
            source: "NVIDIA GB200 NVL72 datasheet: 360 PFLOP/s bf16 and 720 PFLOP/s FP8 per 72 GPUs (sparse) -> 2.5 / 5 PFLOP/s dense per GPU, 13.4 TB HBM3e at 576 TB/s (186 GB, 8 TB/s per GPU), NVLink 5 at 1.8 TB/s bidirectional across all 72 GPUs of the rack (one NVLink domain: gpus_per_node 72); fp32 80 TFLOP/s (datasheet 5,760 TFLOP/s per rack); 400 Gb/s ConnectX-7 per GPU".into(),
        },
        "mi300x" => GpuSpec {
            name: n.clone(),
            peak_bf16_flops: 1307.4 * T,
            peak_fp32_flops: 163.4 * T,
            memory_bytes: 192.0 * GB,
            memory_bw: 5300.0 * GB,
            intra_node_bw: 448.0 * GB,
            network_bw: 50.0 * GB,
            intra_node_latency: 8e-6,
            network_latency: 15e-6,
            gpus_per_node: 8,
            price_per_gpu_hour: 2.5,
            matmul_scale: 0.7,
            peak_fp8_flops: 2614.9 * T,
            fp8_matmul_scale: 0.7,
            host_link_bw: 64.0 * GB,
            host_mem_bw: 115.2 * GB,
            nvme_bw: 3.0 * GB,
            host_mem_per_node_bytes: 2.0 * TB_,
            nvme_per_node_bytes: 30.72 * TB_,
            expert_secs_per_copy: EXPERT_SECS_PER_COPY_H100,
            source: "AMD Instinct MI300X data sheet: 1,307.4 TFLOP/s bf16 and 2,614.9 TFLOP/s FP8 dense, 163.4 TFLOP/s fp32, 192 GB HBM3 at 5.3 TB/s, 7 Infinity Fabric links x 64 GB/s per direction (448 GB/s); 400 Gb/s NIC per GPU assumed".into(),
        },
        _ => {
            return Err(PlanError::UnknownPreset {
                kind: "GPU",
                name: name.to_string(),
                valid: GPU_PRESETS.join(", "),
            })
        }
    };
    Ok(g)
}

/// Parses a custom GPU from TOML-decoded fields, checking every number.
pub fn validate_gpu(g: &GpuSpec) -> Result<()> {
    let checks: [(&'static str, f64); 11] = [
        ("host_link_bw", g.host_link_bw),
        ("host_mem_bw", g.host_mem_bw),
        ("nvme_bw", g.nvme_bw),
        ("peak_bf16_flops", g.peak_bf16_flops),
        ("peak_fp32_flops", g.peak_fp32_flops),
        ("memory_bytes", g.memory_bytes),
        ("memory_bw", g.memory_bw),
        ("intra_node_bw", g.intra_node_bw),
        ("network_bw", g.network_bw),
        ("intra_node_latency", g.intra_node_latency),
        ("network_latency", g.network_latency),
    ];
    for (field, v) in checks {
        if !v.is_finite() || v <= 0.0 {
            return Err(invalid(
                field,
                format!(
                    "{v} must be a positive number (SI units: FLOP/s, bytes, bytes/s, seconds)"
                ),
            ));
        }
    }
    if g.peak_bf16_flops > 1e18 {
        return Err(invalid(
            "peak_bf16_flops",
            "above 1 EFLOP/s per GPU; the unit is FLOP/s, not TFLOP/s",
        ));
    }
    if g.network_latency > 1.0 || g.intra_node_latency > 1.0 {
        return Err(invalid(
            "network_latency",
            "latency above 1 s; the unit is seconds",
        ));
    }
    if !(0.05..=2.0).contains(&g.matmul_scale) {
        return Err(invalid(
            "matmul_scale",
            format!(
                "{} must be within 0.05..2 (1.0 = A100-like efficiency)",
                g.matmul_scale
            ),
        ));
    }
    if !g.peak_fp8_flops.is_finite() || g.peak_fp8_flops < 0.0 || g.peak_fp8_flops > 1e19 {
        return Err(invalid(
            "peak_fp8_flops",
            format!(
                "{} must be 0 (no FP8) or a positive FLOP/s figure",
                g.peak_fp8_flops
            ),
        ));
    }
    if !(0.05..=2.0).contains(&g.fp8_matmul_scale) {
        return Err(invalid(
            "fp8_matmul_scale",
            format!(
                "{} must be within 0.05..2 (1.0 = FP8 GEMMs as efficient as A100 bf16 ones)",
                g.fp8_matmul_scale
            ),
        ));
    }
    if g.gpus_per_node == 0 {
        return Err(invalid("gpus_per_node", "must be at least 1"));
    }
    if !g.price_per_gpu_hour.is_finite() || g.price_per_gpu_hour < 0.0 {
        return Err(invalid(
            "price_per_gpu_hour",
            "must be a non-negative number of USD",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_presets_resolve_and_validate() {
        for name in GPU_PRESETS {
            let g = gpu_preset(name).unwrap();
            validate_gpu(&g).unwrap();
            assert!(!g.source.is_empty());
        }
        let e = gpu_preset("v100").unwrap_err().to_string();
        assert!(e.contains("v100") && e.contains("h100-sxm"), "{e}");
    }

    #[test]
    fn cluster_rejects_partial_nodes() {
        let g = gpu_preset("h100-sxm").unwrap();
        assert!(ClusterSpec::new(g.clone(), 12, None, None).is_err());
        assert_eq!(
            ClusterSpec::new(g.clone(), 16, None, None).unwrap().nodes(),
            2
        );
        assert_eq!(ClusterSpec::new(g, 4, None, None).unwrap().nodes(), 1);
    }
}
