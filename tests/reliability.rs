//! The reliability suite: exactly once under concurrency, several instances, slow handlers, stale
//! owners and store faults, through real `HttpServer`s on loopback ports, real TCP clients and real
//! `redis-server` processes that the tests stop, restart and freeze (SIGSTOP).
//!
//! The crash of an app process is in `reliability_crash.rs`, malformed input in
//! `reliability_input.rs`, the tracing outcomes in `reliability_tracing.rs`. `docs/failure-model.md`
//! states what these tests guarantee.
//!
//! Every Redis-backed test ends with the hygiene check: every key left in its Redis has a TTL, and
//! none is longer than the configured `ttl`.

mod common;

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use actix_web::{http::StatusCode, web, HttpResponse};
use common::{
    assert_every_key_expires_within, eventually, post, redis_store, send, send_concurrently,
    send_within, Backend, Kind, RawResponse, TestServer,
};
use idem::{idempotent, Idempotency, ScopeId};

/// The record TTL of every test app; the hygiene check holds every key to it.
const TTL: Duration = Duration::from_secs(60);
const BODY: &[u8] = br#"{"amount":100,"currency":"EUR"}"#;

/// What the test handlers do: count their executions, take `delays[n - 1]` for execution `n` (the
/// last delay repeats), and answer 201, or `first_status` on the first execution.
struct Work {
    executions: AtomicU64,
    delays: Vec<Duration>,
    first_status: StatusCode,
}

impl Work {
    fn new(delays: &[u64]) -> web::Data<Self> {
        Self::failing_first(delays, StatusCode::CREATED)
    }

    fn failing_first(delays: &[u64], first_status: StatusCode) -> web::Data<Self> {
        web::Data::new(Self {
            executions: AtomicU64::new(0),
            delays: delays.iter().copied().map(Duration::from_millis).collect(),
            first_status,
        })
    }

    fn executions(&self) -> u64 {
        self.executions.load(Ordering::SeqCst)
    }

    async fn run(&self) -> HttpResponse {
        let n = self.executions.fetch_add(1, Ordering::SeqCst) + 1;
        let i = usize::try_from(n - 1).unwrap_or(usize::MAX);
        let delay = self.delays[i.min(self.delays.len() - 1)];
        tokio::time::sleep(delay).await;
        let status = if n == 1 {
            self.first_status
        } else {
            StatusCode::CREATED
        };
        let id = format!("pay_{:016x}", rand::random::<u64>());
        HttpResponse::build(status)
            .insert_header(("location", format!("/payments/{id}")))
            .json(serde_json::json!({ "id": id, "execution": n }))
    }
}

#[idempotent(require_key)]
async fn work(work: web::Data<Work>, _body: web::Bytes) -> HttpResponse {
    work.run().await
}

#[idempotent(require_key, wait = "20s")]
async fn work_waiting(work: web::Data<Work>, _body: web::Bytes) -> HttpResponse {
    work.run().await
}

/// The app's idempotency settings: the lease under test, [`TTL`], callers named by `X-Client`.
fn settings(idem: Idempotency, lease: Duration) -> Idempotency {
    idem.lease(lease).ttl(TTL).scope_resolver(|req| {
        req.headers()
            .get("x-client")
            .and_then(|v| v.to_str().ok())
            .map(ScopeId::new)
            .ok_or_else(|| actix_web::error::ErrorUnauthorized("send X-Client"))
    })
}

fn routes(work: web::Data<Work>) -> impl Fn(&mut web::ServiceConfig) + Send + Clone + 'static {
    move |cfg| {
        cfg.app_data(work.clone())
            .route("/work", web::post().to(self::work))
            .route("/wait", web::post().to(work_waiting));
    }
}

fn request(path: &str, key: &str) -> Vec<u8> {
    post(path, &[("x-client", "c1"), ("idempotency-key", key)], BODY)
}

fn replayed(r: &RawResponse) -> bool {
    r.header("idempotent-replayed") == Some("true")
}

fn execution(r: &RawResponse) -> u64 {
    let body: serde_json::Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("a JSON body ({e}): {}", String::from_utf8_lossy(&r.body)));
    body["execution"].as_u64().expect("an execution number")
}

fn problem_type(r: &RawResponse) -> String {
    let body: serde_json::Value = serde_json::from_slice(&r.body).expect("a problem body");
    body["type"].as_str().expect("a type").to_owned()
}

fn describe(r: &RawResponse) -> String {
    format!(
        "{} {:?} {}",
        r.status,
        r.headers,
        String::from_utf8_lossy(&r.body)
    )
}

/// A 409 with a `Retry-After` of whole seconds.
fn assert_in_flight(r: &RawResponse) {
    assert_eq!(r.status, 409, "{}", describe(r));
    let after: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("409 without a Retry-After: {}", describe(r)));
    assert!(after >= 1, "{}", describe(r));
    assert!(problem_type(r).ends_with("/in-flight"));
}

/// Waits (bounded) until the handler has started its `n`th execution.
async fn started(work: &Work, n: u64) {
    eventually(
        Duration::from_secs(10),
        Duration::from_millis(2),
        || async { (work.executions() >= n).then_some(()) },
    )
    .await
    .unwrap_or_else(|| panic!("execution {n} never started"));
}

/// A Redis backend whose store gives up on a call after `timeout`.
fn redis_backend(lease: Duration, timeout: Duration) -> Backend {
    let redis = idem_testkit::RedisServer::start();
    Backend {
        idem: settings(Idempotency::new(redis_store(&redis, timeout)), lease),
        server: Some(redis),
    }
}

async fn hygiene(backend: &Backend) {
    if let Some(server) = &backend.server {
        assert_every_key_expires_within(server, TTL).await;
    }
}

/// One instance, 100 identical requests at once against a slow handler: one execution; every
/// answer is the original response (or its byte-identical replay) or a 409 with `Retry-After`.
async fn concurrent_duplicates_run_once(kind: Kind) {
    let backend = Backend::with(kind, |i| settings(i, Duration::from_secs(5)));
    let work = Work::new(&[800]);
    let server = TestServer::start(backend.idem.clone(), routes(work.clone()));
    let answers = send_concurrently(&[server.addr], request("/work", "dup"), 100).await;

    assert_eq!(work.executions(), 1, "the handler ran once");
    let first = answers
        .iter()
        .find(|a| a.status == 201 && !replayed(a))
        .expect("one request ran the handler");
    let (mut conflicts, mut replays) = (0, 0);
    for a in &answers {
        match a.status {
            201 => {
                assert_eq!(a.body, first.body, "a replay is byte-identical");
                assert_eq!(a.header("location"), first.header("location"));
                replays += usize::from(replayed(a));
            }
            409 => {
                assert_in_flight(a);
                conflicts += 1;
            }
            _ => panic!("unexpected answer: {}", describe(a)),
        }
    }
    let originals = answers
        .iter()
        .filter(|a| a.status == 201 && !replayed(a))
        .count();
    assert_eq!(originals, 1, "exactly one original response");
    eprintln!("{kind:?}: 1 execution, {conflicts} x 409, {replays} replays");
    // Once it has finished, a retry replays it.
    let again = send(server.addr, request("/work", "dup")).await;
    assert!(replayed(&again));
    assert_eq!(again.body, first.body);
    assert_eq!(work.executions(), 1);
    hygiene(&backend).await;
}

/// The same with `wait`: every one of the 100 answers is the response itself.
async fn concurrent_duplicates_with_wait_all_get_the_response(kind: Kind) {
    let backend = Backend::with(kind, |i| settings(i, Duration::from_secs(5)));
    let work = Work::new(&[800]);
    let server = TestServer::start(backend.idem.clone(), routes(work.clone()));
    let answers = send_concurrently(&[server.addr], request("/wait", "dup"), 100).await;

    assert_eq!(work.executions(), 1, "the handler ran once");
    let first = &answers[0];
    for a in &answers {
        assert_eq!(a.status, 201, "{}", describe(a));
        assert_eq!(a.body, first.body, "every answer is the same response");
    }
    let originals = answers.iter().filter(|a| !replayed(a)).count();
    assert_eq!(originals, 1, "one original, 99 replays");
    hygiene(&backend).await;
}

/// A handler that runs more than three times its lease keeps its key: the lease is renewed, so
/// the retries that arrive all along get 409 and never run it again.
async fn a_slow_handler_keeps_its_key(kind: Kind) {
    let lease = Duration::from_millis(500);
    let backend = Backend::with(kind, |i| settings(i, lease));
    let work = Work::new(&[1700]);
    let server = TestServer::start(backend.idem.clone(), routes(work.clone()));
    let addr = server.addr;
    let original =
        tokio::task::spawn_blocking(move || common::raw_request(addr, &request("/work", "slow")));
    started(&work, 1).await;
    let began = Instant::now();
    let mut retries = 0;
    while !original.is_finished() {
        let retry = send(addr, request("/work", "slow")).await;
        if retry.status == 201 {
            assert!(
                replayed(&retry),
                "a retry ran the handler again after {:?}: {}",
                began.elapsed(),
                describe(&retry)
            );
        } else {
            assert_in_flight(&retry);
        }
        retries += 1;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let original = original.await.expect("client");
    assert_eq!(original.status, 201);
    assert!(!replayed(&original));
    assert!(
        began.elapsed() > lease * 3,
        "the handler outlived three leases"
    );
    assert!(retries > 10, "retries kept coming while it ran: {retries}");
    assert_eq!(work.executions(), 1, "{retries} retries never ran it again");
    let after = send(addr, request("/work", "slow")).await;
    assert!(replayed(&after));
    assert_eq!(after.body, original.body);
    hygiene(&backend).await;
}

on_every_store!(
    concurrent_duplicates_run_once,
    concurrent_duplicates_with_wait_all_get_the_response,
    a_slow_handler_keeps_its_key,
);

/// Two app instances with stores of their own (separate pools) on one Redis, the duplicates
/// split between them: one execution in total.
#[actix_rt::test]
async fn several_instances_run_the_handler_once_in_total() {
    let lease = Duration::from_secs(5);
    let backend = Backend::with(Kind::Redis, |i| settings(i, lease));
    let second = settings(
        Idempotency::new(redis_store(
            backend.server.as_ref().expect("redis"),
            Duration::from_millis(500),
        )),
        lease,
    );
    let (work_a, work_b) = (Work::new(&[800]), Work::new(&[800]));
    let a = TestServer::start(backend.idem.clone(), routes(work_a.clone()));
    let b = TestServer::start(second, routes(work_b.clone()));
    let answers = send_concurrently(&[a.addr, b.addr], request("/work", "dup"), 100).await;

    assert_eq!(
        work_a.executions() + work_b.executions(),
        1,
        "one execution over both instances (a: {}, b: {})",
        work_a.executions(),
        work_b.executions()
    );
    let first = answers
        .iter()
        .find(|r| r.status == 201 && !replayed(r))
        .expect("one request ran the handler");
    for r in &answers {
        match r.status {
            201 => assert_eq!(r.body, first.body),
            409 => assert_in_flight(r),
            _ => panic!("unexpected answer: {}", describe(r)),
        }
    }
    // Each instance replays what the other one ran.
    for addr in [a.addr, b.addr] {
        let again = send(addr, request("/work", "dup")).await;
        assert!(replayed(&again));
        assert_eq!(again.body, first.body);
    }
    hygiene(&backend).await;
}

/// Stale owner: the first request's handler loses its lease while Redis is frozen for longer
/// than the lease (Redis expires keys by the wall clock, so the key is gone when it wakes up); a
/// retry claims the key and completes; then the stale handler finishes. Its completion (or its
/// release, when its response is one that releases) must not touch the newer record: the next
/// retry replays the NEWER response.
mod stale_owner {
    use super::*;

    async fn stale_owner_cannot_touch_the_newer_record(first_status: StatusCode) {
        let lease = Duration::from_millis(300);
        let mut backend = redis_backend(lease, Duration::from_millis(100));
        // The first execution outlives the freeze; the retry's is quick.
        let work = Work::failing_first(&[2500, 0], first_status);
        let server = TestServer::start(backend.idem.clone(), routes(work.clone()));
        let addr = server.addr;
        let stale = tokio::task::spawn_blocking(move || {
            common::raw_request(addr, &request("/work", "stale"))
        });
        started(&work, 1).await;

        // Freeze Redis for more than two leases: renewals time out, the lease runs out.
        backend.redis().pause();
        tokio::time::sleep(lease * 2 + Duration::from_millis(200)).await;
        backend.redis().resume();

        let newer = send(addr, request("/work", "stale")).await;
        assert_eq!(newer.status, 201, "{}", describe(&newer));
        assert!(!replayed(&newer));
        assert_eq!(execution(&newer), 2, "the retry ran the handler anew");
        assert!(
            !stale.is_finished(),
            "the stale handler must still be running"
        );

        let stale = stale.await.expect("client");
        assert_eq!(stale.status, first_status.as_u16(), "{}", describe(&stale));
        assert_eq!(execution(&stale), 1);

        let after = send(addr, request("/work", "stale")).await;
        assert_eq!(after.status, 201, "{}", describe(&after));
        assert!(replayed(&after), "{}", describe(&after));
        assert_eq!(
            after.body, newer.body,
            "the retry replays the newer response"
        );
        assert_eq!(work.executions(), 2);
        hygiene(&backend).await;
    }

    /// The stale owner's response would be stored: its `complete` is refused.
    #[actix_rt::test]
    async fn cannot_overwrite_the_newer_record() {
        stale_owner_cannot_touch_the_newer_record(StatusCode::CREATED).await;
    }

    /// The stale owner's response releases the key (a 503): its `release` is refused.
    #[actix_rt::test]
    async fn cannot_delete_the_newer_record() {
        stale_owner_cannot_touch_the_newer_record(StatusCode::SERVICE_UNAVAILABLE).await;
    }
}

/// Store faults, with the store-call timeout each test sets.
mod store_faults {
    use super::*;

    fn assert_unavailable(r: &RawResponse) {
        assert_eq!(r.status, 503, "{}", describe(r));
        assert!(problem_type(r).ends_with("/store-unavailable"));
        assert!(r.header("retry-after").is_some(), "503 without Retry-After");
    }

    /// Redis down before the claim: 503 + `Retry-After`, no execution. Redis back (restarted,
    /// empty): the same app serves again without a restart of its own; the records the old Redis
    /// held are gone with it, so a retry of a finished request runs again.
    #[actix_rt::test]
    async fn redis_down_before_the_claim_is_503_and_a_restart_recovers() {
        let mut backend = redis_backend(Duration::from_secs(5), Duration::from_millis(300));
        let work = Work::new(&[0]);
        let server = TestServer::start(backend.idem.clone(), routes(work.clone()));
        let addr = server.addr;
        let done = send(addr, request("/work", "before")).await;
        assert_eq!(done.status, 201);

        backend.redis().stop();
        for _ in 0..3 {
            let down = send(addr, request("/work", "k")).await;
            assert_unavailable(&down);
        }
        assert_eq!(work.executions(), 1, "the handler did not run");

        backend.redis().restart();
        let failed = AtomicU64::new(0);
        let up = eventually(
            Duration::from_secs(10),
            Duration::from_millis(20),
            || async {
                let r = send(addr, request("/work", "k")).await;
                if r.status == 503 {
                    failed.fetch_add(1, Ordering::SeqCst);
                    return None;
                }
                Some(r)
            },
        )
        .await
        .expect("the app serves again once Redis is back");
        let failed = failed.load(Ordering::SeqCst);
        eprintln!("after the Redis restart, {failed} request(s) got 503 before the first success");
        assert!(failed <= 4, "{failed} failures after the restart");
        assert_eq!(up.status, 201, "{}", describe(&up));
        assert!(!replayed(&up));
        assert_eq!(work.executions(), 2);

        // Documented: a Redis without persistence forgets finished records when it restarts.
        // (No retry of it reached this instance before, so its replay cache holds no copy.)
        let forgotten = send(addr, request("/work", "before")).await;
        assert_eq!(forgotten.status, 201);
        assert!(!replayed(&forgotten), "the restart lost the record");
        assert_eq!(work.executions(), 3);
        hygiene(&backend).await;
    }

    /// Redis killed between claim and completion: the client still gets the handler's response;
    /// the record dies with the server, so once Redis is back a retry runs the handler again.
    #[actix_rt::test]
    async fn redis_down_mid_handler_the_client_gets_its_response() {
        let mut backend = redis_backend(Duration::from_secs(5), Duration::from_millis(300));
        let work = Work::new(&[600, 0]);
        let server = TestServer::start(backend.idem.clone(), routes(work.clone()));
        let addr = server.addr;
        let original = send_within(addr, request("/work", "mid"), Duration::from_secs(10));
        let kill = async {
            started(&work, 1).await;
            backend.redis().stop();
        };
        let (original, ()) = tokio::join!(original, kill);
        let original = original.expect("an answer");
        assert_eq!(original.status, 201, "{}", describe(&original));
        assert_eq!(execution(&original), 1);

        let down = send(addr, request("/work", "mid")).await;
        assert_unavailable(&down);

        backend.redis().restart();
        let retry = eventually(
            Duration::from_secs(10),
            Duration::from_millis(20),
            || async {
                let r = send(addr, request("/work", "mid")).await;
                (r.status != 503).then_some(r)
            },
        )
        .await
        .expect("the app serves again");
        assert_eq!(retry.status, 201, "{}", describe(&retry));
        assert!(!replayed(&retry), "the record was lost with the server");
        assert_eq!(execution(&retry), 2);
        hygiene(&backend).await;
    }

    /// Redis frozen between claim and completion: the completion times out, the client still gets
    /// the handler's response (late by one store timeout). Retries meanwhile get 503. Frozen past
    /// the lease, the pending record has expired when Redis wakes up (even the completion that was
    /// sent meanwhile and runs on wake-up finds it gone), so a retry runs the handler again: the
    /// key was blocked for no longer than the freeze plus one lease.
    #[actix_rt::test]
    async fn redis_frozen_mid_handler_the_pending_record_expires_after_the_lease() {
        let lease = Duration::from_millis(400);
        let timeout = Duration::from_millis(150);
        let backend = redis_backend(lease, timeout);
        let work = Work::new(&[500, 0]);
        let server = TestServer::start(backend.idem.clone(), routes(work.clone()));
        let addr = server.addr;
        let redis = backend.server.as_ref().expect("redis");

        let original = send_within(addr, request("/work", "frozen"), Duration::from_secs(10));
        let freeze = async {
            started(&work, 1).await;
            redis.pause();
            Instant::now()
        };
        let (original, frozen_at) = tokio::join!(original, freeze);
        let original = original.expect("an answer despite the frozen store");
        assert_eq!(original.status, 201, "{}", describe(&original));
        assert_eq!(execution(&original), 1);

        let asked = Instant::now();
        let during = send_within(addr, request("/work", "frozen"), Duration::from_secs(10))
            .await
            .expect("an answer, not a hang");
        assert_unavailable(&during);
        assert!(asked.elapsed() < Duration::from_secs(5));

        let frozen_for = lease * 2 + Duration::from_millis(200);
        tokio::time::sleep(frozen_for.saturating_sub(frozen_at.elapsed())).await;
        redis.resume();
        let resumed = Instant::now();

        // The claim of the 503 above may itself land on wake-up and hold the key for one lease.
        let retry = eventually(
            Duration::from_secs(10),
            Duration::from_millis(20),
            || async {
                let r = send(addr, request("/work", "frozen")).await;
                match r.status {
                    409 | 503 => None,
                    _ => Some(r),
                }
            },
        )
        .await
        .expect("the key frees itself");
        eprintln!(
            "frozen Redis: the key ran again {:?} after Redis woke up (lease {lease:?})",
            resumed.elapsed()
        );
        assert_eq!(retry.status, 201, "{}", describe(&retry));
        assert!(!replayed(&retry));
        assert_eq!(execution(&retry), 2, "the stale pending record expired");
        hygiene(&backend).await;
    }

    /// Redis hung (SIGSTOP): every store call gives up after the configured timeout, so requests
    /// get a quick 503 instead of hanging with it; once it answers again, so does the app. The
    /// timeout is longer than redis-rs's own default response timeout (500 ms), so the test tells
    /// whether the configured one is in force.
    #[actix_rt::test]
    async fn a_hung_redis_is_a_quick_503_and_the_app_recovers() {
        let lease = Duration::from_millis(500);
        let timeout = Duration::from_secs(1);
        let backend = redis_backend(lease, timeout);
        let work = Work::new(&[0]);
        let server = TestServer::start(backend.idem.clone(), routes(work.clone()));
        let addr = server.addr;
        let redis = backend.server.as_ref().expect("redis");
        // Warm every lane: the calls below go over established connections.
        for i in 0..3 {
            let warm = send(addr, request("/work", &format!("warm-{i}"))).await;
            assert_eq!(warm.status, 201);
        }

        redis.pause();
        let mut took = Vec::new();
        for i in 0..2 {
            let asked = Instant::now();
            let hung = send_within(
                addr,
                request("/work", &format!("hung-{i}")),
                Duration::from_secs(10),
            )
            .await;
            took.push(asked.elapsed());
            let hung = hung.unwrap_or_else(|e| panic!("the request hung with Redis: {e}"));
            assert_unavailable(&hung);
        }
        redis.resume();
        eprintln!("hung Redis (store timeout {timeout:?}): 503 after {took:?}");
        for took in took {
            assert!(
                took >= timeout,
                "503 after {took:?}: the store gave up before its configured timeout of {timeout:?}"
            );
            assert!(
                took < timeout + Duration::from_secs(4),
                "a hung store held a request for {took:?}"
            );
        }
        assert_eq!(work.executions(), 3, "no handler ran without the store");

        let back = eventually(
            Duration::from_secs(10),
            Duration::from_millis(20),
            || async {
                let r = send(addr, request("/work", "after")).await;
                (r.status != 503).then_some(r)
            },
        )
        .await
        .expect("the app serves again once Redis answers");
        assert_eq!(back.status, 201, "{}", describe(&back));
        // A claim sent into the frozen server may land on wake-up: it holds its key for one lease
        // at most, then the key runs.
        let hung_key = eventually(
            Duration::from_secs(10),
            Duration::from_millis(20),
            || async {
                let r = send(addr, request("/work", "hung-0")).await;
                (r.status == 201).then_some(r)
            },
        )
        .await
        .expect("a key claimed into a frozen Redis frees itself after the lease");
        assert!(!replayed(&hung_key));
        assert_eq!(work.executions(), 5);
        hygiene(&backend).await;
    }
}

/// Duplicates that wait (`wait = "..."`) for a request in flight on another instance share one
/// poll of the store per key in their process, and a 409's `Retry-After` follows how long the
/// handler runs rather than the whole lease.
mod waiting {
    use super::*;

    /// The calls the stores sent: a claim is a `SET` (or, before Redis 7.0, an `EVALSHA`), a
    /// completion an `EVALSHA`. (commandstats also counts the commands a script runs: the
    /// completion's inner `SET` counts once here.)
    fn store_calls(server: &idem_testkit::RedisServer) -> u64 {
        idem_testkit::command_stats(&server.cli(&["INFO", "commandstats"]))
            .into_iter()
            .filter(|(name, _)| name == "evalsha" || name == "set")
            .map(|(_, calls)| calls)
            .sum()
    }

    /// The first request runs for 2 s on instance A; 200 duplicates wait on instance B (the same
    /// Redis, its own configuration: B is not told when A settles). Each waiter used to poll on
    /// its own backoff (thousands of claims); now B's store calls are its 200 arriving claims
    /// plus one poll per 250 ms.
    #[actix_rt::test]
    async fn waiters_in_one_process_share_one_poll_per_key() {
        let lease = Duration::from_secs(30);
        let backend = Backend::with(Kind::Redis, |i| settings(i, lease));
        let server_b = settings(
            Idempotency::new(redis_store(
                backend.server.as_ref().expect("redis"),
                Duration::from_secs(2),
            )),
            lease,
        );
        let work_a = Work::new(&[2000]);
        let work_b = Work::new(&[2000]);
        let a = TestServer::start(backend.idem.clone(), routes(work_a.clone()));
        let b = TestServer::start(server_b, routes(work_b.clone()));
        let redis = backend.server.as_ref().expect("redis");

        let before = store_calls(redis);
        let addr_a = a.addr;
        let first = tokio::task::spawn_blocking(move || {
            common::raw_request(addr_a, &request("/wait", "w"))
        });
        started(&work_a, 1).await;
        let waiting = send_concurrently(&[b.addr], request("/wait", "w"), 200).await;
        let first = first.await.expect("the first request");
        let calls = store_calls(redis) - before;

        assert_eq!(first.status, 201, "{}", describe(&first));
        assert_eq!(work_a.executions() + work_b.executions(), 1);
        for r in &waiting {
            assert_eq!(r.status, 201, "{}", describe(r));
            assert_eq!(r.body, first.body, "every waiter gets the response");
        }
        eprintln!("{calls} store calls for 1 execution and 200 waiters");
        // A: claim, complete (and its inner SET). B: 200 arriving claims, then one poll per
        // 250 ms for ~2 s; generous slack for a loaded machine.
        assert!(calls >= 203, "{calls}: the count must see every claim");
        assert!(calls <= 3 + 200 + 40, "{calls} store calls");
        hygiene(&backend).await;
    }

    /// A handler of its own: the run time a handler's 409 reports is observed per handler, and
    /// the other tests' handlers run in this process at the same time.
    #[idempotent(require_key)]
    async fn timed(work: web::Data<Work>, _body: web::Bytes) -> HttpResponse {
        work.run().await
    }

    /// The 409 of a duplicate says to retry after about the handler's run time (observed by this
    /// instance, at least 1 s), not after the lease's remaining ~30 s.
    #[actix_rt::test]
    async fn a_409_says_retry_after_the_handlers_run_time() {
        let backend = Backend::with(Kind::Memory, |i| settings(i, Duration::from_secs(30)));
        let work = Work::new(&[2000]);
        let routes = {
            let work = work.clone();
            move |cfg: &mut web::ServiceConfig| {
                cfg.app_data(work.clone())
                    .route("/work", web::post().to(timed));
            }
        };
        let server = TestServer::start(backend.idem.clone(), routes);
        let addr = server.addr;
        let retry_after = |r: &RawResponse| -> u64 {
            assert_in_flight(r);
            r.header("retry-after")
                .and_then(|v| v.parse().ok())
                .expect("seconds")
        };

        // Never run here yet: 1 s.
        let first =
            tokio::task::spawn_blocking(move || common::raw_request(addr, &request("/work", "a")));
        started(&work, 1).await;
        let early = send(addr, request("/work", "a")).await;
        assert_eq!(retry_after(&early), 1, "{}", describe(&early));
        assert_eq!(first.await.expect("first").status, 201);

        // Once it ran for ~2 s: 2 or 3 (whole seconds, rounded up), never the lease's 30.
        let second =
            tokio::task::spawn_blocking(move || common::raw_request(addr, &request("/work", "b")));
        started(&work, 2).await;
        let later = send(addr, request("/work", "b")).await;
        let after = retry_after(&later);
        assert!(
            (2..=3).contains(&after),
            "Retry-After {after}: {}",
            describe(&later)
        );
        assert_eq!(second.await.expect("second").status, 201);
    }
}
