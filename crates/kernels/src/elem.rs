//! Storage element types: `f32`, [`Bf16`] and [`F16`]. Kernels always compute in `f32`; a
//! 16-bit tensor is converted on load (row or panel at a time, into a per-thread staging buffer)
//! and rounded to nearest-even on store.
//!
//! - bfloat16: the top 16 bits of an `f32` (8 exponent bits, 7 stored mantissa bits; unit
//!   roundoff 2⁻⁸). Load is a shift; store rounds to nearest-even.
//! - IEEE binary16: 5 exponent bits, 10 mantissa bits (unit roundoff 2⁻¹¹), finite range
//!   ±65504. Conversions use the F16C instructions (`vcvtph2ps`/`vcvtps2ph`) when the CPU has
//!   them (checked once at run time), a bit-exact software path otherwise.

use std::cell::RefCell;

/// A storage element type. Implemented for `f32`, [`Bf16`] and [`F16`] only.
pub trait Elem: Copy + Default + PartialEq + Send + Sync + std::fmt::Debug + 'static {
    /// Bytes per element.
    const BYTES: usize;
    /// The precision's name.
    const NAME: &'static str;
    /// Unit roundoff of one rounding to this format (`2^-p`, p = stored mantissa bits + 1).
    const UNIT_ROUNDOFF: f32;
    /// Spacing of the subnormal numbers (the absolute rounding step below the normal range).
    const SUBNORMAL_STEP: f32;
    /// The value as `f32` (exact).
    fn to_f32(self) -> f32;
    /// `x` rounded to nearest-even (overflow gives ±inf in binary16; NaN stays NaN).
    fn from_f32(x: f32) -> Self;
    /// `dst[i] = src[i].to_f32()`.
    fn load(src: &[Self], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "Elem::load lengths");
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
    /// `dst[i] = Self::from_f32(src[i])`.
    fn store(src: &[f32], dst: &mut [Self]) {
        assert_eq!(src.len(), dst.len(), "Elem::store lengths");
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = Self::from_f32(s);
        }
    }
    /// The value rounded to bf16 (nearest-even), as its bit pattern.
    #[inline]
    fn to_bf16_bits(self) -> u16 {
        Bf16::from_f32(self.to_f32()).0
    }
    /// The slice itself when `Self` is `f32` (no conversion needed), else `None`.
    fn f32s(s: &[Self]) -> Option<&[f32]>;
    /// The slice itself when `Self` is `f32`, else `None`.
    fn f32s_mut(s: &mut [Self]) -> Option<&mut [f32]>;
}

impl Elem for f32 {
    const BYTES: usize = 4;
    const NAME: &'static str = "fp32";
    const UNIT_ROUNDOFF: f32 = f32::EPSILON / 2.0;
    const SUBNORMAL_STEP: f32 = f32::from_bits(1); // 2^-149
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> f32 {
        x
    }
    fn load(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn store(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn f32s(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
    fn f32s_mut(s: &mut [f32]) -> Option<&mut [f32]> {
        Some(s)
    }
}

/// bfloat16, stored as its bit pattern.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Elem for Bf16 {
    const BYTES: usize = 2;
    const NAME: &'static str = "bf16";
    const UNIT_ROUNDOFF: f32 = 1.0 / 256.0;
    const SUBNORMAL_STEP: f32 = f32::from_bits(0x0001_0000); // 2^-133
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
    #[inline(always)]
    fn to_bf16_bits(self) -> u16 {
        self.0
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Bf16 {
        let b = x.to_bits();
        if x.is_nan() {
            return Bf16(((b >> 16) as u16) | 0x0040); // quiet NaN, sign kept
        }
        // Round to nearest, ties to even: add 0x7fff plus the lowest kept bit, then truncate.
        Bf16(((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16)
    }
    fn load(src: &[Bf16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "Bf16::load lengths");
        crate::fastmath::vectorized(|| {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = f32::from_bits((s.0 as u32) << 16);
            }
        })
    }
    fn store(src: &[f32], dst: &mut [Bf16]) {
        assert_eq!(src.len(), dst.len(), "Bf16::store lengths");
        // Branch-free so it vectorises: NaN → quiet NaN, else round to nearest-even.
        crate::fastmath::vectorized(|| {
            for (d, &x) in dst.iter_mut().zip(src) {
                let b = x.to_bits();
                let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
                let nan = ((b >> 16) as u16) | 0x0040;
                d.0 = if x.is_nan() { nan } else { rounded };
            }
        })
    }
    fn f32s(_: &[Bf16]) -> Option<&[f32]> {
        None
    }
    fn f32s_mut(_: &mut [Bf16]) -> Option<&mut [f32]> {
        None
    }
}

/// IEEE 754 binary16, stored as its bit pattern.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct F16(pub u16);

/// binary16 → f32, exact, in software.
fn f16_to_f32_soft(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: value = man · 2⁻²⁴; normalise.
            let shift = man.leading_zeros() - 21; // bring the top set bit to bit 10
            let m = (man << shift) & 0x3ff;
            let e = 127 - 15 + 1 - shift;
            sign | (e << 23) | (m << 13)
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, _) => sign | 0x7fc0_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// f32 → binary16, round to nearest-even, in software.
fn f32_to_f16_soft(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign
            | 0x7c00
            | if man != 0 {
                0x200 | (man >> 13) as u16
            } else {
                0
            };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00; // overflow → inf
    }
    if e <= 0 {
        // Subnormal or zero in binary16: shift the full mantissa (with its hidden bit) right.
        if e < -10 {
            return sign; // below half the smallest subnormal → ±0
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32; // 13 + (1 - e)
        let half = 1u32 << (shift - 1);
        let rest = m & ((1u32 << shift) - 1);
        let mut r = m >> shift;
        if rest > half || (rest == half && (r & 1) == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (man >> 13);
    let rest = man & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && (r & 1) == 1) {
        r += 1; // may carry into the exponent, up to inf: both correct
    }
    sign | r as u16
}

#[cfg(target_arch = "x86_64")]
mod f16c {
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("f16c") && is_x86_feature_detected!("avx"))
    }

    /// # Safety
    /// The CPU must support F16C and AVX.
    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn load(src: &[u16], dst: &mut [f32]) {
        let n = src.len() / 8 * 8;
        let mut i = 0;
        while i < n {
            // SAFETY: i + 8 <= len for both slices; unaligned loads/stores.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        for j in n..src.len() {
            dst[j] = super::f16_to_f32_soft(src[j]);
        }
    }

    /// # Safety
    /// The CPU must support F16C and AVX.
    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn store(src: &[f32], dst: &mut [u16]) {
        let n = src.len() / 8 * 8;
        let mut i = 0;
        while i < n {
            // SAFETY: as in `load`.
            unsafe {
                let x = _mm256_loadu_ps(src.as_ptr().add(i));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
                _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
            }
            i += 8;
        }
        for j in n..src.len() {
            dst[j] = super::f32_to_f16_soft(src[j]);
        }
    }
}

impl Elem for F16 {
    const BYTES: usize = 2;
    const NAME: &'static str = "fp16";
    const UNIT_ROUNDOFF: f32 = 1.0 / 2048.0;
    const SUBNORMAL_STEP: f32 = f32::from_bits(0x3380_0000); // 2^-24
    #[inline]
    fn to_f32(self) -> f32 {
        f16_to_f32_soft(self.0)
    }
    #[inline]
    fn from_f32(x: f32) -> F16 {
        F16(f32_to_f16_soft(x))
    }
    fn load(src: &[F16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "F16::load lengths");
        // SAFETY: F16 is repr(transparent) over u16.
        let bits = unsafe { std::slice::from_raw_parts(src.as_ptr() as *const u16, src.len()) };
        #[cfg(target_arch = "x86_64")]
        if f16c::available() {
            // SAFETY: the CPU has F16C and AVX (checked).
            return unsafe { f16c::load(bits, dst) };
        }
        for (d, &h) in dst.iter_mut().zip(bits) {
            *d = f16_to_f32_soft(h);
        }
    }
    fn store(src: &[f32], dst: &mut [F16]) {
        assert_eq!(src.len(), dst.len(), "F16::store lengths");
        // SAFETY: F16 is repr(transparent) over u16.
        let bits =
            unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut u16, dst.len()) };
        #[cfg(target_arch = "x86_64")]
        if f16c::available() {
            // SAFETY: the CPU has F16C and AVX (checked).
            return unsafe { f16c::store(src, bits) };
        }
        for (d, &x) in bits.iter_mut().zip(src) {
            *d = f32_to_f16_soft(x);
        }
    }
    fn f32s(_: &[F16]) -> Option<&[f32]> {
        None
    }
    fn f32s_mut(_: &mut [F16]) -> Option<&mut [f32]> {
        None
    }
}

/// Converts a whole buffer (e.g. fp32 master weights → 16-bit working weights).
pub fn convert<A: Elem, B: Elem>(src: &[A], dst: &mut [B]) {
    assert_eq!(src.len(), dst.len(), "convert lengths");
    const CHUNK: usize = 4096;
    with_staging(CHUNK.min(src.len()), |buf| {
        for (s, d) in src.chunks(CHUNK).zip(dst.chunks_mut(CHUNK)) {
            let buf = &mut buf[..s.len()];
            A::load(s, buf);
            B::store(buf, d);
        }
    });
}

thread_local! {
    /// Per-thread staging buffers, reused (a stack: nested users take the next one). They grow
    /// to the largest size asked and are kept, so a steady-state step allocates nothing.
    static STAGING: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a staging buffer of `len` `f32`s (contents unspecified) owned by this thread.
pub fn with_staging<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = STAGING.with(|s| s.borrow_mut().pop()).unwrap_or_default();
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    STAGING.with(|s| s.borrow_mut().push(buf));
    r
}

/// `f(x)` where `x` is `src` as `f32`: the slice itself for `f32`, else a staged copy.
pub fn with_f32<E: Elem, R>(src: &[E], f: impl FnOnce(&[f32]) -> R) -> R {
    match E::f32s(src) {
        Some(s) => f(s),
        None => with_staging(src.len(), |buf| {
            E::load(src, buf);
            f(buf)
        }),
    }
}

/// `f(x)` where `x` is `dst` as mutable `f32` (loaded first when `load`), written back after:
/// the slice itself for `f32`, else a staged copy rounded into `dst` when `f` returns.
pub fn with_f32_mut<E: Elem, R>(dst: &mut [E], load: bool, f: impl FnOnce(&mut [f32]) -> R) -> R {
    match E::f32s_mut(dst) {
        Some(s) => f(s),
        None => with_staging(dst.len(), |buf| {
            if load {
                E::load(dst, buf);
            }
            let r = f(buf);
            E::store(buf, dst);
            r
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn f16_software_and_hardware_conversions_agree_on_every_value() {
        let all: Vec<F16> = (0..=u16::MAX).map(F16).collect();
        let mut hw = vec![0.0f32; all.len()];
        F16::load(&all, &mut hw);
        for (h, &x) in all.iter().zip(&hw) {
            let s = f16_to_f32_soft(h.0);
            assert!(
                s.to_bits() == x.to_bits() || (s.is_nan() && x.is_nan()),
                "{h:?}"
            );
            if !x.is_nan() {
                assert_eq!(F16::from_f32(x), *h, "round trip {h:?}");
            }
        }
        // f32 → f16: random bit patterns, halfway cases, overflow and subnormals.
        let mut rng = Rng::new(3);
        let mut xs: Vec<f32> = (0..100_000)
            .map(|_| f32::from_bits(rng.below(1 << 32) as u32))
            .filter(|x| !x.is_nan())
            .collect();
        xs.extend([
            65504.0,
            65519.0,
            65520.0,
            1e-8,
            2.9802322e-8,
            6.1e-5,
            -0.0,
            1.0 + 1.0 / 4096.0,
        ]);
        let mut hw = vec![F16(0); xs.len()];
        F16::store(&xs, &mut hw);
        for (x, h) in xs.iter().zip(&hw) {
            assert_eq!(F16::from_f32(*x), *h, "{x:e}");
            let back = h.to_f32() as f64;
            let err = (back - *x as f64).abs();
            if x.abs() < 65504.0 && x.abs() > 6.2e-5 {
                assert!(err <= x.abs() as f64 / 2048.0, "{x:e} -> {back:e}");
            }
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(Bf16::from_f32(1.0).0, 0x3f80);
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties to even (1.0).
        assert_eq!(Bf16::from_f32(1.0 + 1.0 / 256.0).0, 0x3f80);
        assert_eq!(Bf16::from_f32(1.0 + 3.0 / 256.0).0, 0x3f82);
        assert!(Bf16::from_f32(f32::NAN).to_f32().is_nan());
        assert_eq!(Bf16::from_f32(f32::MAX).to_f32(), f32::INFINITY);
        let mut rng = Rng::new(4);
        let xs: Vec<f32> = (0..100_000)
            .map(|_| f32::from_bits(rng.below(1 << 32) as u32))
            .collect();
        let mut v = vec![Bf16(0); xs.len()];
        Bf16::store(&xs, &mut v);
        for (x, b) in xs.iter().zip(&v) {
            let want = Bf16::from_f32(*x);
            assert!(*b == want || (x.is_nan() && b.to_f32().is_nan()), "{x:e}");
        }
        for _ in 0..10_000 {
            let x = (rng.normal() * 100.0) as f32;
            let y = Bf16::from_f32(x).to_f32();
            assert!((y - x).abs() <= x.abs() * Bf16::UNIT_ROUNDOFF, "{x} -> {y}");
        }
    }

    #[test]
    fn staged_views_write_back() {
        let mut v = vec![Bf16::from_f32(1.5); 10];
        with_f32_mut(&mut v, true, |x| x.iter_mut().for_each(|y| *y *= 2.0));
        assert!(v.iter().all(|y| y.to_f32() == 3.0));
        let s = with_f32(&v, |x| x.iter().sum::<f32>());
        assert_eq!(s, 30.0);
        let mut out = vec![F16(0); 10];
        convert(&v, &mut out);
        assert!(out.iter().all(|y| y.to_f32() == 3.0));
    }
}
