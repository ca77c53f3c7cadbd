//! Tests of the AVX512_BF16 GEMM: within a derived bound of an f64 sum of the rounded operands,
//! bitwise independent of the block computed, and its bf16 output rounded as `Bf16::from_f32`.

use super::*;
use crate::rng::Rng;
use crate::testutil::randn;
use crate::Bf16;

fn bits(x: f32) -> f32 {
    Bf16::from_f32(x).to_f32()
}

/// One lane of `vdpbf16ps` as the SDM's pseudo-code writes it: the odd product is added
/// first, then the even one (each product of bf16 values exact in f32, each add rounded).
/// Used as a reference within one rounding per add, since the exact internal rounding of
/// the pair sum is the CPU's.
fn chain_f64(a: &[f32], b: &[f32], c0: f64, k: usize) -> (f64, f64) {
    let (mut s, mut mag) = (c0, c0.abs());
    for p in 0..k {
        let t = bits(a[p]) as f64 * bits(b[p]) as f64;
        s += t;
        mag += t.abs();
    }
    (s, mag)
}

/// Against an f64 sum of the bf16-rounded operands, within γ(k+1) of the sum of |terms|;
/// odd `k`, edge tiles, all layouts, `beta` 0 / 1 / 0.5, `alpha` ≠ 1, bf16 and f32 `c`.
#[test]
fn matches_f64_of_rounded_operands_within_derived_bound() {
    if !available() {
        eprintln!("skipped: no AVX512_BF16 on this CPU");
        return;
    }
    let u = f64::powi(2.0, -24);
    for (si, &(m, n, k)) in [
        (1, 1, 1),
        (13, 33, 31),
        (25, 70, 257),
        (200, 40, 6),
        (12, 32, 64),
    ]
    .iter()
    .enumerate()
    {
        let mut rng = Rng::new(40 + si as u64);
        let (a, b, c0) = (
            randn(&mut rng, m * k, 1.0),
            randn(&mut rng, k * n, 1.0),
            randn(&mut rng, m * n, 1.0),
        );
        let a16: Vec<Bf16> = a.iter().map(|&x| Bf16::from_f32(x)).collect();
        let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect(); // (n, k)
        for (alpha, beta) in [(1.0, 0.0), (1.0, 1.0), (1.0, 0.5), (0.25, 0.0)] {
            // a bf16 row-major, b f32 as the transpose of (n, k) (forward's wᵀ).
            let mut c = c0.clone();
            gemm(
                &mut c,
                View::rm(m, n, n),
                &a16,
                View::rm(m, k, k),
                &bt,
                View::rm(n, k, k).t(),
                alpha,
                beta,
            );
            // a f32 transposed (d_w's d_outᵀ), b bf16 row-major, c bf16.
            let at: Vec<f32> = (0..m * k).map(|x| a[(x % m) * k + x / m]).collect(); // (k, m)
            let b16: Vec<Bf16> = b.iter().map(|&x| Bf16::from_f32(x)).collect();
            let mut c16: Vec<Bf16> = c0.iter().map(|&x| Bf16::from_f32(x)).collect();
            gemm(
                &mut c16,
                View::rm(m, n, n),
                &at,
                View::rm(k, m, m).t(),
                &b16,
                View::rm(k, n, n),
                alpha,
                beta,
            );
            let g = (k + 1) as f64 * u / (1.0 - (k + 1) as f64 * u);
            for i in 0..m {
                for j in 0..n {
                    let bcol: Vec<f32> = (0..k).map(|p| b[p * n + j]).collect();
                    for (name, got, cinit, out_u) in [
                        ("f32 c", c[i * n + j] as f64, c0[i * n + j], 0.0),
                        (
                            "bf16 c",
                            c16[i * n + j].to_f32() as f64,
                            bits(c0[i * n + j]),
                            1.0 / 256.0,
                        ),
                    ] {
                        let init = if beta == 0.0 {
                            0.0
                        } else {
                            (beta * cinit) as f64
                        };
                        let (s, mag) = chain_f64(&a[i * k..(i + 1) * k], &bcol, init, k);
                        let want = alpha as f64 * s;
                        let bound =
                            alpha as f64 * g * mag * 1.01 + 1.01 * out_u * want.abs() + 1e-30;
                        assert!(
                            (got - want).abs() <= bound,
                            "{name} {:?} alpha {alpha} beta {beta} [{i},{j}]: got {got} want {want} (bound {bound:e})",
                            (m, n, k)
                        );
                    }
                }
            }
        }
    }
}

/// A bf16 `c` (rounded in registers, masked at the edges) holds exactly the bits of the
/// `f32` result rounded by `Bf16::from_f32`, NaN and infinities included, for `beta` 0 and 1.
#[test]
fn bf16_output_is_the_f32_result_rounded() {
    if !available() {
        eprintln!("skipped: no AVX512_BF16 on this CPU");
        return;
    }
    let (m, n, k) = (29, 75, 40);
    let mut rng = Rng::new(9);
    let mut a: Vec<Bf16> = randn(&mut rng, m * k, 1.0)
        .iter()
        .map(|&x| Bf16::from_f32(x))
        .collect();
    a[3 * k] = Bf16::from_f32(f32::NAN);
    a[17 * k + 1] = Bf16::from_f32(f32::INFINITY);
    let w: Vec<Bf16> = randn(&mut rng, n * k, 1.0)
        .iter()
        .map(|&x| Bf16::from_f32(x))
        .collect();
    let c0: Vec<Bf16> = randn(&mut rng, m * n, 1.0)
        .iter()
        .map(|&x| Bf16::from_f32(x))
        .collect();
    for beta in [0.0, 1.0] {
        let mut want: Vec<f32> = c0.iter().map(|x| x.to_f32()).collect();
        let mut got = c0.clone();
        for c in [&mut want as &mut dyn std::any::Any, &mut got] {
            let (av, wv) = (View::rm(m, k, k), View::rm(n, k, k).t());
            if let Some(c) = c.downcast_mut::<Vec<f32>>() {
                gemm(c, View::rm(m, n, n), &a, av, &w, wv, 1.0, beta);
            } else if let Some(c) = c.downcast_mut::<Vec<Bf16>>() {
                gemm(c, View::rm(m, n, n), &a, av, &w, wv, 1.0, beta);
            }
        }
        for (x, (g, f)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.0, Bf16::from_f32(*f).0, "beta {beta} [{x}]: f32 {f}");
        }
        assert!(want[3 * n].is_nan() && want[17 * n].is_infinite());
    }
}

/// An element's bits do not depend on the rows and columns computed with it.
#[test]
fn element_bits_do_not_depend_on_the_block_computed() {
    if !available() {
        eprintln!("skipped: no AVX512_BF16 on this CPU");
        return;
    }
    let (m, n, k) = (45, 70, 301);
    let mut rng = Rng::new(5);
    let a: Vec<Bf16> = randn(&mut rng, m * k, 1.0)
        .iter()
        .map(|&x| Bf16::from_f32(x))
        .collect();
    let w: Vec<Bf16> = randn(&mut rng, n * k, 1.0)
        .iter()
        .map(|&x| Bf16::from_f32(x))
        .collect();
    let mut full = vec![f32::NAN; m * n];
    gemm(
        &mut full,
        View::rm(m, n, n),
        &a,
        View::rm(m, k, k),
        &w,
        View::rm(n, k, k).t(),
        1.0,
        0.0,
    );
    let (r0, rows, c0, cols) = (5, 17, 3, 37);
    let mut part = vec![f32::NAN; rows * cols];
    gemm(
        &mut part,
        View::rm(rows, cols, cols),
        &a[r0 * k..],
        View::rm(rows, k, k),
        &w[c0 * k..],
        View::rm(cols, k, k).t(),
        1.0,
        0.0,
    );
    for i in 0..rows {
        for j in 0..cols {
            let (g, f) = (part[i * cols + j], full[(r0 + i) * n + c0 + j]);
            assert_eq!(
                g.to_bits(),
                f.to_bits(),
                "[{i},{j}]: {g} in the block, {f} in the full product"
            );
        }
    }
}

/// The packing of row-contiguous operands (gathers) writes exactly the pair words of the
/// definition: `Bf16::from_f32` of each element (ties, NaN, subnormals), zero partners and rows.
#[test]
fn row_packing_matches_the_definition_bitwise() {
    if !available() {
        eprintln!("skipped: no AVX512_BF16 on this CPU");
        return;
    }
    fn check<E: Elem>(x: &[E], rs: usize, (r0, rows): (usize, usize), k: usize, width: usize) {
        let k2 = k.div_ceil(2);
        let panels = rows.div_ceil(width);
        let mut got = vec![0xdead_beef_u32; panels * k2 * width];
        let mut tmp = Vec::new(); // pack grows it
        pack(
            &mut got,
            &mut tmp,
            x,
            View::rm(r0 + rows, k, rs),
            (r0, rows),
            k,
            width,
        );
        for (i, &w) in got.iter().enumerate() {
            let (s, q, r) = (i / (k2 * width), i % (k2 * width) / width, i % width);
            let row = s * width + r;
            let half = |p: usize| {
                if row < rows && p < k {
                    x[(r0 + row) * rs + p].to_bf16_bits() as u32
                } else {
                    0
                }
            };
            let want = half(2 * q) | half(2 * q + 1) << 16;
            assert_eq!(
                w,
                want,
                "{} k {k} width {width} panel {s} pair {q} row {r}",
                E::NAME
            );
        }
    }
    let mut rng = Rng::new(12);
    let mut x = randn(&mut rng, 40 * 70, 1.0);
    let specials = [
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        -0.0,
        f32::from_bits(0x007f_ffff), // subnormal that rounds up to the smallest normal
        f32::from_bits(0x0000_8000), // a tie
        f32::from_bits(0x3f80_8000), // a tie to even
        f32::from_bits(0x3f81_8000), // a tie up
    ];
    for (i, &v) in specials.iter().enumerate() {
        x[i * 71] = v;
    }
    let xb: Vec<Bf16> = x.iter().map(|&v| Bf16::from_f32(v)).collect();
    for k in [2, 3, 7, 64, 65] {
        for (width, r0, rows) in [(12, 0, 12), (12, 3, 29), (32, 1, 37), (32, 0, 5)] {
            check(&x, 70, (r0, rows), k, width);
            check(&xb, 70, (r0, rows), k, width);
        }
    }
}

/// The packing of column-contiguous operands (`a` transposed, as `d_w`'s `d_outᵀ`; `b` as
/// `d_w`'s `inp`) writes the pair words of the definition: bf16 as is, `f32` rounded to
/// nearest-even with subnormal inputs as zero (`vcvtneps2bf16`).
#[test]
fn column_packing_matches_the_definition_bitwise() {
    if !available() {
        eprintln!("skipped: no AVX512_BF16 on this CPU");
        return;
    }
    fn check<E: Elem>(x: &[E], ld: usize, (r0, rows): (usize, usize), k: usize, width: usize) {
        let k2 = k.div_ceil(2);
        let panels = rows.div_ceil(width);
        let mut got = vec![0xdead_beef_u32; panels * k2 * width];
        let mut tmp = Vec::new(); // pack grows it
                                  // element (i, p) at x[i + p·ld]
        let v = View::rm(k, r0 + rows, ld).t();
        pack(&mut got, &mut tmp, x, v, (r0, rows), k, width);
        for (n, &w) in got.iter().enumerate() {
            let (s, q, r) = (n / (k2 * width), n % (k2 * width) / width, n % width);
            let row = s * width + r;
            let half = |p: usize| {
                if row >= rows || p >= k {
                    return 0;
                }
                let e = x[r0 + row + p * ld].to_f32();
                let e = if e != 0.0 && e.abs() < f32::MIN_POSITIVE {
                    0.0f32.copysign(e)
                } else {
                    e
                };
                Bf16::from_f32(e).0 as u32
            };
            let want = half(2 * q) | half(2 * q + 1) << 16;
            assert_eq!(
                w,
                want,
                "{} k {k} width {width} panel {s} pair {q} row {r}",
                E::NAME
            );
        }
    }
    let mut rng = Rng::new(13);
    let mut x = randn(&mut rng, 70 * 80, 1.0);
    let specials = [
        f32::INFINITY,
        -0.0,
        f32::from_bits(0x007f_ffff), // subnormal: zero in vcvtneps2bf16
        f32::from_bits(0x3f80_8000), // a tie to even
        f32::from_bits(0x3f81_8000), // a tie up
        f32::NAN,
    ];
    for (i, &v) in specials.iter().enumerate() {
        x[i * 81] = v;
    }
    let xb: Vec<Bf16> = x.iter().map(|&v| Bf16::from_f32(v)).collect();
    for k in [1, 2, 3, 7, 64, 65] {
        for (width, r0, rows) in [
            (12, 0, 12),
            (12, 3, 29),
            (32, 1, 37),
            (32, 0, 5),
            (12, 2, 70),
        ] {
            check(&x, 80, (r0, rows), k, width);
            check(&xb, 80, (r0, rows), k, width);
        }
    }
}
