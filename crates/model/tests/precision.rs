//! Mixed precision and activation recomputation through the whole model.
//!
//! - Recomputation (`Selective`, `Full`) in fp32 gives bitwise the loss, gradients and stage
//!   gradients of keeping everything, for the full model and for pipeline stages (a layer range
//!   without the embedding or without the head), with two micro-batches in flight.
//! - bf16 / fp16 storage against the fp32 model from the same master weights, with tolerances
//!   derived from the format's unit roundoff `u` (2⁻⁸ bf16, 2⁻¹¹ fp16); see `tolerance`.

use kernels::rng::Rng;
use kernels::Par;
use model::{
    backward_with, forward_with, ActSaved, ActScratch, Bf16, Elem, GradInput, ModelConfig, NoTp,
    ParamLayout, Recompute, Shard, StageInput, F16,
};

fn cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 64,
        max_seq_len: 40,
        n_layer: 3,
        n_head: 4,
        channels: 32,
    }
}

fn ids(n: usize, v: usize, rng: &mut Rng) -> Vec<u32> {
    (0..n).map(|_| rng.below(v as u64) as u32).collect()
}

/// Everything one stage produces for `k` micro-batches: losses, outputs, gradients to send
/// back, and the accumulated parameter gradients (as f32).
#[derive(Debug, PartialEq)]
struct StageRun {
    losses: Vec<Option<f32>>,
    outputs: Vec<Vec<f32>>,
    d_inputs: Vec<Vec<f32>>,
    grads: Vec<f32>,
}

/// Runs `k` micro-batches through one stage: all forwards (k saved sets, one scratch), then
/// all backwards. `hidden[m]` / `d_out[m]` feed a stage without the embedding / head.
#[allow(clippy::too_many_arguments)]
fn run_stage<E: Elem>(
    layout: &ParamLayout,
    master: &[f32],
    recompute: Recompute,
    c: &Case,
    hidden: &[Vec<f32>],
    d_out: &[Vec<f32>],
    d_loss: f32,
) -> StageRun {
    let (b, t, tokens, targets) = (c.b, c.t, &c.tokens, &c.targets);
    let params: Vec<E> = master.iter().map(|&x| E::from_f32(x)).collect();
    let k = tokens.len();
    let mut saved: Vec<ActSaved<E>> = (0..k)
        .map(|_| ActSaved::with(layout, b, t, recompute))
        .collect();
    let mut scratch = ActScratch::<E>::with(layout, b, t, recompute);
    let mut grads = vec![E::default(); layout.len()];
    let input = |m: usize| match layout.embed {
        Some(_) => StageInput::Tokens(&tokens[m]),
        None => StageInput::Hidden(&hidden[m]),
    };
    let mut run = StageRun {
        losses: vec![],
        outputs: vec![],
        d_inputs: vec![],
        grads: vec![],
    };
    for m in 0..k {
        let tg = layout.head.as_ref().map(|_| targets[m].as_slice());
        let par = Par::Threads(2);
        let loss = forward_with(
            layout,
            &params,
            &mut saved[m],
            &mut scratch,
            input(m),
            tg,
            par,
            &mut NoTp,
        )
        .unwrap();
        run.losses.push(loss);
        run.outputs
            .push(saved[m].output().iter().map(|x| x.to_f32()).collect());
    }
    for m in 0..k {
        let gi = match layout.head {
            Some(_) => GradInput::Loss {
                targets: &targets[m],
                d_loss,
            },
            None => GradInput::Hidden(&d_out[m]),
        };
        backward_with(
            layout,
            &params,
            &mut grads[..],
            &mut saved[m],
            &mut scratch,
            input(m),
            gi,
            Par::Threads(2),
            &mut NoTp,
        )
        .unwrap();
        run.d_inputs.push(scratch.d_input().to_vec());
    }
    run.grads = grads.iter().map(|g| g.to_f32()).collect();
    run
}

struct Case {
    cfg: ModelConfig,
    b: usize,
    t: usize,
    tokens: Vec<Vec<u32>>,
    targets: Vec<Vec<u32>>,
}

fn case(k: usize, seed: u64) -> Case {
    let cfg = cfg();
    let (b, t) = (2, 33); // t > 32: two causal blocks of attention
    let mut rng = Rng::new(seed);
    let tokens = (0..k)
        .map(|_| ids(b * t, cfg.vocab_size, &mut rng))
        .collect();
    let targets = (0..k)
        .map(|_| ids(b * t, cfg.vocab_size, &mut rng))
        .collect();
    Case {
        cfg,
        b,
        t,
        tokens,
        targets,
    }
}

#[test]
fn recomputation_is_bitwise_the_same_in_fp32_for_whole_models_and_pipeline_stages() {
    let c = case(2, 1);
    let full = Shard::full(&c.cfg);
    let s0 = Shard {
        layers: 0..1,
        has_head: false,
        ..full.clone()
    };
    let s1 = Shard {
        layers: 1..3,
        has_embedding: false,
        ..full.clone()
    };
    let d_loss = 1.0 / (2 * c.b * c.t) as f32;
    let (l0, l1) = (
        ParamLayout::new(&c.cfg, &s0).unwrap(),
        ParamLayout::new(&c.cfg, &s1).unwrap(),
    );
    let lf = ParamLayout::new(&c.cfg, &full).unwrap();
    let (pf, p0, p1) = (lf.init_params(4), l0.init_params(4), l1.init_params(4));
    let go = |r: Recompute| {
        let whole = run_stage::<f32>(&lf, &pf, r, &c, &[], &[], d_loss);
        // Stage 0 twice: once for its outputs (zero output gradient), then with stage 1's.
        let zeros = vec![vec![0.0f32; c.b * c.t * c.cfg.channels]; 2];
        let a = run_stage::<f32>(&l0, &p0, r, &c, &[], &zeros, d_loss);
        let b = run_stage::<f32>(&l1, &p1, r, &c, &a.outputs, &[], d_loss);
        let a = run_stage::<f32>(&l0, &p0, r, &c, &[], &b.d_inputs, d_loss);
        (whole, a, b)
    };
    let reference = go(Recompute::None);
    assert!(reference.0.grads.iter().any(|&g| g != 0.0));
    assert!(reference.1.grads.iter().any(|&g| g != 0.0));
    for r in [Recompute::Selective, Recompute::Full] {
        let got = go(r);
        assert!(got.0 == reference.0, "{r:?}: whole model differs");
        assert!(got.1 == reference.1, "{r:?}: first stage differs");
        assert!(got.2 == reference.2, "{r:?}: last stage differs");
    }
    // Tensor-parallel shard (its own arithmetic, NoTp standing in for the all-reduce).
    let tp = Shard {
        tp_rank: 1,
        tp_size: 2,
        ..full
    };
    let lt = ParamLayout::new(&c.cfg, &tp).unwrap();
    let pt = lt.init_params(5);
    let want = run_stage::<f32>(&lt, &pt, Recompute::None, &c, &[], &[], d_loss);
    for r in [Recompute::Selective, Recompute::Full] {
        let got = run_stage::<f32>(&lt, &pt, r, &c, &[], &[], d_loss);
        assert!(got == want, "{r:?}: tensor-parallel shard differs");
    }
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// The error budget of a 16-bit run against fp32, in units of the format's unit roundoff `u`.
///
/// Every stored tensor is rounded once (relative error ≤ u each): the weights, and per layer the
/// 9 saved activations (ln1, qkv, att, atty, res2, ln2, fch, fch_gelu, res3); the stage input,
/// lnf and the logits; backward adds one rounding per gradient accumulation. To first order the
/// relative errors along a chain of roundings add, so a quantity computed through `n` roundings
/// is off by at most `n·u` relative (worst case, assuming no step amplifies relative error by
/// more than ~1, which pre-norm blocks with layernorm keep roughly true). A forward path crosses
/// `n_f = 10·L + 4` roundings; a gradient is evaluated at the rounded activations and crosses
/// as many again backward plus its accumulation, plus, where bf16 matmuls run on AMX, one
/// rounding of the `f32` activation gradient at each of the 4·L + 1 backward matmuls:
/// `n_b = 2·n_f + 4·L + 2`. Rounding errors are not
/// adversarial: Higham & Mary (2019, "A new approach to probabilistic rounding error analysis",
/// Thm. 2.4) bound them by `λ·√n·u` with probability at least `1 − 2·exp(−λ²(1−u)²/2)` per
/// quantity; we take λ = 4 (≥ 0.999). Tests check the loss within `4·√n_f·u` (relative) and the
/// gradient vector within `4·√n_b·u` (relative L2), and that fp16's error is below bf16's (its
/// `u` is 8× smaller), which a bug unrelated to rounding would not give.
fn tolerance(layers: usize) -> (f64, f64) {
    let n_f = (10 * layers + 4) as f64;
    let n_b = 2.0 * n_f + 4.0 * layers as f64 + 2.0;
    (4.0 * n_f.sqrt(), 4.0 * n_b.sqrt())
}

fn mixed_case<E: Elem>(recompute: Recompute) -> (f64, f64) {
    let c = case(2, 7);
    let lf = ParamLayout::new(&c.cfg, &Shard::full(&c.cfg)).unwrap();
    let pf = lf.init_params(4);
    let d_loss = 1.0 / (2 * c.b * c.t) as f32;
    let want = run_stage::<f32>(&lf, &pf, Recompute::None, &c, &[], &[], d_loss);
    // fp16 needs a loss scale: 1/(b·t·k)-sized per-token gradients of ~1/vocab probabilities
    // underflow its subnormals. 2^12 here; the gradients are divided back (exact).
    let scale = if E::NAME == "fp16" { 4096.0 } else { 1.0 };
    let got = run_stage::<E>(&lf, &pf, recompute, &c, &[], &[], d_loss * scale);
    let grads: Vec<f32> = got.grads.iter().map(|g| g / scale).collect();
    let u = E::UNIT_ROUNDOFF as f64;
    let (n_f, n_b) = tolerance(c.cfg.n_layer);
    let mut loss_err: f64 = 0.0;
    for (a, b) in got.losses.iter().zip(&want.losses) {
        let (a, b) = (a.unwrap() as f64, b.unwrap() as f64);
        loss_err = loss_err.max((a - b).abs() / b.abs());
    }
    let grad_err = rel_err(&grads, &want.grads);
    eprintln!(
        "{} {recompute:?}: loss rel err {loss_err:.2e} (budget {:.2e}), grad rel err {grad_err:.2e} (budget {:.2e})",
        E::NAME,
        n_f * u,
        n_b * u
    );
    assert!(loss_err <= n_f * u, "{}: loss error {loss_err:e}", E::NAME);
    assert!(
        grad_err <= n_b * u,
        "{}: gradient error {grad_err:e}",
        E::NAME
    );
    assert!(grads.iter().all(|g| g.is_finite()));
    (loss_err, grad_err)
}

#[test]
fn bf16_and_fp16_match_fp32_within_the_rounding_budget() {
    let bf = mixed_case::<Bf16>(Recompute::None);
    let fp = mixed_case::<F16>(Recompute::None);
    assert!(
        fp.1 < bf.1,
        "fp16 gradient error {} not below bf16's {}",
        fp.1,
        bf.1
    );
    // Recomputation in 16-bit: rebuilt tensors round the same way, so the same budget holds.
    mixed_case::<Bf16>(Recompute::Full);
    mixed_case::<F16>(Recompute::Selective);
}
