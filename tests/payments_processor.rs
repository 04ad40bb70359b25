//! The payments example charges through a card processor: the contract, seen from outside. The
//! example runs as a child process; the processor is the testkit's fake (`PROCESSOR_URL`), or the
//! example's built-in one (no `PROCESSOR_URL`), whose charges `GET /processor/charges` lists.

mod common;

use std::{
    net::SocketAddr,
    process::Child,
    time::{Duration, Instant},
};

use common::{post, raw_request, RawResponse};
use idem_testkit::{free_port, processor::FakeProcessor, spawn_example};

/// One `payments` process on the in-memory store, killed when dropped.
struct Payments {
    child: Child,
    addr: SocketAddr,
}

impl Payments {
    fn start(processor_url: Option<&str>) -> Self {
        Self::start_with(processor_url, None)
    }

    /// With `database_url`, the transactional mode (records and payments in that Postgres).
    fn start_with(processor_url: Option<&str>, database_url: Option<&str>) -> Self {
        let mut env = vec![("RUST_LOG", "off")];
        env.extend(processor_url.map(|url| ("PROCESSOR_URL", url)));
        env.extend(database_url.map(|url| ("DATABASE_URL", url)));
        let (child, addr) = spawn_example("payments", &env);
        Self { child, addr }
    }

    fn pay(&self, key: &str, destination: &str) -> RawResponse {
        let body = format!(r#"{{"amount":1000,"currency":"EUR","destination":"{destination}"}}"#);
        raw_request(
            self.addr,
            &post(
                "/payments",
                &[("authorization", "Bearer alice"), ("idempotency-key", key)],
                body.as_bytes(),
            ),
        )
    }

    fn get(&self, path: &str) -> serde_json::Value {
        let r = raw_request(
            self.addr,
            format!(
                "GET {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer alice\r\n\
                 Connection: close\r\n\r\n"
            )
            .as_bytes(),
        );
        assert_eq!(r.status, 200, "GET {path}: {}", describe(&r));
        serde_json::from_slice(&r.body).expect("JSON")
    }

    fn executions(&self) -> u64 {
        self.get("/stats")["executions"]
            .as_u64()
            .expect("executions")
    }
}

impl Drop for Payments {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn describe(r: &RawResponse) -> String {
    format!("{} {}", r.status, String::from_utf8_lossy(&r.body))
}

fn json(r: &RawResponse) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", describe(r)))
}

fn problem_type(r: &RawResponse) -> String {
    json(r)["type"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn a_payment_is_charged_once_at_the_processor_under_the_steps_downstream_key() {
    let processor = FakeProcessor::start();
    let app = Payments::start(Some(&processor.url()));

    let first = app.pay("pay-1", "acct_1");
    assert_eq!(first.status, 201, "{}", describe(&first));
    let charges = processor.charges();
    assert_eq!(charges.len(), 1);
    let charge = &charges[0];
    assert_eq!(json(&first)["charge"].as_str(), Some(charge.id.as_str()));
    assert_eq!(
        (
            charge.amount,
            charge.currency.as_str(),
            charge.destination.as_str()
        ),
        (1000, "EUR", "acct_1")
    );
    // The downstream key: printable, at most 64 characters, none of the client's bytes.
    let key = charge
        .key
        .clone()
        .expect("the charge carried an Idempotency-Key");
    assert!(
        !key.is_empty() && key.len() <= 64 && key.bytes().all(|b| b.is_ascii_graphic()),
        "{key:?}"
    );
    assert!(
        !key.contains("pay-1") && !key.contains("alice"),
        "client bytes in {key:?}"
    );

    // The retry replays the payment: no second call to the processor.
    let replay = app.pay("pay-1", "acct_1");
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.body, first.body);
    assert_eq!(processor.stats().requests, 1);

    // Another payment: another key at the processor.
    let second = app.pay("pay-2", "acct_1");
    assert_eq!(second.status, 201, "{}", describe(&second));
    let charges = processor.charges();
    assert_eq!(charges.len(), 2);
    assert_ne!(charges[1].key.as_deref(), Some(key.as_str()));

    // The payment is there, with its charge.
    let id = json(&first)["id"].as_str().expect("id").to_owned();
    let found = app.get(&format!("/payments/{id}"));
    assert_eq!(found["charge"].as_str(), Some(charge.id.as_str()));
}

#[test]
fn a_decline_is_the_payments_402_stored_and_replayed() {
    let processor = FakeProcessor::start();
    let app = Payments::start(Some(&processor.url()));
    let declined = app.pay("pay-declined", "decline");
    assert_eq!(declined.status, 402, "{}", describe(&declined));
    assert!(problem_type(&declined).ends_with("/card-declined"));
    let again = app.pay("pay-declined", "decline");
    assert_eq!(again.status, 402);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, declined.body);
    assert_eq!(processor.stats().requests, 1);
    assert_eq!(processor.stats().charges, 0);
    assert_eq!(app.executions(), 1);
}

#[test]
fn a_failing_processor_answers_503_unstored_and_the_retry_charges_once() {
    let processor = FakeProcessor::start();
    let app = Payments::start(Some(&processor.url()));
    processor.set_failing(true);
    for _ in 0..2 {
        let failed = app.pay("pay-outage", "acct_1");
        assert_eq!(failed.status, 503, "{}", describe(&failed));
        assert!(problem_type(&failed).ends_with("/processor-unavailable"));
        assert!(failed.header("idempotent-replayed").is_none());
    }
    assert_eq!(app.executions(), 2, "a 503 is not stored: each retry runs");
    processor.set_failing(false);
    let paid = app.pay("pay-outage", "acct_1");
    assert_eq!(paid.status, 201, "{}", describe(&paid));
    assert_eq!(processor.stats().charges, 1);
    let key = processor.charges()[0].key.clone().expect("a key");
    assert_eq!(
        processor.requests_for_key(&key),
        3,
        "every attempt sent the same downstream key"
    );
}

#[test]
fn an_unreachable_processor_answers_503_unstored() {
    // A port nobody listens on: the connection is refused.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let app = Payments::start(Some(&closed));
    for _ in 0..2 {
        let failed = app.pay("pay-refused", "acct_1");
        assert_eq!(failed.status, 503, "{}", describe(&failed));
        assert!(problem_type(&failed).ends_with("/processor-unavailable"));
    }
    assert_eq!(app.executions(), 2);
}

#[test]
fn unavailable_after_the_charge_keeps_the_journal_one_charge_however_many_retries() {
    let processor = FakeProcessor::start();
    let app = Payments::start(Some(&processor.url()));
    for _ in 0..3 {
        let r = app.pay("pay-unavailable", "unavailable");
        assert_eq!(r.status, 503, "{}", describe(&r));
        assert!(r.header("idempotent-replayed").is_none());
    }
    assert_eq!(app.executions(), 3);
    assert_eq!(processor.stats().charges, 1);
    assert_eq!(
        processor.stats().requests,
        1,
        "the retries found the charge in the journal and did not call the processor"
    );
    assert_eq!(app.get("/stats")["resumed"].as_u64(), Some(2));
}

#[test]
fn the_built_in_processor_charges_once_per_key_and_declines_decline() {
    let app = Payments::start(None);
    let first = app.pay("builtin-1", "acct_1");
    assert_eq!(first.status, 201, "{}", describe(&first));
    assert_eq!(app.pay("builtin-1", "acct_1").body, first.body);
    for _ in 0..3 {
        assert_eq!(app.pay("builtin-unavailable", "unavailable").status, 503);
    }
    assert_eq!(app.pay("builtin-declined", "decline").status, 402);

    let listed = app.get("/processor/charges");
    let charges = listed["charges"].as_array().expect("charges");
    assert_eq!(charges.len(), 2, "{listed}");
    let paid = &charges[0];
    assert_eq!(paid["id"].as_str(), json(&first)["charge"].as_str());
    assert_eq!(paid["destination"], "acct_1");
    assert_eq!(paid["requests"], 1);
    let key = paid["idempotency_key"].as_str().expect("a downstream key");
    assert!(!key.contains("builtin-1"), "client bytes in {key:?}");
    let unavailable = &charges[1];
    assert_eq!(unavailable["destination"], "unavailable");
    assert_eq!(
        unavailable["requests"], 1,
        "three executions, one call to the processor"
    );
}

#[test]
fn a_key_in_flight_at_the_processor_answers_503_and_the_retry_gets_the_same_charge() {
    // The processor takes 3 s to answer; the example dies while it does. A new process (an
    // empty in-memory store: no record, no journal) sends the same downstream key: the key is
    // derived, not drawn, so it is the same on every instance and after a restart.
    let processor = FakeProcessor::start();
    processor.set_latency(Duration::from_secs(3), Duration::from_secs(3));
    let mut first = Payments::start(Some(&processor.url()));
    let addr = first.addr;
    let cut = std::thread::spawn(move || {
        common::try_request(
            addr,
            &post(
                "/payments",
                &[
                    ("authorization", "Bearer alice"),
                    ("idempotency-key", "pay-1"),
                ],
                br#"{"amount":1000,"currency":"EUR","destination":"acct_1"}"#,
            ),
            Duration::from_secs(10),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while processor.stats().charges == 0 {
        assert!(Instant::now() < deadline, "no charge arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = first.child.kill();
    let _ = first.child.wait();
    assert!(
        cut.join().expect("client").is_err(),
        "the first process died"
    );

    let second = Payments::start(Some(&processor.url()));
    let busy = second.pay("pay-1", "acct_1");
    assert_eq!(busy.status, 503, "{}", describe(&busy));
    assert!(problem_type(&busy).ends_with("/processor-unavailable"));
    assert_eq!(processor.stats().conflicts, 1, "the processor answered 409");

    let deadline = Instant::now() + Duration::from_secs(10);
    let paid = loop {
        let r = second.pay("pay-1", "acct_1");
        if r.status != 503 {
            break r;
        }
        assert!(Instant::now() < deadline, "{}", describe(&r));
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(paid.status, 201, "{}", describe(&paid));
    let charges = processor.charges();
    assert_eq!(charges.len(), 1, "one charge for the two processes");
    assert_eq!(json(&paid)["charge"].as_str(), Some(charges[0].id.as_str()));
    assert!(processor.stats().replays >= 1);
}

#[cfg(feature = "postgres")]
#[test]
fn in_the_transactional_mode_the_charge_survives_the_rollback_and_the_row_names_it() {
    let db = idem_testkit::postgres::PostgresServer::start();
    let processor = FakeProcessor::start();
    let app = Payments::start_with(Some(&processor.url()), Some(&db.url()));

    let paid = app.pay("tx-1", "acct_1");
    assert_eq!(paid.status, 201, "{}", describe(&paid));
    let charge = json(&paid)["charge"].as_str().expect("charge").to_owned();
    assert_eq!(
        db.psql("SELECT charge FROM payments WHERE idempotency_key = 'tx-1'"),
        charge
    );

    // `unavailable`: the row is rolled back with the 503 each time, the charge stays journaled.
    for _ in 0..3 {
        let r = app.pay("tx-unavailable", "unavailable");
        assert_eq!(r.status, 503, "{}", describe(&r));
    }
    assert_eq!(
        db.psql("SELECT count(*) FROM payments WHERE idempotency_key = 'tx-unavailable'"),
        "0"
    );
    assert_eq!(processor.stats().charges, 2);
    assert_eq!(
        processor.stats().requests,
        2,
        "the retries resumed from the journal"
    );
    assert_eq!(app.get("/stats")["resumed"].as_u64(), Some(2));
}
