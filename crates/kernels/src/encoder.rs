//! Token + learned position embedding (GPT-2; Radford et al. 2019).
//!
//! Shapes: `tokens` (b, t); `wte` (vp, c); `wpe` (max_t, c); `out` (b, t, c).
//! Token ids must already be validated (< vocabulary) by the caller; an id past `wte` panics.
//!
//! Vocabulary-parallel form (Shoeybi et al. 2019, "Megatron-LM", §3): a rank holds the rows
//! `first..first + rows` of `wte`. Forward: [`embedding_rows_forward`] looks up only the tokens
//! in that range (others contribute 0), the caller sums the partials over the tensor-parallel
//! group, then [`position_add_forward`] adds `wpe`. Backward: [`encoder_backward_rows`] scatters
//! into the rank's own rows only.

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
    encoder_backward_rows(d_wte, 0, d_wpe, d_out, tokens, b, t, c)
}

/// [`encoder_backward`] for a table holding the rows `first..first + d_wte.len() / c`: tokens
/// outside that range add nothing to `d_wte` (another rank owns them); `d_wpe` gets every
/// position's gradient.
#[track_caller]
pub fn encoder_backward_rows<W: Elem>(
    d_wte: &mut [W],
    first: usize,
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
    let rows = first..first + d_wte.len() / c;
    for (i, (g, &tok)) in d_out.chunks_exact(c).zip(tokens).enumerate() {
        let pos = i % t;
        let tok = tok as usize;
        if rows.contains(&tok) {
            let r = tok - first;
            let e = &mut d_wte[r * c..(r + 1) * c];
            with_f32_mut(e, true, |e| {
                for (acc, &v) in e.iter_mut().zip(g) {
                    *acc += v;
                }
            });
        }
        let p = &mut d_wpe[pos * c..(pos + 1) * c];
        with_f32_mut(p, true, |p| {
            for (acc, &v) in p.iter_mut().zip(g) {
                *acc += v;
            }
        });
    }
}

/// Vocabulary-parallel lookup: `out[i,:] = wte_rows[tokens[i] − first,:]` when the token is one
/// of the rows `first..first + wte_rows.len() / c` this rank holds, else 0. Overwrites `out`
/// (n, c); summed over the ranks it is the full lookup.
#[track_caller]
pub fn embedding_rows_forward<W: Elem>(
    out: &mut [f32],
    tokens: &[u32],
    wte_rows: &[W],
    first: usize,
    c: usize,
) {
    check_len("embedding_rows_forward out", out.len(), tokens.len() * c);
    let rows = first..first + wte_rows.len() / c;
    for (o, &tok) in out.chunks_exact_mut(c).zip(tokens) {
        let tok = tok as usize;
        if rows.contains(&tok) {
            let r = tok - first;
            W::load(&wte_rows[r * c..(r + 1) * c], o);
        } else {
            o.fill(0.0);
        }
    }
}

/// `out[i,:] = summed[i,:] + wpe[(first_row + i) mod t,:]` for the rows `first_row..` of the
/// flattened (b·t) sequence that `out` holds (all of them: `first_row = 0`, `out` (b, t, c)),
/// the second half of the vocabulary-parallel encoder. Overwrites `out`.
#[track_caller]
pub fn position_add_forward<E: Elem, W: Elem>(
    out: &mut [E],
    summed: &[f32],
    wpe: &[W],
    first_row: usize,
    t: usize,
    c: usize,
) {
    check_len("position_add_forward summed", summed.len(), out.len());
    assert!(
        wpe.len() >= t * c,
        "position_add_forward wpe: {} < t*c = {}",
        wpe.len(),
        t * c
    );
    for (i, (o, e)) in out
        .chunks_exact_mut(c)
        .zip(summed.chunks_exact(c))
        .enumerate()
    {
        let pos = (first_row + i) % t;
        with_f32(&wpe[pos * c..(pos + 1) * c], |p| {
            with_f32_mut(o, false, |o| {
                for j in 0..c {
                    o[j] = e[j] + p[j];
                }
            })
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

    #[test]
    fn vocabulary_shards_sum_to_the_full_lookup_and_scatter_to_their_own_rows() {
        let (b, t, c, vp) = (2, 3, 4, 8);
        let mut rng = Rng::new(13);
        let tokens = [7u32, 0, 3, 4, 2, 7];
        let wte = randn(&mut rng, vp * c, 1.0);
        let wpe = randn(&mut rng, 8 * c, 1.0);
        let d_out = randn(&mut rng, b * t * c, 1.0);
        let mut want = vec![0.0; b * t * c];
        encoder_forward(&mut want, &tokens, &wte, &wpe, b, t, c);
        let (mut want_dwte, mut want_dwpe) = (vec![0.0; vp * c], vec![0.0; 8 * c]);
        encoder_backward(&mut want_dwte, &mut want_dwpe, &d_out, &tokens, b, t, c);
        for tp in [2, 4] {
            let rows = vp / tp;
            let mut sum = vec![0.0; b * t * c];
            for r in 0..tp {
                let mine = &wte[r * rows * c..(r + 1) * rows * c];
                let mut part = vec![0.0; b * t * c];
                embedding_rows_forward(&mut part, &tokens, mine, r * rows, c);
                for (s, p) in sum.iter_mut().zip(&part) {
                    *s += p;
                }
                let (mut d_wte, mut d_wpe) = (vec![0.0; rows * c], vec![0.0; 8 * c]);
                encoder_backward_rows(&mut d_wte, r * rows, &mut d_wpe, &d_out, &tokens, b, t, c);
                assert_eq!(d_wte, want_dwte[r * rows * c..(r + 1) * rows * c]);
                assert_eq!(d_wpe, want_dwpe);
            }
            let mut out = vec![0.0; b * t * c];
            position_add_forward(&mut out, &sum, &wpe, 0, t, c);
            // the rows of one sequence-parallel shard
            let mut part = vec![0.0; 2 * c];
            position_add_forward(&mut part, &sum[3 * c..5 * c], &wpe, 3, t, c);
            assert_eq!(part, want[3 * c..5 * c]);
            assert_eq!(out, want, "tp {tp}");
        }
    }
}
