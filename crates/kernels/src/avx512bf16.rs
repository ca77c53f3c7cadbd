//! bf16 GEMM on AVX512_BF16 (`vdpbf16ps`): for each of 16 `f32` lanes, one instruction adds
//! the two products of a pair of bf16 values to the lane (Intel SDM vol. 2, VDPBF16PS; a
//! product of two bf16 numbers is exact in `f32`; denormal inputs and outputs are flushed to
//! zero). Used by `gemm::gemm_mixed` where [`crate::amx`] is not, when both operands are bf16
//! or `f32` with at least one bf16 (an `f32` operand is rounded to bf16 as it is packed, as the
//! AMX kernel does).
//!
//! Per call, `NC` columns of `b` are packed into 32-column panels of bf16 *pairs* (`[k/2][32]`
//! u32, the pair `(b[2q][j], b[2q+1][j])` in word `q·32 + j`) and `MC` rows of `a` into 12-row
//! panels of pairs (`[k/2][12]`), both over the whole inner dimension (an odd `k` gets a zero
//! last partner). The micro-kernel keeps a 12 × 32 `f32` tile in 24 zmm accumulators; per pair
//! it broadcasts each row's pair and issues 24 `vdpbf16ps`. Each output element is therefore one
//! chain `acc = dp(acc, pair q)` for `q = 0, 1, …, ⌈k/2⌉−1` from `0` / `c` / `beta·c`, times
//! `alpha` when `≠ 1`, stored once (rounded if `c` is 16-bit): its bits depend on its row of
//! `a`, column of `b` and `k` only, not on the thread split or tile position.

use crate::elem::Elem;
use crate::gemm::View;
use std::cell::RefCell;

const MR: usize = 12;
const NR: usize = 32;
const MC: usize = 16 * MR;
const NC: usize = 1024;

/// Whether this CPU has AVX-512F/BW/VL and AVX512_BF16 (run-time check, cached by std).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// 16 words on a 64-byte boundary (packing buffer unit).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; 16]);

thread_local! {
    /// Per-thread buffers: `a` panels, `b` panels, one row/column rounded to bf16.
    static PACK: RefCell<(Vec<Line>, Vec<Line>, Vec<u16>)> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// The first `n` words of `v`, grown when needed (contents unspecified).
fn words(v: &mut Vec<Line>, n: usize) -> &mut [u32] {
    if v.len() < n.div_ceil(16) {
        v.resize(n.div_ceil(16), Line([0; 16]));
    }
    // SAFETY: `Line` is `repr(C)` over 16 u32s with no padding, and `v` holds ≥ `n` words.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u32, n) }
}

/// `c = alpha · a · b + beta · c` with `a`, `b` rounded to bf16 (see the module doc). The caller
/// ([`crate::gemm::gemm_mixed`]) checked shapes and extents, `k > 0` and [`available`].
pub(crate) fn gemm<C: Elem, A: Elem, B: Elem>(
    c: &mut [C],
    cv: View,
    a: &[A],
    av: View,
    b: &[B],
    bv: View,
    alpha: f32,
    beta: f32,
) {
    let (m, n, k) = (cv.rows, cv.cols, av.cols);
    let k2 = k.div_ceil(2);
    PACK.with(|bufs| {
        let (abuf, bbuf, tmp) = &mut *bufs.borrow_mut();
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            let npanels = nc.div_ceil(NR);
            let bp = words(bbuf, npanels * k2 * NR);
            pack(bp, tmp, b, bv.t(), (jc, nc), k, NR);
            for ic in (0..m).step_by(MC) {
                let mc = MC.min(m - ic);
                let mpanels = mc.div_ceil(MR);
                let ap = words(abuf, mpanels * k2 * MR);
                pack(ap, tmp, a, av, (ic, mc), k, MR);
                for q in 0..npanels {
                    let bpan = &bp[q * k2 * NR..(q + 1) * k2 * NR];
                    for s in 0..mpanels {
                        let apan = &ap[s * k2 * MR..(s + 1) * k2 * MR];
                        tile(
                            c,
                            cv,
                            (ic + s * MR, jc + q * NR),
                            apan,
                            bpan,
                            k2,
                            alpha,
                            beta,
                        );
                    }
                }
            }
        }
    });
}

fn is_f32<E: 'static>() -> bool {
    std::any::TypeId::of::<E>() == std::any::TypeId::of::<f32>()
}

fn is_bf16<E: 'static>() -> bool {
    std::any::TypeId::of::<E>() == std::any::TypeId::of::<crate::Bf16>()
}

/// One 12 × 32 tile of `c` at `(i, j)`, clipped to the view: directly on `c` (masked loads and
/// stores at the right edge) when it is `f32` or bf16 with contiguous rows and the tile has all
/// `MR` rows, else (the last rows of a block, other types, strided rows) through an `f32`
/// scratch tile.
#[allow(clippy::too_many_arguments)]
fn tile<C: Elem>(
    c: &mut [C],
    cv: View,
    (i, j): (usize, usize),
    apan: &[u32],
    bpan: &[u32],
    k2: usize,
    alpha: f32,
    beta: f32,
) {
    let (mr, nr) = (MR.min(cv.rows - i), NR.min(cv.cols - j));
    assert!(apan.len() == k2 * MR && bpan.len() == k2 * NR);
    let base = i * cv.rs + j * cv.cs;
    let init = if beta == 0.0 {
        Init::Zero
    } else if beta == 1.0 {
        Init::Load
    } else {
        Init::Scale(beta)
    };
    let out = if is_f32::<C>() {
        Some(Out::F32)
    } else if is_bf16::<C>() {
        Some(Out::Bf16)
    } else {
        None
    };
    if let (Some(out), 1, MR) = (out, cv.cs, mr) {
        assert!(base + (MR - 1) * cv.rs + nr <= c.len());
        let cols = if nr == NR { u32::MAX } else { (1u32 << nr) - 1 };
        // SAFETY: AVX512_BF16/BW/VL are available (the caller checked); the panels hold `k2`
        // pair rows (asserted); `C` is `f32` or `Bf16` (`repr(transparent)` over `u16`) as
        // `out` says, and every `c` index the masks select lies inside `c` (asserted).
        unsafe {
            let (a, b, c) = (
                apan.as_ptr(),
                bpan.as_ptr(),
                c.as_mut_ptr().add(base) as *mut u8,
            );
            let rc = (cv.rs, cols);
            match (out, nr == NR) {
                (Out::F32, true) => micro::<false, false>(k2, a, b, c, rc, init, alpha),
                (Out::F32, false) => micro::<false, true>(k2, a, b, c, rc, init, alpha),
                (Out::Bf16, true) => micro::<true, false>(k2, a, b, c, rc, init, alpha),
                (Out::Bf16, false) => micro::<true, true>(k2, a, b, c, rc, init, alpha),
            }
        };
        return;
    }
    let mut t = [0.0f32; MR * NR];
    if init != Init::Zero {
        for r in 0..mr {
            for q in 0..nr {
                t[r * NR + q] = c[base + r * cv.rs + q * cv.cs].to_f32();
            }
        }
    }
    // SAFETY: as above; `t` is a whole `f32` tile with row stride `NR`.
    unsafe {
        micro::<false, false>(
            k2,
            apan.as_ptr(),
            bpan.as_ptr(),
            t.as_mut_ptr() as *mut u8,
            (NR, u32::MAX),
            init,
            alpha,
        )
    };
    for r in 0..mr {
        for q in 0..nr {
            c[base + r * cv.rs + q * cv.cs] = C::from_f32(t[r * NR + q]);
        }
    }
}

/// The storage type of the tile `micro` reads and writes.
#[derive(Clone, Copy, PartialEq)]
enum Out {
    F32,
    /// bf16 bits: loaded by a shift, stored rounded to nearest-even exactly as
    /// [`crate::Bf16`]`::from_f32` rounds (NaN → quiet NaN with its sign; no flushing).
    Bf16,
}

/// How the accumulators start: at zero, at `c`, or at `beta · c`.
#[derive(Clone, Copy, PartialEq)]
enum Init {
    Zero,
    Load,
    Scale(f32),
}

/// The register tile: `c[r][q]` (row stride `ldc` elements, bf16 bits when `BF16` else `f32`;
/// columns `q` whose bit is set in `cols`) = the `vdpbf16ps` chain over the `k2` pairs
/// `a[p·MR + r]` × `b[p·NR + q]`, started per `init`, times `alpha` when `≠ 1`; a bf16 `c` is
/// loaded by a shift and stored rounded exactly as [`crate::Bf16`]`::from_f32` rounds.
///
/// # Safety
/// AVX-512F/BW/VL and AVX512_BF16 are available; `a` points to `k2·MR` words, `b` to `k2·NR`
/// words on a 64-byte boundary, `c` to `MR` rows at stride `ldc` of which the elements
/// selected by `cols` are readable and writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn micro<const BF16: bool, const MASKED: bool>(
    k2: usize,
    a: *const u32,
    b: *const u32,
    c: *mut u8,
    (ldc, cols): (usize, u32),
    init: Init,
    alpha: f32,
) {
    use std::arch::x86_64::*;
    // (All `MR` rows, with a constant trip count everywhere: row-dependent masks or tests
    // made the compiler keep the tile in a stack array instead of registers.)
    let (m0, m1) = (cols as __mmask16, (cols >> 16) as __mmask16);
    let mask = |h: usize| if h == 0 { m0 } else { m1 };
    // SAFETY: per the function's contract (masked-off lanes are neither read nor written);
    // `__m512i` and `__m512bh` are both 512-bit vectors.
    unsafe {
        let (c32, c16) = (c as *mut f32, c as *mut i16);
        let at = |r: usize, h: usize| r * ldc + 16 * h;
        // Unmasked loads and stores where all 32 columns are live: with the masked intrinsics
        // the compiler kept the tile in a stack array around the loop.
        let load_f32 = |r: usize, h: usize| -> __m512 {
            if MASKED {
                _mm512_maskz_loadu_ps(mask(h), c32.add(at(r, h)))
            } else {
                _mm512_loadu_ps(c32.add(at(r, h)))
            }
        };
        let load_bf16 = |r: usize, h: usize| -> __m512 {
            let x = if MASKED {
                _mm256_maskz_loadu_epi16(mask(h), c16.add(at(r, h)))
            } else {
                _mm256_loadu_si256(c16.add(at(r, h)) as *const __m256i)
            };
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16))
        };
        let store_f32 = |r: usize, h: usize, v: __m512| {
            if MASKED {
                _mm512_mask_storeu_ps(c32.add(at(r, h)), mask(h), v)
            } else {
                _mm512_storeu_ps(c32.add(at(r, h)), v)
            }
        };
        let store_bf16 = |r: usize, h: usize, v: __m512| {
            // (bits + 0x7fff + lowest kept bit) >> 16, NaN → (bits >> 16) | 0x40.
            let x = _mm512_castps_si512(v);
            let hi = _mm512_srli_epi32(x, 16);
            let odd = _mm512_and_si512(hi, _mm512_set1_epi32(1));
            let bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff));
            let rounded = _mm512_srli_epi32(_mm512_add_epi32(x, bias), 16);
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            let quiet = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
            let w = _mm512_mask_blend_epi32(nan, rounded, quiet);
            let h16 = _mm512_cvtepi32_epi16(w);
            if MASKED {
                _mm256_mask_storeu_epi16(c16.add(at(r, h)), mask(h), h16);
            } else {
                _mm256_storeu_si256(c16.add(at(r, h)) as *mut __m256i, h16);
            }
        };
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let load = |r: usize, h: usize| {
            if BF16 {
                load_bf16(r, h)
            } else {
                load_f32(r, h)
            }
        };
        match init {
            Init::Zero => {}
            Init::Load => {
                for (r, row) in acc.iter_mut().enumerate() {
                    row[0] = load(r, 0);
                    row[1] = load(r, 1);
                }
            }
            Init::Scale(beta) => {
                let s = _mm512_set1_ps(beta);
                for (r, row) in acc.iter_mut().enumerate() {
                    row[0] = _mm512_mul_ps(s, load(r, 0));
                    row[1] = _mm512_mul_ps(s, load(r, 1));
                }
            }
        }
        let (mut a, mut b) = (a, b);
        for _ in 0..k2 {
            let b0: __m512bh = std::mem::transmute(_mm512_load_si512(b as *const __m512i));
            let b1: __m512bh = std::mem::transmute(_mm512_load_si512(b.add(16) as *const __m512i));
            for (r, row) in acc.iter_mut().enumerate() {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], x, b0);
                row[1] = _mm512_dpbf16_ps(row[1], x, b1);
            }
            a = a.add(MR);
            b = b.add(NR);
        }
        if alpha != 1.0 {
            let s = _mm512_set1_ps(alpha);
            for row in acc.iter_mut() {
                row[0] = _mm512_mul_ps(s, row[0]);
                row[1] = _mm512_mul_ps(s, row[1]);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            if BF16 {
                store_bf16(r, 0, row[0]);
                store_bf16(r, 1, row[1]);
            } else {
                store_f32(r, 0, row[0]);
                store_f32(r, 1, row[1]);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn micro<const BF16: bool, const MASKED: bool>(
    _: usize,
    _: *const u32,
    _: *const u32,
    _: *mut u8,
    _: (usize, u32),
    _: Init,
    _: f32,
) {
    unreachable!("avx512bf16::micro without AVX512_BF16");
}

#[path = "avx512bf16_pack.rs"]
mod pack;
use pack::pack;

#[cfg(test)]
#[path = "avx512bf16_tests.rs"]
mod tests;
