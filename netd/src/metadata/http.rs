//! Just enough HTTP/1.x for the metadata service, sans-IO: [`parse`] reads
//! one request from the bytes a connection has received so far, and
//! [`Response::to_bytes`] writes the answer. Everything is bounded; input
//! never makes it panic.

use std::fmt::Write as _;

/// Largest request line plus headers.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest body (the service reads none; a client may still send one).
pub const MAX_BODY: usize = 4 * 1024;
/// Most headers in one request.
pub const MAX_HEADERS: usize = 64;

/// A request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The method, as sent (methods are case-sensitive).
    pub method: String,
    /// The path of the target, without its query.
    pub path: String,
    /// The headers in order, names as sent.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// The value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether a header named `name` is present.
    pub fn has(&self, name: &str) -> bool {
        self.header(name).is_some()
    }
}

/// What the bytes received so far are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet.
    Partial,
    /// A request, `len` bytes with its body.
    Complete {
        /// The request.
        request: Request,
        /// How many bytes it took.
        len: usize,
    },
    /// Not a request this server accepts; answer with this status and close.
    Bad(Status),
}

/// The statuses the service answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// 200.
    Ok,
    /// 400.
    BadRequest,
    /// 401.
    Unauthorized,
    /// 403.
    Forbidden,
    /// 404.
    NotFound,
    /// 405.
    MethodNotAllowed,
    /// 408: the request did not arrive in time.
    RequestTimeout,
    /// 413.
    PayloadTooLarge,
    /// 431.
    HeadersTooLarge,
    /// 500.
    Internal,
    /// 501: a transfer coding.
    NotImplemented,
    /// 505.
    VersionNotSupported,
}

impl Status {
    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::Unauthorized => 401,
            Status::Forbidden => 403,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::RequestTimeout => 408,
            Status::PayloadTooLarge => 413,
            Status::HeadersTooLarge => 431,
            Status::Internal => 500,
            Status::NotImplemented => 501,
            Status::VersionNotSupported => 505,
        }
    }

    /// The reason phrase.
    pub fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::Unauthorized => "Unauthorized",
            Status::Forbidden => "Forbidden",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::RequestTimeout => "Request Timeout",
            Status::PayloadTooLarge => "Payload Too Large",
            Status::HeadersTooLarge => "Request Header Fields Too Large",
            Status::Internal => "Internal Server Error",
            Status::NotImplemented => "Not Implemented",
            Status::VersionNotSupported => "HTTP Version Not Supported",
        }
    }
}

/// An answer; always `Connection: close`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The status.
    pub status: Status,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Further headers.
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A `text/plain` answer.
    pub fn text(status: Status, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            content_type: "text/plain",
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// An error answer whose body is its reason phrase.
    pub fn error(status: Status) -> Self {
        Self::text(status, status.reason())
    }

    /// With a further header.
    pub fn with(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = String::with_capacity(160);
        let s = self.status;
        // Writing to a String cannot fail.
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            s.code(),
            s.reason(),
            self.content_type,
            self.body.len()
        );
        for (n, v) in &self.headers {
            let _ = write!(head, "{n}: {v}\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// Where the head (request line and headers) ends: the index after its
/// blank line. Lines end in LF, optionally preceded by CR.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(off) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + off;
        let line = &buf[i..nl];
        if line.is_empty() || line == b"\r" {
            return Some(nl + 1);
        }
        i = nl + 1;
    }
    None
}

/// Whether `b` may be in a header name or method (RFC 9110 `tchar`).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// One request from the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    let Some(end) = head_end(&buf[..buf.len().min(MAX_HEAD)]) else {
        return if buf.len() >= MAX_HEAD {
            Parsed::Bad(Status::HeadersTooLarge)
        } else {
            Parsed::Partial
        };
    };
    let (request, body_len) = match parse_head(&buf[..end]) {
        Ok(r) => r,
        Err(status) => return Parsed::Bad(status),
    };
    if body_len > MAX_BODY {
        return Parsed::Bad(Status::PayloadTooLarge);
    }
    let len = end + body_len;
    if buf.len() < len {
        return Parsed::Partial;
    }
    Parsed::Complete { request, len }
}

/// The request and its body's length from a whole head.
fn parse_head(head: &[u8]) -> Result<(Request, usize), Status> {
    let text = std::str::from_utf8(head).map_err(|_| Status::BadRequest)?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let (method, path) = request_line(lines.next().unwrap_or(""))?;
    let mut headers = Vec::new();
    for line in lines.take_while(|l| !l.is_empty()) {
        if headers.len() == MAX_HEADERS {
            return Err(Status::HeadersTooLarge);
        }
        headers.push(header_line(line)?);
    }
    let request = Request {
        method,
        path,
        headers,
    };
    let body_len = body_len(&request)?;
    Ok((request, body_len))
}

fn request_line(line: &str) -> Result<(String, String), Status> {
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Status::BadRequest);
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(Status::BadRequest);
    }
    match version {
        "HTTP/1.1" | "HTTP/1.0" => {}
        v if v.starts_with("HTTP/") => return Err(Status::VersionNotSupported),
        _ => return Err(Status::BadRequest),
    }
    // Origin form only: the service is no proxy.
    if !target.starts_with('/') || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Status::BadRequest);
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Ok((method.to_string(), path.to_string()))
}

fn header_line(line: &str) -> Result<(String, String), Status> {
    // No obsolete line folding, no space before the colon.
    let (name, value) = line.split_once(':').ok_or(Status::BadRequest)?;
    if name.is_empty() || !name.bytes().all(is_tchar) {
        return Err(Status::BadRequest);
    }
    if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
        return Err(Status::BadRequest);
    }
    Ok((
        name.to_string(),
        value.trim_matches([' ', '\t']).to_string(),
    ))
}

/// The body's length: `Content-Length` (all copies equal) or none; a
/// transfer coding is not implemented.
fn body_len(req: &Request) -> Result<usize, Status> {
    if req.has("transfer-encoding") {
        return Err(Status::NotImplemented);
    }
    let mut len = None;
    for (_, v) in req
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Status::BadRequest);
        }
        // Longer than any allowed body: only its size matters.
        let n = v.parse::<usize>().unwrap_or(usize::MAX);
        if len.is_some_and(|l| l != n) {
            return Err(Status::BadRequest);
        }
        len = Some(n);
    }
    Ok(len.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> (Request, usize) {
        match parse(buf) {
            Parsed::Complete { request, len } => (request, len),
            other => panic!("{other:?} for {:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn bad(buf: &[u8]) -> Status {
        match parse(buf) {
            Parsed::Bad(s) => s,
            other => panic!("{other:?} for {:?}", String::from_utf8_lossy(buf)),
        }
    }

    #[test]
    fn parses_a_request_with_headers() {
        let raw = b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n\
            X-aws-ec2-metadata-token-ttl-seconds:  21600 \r\n\r\nextra";
        let (r, len) = complete(raw);
        assert_eq!(len, raw.len() - 5);
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/latest/api/token");
        assert_eq!(
            r.header("x-AWS-ec2-metadata-token-ttl-seconds"),
            Some("21600")
        );
        assert!(r.has("host"));
        assert!(!r.has("x-forwarded-for"));
    }

    #[test]
    fn bare_lf_query_and_body() {
        let raw = b"GET /latest/meta-data/?x=1#f HTTP/1.0\nA: b\n\n";
        let (r, len) = complete(raw);
        assert_eq!(r.path, "/latest/meta-data/");
        assert_eq!(len, raw.len());
        let raw = b"PUT / HTTP/1.1\r\nContent-Length: 3\r\n\r\nab";
        assert_eq!(parse(raw), Parsed::Partial);
        let mut raw = raw.to_vec();
        raw.push(b'c');
        assert_eq!(complete(&raw).1, raw.len());
    }

    #[test]
    fn partial_until_the_blank_line() {
        let full = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n";
        for n in 0..full.len() {
            assert_eq!(parse(&full[..n]), Parsed::Partial, "at {n}");
        }
        complete(full);
    }

    #[test]
    fn malformed_requests_are_400() {
        for raw in [
            &b"\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET /\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1 x\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET http://169.254.169.254/ HTTP/1.1\r\n\r\n",
            b"GET /a\x01 HTTP/1.1\r\n\r\n",
            b"GET / FTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nNo colon\r\n\r\n",
            b"GET / HTTP/1.1\r\nName : v\r\n\r\n",
            b"GET / HTTP/1.1\r\n: v\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: \xff\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length:\r\n\r\n",
        ] {
            assert_eq!(
                bad(raw),
                Status::BadRequest,
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn other_limits() {
        assert_eq!(bad(b"GET / HTTP/2\r\n\r\n"), Status::VersionNotSupported);
        assert_eq!(
            bad(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Status::NotImplemented
        );
        assert_eq!(
            bad(b"PUT / HTTP/1.1\r\nContent-Length: 4097\r\n\r\n"),
            Status::PayloadTooLarge
        );
        assert_eq!(
            bad(b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            Status::PayloadTooLarge
        );
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("H{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(bad(&many), Status::HeadersTooLarge);
    }

    #[test]
    fn huge_heads_are_431_whether_or_not_they_end() {
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_HEAD, b'a');
        assert_eq!(bad(&huge), Status::HeadersTooLarge);
        huge.extend_from_slice(b"\r\n\r\n");
        assert_eq!(bad(&huge), Status::HeadersTooLarge);
        // Just under the bound is fine.
        let mut ok = b"GET / HTTP/1.1\r\nX: ".to_vec();
        ok.resize(MAX_HEAD - 4, b'a');
        ok.extend_from_slice(b"\r\n\r\n");
        complete(&ok);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every prefix of mangled requests.
        let mut x: u32 = 0x1234_5678;
        let seed = b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: 2\r\nA: b\r\n\r\nok";
        for _ in 0..2000 {
            let mut v = seed.to_vec();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let i = x as usize % v.len();
                v[i] = (x >> 8) as u8;
            }
            for n in 0..v.len() {
                let _ = parse(&v[..n]);
            }
        }
    }

    #[test]
    fn responses_are_framed() {
        let r = Response::text(Status::Ok, "abc").with("X-Y", "1");
        assert_eq!(
            String::from_utf8(r.to_bytes()).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\
             Connection: close\r\nX-Y: 1\r\n\r\nabc"
        );
        let e = Response::error(Status::HeadersTooLarge).to_bytes();
        assert!(e.starts_with(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"));
    }
}
