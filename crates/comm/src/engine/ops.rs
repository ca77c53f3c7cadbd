//! The transfers an engine call drives: [`SendOp`] (bytes out to one peer, cut into frames) and
//! [`RecvOp`] (frames in from one peer, copied or folded into a destination), and how received
//! floats are folded ([`Combine`]). They hold their progress; the engine (`mod.rs`) moves bytes.
use crate::frame::HEADER_BYTES;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

/// A process-wide unique id per transfer: which transfer owns a half-written or half-read frame
/// of a link (several groups' transfers may take turns on one link, a frame at a time).
fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// How a received f32 stream is folded into the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Combine {
    /// `a + b`.
    Sum,
    /// `if b > a { b } else { a }` (see [`crate::reference::max_of`]).
    Max,
    /// Bitwise OR of the f32 bit patterns: exact assembly of disjoint pieces over zeros.
    BitOr,
}

impl Combine {
    /// `dst[i] = first ⊕ second` where (first, second) is (recv, dst) or (dst, recv).
    #[inline]
    #[allow(clippy::assign_op_pattern)] // `*r + *d` spells out the documented operand order
    pub(crate) fn apply(self, dst: &mut [f32], recv: &[f32], recv_first: bool) {
        debug_assert_eq!(dst.len(), recv.len());
        match (self, recv_first) {
            (Combine::Sum, true) => dst.iter_mut().zip(recv).for_each(|(d, r)| *d = *r + *d),
            (Combine::Sum, false) => dst.iter_mut().zip(recv).for_each(|(d, r)| *d += *r),
            (Combine::Max, true) => dst
                .iter_mut()
                .zip(recv)
                .for_each(|(d, r)| *d = crate::reference::max_of(*r, *d)),
            (Combine::Max, false) => dst
                .iter_mut()
                .zip(recv)
                .for_each(|(d, r)| *d = crate::reference::max_of(*d, *r)),
            (Combine::BitOr, _) => dst
                .iter_mut()
                .zip(recv)
                .for_each(|(d, r)| *d = f32::from_bits(d.to_bits() | r.to_bits())),
        }
    }
}

/// One outgoing transfer to group rank `peer`, cut into frames of at most `max_frame_bytes`.
///
/// The bytes are held as a pointer so that a chained transfer (see `Ctx::exchange_chain`) can send
/// the prefix of a chunk that an earlier receive of the same call has finished writing, while that
/// receive still writes the rest: the two never touch the same bytes (`avail` ≤ bytes completed).
pub(crate) struct SendOp<'a> {
    pub(super) id: u64,
    pub(super) peer: usize,
    pub(super) ptr: *const u8,
    pub(super) len: usize,
    /// Bytes that may be sent so far (`len` unless chained).
    pub(super) avail: usize,
    pub(super) sent: usize,
    pub(super) hdr: [u8; HEADER_BYTES],
    pub(super) hdr_off: usize,
    pub(super) frame_len: usize,
    pub(super) frame_off: usize,
    pub(super) in_frame: bool,
    pub(super) done: bool,
    _data: PhantomData<&'a [u8]>,
}

impl SendOp<'_> {
    /// Whether the link is what holds this send back (not bytes still to be received).
    pub(super) fn can_write(&self) -> bool {
        !self.in_frame || self.hdr_off < HEADER_BYTES || self.sent + self.frame_off < self.avail
    }
}

impl<'a> SendOp<'a> {
    pub(crate) fn new(peer: usize, data: &'a [u8]) -> Self {
        // SAFETY: the whole slice is readable for 'a.
        unsafe { Self::raw(peer, data.as_ptr(), data.len(), data.len()) }
    }

    /// # Safety
    /// `ptr..ptr+len` must stay allocated for 'a, and bytes below `avail` (as raised by the chain)
    /// must not be written while this operation lives.
    pub(crate) unsafe fn raw(peer: usize, ptr: *const u8, len: usize, avail: usize) -> Self {
        SendOp {
            id: next_id(),
            peer,
            ptr,
            len,
            avail,
            sent: 0,
            hdr: [0; HEADER_BYTES],
            hdr_off: 0,
            frame_len: 0,
            frame_off: 0,
            in_frame: false,
            done: false,
            _data: PhantomData,
        }
    }
}

/// Where received bytes go.
pub(crate) enum Dest<'a> {
    /// Copied as they are.
    Bytes(&'a mut [u8]),
    /// Copied into a buffer the operation owns (parameter-server queues).
    Owned(Vec<f32>),
    /// Folded into these floats; `recv_first` puts the received value on the left of the operator.
    Reduce {
        dst: &'a mut [f32],
        combine: Combine,
        recv_first: bool,
    },
}

/// A destination as pointers: only the range being written is ever turned into a slice.
pub(super) enum Target {
    Bytes {
        ptr: *mut u8,
    },
    Owned(Vec<f32>),
    Reduce {
        ptr: *mut f32,
        combine: Combine,
        recv_first: bool,
    },
}

/// Where the payload of the frame being received comes from.
pub(super) enum Source {
    /// Straight from the link (this transfer owns the link's read side until the frame ends).
    Link,
    /// A frame that another call read off the link first and kept for this group: bytes, read offset.
    Kept(Vec<u8>, usize),
}

/// One incoming transfer from group rank `peer`.
pub(crate) struct RecvOp<'a> {
    pub(super) id: u64,
    pub(super) peer: usize,
    pub(super) target: Target,
    pub(super) total: usize,
    pub(super) got: usize,
    pub(super) frame_len: usize,
    pub(super) frame_got: usize,
    pub(super) in_frame: bool,
    pub(super) source: Source,
    pub(super) done: bool,
    /// Bytes held in the staging buffer (Reduce only), and floats already folded into `dst`.
    pub(super) fill: usize,
    pub(super) folded: usize,
    _dest: PhantomData<&'a mut [u8]>,
}

impl RecvOp<'_> {
    /// The buffer of a completed `Dest::Owned` transfer.
    pub(crate) fn take_owned(&mut self) -> Vec<f32> {
        match &mut self.target {
            Target::Owned(v) => std::mem::take(v),
            _ => Vec::new(),
        }
    }

    /// Bytes of the destination that hold their final value (copied, or folded).
    pub(super) fn completed(&self) -> usize {
        match self.target {
            Target::Reduce { .. } => self.folded * 4,
            _ => self.got + if self.in_frame { self.frame_got } else { 0 },
        }
    }
}

impl<'a> RecvOp<'a> {
    pub(crate) fn new(peer: usize, dest: Dest<'a>) -> Self {
        let (target, total) = match dest {
            Dest::Bytes(b) => (
                Target::Bytes {
                    ptr: b.as_mut_ptr(),
                },
                b.len(),
            ),
            Dest::Owned(v) => {
                let n = v.len() * 4;
                (Target::Owned(v), n)
            }
            Dest::Reduce {
                dst,
                combine,
                recv_first,
            } => (
                Target::Reduce {
                    ptr: dst.as_mut_ptr(),
                    combine,
                    recv_first,
                },
                dst.len() * 4,
            ),
        };
        // SAFETY: built from a borrow that lives for 'a.
        unsafe { Self::with_target(peer, target, total) }
    }

    /// A receive folding into `len` floats at `ptr`.
    ///
    /// # Safety
    /// The floats must stay allocated for 'a and be written by nothing else while this lives,
    /// except that a chained send may read the prefix this operation has completed.
    pub(crate) unsafe fn raw_reduce(
        peer: usize,
        ptr: *mut f32,
        len: usize,
        combine: Combine,
        recv_first: bool,
    ) -> Self {
        Self::with_target(
            peer,
            Target::Reduce {
                ptr,
                combine,
                recv_first,
            },
            len * 4,
        )
    }

    /// A receive copying `len` bytes to `ptr` (same contract as `raw_reduce`).
    pub(crate) unsafe fn raw_bytes(peer: usize, ptr: *mut u8, len: usize) -> Self {
        Self::with_target(peer, Target::Bytes { ptr }, len)
    }

    unsafe fn with_target(peer: usize, target: Target, total: usize) -> Self {
        RecvOp {
            id: next_id(),
            peer,
            target,
            total,
            got: 0,
            frame_len: 0,
            frame_got: 0,
            in_frame: false,
            source: Source::Link,
            done: false,
            fill: 0,
            folded: 0,
            _dest: PhantomData,
        }
    }
}
