//! The trainer's side of mixed precision: which storage type a run uses, and how a 16-bit
//! backward feeds the `f32` gradients that the data-parallel reduction and AdamW read.
//!
//! Under `bf16-mixed` / `fp16-mixed` the weights forward and backward read are a 16-bit working
//! copy of the fp32 master weights (refreshed after every optimizer step), activations are
//! 16-bit, and backward writes one micro-batch's gradient in 16 bits into a staging buffer.
//! [`Widen`] is the [`GradSink`] backward sees: as backward reports a region final
//! (`GradSink::ready`), the region is widened to `f32` (and, under fp16, multiplied by
//! `1/loss_scale`, exact for a power of two) and **added** into the sink underneath — the flat
//! `f32` buffer, or the data-parallel bucket sink, which then reduces it while backward goes on.
//! So gradient accumulation over micro-batches, the reduction (in `f32`) and the optimizer
//! are the fp32 code, unchanged; only one micro-batch's gradient ever lives in 16 bits.
//! With `f32` storage nothing is staged: backward writes into the sink directly, as before.

use comm::Communicator;
use kernels::{Bf16, Elem, Par, F16};
use model::{
    backward_with, ActSaved, ActScratch, GradInput, GradSink, ModelError, ParamLayout, StageInput,
    TpReduce,
};

/// A storage type the trainer runs in: `f32`, [`Bf16`] or [`F16`].
pub trait Storage: Elem {
    /// Backward of one micro-batch into the `f32` gradient sink `sink`. `f32` writes straight
    /// into it; a 16-bit type computes into `staging` (laid out like the parameters, zeroed
    /// here) and adds it into `sink`, times `unscale`, region by region ([`Widen`]).
    #[allow(clippy::too_many_arguments)]
    fn backward_to<G: GradSink + ?Sized>(
        layout: &ParamLayout,
        params: &[Self],
        sink: &mut G,
        staging: &mut [Self],
        unscale: f32,
        saved: &mut ActSaved<Self>,
        scratch: &mut ActScratch<Self>,
        input: StageInput<'_>,
        grad_in: GradInput<'_>,
        par: Par,
        tp: &mut dyn TpReduce,
    ) -> Result<(), ModelError>;

    /// All-gather `buf` (shards in elements, as [`comm::Communicator::all_gather`]) at this
    /// type's width: 16-bit types move 2 bytes per element (ZeRO-3's weight gathers).
    fn all_gather(group: &mut dyn Communicator, buf: &mut [Self]) -> comm::Result<()>;

    /// `buf` itself when the type is `f32` (no widening needed), `None` otherwise.
    fn as_f32_mut(buf: &mut [Self]) -> Option<&mut [f32]>;
}

impl Storage for f32 {
    fn backward_to<G: GradSink + ?Sized>(
        layout: &ParamLayout,
        params: &[f32],
        sink: &mut G,
        _staging: &mut [f32],
        _unscale: f32,
        saved: &mut ActSaved<f32>,
        scratch: &mut ActScratch<f32>,
        input: StageInput<'_>,
        grad_in: GradInput<'_>,
        par: Par,
        tp: &mut dyn TpReduce,
    ) -> Result<(), ModelError> {
        backward_with(
            layout, params, sink, saved, scratch, input, grad_in, par, tp,
        )
    }

    fn all_gather(group: &mut dyn Communicator, buf: &mut [f32]) -> comm::Result<()> {
        group.all_gather(buf)
    }

    fn as_f32_mut(buf: &mut [f32]) -> Option<&mut [f32]> {
        Some(buf)
    }
}

macro_rules! widened_storage {
    ($t:ty) => {
        impl Storage for $t {
            fn backward_to<G: GradSink + ?Sized>(
                layout: &ParamLayout,
                params: &[$t],
                sink: &mut G,
                staging: &mut [$t],
                unscale: f32,
                saved: &mut ActSaved<$t>,
                scratch: &mut ActScratch<$t>,
                input: StageInput<'_>,
                grad_in: GradInput<'_>,
                par: Par,
                tp: &mut dyn TpReduce,
            ) -> Result<(), ModelError> {
                assert_eq!(
                    staging.len(),
                    layout.len(),
                    "16-bit gradient staging vs layout"
                );
                staging.fill(<$t>::default());
                let mut w = Widen::new(sink, staging, unscale);
                backward_with(
                    layout, params, &mut w, saved, scratch, input, grad_in, par, tp,
                )?;
                w.ready(0);
                Ok(())
            }

            fn all_gather(group: &mut dyn Communicator, buf: &mut [$t]) -> comm::Result<()> {
                // SAFETY: the type is `#[repr(transparent)]` over its `u16` bit pattern.
                let bits = unsafe {
                    std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u16, buf.len())
                };
                group.all_gather_u16(bits)
            }

            fn as_f32_mut(_buf: &mut [$t]) -> Option<&mut [f32]> {
                None
            }
        }
    };
}
widened_storage!(Bf16);
widened_storage!(F16);

/// A 16-bit [`GradSink`] over an `f32` one: backward accumulates into `staging`; when it
/// reports `[from, …)` final, that region is added (widened, times `unscale`) into the `f32`
/// sink's storage and the `f32` sink is told. Regions are the model's ready-point segments
/// (whole layers, the head, the embedding), which never straddle a data-parallel bucket.
pub struct Widen<'a, E, G: ?Sized> {
    inner: &'a mut G,
    staging: &'a mut [E],
    /// Everything at or above this offset has been handed on.
    done_from: usize,
    unscale: f32,
}

impl<'a, E: Elem, G: GradSink + ?Sized> Widen<'a, E, G> {
    /// A sink staging into `staging` (zeroed by the caller) in front of `inner`.
    pub fn new(inner: &'a mut G, staging: &'a mut [E], unscale: f32) -> Self {
        let done_from = staging.len();
        Widen {
            inner,
            staging,
            done_from,
            unscale,
        }
    }
}

impl<E: Elem, G: GradSink + ?Sized> GradSink<E> for Widen<'_, E, G> {
    fn slice(&mut self, r: std::ops::Range<usize>) -> &mut [E] {
        assert!(
            r.end <= self.done_from,
            "backward wrote gradients {r:?} after reporting them final"
        );
        &mut self.staging[r]
    }

    fn ready(&mut self, from: usize) {
        if from < self.done_from {
            let r = from..self.done_from;
            add_widened(self.inner.slice(r.clone()), &self.staging[r], self.unscale);
            self.done_from = from;
        }
        self.inner.ready(from);
    }
}

/// `dst[i] += src[i] · unscale`, widening a block at a time (the type's fast conversion).
pub(crate) fn add_widened<E: Elem>(dst: &mut [f32], src: &[E], unscale: f32) {
    const BLOCK: usize = 1024;
    let mut tmp = [0.0f32; BLOCK];
    for (d, s) in dst.chunks_mut(BLOCK).zip(src.chunks(BLOCK)) {
        let t = &mut tmp[..s.len()];
        E::load(s, t);
        if unscale == 1.0 {
            for (a, &b) in d.iter_mut().zip(t.iter()) {
                *a += b;
            }
        } else {
            for (a, &b) in d.iter_mut().zip(t.iter()) {
                *a += b * unscale;
            }
        }
    }
}

/// `Some(master)` when the storage type is `f32` itself: the weights forward and backward
/// read are then the master weights, with no copy. (A `&Vec` because `Any` downcasts only
/// sized types.)
#[allow(clippy::ptr_arg)]
pub fn master_as<E: Elem>(master: &Vec<f32>) -> Option<&[E]> {
    (master as &dyn std::any::Any)
        .downcast_ref::<Vec<E>>()
        .map(|v| v.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that records the order of ready points.
    struct Rec(Vec<f32>, Vec<usize>);
    impl GradSink for Rec {
        fn slice(&mut self, r: std::ops::Range<usize>) -> &mut [f32] {
            &mut self.0[r]
        }
        fn ready(&mut self, from: usize) {
            self.1.push(from);
        }
    }

    #[test]
    fn widen_adds_each_region_once_when_final() {
        let mut inner = Rec(vec![1.0; 8], Vec::new());
        let mut staging = vec![Bf16::default(); 8];
        {
            let mut w = Widen::new(&mut inner, &mut staging, 0.5);
            for x in w.slice(4..8) {
                *x = Bf16::from_f32(2.0);
            }
            w.ready(4);
            for x in w.slice(0..4) {
                *x = Bf16::from_f32(4.0);
            }
            w.ready(4); // a repeated point hands nothing on twice
            w.ready(0);
        }
        assert_eq!(inner.0, vec![3.0, 3.0, 3.0, 3.0, 2.0, 2.0, 2.0, 2.0]);
        assert_eq!(inner.1, vec![4, 4, 0]);
    }

    #[test]
    fn master_is_borrowed_only_for_f32() {
        let m = vec![1.0f32, 2.0];
        assert_eq!(master_as::<f32>(&m), Some(&m[..]));
        assert!(master_as::<Bf16>(&m).is_none());
    }
}
