//! The packed weight panels the trainer keeps for a step of several micro-batches
//! (`kernels::panels`): each linear weight packed once per step for forward (`wᵀ`) and once
//! for the input gradient (`w`) instead of once per micro-batch and matmul.

use super::{CpuRuntimeDims, F32_BYTES};

/// Columns of the GEMM kernel's panels (`kernels::avx512::NR`): a packed `k × n` operand
/// holds `k · ⌈n/32⌉·32` floats.
const PANEL: u64 = 32;

/// Floats both packings of one `(n, k)` weight hold: `⌈n⌉·k + ⌈k⌉·n` (`⌈·⌉` rounds up to 32).
pub fn weight_panel_floats(n: u64, k: u64) -> u64 {
    n.div_ceil(PANEL) * PANEL * k + k.div_ceil(PANEL) * PANEL * n
}

/// Bytes of the weight panels of one stage/rank: per layer `c_attn` (3cl, c), attention
/// `c_proj` (c, cl), `c_fc` (4cl, c), MLP `c_proj` (c, 4cl), and on the last stage the tied LM
/// head (vpl, c). About twice the linear weights; held only by runs whose step has more than
/// one micro-batch in fp32 on the AVX-512 kernel (the trainer's report says when).
pub fn weight_panel_bytes(d: &CpuRuntimeDims) -> u64 {
    let (c, cl, vpl) = (d.channels, d.channels / d.tp, d.padded_vocab / d.tp);
    let per_layer = weight_panel_floats(3 * cl, c)
        + weight_panel_floats(c, cl)
        + weight_panel_floats(4 * cl, c)
        + weight_panel_floats(c, 4 * cl);
    let head = if d.has_head {
        weight_panel_floats(vpl, c)
    } else {
        0
    };
    F32_BYTES * (d.layers * per_layer + head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panels_are_twice_the_linear_weights_when_shapes_are_multiples_of_32() {
        let d = CpuRuntimeDims {
            padded_vocab: 64,
            max_seq_len: 128,
            channels: 256,
            heads: 4,
            layers: 2,
            has_embedding: true,
            has_head: true,
            tp: 1,
        };
        let linear = 2 * 12 * 256 * 256 + 64 * 256;
        assert_eq!(weight_panel_bytes(&d), F32_BYTES * 2 * linear);
        // Padding: a 45 × 300 weight packs 64 · 300 + 320 · 45 floats.
        assert_eq!(weight_panel_floats(45, 300), 64 * 300 + 320 * 45);
        let no_head = CpuRuntimeDims {
            has_head: false,
            ..d
        };
        assert_eq!(
            weight_panel_bytes(&no_head),
            F32_BYTES * 2 * 2 * 12 * 256 * 256
        );
    }
}
