//! TCP transport: a full mesh of sockets, built by a rendezvous at rank 0 in which both ends of
//! every connection prove that they know the job token without sending it.
//!
//! ```text
//!  rank r>0                          rank 0 (listens on MASTER_ADDR:MASTER_PORT)
//!  bind listener L_r (port 0)
//!  connect ──── Hello{r, world, L_r port, frame size, nonce_c} ──►  garbage is dropped
//!          ◄─── Challenge{nonce_a, HMAC(token, "accept" ‖ hello ‖ nonce_a)}
//!  check it (a listener without the token is refused)
//!          ──── Proof{HMAC(token, "connect" ‖ hello ‖ nonce_a)} ──►  check; wrong: Reject
//!          ◄─── Welcome{address of every L_j} ──────────────────  once all world-1 ranks joined
//!  connect to L_j for 0 < j < r: the same Hello / Challenge / Proof
//!  accept from j > r on L_r, the same exchange; then close L_r
//! ```
//! HMAC is HMAC-SHA256 (`auth`); the nonces are fresh per connection, so a recorded exchange
//! proves nothing later, and the hello's fields (rank, world, port, frame size) are bound into
//! both MACs. Afterwards every socket is non-blocking with TCP_NODELAY, and the connection to rank
//! 0 is the mesh link between r and 0. A listener accepts only during rendezvous.
use crate::auth::{self, MAC_BYTES, NONCE_BYTES};
use crate::comm::Comm;
use crate::error::{CommError, Result};
use crate::frame::{Header, Op, HEADER_BYTES};
use crate::link::{Link, LinkError};
use crate::rendezvous::JobEnv;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const HELLO_MAX: u32 = 4096;
const WELCOME_MAX: u32 = 1 << 24;

struct Hello {
    world: u32,
    rank: u32,
    port: u16,
    max_frame: u32,
    nonce: [u8; NONCE_BYTES],
}

const HELLO_BYTES: usize = 14 + NONCE_BYTES;

impl Hello {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HELLO_BYTES);
        b.extend_from_slice(&self.world.to_le_bytes());
        b.extend_from_slice(&self.rank.to_le_bytes());
        b.extend_from_slice(&self.port.to_le_bytes());
        b.extend_from_slice(&self.max_frame.to_le_bytes());
        b.extend_from_slice(&self.nonce);
        b
    }
    fn decode(b: &[u8]) -> std::result::Result<Hello, String> {
        if b.len() != HELLO_BYTES {
            return Err(format!(
                "hello of {} bytes, expected {HELLO_BYTES} (an older or newer scaletrain?)",
                b.len()
            ));
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut nonce = [0u8; NONCE_BYTES];
        nonce.copy_from_slice(&b[14..]);
        Ok(Hello {
            world: u32_at(0),
            rank: u32_at(4),
            port: u16::from_le_bytes([b[8], b[9]]),
            max_frame: u32_at(10),
            nonce,
        })
    }
}

/// The listener's MAC over a connection's hello and its own nonce.
fn accept_mac(token: &[u8], hello: &[u8], nonce_a: &[u8]) -> [u8; MAC_BYTES] {
    auth::hmac(token, &[b"scaletrain accept", hello, nonce_a])
}

/// The connector's MAC.
fn connect_mac(token: &[u8], hello: &[u8], nonce_a: &[u8]) -> [u8; MAC_BYTES] {
    auth::hmac(token, &[b"scaletrain connect", hello, nonce_a])
}

/// Connector side: send `hello`, check the listener's challenge, answer it. `who` names the
/// listener in errors.
fn prove(
    s: &mut TcpStream,
    me: usize,
    hello: &[u8],
    token: &[u8],
    deadline: Instant,
    who: &str,
) -> Result<()> {
    write_frame(s, Op::Hello, me, hello)
        .map_err(|e| rdv(me, format!("sending hello to {who}: {e}")))?;
    let (h, payload) = read_frame(s, HELLO_MAX, deadline)
        .map_err(|why| rdv(me, format!("waiting for {who}'s challenge: {why}")))?;
    match h.op {
        Op::Challenge if payload.len() == NONCE_BYTES + MAC_BYTES => {}
        Op::Reject => {
            return Err(rdv(
                me,
                format!("{who} refused us: {}", String::from_utf8_lossy(&payload)),
            ))
        }
        op => {
            return Err(rdv(
                me,
                format!("unexpected {} frame from {who}", op.name()),
            ))
        }
    }
    let (nonce_a, mac) = payload.split_at(NONCE_BYTES);
    if !auth::same(mac, &accept_mac(token, hello, nonce_a)) {
        return Err(rdv(
            me,
            format!("{who} does not prove the job token we have (wrong job token on one side)"),
        ));
    }
    write_frame(s, Op::Proof, me, &connect_mac(token, hello, nonce_a))
        .map_err(|e| rdv(me, format!("answering {who}'s challenge: {e}")))
}

fn write_frame(s: &mut TcpStream, op: Op, sender: usize, payload: &[u8]) -> io::Result<()> {
    let h = Header {
        op,
        algo: 0,
        sender: sender as u32,
        group: 0,
        seq: 0,
        len: payload.len() as u32,
        call: 0,
    };
    s.write_all(&h.encode())?;
    s.write_all(payload)
}

/// Read one frame with a deadline; `Err` is a human-readable reason.
fn read_frame(
    s: &mut TcpStream,
    max: u32,
    deadline: Instant,
) -> std::result::Result<(Header, Vec<u8>), String> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
    let mut hdr = [0u8; HEADER_BYTES];
    s.read_exact(&mut hdr)
        .map_err(|e| format!("reading header: {e}"))?;
    let h = Header::decode(&hdr, max).map_err(|e| e.to_string())?;
    let mut payload = vec![0u8; h.len as usize];
    s.read_exact(&mut payload)
        .map_err(|e| format!("reading payload: {e}"))?;
    Ok((h, payload))
}

fn rdv(rank: usize, detail: impl Into<String>) -> CommError {
    CommError::Rendezvous {
        rank,
        detail: detail.into(),
    }
}

/// Accept until `want` is satisfied or the deadline passes; `check` validates each hello and
/// returns the peer rank to keep the connection, or `Err(Some(reason))` to reject with a reason,
/// `Err(None)` to drop silently.
fn accept_peers(
    listener: &TcpListener,
    me: usize,
    deadline: Instant,
    mut want: usize,
    mut check: impl FnMut(&Hello, SocketAddr) -> std::result::Result<usize, String>,
    token: &[u8],
) -> Result<Vec<(usize, TcpStream, Hello, SocketAddr)>> {
    listener
        .set_nonblocking(true)
        .map_err(|e| rdv(me, format!("listener: {e}")))?;
    let mut out = Vec::new();
    while want > 0 {
        if Instant::now() >= deadline {
            let got: Vec<usize> = out
                .iter()
                .map(|x: &(usize, TcpStream, Hello, SocketAddr)| x.0)
                .collect();
            return Err(rdv(
                me,
                format!("timed out waiting for {want} more rank(s) to join (joined: {got:?})"),
            ));
        }
        let (mut s, addr) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(e) => return Err(rdv(me, format!("accept: {e}"))),
        };
        let _ = s.set_nonblocking(false);
        // A joiner must speak within a short window; a silent or slow client cannot stall the job.
        let window = (Instant::now() + Duration::from_secs(2)).min(deadline);
        let (h, payload) = match read_frame(&mut s, HELLO_MAX, window) {
            Ok(x) => x,
            Err(why) => {
                eprintln!("scaletrain-comm: rank {me}: dropped connection from {addr}: {why}");
                continue;
            }
        };
        let hello = match (h.op, Hello::decode(&payload)) {
            (Op::Hello, Ok(hello)) => hello,
            (Op::Hello, Err(why)) => {
                eprintln!("scaletrain-comm: rank {me}: dropped connection from {addr}: {why}");
                continue;
            }
            (op, _) => {
                eprintln!("scaletrain-comm: rank {me}: dropped connection from {addr}: {} frame instead of hello", op.name());
                continue;
            }
        };
        // Challenge: prove our token over its hello and our nonce; it must answer in kind.
        let nonce_a = match auth::nonce() {
            Ok(n) => n,
            Err(e) => return Err(rdv(me, format!("reading /dev/urandom: {e}"))),
        };
        let mut challenge = nonce_a.to_vec();
        challenge.extend_from_slice(&accept_mac(token, &payload, &nonce_a));
        if let Err(e) = write_frame(&mut s, Op::Challenge, me, &challenge) {
            eprintln!("scaletrain-comm: rank {me}: dropped connection from {addr}: {e}");
            continue;
        }
        let proof = match read_frame(&mut s, HELLO_MAX, window) {
            Ok((h, p)) if h.op == Op::Proof => p,
            Ok((h, _)) => {
                eprintln!("scaletrain-comm: rank {me}: dropped connection from {addr}: {} frame instead of proof", h.op.name());
                continue;
            }
            Err(why) => {
                // Also what a joiner with another token does: it finds our challenge wrong.
                eprintln!("scaletrain-comm: rank {me}: dropped connection from {addr} claiming rank {}: no proof of the job token ({why})", hello.rank);
                continue;
            }
        };
        if !auth::same(&proof, &connect_mac(token, &payload, &nonce_a)) {
            eprintln!(
                "scaletrain-comm: rank {me}: rejected {addr} claiming rank {}: wrong job token",
                hello.rank
            );
            let _ = write_frame(&mut s, Op::Reject, me, b"wrong job token");
            continue;
        }
        match check(&hello, addr) {
            Ok(peer) => {
                out.push((peer, s, hello, addr));
                want -= 1;
            }
            Err(why) => {
                eprintln!("scaletrain-comm: rank {me}: rejected {addr}: {why}");
                let _ = write_frame(&mut s, Op::Reject, me, why.as_bytes());
            }
        }
    }
    Ok(out)
}

fn connect_retry(addr: &str, port: u16, me: usize, deadline: Instant) -> Result<TcpStream> {
    loop {
        let err = match TcpStream::connect((addr, port)) {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(rdv(me, format!("could not reach {addr}:{port}: {err}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn encode_addr(b: &mut Vec<u8>, ip: IpAddr, port: u16) {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    b.extend_from_slice(&v6.octets());
    b.extend_from_slice(&port.to_le_bytes());
}

fn decode_addrs(b: &[u8], n: usize) -> Option<Vec<SocketAddr>> {
    if b.len() != n * 18 {
        return None;
    }
    Some(
        b.chunks_exact(18)
            .map(|c| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&c[..16]);
                let v6 = Ipv6Addr::from(o);
                let ip = v6
                    .to_ipv4_mapped()
                    .map(IpAddr::V4)
                    .unwrap_or(IpAddr::V6(v6));
                SocketAddr::new(ip, u16::from_le_bytes([c[16], c[17]]))
            })
            .collect(),
    )
}

/// Join the job over TCP (see the module docs for the protocol).
pub fn connect(env: &JobEnv) -> Result<Comm> {
    let (me, n) = (env.rank, env.world_size);
    let cfg = env.cfg.clone();
    let deadline = Instant::now() + cfg.timeout;
    let mut streams: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let hello = |port: u16| -> Result<Vec<u8>> {
        Ok(Hello {
            world: n as u32,
            rank: me as u32,
            port,
            max_frame: cfg.max_frame_bytes,
            nonce: auth::nonce().map_err(|e| rdv(me, format!("reading /dev/urandom: {e}")))?,
        }
        .encode())
    };
    if n > 1 && me == 0 {
        let listener = TcpListener::bind((env.bind_addr, env.master_port)).map_err(|e| {
            rdv(
                me,
                format!(
                    "cannot listen on {}:{}: {e}",
                    env.bind_addr, env.master_port
                ),
            )
        })?;
        let mut seen = vec![false; n];
        let joined = accept_peers(
            &listener,
            me,
            deadline,
            n - 1,
            |h, _| {
                let r = h.rank as usize;
                if h.world as usize != n {
                    return Err(format!("world size {} differs from rank 0's {n}", h.world));
                }
                if r == 0 || r >= n {
                    return Err(format!("rank {r} is not in 1..{n} (WORLD_SIZE {n})"));
                }
                if seen[r] {
                    return Err(format!(
                        "rank {r} already joined: two processes were started with RANK={r}; \
                         give every process of the job its own rank"
                    ));
                }
                if h.max_frame != cfg.max_frame_bytes {
                    return Err(format!(
                        "max frame {} differs from rank 0's {}",
                        h.max_frame, cfg.max_frame_bytes
                    ));
                }
                seen[r] = true;
                Ok(r)
            },
            &env.token,
        )?;
        let mut table = vec![(IpAddr::from([0, 0, 0, 0]), 0u16); n];
        for (r, _, h, addr) in &joined {
            table[*r] = (addr.ip(), h.port);
        }
        let mut welcome = Vec::new();
        for (ip, port) in &table {
            encode_addr(&mut welcome, *ip, *port);
        }
        for (r, mut s, _, _) in joined {
            write_frame(&mut s, Op::Welcome, me, &welcome)
                .map_err(|e| rdv(me, format!("welcoming rank {r}: {e}")))?;
            streams[r] = Some(s);
        }
    } else if n > 1 {
        let listener = TcpListener::bind((env.bind_addr, 0))
            .map_err(|e| rdv(me, format!("cannot listen on {}: {e}", env.bind_addr)))?;
        let port = listener
            .local_addr()
            .map_err(|e| rdv(me, e.to_string()))?
            .port();
        let mut s0 = connect_retry(&env.master_addr, env.master_port, me, deadline)?;
        prove(&mut s0, me, &hello(port)?, &env.token, deadline, "rank 0")?;
        let (h, payload) = read_frame(&mut s0, WELCOME_MAX, deadline)
            .map_err(|why| rdv(me, format!("waiting for rank 0's answer: {why}")))?;
        let table = match h.op {
            Op::Welcome => decode_addrs(&payload, n)
                .ok_or_else(|| rdv(me, "malformed address table from rank 0"))?,
            Op::Reject => {
                return Err(rdv(
                    me,
                    format!("rank 0 refused us: {}", String::from_utf8_lossy(&payload)),
                ))
            }
            op => {
                return Err(rdv(
                    me,
                    format!("unexpected {} frame from rank 0", op.name()),
                ))
            }
        };
        streams[0] = Some(s0);
        for (j, addr) in table.iter().enumerate().take(me).skip(1) {
            let mut s = connect_retry(&addr.ip().to_string(), addr.port(), me, deadline)?;
            prove(
                &mut s,
                me,
                &hello(port)?,
                &env.token,
                deadline,
                &format!("rank {j}"),
            )?;
            streams[j] = Some(s);
        }
        let mut seen = vec![false; n];
        let joined = accept_peers(
            &listener,
            me,
            deadline,
            n - 1 - me,
            |h, _| {
                let r = h.rank as usize;
                if r <= me || r >= n || seen[r] || h.world as usize != n {
                    return Err(format!("unexpected peer claiming rank {r} of {}", h.world));
                }
                seen[r] = true;
                Ok(r)
            },
            &env.token,
        )?;
        for (r, s, _, _) in joined {
            streams[r] = Some(s);
        }
    }
    for s in streams.iter().flatten() {
        s.set_nonblocking(true)
            .map_err(|e| rdv(me, e.to_string()))?;
        s.set_nodelay(true).map_err(|e| rdv(me, e.to_string()))?;
        s.set_read_timeout(None)
            .map_err(|e| rdv(me, e.to_string()))?;
    }
    Ok(Comm::new(
        Box::new(TcpLink {
            rank: me,
            streams,
            closing: false,
        }),
        cfg,
    ))
}

/// The TCP [`Link`]: one non-blocking socket per peer.
struct TcpLink {
    rank: usize,
    streams: Vec<Option<TcpStream>>,
    closing: bool,
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
