//! The Postgres store and the transactional mode (`idem::PgTransaction`) under production
//! conditions, against a real Postgres: isolation levels, partitions, pool pressure, cancelled
//! statements, restarts, and the handler's own timeouts.

#![cfg(feature = "postgres")]

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use actix_web::{
    dev::{Service, ServiceResponse},
    http::StatusCode,
    post, test, web, App, HttpResponse,
};
use idem::{
    idempotent,
    sqlx::{self, postgres::PgPoolOptions},
    Idempotency, PgTransaction, PostgresStore,
};
use idem_testkit::{
    postgres::PostgresServer,
    proxy::{Fault, FaultPlan, FaultProxy},
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Order {
    id: String,
    /// How long the handler waits after its write, in milliseconds.
    #[serde(default)]
    wait_ms: u64,
    /// A statement the handler runs first in its transaction (an isolation level, say).
    #[serde(default)]
    first: Option<String>,
}

/// What the handlers saw, for the tests to compare with the answers.
#[derive(Default)]
struct Seen {
    /// The orders whose handler body started.
    ran: Mutex<HashSet<String>>,
}

fn sql_error(e: sqlx::Error) -> actix_web::Error {
    actix_web::error::ErrorInternalServerError(e.to_string())
}

/// Writes the order through the request's transaction, then waits as told.
#[post("/orders")]
#[idempotent(scope = idem::Unscoped)]
async fn create_order(
    mut tx: PgTransaction,
    order: web::Json<Order>,
    seen: web::Data<Seen>,
) -> actix_web::Result<HttpResponse> {
    seen.ran
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(order.id.clone());
    let mut conn = tx.acquire().await?;
    if let Some(first) = &order.first {
        sqlx::query(first)
            .execute(&mut *conn)
            .await
            .map_err(sql_error)?;
    }
    sqlx::query("INSERT INTO orders (id) VALUES ($1)")
        .bind(&order.id)
        .execute(&mut *conn)
        .await
        .map_err(sql_error)?;
    drop(conn);
    tokio::time::sleep(Duration::from_millis(order.wait_ms)).await;
    Ok(HttpResponse::Created().json(&order.id))
}

/// Answers the timeouts its transaction's statements run under.
#[post("/timeouts")]
#[idempotent(scope = idem::Unscoped)]
async fn timeouts(mut tx: PgTransaction) -> actix_web::Result<HttpResponse> {
    let mut conn = tx.acquire().await?;
    let mut shown = Vec::new();
    for setting in ["statement_timeout", "lock_timeout"] {
        let value: String = sqlx::query_scalar(&format!("SHOW {setting}"))
            .fetch_one(&mut *conn)
            .await
            .map_err(sql_error)?;
        shown.push(format!("{setting}={value}"));
    }
    Ok(HttpResponse::Ok().body(shown.join(",")))
}

/// An idempotent handler without a transaction.
#[post("/plain")]
#[idempotent(scope = idem::Unscoped)]
async fn plain() -> HttpResponse {
    HttpResponse::Created().finish()
}

async fn server() -> PostgresServer {
    let server = PostgresServer::start();
    server.psql("CREATE TABLE orders (id text PRIMARY KEY)");
    server
}

/// A store over a pool of `max` connections to `url`, with the given timeout.
async fn pooled_store(url: &str, max: u32, timeout: Duration) -> PostgresStore {
    let pool = PgPoolOptions::new()
        .max_connections(max)
        .test_before_acquire(false)
        .connect_lazy(url)
        .expect("a pool");
    let store = PostgresStore::builder(pool)
        .timeout(timeout)
        .build()
        .expect("store");
    store.migrate().await.expect("migrate");
    store
}

async fn url_store(server: &PostgresServer) -> PostgresStore {
    let store = PostgresStore::from_url(&server.url()).expect("store");
    store.migrate().await.expect("migrate");
    store
}

async fn app(
    store: &PostgresStore,
    seen: &web::Data<Seen>,
    configure: impl FnOnce(Idempotency) -> Idempotency,
) -> impl Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error> {
    test::init_service(
        App::new()
            .app_data(configure(Idempotency::new(store.clone())))
            .app_data(seen.clone())
            .service(create_order)
            .service(timeouts)
            .service(plain),
    )
    .await
}

fn order(path: &str, key: &str, body: serde_json::Value) -> actix_http::Request {
    test::TestRequest::post()
        .uri(path)
        .insert_header(("Idempotency-Key", key))
        .set_json(body)
        .to_request()
}

async fn send(
    app: &impl Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error>,
    req: actix_http::Request,
) -> (StatusCode, String) {
    let resp = test::call_service(app, req).await;
    let status = resp.status();
    let body = test::read_body(resp).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn count(server: &PostgresServer, sql: &str) -> u64 {
    server.psql(sql).parse().expect("a count")
}

fn set_default_isolation(server: &PostgresServer, level: &str) {
    server.psql(&format!(
        "ALTER DATABASE idem SET default_transaction_isolation = '{level}'"
    ));
}

/// Item 1: with the database's default isolation at REPEATABLE READ or SERIALIZABLE, or the
/// handler choosing it, a handler that runs for longer than a third of its lease (the lease is
/// renewed meanwhile) completes; duplicates sent meanwhile get 409, never a 503.
#[actix_rt::test]
async fn every_isolation_level_completes_and_duplicates_get_409() {
    let server = server().await;
    let seen = web::Data::new(Seen::default());
    let lease = Duration::from_millis(600);
    let mut answers = Vec::new();
    for (n, (default, first)) in [
        ("repeatable read", None),
        ("serializable", None),
        (
            "read committed",
            Some("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
        ),
        (
            "read committed",
            Some("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        set_default_isolation(&server, default);
        // A new pool: its sessions start under the new default.
        let store = url_store(&server).await;
        let app = app(&store, &seen, |i| i.lease(lease)).await;
        for i in 0..2 {
            let id = format!("o{n}-{i}");
            let body = serde_json::json!({ "id": id, "wait_ms": 700, "first": first });
            let key = format!("k{n}-{i}");
            let duplicates = async {
                let mut statuses = Vec::new();
                // While the handler runs (700 ms), past two renewals (every 200 ms).
                for _ in 0..3 {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    statuses.push(send(&app, order("/orders", &key, body.clone())).await.0);
                }
                statuses
            };
            let ((status, text), duplicates) =
                tokio::join!(send(&app, order("/orders", &key, body.clone())), duplicates);
            answers.push((default, first, status.as_u16(), duplicates.clone()));
            assert_eq!(
                status,
                201,
                "{default} {first:?}: {text}\n{}",
                server.log_tail()
            );
            assert!(
                duplicates.iter().all(|s| *s == StatusCode::CONFLICT),
                "{default} {first:?}: duplicates answered {duplicates:?}"
            );
            let (again, _) = send(&app, order("/orders", &key, body)).await;
            assert_eq!(again, 201, "{default} {first:?}: the retry replays");
        }
    }
    eprintln!("answers: {answers:?}");
    assert_eq!(count(&server, "SELECT count(*) FROM orders"), 8);
    assert_eq!(
        count(
            &server,
            "SELECT count(*) FROM idem_records WHERE state = 'completed'"
        ),
        8
    );
}

/// Item 1: concurrent first requests of one key under SERIALIZABLE as the database's default:
/// one runs, the others get 409 (the claim's INSERT ... ON CONFLICT never answers 503).
#[actix_rt::test]
async fn concurrent_duplicates_under_serializable_get_409_not_503() {
    let server = server().await;
    set_default_isolation(&server, "serializable");
    let store = url_store(&server).await;
    let seen = web::Data::new(Seen::default());
    let app = app(&store, &seen, |i| i).await;
    let mut statuses = Vec::new();
    for round in 0..10 {
        let key = format!("dup-{round}");
        let body = serde_json::json!({ "id": key, "wait_ms": 1000 });
        let all = futures_util::future::join_all(
            (0..8).map(|_| send(&app, order("/orders", &key, body.clone()))),
        )
        .await;
        statuses.extend(all.iter().map(|(s, _)| s.as_u16()));
    }
    let created = statuses.iter().filter(|s| **s == 201).count();
    let conflicts = statuses.iter().filter(|s| **s == 409).count();
    eprintln!("201: {created}, 409: {conflicts}, all: {statuses:?}");
    assert_eq!((created, conflicts), (10, 70), "{statuses:?}");
}

/// Item 7: over `from_url`'s pool, the handler's statements run under the database's timeouts,
/// not the store's.
#[actix_rt::test]
async fn the_handlers_statements_do_not_inherit_the_stores_timeouts() {
    let server = server().await;
    let store = url_store(&server).await;
    let seen = web::Data::new(Seen::default());
    let app = app(&store, &seen, |i| i).await;
    let (status, body) = send(&app, order("/timeouts", "t", serde_json::json!({}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "statement_timeout=0,lock_timeout=0");
}

/// Item 5: 30 concurrent transactional requests of 2 s against a pool of 4: the handler body
/// runs only for the requests that answer 201; a request refused for want of a connection is
/// refused before its handler runs. Waits for connections and failed `BEGIN`s are counted as
/// `op="begin"` store errors, and the completion in the transaction is timed as `op="complete"`.
#[actix_rt::test]
async fn a_saturated_pool_answers_503_before_the_handler_runs() {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("the only recorder of this test binary");
    let server = server().await;
    let store = pooled_store(&server.url(), 4, Duration::from_secs(2)).await;
    let seen = web::Data::new(Seen::default());
    let app = app(&store, &seen, |i| i.lease(Duration::from_secs(3))).await;
    let answers = futures_util::future::join_all((0..30).map(|i| {
        let id = format!("p{i}");
        let body = serde_json::json!({ "id": id, "wait_ms": 2000 });
        let app = &app;
        async move { (id.clone(), send(app, order("/orders", &id, body)).await) }
    }))
    .await;
    let ran = seen
        .ran
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let created: HashSet<String> = answers
        .iter()
        .filter(|(_, (s, _))| *s == 201)
        .map(|(id, _)| id.clone())
        .collect();
    let ran_then_refused: Vec<&String> = ran.difference(&created).collect();
    eprintln!(
        "201: {}, 503: {}, handler bodies run: {}, run then refused: {}",
        created.len(),
        answers.iter().filter(|(_, (s, _))| *s == 503).count(),
        ran.len(),
        ran_then_refused.len()
    );
    assert!(!created.is_empty());
    assert!(
        answers.iter().all(|(_, (s, _))| *s == 201 || *s == 503),
        "{answers:?}"
    );
    assert!(
        ran_then_refused.is_empty(),
        "handlers ran, then their requests were refused: {ran_then_refused:?}"
    );
    assert_eq!(
        count(&server, "SELECT count(*) FROM orders"),
        created.len() as u64
    );
    let rendered = metrics.render();
    let begin_errors = rendered
        .lines()
        .any(|l| l.starts_with("idem_store_errors_total") && l.contains("op=\"begin\""));
    assert!(begin_errors, "{rendered}");
    let complete_timed = rendered.lines().any(|l| {
        l.starts_with("idem_store_operation_seconds")
            && l.contains("op=\"complete\"")
            && l.contains("store=\"postgres\"")
    });
    assert!(complete_timed, "{rendered}");
}

fn proxied_url(server: &PostgresServer, proxy: SocketAddr) -> String {
    server.url().replace(
        &format!(":{}/", server.port()),
        &format!(":{}/", proxy.port()),
    )
}

/// Item 4: a `BEGIN` whose answer comes after the store timeout does not leave its connection
/// inside a transaction: on a pool of one, the next request's record is committed.
#[actix_rt::test]
async fn a_begin_cut_off_by_the_timeout_leaves_a_clean_connection() {
    let server = server().await;
    let proxy = FaultProxy::start(
        SocketAddr::from(([127, 0, 0, 1], server.port())),
        FaultPlan::Matching {
            needle: b"BEGIN".to_vec(),
            fault: Fault::Delay(Duration::from_millis(1500)),
        },
    )
    .await
    .expect("a proxy");
    let store = pooled_store(
        &proxied_url(&server, proxy.addr()),
        1,
        Duration::from_secs(1),
    )
    .await;
    let seen = web::Data::new(Seen::default());
    let app = app(&store, &seen, |i| i).await;
    let body = serde_json::json!({ "id": "b1" });
    let (status, text) = send(&app, order("/orders", "begin", body)).await;
    assert_eq!(status, 503, "{text}");
    // The late BEGIN has answered by now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut statuses = Vec::new();
    for i in 0..3 {
        statuses.push(
            send(
                &app,
                order("/plain", &format!("after-{i}"), serde_json::json!({})),
            )
            .await
            .0,
        );
    }
    let committed = count(
        &server,
        "SELECT count(*) FROM idem_records WHERE state = 'completed'",
    );
    let stale = count(
        &server,
        "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' \
         AND datname = 'idem' AND pid <> pg_backend_pid()",
    );
    eprintln!("after the cut-off BEGIN: {statuses:?}, committed records: {committed}, sessions idle in a transaction: {stale}");
    assert!(statuses.iter().all(|s| *s == 201), "{statuses:?}");
    assert_eq!(
        committed, 3,
        "the records were written inside a stale transaction"
    );
    assert_eq!(stale, 0);
}

/// Item 2: a transaction whose `COMMIT` is lost in a partition (the connection goes silent and
/// stays open) after the record's completion is ended by the server within the store timeout, so
/// its row lock does not wedge the key: a retry succeeds within a few seconds.
#[actix_rt::test]
async fn a_commit_lost_in_a_partition_does_not_wedge_its_key() {
    let server = server().await;
    // Another instance, whose connections are not partitioned: the client's retries reach it.
    let other = url_store(&server).await;
    let proxy = FaultProxy::start(
        SocketAddr::from(([127, 0, 0, 1], server.port())),
        FaultPlan::Matching {
            needle: b"COMMIT".to_vec(),
            fault: Fault::Blackhole,
        },
    )
    .await
    .expect("a proxy");
    let store = PostgresStore::from_url(&proxied_url(&server, proxy.addr())).expect("store");
    let seen = web::Data::new(Seen::default());
    let app = app(&store, &seen, |i| i.lease(Duration::from_secs(1))).await;
    let body = serde_json::json!({ "id": "cut" });
    let (status, text) = send(&app, order("/orders", "cut", body.clone())).await;
    assert_eq!(status, 503, "{text}");
    assert_eq!(proxy.stats().blackholed, 1);
    let other = self::app(&other, &seen, |i| i.lease(Duration::from_secs(1))).await;
    let started = Instant::now();
    let mut tries = Vec::new();
    let freed = loop {
        let (status, _) = send(&other, order("/orders", "cut", body.clone())).await;
        tries.push(status.as_u16());
        if status == 201 {
            break Some(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(20) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let stale = count(
        &server,
        "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' \
         AND datname = 'idem' AND pid <> pg_backend_pid()",
    );
    eprintln!(
        "the key was free after {freed:?} ({tries:?}); sessions idle in a transaction: {stale}"
    );
    assert!(freed.is_some(), "the key stayed wedged: {tries:?}");
    assert_eq!(count(&server, "SELECT count(*) FROM orders"), 1);
}

/// Item 3: a claim that waited for a connection, then for a locked record, and was given up by
/// the runtime does not commit later on the server: once the lock is gone, the key is free.
#[actix_rt::test]
async fn a_claim_given_up_by_the_runtime_does_not_commit_later() {
    let server = server().await;
    let store = url_store(&server).await;
    let seen = web::Data::new(Seen::default());
    // The record is expired by hand below: no copy of it in the replay cache.
    let app = app(&store, &seen, |i| i.replay_cache(0)).await;
    // The key's record: expired, so a claim takes it over (and waits for its row lock).
    let (status, _) = send(&app, order("/plain", "late", serde_json::json!({}))).await;
    assert_eq!(status, 201);
    server.psql("UPDATE idem_records SET expires_at = now() - interval '1 second'");
    let side = PgPoolOptions::new()
        .max_connections(1)
        .connect(&server.url())
        .await
        .expect("connect");
    let mut locker = side.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM idem_records FOR UPDATE")
        .execute(&mut *locker)
        .await
        .expect("lock");
    // Every connection of the store's pool is busy for 0.8 s.
    let max = store.pool().options().get_max_connections();
    let mut held = Vec::new();
    for _ in 0..max {
        held.push(store.pool().acquire().await.expect("a connection"));
    }
    let release_pool = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        held.clear();
    };
    let (first, ()) = tokio::join!(
        send(&app, order("/plain", "late", serde_json::json!({}))),
        release_pool
    );
    eprintln!("the claim that waited: {}", first.0);
    assert_ne!(first.0, 201, "{first:?}");
    // The lock goes after the runtime gave up on the claim, within the old server-side bound.
    tokio::time::sleep(Duration::from_millis(300)).await;
    locker.rollback().await.expect("rollback");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = send(&app, order("/plain", "late", serde_json::json!({}))).await;
    eprintln!("the next request: {status}");
    assert_eq!(status, 201, "a claim nobody owns committed later: {body}");
}

/// Item 6: after a Postgres restart, the pool's dead connections do not fail requests: the first
/// requests succeed.
#[actix_rt::test]
async fn after_a_restart_the_first_requests_succeed() {
    let mut server = server().await;
    let store = url_store(&server).await;
    let seen = web::Data::new(Seen::default());
    let app = app(&store, &seen, |i| i).await;
    // Several connections in the pool.
    let warm = futures_util::future::join_all((0..6).map(|i| {
        let app = &app;
        async move {
            send(
                app,
                order(
                    "/orders",
                    &format!("w{i}"),
                    serde_json::json!({ "id": format!("w{i}"), "wait_ms": 100 }),
                ),
            )
            .await
            .0
        }
    }))
    .await;
    assert!(warm.iter().all(|s| *s == 201), "{warm:?}");
    server.restart();
    let mut statuses = Vec::new();
    for i in 0..6 {
        let id = format!("r{i}");
        statuses.push(
            send(&app, order("/orders", &id, serde_json::json!({ "id": id })))
                .await
                .0,
        );
    }
    eprintln!("after the restart: {statuses:?}");
    assert!(statuses.iter().all(|s| *s == 201), "{statuses:?}");
}
