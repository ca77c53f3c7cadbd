//! Weight panels packed once per step and reused by every micro-batch.
//!
//! Our AVX-512 GEMM (`avx512.rs`) packs its `b` operand into `[kc][NR]` panels on every call.
//! In a linear layer `b` is the weight: `wᵀ` in forward, `w` for the input gradient in
//! backward. A step that runs several micro-batches (gradient accumulation, every pipeline
//! stage) repacked every weight twice per micro-batch although weights change only at the
//! optimizer step. [`WeightPanels`] holds both packings of a set of weights; while a
//! [`PanelScope`] lives (one step's forwards and backwards, during which the parameters do
//! not change) the `f32` [`crate::matmul`] calls whose weight is one of them pack it on first
//! use and reuse the panels after. The panels are exactly what each call would have packed,
//! so results are bit for bit the same.
//!
//! Memory: `npad(n)·k + npad(k)·n` floats per `(n, k)` weight (`npad` rounds up to the
//! kernel's 32 columns): about twice the weights. `plan::cpu_runtime::weight_panel_bytes`
//! predicts it; the trainer holds panels only when a step runs more than one micro-batch.

use crate::avx512::Packed;
use crate::gemm::View;
use std::cell::RefCell;

/// Both packings (forward `wᵀ`, backward `w`) of some `(n, k)` weights of one flat
/// parameter buffer, allocated up front. See the module doc.
#[derive(Default)]
pub struct WeightPanels {
    entries: Vec<Entry>,
}

struct Entry {
    /// Offset of the weight in the parameter buffer, its shape (n, k).
    off: usize,
    n: usize,
    k: usize,
    /// `wᵀ` (k × n) and `w` (n × k), and whether each holds this step's weight.
    fwd: Packed,
    bwd: Packed,
    fwd_ok: bool,
    bwd_ok: bool,
}

/// Which packing of a weight a matmul wants.
#[derive(Clone, Copy)]
pub(crate) enum Dir {
    /// `wᵀ`: forward, `out = inp · wᵀ`.
    Fwd,
    /// `w`: backward, `d_inp = d_out · w`.
    Bwd,
}

impl WeightPanels {
    /// Whether panels can serve matmuls in this process (our AVX-512 kernel runs them).
    pub fn available() -> bool {
        crate::gemm::avx512_active()
    }

    /// Panels for the weights `(offset, n, k)` (a row-major `(n, k)` matrix at `offset` of the
    /// parameter buffer), allocated now.
    pub fn new(weights: &[(usize, usize, usize)]) -> WeightPanels {
        WeightPanels {
            entries: weights
                .iter()
                .map(|&(off, n, k)| Entry {
                    off,
                    n,
                    k,
                    fwd: Packed::new(k, n),
                    bwd: Packed::new(n, k),
                    fwd_ok: false,
                    bwd_ok: false,
                })
                .collect(),
        }
    }

    /// Floats the panels of one `(n, k)` weight hold.
    pub fn floats(n: usize, k: usize) -> usize {
        Packed::floats(k, n) + Packed::floats(n, k)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|e| e.fwd.bytes() + e.bwd.bytes())
            .sum()
    }

    /// True when no weight has panels.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The panels serving this thread's matmuls, with the parameter buffer's address and length.
type Active = Option<(WeightPanels, usize, usize)>;

thread_local! {
    static ACTIVE: RefCell<Active> = const { RefCell::new(None) };
}

/// While it lives, `panels` serves this thread's `f32` matmuls whose weight is one of its
/// weights in `params` (borrowed for as long, so the weights cannot change meanwhile). Every
/// panel is marked stale on entry and packed again on first use. Without panels, or without
/// our AVX-512 kernel, it does nothing. Dropping it hands the panels back.
pub struct PanelScope<'a> {
    panels: &'a mut WeightPanels,
    active: bool,
    _params: std::marker::PhantomData<&'a [f32]>,
}

impl<'a> PanelScope<'a> {
    /// Starts serving matmuls on this thread from `panels` for the weights in `params`.
    /// Panics when a scope is already active on this thread.
    pub fn enter(panels: &'a mut WeightPanels, params: &'a [f32]) -> PanelScope<'a> {
        let active = !panels.is_empty() && WeightPanels::available();
        if active {
            for e in &mut panels.entries {
                e.fwd_ok = false;
                e.bwd_ok = false;
            }
            ACTIVE.with(|a| {
                let mut a = a.borrow_mut();
                assert!(a.is_none(), "PanelScope::enter: a scope is already active");
                *a = Some((
                    std::mem::take(&mut *panels),
                    params.as_ptr() as usize,
                    params.len(),
                ));
            });
        }
        PanelScope {
            panels,
            active,
            _params: std::marker::PhantomData,
        }
    }
}

impl Drop for PanelScope<'_> {
    fn drop(&mut self) {
        if self.active {
            if let Some((p, _, _)) = ACTIVE.with(|a| a.borrow_mut().take()) {
                *self.panels = p;
            }
        }
    }
}

/// Runs `f` with the packing `dir` of weight `w` (`n × k`) when the active panels hold it
/// (packing it first if it is stale), else with `None`.
pub(crate) fn with_packed<R>(
    w: &[f32],
    (n, k): (usize, usize),
    dir: Dir,
    f: impl FnOnce(Option<&Packed>) -> R,
) -> R {
    ACTIVE.with(|a| {
        let Ok(mut guard) = a.try_borrow_mut() else {
            return f(None);
        };
        let found = guard.as_mut().and_then(|(p, base, len)| {
            let addr = w.as_ptr() as usize;
            let end = *base + 4 * *len;
            if addr < *base || addr + 4 * w.len() > end || !crate::gemm::avx512_active() {
                return None;
            }
            let off = (addr - *base) / 4;
            p.entries
                .iter_mut()
                .find(|e| e.off == off && e.n == n && e.k == k && w.len() == n * k)
        });
        match (found, dir) {
            (None, _) => f(None),
            (Some(e), Dir::Fwd) => {
                if !e.fwd_ok {
                    e.fwd.pack(w, View::rm(n, k, k).t());
                    e.fwd_ok = true;
                }
                f(Some(&e.fwd))
            }
            (Some(e), Dir::Bwd) => {
                if !e.bwd_ok {
                    e.bwd.pack(w, View::rm(n, k, k));
                    e.bwd_ok = true;
                }
                f(Some(&e.bwd))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::{matmul_backward, matmul_forward};
    use crate::rng::Rng;
    use crate::testutil::randn;
    use crate::Par;

    /// One forward and backward of a linear layer whose weight sits at `off` in `params`.
    fn step(
        params: &[f32],
        off: usize,
        inp: &[f32],
        d_out: &[f32],
        (m, k, n): (usize, usize, usize),
        par: Par,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let w = &params[off..off + n * k];
        let mut out = vec![f32::NAN; m * n];
        matmul_forward(&mut out, inp, w, None, m, k, n, par);
        let (mut d_inp, mut d_w) = (vec![f32::NAN; m * k], vec![0.5; n * k]);
        matmul_backward(&mut d_inp, &mut d_w, None, d_out, inp, w, m, k, n, par);
        (out, d_inp, d_w)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn panels_give_the_same_bits_and_repack_after_a_change() {
        if !WeightPanels::available() {
            eprintln!("no AVX-512: panels are not used here");
            return;
        }
        // k > KC (two inner slices), n not a multiple of 32 (a padded panel), m > MC.
        let (m, k, n, off) = (200, 300, 45, 7);
        let mut rng = Rng::new(5);
        let mut params = randn(&mut rng, off + n * k + 3, 1.0);
        let inp = randn(&mut rng, m * k, 1.0);
        let d_out = randn(&mut rng, m * n, 1.0);
        let mut panels = WeightPanels::new(&[(off, n, k)]);
        assert_eq!(panels.bytes(), 4 * WeightPanels::floats(n, k));
        assert_eq!(WeightPanels::floats(n, k), 64 * k + 320 * n);
        for round in 0..2 {
            for par in [Par::Seq, Par::Threads(3)] {
                let want = step(&params, off, &inp, &d_out, (m, k, n), par);
                let scope = PanelScope::enter(&mut panels, &params);
                for _ in 0..3 {
                    let got = step(&params, off, &inp, &d_out, (m, k, n), par);
                    assert_eq!(bits(&got.0), bits(&want.0), "out");
                    assert_eq!(bits(&got.1), bits(&want.1), "d_inp");
                    assert_eq!(bits(&got.2), bits(&want.2), "d_w");
                }
                // Both packings were used (the panels are no longer all zero).
                ACTIVE.with(|a| {
                    let a = a.borrow();
                    let e = &a.as_ref().expect("active").0.entries[0];
                    assert!(e.fwd_ok && e.bwd_ok);
                });
                drop(scope);
                assert!(!panels.is_empty(), "the panels came back");
            }
            // The optimizer changes the weights: the next scope packs them again.
            params.iter_mut().for_each(|x| *x *= 0.75);
            let _ = round;
        }
        // A weight outside the scope's buffer, or of another shape, is packed as before.
        let other = params.clone();
        let scope = PanelScope::enter(&mut panels, &params[..off]);
        let want = step(&other, off, &inp, &d_out, (m, k, n), Par::Seq);
        let got = step(&params, off, &inp, &d_out, (m, k, n), Par::Seq);
        assert_eq!(bits(&got.0), bits(&want.0), "out, unserved weight");
        drop(scope);
    }
}
