//! The AVX-512 switch (`SCALETRAIN_NO_AVX512`, `set_avx512`) and what each path promises,
//! through the public matmul. One test in its own process: the switch is process-wide.

use kernels::matmul::{avx512_active, matmul_backward, matmul_forward, set_avx512};
use kernels::rng::Rng;
use kernels::Par;

fn cpu_has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut v = vec![0.0; n];
    rng.fill_normal(&mut v, 1.0);
    v
}

/// Forward and backward at several thread counts: (out, d_inp, d_w).
fn run_all(
    inp: &[f32],
    w: &[f32],
    bias: &[f32],
    d_out: &[f32],
    dw0: &[f32],
    (m, k, n): (usize, usize, usize),
    par: Par,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut out = vec![f32::NAN; m * n];
    matmul_forward(&mut out, inp, w, Some(bias), m, k, n, par);
    let mut d_inp = vec![f32::NAN; m * k];
    let mut d_w = dw0.to_vec();
    matmul_backward(&mut d_inp, &mut d_w, None, d_out, inp, w, m, k, n, par);
    (out, d_inp, d_w)
}

#[test]
fn switch_selects_the_kernel_and_each_keeps_its_promise() {
    // Set before the first matmul of this process, as a user would.
    std::env::set_var("SCALETRAIN_NO_AVX512", "1");
    assert!(
        !avx512_active(),
        "SCALETRAIN_NO_AVX512=1 must turn the AVX-512 kernel off"
    );

    let (m, k, n) = (70, 300, 45);
    let mut rng = Rng::new(11);
    let (inp, w, bias) = (
        randn(&mut rng, m * k),
        randn(&mut rng, n * k),
        randn(&mut rng, n),
    );
    let (d_out, dw0) = (randn(&mut rng, m * n), randn(&mut rng, n * k));

    // The promised chains: out = fma chain over k from the bias; d_inp over n from 0; d_w over
    // the rows m from its prior value.
    let mut want_out = vec![0.0f32; m * n];
    let mut want_dinp = vec![0.0f32; m * k];
    let mut want_dw = dw0.clone();
    for i in 0..m {
        for j in 0..n {
            let mut acc = bias[j];
            for p in 0..k {
                acc = inp[i * k + p].mul_add(w[j * k + p], acc);
            }
            want_out[i * n + j] = acc;
        }
        for p in 0..k {
            let mut acc = 0.0f32;
            for j in 0..n {
                acc = d_out[i * n + j].mul_add(w[j * k + p], acc);
            }
            want_dinp[i * k + p] = acc;
        }
    }
    for j in 0..n {
        for p in 0..k {
            let mut acc = dw0[j * k + p];
            for i in 0..m {
                acc = d_out[i * n + j].mul_add(inp[i * k + p], acc);
            }
            want_dw[j * k + p] = acc;
        }
    }
    let shape = (m, k, n);
    let crate_path = run_all(&inp, &w, &bias, &d_out, &dw0, shape, Par::Threads(2));

    set_avx512(true);
    assert_eq!(
        avx512_active(),
        cpu_has_avx512f(),
        "set_avx512(true) turns it on where the CPU has it"
    );
    if avx512_active() {
        for par in [Par::Seq, Par::Threads(2), Par::Threads(3)] {
            let (out, d_inp, d_w) = run_all(&inp, &w, &bias, &d_out, &dw0, shape, par);
            for (name, got, want) in [
                ("out", &out, &want_out),
                ("d_inp", &d_inp, &want_dinp),
                ("d_w", &d_w, &want_dw),
            ] {
                let bad = (0..got.len())
                    .filter(|&i| got[i].to_bits() != want[i].to_bits())
                    .count();
                assert_eq!(
                    bad, 0,
                    "{name} at {par:?}: {bad} elements differ from the scalar FMA chain"
                );
            }
        }
    } else {
        eprintln!("no AVX-512F: only the gemm-crate path checked");
    }

    // Both paths against each other: |x − y| ≤ 2·γ(K+1)·Σ|terms| per element, bounded here by
    // the f64 sum of |terms| (K = the summed dimension + 1 for the initial value).
    let u = f64::powi(2.0, -24);
    let gamma = |len: usize| (len + 1) as f64 * u / (1.0 - (len + 1) as f64 * u);
    let reference = [(&want_out, k), (&want_dinp, n), (&want_dw, m)];
    let mags: [Vec<f64>; 3] = [
        (0..m * n)
            .map(|x| {
                let (i, j) = (x / n, x % n);
                bias[j].abs() as f64
                    + (0..k)
                        .map(|p| (inp[i * k + p] * w[j * k + p]).abs() as f64)
                        .sum::<f64>()
            })
            .collect(),
        (0..m * k)
            .map(|x| {
                let (i, p) = (x / k, x % k);
                (0..n)
                    .map(|j| (d_out[i * n + j] * w[j * k + p]).abs() as f64)
                    .sum::<f64>()
            })
            .collect(),
        (0..n * k)
            .map(|x| {
                let (j, p) = (x / k, x % k);
                dw0[x].abs() as f64
                    + (0..m)
                        .map(|i| (d_out[i * n + j] * inp[i * k + p]).abs() as f64)
                        .sum::<f64>()
            })
            .collect(),
    ];
    let got = [&crate_path.0, &crate_path.1, &crate_path.2];
    for (t, ((want, len), mag)) in reference.iter().zip(&mags).enumerate() {
        for x in 0..want.len() {
            let d = (got[t][x] as f64 - want[x] as f64).abs();
            let bound = 2.0 * gamma(*len) * mag[x];
            assert!(
                d <= bound,
                "output {t} [{x}]: gemm crate {} vs chain {} (bound {bound:e})",
                got[t][x],
                want[x]
            );
        }
    }

    set_avx512(false);
    assert!(!avx512_active());
    let again = run_all(&inp, &w, &bias, &d_out, &dw0, shape, Par::Threads(2));
    assert!(
        again == crate_path,
        "set_avx512(false) must give the gemm crate's results again"
    );
}
