//! The HTTP contract (README, "The HTTP contract"), through `#[idempotent]` handlers, against the in-memory store and
//! a real Redis (started by the test on a free port).

mod common;

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use actix_web::{
    body::BoxBody,
    dev::{Payload, Service, ServiceResponse},
    http::{header::HeaderMap, StatusCode},
    post, test, web, App, FromRequest, HttpRequest, HttpResponse, Responder,
};
use bytes::Bytes;
use common::{Backend, Kind};
use idem::{idempotent, IdempotencyScope, ScopeId};
use serde::Deserialize;

/// Executions of handler bodies in one app.
#[derive(Default)]
struct Executions(AtomicU64);

impl Executions {
    fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The caller, from `X-Tenant`.
struct Tenant(String);

impl FromRequest for Tenant {
    type Error = actix_web::Error;
    type Future = std::future::Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let tenant = req
            .headers()
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .filter(|t| !t.is_empty())
            .map(|t| Tenant(t.to_owned()))
            .ok_or_else(|| actix_web::error::ErrorUnauthorized("send X-Tenant"));
        std::future::ready(tenant)
    }
}

impl IdempotencyScope for Tenant {
    fn scope_id(&self) -> std::borrow::Cow<'_, str> {
        std::borrow::Cow::Borrowed(&self.0)
    }
}

#[derive(Deserialize)]
struct Order {
    mode: String,
    #[serde(default)]
    delay_ms: u64,
}

/// The behaviour every test handler shares: the body's `mode` picks the outcome.
async fn run_order(executions: &Executions, order: &Order) -> HttpResponse {
    executions.0.fetch_add(1, Ordering::SeqCst);
    if order.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(order.delay_ms)).await;
    }
    let id = format!("ord_{:016x}", rand::random::<u64>());
    match order.mode.as_str() {
        "invalid" => {
            HttpResponse::BadRequest().json(serde_json::json!({ "error": "invalid", "id": id }))
        }
        "decline" => HttpResponse::PaymentRequired()
            .json(serde_json::json!({ "error": "declined", "id": id })),
        "unavailable" => HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({ "error": "try later", "id": id })),
        "timeout" => HttpResponse::RequestTimeout().finish(),
        "panic" => panic!("handler panicked on purpose"),
        _ => HttpResponse::Created()
            .insert_header(("location", format!("/orders/{id}")))
            .insert_header(("x-trace", "a"))
            .append_header(("x-trace", "b"))
            .insert_header(("set-cookie", "session=secret; HttpOnly"))
            .json(serde_json::json!({ "id": id, "status": "created" })),
    }
}

#[post("/orders")]
#[idempotent(require_key, scope = Tenant)]
async fn orders(executions: web::Data<Executions>, order: web::Json<Order>) -> impl Responder {
    run_order(&executions, &order).await
}

#[idempotent(scope = Tenant)]
async fn optional_key(executions: web::Data<Executions>, order: web::Json<Order>) -> HttpResponse {
    run_order(&executions, &order).await
}

#[idempotent(require_key, scope = Tenant, wait = "5s")]
async fn waiting(executions: web::Data<Executions>, order: web::Json<Order>) -> HttpResponse {
    run_order(&executions, &order).await
}

#[idempotent(require_key, scope = Tenant, max_body = 64)]
async fn small(executions: web::Data<Executions>, order: web::Json<Order>) -> HttpResponse {
    run_order(&executions, &order).await
}

#[idempotent(require_key, scope = Tenant, fail_open)]
async fn open(executions: web::Data<Executions>, order: web::Json<Order>) -> HttpResponse {
    run_order(&executions, &order).await
}

#[idempotent(require_key, scope = Tenant, store_server_errors)]
async fn stripe_style(executions: web::Data<Executions>, order: web::Json<Order>) -> HttpResponse {
    run_order(&executions, &order).await
}

#[idempotent(require_key, header = "X-Request-Key", scope = Tenant)]
async fn custom_header(executions: web::Data<Executions>, order: web::Json<Order>) -> HttpResponse {
    run_order(&executions, &order).await
}

#[idempotent(require_key)]
async fn app_scoped(executions: web::Data<Executions>, order: web::Json<Order>) -> HttpResponse {
    run_order(&executions, &order).await
}

#[idempotent(require_key, scope = Tenant)]
async fn streamed(executions: web::Data<Executions>, size: web::Path<usize>) -> HttpResponse {
    executions.0.fetch_add(1, Ordering::SeqCst);
    let size = size.into_inner();
    let run = executions.get() as u8;
    let chunks = (0..size.div_ceil(100)).map(move |i| {
        let len = (size - i * 100).min(100);
        Ok::<_, actix_web::Error>(Bytes::from(vec![b'a' + run % 26; len]))
    });
    HttpResponse::Ok()
        .content_type("application/octet-stream")
        .streaming(futures_util::stream::iter(chunks))
}

/// A response streamed over several leases: 12 chunks, one every 200 ms, under a 600 ms lease.
#[idempotent(require_key, scope = Tenant, lease = "600ms")]
async fn slow_stream(executions: web::Data<Executions>) -> HttpResponse {
    executions.0.fetch_add(1, Ordering::SeqCst);
    let run = executions.get() as u8;
    let chunks = futures_util::stream::unfold(0u8, move |i| async move {
        if i == 12 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        Some((
            Ok::<_, actix_web::Error>(Bytes::from(vec![b'a' + run; 10])),
            i + 1,
        ))
    });
    HttpResponse::Ok()
        .content_type("application/octet-stream")
        .streaming(chunks)
}

struct TestApp<S> {
    service: S,
    executions: web::Data<Executions>,
    backend: Backend,
}

async fn app(
    backend: Backend,
) -> TestApp<
    impl Service<actix_http::Request, Response = ServiceResponse<BoxBody>, Error = actix_web::Error>,
> {
    let executions = web::Data::new(Executions::default());
    let idem = backend.idem.clone().scope_resolver(|req| {
        req.headers()
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .map(ScopeId::new)
            .ok_or_else(|| actix_web::error::ErrorUnauthorized("send X-Tenant"))
    });
    let service = test::init_service(
        App::new()
            .app_data(idem)
            .app_data(executions.clone())
            .service(orders)
            .route("/optional", web::post().to(optional_key))
            .route("/wait", web::post().to(waiting))
            .route("/small", web::post().to(small))
            .route("/open", web::post().to(open))
            .route("/stripe", web::post().to(stripe_style))
            .route("/custom", web::post().to(custom_header))
            .route("/app-scoped", web::post().to(app_scoped))
            .route("/stream/{size}", web::post().to(streamed))
            .route("/slow-stream", web::post().to(slow_stream)),
    )
    .await;
    TestApp {
        service,
        executions,
        backend,
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    fn problem_type(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
        self.json()["type"].as_str().expect("a type").to_owned()
    }
}

async fn send<S>(service: &S, req: test::TestRequest) -> Answer
where
    S: Service<actix_http::Request, Response = ServiceResponse<BoxBody>, Error = actix_web::Error>,
{
    let resp = test::call_service(service, req.to_request()).await;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = test::read_body(resp).await;
    Answer {
        status,
        headers,
        body,
    }
}

fn order(path: &str, tenant: &str, key: Option<&str>, body: &str) -> test::TestRequest {
    let mut req = test::TestRequest::post()
        .uri(path)
        .insert_header(("content-type", "application/json"))
        .insert_header(("x-tenant", tenant))
        .set_payload(body.to_owned());
    if let Some(key) = key {
        req = req.insert_header(("idempotency-key", key));
    }
    req
}

const OK: &str = r#"{"mode":"ok"}"#;

async fn replay_is_byte_identical(kind: Kind) {
    let app = app(Backend::new(kind)).await;
    let first = send(&app.service, order("/orders", "t1", Some("k-1"), OK)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());
    assert!(first.header("set-cookie").is_some());
    for key in ["k-1", "\"k-1\""] {
        let again = send(&app.service, order("/orders", "t1", Some(key), OK)).await;
        assert_eq!(again.status, first.status);
        assert_eq!(again.body, first.body, "byte-identical body");
        assert!(again.replayed());
        assert_eq!(again.header("location"), first.header("location"));
        assert_eq!(again.header("content-type"), first.header("content-type"));
        let traces: Vec<_> = again.headers.get_all("x-trace").collect();
        assert_eq!(traces, first.headers.get_all("x-trace").collect::<Vec<_>>());
        assert_eq!(
            again.header("set-cookie"),
            None,
            "Set-Cookie is never replayed"
        );
    }
    assert_eq!(app.executions.get(), 1);
}

async fn missing_key_is_400_when_required(kind: Kind) {
    let app = app(Backend::new(kind)).await;
    let resp = send(&app.service, order("/orders", "t1", None, OK)).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert!(resp.problem_type().ends_with("/missing-key"));
    assert_eq!(app.executions.get(), 0);
}

async fn without_require_key_a_keyless_request_just_runs(kind: Kind) {
    let app = app(Backend::new(kind)).await;
    for _ in 0..2 {
        let resp = send(&app.service, order("/optional", "t1", None, OK)).await;
        assert_eq!(resp.status, StatusCode::CREATED);
        assert!(!resp.replayed());
    }
    assert_eq!(app.executions.get(), 2);
    let keyed = send(&app.service, order("/optional", "t1", Some("k"), OK)).await;
    let again = send(&app.service, order("/optional", "t1", Some("k"), OK)).await;
    assert_eq!(keyed.body, again.body);
    assert!(again.replayed());
    assert_eq!(app.executions.get(), 3);
}

async fn invalid_keys_are_400(kind: Kind) {
    let app = app(Backend::new(kind)).await;
    let too_long = "k".repeat(256);
    for bad in [
        "",
        "   ",
        "\"\"",
        "a b",
        "\"unterminated",
        "\"a\"b",
        too_long.as_str(),
        "ключ",
    ] {
        let req = test::TestRequest::post()
            .uri("/orders")
            .insert_header(("content-type", "application/json"))
            .insert_header(("x-tenant", "t1"))
            .insert_header((
                "idempotency-key",
                actix_web::http::header::HeaderValue::from_bytes(bad.as_bytes()).expect("header"),
            ))
            .set_payload(OK);
        let resp = send(&app.service, req).await;
        assert_eq!(resp.status, StatusCode::BAD_REQUEST, "key {bad:?}");
        assert!(resp.problem_type().ends_with("/invalid-key"), "key {bad:?}");
    }
    let two_lines = test::TestRequest::post()
        .uri("/orders")
        .insert_header(("content-type", "application/json"))
        .insert_header(("x-tenant", "t1"))
        .append_header(("idempotency-key", "a"))
        .append_header(("idempotency-key", "b"))
        .set_payload(OK);
    let resp = send(&app.service, two_lines).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert!(resp.problem_type().ends_with("/invalid-key"));
    assert_eq!(app.executions.get(), 0);
}

async fn a_custom_header_is_honoured(kind: Kind) {
    let app = app(Backend::new(kind)).await;
    let missing = send(&app.service, order("/custom", "t1", Some("k"), OK)).await;
    assert_eq!(
        missing.status,
        StatusCode::BAD_REQUEST,
        "Idempotency-Key is not the header here"
    );
    let with = |key| {
        test::TestRequest::post()
            .uri("/custom")
            .insert_header(("content-type", "application/json"))
            .insert_header(("x-tenant", "t1"))
            .insert_header(("x-request-key", key))
            .set_payload(OK)
    };
    let first = send(&app.service, with("k")).await;
    let again = send(&app.service, with("k")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(again.replayed());
    assert_eq!(app.executions.get(), 1);
}

async fn a_different_request_with_the_same_key_is_422(kind: Kind) {
    let app = app(Backend::new(kind)).await;
    let first = send(&app.service, order("/orders", "t1", Some("k"), OK)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let other_body = send(
        &app.service,
        order("/orders", "t1", Some("k"), r#"{"mode":"ok","x":1}"#),
    )
    .await;
    assert_eq!(other_body.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(other_body.problem_type().ends_with("/key-reused"));
    let other_query = send(&app.service, order("/orders?x=1", "t1", Some("k"), OK)).await;
    assert_eq!(other_query.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.executions.get(), 1);
}

async fn mismatch_wins_over_in_flight(kind: Kind) {
    let app = app(Backend::new(kind)).await;
    let slow = order(
        "/orders",
        "t1",
        Some("k"),
        r#"{"mode":"ok","delay_ms":400}"#,
    );
    let first = send(&app.service, slow);
    let probe = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let same = send(
            &app.service,
            order(
                "/orders",
                "t1",
                Some("k"),
                r#"{"mode":"ok","delay_ms":400}"#,
            ),
        )
        .await;
        let other = send(
            &app.service,
            order("/orders", "t1", Some("k"), r#"{"mode":"other"}"#),
        )
        .await;
        (same, other)
    };
    let (first, (same, other)) = tokio::join!(first, probe);
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(same.status, StatusCode::CONFLICT);
    assert!(same.problem_type().ends_with("/in-flight"));
    let retry_after: u64 = same
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.executions.get(), 1);
}

async fn keys_are_scoped_to_the_caller(kind: Kind) {
    let app = app(Backend::new(kind)).await;
    let a = send(&app.service, order("/orders", "alice", Some("shared"), OK)).await;
    let b = send(&app.service, order("/orders", "bob", Some("shared"), OK)).await;
    assert_eq!(
        (a.status, b.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert!(!b.replayed());
    assert_ne!(a.body, b.body, "bob must not see alice's response");
    // Bob cannot block alice's key with a different body either.
    let b2 = send(
        &app.service,
        order("/orders", "bob", Some("alice-only"), r#"{"mode":"x"}"#),
    )
    .await;
    let a2 = send(
        &app.service,
        order("/orders", "alice", Some("alice-only"), OK),
    )
    .await;
    assert_eq!(
        (b2.status, a2.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert_eq!(app.executions.get(), 4);
    // A caller the scope extractor refuses gets its error, and nothing runs.
    let anonymous = test::TestRequest::post()
        .uri("/orders")
        .insert_header(("content-type", "application/json"))
        .insert_header(("idempotency-key", "k"))
        .set_payload(OK);
    assert_eq!(
        send(&app.service, anonymous).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(app.executions.get(), 4);
}

async fn the_app_scope_resolver_scopes_handlers_that_name_none(kind: Kind) {
    let app = app(Backend::new(kind)).await;
    let a = send(&app.service, order("/app-scoped", "alice", Some("k"), OK)).await;
    let b = send(&app.service, order("/app-scoped", "bob", Some("k"), OK)).await;
    let a2 = send(&app.service, order("/app-scoped", "alice", Some("k"), OK)).await;
    assert!(!b.replayed());
    assert!(a2.replayed());
    assert_eq!(a.body, a2.body);
    assert_eq!(app.executions.get(), 2);
}

async fn wait_returns_the_first_response(kind: Kind) {
    let app = app(Backend::new(kind)).await;
    let body = r#"{"mode":"ok","delay_ms":300}"#;
    let first = send(&app.service, order("/wait", "t1", Some("k"), body));
    let second = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        send(&app.service, order("/wait", "t1", Some("k"), body)).await
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(second.status, StatusCode::CREATED);
    assert!(second.replayed());
    assert_eq!(first.body, second.body);
    assert_eq!(app.executions.get(), 1);
}

async fn client_errors_are_replayed_and_server_errors_rerun(kind: Kind) {
    let app = app(Backend::new(kind)).await;
    for (mode, status) in [("invalid", 400), ("decline", 402)] {
        let body = format!(r#"{{"mode":"{mode}"}}"#);
        let first = send(&app.service, order("/orders", "t1", Some(mode), &body)).await;
        let again = send(&app.service, order("/orders", "t1", Some(mode), &body)).await;
        assert_eq!(first.status.as_u16(), status);
        assert!(again.replayed(), "{mode} is replayed");
        assert_eq!(first.body, again.body);
    }
    assert_eq!(app.executions.get(), 2);
    for (mode, status) in [("unavailable", 503), ("timeout", 408)] {
        let body = format!(r#"{{"mode":"{mode}"}}"#);
        let first = send(&app.service, order("/orders", "t1", Some(mode), &body)).await;
        let again = send(&app.service, order("/orders", "t1", Some(mode), &body)).await;
        assert_eq!(first.status.as_u16(), status);
        assert_eq!(again.status.as_u16(), status);
        assert!(!again.replayed(), "{mode} runs again");
    }
    assert_eq!(app.executions.get(), 6);
    // An extractor's own 400 (malformed JSON) is the handler's response: stored and replayed.
    let first = send(
        &app.service,
        order("/orders", "t1", Some("bad-json"), "{not json"),
    )
    .await;
    let again = send(
        &app.service,
        order("/orders", "t1", Some("bad-json"), "{not json"),
    )
    .await;
    assert_eq!(first.status, StatusCode::BAD_REQUEST);
    assert!(again.replayed());
    assert_eq!(first.body, again.body);
}

async fn store_server_errors_replays_5xx(kind: Kind) {
    let app = app(Backend::new(kind)).await;
    let body = r#"{"mode":"unavailable"}"#;
    let first = send(&app.service, order("/stripe", "t1", Some("k"), body)).await;
    let again = send(&app.service, order("/stripe", "t1", Some("k"), body)).await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(again.replayed());
    assert_eq!(first.body, again.body);
    assert_eq!(app.executions.get(), 1);
}

async fn a_panicking_handler_releases_its_key(kind: Kind) {
    let app = app(Backend::new(kind)).await;
    let body = r#"{"mode":"panic"}"#;
    let first = send(&app.service, order("/orders", "t1", Some("k"), body)).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    let again = send(&app.service, order("/orders", "t1", Some("k"), body)).await;
    assert_eq!(again.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!again.replayed());
    assert_eq!(app.executions.get(), 2, "a retry after a panic runs again");
}

fn gzip(bytes: &[u8], level: u32) -> Vec<u8> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}

async fn gzip_request_bodies_work_and_are_fingerprinted_as_sent(kind: Kind) {
    let app = app(Backend::new(kind)).await;
    let json = br#"{"mode":"ok","padding":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#;
    let gz = |bytes: Vec<u8>| {
        test::TestRequest::post()
            .uri("/orders")
            .insert_header(("content-type", "application/json"))
            .insert_header(("content-encoding", "gzip"))
            .insert_header(("x-tenant", "t1"))
            .insert_header(("idempotency-key", "gz"))
            .set_payload(bytes)
    };
    let first = send(&app.service, gz(gzip(json, 6))).await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    let again = send(&app.service, gz(gzip(json, 6))).await;
    assert!(again.replayed());
    assert_eq!(first.body, again.body);
    // The same JSON compressed differently is different bytes on the wire: a different request.
    let other = send(&app.service, gz(gzip(json, 1))).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.executions.get(), 1);
}

/// What the fingerprint treats as the same request: the path as routed (`/or%64ers` is
/// `/orders`), `Content-Type` up to case and whitespace, `Content-Encoding` up to case; another
/// media type or coding with the same bytes is another request.
async fn equivalent_requests_replay_and_different_heads_are_422(kind: Kind) {
    let app = app(Backend::new(kind)).await;
    let with = |path: &str, key: &str, content_type: &str| {
        order(path, "t1", Some(key), OK).insert_header(("content-type", content_type.to_owned()))
    };
    let first = send(
        &app.service,
        with("/orders", "k", "application/json; charset=utf-8"),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    for (path, content_type) in [
        ("/or%64ers", "application/json; charset=utf-8"),
        ("/%6Frders", "Application/JSON;charset=utf-8"),
        ("/orders", "application/json ;  Charset = utf-8"),
    ] {
        let again = send(&app.service, with(path, "k", content_type)).await;
        assert!(again.replayed(), "{path} {content_type}: {}", again.status);
        assert_eq!(again.body, first.body);
    }
    for content_type in ["text/plain; charset=utf-8", "application/json"] {
        let other = send(&app.service, with("/orders", "k", content_type)).await;
        assert_eq!(
            other.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{content_type}"
        );
    }
    // The same bytes declared compressed are another request; the coding's case is not.
    let gz = |encoding: &str| {
        order("/orders", "t1", Some("gz"), "")
            .insert_header(("content-encoding", encoding.to_owned()))
            .set_payload(gzip(OK.as_bytes(), 6))
    };
    let compressed = send(&app.service, gz("gzip")).await;
    assert_eq!(compressed.status, StatusCode::CREATED);
    assert!(send(&app.service, gz("GZIP")).await.replayed());
    let identity = send(
        &app.service,
        order("/orders", "t1", Some("gz"), "").set_payload(gzip(OK.as_bytes(), 6)),
    )
    .await;
    assert_eq!(identity.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.executions.get(), 2);
}

/// The lease is renewed until the response body is read, not only while the handler function
/// runs: a duplicate sent while the body still streams, leases after the handler returned, is
/// told 409, and the handler runs once.
async fn the_lease_lasts_while_a_streamed_body_is_read(kind: Kind) {
    let app = app(Backend::new(kind)).await;
    let request = || order("/slow-stream", "t1", Some("slow"), OK);
    let first = send(&app.service, request());
    let duplicate = async {
        // Two and a half leases into the 2.4 s body.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        send(&app.service, request()).await
    };
    let (first, duplicate) = tokio::join!(first, duplicate);
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body.len(), 120);
    assert_eq!(
        duplicate.status,
        StatusCode::CONFLICT,
        "a duplicate while the body streamed: {:?}",
        duplicate.body
    );
    assert!(duplicate.header("retry-after").is_some());
    assert_eq!(app.executions.get(), 1);
    let again = send(&app.service, request()).await;
    assert!(again.replayed());
    assert_eq!(again.body, first.body);
    assert_eq!(app.executions.get(), 1);
}

async fn bodies_over_max_body_are_413_and_not_recorded(kind: Kind) {
    let app = app(Backend::new(kind)).await;
    let big = format!(r#"{{"mode":"ok","padding":"{}"}}"#, "x".repeat(100));
    let resp = send(&app.service, order("/small", "t1", Some("k"), &big)).await;
    assert_eq!(resp.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(resp.problem_type().ends_with("/body-too-large"));
    // Nothing was recorded: the same key with a small body runs.
    let ok = send(&app.service, order("/small", "t1", Some("k"), OK)).await;
    assert_eq!(ok.status, StatusCode::CREATED);
    assert_eq!(app.executions.get(), 1);
}

async fn streamed_responses_are_stored_up_to_max_response(kind: Kind) {
    let app = app(Backend::with(kind, |i| i.max_response(1000))).await;
    let small = || order("/stream/950", "t1", Some("small"), OK);
    let first = send(&app.service, small()).await;
    let again = send(&app.service, small()).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body.len(), 950);
    assert!(again.replayed());
    assert_eq!(first.body, again.body);
    assert_eq!(app.executions.get(), 1);
}

async fn responses_over_max_response_are_sent_whole_but_not_stored(kind: Kind) {
    let app = app(Backend::with(kind, |i| i.max_response(1000))).await;
    let big = || order("/stream/5000", "t1", Some("big"), OK);
    let first = send(&app.service, big()).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        first.body.len(),
        5000,
        "the client still gets the whole response"
    );
    assert!(first.body.iter().all(|b| *b == first.body[0]));
    // Not replayable: the key was released, so a retry runs the handler again.
    let again = send(&app.service, big()).await;
    assert_eq!(again.body.len(), 5000);
    assert!(!again.replayed());
    assert_ne!(first.body, again.body);
    assert_eq!(app.executions.get(), 2);
}

on_every_store!(
    streamed_responses_are_stored_up_to_max_response,
    responses_over_max_response_are_sent_whole_but_not_stored,
    replay_is_byte_identical,
    missing_key_is_400_when_required,
    without_require_key_a_keyless_request_just_runs,
    invalid_keys_are_400,
    a_custom_header_is_honoured,
    a_different_request_with_the_same_key_is_422,
    mismatch_wins_over_in_flight,
    keys_are_scoped_to_the_caller,
    the_app_scope_resolver_scopes_handlers_that_name_none,
    wait_returns_the_first_response,
    client_errors_are_replayed_and_server_errors_rerun,
    store_server_errors_replays_5xx,
    a_panicking_handler_releases_its_key,
    gzip_request_bodies_work_and_are_fingerprinted_as_sent,
    bodies_over_max_body_are_413_and_not_recorded,
    equivalent_requests_replay_and_different_heads_are_422,
    the_lease_lasts_while_a_streamed_body_is_read,
);

/// Store faults: only a network store can be down.
mod store_faults {
    use super::*;

    #[actix_rt::test]
    async fn store_down_is_503_without_execution_and_recovers_without_restart() {
        let mut app = app(Backend::new(Kind::Redis)).await;
        let warm = send(&app.service, order("/orders", "t1", Some("warm"), OK)).await;
        assert_eq!(warm.status, StatusCode::CREATED);
        app.backend.redis().stop();
        let down = send(&app.service, order("/orders", "t1", Some("k"), OK)).await;
        assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(down.problem_type().ends_with("/store-unavailable"));
        assert!(down.header("retry-after").is_some());
        assert_eq!(app.executions.get(), 1, "the handler did not run");
        app.backend.redis().restart();
        let mut answer = send(&app.service, order("/orders", "t1", Some("k"), OK)).await;
        for _ in 0..5 {
            if answer.status != StatusCode::SERVICE_UNAVAILABLE {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            answer = send(&app.service, order("/orders", "t1", Some("k"), OK)).await;
        }
        assert_eq!(answer.status, StatusCode::CREATED);
        assert_eq!(app.executions.get(), 2);
    }

    #[actix_rt::test]
    async fn fail_open_runs_the_handler_when_the_store_is_down() {
        let mut app = app(Backend::new(Kind::Redis)).await;
        app.backend.redis().stop();
        let resp = send(&app.service, order("/open", "t1", Some("k"), OK)).await;
        assert_eq!(resp.status, StatusCode::CREATED);
        assert_eq!(app.executions.get(), 1);
        // The fail-closed handler next to it still refuses.
        let closed = send(&app.service, order("/orders", "t1", Some("k"), OK)).await;
        assert_eq!(closed.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(app.executions.get(), 1);
    }
}

/// A client that goes away mid-handler: the handler finishes, and the retry replays its result.
mod disconnect {
    use std::{io::Write as _, net::TcpListener};

    use actix_web::HttpServer;

    use super::*;
    use crate::common::{post, raw_request};

    async fn disconnect_then_retry(kind: Kind) {
        let backend = Backend::new(kind);
        let idem = backend.idem.clone();
        let executions = web::Data::new(Executions::default());
        let data = executions.clone();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = HttpServer::new(move || {
            App::new()
                .app_data(idem.clone())
                .app_data(data.clone())
                .service(orders)
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .expect("listen")
        .run();
        let handle = server.handle();
        actix_rt::spawn(server);

        let body = br#"{"mode":"ok","delay_ms":500}"#;
        let request = post(
            "/orders",
            &[("x-tenant", "t1"), ("idempotency-key", "gone")],
            body,
        );
        let gone = request.clone();
        tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(addr).expect("connect");
            stream.write_all(&gone).expect("write");
            std::thread::sleep(Duration::from_millis(100));
            // The client vanishes while the handler runs.
            drop(stream);
        })
        .await
        .expect("client");
        // The retry arrives after the handler has finished on its own.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let retry = tokio::task::spawn_blocking(move || raw_request(addr, &request))
            .await
            .expect("retry");
        assert_eq!(retry.status, 201);
        assert_eq!(retry.header("idempotent-replayed"), Some("true"));
        assert_eq!(executions.get(), 1);
        handle.stop(false).await;
        drop(backend);
    }

    #[actix_rt::test]
    async fn memory() {
        disconnect_then_retry(Kind::Memory).await;
    }

    #[actix_rt::test]
    async fn redis() {
        disconnect_then_retry(Kind::Redis).await;
    }
}

/// A ttl the stores cannot keep is refused where it is set, with the bound in the message, never
/// after a handler ran.
// `test` names actix-web's test module here: the built-in attribute by its full path.
#[core::prelude::v1::test]
#[should_panic(expected = "longer than the longest allowed, 31536000s")]
fn an_over_long_ttl_panics_at_the_setter_naming_the_bound() {
    let _ = idem::Idempotency::new(idem::MemoryStore::new()).ttl(Duration::MAX);
}

/// A full `MemoryStore` refuses new keys with 503 + `Retry-After` and evicts nothing: stored
/// responses still replay, a request claimed before it filled still completes, and once records
/// expire new keys run again.
#[actix_rt::test]
async fn a_full_memory_store_is_503_for_new_keys_and_keeps_its_records() {
    const TTL: Duration = Duration::from_secs(4);
    let idem = idem::Idempotency::new(idem::MemoryStore::isolated_with_capacity(4096))
        .lease(Duration::from_millis(500))
        .ttl(TTL);
    let app = app(Backend { idem, server: None }).await;
    // Two leases long: renewed while the store is full.
    let slow = r#"{"mode":"ok","delay_ms":1000}"#;

    // A slow request is claimed first; the store fills while it runs.
    let in_flight = send(&app.service, order("/orders", "t1", Some("slow"), slow));
    let fill = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut stored = Vec::new();
        for i in 0..100 {
            let key = format!("k-{i}");
            let answer = send(&app.service, order("/orders", "t1", Some(&key), OK)).await;
            if answer.status == StatusCode::SERVICE_UNAVAILABLE {
                return (stored, answer);
            }
            assert_eq!(answer.status, StatusCode::CREATED);
            stored.push((key, answer.body));
        }
        panic!("a store of 4096 bytes took 100 responses");
    };
    let (slow_first, (stored, full)) = tokio::join!(in_flight, fill);
    assert!(!stored.is_empty(), "some responses fit");
    println!(
        "a MemoryStore of 4096 bytes held {} responses",
        stored.len()
    );
    assert!(full.problem_type().ends_with("/store-unavailable"));
    assert!(full.header("retry-after").is_some());
    let executions = app.executions.get();
    assert_eq!(
        executions,
        stored.len() as u64 + 1,
        "the refused key did not run"
    );

    // The request claimed before the store filled completed, and is replayed.
    assert_eq!(slow_first.status, StatusCode::CREATED);
    let slow_again = send(&app.service, order("/orders", "t1", Some("slow"), slow)).await;
    assert!(slow_again.replayed());
    assert_eq!(slow_again.body, slow_first.body);
    // Every stored response is still replayed: nothing was evicted.
    for (key, body) in &stored {
        let again = send(&app.service, order("/orders", "t1", Some(key), OK)).await;
        assert!(again.replayed(), "{key}");
        assert_eq!(&again.body, body);
    }
    let refused = send(&app.service, order("/orders", "t1", Some("new"), OK)).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(app.executions.get(), executions);

    // Once the records expire, new keys run again.
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    let fresh = send(&app.service, order("/orders", "t1", Some("new"), OK)).await;
    assert_eq!(fresh.status, StatusCode::CREATED);
    assert!(!fresh.replayed());
    assert_eq!(app.executions.get(), executions + 1);
}
