//! The one error type of `scaletrain-plan`: everything a user can get wrong in a spec.

/// What is wrong with a model, recipe, hardware or layout specification.
///
/// Every variant names the field and says how to fix it; the CLI prints it as is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A preset name that does not exist.
    #[error("unknown {kind} preset '{name}'; valid presets: {valid}")]
    UnknownPreset {
        /// "model" or "GPU".
        kind: &'static str,
        /// What the user typed.
        name: String,
        /// Comma-separated list of the valid names.
        valid: String,
    },
    /// A field whose value is out of range or malformed.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The flag or key, e.g. `--micro-batch` / `micro_batch`.
        field: &'static str,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A parallel layout whose arithmetic does not work out.
    #[error("invalid layout: {0}")]
    Layout(String),
    /// A Hugging Face `config.json` that cannot be understood.
    #[error("cannot read Hugging Face config: {0}")]
    HfConfig(String),
}

/// Shorthand used across the crate.
pub type Result<T> = std::result::Result<T, PlanError>;

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> PlanError {
    PlanError::Invalid {
        field,
        reason: reason.into(),
    }
}
