//! What is worth retrying, and the bounds on retrying it. The classification is plain functions of a
//! status or an error; the waiting is [`Backoff`] and `Retry-After`; the loop is in the middleware.

use std::time::Duration;

use http::StatusCode;

use crate::backoff::Backoff;

/// When the middleware retries, and how much it may spend doing so.
///
/// | outcome | retried |
/// | --- | --- |
/// | connection refused, reset or closed, before or **after** the request was sent; timeout | yes |
/// | `408 Request Timeout`, `429 Too Many Requests` | yes |
/// | `409 Conflict` on a request carrying a key (another attempt with this key is in flight) | yes; when the bounds run out, an [`IdempotencyError`](crate::IdempotencyError) that says so and carries the key |
/// | a replayed response (`Idempotent-Replayed: true`), whatever its status: the operation's stored outcome | never |
/// | `502`, `503`, `504` | yes (the set is [`retry_server_errors`](Self::retry_server_errors)) |
/// | `500` and every other 5xx | no, unless added to that set |
/// | `400`, `401`, `403`, `404`, `422` and every other 4xx | never |
/// | a redirect loop, an invalid request, another middleware's error | never |
///
/// `500` is not retried by default. It is the server saying it failed in a way it did not foresee,
/// which is most often deterministic (a bug, a panic), so retries mostly delay the error; and an
/// idem server releases the key on a 5xx (unless `store_server_errors`), so a retry runs the handler
/// again, which is safe only if the handler undid its side effect before failing. `502`, `503` and
/// `504` say the failure was on the way or that the server is busy: on an idem server the key's
/// record is then either released, in flight (a retry gets 409, then the replay) or complete (a
/// retry gets the replay). Add `500` when your handlers roll back before answering it.
///
/// Defaults: 5 attempts, 60 s in total, backoff from 250 ms up to 8 s, `Retry-After` honoured up
/// to 10 s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub(crate) max_attempts: u32,
    pub(crate) deadline: Duration,
    pub(crate) backoff: Backoff,
    pub(crate) retry_after_cap: Duration,
    server_errors: Vec<StatusCode>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            deadline: Duration::from_secs(60),
            backoff: Backoff {
                base: Duration::from_millis(250),
                max: Duration::from_secs(8),
            },
            retry_after_cap: Duration::from_secs(10),
            server_errors: vec![
                StatusCode::BAD_GATEWAY,
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::GATEWAY_TIMEOUT,
            ],
        }
    }
}

impl RetryPolicy {
    /// The default policy (see the type's documentation).
    pub fn new() -> Self {
        Self::default()
    }

    /// At most `attempts` sends of one request, the first included (`1` disables retries; `0` is
    /// taken as `1`).
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The total time one request may take, from its first send to its last answer, waits
    /// included. An attempt still running at the deadline is abandoned; no retry starts if its
    /// wait would end after the deadline.
    #[must_use]
    pub fn deadline(mut self, total: Duration) -> Self {
        self.deadline = total;
        self
    }

    /// Exponential backoff with full jitter: the wait before retry `n` (from 0) is drawn uniformly
    /// from `[0, min(max, base × 2ⁿ)]`. Used when the response has no usable `Retry-After`.
    #[must_use]
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff = Backoff { base, max };
        self
    }

    /// The longest `Retry-After` honoured: a longer one (an idem server's 409 says how long the
    /// other attempt's lease has left, up to 30 s by default) is waited for `cap` only, and the
    /// request is tried again then.
    #[must_use]
    pub fn retry_after_cap(mut self, cap: Duration) -> Self {
        self.retry_after_cap = cap;
        self
    }

    /// The 5xx statuses that are retried, replacing the default `502`, `503`, `504`. Statuses
    /// outside 500–599 are ignored: `408`, `429` and a keyed `409` are always retried, every
    /// other 4xx never.
    #[must_use]
    pub fn retry_server_errors(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.server_errors = statuses
            .into_iter()
            .filter(StatusCode::is_server_error)
            .collect();
        self
    }

    /// How a response counts. `replayed`: the server answered with the operation's stored response
    /// (`Idempotent-Replayed: true`), which every retry would get again: final, whatever its
    /// status (a handler's own 409 that the server stored is the operation's answer, not a key in
    /// flight).
    pub(crate) fn classify_response(
        &self,
        status: StatusCode,
        keyed: bool,
        replayed: bool,
    ) -> Class {
        match self.classify_status(status, keyed) {
            Class::Transient if replayed => Class::Fatal,
            class => class,
        }
    }

    /// How a response with `status` counts. `keyed`: the request carried an idempotency key, so
    /// a 409 means "the same key is in flight", not a conflict of the resource.
    pub(crate) fn classify_status(&self, status: StatusCode, keyed: bool) -> Class {
        match status {
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS => Class::Transient,
            StatusCode::CONFLICT if keyed => Class::Transient,
            s if s.is_server_error() && self.server_errors.contains(&s) => Class::Transient,
            s if s.is_client_error() || s.is_server_error() => Class::Fatal,
            _ => Class::Success,
        }
    }

    /// How a failed attempt counts.
    ///
    /// A connection refused, reset or closed and a timeout are transient, whether or not the
    /// request had been sent: the key makes a retry of a request that did arrive a replay.
    pub(crate) fn classify_error(err: &reqwest_middleware::Error) -> Class {
        match err {
            reqwest_middleware::Error::Reqwest(e)
                if e.is_connect() || e.is_timeout() || e.is_request() =>
            {
                Class::Transient
            }
            // A builder or redirect error would fail the same way again; a body or decode error
            // cannot come from sending a body that could be cloned; another middleware's error is
            // its own to retry.
            _ => Class::Fatal,
        }
    }
}

/// How an attempt's outcome counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// An answer to hand back (1xx–3xx).
    Success,
    /// Worth another attempt, if the bounds allow it.
    Transient,
    /// Hand back as it is: retrying would not change it.
    Fatal,
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::TcpListener,
        thread,
    };

    use super::*;

    fn status(code: u16) -> StatusCode {
        StatusCode::from_u16(code).expect("a status code")
    }

    #[test]
    fn every_status() {
        let policy = RetryPolicy::default();
        for code in 100..=599 {
            let Ok(s) = StatusCode::from_u16(code) else {
                continue;
            };
            let expected = match code {
                100..=399 => Class::Success,
                408 | 409 | 429 | 502 | 503 | 504 => Class::Transient,
                _ => Class::Fatal,
            };
            assert_eq!(policy.classify_status(s, true), expected, "{code} keyed");
            let unkeyed = if code == 409 { Class::Fatal } else { expected };
            assert_eq!(policy.classify_status(s, false), unkeyed, "{code} unkeyed");
        }
    }

    #[test]
    fn a_replayed_response_is_final() {
        let policy = RetryPolicy::default();
        for code in [409, 408, 429, 503] {
            assert_eq!(
                policy.classify_response(status(code), true, true),
                Class::Fatal,
                "{code}"
            );
            assert_eq!(
                policy.classify_response(status(code), true, false),
                Class::Transient,
                "{code}"
            );
        }
        assert_eq!(
            policy.classify_response(status(201), true, true),
            Class::Success
        );
    }

    #[test]
    fn client_errors_are_never_retried() {
        let policy = RetryPolicy::default().retry_server_errors((400..=599).map(status));
        for code in [400, 401, 403, 404, 405, 410, 413, 415, 422] {
            assert_eq!(policy.classify_status(status(code), true), Class::Fatal);
        }
    }

    #[test]
    fn server_errors_by_policy() {
        let policy = RetryPolicy::default().retry_server_errors([status(500), status(503)]);
        assert_eq!(policy.classify_status(status(500), true), Class::Transient);
        assert_eq!(policy.classify_status(status(503), true), Class::Transient);
        assert_eq!(policy.classify_status(status(502), true), Class::Fatal);
        assert_eq!(policy.classify_status(status(504), true), Class::Fatal);
        let none = RetryPolicy::default().retry_server_errors([]);
        assert_eq!(none.classify_status(status(503), true), Class::Fatal);
        assert_eq!(none.classify_status(status(429), true), Class::Transient);
    }

    #[test]
    fn bounds() {
        assert_eq!(RetryPolicy::new().max_attempts(0).max_attempts, 1);
        let d = RetryPolicy::default();
        assert_eq!(d.max_attempts, 5);
        assert_eq!(d.retry_after_cap, Duration::from_secs(10));
    }

    /// A loopback server that handles one connection with `serve`, on its own thread.
    fn one_connection(serve: impl FnOnce(std::net::TcpStream) + Send + 'static) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let addr = listener.local_addr().expect("its address");
        thread::spawn(move || {
            if let Ok((stream, _)) = listener.accept() {
                serve(stream);
            }
        });
        format!("http://{addr}/payments")
    }

    fn read_request(stream: &mut std::net::TcpStream) {
        let mut buf = [0u8; 4096];
        let mut seen = Vec::new();
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    }

    async fn send(url: &str, timeout: Duration) -> reqwest_middleware::Error {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .expect("a client");
        let err = client
            .post(url)
            .body("{}")
            .send()
            .await
            .expect_err("the attempt fails");
        reqwest_middleware::Error::Reqwest(err)
    }

    #[tokio::test]
    async fn connection_refused_is_transient() {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let err = send(&format!("http://127.0.0.1:{port}/"), Duration::from_secs(5)).await;
        assert_eq!(
            RetryPolicy::classify_error(&err),
            Class::Transient,
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn closed_after_the_request_was_sent_is_transient() {
        let url = one_connection(|mut s| read_request(&mut s));
        let err = send(&url, Duration::from_secs(5)).await;
        assert_eq!(
            RetryPolicy::classify_error(&err),
            Class::Transient,
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn reset_after_the_request_was_sent_is_transient() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let url = format!(
            "http://{}/payments",
            listener.local_addr().expect("its address")
        );
        tokio::spawn(async move {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            // Closing with SO_LINGER 0 sends RST instead of FIN.
            let _ = s.set_zero_linger();
        });
        let err = send(&url, Duration::from_secs(5)).await;
        assert_eq!(
            RetryPolicy::classify_error(&err),
            Class::Transient,
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_timeout_is_transient() {
        let url = one_connection(|mut s| {
            read_request(&mut s);
            thread::sleep(Duration::from_millis(500));
            let _ = s.write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n");
        });
        let err = send(&url, Duration::from_millis(50)).await;
        assert_eq!(
            RetryPolicy::classify_error(&err),
            Class::Transient,
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_malformed_response_is_transient() {
        // The server got the request; what it answered is lost to us: the key makes a retry safe.
        let url = one_connection(|mut s| {
            read_request(&mut s);
            let _ = s.write_all(b"HTTP/1.1 20");
        });
        let err = send(&url, Duration::from_secs(5)).await;
        assert_eq!(
            RetryPolicy::classify_error(&err),
            Class::Transient,
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn builder_redirect_and_middleware_errors_are_fatal() {
        let builder = reqwest::Client::new()
            .get("http://[::1")
            .build()
            .expect_err("an invalid URL");
        let builder = reqwest_middleware::Error::Reqwest(builder);
        assert_eq!(
            RetryPolicy::classify_error(&builder),
            Class::Fatal,
            "{builder:?}"
        );

        let url = one_connection(|mut s| loop {
            read_request(&mut s);
            if s.write_all(b"HTTP/1.1 302 Found\r\nlocation: /again\r\ncontent-length: 0\r\n\r\n")
                .is_err()
            {
                return;
            }
        });
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::limited(2))
            .build()
            .expect("a client");
        let redirect = client.get(&url).send().await.expect_err("a redirect loop");
        assert!(redirect.is_redirect(), "{redirect:?}");
        let redirect = reqwest_middleware::Error::Reqwest(redirect);
        assert_eq!(RetryPolicy::classify_error(&redirect), Class::Fatal);

        let other = reqwest_middleware::Error::middleware(std::io::Error::other("not ours"));
        assert_eq!(RetryPolicy::classify_error(&other), Class::Fatal);
    }
}
