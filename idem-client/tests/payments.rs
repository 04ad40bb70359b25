//! End to end: the middleware against the real `payments` example (`examples/payments.rs`, run as a
//! child process on a free loopback port), through testkit's fault-injecting proxy, which lets each
//! request reach the server and then loses about a third of the responses.
//!
//! The example binary must be built first: `cargo build --examples` (scripts/test.sh does).
//!
//! ```text
//! cargo build --examples && cargo test -p idem-client --test payments -- --nocapture
//! ```

use std::{
    collections::HashSet,
    net::SocketAddr,
    process::Child,
    time::{Duration, Instant},
};

use futures_util::{stream, StreamExt};
use idem_client::{IdempotencyError, IdempotencyMiddleware, KeyFormat, ResponseExt, RetryPolicy};
use idem_testkit::{
    free_port,
    proxy::{Fault, FaultPlan, FaultProxy},
    spawn_example,
};
use reqwest::StatusCode;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};

const PAYMENT: &str = r#"{"amount":1000,"currency":"EUR","destination":"acct_1"}"#;
const PAYMENTS: usize = 1000;
const CONCURRENCY: usize = 32;
/// The client's per-attempt timeout; a delayed response is held longer than this, so it is lost.
const TIMEOUT: Duration = Duration::from_millis(400);

/// One `payments` process on the in-memory store, killed when dropped.
struct Payments {
    child: Child,
    addr: SocketAddr,
    direct: reqwest::Client,
}

impl Payments {
    fn start(delay_ms: u64) -> Self {
        let delay = delay_ms.to_string();
        let (child, addr) = spawn_example("payments", &[("PAYMENTS_DELAY_MS", &delay)]);
        Self {
            child,
            addr,
            direct: reqwest::Client::new(),
        }
    }

    /// `executions` from `GET /stats`, asked directly (not through the proxy).
    async fn executions(&self) -> u64 {
        let stats = self
            .direct
            .get(format!("http://{}/stats", self.addr))
            .send()
            .await
            .expect("GET /stats")
            .bytes()
            .await
            .expect("the stats body");
        let stats: serde_json::Value = serde_json::from_slice(&stats).expect("stats JSON");
        stats["executions"].as_u64().expect("an executions count")
    }

    /// `GET /payments/{id}` directly: the stored payment's JSON.
    async fn payment(&self, client: &str, id: &str) -> (StatusCode, bytes::Bytes) {
        let response = self
            .direct
            .get(format!("http://{}/payments/{id}", self.addr))
            .bearer_auth(client)
            .send()
            .await
            .expect("GET /payments/{id}");
        let status = response.status();
        (status, response.bytes().await.expect("a body"))
    }
}

impl Drop for Payments {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client(policy: RetryPolicy, timeout: Option<Duration>) -> ClientWithMiddleware {
    let mut inner = reqwest::Client::builder();
    if let Some(timeout) = timeout {
        inner = inner.timeout(timeout);
    }
    ClientBuilder::new(inner.build().expect("a reqwest client"))
        .with(IdempotencyMiddleware::new().policy(policy))
        .build()
}

/// Fast enough for CI: small waits, a `Retry-After` honoured up to 1 s (the example's 409 asks for
/// the lease's remaining time, up to 30 s).
fn test_policy() -> RetryPolicy {
    RetryPolicy::new()
        .max_attempts(12)
        .deadline(Duration::from_secs(30))
        .backoff(Duration::from_millis(5), Duration::from_millis(100))
        .retry_after_cap(Duration::from_secs(1))
}

/// About a third of the responses lost: 12 % dropped, 12 % reset, 10 % held past the timeout.
fn lossy() -> FaultPlan {
    FaultPlan::Random {
        seed: 13,
        drop: 0.12,
        reset: 0.12,
        delay: 0.10,
        delay_for: Duration::from_secs(1),
    }
}

fn payment_id(body: &[u8]) -> String {
    let payment: serde_json::Value = serde_json::from_slice(body).expect("a payment JSON");
    payment["id"].as_str().expect("a payment id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_execution_per_payment_through_lost_responses_and_the_naive_client_pays_twice() {
    let started = Instant::now();
    let payments = Payments::start(0);

    // The middleware.
    let proxy = FaultProxy::start(payments.addr, lossy())
        .await
        .expect("a proxy");
    let url = format!("http://{}/payments", proxy.addr());
    let idem = client(test_policy(), Some(TIMEOUT));
    let before = payments.executions().await;
    let results: Vec<(String, bytes::Bytes, bool, u32)> = stream::iter(0..PAYMENTS)
        .map(|_| {
            let (idem, url) = (&idem, &url);
            async move {
                let response = idem
                    .post(url)
                    .bearer_auth("e2e")
                    .header("content-type", "application/json")
                    .body(PAYMENT)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("a payment failed: {e:#}"));
                assert_eq!(response.status(), StatusCode::CREATED);
                let report = response
                    .idempotency()
                    .expect("the middleware's report")
                    .clone();
                let key = report.key().expect("a POST gets a key").to_owned();
                let body = response.bytes().await.expect("the 201 body");
                (key, body, report.replayed(), report.attempts())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let executions = payments.executions().await - before;
    let lost = proxy.stats();
    drop(proxy);

    let keys: HashSet<&str> = results.iter().map(|r| r.0.as_str()).collect();
    let ids: HashSet<String> = results.iter().map(|r| payment_id(&r.1)).collect();
    assert_eq!(keys.len(), PAYMENTS, "one key per payment");
    assert_eq!(ids.len(), PAYMENTS, "one payment id per call");
    // Every call's final body is the payment its single execution stored, byte for byte.
    let checks: Vec<bool> = stream::iter(&results)
        .map(|(_, body, _, _)| {
            let payments = &payments;
            async move {
                let (status, stored) = payments.payment("e2e", &payment_id(body)).await;
                status == StatusCode::OK && stored == *body
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    assert!(
        checks.iter().all(|ok| *ok),
        "a final body differs from its stored payment"
    );
    assert_eq!(
        executions, PAYMENTS as u64,
        "exactly one execution per payment"
    );
    let replays = results.iter().filter(|r| r.2).count();
    let attempts: u32 = results.iter().map(|r| r.3).sum();
    let lost_responses = lost.dropped + lost.reset + lost.delayed;
    assert!(
        lost_responses * 4 > lost.responses,
        "the proxy lost too few responses to prove anything: {lost:?}"
    );

    // The naive client: a plain retry loop that makes a new key per attempt.
    let proxy = FaultProxy::start(payments.addr, lossy())
        .await
        .expect("a proxy");
    let url = format!("http://{}/payments", proxy.addr());
    let naive = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .build()
        .expect("a client");
    let before = payments.executions().await;
    let naive_ok: usize = stream::iter(0..PAYMENTS)
        .map(|_| {
            let (naive, url) = (&naive, &url);
            async move {
                for _ in 0..12 {
                    let sent = naive
                        .post(url)
                        .bearer_auth("naive")
                        .header("content-type", "application/json")
                        .header("idempotency-key", uuid::Uuid::new_v4().to_string())
                        .body(PAYMENT)
                        .send()
                        .await;
                    match sent {
                        Ok(response) if response.status() == StatusCode::CREATED => return 1,
                        _ => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                0
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<usize>>()
        .await
        .iter()
        .sum();
    let naive_executions = payments.executions().await - before;
    let naive_lost = proxy.stats();
    let duplicates = naive_executions - naive_ok as u64;

    println!(
        "idem-client: {PAYMENTS} payments, {} responses of {} lost by the proxy ({} dropped, {} reset, \
         {} delayed past the timeout), {attempts} attempts, {replays} answered by a replay, \
         {executions} executions, 0 duplicates",
        lost_responses, lost.responses, lost.dropped, lost.reset, lost.delayed
    );
    println!(
        "naive client (new key per attempt): {naive_ok} payments confirmed, {} responses of {} lost, \
         {naive_executions} executions, {duplicates} duplicate payments",
        naive_lost.dropped + naive_lost.reset + naive_lost.delayed,
        naive_lost.responses
    );
    println!("both runs: {:.1} s", started.elapsed().as_secs_f64());
    assert!(
        duplicates > 0,
        "the naive client made no duplicate: the proxy did not lose responses after execution"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_never_gets_an_answer_reports_its_key_and_the_same_key_replays_later() {
    let payments = Payments::start(0);
    let proxy = FaultProxy::start(
        payments.addr,
        FaultPlan::Schedule(vec![Fault::Drop, Fault::Reset]),
    )
    .await
    .expect("a proxy");
    let lossy_client = client(test_policy().max_attempts(4), Some(TIMEOUT));
    let err = lossy_client
        .post(format!("http://{}/payments", proxy.addr()))
        .bearer_auth("later")
        .header("content-type", "application/json")
        .body(PAYMENT)
        .send()
        .await
        .expect_err("every response is lost");
    let failure = IdempotencyError::of(&err).expect("the middleware's error");
    assert_eq!(failure.attempts(), 4);
    assert!(failure.last_error().is_some());
    let key = failure.key().expect("a POST gets a key").to_owned();
    assert_eq!(
        proxy.stats().responses,
        4,
        "all four attempts reached the server"
    );
    assert_eq!(payments.executions().await, 1, "and it ran once");

    // Later, with the stored key and a working network: the first execution's answer.
    let direct = client(test_policy(), Some(TIMEOUT));
    let response = direct
        .post(format!("http://{}/payments", payments.addr))
        .bearer_auth("later")
        .header("content-type", "application/json")
        .header("Idempotency-Key", format!("\"{key}\""))
        .body(PAYMENT)
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::CREATED);
    let report = response.idempotency().expect("a report").clone();
    assert_eq!(report.key(), Some(key.as_str()), "the caller's key is kept");
    assert!(report.replayed());
    assert_eq!(report.attempts(), 1);
    assert_eq!(payments.executions().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_attempt_still_running_gets_409_then_the_replay() {
    // The handler takes 600 ms; the client gives each attempt 150 ms, so the first attempt times
    // out while the handler runs and the retries get 409 (the key is in flight) until it is done.
    let payments = Payments::start(600);
    let idem = client(
        test_policy().retry_after_cap(Duration::from_millis(100)),
        Some(Duration::from_millis(150)),
    );
    let response = idem
        .post(format!("http://{}/payments", payments.addr))
        .bearer_auth("slow")
        .header("content-type", "application/json")
        .body(PAYMENT)
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::CREATED);
    let report = response.idempotency().expect("a report").clone();
    assert!(report.replayed(), "{report:?}");
    assert!(report.attempts() >= 3, "{report:?}");
    assert_eq!(payments.executions().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_not_retried_and_server_errors_are_bounded() {
    let payments = Payments::start(0);
    let idem = client(test_policy().max_attempts(3), Some(TIMEOUT));
    let url = format!("http://{}/payments", payments.addr);

    let unauthorized = idem
        .post(&url)
        .header("content-type", "application/json")
        .body(PAYMENT)
        .send()
        .await
        .expect("an answer");
    assert_eq!(unauthorized.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(unauthorized.idempotency().map(|r| r.attempts()), Some(1));

    for (body, status) in [
        ("{not json", StatusCode::BAD_REQUEST),
        (
            r#"{"amount":1000,"currency":"EUR","destination":"decline"}"#,
            StatusCode::PAYMENT_REQUIRED,
        ),
    ] {
        let response = idem
            .post(&url)
            .bearer_auth("errors")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("an answer");
        assert_eq!(response.status(), status);
        assert_eq!(
            response.idempotency().map(|r| r.attempts()),
            Some(1),
            "{status}"
        );
    }

    // 503 from the handler releases the key: each retry runs it again, up to max_attempts.
    let before = payments.executions().await;
    let unavailable = idem
        .post(&url)
        .bearer_auth("errors")
        .header("content-type", "application/json")
        .body(r#"{"amount":1000,"currency":"EUR","destination":"unavailable"}"#)
        .send()
        .await
        .expect("an answer");
    assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(unavailable.idempotency().map(|r| r.attempts()), Some(3));
    assert_eq!(payments.executions().await - before, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_bounds_a_request_and_refused_connections_are_retried() {
    let payments = Payments::start(0);
    let proxy = FaultProxy::start(
        payments.addr,
        FaultPlan::Schedule(vec![Fault::Delay(Duration::from_secs(5))]),
    )
    .await
    .expect("a proxy");
    let idem = client(test_policy().deadline(Duration::from_millis(300)), None);
    let started = Instant::now();
    let err = idem
        .post(format!("http://{}/payments", proxy.addr()))
        .bearer_auth("deadline")
        .body(PAYMENT)
        .send()
        .await
        .expect_err("the deadline passes");
    assert!(started.elapsed() < Duration::from_secs(2));
    let failure = IdempotencyError::of(&err).expect("the middleware's error");
    assert!(failure.is_deadline());
    assert_eq!(failure.attempts(), 1);

    let nobody = format!("http://127.0.0.1:{}/payments", free_port());
    let err = client(test_policy().max_attempts(3), Some(TIMEOUT))
        .post(nobody)
        .body(PAYMENT)
        .send()
        .await
        .expect_err("nothing listens");
    let failure = IdempotencyError::of(&err).expect("the middleware's error");
    assert_eq!(failure.attempts(), 3);
    assert!(failure.key().is_some());
    assert!(matches!(
        failure.last_error(),
        Some(reqwest_middleware::Error::Reqwest(e)) if e.is_connect()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_formats_generators_and_methods() {
    let payments = Payments::start(0);
    let url = format!("http://{}/payments", payments.addr);
    let with = |middleware: IdempotencyMiddleware| {
        ClientBuilder::new(reqwest::Client::new())
            .with(middleware.policy(test_policy().max_attempts(3)))
            .build()
    };
    let pay = |client: ClientWithMiddleware| {
        let url = url.clone();
        async move {
            client
                .post(url)
                .bearer_auth("config")
                .header("content-type", "application/json")
                .body(PAYMENT)
                .send()
                .await
        }
    };

    // Quoted keys from a custom generator: the server reads the same key as the bare form.
    let quoted = with(
        IdempotencyMiddleware::new()
            .key_format(KeyFormat::Quoted)
            .key_generator(|| "order-42".to_owned()),
    );
    let first = pay(quoted.clone()).await.expect("an answer");
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(first.idempotency().and_then(|r| r.key()), Some("order-42"));
    let bare = with(IdempotencyMiddleware::new().key_generator(|| "order-42".to_owned()));
    let again = pay(bare).await.expect("an answer");
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.idempotency().map(|r| r.replayed()), Some(true));
    assert_eq!(payments.executions().await, 1);

    // A generator that makes an invalid key: refused before anything is sent.
    let invalid = with(IdempotencyMiddleware::new().key_generator(|| "not a key".to_owned()));
    let err = pay(invalid).await.expect_err("an invalid key");
    let failure = IdempotencyError::of(&err).expect("the middleware's error");
    assert_eq!((failure.key(), failure.attempts()), (None, 0));
    assert_eq!(payments.executions().await, 1);

    // Methods: GET is retried without a key; a method neither keyed nor idempotent is sent once.
    let proxy = FaultProxy::start(
        payments.addr,
        FaultPlan::Schedule(vec![Fault::Drop, Fault::Pass]),
    )
    .await
    .expect("a proxy");
    let plain = with(IdempotencyMiddleware::new());
    let stats = plain
        .get(format!("http://{}/stats", proxy.addr()))
        .send()
        .await
        .expect("an answer on the second attempt");
    let report = stats.idempotency().expect("a report").clone();
    assert_eq!((report.key(), report.attempts()), (None, 2));
    let not_keyed = with(IdempotencyMiddleware::new().methods([reqwest::Method::PATCH]));
    let err = not_keyed
        .post(format!("http://{}/payments", proxy.addr()))
        .bearer_auth("config")
        .header("content-type", "application/json")
        .body(PAYMENT)
        .send()
        .await
        .expect_err("the response is dropped and not retried");
    assert!(
        IdempotencyError::of(&err).is_none(),
        "passed through: {err:?}"
    );
    assert_eq!(proxy.stats().responses, 3, "sent once");
}
