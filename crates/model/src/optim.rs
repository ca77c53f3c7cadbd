//! AdamW over the flat buffers (Loshchilov & Hutter 2019), with PyTorch's defaults and
//! global-norm gradient clipping. Weight decay applies to 2-D tensors only (matrices and
//! embeddings), never to biases or norm weights, as nanoGPT/GPT-2 training does.

use crate::ParamLayout;
use kernels::adamw::{
    adamw_update, adamw_update_mixed, clip_factor, scale_inplace, sum_squares, sum_squares_of,
    AdamWStep,
};
use kernels::{Elem, Par};

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

/// `n` split into `parts` contiguous near-equal ranges.
fn split_even(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let (base, extra) = (n / parts, n % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < extra);
            start += len;
            start - len..start
        })
        .collect()
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
        update_range(
            layout,
            0,
            params,
            &mut self.m,
            &mut self.v,
            grads,
            cfg,
            self.step,
            par,
        );
        norm
    }

    /// One mixed-precision step: `master` holds the `f32` weights AdamW updates, `grads` the
    /// gradients in their storage type (multiplied by `grad_scale` first, e.g. `1/loss_scale`
    /// under fp16 loss scaling), and `working` receives the updated weights rounded to the
    /// storage type forward and backward read. Clipping uses the norm of the scaled gradients,
    /// folded into the same multiply (the 16-bit gradients are not rewritten). Returns that norm.
    /// With `f32` gradients and `grad_scale = 1` the master update equals [`AdamW::step`]'s.
    #[allow(clippy::too_many_arguments)]
    pub fn step_mixed<G: Elem, W: Elem>(
        &mut self,
        layout: &ParamLayout,
        master: &mut [f32],
        working: &mut [W],
        grads: &[G],
        grad_scale: f32,
        cfg: &AdamWConfig,
        par: Par,
    ) -> f64 {
        assert_eq!(
            master.len(),
            layout.len(),
            "AdamW::step_mixed: master length"
        );
        assert_eq!(
            working.len(),
            layout.len(),
            "AdamW::step_mixed: working length"
        );
        assert_eq!(grads.len(), layout.len(), "AdamW::step_mixed: grads length");
        let norm = sum_squares_of(grads).sqrt() * grad_scale as f64;
        let factor = match cfg.grad_clip {
            Some(max_norm) => grad_scale * clip_factor(norm, max_norm),
            None => grad_scale,
        };
        self.step += 1;
        let runs = decay_runs(layout);
        let hp = |decay: bool| AdamWStep {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: if decay { cfg.weight_decay } else { 0.0 },
            step: self.step,
        };
        let n = master.len();
        let threads = par.threads().min(n / 65_536).max(1);
        let parts = split_even(n, threads);
        let mut jobs = Vec::with_capacity(parts.len());
        let (mut p_rest, mut w_rest, mut m_rest, mut v_rest, mut g_rest) = (
            &mut master[..],
            &mut working[..],
            &mut self.m[..],
            &mut self.v[..],
            grads,
        );
        for part in &parts {
            let (p, pt) = p_rest.split_at_mut(part.len());
            let (w, wt) = w_rest.split_at_mut(part.len());
            let (mm, mt) = m_rest.split_at_mut(part.len());
            let (vv, vt) = v_rest.split_at_mut(part.len());
            let (g, gt) = g_rest.split_at(part.len());
            (p_rest, w_rest, m_rest, v_rest, g_rest) = (pt, wt, mt, vt, gt);
            jobs.push((part.clone(), p, w, mm, vv, g));
        }
        kernels::par_jobs(jobs, |(part, p, w, mm, vv, g)| {
            for (r, decay) in &runs {
                let (lo, hi) = (r.start.max(part.start), r.end.min(part.end));
                if lo < hi {
                    let l = (lo - part.start)..(hi - part.start);
                    adamw_update_mixed(
                        &mut p[l.clone()],
                        &mut w[l.clone()],
                        &mut mm[l.clone()],
                        &mut vv[l.clone()],
                        &g[l],
                        factor,
                        hp(*decay),
                    );
                }
            }
        });
        norm
    }
}

/// Neighbouring tensors with the same decay rule, merged into ranges (one kernel call each).
fn decay_runs(layout: &ParamLayout) -> Vec<(std::ops::Range<usize>, bool)> {
    let mut runs: Vec<(std::ops::Range<usize>, bool)> = Vec::new();
    for t in &layout.tensors {
        match runs.last_mut() {
            Some((r, d)) if *d == t.decay && r.end == t.offset => r.end = t.range().end,
            _ => runs.push((t.range(), t.decay)),
        }
    }
    runs
}

/// AdamW's update (step number `step`, after any clipping) of the window
/// `start..start + params.len()` of flat buffers laid out by `layout`: `params`, `m`, `v` and
/// `grads` are that window. Weight decay follows each tensor's rule. The one AdamW loop of the
/// runtime: [`AdamW::step`] runs it over the whole buffer, ZeRO over each range a rank owns.
/// Elementwise, so any window and any thread count give the same bits.
#[allow(clippy::too_many_arguments)]
pub fn update_range(
    layout: &ParamLayout,
    start: usize,
    params: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    grads: &[f32],
    cfg: &AdamWConfig,
    step: u32,
    par: Par,
) {
    let n = params.len();
    assert!(
        m.len() == n && v.len() == n && grads.len() == n,
        "update_range: params, m, v and grads must be the same window"
    );
    let end = start + n;
    // Merge neighbouring tensors with the same decay rule into one run (window offsets).
    let mut runs: Vec<(std::ops::Range<usize>, bool)> = Vec::new();
    for t in &layout.tensors {
        let r = t.range();
        let (lo, hi) = (r.start.max(start), r.end.min(end));
        if lo >= hi {
            continue;
        }
        match runs.last_mut() {
            Some((r, d)) if *d == t.decay && r.end == lo - start => r.end = hi - start,
            _ => runs.push((lo - start..hi - start, t.decay)),
        }
    }
    let hp = |decay: bool| AdamWStep {
        lr: cfg.lr,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: if decay { cfg.weight_decay } else { 0.0 },
        step,
    };
    // One split of the window over the threads (each thread walks the decay runs in its part),
    // rather than one threaded kernel call per run: a step has dozens of runs. The parts run on
    // the kernels' persistent workers.
    let threads = par.threads().min(n / 65_536).max(1);
    let parts = split_even(n, threads);
    let mut jobs = Vec::with_capacity(parts.len());
    let (mut p_rest, mut m_rest, mut v_rest, mut g_rest) = (params, m, v, grads);
    for part in &parts {
        let (p, pt) = p_rest.split_at_mut(part.len());
        let (mm, mt) = m_rest.split_at_mut(part.len());
        let (vv, vt) = v_rest.split_at_mut(part.len());
        let (g, gt) = g_rest.split_at(part.len());
        (p_rest, m_rest, v_rest, g_rest) = (pt, mt, vt, gt);
        jobs.push((part.clone(), p, mm, vv, g));
    }
    kernels::par_jobs(jobs, |(part, p, mm, vv, g)| {
        for (r, decay) in &runs {
            let (lo, hi) = (r.start.max(part.start), r.end.min(part.end));
            if lo < hi {
                let l = (lo - part.start)..(hi - part.start);
                adamw_update(
                    &mut p[l.clone()],
                    &mut mm[l.clone()],
                    &mut vv[l.clone()],
                    &g[l],
                    hp(*decay),
                    Par::Seq,
                );
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ModelConfig, Shard};
    use kernels::rng::Rng;

    #[test]
    fn threaded_step_equals_sequential_and_skips_decay_on_biases() {
        let cfg = ModelConfig {
            vocab_size: 2000,
            max_seq_len: 32,
            n_layer: 2,
            n_head: 4,
            channels: 64,
        };
        let layout = ParamLayout::new(&cfg, &Shard::full(&cfg)).unwrap();
        assert!(
            layout.len() > 3 * 65_536,
            "needs a buffer big enough to split"
        );
        let p0 = layout.init_params(1);
        let mut g = vec![0.0f32; layout.len()];
        Rng::new(2).fill_normal(&mut g, 0.01);
        let c = AdamWConfig::default();
        let (mut pa, mut pb) = (p0.clone(), p0.clone());
        let (mut ga, mut gb) = (g.clone(), g.clone());
        let g = g.clone();
        let (mut oa, mut ob) = (AdamW::new(&layout), AdamW::new(&layout));
        for _ in 0..2 {
            oa.step(&layout, &mut pa, &mut ga, &c, Par::Seq);
            ob.step(&layout, &mut pb, &mut gb, &c, Par::Threads(3));
        }
        assert_eq!(pa, pb);
        assert_eq!((&oa.m, &oa.v), (&ob.m, &ob.v));
        // The mixed step with f32 gradients and scale 1 is the same update (two steps, each from
        // the original gradients); its working copy is the master rounded to bf16.
        let (mut pr, mut or) = (p0.clone(), AdamW::new(&layout));
        let (mut pm, mut om) = (p0.clone(), AdamW::new(&layout));
        let mut work = vec![kernels::Bf16::default(); layout.len()];
        for _ in 0..2 {
            let mut gr = g.clone(); // step() clips in place
            let nr = or.step(&layout, &mut pr, &mut gr, &c, Par::Seq);
            let nm = om.step_mixed(&layout, &mut pm, &mut work, &g, 1.0, &c, Par::Threads(2));
            assert_eq!(nr, nm);
        }
        assert!(
            pm == pr && om.m == or.m && om.v == or.v,
            "mixed step differs"
        );
        assert!(work
            .iter()
            .zip(&pm)
            .all(|(w, &p)| *w == kernels::Bf16::from_f32(p)));
        // Gradients 1024 times larger with grad_scale 1/1024: the same step (powers of two).
        let (mut ps, mut os) = (p0.clone(), AdamW::new(&layout));
        let big: Vec<f32> = g.iter().map(|&x| x * 1024.0).collect();
        let mut w32 = vec![0.0f32; layout.len()];
        let (mut pr, mut or, mut gr) = (p0.clone(), AdamW::new(&layout), g.clone());
        let nr = or.step(&layout, &mut pr, &mut gr, &c, Par::Seq);
        let ns = os.step_mixed(&layout, &mut ps, &mut w32, &big, 1.0 / 1024.0, &c, Par::Seq);
        assert_eq!(nr, ns);
        assert!(ps == pr && w32 == ps, "scaled mixed step differs");
        // With zero gradient only decay moves a parameter: biases stay, matrices shrink.
        let mut p = p0.clone();
        let mut zero = vec![0.0f32; layout.len()];
        let mut o = AdamW::new(&layout);
        let c = AdamWConfig {
            grad_clip: None,
            ..c
        };
        o.step(&layout, &mut p, &mut zero, &c, Par::Threads(2));
        let ln = layout.tensor("h.0.ln_1.weight").unwrap().range();
        assert_eq!(p[ln.clone()], p0[ln]);
        let w = layout.tensor("h.1.mlp.c_fc.weight").unwrap().range();
        let shrink = 1.0 - c.lr * c.weight_decay;
        assert!(p[w.clone()]
            .iter()
            .zip(&p0[w])
            .all(|(&a, &b)| a == b * shrink));
    }
}
