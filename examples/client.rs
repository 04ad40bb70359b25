//! Calls the `payments` example through `idem-client`: one payment, retried with the same key
//! until it gets an answer, then the key used, the status and whether the answer was a replay.
//!
//! ```text
//! cargo run --example payments &                 # the server, on 127.0.0.1:8080
//! cargo run --example client                     # a new payment, with a new key
//! cargo run --example client -- 0b6c…            # the same key again: the same 201, replayed
//! ```
//!
//! A key still in flight on the server when the client's retries run out (the first attempt still
//! runs, or a crashed one holds the key until its lease runs out) ends with an error that says so
//! and names the key to retry later with; never with the 409 as if it were the answer.
//!
//! `PAYMENTS_URL` overrides the server's address (default `http://127.0.0.1:8080`); the bearer
//! token (the idempotency scope on the server) is `alice`.

use std::{process::ExitCode, time::Duration};

use idem_client::{
    reqwest_middleware::ClientBuilder, IdempotencyError, IdempotencyMiddleware, ResponseExt,
    RetryPolicy, IDEMPOTENCY_KEY,
};

#[tokio::main]
async fn main() -> ExitCode {
    let base = std::env::var("PAYMENTS_URL").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    let reused_key = std::env::args().nth(1);

    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
    {
        Ok(http) => http,
        Err(e) => {
            eprintln!("cannot build the HTTP client: {e}");
            return ExitCode::FAILURE;
        }
    };
    let client = ClientBuilder::new(http)
        .with(IdempotencyMiddleware::new().policy(RetryPolicy::new().max_attempts(5)))
        .build();

    let mut request = client
        .post(format!("{base}/payments"))
        .bearer_auth("alice")
        .header("content-type", "application/json")
        .body(r#"{"amount":1000,"currency":"EUR","destination":"acct_1"}"#);
    if let Some(key) = &reused_key {
        // A key the caller sets is kept: this is how a stored key is tried again.
        request = request.header(IDEMPOTENCY_KEY, key.as_str());
    }

    match request.send().await {
        Ok(response) => {
            let status = response.status();
            let (key, replayed, attempts) = match response.idempotency() {
                Some(report) => (
                    report.key().unwrap_or("-").to_owned(),
                    report.replayed(),
                    report.attempts(),
                ),
                None => ("-".to_owned(), false, 0),
            };
            let body = response.text().await.unwrap_or_default();
            println!("key:      {key}");
            println!("status:   {status}");
            println!("replayed: {replayed}");
            println!("attempts: {attempts}");
            println!("body:     {body}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            match IdempotencyError::of(&err) {
                // The server still runs this key (or a crashed attempt holds it until its lease
                // runs out): not an answer, and not a reason to pay again with a new key.
                Some(failure) if failure.is_in_flight() => {
                    eprintln!("{err}");
                    if let Some(key) = failure.key() {
                        let after = failure.retry_after().map_or(1, |d| d.as_secs().max(1));
                        eprintln!("in {after} s or more: cargo run --example client -- {key}");
                    }
                }
                Some(failure) => {
                    eprintln!("no answer: {err}");
                    if let Some(key) = failure.key() {
                        eprintln!(
                            "retry later with the same key: cargo run --example client -- {key}"
                        );
                    }
                }
                None => eprintln!("{err}"),
            }
            ExitCode::FAILURE
        }
    }
}
