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
                idem: configure(Idempotency::new(MemoryStore::isolated())),
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

// ---------------------------------------------------------------------------------------------
// Real servers, real clients: helpers of the reliability suites (`tests/reliability*.rs`).
// ---------------------------------------------------------------------------------------------

/// A `RedisStore` over its own pool on `server`, with a store-call `timeout`: a second store on the
/// same server is a second app instance.
pub fn redis_store(server: &RedisServer, timeout: Duration) -> RedisStore {
    let pool = idem::deadpool_redis::Config::from_url(server.url())
        .create_pool(Some(idem::deadpool_redis::Runtime::Tokio1))
        .expect("pool");
    RedisStore::builder(pool).timeout(timeout).build()
}

/// An actix-web `HttpServer` on a free loopback port, two workers, stopped when dropped. Start it
/// inside an actix system (`#[actix_rt::test]`).
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    handle: actix_web::dev::ServerHandle,
}

impl TestServer {
    /// Serves an `App` with `idem` registered and the routes and data `configure` adds.
    pub fn start(
        idem: Idempotency,
        configure: impl Fn(&mut actix_web::web::ServiceConfig) + Send + Clone + 'static,
    ) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = actix_web::HttpServer::new(move || {
            actix_web::App::new()
                .app_data(idem.clone())
                .configure(configure.clone())
        })
        .workers(2)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)
        .expect("listen")
        .run();
        let handle = server.handle();
        actix_rt::spawn(server);
        Self { addr, handle }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // `stop` sends its command at once; the future only waits for the workers to finish.
        drop(self.handle.stop(false));
    }
}

/// [`raw_request`] off the async runtime.
pub async fn send(addr: std::net::SocketAddr, request: Vec<u8>) -> RawResponse {
    tokio::task::spawn_blocking(move || raw_request(addr, &request))
        .await
        .expect("client thread")
}

/// A `POST` of `body` to `path` with an `Idempotency-Key`, through [`send`].
pub async fn post_keyed(
    addr: std::net::SocketAddr,
    path: &str,
    key: &str,
    body: &[u8],
) -> RawResponse {
    send(addr, post(path, &[("idempotency-key", key)], body)).await
}

/// Sends one request and reads whatever comes back within `timeout`: `Err` when no complete
/// response head arrived (the server hung, or closed the connection without answering). A write
/// error is ignored so that an early answer (413 before the whole body was read) is still read.
pub fn try_request(
    addr: std::net::SocketAddr,
    request: &[u8],
    timeout: Duration,
) -> Result<RawResponse, String> {
    exchange(addr, request, timeout, false)
}

/// [`try_request`] for a request that is cut short: the client closes its sending side after
/// `request`, so a server waiting for the rest of the body sees it end.
pub fn try_truncated_request(
    addr: std::net::SocketAddr,
    request: &[u8],
    timeout: Duration,
) -> Result<RawResponse, String> {
    exchange(addr, request, timeout, true)
}

fn exchange(
    addr: std::net::SocketAddr,
    request: &[u8],
    timeout: Duration,
    half_close: bool,
) -> Result<RawResponse, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(timeout)).expect("timeout");
    stream.set_write_timeout(Some(timeout)).expect("timeout");
    let wrote = stream.write_all(request);
    if half_close {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    let mut buf = Vec::new();
    let read = stream.read_to_end(&mut buf);
    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
        return Ok(parse_response(&buf));
    }
    Err(format!(
        "no response (write: {wrote:?}, read: {read:?}, {} bytes)",
        buf.len()
    ))
}

/// [`try_request`] off the async runtime.
pub async fn send_within(
    addr: std::net::SocketAddr,
    request: Vec<u8>,
    timeout: Duration,
) -> Result<RawResponse, String> {
    tokio::task::spawn_blocking(move || try_request(addr, &request, timeout))
        .await
        .expect("client thread")
}

/// Sends `n` copies of `request` at the same moment, each from its own thread over its own
/// connection, and returns every answer.
pub async fn send_concurrently(
    addrs: &[std::net::SocketAddr],
    request: Vec<u8>,
    n: usize,
) -> Vec<RawResponse> {
    let addrs = addrs.to_vec();
    tokio::task::spawn_blocking(move || {
        let start = std::sync::Arc::new(std::sync::Barrier::new(n));
        let clients: Vec<_> = (0..n)
            .map(|i| {
                let start = std::sync::Arc::clone(&start);
                let request = request.clone();
                let addr = addrs[i % addrs.len()];
                std::thread::spawn(move || {
                    start.wait();
                    raw_request(addr, &request)
                })
            })
            .collect();
        clients
            .into_iter()
            .map(|c| c.join().expect("client thread"))
            .collect()
    })
    .await
    .expect("clients")
}

/// Hygiene: every key in `server` has a TTL, and none is longer than `ttl`.
pub async fn assert_every_key_expires_within(server: &RedisServer, ttl: Duration) {
    use idem::redis::AsyncCommands as _;
    let client = idem::redis::Client::open(server.url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect for SCAN");
    let limit = i64::try_from(ttl.as_millis()).expect("ttl in ms");
    let mut cursor = 0u64;
    let mut seen = 0usize;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = idem::redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .expect("SCAN");
        for key in keys {
            let pttl: i64 = conn.pttl(&key).await.expect("PTTL");
            let name = String::from_utf8_lossy(&key);
            // -2: expired between SCAN and PTTL; -1: no expiry at all.
            assert_ne!(pttl, -1, "{name} never expires");
            assert!(
                pttl <= limit,
                "{name} expires in {pttl} ms, after the configured ttl of {limit} ms"
            );
            seen += 1;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    eprintln!("hygiene: {seen} key(s), each with a TTL of at most {ttl:?}");
}

/// Polls `check` every `every` until it answers `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, every: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}
