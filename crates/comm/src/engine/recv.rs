//! The receive side of the engine: finding a group's next frame (kept, or on the link, keeping
//! other groups' frames aside on the way), checking its header, and moving its payload into the
//! destination (copied, or folded straight out of transport memory where the link allows).
use super::ops::{RecvOp, Source, Target};
use super::{lost_error, Core, Ctx, Kept, Next, RxState, KEEP_CHUNK, KEPT_LIMIT, STAGING_FLOATS};
use crate::error::{CommError, Result};
use crate::frame::{Header, Op, HEADER_BYTES};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

impl Ctx<'_> {
    /// Check a header of this group against what this receive expects next; returns the payload
    /// length.
    fn check_header(&self, core: &mut Core, r: &RecvOp, h: &Header) -> Result<usize> {
        let world_peer = self.ranks[r.peer];
        let max = self.cfg.max_frame_bytes;
        let expect_len = (r.total - r.got).min(max as usize);
        let (op, algo) = (self.op, self.algo);
        let c = core.counters(self.gid);
        let (seq, call) = (c.recv_seq[world_peer], c.call as u32);
        if h.op != op || h.call != call {
            return Err(self.desync(
                world_peer,
                format!(
                    "it is in {} (call {}), this rank is in {} (call {call})",
                    h.op.name(),
                    h.call,
                    op.name()
                ),
            ));
        }
        if h.algo != algo {
            return Err(self.desync(
                world_peer,
                format!(
                    "it uses algorithm {}, this rank uses {}",
                    crate::Algorithm::name_of(h.algo),
                    crate::Algorithm::name_of(algo)
                ),
            ));
        }
        if h.seq != seq {
            return Err(self.desync(
                world_peer,
                format!("frame sequence number {} where {seq} was expected", h.seq),
            ));
        }
        if h.len as usize != expect_len {
            return Err(self.desync(
                world_peer,
                format!(
                    "frame of {} bytes where {expect_len} were expected (message sizes differ)",
                    h.len
                ),
            ));
        }
        core.counters(self.gid).recv_seq[world_peer] += 1;
        Ok(expect_len)
    }

    /// The payload of an Abort frame (best effort, bounded wait).
    fn read_reason(core: &mut Core, peer: usize, len: usize) -> String {
        let mut buf = vec![0u8; len];
        let (mut got, deadline) = (0, Instant::now() + Duration::from_millis(500));
        while got < len && Instant::now() < deadline {
            match core.link.try_read(peer, &mut buf[got..]) {
                Ok(0) => std::thread::sleep(Duration::from_micros(100)),
                Ok(k) => got += k,
                Err(_) => break,
            }
        }
        String::from_utf8_lossy(&buf[..got]).into_owned()
    }

    /// Find the next frame of this group from `world_peer`: a kept one, or the next one on the
    /// link, keeping whole frames of other groups aside on the way. Returns whether bytes moved.
    fn next_frame(&self, core: &mut Core, rid: u64, world_peer: usize) -> Result<(bool, Next)> {
        let mut moved = false;
        loop {
            // Kept frames come before anything still on the link (a frame of this group that
            // another call finished keeping a moment ago included).
            if let Some(k) = core
                .kept
                .get_mut(&(world_peer, self.gid))
                .and_then(VecDeque::pop_front)
            {
                core.kept_bytes -= k.payload.len();
                return Ok((true, Next::Frame(k.hdr, Source::Kept(k.payload, 0))));
            }
            let rx = &mut core.rx[world_peer];
            match &mut rx.state {
                RxState::Owned(_) => return Ok((moved, Next::Busy)),
                RxState::Keeping { hdr, buf } => {
                    let want = hdr.len as usize;
                    if buf.len() < want {
                        let at = buf.len();
                        buf.resize(at + (want - at).min(KEEP_CHUNK), 0);
                        let k = core.link.try_read(world_peer, &mut buf[at..]);
                        buf.truncate(at + *k.as_ref().unwrap_or(&0));
                        let k = k.map_err(|e| self.lost(e))?;
                        if k == 0 {
                            return Ok((moved, Next::Wait));
                        }
                        core.kept_bytes += k;
                        moved = true;
                        continue;
                    }
                    let RxState::Keeping { hdr, buf, .. } =
                        std::mem::replace(&mut rx.state, RxState::Between)
                    else {
                        unreachable!("matched Keeping above")
                    };
                    core.kept
                        .entry((world_peer, hdr.group))
                        .or_default()
                        .push_back(Kept { hdr, payload: buf });
                    moved = true;
                }
                RxState::Between => {
                    if rx.hdr_got < HEADER_BYTES {
                        let k = core
                            .link
                            .try_read(world_peer, &mut rx.hdr[rx.hdr_got..])
                            .map_err(|e| self.lost(e))?;
                        if k == 0 {
                            return Ok((moved, Next::Wait));
                        }
                        rx.hdr_got += k;
                        moved = true;
                        continue;
                    }
                    rx.hdr_got = 0;
                    let max = self.cfg.max_frame_bytes.max(4096);
                    let h = Header::decode(&rx.hdr, max).map_err(|source| CommError::BadFrame {
                        rank: self.world_me,
                        op: self.op.name(),
                        peer: world_peer,
                        source,
                    })?;
                    if h.sender as usize != world_peer {
                        return Err(self
                            .desync(world_peer, format!("frame claims sender rank {}", h.sender)));
                    }
                    if h.op == Op::Abort {
                        let reason = Self::read_reason(core, world_peer, h.len as usize);
                        return Err(CommError::PeerAborted {
                            rank: self.world_me,
                            op: self.op.name(),
                            peer: world_peer,
                            reason,
                        });
                    }
                    if h.group == self.gid {
                        rx.state = RxState::Owned(rid);
                        return Ok((true, Next::Frame(h, Source::Link)));
                    }
                    // Another group's frame: read it whole and keep it for that group.
                    let len = h.len as usize;
                    if core.kept_bytes + len > KEPT_LIMIT {
                        return Err(self.desync(
                            world_peer,
                            format!(
                                "more than {KEPT_LIMIT} bytes of frames for communicators this call \
                                 is not on arrived unread (this one for communicator {:#x}, this \
                                 call is on {:#x})",
                                h.group, self.gid
                            ),
                        ));
                    }
                    rx.state = RxState::Keeping {
                        hdr: h,
                        buf: Vec::new(),
                    };
                    moved = true;
                }
            }
        }
    }

    pub(super) fn progress_recv(&mut self, core: &mut Core, r: &mut RecvOp) -> Result<bool> {
        let mut progressed = false;
        let world_peer = self.ranks[r.peer];
        while !r.done {
            if !r.in_frame {
                let (moved, next) = self.next_frame(core, r.id, world_peer)?;
                progressed |= moved;
                let Next::Frame(h, source) = next else { break };
                r.frame_len = self.check_header(core, r, &h)?;
                if self.first_frame.is_none() {
                    self.first_frame = Some(Instant::now());
                }
                r.frame_got = 0;
                r.in_frame = true;
                r.source = source;
            }
            if r.frame_got < r.frame_len {
                let k = self.read_payload(core, r, world_peer)?;
                if k == 0 {
                    break;
                }
                r.frame_got += k;
                progressed = true;
                continue;
            }
            if matches!(r.source, Source::Link) {
                core.rx[world_peer].state = RxState::Between;
            }
            r.source = Source::Link;
            r.got += r.frame_len;
            r.in_frame = false;
            r.done = r.got == r.total;
            progressed = true;
        }
        Ok(progressed)
    }

    /// Move some payload bytes of the current frame into the destination; returns how many.
    fn read_payload(
        &mut self,
        core: &mut Core,
        r: &mut RecvOp,
        world_peer: usize,
    ) -> Result<usize> {
        let want = r.frame_len - r.frame_got;
        let at = r.got + r.frame_got;
        let (me, op) = (self.world_me, self.op);
        let staging = &mut self.staging;
        let RecvOp {
            target,
            source,
            fill,
            folded,
            ..
        } = r;
        let from_link = matches!(source, Source::Link);
        let mut read = |core: &mut Core, buf: &mut [u8]| -> Result<usize> {
            match source {
                Source::Link => core
                    .link
                    .try_read(world_peer, buf)
                    .map_err(|e| lost_error(me, op, e)),
                Source::Kept(bytes, off) => {
                    let k = buf.len().min(bytes.len() - *off);
                    buf[..k].copy_from_slice(&bytes[*off..*off + k]);
                    *off += k;
                    Ok(k)
                }
            }
        };
        match target {
            Target::Bytes { ptr } => {
                // SAFETY: [at, at+want) lies in the destination; only this op writes it.
                let b = unsafe { std::slice::from_raw_parts_mut(ptr.add(at), want) };
                read(core, b)
            }
            Target::Owned(v) => {
                let b: &mut [u8] = bytemuck::cast_slice_mut(v);
                read(core, &mut b[at..at + want])
            }
            Target::Reduce {
                ptr,
                combine,
                recv_first,
            } => {
                let (dst, c, first) = (*ptr, *combine, *recv_first);
                // SAFETY (both folds): floats [folded, folded + n) lie in the destination,
                // at or above what a chained send may read, and only this op writes them.
                let fold_at = |folded: usize, x: &[f32]| {
                    c.apply(
                        unsafe { std::slice::from_raw_parts_mut(dst.add(folded), x.len()) },
                        x,
                        first,
                    )
                };
                // Fold straight out of transport memory when it allows (shared memory):
                // one pass over the bytes instead of a copy then a fold.
                if *fill == 0 && from_link {
                    let mut fold = |x: &[f32]| {
                        fold_at(*folded, x);
                        *folded += x.len();
                    };
                    let direct = core
                        .link
                        .read_f32_with(world_peer, want, &mut fold)
                        .map_err(|e| lost_error(me, op, e))?;
                    if let Some(k) = direct {
                        return Ok(k);
                    }
                }
                if staging.len() < STAGING_FLOATS {
                    staging.resize(STAGING_FLOATS, 0.0);
                }
                let bytes: &mut [u8] = bytemuck::cast_slice_mut(staging);
                let room = (bytes.len() - *fill).min(want);
                let k = read(core, &mut bytes[*fill..*fill + room])?;
                *fill += k;
                let whole = *fill / 4;
                if whole > 0 {
                    fold_at(*folded, &staging[..whole]);
                    *folded += whole;
                    let bytes: &mut [u8] = bytemuck::cast_slice_mut(staging);
                    bytes.copy_within(whole * 4..*fill, 0);
                    *fill -= whole * 4;
                }
                Ok(k)
            }
        }
    }
}
