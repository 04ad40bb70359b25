//! The paths a newcomer takes, on a real `HttpServer` and real connections: a response naming
//! hop-by-hop headers in `Connection`, paths that differ only in their percent-encoding.

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

/// Any payment path: `/acct/{id}/pay`, and `/files/{tail}` whose tail may hold `/`.
async fn paid(executions: web::Data<Executions>, _body: web::Bytes) -> HttpResponse {
    let n = executions.0.fetch_add(1, Ordering::SeqCst) + 1;
    HttpResponse::Created().body(format!("execution {n}"))
}

#[idempotent(require_key)]
async fn acct(executions: web::Data<Executions>, body: web::Bytes) -> HttpResponse {
    paid(executions, body).await
}

#[idempotent(require_key)]
async fn files(executions: web::Data<Executions>, body: web::Bytes) -> HttpResponse {
    paid(executions, body).await
}

/// Paths that are the same request meet, whatever the case of their percent-encoding's hex
/// digits (RFC 3986, 2.1) or an escape of a character that needs none (`%78` is `x`), also where
/// the decoded path is not UTF-8 (`%FF`); paths that differ do not (`%2F` is not `/`, and a stray
/// `%` is not an escape).
#[actix_rt::test]
async fn equivalent_paths_meet_and_different_ones_do_not() {
    let executions = web::Data::new(Executions::default());
    let data = executions.clone();
    let server = TestServer::start(
        Idempotency::new(MemoryStore::new()).scope_resolver(client),
        move |cfg| {
            cfg.app_data(data.clone())
                .route("/acct/{id}/pay", web::post().to(acct))
                .route("/files/{tail:.*}", web::post().to(files));
        },
    );
    let addr = server.addr;
    // (key, the first path, paths that are the same request, paths that are another).
    let cases: [(&str, &str, &[&str], &[&str]); 5] = [
        (
            "encoded-slash",
            "/acct/a%2Fb/pay",
            &["/acct/a%2fb/pay", "/acct/%61%2fb/pay"],
            &["/acct/a%2Bb/pay"],
        ),
        (
            "not-utf8",
            "/acct/%FF%78/pay",
            &["/acct/%FFx/pay", "/acct/%ff%78/pay", "/acct/%fFx/pay"],
            &["/acct/%FFy/pay", "/acct/%FE%78/pay"],
        ),
        (
            "tail",
            "/files/a%2Fb",
            &["/files/a%2fb", "/files/%61%2Fb"],
            &["/files/a/b"],
        ),
        (
            "not-utf8-tail",
            "/files/%FF%2Fb",
            &["/files/%ff%2fb", "/files/%FF%2F%62"],
            &["/files/%FF/b"],
        ),
        (
            "stray-percent",
            "/acct/%FF/pay",
            &["/acct/%ff/pay"],
            &["/acct/%%46F/pay"],
        ),
    ];
    let mut misses = Vec::new();
    for (key, first, same, other) in cases {
        let (first, same, other) = (first.to_owned(), same.to_vec(), other.to_vec());
        let (f, answers) = tokio::task::spawn_blocking(move || {
            let f = post(addr, &first, "paths", key);
            let mut answers = Vec::new();
            for path in same {
                answers.push((path, true, post(addr, path, "paths", key)));
            }
            for path in other {
                answers.push((path, false, post(addr, path, "paths", key)));
            }
            (f, answers)
        })
        .await
        .expect("client thread");
        assert_eq!(f.status, 201, "{key}: {}", describe(&f));
        for (path, equivalent, answer) in answers {
            let met = replayed(&answer) && answer.body == f.body;
            let refused = answer.status == 422;
            if (equivalent && !met) || (!equivalent && !refused) {
                misses.push(format!(
                    "{key}: {path} ({}): {}",
                    if equivalent {
                        "same request"
                    } else {
                        "another request"
                    },
                    describe(&answer)
                ));
            }
        }
    }
    println!("paths answered wrongly: {}", misses.len());
    assert!(misses.is_empty(), "{misses:#?}");
    assert_eq!(executions.get(), 5);
}
