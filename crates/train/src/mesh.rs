//! The mesh: where one rank sits in a (dp, pp, tp) layout, what part of the model it holds and
//! which ranks it talks to.
//!
//! The layout is `plan`'s [`Layout`], validated once by `plan` ([`resolve`]); the runtime adds
//! nothing to that check but what only it knows (the layers of each pipeline stage).
//!
//! Axis order, as Megatron-LM's `initialize_model_parallel` numbers ranks (its default order
//! `tp-dp-pp`): tensor-parallel ranks are adjacent, data-parallel next, pipeline stages
//! outermost:
//!
//! ```text
//! world rank = (pp · dp_size + dp) · tp_size + tp
//!
//! 8 ranks, dp 2 × pp 2 × tp 2:   tp groups [0 1] [2 3] [4 5] [6 7]
//!                                dp groups [0 2] [1 3] [4 6] [5 7]
//!                                pp groups [0 4] [1 5] [2 6] [3 7]   (stage 0 → stage 1)
//! ```
//!
//! A rank's pipeline stage holds `vpp` model chunks (interleaved 1F1B): chunk `c` of stage `s`
//! is virtual stage `c·pp + s` (Narayanan et al. 2021, §2.2.2), and virtual stage `k` holds the
//! `k`-th range of layers of the partition; the first holds the embedding, the last the final
//! norm, the LM head (a copy of the tied embedding when it is not also the first) and the loss.

use crate::error::TrainError;
use model::{ModelConfig, Shard};
use plan::layout::{Layout, LayoutRequest};
use std::ops::Range;

/// The degrees of a layout, as the runtime uses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshShape {
    /// Data-parallel degree.
    pub dp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Tensor-parallel degree.
    pub tp: usize,
    /// Model chunks per pipeline stage (virtual stages; 1 = no interleaving).
    pub vpp: usize,
}

/// One rank's coordinates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coords {
    /// Data-parallel index.
    pub dp: usize,
    /// Pipeline stage.
    pub pp: usize,
    /// Tensor-parallel index.
    pub tp: usize,
}

impl MeshShape {
    /// One process: every degree 1.
    pub const SINGLE: MeshShape = MeshShape {
        dp: 1,
        pp: 1,
        tp: 1,
        vpp: 1,
    };

    /// The degrees of a validated layout.
    pub fn from_layout(l: &Layout) -> MeshShape {
        MeshShape {
            dp: l.dp as usize,
            pp: l.pp as usize,
            tp: l.tp as usize,
            vpp: l.vpp as usize,
        }
    }

    /// Ranks in the mesh.
    pub fn world(&self) -> usize {
        self.dp * self.pp * self.tp
    }

    /// Virtual pipeline stages (`pp · vpp`).
    pub fn virtual_stages(&self) -> usize {
        self.pp * self.vpp
    }

    /// The coordinates of world rank `rank` (see the module docs for the order).
    pub fn coords(&self, rank: usize) -> Coords {
        assert!(rank < self.world(), "rank {rank} outside the mesh");
        Coords {
            tp: rank % self.tp,
            dp: (rank / self.tp) % self.dp,
            pp: rank / (self.tp * self.dp),
        }
    }

    /// The world rank at `c`.
    pub fn rank(&self, c: Coords) -> usize {
        (c.pp * self.dp + c.dp) * self.tp + c.tp
    }
}

/// The runtime's GPT-2 as `plan` describes models (for the layout check).
pub fn model_spec(cfg: &ModelConfig) -> plan::model::ModelSpec {
    use plan::model::{Bias, Mlp, ModelSpec, Norm};
    let c = cfg.channels as u64;
    ModelSpec {
        name: "scaletrain GPT-2".into(),
        layers: cfg.n_layer as u64,
        hidden: c,
        heads: cfg.n_head as u64,
        kv_heads: cfg.n_head as u64,
        ffn_hidden: 4 * c,
        vocab: cfg.padded_vocab() as u64,
        seq_len: cfg.max_seq_len as u64,
        learned_positions: cfg.max_seq_len as u64,
        tied_embeddings: true,
        mlp: Mlp::Gelu,
        norm: Norm::LayerNorm,
        bias: Bias::All,
        head_dim: None,
        qk_norm: false,
        moe: None,
    }
}

/// Checks a requested layout for `world` processes training `cfg` with micro-batches of
/// `micro_batch` sequences and `grad_accum` of them per step and data-parallel rank — with
/// `plan`'s one layout check, whose errors show the arithmetic.
pub fn resolve(
    cfg: &ModelConfig,
    req: &LayoutRequest,
    world: usize,
    micro_batch: usize,
    grad_accum: usize,
    parts: &[Range<usize>],
) -> Result<Layout, TrainError> {
    let counts: Vec<usize> = parts.iter().map(|r| r.len()).collect();
    let req = LayoutRequest {
        micro_batch: Some(micro_batch as u64),
        grad_accum: Some(grad_accum as u64),
        pp_layers: Some(
            plan::partition::StageLayers::from_counts(&counts)
                .map_err(|e| TrainError::Layout(plan_reason(&e)))?,
        ),
        ..*req
    };
    let dp = req.dp.unwrap_or_else(|| {
        let (tp, pp) = (req.tp.unwrap_or(1), req.pp.unwrap_or(1));
        (world as u64 / (tp * pp).max(1)).max(1)
    });
    let global = dp * (micro_batch * grad_accum) as u64;
    req.resolve(&model_spec(cfg), world as u64, global)
        .map_err(|e| TrainError::Layout(plan_reason(&e)))
}

/// The layers of each virtual stage: `counts` when given (`--pp-layers`, one count per virtual
/// stage, checked by `plan::partition::check`), else `plan::partition::balanced` over this
/// model's costs — per layer and for the LM head + loss on the last stage, the matmul FLOPs of
/// `plan::cpu_time`'s model (forward + backward, 3× the forward's; the embedding's gather is
/// free) — which is the even split whenever the stages divide the layers.
pub fn partition(
    cfg: &ModelConfig,
    (b, t): (usize, usize),
    virtual_stages: usize,
    counts: Option<&[usize]>,
) -> Result<Vec<Range<usize>>, TrainError> {
    let n_layer = cfg.n_layer;
    let counts: Vec<usize> = match counts {
        Some(c) => {
            if c.len() != virtual_stages {
                return Err(TrainError::Layout(format!(
                    "--pp-layers lists {} stages, but pp × vpp = {virtual_stages}",
                    c.len()
                )));
            }
            plan::partition::check(n_layer, c).map_err(|e| TrainError::Layout(plan_reason(&e)))?;
            c.to_vec()
        }
        None => {
            let (c, vp) = (cfg.channels as f64, cfg.padded_vocab() as f64);
            let (b, t) = (b as f64, t as f64);
            let layer = 3.0 * 24.0 * b * t * c * c + 12.0 * b * t * t * c;
            let head = 3.0 * 2.0 * b * t * c * vp;
            plan::partition::balanced(virtual_stages, &vec![layer; n_layer], 0.0, head)
        }
    };
    if let Some(k) = counts.iter().position(|&n| n == 0) {
        return Err(TrainError::Layout(format!(
            "pipeline stage {k} would hold no layers ({n_layer} layers over {virtual_stages} stages); \
             use fewer stages"
        )));
    }
    let mut start = 0;
    Ok(counts
        .iter()
        .map(|&n| {
            start += n;
            start - n..start
        })
        .collect())
}

/// A layout error's reason without `plan`'s own "layout:" prefix (ours adds it).
fn plan_reason(e: &plan::PlanError) -> String {
    match e {
        plan::PlanError::Layout(reason) => reason.clone(),
        other => other.to_string(),
    }
}

/// The shard of virtual stage `k` of `parts` (tensor-parallel rank `tp_rank` of `tp`).
pub fn shard_of(parts: &[Range<usize>], k: usize, tp_rank: usize, tp: usize) -> Shard {
    Shard {
        layers: parts[k].clone(),
        has_embedding: k == 0,
        has_head: k + 1 == parts.len(),
        tp_rank,
        tp_size: tp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinates_follow_megatrons_order() {
        let m = MeshShape {
            dp: 2,
            pp: 2,
            tp: 2,
            vpp: 1,
        };
        let groups = |f: &dyn Fn(Coords) -> (usize, usize)| {
            let mut g: Vec<Vec<usize>> = Vec::new();
            let mut keys: Vec<(usize, usize)> = Vec::new();
            for r in 0..m.world() {
                let k = f(m.coords(r));
                match keys.iter().position(|&x| x == k) {
                    Some(i) => g[i].push(r),
                    None => {
                        keys.push(k);
                        g.push(vec![r]);
                    }
                }
            }
            g
        };
        assert_eq!(groups(&|c| (c.dp, c.pp)), [[0, 1], [2, 3], [4, 5], [6, 7]]);
        assert_eq!(groups(&|c| (c.pp, c.tp)), [[0, 2], [1, 3], [4, 6], [5, 7]]);
        assert_eq!(groups(&|c| (c.dp, c.tp)), [[0, 4], [1, 5], [2, 6], [3, 7]]);
        for r in 0..8 {
            assert_eq!(m.rank(m.coords(r)), r);
        }
    }

    #[test]
    fn partitions_are_checked_and_balanced_by_plan() {
        let cfg = |n_layer| ModelConfig {
            vocab_size: 64,
            max_seq_len: 16,
            n_layer,
            n_head: 2,
            channels: 32,
        };
        assert_eq!(partition(&cfg(4), (2, 16), 2, None).unwrap(), [0..2, 2..4]);
        assert_eq!(
            partition(&cfg(5), (2, 16), 2, Some(&[2, 3])).unwrap(),
            [0..2, 2..5]
        );
        // Uneven: the last stage also runs the LM head, so it gets the fewer layers.
        assert_eq!(partition(&cfg(5), (2, 16), 2, None).unwrap(), [0..3, 3..5]);
        let e = partition(&cfg(5), (2, 16), 2, Some(&[2, 2]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--pp-layers"), "{e}");
        let e = partition(&cfg(6), (2, 16), 4, Some(&[2, 2, 2]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lists 3 stages"), "{e}");
        let e = partition(&cfg(2), (2, 16), 3, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no layers"), "{e}");
    }
}
