//! The `payments` example's input validation, seen from outside in every mode it runs in: the
//! in-memory store, Redis, and (feature `postgres`) Postgres with the records in a `PostgresStore`
//! (the transactional mode) or in Redis. Bad input is a 400 problem+json in each, never a 503 a
//! client would retry forever, and the answer and the stored payment always agree.

mod common;

use std::{net::SocketAddr, process::Child};

use common::{post, raw_request, RawResponse};
use idem_testkit::{spawn_example, RedisServer};

/// One `payments` process, killed when dropped.
struct Payments {
    child: Child,
    addr: SocketAddr,
}

impl Payments {
    fn start(env: &[(&str, String)]) -> Self {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (child, addr) = spawn_example("payments", &env);
        Self { child, addr }
    }

    fn pay(&self, key: &str, body: &str) -> RawResponse {
        raw_request(
            self.addr,
            &post(
                "/payments",
                &[("Authorization", "Bearer alice"), ("Idempotency-Key", key)],
                body.as_bytes(),
            ),
        )
    }

    fn get(&self, path: &str) -> RawResponse {
        raw_request(
            self.addr,
            format!(
                "GET {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer alice\r\n\
                 Connection: close\r\n\r\n"
            )
            .as_bytes(),
        )
    }
}

impl Drop for Payments {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json(resp: &RawResponse) -> serde_json::Value {
    serde_json::from_slice(&resp.body).unwrap_or(serde_json::Value::Null)
}

/// Sends the bad payments and one at the limits; returns what went wrong, one line each.
fn check(mode: &str, payments: &Payments) -> Vec<String> {
    let mut wrong = Vec::new();
    let long = "d".repeat(129);
    let bad = [
        (
            "a NUL in destination",
            r#""amount":1000,"destination":"acct\u0000x""#.to_owned(),
        ),
        (
            "a newline in destination",
            r#""amount":1000,"destination":"acct\nx""#.to_owned(),
        ),
        (
            "a 129-character destination",
            format!(r#""amount":1000,"destination":"{long}""#),
        ),
        (
            "amount i64::MAX + 1",
            r#""amount":9223372036854775808,"destination":"acct_1""#.to_owned(),
        ),
        (
            "amount u64::MAX",
            r#""amount":18446744073709551615,"destination":"acct_1""#.to_owned(),
        ),
    ];
    for (i, (what, fields)) in bad.iter().enumerate() {
        let resp = payments.pay(
            &format!("bad-{i}"),
            &format!(r#"{{{fields},"currency":"EUR"}}"#),
        );
        let problem = json(&resp);
        let ok = resp.status == 400
            && resp.header("content-type") == Some("application/problem+json")
            && problem["type"] == "https://example.com/problems/invalid-payment";
        if !ok {
            wrong.push(format!(
                "{mode}: {what} answered {} {}",
                resp.status,
                String::from_utf8_lossy(&resp.body)
            ));
        }
    }

    // At the limits: accepted, and what is read back is what was answered.
    let widest = "d".repeat(128);
    let resp = payments.pay(
        "limits",
        &format!(r#"{{"amount":9223372036854775807,"currency":"EUR","destination":"{widest}"}}"#),
    );
    let created = json(&resp);
    if resp.status != 201 || created["amount"] != 9_223_372_036_854_775_807_u64 {
        wrong.push(format!(
            "{mode}: the payment at the limits answered {} {created}",
            resp.status
        ));
    } else {
        let id = created["id"].as_str().unwrap_or_default();
        let stored = payments.get(&format!("/payments/{id}"));
        let stored_json = json(&stored);
        if stored.status != 200
            || stored_json["amount"] != created["amount"]
            || stored_json["destination"] != created["destination"]
        {
            wrong.push(format!(
                "{mode}: answered {created}, stored {} {stored_json}",
                stored.status
            ));
        }
    }
    // Only that one payment is stored.
    let stats = json(&payments.get("/stats"));
    if stats["payments"] != 1 {
        wrong.push(format!("{mode}: {stats} (one payment expected)"));
    }
    wrong
}

#[test]
fn bad_input_is_a_400_in_memory_and_redis() {
    let mut wrong = check("memory", &Payments::start(&[]));
    let redis = RedisServer::start();
    wrong.extend(check(
        "redis",
        &Payments::start(&[("REDIS_URL", redis.url())]),
    ));
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

#[cfg(feature = "postgres")]
#[test]
fn bad_input_is_a_400_in_postgres_with_and_without_redis() {
    use idem_testkit::postgres::PostgresServer;

    let db = PostgresServer::start();
    let mut wrong = check(
        "postgres (transactional)",
        &Payments::start(&[("DATABASE_URL", db.url())]),
    );
    db.psql("DROP TABLE payments");
    let redis = RedisServer::start();
    wrong.extend(check(
        "postgres rows, redis records",
        &Payments::start(&[("DATABASE_URL", db.url()), ("REDIS_URL", redis.url())]),
    ));
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}
