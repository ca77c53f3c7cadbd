//! The TCP rendezvous' handshake: the hello, the challenge–response over the job token, framed
//! reads and writes with a deadline, accepting joiners, and the address table (the protocol is
//! in the parent module's docs).
use crate::auth::{self, MAC_BYTES, NONCE_BYTES};
use crate::error::{CommError, Result};
use crate::frame::{Header, Op, HEADER_BYTES};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

pub(super) const HELLO_MAX: u32 = 4096;
pub(super) const WELCOME_MAX: u32 = 1 << 24;

pub(super) struct Hello {
    pub(super) world: u32,
    pub(super) rank: u32,
    pub(super) port: u16,
    pub(super) max_frame: u32,
    pub(super) nonce: [u8; NONCE_BYTES],
}

pub(super) const HELLO_BYTES: usize = 14 + NONCE_BYTES;

impl Hello {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HELLO_BYTES);
        b.extend_from_slice(&self.world.to_le_bytes());
        b.extend_from_slice(&self.rank.to_le_bytes());
        b.extend_from_slice(&self.port.to_le_bytes());
        b.extend_from_slice(&self.max_frame.to_le_bytes());
        b.extend_from_slice(&self.nonce);
        b
    }
    pub(super) fn decode(b: &[u8]) -> std::result::Result<Hello, String> {
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
pub(super) fn accept_mac(token: &[u8], hello: &[u8], nonce_a: &[u8]) -> [u8; MAC_BYTES] {
    auth::hmac(token, &[b"scaletrain accept", hello, nonce_a])
}

/// The connector's MAC.
pub(super) fn connect_mac(token: &[u8], hello: &[u8], nonce_a: &[u8]) -> [u8; MAC_BYTES] {
    auth::hmac(token, &[b"scaletrain connect", hello, nonce_a])
}

/// Connector side: send `hello`, check the listener's challenge, answer it. `who` names the
/// listener in errors.
pub(super) fn prove(
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

pub(super) fn write_frame(
    s: &mut TcpStream,
    op: Op,
    sender: usize,
    payload: &[u8],
) -> io::Result<()> {
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
pub(super) fn read_frame(
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

pub(super) fn rdv(rank: usize, detail: impl Into<String>) -> CommError {
    CommError::Rendezvous {
        rank,
        detail: detail.into(),
    }
}

/// Accept until `want` is satisfied or the deadline passes; `check` validates each hello and
/// returns the peer rank to keep the connection, or `Err(Some(reason))` to reject with a reason,
/// `Err(None)` to drop silently.
pub(super) fn accept_peers(
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

pub(super) fn connect_retry(
    addr: &str,
    port: u16,
    me: usize,
    deadline: Instant,
) -> Result<TcpStream> {
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

pub(super) fn encode_addr(b: &mut Vec<u8>, ip: IpAddr, port: u16) {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    b.extend_from_slice(&v6.octets());
    b.extend_from_slice(&port.to_le_bytes());
}

pub(super) fn decode_addrs(b: &[u8], n: usize) -> Option<Vec<SocketAddr>> {
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
