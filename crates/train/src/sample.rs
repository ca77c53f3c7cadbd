//! Text generation from a checkpoint: temperature and top-k sampling.
//!
//! Each new token runs one forward pass of batch 1 over a fixed window of `seq_len` positions
//! holding the last `seq_len` tokens (positions after the context are padded with token 0; the
//! attention is causal, so they cannot influence the logits at the last real position, which
//! are the ones sampled from). Simple and allocation-free per token; a key/value cache would
//! make it faster.

use crate::checkpoint;
use crate::error::TrainError;
use kernels::rng::Rng;
use kernels::Par;
use model::{forward, Activations, NoTp, ParamLayout, StageInput};
use std::path::{Path, PathBuf};

/// Sampling settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleOptions {
    /// Tokens to generate.
    pub tokens: usize,
    /// Softmax temperature; 0 means greedy (always the most likely token).
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Seed of the sampler.
    pub seed: u64,
    /// Kernel threads.
    pub threads: usize,
}

/// A loaded model ready to generate.
pub struct Sampler {
    /// The model layout.
    pub layout: ParamLayout,
    params: Vec<f32>,
    acts: Activations,
    /// The run's config (from the checkpoint's manifest).
    pub manifest: checkpoint::Manifest,
    /// The manifest it came from.
    pub manifest_path: PathBuf,
}

impl Sampler {
    /// Loads a checkpoint: a manifest (`step-*.json`) or a run folder (its newest valid
    /// checkpoint). The checkpoint is verified (sizes, SHA-256) first.
    pub fn load(path: &Path) -> Result<Sampler, TrainError> {
        let manifest_path = if path.is_dir() {
            let list = checkpoint::list(path);
            let mut reasons = Vec::new();
            let mut found = None;
            for (_, p) in list {
                match checkpoint::read_manifest(&p) {
                    Ok(_) => {
                        found = Some(p);
                        break;
                    }
                    Err(e) => reasons.push(e.to_string()),
                }
            }
            found.ok_or_else(|| TrainError::NoCheckpoint {
                dir: path.to_path_buf(),
                reason: if reasons.is_empty() {
                    "it holds no checkpoint (step-*.json)".into()
                } else {
                    reasons.join("; ")
                },
            })?
        } else {
            path.to_path_buf()
        };
        let (manifest, layout, state) = checkpoint::load(&manifest_path)?;
        let acts = Activations::new(&layout, 1, layout.cfg.max_seq_len);
        Ok(Sampler {
            layout,
            params: state.params,
            acts,
            manifest,
            manifest_path,
        })
    }

    /// Continues `prompt` (token ids, at least one) by `opts.tokens` tokens; returns only the
    /// new ones.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &SampleOptions,
    ) -> Result<Vec<u32>, TrainError> {
        let v = self.layout.cfg.vocab_size;
        if prompt.is_empty() {
            return Err(TrainError::Data(
                "the prompt is empty; give at least one token".into(),
            ));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= v) {
            return Err(TrainError::Data(format!(
                "prompt token {bad} is not below the model's vocabulary size {v}"
            )));
        }
        if !(opts.temperature >= 0.0 && opts.temperature.is_finite()) {
            return Err(TrainError::Data(format!(
                "temperature {} must be >= 0",
                opts.temperature
            )));
        }
        let t = self.layout.cfg.max_seq_len;
        let vp = self.layout.cfg.padded_vocab();
        let par = Par::Threads(opts.threads.max(1));
        let mut rng = Rng::new(opts.seed);
        let mut ctx: Vec<u32> = prompt.to_vec();
        let mut out = Vec::with_capacity(opts.tokens);
        let (mut window, targets) = (vec![0u32; t], vec![0u32; t]);
        let mut probs: Vec<(f32, u32)> = Vec::with_capacity(v);
        for _ in 0..opts.tokens {
            let start = ctx.len().saturating_sub(t);
            let used = ctx.len() - start;
            window.fill(0);
            window[..used].copy_from_slice(&ctx[start..]);
            forward(
                &self.layout,
                &self.params,
                &mut self.acts,
                StageInput::Tokens(&window),
                Some(&targets),
                par,
                &mut NoTp,
            )?;
            let logits = self.acts.logits().expect("a full model has a head");
            let row = &logits[(used - 1) * vp..(used - 1) * vp + v];
            let next = pick(row, opts, &mut rng, &mut probs);
            ctx.push(next);
            out.push(next);
        }
        Ok(out)
    }
}

/// Chooses a token from one row of logits.
fn pick(row: &[f32], opts: &SampleOptions, rng: &mut Rng, probs: &mut Vec<(f32, u32)>) -> u32 {
    probs.clear();
    probs.extend(row.iter().enumerate().map(|(i, &l)| (l, i as u32)));
    probs.sort_by(|a, b| b.0.total_cmp(&a.0));
    if opts.temperature == 0.0 {
        return probs[0].1;
    }
    if opts.top_k > 0 {
        probs.truncate(opts.top_k);
    }
    let max = probs[0].0;
    let weights: Vec<f64> = probs
        .iter()
        .map(|&(l, _)| (((l - max) / opts.temperature) as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.uniform() * total;
    for (w, &(_, id)) in weights.iter().zip(probs.iter()) {
        if u < *w {
            return id;
        }
        u -= w;
    }
    probs[probs.len() - 1].1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_top1_pick_the_argmax_and_sampling_follows_the_temperature() {
        let row = [0.0f32, 3.0, 1.0, 2.9];
        let mut rng = Rng::new(1);
        let mut buf = Vec::new();
        let o = SampleOptions {
            tokens: 1,
            temperature: 0.0,
            top_k: 0,
            seed: 1,
            threads: 1,
        };
        assert_eq!(pick(&row, &o, &mut rng, &mut buf), 1);
        let o1 = SampleOptions {
            temperature: 1.0,
            top_k: 1,
            ..o
        };
        for _ in 0..20 {
            assert_eq!(pick(&row, &o1, &mut rng, &mut buf), 1);
        }
        // top-2 at temperature 1: only tokens 1 and 3, about e^0.1 : 1.
        let o2 = SampleOptions {
            temperature: 1.0,
            top_k: 2,
            ..o
        };
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| {
                let p = pick(&row, &o2, &mut rng, &mut buf);
                assert!(p == 1 || p == 3);
                p == 1
            })
            .count();
        let expected = 0.1f64.exp() / (1.0 + 0.1f64.exp());
        assert!((ones as f64 / n as f64 - expected).abs() < 0.02);
    }
}
