//! The client half of a safe retry: a [`reqwest_middleware`] middleware that sends every
//! non-idempotent request with an `Idempotency-Key`, keeps that key (and the body) across every
//! retry, and tells the caller the key it used and whether the answer was a replay.
//!
//! A server such as [idem](https://docs.rs/idem) runs the operation once per key and answers
//! every retry with the first response. That only helps if the client sends the *same* key again:
//! a client that loses the response to `POST /payments` and retries with a new key pays twice.
//!
//! # Usage
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use idem_client::{IdempotencyError, IdempotencyMiddleware, ResponseExt, RetryPolicy};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = reqwest_middleware::ClientBuilder::new(
//!     reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?,
//! )
//! .with(IdempotencyMiddleware::new().policy(RetryPolicy::new().max_attempts(5)))
//! .build();
//!
//! let sent = client
//!     .post("http://127.0.0.1:8080/payments")
//!     .bearer_auth("alice")
//!     .header("content-type", "application/json")
//!     .body(r#"{"amount":1000,"currency":"EUR","destination":"acct_1"}"#)
//!     .send()
//!     .await;
//! match sent {
//!     Ok(response) => {
//!         if let Some(report) = response.idempotency() {
//!             println!("key {:?}, replayed: {}", report.key(), report.replayed());
//!         }
//!         println!("{}", response.text().await?);
//!     }
//!     Err(err) => {
//!         if let Some(failure) = IdempotencyError::of(&err) {
//!             // Store the key: sending the request again with it later tells whether the
//!             // payment was made, and makes it if it was not. Never retry with a new key.
//!             if failure.is_in_flight() {
//!                 // The server still runs (or a crashed attempt still holds) this key.
//!                 println!("still in flight: retry later with key {:?}", failure.key());
//!             } else {
//!                 println!("gave up after {} attempts, key {:?}", failure.attempts(), failure.key());
//!             }
//!         }
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! To reuse a stored key, set the header yourself (`.header("Idempotency-Key", key)`): the
//! middleware keeps a key the caller set.
//!
//! # What is retried
//!
//! A connection refused, reset or closed (also after the request was sent: the case keys exist
//! for), a timeout, `408`, `429`, `409` on a keyed request (the same key is in flight), `502`,
//! `503` and `504`; never `400`, `401`, `403`, `404`, `422` or any other 4xx, and never a replayed
//! response (`Idempotent-Replayed: true`: the operation's stored outcome, a handler's own 409
//! included). The waits are exponential with full jitter, or the response's `Retry-After` (seconds
//! or an HTTP-date) up to a cap; attempts and total time are bounded. A key still in flight when
//! they run out is an error, not the 409: [`IdempotencyError::is_in_flight`], with the key to
//! retry later. [`RetryPolicy`] has the details, the defaults and the reason `500` is not retried
//! by default.
//!
//! What is not retried: a request whose body is a stream (it cannot be sent again; it is sent once,
//! with its key), and a failure while reading a response body after the middleware has returned
//! the response (send the request again with [`Idempotency::key`] to get the replay).
//!
//! # TLS
//!
//! This crate depends on `reqwest` without default features: enable the TLS backend you want in
//! your own `reqwest` dependency.
//!
//! # Supported Rust versions
//!
//! The minimum supported Rust version is 1.89 (tested on 1.95).

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod backoff;
mod key;
mod middleware;
mod outcome;
mod policy;
mod retry_after;

pub use reqwest_middleware;

pub use crate::{
    key::KeyFormat,
    middleware::{IdempotencyMiddleware, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED},
    outcome::{Idempotency, IdempotencyError, ResponseExt},
    policy::RetryPolicy,
};
