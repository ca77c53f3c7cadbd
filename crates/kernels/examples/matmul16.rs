//! How should matmul consume 16-bit inputs? Single-threaded GFLOP/s of `out = inp · wᵀ` on the
//! `bench train` model's linear shapes (m = b·t = 1024), every variant once per round, rounds
//! interleaved, medians reported (the machine is shared; only side-by-side numbers compare):
//!
//! - `f32`: the f32 GEMM on f32 data (the baseline);
//! - `bf16 staged`, `fp16 staged`: our `gemm_mixed` (16-bit blocks converted into f32 panels,
//!   then the f32 GEMM), through `matmul_forward`;
//! - `bf16 AMX`: our AMX kernel (`tdpbf16ps`), where the CPU and OS allow it;
//! - `bf16 AVX512-BF16`: our `vdpbf16ps` kernel, where the CPU has AVX512_BF16;
//! - `fp16 gemm-crate`: the `gemm` crate's own f16 GEMM (it converts to f32 while packing);
//!   all operands f16, output f16;
//! - `bf16 convert-all`: convert both whole operands to f32 first, then the f32 GEMM (the
//!   simplest scheme; needs f32 copies of the operands).
//!
//! `cargo run --release -p scaletrain-kernels --example matmul16 [rounds]`

use kernels::elem::convert;
use kernels::matmul::{amx_active, avx512_bf16_active, matmul_forward, set_amx, set_avx512_bf16};
use kernels::rng::Rng;
use kernels::{Bf16, Elem, Par, F16};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rounded<E: Elem>(x: &[f32]) -> Vec<E> {
    x.iter().map(|&v| E::from_f32(v)).collect()
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let (m, c, vp) = (1024, 256, 8192);
    let shapes = [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c), (c, vp)]; // (k, n)
    let names = [
        "f32",
        "bf16 staged",
        "fp16 staged",
        "fp16 gemm-crate",
        "bf16 convert-all",
        "bf16 AMX",
        "bf16 AVX512-BF16",
    ];
    let mut gflops: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut rng = Rng::new(1);
    let data: Vec<(usize, usize, Vec<f32>, Vec<f32>)> = shapes
        .iter()
        .map(|&(k, n)| {
            let mut a = vec![0.0f32; m * k];
            let mut w = vec![0.0f32; n * k];
            rng.fill_uniform(&mut a, -1.0, 1.0);
            rng.fill_uniform(&mut w, -1.0, 1.0);
            (k, n, a, w)
        })
        .collect();
    for _ in 0..rounds {
        for (v, g) in gflops.iter_mut().enumerate() {
            let (mut flops, mut secs) = (0.0, 0.0);
            for (k, n, a, w) in &data {
                let (k, n) = (*k, *n);
                let (ab, wb) = (rounded::<Bf16>(a), rounded::<Bf16>(w));
                let (ah, wh) = (rounded::<F16>(a), rounded::<F16>(w));
                let (mut o32, mut ob, mut oh) = (
                    vec![0.0f32; m * n],
                    vec![Bf16::default(); m * n],
                    vec![F16::default(); m * n],
                );
                let (mut a32, mut w32) = (vec![0.0f32; m * k], vec![0.0f32; n * k]);
                set_amx(v == 5);
                set_avx512_bf16(v == 6);
                if (v == 5 && !amx_active()) || (v == 6 && !avx512_bf16_active()) {
                    continue;
                }
                let mut run = || match v {
                    0 => matmul_forward(&mut o32, a, w, None, m, k, n, Par::Seq),
                    1 => matmul_forward(&mut ob, &ab, &wb, None, m, k, n, Par::Seq),
                    2 => matmul_forward(&mut oh, &ah, &wh, None, m, k, n, Par::Seq),
                    3 => gemm_crate_f16(&mut oh, &ah, &wh, m, k, n),
                    5 | 6 => matmul_forward(&mut ob, &ab, &wb, None, m, k, n, Par::Seq),
                    4 => {
                        convert(&ab, &mut a32);
                        convert(&wb, &mut w32);
                        matmul_forward(&mut o32, &a32, &w32, None, m, k, n, Par::Seq);
                        convert(&o32, &mut ob);
                    }
                    _ => unreachable!(),
                };
                run(); // warm
                let reps = 3;
                let t0 = Instant::now();
                for _ in 0..reps {
                    run();
                }
                secs += t0.elapsed().as_secs_f64();
                flops += reps as f64 * 2.0 * (m * k * n) as f64;
            }
            if secs > 0.0 {
                g.push(flops / secs / 1e9);
            }
        }
    }
    println!("single-threaded matmul forward, m = {m}, model shapes (k, n) {shapes:?}, {rounds} interleaved rounds");
    let base = median(gflops[0].clone());
    for (name, g) in names.iter().zip(&gflops) {
        if g.is_empty() {
            println!("{name:>17}: not available on this CPU");
            continue;
        }
        let med = median(g.clone());
        println!(
            "{name:>17}: median {med:6.1} GFLOP/s ({:.2}x f32); rounds {:.1?}",
            med / base,
            g
        );
    }
}

/// `out (m, n) = inp (m, k) · w (n, k)ᵀ` with the gemm crate's f16 kernel, single-threaded.
fn gemm_crate_f16(out: &mut [F16], inp: &[F16], w: &[F16], m: usize, k: usize, n: usize) {
    assert!(out.len() == m * n && inp.len() == m * k && w.len() == n * k);
    // SAFETY: F16 is repr(transparent) over the same binary16 bits as gemm::f16; the views
    // below stay inside the three slices (row-major out and inp, w read transposed).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr() as *mut gemm::f16,
            1,
            n as isize,
            false,
            inp.as_ptr() as *const gemm::f16,
            1,
            k as isize,
            w.as_ptr() as *const gemm::f16,
            k as isize,
            1,
            gemm::f16::from_f32(0.0),
            gemm::f16::from_f32(1.0),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
