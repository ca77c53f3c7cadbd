//! The TCP [`Link`]: reads and writes on the job's non-blocking sockets, waiting with `poll`,
//! and what a lost connection says about the peer.
use crate::link::{Link, LinkError};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// The TCP [`Link`]: one non-blocking socket per peer.
pub(super) struct TcpLink {
    pub(super) rank: usize,
    pub(super) streams: Vec<Option<TcpStream>>,
    pub(super) closing: bool,
}

fn classify(peer: usize, e: io::Error) -> LinkError {
    match e.kind() {
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::UnexpectedEof => LinkError::Closed {
            peer,
            detail: format!("connection lost: {e}"),
        },
        _ => LinkError::Io { peer, source: e },
    }
}

impl TcpLink {
    fn stream(&mut self, peer: usize) -> Result<&mut TcpStream, LinkError> {
        self.streams
            .get_mut(peer)
            .and_then(Option::as_mut)
            .ok_or_else(|| LinkError::Closed {
                peer,
                detail: "no connection".into(),
            })
    }
}

impl TcpLink {
    /// `peer` is gone: find out whether it died, or left because another peer died first (then
    /// it sent an Abort frame, and a peer that hung up without one is the root cause).
    fn explain(&mut self, peer: usize, detail: String) -> LinkError {
        let mut fds: Vec<(usize, libc::pollfd)> = Vec::new();
        for (q, s) in self.streams.iter().enumerate() {
            if let (Some(s), true) = (s, q != peer) {
                fds.push((
                    q,
                    libc::pollfd {
                        fd: s.as_raw_fd(),
                        events: libc::POLLRDHUP,
                        revents: 0,
                    },
                ));
            }
        }
        // The peer that died closed all its connections at once; the ones that left because of it
        // did so later and, where they could, with an Abort frame. Give a death elsewhere a short
        // moment to show before blaming `peer` (this path only runs on failure).
        let grace = Instant::now() + Duration::from_millis(100);
        let mut seen = vec![false; fds.len()];
        loop {
            let mut raw: Vec<libc::pollfd> = fds.iter().map(|x| x.1).collect();
            // SAFETY: valid pollfd array; zero timeout.
            let rc = unsafe { libc::poll(raw.as_mut_ptr(), raw.len() as libc::nfds_t, 0) };
            if rc > 0 {
                for (i, fd) in raw.iter().enumerate() {
                    if !seen[i]
                        && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
                    {
                        let q = fds[i].0;
                        if self.how_left(q).is_none() {
                            return LinkError::Closed {
                                peer: q,
                                detail: "connection closed without a word".into(),
                            };
                        }
                        seen[i] = true; // it left with an Abort frame: not the root cause
                    }
                }
            }
            if Instant::now() >= grace {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        match self.how_left(peer) {
            Some(reason) => LinkError::Aborted { peer, reason },
            None => LinkError::Closed { peer, detail },
        }
    }

    fn raw_read(&mut self, peer: usize, buf: &mut [u8]) -> Result<usize, LinkError> {
        if buf.is_empty() {
            return Ok(0);
        }
        match self.stream(peer)?.read(buf) {
            Ok(0) => Err(LinkError::Closed {
                peer,
                detail: "connection closed".into(),
            }),
            Ok(k) => Ok(k),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(0)
            }
            Err(e) => Err(classify(peer, e)),
        }
    }

    /// Why a hung-up peer left: `None` if it said nothing (it died), else what it said: the reason
    /// in its Abort frame, or the root cause in its out-of-band mark (see `announce_failure`).
    fn how_left(&mut self, q: usize) -> Option<String> {
        let mark = self.oob_mark(q);
        if let Some(reason) = crate::link::find_abort(&self.drain(q)) {
            return Some(reason);
        }
        mark.map(|root| match root {
            Some(r) => format!("it gave up because peer rank {r} is gone"),
            None => "it gave up after an error".into(),
        })
    }

    /// The out-of-band byte a failing peer sends before closing: `Some(root)` if present.
    fn oob_mark(&mut self, q: usize) -> Option<Option<usize>> {
        let s = self.streams.get(q)?.as_ref()?;
        let mut b = [0u8; 1];
        // SAFETY: reading at most one byte into a live buffer from our own socket.
        let n = unsafe {
            libc::recv(
                s.as_raw_fd(),
                b.as_mut_ptr() as *mut libc::c_void,
                1,
                libc::MSG_OOB | libc::MSG_DONTWAIT,
            )
        };
        (n == 1).then(|| (b[0] > 0 && b[0] < 255).then(|| b[0] as usize - 1))
    }

    /// Everything a hung-up peer left unread (bounded).
    fn drain(&mut self, peer: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut chunk = vec![0u8; 64 << 10];
        while out.len() < (64 << 20) {
            match self.raw_read(peer, &mut chunk) {
                Ok(k) if k > 0 => out.extend_from_slice(&chunk[..k]),
                _ => break,
            }
        }
        out
    }
}

impl Link for TcpLink {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.streams.len()
    }
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn try_write(&mut self, peer: usize, buf: &[u8]) -> Result<usize, LinkError> {
        if buf.is_empty() {
            return Ok(0);
        }
        let r = match self.stream(peer)?.write(buf) {
            Ok(0) => Err(LinkError::Closed {
                peer,
                detail: "connection closed".into(),
            }),
            Ok(k) => Ok(k),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(0)
            }
            Err(e) => Err(classify(peer, e)),
        };
        match r {
            Err(LinkError::Closed { peer, detail }) => Err(self.explain(peer, detail)),
            r => r,
        }
    }

    fn try_read(&mut self, peer: usize, buf: &mut [u8]) -> Result<usize, LinkError> {
        match self.raw_read(peer, buf) {
            Err(LinkError::Closed { peer, detail }) => Err(self.explain(peer, detail)),
            r => r,
        }
    }

    fn wait(
        &mut self,
        readers: &[usize],
        writers: &[usize],
        dur: Duration,
    ) -> Result<(), LinkError> {
        let mut fds = Vec::with_capacity(self.streams.len());
        let mut peers = Vec::with_capacity(self.streams.len());
        for (p, s) in self.streams.iter().enumerate() {
            let Some(s) = s else { continue };
            let mut events = 0;
            if readers.contains(&p) {
                events |= libc::POLLIN;
            }
            if writers.contains(&p) {
                events |= libc::POLLOUT;
            }
            if events == 0 {
                if self.closing {
                    continue;
                }
                // An uninvolved peer that hangs up outside the final barrier has died.
                events = libc::POLLRDHUP;
            }
            fds.push(libc::pollfd {
                fd: s.as_raw_fd(),
                events,
                revents: 0,
            });
            peers.push(p);
        }
        let ms = dur.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(LinkError::Io {
                peer: self.rank,
                source: e,
            });
        }
        // Uninvolved peers that hung up: one that left an Abort frame failed after someone else; one
        // that did not is the one that died. Report the dead one first.
        let mut aborted = None;
        for (fd, &p) in fds.iter().zip(&peers) {
            let involved = readers.contains(&p) || writers.contains(&p);
            if !involved && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                match self.how_left(p) {
                    Some(reason) => {
                        aborted = aborted.or(Some(LinkError::Aborted { peer: p, reason }))
                    }
                    None => {
                        return Err(LinkError::Closed {
                            peer: p,
                            detail: "connection closed while it was not due to finish".into(),
                        })
                    }
                }
            }
        }
        aborted.map_or(Ok(()), Err)
    }

    fn raw_fd(&self, peer: usize) -> Option<std::os::fd::RawFd> {
        Some(self.streams.get(peer)?.as_ref()?.as_raw_fd())
    }

    fn set_closing(&mut self) {
        self.closing = true;
    }

    /// One out-of-band byte to every peer (root rank + 1, 0 if unknown): it overtakes any half-sent
    /// frame, so peers can tell this orderly failure from a death even when no Abort frame fits.
    fn announce_failure(&mut self, root: Option<usize>) {
        let b = [root.map_or(0, |r| if r < 254 { r as u8 + 1 } else { 255 })];
        for s in self.streams.iter().flatten() {
            // SAFETY: sending one byte from a live buffer on our own socket; errors are ignored.
            unsafe {
                libc::send(
                    s.as_raw_fd(),
                    b.as_ptr() as *const libc::c_void,
                    1,
                    libc::MSG_OOB | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
        }
    }

    fn shutdown(&mut self) {
        for s in self.streams.iter().flatten() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}
