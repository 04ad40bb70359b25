//! The JSON fingerprint (`fingerprint = "json"`) over real HTTP: a real `HttpServer` on each store
//! backend, and the `payments` example as a child process. A retry whose JSON is written another
//! way (member order, whitespace, escapes) replays; a retry that changes a value is 422; a field
//! the handler leaves out (`ignore`) may change; a body with no canonical form (not JSON, a member
//! named twice) is compared by its bytes and answered by the handler's own parser.

mod common;

use std::{
    process::Child,
    sync::atomic::{AtomicU64, Ordering},
};

use actix_web::{web, HttpResponse};
use common::{post, raw_request, send, Backend, Kind, RawResponse, TestServer};
use idem::{idempotent, Unscoped};
use idem_testkit::spawn_example;

#[derive(Default)]
struct Executions(AtomicU64);

/// Answers what it read, and a fresh id, so a replay is told apart from a second run.
fn created(runs: &Executions, body: &serde_json::Value) -> HttpResponse {
    let run = runs.0.fetch_add(1, Ordering::SeqCst) + 1;
    HttpResponse::Created().json(serde_json::json!({ "run": run, "read": body }))
}

#[idempotent(scope = Unscoped, fingerprint = "json", ignore = ["/client_ts", "/trace/id"])]
async fn json(runs: web::Data<Executions>, body: web::Json<serde_json::Value>) -> HttpResponse {
    created(&runs, &body)
}

#[idempotent(scope = Unscoped)]
async fn raw(runs: web::Data<Executions>, body: web::Json<serde_json::Value>) -> HttpResponse {
    created(&runs, &body)
}

struct Server {
    server: TestServer,
    runs: web::Data<Executions>,
    _backend: Backend,
}

impl Server {
    fn start(kind: Kind) -> Self {
        let backend = Backend::new(kind);
        let runs = web::Data::new(Executions::default());
        let data = runs.clone();
        let server = TestServer::start(backend.idem.clone(), move |cfg| {
            cfg.app_data(data.clone())
                .route("/json", web::post().to(json))
                .route("/raw", web::post().to(raw));
        });
        Self {
            server,
            runs,
            _backend: backend,
        }
    }

    async fn send(&self, path: &str, key: &str, body: &str) -> RawResponse {
        send(
            self.server.addr,
            post(path, &[("Idempotency-Key", key)], body.as_bytes()),
        )
        .await
    }

    fn runs(&self) -> u64 {
        self.runs.0.load(Ordering::SeqCst)
    }
}

fn replayed(answer: &RawResponse) -> bool {
    answer.header("idempotent-replayed") == Some("true")
}

fn problem_type(answer: &RawResponse) -> String {
    let problem: serde_json::Value = serde_json::from_slice(&answer.body).expect("problem JSON");
    problem["type"].as_str().expect("a type").to_owned()
}

const FIRST: &str = r#"{"amount":100,"currency":"EUR","meta":{"note":"A/B","tags":["x","y"]},"client_ts":1,"trace":{"id":"t1","span":"s"}}"#;

/// Written another way: members reordered at every level, whitespace, `\u0041` for `A`, `\/` for
/// `/`; and the ignored fields changed or gone.
const REWRITTEN: &[&str] = &[
    "{\n  \"trace\": {\"span\": \"s\", \"id\": \"t1\"},\n  \"meta\": { \"tags\": [ \"x\", \"y\" ], \"note\": \"\\u0041\\/B\" },\n  \"currency\": \"EUR\",\n  \"amount\": 100,\n  \"client_ts\": 1\n}\n",
    r#"{"client_ts":2,"trace":{"id":"t2","span":"s"},"currency":"\u0045UR","amount":100,"meta":{"note":"A/B","tags":["x","y"]}}"#,
    r#"{"amount":100,"currency":"EUR","meta":{"note":"A/B","tags":["x","y"]},"trace":{"span":"s"}}"#,
];

/// One value changed each.
const CHANGED: &[&str] = &[
    r#"{"amount":101,"currency":"EUR","meta":{"note":"A/B","tags":["x","y"]},"client_ts":1,"trace":{"id":"t1","span":"s"}}"#,
    r#"{"amount":100.0,"currency":"EUR","meta":{"note":"A/B","tags":["x","y"]},"client_ts":1,"trace":{"id":"t1","span":"s"}}"#,
    r#"{"amount":100,"currency":"EUR","meta":{"note":"a/B","tags":["x","y"]},"client_ts":1,"trace":{"id":"t1","span":"s"}}"#,
    r#"{"amount":100,"currency":"EUR","meta":{"note":"A/B","tags":["y","x"]},"client_ts":1,"trace":{"id":"t1","span":"s"}}"#,
    r#"{"amount":100,"currency":"EUR","meta":{"note":"A/B","tags":["x","y"]},"client_ts":1,"trace":{"id":"t1","span":"S"}}"#,
    r#"{"amount":100,"currency":"EUR","meta":{"note":"A/B","tags":["x","y"]},"client_ts":1,"trace":{"id":"t1","span":"s"},"extra":null}"#,
];

async fn a_rewritten_retry_replays_and_a_changed_value_is_422(kind: Kind) {
    let server = Server::start(kind);
    let first = server.send("/json", "k1", FIRST).await;
    assert_eq!(
        first.status,
        201,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    for (n, body) in REWRITTEN.iter().enumerate() {
        let retry = server.send("/json", "k1", body).await;
        assert_eq!(retry.status, 201, "rewrite {n}: {body}");
        assert!(replayed(&retry), "rewrite {n} ran again: {body}");
        assert_eq!(
            retry.body, first.body,
            "rewrite {n}: the first response, byte for byte"
        );
    }
    for (n, body) in CHANGED.iter().enumerate() {
        let retry = server.send("/json", "k1", body).await;
        assert_eq!(retry.status, 422, "change {n}: {body}");
        assert_eq!(problem_type(&retry), "https://idem.dev/problems/key-reused");
    }
    assert_eq!(server.runs(), 1);

    // The raw fingerprint, for contrast, compares bytes: the first rewrite is another request.
    let raw = server.send("/raw", "k2", FIRST).await;
    assert_eq!(raw.status, 201);
    let rewritten = server.send("/raw", "k2", REWRITTEN[0]).await;
    assert_eq!(rewritten.status, 422);
    assert_eq!(server.runs(), 2);
}

async fn a_body_with_no_canonical_form_is_compared_by_its_bytes(kind: Kind) {
    let server = Server::start(kind);

    // Not JSON: the handler's own extractor answers 400, stored and replayed for the same bytes;
    // other bytes are another request.
    let broken = r#"{"amount":100,"#;
    let first = server.send("/json", "bad", broken).await;
    assert_eq!(first.status, 400);
    let again = server.send("/json", "bad", broken).await;
    assert_eq!((again.status, replayed(&again)), (400, true));
    let other = server.send("/json", "bad", r#"{"amount": 100,"#).await;
    assert_eq!(other.status, 422);

    // A member named twice is ambiguous (parsers differ on which one counts): it meets only its
    // own bytes, never a reading of it.
    let twice = r#"{"amount":1,"amount":2}"#;
    let first = server.send("/json", "dup", twice).await;
    assert_eq!(first.status, 201);
    let again = server.send("/json", "dup", twice).await;
    assert_eq!((again.status, replayed(&again)), (201, true));
    for reading in [
        r#"{"amount":2}"#,
        r#"{"amount":1}"#,
        r#"{"amount":2,"amount":1}"#,
        r#"{ "amount":1,"amount":2}"#,
    ] {
        let retry = server.send("/json", "dup", reading).await;
        assert_eq!(retry.status, 422, "{reading}");
    }
    // The handler ran for the duplicate once, never for the invalid body.
    assert_eq!(server.runs(), 1);
}

/// The same route after a deploy that switched it from `raw` to `json`.
#[idempotent(scope = Unscoped, fingerprint = "json")]
async fn switched(runs: web::Data<Executions>, body: web::Json<serde_json::Value>) -> HttpResponse {
    created(&runs, &body)
}

/// A handler switched from the raw fingerprint to the JSON one keeps replaying the records stored
/// before the switch: the retry is compared in the record's (raw) encoding, not the handler's.
async fn a_handler_switched_from_raw_to_json_keeps_replaying(kind: Kind) {
    let backend = Backend::new(kind);
    let runs = web::Data::new(Executions::default());
    let (before_runs, after_runs) = (runs.clone(), runs.clone());
    let before = TestServer::start(backend.idem.clone(), move |cfg| {
        cfg.app_data(before_runs.clone())
            .route("/pay", web::post().to(raw));
    });
    let after = TestServer::start(backend.idem.clone(), move |cfg| {
        cfg.app_data(after_runs.clone())
            .route("/pay", web::post().to(switched));
    });
    let request = |body: &str| post("/pay", &[("Idempotency-Key", "switch")], body.as_bytes());

    let first = send(before.addr, request(FIRST)).await;
    assert_eq!(first.status, 201);
    let retry = send(after.addr, request(FIRST)).await;
    assert_eq!(
        retry.status,
        201,
        "{}",
        String::from_utf8_lossy(&retry.body)
    );
    assert!(
        replayed(&retry),
        "the switched handler ran a raw record's retry again"
    );
    assert_eq!(retry.body, first.body, "the first response, byte for byte");
    // In the record's raw encoding a rewritten body is another request.
    let rewritten = send(after.addr, request(REWRITTEN[0])).await;
    assert_eq!(rewritten.status, 422);
    assert_eq!(
        problem_type(&rewritten),
        "https://idem.dev/problems/key-reused"
    );
    assert_eq!(runs.0.load(Ordering::SeqCst), 1);

    // A record the switched handler writes is compared as JSON.
    let json_first = send(
        after.addr,
        post("/pay", &[("Idempotency-Key", "new")], FIRST.as_bytes()),
    )
    .await;
    assert_eq!(json_first.status, 201);
    let json_retry = send(
        after.addr,
        post(
            "/pay",
            &[("Idempotency-Key", "new")],
            REWRITTEN[0].as_bytes(),
        ),
    )
    .await;
    assert!(replayed(&json_retry));
    assert_eq!(runs.0.load(Ordering::SeqCst), 2);
}

on_every_store!(
    a_rewritten_retry_replays_and_a_changed_value_is_422,
    a_body_with_no_canonical_form_is_compared_by_its_bytes,
    a_handler_switched_from_raw_to_json_keeps_replaying,
);

/// The `payments` example's `create_payment` compares JSON: a client that re-serialises its
/// payment between attempts gets its payment back, not a 422.
#[test]
fn the_payments_example_compares_json() {
    let (child, addr) = spawn_example("payments", &[]);
    let _payments = Killed(child);
    let pay = |body: &str| {
        raw_request(
            addr,
            &post(
                "/payments",
                &[
                    ("Authorization", "Bearer alice"),
                    ("Idempotency-Key", "json-1"),
                ],
                body.as_bytes(),
            ),
        )
    };
    let first = pay(r#"{"amount":1000,"currency":"EUR","destination":"acct_1"}"#);
    assert_eq!(
        first.status,
        201,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    let retry =
        pay("{ \"destination\": \"acct_1\",\n  \"currency\": \"\\u0045UR\", \"amount\": 1000 }");
    assert_eq!(
        retry.status,
        201,
        "{}",
        String::from_utf8_lossy(&retry.body)
    );
    assert!(replayed(&retry));
    assert_eq!(retry.body, first.body);
    let changed = pay(r#"{"destination":"acct_1","currency":"EUR","amount":1001}"#);
    assert_eq!(changed.status, 422);
}

/// A child process, killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
