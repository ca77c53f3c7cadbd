//! A minimal HTTP/1.1 client over one keep-alive connection: what the load benchmark, the API
//! tests and the browser test's WebDriver calls need (JSON in, status and text out). Responses
//! must carry `Content-Length` (this server's and chromedriver's do).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::error::ServeError;

/// Largest response body read, bytes.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// One connection to `addr` (`host:port`), reopened when the server closes it.
#[derive(Debug)]
pub struct Client {
    addr: String,
    timeout: Duration,
    conn: Option<(BufReader<TcpStream>, TcpStream)>,
}

/// A response: status and body text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Body as text (lossy UTF-8).
    pub body: String,
}

impl Client {
    /// A client for `addr` whose every call gives up after `timeout`.
    pub fn new(addr: &str, timeout: Duration) -> Self {
        Self {
            addr: addr.into(),
            timeout,
            conn: None,
        }
    }

    fn io(&self, what: &str, source: std::io::Error) -> ServeError {
        ServeError::Io {
            what: format!("{what} {}", self.addr),
            source,
        }
    }

    fn bad(&self, detail: impl Into<String>) -> ServeError {
        ServeError::BadResponse {
            addr: self.addr.clone(),
            detail: detail.into(),
        }
    }

    /// `GET path`.
    pub fn get(&mut self, path: &str) -> Result<Reply, ServeError> {
        self.request("GET", path, None)
    }

    /// `POST path` with a JSON body.
    pub fn post_json(&mut self, path: &str, body: &str) -> Result<Reply, ServeError> {
        self.request("POST", path, Some(("application/json", body.as_bytes())))
    }

    /// Sends a request (retrying once on a fresh connection if a kept-alive one was closed).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> Result<Reply, ServeError> {
        let reused = self.conn.is_some();
        match self.try_request(method, path, body) {
            Err(ServeError::Io { .. }) | Err(ServeError::BadResponse { .. }) if reused => {
                self.conn = None;
                self.try_request(method, path, body)
            }
            r => r,
        }
    }

    fn try_request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> Result<Reply, ServeError> {
        if self.conn.is_none() {
            let s = TcpStream::connect(&self.addr).map_err(|e| self.io("connecting to", e))?;
            s.set_read_timeout(Some(self.timeout))
                .and_then(|_| s.set_write_timeout(Some(self.timeout)))
                .and_then(|_| s.set_nodelay(true))
                .map_err(|e| self.io("configuring the socket to", e))?;
            let w = s
                .try_clone()
                .map_err(|e| self.io("cloning the socket to", e))?;
            self.conn = Some((BufReader::new(s), w));
        }
        let host = self.addr.clone();
        let result = (|| {
            let Some((reader, writer)) = self.conn.as_mut() else {
                return Err(self.bad("no connection"));
            };
            let mut out = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
            if let Some((ctype, b)) = body {
                out.push_str(&format!(
                    "Content-Type: {ctype}\r\nContent-Length: {}\r\n",
                    b.len()
                ));
            }
            out.push_str("\r\n");
            let mut bytes = out.into_bytes();
            if let Some((_, b)) = body {
                bytes.extend_from_slice(b);
            }
            writer.write_all(&bytes).map_err(|e| ServeError::Io {
                what: format!("sending to {host}"),
                source: e,
            })?;
            read_reply(reader, &host)
        })();
        match result {
            Ok((reply, keep)) => {
                if !keep {
                    self.conn = None;
                }
                Ok(reply)
            }
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }
}

fn read_reply(r: &mut BufReader<TcpStream>, addr: &str) -> Result<(Reply, bool), ServeError> {
    let bad = |d: String| ServeError::BadResponse {
        addr: addr.into(),
        detail: d,
    };
    let io = |e| ServeError::Io {
        what: format!("reading from {addr}"),
        source: e,
    };
    let mut line = String::new();
    if r.read_line(&mut line).map_err(io)? == 0 {
        return Err(bad("connection closed before a status line".into()));
    }
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad(format!("status line {:?}", line.trim_end())))?;
    let (mut len, mut keep) = (None, !line.starts_with("HTTP/1.0"));
    loop {
        line.clear();
        if r.read_line(&mut line).map_err(io)? == 0 {
            return Err(bad("connection closed inside the headers".into()));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                len = Some(
                    v.parse::<usize>()
                        .map_err(|_| bad(format!("Content-Length {v}")))?,
                );
            } else if k == "connection" && v.eq_ignore_ascii_case("close") {
                keep = false;
            }
        }
    }
    let len = len.ok_or_else(|| bad("no Content-Length".into()))?;
    if len > MAX_RESPONSE_BYTES {
        return Err(bad(format!("{len}-byte body")));
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).map_err(io)?;
    Ok((
        Reply {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        },
        keep,
    ))
}
