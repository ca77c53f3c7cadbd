//! scaletrain-plan: specifications (model, data, hardware, parallel layout) → parameters, bytes,
//! FLOPs, seconds and dollars, plus the search for the fastest layout that fits.
//!
//! This crate does no I/O and spawns no threads: callers read files and hand over their text, and
//! the search takes a shard index so a caller may split it across threads. Every quantity can be
//! explained (see [`explain`]).

pub mod calibrate;
pub mod cost;
pub mod cpu_calibrate;
pub mod cpu_comm;
pub mod cpu_plan;
pub mod cpu_runtime;
pub mod cpu_time;
pub mod error;
pub mod estimate;
pub mod explain;
pub mod goodput;
pub mod hardware;
pub mod hf_config;
pub mod layout;
pub mod model;
pub mod moe;
pub mod partition;
pub mod recipe;
pub mod schedule;
pub mod search;
pub mod units;
pub mod validation;

pub use cost::{Calibration, Context, Eval};
pub use error::{PlanError, Result};
pub use estimate::{estimate, Estimate};
pub use hardware::{gpu_preset, ClusterSpec, GpuSpec};
pub use layout::{Layout, LayoutRequest};
pub use model::{preset, ModelSpec};
pub use partition::{Partition, StageLayers};
pub use recipe::Recipe;
