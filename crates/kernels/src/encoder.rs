//! Token + learned position embedding (GPT-2; Radford et al. 2019).
//!
//! Shapes: `tokens` (b, t); `wte` (vp, c); `wpe` (max_t, c); `out` (b, t, c).
//! Token ids must already be validated (< vocabulary) by the caller; an id past `wte` panics.

use crate::check_len;
use crate::elem::{with_f32, with_f32_mut, Elem};

/// Forward: `out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]`. Overwrites `out`.
#[track_caller]
pub fn encoder_forward<E: Elem, W: Elem>(
    out: &mut [E],
    tokens: &[u32],
    wte: &[W],
    wpe: &[W],
    b: usize,
    t: usize,
    c: usize,
) {
    check_len("encoder_forward out", out.len(), b * t * c);
    check_len("encoder_forward tokens", tokens.len(), b * t);
    assert!(
        wpe.len() >= t * c,
        "encoder_forward wpe: {} < t*c = {}",
        wpe.len(),
        t * c
    );
    for (i, (o, &tok)) in out.chunks_exact_mut(c).zip(tokens).enumerate() {
        let pos = i % t;
        let e = &wte[tok as usize * c..(tok as usize + 1) * c];
        let p = &wpe[pos * c..(pos + 1) * c];
        with_f32(e, |e| {
            with_f32(p, |p| {
                with_f32_mut(o, false, |o| {
                    for j in 0..c {
                        o[j] = e[j] + p[j];
                    }
                })
            })
        });
    }
}

/// Backward: **accumulates** `d_wte[tokens[b,t],:] += d_out[b,t,:]` and `d_wpe[t,:] += …`.
#[track_caller]
pub fn encoder_backward<W: Elem>(
    d_wte: &mut [W],
    d_wpe: &mut [W],
    d_out: &[f32],
    tokens: &[u32],
    b: usize,
    t: usize,
    c: usize,
) {
    check_len("encoder_backward d_out", d_out.len(), b * t * c);
    check_len("encoder_backward tokens", tokens.len(), b * t);
    assert!(
        d_wpe.len() >= t * c,
        "encoder_backward d_wpe: {} < t*c",
        d_wpe.len()
    );
    for (i, (g, &tok)) in d_out.chunks_exact(c).zip(tokens).enumerate() {
        let pos = i % t;
        let e = &mut d_wte[tok as usize * c..(tok as usize + 1) * c];
        with_f32_mut(e, true, |e| {
            for (acc, &v) in e.iter_mut().zip(g) {
                *acc += v;
            }
        });
        let p = &mut d_wpe[pos * c..(pos + 1) * c];
        with_f32_mut(p, true, |p| {
            for (acc, &v) in p.iter_mut().zip(g) {
                *acc += v;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::testutil::{check_grad, dot, randn};

    #[test]
    fn forward_gathers_rows_and_backward_matches_finite_differences() {
        let (b, t, c, v) = (2, 3, 4, 5);
        let mut rng = Rng::new(10);
        let tokens = [4u32, 0, 4, 1, 2, 4];
        let mut wte = randn(&mut rng, v * c, 1.0);
        let mut wpe = randn(&mut rng, 8 * c, 1.0);
        let mut out = vec![0.0; b * t * c];
        encoder_forward(&mut out, &tokens, &wte, &wpe, b, t, c);
        assert_eq!(out[(3 * c) + 2], wte[c + 2] + wpe[2]); // b=1,t=0 → token 1, pos 0
        let r = randn(&mut rng, b * t * c, 1.0);
        let (mut d_wte, mut d_wpe) = (vec![0.0; v * c], vec![0.0; 8 * c]);
        encoder_backward(&mut d_wte, &mut d_wpe, &r, &tokens, b, t, c);
        let f = |wte: &[f32], wpe: &[f32]| {
            let mut out = vec![0.0; b * t * c];
            encoder_forward(&mut out, &tokens, wte, wpe, b, t, c);
            dot(&out, &r)
        };
        let p0 = wpe.clone();
        check_grad("d_wte", &mut wte, &d_wte, 100, 1e-2, 1e-3, |x| f(x, &p0));
        let e0 = wte.clone();
        check_grad("d_wpe", &mut wpe, &d_wpe, 100, 1e-2, 1e-3, |x| f(&e0, x));
    }
}
