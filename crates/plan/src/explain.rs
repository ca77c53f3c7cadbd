//! Explanations: every number the estimator prints can be traced to a formula with its inputs
//! substituted and the source it comes from.
//!
//! The cost model takes `&mut impl Trace`. The planner passes [`NoTrace`], whose `line` never calls
//! the closure, so building strings costs nothing in the search loop; `estimate --explain` passes
//! [`Explain`], which keeps every line.

use serde::Serialize;

/// One explained quantity.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Line {
    /// Section heading: "parameters", "memory", "flops", "time", "cost".
    pub section: &'static str,
    /// What is computed.
    pub quantity: String,
    /// The formula with the numbers substituted.
    pub formula: String,
    /// The result.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
    /// Paper, datasheet or convention it comes from.
    pub source: &'static str,
}

/// A sink for explanation lines.
pub trait Trace {
    /// Records a line; `make` is only called when the sink keeps lines.
    fn line(&mut self, make: impl FnOnce() -> Line);
}

/// Discards everything (the planner's hot path).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoTrace;

impl Trace for NoTrace {
    #[inline(always)]
    fn line(&mut self, _make: impl FnOnce() -> Line) {}
}

/// Keeps every line, in order.
#[derive(Debug, Default, Clone)]
pub struct Explain {
    /// The lines recorded so far.
    pub lines: Vec<Line>,
}

impl Trace for Explain {
    fn line(&mut self, make: impl FnOnce() -> Line) {
        self.lines.push(make());
    }
}

/// Shorthand for building a [`Line`].
pub(crate) fn line(
    section: &'static str,
    quantity: impl Into<String>,
    formula: impl Into<String>,
    value: f64,
    unit: &'static str,
    source: &'static str,
) -> Line {
    Line {
        section,
        quantity: quantity.into(),
        formula: formula.into(),
        value,
        unit,
        source,
    }
}
