//! Weights saved by Hugging Face `transformers` (`save_pretrained`, names prefixed
//! `transformer.`, Conv1D layout, no `lm_head.weight`) load through the `--init-from` loader and
//! give transformers' loss and logits. Fixture: `reference/hf_fixture.py`.

use kernels::Par;
use model::{forward, Activations, ModelConfig, NoTp, ParamLayout, Shard, StageInput};
use std::path::PathBuf;

#[test]
fn transformers_saved_weights_reproduce_its_loss_and_logits() {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../reference/fixtures/hf_gpt2_tiny");
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let n = |k: &str| exp[k].as_u64().unwrap() as usize;
    let cfg = ModelConfig {
        vocab_size: n("vocab_size"),
        max_seq_len: n("seq_len"),
        n_layer: n("n_layer"),
        n_head: n("n_head"),
        channels: n("channels"),
    };
    let layout = ParamLayout::new(&cfg, &Shard::full(&cfg)).unwrap();
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let params = train::checkpoint::load_hf_weights(&path, &bytes, &layout).unwrap();
    let ids = |k: &str| -> Vec<u32> {
        exp[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let (tokens, targets) = (ids("tokens"), ids("targets"));
    let t = cfg.max_seq_len;
    let b = tokens.len() / t;
    let mut acts = Activations::new(&layout, b, t);
    let loss = forward(
        &layout,
        &params,
        &mut acts,
        StageInput::Tokens(&tokens),
        Some(&targets),
        Par::Threads(2),
        &mut NoTp,
    )
    .unwrap()
    .unwrap();
    let want = exp["loss"].as_f64().unwrap();
    assert!(
        (loss as f64 - want).abs() < 1e-5 + 1e-4 * want.abs(),
        "loss {loss} vs transformers {want}"
    );
    let vp = cfg.padded_vocab();
    let row = (b * t - 1) * vp;
    let logits = &acts.logits().unwrap()[row..row + cfg.vocab_size];
    let mut worst = 0.0f64;
    for (i, (&ours, theirs)) in logits
        .iter()
        .zip(exp["logits_last"].as_array().unwrap())
        .enumerate()
    {
        let theirs = theirs.as_f64().unwrap();
        let d = (ours as f64 - theirs).abs();
        worst = worst.max(d);
        assert!(
            d < 1e-5 + 1e-4 * theirs.abs(),
            "logit {i}: {ours} vs transformers {theirs}"
        );
    }
    eprintln!("loss {loss} vs {want}; worst logit difference {worst:e}");
    // And back out: our writer's file reloads to the same parameters.
    let mut out = Vec::new();
    train::checkpoint::write_hf_safetensors(&mut out, &layout, &params).unwrap();
    let again = train::checkpoint::load_hf_weights(&path, &out, &layout).unwrap();
    assert_eq!(again, params);
}
