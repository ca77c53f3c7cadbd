//! Model configuration and the shard one process holds.

use crate::ModelError;
use std::ops::Range;

/// GPT-2 hyper-parameters. All fields required; validate with [`ModelConfig::validate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelConfig {
    /// Real vocabulary size `v` (e.g. 50257). The runtime pads it to a multiple of 64.
    pub vocab_size: usize,
    /// Maximum sequence length (rows of the learned position embedding).
    pub max_seq_len: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Number of attention heads; must divide `channels`.
    pub n_head: usize,
    /// Model width `c`.
    pub channels: usize,
}

impl ModelConfig {
    /// Checks every field; errors name the field and show the arithmetic.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |field, reason: String| Err(ModelError::Config { field, reason });
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("max_seq_len", self.max_seq_len),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("channels", self.channels),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if self.vocab_size > u32::MAX as usize {
            return bad(
                "vocab_size",
                format!("{} does not fit token ids (u32)", self.vocab_size),
            );
        }
        if !self.channels.is_multiple_of(self.n_head) {
            return bad(
                "n_head",
                format!(
                    "channels ({}) % n_head ({}) = {}, must be 0",
                    self.channels,
                    self.n_head,
                    self.channels % self.n_head
                ),
            );
        }
        Ok(())
    }

    /// Vocabulary padded to a multiple of 64 (`vp`), so the LM-head matmul is friendly.
    pub fn padded_vocab(&self) -> usize {
        plan::cpu_runtime::padded_vocab(self.vocab_size as u64) as usize
    }
}

/// Which part of the model one process holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    /// Transformer layers held (a pipeline stage); `0..n_layer` for the whole model.
    pub layers: Range<usize>,
    /// Holds the embeddings and runs the encoder (first stage).
    pub has_embedding: bool,
    /// Holds the final norm and tied LM head and computes the loss (last stage).
    pub has_head: bool,
    /// Tensor-parallel rank, `0..tp_size`.
    pub tp_rank: usize,
    /// Tensor-parallel degree; must divide `n_head`.
    pub tp_size: usize,
}

impl Shard {
    /// The whole model on one process.
    pub fn full(cfg: &ModelConfig) -> Shard {
        Shard {
            layers: 0..cfg.n_layer,
            has_embedding: true,
            has_head: true,
            tp_rank: 0,
            tp_size: 1,
        }
    }

    /// Checks the shard against the config; errors name the field.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<(), ModelError> {
        let bad = |field, reason: String| Err(ModelError::Config { field, reason });
        if self.layers.start > self.layers.end || self.layers.end > cfg.n_layer {
            return bad(
                "layers",
                format!(
                    "{:?} is not inside 0..{} (n_layer)",
                    self.layers, cfg.n_layer
                ),
            );
        }
        if self.tp_size == 0 || !cfg.n_head.is_multiple_of(self.tp_size) {
            return bad(
                "tp_size",
                format!(
                    "n_head ({}) must be a multiple of tp_size ({})",
                    cfg.n_head, self.tp_size
                ),
            );
        }
        if self.tp_rank >= self.tp_size {
            return bad(
                "tp_rank",
                format!("{} >= tp_size ({})", self.tp_rank, self.tp_size),
            );
        }
        Ok(())
    }

    /// The plan crate's view of this shard (for memory formulas).
    pub fn dims(&self, cfg: &ModelConfig) -> plan::cpu_runtime::CpuRuntimeDims {
        plan::cpu_runtime::CpuRuntimeDims {
            padded_vocab: cfg.padded_vocab() as u64,
            max_seq_len: cfg.max_seq_len as u64,
            channels: cfg.channels as u64,
            heads: cfg.n_head as u64,
            layers: self.layers.len() as u64,
            has_embedding: self.has_embedding,
            has_head: self.has_head,
            tp: self.tp_size as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let cfg = ModelConfig {
            vocab_size: 100,
            max_seq_len: 8,
            n_layer: 2,
            n_head: 3,
            channels: 8,
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("n_head") && err.contains("channels (8) % n_head (3) = 2"),
            "{err}"
        );
        let cfg = ModelConfig { n_head: 4, ..cfg };
        cfg.validate().unwrap();
        let shard = Shard {
            tp_size: 3,
            ..Shard::full(&cfg)
        };
        let err = shard.validate(&cfg).unwrap_err().to_string();
        assert!(err.contains("tp_size"), "{err}");
        let shard = Shard {
            layers: 1..5,
            ..Shard::full(&cfg)
        };
        assert!(shard
            .validate(&cfg)
            .unwrap_err()
            .to_string()
            .contains("layers"));
    }
}
