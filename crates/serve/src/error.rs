//! The crate's errors: what a client sent wrong ([`HttpError`], each a 4xx status) and what went
//! wrong starting or talking to a server ([`ServeError`]).

/// A request this server will not read, with the status it is answered with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The request line is not `METHOD /target HTTP/1.x`.
    #[error("malformed request line: expected `METHOD /path HTTP/1.1`")]
    BadRequestLine,
    /// Only HTTP/1.0 and 1.1 are spoken.
    #[error("unsupported protocol {0}: this server speaks HTTP/1.1")]
    Version(String),
    /// A header line without `name: value`.
    #[error("malformed header line: expected `Name: value`")]
    BadHeader,
    /// Request line plus headers over the limit.
    #[error("request line and headers exceed {limit} bytes")]
    HeadTooLarge {
        /// The limit.
        limit: usize,
    },
    /// Too many header lines.
    #[error("more than {limit} header lines")]
    TooManyHeaders {
        /// The limit.
        limit: usize,
    },
    /// `Transfer-Encoding` bodies are not read.
    #[error("chunked request bodies are not accepted: send a Content-Length")]
    Chunked,
    /// `Content-Length` is not one non-negative integer.
    #[error("bad Content-Length ({0}): expected one non-negative integer")]
    BadLength(String),
    /// The body is larger than the limit.
    #[error("request body of {len} bytes exceeds the {limit}-byte limit")]
    BodyTooLarge {
        /// Declared length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The connection ended inside a request.
    #[error("the request ended early (connection closed inside the request)")]
    Truncated,
    /// A `%XX` escape that is not hex, or text that is not UTF-8.
    #[error("bad percent-escape in the query (or it is not UTF-8)")]
    BadEscape,
    /// The client went quiet inside a request.
    #[error("timed out waiting for the rest of the request")]
    Timeout,
    /// The socket failed.
    #[error("connection error: {0}")]
    Io(#[source] std::io::Error),
}

/// `error: cause: cause's cause…`, for reports outside `anyhow`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

impl HttpError {
    /// Maps an I/O error met while reading a request.
    pub fn from_io(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Self::Truncated,
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Self::Timeout,
            _ => Self::Io(e),
        }
    }

    /// The status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            Self::Version(_) => 505,
            Self::HeadTooLarge { .. } | Self::TooManyHeaders { .. } => 431,
            Self::Chunked => 411,
            Self::BodyTooLarge { .. } => 413,
            Self::Timeout => 408,
            _ => 400,
        }
    }
}

/// Starting the server, or a client call to one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The listening socket could not be opened.
    #[error(
        "cannot listen on {addr} (is another server using the port? try --port 0 for a free one)"
    )]
    Bind {
        /// The address asked for.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A client-side socket error.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A response that is not HTTP/1.1 as this crate writes it.
    #[error("bad response from {addr}: {detail}")]
    BadResponse {
        /// The server.
        addr: String,
        /// What was wrong.
        detail: String,
    },
}
