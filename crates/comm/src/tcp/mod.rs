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
//!
//! `handshake.rs` holds the rendezvous' frames and proofs, `link.rs` the established mesh's
//! [`Link`](crate::link::Link).
mod handshake;
mod link;

use crate::auth;
use crate::comm::Comm;
use crate::error::Result;
use crate::frame::Op;
use crate::rendezvous::JobEnv;
use handshake::{
    accept_peers, connect_retry, decode_addrs, encode_addr, prove, rdv, read_frame, write_frame,
    Hello, WELCOME_MAX,
};
use link::TcpLink;
use std::net::{IpAddr, TcpListener, TcpStream};
use std::time::Instant;

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
        // Reach rank 0 first, then take a port for our own listener: the master port is then
        // rank 0's, so the kernel cannot hand it to us (a launcher picks the master port as a
        // free one and releases it before rank 0 binds it; a rank binding port 0 in between
        // could be given that very port, and rank 0 would fail with "address in use").
        let mut s0 = connect_retry(&env.master_addr, env.master_port, me, deadline)?;
        let listener = TcpListener::bind((env.bind_addr, 0))
            .map_err(|e| rdv(me, format!("cannot listen on {}: {e}", env.bind_addr)))?;
        let port = listener
            .local_addr()
            .map_err(|e| rdv(me, e.to_string()))?
            .port();
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
