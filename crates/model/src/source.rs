//! Where a pass gets its weights: [`ParamSource`]. Forward and backward ask for one *unit* of
//! the flat buffer at a time — the embedding, one layer, the head — just before they use it,
//! and release it after, in a fixed order ([`ParamLayout::forward_fetches`],
//! [`ParamLayout::backward_fetches`]). A whole buffer in memory ([`Whole`]) answers at once; a
//! fully sharded data-parallel rank (ZeRO-3, `crates/train`) all-gathers the unit from its peers,
//! and may start gathering the next one (the `next` hint) while the current one computes.
//!
//! Forward fetches the embedding, each layer in order, then the head and — the LM head is tied
//! to `wte` — the embedding again. Backward fetches the head and the embedding (tied), then each
//! layer from last to first; the embedding's own backward reads no weights.

use crate::{ParamLayout, TpError};
use std::ops::Range;

/// A contiguous region of the flat buffer that a pass fetches whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unit {
    /// `wte` and `wpe` (first stage).
    Embed,
    /// Held layer `i` (0-based within the shard).
    Layer(usize),
    /// `ln_f` and, on a last stage without the embedding, its own copy of the tied `wte`.
    Head,
}

/// Supplies a pass's weights unit by unit. Every call order is the layout's fetch order, so
/// all data-parallel ranks running the same pass make the same calls.
pub trait ParamSource<E> {
    /// Makes `unit`'s weights available to [`ParamSource::get`] until
    /// [`ParamSource::release`]. `next` is the unit the pass will fetch after this one (a hint
    /// for prefetching), `None` at the end of the pass.
    fn fetch(&mut self, unit: Unit, next: Option<Unit>) -> Result<(), TpError>;
    /// The weights of the flat range `r` (layout offsets), which lies inside a fetched unit.
    fn get(&self, r: Range<usize>) -> &[E];
    /// The pass is done with `unit`.
    fn release(&mut self, unit: Unit);
}

/// The whole flat buffer in memory: fetching is free.
pub struct Whole<'a, E>(pub &'a [E]);

impl<E> ParamSource<E> for Whole<'_, E> {
    fn fetch(&mut self, _unit: Unit, _next: Option<Unit>) -> Result<(), TpError> {
        Ok(())
    }
    fn get(&self, r: Range<usize>) -> &[E] {
        &self.0[r]
    }
    fn release(&mut self, _unit: Unit) {}
}

impl ParamLayout {
    /// The flat range of `unit`.
    pub fn unit_range(&self, unit: Unit) -> Range<usize> {
        match unit {
            Unit::Embed => {
                let e = self.embed.as_ref().expect("unit_range: no embedding here");
                e.wte.start.min(e.wpe.start)..e.wte.end.max(e.wpe.end)
            }
            Unit::Layer(i) => self.layer_range(i),
            Unit::Head => {
                assert!(self.head.is_some(), "unit_range: no head here");
                self.head_start()..self.len()
            }
        }
    }

    /// The units of this shard in buffer order (they tile `0..len()`).
    pub fn units(&self) -> Vec<Unit> {
        let mut out = Vec::new();
        if self.embed.is_some() {
            out.push(Unit::Embed);
        }
        out.extend((0..self.layers.len()).map(Unit::Layer));
        if self.head.is_some() {
            out.push(Unit::Head);
        }
        out
    }

    /// The units forward fetches, in order: the embedding, each layer, the head and (tied LM
    /// head) the embedding again.
    pub fn forward_fetches(&self) -> Vec<Unit> {
        let mut out = Vec::new();
        if self.embed.is_some() {
            out.push(Unit::Embed);
        }
        out.extend((0..self.layers.len()).map(Unit::Layer));
        out.extend(self.head_fetches());
        out
    }

    /// The units backward fetches, in order: the head (and the embedding, tied), then each
    /// layer from last to first.
    pub fn backward_fetches(&self) -> Vec<Unit> {
        let mut out = self.head_fetches();
        out.extend((0..self.layers.len()).rev().map(Unit::Layer));
        out
    }

    fn head_fetches(&self) -> Vec<Unit> {
        match (&self.head, &self.embed) {
            (Some(_), Some(_)) => vec![Unit::Head, Unit::Embed],
            (Some(_), None) => vec![Unit::Head],
            (None, _) => Vec::new(),
        }
    }
}

/// Walks a pass's fetch order, checking each request against it and passing the next unit as
/// the prefetch hint.
pub(crate) struct Fetches {
    order: Vec<Unit>,
    at: usize,
}

impl Fetches {
    pub fn new(order: Vec<Unit>) -> Fetches {
        Fetches { order, at: 0 }
    }

    pub fn fetch<E>(
        &mut self,
        src: &mut (impl ParamSource<E> + ?Sized),
        unit: Unit,
    ) -> Result<(), crate::ModelError> {
        assert_eq!(
            self.order.get(self.at),
            Some(&unit),
            "fetch out of the layout's order"
        );
        self.at += 1;
        let next = self.order.get(self.at).copied();
        src.fetch(unit, next)
            .map_err(|source| crate::ModelError::Fetch { unit, source })
    }
}

#[cfg(test)]
mod tests {
    use crate::{ModelConfig, ParamLayout, Shard};

    #[test]
    fn units_tile_the_buffer_and_fetch_orders_cover_each_pass() {
        let cfg = ModelConfig {
            vocab_size: 100,
            max_seq_len: 16,
            n_layer: 3,
            n_head: 4,
            channels: 16,
        };
        let l = ParamLayout::new(&cfg, &Shard::full(&cfg)).unwrap();
        let mut end = 0;
        for u in l.units() {
            let r = l.unit_range(u);
            assert_eq!(r.start, end, "{u:?}");
            end = r.end;
        }
        assert_eq!(end, l.len());
        use super::Unit::*;
        assert_eq!(
            l.forward_fetches(),
            [Embed, Layer(0), Layer(1), Layer(2), Head, Embed]
        );
        assert_eq!(
            l.backward_fetches(),
            [Head, Embed, Layer(2), Layer(1), Layer(0)]
        );
    }
}
