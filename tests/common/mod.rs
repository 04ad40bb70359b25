//! Shared pieces of the HTTP test suites: backends, a raw HTTP/1.1 client, response helpers.

#![allow(dead_code, unreachable_pub)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use idem::{Idempotency, MemoryStore, RedisStore};
use idem_testkit::RedisServer;

/// Which store a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Memory,
    Redis,
}

/// A store and, for Redis, the server behind it (stopped when dropped).
pub struct Backend {
    pub idem: Idempotency,
    pub server: Option<RedisServer>,
}

impl Backend {
    pub fn new(kind: Kind) -> Self {
        Self::with(kind, |i| i)
    }

    pub fn with(kind: Kind, configure: impl FnOnce(Idempotency) -> Idempotency) -> Self {
        match kind {
            Kind::Memory => Self {
                idem: configure(Idempotency::new(MemoryStore::new())),
                server: None,
            },
            Kind::Redis => {
                let server = RedisServer::start();
                let pool = idem::deadpool_redis::Config::from_url(server.url())
                    .create_pool(Some(idem::deadpool_redis::Runtime::Tokio1))
                    .expect("pool");
                let store = RedisStore::builder(pool)
                    .timeout(Duration::from_millis(500))
                    .build();
                Self {
                    idem: configure(Idempotency::new(store)),
                    server: Some(server),
                }
            }
        }
    }

    pub fn redis(&mut self) -> &mut RedisServer {
        self.server.as_mut().expect("a Redis backend")
    }
}

/// Instantiates async test functions `fn(Kind)` once per store backend.
#[macro_export]
macro_rules! on_every_store {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[actix_rt::test]
                async fn $test() {
                    super::$test($crate::common::Kind::Memory).await
                }
            )*
        }
        mod redis {
            $(
                #[actix_rt::test]
                async fn $test() {
                    super::$test($crate::common::Kind::Redis).await
                }
            )*
        }
    };
}

/// A response read off the wire.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one HTTP/1.1 request over a fresh connection and reads the whole response.
pub fn raw_request(addr: std::net::SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream.write_all(request).expect("write request");
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).expect("read response");
    parse_response(&buf)
}

/// Parses a `Connection: close` HTTP/1.1 response with a Content-Length body.
pub fn parse_response(buf: &[u8]) -> RawResponse {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    let head = String::from_utf8_lossy(&buf[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    RawResponse {
        status,
        headers,
        body: buf[split + 4..].to_vec(),
    }
}

/// Builds a `POST` request with a JSON body.
pub fn post(path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    )
    .into_bytes();
    for (n, v) in headers {
        req.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    req
}
