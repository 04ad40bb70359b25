//! The paths a newcomer takes, on a real `HttpServer` and real connections: a response naming
//! hop-by-hop headers in `Connection`.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use actix_web::{http::header, post, web, HttpResponse};
use common::{raw_request, RawResponse, TestServer};
use idem::{idempotent, Idempotency, MemoryStore, ScopeId};

/// Executions of a handler, in this process.
#[derive(Default)]
struct Executions(AtomicU64);

impl Executions {
    fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The caller, from `X-Client`: the scope every app here resolves.
fn client(req: &actix_web::HttpRequest) -> Result<ScopeId, actix_web::Error> {
    req.headers()
        .get("x-client")
        .and_then(|v| v.to_str().ok())
        .map(ScopeId::new)
        .ok_or_else(|| actix_web::error::ErrorUnauthorized("send X-Client"))
}

/// One request on a fresh connection (so that the server hands it to its next worker).
fn post(addr: std::net::SocketAddr, path: &str, client: &str, key: &str) -> RawResponse {
    raw_request(
        addr,
        &common::post(
            path,
            &[("x-client", client), ("idempotency-key", key)],
            br#"{"amount":1000}"#,
        ),
    )
}

fn replayed(r: &RawResponse) -> bool {
    r.header("idempotent-replayed") == Some("true")
}

fn describe(r: &RawResponse) -> String {
    format!(
        "{} {:?} {}",
        r.status,
        r.headers,
        String::from_utf8_lossy(&r.body)
    )
}

/// A handler that names two of its response headers hop-by-hop, in two `Connection` lines.
#[post("/hop")]
#[idempotent(require_key)]
async fn hop(executions: web::Data<Executions>, _body: web::Bytes) -> HttpResponse {
    executions.0.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Created()
        .append_header((header::CONNECTION, "X-Trace-Hop"))
        .append_header((header::CONNECTION, " hop-two , keep-alive"))
        .append_header(("x-trace-hop", "this connection only"))
        .append_header(("hop-two", "this connection only"))
        .append_header(("x-kept", "end to end"))
        .body("hop")
}

/// Headers a response names in `Connection` are hop-by-hop (RFC 9110, 7.6.1): they describe the
/// first connection, and a replay on another connection does not carry them. The other headers
/// are replayed.
#[actix_rt::test]
async fn headers_named_in_connection_are_not_replayed() {
    let executions = web::Data::new(Executions::default());
    let data = executions.clone();
    let server = TestServer::start(
        Idempotency::new(MemoryStore::new()).scope_resolver(client),
        move |cfg| {
            cfg.app_data(data.clone()).service(hop);
        },
    );
    let addr = server.addr;
    let (first, again) = tokio::task::spawn_blocking(move || {
        (
            post(addr, "/hop", "hop-by-hop", "h"),
            post(addr, "/hop", "hop-by-hop", "h"),
        )
    })
    .await
    .expect("client thread");
    assert_eq!(first.status, 201, "{}", describe(&first));
    assert!(replayed(&again), "{}", describe(&again));
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("x-kept"), Some("end to end"));
    let leaked: Vec<&str> = ["x-trace-hop", "hop-two"]
        .into_iter()
        .filter(|name| again.header(name).is_some())
        .collect();
    println!("hop-by-hop headers named in Connection, replayed: {leaked:?}");
    assert!(
        leaked.is_empty(),
        "replayed: {leaked:?}: {}",
        describe(&again)
    );
    assert_eq!(executions.get(), 1);
}
