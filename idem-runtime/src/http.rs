//! The request lifecycle behind `#[idempotent]`: key, scope, fingerprint, claim, run, complete,
//! replay (DESIGN.md, "The request lifecycle").

use std::{
    borrow::Cow,
    future::{poll_fn, Future},
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::Arc,
    task::Poll,
    time::Duration,
};

use actix_web::{
    body::{BodySize, BodyStream, BoxBody, MessageBody},
    dev::Payload,
    http::header::{self, HeaderName, HeaderValue},
    web, FromRequest, HttpRequest, HttpResponse,
};
use bytes::{Bytes, BytesMut};
use futures_util::{
    future::{select, Either},
    stream, FutureExt as _, StreamExt as _,
};
use tokio::time::Instant;
use tracing::{field, Instrument as _, Span};

use crate::{
    config::{Idempotency, Settings},
    fingerprint::FingerprintHasher,
    key::IdempotencyKey,
    policy::{self, Disposition, ServerErrors},
    problem::Problem,
    protocol::Claim,
    record::StoredResponse,
    scope::{IdempotencyScope, RecordKey, ScopeId},
    store::{Ownership, Store, Ticket},
};

/// The header every replayed response carries.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The default key header.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// A handler's settings, as the macro wrote them. `None` means "the app's default".
#[derive(Debug, Clone, Copy)]
pub struct HandlerSpec {
    /// The handler's name, for logs and spans.
    pub handler: &'static str,
    /// Record retention.
    pub ttl: Option<Duration>,
    /// In-flight lease.
    pub lease: Option<Duration>,
    /// The key header name (validated at compile time); `None` for `Idempotency-Key`.
    pub header: Option<&'static str>,
    /// Whether a request without a key is refused (400) rather than run without idempotency.
    pub require_key: bool,
    /// Wait this long for an in-flight duplicate, then replay its result, instead of answering 409.
    pub wait: Option<Duration>,
    /// Run the handler (without idempotency) when the store is unavailable.
    pub fail_open: bool,
    /// What 5xx responses do.
    pub server_errors: ServerErrors,
    /// The request body limit.
    pub max_body: Option<usize>,
}

impl HandlerSpec {
    /// The settings of a bare `#[idempotent]`.
    pub const fn new(handler: &'static str) -> Self {
        Self {
            handler,
            ttl: None,
            lease: None,
            header: None,
            require_key: false,
            wait: None,
            fail_open: false,
            server_errors: ServerErrors::Release,
            max_body: None,
        }
    }
}

/// The scope of handlers that name none: the app's resolver (see
/// [`Idempotency::scope_resolver`]).
#[derive(Debug, Clone)]
pub struct AppScope(ScopeId);

impl FromRequest for AppScope {
    type Error = actix_web::Error;
    type Future = std::future::Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let resolved = match Idempotency::from_request(req) {
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

const MISSING_CONFIG: &str = "an #[idempotent] handler ran in an app with no idempotency store: \
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

/// Runs one request through the idempotency lifecycle. `run` runs the user's handler (its own
/// extractors included) against the request and a payload rebuilt from the raw body.
pub async fn handle<S, F, Fut>(
    req: HttpRequest,
    payload: web::Payload,
    spec: &'static HandlerSpec,
    run: F,
) -> HttpResponse
where
    S: IdempotencyScope,
    F: FnOnce(HttpRequest, Payload) -> Fut + 'static,
    Fut: Future<Output = HttpResponse> + 'static,
{
    let span = tracing::info_span!(
        "idempotent",
        handler = spec.handler,
        method = %req.method(),
        path = req.path(),
        outcome = field::Empty,
    );
    lifecycle::<S, F, Fut>(req, payload, spec, run)
        .instrument(span)
        .await
}

fn outcome(name: &'static str) {
    Span::current().record("outcome", name);
}

async fn lifecycle<S, F, Fut>(
    req: HttpRequest,
    mut payload: web::Payload,
    spec: &'static HandlerSpec,
    run: F,
) -> HttpResponse
where
    S: IdempotencyScope,
    F: FnOnce(HttpRequest, Payload) -> Fut + 'static,
    Fut: Future<Output = HttpResponse> + 'static,
{
    let Some(idem) = Idempotency::from_request(&req) else {
        outcome("misconfigured");
        tracing::error!("{MISSING_CONFIG}");
        return Problem::Misconfigured.to_response();
    };
    let settings = Arc::clone(&idem.inner);

    // 1. Key.
    let header_name = match spec.header {
        None => IDEMPOTENCY_KEY,
        Some(name) => match HeaderName::from_bytes(name.as_bytes()) {
            Ok(name) => name,
            Err(_) => {
                outcome("misconfigured");
                tracing::error!(header = name, "invalid idempotency header name");
                return Problem::Misconfigured.to_response();
            }
        },
    };
    let display_header = || spec.header.unwrap_or("Idempotency-Key").to_owned();
    let key = match IdempotencyKey::from_headers(req.headers(), &header_name) {
        Ok(Some(key)) => key,
        Ok(None) if spec.require_key => {
            outcome("missing_key");
            return Problem::MissingKey {
                header: display_header(),
            }
            .to_response();
        }
        Ok(None) => {
            outcome("no_key");
            return run(req, payload.into_inner()).await;
        }
        Err(reason) => {
            outcome("invalid_key");
            return Problem::InvalidKey {
                reason,
                header: display_header(),
            }
            .to_response();
        }
    };

    // 2. Scope.
    let scope = match S::from_request(&req, &mut Payload::None).await {
        Ok(scope) => ScopeId::new(scope.scope_id()),
        Err(err) => {
            outcome("scope_refused");
            return extractor_error(err);
        }
    };

    // 3. Fingerprint over the raw body, read once.
    let max_body = spec.max_body.unwrap_or(settings.max_body);
    let declared_len = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_len.is_some_and(|len| len > max_body as u64) {
        outcome("body_too_large");
        return Problem::BodyTooLarge { limit: max_body }.to_response();
    }
    let mut hasher = FingerprintHasher::new(req.method().as_str(), req.path(), req.query_string());
    let body = match read_body(&mut payload, max_body, &mut hasher).await {
        Ok(body) => body,
        Err(problem) => {
            outcome(if matches!(problem, Problem::BodyTooLarge { .. }) {
                "body_too_large"
            } else {
                "bad_body"
            });
            return problem.to_response();
        }
    };
    let ticket = Ticket::new(RecordKey::new(&scope, &key), hasher.finish());

    // 4. Claim.
    let lease = spec.lease.unwrap_or(settings.lease);
    match claim(&*settings.store, &ticket, lease, spec.wait).await {
        Ok(Claim::Acquired) => {}
        Ok(Claim::Replay(stored)) => {
            outcome("replayed");
            return replay(stored);
        }
        Ok(Claim::Mismatch) => {
            outcome("mismatch");
            return Problem::Mismatch.to_response();
        }
        Ok(Claim::InFlight { retry_after }) => {
            outcome("in_flight");
            return Problem::InFlight { retry_after }.to_response();
        }
        Err(err) if spec.fail_open => {
            outcome("store_error_fail_open");
            tracing::warn!(error = %err, "idempotency store unavailable; running the handler without idempotency (fail_open)");
            return run(req, Payload::from(body)).await;
        }
        Err(err) => {
            outcome("store_error");
            tracing::error!(error = %err, "idempotency store unavailable; the handler did not run");
            return Problem::StoreUnavailable {
                retry_after: settings.unavailable_retry_after,
            }
            .to_response();
        }
    }

    // 5. Run. The handler runs in this request's task; if the request is dropped before it
    // finishes (the client went away), what is left of it moves to a task of its own and still
    // finishes, so a retry finds the result (see `RunToEnd`).
    outcome("executed");
    let run = AssertUnwindSafe(execute(
        settings,
        spec,
        ticket,
        lease,
        req.clone(),
        body,
        run,
    ))
    .catch_unwind();
    match RunToEnd::new(run).await {
        Ok(resp) => resp,
        Err(_) => {
            tracing::error!("the idempotent lifecycle panicked after the handler ran");
            HttpResponse::InternalServerError().finish()
        }
    }
}

/// Polls a future in place, in the task that awaits it, and when it is dropped unfinished, spawns
/// what is left of the future on the current thread so that it runs to its end.
///
/// This keeps the guarantee of spawning the handler (it finishes even if the client disconnects)
/// without paying for a task per request: a task allocation, a scheduler round and a second poll
/// of the whole HTTP dispatcher when its `JoinHandle` wakes it. The future is boxed once so that
/// it can move to a task after it has been polled.
struct RunToEnd<F: Future + 'static> {
    fut: Option<Pin<Box<F>>>,
    span: Span,
}

impl<F: Future + 'static> RunToEnd<F> {
    fn new(fut: F) -> Self {
        Self {
            fut: Some(Box::pin(fut)),
            span: Span::current(),
        }
    }
}

impl<F: Future + 'static> Future for RunToEnd<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<F::Output> {
        let Some(fut) = self.fut.as_mut() else {
            // Only reachable by polling after completion, which `.await` never does.
            return Poll::Pending;
        };
        let out = std::task::ready!(fut.as_mut().poll(cx));
        self.fut = None;
        Poll::Ready(out)
    }
}

impl<F: Future + 'static> Drop for RunToEnd<F> {
    fn drop(&mut self) {
        if let Some(fut) = self.fut.take() {
            if std::thread::panicking() {
                return;
            }
            let span = std::mem::replace(&mut self.span, Span::none());
            drop(actix_web::rt::spawn(
                async move {
                    let _ = fut.await;
                }
                .instrument(span),
            ));
        }
    }
}

async fn read_body(
    payload: &mut web::Payload,
    limit: usize,
    hasher: &mut FingerprintHasher,
) -> Result<Bytes, Problem> {
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    let mut len = 0usize;
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|err| {
            tracing::debug!(error = %err, "request body unreadable");
            Problem::BadBody
        })?;
        len += chunk.len();
        if len > limit {
            return Err(Problem::BodyTooLarge { limit });
        }
        hasher.update(&chunk);
        match &first {
            None => first = Some(chunk),
            Some(head) => {
                if rest.is_empty() {
                    rest.extend_from_slice(head);
                }
                rest.extend_from_slice(&chunk);
            }
        }
    }
    Ok(if rest.is_empty() {
        first.unwrap_or_default()
    } else {
        rest.freeze()
    })
}

/// Claims, and with `wait`, polls an in-flight record until it completes or the wait runs out.
async fn claim(
    store: &dyn Store,
    ticket: &Ticket,
    lease: Duration,
    wait: Option<Duration>,
) -> Result<Claim, crate::store::StoreError> {
    let deadline = wait.map(|w| Instant::now() + w);
    let mut backoff = Duration::from_millis(5);
    loop {
        let answer = store.claim(ticket, lease).await?;
        let (Claim::InFlight { .. }, Some(deadline)) = (&answer, deadline) else {
            return Ok(answer);
        };
        let now = Instant::now();
        if now >= deadline {
            return Ok(answer);
        }
        tokio::time::sleep(backoff.min(deadline - now)).await;
        backoff = (backoff * 2).min(Duration::from_millis(100));
    }
}

/// Builds the replay of a stored response.
pub fn replay(stored: StoredResponse) -> HttpResponse {
    let mut resp = HttpResponse::with_body(stored.status, stored.body).map_into_boxed_body();
    let headers = resp.headers_mut();
    for (name, value) in stored.headers {
        headers.append(name, value);
    }
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    resp
}

async fn execute<F, Fut>(
    settings: Arc<Settings>,
    spec: &'static HandlerSpec,
    ticket: Ticket,
    lease: Duration,
    req: HttpRequest,
    body: Bytes,
    run: F,
) -> HttpResponse
where
    F: FnOnce(HttpRequest, Payload) -> Fut + 'static,
    Fut: Future<Output = HttpResponse> + 'static,
{
    let store = &*settings.store;
    let handler = AssertUnwindSafe(run(req, Payload::from(body))).catch_unwind();
    let renewal = renew(store, &ticket, lease);
    futures_util::pin_mut!(handler, renewal);
    let result = match select(handler, renewal).await {
        Either::Left((result, _)) => result,
        // The lease is lost (another request owns the key now); the handler still finishes, and
        // its completion is refused by the owner-token check.
        Either::Right(((), handler)) => handler.await,
    };
    let Ok(resp) = result else {
        Span::current().record("outcome", "panicked");
        tracing::error!("the idempotent handler panicked; its key is released");
        release(store, &ticket).await;
        return HttpResponse::InternalServerError().finish();
    };

    let (resp, body) = resp.into_parts();
    let max_response = settings.max_response;
    let body = match collect(body, max_response).await {
        Collected::Whole(bytes) => bytes,
        Collected::TooLarge(head, rest) => {
            tracing::warn!(
                max_response,
                "the response is larger than max_response: sent but not stored, key released"
            );
            release(store, &ticket).await;
            let stream = stream::iter(head.into_iter().map(Ok)).chain(body_stream(rest));
            return resp.set_body(BoxBody::new(BodyStream::new(stream)));
        }
        Collected::Failed => {
            tracing::error!("the response body failed while it was read; key released");
            release(store, &ticket).await;
            return HttpResponse::InternalServerError().finish();
        }
    };

    let status = resp.status();
    match policy::disposition(status, spec.server_errors) {
        Disposition::Store => {
            let stored = StoredResponse::capture(status, resp.headers(), body.clone());
            let ttl = spec.ttl.unwrap_or(settings.ttl);
            match store.complete(&ticket, &stored, ttl).await {
                Ok(Ownership::Held) => {}
                Ok(Ownership::Lost) => tracing::warn!(
                    "the lease was lost before completion: the response was sent but not stored"
                ),
                Err(err) => tracing::error!(
                    error = %err,
                    "the response could not be stored: a retry after the lease runs out runs the handler again"
                ),
            }
        }
        Disposition::Release => {
            Span::current().record("outcome", "executed_released");
            release(store, &ticket).await;
        }
    }
    resp.set_body(BoxBody::new(body))
}

async fn release(store: &dyn Store, ticket: &Ticket) {
    match store.release(ticket).await {
        Ok(_) => {}
        Err(err) => tracing::warn!(
            error = %err,
            "the key could not be released; it frees itself when its lease runs out"
        ),
    }
}

/// Renews the lease every third of its length; returns only when the lease is lost.
async fn renew(store: &dyn Store, ticket: &Ticket, lease: Duration) {
    let period = (lease / 3).max(Duration::from_millis(1));
    loop {
        tokio::time::sleep(period).await;
        match store.renew(ticket, lease).await {
            Ok(Ownership::Held) => {}
            Ok(Ownership::Lost) => {
                tracing::warn!("the in-flight lease was lost while the handler ran");
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "the in-flight lease could not be renewed; retrying");
            }
        }
    }
}

enum Collected {
    Whole(Bytes),
    TooLarge(Vec<Bytes>, BoxBody),
    Failed,
}

async fn collect(body: BoxBody, limit: usize) -> Collected {
    let body = match body.try_into_bytes() {
        Ok(bytes) if bytes.len() <= limit => return Collected::Whole(bytes),
        Ok(bytes) => return Collected::TooLarge(vec![bytes], BoxBody::new(())),
        Err(body) => body,
    };
    if let BodySize::Sized(n) = body.size() {
        if n > limit as u64 {
            return Collected::TooLarge(Vec::new(), body);
        }
    }
    let mut body = Box::pin(body);
    let mut chunks = Vec::new();
    let mut len = 0usize;
    loop {
        match poll_fn(|cx| body.as_mut().poll_next(cx)).await {
            None => break,
            Some(Ok(chunk)) => {
                len += chunk.len();
                chunks.push(chunk);
                if len > limit {
                    return Collected::TooLarge(
                        chunks,
                        BoxBody::new(BodyStream::new(body_stream_pinned(body))),
                    );
                }
            }
            Some(Err(err)) => {
                tracing::debug!(error = %err, "response body error");
                return Collected::Failed;
            }
        }
    }
    let mut out = BytesMut::with_capacity(len);
    for chunk in chunks {
        out.extend_from_slice(&chunk);
    }
    Collected::Whole(out.freeze())
}

type BodyError = Box<dyn std::error::Error>;

fn body_stream(body: BoxBody) -> impl futures_util::Stream<Item = Result<Bytes, BodyError>> {
    body_stream_pinned(Box::pin(body))
}

fn body_stream_pinned(
    mut body: Pin<Box<BoxBody>>,
) -> impl futures_util::Stream<Item = Result<Bytes, BodyError>> {
    stream::poll_fn(move |cx| body.as_mut().poll_next(cx))
}
