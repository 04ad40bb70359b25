//! The replay cache: a retry of a completed request replays from this instance's memory, against
//! a real `redis-server`, with the store's own `INFO commandstats` counting what reached it.
//!
//! - a retry storm (10,000 requests on one completed key, 32 at a time) costs each instance
//!   exactly one store read, the instance that completed the key included;
//! - a copy answers as the store would: the same response, 422 to a different body, and never
//!   after the record expired;
//! - `replay_cache(0)` turns it off: every retry reads the store;
//! - the copies stay within the capacity under a flood of unique completed keys;
//! - over a `PostgresStore` (a real throwaway Postgres), a claim that reads a completed record
//!   leaves a copy that lasts no longer than the record.

mod common;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use actix_web::{web, HttpResponse};
use common::{RawResponse, TestServer};
use idem::{idempotent, Idempotency};
use idem_testkit::RedisServer;

#[derive(Default)]
struct Executions(AtomicU64);

impl Executions {
    fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[idempotent(require_key, scope = idem::Unscoped)]
async fn pay(
    executions: web::Data<Executions>,
    body: web::Json<serde_json::Value>,
) -> HttpResponse {
    let n = executions.0.fetch_add(1, Ordering::SeqCst) + 1;
    HttpResponse::Created()
        .insert_header(("location", format!("/payments/pay_{n}")))
        .json(serde_json::json!({ "id": format!("pay_{n}"), "amount": body["amount"] }))
}

/// Kept 3 s: long enough for the test's requests, short enough to see it end.
#[idempotent(require_key, scope = idem::Unscoped, ttl = "3s", lease = "1s")]
async fn pay_briefly(
    executions: web::Data<Executions>,
    body: web::Json<serde_json::Value>,
) -> HttpResponse {
    let n = executions.0.fetch_add(1, Ordering::SeqCst) + 1;
    HttpResponse::Created()
        .json(serde_json::json!({ "id": format!("pay_{n}"), "amount": body["amount"] }))
}

/// One app instance over `redis`: its own store (pool), configuration and cache.
fn instance(
    redis: &RedisServer,
    configure: impl FnOnce(Idempotency) -> Idempotency,
) -> (TestServer, Arc<web::Data<Executions>>) {
    serve(configure(Idempotency::new(common::redis_store(
        redis,
        Duration::from_secs(2),
    ))))
}

/// One app instance with `idem`.
fn serve(idem: Idempotency) -> (TestServer, Arc<web::Data<Executions>>) {
    let executions = Arc::new(web::Data::new(Executions::default()));
    let data = Arc::clone(&executions);
    let server = TestServer::start(idem, move |cfg| {
        cfg.app_data((*data).clone())
            .route("/payments", web::post().to(pay))
            .route("/brief", web::post().to(pay_briefly));
    });
    (server, executions)
}

async fn post(server: &TestServer, path: &str, key: &str, body: &[u8]) -> RawResponse {
    common::post_keyed(server.addr, path, key, body).await
}

/// The claims (`SET ... NX GET`) and completions (`EVALSHA`) Redis has run since the last reset.
fn reads_and_writes(redis: &RedisServer) -> (u64, u64) {
    let stats = idem_testkit::command_stats(&redis.cli(&["INFO", "commandstats"]));
    let calls = |name: &str| {
        stats
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, calls)| *calls)
    };
    (calls("set"), calls("evalsha"))
}

/// Sends `n` copies of one request from 32 client threads, each request on a connection of its
/// own; answers every response's status, replay header and body.
async fn storm(server: &TestServer, key: &str, body: &[u8], n: usize) -> Vec<RawResponse> {
    let request = common::post("/payments", &[("idempotency-key", key)], body);
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        let clients: Vec<_> = (0..32)
            .map(|c| {
                let request = request.clone();
                std::thread::spawn(move || {
                    (0..n)
                        .filter(|i| i % 32 == c)
                        .map(|_| common::raw_request(addr, &request))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        clients
            .into_iter()
            .flat_map(|c| c.join().expect("client thread"))
            .collect()
    })
    .await
    .expect("clients")
}

const BODY: &[u8] = br#"{"amount":1000}"#;

#[actix_rt::test]
async fn a_retry_storm_costs_the_store_at_most_one_read_per_instance() {
    let redis = RedisServer::start();
    let (a, a_runs) = instance(&redis, |i| i);
    let (b, b_runs) = instance(&redis, |i| i);
    let first = post(&a, "/payments", "storm", BODY).await;
    assert_eq!(first.status, 201);
    redis.cli(&["CONFIG", "RESETSTAT"]);

    // The instance that completed the record reads it once, at the first retry (a first
    // request does not pay for a copy: most are never retried).
    let answers = storm(&a, "storm", BODY, 10_000).await;
    assert_eq!(answers.len(), 10_000);
    for answer in &answers {
        assert_eq!(answer.status, 201);
        assert_eq!(answer.header("idempotent-replayed"), Some("true"));
        assert_eq!(answer.header("location"), first.header("location"));
        assert_eq!(answer.body, first.body, "byte for byte");
    }
    assert_eq!(
        reads_and_writes(&redis),
        (1, 0),
        "instance A: one claim (SET ... NX GET) for 10,000 retries"
    );

    // Another instance reads the record once, 32 requests missing at the same moment included.
    let answers = storm(&b, "storm", BODY, 10_000).await;
    assert!(answers
        .iter()
        .all(|r| r.status == 201 && r.body == first.body));
    assert_eq!(
        reads_and_writes(&redis),
        (2, 0),
        "instance B: one claim (SET ... NX GET) for 10,000 retries"
    );
    assert_eq!(a_runs.get() + b_runs.get(), 1, "the handler ran once");
}

#[actix_rt::test]
async fn a_copy_answers_as_the_store_would_and_never_after_the_record_expired() {
    let redis = RedisServer::start();
    let (a, runs) = instance(&redis, |i| i);
    let (b, b_runs) = instance(&redis, |i| i);
    let first = post(&a, "/brief", "brief", BODY).await;
    assert_eq!(first.status, 201);
    // Each instance reads the record once, at its first retry (its expiry is in it), and keeps
    // a copy.
    for server in [&a, &b] {
        let replay = post(server, "/brief", "brief", BODY).await;
        assert_eq!(replay.status, 201);
        assert_eq!(replay.body, first.body);
    }
    redis.cli(&["CONFIG", "RESETSTAT"]);
    for server in [&a, &b] {
        // A different request with the key: 422 from the copy, as from the store.
        let other = post(server, "/brief", "brief", br#"{"amount":1}"#).await;
        assert_eq!(other.status, 422);
        let again = post(server, "/brief", "brief", BODY).await;
        assert_eq!(again.body, first.body);
    }
    assert_eq!(reads_and_writes(&redis), (0, 0), "answered from the copies");

    // Once the record's 3 s are over, neither instance replays it: the request runs again.
    tokio::time::sleep(Duration::from_millis(3_300)).await;
    for (server, n) in [(&a, 2), (&b, 3)] {
        let after = post(server, "/brief", &format!("brief-after-{n}"), BODY).await;
        assert_eq!(after.status, 201);
        let expired = post(server, "/brief", "brief", BODY).await;
        assert_eq!(expired.status, 201);
        assert_eq!(expired.header("idempotent-replayed"), None, "{n}");
        assert_ne!(expired.body, first.body);
        // The new record's own retry replays it.
        let replay = post(server, "/brief", "brief", BODY).await;
        assert_eq!(replay.header("idempotent-replayed"), Some("true"));
        tokio::time::sleep(Duration::from_millis(3_300)).await;
    }
    assert_eq!(runs.get() + b_runs.get(), 5);
}

#[actix_rt::test]
async fn turned_off_every_retry_reads_the_store() {
    let redis = RedisServer::start();
    let (a, runs) = instance(&redis, |i| i.replay_cache(0));
    assert_eq!(post(&a, "/payments", "off", BODY).await.status, 201);
    redis.cli(&["CONFIG", "RESETSTAT"]);
    for _ in 0..20 {
        let replay = post(&a, "/payments", "off", BODY).await;
        assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    }
    assert_eq!(reads_and_writes(&redis), (20, 0));
    // And a record deleted by hand is gone at once (with the cache, a copy would replay it until
    // the copy ends: the README says so).
    redis.cli(&["FLUSHALL"]);
    let again = post(&a, "/payments", "off", BODY).await;
    assert_eq!(again.header("idempotent-replayed"), None);
    assert_eq!(runs.get(), 2);
}

#[actix_rt::test]
async fn the_copies_stay_within_the_capacity_under_a_flood_of_unique_keys() {
    const CAPACITY: usize = 64 * 1024;
    let redis = RedisServer::start();
    let idem = Idempotency::new(common::redis_store(&redis, Duration::from_secs(2)))
        .replay_cache(CAPACITY);
    let executions = Arc::new(web::Data::new(Executions::default()));
    let data = Arc::clone(&executions);
    let server = TestServer::start(idem.clone(), move |cfg| {
        cfg.app_data((*data).clone())
            .route("/payments", web::post().to(pay));
    });
    let addr = server.addr;
    // 3,000 completed records of ~400 bytes each, each retried once: 1.2 MB of copies for a 64 KiB
    // cache.
    tokio::task::spawn_blocking(move || {
        let clients: Vec<_> = (0..8)
            .map(|c| {
                std::thread::spawn(move || {
                    for i in (0..3_000).filter(|i| i % 8 == c) {
                        let key = format!("flood-{i}");
                        let request = common::post("/payments", &[("idempotency-key", &key)], BODY);
                        let r = common::raw_request(addr, &request);
                        assert_eq!(r.status, 201);
                        // Its retry reads the record and copies it.
                        let retry = common::raw_request(addr, &request);
                        assert_eq!(retry.header("idempotent-replayed"), Some("true"));
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().expect("client");
        }
    })
    .await
    .expect("clients");
    assert_eq!(executions.get(), 3_000);
    let weighed = idem_runtime::testing::replay_cache_weight(&idem).await;
    assert!(
        weighed <= CAPACITY as u64,
        "the copies weigh {weighed} bytes, over the {CAPACITY}-byte capacity"
    );
    assert!(weighed > 0, "some copies are kept");
}

/// Over Postgres, the claim tells how long the record it read still lives: instance B's copy
/// replays a record deleted by hand (the README's warning), an instance without the cache runs
/// the request again, and B's copy of a 3 s record ends with the record.
#[cfg(feature = "postgres")]
#[actix_rt::test]
async fn over_postgres_a_claim_that_reads_a_record_leaves_a_copy_that_ends_with_it() {
    let server = idem_testkit::postgres::PostgresServer::start();
    let store = || async {
        let store = idem::PostgresStore::from_url(&server.url()).expect("store");
        store.migrate().await.expect("migrate");
        store
    };
    let (a, a_runs) = serve(Idempotency::new(store().await));
    let (b, b_runs) = serve(Idempotency::new(store().await));
    let (c, c_runs) = serve(Idempotency::new(store().await).replay_cache(0));
    let first = post(&a, "/payments", "pg", BODY).await;
    assert_eq!(first.status, 201);
    let brief = post(&a, "/brief", "pg-brief", BODY).await;
    assert_eq!(brief.status, 201);
    // B reads both records once through its claim, and keeps copies.
    for (path, key, body) in [
        ("/payments", "pg", &first.body),
        ("/brief", "pg-brief", &brief.body),
    ] {
        let replay = post(&b, path, key, BODY).await;
        assert_eq!(replay.header("idempotent-replayed"), Some("true"));
        assert_eq!(&replay.body, body);
    }

    server.psql("DELETE FROM idem_records");
    let copied = post(&b, "/payments", "pg", BODY).await;
    assert_eq!(copied.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        copied.body, first.body,
        "B's copy outlives a record deleted by hand"
    );
    assert_eq!(
        post(&b, "/payments", "pg", br#"{"amount":1}"#).await.status,
        422
    );
    let uncached = post(&c, "/payments", "pg", BODY).await;
    assert_eq!(uncached.status, 201);
    assert_eq!(
        uncached.header("idempotent-replayed"),
        None,
        "C reads the store"
    );

    // The 3 s record's copy ends no later than the record would have.
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    let after = post(&b, "/brief", "pg-brief", BODY).await;
    assert_eq!(after.status, 201);
    assert_eq!(after.header("idempotent-replayed"), None);
    assert_eq!((a_runs.get(), b_runs.get(), c_runs.get()), (2, 1, 1));
}
