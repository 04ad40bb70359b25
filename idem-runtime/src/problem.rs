//! `application/problem+json` (RFC 9457) responses for the errors idem produces itself.

use std::time::Duration;

use actix_web::{
    http::{
        header::{self, HeaderValue},
        StatusCode,
    },
    HttpResponse,
};
use serde::Serialize;

use crate::key::KeyError;

/// The base of every problem `type` URI.
pub(crate) const TYPE_BASE: &str = "https://idem.dev/problems/";

/// The errors idem answers with, each with a stable `type` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum Problem {
    /// 400: the handler requires a key and none was sent.
    MissingKey {
        /// The header name.
        header: &'static str,
    },
    /// 400: the key header is malformed.
    InvalidKey {
        /// What is wrong.
        reason: KeyError,
        /// The header name.
        header: &'static str,
    },
    /// 422: the key was used for a different request.
    KeyReused,
    /// 409: the first request with this key is still running.
    InFlight {
        /// When to retry.
        retry_after: Duration,
    },
    /// 503: the idempotency store is unreachable; the handler did not run.
    StoreUnavailable {
        /// When to retry.
        retry_after: Duration,
    },
    /// 413: the request body is larger than the handler's limit; nothing was recorded.
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// 400: the request body could not be read.
    BadBody,
    /// 503: a step of the handler (a call to another system) failed; it was not journaled, so
    /// a retry runs it again (with the same downstream key).
    StepFailed {
        /// When to retry.
        retry_after: Duration,
    },
    /// 503: the request lost its lease while a step ran: its result was not journaled, and
    /// another execution of the request owns the key now.
    LeaseLost {
        /// When to retry.
        retry_after: Duration,
    },
    /// 500: the app is misconfigured (for example, no store registered).
    Misconfigured,
    /// 500: the app is misconfigured in a way only its developer can fix, named in the detail
    /// (for example, a `PgTransaction` over a store that is not a `PostgresStore`).
    MisconfiguredFix {
        /// What to change.
        fix: &'static str,
    },
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: String,
}

impl Problem {
    /// The last segment of the problem's `type` URI.
    pub(crate) fn slug(&self) -> &'static str {
        match self {
            Self::MissingKey { .. } => "missing-key",
            Self::InvalidKey { .. } => "invalid-key",
            Self::KeyReused => "key-reused",
            Self::InFlight { .. } => "in-flight",
            Self::StoreUnavailable { .. } => "store-unavailable",
            Self::BodyTooLarge { .. } => "body-too-large",
            Self::BadBody => "unreadable-body",
            Self::Misconfigured | Self::MisconfiguredFix { .. } => "misconfigured",
            Self::StepFailed { .. } => "step-failed",
            Self::LeaseLost { .. } => "lease-lost",
        }
    }

    /// The full `type` URI.
    pub(crate) fn type_uri(&self) -> String {
        format!("{TYPE_BASE}{}", self.slug())
    }

    /// The HTTP status.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::MissingKey { .. } | Self::InvalidKey { .. } | Self::BadBody => {
                StatusCode::BAD_REQUEST
            }
            Self::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::InFlight { .. } => StatusCode::CONFLICT,
            Self::StoreUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Misconfigured | Self::MisconfiguredFix { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Self::StepFailed { .. } | Self::LeaseLost { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::MissingKey { .. } => "Idempotency key missing",
            Self::InvalidKey { .. } => "Idempotency key invalid",
            Self::KeyReused => "Idempotency key reused for a different request",
            Self::InFlight { .. } => "Request with this idempotency key in progress",
            Self::StoreUnavailable { .. } => "Idempotency store unavailable",
            Self::BodyTooLarge { .. } => "Request body too large",
            Self::BadBody => "Request body unreadable",
            Self::Misconfigured | Self::MisconfiguredFix { .. } => "Idempotency misconfigured",
            Self::StepFailed { .. } => "A call to another system failed",
            Self::LeaseLost { .. } => "Idempotency lease lost",
        }
    }

    fn detail(&self) -> String {
        match self {
            Self::MissingKey { header } => {
                format!("This endpoint requires an `{header}` header with a unique key per operation.")
            }
            Self::InvalidKey { reason, header } => format!(
                "The `{header}` header is invalid: {reason}. A key is 1 to 255 visible ASCII characters, bare or as a quoted string."
            ),
            Self::KeyReused => "This idempotency key was already used with a different request (method, path, query or body). Use a new key for a new request.".to_owned(),
            Self::InFlight { .. } => "A request with this idempotency key is still being processed. Retry after the time in `Retry-After`.".to_owned(),
            Self::StoreUnavailable { .. } => "The request was not processed because its idempotency could not be guaranteed. Retry after the time in `Retry-After`.".to_owned(),
            Self::BodyTooLarge { limit } => format!("The request body is larger than {limit} bytes; it was not processed."),
            Self::BadBody => "The request body could not be read.".to_owned(),
            Self::Misconfigured => "The server is not configured for idempotent requests.".to_owned(),
            Self::MisconfiguredFix { fix } => (*fix).to_owned(),
            Self::StepFailed { .. } => "A call this request makes to another system failed; it was not recorded as done. Retry with the same key after the time in `Retry-After`.".to_owned(),
            Self::LeaseLost { .. } => "This attempt of the request lost its claim on the key while it ran, so its progress was not recorded. Retry with the same key after the time in `Retry-After`.".to_owned(),
        }
    }

    /// The `Retry-After` the problem carries, if any.
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::InFlight { retry_after }
            | Self::StoreUnavailable { retry_after }
            | Self::StepFailed { retry_after }
            | Self::LeaseLost { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// Renders the problem.
    pub(crate) fn to_response(&self) -> HttpResponse {
        let status = self.status();
        let body = Body {
            kind: self.type_uri(),
            title: self.title(),
            status: status.as_u16(),
            detail: self.detail(),
        };
        let mut builder = HttpResponse::build(status);
        builder.insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        ));
        if let Some(after) = self.retry_after() {
            builder.insert_header((header::RETRY_AFTER, retry_after_secs(after).to_string()));
        }
        // Serializing a struct of strings and integers cannot fail; an empty body is the fallback.
        builder.body(serde_json::to_vec(&body).unwrap_or_default())
    }
}

/// Whole seconds for `Retry-After`, rounded up, at least 1.
pub(crate) fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use actix_web::body::MessageBody;

    use super::*;

    fn json(p: &Problem) -> serde_json::Value {
        let resp = p.to_response();
        assert_eq!(
            resp.headers()
                .get(header::CONTENT_TYPE)
                .map(HeaderValue::as_bytes),
            Some(&b"application/problem+json"[..])
        );
        let bytes = resp
            .into_body()
            .try_into_bytes()
            .expect("a problem body is in memory");
        serde_json::from_slice(&bytes).expect("valid json")
    }

    #[test]
    fn statuses_and_types() {
        let cases = [
            (
                Problem::MissingKey {
                    header: "Idempotency-Key",
                },
                400,
                "missing-key",
            ),
            (
                Problem::InvalidKey {
                    reason: KeyError::Empty,
                    header: "Idempotency-Key",
                },
                400,
                "invalid-key",
            ),
            (Problem::KeyReused, 422, "key-reused"),
            (
                Problem::InFlight {
                    retry_after: Duration::from_millis(1200),
                },
                409,
                "in-flight",
            ),
            (
                Problem::StoreUnavailable {
                    retry_after: Duration::from_secs(1),
                },
                503,
                "store-unavailable",
            ),
            (Problem::BodyTooLarge { limit: 10 }, 413, "body-too-large"),
            (
                Problem::StepFailed {
                    retry_after: Duration::from_secs(1),
                },
                503,
                "step-failed",
            ),
            (
                Problem::LeaseLost {
                    retry_after: Duration::from_secs(1),
                },
                503,
                "lease-lost",
            ),
        ];
        for (p, status, slug) in cases {
            let v = json(&p);
            assert_eq!(v["status"], status);
            assert_eq!(v["type"], format!("{TYPE_BASE}{slug}"));
            assert!(v["title"].as_str().is_some_and(|t| !t.is_empty()));
            assert!(v["detail"].as_str().is_some_and(|t| !t.is_empty()));
            assert_eq!(p.status().as_u16(), status);
        }
    }

    #[test]
    fn retry_after_header() {
        let resp = Problem::InFlight {
            retry_after: Duration::from_millis(1200),
        }
        .to_response();
        assert_eq!(
            resp.headers()
                .get(header::RETRY_AFTER)
                .map(HeaderValue::as_bytes),
            Some(&b"2"[..])
        );
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }
}
