//! The model part of [`SpecArgs`]: preset, `--params`, `--hf-config` or explicit dimensions,
//! then overrides, including the mixture-of-experts flags.

use anyhow::{bail, Context as _, Result};
use plan::model::{self, ModelSpec};
use plan::moe::MoeSpec;
use plan::units::parse_count;

use crate::spec::{read_text, SpecArgs};

impl SpecArgs {
    /// The model: preset, --params, --hf-config, then explicit dimensions on top.
    pub fn model(&self) -> Result<(ModelSpec, Option<String>)> {
        let sources = [
            self.model.is_some(),
            self.params.is_some(),
            self.hf_config.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if sources > 1 {
            bail!("give only one of --model, --params and --hf-config");
        }
        let explicit = self.layers.is_some() || self.hidden.is_some() || self.heads.is_some();
        let mut note = None;
        let mut m = if let Some(name) = &self.model {
            model::preset(name)?
        } else if let Some(p) = &self.params {
            let m = model::from_params(parse_count("--params", p)?)?;
            note = Some(format!(
                "--params {p}: chose a GPT shape of {} layers x {} hidden, {} heads (head dim 128), ffn {}, vocab {}, seq {} -> {} parameters (rule: h = 128 l, docs/estimator.md)",
                m.layers, m.hidden, m.heads, m.ffn_hidden, m.vocab, m.seq_len, plan::units::count(m.params().total as f64)
            ));
            m
        } else if let Some(path) = &self.hf_config {
            let text = read_text(path, "--hf-config")?;
            model::from_hf_config(&text)
                .with_context(|| format!("--hf-config {}", path.display()))?
        } else if explicit {
            let (Some(layers), Some(hidden), Some(heads)) = (self.layers, self.hidden, self.heads)
            else {
                bail!("explicit dimensions need at least --layers, --hidden and --heads (or start from --model PRESET)");
            };
            let mut m = model::preset("gpt2-124m")?;
            m.name = "custom".into();
            m.layers = layers;
            m.hidden = hidden;
            m.heads = heads;
            m.kv_heads = heads;
            m.ffn_hidden = 4 * hidden;
            m.vocab = 50304;
            m.seq_len = 2048;
            m.learned_positions = 2048;
            m
        } else {
            let m = model::from_params(10e9)?;
            note = Some(format!(
                "no model given: using --params 10B -> GPT shape {} layers x {} hidden, {} heads ({} parameters)",
                m.layers, m.hidden, m.heads, plan::units::count(m.params().total as f64)
            ));
            m
        };
        if explicit && (self.model.is_some() || self.params.is_some() || self.hf_config.is_some()) {
            m.name = format!("{} (modified)", m.name);
        }
        if let Some(v) = self.layers {
            m.layers = v;
        }
        if let Some(v) = self.hidden {
            m.hidden = v;
        }
        if let Some(v) = self.heads {
            m.heads = v;
            if self.kv_heads.is_none() && m.kv_heads > v {
                m.kv_heads = v;
            }
        }
        if let Some(v) = self.kv_heads {
            m.kv_heads = v;
        }
        if let Some(v) = self.ffn_hidden {
            m.ffn_hidden = v;
        }
        if let Some(v) = self.vocab {
            m.vocab = v;
        }
        if let Some(v) = self.seq_len {
            m.seq_len = v;
            if m.learned_positions > 0
                && v > m.learned_positions
                && (self.model.is_none() || explicit)
            {
                m.learned_positions = v;
            }
        }
        if let Some(v) = self.tied_embeddings {
            m.tied_embeddings = v;
        }
        if let Some(v) = &self.mlp {
            m.mlp = match v.as_str() {
                "gelu" => model::Mlp::Gelu,
                "gated" | "swiglu" => model::Mlp::Gated,
                _ => bail!("--mlp '{v}' is not one of gelu, gated"),
            };
        }
        if let Some(v) = &self.norm {
            m.norm = match v.as_str() {
                "layernorm" => model::Norm::LayerNorm,
                "rmsnorm" => model::Norm::RmsNorm,
                _ => bail!("--norm '{v}' is not one of layernorm, rmsnorm"),
            };
        }
        self.apply_moe(&mut m)?;
        m.validate()?;
        Ok((m, note))
    }

    /// `--experts`, `--top-k`, `--expert-ffn`, `--shared-expert-ffn`, `--capacity-factor`,
    /// `--dense-layers`: make the model MoE or change its experts.
    fn apply_moe(&self, m: &mut ModelSpec) -> Result<()> {
        let any = self.experts.is_some()
            || self.top_k.is_some()
            || self.expert_ffn.is_some()
            || self.shared_expert_ffn.is_some()
            || self.capacity_factor.is_some()
            || self.dense_layers.is_some();
        if !any {
            return Ok(());
        }
        let mut e = match (m.moe, self.experts) {
            (Some(e), _) => e,
            (None, Some(n)) => MoeSpec {
                experts: n,
                top_k: 2,
                expert_ffn: m.ffn_hidden,
                shared_ffn: 0,
                shared_gate: false,
                capacity_factor: None,
                dense_layers: 0,
            },
            (None, None) => bail!(
                "--top-k, --expert-ffn, --shared-expert-ffn, --capacity-factor and --dense-layers describe experts, but the model is dense; add --experts N"
            ),
        };
        if let Some(n) = self.experts {
            e.experts = n;
        }
        if let Some(k) = self.top_k {
            e.top_k = k;
        }
        if let Some(f) = self.expert_ffn {
            e.expert_ffn = f;
        }
        if let Some(f) = self.shared_expert_ffn {
            e.shared_ffn = f;
        }
        if let Some(c) = self.capacity_factor {
            e.capacity_factor = Some(c);
        }
        if let Some(d) = self.dense_layers {
            e.dense_layers = d;
        }
        if !m.name.contains("(modified)") && m.name != "custom" {
            m.name = format!("{} (modified)", m.name);
        }
        m.moe = Some(e);
        Ok(())
    }
}
