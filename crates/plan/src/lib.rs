//! scaletrain-plan: specs → parameters, bytes, FLOPs, seconds, dollars. No I/O.
pub mod cpu_runtime;
