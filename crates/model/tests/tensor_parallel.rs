//! Tensor parallelism (Shoeybi et al. 2019, Megatron-LM §3) against the full model, with the
//! ranks as threads: Megatron-split layers, the vocabulary-parallel embedding and
//! cross-entropy, the checkpoint gather, and collective failures.
//!
//! Tolerance. A tp rank computes the same arithmetic as the full model in a different order:
//! dot products of length `k` split into `tp` partial sums then added, the softmax normaliser
//! summed per rank then rescaled and added. Reordering a sum of `n` f32 terms changes it by at
//! most about `2n·u·Σ|terms|` (u = 2⁻²⁴ ≈ 6e-8; Higham, "Accuracy and Stability of Numerical
//! Algorithms", §4.2). Here the longest reductions are 4c = 64 (MLP), vp = 64 (loss) and
//! bt = 12 (weight gradients): at most ≈ 2·64·u ≈ 8e-6 of the magnitudes involved per
//! reduction, and a gradient passes through about 3 layers × 6 reductions forward and again
//! backward, ≈ 36 of them: ≈ 3e-4 of the tensor's scale. Cancellation makes a per-element
//! relative bound meaningless, so each element is compared against its tensor's largest
//! magnitude: `|tp − full| ≤ 3e-4 · max|full tensor|`; the loss (a mean of values ≈ ln v ≈ 4)
//! within 1e-5 absolute. Measured errors are well inside this (the test prints the worst).

#[path = "common/thread_tp.rs"]
mod thread_tp;

use kernels::rng::Rng;
use kernels::Par;
use model::{
    backward, forward, Activations, GradInput, ModelConfig, ModelError, ParamLayout, Shard,
    StageInput, TpError, TpReduce, TpSplit,
};
use thread_tp::run_group;

/// Relative-to-tensor-scale tolerance for gradients (derivation at the top).
const GRAD_TOL: f32 = 3e-4;
/// Absolute tolerance for the mean loss.
const LOSS_TOL: f32 = 1e-5;

fn tiny(vocab_size: usize) -> ModelConfig {
    ModelConfig {
        vocab_size,
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

/// Forward + backward of one micro-batch on `layout` with the collectives `tp`.
#[allow(clippy::too_many_arguments)]
fn step(
    layout: &ParamLayout,
    params: &[f32],
    b: usize,
    t: usize,
    tokens: &[u32],
    targets: &[u32],
    par: Par,
    tp: &mut dyn TpReduce,
) -> (f32, Vec<f32>) {
    let mut acts = Activations::new(layout, b, t);
    let x = StageInput::Tokens(tokens);
    let loss = forward(layout, params, &mut acts, x, Some(targets), par, tp)
        .unwrap()
        .unwrap();
    let mut grads = vec![0.0; layout.len()];
    let gi = GradInput::Loss {
        targets,
        d_loss: 1.0 / (b * t) as f32,
    };
    backward(layout, params, &mut grads, &mut acts, x, gi, par, tp).unwrap();
    (loss, grads)
}

/// Worst `|got − want| / max|want tensor|` over the tensors of `layout`, with its name.
fn worst_error(layout: &ParamLayout, got: &[f32], want: &[f32]) -> (f32, String) {
    let mut worst = (0.0f32, String::new());
    for t in &layout.tensors {
        let r = t.range();
        let scale = want[r.clone()].iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let err = got[r.clone()]
            .iter()
            .zip(&want[r])
            .fold(0.0f32, |m, (a, w)| m.max((a - w).abs()));
        let rel = if scale > 0.0 { err / scale } else { err };
        if rel >= worst.0 {
            worst = (rel, t.name.clone());
        }
    }
    worst
}

/// tp 2 and 4, for a vocabulary whose padding sits on the last rank (50 of 64) and one where
/// whole ranks hold only padding (20 of 64: ranks 2 and 3 of 4): every rank's loss equals the
/// full model's, every gradient its shard of the full model's, the replicated tensors'
/// gradients are bitwise identical across ranks, and gathering the shards gives back the full
/// parameters bitwise and the full gradients within the tolerance.
#[test]
fn tensor_parallel_shards_match_the_full_model() {
    let (b, t) = (2, 6);
    for vocab in [50, 20] {
        let cfg = tiny(vocab);
        let full = ParamLayout::new(&cfg, &Shard::full(&cfg)).unwrap();
        let (tokens, targets) = data(&cfg, b * t, 2);
        let mut params = full.init_params(5);
        // larger than GPT-2's init so gradients are well above f32 noise; padding stays zero
        let mut rng = Rng::new(6);
        let wte = full.embed.as_ref().unwrap().wte.clone();
        for (i, x) in params.iter_mut().enumerate() {
            if !(wte.start + vocab * 16..wte.end).contains(&i) {
                *x += 0.1 * rng.normal() as f32;
            }
        }
        let (loss, grads) = step(
            &full,
            &params,
            b,
            t,
            &tokens,
            &targets,
            Par::Seq,
            &mut model::NoTp,
        );
        for tp in [2, 4] {
            let ranks = run_group(tp, |rank, comm| {
                let shard = Shard {
                    tp_rank: rank,
                    tp_size: tp,
                    ..Shard::full(&cfg)
                };
                let layout = ParamLayout::new(&cfg, &shard).unwrap();
                let mut p = vec![0.0; layout.len()];
                layout.shard_from_full(&mut p, &full, &params);
                let par = if rank % 2 == 0 {
                    Par::Seq
                } else {
                    Par::Threads(2)
                };
                let (l, g) = step(&layout, &p, b, t, &tokens, &targets, par, comm);
                (layout, p, l, g)
            });
            let mut worst = (0.0f32, String::new());
            for (layout, _, l, g) in &ranks {
                let rank = layout.shard.tp_rank;
                assert!(
                    (l - loss).abs() <= LOSS_TOL,
                    "v {vocab} tp {tp} rank {rank}: loss {l} vs full {loss}"
                );
                let mut want = vec![0.0; layout.len()];
                layout.shard_from_full(&mut want, &full, &grads);
                let (err, name) = worst_error(layout, g, &want);
                assert!(
                    err <= GRAD_TOL,
                    "v {vocab} tp {tp} rank {rank}: {name} off by {err} of its scale"
                );
                if err >= worst.0 {
                    worst = (err, name);
                }
                // replicated tensors: the same gradient bits on every rank
                let (l0, g0) = (&ranks[0].0, &ranks[0].3);
                assert_eq!(layout.replicated_ranges(), l0.replicated_ranges());
                for r in layout.replicated_ranges() {
                    assert!(
                        g[r.clone()] == g0[r.clone()],
                        "v {vocab} tp {tp} rank {rank}: replicated gradient {r:?} differs"
                    );
                }
                // the loss is the same bits on every rank
                assert_eq!(l.to_bits(), ranks[0].2.to_bits());
            }
            eprintln!(
                "v {vocab} tp {tp}: worst gradient error {:.2e} of scale ({})",
                worst.0, worst.1
            );
            let shards_p: Vec<(&ParamLayout, &[f32])> =
                ranks.iter().map(|(l, p, _, _)| (l, p.as_slice())).collect();
            let mut gathered = vec![f32::NAN; full.len()];
            full.full_from_shards(&mut gathered, &shards_p);
            assert!(
                gathered == params,
                "v {vocab} tp {tp}: gathered params differ"
            );
            let shards_g: Vec<(&ParamLayout, &[f32])> =
                ranks.iter().map(|(l, _, _, g)| (l, g.as_slice())).collect();
            full.full_from_shards(&mut gathered, &shards_g);
            let (err, name) = worst_error(&full, &gathered, &grads);
            assert!(
                err <= GRAD_TOL,
                "v {vocab} tp {tp}: gathered {name} off by {err}"
            );
        }
    }
}

#[test]
fn vocabulary_split_rules_and_errors() {
    let cfg = tiny(50); // vp = 64
    let shard = |tp_rank, tp_size| Shard {
        tp_rank,
        tp_size,
        ..Shard::full(&cfg)
    };
    let l = ParamLayout::new(&cfg, &shard(1, 4)).unwrap();
    assert_eq!(l.vocab_rows(), 16..32);
    assert_eq!(l.tensor("wte").unwrap().shape, vec![16, 16]);
    assert_eq!(
        l.tp_split_of(l.embed.as_ref().unwrap().wte.start),
        Some(TpSplit::Rows { blocks: 1 })
    );
    assert_eq!(
        l.tp_split_of(l.embed.as_ref().unwrap().wpe.start),
        Some(TpSplit::Replicated)
    );
    assert_eq!(l.tp_split_of(l.len()), None);
    // replicated: wpe, per layer ln_1 (w, b), attn.c_proj.bias, ln_2 (w, b), mlp.c_proj.bias,
    // then ln_f; adjacent ones merged
    let names: Vec<&str> = l
        .tensors
        .iter()
        .filter(|t| t.split == TpSplit::Replicated)
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(names.len(), 1 + 3 * 6 + 2, "{names:?}");
    let covered: usize = l.replicated_ranges().iter().map(|r| r.len()).sum();
    let want: usize = l
        .tensors
        .iter()
        .filter(|t| t.split == TpSplit::Replicated)
        .map(|t| t.range().len())
        .sum();
    assert_eq!(covered, want);
    // a last stage without the embedding splits its own copy of the tied wte the same way
    let head_only = Shard {
        layers: 3..3,
        has_embedding: false,
        ..shard(3, 4)
    };
    let l = ParamLayout::new(&cfg, &head_only).unwrap();
    assert_eq!(l.tensor("lm_head.weight").unwrap().shape, vec![16, 16]);
    // 64 rows do not split 3 ways... but tp 3 must also divide n_head; use a 6-head model
    let cfg6 = ModelConfig {
        n_head: 6,
        channels: 12,
        ..tiny(50)
    };
    let err = ParamLayout::new(
        &cfg6,
        &Shard {
            tp_rank: 0,
            tp_size: 3,
            ..Shard::full(&cfg6)
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("tp_size") && err.contains("64") && err.contains("multiple"),
        "{err}"
    );
}

/// A collective that always fails, as a broken link would.
struct BrokenTp;

impl TpReduce for BrokenTp {
    fn size(&self) -> usize {
        2
    }
    fn rank(&self) -> usize {
        0
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), TpError> {
        Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "peer went away").into())
    }
    fn all_reduce_max(&mut self, buf: &mut [f32]) -> Result<(), TpError> {
        self.all_reduce_sum(buf)
    }
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<(), TpError> {
        self.all_reduce_sum(buf)
    }
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), TpError> {
        self.all_reduce_sum(buf)
    }
}

#[test]
fn a_failed_collective_is_an_error_that_keeps_its_source() {
    let cfg = tiny(50);
    let shard = Shard {
        tp_rank: 0,
        tp_size: 2,
        ..Shard::full(&cfg)
    };
    let layout = ParamLayout::new(&cfg, &shard).unwrap();
    let params = layout.init_params(1);
    let (tokens, targets) = data(&cfg, 4, 1);
    let mut acts = Activations::new(&layout, 1, 4);
    let err = forward(
        &layout,
        &params,
        &mut acts,
        StageInput::Tokens(&tokens),
        Some(&targets),
        Par::Seq,
        &mut BrokenTp,
    )
    .unwrap_err();
    assert!(matches!(err, ModelError::TensorParallel { .. }), "{err:?}");
    let source = std::error::Error::source(&err)
        .expect("source kept")
        .to_string();
    assert!(source.contains("peer went away"), "{source}");
    let msg = err.to_string();
    assert!(
        msg.contains("all_reduce_sum") && msg.contains("embedding"),
        "{msg}"
    );
}
