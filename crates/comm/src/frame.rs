//! The wire frame: a fixed 40-byte header in front of every payload, on every transport.
//!
//! ```text
//!  offset  size  field
//!  0       4     magic     0x5343_5453 ("STCS" little-endian)
//!  4       2     version   1
//!  6       1     op        which operation sent it (AllReduce, Broadcast, Hello, …)
//!  7       1     algo      which algorithm (0 = not applicable)
//!  8       4     sender    world rank of the sender
//!  12      4     group     communicator id (0 = world, others from split)
//!  16      8     seq       per-(group, sender → receiver) frame counter, starts at 0
//!  24      4     len       payload bytes that follow, ≤ the job's max frame payload
//!  28      4     call      the group's collective-call counter (low 32 bits)
//!  32      4     reserved  must be 0
//!  36      4     check     FNV-1a of bytes 0..36
//! ```
//! A receiver checks every field against what it expects next; the first mismatch becomes a
//! `Desync` or `BadFrame` error instead of a misread buffer or a hang.

/// Header size in bytes.
pub const HEADER_BYTES: usize = 40;
/// Frame magic ("STCS").
pub const MAGIC: u32 = 0x5343_5453;
/// Wire version.
pub const VERSION: u16 = 1;
/// Hard ceiling on any payload length, whatever the configuration says (1 GiB).
pub const MAX_PAYLOAD_CEILING: u32 = 1 << 30;

/// What a frame belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Rendezvous: a process presents its rank and the job token.
    Hello = 1,
    /// Rendezvous: the coordinator's answer (address table).
    Welcome = 2,
    /// Rendezvous: the coordinator refuses (payload says why).
    Reject = 3,
    /// A peer is aborting the job (payload says why).
    Abort = 4,
    /// Rendezvous: a listener's nonce and its proof of the job token.
    Challenge = 5,
    /// Rendezvous: a connector's proof of the job token.
    Proof = 6,
    /// `all_reduce`.
    AllReduce = 10,
    /// `reduce_scatter`.
    ReduceScatter = 11,
    /// `all_gather`.
    AllGather = 12,
    /// `broadcast`.
    Broadcast = 13,
    /// `barrier`.
    Barrier = 14,
    /// Point-to-point `send`/`recv`.
    P2p = 15,
    /// `split`.
    Split = 16,
    /// Parameter server: a worker pushes a gradient shard.
    PsPush = 20,
    /// Parameter server: a server returns a shard.
    PsPull = 21,
}

impl Op {
    /// Decode an op byte.
    pub fn from_u8(b: u8) -> Option<Op> {
        Some(match b {
            1 => Op::Hello,
            2 => Op::Welcome,
            3 => Op::Reject,
            4 => Op::Abort,
            5 => Op::Challenge,
            6 => Op::Proof,
            10 => Op::AllReduce,
            11 => Op::ReduceScatter,
            12 => Op::AllGather,
            13 => Op::Broadcast,
            14 => Op::Barrier,
            15 => Op::P2p,
            16 => Op::Split,
            20 => Op::PsPush,
            21 => Op::PsPull,
            _ => return None,
        })
    }

    /// The user-facing name, used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Op::Hello => "hello",
            Op::Welcome => "welcome",
            Op::Reject => "reject",
            Op::Abort => "abort",
            Op::Challenge => "challenge",
            Op::Proof => "proof",
            Op::AllReduce => "all_reduce",
            Op::ReduceScatter => "reduce_scatter",
            Op::AllGather => "all_gather",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
            Op::P2p => "send/recv",
            Op::Split => "split",
            Op::PsPush => "ps_push",
            Op::PsPull => "ps_pull",
        }
    }
}

/// A decoded, checksum-verified header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Operation.
    pub op: Op,
    /// Algorithm code (0 = not applicable).
    pub algo: u8,
    /// Sender's world rank.
    pub sender: u32,
    /// Communicator id.
    pub group: u32,
    /// Per-link frame sequence number.
    pub seq: u64,
    /// Payload length in bytes.
    pub len: u32,
    /// Collective-call counter (low 32 bits).
    pub call: u32,
}

/// Why bytes were not accepted as a header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The first four bytes are not the magic.
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    /// A version this build does not speak.
    #[error("unsupported wire version {0}")]
    BadVersion(u16),
    /// The header checksum does not match.
    #[error("header checksum mismatch")]
    BadChecksum,
    /// The reserved word is not zero.
    #[error("reserved header bytes are not zero")]
    Reserved,
    /// Unknown operation byte.
    #[error("unknown op {0}")]
    UnknownOp(u8),
    /// Payload longer than the job allows.
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    TooLong { len: u32, max: u32 },
}

fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in bytes {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

impl Header {
    /// Serialise into the 40-byte wire form.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6] = self.op as u8;
        b[7] = self.algo;
        b[8..12].copy_from_slice(&self.sender.to_le_bytes());
        b[12..16].copy_from_slice(&self.group.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..32].copy_from_slice(&self.call.to_le_bytes());
        let check = fnv1a(&b[0..36]);
        b[36..40].copy_from_slice(&check.to_le_bytes());
        b
    }

    /// Parse and verify 40 bytes; `max_len` bounds the payload length.
    pub fn decode(b: &[u8; HEADER_BYTES], max_len: u32) -> Result<Header, FrameError> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if fnv1a(&b[0..36]) != u32_at(36) {
            return Err(FrameError::BadChecksum);
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(FrameError::BadVersion(version));
        }
        if u32_at(32) != 0 {
            return Err(FrameError::Reserved);
        }
        let op = Op::from_u8(b[6]).ok_or(FrameError::UnknownOp(b[6]))?;
        let len = u32_at(24);
        let max = max_len.min(MAX_PAYLOAD_CEILING);
        if len > max {
            return Err(FrameError::TooLong { len, max });
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[16..24]);
        Ok(Header {
            op,
            algo: b[7],
            sender: u32_at(8),
            group: u32_at(12),
            seq: u64::from_le_bytes(seq),
            len,
            call: u32_at(28),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: a tiny deterministic generator so the property test needs no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    fn sample(rng: &mut Rng) -> Header {
        let ops = [
            Op::Hello,
            Op::AllReduce,
            Op::Broadcast,
            Op::P2p,
            Op::PsPush,
            Op::Abort,
        ];
        Header {
            op: ops[(rng.next() % ops.len() as u64) as usize],
            algo: rng.next() as u8,
            sender: rng.next() as u32,
            group: rng.next() as u32,
            seq: rng.next(),
            len: (rng.next() % (1 << 20)) as u32,
            call: rng.next() as u32,
        }
    }

    #[test]
    fn valid_headers_round_trip() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..10_000 {
            let h = sample(&mut rng);
            assert_eq!(Header::decode(&h.encode(), 1 << 20), Ok(h));
        }
    }

    #[test]
    fn random_bytes_are_rejected() {
        let mut rng = Rng(42);
        for _ in 0..200_000 {
            let mut b = [0u8; HEADER_BYTES];
            for x in b.iter_mut() {
                *x = rng.next() as u8;
            }
            // Half the time, plant the magic so the checksum and field checks are exercised too.
            if rng.next().is_multiple_of(2) {
                b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
            }
            assert!(
                Header::decode(&b, u32::MAX).is_err(),
                "accepted random header {b:?}"
            );
        }
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let mut rng = Rng(7);
        for _ in 0..200 {
            let good = sample(&mut rng).encode();
            for bit in 0..HEADER_BYTES * 8 {
                let mut b = good;
                b[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    Header::decode(&b, u32::MAX).is_err(),
                    "bit {bit} flip accepted"
                );
            }
        }
    }

    #[test]
    fn length_bound_is_enforced() {
        let h = Header {
            op: Op::AllReduce,
            algo: 1,
            sender: 0,
            group: 0,
            seq: 0,
            len: 4097,
            call: 0,
        };
        assert_eq!(
            Header::decode(&h.encode(), 4096),
            Err(FrameError::TooLong {
                len: 4097,
                max: 4096
            })
        );
        assert!(Header::decode(&h.encode(), 4097).is_ok());
    }
}
