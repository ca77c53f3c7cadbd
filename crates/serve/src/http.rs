//! HTTP/1.1 messages: reading one request from a stream under hard limits, writing one response.
//!
//! Only what the page and the API need: `GET`/`POST`/`HEAD`, bodies framed by `Content-Length`
//! (chunked request bodies are refused with 411), keep-alive. Every limit breach is an
//! [`HttpError`] that maps to a 4xx status with a sentence saying what was wrong; nothing a
//! client sends can panic the reader.

use std::io::{BufRead, Read, Write};

use crate::error::HttpError;

/// Longest request line plus headers, bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header lines.
pub const MAX_HEADERS: usize = 64;
/// Largest request body, bytes (a pasted `config.json` is a few KiB).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path without the query, still percent-encoded (routes are plain ASCII).
    pub path: String,
    /// The raw query string after `?` (empty when none).
    pub query: String,
    /// Header names lower-cased, values trimmed, in order.
    pub headers: Vec<(String, String)>,
    /// The body (empty without `Content-Length`).
    pub body: Vec<u8>,
    /// Whether the client asked to keep the connection open (HTTP/1.1 default).
    pub keep_alive: bool,
}

impl Request {
    /// The first header of that (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A JSON body (already serialised).
    pub fn json(status: u16, body: String) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: body.into_bytes(),
        }
    }

    /// `{"error": message, "field": field}` with that status.
    pub fn error(status: u16, message: &str, field: Option<&str>) -> Self {
        Self::json(
            status,
            serde_json::json!({"error": message, "field": field}).to_string(),
        )
    }
}

/// Reason phrase for the statuses this server sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Status",
    }
}

/// Reads one line (through `\n`) without letting it grow past `budget` bytes.
fn read_line(r: &mut impl BufRead, budget: &mut usize) -> Result<Vec<u8>, HttpError> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(*budget as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(HttpError::from_io)?;
    if n > *budget {
        return Err(HttpError::HeadTooLarge {
            limit: MAX_HEAD_BYTES,
        });
    }
    *budget -= n;
    if line.last() != Some(&b'\n') {
        return Err(HttpError::Truncated);
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(line)
}

/// Reads the next request. `Ok(None)`: the client closed the connection between requests.
pub fn read_request(r: &mut impl BufRead) -> Result<Option<Request>, HttpError> {
    // A closed keep-alive connection is not an error: look before reading the line.
    match r.fill_buf() {
        Ok([]) => return Ok(None),
        Ok(_) => {}
        Err(e) => return Err(HttpError::from_io(e)),
    }
    let mut budget = MAX_HEAD_BYTES;
    let line = read_line(r, &mut budget)?;
    let line = String::from_utf8(line).map_err(|_| HttpError::BadRequestLine)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::BadRequestLine);
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HttpError::BadRequestLine);
    }
    let keep_alive_default = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(HttpError::Version(version.chars().take(32).collect())),
    };
    if !target.starts_with('/') {
        return Err(HttpError::BadRequestLine);
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut headers = Vec::new();
    loop {
        let line = read_line(r, &mut budget)?;
        if line.is_empty() {
            break;
        }
        if headers.len() == MAX_HEADERS {
            return Err(HttpError::TooManyHeaders { limit: MAX_HEADERS });
        }
        let line = String::from_utf8(line).map_err(|_| HttpError::BadHeader)?;
        let (k, v) = line.split_once(':').ok_or(HttpError::BadHeader)?;
        if k.is_empty() || k.contains(char::is_whitespace) {
            return Err(HttpError::BadHeader);
        }
        headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
    }
    let mut req = Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        headers,
        body: Vec::new(),
        keep_alive: keep_alive_default,
    };
    if let Some(c) = req.header("connection") {
        let c = c.to_ascii_lowercase();
        if c.contains("close") {
            req.keep_alive = false;
        } else if c.contains("keep-alive") {
            req.keep_alive = true;
        }
    }
    if req.header("transfer-encoding").is_some() {
        return Err(HttpError::Chunked);
    }
    let lengths: Vec<&str> = req
        .headers
        .iter()
        .filter(|(k, _)| k == "content-length")
        .map(|(_, v)| v.as_str())
        .collect();
    let len = match lengths.as_slice() {
        [] => 0,
        [one] => one
            .parse::<usize>()
            .map_err(|_| HttpError::BadLength(one.chars().take(32).collect()))?,
        _ => return Err(HttpError::BadLength("given more than once".into())),
    };
    if len > MAX_BODY_BYTES {
        return Err(HttpError::BodyTooLarge {
            len,
            limit: MAX_BODY_BYTES,
        });
    }
    req.body = vec![0; len];
    r.read_exact(&mut req.body).map_err(HttpError::from_io)?;
    Ok(Some(req))
}

/// Writes `resp`; `HEAD` requests get the headers only.
pub fn write_response(
    w: &mut impl Write,
    resp: &Response,
    keep_alive: bool,
    head_only: bool,
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len(),
        if keep_alive { "keep-alive" } else { "close" },
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(&resp.body);
    }
    w.write_all(&out)?;
    w.flush()
}

/// Decodes `application/x-www-form-urlencoded` text (`+` is a space, `%XX` a byte).
pub fn url_decode(s: &str) -> Result<String, HttpError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (
                    b.get(i + 1).and_then(|&c| hex(c)),
                    b.get(i + 2).and_then(|&c| hex(c)),
                ) {
                    (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
                    _ => return Err(HttpError::BadEscape),
                }
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| HttpError::BadEscape)
}

/// Splits a query string into decoded `(key, value)` pairs (empty pairs skipped).
pub fn parse_query(q: &str) -> Result<Vec<(String, String)>, HttpError> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((url_decode(k)?, url_decode(v)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    fn parse(raw: &[u8]) -> Result<Option<Request>, HttpError> {
        read_request(&mut BufReader::new(raw))
    }

    #[test]
    fn reads_a_post_with_a_body_and_then_sees_the_end() {
        let raw = b"POST /api/estimate?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}";
        let mut r = BufReader::new(&raw[..]);
        let req = read_request(&mut r).unwrap().unwrap();
        assert_eq!(
            (req.method.as_str(), req.path.as_str()),
            ("POST", "/api/estimate")
        );
        assert_eq!(
            (req.query.as_str(), req.body.as_slice()),
            ("x=1", &b"{}"[..])
        );
        assert!(req.keep_alive);
        assert_eq!(read_request(&mut r).unwrap(), None);
    }

    #[test]
    fn refuses_what_it_does_not_speak() {
        let cases: [(&[u8], &str); 7] = [
            (b"GET /\r\n\r\n", "request line"),
            (b"GET / HTTP/2.0\r\n\r\n", "HTTP/2.0"),
            (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", "header"),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "Content-Length",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
                "body",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                "Content-Length",
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab", "ended"),
        ];
        for (raw, want) in cases {
            let e = parse(raw).unwrap_err();
            assert!(
                e.to_string().contains(want) && (400..500).contains(&e.status())
                    || e.status() == 505,
                "{:?}: {e}",
                String::from_utf8_lossy(raw)
            );
        }
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        assert_eq!(parse(&long).unwrap_err().status(), 431);
    }

    #[test]
    fn decodes_queries() {
        assert_eq!(
            parse_query("model=llama3-8b&tokens=1%2E5T&name=a+b&&flag").unwrap(),
            vec![
                ("model".into(), "llama3-8b".into()),
                ("tokens".into(), "1.5T".into()),
                ("name".into(), "a b".into()),
                ("flag".into(), String::new())
            ]
        );
        assert!(parse_query("a=%zz").is_err());
        assert!(parse_query("a=%ff").is_err(), "not UTF-8");
    }
}
