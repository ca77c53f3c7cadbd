//! Branch-free `exp` and `tanh` for f32 that vectorise, and the AVX2 dispatch used by the
//! elementwise kernels.
//!
//! Why: glibc's `expf`/`tanhf` are scalar calls (GELU with `tanhf` cost ~20 ns per element,
//! the softmax of a (1024 × 8192) logits matrix ~40 ms), and the workspace builds for baseline
//! x86-64, so loops only use 128-bit SSE2. [`vectorized`] runs a closure inside an
//! `avx512f,avx512bw,avx512vl`- or `avx2,fma`-enabled function when the CPU has them (detected
//! at run time), which lets LLVM vectorise the loop 16 or 8 wide. No fused multiply-adds are
//! formed (Rust does not contract `a*b + c`), so every path gives bitwise-identical
//! elementwise results; reductions ([`exp_sum`], [`max`]: AVX2 intrinsics or scalar) sum in a
//! different order on the two paths.
//!
//! Accuracy: `exp` within 3e-7 relative on [-87, 88] (Cody & Waite 1980 range reduction,
//! degree-6 Taylor polynomial on |r| ≤ ln2/2); `tanh` within 3e-7 absolute. Inputs below -87.3
//! give ~1e-38 rather than 0; no caller relies on exact zeros from `exp`.

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split so that n·LN2_HI is exact for |n| < 2^10.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// 1.5·2^23: adding it rounds to an integer held in the low mantissa bits.
const ROUND: f32 = 12_582_912.0;
const ROUND_BITS: i32 = 0x4B40_0000;
const X_MIN: f32 = -87.3;
const X_MAX: f32 = 88.3;

/// e^x for f32, branch-free (the comparisons compile to min/max).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = if x < X_MIN { X_MIN } else { x };
    let x = if x > X_MAX { X_MAX } else { x };
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = poly(r);
    // 2^n from the integer in t's low bits; the clamp keeps n in [-126, 127].
    let ni = t.to_bits() as i32 - ROUND_BITS;
    p * f32::from_bits(((ni + 127) as u32) << 23)
}

/// 1 + r + r²/2! + … + r⁶/6! by Horner.
#[inline(always)]
fn poly(r: f32) -> f32 {
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    p * r + 1.0
}

/// tanh(x) = 1 − 2 / (e^{2x} + 1), branch-free.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// Runs `f` with AVX-512F/BW/VL (its loops vectorise 16 wide) or else AVX2 and FMA (8 wide)
/// enabled when the CPU supports them, else as is. Only for elementwise loops: the compiler
/// never reorders a floating-point sum, so every element gets the same bits at any width.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("fma")
        {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
            unsafe fn run512<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: the features `run512` enables were detected on this CPU just above.
            return unsafe { run512(f) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: the features `run` enables were detected on this CPU just above.
            return unsafe { run(f) };
        }
    }
    f()
}

/// max over `xs` (−∞ for an empty slice). NaNs are ignored.
pub fn max(xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 detected above.
            return unsafe { avx2::max(xs) };
        }
    }
    xs.iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Σ exp(x − shift) over `xs`.
pub fn exp_sum(xs: &[f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 detected above.
            return unsafe { avx2::exp_sum(xs, shift) };
        }
    }
    xs.iter().map(|&x| exp(x - shift)).sum()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// Eight lanes of [`super::exp`], the same operations in the same order.
    #[target_feature(enable = "avx2")]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(X_MIN)),
            _mm256_set1_ps(X_MAX),
        );
        let t = _mm256_add_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
            _mm256_set1_ps(ROUND),
        );
        let n = _mm256_sub_ps(t, _mm256_set1_ps(ROUND));
        let r = _mm256_sub_ps(
            _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(LN2_HI))),
            _mm256_mul_ps(n, _mm256_set1_ps(LN2_LO)),
        );
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
        }
        let ni = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(ROUND_BITS));
        let scale = _mm256_slli_epi32::<23>(_mm256_add_epi32(ni, _mm256_set1_epi32(127)));
        _mm256_mul_ps(p, _mm256_castsi256_ps(scale))
    }

    #[target_feature(enable = "avx2")]
    unsafe fn hsum(v: __m256) -> f32 {
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
        lanes.iter().sum()
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn exp_sum(xs: &[f32], shift: f32) -> f32 {
        let chunks = xs.chunks_exact(8);
        let rest: f32 = chunks.remainder().iter().map(|&x| exp(x - shift)).sum();
        let s = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        for c in chunks {
            // SAFETY: `c` has exactly 8 elements; loadu has no alignment requirement.
            let x = _mm256_loadu_ps(c.as_ptr());
            acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(x, s)));
        }
        hsum(acc) + rest
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn max(xs: &[f32]) -> f32 {
        let chunks = xs.chunks_exact(8);
        let mut m = chunks
            .remainder()
            .iter()
            .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
        let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in chunks {
            // max_ps returns the second operand when either is NaN, so NaNs are skipped.
            acc = _mm256_max_ps(_mm256_loadu_ps(c.as_ptr()), acc);
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        for x in lanes {
            if x > m {
                m = x;
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_tanh_match_std() {
        let mut worst_exp = 0.0f64;
        let mut worst_tanh = 0.0f64;
        let n = 200_000;
        for i in 0..=n {
            let x = -87.0 + 175.0 * i as f32 / n as f32;
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst_exp = worst_exp.max(rel);
            let y = -10.0 + 20.0 * i as f32 / n as f32;
            worst_tanh = worst_tanh.max((tanh(y) as f64 - (y as f64).tanh()).abs());
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp}");
        assert!(worst_tanh < 3e-7, "tanh absolute error {worst_tanh}");
        assert_eq!(tanh(50.0), 1.0);
        assert_eq!(tanh(-50.0), -1.0);
        assert!(exp(-200.0) < 1e-37);
    }

    #[test]
    fn reductions_match_scalar() {
        let xs: Vec<f32> = (0..1003)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
            .collect();
        let want_max = xs.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        assert_eq!(max(&xs), want_max);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let want: f64 = xs.iter().map(|&x| ((x - 1.5) as f64).exp()).sum();
        let got = exp_sum(&xs, 1.5) as f64;
        assert!(((got - want) / want).abs() < 1e-5, "{got} vs {want}");
        // elementwise results are identical with and without the AVX2 dispatch
        let mut a = vec![0.0f32; xs.len()];
        vectorized(|| {
            for (y, &x) in a.iter_mut().zip(&xs) {
                *y = exp(x);
            }
        });
        let b: Vec<f32> = xs.iter().map(|&x| exp(x)).collect();
        assert_eq!(a, b);
    }
}
