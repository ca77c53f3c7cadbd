//! Mixture-of-experts: the expert part of a model's shape, its parameter counts (total and
//! active per token), and the Hugging Face config keys that describe it.
//!
//! Legend: E = routed experts, k = experts per token (top-k), f_e = one routed expert's FFN width,
//! f_s = the shared experts' total FFN width, c = capacity factor, mats = 2 (GELU) or 3 (gated)
//! matrices per MLP, h = hidden.
//!
//! A MoE layer replaces the dense MLP by a router (h·E weights, Shazeer et al. 2017; Fedus et al.
//! 2021 "Switch Transformer"), E routed experts of mats·h·f_e each, and optionally always-active
//! shared experts (DeepSeekMoE, Dai et al. 2024) of total width f_s. Each token runs its k routed
//! experts and the shared ones: active parameters per token count k experts, not E.

use serde::{Deserialize, Serialize};

use crate::error::{invalid, PlanError, Result};

/// The expert part of a model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MoeSpec {
    /// E: routed experts per MoE layer.
    pub experts: u64,
    /// k: routed experts each token uses.
    pub top_k: u64,
    /// f_e: FFN inner width of one routed expert.
    pub expert_ffn: u64,
    /// f_s: total FFN inner width of the shared (always active) experts, 0 for none
    /// (DeepSeek: n_shared_experts · moe_intermediate_size; Qwen2-MoE:
    /// shared_expert_intermediate_size).
    pub shared_ffn: u64,
    /// The shared expert's output is scaled by a sigmoid gate of h weights (Qwen2-MoE).
    pub shared_gate: bool,
    /// Capacity factor c: each expert processes at most c·(tokens·k/E) tokens, padded to it
    /// (GShard / Switch Transformer). `None` = dropless (every routed token is computed once; what
    /// Megatron-LM's MoE benchmarks run, with balanced routing).
    pub capacity_factor: Option<f64>,
    /// The first this-many layers keep the dense MLP (DeepSeek's `first_k_dense_replace`).
    pub dense_layers: u64,
}

impl MoeSpec {
    /// Token copies computed per routed token: k·c with a capacity factor (padding included,
    /// dropped tokens excluded), k when dropless.
    pub fn routed_copies(&self) -> f64 {
        self.top_k as f64 * self.capacity_factor.unwrap_or(1.0)
    }

    /// Checks the expert fields; names the field on failure.
    pub fn validate(&self, layers: u64) -> Result<()> {
        if self.experts < 2 {
            return Err(invalid(
                "experts",
                "a mixture of experts needs at least 2 experts",
            ));
        }
        if self.top_k == 0 || self.top_k > self.experts {
            return Err(invalid(
                "top_k",
                format!(
                    "{} experts per token is not in 1..={} (the number of experts)",
                    self.top_k, self.experts
                ),
            ));
        }
        if self.expert_ffn == 0 {
            return Err(invalid("expert_ffn", "must be at least 1"));
        }
        if self.experts > 1 << 16 {
            return Err(invalid(
                "experts",
                format!(
                    "{} is beyond any real model (limit 65536); check the value",
                    self.experts
                ),
            ));
        }
        if let Some(c) = self.capacity_factor {
            if !(c.is_finite() && c > 0.0 && c <= 64.0) {
                return Err(invalid(
                    "capacity_factor",
                    format!("{c} must be in (0, 64]; omit it for dropless routing"),
                ));
            }
        }
        if self.dense_layers >= layers {
            return Err(invalid(
                "dense_layers",
                format!(
                    "{} dense layers leave no MoE layer of {layers}; lower it",
                    self.dense_layers
                ),
            ));
        }
        Ok(())
    }
}

/// Parameters of one MoE layer beside the attention block, split like
/// [`crate::model::ModelSpec::layer_params_split`]: (tensor-parallel-sharded: the shared experts,
/// replicated: router and shared gate, routed experts: sharded over expert parallelism).
pub fn moe_mlp_params(h: u64, mats: u64, moe: &MoeSpec) -> (u64, u64, u64) {
    let shared = mats * h * moe.shared_ffn;
    let router = h * moe.experts + if moe.shared_gate { h } else { 0 };
    let routed = moe.experts * mats * h * moe.expert_ffn;
    (shared, router, routed)
}

/// Reads the expert fields of a Hugging Face config: Mixtral (`num_local_experts`,
/// `num_experts_per_tok`, `intermediate_size` per expert), Qwen-MoE (`num_experts`,
/// `moe_intermediate_size`, `shared_expert_intermediate_size`) and DeepSeek-MoE
/// (`n_routed_experts`, `n_shared_experts`, `moe_intermediate_size`, `first_k_dense_replace`).
/// `None` when the config has no experts.
pub fn from_hf(
    model_type: &str,
    obj: &serde_json::Map<String, serde_json::Value>,
) -> Result<Option<MoeSpec>> {
    let get = |k: &str| obj.get(k).and_then(|x| x.as_u64());
    let need = |k: &str| {
        get(k).ok_or_else(|| {
            PlanError::HfConfig(format!(
                "model_type '{model_type}' needs the positive integer key '{k}'"
            ))
        })
    };
    let spec = match model_type {
        "mixtral" => MoeSpec {
            experts: need("num_local_experts")?,
            top_k: need("num_experts_per_tok")?,
            expert_ffn: need("intermediate_size")?,
            shared_ffn: 0,
            shared_gate: false,
            capacity_factor: None,
            dense_layers: 0,
        },
        "qwen2_moe" | "qwen3_moe" => {
            if get("decoder_sparse_step").is_some_and(|s| s != 1)
                || obj
                    .get("mlp_only_layers")
                    .and_then(|x| x.as_array())
                    .is_some_and(|a| !a.is_empty())
            {
                return Err(PlanError::HfConfig(
                    "decoder_sparse_step != 1 or a non-empty mlp_only_layers (dense layers between MoE layers) is not modelled; only leading dense layers are".into(),
                ));
            }
            let shared = get("shared_expert_intermediate_size").unwrap_or(0);
            MoeSpec {
                experts: need("num_experts")?,
                top_k: need("num_experts_per_tok")?,
                expert_ffn: need("moe_intermediate_size")?,
                shared_ffn: shared,
                shared_gate: shared > 0,
                capacity_factor: None,
                dense_layers: 0,
            }
        }
        "deepseek" => {
            if get("moe_layer_freq").is_some_and(|f| f != 1) {
                return Err(PlanError::HfConfig(
                    "moe_layer_freq != 1 (dense layers between MoE layers) is not modelled".into(),
                ));
            }
            let f_e = need("moe_intermediate_size")?;
            MoeSpec {
                experts: need("n_routed_experts")?,
                top_k: need("num_experts_per_tok")?,
                expert_ffn: f_e,
                shared_ffn: get("n_shared_experts").unwrap_or(0) * f_e,
                shared_gate: false,
                capacity_factor: None,
                dense_layers: get("first_k_dense_replace").unwrap_or(0),
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(spec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let ok = MoeSpec {
            experts: 8,
            top_k: 2,
            expert_ffn: 14336,
            shared_ffn: 0,
            shared_gate: false,
            capacity_factor: None,
            dense_layers: 0,
        };
        ok.validate(32).unwrap();
        let e = MoeSpec { top_k: 9, ..ok }.validate(32).unwrap_err();
        assert!(e.to_string().contains("top_k"), "{e}");
        let e = MoeSpec {
            capacity_factor: Some(0.0),
            ..ok
        }
        .validate(32)
        .unwrap_err();
        assert!(e.to_string().contains("capacity_factor"), "{e}");
        let e = MoeSpec {
            dense_layers: 32,
            ..ok
        }
        .validate(32)
        .unwrap_err();
        assert!(e.to_string().contains("dense_layers"), "{e}");
        assert_eq!(
            MoeSpec {
                capacity_factor: Some(1.25),
                ..ok
            }
            .routed_copies(),
            2.5
        );
    }
}
