//! Several micro-batches in flight on one pipeline stage: one `ActSaved` per micro-batch and one
//! shared `ActScratch` give bitwise the results of running each micro-batch alone through its
//! own `Activations`.

use kernels::rng::Rng;
use kernels::Par;
use model::{
    backward, backward_with, forward, forward_with, ActSaved, ActScratch, Activations, GradInput,
    ModelConfig, NoTp, ParamLayout, Shard, StageInput,
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

fn ids(cfg: &ModelConfig, n: usize, rng: &mut Rng) -> Vec<u32> {
    (0..n)
        .map(|_| rng.below(cfg.vocab_size as u64) as u32)
        .collect()
}

/// Per micro-batch: (loss, stage-0 output, stage-1 d_input); and both stages' gradients.
type Run = (Vec<(f32, Vec<f32>, Vec<f32>)>, Vec<f32>, Vec<f32>);

#[test]
fn in_flight_micro_batches_match_one_at_a_time_bitwise() {
    let cfg = tiny();
    let (b, t, k) = (2, 7, 3);
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
    let (p0, p1) = (l0.init_params(3), l1.init_params(3));
    let mut rng = Rng::new(11);
    let batches: Vec<(Vec<u32>, Vec<u32>)> = (0..k)
        .map(|_| (ids(&cfg, b * t, &mut rng), ids(&cfg, b * t, &mut rng)))
        .collect();
    let d_loss = 1.0 / (k * b * t) as f32;
    let par = Par::Threads(2);

    // Reference: each micro-batch forward then backward through its own Activations.
    let reference = || -> Run {
        let (mut g0, mut g1) = (vec![0.0; l0.len()], vec![0.0; l1.len()]);
        let mut out = Vec::new();
        for (tokens, targets) in &batches {
            let (mut a0, mut a1) = (Activations::new(&l0, b, t), Activations::new(&l1, b, t));
            let x0 = StageInput::Tokens(tokens);
            forward(&l0, &p0, &mut a0, x0, None, par, &mut NoTp).unwrap();
            let hidden = a0.output().to_vec();
            let x1 = StageInput::Hidden(&hidden);
            let loss = forward(&l1, &p1, &mut a1, x1, Some(targets), par, &mut NoTp)
                .unwrap()
                .unwrap();
            let gi = GradInput::Loss { targets, d_loss };
            backward(&l1, &p1, &mut g1, &mut a1, x1, gi, par, &mut NoTp).unwrap();
            let d_hidden = a1.d_input().to_vec();
            let gi = GradInput::Hidden(&d_hidden);
            backward(&l0, &p0, &mut g0, &mut a0, x0, gi, par, &mut NoTp).unwrap();
            out.push((loss, hidden, d_hidden));
        }
        (out, g0, g1)
    };

    // All forwards first (k saved sets per stage), then all backwards, one scratch per stage.
    let in_flight = || -> Run {
        let (mut g0, mut g1) = (vec![0.0; l0.len()], vec![0.0; l1.len()]);
        let mut saved0: Vec<ActSaved> = (0..k).map(|_| ActSaved::new(&l0, b, t)).collect();
        let mut saved1: Vec<ActSaved> = (0..k).map(|_| ActSaved::new(&l1, b, t)).collect();
        let (mut sc0, mut sc1) = (ActScratch::new(&l0, b, t), ActScratch::new(&l1, b, t));
        let mut out = Vec::new();
        for (m, (tokens, targets)) in batches.iter().enumerate() {
            let x0 = StageInput::Tokens(tokens);
            let none =
                forward_with(&l0, &p0, &mut saved0[m], &mut sc0, x0, None, par, &mut NoTp).unwrap();
            assert!(none.is_none());
            let hidden = saved0[m].output().to_vec();
            let x1 = StageInput::Hidden(&hidden);
            let (s1, tg) = (&mut saved1[m], Some(targets.as_slice()));
            let loss = forward_with(&l1, &p1, s1, &mut sc1, x1, tg, par, &mut NoTp)
                .unwrap()
                .unwrap();
            let mean = s1.losses().unwrap().iter().map(|&l| l as f64).sum::<f64>() / (b * t) as f64;
            assert_eq!(loss, mean as f32);
            out.push((loss, hidden, Vec::new()));
        }
        for (m, (tokens, targets)) in batches.iter().enumerate() {
            let hidden = out[m].1.clone();
            let x1 = StageInput::Hidden(&hidden);
            let gi = GradInput::Loss { targets, d_loss };
            backward_with(
                &l1,
                &p1,
                &mut g1[..],
                &mut saved1[m],
                &mut sc1,
                x1,
                gi,
                par,
                &mut NoTp,
            )
            .unwrap();
            let d_hidden = sc1.d_input().to_vec();
            let x0 = StageInput::Tokens(tokens);
            let gi = GradInput::Hidden(&d_hidden);
            backward_with(
                &l0,
                &p0,
                &mut g0[..],
                &mut saved0[m],
                &mut sc0,
                x0,
                gi,
                par,
                &mut NoTp,
            )
            .unwrap();
            out[m].2 = d_hidden;
        }
        (out, g0, g1)
    };

    let (want, want_g0, want_g1) = reference();
    let (got, got_g0, got_g1) = in_flight();
    for (m, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w.0.to_bits(), g.0.to_bits(), "micro-batch {m}: loss");
        assert_eq!(w.1, g.1, "micro-batch {m}: stage-0 output");
        assert_eq!(w.2, g.2, "micro-batch {m}: stage-1 d_input");
    }
    assert_eq!(want_g0, got_g0, "stage-0 gradients");
    assert_eq!(want_g1, got_g1, "stage-1 gradients");
    assert!(got_g0.iter().any(|&g| g != 0.0) && got_g1.iter().any(|&g| g != 0.0));
}

#[test]
#[should_panic(expected = "different (b, t)")]
fn saved_and_scratch_of_different_shapes_are_a_caller_bug() {
    let cfg = tiny();
    let layout = ParamLayout::new(&cfg, &Shard::full(&cfg)).unwrap();
    let params = layout.init_params(1);
    let mut saved = ActSaved::new(&layout, 2, 4);
    let mut scratch = ActScratch::new(&layout, 2, 5);
    let tokens = vec![0u32; 8];
    let _ = forward_with(
        &layout,
        &params,
        &mut saved,
        &mut scratch,
        StageInput::Tokens(&tokens),
        Some(&tokens),
        Par::Seq,
        &mut NoTp,
    );
}
