//! The `payments` example scopes keys by account, not by credential: a token `<account>.<anything>`
//! is a credential of `<account>`, so a refreshed token (or the same account's other device) that
//! retries a payment with the same key gets the first payment back, not a second one.
//!
//! The example runs as a child process on the in-memory store (build it first with
//! `cargo build --examples`).

mod common;

use std::{net::SocketAddr, process::Child};

use common::{post, raw_request, RawResponse};
use idem_testkit::spawn_example;

const PAYMENT: &[u8] = br#"{"amount":1000,"currency":"EUR","destination":"acct_1"}"#;

/// One `payments` process on the in-memory store, killed when dropped.
struct Payments {
    child: Child,
    addr: SocketAddr,
}

impl Payments {
    fn start() -> Self {
        let (child, addr) = spawn_example("payments", &[]);
        Self { child, addr }
    }

    fn pay(&self, authorization: Option<&str>, key: &str) -> RawResponse {
        let mut headers = vec![("Idempotency-Key", key)];
        if let Some(authorization) = authorization {
            headers.push(("Authorization", authorization));
        }
        raw_request(self.addr, &post("/payments", &headers, PAYMENT))
    }

    /// `(executions, payments)` from `GET /stats`.
    fn stats(&self) -> (u64, u64) {
        let r = raw_request(
            self.addr,
            b"GET /stats HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
        );
        let stats: serde_json::Value = serde_json::from_slice(&r.body).expect("stats JSON");
        (
            stats["executions"].as_u64().expect("executions"),
            stats["payments"].as_u64().expect("payments"),
        )
    }
}

impl Drop for Payments {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn describe(r: &RawResponse) -> String {
    format!(
        "{} {:?} {}",
        r.status,
        r.headers,
        String::from_utf8_lossy(&r.body)
    )
}

fn replayed(r: &RawResponse) -> bool {
    r.header("idempotent-replayed") == Some("true")
}

/// One key sent with two credentials of one account (`alice`, then a refreshed `alice.mobile`):
/// one payment, and the second answer is its replay, byte for byte.
#[test]
fn two_credentials_of_one_account_share_one_scope() {
    let app = Payments::start();
    let first = app.pay(Some("Bearer alice"), "refresh-1");
    assert_eq!(first.status, 201, "{}", describe(&first));
    assert!(!replayed(&first), "{}", describe(&first));

    let refreshed = app.pay(Some("Bearer alice.mobile"), "refresh-1");
    assert_eq!(refreshed.status, 201, "{}", describe(&refreshed));
    assert!(
        replayed(&refreshed),
        "the same account's other credential ran the payment again: {}",
        describe(&refreshed)
    );
    assert_eq!(refreshed.body, first.body);

    let rotated = app.pay(Some("Bearer alice.2f9c.rotated"), "refresh-1");
    assert!(replayed(&rotated), "{}", describe(&rotated));
    assert_eq!(rotated.body, first.body);
    assert_eq!(app.stats(), (1, 1), "one execution, one payment");
}

/// Any other token names an account of its own: the same key from `bob` (or from a token that
/// merely starts with `alice`) is another payment. No token is 401.
#[test]
fn other_tokens_are_other_accounts_and_no_token_is_401() {
    let app = Payments::start();
    assert_eq!(app.pay(Some("Bearer alice"), "k").status, 201);
    for other in ["Bearer bob", "Bearer alicex", "Bearer .alice"] {
        let r = app.pay(Some(other), "k");
        assert_eq!(r.status, 201, "{other}: {}", describe(&r));
        assert!(
            !replayed(&r),
            "{other} shares alice's scope: {}",
            describe(&r)
        );
    }
    assert_eq!(app.stats(), (4, 4));

    for missing in [None, Some("Bearer "), Some("Basic YWxpY2U6eA==")] {
        let r = app.pay(missing, "k");
        assert_eq!(r.status, 401, "{missing:?}: {}", describe(&r));
    }
    assert_eq!(app.stats(), (4, 4));
}
