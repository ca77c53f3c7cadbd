//! Model shapes: presets, explicit dimensions, `--params N` sizing and Hugging Face `config.json`.
//!
//! Legend: l = layers, h = hidden, a = attention heads, g = key/value heads (GQA), d = h / a
//! (head dim), f = FFN hidden, V = vocabulary, s = sequence length.
//!
//! Parameter counts are exact for the real checkpoints (GPT-2 small 124,439,808; Llama-2-7B
//! 6,738,415,616; Llama-3-8B 8,030,261,248); `tests` asserts them.

use serde::{Deserialize, Serialize};

use crate::error::{invalid, PlanError, Result};
use crate::moe::{moe_mlp_params, MoeSpec};

pub use crate::hf_config::{from_hf_config, SUPPORTED_HF};

/// MLP form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mlp {
    /// `down(gelu(up(x)))`: 2 matrices of h×f (GPT-2, GPT-3, Megatron).
    Gelu,
    /// `down(silu(gate(x)) * up(x))`: 3 matrices of h×f (Llama's SwiGLU).
    Gated,
}

/// Normalisation layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Norm {
    /// LayerNorm with weight and bias (2h parameters).
    LayerNorm,
    /// RMSNorm with weight only (h parameters).
    RmsNorm,
}

/// Which linear layers carry biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bias {
    /// No linear biases (Llama, Mistral).
    None,
    /// Biases on the Q/K/V projection only (Qwen2).
    QkvOnly,
    /// Biases on every linear layer (GPT-2, GPT-3, Megatron GPT).
    All,
}

/// A decoder-only transformer's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Display name (preset name or "custom").
    pub name: String,
    /// l: transformer blocks.
    pub layers: u64,
    /// h: model width.
    pub hidden: u64,
    /// a: attention (query) heads.
    pub heads: u64,
    /// g: key/value heads (= heads without GQA).
    pub kv_heads: u64,
    /// f: MLP inner width.
    pub ffn_hidden: u64,
    /// V: vocabulary size (as stored in the embedding matrix).
    pub vocab: u64,
    /// s: training sequence length.
    pub seq_len: u64,
    /// Learned absolute position embeddings of this many rows (0 = rotary, no parameters).
    pub learned_positions: u64,
    /// LM head shares the token-embedding matrix.
    pub tied_embeddings: bool,
    /// MLP form.
    pub mlp: Mlp,
    /// Norm form.
    pub norm: Norm,
    /// Linear biases.
    pub bias: Bias,
    /// d when it is not h / a (Qwen3's `head_dim`); queries are a·d wide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<u64>,
    /// RMSNorm on each head's queries and keys (Qwen3): 2·d parameters per layer.
    #[serde(default)]
    pub qk_norm: bool,
    /// Mixture-of-experts MLP (see [`crate::moe`]); `None` for a dense model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeSpec>,
}

/// Parameter counts by part, for one full (unsharded) model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ParamCount {
    /// Token embedding V·h plus learned position embedding.
    pub embedding: u64,
    /// One transformer block.
    pub per_layer: u64,
    /// All blocks: l · per_layer.
    pub layers: u64,
    /// Final norm.
    pub final_norm: u64,
    /// Untied LM head V·h (0 when tied).
    pub head: u64,
    /// Everything.
    pub total: u64,
    /// Routed-expert parameters of all MoE layers (0 for a dense model).
    pub routed_experts: u64,
    /// Parameters one token uses: the total less the routed experts it is not sent to
    /// (= total for a dense model).
    pub active: u64,
}

impl ModelSpec {
    /// d = h / a, or the config's own head dimension.
    pub fn head_dim(&self) -> u64 {
        self.head_dim.unwrap_or(self.hidden / self.heads)
    }

    /// a·d: width of the query projection and the attention output (= h unless `head_dim` is set).
    pub fn q_dim(&self) -> u64 {
        self.heads * self.head_dim()
    }

    /// Layers with a MoE MLP (0 for a dense model).
    pub fn moe_layers(&self) -> u64 {
        self.moe.map_or(0, |e| self.layers - e.dense_layers)
    }

    /// g·d: width of the K and V projections.
    pub fn kv_dim(&self) -> u64 {
        self.kv_heads * self.head_dim()
    }

    /// Parameters of one norm layer.
    pub fn norm_params(&self) -> u64 {
        match self.norm {
            Norm::LayerNorm => 2 * self.hidden,
            Norm::RmsNorm => self.hidden,
        }
    }

    /// Number of h×f matrices in the MLP (2 plain, 3 gated).
    pub fn mlp_matrices(&self) -> u64 {
        match self.mlp {
            Mlp::Gelu => 2,
            Mlp::Gated => 3,
        }
    }

    /// Parameters of one block, split into (tensor-parallel-sharded, replicated) for a Megatron
    /// column/row split: QKV and MLP-up are column-parallel (weights and biases sharded), the
    /// output and MLP-down projections are row-parallel (weights sharded, biases replicated), and
    /// norms are replicated (Shoeybi et al. 2019, Section 3).
    pub fn layer_params_split(&self) -> (u64, u64) {
        let (s, r) = self.attention_params_split();
        let h = self.hidden;
        let f = self.ffn_hidden;
        let up_out = (self.mlp_matrices() - 1) * f;
        let mut sharded = s + h * up_out + f * h;
        let mut replicated = r;
        if self.bias == Bias::All {
            sharded += up_out;
            replicated += h;
        }
        (sharded, replicated)
    }

    /// The attention block and the two norms of one layer as (tp-sharded, replicated): QKV and
    /// output projections with their biases, the norms, Qwen3's per-head Q/K norms.
    pub fn attention_params_split(&self) -> (u64, u64) {
        let h = self.hidden;
        let q = self.q_dim();
        let qkv_out = q + 2 * self.kv_dim();
        let mut sharded = h * qkv_out + q * h;
        let mut replicated = 2 * self.norm_params();
        if self.qk_norm {
            replicated += 2 * self.head_dim();
        }
        match self.bias {
            Bias::None => {}
            Bias::QkvOnly => sharded += qkv_out,
            Bias::All => {
                sharded += qkv_out;
                replicated += h;
            }
        }
        (sharded, replicated)
    }

    /// One MoE layer as (tp-sharded: attention and shared experts, replicated: norms, router,
    /// shared gate, routed experts: sharded over expert parallelism). `None` for a dense model.
    pub fn moe_layer_params_split(&self) -> Option<(u64, u64, u64)> {
        let moe = self.moe?;
        let (s, r) = self.attention_params_split();
        let (shared, router, routed) = moe_mlp_params(self.hidden, self.mlp_matrices(), &moe);
        Some((s + shared, r + router, routed))
    }

    /// Exact parameter count by part.
    pub fn params(&self) -> ParamCount {
        let h = self.hidden;
        let embedding = self.vocab * h + self.learned_positions * h;
        let (s, r) = self.layer_params_split();
        let dense = s + r;
        // A MoE model's `per_layer` is one MoE layer; `layers` adds its leading dense layers.
        let (per_layer, layers, routed_experts, inactive) =
            match (self.moe, self.moe_layer_params_split()) {
                (Some(moe), Some((ms, mr, me))) => {
                    let n = self.moe_layers();
                    let unused = (moe.experts - moe.top_k) * (me / moe.experts);
                    (
                        ms + mr + me,
                        n * (ms + mr + me) + moe.dense_layers * dense,
                        n * me,
                        n * unused,
                    )
                }
                _ => (dense, dense * self.layers, 0, 0),
            };
        let final_norm = self.norm_params();
        let head = if self.tied_embeddings {
            0
        } else {
            self.vocab * h
        };
        let total = embedding + layers + final_norm + head;
        ParamCount {
            embedding,
            per_layer,
            layers,
            final_norm,
            head,
            total,
            routed_experts,
            active: total - inactive,
        }
    }

    /// Checks that the shape is usable; names the field on failure.
    pub fn validate(&self) -> Result<()> {
        let pos = |field: &'static str, v: u64| {
            if v == 0 {
                Err(invalid(field, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        pos("layers", self.layers)?;
        pos("hidden", self.hidden)?;
        pos("heads", self.heads)?;
        pos("kv_heads", self.kv_heads)?;
        pos("ffn_hidden", self.ffn_hidden)?;
        pos("vocab", self.vocab)?;
        pos("seq_len", self.seq_len)?;
        if let Some(d) = self.head_dim {
            pos("head_dim", d)?;
        } else if !self.hidden.is_multiple_of(self.heads) {
            return Err(invalid(
                "heads",
                format!(
                    "hidden ({}) is not divisible by heads ({}); pick heads that divide hidden",
                    self.hidden, self.heads
                ),
            ));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(invalid(
                "kv_heads",
                format!(
                    "heads ({}) is not divisible by kv_heads ({}); GQA needs whole groups",
                    self.heads, self.kv_heads
                ),
            ));
        }
        let absurd = |field: &'static str, v: u64, max: u64| {
            if v > max {
                Err(invalid(
                    field,
                    format!("{v} is beyond any real model (limit {max}); check the units"),
                ))
            } else {
                Ok(())
            }
        };
        absurd("layers", self.layers, 100_000)?;
        absurd("hidden", self.hidden, 1 << 20)?;
        absurd("ffn_hidden", self.ffn_hidden, 1 << 22)?;
        absurd("vocab", self.vocab, 1 << 24)?;
        absurd("seq_len", self.seq_len, 1 << 24)?;
        if self.learned_positions > 0 && self.learned_positions < self.seq_len {
            return Err(invalid(
                "seq_len",
                format!(
                    "{} exceeds the model's {} learned positions; lower --seq-len",
                    self.seq_len, self.learned_positions
                ),
            ));
        }
        if let Some(moe) = &self.moe {
            moe.validate(self.layers)?;
        }
        Ok(())
    }
}

/// GPT-2/GPT-3/Megatron-style block: LayerNorm, GELU 4h MLP, biases, tied, learned positions.
pub(crate) fn gpt(
    name: &str,
    layers: u64,
    hidden: u64,
    heads: u64,
    vocab: u64,
    seq: u64,
) -> ModelSpec {
    ModelSpec {
        name: name.to_string(),
        layers,
        hidden,
        heads,
        kv_heads: heads,
        ffn_hidden: 4 * hidden,
        vocab,
        seq_len: seq,
        learned_positions: seq,
        tied_embeddings: true,
        mlp: Mlp::Gelu,
        norm: Norm::LayerNorm,
        bias: Bias::All,
        head_dim: None,
        qk_norm: false,
        moe: None,
    }
}

/// Llama-style block: RMSNorm, SwiGLU, no biases, rotary, untied.
#[allow(clippy::too_many_arguments)]
pub(crate) fn llama(
    name: &str,
    layers: u64,
    hidden: u64,
    heads: u64,
    kv_heads: u64,
    ffn: u64,
    vocab: u64,
    seq: u64,
) -> ModelSpec {
    ModelSpec {
        name: name.to_string(),
        layers,
        hidden,
        heads,
        kv_heads,
        ffn_hidden: ffn,
        vocab,
        seq_len: seq,
        learned_positions: 0,
        tied_embeddings: false,
        mlp: Mlp::Gated,
        norm: Norm::RmsNorm,
        bias: Bias::None,
        head_dim: None,
        qk_norm: false,
        moe: None,
    }
}

/// Every model preset name, in display order.
pub const MODEL_PRESETS: &[&str] = &[
    "gpt2-124m",
    "gpt2-350m",
    "gpt2-774m",
    "gpt2-1.5b",
    "gpt3-175b",
    "llama2-7b",
    "llama2-13b",
    "llama2-70b",
    "llama3-8b",
    "llama3-70b",
    "llama3-405b",
    "megatron-1.7b",
    "megatron-3.6b",
    "megatron-7.5b",
    "megatron-18.4b",
    "megatron-39.1b",
    "megatron-76.1b",
    "megatron-145.6b",
    "megatron-310.1b",
    "megatron-529.6b",
    "megatron-1t",
    "megatron-22b",
];

/// Looks up a model preset.
///
/// Sources: GPT-2 (Radford et al. 2019, Table 2; HF `gpt2*` configs), GPT-3 (Brown et al. 2020,
/// Table 2.1), Llama 2 (Touvron et al. 2023, Table 1 and HF configs), Llama 3 (Dubey et al. 2024,
/// Table 3), Megatron shapes (Narayanan et al. 2021, Table 1; vocabulary 51,200 and sequence 2,048
/// as in that paper), `megatron-22b` (Korthikanti et al. 2022, Table 3).
pub fn preset(name: &str) -> Result<ModelSpec> {
    let n = name.trim().to_ascii_lowercase();
    let m = match n.as_str() {
        "gpt2-124m" | "gpt2" => gpt("gpt2-124m", 12, 768, 12, 50257, 1024),
        "gpt2-350m" | "gpt2-medium" => gpt("gpt2-350m", 24, 1024, 16, 50257, 1024),
        "gpt2-774m" | "gpt2-large" => gpt("gpt2-774m", 36, 1280, 20, 50257, 1024),
        "gpt2-1.5b" | "gpt2-xl" => gpt("gpt2-1.5b", 48, 1600, 25, 50257, 1024),
        "gpt3-175b" => gpt("gpt3-175b", 96, 12288, 96, 50257, 2048),
        "llama2-7b" => llama("llama2-7b", 32, 4096, 32, 32, 11008, 32000, 4096),
        "llama2-13b" => llama("llama2-13b", 40, 5120, 40, 40, 13824, 32000, 4096),
        "llama2-70b" => llama("llama2-70b", 80, 8192, 64, 8, 28672, 32000, 4096),
        "llama3-8b" => llama("llama3-8b", 32, 4096, 32, 8, 14336, 128256, 8192),
        "llama3-70b" => llama("llama3-70b", 80, 8192, 64, 8, 28672, 128256, 8192),
        "llama3-405b" => llama("llama3-405b", 126, 16384, 128, 8, 53248, 128256, 8192),
        "megatron-1.7b" => gpt(&n, 24, 2304, 24, 51200, 2048),
        "megatron-3.6b" => gpt(&n, 30, 3072, 32, 51200, 2048),
        "megatron-7.5b" => gpt(&n, 36, 4096, 32, 51200, 2048),
        "megatron-18.4b" => gpt(&n, 40, 6144, 48, 51200, 2048),
        "megatron-39.1b" => gpt(&n, 48, 8192, 64, 51200, 2048),
        "megatron-76.1b" => gpt(&n, 60, 10240, 80, 51200, 2048),
        "megatron-145.6b" => gpt(&n, 80, 12288, 96, 51200, 2048),
        "megatron-310.1b" => gpt(&n, 96, 16384, 128, 51200, 2048),
        "megatron-529.6b" => gpt(&n, 105, 20480, 128, 51200, 2048),
        "megatron-1t" => gpt(&n, 128, 25600, 160, 51200, 2048),
        "megatron-22b" => gpt(&n, 48, 6144, 64, 51200, 2048),
        _ => {
            return Err(PlanError::UnknownPreset {
                kind: "model",
                name: name.to_string(),
                valid: MODEL_PRESETS.join(", "),
            })
        }
    };
    Ok(m)
}

/// Picks a standard GPT shape for a target parameter count.
///
/// Rule (documented in docs/estimator.md): the GPT-3 family keeps h ≈ 128·l (6.7B: 32×4096,
/// 175B: 96×12288; Brown et al. 2020, Table 2.1), and 12·l·h² ≈ N, so l₀ = cbrt(N / (12·128²))
/// and h = 128·l₀ rounded to a multiple of 1024 (head dim 128, heads a multiple of 8 so tp = 8
/// divides them) — or, below 2048, to a multiple of 256 with head dim 64. The depth is then solved
/// from the exact count 12·l·h² + 13·l·h + (V + s)·h = N and rounded to an even number.
/// Vocabulary 51,200, sequence 2,048, GELU 4h, LayerNorm, biases, tied embeddings.
/// Examples: 1.3B → 24 × 2048; 10B → 30 × 5120; 175B → 96 × 12288 (GPT-3's own shape).
pub fn from_params(target: f64) -> Result<ModelSpec> {
    if !(1e7..=1e14).contains(&target) {
        return Err(invalid(
            "--params",
            format!("{target:.3e} is outside 10M..100T; check the suffix (e.g. 10B)"),
        ));
    }
    let (vocab, seq) = (51200u64, 2048u64);
    let l0 = (target / (12.0 * 128.0 * 128.0)).cbrt();
    let h_real = 128.0 * l0;
    let (hidden, head_dim) = if h_real >= 2048.0 {
        ((((h_real / 1024.0).round() as u64) * 1024).max(2048), 128)
    } else {
        ((((h_real / 256.0).round() as u64) * 256).max(256), 64)
    };
    let h = hidden as f64;
    let l_real = (target - (vocab + seq) as f64 * h) / (12.0 * h * h + 13.0 * h);
    let layers = (((l_real / 2.0).round() as u64) * 2).max(2);
    let name = format!("gpt-{}", crate::units::count(target));
    Ok(gpt(&name, layers, hidden, hidden / head_dim, vocab, seq))
}

impl std::fmt::Display for Mlp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mlp::Gelu => "gelu",
            Mlp::Gated => "gated",
        })
    }
}

impl std::fmt::Display for Norm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Norm::LayerNorm => "layernorm",
            Norm::RmsNorm => "rmsnorm",
        })
    }
}

impl std::fmt::Display for Bias {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Bias::None => "no biases",
            Bias::QkvOnly => "QKV biases",
            Bias::All => "all biases",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_counts_for_known_models() {
        assert_eq!(preset("gpt2-124m").unwrap().params().total, 124_439_808);
        assert_eq!(preset("llama2-7b").unwrap().params().total, 6_738_415_616);
        assert_eq!(preset("llama3-8b").unwrap().params().total, 8_030_261_248);
        // Further published totals: GPT-2 XL 1,557,611,200; Llama-2-70B 68,976,648,192;
        // Llama-3-70B 70,553,706,496 (Hugging Face model cards / safetensors index).
        assert_eq!(preset("gpt2-1.5b").unwrap().params().total, 1_557_611_200);
        assert_eq!(preset("llama2-70b").unwrap().params().total, 68_976_648_192);
        assert_eq!(preset("llama3-70b").unwrap().params().total, 70_553_706_496);
    }

    #[test]
    fn megatron_table1_sizes_match_the_paper_rounding() {
        // Narayanan et al. 2021, Table 1 "number of parameters (billion)".
        for (name, billions) in [
            ("megatron-1.7b", 1.7),
            ("megatron-3.6b", 3.6),
            ("megatron-7.5b", 7.5),
            ("megatron-18.4b", 18.4),
            ("megatron-39.1b", 39.1),
            ("megatron-76.1b", 76.1),
            ("megatron-145.6b", 145.6),
            ("megatron-310.1b", 310.1),
            ("megatron-529.6b", 529.6),
            ("megatron-1t", 1008.0),
        ] {
            let p = preset(name).unwrap().params().total as f64 / 1e9;
            assert!(
                (p - billions).abs() / billions < 0.03,
                "{name}: {p}B vs {billions}B"
            );
        }
    }

    #[test]
    fn unknown_preset_lists_valid_ones() {
        let e = preset("gpt5").unwrap_err().to_string();
        assert!(e.contains("gpt5") && e.contains("llama3-8b"), "{e}");
    }

    #[test]
    fn params_rule_lands_near_target() {
        for target in [125e6, 350e6, 1.3e9, 3e9, 10e9, 30e9, 70e9, 175e9, 1e12] {
            let m = from_params(target).unwrap();
            m.validate().unwrap();
            let got = m.params().total as f64;
            assert!((got - target).abs() / target < 0.1, "{target}: {got}");
            assert_eq!(m.hidden % 256, 0);
        }
        let shape = |n: f64| {
            let m = from_params(n).unwrap();
            (m.layers, m.hidden, m.heads)
        };
        assert_eq!(shape(10e9), (30, 5120, 40));
        assert_eq!(shape(1.3e9), (24, 2048, 16));
        assert_eq!(shape(175e9), (96, 12288, 96));
    }
}
