//! The transactional mode (`idem::PgTransaction`) against a real Postgres: the handler's writes
//! and the completed record commit together or not at all.
//!
//! Crashes (SIGKILL before, during and after the commit) are in `tests/crash_transaction.rs`;
//! these tests cover every other way a request in a transaction ends.

#![cfg(feature = "postgres")]

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use actix_web::{
    dev::{Service, ServiceResponse},
    http::StatusCode,
    post, test, web, App, HttpResponse,
};
use idem::{
    idempotent,
    sqlx::{self, postgres::PgPoolOptions, PgPool},
    Idempotency, MemoryStore, PgTransaction, PostgresStore,
};
use idem_testkit::postgres::PostgresServer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Order {
    id: String,
    mode: String,
}

fn sql_error(e: sqlx::Error) -> actix_web::Error {
    actix_web::error::ErrorInternalServerError(e.to_string())
}

/// Writes the order's row through the transaction, then meets the outcome its `mode` names.
#[post("/orders")]
#[idempotent(scope = idem::Unscoped)]
async fn create_order(
    mut tx: PgTransaction,
    order: web::Json<Order>,
    side: web::Data<PgPool>,
) -> actix_web::Result<HttpResponse> {
    if order.mode == "untouched" {
        return Ok(HttpResponse::Created().json(&order.id));
    }
    let mut conn = tx.acquire().await?;
    sqlx::query("INSERT INTO orders (id) VALUES ($1)")
        .bind(&order.id)
        .execute(&mut *conn)
        .await
        .map_err(sql_error)?;
    match order.mode.as_str() {
        "ok" => {}
        "unavailable" => return Ok(HttpResponse::ServiceUnavailable().finish()),
        "panic" => panic!("the handler panics after its write"),
        "large" => return Ok(HttpResponse::Created().body(vec![b'x'; 4096])),
        // Another request took the key over while this one ran (its lease ran out).
        "stale" => {
            sqlx::query("UPDATE idem_records SET owner = '\\x00000000000000000000000000000000'")
                .execute(&**side)
                .await
                .map_err(sql_error)?;
        }
        // A deferred constraint that only COMMIT checks: the commit fails.
        "commit_fails" => {
            sqlx::query("INSERT INTO deferred (id) VALUES (1), (1)")
                .execute(&mut *conn)
                .await
                .map_err(sql_error)?;
        }
        "slow" => {
            drop(conn);
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }
        other => panic!("unknown mode {other}"),
    }
    Ok(HttpResponse::Created().json(&order.id))
}

/// The same handler without `#[idempotent]`.
#[post("/plain")]
async fn plain(mut tx: PgTransaction) -> actix_web::Result<HttpResponse> {
    let _conn = tx.acquire().await?;
    Ok(HttpResponse::Created().finish())
}

struct Db {
    server: PostgresServer,
    store: PostgresStore,
    side: PgPool,
}

async fn db() -> Db {
    let server = PostgresServer::start();
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .test_before_acquire(false)
        .connect(&server.url())
        .await
        .expect("connect");
    let store = PostgresStore::builder(pool)
        .timeout(Duration::from_secs(2))
        .build()
        .expect("store");
    store.migrate().await.expect("migrate");
    server.psql(
        "CREATE TABLE orders (id text PRIMARY KEY); \
         CREATE TABLE deferred (id int, CONSTRAINT one UNIQUE (id) DEFERRABLE INITIALLY DEFERRED)",
    );
    let side = PgPoolOptions::new()
        .max_connections(2)
        .connect(&server.url())
        .await
        .expect("connect");
    Db {
        server,
        store,
        side,
    }
}

impl Db {
    fn count(&self, sql: &str) -> u64 {
        self.server.psql(sql).parse().expect("a count")
    }
    fn orders(&self) -> u64 {
        self.count("SELECT count(*) FROM orders")
    }
    fn records(&self, state: &str) -> u64 {
        self.count(&format!(
            "SELECT count(*) FROM idem_records WHERE state = '{state}' AND expires_at > now()"
        ))
    }
}

async fn app(
    db: &Db,
    configure: impl FnOnce(Idempotency) -> Idempotency,
) -> impl Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error> {
    test::init_service(
        App::new()
            .app_data(configure(Idempotency::new(db.store.clone())))
            .app_data(web::Data::new(db.side.clone()))
            .service(create_order)
            .service(plain),
    )
    .await
}

fn order(key: &str, id: &str, mode: &str) -> actix_http::Request {
    test::TestRequest::post()
        .uri("/orders")
        .insert_header(("Idempotency-Key", key))
        .set_json(serde_json::json!({ "id": id, "mode": mode }))
        .to_request()
}

async fn send(
    app: &impl Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error>,
    req: actix_http::Request,
) -> (StatusCode, Option<String>, Option<String>, bytes::Bytes) {
    let resp = test::call_service(app, req).await;
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (status, replayed, retry_after) = (
        resp.status(),
        header("idempotent-replayed"),
        header("retry-after"),
    );
    (status, replayed, retry_after, test::read_body(resp).await)
}

#[actix_rt::test]
async fn the_write_and_the_record_commit_together_and_the_retry_replays() {
    let db = db().await;
    let app = app(&db, |i| i).await;
    let (status, replayed, _, body) = send(&app, order("k1", "o1", "ok")).await;
    assert_eq!(status, 201);
    assert_eq!(replayed, None);
    assert_eq!((db.orders(), db.records("completed")), (1, 1));
    let (status, replayed, _, again) = send(&app, order("k1", "o1", "ok")).await;
    assert_eq!(
        (status, replayed.as_deref()),
        (StatusCode::CREATED, Some("true"))
    );
    assert_eq!(again, body);
    assert_eq!(db.orders(), 1, "the replay wrote nothing");
}

#[actix_rt::test]
async fn a_5xx_a_panic_and_a_response_too_large_roll_back_and_release() {
    let db = db().await;
    let app = app(&db, |i| i.max_response(1024)).await;
    for (mode, expected) in [("unavailable", 503), ("panic", 500), ("large", 500)] {
        let key = format!("k-{mode}");
        let (status, _, _, body) = send(&app, order(&key, mode, mode)).await;
        assert_eq!(status.as_u16(), expected, "{mode}: {body:?}");
        assert_eq!(db.orders(), 0, "{mode}: the write was rolled back");
        assert_eq!(
            db.count("SELECT count(*) FROM idem_records"),
            0,
            "{mode}: released"
        );
        // The key is free: the retry runs the handler again (and this time it succeeds).
        let (status, replayed, _, _) = send(&app, order(&key, mode, "ok")).await;
        assert_eq!((status.as_u16(), replayed), (201, None), "{mode}");
        db.server
            .psql("DELETE FROM orders; DELETE FROM idem_records");
    }
}

#[actix_rt::test]
async fn a_stale_owner_rolls_back_and_answers_503() {
    let db = db().await;
    let app = app(&db, |i| i).await;
    let (status, replayed, retry_after, _) = send(&app, order("k", "o-stale", "stale")).await;
    assert_eq!(status, 503);
    assert_eq!(replayed, None);
    assert!(retry_after.is_some(), "503 without Retry-After");
    assert_eq!(db.orders(), 0, "the stale run's write never became visible");
    // The newer owner's pending record is untouched.
    assert_eq!(db.records("pending"), 1);
    assert_eq!(
        db.server
            .psql("SELECT encode(owner, 'hex') FROM idem_records"),
        "0".repeat(32)
    );
}

#[actix_rt::test]
async fn a_failed_commit_answers_503_and_the_retry_runs_again() {
    let db = db().await;
    let app = app(&db, |i| i).await;
    let (status, _, retry_after, _) = send(&app, order("k", "o1", "commit_fails")).await;
    assert_eq!(status, 503);
    assert!(retry_after.is_some());
    assert_eq!(db.orders(), 0);
    assert_eq!(
        db.count("SELECT count(*) FROM idem_records"),
        0,
        "released after the failed commit"
    );
    let (status, replayed, _, _) = send(&app, order("k", "o1", "ok")).await;
    assert_eq!((status.as_u16(), replayed), (201, None));
    assert_eq!(db.orders(), 1);
}

/// The claim is committed before the handler starts (a duplicate sees it at once), and the lease
/// is renewed on another connection while the handler's transaction is open.
#[actix_rt::test]
async fn the_claim_commits_first_and_the_lease_is_renewed_beside_the_transaction() {
    let db = db().await;
    let app = app(&db, |i| i.lease(Duration::from_millis(300))).await;
    let slow = send(&app, order("k", "o-slow", "slow"));
    let duplicates = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut answers = Vec::new();
        // Three leases long: without renewals the key would be taken over.
        for _ in 0..9 {
            let (status, _, _, _) = send(&app, order("k", "o-slow", "slow")).await;
            answers.push(status.as_u16());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        answers
    };
    let ((status, _, _, _), answers) = tokio::join!(slow, duplicates);
    assert_eq!(status, 201);
    assert!(answers.iter().all(|s| *s == 409), "{answers:?}");
    assert_eq!(db.orders(), 1);
    assert_eq!(db.records("completed"), 1);
}

#[actix_rt::test]
async fn a_handler_that_does_not_use_its_transaction_is_completed_by_the_store() {
    let db = db().await;
    let app = app(&db, |i| i).await;
    let (status, _, _, _) = send(&app, order("k", "o", "untouched")).await;
    assert_eq!(status, 201);
    assert_eq!(db.records("completed"), 1);
}

#[actix_rt::test]
async fn without_a_key_the_transaction_commits_on_success_and_rolls_back_on_5xx() {
    let db = db().await;
    let app = app(&db, |i| i).await;
    let unkeyed = |id: &str, mode: &str| {
        test::TestRequest::post()
            .uri("/orders")
            .set_json(serde_json::json!({ "id": id, "mode": mode }))
            .to_request()
    };
    let (status, _, _, _) = send(&app, unkeyed("a", "ok")).await;
    assert_eq!(status, 201);
    let (status, _, _, _) = send(&app, unkeyed("b", "unavailable")).await;
    assert_eq!(status, 503);
    assert_eq!(
        db.server.psql("SELECT string_agg(id, ',') FROM orders"),
        "a"
    );
    assert_eq!(db.count("SELECT count(*) FROM idem_records"), 0);
}

/// A log sink for the misconfiguration test.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `PgTransaction` over a store that is not a `PostgresStore`, or outside `#[idempotent]`: a
/// generic 500 problem (the fix is the app's, not the caller's), the fix logged once however many
/// requests meet it.
#[actix_rt::test]
async fn the_extractor_without_a_postgres_store_is_a_generic_500_and_the_fix_logged_once() {
    let logs = Logs::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let memory = test::init_service(
        App::new()
            .app_data(Idempotency::new(MemoryStore::new()))
            .service(create_order),
    )
    .await;
    for i in 0..3 {
        let (status, _, _, body) = send(&memory, order(&format!("k{i}"), "o", "ok")).await;
        assert_eq!(status, 500);
        let problem: serde_json::Value = serde_json::from_slice(&body).expect("problem+json");
        assert_eq!(problem["type"], "https://idem.dev/problems/misconfigured");
        let detail = problem["detail"].as_str().expect("detail");
        assert!(!detail.contains("PostgresStore"), "{detail}");
    }
    let logged = String::from_utf8_lossy(&logs.0.lock().expect("logs")).into_owned();
    assert_eq!(
        logged
            .matches("PgTransaction needs the app's idempotency store to be a PostgresStore")
            .count(),
        1,
        "{logged}"
    );

    // Outside #[idempotent], on a Postgres store: nobody would commit it.
    let db = db().await;
    let app = app(&db, |i| i).await;
    let resp = test::call_service(&app, test::TestRequest::post().uri("/plain").to_request()).await;
    assert_eq!(resp.status(), 500);
    let body = test::read_body(resp).await;
    assert!(
        !String::from_utf8_lossy(&body).contains("#[idempotent]"),
        "{body:?}"
    );
    let logged = String::from_utf8_lossy(&logs.0.lock().expect("logs")).into_owned();
    assert!(
        logged.contains("only available in #[idempotent] handlers"),
        "{logged}"
    );
}
