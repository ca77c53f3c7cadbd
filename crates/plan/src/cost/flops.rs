//! FLOPs per step: model FLOPs (forward + backward of the active parameters) and hardware
//! FLOPs (with recompute and capacity-factor padding).

use crate::explain::{line, Trace};
use crate::recipe::{CausalFlops, Recompute};
use crate::units::count;

use super::{Context, Flops};

impl Context {
    /// Model and hardware FLOPs of one step (global batch), whole cluster.
    pub fn flops<T: Trace>(&self, tr: &mut T) -> Flops {
        let m = &self.model;
        let r = &self.recipe;
        let (s, h, f, kv, v) = (
            m.seq_len as f64,
            m.hidden as f64,
            m.ffn_hidden as f64,
            m.kv_dim() as f64,
            m.vocab as f64,
        );
        let tokens = r.global_batch as f64 * s;
        let causal = match r.causal_flops {
            CausalFlops::Full => 1.0,
            CausalFlops::Half => 0.5,
        };
        // Forward FLOPs per token of one layer: projections 2h(q+2kv) + 2qh (q = a·d = h unless
        // the config sets head_dim), MLP 2·mats·h·f, attention scores and ·V 4·s·q (×causal).
        // A MoE layer's MLP: router 2hE, shared experts 2·mats·h·f_s, k routed experts
        // 2·mats·h·f_e each (model FLOPs; the hardware count adds the capacity factor's padding).
        let q = m.q_dim() as f64;
        let mats = m.mlp_matrices() as f64;
        let proj = 2.0 * h * (q + 2.0 * kv) + 2.0 * q * h;
        let dense_mlp = 2.0 * mats * h * f;
        let attn = 4.0 * s * q * causal;
        let (moe_share, moe_mlp, moe_pad) = match &m.moe {
            None => (0.0, 0.0, 0.0),
            Some(e) => {
                let routed = 2.0 * mats * h * e.expert_ffn as f64;
                (
                    m.moe_layers() as f64 / m.layers as f64,
                    2.0 * h * e.experts as f64
                        + 2.0 * mats * h * e.shared_ffn as f64
                        + e.top_k as f64 * routed,
                    (e.routed_copies() - e.top_k as f64) * routed,
                )
            }
        };
        let mlp = (1.0 - moe_share) * dense_mlp + moe_share * moe_mlp;
        let layer_fwd = proj + mlp + attn;
        let head_fwd = 2.0 * h * v;
        let l = m.layers as f64;
        let fwd_per_token = l * layer_fwd + head_fwd;
        let model_per_token = 3.0 * fwd_per_token;
        let recompute_per_token = match r.recompute {
            Recompute::None => 0.0,
            Recompute::Selective => {
                if r.flash_attention {
                    0.0
                } else {
                    l * attn
                }
            }
            Recompute::Full => l * layer_fwd,
        };
        // Capacity-factor padding (c > 1) is computed, dropped copies (c < 1) are not.
        let pad_per_token = 3.0 * l * moe_share * moe_pad;
        let recompute_pad = if r.recompute == Recompute::Full {
            pad_per_token / 3.0
        } else {
            0.0
        };
        let model = model_per_token * tokens;
        let hw = (model_per_token + recompute_per_token + pad_per_token + recompute_pad) * tokens;
        tr.line(|| line("flops", "forward FLOPs per token per layer", format!(
            "2h(q+2kv)+2qh + 2*{}*h*f + 4*s*q*{causal} = {:.4e} (h={h}, q={q}, kv={kv}, f={f}, s={s})", m.mlp_matrices(), layer_fwd), layer_fwd, "FLOP",
            "Narayanan et al. 2021 eq. 3 (24h^2 + 4sh per token for GPT)"));
        if let Some(e) = &m.moe {
            tr.line(|| line("flops", "MoE MLP forward FLOPs per token (one MoE layer)", format!(
                "router 2hE = 2x{h}x{} + shared 2x{}xhxf_s = 2x{}x{h}x{} + top-k {} x 2x{}xhxf_e (f_e = {}) = {moe_mlp:.4e}; {} of {} layers are MoE, the rest dense ({dense_mlp:.4e}); layer average used above",
                e.experts, m.mlp_matrices(), m.mlp_matrices(), e.shared_ffn, e.top_k, m.mlp_matrices(), e.expert_ffn, m.moe_layers(), m.layers),
                moe_mlp, "FLOP", "active parameters only: each token runs k experts (Fedus et al. 2021, Switch Transformer)"));
        }
        tr.line(|| line("flops", "model FLOPs per token", format!(
            "3 x (l({l}) x {layer_fwd:.4e} + 2hV {head_fwd:.4e}) = {model_per_token:.4e}; the 6N rule gives 6 x {} = {:.4e}{}", count(m.params().active as f64), 6.0 * m.params().active as f64,
            if m.moe.is_some() { " (N = active parameters)" } else { "" }),
            model_per_token, "FLOP", "backward = 2x forward (Kaplan et al. 2020)"));
        tr.line(|| {
            line(
                "flops",
                "model FLOPs per step",
                format!("{model_per_token:.4e} x {tokens} tokens = {model:.4e}"),
                model,
                "FLOP",
                "global batch x sequence",
            )
        });
        tr.line(|| {
            line(
                "flops",
                "hardware FLOPs per step",
                format!(
                    "model + recompute ({}) {:.4e}/token = {hw:.4e}",
                    r.recompute, recompute_per_token
                ),
                hw,
                "FLOP",
                "Korthikanti et al. 2022 §6 (HFU counts the recomputed forward)",
            )
        });
        Flops {
            model_per_step: model,
            hardware_per_step: hw,
            per_token: model_per_token,
        }
    }
}
