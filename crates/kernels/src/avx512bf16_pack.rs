//! Packing operands into the pair panels of [`super`]'s micro-kernel (split from
//! `avx512bf16.rs`): `[k2][width]` words, each the bf16 pair `(x[r][2q], x[r][2q + 1])`.

use super::{is_bf16, is_f32};
use crate::elem::Elem;
use crate::gemm::View;

/// Packs rows `r0..r0+rows` of `x` (a `rows × k` view: `a`, or `b` transposed) into
/// `ceil(rows/width)` panels `[k2][width]` of bf16 pairs (missing rows and the odd partner 0).
/// `tmp` (grown as needed) holds rows rounded to bf16 on the way.
pub(super) fn pack<E: Elem>(
    dst: &mut [u32],
    tmp: &mut Vec<u16>,
    x: &[E],
    v: View,
    (r0, rows): (usize, usize),
    k: usize,
    width: usize,
) {
    let k2 = k.div_ceil(2);
    for (s, panel) in dst.chunks_exact_mut(k2 * width).enumerate() {
        let p0 = r0 + s * width;
        let live = width.min(r0 + rows - p0);
        let gather_ok = is_bf16::<E>() && k >= 2 && (p0 + width) * v.rs + k < i32::MAX as usize;
        let staged_ok = is_f32::<E>() && k >= 2 && width * k < i32::MAX as usize;
        if v.cs == 1 && staged_ok {
            // f32 rows, each contiguous (a linear layer's `d_out` for `d_inp`): round the
            // panel's live rows into `tmp` (vectorised, as `Bf16::store`), then gather their
            // pairs as bf16 rows'. The same rounding and pairs as row by row below, so the
            // same panel bit for bit; the scalar scatter of pairs down the panel cost ≈ 4% of a
            // bf16-mixed step.
            if tmp.len() < live * k {
                tmp.resize(live * k, 0);
            }
            let t = &mut tmp[..live * k];
            for (r, row) in t.chunks_exact_mut(k).enumerate() {
                let o = (p0 + r) * v.rs;
                crate::amx::to_bf16(&x[o..o + k], row);
            }
            assert!(panel.len() == k2 * width);
            // SAFETY: AVX-512F/BW/VL are available (the caller checked); `t` holds `live`
            // rows of `k` bf16 values (row stride `k`), every index below `width·k` fits an
            // i32 (checked above), `k ≥ 2`; every word written lies inside `panel` (asserted).
            unsafe {
                pairs_rows(
                    panel.as_mut_ptr(),
                    width,
                    t.as_ptr() as *const crate::Bf16,
                    k,
                    live,
                    k,
                )
            };
        } else if v.cs == 1 && gather_ok {
            // bf16 rows, each contiguous: transposed as words (pairs) or gathered.
            let last = (p0 + live - 1) * v.rs + k - 1;
            assert!(last < x.len() && panel.len() == k2 * width);
            // SAFETY: AVX-512F/BW/VL are available (the caller checked); `E` is `Bf16`
            // (checked); every element read is at most `last` (asserted) and every index fits
            // an i32 (checked above); every word written lies inside `panel` (asserted).
            unsafe {
                pairs_rows(
                    panel.as_mut_ptr(),
                    width,
                    x.as_ptr().add(p0 * v.rs) as *const crate::Bf16,
                    v.rs,
                    live,
                    k,
                )
            };
        } else if v.cs == 1 {
            // Each row is contiguous: round it, then write its pairs down the panel column.
            if tmp.len() < k {
                tmp.resize(k, 0);
            }
            let t = &mut tmp[..k];
            for r in 0..width {
                if r >= live {
                    for q in 0..k2 {
                        panel[q * width + r] = 0;
                    }
                    continue;
                }
                let o = (p0 + r) * v.rs;
                crate::amx::to_bf16(&x[o..o + k], t);
                for q in 0..k2 {
                    let hi = if 2 * q + 1 < k {
                        t[2 * q + 1] as u32
                    } else {
                        0
                    };
                    panel[q * width + r] = t[2 * q] as u32 | hi << 16;
                }
            }
        } else if v.rs == 1 && (is_f32::<E>() || is_bf16::<E>()) {
            // Each inner index is contiguous across the panel's rows: 16 rows at a time in
            // registers (masked loads stop at `live`).
            let last = p0 + live - 1 + (k - 1) * v.cs;
            assert!(last < x.len() && panel.len() == k2 * width);
            // SAFETY: AVX512_BF16/BW/VL are available (the caller checked); every element read
            // is at most `last` (asserted), every word written inside `panel` (asserted).
            unsafe { pairs_down(panel.as_mut_ptr(), width, x.as_ptr().add(p0), v.cs, live, k) };
        } else if v.rs == 1 {
            // Each inner index is contiguous across the panel's rows: round `live` at a time.
            panel.fill(0);
            if tmp.len() < live {
                tmp.resize(live, 0);
            }
            let t = &mut tmp[..live];
            for p in 0..k {
                let o = p0 + p * v.cs;
                crate::amx::to_bf16(&x[o..o + live], t);
                let (row, shift) = (
                    &mut panel[(p / 2) * width..(p / 2) * width + live],
                    16 * (p % 2),
                );
                for (w, &h) in row.iter_mut().zip(t.iter()) {
                    *w |= (h as u32) << shift;
                }
            }
        } else {
            panel.fill(0);
            for r in 0..live {
                for p in 0..k {
                    let h = x[(p0 + r) * v.rs + p * v.cs].to_bf16_bits() as u32;
                    panel[(p / 2) * width + r] |= h << (16 * (p % 2));
                }
            }
        }
    }
}

/// Panel words `[q·width + r]` = the pair (`x[r·rs + 2q]`, `x[r·rs + 2q + 1]`) of bf16 values
/// as one little-endian word, `0` for `r ≥ live` and for the missing partner of an odd `k`.
/// With every row live and an even `rs`, the pairs of a row are consecutive words, so whole
/// 16 × 16 blocks of words are transposed in registers ([`crate::avx512::transpose::blocks`]:
/// 16 loads, 64 permutes, 16 stores); the rest, and panels with missing rows, are gathered
/// ([`pairs_across`]).
///
/// # Safety
/// As [`pairs_across`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pairs_rows(
    panel: *mut u32,
    width: usize,
    x: *const crate::Bf16,
    rs: usize,
    live: usize,
    k: usize,
) {
    let full = if live == width && rs.is_multiple_of(2) {
        k / 2 / 16 * 16
    } else {
        0
    };
    // SAFETY: per the function's contract: words `q < full ≤ k/2` of rows `r < width = live`
    // are the readable elements `2q, 2q + 1 < k`, at word stride `rs/2`; panel words
    // `q·width + r` lie inside `panel`.
    unsafe {
        if full > 0 {
            crate::avx512::transpose::blocks(
                panel as *mut f32,
                x as *const f32,
                rs / 2,
                width,
                full,
            );
        }
        pairs_across(panel, width, x, rs, live, k, full);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pairs_rows(_: *mut u32, _: usize, _: *const crate::Bf16, _: usize, _: usize, _: usize) {
    unreachable!("avx512bf16::pairs_rows without AVX512_BF16");
}

/// The panel words of [`pairs_rows`] for pairs `q ≥ q0`: one `vpgatherdd` per pair and 16 rows.
///
/// # Safety
/// AVX-512F/BW/VL are available; `x + r·rs + p` is readable for `r < live`, `p < k`, and
/// `(width − 1)·rs + k` fits an `i32`; `k ≥ 2`; `panel` holds `ceil(k/2)·width` words;
/// `live ≤ width`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pairs_across(
    panel: *mut u32,
    width: usize,
    x: *const crate::Bf16,
    rs: usize,
    live: usize,
    k: usize,
    q0: usize,
) {
    use std::arch::x86_64::*;
    // SAFETY: per the function's contract; masked-off lanes are not read.
    unsafe {
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let zero = _mm512_setzero_si512();
        for r0 in (0..width).step_by(16) {
            let n_live = live.saturating_sub(r0).min(16);
            let mask = ((1u32 << n_live) - 1) as __mmask16;
            let store = ((1u32 << (width - r0).min(16)) - 1) as __mmask16;
            let rows = _mm512_mullo_epi32(
                _mm512_add_epi32(_mm512_set1_epi32(r0 as i32), lanes),
                _mm512_set1_epi32(rs as i32),
            );
            // the 4 bytes at bf16 element `p` of each row (scale 2: indices count elements)
            let word = |p: usize| {
                let at = _mm512_add_epi32(rows, _mm512_set1_epi32(p as i32));
                _mm512_mask_i32gather_epi32::<2>(zero, mask, at, x as *const _)
            };
            for q in q0..k.div_ceil(2) {
                let w = if 2 * q + 1 < k {
                    word(2 * q) // element 2q low, 2q + 1 high
                } else {
                    _mm512_srli_epi32(word(2 * q - 1), 16) // odd k: (k − 1, 0)
                };
                _mm512_mask_storeu_epi32(panel.add(q * width + r0) as *mut i32, store, w);
            }
        }
    }
}

/// Panel words `[q·width + r]` = the pair (`x[r + 2q·cs]`, `x[r + (2q+1)·cs]`) rounded to bf16
/// (nearest-even; `vcvtneps2bf16` for `f32`, whose denormal inputs become zero as `vdpbf16ps`
/// would treat them anyway), `0` for `r ≥ live` and for the missing partner of an odd `k`.
/// `E` is `f32` or `Bf16`. Complete pairs: from `f32`, both rows rounded by one
/// `vcvtne2ps2bf16` (the same rounding) and interleaved by one `vpermw`; from bf16 with 32 live
/// rows, 32 words by two unpacks and two permutes; otherwise (and the odd tail) each row
/// widened to words and the upper one shifted in.
///
/// # Safety
/// AVX-512F/BW/VL and AVX512_BF16 are available; `x + r + p·cs` is readable for `r < live`,
/// `p < k`; `panel` holds `ceil(k/2)·width` words; `live ≤ width`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn pairs_down<E: Elem>(
    panel: *mut u32,
    width: usize,
    x: *const E,
    cs: usize,
    live: usize,
    k: usize,
) {
    use std::arch::x86_64::*;
    let f32_src = is_f32::<E>();
    // SAFETY: per the function's contract; masked-off lanes are not read.
    unsafe {
        let load = |p: usize, r0: usize, mask: __mmask16| -> __m512i {
            if f32_src {
                let v = _mm512_maskz_loadu_ps(mask, (x as *const f32).add(r0 + p * cs));
                let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm512_cvtepu16_epi32(h)
            } else {
                let h = _mm256_maskz_loadu_epi16(mask, (x as *const i16).add(r0 + p * cs));
                _mm512_cvtepu16_epi32(h)
            }
        };
        let pairs = k / 2;
        let bf16_wide = !f32_src && width == 32 && live == 32;
        if bf16_wide {
            // unpacklo/hi give, per 128-bit lane L, the pair words of rows 8L..8L+3 / 8L+4..8L+7;
            // the permutes put the lanes back in row order (qword indices ≥ 8 pick `uh`).
            let i0 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
            let i1 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
            let x16 = x as *const i16;
            for q in 0..pairs {
                let a = _mm512_loadu_si512(x16.add(2 * q * cs) as *const _);
                let b = _mm512_loadu_si512(x16.add((2 * q + 1) * cs) as *const _);
                let (ul, uh) = (_mm512_unpacklo_epi16(a, b), _mm512_unpackhi_epi16(a, b));
                let dst = panel.add(q * width) as *mut __m512i;
                _mm512_storeu_si512(dst, _mm512_permutex2var_epi64(ul, i0, uh));
                _mm512_storeu_si512(dst.add(1), _mm512_permutex2var_epi64(ul, i1, uh));
            }
        }
        // vpermw indices: word 2r ← row 2q's value r (low half), word 2r + 1 ← row 2q + 1's
        let mut ix = [0i16; 32];
        for (r, w) in ix.chunks_exact_mut(2).enumerate() {
            (w[0], w[1]) = (r as i16, 16 + r as i16);
        }
        let interleave = _mm512_loadu_si512(ix.as_ptr() as *const _);
        for r0 in (0..width).step_by(16) {
            let n_live = live.saturating_sub(r0).min(16);
            let mask = ((1u32 << n_live) - 1) as __mmask16;
            let store = ((1u32 << (width - r0).min(16)) - 1) as __mmask16;
            let mut q0 = 0;
            if bf16_wide {
                q0 = pairs;
            } else if f32_src {
                let xf = x as *const f32;
                for q in 0..pairs {
                    let lo = _mm512_maskz_loadu_ps(mask, xf.add(r0 + 2 * q * cs));
                    let hi = _mm512_maskz_loadu_ps(mask, xf.add(r0 + (2 * q + 1) * cs));
                    // words 0..16: lo rounded, 16..32: hi rounded
                    let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                    let w = _mm512_permutexvar_epi16(interleave, both);
                    _mm512_mask_storeu_epi32(panel.add(q * width + r0) as *mut i32, store, w);
                }
                q0 = pairs;
            }
            for q in q0..k.div_ceil(2) {
                let lo = load(2 * q, r0, mask);
                let w = if 2 * q + 1 < k {
                    _mm512_or_si512(lo, _mm512_slli_epi32(load(2 * q + 1, r0, mask), 16))
                } else {
                    lo
                };
                _mm512_mask_storeu_epi32(panel.add(q * width + r0) as *mut i32, store, w);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pairs_down<E: Elem>(_: *mut u32, _: usize, _: *const E, _: usize, _: usize, _: usize) {
    unreachable!("avx512bf16::pairs_down without AVX512_BF16");
}
