//! Hugging Face `config.json` → [`ModelSpec`]: dense (gpt2, llama, mistral, qwen2, qwen3) and
//! mixture-of-experts (mixtral, qwen2_moe, qwen3_moe, deepseek) configs.

use crate::error::{PlanError, Result};
use crate::model::{gpt, llama, Bias, ModelSpec};

/// The `model_type`s [`from_hf_config`] reads.
pub const SUPPORTED_HF: &str =
    "gpt2, llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe, deepseek";

/// Reads a Hugging Face `config.json` (gpt2, llama, mistral, qwen2/3 keys; MoE: mixtral,
/// qwen2_moe, qwen3_moe, deepseek — see [`crate::moe::from_hf`]) from its text.
pub fn from_hf_config(json: &str) -> Result<ModelSpec> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| PlanError::HfConfig(format!("not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| PlanError::HfConfig("top level must be a JSON object".into()))?;
    let get = |keys: &[&str]| -> Option<u64> {
        keys.iter()
            .find_map(|k| obj.get(*k).and_then(|x| x.as_u64()))
    };
    let need = |keys: &[&str]| -> Result<u64> {
        get(keys).ok_or_else(|| {
            PlanError::HfConfig(format!(
                "missing positive integer key '{}' (or {:?})",
                keys[0],
                &keys[1..]
            ))
        })
    };
    let model_type = obj
        .get("model_type")
        .and_then(|x| x.as_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let spec = match model_type.as_str() {
        "gpt2" => {
            let h = need(&["n_embd", "hidden_size"])?;
            let positions = need(&["n_positions", "n_ctx", "max_position_embeddings"])?;
            let mut m = gpt(
                "hf:gpt2",
                need(&["n_layer", "num_hidden_layers"])?,
                h,
                need(&["n_head", "num_attention_heads"])?,
                need(&["vocab_size"])?,
                positions,
            );
            if let Some(inner) = get(&["n_inner"]) {
                m.ffn_hidden = inner;
            }
            m.tied_embeddings = obj
                .get("tie_word_embeddings")
                .and_then(|x| x.as_bool())
                .unwrap_or(true);
            m
        }
        "llama" | "mistral" | "qwen2" | "qwen3" | "mixtral" | "qwen2_moe" | "qwen3_moe"
        | "deepseek" => {
            let heads = need(&["num_attention_heads"])?;
            let mut m = llama(
                &format!("hf:{model_type}"),
                need(&["num_hidden_layers"])?,
                need(&["hidden_size"])?,
                heads,
                get(&["num_key_value_heads"]).unwrap_or(heads),
                need(&["intermediate_size"])?,
                need(&["vocab_size"])?,
                need(&["max_position_embeddings"])?.min(8192),
            );
            m.tied_embeddings = obj
                .get("tie_word_embeddings")
                .and_then(|x| x.as_bool())
                .unwrap_or(false);
            if model_type == "qwen2" || model_type == "qwen2_moe" {
                m.bias = Bias::QkvOnly;
            }
            if model_type.starts_with("qwen3") {
                m.qk_norm = true;
                if obj.get("attention_bias").and_then(|x| x.as_bool()) == Some(true) {
                    m.bias = Bias::QkvOnly;
                }
            }
            if let Some(d) = get(&["head_dim"]) {
                if d * heads != m.hidden {
                    m.head_dim = Some(d);
                }
            }
            m.moe = crate::moe::from_hf(&model_type, obj)?;
            m
        }
        "deepseek_v2" | "deepseek_v3" => {
            return Err(PlanError::HfConfig(format!(
                "model_type '{model_type}' uses multi-head latent attention (kv_lora_rank), which is not modelled; \
                 DeepSeek-MoE configs with standard attention (model_type 'deepseek') are"
            )))
        }
        "" => {
            return Err(PlanError::HfConfig(format!(
                "no 'model_type' key; supported: {SUPPORTED_HF}"
            )))
        }
        other => {
            return Err(PlanError::HfConfig(format!(
                "model_type '{other}' is not supported; supported: {SUPPORTED_HF}"
            )))
        }
    };
    spec.validate()
        .map_err(|e| PlanError::HfConfig(format!("config describes an invalid model: {e}")))?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_configs_parse() {
        let gpt2 = r#"{"model_type":"gpt2","n_layer":12,"n_embd":768,"n_head":12,"vocab_size":50257,"n_positions":1024}"#;
        assert_eq!(from_hf_config(gpt2).unwrap().params().total, 124_439_808);
        let llama = r#"{"model_type":"llama","num_hidden_layers":32,"hidden_size":4096,
            "num_attention_heads":32,"num_key_value_heads":8,"intermediate_size":14336,
            "vocab_size":128256,"max_position_embeddings":8192,"tie_word_embeddings":false}"#;
        assert_eq!(from_hf_config(llama).unwrap().params().total, 8_030_261_248);
        // Qwen2-0.5B: 494,032,768 parameters (tied, QKV biases).
        let qwen = r#"{"model_type":"qwen2","num_hidden_layers":24,"hidden_size":896,
            "num_attention_heads":14,"num_key_value_heads":2,"intermediate_size":4864,
            "vocab_size":151936,"max_position_embeddings":32768,"tie_word_embeddings":true}"#;
        assert_eq!(from_hf_config(qwen).unwrap().params().total, 494_032_768);
    }

    #[test]
    fn hf_config_errors_are_clear() {
        let e = from_hf_config("{").unwrap_err().to_string();
        assert!(e.contains("not JSON"), "{e}");
        let e = from_hf_config(r#"{"model_type":"bert"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bert") && e.contains("supported"), "{e}");
        let e = from_hf_config(r#"{"model_type":"llama","hidden_size":4096}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_attention_heads"), "{e}");
    }

    #[test]
    fn moe_configs_count_total_and_active_parameters() {
        // Mixtral-8x7B (HF config): per layer attention 4096·(4096+2·1024) + 4096² = 41,943,040,
        // norms 8,192, router 4096·8 = 32,768, experts 8·3·4096·14336 = 1,409,286,144 →
        // 1,451,270,144 × 32 layers + embedding and head 2·32000·4096 + final norm 4,096
        // = 46,702,792,704 (the published 46.7B). Active: 6 unused experts of 176,160,768
        // per layer → 46,702,792,704 − 32·1,056,964,608 = 12,879,925,248 (published 12.9B).
        let mixtral = r#"{"model_type":"mixtral","num_hidden_layers":32,"hidden_size":4096,
            "num_attention_heads":32,"num_key_value_heads":8,"intermediate_size":14336,
            "vocab_size":32000,"max_position_embeddings":32768,"num_local_experts":8,
            "num_experts_per_tok":2,"tie_word_embeddings":false}"#;
        let m = from_hf_config(mixtral).unwrap();
        let p = m.params();
        assert_eq!(p.total, 46_702_792_704);
        assert_eq!(p.active, 12_879_925_248);
        assert_eq!(p.routed_experts, 32 * 1_409_286_144);
        // Qwen3-30B-A3B: head_dim 128 with 32 heads (queries 4096 wide on hidden 2048), per-head
        // Q/K RMSNorm (2·128), 128 experts of 3·2048·768, top 8. Per layer: attention
        // 2048·(4096+2·512) + 4096·2048 = 18,874,368, norms 4,096 + 256, router 262,144, experts
        // 603,979,776 → 623,120,640 × 48 + 2·151936·2048 + 2,048 = 30,532,122,624 (published
        // 30.5B); active 30,532,122,624 − 48·120·4,718,592 = 3,353,032,704 (published 3.3B).
        let qwen3 = r#"{"model_type":"qwen3_moe","num_hidden_layers":48,"hidden_size":2048,
            "num_attention_heads":32,"num_key_value_heads":4,"head_dim":128,"intermediate_size":6144,
            "moe_intermediate_size":768,"num_experts":128,"num_experts_per_tok":8,
            "vocab_size":151936,"max_position_embeddings":40960,"tie_word_embeddings":false,
            "decoder_sparse_step":1,"mlp_only_layers":[]}"#;
        let m = from_hf_config(qwen3).unwrap();
        assert_eq!((m.q_dim(), m.head_dim()), (4096, 128));
        assert_eq!(m.params().total, 30_532_122_624);
        assert_eq!(m.params().active, 3_353_032_704);
        // DeepSeek-MoE style: 2 shared experts of the expert width, the first layer dense.
        let ds = r#"{"model_type":"deepseek","num_hidden_layers":4,"hidden_size":64,
            "num_attention_heads":4,"num_key_value_heads":4,"intermediate_size":256,
            "moe_intermediate_size":32,"n_routed_experts":8,"n_shared_experts":2,
            "num_experts_per_tok":2,"first_k_dense_replace":1,"vocab_size":100,
            "max_position_embeddings":128}"#;
        let m = from_hf_config(ds).unwrap();
        let moe = m.moe.unwrap();
        assert_eq!(
            (moe.shared_ffn, moe.dense_layers, m.moe_layers()),
            (64, 1, 3)
        );
        // attention 4·64² = 16,384 + norms 128; dense MLP 3·64·256 = 49,152; MoE MLP: shared
        // 3·64·64 = 12,288, router 512, routed 8·3·64·32 = 49,152. Layers: dense 16,512 + 49,152
        // = 65,664, MoE 16,512 + 12,288 + 512 + 49,152 = 78,464; 65,664 + 3·78,464 = 301,056;
        // embedding + head 2·6,400, final norm 64.
        assert_eq!(m.params().total, 301_056 + 12_800 + 64);
        // 6 of 8 routed experts unused per MoE layer: 3 layers · 6 · 6,144 = 110,592.
        assert_eq!(m.params().active, 301_056 + 12_800 + 64 - 110_592);
    }

    #[test]
    fn mla_configs_are_refused_with_the_reason() {
        let e = from_hf_config(r#"{"model_type":"deepseek_v3","kv_lora_rank":512}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("latent attention") && e.contains("deepseek"),
            "{e}"
        );
        let e = from_hf_config(
            r#"{"model_type":"mixtral","num_hidden_layers":2,"hidden_size":64,
            "num_attention_heads":4,"intermediate_size":128,"vocab_size":100,
            "max_position_embeddings":64,"num_experts_per_tok":2}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("num_local_experts"), "{e}");
    }
}
