//! Sequential references: what each algorithm computes, element by element, in its documented
//! order. Tests compare the distributed results against these bit for bit.
use crate::{shard_range, Algorithm, ReduceOp};

/// The max used everywhere: `if b > a { b } else { a }` (deterministic for NaN and signed zeros).
#[inline]
pub fn max_of(a: f32, b: f32) -> f32 {
    if b > a {
        b
    } else {
        a
    }
}

fn fold(op: ReduceOp, a: f32, b: f32) -> f32 {
    match op {
        ReduceOp::Sum | ReduceOp::Average => a + b,
        ReduceOp::Max => max_of(a, b),
    }
}

fn finish(op: ReduceOp, v: f32, n: usize) -> f32 {
    match op {
        ReduceOp::Average => v / n as f32,
        _ => v,
    }
}

/// The all-reduce result `algo` produces for these per-rank inputs (all the same length).
/// Ring: element i in shard c is folded over ranks c+1, c+2, …, c (mod n), left to right.
/// Tree: extras fold into ranks 0..n-p-1 first, then a butterfly with the lower half on the left.
pub fn all_reduce(inputs: &[Vec<f32>], op: ReduceOp, algo: Algorithm) -> Vec<f32> {
    let n = inputs.len();
    let len = inputs[0].len();
    let mut out = vec![0.0f32; len];
    match algo {
        Algorithm::Ring => {
            for c in 0..n {
                for i in shard_range(len, n, c) {
                    let mut acc = inputs[(c + 1) % n][i];
                    for k in 2..=n {
                        acc = fold(op, acc, inputs[(c + k) % n][i]);
                    }
                    out[i] = finish(op, acc, n);
                }
            }
        }
        Algorithm::Tree | Algorithm::Auto => {
            let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
            for (i, o) in out.iter_mut().enumerate() {
                let mut v: Vec<f32> = (0..p)
                    .map(|r| {
                        if r + p < n {
                            fold(op, inputs[r][i], inputs[r + p][i])
                        } else {
                            inputs[r][i]
                        }
                    })
                    .collect();
                let mut mask = 1;
                while mask < p {
                    v = (0..p)
                        .map(|r| {
                            let (lo, hi) = (r.min(r ^ mask), r.max(r ^ mask));
                            fold(op, v[lo], v[hi])
                        })
                        .collect();
                    mask <<= 1;
                }
                *o = finish(op, v[0], n);
            }
        }
    }
    out
}
