//! The listening loop: one thread per connection, at most [`MAX_CONNECTIONS`] at once (more are
//! answered 503 and closed), a read timeout on every socket, keep-alive up to
//! [`MAX_REQUESTS_PER_CONNECTION`] requests. A handler that panics is a bug; the connection gets
//! a 500 naming it and the server keeps serving.

use std::io::BufReader;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::ServeError;
use crate::http::{read_request, write_response, Request, Response};

/// Connections served at the same time.
pub const MAX_CONNECTIONS: usize = 64;
/// Requests on one keep-alive connection before it is closed.
pub const MAX_REQUESTS_PER_CONNECTION: usize = 1000;
/// How long a socket may stay silent (between requests or inside one).
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers one request. Runs on the connection's thread.
pub type Handler = dyn Fn(&Request) -> Response + Send + Sync;

/// A bound, not yet serving, listener.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    loopback_only: bool,
}

impl Server {
    /// Binds `addr` (`127.0.0.1:8080`; port 0 picks a free one).
    pub fn bind(addr: &str) -> Result<Self, ServeError> {
        let listener = TcpListener::bind(addr).map_err(|source| ServeError::Bind {
            addr: addr.into(),
            source,
        })?;
        let loopback_only = listener
            .local_addr()
            .map(|a| a.ip().is_loopback())
            .unwrap_or(false);
        Ok(Self {
            listener,
            loopback_only,
        })
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> Result<SocketAddr, ServeError> {
        self.listener.local_addr().map_err(|source| ServeError::Io {
            what: "reading the listening address".into(),
            source,
        })
    }

    /// Serves until the process ends.
    pub fn run(self, handler: Arc<Handler>) {
        let live = Arc::new(AtomicUsize::new(0));
        for stream in self.listener.incoming() {
            let Ok(stream) = stream else {
                // Out of file descriptors and similar: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            if live.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                live.fetch_sub(1, Ordering::SeqCst);
                let mut s = stream;
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                let busy = Response::error(
                    503,
                    &format!("server busy: {MAX_CONNECTIONS} connections open; retry"),
                    None,
                );
                let _ = write_response(&mut s, &busy, false, false);
                continue;
            }
            let (handler, live, loopback_only) =
                (handler.clone(), live.clone(), self.loopback_only);
            let spawned = std::thread::Builder::new()
                .name("serve-conn".into())
                .spawn(move || {
                    serve_connection(stream, &*handler, loopback_only);
                    live.fetch_sub(1, Ordering::SeqCst);
                });
            if spawned.is_err() {
                // The closure (and its counter decrement) never ran.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// `Host` values a loopback-bound server answers (defence against DNS rebinding: a web page
/// elsewhere whose name resolves to 127.0.0.1 must not read the API).
fn host_is_loopback(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    matches!(name, "localhost" | "127.0.0.1" | "::1")
}

fn serve_connection(stream: TcpStream, handler: &Handler, loopback_only: bool) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    for served in 1..=MAX_REQUESTS_PER_CONNECTION {
        let req = match read_request(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                if !matches!(e, crate::error::HttpError::Io(_)) {
                    let _ = write_response(
                        &mut writer,
                        &Response::error(e.status(), &e.to_string(), None),
                        false,
                        false,
                    );
                }
                return;
            }
        };
        let resp = if loopback_only && !req.header("host").is_some_and(host_is_loopback) {
            Response::error(
                403,
                "this server answers only requests addressed to localhost / 127.0.0.1",
                None,
            )
        } else {
            catch_unwind(AssertUnwindSafe(|| handler(&req))).unwrap_or_else(|p| {
                let what = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Response::error(
                    500,
                    &format!("internal error (a bug, please report it): {what}"),
                    None,
                )
            })
        };
        let keep = req.keep_alive && served < MAX_REQUESTS_PER_CONNECTION;
        if write_response(&mut writer, &resp, keep, req.method == "HEAD").is_err() || !keep {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::host_is_loopback;

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:1",
            "[::1]:80",
            "[::1]",
        ] {
            assert!(host_is_loopback(h), "{h}");
        }
        for h in [
            "evil.example:8080",
            "127.0.0.1.evil.example",
            "",
            "[::2]:80",
        ] {
            assert!(!host_is_loopback(h), "{h}");
        }
    }
}
