//! Whole-model checks: finite differences through forward/backward, tensor-parallel shards
//! reproduce the full model, pipeline stages compose to the full model, backward accumulates.

use kernels::rng::Rng;
use kernels::Par;
use model::{
    backward, backward_into, forward, shard_range, Activations, GradInput, GradSink, ModelConfig,
    ModelError, NoTp, ParamLayout, Shard, StageInput, TpError, TpReduce,
};
use std::ops::Range;
use std::sync::{Arc, Barrier, Mutex};

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

/// Tensor-parallel collectives among threads for the tests (the real ones live in `comm`):
/// every rank posts its buffer, then each computes the result from all posts in rank order, so
/// every rank gets the same bits.
struct ThreadTp {
    shared: Arc<(Mutex<Vec<Vec<f32>>>, Barrier)>,
    rank: usize,
    size: usize,
}

impl ThreadTp {
    fn group(size: usize) -> Vec<ThreadTp> {
        let shared = Arc::new((Mutex::new(vec![Vec::new(); size]), Barrier::new(size)));
        (0..size)
            .map(|rank| ThreadTp {
                shared: shared.clone(),
                rank,
                size,
            })
            .collect()
    }

    /// Posts `buf`, waits for all, then sets `buf[i] = fold(post_0[i], …, post_{n-1}[i])` for
    /// `i` in `out`.
    fn exchange(&mut self, buf: &mut [f32], out: Range<usize>, fold: fn(f32, f32) -> f32) {
        let (posts, barrier) = &*self.shared;
        posts.lock().unwrap()[self.rank] = buf.to_vec();
        barrier.wait();
        {
            let posts = posts.lock().unwrap();
            for i in out {
                buf[i] = posts[1..].iter().fold(posts[0][i], |a, p| fold(a, p[i]));
            }
        }
        barrier.wait();
    }
}

impl TpReduce for ThreadTp {
    fn size(&self) -> usize {
        self.size
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), TpError> {
        self.exchange(buf, 0..buf.len(), |a, b| a + b);
        Ok(())
    }
    fn all_reduce_max(&mut self, buf: &mut [f32]) -> Result<(), TpError> {
        self.exchange(buf, 0..buf.len(), f32::max);
        Ok(())
    }
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<(), TpError> {
        let mine = shard_range(buf.len(), self.size, self.rank);
        self.exchange(buf, mine, |a, b| a + b);
        Ok(())
    }
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), TpError> {
        let (posts, barrier) = &*self.shared;
        posts.lock().unwrap()[self.rank] = buf.to_vec();
        barrier.wait();
        {
            let posts = posts.lock().unwrap();
            for (r, post) in posts.iter().enumerate() {
                let sr = shard_range(buf.len(), self.size, r);
                buf[sr.clone()].copy_from_slice(&post[sr]);
            }
        }
        barrier.wait();
        Ok(())
    }
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
    let cfg = tiny();
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
    assert!(msg.contains("all_reduce_sum"), "{msg}");
}

#[test]
fn tensor_parallel_shards_sum_to_the_full_model() {
    let cfg = tiny();
    let full = ParamLayout::new(&cfg, &Shard::full(&cfg)).unwrap();
    let (b, t) = (2, 6);
    let (tokens, targets) = data(&cfg, b * t, 2);
    let params = full.init_params(5);
    let (loss, grads) = loss_and_grads(&full, &params, b, t, &tokens, &targets);
    for tp in [2, 4] {
        let group = ThreadTp::group(tp);
        let results: Vec<(usize, f32, Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .into_iter()
                .enumerate()
                .map(|(rank, mut reduce)| {
                    let (full, params, grads, tokens, targets, cfg) =
                        (&full, &params, &grads, &tokens, &targets, &cfg);
                    s.spawn(move || {
                        let shard = Shard {
                            tp_rank: rank,
                            tp_size: tp,
                            ..Shard::full(cfg)
                        };
                        let layout = ParamLayout::new(cfg, &shard).unwrap();
                        let mut p = vec![0.0; layout.len()];
                        layout.shard_from_full(&mut p, full, params);
                        let mut want = vec![0.0; layout.len()];
                        layout.shard_from_full(&mut want, full, grads);
                        let mut acts = Activations::new(&layout, b, t);
                        let l = forward(
                            &layout,
                            &p,
                            &mut acts,
                            StageInput::Tokens(tokens),
                            Some(targets),
                            Par::Seq,
                            &mut reduce,
                        )
                        .unwrap()
                        .unwrap();
                        let mut g = vec![0.0; layout.len()];
                        let gi = GradInput::Loss {
                            targets,
                            d_loss: 1.0 / (b * t) as f32,
                        };
                        backward(
                            &layout,
                            &p,
                            &mut g,
                            &mut acts,
                            StageInput::Tokens(tokens),
                            gi,
                            Par::Seq,
                            &mut reduce,
                        )
                        .unwrap();
                        (rank, l, g, want)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, l, g, want) in results {
            assert!(
                (l - loss).abs() < 1e-5,
                "tp {tp} rank {rank}: loss {l} vs full {loss}"
            );
            for (i, (&a, &w)) in g.iter().zip(&want).enumerate() {
                assert!(
                    (a - w).abs() <= 1e-5 + 1e-3 * w.abs(),
                    "tp {tp} rank {rank}: grad[{i}] {a} vs full {w}"
                );
            }
        }
    }
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
