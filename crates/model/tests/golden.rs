//! Golden test against PyTorch: `reference/gpt2_reference.py` wrote
//! `reference/fixtures/gpt2_tiny.safetensors` (vocabulary 97, padded here to 128). We load the
//! same weights, run forward/backward and 10 AdamW steps, and compare tensor by tensor.
//!
//! Tolerances (float32 on both sides, different summation orders):
//! - logits and loss: |Δ| <= 1e-5 + 1e-4·|want|
//! - gradients: |Δ| <= 1e-6 + 1e-3·|want| (small gradients carry relative rounding noise)
//! - the 10-step AdamW loss trajectory: |Δ| <= 1e-4 + 1e-4·|want|

use kernels::Par;
use model::{
    backward, forward, Activations, AdamW, AdamWConfig, GradInput, ModelConfig, NoTp, ParamLayout,
    Shard, StageInput,
};
use safetensors::{Dtype, SafeTensors};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../reference/fixtures/gpt2_tiny.safetensors"
);

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("fixture lacks {name}: {e}"));
    assert_eq!(t.dtype(), Dtype::F32, "{name} dtype");
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn i64s(st: &SafeTensors, name: &str) -> Vec<i64> {
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("fixture lacks {name}: {e}"));
    assert_eq!(t.dtype(), Dtype::I64, "{name} dtype");
    t.data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect()
}

/// Compares and reports the first mismatching elements; returns the number of mismatches.
fn compare(name: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) -> usize {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let mut bad = 0;
    let mut max_diff = 0.0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        max_diff = max_diff.max(d);
        let ok = d <= atol + rtol * w.abs();
        if !ok {
            if bad < 5 {
                eprintln!("{name}[{i}]: got {g}, want {w}, |diff| {d}");
            }
            bad += 1;
        }
    }
    eprintln!(
        "{name}: {bad} of {} elements out of tolerance, max |diff| {max_diff:e}",
        got.len()
    );
    bad
}

fn torch_name(rust_name: &str) -> String {
    match rust_name {
        "wte" | "wpe" => format!("{rust_name}.weight"),
        n => n.to_string(),
    }
}

#[test]
fn matches_pytorch_forward_backward_and_adamw_trajectory() {
    let bytes = std::fs::read(FIXTURE).expect("read the committed fixture");
    let st = SafeTensors::deserialize(&bytes).expect("parse fixture");
    let c = i64s(&st, "config");
    let cfg = ModelConfig {
        vocab_size: c[0] as usize,
        max_seq_len: c[1] as usize,
        n_layer: c[2] as usize,
        n_head: c[3] as usize,
        channels: c[4] as usize,
    };
    let (b, t) = (c[5] as usize, c[6] as usize);
    assert_ne!(
        cfg.vocab_size % 64,
        0,
        "the fixture must exercise vocabulary padding"
    );
    let layout = ParamLayout::new(&cfg, &Shard::full(&cfg)).unwrap();
    let (v, vp, ch) = (cfg.vocab_size, cfg.padded_vocab(), cfg.channels);
    // Load weights; wte's padded rows stay zero.
    let mut params = vec![0.0f32; layout.len()];
    for tensor in &layout.tensors {
        let src = f32s(&st, &format!("param.{}", torch_name(&tensor.name)));
        params[tensor.offset..tensor.offset + src.len()].copy_from_slice(&src);
        let held = tensor.range().len();
        assert!(
            src.len() == held || (tensor.name == "wte" && src.len() == v * ch),
            "{}: size",
            tensor.name
        );
    }
    let tokens: Vec<u32> = i64s(&st, "tokens").iter().map(|&x| x as u32).collect();
    let targets: Vec<u32> = i64s(&st, "targets").iter().map(|&x| x as u32).collect();

    let mut acts = Activations::new(&layout, b, t);
    let par = Par::Threads(2);
    let loss = forward(
        &layout,
        &params,
        &mut acts,
        StageInput::Tokens(&tokens),
        Some(&targets),
        par,
        &mut NoTp,
    )
    .unwrap()
    .unwrap();
    let mut bad = 0;
    let logits: Vec<f32> = acts
        .logits()
        .unwrap()
        .chunks_exact(vp)
        .flat_map(|row| row[..v].to_vec())
        .collect();
    bad += compare("logits", &logits, &f32s(&st, "logits"), 1e-5, 1e-4);
    bad += compare("loss", &[loss], &f32s(&st, "loss"), 1e-5, 1e-4);

    let mut grads = vec![0.0f32; layout.len()];
    let d_loss = 1.0 / (b * t) as f32;
    let gi = GradInput::Loss {
        targets: &targets,
        d_loss,
    };
    backward(
        &layout,
        &params,
        &mut grads,
        &mut acts,
        StageInput::Tokens(&tokens),
        gi,
        par,
        &mut NoTp,
    )
    .unwrap();
    for tensor in &layout.tensors {
        let want = f32s(&st, &format!("grad.{}", torch_name(&tensor.name)));
        let got = &grads[tensor.offset..tensor.offset + want.len()];
        bad += compare(&format!("grad.{}", tensor.name), got, &want, 1e-6, 1e-3);
        if tensor.name == "wte" {
            assert!(
                grads[tensor.offset + want.len()..tensor.range().end]
                    .iter()
                    .all(|&g| g == 0.0),
                "padded wte rows got gradient"
            );
        }
    }

    // 10 AdamW steps on the same batch, as the reference does.
    let want_losses = f32s(&st, "adamw_losses");
    let want_norms = f32s(&st, "adamw_grad_norms");
    let opt_cfg = AdamWConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        grad_clip: Some(1.0),
    };
    let mut opt = AdamW::new(&layout);
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    for _ in 0..want_losses.len() {
        grads.fill(0.0);
        let l = forward(
            &layout,
            &params,
            &mut acts,
            StageInput::Tokens(&tokens),
            Some(&targets),
            par,
            &mut NoTp,
        );
        losses.push(l.unwrap().unwrap());
        let gi = GradInput::Loss {
            targets: &targets,
            d_loss,
        };
        backward(
            &layout,
            &params,
            &mut grads,
            &mut acts,
            StageInput::Tokens(&tokens),
            gi,
            par,
            &mut NoTp,
        )
        .unwrap();
        norms.push(opt.step(&layout, &mut params, &mut grads, &opt_cfg, par) as f32);
    }
    eprintln!("rust  losses: {losses:?}\ntorch losses: {want_losses:?}");
    bad += compare("adamw_losses", &losses, &want_losses, 1e-4, 1e-4);
    bad += compare("adamw_grad_norms", &norms, &want_norms, 1e-4, 1e-3);
    assert_eq!(
        bad, 0,
        "mismatches against PyTorch (first ones printed above)"
    );
}
