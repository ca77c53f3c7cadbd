//! Per-rank compute of one training micro-batch (forward + backward) under tensor parallelism,
//! collectives left out, against the unsharded model, single-threaded: the ceiling tensor
//! parallelism can reach before communication. A stand-in group (`Alone`) sums and maxes
//! nothing and "gathers" by copying this rank's rows into the other ranks' places, so every
//! buffer holds values of realistic magnitude (stale rows can hold denormals that slow the
//! arithmetic several-fold and would make the figures meaningless). Variants run interleaved in
//! each round; medians over rounds.
//!
//! `cargo run --release -p scaletrain-model --example tp_compute [ROUNDS] [VOCAB]`
//! (default 7 rounds; L4 H4 C256 T128 B8 as `bench/tp_bench.sh`, vocabulary 32 as there).

use kernels::Par;
use model::{
    backward, forward, shard_range, Activations, GradInput, ModelConfig, ParamLayout, Recompute,
    Shard, StageInput, TpError, TpReduce,
};
use std::time::Instant;

/// Rank `rank` of a group of `size` with no peers (see the top of the file).
struct Alone {
    size: usize,
    rank: usize,
}

impl TpReduce for Alone {
    fn size(&self) -> usize {
        self.size
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), TpError> {
        Ok(())
    }
    fn all_reduce_max(&mut self, _buf: &mut [f32]) -> Result<(), TpError> {
        Ok(())
    }
    fn reduce_scatter_sum(&mut self, _buf: &mut [f32]) -> Result<(), TpError> {
        Ok(())
    }
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), TpError> {
        let mine = shard_range(buf.len(), self.size, self.rank);
        for r in (0..self.size).filter(|&r| r != self.rank) {
            let other = shard_range(buf.len(), self.size, r);
            let n = other.len().min(mine.len());
            buf.copy_within(mine.start..mine.start + n, other.start);
        }
        Ok(())
    }
}

struct Variant {
    name: String,
    layout: ParamLayout,
    group: Alone,
    params: Vec<f32>,
    grads: Vec<f32>,
    acts: Activations,
    times: Vec<f64>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args.get(1).map_or(7, |s| s.parse().expect("ROUNDS"));
    let vocab: usize = args.get(2).map_or(32, |s| s.parse().expect("VOCAB"));
    let cfg = ModelConfig {
        vocab_size: vocab,
        max_seq_len: 128,
        n_layer: 4,
        n_head: 4,
        channels: 256,
    };
    let (b, t) = (8, 128);
    let tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % vocab) as u32).collect();
    let targets: Vec<u32> = (0..b * t).map(|i| (i * 13 % vocab) as u32).collect();
    let mut variants: Vec<Variant> = [(1, false), (2, false), (2, true), (4, false), (4, true)]
        .into_iter()
        .map(|(tp, sp)| {
            let shard = Shard {
                tp_size: tp,
                ..Shard::full(&cfg)
            };
            let layout = ParamLayout::new(&cfg, &shard).unwrap();
            Variant {
                name: format!("tp {tp}{}", if sp { " +sp" } else { "" }),
                group: Alone { size: tp, rank: 0 },
                params: layout.init_params(1),
                grads: vec![0.0; layout.len()],
                acts: Activations::with_sp(&layout, b, t, Recompute::None, sp).unwrap(),
                layout,
                times: Vec::new(),
            }
        })
        .collect();
    for round in 0..=rounds {
        for v in &mut variants {
            let x = StageInput::Tokens(&tokens);
            let start = Instant::now();
            forward(
                &v.layout,
                &v.params,
                &mut v.acts,
                x,
                Some(&targets),
                Par::Seq,
                &mut v.group,
            )
            .unwrap();
            let gi = GradInput::Loss {
                targets: &targets,
                d_loss: 1.0 / (b * t) as f32,
            };
            backward(
                &v.layout,
                &v.params,
                &mut v.grads,
                &mut v.acts,
                x,
                gi,
                Par::Seq,
                &mut v.group,
            )
            .unwrap();
            if round > 0 {
                v.times.push(start.elapsed().as_secs_f64()); // round 0 warms up
            }
        }
    }
    let median = |xs: &[f64]| {
        let mut s = xs.to_vec();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    };
    let base = median(&variants[0].times);
    println!("per-rank compute, L4 H4 C256 T128 B8 V{vocab}, 1 thread, {rounds} rounds (median):");
    for v in &variants {
        let m = median(&v.times);
        println!(
            "  {:<8} {:>8.2} ms   {:.2}x of tp 1's time",
            v.name,
            m * 1e3,
            m / base
        );
    }
}
