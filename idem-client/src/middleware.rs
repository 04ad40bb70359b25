//! The middleware: the key, and the retry loop in one place.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use http::{header::HeaderName, Extensions, Method, StatusCode};
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};

use crate::{
    key::{self, Generator, KeyFormat},
    outcome::{Cause, Idempotency, IdempotencyError},
    policy::{Class, RetryPolicy},
    retry_after::retry_after,
};

/// The header idem and Stripe read the key from.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// The header an idem server sets on a replayed response.
pub const IDEMPOTENT_REPLAYED: &str = "Idempotent-Replayed";

/// A [`reqwest_middleware`] middleware that makes non-idempotent requests safe to retry, and
/// retries them.
///
/// For a request whose method is in [`methods`](Self::methods) (`POST` and `PATCH` by default) it
/// adds a fresh key unless the request already has one, then sends it, retrying transient failures
/// (see [`RetryPolicy`]) with the same key and the same body. Requests with methods that are
/// idempotent by definition (`GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT`, `DELETE`) are retried the
/// same way without a key; requests with any other method pass through untouched, sent once: they
/// are not safe to retry without a key.
///
/// A request whose body cannot be cloned (a stream) is sent once, with its key: the middleware
/// cannot send the same bytes again. Buffer the body to have it retried.
///
/// Every response it returns carries an [`Idempotency`] in its extensions
/// ([`ResponseExt::idempotency`](crate::ResponseExt::idempotency)); every error it returns is an
/// [`IdempotencyError`] inside [`reqwest_middleware::Error::Middleware`].
///
/// Put it last among your middlewares (closest to the network), unless another middleware should
/// see every attempt.
#[derive(Clone)]
pub struct IdempotencyMiddleware {
    header: HeaderName,
    format: KeyFormat,
    generator: Generator,
    methods: Vec<Method>,
    policy: RetryPolicy,
}

impl fmt::Debug for IdempotencyMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyMiddleware")
            .field("header", &self.header)
            .field("format", &self.format)
            .field("methods", &self.methods)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Default for IdempotencyMiddleware {
    fn default() -> Self {
        Self {
            header: HeaderName::from_static("idempotency-key"),
            format: KeyFormat::Bare,
            generator: Arc::new(key::uuid_v4),
            methods: vec![Method::POST, Method::PATCH],
            policy: RetryPolicy::default(),
        }
    }
}

impl IdempotencyMiddleware {
    /// Keys in `Idempotency-Key`, bare, random UUIDs, for `POST` and `PATCH`, with the default
    /// [`RetryPolicy`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The header carrying the key (default `Idempotency-Key`).
    #[must_use]
    pub fn header(mut self, name: HeaderName) -> Self {
        self.header = name;
        self
    }

    /// Whether keys are sent bare (the default) or as a quoted structured-field string. A key the
    /// caller set is sent as the caller wrote it.
    #[must_use]
    pub fn key_format(mut self, format: KeyFormat) -> Self {
        self.format = format;
        self
    }

    /// Makes keys with `generator` instead of random UUIDs. Each key must be 1 to 255 visible
    /// ASCII characters and unique per operation; a request given an invalid key fails with an
    /// [`IdempotencyError`] before it is sent.
    #[must_use]
    pub fn key_generator(mut self, generator: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.generator = Arc::new(generator);
        self
    }

    /// The methods that get a key (default `POST` and `PATCH`). Add `PUT` or `DELETE` if your
    /// server's are not idempotent by themselves.
    #[must_use]
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// When to retry and for how long.
    #[must_use]
    pub fn policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the key, unless the caller did. Returns the key, or `None` if the generator made an
    /// invalid one.
    fn ensure_key(&self, req: &mut Request) -> Option<String> {
        if let Some(value) = req.headers().get(&self.header) {
            return Some(key::read(value));
        }
        let key = (self.generator)();
        let value = key::header_value(&key, self.format)?;
        req.headers_mut().insert(self.header.clone(), value);
        Some(key)
    }
}

/// Whether a method is idempotent by definition (RFC 9110 §9.2.2), so that retrying it without a
/// key is safe.
fn idempotent_by_definition(method: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

fn replayed(response: &Response) -> bool {
    response
        .headers()
        .get(IDEMPOTENT_REPLAYED)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
}

#[async_trait::async_trait]
impl Middleware for IdempotencyMiddleware {
    async fn handle(
        &self,
        mut req: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let keyed = self.methods.contains(req.method());
        if !keyed && !idempotent_by_definition(req.method()) {
            return next.run(req, extensions).await;
        }
        let key = if keyed {
            match self.ensure_key(&mut req) {
                Some(key) => Some(key),
                None => {
                    return Err(reqwest_middleware::Error::middleware(IdempotencyError {
                        key: None,
                        attempts: 0,
                        cause: Cause::InvalidKey,
                    }))
                }
            }
        } else {
            req.headers().get(&self.header).map(key::read)
        };
        let keyed = key.is_some();
        let fail = |attempts, cause| {
            reqwest_middleware::Error::middleware(IdempotencyError {
                key: key.clone(),
                attempts,
                cause,
            })
        };

        let policy = &self.policy;
        let start = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            // The copy for the next attempt, taken before this one consumes the request: the same
            // headers (so the same key) and the same body bytes. `None` for a streaming body.
            let again = if attempts < policy.max_attempts {
                req.try_clone()
            } else {
                None
            };
            let remaining = policy.deadline.saturating_sub(start.elapsed());
            let outcome =
                match tokio::time::timeout(remaining, next.clone().run(req, extensions)).await {
                    Ok(outcome) => outcome,
                    Err(_elapsed) => return Err(fail(attempts, Cause::Deadline)),
                };
            let class = match &outcome {
                Ok(response) => {
                    policy.classify_response(response.status(), keyed, replayed(response))
                }
                Err(err) => RetryPolicy::classify_error(err),
            };
            // The key is in flight on the server: the answer is not the operation's, and the
            // caller must not take it for one (nor pay again with a new key).
            let in_flight = matches!(&outcome, Ok(response)
                if keyed && response.status() == StatusCode::CONFLICT && !replayed(response));
            let retry = match (class, again) {
                (Class::Transient, Some(again)) => {
                    let hinted = outcome.as_ref().ok().and_then(|response| {
                        retry_after(
                            response.headers(),
                            SystemTime::now(),
                            policy.retry_after_cap,
                        )
                    });
                    let wait = hinted.unwrap_or_else(|| policy.backoff.draw(attempts - 1));
                    let within_deadline = start
                        .elapsed()
                        .checked_add(wait)
                        .is_some_and(|at| at < policy.deadline);
                    within_deadline.then_some((again, wait))
                }
                _ => None,
            };
            match retry {
                Some((again, wait)) => {
                    // Drop a retried response before waiting, so its connection is freed now.
                    drop(outcome);
                    tokio::time::sleep(wait).await;
                    req = again;
                }
                None => {
                    return match outcome {
                        Ok(response) if in_flight => {
                            let after =
                                retry_after(response.headers(), SystemTime::now(), Duration::MAX);
                            Err(fail(attempts, Cause::InFlight(after)))
                        }
                        Ok(mut response) => {
                            let report = Idempotency {
                                key: key.clone(),
                                replayed: replayed(&response),
                                attempts,
                            };
                            response.extensions_mut().insert(report);
                            Ok(response)
                        }
                        Err(err) => Err(fail(attempts, Cause::Request(err))),
                    };
                }
            }
        }
    }
}
