//! Our f32 GEMM for CPUs with AVX-512F: `c = alpha · a · b + beta · c` on strided views.
//!
//! Blocking (the usual packed-panel scheme): the inner dimension is cut into `KC`-deep slices;
//! per slice, `NC` columns of `b` are packed into `NR`-column panels (`[kc][NR]`, zero-padded)
//! and `MC` rows of `a` into `MR`-row panels (`[kc][MR]`, zero-padded), so any strides (the
//! transposes of backward, attention's per-head views) cost one packing pass. The micro-kernel
//! keeps a 12 × 32 block of `c` in 24 zmm accumulators: per `p` it loads two vectors of the `b`
//! panel, broadcasts 12 values of the `a` panel and issues 24 FMAs.
//!
//! Numerics: each element is one FMA chain `acc = fma(a[i][p], b[p][j], acc)` for `p = 0..k`
//! in order, started from `0` (`beta == 0`; `c` is then never read) or from `beta · c` (`c`
//! itself when `beta == 1`), and multiplied by `alpha` at the end (only when `alpha ≠ 1`; the
//! caller sends `alpha ≠ 1` with `beta ≠ 0` elsewhere). Between `KC` slices the partial sum is
//! stored in `c` and reloaded, which is exact, so the chain is the same as one unbroken loop:
//! an element's bits depend on its row of `a`, its column of `b` and `k` only, never on `m`,
//! `n`, the thread split, or whether it sits in an edge tile (edge tiles run the same kernel on
//! zero-padded panels through a scratch tile).

use crate::gemm::View;
use std::cell::RefCell;

/// Rows × columns of the register tile (12 × 32 f32 = 24 zmm accumulators).
pub(crate) const MR: usize = 12;
pub(crate) const NR: usize = 32;
/// Inner-dimension slice, rows of `a` and columns of `b` packed per block.
pub(crate) const KC: usize = 256;
const MC: usize = 16 * MR;
const NC: usize = 4096;

/// Whether this CPU has AVX-512F (checked at run time; the result is cached by std).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// 16 floats on a 64-byte boundary: the unit of the packing buffers, so every `b` panel row is
/// one aligned pair of cache lines.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

thread_local! {
    /// Per-thread packing buffers (`a` block, `b` block), grown to the largest size asked.
    static PACK: RefCell<(Vec<Line>, Vec<Line>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The first `floats` f32s of `v`, growing it when needed (contents unspecified).
fn floats(v: &mut Vec<Line>, floats: usize) -> &mut [f32] {
    let lines = floats.div_ceil(16);
    if v.len() < lines {
        v.resize(lines, Line([0.0; 16]));
    }
    // SAFETY: `Line` is `repr(C)` over 16 f32s with no padding, and `v` holds ≥ `floats` f32s.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut f32, floats) }
}

/// How the accumulators start: at zero, at `c`, or at `beta · c`.
#[derive(Clone, Copy, PartialEq)]
enum Init {
    Zero,
    Load,
    Scale(f32),
}

/// `c = alpha · a · b + beta · c` (see the module doc for the exact order of operations). The
/// caller ([`crate::gemm::gemm`]) checked shapes and extents, that `m, n ≥ 1`, that
/// `alpha == 1 || beta == 0`, and [`available`].
pub(crate) fn gemm(
    c: &mut [f32],
    cv: View,
    a: &[f32],
    av: View,
    b: &[f32],
    bv: View,
    alpha: f32,
    beta: f32,
) {
    gemm_with(c, cv, a, av, B::Raw(b, bv), alpha, beta)
}

/// [`gemm`] with `b` already packed whole ([`Packed`], `k × n`): the same panels [`gemm`]
/// would pack, so the same bits. The caller checked `c`'s and `a`'s views against `b`'s shape.
pub(crate) fn gemm_packed(
    c: &mut [f32],
    cv: View,
    a: &[f32],
    av: View,
    b: &Packed,
    alpha: f32,
    beta: f32,
) {
    assert!(av.cols == b.rows && cv.cols == b.cols && av.rows == cv.rows);
    gemm_with(c, cv, a, av, B::Packed(b), alpha, beta)
}

/// The `b` operand of [`gemm_with`]: a view to pack per block, or panels packed beforehand.
#[derive(Clone, Copy)]
enum B<'a> {
    Raw(&'a [f32], View),
    Packed(&'a Packed),
}

/// A whole `k × n` `b` operand packed once, for reuse by many [`gemm_packed`] calls (a
/// weight used by every micro-batch of a step): per `KC`-deep slice of the inner dimension
/// (`pc`), all `ceil(n/NR)` panels `[kc][NR]` (columns past `n` zero), the slice at
/// `pc · npad` (`npad` = `n` rounded up to `NR`). `k · npad` floats in all.
pub(crate) struct Packed {
    rows: usize,
    cols: usize,
    data: Vec<Line>,
}

impl Packed {
    /// Floats a packed `k × n` operand holds.
    pub(crate) fn floats(k: usize, n: usize) -> usize {
        n.div_ceil(NR) * NR * k
    }

    /// An operand of `k × n`, allocated (and zeroed) now.
    pub(crate) fn new(k: usize, n: usize) -> Packed {
        Packed {
            rows: k,
            cols: n,
            data: vec![Line([0.0; 16]); Self::floats(k, n).div_ceil(16)],
        }
    }

    /// (k, n).
    pub(crate) fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        std::mem::size_of_val(&self.data[..])
    }

    /// Packs `b` (a `k × n` view) into the panels.
    pub(crate) fn pack(&mut self, b: &[f32], bv: View) {
        assert!(bv.rows == self.rows && bv.cols == self.cols);
        let (k, n) = (self.rows, self.cols);
        let npad = n.div_ceil(NR) * NR;
        let all = floats(&mut self.data, k * npad);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            pack_b(
                &mut all[pc * npad..(pc + kc) * npad],
                b,
                bv,
                (pc, kc),
                (0, n),
            );
        }
    }

    /// The panels of inner slice `pc..pc+kc` and columns `jc..jc+nc` (`jc` a multiple of `NR`).
    fn block(&self, (pc, kc): (usize, usize), (jc, nc): (usize, usize)) -> &[f32] {
        let npad = self.cols.div_ceil(NR) * NR;
        let start = pc * npad + jc * kc;
        // SAFETY: `Line` is `repr(C)` over 16 f32s without padding; `data` holds k·npad floats.
        let all: &[f32] = unsafe {
            std::slice::from_raw_parts(self.data.as_ptr() as *const f32, self.rows * npad)
        };
        &all[start..start + nc.div_ceil(NR) * kc * NR]
    }
}

fn gemm_with(c: &mut [f32], cv: View, a: &[f32], av: View, b: B<'_>, alpha: f32, beta: f32) {
    let (m, n, k) = (cv.rows, cv.cols, av.cols);
    debug_assert!(alpha == 1.0 || beta == 0.0);
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                let x = &mut c[i * cv.rs + j * cv.cs];
                let acc = if beta == 0.0 { 0.0 } else { beta * *x };
                *x = if alpha == 1.0 { acc } else { alpha * acc };
            }
        }
        return;
    }
    PACK.with(|bufs| {
        let (abuf, bbuf) = &mut *bufs.borrow_mut();
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            let npanels = nc.div_ceil(NR);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                let init = match (pc, beta) {
                    (0, 0.0) => Init::Zero,
                    (0, 1.0) => Init::Load,
                    (0, beta) => Init::Scale(beta),
                    _ => Init::Load,
                };
                let scale = if pc + kc == k { alpha } else { 1.0 };
                let bp: &[f32] = match b {
                    B::Raw(b, bv) => {
                        let bp = floats(bbuf, npanels * kc * NR);
                        pack_b(bp, b, bv, (pc, kc), (jc, nc));
                        bp
                    }
                    B::Packed(p) => p.block((pc, kc), (jc, nc)),
                };
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    let mpanels = mc.div_ceil(MR);
                    let ap = floats(abuf, mpanels * kc * MR);
                    pack_a(ap, a, av, (ic, mc), (pc, kc));
                    for q in 0..npanels {
                        let j = jc + q * NR;
                        let bpan = &bp[q * kc * NR..(q + 1) * kc * NR];
                        for s in 0..mpanels {
                            let i = ic + s * MR;
                            let apan = &ap[s * kc * MR..(s + 1) * kc * MR];
                            tile(c, cv, (i, j), apan, bpan, kc, init, scale);
                        }
                    }
                }
            }
        }
    });
}

/// One `MR × NR` tile of `c` at `(i, j)` (clipped to the view) from packed panels: directly
/// on `c` when the tile is whole and rows are contiguous, else through a scratch tile.
#[allow(clippy::too_many_arguments)]
fn tile(
    c: &mut [f32],
    cv: View,
    (i, j): (usize, usize),
    apan: &[f32],
    bpan: &[f32],
    kc: usize,
    init: Init,
    alpha: f32,
) {
    let (mr, nr) = (MR.min(cv.rows - i), NR.min(cv.cols - j));
    assert!(apan.len() == kc * MR && bpan.len() == kc * NR);
    let base = i * cv.rs + j * cv.cs;
    if mr == MR && nr == NR && cv.cs == 1 {
        // The last element the kernel touches is (MR-1)·rs + NR-1 past `base`.
        assert!(base + (MR - 1) * cv.rs + NR <= c.len());
        // SAFETY: AVX-512F is available (the caller checked); the panels hold `kc` rows each
        // (asserted) and every `c` index the kernel uses lies inside `c` (asserted).
        unsafe {
            micro(
                kc,
                apan.as_ptr(),
                bpan.as_ptr(),
                c.as_mut_ptr().add(base),
                cv.rs,
                init,
                alpha,
            )
        };
        return;
    }
    let mut t = [Line([0.0; 16]); MR * NR / 16];
    // SAFETY: `Line` is 16 f32s without padding.
    let t: &mut [f32; MR * NR] = unsafe { &mut *(t.as_mut_ptr() as *mut [f32; MR * NR]) };
    if init != Init::Zero {
        for r in 0..mr {
            for q in 0..nr {
                t[r * NR + q] = c[base + r * cv.rs + q * cv.cs];
            }
        }
    }
    // SAFETY: as above; `t` is a whole `MR × NR` tile with row stride `NR`.
    unsafe {
        micro(
            kc,
            apan.as_ptr(),
            bpan.as_ptr(),
            t.as_mut_ptr(),
            NR,
            init,
            alpha,
        )
    };
    for r in 0..mr {
        for q in 0..nr {
            c[base + r * cv.rs + q * cv.cs] = t[r * NR + q];
        }
    }
}

/// The register tile: `c[r][q]` (`r < MR`, `q < NR`, row stride `ldc`) = the FMA chain over
/// `p < kc` of `a[p·MR + r] · b[p·NR + q]`, started per `init`, times `alpha` when `≠ 1`.
///
/// # Safety
/// AVX-512F is available; `a` points to `kc·MR` floats, `b` to `kc·NR` floats on a 64-byte
/// boundary, `c` to `MR` rows of `NR` floats at stride `ldc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn micro(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    init: Init,
    alpha: f32,
) {
    use std::arch::x86_64::*;
    // SAFETY: per the function's contract.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        match init {
            Init::Zero => {}
            Init::Load => {
                for (r, row) in acc.iter_mut().enumerate() {
                    row[0] = _mm512_loadu_ps(c.add(r * ldc));
                    row[1] = _mm512_loadu_ps(c.add(r * ldc + 16));
                }
            }
            Init::Scale(beta) => {
                let s = _mm512_set1_ps(beta);
                for (r, row) in acc.iter_mut().enumerate() {
                    row[0] = _mm512_mul_ps(s, _mm512_loadu_ps(c.add(r * ldc)));
                    row[1] = _mm512_mul_ps(s, _mm512_loadu_ps(c.add(r * ldc + 16)));
                }
            }
        }
        let (mut a, mut b) = (a, b);
        for _ in 0..kc {
            let b0 = _mm512_load_ps(b);
            let b1 = _mm512_load_ps(b.add(16));
            for (r, row) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add(r));
                row[0] = _mm512_fmadd_ps(x, b0, row[0]);
                row[1] = _mm512_fmadd_ps(x, b1, row[1]);
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
            _mm512_storeu_ps(c.add(r * ldc), row[0]);
            _mm512_storeu_ps(c.add(r * ldc + 16), row[1]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn micro(_: usize, _: *const f32, _: *const f32, _: *mut f32, _: usize, _: Init, _: f32) {
    unreachable!("avx512::micro without AVX-512");
}

/// Packs rows `i0..i0+mc` × inner indices `p0..p0+kc` of `a` into `ceil(mc/MR)` panels
/// `[kc][MR]` (rows past `mc` zero).
fn pack_a(
    dst: &mut [f32],
    a: &[f32],
    av: View,
    (i0, mc): (usize, usize),
    (p0, kc): (usize, usize),
) {
    for (s, panel) in dst.chunks_exact_mut(kc * MR).enumerate() {
        let r0 = i0 + s * MR;
        let rows = MR.min(i0 + mc - r0);
        let at = |r: usize, p: usize| (r0 + r) * av.rs + (p0 + p) * av.cs;
        if av.rs == 1 {
            // A panel row (fixed p) is contiguous in `a`.
            for (p, out) in panel.chunks_exact_mut(MR).enumerate() {
                let o = at(0, p);
                out[..rows].copy_from_slice(&a[o..o + rows]);
                out[rows..].fill(0.0);
            }
        } else if av.cs == 1 && rows == MR && transpose::available() {
            transpose::pack_rows(panel, a, at(0, 0), av.rs, MR, kc);
        } else {
            for p in 0..kc {
                for r in 0..MR {
                    panel[p * MR + r] = if r < rows { a[at(r, p)] } else { 0.0 };
                }
            }
        }
    }
}

/// Packs inner indices `p0..p0+kc` × columns `j0..j0+nc` of `b` into `ceil(nc/NR)` panels
/// `[kc][NR]` (columns past `nc` zero).
fn pack_b(
    dst: &mut [f32],
    b: &[f32],
    bv: View,
    (p0, kc): (usize, usize),
    (j0, nc): (usize, usize),
) {
    for (q, panel) in dst.chunks_exact_mut(kc * NR).enumerate() {
        let c0 = j0 + q * NR;
        let cols = NR.min(j0 + nc - c0);
        let at = |p: usize, j: usize| (p0 + p) * bv.rs + (c0 + j) * bv.cs;
        if bv.cs == 1 {
            for (p, out) in panel.chunks_exact_mut(NR).enumerate() {
                let o = at(p, 0);
                out[..cols].copy_from_slice(&b[o..o + cols]);
                out[cols..].fill(0.0);
            }
        } else if bv.rs == 1 && cols == NR && transpose::available() {
            // Columns of `b` are contiguous (b = wᵀ in forward): a transpose.
            transpose::pack_rows(panel, b, at(0, 0), bv.cs, NR, kc);
        } else {
            for p in 0..kc {
                for j in 0..NR {
                    panel[p * NR + j] = if j < cols { b[at(p, j)] } else { 0.0 };
                }
            }
        }
    }
}

/// Transposing packers: `width` source rows (contiguous, `kc` long, `stride` apart) become a
/// `[kc][width]` panel, 16 × 16 blocks at a time in registers.
pub(crate) mod transpose {
    pub(super) fn available() -> bool {
        super::available()
    }

    /// `dst[p·width + r] = src[start + r·stride + p]` for `r < width`, `p < kc`;
    /// `width` is `MR` or `NR` (≤ 32).
    pub(super) fn pack_rows(
        dst: &mut [f32],
        src: &[f32],
        start: usize,
        stride: usize,
        width: usize,
        kc: usize,
    ) {
        assert!(dst.len() == kc * width && width <= 32 && kc > 0);
        assert!(start + (width - 1) * stride + kc <= src.len());
        let full = if cfg!(target_arch = "x86_64") {
            kc / 16 * 16
        } else {
            0
        };
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is available (the callers checked); the asserts above bound every
        // source index (< start + (width-1)·stride + kc) and destination index (< kc·width).
        unsafe {
            blocks(
                dst.as_mut_ptr(),
                src.as_ptr().add(start),
                stride,
                width,
                full,
            )
        };
        for p in full..kc {
            for r in 0..width {
                dst[p * width + r] = src[start + r * stride + p];
            }
        }
    }

    /// Index vectors of the four butterfly steps of a 16 × 16 transpose. Step `s` (`h = 2^s`)
    /// swaps bit `s` of the row index with bit `s` of the column index: for a row pair
    /// `(lo, hi = lo + h)`, new `lo[c]` = `c & h ? hi[c − h] : lo[c]` and new
    /// `hi[c]` = `c & h ? hi[c] : lo[c + h]` (`permutex2var` indices ≥ 16 pick from `hi`).
    const fn steps() -> [[[i32; 16]; 2]; 4] {
        let mut out = [[[0; 16]; 2]; 4];
        let mut s = 0;
        while s < 4 {
            let h = 1 << s;
            let mut c = 0;
            while c < 16 {
                let ci = c as i32;
                if c & h != 0 {
                    out[s][0][c] = 16 + ci - h as i32;
                    out[s][1][c] = 16 + ci;
                } else {
                    out[s][0][c] = ci;
                    out[s][1][c] = ci + h as i32;
                }
                c += 1;
            }
            s += 1;
        }
        out
    }
    const STEPS: [[[i32; 16]; 2]; 4] = steps();

    /// The whole 16-column blocks (`full` a multiple of 16) of [`pack_rows`]. Moves 32-bit
    /// words unchanged (only permutes), so `avx512bf16` also transposes bf16 pairs with it.
    ///
    /// # Safety
    /// AVX-512F is available; `src + r·stride + p` (r < width, p < full) and
    /// `dst + p·width + r` are valid.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn blocks(
        dst: *mut f32,
        src: *const f32,
        stride: usize,
        width: usize,
        full: usize,
    ) {
        use std::arch::x86_64::*;
        // SAFETY: per the function's contract.
        unsafe {
            let idx: [[__m512i; 2]; 4] = std::array::from_fn(|s| {
                [
                    _mm512_loadu_si512(STEPS[s][0].as_ptr() as *const _),
                    _mm512_loadu_si512(STEPS[s][1].as_ptr() as *const _),
                ]
            });
            for r0 in (0..width).step_by(16) {
                let rows = 16.min(width - r0);
                let mask: __mmask16 = ((1u32 << rows) - 1) as u16;
                for p0 in (0..full).step_by(16) {
                    let mut x = [_mm512_setzero_ps(); 16];
                    for (r, v) in x.iter_mut().enumerate().take(rows) {
                        *v = _mm512_loadu_ps(src.add((r0 + r) * stride + p0));
                    }
                    for (s, ix) in idx.iter().enumerate() {
                        let h = 1 << s;
                        for lo in 0..16 {
                            if lo & h == 0 {
                                let (l, hgh) = (x[lo], x[lo + h]);
                                x[lo] = _mm512_permutex2var_ps(l, ix[0], hgh);
                                x[lo + h] = _mm512_permutex2var_ps(l, ix[1], hgh);
                            }
                        }
                    }
                    // Row p of the transposed block is x[p]: columns r0..r0+rows of panel row p.
                    for (p, v) in x.iter().enumerate() {
                        _mm512_mask_storeu_ps(dst.add((p0 + p) * width + r0), mask, *v);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "avx512_tests.rs"]
mod tests;
