//! The byte layer under every built-in transport: non-blocking reads and writes to a peer, and a
//! bounded wait. Framing, sequence numbers, timeouts and algorithms live above it (`engine`), so the
//! threads, shared-memory and TCP transports share one tested code path.
use std::io;
use std::time::Duration;

/// What went wrong on one link.
#[derive(Debug)]
pub(crate) enum LinkError {
    /// The peer closed its end or its process died.
    Closed { peer: usize, detail: String },
    /// The peer sent an Abort frame before closing: it failed first and says why.
    Aborted { peer: usize, reason: String },
    /// An operating-system error talking to the peer.
    Io { peer: usize, source: io::Error },
    /// Shared state of the link (shared-memory ring counters) holds impossible values.
    Corrupt { peer: usize, detail: String },
}

/// Non-blocking byte pipes to every peer of the world.
pub(crate) trait Link: Send {
    /// This process's world rank.
    fn rank(&self) -> usize;
    /// Number of ranks in the world.
    fn size(&self) -> usize;
    /// Transport name for messages ("threads", "tcp", "shm").
    fn name(&self) -> &'static str;
    /// Write up to `buf.len()` bytes to `peer` without blocking; returns how many were taken.
    fn try_write(&mut self, peer: usize, buf: &[u8]) -> Result<usize, LinkError>;
    /// Read up to `buf.len()` bytes from `peer` without blocking; returns how many arrived.
    fn try_read(&mut self, peer: usize, buf: &mut [u8]) -> Result<usize, LinkError>;
    /// Hand whole f32s readable from `peer` (at most `max_bytes`) to `f` straight from transport
    /// memory and consume them; returns the bytes consumed, or `None` when this transport cannot
    /// (the caller then copies with `try_read`).
    fn read_f32_with(
        &mut self,
        _peer: usize,
        _max_bytes: usize,
        _f: &mut dyn FnMut(&[f32]),
    ) -> Result<Option<usize>, LinkError> {
        Ok(None)
    }
    /// Block for at most `dur` (possibly zero: liveness checks only) until a reader may have data
    /// or a writer may have room. May return early. Reports a peer that is gone: any peer that died, and a peer in `readers`/`writers` that
    /// closed normally (a normal close of an uninvolved peer is not an error while `closing`).
    fn wait(
        &mut self,
        readers: &[usize],
        writers: &[usize],
        dur: Duration,
    ) -> Result<(), LinkError>;
    /// A descriptor that polls readable / writable when `peer`'s link may have moved, so that a
    /// call can sleep in `poll` without holding the engine's lock (`None`: memory rings, which
    /// the engine polls with short sleeps).
    fn raw_fd(&self, _peer: usize) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Enter the final barrier: from now on only involved peers' closes are errors.
    fn set_closing(&mut self);
    /// This rank is failing (`root`: the rank it blames, if any): tell peers by a means that does
    /// not depend on frame boundaries, where the transport has one.
    fn announce_failure(&mut self, _root: Option<usize>) {}
    /// Close our ends so that peers see us gone promptly.
    fn shutdown(&mut self);
}

/// Look through bytes a closed peer left behind (starting at a frame boundary) for its Abort frame.
pub(crate) fn find_abort(mut b: &[u8]) -> Option<String> {
    use crate::frame::{Header, Op, HEADER_BYTES, MAX_PAYLOAD_CEILING};
    while b.len() >= HEADER_BYTES {
        let hdr: &[u8; HEADER_BYTES] = b[..HEADER_BYTES].try_into().ok()?;
        let h = Header::decode(hdr, MAX_PAYLOAD_CEILING).ok()?;
        let end = HEADER_BYTES + h.len as usize;
        if h.op == Op::Abort {
            return Some(String::from_utf8_lossy(&b[HEADER_BYTES..end.min(b.len())]).into_owned());
        }
        b = b.get(end..)?;
    }
    None
}
