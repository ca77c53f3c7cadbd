//! Single-threaded GFLOP/s of the matmul kernels on the three products of each linear layer of
//! the `bench train` model (m = b·t = 1024, c = 256): forward `out = inp · wᵀ`, backward
//! `d_inp = d_out · w` and `d_w += d_outᵀ · inp`, plus the LM head at vocabularies 8192 and
//! 50304. Variants:
//!
//! - `avx512`: our AVX-512F f32 kernel on f32 data;
//! - `gemm-crate`: the `gemm` crate's f32 kernel on the same data;
//! - `bf16 dp`: bf16 storage as the bf16 training mode has it (forward: all bf16; `d_inp`:
//!   f32 `d_out` × bf16 `w` into f32; `d_w`: f32 `d_out` × bf16 `inp` into bf16) on our
//!   AVX512_BF16 kernel (`vdpbf16ps`; the f32 operand rounded to bf16 as it is packed);
//! - `bf16 staged`: the same data through `f32` panels and the f32 kernel (AVX512_BF16 off).
//!
//! Every variant runs once per round, rounds interleaved, medians reported; the machine is
//! shared, so only side-by-side numbers compare.
//!
//! `cargo run --release -p scaletrain-kernels --example gemm_bench [rounds]`

use kernels::gemm::{gemm, gemm_crate, gemm_mixed, View};
use kernels::matmul::{avx512_active, avx512_bf16_active, set_avx512_bf16};
use kernels::rng::Rng;
use kernels::{Bf16, Elem};
use std::time::Instant;

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

fn bf16s(x: &[f32]) -> Vec<Bf16> {
    x.iter().map(|&v| Bf16::from_f32(v)).collect()
}

struct Layer {
    k: usize,
    n: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    g: Vec<f32>,
    x16: Vec<Bf16>,
    w16: Vec<Bf16>,
}

/// Seconds for one call of `op` (0 fwd, 1 d_inp, 2 d_w) with variant `v`.
fn run(l: &Layer, m: usize, op: usize, v: usize) -> f64 {
    let (k, n) = (l.k, l.n);
    let (fwd_v, dinp_v, dw_v) = (
        (View::rm(m, n, n), View::rm(m, k, k), View::rm(n, k, k).t()),
        (View::rm(m, k, k), View::rm(m, n, n), View::rm(n, k, k)),
        (View::rm(n, k, k), View::rm(m, n, n).t(), View::rm(m, k, k)),
    );
    if v < 2 {
        let f = if v == 0 { gemm } else { gemm_crate };
        return match op {
            0 => {
                let mut c = vec![0.0f32; m * n];
                time(|| f(&mut c, fwd_v.0, &l.x, fwd_v.1, &l.w, fwd_v.2, 1.0, 0.0))
            }
            1 => {
                let mut c = vec![0.0f32; m * k];
                time(|| f(&mut c, dinp_v.0, &l.g, dinp_v.1, &l.w, dinp_v.2, 1.0, 0.0))
            }
            _ => {
                let mut c = vec![0.0f32; n * k];
                time(|| f(&mut c, dw_v.0, &l.g, dw_v.1, &l.x, dw_v.2, 1.0, 1.0))
            }
        };
    }
    set_avx512_bf16(v == 2);
    let secs = match op {
        0 => {
            let mut c = vec![Bf16::default(); m * n];
            time(|| gemm_mixed(&mut c, fwd_v.0, &l.x16, fwd_v.1, &l.w16, fwd_v.2, 1.0, 0.0))
        }
        1 => {
            let mut c = vec![0.0f32; m * k];
            time(|| gemm_mixed(&mut c, dinp_v.0, &l.g, dinp_v.1, &l.w16, dinp_v.2, 1.0, 0.0))
        }
        _ => {
            let mut c = vec![Bf16::default(); n * k];
            time(|| gemm_mixed(&mut c, dw_v.0, &l.g, dw_v.1, &l.x16, dw_v.2, 1.0, 1.0))
        }
    };
    set_avx512_bf16(true);
    secs
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let m = 1024;
    // (name, k, n) of `out (m, n) = inp (m, k) · w (n, k)ᵀ`.
    let shapes = [
        ("qkv 256→768", 256, 768),
        ("attn proj 256→256", 256, 256),
        ("fc 256→1024", 256, 1024),
        ("fc proj 1024→256", 1024, 256),
        ("head 256→8192", 256, 8192),
        ("head 256→50304", 256, 50304),
    ];
    let mut names = vec!["avx512", "gemm-crate"];
    if !avx512_active() {
        eprintln!("note: our AVX-512F kernel is off here (no AVX-512F or SCALETRAIN_NO_AVX512=1); 'avx512' runs the fallback");
    }
    if avx512_bf16_active() {
        names.extend(["bf16 dp", "bf16 staged"]);
    } else {
        eprintln!("note: no AVX512_BF16 here (or AMX runs bf16): bf16 variants skipped");
    }
    let mut rng = Rng::new(1);
    let layers: Vec<Layer> = shapes
        .iter()
        .map(|&(_, k, n)| {
            let mut x = vec![0.0f32; m * k];
            let mut w = vec![0.0f32; n * k];
            let mut g = vec![0.0f32; m * n];
            rng.fill_uniform(&mut x, -1.0, 1.0);
            rng.fill_uniform(&mut w, -1.0, 1.0);
            rng.fill_uniform(&mut g, -1.0, 1.0);
            let (x16, w16) = (bf16s(&x), bf16s(&w));
            Layer {
                k,
                n,
                x,
                w,
                g,
                x16,
                w16,
            }
        })
        .collect();
    let ops = ["fwd", "d_inp", "d_w"];
    // gflops[layer][op][variant] over rounds.
    let mut gflops = vec![vec![vec![Vec::new(); names.len()]; ops.len()]; layers.len()];
    for _ in 0..rounds {
        for (li, l) in layers.iter().enumerate() {
            let flops = 2.0 * (m * l.n * l.k) as f64;
            for (oi, per_op) in gflops[li].iter_mut().enumerate() {
                for (v, out) in per_op.iter_mut().enumerate() {
                    out.push(flops / run(l, m, oi, v) / 1e9);
                }
            }
        }
    }
    println!("one thread, m = {m}, median GFLOP/s of {rounds} rounds; ratios to gemm-crate (and bf16 dp to avx512 f32)");
    print!("{:<20} {:<6}", "layer", "op");
    for n in &names {
        print!(" {n:>11}");
    }
    println!(" {:>8} {:>9}", "avx512/x", "dp/avx512");
    for (li, &(name, _, _)) in shapes.iter().enumerate() {
        for (oi, op) in ops.iter().enumerate() {
            let med: Vec<f64> = gflops[li][oi].iter().map(|v| median(v.clone())).collect();
            print!("{name:<20} {op:<6}");
            for g in &med {
                print!(" {g:>11.1}");
            }
            print!(" {:>8.2}", med[0] / med[1]);
            if med.len() > 2 {
                print!(" {:>9.2}", med[2] / med[0]);
            }
            println!();
        }
    }
}
