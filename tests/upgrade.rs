//! A rolling upgrade: instances of two releases share one store.
//!
//! The records the previous release wrote (record format 1, fingerprint encoding raw/v2) are
//! pinned below as the bytes its own code path stored for two requests, and their retries must
//! keep replaying (or waiting) through this release, in Redis and in Postgres (a table created
//! and filled by the previous release's schema and claim function, then migrated). A record of a
//! newer release is read where its format allows it (an unknown additional section is skipped)
//! and refused cleanly otherwise: a 503 with its own problem type, the handler not run, even a
//! `fail_open` one.

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

/// The completed record the previous release stored for `POST /payments` with the key
/// `fixture-completed` (unscoped) and the body [`COMPLETED_REQUEST`], which [`pay`] answered 201.
const FORMAT_1_COMPLETED: &str = "6964014345671f309ac0a35f2a3550e1cd36201ad1ec9f963cf94ebe5d2f96dfa56c6cd400c9000200086c6f636174696f6e000000152f7061796d656e74732f7061795f66697874757265000c636f6e74656e742d74797065000000106170706c69636174696f6e2f6a736f6e7b22616d6f756e74223a313030302c226964223a227061795f66697874757265227d";
const COMPLETED_REQUEST: &[u8] = br#"{"amount":1000,"currency":"eur"}"#;
const COMPLETED_BODY: &[u8] = br#"{"amount":1000,"id":"pay_fixture"}"#;
/// Its Redis key (default prefix) and its Postgres key.
const COMPLETED_REDIS_KEY: &str = "idem:{b0c62e6a1ab454e7c0860fcdc42f4b6d}";
const COMPLETED_PG_KEY: &str = "b0c62e6a1ab454e7c0860fcdc42f4b6ddae28c0abeb8beb65ce2a4c8207f148e";

/// The pending record the previous release stored for `POST /payments` with the key
/// `fixture-pending` and the body [`PENDING_REQUEST`], while [`pay`] ran.
const FORMAT_1_PENDING: &str = "69640150509719dfb384885fbb736892a50db41928e0a28f0b42cbb0565ce2fb0c7db8156cb4c98a4632df7d0e74873879612100";
const PENDING_REQUEST: &[u8] = br#"{"amount":2000,"delay_ms":1}"#;
const PENDING_REDIS_KEY: &str = "idem:{a816d07ed5c8ac0a4e7438a16e7c7231}";
const PENDING_PG_KEY: &str = "a816d07ed5c8ac0a4e7438a16e7c72312f733c54b22ec56aa340dce89cbbe4ec";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[derive(Default)]
struct Executions(AtomicU64);

impl Executions {
    fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The handler the fixtures were recorded with.
#[idempotent(require_key, scope = idem::Unscoped)]
async fn pay(
    executions: web::Data<Executions>,
    body: web::Json<serde_json::Value>,
) -> HttpResponse {
    executions.0.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Created()
        .insert_header(("location", "/payments/pay_fixture"))
        .json(serde_json::json!({ "id": "pay_fixture", "amount": body["amount"] }))
}

/// The same, failing open when the store fails.
#[idempotent(require_key, scope = idem::Unscoped, fail_open)]
async fn pay_open(
    executions: web::Data<Executions>,
    body: web::Json<serde_json::Value>,
) -> HttpResponse {
    executions.0.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Created().json(serde_json::json!({ "amount": body["amount"] }))
}

fn serve(idem: Idempotency) -> (TestServer, Arc<web::Data<Executions>>) {
    let executions = Arc::new(web::Data::new(Executions::default()));
    let data = Arc::clone(&executions);
    let server = TestServer::start(idem, move |cfg| {
        cfg.app_data((*data).clone())
            .route("/payments", web::post().to(pay))
            .route("/open-payments", web::post().to(pay_open));
    });
    (server, executions)
}

async fn post(server: &TestServer, path: &str, key: &str, body: &[u8]) -> RawResponse {
    common::post_keyed(server.addr, path, key, body).await
}

fn problem_type(resp: &RawResponse) -> String {
    let json: serde_json::Value = serde_json::from_slice(&resp.body).expect("a JSON body");
    json["type"].as_str().expect("a type").to_owned()
}

/// The previous release's records, met by this one: the completed one replays as it was stored,
/// a different body with its key is 422, the running one is 409.
async fn the_previous_releases_records_answer_as_before(
    server: &TestServer,
    executions: &Executions,
) {
    let replay = post(server, "/payments", "fixture-completed", COMPLETED_REQUEST).await;
    assert_eq!(
        replay.status,
        201,
        "{:?}",
        String::from_utf8_lossy(&replay.body)
    );
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.header("location"), Some("/payments/pay_fixture"));
    assert_eq!(replay.body, COMPLETED_BODY);
    let different = post(server, "/payments", "fixture-completed", br#"{"amount":1}"#).await;
    assert_eq!(different.status, 422);
    let running = post(server, "/payments", "fixture-pending", PENDING_REQUEST).await;
    assert_eq!(
        running.status,
        409,
        "{:?}",
        String::from_utf8_lossy(&running.body)
    );
    let different = post(server, "/payments", "fixture-pending", br#"{"amount":1}"#).await;
    assert_eq!(different.status, 422);
    assert_eq!(executions.get(), 0, "no handler ran");
}

mod redis {
    use super::*;

    fn set(server: &RedisServer, key: &str, value: &[u8]) {
        let reply = server.raw(&[b"SET", key.as_bytes(), value, b"PX", b"60000"]);
        assert_eq!(reply, b"+OK\r\n");
    }

    fn idem(server: &RedisServer) -> Idempotency {
        Idempotency::new(common::redis_store(server, Duration::from_secs(2)))
    }

    #[actix_rt::test]
    async fn the_previous_releases_records_replay_after_the_upgrade() {
        let redis = RedisServer::start();
        set(&redis, COMPLETED_REDIS_KEY, &hex(FORMAT_1_COMPLETED));
        set(&redis, PENDING_REDIS_KEY, &hex(FORMAT_1_PENDING));
        let (server, executions) = serve(idem(&redis));
        the_previous_releases_records_answer_as_before(&server, &executions).await;
    }

    /// A format 2 record of the fixture's request (encoding raw/v2, digest from the fixture).
    fn format_2(kind: u8, encoding: u8, rest: &[u8], sections: &[(u16, &[u8])]) -> Vec<u8> {
        let fixture = hex(FORMAT_1_COMPLETED);
        let mut out = b"id\x02".to_vec();
        out.push(kind);
        out.push(encoding);
        out.extend_from_slice(&fixture[4..36]);
        out.extend_from_slice(rest);
        for (tag, data) in sections {
            out.extend_from_slice(&tag.to_be_bytes());
            out.extend_from_slice(&u32::try_from(data.len()).expect("short").to_be_bytes());
            out.extend_from_slice(data);
        }
        out
    }

    /// 201, one header, a length-prefixed body.
    fn completed_part() -> Vec<u8> {
        let mut out = vec![0, 201, 0, 1, 0, 8];
        out.extend_from_slice(b"location");
        out.extend_from_slice(&5u32.to_be_bytes());
        out.extend_from_slice(b"/p/42");
        out.extend_from_slice(&4u32.to_be_bytes());
        out.extend_from_slice(b"paid");
        out
    }

    #[actix_rt::test]
    async fn a_newer_record_is_read_where_it_can_be_and_refused_cleanly_otherwise() {
        let redis = RedisServer::start();
        let (server, executions) = serve(idem(&redis));

        // An additional section this release does not know (a journal, say) is skipped.
        let with_journal = format_2(b'C', 2, &completed_part(), &[(0x0001, b"steps")]);
        set(&redis, COMPLETED_REDIS_KEY, &with_journal);
        let replay = post(&server, "/payments", "fixture-completed", COMPLETED_REQUEST).await;
        assert_eq!(
            replay.status,
            201,
            "{:?}",
            String::from_utf8_lossy(&replay.body)
        );
        assert_eq!(replay.header("idempotent-replayed"), Some("true"));
        assert_eq!(replay.header("location"), Some("/p/42"));
        assert_eq!(replay.body, b"paid");

        // A newer format, kind, critical section or fingerprint encoding: 503, never run, not
        // even by a handler that fails open, and never a 422.
        let mut format_3 = format_2(b'C', 2, &completed_part(), &[]);
        format_3[2] = 3;
        for unreadable in [
            format_3,
            format_2(b'R', 2, &completed_part(), &[]),
            format_2(b'C', 2, &completed_part(), &[(0x8001, b"must understand")]),
            format_2(b'C', 200, &completed_part(), &[]),
        ] {
            set(&redis, COMPLETED_REDIS_KEY, &unreadable);
            for path in ["/payments", "/open-payments"] {
                let refused = post(&server, path, "fixture-completed", COMPLETED_REQUEST).await;
                assert_eq!(
                    refused.status,
                    503,
                    "{path} {unreadable:?}: {:?}",
                    String::from_utf8_lossy(&refused.body)
                );
                assert_eq!(
                    problem_type(&refused),
                    "https://idem.dev/problems/record-from-newer-version"
                );
                assert!(refused.header("retry-after").is_some());
            }
        }
        assert_eq!(executions.get(), 0, "no handler ran");
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use idem::{
        sqlx::{self, postgres::PgPoolOptions},
        PostgresStore,
    };
    use idem_testkit::postgres::PostgresServer;

    use super::*;

    /// The schema of the previous release, as its `PostgresStore::migrate` created it.
    const PREVIOUS_SCHEMA: &str = include_str!("fixtures/postgres-schema-previous.sql");

    #[actix_rt::test]
    async fn a_table_of_the_previous_release_is_migrated_and_its_rows_replay() {
        let db = PostgresServer::start();
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&db.url())
            .await
            .expect("connect");
        sqlx::raw_sql(PREVIOUS_SCHEMA)
            .execute(&pool)
            .await
            .expect("the previous schema");
        // The rows as the previous release wrote them: its claim function, then its completion.
        let completed = hex(FORMAT_1_COMPLETED);
        let pending = hex(FORMAT_1_PENDING);
        for (key, record) in [(COMPLETED_PG_KEY, &completed), (PENDING_PG_KEY, &pending)] {
            let acquired: bool =
                sqlx::query_scalar("SELECT o_acquired FROM idem_records_claim($1, $2, $3, 60000)")
                    .bind(hex(key))
                    .bind(&record[4..36])
                    .bind(if record[3] == b'P' {
                        record[36..52].to_vec()
                    } else {
                        vec![7; 16]
                    })
                    .fetch_one(&pool)
                    .await
                    .expect("the previous claim");
            assert!(acquired);
        }
        let done = sqlx::query(
            "UPDATE idem_records SET state = 'completed', owner = NULL, response = $2, \
             expires_at = now() + interval '1 hour' WHERE key = $1 AND state = 'pending'",
        )
        .bind(hex(COMPLETED_PG_KEY))
        .bind(&completed)
        .execute(&pool)
        .await
        .expect("the previous completion");
        assert_eq!(done.rows_affected(), 1);

        let store = PostgresStore::builder(pool.clone()).build().expect("store");
        store.migrate().await.expect("migrates the previous table");
        store.migrate().await.expect("and again");
        let (server, executions) = serve(Idempotency::new(store));
        the_previous_releases_records_answer_as_before(&server, &executions).await;

        // An instance of the previous release still claims through its own function while the
        // upgrade runs, and meets this release's rows as before.
        let answer: (bool, Option<String>) =
            sqlx::query_as("SELECT o_acquired, o_state FROM idem_records_claim($1, $2, $3, 60000)")
                .bind(hex(COMPLETED_PG_KEY))
                .bind(&completed[4..36])
                .bind(vec![8u8; 16])
                .fetch_one(&pool)
                .await
                .expect("the previous claim after the migration");
        assert_eq!(answer, (false, Some("completed".to_owned())));
        let fresh: bool =
            sqlx::query_scalar("SELECT o_acquired FROM idem_records_claim($1, $2, $3, 60000)")
                .bind(vec![9u8; 32])
                .bind(vec![1u8; 32])
                .bind(vec![2u8; 16])
                .fetch_one(&pool)
                .await
                .expect("a new claim by the previous release");
        assert!(fresh);
        let encoding: Option<i16> =
            sqlx::query_scalar("SELECT fingerprint_encoding FROM idem_records WHERE key = $1")
                .bind(vec![9u8; 32])
                .fetch_one(&pool)
                .await
                .expect("the row");
        assert_eq!(
            encoding, None,
            "the previous release's rows are raw/v2 (NULL)"
        );
    }
}
