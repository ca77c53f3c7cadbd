//! The crate's one error type. Every variant names the rank that saw it and the operation it was in,
//! so a log line from any process says who failed, where, and (when known) because of whom.
use std::io;

/// Errors from communicators, transports and rendezvous.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommError {
    /// No byte moved for the configured timeout while waiting on the listed peers.
    #[error("rank {rank}: {op}: timed out after {secs:.1}s with no progress waiting on rank(s) {peers:?}")]
    Timeout {
        rank: usize,
        op: &'static str,
        peers: Vec<usize>,
        secs: f64,
    },
    /// A peer went away (connection closed or reset, process died).
    #[error("rank {rank}: {op}: peer rank {peer} is gone ({detail})")]
    PeerLost {
        rank: usize,
        op: &'static str,
        peer: usize,
        detail: String,
    },
    /// A peer aborted the job and told us why.
    #[error("rank {rank}: {op}: peer rank {peer} aborted: {reason}")]
    PeerAborted {
        rank: usize,
        op: &'static str,
        peer: usize,
        reason: String,
    },
    /// Two ranks disagree about which operation, size, algorithm or sequence number comes next.
    #[error("rank {rank}: {op}: desynchronised with rank {peer}: {detail}")]
    Desync {
        rank: usize,
        op: &'static str,
        peer: usize,
        detail: String,
    },
    /// Bytes that are not a valid frame arrived.
    #[error("rank {rank}: {op}: bad frame from rank {peer}: {source}")]
    BadFrame {
        rank: usize,
        op: &'static str,
        peer: usize,
        #[source]
        source: crate::frame::FrameError,
    },
    /// State shared with a peer (shared-memory ring counters) holds impossible values: memory
    /// written by something other than this job's ranks, or a bug. Never used as an index.
    #[error("rank {rank}: {op}: the shared-memory link with rank {peer} is corrupt: {detail}")]
    Corrupt {
        rank: usize,
        op: &'static str,
        peer: usize,
        detail: String,
    },
    /// An operating-system error outside any one peer (socket setup, mmap, …).
    #[error("rank {rank}: {op}: {context}: {source}")]
    Io {
        rank: usize,
        op: &'static str,
        context: String,
        #[source]
        source: io::Error,
    },
    /// Joining the job failed (wrong token, wrong world size, duplicate rank, nobody answered, …).
    #[error("rank {rank}: rendezvous: {detail}")]
    Rendezvous { rank: usize, detail: String },
    /// An environment variable is missing or malformed.
    #[error("environment variable {var}: {detail}")]
    Env { var: &'static str, detail: String },
    /// The caller passed something inconsistent (bad root, bad peer, wrong length).
    #[error("rank {rank}: {op}: invalid argument: {detail}")]
    InvalidArgument {
        rank: usize,
        op: &'static str,
        detail: String,
    },
    /// An earlier error broke this communicator; every later call reports it.
    #[error("rank {rank}: {op}: communicator is broken by an earlier error: {first}")]
    Latched {
        rank: usize,
        op: &'static str,
        first: String,
    },
    /// A feature this transport does not provide.
    #[error("rank {rank}: {op}: not supported by the {transport} transport")]
    Unsupported {
        rank: usize,
        op: &'static str,
        transport: &'static str,
    },
}

/// Shorthand for this crate's results.
pub type Result<T, E = CommError> = std::result::Result<T, E>;
