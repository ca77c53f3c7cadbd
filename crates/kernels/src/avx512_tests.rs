//! Tests of the AVX-512F GEMM: bitwise against the scalar FMA chain it promises, within a
//! derived error bound of an f64 reference, on edge shapes and strided views.

use super::*;
use crate::rng::Rng;
use crate::testutil::randn;

type Kernel = fn(&mut [f32], View, &[f32], View, &[f32], View, f32, f32);

/// A `rows × cols` matrix stored in `layout`: row-major, column-major (a transpose), or with
/// gaps in both directions. Returns its storage (unused slots NaN) and view.
#[derive(Clone, Copy, Debug)]
enum Layout {
    Rows,
    Cols,
    Gaps,
}

fn store(x: &[f32], rows: usize, cols: usize, layout: Layout) -> (Vec<f32>, View) {
    let v = match layout {
        Layout::Rows => View::rm(rows, cols, cols),
        Layout::Cols => View::rm(cols, rows, rows).t(),
        Layout::Gaps => View {
            rows,
            cols,
            rs: 2 * cols + 3,
            cs: 2,
        },
    };
    let len = if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * v.rs + (cols - 1) * v.cs + 1
    };
    let mut s = vec![f32::NAN; len];
    for i in 0..rows {
        for j in 0..cols {
            s[i * v.rs + j * v.cs] = x[i * cols + j];
        }
    }
    (s, v)
}

fn get(s: &[f32], v: View, i: usize, j: usize) -> f32 {
    s[i * v.rs + j * v.cs]
}

/// The promised order of operations, element by element, in scalar code.
fn chain(
    a: &[f32],
    b: &[f32],
    c0: &[f32],
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    beta: f32,
) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = if beta == 0.0 {
                0.0
            } else {
                beta * c0[i * n + j]
            };
            for p in 0..k {
                acc = a[i * k + p].mul_add(b[p * n + j], acc);
            }
            out[i * n + j] = if alpha == 1.0 { acc } else { alpha * acc };
        }
    }
    out
}

/// Runs `gemm` with the given layouts; returns `c` row-major.
#[allow(clippy::too_many_arguments)]
fn run(
    f: Kernel,
    a: &[f32],
    b: &[f32],
    c0: &[f32],
    (m, n, k): (usize, usize, usize),
    lay: (Layout, Layout, Layout),
    alpha: f32,
    beta: f32,
) -> Vec<f32> {
    let (sa, av) = store(a, m, k, lay.0);
    let (sb, bv) = store(b, k, n, lay.1);
    let (mut sc, cv) = store(c0, m, n, lay.2);
    if beta == 0.0 {
        // beta = 0 must not read c: poison it.
        for i in 0..m {
            for j in 0..n {
                sc[i * cv.rs + j * cv.cs] = f32::NAN;
            }
        }
    }
    f(&mut sc, cv, &sa, av, &sb, bv, alpha, beta);
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = get(&sc, cv, i, j);
        }
    }
    out
}

fn data(seed: u64, (m, n, k): (usize, usize, usize)) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    (
        randn(&mut rng, m * k, 1.0),
        randn(&mut rng, k * n, 1.0),
        randn(&mut rng, m * n, 1.0),
    )
}

#[track_caller]
fn assert_bits(name: &str, got: &[f32], want: &[f32]) {
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .collect();
    if let Some(&i) = bad.first() {
        panic!(
            "{name}: {} of {} elements differ; first [{i}] got {} want {}",
            bad.len(),
            got.len(),
            got[i],
            want[i]
        );
    }
}

const SHAPES: [(usize, usize, usize); 12] = [
    (1, 1, 1),
    (1, 33, 13),
    (13, 1, 31),
    (12, 32, 16),
    (13, 31, 33),
    (31, 33, 257),
    (33, 65, 256),
    (25, 100, 513),
    (200, 40, 17), // more rows than one packed block (MC = 192)
    (7, 70, 0),
    (12, 64, 48),
    (3, 4100, 5), // more columns than one packed block (NC = 4096)
];

#[test]
fn every_element_is_the_scalar_fma_chain_bitwise() {
    if !available() {
        eprintln!("skipped: no AVX-512F on this CPU");
        return;
    }
    use Layout::*;
    let lays = [
        (Rows, Rows, Rows),
        (Rows, Cols, Rows), // forward: b = wᵀ
        (Cols, Rows, Rows), // d_w: a = d_outᵀ
        (Gaps, Gaps, Gaps),
        (Cols, Cols, Cols),
    ];
    for (si, &shape) in SHAPES.iter().enumerate() {
        let (a, b, c0) = data(si as u64, shape);
        for (alpha, beta) in [(1.0, 0.0), (1.0, 1.0), (1.0, 0.5), (0.25, 0.0)] {
            let want = chain(&a, &b, &c0, shape, alpha, beta);
            for lay in lays {
                let got = run(gemm, &a, &b, &c0, shape, lay, alpha, beta);
                assert_bits(
                    &format!("{shape:?} {lay:?} alpha {alpha} beta {beta}"),
                    &got,
                    &want,
                );
            }
        }
    }
}

/// |c − exact| ≤ γ(k+1)·(Σ_p |a||b| + |beta·c|), γ(n) = n·u/(1 − n·u), u = 2⁻²⁴ (the standard
/// bound for a recursive sum of products, Higham, "Accuracy and Stability", §3.1), for both
/// kernels.
#[test]
fn both_kernels_within_the_derived_error_bound_of_f64() {
    use Layout::*;
    let u = f64::powi(2.0, -24);
    for (si, &(m, n, k)) in SHAPES.iter().enumerate() {
        let (a, b, c0) = data(100 + si as u64, (m, n, k));
        let beta = 0.5f32;
        let mut kernels: Vec<(&str, Kernel)> = vec![("gemm crate", crate::gemm::gemm_crate)];
        if available() {
            kernels.push(("avx512", gemm));
        }
        for (name, f) in kernels {
            let got = run(f, &a, &b, &c0, (m, n, k), (Rows, Cols, Rows), 1.0, beta);
            let g = (k + 1) as f64 * u / (1.0 - (k + 1) as f64 * u);
            for i in 0..m {
                for j in 0..n {
                    let (mut exact, mut mag) = (beta as f64 * c0[i * n + j] as f64, 0.0);
                    mag += exact.abs();
                    for p in 0..k {
                        let t = a[i * k + p] as f64 * b[p * n + j] as f64;
                        exact += t;
                        mag += t.abs();
                    }
                    let err = (got[i * n + j] as f64 - exact).abs();
                    assert!(
                        err <= g * mag,
                        "{name} {:?} [{i},{j}]: error {err:e} over bound {:e}",
                        (m, n, k),
                        g * mag
                    );
                }
            }
        }
    }
}

/// An element's bits do not depend on which rows or columns are computed with it.
#[test]
fn element_bits_do_not_depend_on_the_block_computed() {
    if !available() {
        eprintln!("skipped: no AVX-512F on this CPU");
        return;
    }
    let (m, n, k) = (45, 70, 300);
    let (a, b, _) = data(7, (m, n, k));
    let full = run(
        gemm,
        &a,
        &b,
        &vec![0.0; m * n],
        (m, n, k),
        (Layout::Rows, Layout::Cols, Layout::Rows),
        1.0,
        0.0,
    );
    // Rows 5..22 and columns 3..40, as a sub-view of the same storage.
    let (r0, rows, c0, cols) = (5, 17, 3, 37);
    let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect(); // w (n, k)
    let mut c = vec![f32::NAN; rows * cols];
    gemm(
        &mut c,
        View::rm(rows, cols, cols),
        &a[r0 * k..],
        View::rm(rows, k, k),
        &bt[c0 * k..],
        View::rm(cols, k, k).t(),
        1.0,
        0.0,
    );
    for i in 0..rows {
        for j in 0..cols {
            let (g, w) = (c[i * cols + j], full[(r0 + i) * n + c0 + j]);
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "[{i},{j}] of the block: {g} vs {w} in the full product"
            );
        }
    }
}

#[test]
fn transposing_packer_matches_scalar() {
    if !available() {
        eprintln!("skipped: no AVX-512F on this CPU");
        return;
    }
    let mut rng = Rng::new(9);
    for (width, kc, stride) in [(12, 16, 40), (32, 37, 37), (12, 5, 9), (32, 256, 300)] {
        let src = randn(&mut rng, 3 + (width - 1) * stride + kc, 1.0);
        let mut dst = vec![f32::NAN; kc * width];
        transpose::pack_rows(&mut dst, &src, 3, stride, width, kc);
        for p in 0..kc {
            for r in 0..width {
                assert_eq!(
                    dst[p * width + r],
                    src[3 + r * stride + p],
                    "width {width} kc {kc}: [{p}][{r}]"
                );
            }
        }
    }
}
