//! A 409 from both ends, on real processes: the `payments` example (a child process, on a real
//! Redis) after a crash and a restart, and `idem-client` against it.
//!
//! - Server: the first instance is SIGKILLed while its handler runs; the restarted instance does
//!   not run that record, so its 409 says how long the orphaned lease still holds the key
//!   (`Retry-After`), not how long a handler typically takes.
//! - Client: a key still in flight when the client's budget runs out is an error that carries the
//!   key, not `Ok(409)`; the same key retried later gets the payment. A replayed 409 (the
//!   handler's own, stored by idem) is final: answered after one attempt.
//!
//! Build the examples first: `cargo build --examples`.

mod common;

use std::{
    net::SocketAddr,
    process::Child,
    time::{Duration, Instant},
};

use actix_web::{web, HttpResponse};
use common::{post, raw_request, try_request, RawResponse, TestServer};
use idem::{Idempotency, MemoryStore};
use idem_client::{
    reqwest_middleware::{ClientBuilder, ClientWithMiddleware},
    IdempotencyError, IdempotencyMiddleware, ResponseExt, RetryPolicy, IDEMPOTENCY_KEY,
};
use idem_testkit::{spawn_example, RedisServer};

const PAYMENT: &str = r#"{"amount":1000,"currency":"EUR","destination":"acct_1"}"#;
/// The lease of both instances: long enough to tell from the 1 s a guess would say, short enough
/// for the test to wait it out.
const LEASE: Duration = Duration::from_secs(8);

/// One `payments` process on `redis`, killed when dropped.
struct Payments {
    child: Child,
    addr: SocketAddr,
}

impl Payments {
    fn start(redis: &RedisServer, delay: Duration) -> Self {
        let (redis_url, delay, lease) = (
            redis.url(),
            delay.as_millis().to_string(),
            LEASE.as_millis().to_string(),
        );
        let (child, addr) = spawn_example(
            "payments",
            &[
                ("REDIS_URL", &redis_url),
                ("PAYMENTS_DELAY_MS", &delay),
                ("PAYMENTS_LEASE_MS", &lease),
            ],
        );
        Self { child, addr }
    }

    fn pay(&self, key: &str) -> RawResponse {
        raw_request(self.addr, &payment(key))
    }

    fn executions(&self) -> u64 {
        let r = raw_request(
            self.addr,
            b"GET /stats HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
        );
        let stats: serde_json::Value = serde_json::from_slice(&r.body).expect("stats JSON");
        stats["executions"].as_u64().expect("executions")
    }

    fn url(&self) -> String {
        format!("http://{}/payments", self.addr)
    }
}

impl Drop for Payments {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn payment(key: &str) -> Vec<u8> {
    post(
        "/payments",
        &[("Authorization", "Bearer alice"), ("Idempotency-Key", key)],
        PAYMENT.as_bytes(),
    )
}

fn describe(r: &RawResponse) -> String {
    format!(
        "{} {:?} {}",
        r.status,
        r.headers,
        String::from_utf8_lossy(&r.body)
    )
}

fn client(policy: RetryPolicy) -> ClientWithMiddleware {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("a reqwest client");
    ClientBuilder::new(http)
        .with(IdempotencyMiddleware::new().policy(policy))
        .build()
}

/// An instance crashes while its handler runs: the key stays pending until the lease runs out.
/// Answers the restarted instance (on the same Redis, no delay) and when the crash happened.
fn crash_while_paying(redis: &RedisServer, key: &str) -> (Payments, Instant) {
    let first = Payments::start(redis, Duration::from_secs(60));
    let (addr, request) = (first.addr, payment(key));
    // Its client waits for an answer that never comes: the process dies under it.
    let client = std::thread::spawn(move || try_request(addr, &request, Duration::from_secs(30)));
    let claimed = Instant::now();
    while redis.cli(&["DBSIZE"]) == "0" {
        assert!(
            claimed.elapsed() < Duration::from_secs(10),
            "the claim never reached Redis"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(first); // SIGKILL
    let crashed = Instant::now();
    assert!(client.join().expect("client thread").is_err());
    (Payments::start(redis, Duration::ZERO), crashed)
}

/// After a crash and a restart, the first 409 says how long the orphaned lease still holds the
/// key (this instance has never run it), not a 1 s guess.
#[test]
fn a_restarted_instance_tells_the_orphaned_leases_remaining_time() {
    let redis = RedisServer::start();
    let (app, crashed) = crash_while_paying(&redis, "orphan");
    let conflict = app.pay("orphan");
    let elapsed = crashed.elapsed();
    assert_eq!(conflict.status, 409, "{}", describe(&conflict));
    let retry_after: u64 = conflict
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {}", describe(&conflict)));
    eprintln!("409 {elapsed:?} after the crash, lease {LEASE:?}: Retry-After: {retry_after}");
    let left = LEASE.saturating_sub(elapsed).as_secs();
    assert!(
        retry_after >= left && retry_after <= LEASE.as_secs(),
        "Retry-After: {retry_after} while the orphaned lease has {left} s or more left"
    );
    assert_eq!(app.executions(), 0);
}

/// The client against that key: its budget (2 s) runs out while the key is in flight, and it
/// ends with an error that carries the key, not `Ok(409)`. The same key, retried later with a
/// budget that outlasts the lease, gets the payment, made once.
#[test]
fn the_client_ends_an_in_flight_key_with_an_error_that_carries_it() {
    let redis = RedisServer::start();
    let (app, _crashed) = crash_while_paying(&redis, "held");
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");

    let short = RetryPolicy::new()
        .max_attempts(10)
        .deadline(Duration::from_secs(2))
        .backoff(Duration::from_millis(10), Duration::from_millis(100))
        .retry_after_cap(Duration::from_millis(500));
    let sent = runtime.block_on(
        client(short)
            .post(app.url())
            .bearer_auth("alice")
            .header(IDEMPOTENCY_KEY, "held")
            .header("content-type", "application/json")
            .body(PAYMENT)
            .send(),
    );
    let err = match sent {
        Ok(response) => panic!(
            "an in-flight key handed back as an answer: {} after {:?} attempt(s)",
            response.status(),
            response.idempotency().map(|r| r.attempts())
        ),
        Err(err) => err,
    };
    let failure = IdempotencyError::of(&err).unwrap_or_else(|| panic!("not the client's: {err}"));
    eprintln!("{err}");
    assert!(failure.is_in_flight(), "{err}");
    assert_eq!(failure.key(), Some("held"));
    assert!(failure.attempts() >= 2, "{err}");
    assert!(
        failure
            .retry_after()
            .is_some_and(|after| after > Duration::from_secs(1)),
        "{err}"
    );
    assert!(
        err.to_string().contains("retry later with this key"),
        "{err}"
    );
    assert_eq!(app.executions(), 0);

    let patient = RetryPolicy::new()
        .max_attempts(10)
        .deadline(LEASE * 3)
        .retry_after_cap(LEASE);
    let later = runtime
        .block_on(
            client(patient)
                .post(app.url())
                .bearer_auth("alice")
                .header(IDEMPOTENCY_KEY, failure.key().expect("the key"))
                .header("content-type", "application/json")
                .body(PAYMENT)
                .send(),
        )
        .expect("the payment, once the lease ran out");
    assert_eq!(later.status(), 201);
    assert_eq!(app.executions(), 1);
}

/// The handler's own 409, stored by idem like any 4xx: a retry gets it replayed, and the client
/// hands that replay back at once: it is the operation's answer, not a key in flight.
#[actix_rt::test]
async fn a_replayed_409_is_answered_after_one_attempt() {
    #[idem::idempotent(scope = idem::Unscoped)]
    async fn close_account(_body: web::Bytes) -> HttpResponse {
        HttpResponse::Conflict()
            .content_type("application/json")
            .body(r#"{"error":"the account has a balance"}"#)
    }

    let server = TestServer::start(Idempotency::new(MemoryStore::new()), |cfg| {
        cfg.route("/close", web::post().to(close_account));
    });
    let first = common::send(
        server.addr,
        post("/close", &[("Idempotency-Key", "c1")], b"{}"),
    )
    .await;
    assert_eq!(first.status, 409, "{}", describe(&first));
    assert_eq!(first.header("idempotent-replayed"), None);

    let policy = RetryPolicy::new()
        .max_attempts(5)
        .backoff(Duration::from_millis(50), Duration::from_millis(200));
    let started = Instant::now();
    let response = client(policy)
        .post(format!("http://{}/close", server.addr))
        .header(IDEMPOTENCY_KEY, "c1")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .expect("the stored 409");
    let report = response
        .idempotency()
        .expect("the middleware's report")
        .clone();
    eprintln!(
        "replayed 409: {} attempt(s) in {:?}",
        report.attempts(),
        started.elapsed()
    );
    assert_eq!(response.status(), 409);
    assert!(report.replayed());
    assert_eq!(report.attempts(), 1);
    assert_eq!(
        response.text().await.expect("a body"),
        r#"{"error":"the account has a balance"}"#
    );
}
