//! A minimal HTTP/1.1 client for checking endpoints and seeding records (one request per
//! connection; the load itself comes from wrk).

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

/// The request body the load sends too (see `wrk::SCRIPT`).
const BODY: &str = r#"{"amount":1999,"currency":"eur","customer":"cus_9s6XKzkNRiz8i3"}"#;

/// A response.
pub(crate) struct Response {
    pub(crate) status: u16,
    headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (lower case).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// POSTs the payment body to `path` with `Idempotency-Key: key`.
pub(crate) fn post(port: u16, path: &str, key: &str) -> Result<Response, String> {
    send(port, path, Some(key))
}

/// POSTs the payment body without a key; returns the status.
pub(crate) fn post_without_key(port: u16, path: &str) -> Result<u16, String> {
    send(port, path, None).map(|r| r.status)
}

fn send(port: u16, path: &str, key: Option<&str>) -> Result<Response, String> {
    let err = |e: std::io::Error| format!("POST {path}: {e}");
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(err)?;
    let key = key.map_or(String::new(), |k| format!("Idempotency-Key: {k}\r\n"));
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Authorization: Bearer {account}\r\n{key}Content-Length: {len}\r\nConnection: close\r\n\r\n{BODY}",
        account = crate::ACCOUNT,
        len = BODY.len(),
    );
    s.write_all(req.as_bytes()).map_err(err)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(err)?;
    parse(&raw).ok_or_else(|| format!("POST {path}: unreadable response"))
}

fn parse(raw: &[u8]) -> Option<Response> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some(Response {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}
