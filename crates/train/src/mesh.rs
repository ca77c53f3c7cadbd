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
) -> Result<Layout, TrainError> {
    let req = LayoutRequest {
        micro_batch: Some(micro_batch as u64),
        grad_accum: Some(grad_accum as u64),
        ..*req
    };
    let dp = req.dp.unwrap_or_else(|| {
        let (tp, pp) = (req.tp.unwrap_or(1), req.pp.unwrap_or(1));
        (world as u64 / (tp * pp).max(1)).max(1)
    });
    let global = dp * (micro_batch * grad_accum) as u64;
    req.resolve(&model_spec(cfg), world as u64, global)
        .map_err(|e| TrainError::Layout(e.to_string()))
}

/// The layers of each virtual stage: `counts` when given (`--pp-layers`, one count per virtual
/// stage), else an even split (which needs the stages to divide the layers).
pub fn partition(
    n_layer: usize,
    virtual_stages: usize,
    counts: Option<&[usize]>,
) -> Result<Vec<Range<usize>>, TrainError> {
    let counts: Vec<usize> = match counts {
        Some(c) => {
            let sum: usize = c.iter().sum();
            if c.len() != virtual_stages {
                return Err(TrainError::Layout(format!(
                    "--pp-layers lists {} stages, but pp × vpp = {virtual_stages}",
                    c.len()
                )));
            }
            if let Some(k) = c.iter().position(|&n| n == 0) {
                return Err(TrainError::Layout(format!(
                    "--pp-layers gives stage {k} no layers; every stage needs at least one"
                )));
            }
            if sum != n_layer {
                return Err(TrainError::Layout(format!(
                    "--pp-layers {} sums to {sum}, but the model has {n_layer} layers",
                    c.iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                )));
            }
            c.to_vec()
        }
        None => {
            if n_layer % virtual_stages != 0 {
                return Err(TrainError::Layout(format!(
                    "{n_layer} layers do not split evenly over pp × vpp = {virtual_stages} stages; \
                     give the layers of each stage with --pp-layers (e.g. --pp-layers {})",
                    uneven_example(n_layer, virtual_stages)
                )));
            }
            vec![n_layer / virtual_stages; virtual_stages]
        }
    };
    let mut start = 0;
    Ok(counts
        .iter()
        .map(|&n| {
            start += n;
            start - n..start
        })
        .collect())
}

fn uneven_example(n: usize, k: usize) -> String {
    (0..k)
        .map(|i| (n / k + usize::from(i < n % k)).to_string())
        .collect::<Vec<_>>()
        .join(",")
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
    fn partitions_are_checked_with_the_fix_in_the_message() {
        assert_eq!(partition(4, 2, None).unwrap(), [0..2, 2..4]);
        assert_eq!(partition(5, 2, Some(&[2, 3])).unwrap(), [0..2, 2..5]);
        let e = partition(5, 2, None).unwrap_err().to_string();
        assert!(e.contains("--pp-layers 3,2"), "{e}");
        let e = partition(5, 2, Some(&[2, 2])).unwrap_err().to_string();
        assert!(e.contains("sums to 4"), "{e}");
        let e = partition(5, 2, Some(&[5, 0])).unwrap_err().to_string();
        assert!(e.contains("stage 1 no layers"), "{e}");
        let e = partition(6, 4, Some(&[2, 2, 2])).unwrap_err().to_string();
        assert!(e.contains("lists 3 stages"), "{e}");
    }
}
