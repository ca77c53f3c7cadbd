//! Single-threaded GEMM on strided views (`c = alpha · a · b + beta · c`) and its dispatch:
//! our AVX-512F f32 kernel (`avx512.rs`), the `gemm` crate's kernel elsewhere, the AMX bf16
//! kernel (`amx.rs`) for bf16 operands, and `f32` staging for other 16-bit mixes
//! ([`gemm_mixed`]). `matmul.rs` and `attention.rs` split work across threads and call these.

use crate::elem::{with_staging, Elem};
use crate::is_f32;

/// A strided matrix view: `rows × cols`, element (i, j) at `i*rs + j*cs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl View {
    /// A row-major (rows, cols) matrix with row stride `rs`.
    pub fn rm(rows: usize, cols: usize, rs: usize) -> View {
        View {
            rows,
            cols,
            rs,
            cs: 1,
        }
    }
    /// The transpose of this view.
    pub fn t(self) -> View {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
    /// One past the largest index touched (0 for an empty view).
    fn extent(self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// `c = alpha · a · b + beta · c` on strided views, single-threaded. Panics when any view
/// reaches past its slice or shapes disagree.
///
/// Runs our AVX-512F kernel (`avx512.rs`) where the CPU has it and [`set_avx512`] /
/// `SCALETRAIN_NO_AVX512` have not turned it off, else the `gemm` crate. On the AVX-512 path
/// every element is `acc = (beta == 0 ? 0 : beta·c)`, then `acc = fma(a[i][p], b[p][j], acc)`
/// for `p = 0, 1, …, k−1`, then `alpha·acc`: one fixed order that depends on `k` only, so an
/// element's bits do not depend on `m`, `n`, the thread split or its place in a tile. (The one
/// combination `alpha ≠ 1` with `beta ≠ 0`, which no caller uses, goes to the `gemm` crate.)
#[track_caller]
pub fn gemm(
    c: &mut [f32],
    cv: View,
    a: &[f32],
    av: View,
    b: &[f32],
    bv: View,
    alpha: f32,
    beta: f32,
) {
    check_views("gemm", cv, av, bv, (c.len(), a.len(), b.len()));
    if cv.rows == 0 || cv.cols == 0 {
        return;
    }
    if avx512_active() && (alpha == 1.0 || beta == 0.0) {
        return crate::avx512::gemm(c, cv, a, av, b, bv, alpha, beta);
    }
    gemm_crate(c, cv, a, av, b, bv, alpha, beta);
}

/// [`gemm`] with `b` packed beforehand (`crate::panels`): the same bits as [`gemm`] on the
/// view `b` was packed from. Only while our AVX-512 kernel is active (the panels' caller
/// checks).
#[track_caller]
pub(crate) fn gemm_packed(
    c: &mut [f32],
    cv: View,
    a: &[f32],
    av: View,
    b: &crate::avx512::Packed,
    alpha: f32,
    beta: f32,
) {
    let (k, n) = b.shape();
    let bv = View::rm(k, n, n);
    check_views("gemm", cv, av, bv, (c.len(), a.len(), bv.extent()));
    if cv.rows == 0 || cv.cols == 0 {
        return;
    }
    assert!(
        alpha == 1.0 || beta == 0.0,
        "gemm_packed: alpha != 1 with beta != 0"
    );
    crate::avx512::gemm_packed(c, cv, a, av, b, alpha, beta)
}

/// Panics unless the shapes agree and every view lies inside its slice (`lens`: c, a, b).
#[track_caller]
fn check_views(name: &str, cv: View, av: View, bv: View, lens: (usize, usize, usize)) {
    assert!(
        av.rows == cv.rows && bv.cols == cv.cols && av.cols == bv.rows,
        "{name}: shapes ({}x{}) · ({}x{}) -> ({}x{})",
        av.rows,
        av.cols,
        bv.rows,
        bv.cols,
        cv.rows,
        cv.cols
    );
    assert!(av.extent() <= lens.1, "{name}: a view exceeds its slice");
    assert!(bv.extent() <= lens.2, "{name}: b view exceeds its slice");
    assert!(cv.extent() <= lens.0, "{name}: c view exceeds its slice");
}

/// [`gemm`] on the `gemm` crate's kernel (any strides; its own summation order).
#[track_caller]
pub fn gemm_crate(
    c: &mut [f32],
    cv: View,
    a: &[f32],
    av: View,
    b: &[f32],
    bv: View,
    alpha: f32,
    beta: f32,
) {
    check_views("gemm", cv, av, bv, (c.len(), a.len(), b.len()));
    if cv.rows == 0 || cv.cols == 0 {
        return;
    }
    // SAFETY: the asserts above guarantee every index the views describe lies inside its slice,
    // and `c` is borrowed mutably, so it cannot alias `a` or `b`. `Parallelism::None` runs on
    // this thread only. gemm computes `dst = alpha·dst + beta·lhs·rhs` (its names are the
    // reverse of BLAS's), reading `dst` only when `read_dst`.
    unsafe {
        gemm::gemm(
            cv.rows,
            cv.cols,
            av.cols,
            c.as_mut_ptr(),
            cv.cs as isize,
            cv.rs as isize,
            beta != 0.0,
            a.as_ptr(),
            av.cs as isize,
            av.rs as isize,
            b.as_ptr(),
            bv.cs as isize,
            bv.rs as isize,
            beta,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Block sizes of [`gemm_mixed`] (rows of `c`, columns of `c`, inner dimension).
const MB: usize = 128;
const NB: usize = 512;
const KB: usize = 512;

/// The `nr × nc` block of view `v` at `(r0, c0)` of `src`, as `f32`: a view into `src` itself
/// when it is `f32`, else converted into `buf` (along the view's contiguous direction).
fn stage<'a, E: Elem>(
    buf: &'a mut [f32],
    src: &'a [E],
    v: View,
    (r0, c0, nr, nc): (usize, usize, usize, usize),
) -> (&'a [f32], View) {
    let off = r0 * v.rs + c0 * v.cs;
    let sub = View {
        rows: nr,
        cols: nc,
        ..v
    };
    if let Some(s) = E::f32s(src) {
        return (&s[off..], sub);
    }
    let buf = &mut buf[..nr * nc];
    if v.cs == 1 {
        for i in 0..nr {
            let o = off + i * v.rs;
            E::load(&src[o..o + nc], &mut buf[i * nc..(i + 1) * nc]);
        }
        (buf, View::rm(nr, nc, nc))
    } else if v.rs == 1 {
        for j in 0..nc {
            let o = off + j * v.cs;
            E::load(&src[o..o + nr], &mut buf[j * nr..(j + 1) * nr]);
        }
        (buf, View::rm(nc, nr, nr).t())
    } else {
        for i in 0..nr {
            for j in 0..nc {
                buf[i * nc + j] = src[off + i * v.rs + j * v.cs].to_f32();
            }
        }
        (buf, View::rm(nr, nc, nc))
    }
}

/// [`gemm`] over any storage types, single-threaded: `c = alpha · a · b + beta · c` with every
/// sum in `f32`. All-`f32` is exactly [`gemm`]. bf16 operands (both bf16, or one bf16 and one
/// `f32`, which is then rounded to bf16) run on AMX (`amx.rs`) or AVX512_BF16
/// (`avx512bf16.rs`) where the CPU has them and they are switched on. Otherwise it works on
/// `MB × NB` blocks of `c`, accumulating `KB`-deep slices of the inner dimension; 16-bit blocks
/// of `a`, `b` (and `c`, when it is 16-bit) are converted into per-thread staging buffers first
/// (`b`'s blocks once per `MB` rows of `c`, `a`'s once per `NB` columns), and `c` is rounded
/// once per block when stored.
#[track_caller]
pub fn gemm_mixed<C: Elem, A: Elem, B: Elem>(
    c: &mut [C],
    cv: View,
    a: &[A],
    av: View,
    b: &[B],
    bv: View,
    alpha: f32,
    beta: f32,
) {
    if is_f32::<C>() && is_f32::<A>() && is_f32::<B>() {
        let c = C::f32s_mut(c).unwrap();
        return gemm(c, cv, a.f32_unwrap(), av, b.f32_unwrap(), bv, alpha, beta);
    }
    check_views("gemm_mixed", cv, av, bv, (c.len(), a.len(), b.len()));
    let (m, n, k) = (cv.rows, cv.cols, av.cols);
    assert!(k > 0, "gemm_mixed: empty inner dimension");
    if bf16_operands::<A, B>() {
        if amx_active() {
            return crate::amx::gemm(c, cv, a, av, b, bv, alpha, beta);
        }
        if avx512_bf16_active() {
            return crate::avx512bf16::gemm(c, cv, a, av, b, bv, alpha, beta);
        }
    }
    with_staging(MB * KB, |abuf| {
        with_staging(KB * NB, |bbuf| {
            with_staging(MB * NB, |cbuf| {
                for i0 in (0..m).step_by(MB) {
                    let mr = MB.min(m - i0);
                    for j0 in (0..n).step_by(NB) {
                        let nc = NB.min(n - j0);
                        let coff = i0 * cv.rs + j0 * cv.cs;
                        let csub = View {
                            rows: mr,
                            cols: nc,
                            ..cv
                        };
                        let mut blk = |cs: &mut [f32], cview: View, mut beta: f32| {
                            for p0 in (0..k).step_by(KB) {
                                let kr = KB.min(k - p0);
                                let (ab, avb) = stage(abuf, a, av, (i0, p0, mr, kr));
                                let (bb, bvb) = stage(bbuf, b, bv, (p0, j0, kr, nc));
                                gemm(cs, cview, ab, avb, bb, bvb, alpha, beta);
                                beta = 1.0;
                            }
                        };
                        match C::f32s_mut(c) {
                            Some(c32) => blk(&mut c32[coff..], csub, beta),
                            None => {
                                let cb = &mut cbuf[..mr * nc];
                                if beta != 0.0 {
                                    for i in 0..mr {
                                        if cv.cs == 1 {
                                            let o = coff + i * cv.rs;
                                            C::load(&c[o..o + nc], &mut cb[i * nc..(i + 1) * nc]);
                                        } else {
                                            for j in 0..nc {
                                                cb[i * nc + j] =
                                                    c[coff + i * cv.rs + j * cv.cs].to_f32();
                                            }
                                        }
                                    }
                                }
                                blk(cb, View::rm(mr, nc, nc), beta);
                                for i in 0..mr {
                                    if cv.cs == 1 {
                                        let o = coff + i * cv.rs;
                                        C::store(&cb[i * nc..(i + 1) * nc], &mut c[o..o + nc]);
                                    } else {
                                        for j in 0..nc {
                                            c[coff + i * cv.rs + j * cv.cs] =
                                                C::from_f32(cb[i * nc + j]);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            })
        })
    });
}

/// Whether [`gemm_mixed`] treats this pair as bf16 operands (for the AMX or AVX512_BF16
/// kernels): both bf16 or `f32`, at least one bf16 (so `f32` activation gradients meet bf16
/// weights there, rounded to bf16 as bf16 training frameworks keep them).
fn bf16_operands<A: Elem, B: Elem>() -> bool {
    use std::any::TypeId;
    let (bf, f) = (TypeId::of::<crate::Bf16>(), TypeId::of::<f32>());
    let (ta, tb) = (TypeId::of::<A>(), TypeId::of::<B>());
    (ta == bf || ta == f) && (tb == bf || tb == f) && (ta == bf || tb == bf)
}

static AMX: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the AMX bf16 matmul kernel on (the default, where the CPU has it) or off (bf16
/// operands are then converted to `f32` panels like fp16's), process-wide; for measurements
/// and tests.
pub fn set_amx(on: bool) {
    AMX.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether bf16 matmuls run on the AMX kernel in this process.
pub fn amx_active() -> bool {
    AMX.load(std::sync::atomic::Ordering::Relaxed) && crate::amx::available()
}

/// 0: not decided yet; 1: on; 2: off.
static AVX512: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Turns our AVX-512F f32 GEMM on (the default where the CPU has it, unless the environment
/// variable `SCALETRAIN_NO_AVX512` was `1`, `true` or `yes` when the first matmul ran; other
/// values than those and `0`, `false`, `no` get a warning on stderr) or off (the `gemm`
/// crate's kernel then runs), process-wide; for measurements and tests.
pub fn set_avx512(on: bool) {
    AVX512.store(if on { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

/// `SCALETRAIN_NO_AVX512`'s value (`None`: unset) as "turn our kernel off?", or a message for
/// a value that is none of `1`/`true`/`yes`/`0`/`false`/`no`/empty (ours is then kept).
fn no_avx512_setting(v: Option<&str>) -> Result<bool, String> {
    match v.map(str::trim) {
        None | Some("" | "0" | "false" | "no") => Ok(false),
        Some("1" | "true" | "yes") => Ok(true),
        Some(other) => Err(format!(
            "SCALETRAIN_NO_AVX512={other:?} is not understood; set it to 1 to run matmuls on the \
             gemm crate instead of our AVX-512 kernel, or 0 (or unset it) to keep ours. Keeping ours."
        )),
    }
}

/// Whether f32 matmuls run on our AVX-512F kernel in this process.
pub fn avx512_active() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    let mut s = AVX512.load(Relaxed);
    if s == 0 {
        let v = std::env::var("SCALETRAIN_NO_AVX512").ok();
        let want = match no_avx512_setting(v.as_deref()) {
            Ok(true) => 2,
            Ok(false) => 1,
            Err(msg) => {
                eprintln!("warning: {msg}");
                1
            }
        };
        // Only the first decision counts; a concurrent `set_avx512` wins.
        s = match AVX512.compare_exchange(0, want, Relaxed, Relaxed) {
            Ok(_) => want,
            Err(now) => now,
        };
    }
    s == 1 && crate::avx512::available()
}

static AVX512_BF16: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns our AVX512_BF16 matmul kernel (`vdpbf16ps`, for bf16 operands where AMX is not used)
/// on (the default where the CPU has it) or off (bf16 operands are then converted to `f32`
/// panels for the `f32` GEMM), process-wide; for measurements and tests.
pub fn set_avx512_bf16(on: bool) {
    AVX512_BF16.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether bf16 matmuls that do not run on AMX run on the AVX512_BF16 kernel in this process.
pub fn avx512_bf16_active() -> bool {
    AVX512_BF16.load(std::sync::atomic::Ordering::Relaxed) && crate::avx512bf16::available()
}

/// Which kernel bf16 matmuls (bf16 with bf16 or `f32` operands) run on in this process now:
/// `"amx"`, `"avx512-bf16"` or `"f32-panels"` (converted to `f32` panels for the f32 GEMM).
pub fn bf16_matmul_kind() -> &'static str {
    if amx_active() {
        "amx"
    } else if avx512_bf16_active() {
        "avx512-bf16"
    } else {
        "f32-panels"
    }
}

/// `f32` view of a slice known to be `f32`.
trait F32Unwrap {
    fn f32_unwrap(&self) -> &[f32];
}

impl<E: Elem> F32Unwrap for [E] {
    fn f32_unwrap(&self) -> &[f32] {
        E::f32s(self).expect("an f32 slice")
    }
}

#[cfg(test)]
mod tests {
    use super::no_avx512_setting;

    #[test]
    fn no_avx512_values() {
        for v in [None, Some(""), Some("0"), Some(" false"), Some("no")] {
            assert_eq!(no_avx512_setting(v), Ok(false), "{v:?}");
        }
        for v in ["1", "true", "yes ", " 1"] {
            assert_eq!(no_avx512_setting(Some(v)), Ok(true), "{v:?}");
        }
        let err = no_avx512_setting(Some("off")).unwrap_err();
        assert!(
            err.contains("SCALETRAIN_NO_AVX512=\"off\"") && err.contains("set it to 1"),
            "{err}"
        );
    }
}
