//! Test helpers: random tensors, closeness checks with first-mismatch reports, and central
//! finite differences.

use crate::rng::Rng;

pub fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    let mut v = vec![0.0; n];
    rng.fill_normal(&mut v, std);
    v
}

/// Asserts |a - b| <= atol + rtol * |b| elementwise; prints the first mismatches.
#[track_caller]
pub fn assert_close(name: &str, a: &[f32], b: &[f32], rtol: f32, atol: f32) {
    assert_eq!(a.len(), b.len(), "{name}: lengths differ");
    let bad: Vec<usize> = (0..a.len())
        .filter(|&i| {
            // NaN fails every comparison, so a NaN counts as a mismatch.
            let ok = (a[i] - b[i]).abs() <= atol + rtol * b[i].abs();
            !ok
        })
        .collect();
    if !bad.is_empty() {
        let show: Vec<String> = bad
            .iter()
            .take(5)
            .map(|&i| format!("[{i}] got {} want {}", a[i], b[i]))
            .collect();
        panic!(
            "{name}: {} of {} elements differ (rtol {rtol}, atol {atol}); first: {}",
            bad.len(),
            a.len(),
            show.join(", ")
        );
    }
}

/// Checks the analytic gradient `analytic` of the scalar `loss(x)` at `x` against central
/// differences on up to `samples` coordinates. The loss is evaluated in f64 from f32 outputs.
#[track_caller]
pub fn check_grad(
    name: &str,
    x: &mut [f32],
    analytic: &[f32],
    samples: usize,
    eps: f32,
    tol: f64,
    mut loss: impl FnMut(&[f32]) -> f64,
) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let mut rng = Rng::new(1234);
    let idx: Vec<usize> = if x.len() <= samples {
        (0..x.len()).collect()
    } else {
        (0..samples)
            .map(|_| rng.below(x.len() as u64) as usize)
            .collect()
    };
    for i in idx {
        let orig = x[i];
        x[i] = orig + eps;
        let lp = loss(x);
        x[i] = orig - eps;
        let lm = loss(x);
        x[i] = orig;
        let numeric = (lp - lm) / (2.0 * eps as f64);
        let a = analytic[i] as f64;
        let err = (a - numeric).abs();
        assert!(
            err <= tol * (1.0 + numeric.abs()),
            "{name}[{i}]: analytic {a}, finite-difference {numeric}, |diff| {err} > tol {tol}"
        );
    }
}

/// Σ out · r in f64: a random linear functional, so d(loss)/d(out) = r.
pub fn dot(out: &[f32], r: &[f32]) -> f64 {
    out.iter().zip(r).map(|(&a, &b)| a as f64 * b as f64).sum()
}
