//! The paths a newcomer takes, on a real `HttpServer` with several workers and real connections:
//! the in-memory store written inside the app factory as the README once wrote it, paths that
//! differ only in their percent-encoding, and a response naming hop-by-hop headers in
//! `Connection`.

mod common;

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, PoisonError,
    },
};

use actix_web::{http::header, post, web, App, HttpResponse, HttpServer};
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

/// (client, worker thread) of every request whose scope was resolved.
static RESOLVED: Mutex<Vec<(String, std::thread::ThreadId)>> = Mutex::new(Vec::new());

/// The caller, from `X-Client`: the scope every app here resolves. Notes which worker (thread)
/// resolved it.
fn client(req: &actix_web::HttpRequest) -> Result<ScopeId, actix_web::Error> {
    let client = req
        .headers()
        .get("x-client")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| actix_web::error::ErrorUnauthorized("send X-Client"))?;
    RESOLVED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((client.to_owned(), std::thread::current().id()));
    Ok(ScopeId::new(client))
}

/// How many workers served `client`'s requests.
fn workers_that_served(client: &str) -> usize {
    let resolved = RESOLVED.lock().unwrap_or_else(PoisonError::into_inner);
    let threads: HashSet<_> = resolved
        .iter()
        .filter(|(c, _)| c == client)
        .map(|(_, thread)| *thread)
        .collect();
    threads.len()
}

/// A payment: counted, answered with an id of its own, so that a replay is told from a second
/// execution by its body.
#[post("/payments")]
#[idempotent(require_key)]
async fn pay(executions: web::Data<Executions>, _body: web::Bytes) -> HttpResponse {
    let n = executions.0.fetch_add(1, Ordering::SeqCst) + 1;
    HttpResponse::Created().body(format!(
        "{{\"payment\":\"pay_{:016x}\",\"execution\":{n}}}",
        rand::random::<u64>()
    ))
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

/// Runs `$server` (an `HttpServer` built as an app writes it) on `$listener` in the background;
/// evaluates to the handle that stops it.
macro_rules! run {
    ($server:expr, $listener:expr $(,)?) => {{
        let server = $server
            .disable_signals()
            .shutdown_timeout(1)
            .listen($listener)
            .expect("listen")
            .run();
        let handle = server.handle();
        actix_rt::spawn(server);
        handle
    }};
}

fn listener() -> (std::net::TcpListener, std::net::SocketAddr) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    (listener, addr)
}

/// Sends one key `n` times, each on a new connection; returns the answers.
async fn same_key_on_new_connections(
    addr: std::net::SocketAddr,
    client: &'static str,
    n: usize,
) -> Vec<RawResponse> {
    tokio::task::spawn_blocking(move || {
        (0..n)
            .map(|_| post(addr, "/payments", client, "one-key"))
            .collect()
    })
    .await
    .expect("client thread")
}

/// The README's snippet, as a newcomer writes it: the store is built inside the factory that
/// `HttpServer::new` calls once per worker. Eight requests with one key, on new connections that
/// the server spreads over its four workers, run the payment once.
#[actix_rt::test]
async fn the_default_memory_store_built_per_worker_runs_a_key_once() {
    let executions = web::Data::new(Executions::default());
    let data = executions.clone();
    let (listener, addr) = listener();
    let handle = run!(
        HttpServer::new(move || {
            App::new()
                .app_data(Idempotency::new(MemoryStore::new()).scope_resolver(client))
                .app_data(data.clone())
                .service(pay)
        })
        .workers(4),
        listener,
    );
    let answers = same_key_on_new_connections(addr, "newcomer-default", 8).await;
    let executed = executions.get();
    let workers = workers_that_served("newcomer-default");
    assert!(workers >= 2, "the requests reached {workers} worker(s)");
    println!(
        "MemoryStore::new() per worker, 8 requests with one key over {workers} workers: \
         {executed} execution(s)"
    );
    assert_eq!(
        executed,
        1,
        "{:#?}",
        answers.iter().map(describe).collect::<Vec<_>>()
    );
    let first = &answers[0];
    assert_eq!(first.status, 201, "{}", describe(first));
    for again in &answers[1..] {
        assert!(replayed(again), "{}", describe(again));
        assert_eq!(again.body, first.body);
    }
    handle.stop(false).await;
}

/// The same with a capacity set inside the factory: one store for the process, whatever the
/// number of workers.
#[actix_rt::test]
async fn a_memory_store_with_a_capacity_built_per_worker_runs_a_key_once() {
    let executions = web::Data::new(Executions::default());
    let data = executions.clone();
    let (listener, addr) = listener();
    let handle = run!(
        HttpServer::new(move || {
            App::new()
                .app_data(
                    Idempotency::new(MemoryStore::with_capacity(64 * 1024 * 1024))
                        .scope_resolver(client),
                )
                .app_data(data.clone())
                .service(pay)
        })
        .workers(4),
        listener,
    );
    let answers = same_key_on_new_connections(addr, "newcomer-capacity", 8).await;
    let executed = executions.get();
    let workers = workers_that_served("newcomer-capacity");
    assert!(workers >= 2, "the requests reached {workers} worker(s)");
    println!(
        "MemoryStore::with_capacity per worker, 8 requests with one key over {workers} \
         workers: {executed} execution(s)"
    );
    assert_eq!(
        executed,
        1,
        "{:#?}",
        answers.iter().map(describe).collect::<Vec<_>>()
    );
    for again in &answers[1..] {
        assert!(replayed(again), "{}", describe(again));
        assert_eq!(again.body, answers[0].body);
    }
    handle.stop(false).await;
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
