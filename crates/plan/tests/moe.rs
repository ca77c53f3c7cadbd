//! Mixture-of-experts with expert parallelism against hand-derived cases: FLOPs per token of the
//! active parameters, the all-to-all's bytes and time, expert weights sharded over ep, and the
//! layout rules.

use plan::explain::NoTrace;
use plan::model::from_hf_config;
use plan::recipe::{Optimizer, Precision};
use plan::{gpu_preset, Calibration, ClusterSpec, Context, Layout, LayoutRequest, Recipe};

const MIXTRAL: &str = r#"{"model_type":"mixtral","num_hidden_layers":32,"hidden_size":4096,
    "num_attention_heads":32,"num_key_value_heads":8,"intermediate_size":14336,
    "vocab_size":32000,"max_position_embeddings":4096,"num_local_experts":8,
    "num_experts_per_tok":2,"tie_word_embeddings":false}"#;

fn mixtral(gpus: u64) -> Context {
    Context {
        model: from_hf_config(MIXTRAL).unwrap(),
        cluster: ClusterSpec::new(gpu_preset("h100-sxm").unwrap(), gpus, None, None).unwrap(),
        recipe: Recipe::new(1e11, 64, Precision::Bf16Mixed, Optimizer::Adamw),
        calib: Calibration::default(),
    }
}

fn layout(c: &Context, dp: u64, tp: u64, ep: u64) -> Layout {
    LayoutRequest {
        dp: Some(dp),
        tp: Some(tp),
        ep: Some(ep),
        sp: tp > 1,
        zero: Some(1),
        ..Default::default()
    }
    .resolve(&c.model, dp * tp, c.recipe.global_batch)
    .unwrap()
}

/// Mixtral 8x7B at s = 4096, attention counted in full (Megatron's convention): per token and
/// layer, projections 2·4096·(4096 + 2·1024) + 2·4096² = 83,886,080; router 2·4096·8 = 65,536;
/// two experts 2 · 2·3·4096·14336 = 704,643,072; attention 4·4096·4096 = 67,108,864; sum
/// 855,703,552. × 32 layers + LM head 2·4096·32000 = 27,644,657,664 forward; × 3 =
/// 82,933,972,992 FLOPs per token: the active 12.9B parameters, not the total 46.7B.
#[test]
fn flops_count_active_experts() {
    let c = mixtral(8);
    let f = c.flops(&mut NoTrace);
    assert_eq!(f.per_token, 82_933_972_992.0);
    // With a capacity factor of 1.25 each expert pads to 1.25x its share: the hardware count
    // adds (2.5 − 2) · 2·3·4096·14336 = 176,160,768 FLOPs per layer forward, × 3 × 32 per token.
    let mut c = c;
    c.model.moe.as_mut().unwrap().capacity_factor = Some(1.25);
    let f = c.flops(&mut NoTrace);
    assert_eq!(f.per_token, 82_933_972_992.0);
    let tokens = 64.0 * 4096.0;
    let pad = 3.0 * 32.0 * 176_160_768.0 * tokens;
    assert_eq!(f.hardware_per_step - f.model_per_step, pad);
}

/// One node of 8 H100s, dp 8, ep 8, micro-batch 1: each rank routes 4096 tokens to 2 experts,
/// 8192 copies of 4096 bf16 values; 7/8 of them leave the rank: 8192·4096·2·7/8 = 58,720,256
/// bytes per all-to-all over NVLink at 450 GB/s × 0.77, plus 7 latencies. Forward: dispatch and
/// combine (2 all-to-alls); backward the same.
#[test]
fn all_to_all_bytes_and_time_by_hand() {
    let c = mixtral(8);
    let l = layout(&c, 8, 1, 8);
    let lt = c.layer_times(&l);
    let g = &c.cluster.gpu;
    let bytes = 8192.0 * 4096.0 * 2.0 * 7.0 / 8.0;
    assert_eq!(bytes, 58_720_256.0);
    let one = bytes / (g.intra_node_bw * c.calib.intra_eff) + 7.0 * g.intra_node_latency;
    assert!(
        (lt.ep_fwd - 2.0 * one).abs() < 1e-12 * one,
        "{} vs {}",
        lt.ep_fwd,
        2.0 * one
    );
    assert_eq!(lt.ep_fwd, lt.ep_bwd);
    // ep = 1: no all-to-all.
    assert_eq!(c.layer_times(&layout(&c, 8, 1, 1)).ep_fwd, 0.0);
    // The step's all-to-all: 32 layers × 64/8 micro-batches × (fwd + bwd).
    let e = c.evaluate(&l, &mut NoTrace);
    let want = 8.0 * 32.0 * (lt.ep_fwd + lt.ep_bwd);
    assert!((e.time.ep_comm - want).abs() < 1e-9 * want);
}

/// The all-to-all's time grows with ep: more of each rank's tokens leave it ((ep−1)/ep), and
/// beyond a node (ep 16 on 2 nodes) most of them cross the network.
#[test]
fn all_to_all_grows_with_ep() {
    let c = mixtral(16);
    let mut c = c;
    c.model.moe.as_mut().unwrap().experts = 16;
    let times: Vec<f64> = [2u64, 4, 8, 16]
        .iter()
        .map(|&ep| c.layer_times(&layout(&c, 16, 1, ep)).ep_fwd)
        .collect();
    for w in times.windows(2) {
        assert!(w[1] > w[0], "{times:?}");
    }
    // Crossing the node boundary costs more than the (ep−1)/ep growth alone: 16 vs 8 ranks.
    assert!(times[3] > 2.0 * times[2], "{times:?}");
}

/// Expert weights are split over ep; everything else is not: per device the routed experts are
/// 32 · 1,409,286,144 / ep parameters, and the rest (attention, norms, router, embedding, head)
/// stays 46,702,792,704 − 32 · 1,409,286,144 = 1,605,636,096.
#[test]
fn expert_weights_shard_over_ep() {
    let c = mixtral(8);
    for ep in [1u64, 2, 4, 8] {
        let m = c.memory(&layout(&c, 8, 1, ep), &mut NoTrace);
        assert_eq!(
            m.expert_params_on_device,
            32.0 * 1_409_286_144.0 / ep as f64
        );
        assert_eq!(
            m.params_on_device - m.expert_params_on_device,
            1_605_636_096.0
        );
    }
    let m1 = c.memory(&layout(&c, 8, 1, 1), &mut NoTrace);
    let m8 = c.memory(&layout(&c, 8, 1, 8), &mut NoTrace);
    assert!(m8.weights < m1.weights / 4.0);
}

#[test]
fn layout_rules_name_the_fix() {
    let c = mixtral(16);
    let err =
        |req: LayoutRequest, gpus: u64| req.resolve(&c.model, gpus, 64).unwrap_err().to_string();
    let e = err(
        LayoutRequest {
            ep: Some(3),
            ..Default::default()
        },
        8,
    );
    assert!(e.contains("experts (8) are not divisible by ep(3)"), "{e}");
    let e = err(
        LayoutRequest {
            tp: Some(2),
            pp: Some(4),
            ep: Some(8),
            sp: true,
            ..Default::default()
        },
        16,
    );
    assert!(
        e.contains("ep(8) must divide tp(2) * cp(1) * dp(2) = 4"),
        "{e}"
    );
    let e = err(
        LayoutRequest {
            tp: Some(2),
            ep: Some(4),
            ..Default::default()
        },
        16,
    );
    assert!(e.contains("--sequence-parallel"), "{e}");
    let dense = plan::preset("llama3-8b").unwrap();
    let e = LayoutRequest {
        ep: Some(2),
        ..Default::default()
    }
    .resolve(&dense, 8, 64)
    .unwrap_err()
    .to_string();
    assert!(e.contains("needs a mixture-of-experts model"), "{e}");
}

/// The routed path's empirical cost (`expert_secs_per_copy`, fitted per GPU): Mixtral on 8 H100s,
/// dp 8, ep 8, micro-batch 1 routes 4096 tokens · top-2 = 8192 token copies per rank and layer,
/// so forward + backward grow by exactly 8192 · 2.92e-7 s = 2.392064 ms (a third in forward)
/// against the same GPU without the term. A dense model has no such term.
#[test]
fn expert_cost_per_token_copy_by_hand() {
    let mut c = mixtral(8);
    let l = layout(&c, 8, 1, 8);
    let with = c.layer_times(&l);
    assert_eq!(c.cluster.gpu.expert_secs_per_copy, 2.92e-7);
    c.cluster.gpu.expert_secs_per_copy = 0.0;
    let without = c.layer_times(&l);
    let want: f64 = 8192.0 * 2.92e-7;
    assert!((want - 2.392_064e-3).abs() < 1e-12);
    assert!(((with.fwd - without.fwd) - want / 3.0).abs() < 1e-12);
    assert!(((with.bwd - without.bwd) - 2.0 * want / 3.0).abs() < 1e-12);
    let mut dense = c.clone();
    dense.model.moe = None;
    let a = dense.layer_times(&l);
    dense.cluster.gpu.expert_secs_per_copy = 1.0;
    assert_eq!(a, dense.layer_times(&l));
}

/// With the all-to-alls overlapped with another micro-batch's compute (`ep_comm_overlap`), only
/// what the layer's forward + backward cannot cover is exposed: max(0, 4 all-to-alls − fwd −
/// bwd), half on each side. Mixtral at ep 16 over two H100 nodes: the all-to-all (about 2 ms a
/// side) hides completely behind the layer's compute; with a network 20 times slower it does not.
#[test]
fn overlapped_all_to_all_exposes_only_the_excess() {
    let mut c = mixtral(16);
    c.model.moe.as_mut().unwrap().experts = 16;
    let net = c.cluster.gpu.network_bw;
    for (slower, hidden) in [(1.0, true), (20.0, false)] {
        c.cluster.gpu.network_bw = net / slower;
        c.recipe.ep_comm_overlap = false;
        let l = layout(&c, 16, 1, 16);
        let plain = c.layer_times(&l);
        c.recipe.ep_comm_overlap = true;
        let over = c.layer_times(&l);
        let want = (plain.ep_fwd + plain.ep_bwd - plain.fwd - plain.bwd).max(0.0) / 2.0;
        assert_eq!(over.ep_fwd, want);
        assert_eq!(over.ep_bwd, want);
        assert_eq!((over.fwd, over.bwd), (plain.fwd, plain.bwd));
        assert_eq!(
            want == 0.0,
            hidden,
            "{slower}x: exposed {want}, plain {}",
            plain.ep_fwd
        );
        assert!(over.ep_fwd < plain.ep_fwd);
    }
}
