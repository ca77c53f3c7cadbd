//! The parallel layout and the one place that validates it, showing the arithmetic
//! (torchtitan's habit): `dp(2) * tp(4) * pp(2) = 16, but the cluster has 8 GPUs`.

use serde::Serialize;

use crate::error::{PlanError, Result};
use crate::model::ModelSpec;
use crate::partition::{self, Partition, StageLayers, MAX_STAGES};

/// Degrees and knobs of one parallel layout. Axes in Megatron's order: tp (inside a node),
/// then pp, then dp (outermost).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Layout {
    /// Data-parallel degree.
    pub dp: u64,
    /// Tensor-parallel degree (Megatron column/row split).
    pub tp: u64,
    /// Pipeline-parallel degree.
    pub pp: u64,
    /// Context-parallel degree: each sequence split across `cp` ranks (ring attention over the
    /// K/V chunks, Megatron-LM's load-balanced causal split); next to tp in the rank order.
    pub cp: u64,
    /// Expert-parallel degree: each MoE layer's routed experts split over `ep` ranks, which
    /// exchange tokens by all-to-all. Megatron-Core's MoE parallel folding with expert tensor
    /// parallelism 1: the experts' grid EP × expert-DP re-folds the attention's TP × CP × DP, so
    /// `ep` divides tp·cp·dp (Liu et al. 2025, arXiv 2504.14960).
    pub ep: u64,
    /// Virtual pipeline stages per device (interleaved 1F1B when > 1).
    pub vpp: u64,
    /// Sequence parallelism for norms/dropout across the tp group (Korthikanti et al. 2022).
    pub sp: bool,
    /// ZeRO stage 0..=3 (Rajbhandari et al. 2019).
    pub zero: u8,
    /// Sequences per micro-batch.
    pub micro_batch: u64,
    /// Micro-batches per step per data-parallel rank (gradient accumulation).
    pub grad_accum: u64,
    /// Transformer layers per (virtual) pipeline stage, `pp·vpp` entries; device `d` runs
    /// virtual stages `d, d + pp, …` (see [`crate::partition`]). Empty means the even split
    /// (`StageLayers::default()`, convenient when building a `Layout` by hand).
    pub stage_layers: StageLayers,
    /// How `stage_layers` was chosen.
    pub partition: Partition,
}

/// A layout as the user gave it: any degree may be left to inference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayoutRequest {
    /// `--dp`.
    pub dp: Option<u64>,
    /// `--tp`.
    pub tp: Option<u64>,
    /// `--pp`.
    pub pp: Option<u64>,
    /// `--cp`.
    pub cp: Option<u64>,
    /// `--ep`.
    pub ep: Option<u64>,
    /// `--vpp`.
    pub vpp: Option<u64>,
    /// `--sequence-parallel`.
    pub sp: bool,
    /// `--zero`.
    pub zero: Option<u8>,
    /// `--micro-batch`.
    pub micro_batch: Option<u64>,
    /// `--grad-accum`.
    pub grad_accum: Option<u64>,
    /// `--pp-layers`: layers per (virtual) stage, `pp·vpp` entries.
    pub pp_layers: Option<StageLayers>,
}

impl LayoutRequest {
    /// Fills in unset degrees where unambiguous (tp = pp = 1 by default, dp = gpus / (tp·pp),
    /// micro-batch 1, grad-accum = global batch ÷ (dp × micro-batch)) and validates.
    ///
    /// The partition: `pp_layers` when given ([`Partition::Explicit`]); otherwise the even split
    /// when `pp·vpp` divides the layers ([`Partition::Even`]), else layers spread as evenly as
    /// possible with the remainder on the last stages ([`Partition::Balanced`] with every layer
    /// costing the same and no embedding/head work). `Context::balance` re-chooses a non-explicit
    /// partition from predicted stage times; a runtime may re-balance with its own costs
    /// ([`crate::partition::balanced`]).
    pub fn resolve(&self, model: &ModelSpec, gpus: u64, global_batch: u64) -> Result<Layout> {
        let tp = self.tp.unwrap_or(1);
        let pp = self.pp.unwrap_or(1);
        let cp = self.cp.unwrap_or(1);
        let ep = self.ep.unwrap_or(1);
        for (name, v) in [("tp", tp), ("pp", pp), ("cp", cp), ("ep", ep)] {
            if v == 0 {
                return Err(PlanError::Layout(format!("{name} must be at least 1")));
            }
        }
        let dp = match self.dp {
            Some(d) => d,
            None => {
                let (mp, what) = if cp > 1 {
                    (tp * pp * cp, format!("tp({tp}) * pp({pp}) * cp({cp})"))
                } else {
                    (tp * pp, format!("tp({tp}) * pp({pp})"))
                };
                if mp > gpus {
                    return Err(PlanError::Layout(format!(
                        "{what} = {mp} needs more GPUs than the cluster's {gpus}; lower --tp/--pp/--cp or raise --gpus"
                    )));
                }
                if !gpus.is_multiple_of(mp) {
                    return Err(PlanError::Layout(format!(
                        "cannot infer dp: {gpus} GPUs is not divisible by {what} = {mp}"
                    )));
                }
                gpus / mp
            }
        };
        let micro_batch = self.micro_batch.unwrap_or(1);
        if dp == 0 || micro_batch == 0 {
            return Err(PlanError::Layout(
                "dp and micro-batch must be at least 1".into(),
            ));
        }
        let grad_accum = match self.grad_accum {
            Some(g) => g,
            None => {
                let per = dp * micro_batch;
                if !global_batch.is_multiple_of(per) {
                    return Err(PlanError::Layout(format!(
                        "global batch {global_batch} is not divisible by dp({dp}) * micro-batch({micro_batch}) = {per}; \
                         change --global-batch, --dp or --micro-batch"
                    )));
                }
                global_batch / per
            }
        };
        let vpp = self.vpp.unwrap_or(1);
        let stages = pp.saturating_mul(vpp);
        let (stage_layers, partition) = match self.pp_layers {
            Some(list) => (list, Partition::Explicit),
            None => {
                if vpp == 0 || stages > MAX_STAGES as u64 {
                    (StageLayers::default(), Partition::Even)
                } else if model.layers.is_multiple_of(stages) {
                    (StageLayers::spread(model.layers, stages), Partition::Even)
                } else {
                    (
                        StageLayers::spread(model.layers, stages),
                        Partition::Balanced,
                    )
                }
            }
        };
        let l = Layout {
            dp,
            tp,
            pp,
            cp,
            ep,
            vpp,
            sp: self.sp,
            zero: self.zero.unwrap_or(0),
            micro_batch,
            grad_accum,
            stage_layers,
            partition,
        };
        l.validate(model, gpus, global_batch)?;
        Ok(l)
    }
}

impl Layout {
    /// Total devices.
    pub fn world(&self) -> u64 {
        self.dp * self.tp * self.pp * self.cp
    }

    /// Ranks that hold the same weights and sum their gradients: dp · cp (context-parallel
    /// ranks see different tokens of the same sequences).
    pub fn grad_ranks(&self) -> u64 {
        self.dp * self.cp
    }

    /// Ranks that hold the same routed experts and sum their gradients: tp·cp·dp / ep (the
    /// expert-data-parallel group of Megatron-Core's parallel folding).
    pub fn expert_grad_ranks(&self) -> u64 {
        (self.tp * self.cp * self.dp / self.ep.max(1)).max(1)
    }

    /// Transformer layers on pipeline device `d` (the sum of its virtual stages) for a model of
    /// `layers` layers; an empty `stage_layers` is the even split (remainder on the last stages).
    #[inline]
    pub fn device_layers(&self, layers: u64, d: u64) -> u64 {
        if self.stage_layers.is_empty() {
            let s = (self.pp * self.vpp).max(1);
            let (q, r) = (layers / s, layers % s);
            (0..self.vpp)
                .map(|k| {
                    let i = d + k * self.pp;
                    q + u64::from(i >= s - r)
                })
                .sum()
        } else {
            self.stage_layers
                .device_layers(d as usize, self.pp as usize)
        }
    }

    /// Layers of virtual stage `i` (see [`Layout::device_layers`] for an empty list).
    #[inline]
    pub fn virtual_stage_layers(&self, layers: u64, i: u64) -> u64 {
        if self.stage_layers.is_empty() {
            let s = (self.pp * self.vpp).max(1);
            let (q, r) = (layers / s, layers % s);
            q + u64::from(i >= s - r)
        } else {
            self.stage_layers
                .as_slice()
                .get(i as usize)
                .map_or(0, |&n| n as u64)
        }
    }

    /// The checks every layout passes; errors show the arithmetic.
    pub fn validate(&self, m: &ModelSpec, gpus: u64, global_batch: u64) -> Result<()> {
        let Layout {
            dp,
            tp,
            pp,
            cp,
            ep,
            vpp,
            sp,
            zero,
            micro_batch,
            grad_accum,
            stage_layers,
            partition,
        } = *self;
        let err = |s: String| Err(PlanError::Layout(s));
        if dp == 0
            || tp == 0
            || pp == 0
            || cp == 0
            || ep == 0
            || vpp == 0
            || micro_batch == 0
            || grad_accum == 0
        {
            return err(
                "every degree (dp, tp, pp, cp, ep, vpp, micro-batch, grad-accum) must be at least 1"
                    .into(),
            );
        }
        if dp * tp * pp * cp != gpus {
            let cp_part = if cp > 1 {
                format!(" * cp({cp})")
            } else {
                String::new()
            };
            return err(format!(
                "dp({dp}) * tp({tp}) * pp({pp}){cp_part} = {}, but the cluster has {gpus} GPUs",
                dp * tp * pp * cp
            ));
        }
        if cp > 1 && !m.seq_len.is_multiple_of(2 * cp) {
            return err(format!(
                "context parallelism splits each sequence into 2·cp = {} load-balanced chunks; the sequence ({}) is not divisible by it",
                2 * cp,
                m.seq_len
            ));
        }
        match &m.moe {
            None if ep > 1 => {
                return err(format!(
                    "ep({ep}) > 1 needs a mixture-of-experts model (this one is dense); drop --ep"
                ))
            }
            None => {}
            Some(moe) => {
                if moe.experts % ep != 0 {
                    return err(format!(
                        "experts ({}) are not divisible by ep({ep}); pick ep dividing {}",
                        moe.experts, moe.experts
                    ));
                }
                if (tp * cp * dp) % ep != 0 {
                    return err(format!(
                        "ep({ep}) must divide tp({tp}) * cp({cp}) * dp({dp}) = {}: the expert ranks re-fold the attention's tp x cp x dp grid (Megatron-Core MoE parallel folding, expert tensor parallelism 1)",
                        tp * cp * dp
                    ));
                }
                if tp > 1 && ep > 1 && !sp {
                    return err(format!(
                        "ep({ep}) with tp({tp}) needs --sequence-parallel (Megatron-LM requires it: each tp rank then routes its own tokens)"
                    ));
                }
            }
        }
        if !m.heads.is_multiple_of(tp) {
            return err(format!(
                "heads ({}) is not divisible by tp ({tp}); pick tp dividing {}",
                m.heads, m.heads
            ));
        }
        if !m.kv_heads.is_multiple_of(tp) {
            return err(format!(
                "kv heads ({}) is not divisible by tp ({tp}); pick tp dividing {}",
                m.kv_heads, m.kv_heads
            ));
        }
        if !m.ffn_hidden.is_multiple_of(tp) {
            return err(format!(
                "ffn hidden ({}) is not divisible by tp ({tp})",
                m.ffn_hidden
            ));
        }
        let stages = pp * vpp;
        if stages > MAX_STAGES as u64 {
            return err(format!(
                "pp({pp}) * vpp({vpp}) = {stages} pipeline stages; at most {MAX_STAGES} are supported"
            ));
        }
        if !stage_layers.is_empty() && stage_layers.len() as u64 != stages {
            return err(format!(
                "--pp-layers lists {} stages, but pp({pp}) * vpp({vpp}) = {stages}",
                stage_layers.len()
            ));
        }
        if !stage_layers.is_empty() {
            let counts: Vec<usize> = stage_layers
                .as_slice()
                .iter()
                .map(|&n| n as usize)
                .collect();
            partition::check(m.layers as usize, &counts)?;
        }
        if partition == Partition::Even && !m.layers.is_multiple_of(stages) {
            return err(format!(
                "an even partition needs layers ({}) divisible by pp({pp}) * vpp({vpp}) = {stages}; give --pp-layers or let the planner balance the stages",
                m.layers
            ));
        }
        if vpp > 1 && pp == 1 {
            return err(format!(
                "vpp({vpp}) > 1 needs pipeline parallelism (pp > 1)"
            ));
        }
        if vpp > 1 && grad_accum % pp != 0 {
            return err(format!(
                "the interleaved schedule needs micro-batches ({grad_accum}) divisible by pp ({pp})"
            ));
        }
        if sp && tp == 1 {
            return err(
                "sequence parallel splits activations across the tp group, so it needs tp > 1"
                    .into(),
            );
        }
        if zero > 3 {
            return err(format!(
                "ZeRO stage {zero} does not exist; use 0, 1, 2 or 3"
            ));
        }
        if zero >= 2 && pp > 1 {
            return err(format!(
                "ZeRO-{zero} with pp({pp}) > 1: sharded gradients would be reduce-scattered on every micro-batch \
                 of the pipeline (DeepSpeed rejects this too); use ZeRO-1 (the distributed optimizer) with pipelines"
            ));
        }
        if dp * micro_batch * grad_accum != global_batch {
            return err(format!(
                "dp({dp}) * micro-batch({micro_batch}) * grad-accum({grad_accum}) = {}, but the global batch is {global_batch}",
                dp * micro_batch * grad_accum
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::preset;

    #[test]
    fn errors_show_the_arithmetic() {
        let m = preset("llama2-7b").unwrap();
        let req = LayoutRequest {
            dp: Some(2),
            tp: Some(4),
            pp: Some(2),
            ..Default::default()
        };
        let e = req.resolve(&m, 8, 64).unwrap_err().to_string();
        assert!(
            e.contains("dp(2) * tp(4) * pp(2) = 16, but the cluster has 8 GPUs"),
            "{e}"
        );
        let req = LayoutRequest {
            tp: Some(3),
            ..Default::default()
        };
        let e = req.resolve(&m, 6, 64).unwrap_err().to_string();
        assert!(e.contains("heads (32) is not divisible by tp (3)"), "{e}");
        let req = LayoutRequest {
            micro_batch: Some(3),
            ..Default::default()
        };
        let e = req.resolve(&m, 8, 64).unwrap_err().to_string();
        assert!(
            e.contains("not divisible by dp(8) * micro-batch(3) = 24"),
            "{e}"
        );
        let req = LayoutRequest {
            pp: Some(3),
            pp_layers: Some(StageLayers::from_counts(&[10, 10, 10]).unwrap()),
            ..Default::default()
        };
        let e = req.resolve(&m, 3, 63).unwrap_err().to_string();
        assert!(
            e.contains("--pp-layers 10 + 10 + 10 = 30, but the model has 32 layers"),
            "{e}"
        );
        let req = LayoutRequest {
            pp: Some(2),
            pp_layers: Some(StageLayers::from_counts(&[10, 10, 12]).unwrap()),
            ..Default::default()
        };
        let e = req.resolve(&m, 2, 64).unwrap_err().to_string();
        assert!(
            e.contains("--pp-layers lists 3 stages, but pp(2) * vpp(1) = 2"),
            "{e}"
        );
        let req = LayoutRequest {
            grad_accum: Some(3),
            ..Default::default()
        };
        let e = req.resolve(&m, 8, 64).unwrap_err().to_string();
        assert!(e.contains("= 24, but the global batch is 64"), "{e}");
    }

    #[test]
    fn uneven_layer_counts_resolve() {
        // 32 layers on 3 stages: spread 10, 11, 11 until a cost model re-balances them.
        let m = preset("llama2-7b").unwrap();
        let req = LayoutRequest {
            pp: Some(3),
            ..Default::default()
        };
        let l = req.resolve(&m, 3, 63).unwrap();
        assert_eq!(l.stage_layers.as_slice(), &[10, 11, 11]);
        assert_eq!(l.partition, Partition::Balanced);
        let req = LayoutRequest {
            pp: Some(2),
            vpp: Some(2),
            pp_layers: Some(StageLayers::from_counts(&[7, 9, 8, 8]).unwrap()),
            ..Default::default()
        };
        let l = req.resolve(&m, 2, 64).unwrap();
        assert_eq!(l.partition, Partition::Explicit);
        assert_eq!(
            (
                l.stage_layers.device_layers(0, 2),
                l.stage_layers.device_layers(1, 2)
            ),
            (15, 17)
        );
        let even = LayoutRequest {
            pp: Some(4),
            ..Default::default()
        }
        .resolve(&m, 4, 64)
        .unwrap();
        assert_eq!(
            (even.partition, even.stage_layers.as_slice()),
            (Partition::Even, &[8u16, 8, 8, 8][..])
        );
    }

    #[test]
    fn too_few_gpus_for_tp_and_pp_says_so() {
        let m = preset("llama2-7b").unwrap();
        let req = LayoutRequest {
            tp: Some(16),
            ..Default::default()
        };
        let e = req.resolve(&m, 8, 64).unwrap_err().to_string();
        assert!(
            e.contains("tp(16) * pp(1) = 16 needs more GPUs than the cluster's 8"),
            "{e}"
        );
    }

    #[test]
    fn infers_dp_and_accumulation() {
        let m = preset("llama2-7b").unwrap();
        let req = LayoutRequest {
            tp: Some(2),
            micro_batch: Some(2),
            ..Default::default()
        };
        let l = req.resolve(&m, 16, 256).unwrap();
        assert_eq!((l.dp, l.grad_accum), (8, 16));
    }
}
