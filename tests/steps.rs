//! Journaled steps (`Steps`) through `#[idempotent]` handlers, against the in-memory store and a
//! real Redis: a step that ran is not run again by a retry after a 5xx or a panic released the
//! key, a recorded error replays, an unrecorded one runs again, steps are found by name, a lost
//! lease refuses the journal write, downstream keys are stable per request and distinct
//! otherwise, a store without a journal refuses steps, and the outcomes are counted and traced.

mod common;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::Duration,
};

use actix_web::{
    body::BoxBody,
    dev::{Payload, Service, ServiceResponse},
    http::StatusCode,
    test, web, App, FromRequest, HttpRequest, HttpResponse,
};
use async_trait::async_trait;
use bytes::Bytes;
use common::{Backend, Kind};
use idem::{
    idempotent, Claim, Idempotency, IdempotencyScope, MemoryStore, Ownership, Steps, Store,
    StoreError, StoredResponse, Ticket,
};
use serde::{Deserialize, Serialize};

/// A processor that deduplicates by key: the same charge id for the same key, and a count of
/// the calls it got per key.
#[derive(Default)]
struct Processor {
    calls: Mutex<HashMap<String, u64>>,
    /// Decline every charge.
    decline: AtomicBool,
    /// Fail every charge (a 5xx at the processor).
    fail: AtomicBool,
    /// Answer 503 after the steps (the handler's own failure).
    fail_after: AtomicBool,
    /// Panic after the steps.
    panic_after: AtomicBool,
    /// Run the steps `a` and `b` in reverse order.
    reverse: AtomicBool,
    /// Wait this long inside the charge (ms).
    charge_ms: AtomicU64,
    /// Fail this many charges, then succeed.
    fail_times: AtomicU64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Charge {
    id: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Decline {
    code: String,
}

#[derive(Debug)]
struct Down;

impl std::fmt::Display for Down {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the processor is down")
    }
}

impl Processor {
    async fn charge(&self, step: &str, key: &idem::DownstreamKey) -> Result<Charge, Down> {
        *self
            .calls
            .lock()
            .expect("not poisoned")
            .entry(format!("{step}:{key}"))
            .or_default() += 1;
        let wait = self.charge_ms.load(Ordering::SeqCst);
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(Down);
        }
        let failing = self
            .fail_times
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(Down);
        }
        Ok(Charge {
            id: format!("ch_{}", &key.as_str()[..16]),
        })
    }

    fn calls(&self) -> u64 {
        self.calls.lock().expect("not poisoned").values().sum()
    }

    fn calls_per_key(&self) -> Vec<u64> {
        self.calls
            .lock()
            .expect("not poisoned")
            .values()
            .copied()
            .collect()
    }
}

/// The caller, from `X-Tenant`.
struct Tenant(String);

impl FromRequest for Tenant {
    type Error = actix_web::Error;
    type Future = std::future::Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(Ok(Tenant(
            req.headers()
                .get("x-tenant")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("anonymous")
                .to_owned(),
        )))
    }
}

impl IdempotencyScope for Tenant {
    fn scope_id(&self) -> std::borrow::Cow<'_, str> {
        std::borrow::Cow::Borrowed(&self.0)
    }
}

/// What the handlers answer after their steps.
fn after(p: &Processor, body: serde_json::Value) -> HttpResponse {
    if p.panic_after.load(Ordering::SeqCst) {
        panic!("the handler panics after its step");
    }
    if p.fail_after.load(Ordering::SeqCst) {
        return HttpResponse::ServiceUnavailable().finish();
    }
    HttpResponse::Created().json(body)
}

#[idempotent(require_key, scope = Tenant)]
async fn pay(p: web::Data<Processor>, steps: Steps) -> Result<HttpResponse, actix_web::Error> {
    let pp: &Processor = &p;
    let charge = steps
        .run(
            "charge",
            |key| async move { pp.charge("charge", &key).await },
        )
        .await?;
    Ok(after(
        &p,
        serde_json::json!({
            "charge": charge.id,
            "key": steps.key("charge").to_string(),
            "resumed": steps.resumed(),
        }),
    ))
}

/// The same steps under another handler name.
#[idempotent(require_key, scope = Tenant)]
async fn pay_too(p: web::Data<Processor>, steps: Steps) -> Result<HttpResponse, actix_web::Error> {
    let pp: &Processor = &p;
    let charge = steps
        .run(
            "charge",
            |key| async move { pp.charge("charge", &key).await },
        )
        .await?;
    Ok(after(&p, serde_json::json!({ "charge": charge.id })))
}

#[idempotent(require_key, scope = Tenant)]
async fn recorded(p: web::Data<Processor>, steps: Steps) -> Result<HttpResponse, actix_web::Error> {
    let pp: &Processor = &p;
    let outcome: Result<Charge, Decline> = steps
        .run_recorded("charge", |key| async move {
            if pp.decline.load(Ordering::SeqCst) {
                pp.charge("charge", &key).await.ok();
                return Err(Decline {
                    code: "card_declined".into(),
                });
            }
            Ok(pp.charge("charge", &key).await.expect("charges"))
        })
        .await?;
    match outcome {
        Ok(charge) => Ok(after(&p, serde_json::json!({ "charge": charge.id }))),
        Err(decline) => {
            if p.fail_after.load(Ordering::SeqCst) {
                return Ok(HttpResponse::ServiceUnavailable().finish());
            }
            Ok(HttpResponse::PaymentRequired().json(decline))
        }
    }
}

#[idempotent(require_key, scope = Tenant)]
async fn two_steps(
    p: web::Data<Processor>,
    steps: Steps,
) -> Result<HttpResponse, actix_web::Error> {
    let order: &[&str] = if p.reverse.load(Ordering::SeqCst) {
        &["b", "a"]
    } else {
        &["a", "b"]
    };
    let mut ids = Vec::new();
    let pp: &Processor = &p;
    for name in order {
        let charge = steps
            .run(name, |key| async move { pp.charge(name, &key).await })
            .await?;
        ids.push(charge.id);
    }
    Ok(after(&p, serde_json::json!({ "ids": ids })))
}

#[idempotent(require_key, scope = Tenant)]
async fn twice(p: web::Data<Processor>, steps: Steps) -> Result<HttpResponse, actix_web::Error> {
    let pp: &Processor = &p;
    for _ in 0..2 {
        steps
            .run(
                "charge",
                |key| async move { pp.charge("charge", &key).await },
            )
            .await?;
    }
    Ok(HttpResponse::Created().finish())
}

/// Retries its step in place while it fails (at most 5 times).
#[idempotent(require_key, scope = Tenant)]
async fn retrying(p: web::Data<Processor>, steps: Steps) -> Result<HttpResponse, actix_web::Error> {
    let pp: &Processor = &p;
    for _ in 0..5 {
        match steps
            .run(
                "charge",
                |key| async move { pp.charge("charge", &key).await },
            )
            .await
        {
            Ok(charge) => return Ok(HttpResponse::Created().json(charge)),
            Err(idem::StepError::Failed(Down)) => continue,
            Err(other) => return Err(other.into()),
        }
    }
    Ok(HttpResponse::ServiceUnavailable().finish())
}

/// No `require_key`: a keyless request runs its steps directly.
#[idempotent(scope = Tenant)]
async fn optional(p: web::Data<Processor>, steps: Steps) -> Result<HttpResponse, actix_web::Error> {
    let pp: &Processor = &p;
    let charge = steps
        .run(
            "charge",
            |key| async move { pp.charge("charge", &key).await },
        )
        .await?;
    Ok(HttpResponse::Created().json(serde_json::json!({
        "charge": charge.id,
        "key": steps.key("charge").to_string(),
    })))
}

/// Not `#[idempotent]`: `Steps` is a misconfiguration.
async fn plain(steps: Steps) -> HttpResponse {
    let _ = steps;
    HttpResponse::Ok().finish()
}

async fn service(
    idem: Idempotency,
    processor: web::Data<Processor>,
) -> impl Service<actix_http::Request, Response = ServiceResponse<BoxBody>, Error = actix_web::Error>
{
    test::init_service(
        App::new()
            .app_data(idem)
            .app_data(processor)
            .route("/pay", web::post().to(pay))
            .route("/pay-too", web::post().to(pay_too))
            .route("/recorded", web::post().to(recorded))
            .route("/two", web::post().to(two_steps))
            .route("/twice", web::post().to(twice))
            .route("/retry", web::post().to(retrying))
            .route("/optional", web::post().to(optional))
            .route("/plain", web::post().to(plain)),
    )
    .await
}

struct Answer {
    status: StatusCode,
    body: Bytes,
    replayed: bool,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!("a JSON body, got {:?}", String::from_utf8_lossy(&self.body))
        })
    }
}

async fn send<S>(service: &S, path: &str, tenant: &str, key: Option<&str>) -> Answer
where
    S: Service<actix_http::Request, Response = ServiceResponse<BoxBody>, Error = actix_web::Error>,
{
    let mut req = test::TestRequest::post()
        .uri(path)
        .insert_header(("content-type", "application/json"))
        .insert_header(("x-tenant", tenant))
        .set_payload("{}");
    if let Some(key) = key {
        req = req.insert_header(("idempotency-key", key));
    }
    let resp = test::call_service(service, req.to_request()).await;
    let status = resp.status();
    let replayed = resp.headers().contains_key("idempotent-replayed");
    Answer {
        status,
        body: test::read_body(resp).await,
        replayed,
    }
}

/// A step that ran before a 5xx released the key is not run again: the retries resume from the
/// journal, with the same charge and the same downstream key.
async fn a_step_before_a_5xx_is_not_run_again(kind: Kind) {
    let backend = Backend::new(kind);
    let p = web::Data::new(Processor::default());
    let app = service(backend.idem.clone(), p.clone()).await;
    p.fail_after.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let a = send(&app, "/pay", "alice", Some("k-5xx")).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(p.calls(), 1, "the charge ran once across three executions");
    p.fail_after.store(false, Ordering::SeqCst);
    let done = send(&app, "/pay", "alice", Some("k-5xx")).await;
    assert_eq!(done.status, StatusCode::CREATED);
    assert_eq!(done.json()["resumed"], true);
    assert_eq!(p.calls(), 1);
    // The charge id is the one the processor gave for the step's key.
    let key = done.json()["key"].as_str().expect("a key").to_owned();
    assert_eq!(done.json()["charge"], format!("ch_{}", &key[..16]));
    assert_eq!(key.len(), 64);
    assert!(!key.contains("k-5xx"));
    // A completed request replays without running the handler (and without the journal).
    let replay = send(&app, "/pay", "alice", Some("k-5xx")).await;
    assert!(replay.replayed);
    assert_eq!(replay.body, done.body);
    assert_eq!(p.calls(), 1);
}

/// A panic after the step releases the key and keeps the journal.
async fn a_step_before_a_panic_is_not_run_again(kind: Kind) {
    let backend = Backend::new(kind);
    let p = web::Data::new(Processor::default());
    let app = service(backend.idem.clone(), p.clone()).await;
    p.panic_after.store(true, Ordering::SeqCst);
    let a = send(&app, "/pay", "alice", Some("k-panic")).await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    p.panic_after.store(false, Ordering::SeqCst);
    let done = send(&app, "/pay", "alice", Some("k-panic")).await;
    assert_eq!(done.status, StatusCode::CREATED);
    assert_eq!(done.json()["resumed"], true);
    assert_eq!(p.calls(), 1);
}

/// `run_recorded`: a decline is an outcome, journaled and answered again without a call.
async fn a_recorded_error_replays_from_the_journal(kind: Kind) {
    let backend = Backend::new(kind);
    let p = web::Data::new(Processor::default());
    let app = service(backend.idem.clone(), p.clone()).await;
    p.decline.store(true, Ordering::SeqCst);
    p.fail_after.store(true, Ordering::SeqCst);
    let a = send(&app, "/recorded", "alice", Some("k-decl")).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    // The processor would accept now: the journaled decline still answers, without a call.
    p.decline.store(false, Ordering::SeqCst);
    p.fail_after.store(false, Ordering::SeqCst);
    let b = send(&app, "/recorded", "alice", Some("k-decl")).await;
    assert_eq!(b.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(b.json()["code"], "card_declined");
    assert_eq!(p.calls(), 1);
}

/// `run`: an error is not journaled; the next execution runs the step again, with the same key.
async fn an_unrecorded_error_runs_again(kind: Kind) {
    let backend = Backend::new(kind);
    let p = web::Data::new(Processor::default());
    let app = service(backend.idem.clone(), p.clone()).await;
    p.fail.store(true, Ordering::SeqCst);
    let a = send(&app, "/pay", "alice", Some("k-err")).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        a.json()["type"],
        "https://idem.dev/problems/step-failed",
        "{:?}",
        a.json()
    );
    p.fail.store(false, Ordering::SeqCst);
    let b = send(&app, "/pay", "alice", Some("k-err")).await;
    assert_eq!(b.status, StatusCode::CREATED);
    assert_eq!(b.json()["resumed"], false);
    assert_eq!(
        p.calls_per_key(),
        vec![2],
        "both calls with one downstream key"
    );
}

/// Steps are found by name: a retry that reaches them in another order finds each.
async fn steps_are_found_by_name_in_any_order(kind: Kind) {
    let backend = Backend::new(kind);
    let p = web::Data::new(Processor::default());
    let app = service(backend.idem.clone(), p.clone()).await;
    p.fail_after.store(true, Ordering::SeqCst);
    let a = send(&app, "/two", "alice", Some("k-two")).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    p.fail_after.store(false, Ordering::SeqCst);
    p.reverse.store(true, Ordering::SeqCst);
    let b = send(&app, "/two", "alice", Some("k-two")).await;
    assert_eq!(b.status, StatusCode::CREATED);
    let ids = b.json()["ids"].clone();
    assert_ne!(ids[0], ids[1], "two steps, two downstream keys");
    assert_eq!(p.calls(), 2);
    assert_eq!(p.calls_per_key(), vec![1, 1]);
}

/// The same name twice in one execution is refused (500, misconfigured), not run twice.
async fn the_same_name_twice_is_refused(kind: Kind) {
    let backend = Backend::new(kind);
    let p = web::Data::new(Processor::default());
    let app = service(backend.idem.clone(), p.clone()).await;
    let a = send(&app, "/twice", "alice", Some("k-twice")).await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(a.json()["type"], "https://idem.dev/problems/misconfigured");
    assert_eq!(p.calls(), 1);
}

/// A step whose error was not journaled may be retried in place, in the same execution, with the
/// same downstream key; once it succeeded, it is journaled once.
async fn a_failed_step_may_be_retried_in_place(kind: Kind) {
    let backend = Backend::new(kind);
    let p = web::Data::new(Processor::default());
    let app = service(backend.idem.clone(), p.clone()).await;
    p.fail_times.store(2, Ordering::SeqCst);
    let a = send(&app, "/retry", "alice", Some("k-retry")).await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(
        p.calls_per_key(),
        vec![3],
        "two failures and a success, one key"
    );
}

/// Downstream keys: one per request and step, different across scopes, keys and handlers; a
/// keyless request gets a fresh one each time.
async fn downstream_keys_are_per_request_and_step(kind: Kind) {
    let backend = Backend::new(kind);
    let p = web::Data::new(Processor::default());
    let app = service(backend.idem.clone(), p.clone()).await;
    let key_of = |a: Answer| a.json()["charge"].as_str().expect("a charge").to_owned();
    let base = key_of(send(&app, "/pay", "alice", Some("k-1")).await);
    for other in [
        key_of(send(&app, "/pay", "bob", Some("k-1")).await),
        key_of(send(&app, "/pay", "alice", Some("k-2")).await),
        key_of(send(&app, "/pay-too", "alice", Some("k-3")).await),
    ] {
        assert_ne!(base, other);
    }
    // The same client key on another handler: another request (its own record and key).
    let a = key_of(send(&app, "/optional", "alice", None).await);
    let b = key_of(send(&app, "/optional", "alice", None).await);
    assert_ne!(a, b, "two keyless requests are two requests");
    assert_eq!(p.calls(), 6);
}

/// In a handler without `#[idempotent]`, the extractor answers the generic 500 `misconfigured`
/// problem: the fix goes to the log, never to the API's callers.
async fn steps_outside_an_idempotent_handler_are_a_misconfiguration(kind: Kind) {
    let backend = Backend::new(kind);
    let app = service(backend.idem.clone(), web::Data::new(Processor::default())).await;
    let a = send(&app, "/plain", "alice", Some("k")).await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    let body = String::from_utf8_lossy(&a.body);
    assert!(
        body.contains("https://idem.dev/problems/misconfigured"),
        "{body}"
    );
    assert!(
        !body.contains("#[idempotent]"),
        "the fix leaked to the caller: {body}"
    );
}

/// Steps whose output is `len` bytes of JSON, `count` of them, each under its own name.
#[idempotent(require_key, scope = Tenant)]
async fn big(
    p: web::Data<Processor>,
    steps: Steps,
    shape: web::Query<Shape>,
) -> Result<HttpResponse, actix_web::Error> {
    let pp: &Processor = &p;
    for i in 0..shape.count {
        let len = shape.len;
        steps
            .run(&format!("step-{i}"), |key| async move {
                pp.charge("big", &key).await.map(|_| "x".repeat(len))
            })
            .await?;
    }
    Ok(HttpResponse::Created().finish())
}

#[derive(Deserialize)]
struct Shape {
    len: usize,
    count: usize,
}

/// Over the limits, a step's result is refused with a clear error (500, not journaled), never
/// dropped silently: a retry runs it again.
#[actix_rt::test]
async fn outputs_over_the_limits_are_refused_not_dropped() {
    let backend = Backend::new(Kind::Memory);
    let p = web::Data::new(Processor::default());
    let app = test::init_service(
        App::new()
            .app_data(backend.idem.clone())
            .app_data(p.clone())
            .route("/big", web::post().to(big)),
    )
    .await;
    // One entry over `Steps::MAX_ENTRY`.
    let path = format!("/big?len={}&count=1", Steps::MAX_ENTRY);
    for calls in 1..=2 {
        let a = send(&app, &path, "alice", Some("k-entry")).await;
        assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(a.json()["type"], "https://idem.dev/problems/misconfigured");
        assert_eq!(p.calls(), calls, "not journaled: the retry runs it again");
    }
    // Entries under the limit, but more of them than `Steps::MAX_JOURNAL` holds.
    let len = Steps::MAX_ENTRY - 100;
    let fit = Steps::MAX_JOURNAL / len;
    let path = format!("/big?len={len}&count={}", fit + 1);
    let a = send(&app, &path, "alice", Some("k-journal")).await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    let before = p.calls();
    let b = send(&app, &path, "alice", Some("k-journal")).await;
    assert_eq!(b.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        p.calls() - before,
        1,
        "the journaled steps replay, the last one runs again"
    );
}

on_every_store!(
    a_step_before_a_5xx_is_not_run_again,
    a_step_before_a_panic_is_not_run_again,
    a_recorded_error_replays_from_the_journal,
    an_unrecorded_error_runs_again,
    steps_are_found_by_name_in_any_order,
    the_same_name_twice_is_refused,
    a_failed_step_may_be_retried_in_place,
    downstream_keys_are_per_request_and_step,
    steps_outside_an_idempotent_handler_are_a_misconfiguration,
);

/// A memory store that never renews a lease (as when the store is unreachable while the handler
/// runs).
struct Forgetful {
    inner: MemoryStore,
}

#[async_trait]
impl Store for Forgetful {
    async fn claim(&self, t: &Ticket, lease: Duration) -> Result<Claim, StoreError> {
        self.inner.claim(t, lease).await
    }
    async fn renew(&self, _: &Ticket, _: Duration) -> Result<Ownership, StoreError> {
        Ok(Ownership::Held)
    }
    async fn complete(
        &self,
        t: &Ticket,
        r: &StoredResponse,
        ttl: Duration,
    ) -> Result<Ownership, StoreError> {
        self.inner.complete(t, r, ttl).await
    }
    async fn release(&self, t: &Ticket) -> Result<Ownership, StoreError> {
        self.inner.release(t).await
    }
    async fn load_steps(&self, t: &Ticket) -> Result<Vec<(String, Bytes)>, StoreError> {
        self.inner.load_steps(t).await
    }
    async fn record_step(
        &self,
        t: &Ticket,
        name: &str,
        entry: &[u8],
        ttl: Duration,
    ) -> Result<Ownership, StoreError> {
        self.inner.record_step(t, name, entry, ttl).await
    }
}

/// Two owners: the first loses its lease while its step runs, the second claims and journals
/// its own step; the first's journal write is refused (503 lease-lost), and the journal keeps
/// the second's result.
#[actix_rt::test]
async fn a_stale_owner_gets_lease_lost_and_never_writes() {
    let store = Arc::new(Forgetful {
        inner: MemoryStore::new(),
    });
    let idem = Idempotency::from_arc(store.clone()).lease(Duration::from_millis(200));
    let p = web::Data::new(Processor::default());
    let app = service(idem, p.clone()).await;
    p.charge_ms.store(600, Ordering::SeqCst);
    let first = send(&app, "/pay", "alice", Some("k-lost"));
    let second = async {
        tokio::time::sleep(Duration::from_millis(350)).await;
        p.charge_ms.store(0, Ordering::SeqCst);
        send(&app, "/pay", "alice", Some("k-lost")).await
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(second.status, StatusCode::CREATED);
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(first.json()["type"], "https://idem.dev/problems/lease-lost");
    // One downstream key, called by both owners: the processor deduplicates it.
    assert_eq!(p.calls_per_key(), vec![2]);
    let replay = send(&app, "/pay", "alice", Some("k-lost")).await;
    assert!(replay.replayed);
    assert_eq!(replay.body, second.body);
}

/// A custom store that implements only the record calls: the trait's defaults refuse steps.
struct RecordsOnly(MemoryStore);

#[async_trait]
impl Store for RecordsOnly {
    async fn claim(&self, t: &Ticket, lease: Duration) -> Result<Claim, StoreError> {
        self.0.claim(t, lease).await
    }
    async fn renew(&self, t: &Ticket, lease: Duration) -> Result<Ownership, StoreError> {
        self.0.renew(t, lease).await
    }
    async fn complete(
        &self,
        t: &Ticket,
        r: &StoredResponse,
        ttl: Duration,
    ) -> Result<Ownership, StoreError> {
        self.0.complete(t, r, ttl).await
    }
    async fn release(&self, t: &Ticket) -> Result<Ownership, StoreError> {
        self.0.release(t).await
    }
}

/// A store that does not implement the journal refuses steps clearly: 503, the handler's step
/// never runs, and the error names the fix.
#[actix_rt::test]
async fn a_store_without_a_journal_refuses_steps() {
    let store = Arc::new(RecordsOnly(MemoryStore::new()));
    let p = web::Data::new(Processor::default());
    let app = service(Idempotency::from_arc(store), p.clone()).await;
    let a = send(&app, "/pay", "alice", Some("k-custom")).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        a.json()["type"],
        "https://idem.dev/problems/store-unavailable"
    );
    assert_eq!(p.calls(), 0);
}

/// The outcomes are counted in `idem_steps_total`, and the request's span says `resumed`.
#[actix_rt::test]
async fn steps_are_counted_and_a_resumed_execution_says_so() {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    let handle = HANDLE.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("the only recorder of this test binary")
    });
    let spans = Arc::new(Mutex::new(Vec::new()));
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(Resumed(spans.clone())),
    );
    let backend = Backend::new(Kind::Memory);
    let p = web::Data::new(Processor::default());
    let app = service(backend.idem.clone(), p.clone()).await;
    p.fail_after.store(true, Ordering::SeqCst);
    send(&app, "/pay-too", "metrics", Some("k-m")).await;
    p.fail_after.store(false, Ordering::SeqCst);
    send(&app, "/pay-too", "metrics", Some("k-m")).await;
    p.fail.store(true, Ordering::SeqCst);
    send(&app, "/pay-too", "metrics", Some("k-m2")).await;
    let text = handle.render();
    for (outcome, n) in [("ran", 1), ("replayed", 1), ("failed", 1)] {
        let line = format!("idem_steps_total{{handler=\"pay_too\",outcome=\"{outcome}\"}} {n}");
        assert!(text.contains(&line), "{line} in:\n{text}");
    }
    assert_eq!(
        *spans.lock().expect("not poisoned"),
        vec![true],
        "one execution resumed"
    );
}

use tracing_subscriber::prelude::*;

/// Collects the `resumed` field recorded on `idempotent` spans.
struct Resumed(Arc<Mutex<Vec<bool>>>);

struct Visit<'a>(&'a Mutex<Vec<bool>>);

impl tracing::field::Visit for Visit<'_> {
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        if field.name() == "resumed" {
            self.0.lock().expect("not poisoned").push(value);
        }
    }
    fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Resumed {
    fn on_record(
        &self,
        _: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        values.record(&mut Visit(&self.0));
    }
}
