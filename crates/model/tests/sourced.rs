//! `forward_sourced` / `backward_sourced` with a source that holds only the fetched units (and
//! poisons a unit once released) give bitwise what the whole-buffer functions give, ask for
//! units in the layout's fetch order, and turn a failed fetch into an error naming the unit.

use kernels::rng::Rng;
use kernels::Par;
use model::{
    backward_sourced, backward_with, forward_sourced, forward_with, ActSaved, ActScratch,
    GradInput, ModelConfig, ModelError, NoTp, ParamLayout, ParamSource, Recompute, Shard,
    StageInput, TpError, Unit,
};
use std::ops::Range;

/// Each fetch with its prefetch hint.
type FetchLog = Vec<(Unit, Option<Unit>)>;

/// Copies a unit out of `full` on fetch and drops it on release, recording every call.
struct Copying<'a> {
    layout: &'a ParamLayout,
    full: &'a [f32],
    held: Vec<(Unit, Range<usize>, Vec<f32>)>,
    log: FetchLog,
    fail_at: Option<Unit>,
}

impl ParamSource<f32> for Copying<'_> {
    fn fetch(&mut self, unit: Unit, next: Option<Unit>) -> Result<(), TpError> {
        self.log.push((unit, next));
        if self.fail_at == Some(unit) {
            return Err("peer went away".into());
        }
        assert!(
            self.held.iter().all(|h| h.0 != unit),
            "{unit:?} fetched twice"
        );
        let r = self.layout.unit_range(unit);
        self.held.push((unit, r.clone(), self.full[r].to_vec()));
        Ok(())
    }
    fn get(&self, r: Range<usize>) -> &[f32] {
        let (_, at, buf) = self
            .held
            .iter()
            .find(|h| h.1.start <= r.start && r.end <= h.1.end)
            .unwrap_or_else(|| panic!("{r:?} read but not fetched"));
        &buf[r.start - at.start..r.end - at.start]
    }
    fn release(&mut self, unit: Unit) {
        let i = self.held.iter().position(|h| h.0 == unit).expect("held");
        self.held.swap_remove(i);
    }
}

#[test]
fn sourced_passes_equal_the_whole_buffer_bit_for_bit() {
    let cfg = ModelConfig {
        vocab_size: 50,
        max_seq_len: 8,
        n_layer: 3,
        n_head: 4,
        channels: 16,
    };
    let layout = ParamLayout::new(&cfg, &Shard::full(&cfg)).unwrap();
    let mut params = layout.init_params(7);
    let mut rng = Rng::new(8);
    params
        .iter_mut()
        .for_each(|x| *x += 0.2 * rng.normal() as f32);
    let (b, t) = (2, 8);
    let x: Vec<u32> = (0..b * t).map(|_| rng.below(50) as u32).collect();
    let y: Vec<u32> = (0..b * t).map(|_| rng.below(50) as u32).collect();
    for rc in [Recompute::None, Recompute::Full] {
        let run = |sourced: bool| -> (f32, Vec<f32>, FetchLog) {
            let mut saved = ActSaved::with(&layout, b, t, rc);
            let mut scratch = ActScratch::with(&layout, b, t, rc);
            let mut src = Copying {
                layout: &layout,
                full: &params,
                held: Vec::new(),
                log: Vec::new(),
                fail_at: None,
            };
            let (input, par) = (StageInput::Tokens(&x), Par::Threads(2));
            let grad_in = GradInput::Loss {
                targets: &y,
                d_loss: 0.1,
            };
            let mut g = vec![0.0f32; layout.len()];
            let loss = if sourced {
                let l = forward_sourced(
                    &layout,
                    &mut src,
                    &mut saved,
                    &mut scratch,
                    input,
                    Some(&y),
                    par,
                    &mut NoTp,
                );
                assert!(src.held.is_empty(), "forward released every unit");
                backward_sourced(
                    &layout,
                    &mut src,
                    &mut g[..],
                    &mut saved,
                    &mut scratch,
                    input,
                    grad_in,
                    par,
                    &mut NoTp,
                )
                .unwrap();
                assert!(src.held.is_empty(), "backward released every unit");
                l
            } else {
                let l = forward_with(
                    &layout,
                    &params,
                    &mut saved,
                    &mut scratch,
                    input,
                    Some(&y),
                    par,
                    &mut NoTp,
                );
                backward_with(
                    &layout,
                    &params,
                    &mut g[..],
                    &mut saved,
                    &mut scratch,
                    input,
                    grad_in,
                    par,
                    &mut NoTp,
                )
                .unwrap();
                l
            };
            (loss.unwrap().unwrap(), g, src.log)
        };
        let (l0, g0, _) = run(false);
        let (l1, g1, log) = run(true);
        assert_eq!(l0.to_bits(), l1.to_bits(), "{rc:?}");
        assert!(g0.iter().zip(&g1).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(g0.iter().any(|&v| v != 0.0));
        // the hints are the layout's orders, each pass ending with None
        let mut want: FetchLog = Vec::new();
        for order in [layout.forward_fetches(), layout.backward_fetches()] {
            for (i, &u) in order.iter().enumerate() {
                want.push((u, order.get(i + 1).copied()));
            }
        }
        assert_eq!(log, want);
    }
}

#[test]
fn a_failed_fetch_is_an_error_naming_the_unit() {
    let cfg = ModelConfig {
        vocab_size: 50,
        max_seq_len: 8,
        n_layer: 2,
        n_head: 2,
        channels: 8,
    };
    let layout = ParamLayout::new(&cfg, &Shard::full(&cfg)).unwrap();
    let params = layout.init_params(1);
    let (b, t) = (1, 8);
    let x = vec![1u32; b * t];
    let mut saved = ActSaved::new(&layout, b, t);
    let mut scratch = ActScratch::new(&layout, b, t);
    let mut src = Copying {
        layout: &layout,
        full: &params,
        held: Vec::new(),
        log: Vec::new(),
        fail_at: Some(Unit::Layer(1)),
    };
    let err = forward_sourced(
        &layout,
        &mut src,
        &mut saved,
        &mut scratch,
        StageInput::Tokens(&x),
        Some(&x),
        Par::Threads(1),
        &mut NoTp,
    )
    .unwrap_err();
    assert!(matches!(
        err,
        ModelError::Fetch {
            unit: Unit::Layer(1),
            ..
        }
    ));
    let msg = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(
        msg.contains("Layer(1)") && msg.contains("peer went away"),
        "{msg}"
    );
}
