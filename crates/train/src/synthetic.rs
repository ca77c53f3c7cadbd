//! The built-in synthetic corpus: a seeded Markov source whose best achievable loss is known
//! exactly, so a run can check that the model learns rather than that the loss merely moves.
//!
//! **Source.** Tokens `0..V`. The state is the last `order` tokens (`V^order` states). For each
//! state the generator picks `branching` distinct successor tokens with Dirichlet(1) weights
//! (exponential draws, normalised). The next token is drawn from
//!
//! ```text
//! P(y | s) = ε / V + (1 − ε) · w_s(y)          (ε = `smoothing`)
//! ```
//!
//! The ε-mixing makes the chain irreducible and aperiodic, so it has one stationary distribution
//! π over states, found by power iteration (in f64).
//!
//! **Floor.** A model reading a window `x_0 … x_T` predicts `x_{j+1}` from `x_0 … x_j`.
//! With at least `order` tokens of context the Bayes-optimal loss is the entropy rate
//! `h = Σ_s π(s) · H(P(·|s))` (nats). With fewer (`j + 1 < order`), it is the conditional
//! entropy of the stationary chain, `H_{j+2} − H_{j+1}`, where `H_m` is the entropy of m
//! consecutive tokens (a marginal of π). The floor of the mean loss over a window is the
//! average over its T positions. The corpus starts after a burn-in, so windows are
//! (approximately) stationary and the validation loss of a perfect model fluctuates around this
//! floor by the sampling noise of a finite validation set.

use kernels::rng::Rng;
use serde::{Deserialize, Serialize};

/// Parameters of the synthetic corpus (`[data.synthetic]` in the training config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticSpec {
    /// Vocabulary size V (default 32; at most 64 so each token prints as one character).
    pub vocab_size: usize,
    /// Markov order: tokens of context that determine the next-token distribution (default 2).
    pub order: usize,
    /// Successors with non-trivial probability per state (default 3).
    pub branching: usize,
    /// Probability mass spread uniformly over all V tokens, ε (default 0.05).
    pub smoothing: f64,
    /// Seed of the transition table and of the generated text (default 7).
    pub seed: u64,
    /// Training tokens generated (default 2,000,000).
    pub train_tokens: usize,
    /// Validation tokens generated, from a separate stretch of the chain (default 65,536).
    pub val_tokens: usize,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        SyntheticSpec {
            vocab_size: 32,
            order: 2,
            branching: 3,
            smoothing: 0.05,
            seed: 7,
            train_tokens: 2_000_000,
            val_tokens: 65_536,
        }
    }
}

/// Printable symbols for tokens 0..64 (synthetic tokens print as one character each).
pub const ALPHABET: &[u8; 64] = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.,";

impl SyntheticSpec {
    /// Checks ranges; returns `(field, reason)` for the first bad field.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !(2..=64).contains(&self.vocab_size) {
            return Err((
                "vocab_size",
                format!("{} is not in 2..=64", self.vocab_size),
            ));
        }
        if !(1..=3).contains(&self.order) {
            return Err(("order", format!("{} is not in 1..=3", self.order)));
        }
        if self.branching == 0 || self.branching > self.vocab_size {
            return Err((
                "branching",
                format!(
                    "{} is not in 1..=vocab_size ({})",
                    self.branching, self.vocab_size
                ),
            ));
        }
        if !(self.smoothing > 0.0 && self.smoothing <= 1.0) {
            return Err(("smoothing", format!("{} is not in (0, 1]", self.smoothing)));
        }
        let states = (self.vocab_size as u64).pow(self.order as u32);
        if states * self.vocab_size as u64 > 1 << 24 {
            return Err((
                "order",
                format!(
                    "vocab_size^order × vocab_size = {} transition entries, more than 2^24",
                    states * self.vocab_size as u64
                ),
            ));
        }
        if self.train_tokens < 2 || self.val_tokens < 2 {
            return Err((
                "train_tokens",
                "train_tokens and val_tokens must be at least 2".into(),
            ));
        }
        Ok(())
    }
}

/// The Markov source: a dense transition table over `V^order` states.
#[derive(Clone, Debug)]
pub struct MarkovSource {
    v: usize,
    order: usize,
    /// (states, V) row-stochastic.
    probs: Vec<f64>,
    /// Stationary distribution over states.
    stationary: Vec<f64>,
}

fn entropy(p: &[f64]) -> f64 {
    p.iter().filter(|&&x| x > 0.0).map(|&x| -x * x.ln()).sum()
}

impl MarkovSource {
    /// Builds the table from `spec` (already checked) and solves for the stationary distribution.
    pub fn new(spec: &SyntheticSpec) -> MarkovSource {
        let (v, order) = (spec.vocab_size, spec.order);
        let states = v.pow(order as u32);
        let mut rng = Rng::new(spec.seed ^ 0x5EED_0FC0_4B05);
        let mut probs = vec![spec.smoothing / v as f64; states * v];
        for s in 0..states {
            let mut picked: Vec<usize> = Vec::with_capacity(spec.branching);
            while picked.len() < spec.branching {
                let y = rng.below(v as u64) as usize;
                if !picked.contains(&y) {
                    picked.push(y);
                }
            }
            let w: Vec<f64> = picked.iter().map(|_| -(1.0 - rng.uniform()).ln()).collect();
            let sum: f64 = w.iter().sum();
            for (y, wy) in picked.iter().zip(&w) {
                probs[s * v + y] += (1.0 - spec.smoothing) * wy / sum;
            }
        }
        let mut src = MarkovSource {
            v,
            order,
            probs,
            stationary: vec![1.0 / states as f64; states],
        };
        src.solve_stationary();
        src
    }

    fn next_state(&self, s: usize, y: usize) -> usize {
        (s * self.v + y) % self.stationary.len()
    }

    fn solve_stationary(&mut self) {
        let n = self.stationary.len();
        let mut next = vec![0.0; n];
        for _ in 0..100_000 {
            next.fill(0.0);
            for s in 0..n {
                let ps = self.stationary[s];
                for y in 0..self.v {
                    next[self.next_state(s, y)] += ps * self.probs[s * self.v + y];
                }
            }
            let diff: f64 = next
                .iter()
                .zip(&self.stationary)
                .map(|(a, b)| (a - b).abs())
                .sum();
            std::mem::swap(&mut self.stationary, &mut next);
            if diff < 1e-14 {
                break;
            }
        }
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.v
    }

    /// Entropy rate h (nats per token): the loss floor with full context.
    pub fn entropy_rate(&self) -> f64 {
        self.stationary
            .iter()
            .enumerate()
            .map(|(s, &p)| p * entropy(&self.probs[s * self.v..(s + 1) * self.v]))
            .sum()
    }

    /// Entropy of `m` consecutive tokens (1 ≤ m ≤ order) under the stationary distribution.
    fn block_entropy(&self, m: usize) -> f64 {
        // The state is (x_{t-order+1} … x_t) as a base-V number, oldest most significant; the
        // last m tokens are the state modulo V^m.
        let mut marg = vec![0.0; self.v.pow(m as u32)];
        let k = marg.len();
        for (s, &p) in self.stationary.iter().enumerate() {
            marg[s % k] += p;
        }
        entropy(&marg)
    }

    /// The best achievable mean loss (nats) over windows of `seq_len` predicted positions.
    pub fn loss_floor(&self, seq_len: usize) -> f64 {
        let h = self.entropy_rate();
        let total: f64 = (0..seq_len)
            .map(|j| {
                let ctx = j + 1;
                if ctx >= self.order {
                    h
                } else {
                    // H(x_{j+1} | x_0..x_j) = H_{ctx+1} − H_ctx; for ctx + 1 > order the
                    // extra token is predicted with full context (handled above).
                    self.block_entropy(ctx + 1) - self.block_entropy(ctx)
                }
            })
            .sum();
        total / seq_len as f64
    }

    /// Generates `n` tokens after a burn-in of 1000 steps, from `rng`.
    pub fn generate(&self, n: usize, rng: &mut Rng) -> Vec<u32> {
        let states = self.stationary.len();
        let mut s = rng.below(states as u64) as usize;
        let mut out = Vec::with_capacity(n);
        for i in 0..n + 1000 {
            let u = rng.uniform();
            let row = &self.probs[s * self.v..(s + 1) * self.v];
            let mut acc = 0.0;
            let mut y = self.v - 1;
            for (k, &p) in row.iter().enumerate() {
                acc += p;
                if u < acc {
                    y = k;
                    break;
                }
            }
            if i >= 1000 {
                out.push(y as u32);
            }
            s = self.next_state(s, y);
        }
        out
    }
}

/// A generated corpus: train and validation token streams from separate stretches of the chain.
#[derive(Clone, Debug)]
pub struct SyntheticCorpus {
    /// The source that generated them.
    pub source: MarkovSource,
    /// Training tokens.
    pub train: Vec<u32>,
    /// Validation tokens.
    pub val: Vec<u32>,
}

/// Builds the source and generates train and validation streams (deterministic in `spec.seed`).
pub fn generate(spec: &SyntheticSpec) -> SyntheticCorpus {
    let source = MarkovSource::new(spec);
    let train = source.generate(spec.train_tokens, &mut Rng::new(spec.seed.wrapping_add(1)));
    let val = source.generate(spec.val_tokens, &mut Rng::new(spec.seed.wrapping_add(2)));
    SyntheticCorpus { source, train, val }
}

/// Renders synthetic token ids as text, one character per token.
pub fn render(tokens: &[u32]) -> String {
    tokens
        .iter()
        .map(|&t| ALPHABET.get(t as usize).map_or('?', |&c| c as char))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_matches_the_empirical_loss_of_the_true_model() {
        // The true conditional probabilities, scored on generated text, must average to the
        // computed entropy rate (law of large numbers), for each order.
        for order in 1..=2 {
            let spec = SyntheticSpec {
                vocab_size: 16,
                order,
                train_tokens: 400_000,
                val_tokens: 2,
                ..Default::default()
            };
            spec.check().unwrap();
            let c = generate(&spec);
            let src = &c.source;
            let states = src.stationary.len();
            let mut s = 0usize;
            for &x in &c.train[..order] {
                s = src.next_state(s, x as usize);
            }
            let mut nll = 0.0;
            let n = c.train.len() - order;
            for &y in &c.train[order..] {
                nll -= src.probs[s * src.v + y as usize].ln();
                s = (s * src.v + y as usize) % states;
            }
            let emp = nll / n as f64;
            let h = src.entropy_rate();
            assert!(
                (emp - h).abs() < 0.01,
                "order {order}: empirical {emp} vs h {h}"
            );
            // Less context can only cost more.
            assert!(src.loss_floor(8) >= h - 1e-12);
            if order == 1 {
                assert!((src.loss_floor(8) - h).abs() < 1e-12);
            } else {
                assert!(src.loss_floor(8) > h + 1e-3);
            }
            assert!(h < (16f64).ln(), "the source must be predictable");
        }
    }

    #[test]
    fn generation_is_deterministic_in_the_seed() {
        let spec = SyntheticSpec {
            train_tokens: 1000,
            val_tokens: 100,
            ..Default::default()
        };
        let a = generate(&spec);
        let b = generate(&spec);
        assert_eq!(a.train, b.train);
        assert_ne!(a.train[..100], a.val[..]);
        let c = generate(&SyntheticSpec { seed: 8, ..spec });
        assert_ne!(a.train, c.train);
    }
}
