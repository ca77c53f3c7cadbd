//! AdamW over the flat buffers (Loshchilov & Hutter 2019), with PyTorch's defaults and
//! global-norm gradient clipping. Weight decay applies to 2-D tensors only (matrices and
//! embeddings), never to biases or norm weights, as nanoGPT/GPT-2 training does.

use crate::ParamLayout;
use kernels::adamw::{adamw_update, clip_factor, scale_inplace, sum_squares, AdamWStep};
use kernels::Par;

/// Optimizer hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate (default 6e-4).
    pub lr: f32,
    /// First-moment decay (default 0.9).
    pub beta1: f32,
    /// Second-moment decay (default 0.95, GPT-3's).
    pub beta2: f32,
    /// Denominator epsilon (default 1e-8).
    pub eps: f32,
    /// Decoupled weight decay on 2-D tensors (default 0.1).
    pub weight_decay: f32,
    /// Clip the global gradient norm to this value; `None` disables clipping (default 1.0).
    pub grad_clip: Option<f32>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 6e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: Some(1.0),
        }
    }
}

/// AdamW state: `m` and `v`, laid out like the parameters.
#[derive(Debug)]
pub struct AdamW {
    /// First moments.
    pub m: Vec<f32>,
    /// Second moments.
    pub v: Vec<f32>,
    /// Steps taken so far.
    pub step: u32,
}

impl AdamW {
    /// Zeroed state for `layout`.
    pub fn new(layout: &ParamLayout) -> AdamW {
        AdamW {
            m: vec![0.0; layout.len()],
            v: vec![0.0; layout.len()],
            step: 0,
        }
    }

    /// Global L2 norm of `grads` (f64 accumulation). With tensor or pipeline parallelism the
    /// caller must combine partial sums across ranks instead; this is the single-shard norm.
    pub fn grad_norm(grads: &[f32]) -> f64 {
        sum_squares(grads).sqrt()
    }

    /// One optimizer step: clips `grads` in place to `cfg.grad_clip` (if set), then updates
    /// `params`. Returns the gradient norm before clipping.
    pub fn step(
        &mut self,
        layout: &ParamLayout,
        params: &mut [f32],
        grads: &mut [f32],
        cfg: &AdamWConfig,
        par: Par,
    ) -> f64 {
        assert_eq!(params.len(), layout.len(), "AdamW::step: params length");
        assert_eq!(grads.len(), layout.len(), "AdamW::step: grads length");
        let norm = Self::grad_norm(grads);
        if let Some(max_norm) = cfg.grad_clip {
            scale_inplace(grads, clip_factor(norm, max_norm));
        }
        self.step += 1;
        // Merge neighbouring tensors with the same decay rule into one kernel call.
        let mut runs: Vec<(std::ops::Range<usize>, bool)> = Vec::new();
        for t in &layout.tensors {
            match runs.last_mut() {
                Some((r, d)) if *d == t.decay && r.end == t.offset => r.end = t.range().end,
                _ => runs.push((t.range(), t.decay)),
            }
        }
        for (r, decay) in runs {
            let hp = AdamWStep {
                lr: cfg.lr,
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: cfg.eps,
                weight_decay: if decay { cfg.weight_decay } else { 0.0 },
                step: self.step,
            };
            adamw_update(
                &mut params[r.clone()],
                &mut self.m[r.clone()],
                &mut self.v[r.clone()],
                &grads[r],
                hp,
                par,
            );
        }
        norm
    }
}
