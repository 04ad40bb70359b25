//! Mistakes of setup found at start, not by every request: a table of another shape than the
//! Postgres store needs (`migrate`, `verify_schema`, and the `payments` example, which stops), and
//! the transactional mode over a store that is not a `PostgresStore` (`check_transactional`, and
//! the generic 500 a request meets when the app did not check).

#![cfg(feature = "postgres")]

mod common;

use std::{
    io::{Read as _, Write},
    net::SocketAddr,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use actix_web::{post, HttpResponse};
use common::{post as post_request, send, TestServer};
use idem::{
    idempotent, Idempotency, MemoryStore, PgTransaction, PostgresStore, SchemaMismatch, StoreError,
};
use idem_testkit::{example_command, free_port, postgres::PostgresServer};

/// The table of the 0.1 schema without its `response` column: what `CREATE TABLE IF NOT EXISTS`
/// leaves as it is.
const WITHOUT_RESPONSE: &str = "CREATE TABLE idem_records (
    key bytea PRIMARY KEY, fingerprint bytea NOT NULL, state text NOT NULL, owner bytea,
    expires_at timestamptz NOT NULL)";

/// The `SchemaMismatch` inside a store error.
fn mismatch(err: &StoreError) -> &SchemaMismatch {
    match err {
        StoreError::Unavailable(source) => source
            .downcast_ref::<SchemaMismatch>()
            .unwrap_or_else(|| panic!("not a schema mismatch: {err}")),
        other => panic!("not a schema mismatch: {other}"),
    }
}

/// `migrate` and `verify_schema` can run on any task (`tokio::spawn`): their futures are `Send`.
#[allow(dead_code)]
fn the_checks_futures_are_send(store: &PostgresStore) {
    fn send<T: Send>(_: T) {}
    send(store.migrate());
    send(store.verify_schema());
}

#[actix_rt::test]
async fn migrate_refuses_a_table_of_another_shape_and_leaves_it_as_it_was() {
    let db = PostgresServer::start();
    db.psql(WITHOUT_RESPONSE);
    let store = PostgresStore::from_url(&db.url()).expect("store");
    let err = store
        .migrate()
        .await
        .expect_err("migrate accepted a table without `response`");
    let found = mismatch(&err);
    assert_eq!(found.table(), "idem_records");
    assert_eq!(found.problems(), ["column `response` is missing"]);
    let message = err.to_string();
    for fix in [
        "never alters an existing table",
        "PostgresStoreBuilder::table",
    ] {
        assert!(message.contains(fix), "{message}");
    }
    // Rolled back: no version marker, no claim function on the foreign table.
    assert_eq!(
        db.psql("SELECT obj_description('idem_records'::regclass, 'pg_class') IS NULL"),
        "t"
    );
    assert_eq!(
        db.psql("SELECT to_regproc('idem_records_claim') IS NULL"),
        "t"
    );
    let err = store.verify_schema().await.expect_err("verified");
    assert!(mismatch(&err).problems()[0].contains("`response` is missing"));

    // A mistyped deadline and a table without its key are named too.
    db.psql("DROP TABLE idem_records");
    db.psql(
        &WITHOUT_RESPONSE
            .replace("timestamptz", "timestamp")
            .replace("key bytea PRIMARY KEY", "key bytea"),
    );
    let err = store.migrate().await.expect_err("migrate accepted it");
    let problems = mismatch(&err).problems().to_vec();
    assert_eq!(
        problems,
        [
            "column `expires_at` is `timestamp without time zone`, not `timestamp with time zone`",
            "column `response` is missing",
            "`key` is not its primary key",
        ]
    );

    // Once the foreign table is out of the way, migrate creates the right one.
    db.psql("DROP TABLE idem_records");
    store.migrate().await.expect("migrate");
    store.verify_schema().await.expect("verified");
}

#[actix_rt::test]
async fn verify_schema_checks_what_a_teams_own_migrations_applied() {
    let db = PostgresServer::start();
    let store = PostgresStore::from_url(&db.url()).expect("store");
    let err = store.verify_schema().await.expect_err("no table, verified");
    assert_eq!(mismatch(&err).problems(), ["the table does not exist"]);
    assert!(err.to_string().contains("schema.sql"), "{err}");

    // The plain SQL shipped for own migrations sets the version, as migrate does.
    db.psql(store.schema_sql());
    store.verify_schema().await.expect("schema.sql verified");
    assert_eq!(
        db.psql("SELECT obj_description('idem_records'::regclass, 'pg_class')"),
        "idem schema 4"
    );
    db.psql("CREATE SCHEMA app");
    let configured = PostgresStore::builder(store.pool().clone())
        .table("app.records")
        .build()
        .expect("store");
    db.psql(configured.schema_sql());
    configured
        .verify_schema()
        .await
        .expect("app.records verified");
    // Version 2 added the lease table: a table without it is behind.
    db.psql("DROP TABLE app.records_leases");
    let err = configured
        .verify_schema()
        .await
        .expect_err("no lease table");
    assert!(
        mismatch(&err)
            .problems()
            .iter()
            .any(|p| p.contains("lease table app.records_leases is missing")),
        "{err}"
    );
    db.psql(configured.schema_sql());
    configured
        .verify_schema()
        .await
        .expect("lease table restored");

    // A table of the previous release (no version) is refused until it is migrated.
    db.psql("COMMENT ON TABLE idem_records IS NULL");
    let err = store
        .verify_schema()
        .await
        .expect_err("no version, verified");
    assert_eq!(
        mismatch(&err).problems(),
        ["its schema version is 0 (table comment `idem schema <n>`; none is 0), this build needs 4"]
    );
    store.migrate().await.expect("migrate");
    store.verify_schema().await.expect("verified after migrate");

    // A newer release's table is accepted, and migrate never lowers its version.
    db.psql("COMMENT ON TABLE idem_records IS 'idem schema 7'");
    store.verify_schema().await.expect("newer version");
    store.migrate().await.expect("migrate");
    assert_eq!(
        db.psql("SELECT obj_description('idem_records'::regclass, 'pg_class')"),
        "idem schema 7"
    );

    // A missing claim function is named, with the fix.
    db.psql("DROP FUNCTION idem_records_claim(bytea, bytea, bytea, bigint, smallint)");
    let err = store
        .verify_schema()
        .await
        .expect_err("no function, verified");
    assert_eq!(
        mismatch(&err).problems(),
        ["the claim function \"idem_records_claim\"(bytea,bytea,bytea,bigint,smallint) is missing"]
    );
}

/// The `payments` example on a database whose `idem_records` lacks a column stops at start,
/// naming the column and the fix, instead of serving 503s.
#[test]
fn the_payments_example_stops_at_start_on_a_table_of_another_shape() {
    let db = PostgresServer::start();
    db.psql(WITHOUT_RESPONSE);
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = example_command("payments", addr, &[("DATABASE_URL", &db.url())])
        .stderr(Stdio::piped())
        .spawn()
        .expect("the payments example");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::net::TcpStream::connect(addr).is_ok() {
            // It started: what its callers would see.
            let resp = common::raw_request(
                addr,
                &post_request(
                    "/payments",
                    &[("Authorization", "Bearer alice"), ("Idempotency-Key", "k1")],
                    br#"{"amount":1000,"currency":"EUR","destination":"acct_1"}"#,
                ),
            );
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the example started on a table without `response`; a payment answered {} {}",
                resp.status,
                String::from_utf8_lossy(&resp.body)
            );
        }
        assert!(
            Instant::now() < deadline,
            "the example neither started nor stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(!status.success(), "{status}: {stderr}");
    for expected in ["column `response` is missing", "PostgresStore::migrate()"] {
        assert!(stderr.contains(expected), "{expected:?} not in: {stderr}");
    }
}

/// A log sink shared with the server's worker threads.
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

#[post("/orders")]
#[idempotent(scope = idem::Unscoped)]
async fn create_order(mut tx: PgTransaction) -> actix_web::Result<HttpResponse> {
    drop(tx.acquire().await?);
    Ok(HttpResponse::Created().finish())
}

/// The transactional mode over a `MemoryStore`: `check_transactional` refuses it at start; an
/// app that did not check answers its callers a generic 500 problem that names nothing of its
/// configuration, and logs the fix once.
#[actix_rt::test]
async fn the_transactional_mode_without_a_postgres_store_is_found_at_start() {
    let lazy = PostgresStore::from_url("postgres://app@127.0.0.1:1/app").expect("store");
    Idempotency::new(lazy)
        .check_transactional()
        .expect("a PostgresStore is transactional");
    let memory = Idempotency::new(MemoryStore::new());
    let refused = memory.check_transactional().expect_err("a MemoryStore");
    assert!(
        refused
            .to_string()
            .contains("needs the app's idempotency store to be a PostgresStore"),
        "{refused}"
    );

    let logs = Logs::default();
    let sink = logs.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish(),
    )
    .expect("the only subscriber of this test binary");
    let server = TestServer::start(memory, |cfg| {
        cfg.service(create_order);
    });
    for i in 0..3 {
        let resp = send(
            server.addr,
            post_request("/orders", &[("Idempotency-Key", &format!("k{i}"))], b"{}"),
        )
        .await;
        assert_eq!(resp.status, 500);
        assert_eq!(
            resp.header("content-type"),
            Some("application/problem+json")
        );
        let problem: serde_json::Value = serde_json::from_slice(&resp.body).expect("problem");
        assert_eq!(problem["type"], "https://idem.dev/problems/misconfigured");
        assert_eq!(
            problem["detail"],
            "The server is not configured for idempotent requests."
        );
        let body = String::from_utf8_lossy(&resp.body);
        for internal in [
            "PostgresStore",
            "PgTransaction",
            "idem::",
            "from_url",
            "app_data",
        ] {
            assert!(
                !body.contains(internal),
                "{internal:?} sent to the caller: {body}"
            );
        }
    }
    let logged = String::from_utf8_lossy(&logs.0.lock().expect("logs")).into_owned();
    assert_eq!(
        logged
            .matches("PgTransaction needs the app's idempotency store to be a PostgresStore")
            .count(),
        1,
        "{logged}"
    );
}
