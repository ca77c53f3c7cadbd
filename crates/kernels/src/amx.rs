//! bf16 GEMM on Intel AMX (Advanced Matrix Extensions, Sapphire Rapids and later): one
//! `tdpbf16ps` multiplies a 16×32 bf16 tile by a 32×16 bf16 tile into a 16×16 `f32` tile,
//! every product exact and every sum in `f32` (Intel SDM vol. 2, TDPBF16PS). Used by
//! `matmul::gemm_mixed` when both operands are bf16 or `f32` (at least one bf16; an `f32`
//! operand is rounded to bf16 as it is packed) and the CPU and kernel allow AMX (checked once:
//! CPUID leaf 7 EDX bits 22/24, then Linux's `arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`).
//!
//! Per call: `a` is packed row-major (rows and the inner dimension padded to 32), `b` into
//! 16-column panels in AMX's pair-interleaved layout (row p of a panel holds `(b[2p][j],
//! b[2p+1][j])` for its 16 columns); a 32×32 block of the output is four `f32` tiles
//! accumulated over the whole inner dimension in 32-deep steps, so each output element is one
//! sum in a fixed order whatever the thread split, then scaled and stored (rounded if 16-bit).

use crate::elem::Elem;
use crate::gemm::View;
use std::cell::RefCell;

/// Rows of `a` packed per block; `b` packed per block of at most `B_BLOCK_BYTES`.
const MB: usize = 512;
const B_BLOCK_BYTES: usize = 2 << 20;

/// Whether this CPU and OS let this process use AMX-BF16 (asks the kernel for permission once).
pub(crate) fn available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            use std::arch::x86_64::__cpuid_count;
            let leaf7 = __cpuid_count(7, 0);
            let (bf16, tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
            if !(bf16 && tile) {
                return false;
            }
            // arch_prctl(ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18): process-wide.
            let ret: i64;
            // SAFETY: a plain Linux system call; it reads no memory of ours.
            unsafe {
                std::arch::asm!(
                    "syscall",
                    inlateout("rax") 158i64 => ret,
                    in("rdi") 0x1023i64,
                    in("rsi") 18i64,
                    lateout("rcx") _,
                    lateout("r11") _,
                    options(nostack)
                );
            }
            ret == 0
        })
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// The tile configuration (palette 1): tmm0–3 the 2×2 output tiles (16 rows × 64 bytes),
/// tmm4–5 two 16×32 bf16 tiles of `a`, tmm6–7 two 16-pair × 16-column tiles of `b`.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

thread_local! {
    static PACK: RefCell<(Vec<u16>, Vec<u32>, Vec<u16>)> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// `dst[i]` = `src[i]` rounded to bf16 (bit patterns): a copy for bf16, a vectorised rounding
/// for `f32`, conversion through `f32` otherwise.
pub(crate) fn to_bf16<E: Elem>(src: &[E], dst: &mut [u16]) {
    use std::any::TypeId;
    if TypeId::of::<E>() == TypeId::of::<crate::Bf16>() {
        // SAFETY: E is Bf16, repr(transparent) over u16.
        let s = unsafe { std::slice::from_raw_parts(src.as_ptr() as *const u16, src.len()) };
        dst.copy_from_slice(s);
    } else if let Some(f) = E::f32s(src) {
        // SAFETY: Bf16 is repr(transparent) over u16.
        let d = unsafe {
            std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut crate::Bf16, dst.len())
        };
        crate::Bf16::store(f, d);
    } else {
        for (d, x) in dst.iter_mut().zip(src) {
            *d = x.to_bf16_bits();
        }
    }
}

/// Packs rows `r0..r0+rows` of `a` (element (i, p) at `i·si + p·sp`, p < k) row-major into
/// `dst` (`rows_pad × k_pad` bf16, zero padding).
#[allow(clippy::too_many_arguments)]
fn pack_a<E: Elem>(
    dst: &mut [u16],
    tmp: &mut [u16],
    src: &[E],
    (si, sp): (usize, usize),
    r0: usize,
    rows: usize,
    k: usize,
    k_pad: usize,
) {
    let rows_pad = rows.div_ceil(32) * 32;
    let dst = &mut dst[..rows_pad * k_pad];
    if sp == 1 {
        for i in 0..rows {
            let o = (r0 + i) * si;
            let row = &mut dst[i * k_pad..(i + 1) * k_pad];
            to_bf16(&src[o..o + k], &mut row[..k]);
            row[k..].fill(0);
        }
        dst[rows * k_pad..].fill(0);
    } else if si == 1 {
        // Contiguous along the rows: round one inner index at a time, scatter it down a column.
        dst.fill(0);
        let t = &mut tmp[..rows];
        for p in 0..k {
            let o = r0 + p * sp;
            to_bf16(&src[o..o + rows], t);
            for (i, &x) in t.iter().enumerate() {
                dst[i * k_pad + p] = x;
            }
        }
    } else {
        dst.fill(0);
        for i in 0..rows {
            for p in 0..k {
                dst[i * k_pad + p] = src[(r0 + i) * si + p * sp].to_bf16_bits();
            }
        }
    }
}

/// Packs columns `j0..j0+cols` of `b` (element (p, j) at `p·sp + j·sj`, p < k) into
/// `ceil(cols/16)` panels of `[k_pad/2][16]` bf16 pairs (zero padding).
#[allow(clippy::too_many_arguments)]
fn pack_b<E: Elem>(
    dst: &mut [u32],
    tmp: &mut [u16],
    src: &[E],
    (sp, sj): (usize, usize),
    j0: usize,
    cols: usize,
    k: usize,
    k_pad: usize,
) {
    let kp = k_pad / 2;
    let panels = cols.div_ceil(16);
    let dst = &mut dst[..panels * kp * 16];
    dst.fill(0);
    if sp == 1 {
        // Each column is contiguous along k (b = wᵀ in forward): its pairs are adjacent.
        let t = &mut tmp[..k_pad];
        t[k..].fill(0);
        for j in 0..cols {
            let o = (j0 + j) * sj;
            to_bf16(&src[o..o + k], &mut t[..k]);
            let (q, w) = (j / 16, j % 16);
            let panel = &mut dst[q * kp * 16..(q + 1) * kp * 16];
            for p in 0..kp {
                panel[p * 16 + w] = t[2 * p] as u32 | (t[2 * p + 1] as u32) << 16;
            }
        }
    } else if sj == 1 {
        // Rows of b contiguous: round two rows, interleave them.
        let (t0, t1) = tmp[..2 * cols].split_at_mut(cols);
        for p in 0..k.div_ceil(2) {
            let o = j0 + 2 * p * sp;
            to_bf16(&src[o..o + cols], t0);
            if 2 * p + 1 < k {
                to_bf16(&src[o + sp..o + sp + cols], t1);
            } else {
                t1.fill(0);
            }
            for j in 0..cols {
                dst[(j / 16) * kp * 16 + p * 16 + j % 16] = t0[j] as u32 | (t1[j] as u32) << 16;
            }
        }
    } else {
        for j in 0..cols {
            for p in 0..k.div_ceil(2) {
                let at = |p: usize| {
                    if p < k {
                        src[p * sp + (j0 + j) * sj].to_bf16_bits() as u32
                    } else {
                        0
                    }
                };
                dst[(j / 16) * kp * 16 + p * 16 + j % 16] = at(2 * p) | at(2 * p + 1) << 16;
            }
        }
    }
}

/// One 32×32 output block: `out` (32 × 32 `f32`, row stride 128 bytes) = a rows `[32][k_pad]`
/// (row stride `lda` bytes) times two `b` panels `[k_pad/2][16]` pairs. Tiles configured.
///
/// # Safety
/// AMX is available and `CONFIG` is loaded on this thread; `a` holds 32 rows of `lda` bytes,
/// `b0`/`b1` `k_pad/2 × 64` bytes each, `k_pad` a positive multiple of 32.
#[cfg(target_arch = "x86_64")]
unsafe fn block(
    a: *const u16,
    lda: usize,
    b0: *const u32,
    b1: *const u32,
    k_pad: usize,
    out: *mut f32,
) {
    use std::arch::asm;
    // SAFETY: per the function's contract; tile registers are not used by compiled code.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3"
        );
        for kk in (0..k_pad).step_by(32) {
            let a0 = a.add(kk);
            let a1 = a.add(16 * lda / 2 + kk);
            let p0 = b0.add(kk / 2 * 16);
            let p1 = b1.add(kk / 2 * 16);
            asm!(
                "tileloadd tmm4, [{a0} + {lda}*1]",
                "tileloadd tmm5, [{a1} + {lda}*1]",
                "tileloadd tmm6, [{p0} + {s64}*1]",
                "tileloadd tmm7, [{p1} + {s64}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0,
                a1 = in(reg) a1,
                p0 = in(reg) p0,
                p1 = in(reg) p1,
                lda = in(reg) lda,
                s64 = in(reg) 64usize,
                options(nostack, readonly)
            );
        }
        asm!(
            "tilestored [{c00} + {s}*1], tmm0",
            "tilestored [{c01} + {s}*1], tmm1",
            "tilestored [{c10} + {s}*1], tmm2",
            "tilestored [{c11} + {s}*1], tmm3",
            c00 = in(reg) out,
            c01 = in(reg) out.add(16),
            c10 = in(reg) out.add(16 * 32),
            c11 = in(reg) out.add(16 * 32 + 16),
            s = in(reg) 128usize,
            options(nostack)
        );
    }
}

/// `c = alpha · a · b + beta · c` with `a`, `b` as bf16 (see the module doc). Views as
/// `matmul::gemm`'s; the caller checked shapes and extents, `k > 0` and [`available`].
#[allow(clippy::too_many_arguments)]
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
    #[cfg(target_arch = "x86_64")]
    {
        let (m, n, k) = (cv.rows, cv.cols, av.cols);
        let k_pad = k.div_ceil(32) * 32;
        let nb = (B_BLOCK_BYTES / (2 * k_pad) / 32 * 32).clamp(32, n.div_ceil(32) * 32);
        PACK.with(|bufs| {
            let (abuf, bbuf, tmp) = &mut *bufs.borrow_mut();
            let (need_a, need_b) = (MB.min(m).div_ceil(32) * 32 * k_pad, nb / 2 * k_pad);
            let need_t = 2 * k_pad.max(MB).max(nb);
            if abuf.len() < need_a {
                abuf.resize(need_a, 0);
            }
            if bbuf.len() < need_b {
                bbuf.resize(need_b, 0);
            }
            if tmp.len() < need_t {
                tmp.resize(need_t, 0);
            }
            let mut t = [0.0f32; 32 * 32];
            let mut row = [0.0f32; 32];
            // SAFETY: AMX is available (the caller checked); CONFIG describes the tiles `block`
            // uses. The configuration is per thread and released before returning.
            unsafe {
                std::arch::asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly))
            };
            for i0 in (0..m).step_by(MB) {
                let rows = MB.min(m - i0);
                pack_a(abuf, tmp, a, (av.rs, av.cs), i0, rows, k, k_pad);
                for j0 in (0..n).step_by(nb) {
                    let cols = nb.min(n - j0);
                    pack_b(bbuf, tmp, b, (bv.rs, bv.cs), j0, cols, k, k_pad);
                    for bi in 0..rows.div_ceil(32) {
                        for bj in 0..cols.div_ceil(32) {
                            let ap = abuf[bi * 32 * k_pad..].as_ptr();
                            let q = 2 * bj;
                            let b0 = bbuf[q * k_pad / 2 * 16..].as_ptr();
                            // A 16-column remainder has no second panel: reuse the first (its
                            // results are not stored).
                            let q1 = if (q + 1) * 16 < cols { q + 1 } else { q };
                            let b1 = bbuf[q1 * k_pad / 2 * 16..].as_ptr();
                            // SAFETY: abuf holds 32 padded rows from bi·32 on; b0/b1 are whole
                            // panels; t holds 32 × 32 floats.
                            unsafe { block(ap, 2 * k_pad, b0, b1, k_pad, t.as_mut_ptr()) };
                            let (ti, tj) = (i0 + bi * 32, j0 + bj * 32);
                            let (mr, nc) = (32.min(m - ti), 32.min(n - tj));
                            for ii in 0..mr {
                                let o = (ti + ii) * cv.rs + tj * cv.cs;
                                let y = &mut row[..nc];
                                for (yj, &tv) in y.iter_mut().zip(&t[ii * 32..ii * 32 + nc]) {
                                    *yj = alpha * tv;
                                }
                                if cv.cs == 1 {
                                    let dst = &mut c[o..o + nc];
                                    if beta != 0.0 {
                                        for (yj, d) in y.iter_mut().zip(dst.iter()) {
                                            *yj += beta * d.to_f32();
                                        }
                                    }
                                    C::store(y, dst);
                                } else {
                                    for (jj, &yj) in y.iter().enumerate() {
                                        let idx = o + jj * cv.cs;
                                        let old = if beta != 0.0 {
                                            beta * c[idx].to_f32()
                                        } else {
                                            0.0
                                        };
                                        c[idx] = C::from_f32(yj + old);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            // SAFETY: releases this thread's tile state (loaded above).
            unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
        });
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (c, cv, a, av, b, bv, alpha, beta);
        unreachable!("amx::gemm without AMX");
    }
}
