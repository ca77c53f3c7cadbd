//! Whole-model checks: finite differences through forward/backward, pipeline stages compose to
//! the full model, backward accumulates. Tensor parallelism: `tensor_parallel.rs`.

use kernels::rng::Rng;
use kernels::Par;
use model::{
    backward, backward_into, forward, Activations, GradInput, GradSink, ModelConfig, NoTp,
    ParamLayout, Shard, StageInput,
};

fn tiny() -> ModelConfig {
    ModelConfig {
        vocab_size: 50,
        max_seq_len: 8,
        n_layer: 3,
        n_head: 4,
        channels: 16,
    }
}

fn data(cfg: &ModelConfig, n: usize, seed: u64) -> (Vec<u32>, Vec<u32>) {
    let mut rng = Rng::new(seed);
    let v = cfg.vocab_size as u64;
    (
        (0..n).map(|_| rng.below(v) as u32).collect(),
        (0..n).map(|_| rng.below(v) as u32).collect(),
    )
}

/// Parameters with larger values than GPT-2's init, so gradients are well above f32 noise.
fn big_params(layout: &ParamLayout, seed: u64) -> Vec<f32> {
    let mut p = layout.init_params(seed);
    let mut rng = Rng::new(seed + 1);
    for x in p.iter_mut() {
        *x += 0.3 * rng.normal() as f32;
    }
    p
}

fn loss_and_grads(
    layout: &ParamLayout,
    params: &[f32],
    b: usize,
    t: usize,
    tokens: &[u32],
    targets: &[u32],
) -> (f32, Vec<f32>) {
    let mut acts = Activations::new(layout, b, t);
    let loss = forward(
        layout,
        params,
        &mut acts,
        StageInput::Tokens(tokens),
        Some(targets),
        Par::Threads(2),
        &mut NoTp,
    )
    .unwrap()
    .unwrap();
    let mut grads = vec![0.0; layout.len()];
    let d_loss = 1.0 / (b * t) as f32;
    backward(
        layout,
        params,
        &mut grads,
        &mut acts,
        StageInput::Tokens(tokens),
        GradInput::Loss { targets, d_loss },
        Par::Threads(2),
        &mut NoTp,
    )
    .unwrap();
    (loss, grads)
}

#[test]
fn whole_model_gradients_match_finite_differences() {
    let cfg = tiny();
    let layout = ParamLayout::new(&cfg, &Shard::full(&cfg)).unwrap();
    let (b, t) = (2, 5);
    let (tokens, targets) = data(&cfg, b * t, 1);
    let mut params = big_params(&layout, 3);
    // padded vocabulary rows stay zero (they carry no loss)
    let wte = layout.embed.as_ref().unwrap().wte.clone();
    params[wte.start + 50 * 16..wte.end].fill(0.0);
    let (_, grads) = loss_and_grads(&layout, &params, b, t, &tokens, &targets);
    assert!(
        grads[wte.start + 50 * 16..wte.end]
            .iter()
            .all(|&g| g == 0.0),
        "padded rows got gradient"
    );
    let mut rng = Rng::new(9);
    let eps = 1e-2f32;
    let mut checked = 0;
    for tensor in &layout.tensors {
        let r = tensor.range();
        for _ in 0..4 {
            let i = r.start + rng.below(r.len() as u64) as usize;
            if i >= wte.start + 50 * 16 && i < wte.end {
                continue;
            }
            let orig = params[i];
            let mut eval = |x: f32| {
                params[i] = x;
                let mut acts = Activations::new(&layout, b, t);
                let l = forward(
                    &layout,
                    &params,
                    &mut acts,
                    StageInput::Tokens(&tokens),
                    Some(&targets),
                    Par::Seq,
                    &mut NoTp,
                );
                l.unwrap().unwrap() as f64
            };
            let numeric = (eval(orig + eps) - eval(orig - eps)) / (2.0 * eps as f64);
            params[i] = orig;
            let analytic = grads[i] as f64;
            assert!(
                (analytic - numeric).abs() <= 2e-3 + 2e-2 * numeric.abs(),
                "{}[{}]: analytic {analytic}, finite-difference {numeric}",
                tensor.name,
                i - r.start
            );
            checked += 1;
        }
    }
    assert!(checked > 100);
}

#[test]
fn pipeline_stages_compose_to_the_full_model() {
    let cfg = tiny();
    let full = ParamLayout::new(&cfg, &Shard::full(&cfg)).unwrap();
    let (b, t) = (2, 7);
    let (tokens, targets) = data(&cfg, b * t, 3);
    let params = full.init_params(6);
    let (loss, grads) = loss_and_grads(&full, &params, b, t, &tokens, &targets);
    let s0 = Shard {
        layers: 0..1,
        has_head: false,
        ..Shard::full(&cfg)
    };
    let s1 = Shard {
        layers: 1..3,
        has_embedding: false,
        ..Shard::full(&cfg)
    };
    let (l0, l1) = (
        ParamLayout::new(&cfg, &s0).unwrap(),
        ParamLayout::new(&cfg, &s1).unwrap(),
    );
    // stage 0's buffer is a prefix of the full buffer: contiguity per layer
    assert_eq!(l0.len(), full.layer_range(0).end);
    let (mut p0, mut p1) = (vec![0.0; l0.len()], vec![0.0; l1.len()]);
    l0.shard_from_full(&mut p0, &full, &params);
    l1.shard_from_full(&mut p1, &full, &params);
    let (mut a0, mut a1) = (Activations::new(&l0, b, t), Activations::new(&l1, b, t));
    let none = forward(
        &l0,
        &p0,
        &mut a0,
        StageInput::Tokens(&tokens),
        None,
        Par::Seq,
        &mut NoTp,
    )
    .unwrap();
    assert!(none.is_none());
    let hidden = a0.output().to_vec();
    let l = forward(
        &l1,
        &p1,
        &mut a1,
        StageInput::Hidden(&hidden),
        Some(&targets),
        Par::Seq,
        &mut NoTp,
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        l, loss,
        "pipeline loss must be bitwise equal to the full model's"
    );
    let (mut g0, mut g1) = (vec![0.0; l0.len()], vec![0.0; l1.len()]);
    let gi = GradInput::Loss {
        targets: &targets,
        d_loss: 1.0 / (b * t) as f32,
    };
    backward(
        &l1,
        &p1,
        &mut g1,
        &mut a1,
        StageInput::Hidden(&hidden),
        gi,
        Par::Seq,
        &mut NoTp,
    )
    .unwrap();
    let d_hidden = a1.d_input().to_vec();
    backward(
        &l0,
        &p0,
        &mut g0,
        &mut a0,
        StageInput::Tokens(&tokens),
        GradInput::Hidden(&d_hidden),
        Par::Seq,
        &mut NoTp,
    )
    .unwrap();
    // Tied embedding: the full wte gradient is stage 0's plus stage 1's lm_head copy.
    let wte_full = full.tensor("wte").unwrap().range();
    let head = l1.tensor("lm_head.weight").unwrap().range();
    for (k, i) in wte_full.enumerate() {
        let sum = g0[i] + g1[head.start + k];
        assert!(
            (sum - grads[i]).abs() <= 1e-6 + 1e-4 * grads[i].abs(),
            "wte[{k}]: {sum} vs {}",
            grads[i]
        );
    }
    for tensor in l1.tensors.iter().filter(|t| t.name != "lm_head.weight") {
        let src = full.tensor(&tensor.name).unwrap().range();
        assert_eq!(&g1[tensor.range()], &grads[src], "{}", tensor.name);
    }
}

#[test]
fn backward_accumulates_and_bad_tokens_are_errors() {
    let cfg = tiny();
    let layout = ParamLayout::new(&cfg, &Shard::full(&cfg)).unwrap();
    let (b, t) = (1, 4);
    let (tokens, targets) = data(&cfg, b * t, 4);
    let params = layout.init_params(7);
    let (_, g1) = loss_and_grads(&layout, &params, b, t, &tokens, &targets);
    let mut acts = Activations::new(&layout, b, t);
    let mut g = g1.clone();
    forward(
        &layout,
        &params,
        &mut acts,
        StageInput::Tokens(&tokens),
        Some(&targets),
        Par::Seq,
        &mut NoTp,
    )
    .unwrap();
    let gi = GradInput::Loss {
        targets: &targets,
        d_loss: 0.25,
    };
    backward(
        &layout,
        &params,
        &mut g,
        &mut acts,
        StageInput::Tokens(&tokens),
        gi,
        Par::Seq,
        &mut NoTp,
    )
    .unwrap();
    for (a, w) in g.iter().zip(&g1) {
        assert!((a - 2.0 * w).abs() <= 1e-6 + 1e-5 * w.abs());
    }
    let bad = [1u32, 2, 50, 3];
    let err = forward(
        &layout,
        &params,
        &mut acts,
        StageInput::Tokens(&bad),
        Some(&targets),
        Par::Seq,
        &mut NoTp,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "tokens[2] = 50 is not below the vocabulary size 50"
    );
    let err = forward(
        &layout,
        &params,
        &mut acts,
        StageInput::Tokens(&bad[..3]),
        Some(&targets),
        Par::Seq,
        &mut NoTp,
    )
    .unwrap_err();
    assert!(err.to_string().contains("tokens has 3 elements"), "{err}");
}

/// Records what backward asks of its gradient sink, and checks the sink contract: no range at or
/// above a reported ready point is touched afterwards.
struct Recording {
    buf: Vec<f32>,
    ready: Vec<usize>,
    /// Snapshot of `buf[p..]` when `p` was reported.
    snapshots: Vec<Vec<f32>>,
}

impl GradSink for Recording {
    fn slice(&mut self, r: std::ops::Range<usize>) -> &mut [f32] {
        if let Some(&p) = self.ready.last() {
            assert!(
                r.end <= p,
                "backward asked for {r:?} after reporting {p} ready"
            );
        }
        &mut self.buf[r]
    }
    fn ready(&mut self, from: usize) {
        self.ready.push(from);
        self.snapshots.push(self.buf[from..].to_vec());
    }
}

#[test]
fn backward_reports_final_gradients_in_layout_order_for_every_stage_shape() {
    let cfg = tiny();
    let (b, t) = (2, 8);
    let (x, y) = data(&cfg, b * t, 3);
    for shard in [
        Shard::full(&cfg),
        Shard {
            layers: 0..2,
            has_head: false,
            ..Shard::full(&cfg)
        },
        Shard {
            layers: 2..3,
            has_embedding: false,
            ..Shard::full(&cfg)
        },
    ] {
        let layout = ParamLayout::new(&cfg, &shard).unwrap();
        let params = big_params(&layout, 5);
        let mut acts = Activations::new(&layout, b, t);
        let hidden = vec![0.01f32; b * t * cfg.channels];
        let input = if shard.has_embedding {
            StageInput::Tokens(&x)
        } else {
            StageInput::Hidden(&hidden)
        };
        let targets = shard.has_head.then_some(&y[..]);
        forward(
            &layout,
            &params,
            &mut acts,
            input,
            targets,
            Par::Seq,
            &mut NoTp,
        )
        .unwrap();
        let grad_in = if shard.has_head {
            GradInput::Loss {
                targets: &y,
                d_loss: 1.0 / (b * t) as f32,
            }
        } else {
            GradInput::Hidden(&hidden)
        };
        let mut flat = vec![0.0f32; layout.len()];
        let mut rec = Recording {
            buf: vec![0.0f32; layout.len()],
            ready: Vec::new(),
            snapshots: Vec::new(),
        };
        let mut acts2 = Activations::new(&layout, b, t);
        forward(
            &layout,
            &params,
            &mut acts2,
            input,
            targets,
            Par::Seq,
            &mut NoTp,
        )
        .unwrap();
        backward(
            &layout,
            &params,
            &mut flat,
            &mut acts,
            input,
            grad_in,
            Par::Seq,
            &mut NoTp,
        )
        .unwrap();
        backward_into(
            &layout,
            &params,
            &mut rec,
            &mut acts2,
            input,
            grad_in,
            Par::Seq,
            &mut NoTp,
        )
        .unwrap();
        assert!(
            rec.ready.windows(2).all(|w| w[1] <= w[0]),
            "points never increase"
        );
        let mut points = rec.ready.clone();
        points.dedup();
        assert_eq!(points, layout.ready_points(), "{shard:?}");
        assert_eq!(
            rec.buf, flat,
            "the sink path computes the same bits ({shard:?})"
        );
        for (p, snap) in rec.ready.iter().zip(&rec.snapshots) {
            assert_eq!(
                snap[..],
                flat[*p..],
                "gradients at {p}.. changed after being reported final"
            );
        }
        assert!(flat.iter().any(|&g| g != 0.0));
    }
}
