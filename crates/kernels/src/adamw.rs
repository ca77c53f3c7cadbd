//! AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", Alg. 2) and
//! global gradient-norm clipping (Pascanu et al. 2013), matching PyTorch's `torch.optim.AdamW`
//! and `torch.nn.utils.clip_grad_norm_`.
//!
//! Shapes: `params`, `grads`, `m`, `v` (n) — any contiguous range of the flat buffers. The
//! caller applies `weight_decay = 0` to ranges that must not decay (biases, norm weights).

use crate::elem::{with_f32, Elem};
use crate::{check_len, par_rows, Par};

/// AdamW hyper-parameters for one update. `step` counts from 1.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay (PyTorch default 0.9).
    pub beta1: f32,
    /// Second-moment decay (PyTorch default 0.999).
    pub beta2: f32,
    /// Denominator epsilon (PyTorch default 1e-8).
    pub eps: f32,
    /// Decoupled weight decay for this range (0 for biases and norm weights).
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub step: u32,
}

/// One AdamW update, in place on `params`, `m`, `v`; reads `grads`. In PyTorch's order:
/// `p ← p·(1 − lr·wd)`, `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
/// `p ← p − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + eps)`.
#[track_caller]
pub fn adamw_update(
    params: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    grads: &[f32],
    hp: AdamWStep,
    par: Par,
) {
    let n = params.len();
    check_len("adamw_update m", m.len(), n);
    check_len("adamw_update v", v.len(), n);
    check_len("adamw_update grads", grads.len(), n);
    assert!(hp.step >= 1, "adamw_update: step counts from 1");
    let bc1 = 1.0 - (hp.beta1 as f64).powi(hp.step as i32);
    let bc2_sqrt = (1.0 - (hp.beta2 as f64).powi(hp.step as i32)).sqrt();
    let step_size = (hp.lr as f64 / bc1) as f32;
    let bc2_sqrt = bc2_sqrt as f32;
    let decay = 1.0 - hp.lr * hp.weight_decay;
    // Split params; m and v follow by offset. A chunk of 8192 keeps thread overhead small.
    const CHUNK: usize = 8192;
    let mv = MV {
        m: m.as_mut_ptr(),
        v: v.as_mut_ptr(),
        n,
    };
    let body = n - n % CHUNK;
    let run = |start: usize, p: &mut [f32], m: &mut [f32], v: &mut [f32]| {
        for j in 0..p.len() {
            let g = grads[start + j];
            let mj = hp.beta1 * m[j] + (1.0 - hp.beta1) * g;
            let vj = hp.beta2 * v[j] + (1.0 - hp.beta2) * g * g;
            m[j] = mj;
            v[j] = vj;
            let denom = vj.sqrt() / bc2_sqrt + hp.eps;
            p[j] = p[j] * decay - step_size * mj / denom;
        }
    };
    let (p_body, p_tail) = params.split_at_mut(body);
    par_rows(par, p_body, CHUNK, 4, |rows, p| {
        let start = rows.start * CHUNK;
        // SAFETY: row ranges from `par_rows` are disjoint, so each thread touches its own
        // `start..start + p.len()` of `m` and `v`, and `m`, `v` outlive this scoped call.
        let (m, v) = unsafe { mv.range(start, p.len()) };
        run(start, p, m, v);
    });
    let (m_tail, v_tail) = (&mut m[body..], &mut v[body..]);
    run(body, p_tail, m_tail, v_tail);
}

/// Raw pointers to the moment buffers so threads can take disjoint sub-ranges.
#[derive(Clone, Copy)]
struct MV {
    m: *mut f32,
    v: *mut f32,
    n: usize,
}
unsafe impl Send for MV {}
unsafe impl Sync for MV {}
impl MV {
    /// # Safety
    /// Ranges handed to concurrent callers must be disjoint.
    unsafe fn range<'a>(self, start: usize, len: usize) -> (&'a mut [f32], &'a mut [f32]) {
        assert!(start + len <= self.n, "adamw range out of bounds");
        (
            std::slice::from_raw_parts_mut(self.m.add(start), len),
            std::slice::from_raw_parts_mut(self.v.add(start), len),
        )
    }
}

/// [`adamw_update`] for mixed precision, on the calling thread: `params` are the `f32` master
/// weights, `grads` any storage type (each multiplied by `grad_scale` first: clipping and
/// loss-scale unscaling in one), and `working` receives the updated weights rounded to its type
/// (the copy forward and backward read). With `grad_scale = 1` and `f32` gradients the master
/// update is exactly [`adamw_update`]'s.
#[track_caller]
pub fn adamw_update_mixed<G: Elem, W: Elem>(
    params: &mut [f32],
    working: &mut [W],
    m: &mut [f32],
    v: &mut [f32],
    grads: &[G],
    grad_scale: f32,
    hp: AdamWStep,
) {
    let n = params.len();
    check_len("adamw_update_mixed working", working.len(), n);
    check_len("adamw_update_mixed m", m.len(), n);
    check_len("adamw_update_mixed v", v.len(), n);
    check_len("adamw_update_mixed grads", grads.len(), n);
    assert!(hp.step >= 1, "adamw_update_mixed: step counts from 1");
    let bc1 = 1.0 - (hp.beta1 as f64).powi(hp.step as i32);
    let bc2_sqrt = (1.0 - (hp.beta2 as f64).powi(hp.step as i32)).sqrt();
    let step_size = (hp.lr as f64 / bc1) as f32;
    let bc2_sqrt = bc2_sqrt as f32;
    let decay = 1.0 - hp.lr * hp.weight_decay;
    const CHUNK: usize = 4096;
    for (i, p) in params.chunks_mut(CHUNK).enumerate() {
        let r = i * CHUNK..i * CHUNK + p.len();
        let (m, v) = (&mut m[r.clone()], &mut v[r.clone()]);
        // Zipped (no bounds checks) and vectorised (16 or 8 wide); every operation is
        // an exactly rounded IEEE one (no FMA contraction in Rust), so the bits are the scalar
        // loop's.
        with_f32(&grads[r.clone()], |g| {
            crate::fastmath::vectorized(|| {
                let pmv = p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut());
                for (((p, m), v), &g) in pmv.zip(g) {
                    let g = g * grad_scale;
                    let mj = hp.beta1 * *m + (1.0 - hp.beta1) * g;
                    let vj = hp.beta2 * *v + (1.0 - hp.beta2) * g * g;
                    *m = mj;
                    *v = vj;
                    let denom = vj.sqrt() / bc2_sqrt + hp.eps;
                    *p = *p * decay - step_size * mj / denom;
                }
            })
        });
        W::store(p, &mut working[r]);
    }
}

/// Σ g² over `grads` of any storage type, accumulated in f64 ([`sum_squares`] for `f32`). A
/// 16-bit buffer is summed in [`LANES`] f64 partial sums (element `i` into sum `i mod LANES`,
/// then the sums pairwise in a fixed tree): its order depends on the length only, never on a
/// thread split. One sequential chain was bound by the f64 add's latency (≈ 2% of a
/// bf16-mixed `bench train` step; `docs/performance.md`).
pub fn sum_squares_of<G: Elem>(grads: &[G]) -> f64 {
    match G::f32s(grads) {
        Some(g) => sum_squares(g),
        None => crate::fastmath::vectorized(|| {
            let mut acc = [0.0f64; LANES];
            let mut chunks = grads.chunks_exact(LANES);
            for ch in &mut chunks {
                for (a, g) in acc.iter_mut().zip(ch) {
                    let x = g.to_f32() as f64;
                    *a += x * x;
                }
            }
            for (a, g) in acc.iter_mut().zip(chunks.remainder()) {
                let x = g.to_f32() as f64;
                *a += x * x;
            }
            let mut w = LANES;
            while w > 1 {
                w /= 2;
                for i in 0..w {
                    acc[i] += acc[i + w];
                }
            }
            acc[0]
        }),
    }
}

/// Partial sums of [`sum_squares_of`] on 16-bit gradients.
pub const LANES: usize = 8;

/// True when every element is finite (no inf or NaN), for any storage type.
pub fn all_finite<G: Elem>(grads: &[G]) -> bool {
    grads.iter().all(|g| g.to_f32().is_finite())
}

/// Σ g² over `grads`, accumulated in f64 (so the norm does not depend on the thread split).
pub fn sum_squares(grads: &[f32]) -> f64 {
    grads.iter().map(|&g| g as f64 * g as f64).sum()
}

/// PyTorch's clip factor: `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_factor(total_norm: f64, max_norm: f32) -> f32 {
    let c = max_norm as f64 / (total_norm + 1e-6);
    c.min(1.0) as f32
}

/// `grads *= factor` in place.
pub fn scale_inplace(grads: &mut [f32], factor: f32) {
    for g in grads {
        *g *= factor;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::testutil::{assert_close, randn};

    #[test]
    fn update_matches_naive_f64_over_steps() {
        let n = 3 * 8192 + 100;
        let mut rng = Rng::new(15);
        let p0 = randn(&mut rng, n, 1.0);
        let (mut p, mut m, mut v) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
        let (mut pw, mut mw, mut vw) = (
            p0.iter().map(|&x| x as f64).collect::<Vec<_>>(),
            vec![0.0f64; n],
            vec![0.0f64; n],
        );
        for step in 1..=3u32 {
            let g = randn(&mut rng, n, 0.1);
            let hp = AdamWStep {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                step,
            };
            adamw_update(&mut p, &mut m, &mut v, &g, hp, Par::Threads(2));
            for i in 0..n {
                let gi = g[i] as f64;
                pw[i] *= 1.0 - 1e-2 * 0.1;
                mw[i] = 0.9 * mw[i] + 0.1 * gi;
                vw[i] = 0.95 * vw[i] + 0.05 * gi * gi;
                let mh = mw[i] / (1.0 - 0.9f64.powi(step as i32));
                let vh = vw[i] / (1.0 - 0.95f64.powi(step as i32));
                pw[i] -= 1e-2 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let want: Vec<f32> = pw.iter().map(|&x| x as f32).collect();
        assert_close("params", &p, &want, 1e-5, 1e-6);
        // no decay: a zero gradient leaves the parameter alone
        let mut q = vec![2.0f32; 10];
        let (mut m, mut v) = (vec![0.0; 10], vec![0.0; 10]);
        let hp = AdamWStep {
            lr: 0.5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 1,
        };
        adamw_update(&mut q, &mut m, &mut v, &[0.0; 10], hp, Par::Seq);
        assert!(q.iter().all(|&x| x == 2.0));
    }

    #[test]
    fn clipping_rescales_to_max_norm() {
        let mut g = vec![3.0f32, 4.0];
        let norm = sum_squares(&g).sqrt();
        assert!((norm - 5.0).abs() < 1e-12);
        let f = clip_factor(norm, 1.0);
        scale_inplace(&mut g, f);
        assert!((sum_squares(&g).sqrt() - 1.0).abs() < 1e-5);
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
    }

    /// The mixed update (bf16 gradients times a scale, a bf16 working copy written in the same
    /// pass) gives bitwise the f32 update on the converted, scaled gradients, over several steps
    /// and chunk boundaries.
    #[test]
    fn mixed_update_is_the_f32_update_bitwise() {
        use crate::Bf16;
        let n = 2 * 4096 + 77;
        let mut rng = Rng::new(16);
        let p0 = randn(&mut rng, n, 1.0);
        let (mut p, mut m, mut v) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
        let (mut q, mut mq, mut vq) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
        let mut w = vec![Bf16(0); n];
        for step in 1..=3 {
            let hp = AdamWStep {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
                step,
            };
            let g16: Vec<Bf16> = randn(&mut rng, n, 1e-3)
                .iter()
                .map(|&x| Bf16::from_f32(x))
                .collect();
            // a power-of-two scale: the scaled f32 gradients are exact
            let g: Vec<f32> = g16.iter().map(|x| x.to_f32() * 0.25).collect();
            adamw_update_mixed(&mut q, &mut w, &mut mq, &mut vq, &g16, 0.25, hp);
            adamw_update(&mut p, &mut m, &mut v, &g, hp, Par::Seq);
            for j in 0..n {
                assert_eq!(q[j].to_bits(), p[j].to_bits(), "step {step} p[{j}]");
                assert_eq!(mq[j].to_bits(), m[j].to_bits(), "step {step} m[{j}]");
                assert_eq!(vq[j].to_bits(), v[j].to_bits(), "step {step} v[{j}]");
                assert_eq!(w[j], Bf16::from_f32(p[j]), "step {step} working[{j}]");
            }
        }
    }

    #[test]
    fn sum_squares_of_16_bit_gradients_is_the_lane_sum() {
        use crate::Bf16;
        // Integers: every partial sum is exact, so any order gives the exact total.
        for n in [0, 1, 7, 8, 9, 8 * 1000 + 5] {
            let g: Vec<Bf16> = (0..n)
                .map(|i| Bf16::from_f32((i % 61) as f32 - 30.0))
                .collect();
            let want: f64 = (0..n).map(|i| ((i % 61) as f64 - 30.0).powi(2)).sum();
            assert_eq!(sum_squares_of(&g), want, "n = {n}");
        }
        // General values: the lane order, written out, bit for bit; and close to the f32 path.
        let mut rng = Rng::new(44);
        let g16: Vec<Bf16> = randn(&mut rng, 1003, 0.3)
            .iter()
            .map(|&x| Bf16::from_f32(x))
            .collect();
        let mut lanes = [0.0f64; LANES];
        for (i, g) in g16.iter().enumerate() {
            lanes[i % LANES] += g.to_f32() as f64 * g.to_f32() as f64;
        }
        let tree = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6]))
            + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
        assert_eq!(sum_squares_of(&g16).to_bits(), tree.to_bits());
        let g32: Vec<f32> = g16.iter().map(|g| g.to_f32()).collect();
        let rel = (sum_squares_of(&g16) - sum_squares(&g32)).abs() / sum_squares(&g32);
        assert!(rel < 1e-14, "relative difference {rel}");
    }
}
