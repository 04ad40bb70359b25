//! Bad input over real HTTP: hundreds of malformed keys, bodies, content types, content encodings
//! and framings, sent over raw TCP to a real `HttpServer`. Every request gets an answer, none a
//! 5xx, and the server keeps serving. Oversized bodies get 413, declared (Content-Length) or not
//! (chunked), and leave nothing behind.
//!
//! The random cases come from a fixed seed (printed, and overridable with `IDEM_INPUT_SEED`), so a
//! failure replays.

mod common;

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use actix_web::{web, HttpResponse};
use common::{assert_every_key_expires_within, send, Backend, Kind, RawResponse, TestServer};
use idem::{idempotent, ScopeId};
use rand::{rngs::StdRng, Rng, SeedableRng};

const TTL: Duration = Duration::from_secs(60);
const MAX_BODY: usize = 4096;
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Executions(AtomicU64);

#[idempotent(max_body = "4KiB")]
async fn json(runs: web::Data<Executions>, body: web::Json<serde_json::Value>) -> HttpResponse {
    runs.0.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Created().json(serde_json::json!({ "fields": body.as_object().map(|o| o.len()) }))
}

#[idempotent(require_key, max_body = "4KiB")]
async fn bytes(runs: web::Data<Executions>, body: web::Bytes) -> HttpResponse {
    runs.0.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Created().body(format!("{} bytes", body.len()))
}

#[idempotent(require_key, max_body = "4KiB")]
async fn text(runs: web::Data<Executions>, body: String) -> HttpResponse {
    runs.0.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Created().body(format!("{} chars", body.chars().count()))
}

/// One raw request: `headers` are written as given (bytes, duplicates and all).
fn raw(path: &str, headers: &[(&[u8], &[u8])], body: &[u8], content_length: bool) -> Vec<u8> {
    let mut req =
        format!("POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n").into_bytes();
    if content_length {
        req.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    for (name, value) in headers {
        req.extend_from_slice(name);
        req.extend_from_slice(b": ");
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    req
}

fn chunked(path: &str, headers: &[(&[u8], &[u8])], body: &[u8], chunk: usize) -> Vec<u8> {
    let mut all: Vec<(&[u8], &[u8])> = vec![(b"Transfer-Encoding", b"chunked")];
    all.extend_from_slice(headers);
    let mut req = raw(path, &all, b"", false);
    for part in body.chunks(chunk.max(1)) {
        req.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        req.extend_from_slice(part);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    req
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}

/// Bytes a header value may hold: visible ASCII, space, tab, obs-text.
fn header_byte(rng: &mut StdRng) -> u8 {
    match rng.random_range(0..10) {
        0 => b'\t',
        1 => b' ',
        2 | 3 => rng.random_range(0x80..=0xff),
        4 => *b"\"\\,;=".get(rng.random_range(0..5)).unwrap_or(&b'"'),
        _ => rng.random_range(0x21..=0x7e),
    }
}

fn header_value(rng: &mut StdRng, max_len: usize) -> Vec<u8> {
    let len = rng.random_range(0..=max_len);
    (0..len).map(|_| header_byte(rng)).collect()
}

/// What came back for each case, and the cases that broke the rules.
#[derive(Default)]
struct Tally {
    statuses: BTreeMap<u16, usize>,
    closed: usize,
    sent: usize,
    failures: Vec<String>,
}

impl Tally {
    /// The request must get an answer below 500.
    fn answered(&mut self, case: &str, answer: Result<RawResponse, String>) {
        self.sent += 1;
        match answer {
            Ok(r) if r.status < 500 => *self.statuses.entry(r.status).or_default() += 1,
            Ok(r) => self.failures.push(format!(
                "{case}: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            )),
            Err(e) => self.failures.push(format!("{case}: {e}")),
        }
    }

    /// Malformed framing: the server may answer (below 500) or close the connection, but must
    /// not hang.
    fn answered_or_closed(
        &mut self,
        case: &str,
        took: Duration,
        answer: Result<RawResponse, String>,
    ) {
        match answer {
            Err(_) if took < TIMEOUT - Duration::from_secs(1) => {
                self.sent += 1;
                self.closed += 1;
            }
            other => self.answered(case, other),
        }
    }
}

async fn exchange(
    addr: SocketAddr,
    request: Vec<u8>,
    truncated: bool,
) -> (Duration, Result<RawResponse, String>) {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let answer = if truncated {
            common::try_truncated_request(addr, &request, TIMEOUT)
        } else {
            common::try_request(addr, &request, TIMEOUT)
        };
        (started.elapsed(), answer)
    })
    .await
    .expect("client")
}

async fn malformed_input_never_gets_a_5xx(kind: Kind) {
    let backend = Backend::with(kind, |i| {
        i.ttl(TTL).scope_resolver(|req| {
            let client = req.headers().get("x-client").map(|v| v.as_bytes());
            Ok(ScopeId::new(String::from_utf8_lossy(
                client.unwrap_or(b"anonymous"),
            )))
        })
    });
    let runs = web::Data::new(Executions::default());
    let data = runs.clone();
    let server = TestServer::start(backend.idem.clone(), move |cfg| {
        cfg.app_data(data.clone())
            .route("/json", web::post().to(json))
            .route("/bytes", web::post().to(bytes))
            .route("/text", web::post().to(text));
    });
    let addr = server.addr;
    let seed = std::env::var("IDEM_INPUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x01de_5eed);
    eprintln!("bad input seed: {seed} (IDEM_INPUT_SEED)");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tally = Tally::default();
    let json_ct: (&[u8], &[u8]) = (b"Content-Type", b"application/json");
    let valid = br#"{"amount":100,"currency":"EUR"}"#;

    // Keys: random header values, then the edges of the quoted and bare forms.
    let mut keys: Vec<Vec<u8>> = (0..250)
        .map(|i| header_value(&mut rng, if i % 5 == 0 { 400 } else { 40 }))
        .collect();
    for edge in [
        "",
        " ",
        "\t",
        "\"\"",
        "\"",
        "\"\"\"",
        "\"a",
        "a\"",
        "\"a\"b",
        "\"a\\\"b\"",
        "\"\\\"",
        "\"a\\",
        "\"\\a\"",
        " a ",
        "\"a\" ",
        " \"a\"",
        "a,b",
        "\"a\", \"b\"",
        "a;b=c",
        "\"a b\"",
        "a b",
        "ключ",
        "%00",
        "*",
        "\"*\"",
        "(a)",
        "{a}",
        "[a]",
        "a\\b",
        "\"a\\\\b\"",
    ] {
        keys.push(edge.as_bytes().to_vec());
    }
    for len in [254, 255, 256, 1000, 8000] {
        keys.push(vec![b'k'; len]);
        let mut quoted = vec![b'"'];
        quoted.extend(std::iter::repeat_n(b'q', len));
        quoted.push(b'"');
        keys.push(quoted);
    }
    for (i, key) in keys.iter().enumerate() {
        let path = ["/bytes", "/json", "/text"][i % 3];
        let req = raw(path, &[json_ct, (b"Idempotency-Key", key)], valid, true);
        let (_, answer) = exchange(addr, req, false).await;
        tally.answered(&format!("key {:?}", String::from_utf8_lossy(key)), answer);
    }
    // Duplicated key header lines, and headers that are not valid header values at all.
    let duplicates: [&[&[u8]]; 6] = [
        &[b"a", b"a"],
        &[b"a", b"b"],
        &[b"", b"a"],
        &[b"\"a\"", b"a"],
        &[b"a", b"b", b"c"],
        &[b"a, b", b"c"],
    ];
    for lines in duplicates {
        let mut headers = vec![json_ct];
        headers.extend(lines.iter().map(|l| (&b"Idempotency-Key"[..], *l)));
        let (_, answer) = exchange(addr, raw("/bytes", &headers, valid, true), false).await;
        tally.answered(&format!("key lines {lines:?}"), answer);
    }
    for bad in [&b"a\x00b"[..], b"a\x7fb", b"a\x1bb", b"\x01"] {
        let req = raw("/bytes", &[json_ct, (b"Idempotency-Key", bad)], valid, true);
        let (took, answer) = exchange(addr, req, false).await;
        tally.answered_or_closed(&format!("control bytes {bad:?}"), took, answer);
    }

    // Bodies: random bytes, every truncation of a JSON document, deep nesting, invalid UTF-8.
    let document = br#"{"amount":100,"currency":"EUR","lines":[{"sku":"a","n":1},{"sku":"b","n":2}],"note":"\u00e9\n"}"#;
    let mut bodies: Vec<Vec<u8>> = (0..document.len())
        .map(|n| document[..n].to_vec())
        .collect();
    for _ in 0..60 {
        let len = rng.random_range(0..3000);
        bodies.push((0..len).map(|_| rng.random()).collect());
    }
    bodies.push(vec![b'['; 4000]);
    bodies.push([&b"{\"a\":"[..], &vec![b'{'; 2000], b"}"].concat());
    bodies.push(b"{\"note\":\"\xff\xfe\"}".to_vec());
    bodies.push(b"\xef\xbb\xbf{}".to_vec());
    bodies.push(b"null".to_vec());
    bodies.push(b"1e999999".to_vec());
    for (i, body) in bodies.iter().enumerate() {
        let key = format!("body-{i}");
        let path = ["/json", "/text", "/bytes"][i % 3];
        let req = raw(
            path,
            &[json_ct, (b"Idempotency-Key", key.as_bytes())],
            body,
            true,
        );
        let (_, answer) = exchange(addr, req, false).await;
        tally.answered(&format!("body #{i} on {path}"), answer);
    }

    // Content types.
    let long_type = format!("application/{}", "x".repeat(5000));
    let content_types: Vec<&[u8]> = vec![
        b"",
        b"application/json",
        b"application/json; charset=utf-16",
        b"application/json; charset=\"",
        b"text/plain",
        b"text/plain; charset=nonsense",
        b"multipart/form-data",
        b"application/x-www-form-urlencoded",
        b";;;",
        b"/",
        b"application/json\xff",
        long_type.as_bytes(),
    ];
    for (i, ct) in content_types.iter().enumerate() {
        for path in ["/json", "/text", "/bytes"] {
            let key = format!("ct-{i}{path}");
            let req = raw(
                path,
                &[(b"Content-Type", ct), (b"Idempotency-Key", key.as_bytes())],
                valid,
                true,
            );
            let (_, answer) = exchange(addr, req, false).await;
            tally.answered(
                &format!("content type {:?} on {path}", String::from_utf8_lossy(ct)),
                answer,
            );
        }
    }

    // Content encodings: bodies that are not what they claim, unknown codings, a gzip bomb.
    let gz = gzip(valid);
    let bomb = gzip(&vec![b' '; 3 * 1024 * 1024]);
    assert!(
        bomb.len() < MAX_BODY,
        "the bomb fits under max_body: {}",
        bomb.len()
    );
    let encodings: Vec<(&[u8], Vec<u8>)> = vec![
        (b"gzip", valid.to_vec()),
        (b"gzip", gz.clone()),
        (b"gzip", gz[..gz.len() / 2].to_vec()),
        (b"gzip", bomb),
        (b"deflate", valid.to_vec()),
        (b"br", valid.to_vec()),
        (b"zstd", valid.to_vec()),
        (b"x-unknown", valid.to_vec()),
        (b"gzip, gzip", gz.clone()),
        (b"gzip, identity", gz),
        (b"identity", valid.to_vec()),
        (b"", valid.to_vec()),
        (b"\xffgzip", valid.to_vec()),
    ];
    for (i, (encoding, body)) in encodings.iter().enumerate() {
        for path in ["/json", "/text", "/bytes"] {
            let key = format!("ce-{i}{path}");
            let req = raw(
                path,
                &[
                    json_ct,
                    (b"Content-Encoding", encoding),
                    (b"Idempotency-Key", key.as_bytes()),
                ],
                body,
                true,
            );
            let (_, answer) = exchange(addr, req, false).await;
            tally.answered(
                &format!("encoding {:?} on {path}", String::from_utf8_lossy(encoding)),
                answer,
            );
        }
    }

    // Framing: lies about the length, broken chunking, bodies cut short.
    let key: (&[u8], &[u8]) = (b"Idempotency-Key", b"framing");
    let mut lie = raw("/bytes", &[json_ct, key], valid, false);
    lie.splice(
        lie.len() - valid.len() - 2..lie.len() - valid.len() - 2,
        *b"Content-Length: 999\r\n",
    );
    let framings: Vec<(&str, Vec<u8>, bool)> = vec![
        ("content-length longer than the body", lie, true),
        (
            "chunked cut short",
            chunked("/bytes", &[json_ct, key], valid, 7)[..40].to_vec(),
            true,
        ),
        (
            "chunk size not hex",
            [
                raw(
                    "/bytes",
                    &[json_ct, key, (b"Transfer-Encoding", b"chunked")],
                    b"",
                    false,
                ),
                b"zz\r\nabc\r\n0\r\n\r\n".to_vec(),
            ]
            .concat(),
            true,
        ),
        (
            "chunk size huge",
            [
                raw(
                    "/bytes",
                    &[json_ct, key, (b"Transfer-Encoding", b"chunked")],
                    b"",
                    false,
                ),
                b"ffffffffffffffffff\r\nabc\r\n".to_vec(),
            ]
            .concat(),
            true,
        ),
        (
            "content-length and chunked",
            [
                raw(
                    "/bytes",
                    &[json_ct, key, (b"Transfer-Encoding", b"chunked")],
                    b"",
                    true,
                ),
                b"0\r\n\r\n".to_vec(),
            ]
            .concat(),
            true,
        ),
        (
            "two content-lengths",
            raw(
                "/bytes",
                &[json_ct, key, (b"Content-Length", b"3")],
                valid,
                true,
            ),
            true,
        ),
        (
            "negative content-length",
            raw(
                "/bytes",
                &[json_ct, key, (b"Content-Length", b"-1")],
                b"",
                false,
            ),
            true,
        ),
    ];
    for (case, req, truncated) in framings {
        let (took, answer) = exchange(addr, req, truncated).await;
        tally.answered_or_closed(case, took, answer);
    }

    eprintln!(
        "{kind:?}: {} malformed requests: statuses {:?}, {} closed by the server",
        tally.sent, tally.statuses, tally.closed
    );
    assert!(tally.sent > 400, "hundreds of cases: {}", tally.sent);
    assert!(
        tally.failures.is_empty(),
        "{} request(s) got a 5xx or no answer:\n{}",
        tally.failures.len(),
        tally.failures.join("\n")
    );
    // The server is alive and well.
    let executed = runs.0.load(Ordering::SeqCst);
    let ok = send(
        addr,
        raw(
            "/json",
            &[json_ct, (b"Idempotency-Key", b"still-alive")],
            valid,
            true,
        ),
    )
    .await;
    assert_eq!(ok.status, 201);
    assert_eq!(runs.0.load(Ordering::SeqCst), executed + 1);
    if let Some(redis) = &backend.server {
        assert_every_key_expires_within(redis, TTL).await;
    }
}

/// Bodies over `max_body` get 413, whether their length is declared (Content-Length) or not
/// (chunked), and nothing is recorded: the same key with an acceptable body runs.
async fn oversized_bodies_are_413_and_leave_no_record(kind: Kind) {
    let backend = Backend::with(kind, |i| {
        i.ttl(TTL).scope_resolver(|_| Ok(ScopeId::new("c")))
    });
    let runs = web::Data::new(Executions::default());
    let data = runs.clone();
    let server = TestServer::start(backend.idem.clone(), move |cfg| {
        cfg.app_data(data.clone())
            .route("/bytes", web::post().to(bytes));
    });
    let addr = server.addr;
    let ct: (&[u8], &[u8]) = (b"Content-Type", b"application/octet-stream");
    let key: (&[u8], &[u8]) = (b"Idempotency-Key", b"big");
    let just_over = vec![b'x'; MAX_BODY + 1];
    let huge = vec![b'x'; 2 * 1024 * 1024];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "content-length, one byte over",
            raw("/bytes", &[ct, key], &just_over, true),
        ),
        (
            "content-length, 2 MiB",
            raw("/bytes", &[ct, key], &huge, true),
        ),
        (
            "content-length declared 1 TB",
            raw(
                "/bytes",
                &[ct, key, (b"Content-Length", b"1000000000000")],
                b"abc",
                false,
            ),
        ),
        (
            "chunked, one byte over",
            chunked("/bytes", &[ct, key], &just_over, 1000),
        ),
        (
            "chunked, one chunk over",
            chunked("/bytes", &[ct, key], &just_over, MAX_BODY + 1),
        ),
        (
            "chunked, 2 MiB",
            chunked("/bytes", &[ct, key], &huge, 64 * 1024),
        ),
    ];
    for (case, req) in cases {
        let (_, answer) = exchange(addr, req, false).await;
        let answer = answer.unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(
            answer.status,
            413,
            "{case}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        let problem: serde_json::Value = serde_json::from_slice(&answer.body).expect("problem");
        assert!(
            problem["type"]
                .as_str()
                .is_some_and(|t| t.ends_with("/body-too-large")),
            "{case}: {problem}"
        );
    }
    assert_eq!(runs.0.load(Ordering::SeqCst), 0);
    let fits = vec![b'x'; MAX_BODY];
    for req in [
        raw("/bytes", &[ct, key], &fits, true),
        chunked("/bytes", &[ct, key], &fits, 1000),
    ] {
        let (_, answer) = exchange(addr, req, false).await;
        let answer = answer.expect("an answer");
        assert_eq!(
            answer.status,
            201,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    assert_eq!(runs.0.load(Ordering::SeqCst), 1, "ran once, then replayed");
    if let Some(redis) = &backend.server {
        assert_every_key_expires_within(redis, TTL).await;
    }
}

on_every_store!(
    malformed_input_never_gets_a_5xx,
    oversized_bodies_are_413_and_leave_no_record,
);

/// A compressed body is inflated in bounded chunks under the handler's own limits: a gzip body
/// just under `max_body` that inflates to 1000 MiB costs the process a few MiB, not a GiB, and
/// gets the extractor's answer. Run against the `orders` example as a child process, so that its
/// peak resident memory (`VmHWM`) is its own.
mod compressed {
    use std::{
        io::Write as _,
        net::SocketAddr,
        process::{Child, Command, Stdio},
        time::{Duration, Instant},
    };

    use idem_testkit::free_port;

    use crate::common::{raw_request, try_request};
    use idem_testkit::example_binary;

    /// How much the bomb inflates to, in MiB.
    const INFLATED_MIB: usize = 1000;
    const CONCURRENT: usize = 3;
    /// The bound on the child's peak resident memory (debug build): 17 MiB measured, 2969 MiB
    /// before bodies were handed on in bounded chunks.
    const PEAK_LIMIT_KIB: u64 = 128 * 1024;

    /// The `orders` example on the in-memory store, killed when dropped.
    struct Orders {
        child: Child,
        addr: SocketAddr,
    }

    impl Orders {
        fn start() -> Self {
            let binary = example_binary("orders");
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
                .parse()
                .expect("an address");
            let child = Command::new(&binary)
                .env("BIND", addr.to_string())
                .env_remove("REDIS_URL")
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
            let mut orders = Self { child, addr };
            let deadline = Instant::now() + Duration::from_secs(20);
            while std::net::TcpStream::connect(addr).is_err() {
                if let Ok(Some(status)) = orders.child.try_wait() {
                    panic!("the orders example exited with {status} before it listened");
                }
                assert!(Instant::now() < deadline, "orders did not listen on {addr}");
                std::thread::sleep(Duration::from_millis(10));
            }
            orders
        }

        /// The peak resident set size so far, in KiB.
        fn peak_rss_kib(&self) -> u64 {
            let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
                .expect("/proc/<pid>/status (Linux)");
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .expect("a VmHWM line")
        }

        fn executions(&self) -> u64 {
            let stats = raw_request(
                self.addr,
                b"GET /stats HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
            );
            let stats: serde_json::Value = serde_json::from_slice(&stats.body).expect("stats");
            stats["executions"].as_u64().expect("executions")
        }
    }

    impl Drop for Orders {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// A valid gzip member of `mib` MiB of zeros, built without compressing all of it: one MiB
    /// is deflated and sync-flushed (byte-aligned, its matches reach back only into zeros), and
    /// the deflate blocks of the next MiB are repeated; the trailer's CRC-32 is combined per MiB.
    fn gzip_of_zeros(mib: usize) -> Vec<u8> {
        const MIB: usize = 1 << 20;
        let zeros = vec![0u8; MIB];
        let mut deflate =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        deflate.write_all(&zeros).expect("deflate");
        deflate.flush().expect("sync flush");
        let first = deflate.get_ref().len();
        deflate.write_all(&zeros).expect("deflate");
        deflate.flush().expect("sync flush");
        let repeat = deflate.get_ref()[first..].to_vec();
        for _ in 2..mib {
            deflate.get_mut().extend_from_slice(&repeat);
        }
        let deflate = deflate.finish().expect("deflate");
        let mut crc_mib = flate2::Crc::new();
        crc_mib.update(&zeros);
        let mut crc = flate2::Crc::new();
        for _ in 0..mib {
            crc.combine(&crc_mib);
        }
        let size = u32::try_from((mib * MIB) % (1 << 32)).expect("ISIZE is the size mod 2^32");
        let mut gz = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
        gz.extend_from_slice(&deflate);
        gz.extend_from_slice(&crc.sum().to_le_bytes());
        gz.extend_from_slice(&size.to_le_bytes());
        gz
    }

    #[test]
    fn a_gzip_bomb_is_refused_by_the_extractor_within_bounded_memory() {
        let bomb = gzip_of_zeros(INFLATED_MIB);
        assert!(
            bomb.len() < idem::Idempotency::DEFAULT_MAX_BODY,
            "the bomb ({} bytes) must be under max_body to reach the extractor",
            bomb.len()
        );
        let orders = Orders::start();
        let idle = orders.peak_rss_kib();
        let clients: Vec<_> = (0..CONCURRENT)
            .map(|i| {
                let mut req = format!(
                    "POST /orders HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
                     Authorization: Bearer alice\r\nIdempotency-Key: bomb-{i}\r\n\
                     Content-Type: application/json\r\nContent-Encoding: gzip\r\n\
                     Content-Length: {}\r\n\r\n",
                    bomb.len()
                )
                .into_bytes();
                req.extend_from_slice(&bomb);
                let addr = orders.addr;
                std::thread::spawn(move || try_request(addr, &req, Duration::from_secs(60)))
            })
            .collect();
        let mut statuses = Vec::new();
        for client in clients {
            let answer = client.join().expect("client").expect("an answer");
            statuses.push(answer.status);
            assert!(
                answer.status == 413 || answer.status == 400,
                "the extractor's refusal, not {} {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
        }
        let peak = orders.peak_rss_kib();
        println!(
            "gzip bomb ({} bytes inflating to {INFLATED_MIB} MiB) x {CONCURRENT}: peak RSS of \
             the orders process {} MiB (idle {} MiB), answers {statuses:?}",
            bomb.len(),
            peak / 1024,
            idle / 1024
        );
        assert!(
            peak < PEAK_LIMIT_KIB,
            "peak RSS {} MiB: the body was inflated far past the extractor's limit",
            peak / 1024
        );
        assert_eq!(orders.executions(), 0, "the process serves on; nothing ran");
    }
}
