//! What the `#[idempotent]` expansion names (through `__private`): the handler's settings as the
//! macro wrote them, the app-wide scope, and the conversions of a handler's answers.

use std::{borrow::Cow, time::Duration};

use actix_web::{dev::Payload, http::header::HeaderName, FromRequest, HttpRequest, HttpResponse};

use crate::{
    config::Idempotency,
    fingerprint::FingerprintMode,
    lifecycle::HandlerTiming,
    policy::ServerErrors,
    problem::Problem,
    scope::{IdempotencyScope, ScopeId},
};

/// The header that carries the key: its name (lower case, as `HeaderName` requires) and its
/// spelling in the attribute, for messages. Built at compile time by the macro.
#[derive(Debug, Clone)]
pub struct KeyHeader {
    pub(super) name: HeaderName,
    pub(super) spelled: &'static str,
}

impl KeyHeader {
    /// `Idempotency-Key`.
    pub const DEFAULT: Self = Self::new("idempotency-key", "Idempotency-Key");

    /// A header named `lower` (a valid header name in lower case; the macro checks it), written
    /// `spelled` in the attribute.
    pub const fn new(lower: &'static str, spelled: &'static str) -> Self {
        Self {
            name: HeaderName::from_static(lower),
            spelled,
        }
    }
}

/// A handler's settings, as the macro wrote them. `None` means "the app's default".
#[derive(Debug)]
pub struct HandlerSpec {
    /// The handler's name, for logs and spans.
    pub handler: &'static str,
    /// Record retention.
    pub ttl: Option<Duration>,
    /// In-flight lease.
    pub lease: Option<Duration>,
    /// The key header.
    pub header: KeyHeader,
    /// Whether a request without a key is refused (400) rather than run without idempotency.
    pub require_key: bool,
    /// Wait this long for an in-flight duplicate, then replay its result, instead of answering 409.
    pub in_flight_wait: Option<Duration>,
    /// Run the handler (without idempotency) when the store is unavailable.
    pub fail_open: bool,
    /// What 5xx responses do.
    pub server_errors: ServerErrors,
    /// The request body limit.
    pub max_body: Option<usize>,
    /// How the request body enters the fingerprint.
    pub fingerprint: FingerprintMode,
    /// How long the handler typically runs here: the hint of a 409's `Retry-After`.
    pub timing: HandlerTiming,
}

/// The scope of handlers that name none: the app's resolver (see
/// [`Idempotency::scope_resolver`]).
#[derive(Debug, Clone)]
pub struct AppScope(ScopeId);

impl FromRequest for AppScope {
    type Error = actix_web::Error;
    type Future = std::future::Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let resolved = match Idempotency::registered(req) {
            None => Err(misconfigured(MISSING_CONFIG)),
            Some(idem) => match &idem.inner.resolver {
                Some(resolve) => resolve(req).map(Self),
                None => Err(misconfigured(
                    "an #[idempotent] handler names no `scope` and the app registered no scope \
                     resolver: add `scope = YourAuthExtractor` to the attribute, or call \
                     `Idempotency::scope_resolver` (or use `scope = idem::Unscoped` to share one \
                     key space between all callers on purpose)",
                )),
            },
        };
        std::future::ready(resolved)
    }
}

impl IdempotencyScope for AppScope {
    fn scope_id(&self) -> Cow<'_, str> {
        Cow::Borrowed(self.0.as_str())
    }
}

pub(super) const MISSING_CONFIG: &str =
    "an #[idempotent] handler ran in an app with no idempotency store: \
     register one with `App::new().app_data(idem::Idempotency::new(idem::MemoryStore::new()))` \
     (or a RedisStore)";

fn misconfigured(fix: &'static str) -> actix_web::Error {
    tracing::error!("{fix}");
    actix_web::error::InternalError::from_response(fix, Problem::Misconfigured.to_response()).into()
}

/// Converts a handler's `Responder` output into a response.
pub fn respond<R: actix_web::Responder>(value: R, req: &HttpRequest) -> HttpResponse {
    value.respond_to(req).map_into_boxed_body()
}

/// The response of an extractor that refused the request.
pub fn extractor_error<E: Into<actix_web::Error>>(err: E) -> HttpResponse {
    HttpResponse::from_error(err.into())
}
