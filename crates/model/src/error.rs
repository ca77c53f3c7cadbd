//! Errors a user or a file can cause; bugs panic instead.

/// What went wrong with user-supplied configuration or data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A configuration field is out of range; the message shows the arithmetic.
    #[error("invalid model config: {field}: {reason}")]
    Config {
        /// The offending field, e.g. `channels`.
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// A token id is not in the vocabulary.
    #[error("{what}[{index}] = {token} is not below the vocabulary size {vocab}")]
    TokenOutOfRange {
        /// `tokens` or `targets`.
        what: &'static str,
        /// Position in the flat (b*t) array.
        index: usize,
        /// The offending id.
        token: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// An input has the wrong length for the activation shape.
    #[error(
        "{what} has {got} elements, but the activations were built for {expected} (b={b}, t={t})"
    )]
    InputShape {
        /// Which input.
        what: &'static str,
        /// Its length.
        got: usize,
        /// The expected length.
        expected: usize,
        /// Micro-batch size of the activations.
        b: usize,
        /// Sequence length of the activations.
        t: usize,
    },
    /// A tensor-parallel collective failed (the communicator's error is the source).
    #[error("tensor-parallel {op} failed")]
    TensorParallel {
        /// Which collective, and where in the model.
        op: &'static str,
        /// The communicator's error.
        #[source]
        source: crate::TpError,
    },
    /// A [`crate::ParamSource`] could not supply a unit's weights (e.g. a failed all-gather of
    /// a fully sharded rank; the source's error is the source).
    #[error("fetching the weights of {unit:?} failed")]
    Fetch {
        /// The unit asked for.
        unit: crate::Unit,
        /// The source's error.
        #[source]
        source: crate::TpError,
    },
}
