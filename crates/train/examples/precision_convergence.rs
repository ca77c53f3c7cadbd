//! fp32 vs bf16 vs fp16 training of the default model (L2 H4 C128 T64, batch 16, the default
//! AdamW schedule) on the built-in synthetic corpus, from the same initial weights and the same
//! batches: validation loss of each at the end, beside the corpus's loss floor. fp16 runs with
//! the dynamic loss scale (`train::loss_scale`), starting at 2^16 and trying to double every 100
//! clean steps (so within a short run it reaches overflow and backs off: loss scaling at work);
//! skipped steps and the final scale are printed. Runs outside the trainer (it does not take a
//! precision yet).
//!
//! `cargo run --release -p scaletrain-train --example precision_convergence [steps] [threads]`

use kernels::adamw::all_finite;
use kernels::rng::Rng;
use kernels::Par;
use model::{
    backward_with, forward_with, Activations, AdamW, AdamWConfig, Bf16, Elem, GradInput,
    ModelConfig, NoTp, ParamLayout, Recompute, Shard, StageInput, F16,
};
use train::config::OptimSection;
use train::loss_scale::{LossScaleConfig, LossScaler, ScaleVerdict};
use train::synthetic::{generate, SyntheticSpec};
use train::trainer::lr_at;

const B: usize = 16;
const T: usize = 64;

struct Outcome {
    val_loss: f64,
    skipped: u64,
    final_scale: f32,
}

fn batch(tokens: &[u32], rng: &mut Rng) -> (Vec<u32>, Vec<u32>) {
    let (mut x, mut y) = (Vec::with_capacity(B * T), Vec::with_capacity(B * T));
    for _ in 0..B {
        let s = rng.below((tokens.len() - T - 1) as u64) as usize;
        x.extend_from_slice(&tokens[s..s + T]);
        y.extend_from_slice(&tokens[s + 1..s + T + 1]);
    }
    (x, y)
}

fn train<E: Elem>(
    layout: &ParamLayout,
    train_tokens: &[u32],
    val: &[u32],
    steps: u64,
    par: Par,
    scaler: Option<LossScaler>,
) -> Outcome {
    let mut master = layout.init_params(1337);
    let mut working: Vec<E> = master.iter().map(|&x| E::from_f32(x)).collect();
    let mut grads = vec![E::default(); layout.len()];
    let mut opt = AdamW::new(layout);
    let mut acts = Activations::<E>::with(layout, B, T, Recompute::None);
    let optim = OptimSection::default();
    let mut scaler = scaler;
    let mut rng = Rng::new(42);
    for step in 0..steps {
        let (x, y) = batch(train_tokens, &mut rng);
        let scale = scaler.as_ref().map_or(1.0, |s| s.scale());
        let Activations { saved, scratch } = &mut acts;
        grads.fill(E::default());
        let input = StageInput::Tokens(&x);
        forward_with(
            layout,
            &working,
            saved,
            scratch,
            input,
            Some(&y),
            par,
            &mut NoTp,
        )
        .unwrap();
        let gi = GradInput::Loss {
            targets: &y,
            d_loss: scale / (B * T) as f32,
        };
        backward_with(
            layout,
            &working,
            &mut grads[..],
            saved,
            scratch,
            input,
            gi,
            par,
            &mut NoTp,
        )
        .unwrap();
        if let Some(s) = scaler.as_mut() {
            if s.update(all_finite(&grads)) == ScaleVerdict::Skip {
                continue;
            }
        }
        let cfg = AdamWConfig {
            lr: lr_at(&optim, step, steps),
            weight_decay: optim.weight_decay,
            beta1: optim.beta1,
            beta2: optim.beta2,
            eps: optim.eps,
            grad_clip: Some(optim.grad_clip),
        };
        opt.step_mixed(
            layout,
            &mut master,
            &mut working,
            &grads,
            1.0 / scale,
            &cfg,
            par,
        );
    }
    // Validation: consecutive windows of the validation stream.
    let (mut sum, mut n) = (0.0, 0);
    for w in val.chunks_exact(B * T + 1).take(16) {
        let (x, y) = (&w[..B * T], &w[1..]);
        let Activations { saved, scratch } = &mut acts;
        let input = StageInput::Tokens(x);
        let l = forward_with(
            layout,
            &working,
            saved,
            scratch,
            input,
            Some(y),
            par,
            &mut NoTp,
        )
        .unwrap()
        .unwrap();
        sum += l as f64;
        n += 1;
    }
    Outcome {
        val_loss: sum / n as f64,
        skipped: scaler.as_ref().map_or(0, |s| s.state().skipped),
        final_scale: scaler.as_ref().map_or(1.0, |s| s.scale()),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let steps: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1200);
    let threads: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2);
    let spec = SyntheticSpec::default();
    let corpus = generate(&spec);
    let cfg = ModelConfig {
        vocab_size: spec.vocab_size,
        max_seq_len: T,
        n_layer: 2,
        n_head: 4,
        channels: 128,
    };
    let layout = ParamLayout::new(&cfg, &Shard::full(&cfg)).unwrap();
    let par = Par::Threads(threads);
    let floor = corpus.source.loss_floor(T);
    let fp32 = train::<f32>(&layout, &corpus.train, &corpus.val, steps, par, None);
    let bf16 = train::<Bf16>(&layout, &corpus.train, &corpus.val, steps, par, None);
    let scaler = LossScaler::new(LossScaleConfig {
        growth_interval: 100,
        ..LossScaleConfig::default()
    });
    let fp16 = train::<F16>(
        &layout,
        &corpus.train,
        &corpus.val,
        steps,
        par,
        Some(scaler),
    );
    println!("{steps} steps, batch {B}x{T}, L2 H4 C128; validation loss (floor {floor:.4}):");
    for (name, o) in [
        ("fp32", &fp32),
        ("bf16-mixed", &bf16),
        ("fp16-mixed", &fp16),
    ] {
        println!(
            "  {name:>10}: {:.4} ({:+.2}% vs fp32, {:.3} above the floor); skipped steps {}, final loss scale {}",
            o.val_loss,
            100.0 * (o.val_loss / fp32.val_loss - 1.0),
            o.val_loss - floor,
            o.skipped,
            o.final_scale
        );
    }
}
