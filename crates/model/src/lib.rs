//! scaletrain-model: GPT-2 (Radford et al. 2019) on flat `f32` buffers.
//!
//! - [`ModelConfig`] is validated user input; [`Shard`] says which part of the model one process
//!   holds (a pipeline stage's layer range, a tensor-parallel rank).
//! - [`ParamLayout`] maps names to `(offset, shape)` in one flat buffer, **contiguous per
//!   layer** (embeddings, layer 0 … layer L-1, final norm), shared by parameters, gradients and
//!   both AdamW moments.
//! - [`forward`] / [`backward`] run over the shard's layer range, with the embedding on the first
//!   stage and head + loss on the last. Backward accumulates into the gradient buffer.
//! - [`Activations`] (one [`ActSaved`] per micro-batch in flight plus one shared [`ActScratch`])
//!   are allocated once per (micro-batch, sequence) shape; their size is
//!   `plan::cpu_runtime::activation_bytes`, checked by a counting-allocator test.
//!
//! - [`forward_sourced`] / [`backward_sourced`] take the weights from a [`ParamSource`] one
//!   [`Unit`] (embedding, layer, head) at a time, fetched just before use and released after
//!   (how a fully sharded data-parallel rank gathers them); the plain functions are these over
//!   the whole buffer ([`Whole`]).
//!
//! This crate never talks to the network: the tensor-parallel collectives are a [`TpReduce`]
//! argument supplied by the caller ([`NoTp`] for a single rank); a failed one is
//! [`ModelError::TensorParallel`]. Tensor parallelism splits the layers Megatron-style and the
//! tied embedding / LM head / cross-entropy by vocabulary; sequence parallelism
//! ([`Activations::with_sp`]) also splits the norms and residual stream by tokens. See
//! `docs/tensor-parallel.md`.

mod activations;
mod config;
mod error;
mod layer;
mod layout;
mod optim;
mod source;
mod step;

pub use activations::{ActSaved, ActScratch, Activations};
pub use config::{ModelConfig, Shard};
pub use error::ModelError;
pub use kernels::{Bf16, Elem, F16};
pub use layout::{EmbedParams, HeadParams, LayerParams, ParamLayout, ParamTensor, TpSplit};
pub use optim::{update_range as adamw_update_range, AdamW, AdamWConfig};
pub use plan::recipe::{Precision, Recompute};
pub use source::{ParamSource, Unit, Whole};
pub use step::shard_range;
pub use step::{
    backward, backward_into, backward_sourced, backward_with, forward, forward_sourced,
    forward_with, GradInput, GradSink, NoTp, StageInput, TpError, TpReduce,
};
