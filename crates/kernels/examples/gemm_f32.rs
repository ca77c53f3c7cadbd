//! Single-threaded GFLOP/s of our AVX-512F f32 GEMM against the `gemm` crate's kernel, on the
//! three products of each linear layer of the `bench train` model (m = b·t = 1024, c = 256):
//! forward `out = inp · wᵀ`, backward `d_inp = d_out · w` and `d_w += d_outᵀ · inp`, plus the
//! LM head at vocabularies 8192 and 50304. Every variant runs once per round, rounds
//! interleaved, medians reported; the machine is shared, so only side-by-side numbers compare.
//!
//! `cargo run --release -p scaletrain-kernels --example gemm_f32 [rounds]`

use kernels::gemm::{gemm, gemm_crate, View};
use kernels::matmul::avx512_active;
use kernels::rng::Rng;
use std::time::Instant;

type Kernel = fn(&mut [f32], View, &[f32], View, &[f32], View, f32, f32);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds per call of `f` (repeated until ~40 ms have passed, after one warm-up call).
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let (t0, mut calls) = (Instant::now(), 0u32);
    while t0.elapsed().as_secs_f64() < 0.04 || calls < 2 {
        f();
        calls += 1;
    }
    t0.elapsed().as_secs_f64() / calls as f64
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    if !avx512_active() {
        eprintln!(
            "our AVX-512F kernel is not active here (no AVX-512F, or SCALETRAIN_NO_AVX512=1)"
        );
        std::process::exit(1);
    }
    let m = 1024;
    // (name, k, n) of `out (m, n) = inp (m, k) · w (n, k)ᵀ`.
    let layers = [
        ("qkv 256→768", 256, 768),
        ("attn proj 256→256", 256, 256),
        ("fc 256→1024", 256, 1024),
        ("fc proj 1024→256", 1024, 256),
        ("head 256→8192", 256, 8192),
        ("head 256→50304", 256, 50304),
    ];
    let ops = ["fwd", "d_inp", "d_w"];
    let kernels: [(&str, Kernel); 2] = [("avx512", gemm), ("gemm-crate", gemm_crate)];
    let mut rng = Rng::new(1);
    let data: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = layers
        .iter()
        .map(|&(_, k, n)| {
            let mut x = vec![0.0f32; m * k];
            let mut w = vec![0.0f32; n * k];
            let mut g = vec![0.0f32; m * n];
            rng.fill_uniform(&mut x, -1.0, 1.0);
            rng.fill_uniform(&mut w, -1.0, 1.0);
            rng.fill_uniform(&mut g, -1.0, 1.0);
            (x, w, g)
        })
        .collect();
    // gflops[layer][op][kernel] over rounds.
    let mut gflops = vec![vec![vec![Vec::new(); kernels.len()]; ops.len()]; layers.len()];
    for _ in 0..rounds {
        for (li, &(_, k, n)) in layers.iter().enumerate() {
            let (x, w, g) = &data[li];
            let flops = 2.0 * (m * n * k) as f64;
            for (oi, op) in ops.iter().enumerate() {
                for (ki, &(_, f)) in kernels.iter().enumerate() {
                    let secs = match *op {
                        "fwd" => {
                            let mut out = vec![0.0f32; m * n];
                            time(|| {
                                f(
                                    &mut out,
                                    View::rm(m, n, n),
                                    x,
                                    View::rm(m, k, k),
                                    w,
                                    View::rm(n, k, k).t(),
                                    1.0,
                                    0.0,
                                )
                            })
                        }
                        "d_inp" => {
                            let mut d = vec![0.0f32; m * k];
                            time(|| {
                                f(
                                    &mut d,
                                    View::rm(m, k, k),
                                    g,
                                    View::rm(m, n, n),
                                    w,
                                    View::rm(n, k, k),
                                    1.0,
                                    0.0,
                                )
                            })
                        }
                        _ => {
                            let mut dw = vec![0.0f32; n * k];
                            time(|| {
                                f(
                                    &mut dw,
                                    View::rm(n, k, k),
                                    g,
                                    View::rm(m, n, n).t(),
                                    x,
                                    View::rm(m, k, k),
                                    1.0,
                                    1.0,
                                )
                            })
                        }
                    };
                    gflops[li][oi][ki].push(flops / secs / 1e9);
                }
            }
        }
    }
    println!("one thread, m = {m}, median of {rounds} rounds, GFLOP/s");
    println!(
        "{:<20} {:<6} {:>9} {:>11} {:>7}",
        "layer", "op", "avx512", "gemm-crate", "ratio"
    );
    for (li, &(name, _, _)) in layers.iter().enumerate() {
        for (oi, op) in ops.iter().enumerate() {
            let ours = median(gflops[li][oi][0].clone());
            let theirs = median(gflops[li][oi][1].clone());
            println!(
                "{name:<20} {op:<6} {ours:>9.1} {theirs:>11.1} {:>7.2}",
                ours / theirs
            );
        }
    }
}
