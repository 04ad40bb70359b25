//! Journaled steps in the transactional mode, against a real Postgres: a step's result commits at
//! once on its own connection, outside the handler's transaction, so a transaction rolled back
//! (a 5xx) leaves the step journaled and the retry resumes from it; the handler's rows commit once,
//! with the record.

#![cfg(feature = "postgres")]

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use actix_web::{
    dev::{Service, ServiceResponse},
    http::StatusCode,
    test, web, App, HttpResponse,
};
use idem::{
    idempotent,
    sqlx::{self, postgres::PgPoolOptions},
    Idempotency, PgTransaction, PostgresStore, Steps,
};
use idem_testkit::postgres::PostgresServer;

#[derive(Default)]
struct Flags {
    charges: AtomicU64,
    /// Answer 503 after the row is written (the transaction rolls back).
    fail_after: AtomicBool,
    /// Run the step after the row is written, with the transaction open.
    step_last: AtomicBool,
}

fn sql_error(e: sqlx::Error) -> actix_web::Error {
    actix_web::error::ErrorInternalServerError(e.to_string())
}

async fn charge(flags: &Flags, step: &Steps) -> Result<String, actix_web::Error> {
    Ok(step
        .run("charge", |key| async move {
            flags.charges.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::convert::Infallible>(format!("ch_{}", &key.as_str()[..12]))
        })
        .await?)
}

#[idempotent(scope = idem::Unscoped, require_key)]
async fn pay(
    mut tx: PgTransaction,
    steps: Steps,
    flags: web::Data<Flags>,
) -> actix_web::Result<HttpResponse> {
    let last = flags.step_last.load(Ordering::SeqCst);
    let mut id = if last {
        None
    } else {
        Some(charge(&flags, &steps).await?)
    };
    {
        let mut conn = tx.acquire().await?;
        sqlx::query("INSERT INTO payments (id) VALUES (1)")
            .execute(&mut *conn)
            .await
            .map_err(sql_error)?;
    }
    if last {
        id = Some(charge(&flags, &steps).await?);
    }
    if flags.fail_after.load(Ordering::SeqCst) {
        return Ok(HttpResponse::ServiceUnavailable().finish());
    }
    Ok(HttpResponse::Created()
        .json(serde_json::json!({ "charge": id, "resumed": steps.resumed() })))
}

struct Db {
    server: PostgresServer,
    store: PostgresStore,
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
    server.psql("CREATE TABLE payments (id int)");
    Db { server, store }
}

impl Db {
    fn count(&self, sql: &str) -> u64 {
        self.server.psql(sql).parse().expect("a count")
    }
}

async fn app(
    db: &Db,
    flags: web::Data<Flags>,
) -> impl Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error> {
    test::init_service(
        App::new()
            .app_data(Idempotency::new(db.store.clone()))
            .app_data(flags)
            .route("/pay", web::post().to(pay)),
    )
    .await
}

async fn send(
    app: &impl Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error>,
    key: &str,
) -> (StatusCode, bytes::Bytes) {
    let req = test::TestRequest::post()
        .uri("/pay")
        .insert_header(("Idempotency-Key", key))
        .set_json(serde_json::json!({ "amount": 100 }))
        .to_request();
    let resp = test::call_service(app, req).await;
    (resp.status(), test::read_body(resp).await)
}

/// Steps first, then rows: a 5xx rolls the rows back and keeps the step; the retry resumes,
/// the rows commit once with the record.
#[actix_rt::test]
async fn a_step_commits_outside_the_transaction_and_the_retry_resumes() {
    let db = db().await;
    let flags = web::Data::new(Flags::default());
    let app = app(&db, flags.clone()).await;
    flags.fail_after.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        let (status, _) = send(&app, "k-1").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(db.count("SELECT count(*) FROM payments"), 0, "rolled back");
    assert_eq!(db.count("SELECT count(*) FROM idem_records_steps"), 1);
    assert_eq!(flags.charges.load(Ordering::SeqCst), 1);
    flags.fail_after.store(false, Ordering::SeqCst);
    let (status, body) = send(&app, "k-1").await;
    assert_eq!(status, StatusCode::CREATED);
    let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(body["resumed"], true);
    assert_eq!(db.count("SELECT count(*) FROM payments"), 1);
    assert_eq!(flags.charges.load(Ordering::SeqCst), 1);
}

/// A step run while the transaction is open (rows first) does not wait for it: its write goes
/// to another connection and commits at once, even though the transaction then rolls back.
#[actix_rt::test]
async fn a_step_inside_an_open_transaction_still_commits_on_its_own() {
    let db = db().await;
    let flags = web::Data::new(Flags::default());
    let app = app(&db, flags.clone()).await;
    flags.step_last.store(true, Ordering::SeqCst);
    flags.fail_after.store(true, Ordering::SeqCst);
    let (status, _) = send(&app, "k-2").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(db.count("SELECT count(*) FROM payments"), 0);
    assert_eq!(db.count("SELECT count(*) FROM idem_records_steps"), 1);
    flags.fail_after.store(false, Ordering::SeqCst);
    let (status, _) = send(&app, "k-2").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(db.count("SELECT count(*) FROM payments"), 1);
    assert_eq!(flags.charges.load(Ordering::SeqCst), 1);
}
