//! The actix-web adapter around [`crate::lifecycle`]: what the `#[idempotent]` expansion calls
//! (`HandlerSpec`, [`handle`], [`respond`], [`extractor_error`], [`AppScope`]), the key and scope,
//! the request body read once and fingerprinted, the handler run to its end, and the response
//! captured for storage and replayed.

use std::{future::Future, sync::Arc};

use actix_web::{
    body::BoxBody,
    dev::Payload,
    http::header::{self, HeaderName, HeaderValue},
    web, HttpRequest, HttpResponse,
};
use bytes::Bytes;
use futures_util::FutureExt as _;
use tracing::{field, Instrument as _, Span};

use crate::{
    config::Idempotency,
    encoding::FingerprintEncoding,
    fingerprint::{Fingerprint, FingerprintHasher, FingerprintMode},
    key::IdempotencyKey,
    lifecycle::{self, Outcome, Owned, Policy, Settlement},
    observe,
    problem::Problem,
    protocol::Claim,
    record::StoredResponse,
    scope::{IdempotencyScope, RecordKey},
    steps::Execution,
    store::{StoreError, Ticket},
};

mod body;
mod contract;
mod run_to_end;
mod transaction;

use self::contract::MISSING_CONFIG;
pub use self::contract::{extractor_error, respond, AppScope, HandlerSpec, KeyHeader};
use self::{
    body::{collect_response, payload_of, read_request, unstored, Collected},
    run_to_end::RunToEnd,
    transaction::RequestTransaction,
};

/// The header every replayed response carries.
pub(crate) const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

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
        resumed = field::Empty,
    );
    adapt::<S, F, Fut>(req, payload, spec, run)
        .instrument(span)
        .await
}

/// Records a request's final outcome: on its span, and counted (once per request) in the metrics.
fn record(handler: &'static str, outcome: Outcome) {
    Span::current().record("outcome", outcome.as_str());
    observe::request(handler, outcome);
}

async fn adapt<S, F, Fut>(
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
    let Some(idem) = Idempotency::registered(&req) else {
        record(spec.handler, Outcome::Misconfigured);
        tracing::error!("{MISSING_CONFIG}");
        return Problem::Misconfigured.to_response();
    };
    let settings = Arc::clone(&idem.inner);
    let policy = match Policy::resolve(
        spec.handler,
        spec.lease,
        spec.ttl,
        settings.lease,
        settings.ttl,
        spec.in_flight_wait,
        spec.server_errors,
    ) {
        Ok(policy) => policy,
        Err(fix) => {
            record(spec.handler, Outcome::Misconfigured);
            tracing::error!(handler = spec.handler, "{fix}");
            return Problem::Misconfigured.to_response();
        }
    };

    // The handler's database transaction, for `PgTransaction` (a Postgres store only).
    let txn = RequestTransaction::install(&req, &settings);

    // 1. Key.
    let header = &spec.header;
    let key = match IdempotencyKey::from_headers(req.headers(), &header.name) {
        Ok(Some(key)) => key,
        Ok(None) if spec.require_key => {
            record(spec.handler, Outcome::MissingKey);
            return Problem::MissingKey {
                header: header.spelled,
            }
            .to_response();
        }
        Ok(None) => {
            let Some(_running) = crate::shutdown::Running::admit() else {
                return shutting_down(spec.handler, &settings);
            };
            record(spec.handler, Outcome::NoKey);
            Arc::new(Execution::unjournaled(spec.handler)).install(&req);
            let resp = run(req, payload.into_inner()).await;
            return txn.finish_unrecorded(resp).await;
        }
        Err(reason) => {
            record(spec.handler, Outcome::InvalidKey);
            return Problem::InvalidKey {
                reason,
                header: header.spelled,
            }
            .to_response();
        }
    };

    // From here the request may run the handler: counted, so that a graceful shutdown waits for
    // it, unless the shutdown has begun (then no claim is made).
    let Some(running) = crate::shutdown::Running::admit() else {
        return shutting_down(spec.handler, &settings);
    };

    // 2. Scope.
    // The record's address, from the caller and the key: the key borrows the request's header
    // and the scope its extractor, neither copied.
    let address = match S::from_request(&req, &mut Payload::None).await {
        Ok(scope) => RecordKey::new(&scope.scope_id(), &key),
        Err(err) => {
            record(spec.handler, Outcome::ScopeRefused);
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
        record(spec.handler, Outcome::BodyTooLarge);
        return Problem::BodyTooLarge { limit: max_body }.to_response();
    }
    let mut hasher = fingerprint_head(&req, spec.fingerprint);
    let body = match read_request(&mut payload, max_body, &mut hasher).await {
        Ok(body) => body,
        Err(problem) => {
            record(
                spec.handler,
                if matches!(problem, Problem::BodyTooLarge { .. }) {
                    Outcome::BodyTooLarge
                } else {
                    Outcome::BadBody
                },
            );
            return problem.to_response();
        }
    };
    let ticket = Ticket::new(address, hasher.finish(&body));

    // 4. Claim, compared in the record's fingerprint encoding.
    let claimed = lifecycle::claim_in_record_encoding(
        &*settings.store,
        ticket,
        &policy,
        &settings.waiters,
        settings.replay_cache.as_deref(),
        |encoding| fingerprint_in(encoding, spec.fingerprint, &req, &body),
    )
    .await;
    let ticket = match claimed {
        Ok((Claim::Acquired, ticket)) => ticket,
        Ok((Claim::Replay(stored), _)) => {
            record(spec.handler, Outcome::Replayed);
            return replay(stored);
        }
        Ok((Claim::Mismatch, _)) => {
            record(spec.handler, Outcome::Mismatch);
            return Problem::KeyReused.to_response();
        }
        Ok((Claim::InFlight { retry_after }, ticket)) => {
            record(spec.handler, Outcome::InFlight);
            // A handler running here will typically be done sooner than its lease. Any other
            // owner is another instance, or gone (a crash, a restart): only the lease's remaining
            // time is known, and telling less would send the client back to a key that is still
            // locked (and a polite client to give up before it frees).
            let retry_after = if settings.waiters.runs_here(ticket.key()) {
                lifecycle::retry_after_hint(retry_after, spec.timing.typical())
            } else {
                retry_after
            };
            return Problem::InFlight { retry_after }.to_response();
        }
        Ok((Claim::OtherEncoding { encoding }, _)) => {
            record(spec.handler, Outcome::NewerRecord);
            tracing::warn!(
                record_encoding = %encoding,
                "the key's record is in a fingerprint encoding this release does not compute \
                 (written by a newer release during a rolling upgrade?): answering 503, the \
                 handler did not run"
            );
            return Problem::UnreadableRecord {
                retry_after: settings.unavailable_retry_after,
            }
            .to_response();
        }
        // Never fails open: the record exists, this instance only cannot read it.
        Err(err @ StoreError::Unreadable(_)) => {
            record(spec.handler, Outcome::NewerRecord);
            tracing::warn!(error = %err, "answering 503, the handler did not run");
            return Problem::UnreadableRecord {
                retry_after: settings.unavailable_retry_after,
            }
            .to_response();
        }
        Err(err) if spec.fail_open => {
            record(spec.handler, Outcome::StoreErrorFailOpen);
            tracing::warn!(error = %err, "idempotency store unavailable; running the handler without idempotency (fail_open)");
            Arc::new(Execution::unjournaled(spec.handler)).install(&req);
            let resp = run(req, payload_of(body)).await;
            return txn.finish_unrecorded(resp).await;
        }
        Err(err) => {
            record(spec.handler, Outcome::StoreError);
            tracing::error!(error = %err, "idempotency store unavailable; the handler did not run");
            return Problem::StoreUnavailable {
                retry_after: settings.unavailable_retry_after,
            }
            .to_response();
        }
    };

    // 5. Run, 6. settle. The handler runs in this request's task; if the request is dropped before
    // it finishes (the client went away), what is left of it moves to a task of its own and still
    // finishes, so a retry finds the result (see `RunToEnd`), and `idem::shutdown` waits for it.
    // Until it settles: the span of a handler still running (or that never returns) says so.
    Span::current().record("outcome", Outcome::Executed.as_str());
    // The execution's journal of steps, for `Steps`.
    let steps = Arc::new(Execution::journaled(
        spec.handler,
        Arc::clone(&settings.store),
        ticket.clone(),
        policy.ttl,
        policy.lease,
    ));
    steps.install(&req);
    let (key, fingerprint) = (*ticket.key(), *ticket.fingerprint());
    let owned = Owned::new(Arc::clone(&settings.store), ticket, policy);
    let max_response = settings.max_response;
    // Still counted while it runs, wherever it runs, so that a graceful shutdown waits for it.
    // Counted as running here until it settles: a duplicate's 409 then says how long it takes.
    let here = settings.waiters.run_here(key);
    let started = tokio::time::Instant::now();
    let execute = async move {
        let _running = running;
        let _here = here;
        let resp = execute(
            spec.handler,
            owned,
            max_response,
            txn,
            run(req, payload_of(body)),
        )
        .await;
        if steps.resumed() {
            Span::current().record("resumed", true);
        }
        spec.timing.record(started.elapsed());
        settings.waiters.settled(key, fingerprint);
        resp
    };
    match RunToEnd::new(std::panic::AssertUnwindSafe(execute).catch_unwind()).await {
        Ok(resp) => resp,
        Err(_) => {
            tracing::error!("the idempotent lifecycle panicked after the handler ran");
            HttpResponse::InternalServerError().finish()
        }
    }
}

/// The answer to a request that arrives once `idem::shutdown` has begun, on a connection that
/// was already open: 503 before any claim, and the connection closed, so that the retry opens
/// one to another instance.
fn shutting_down(handler: &'static str, settings: &crate::config::Settings) -> HttpResponse {
    record(handler, Outcome::ShuttingDown);
    let mut resp = Problem::ShuttingDown {
        retry_after: settings.unavailable_retry_after,
    }
    .to_response();
    resp.head_mut()
        .set_connection_type(actix_web::http::ConnectionType::Close);
    resp
}

/// Starts the request's fingerprint (see [`crate::fingerprint`] for what is equivalent): the
/// path as the router matched it, so that `/pay%6Dents` and `/payments`, which reach the same
/// handler with the same path parameters, are the same request, in the form of
/// [`normal_path`](crate::fingerprint::normal_path) (hex digits upper-cased; built from the raw
/// path where the router's decoding is lossy).
fn fingerprint_head(req: &HttpRequest, mode: FingerprintMode) -> FingerprintHasher {
    let path = crate::fingerprint::normal_path(req.match_info().as_str(), req.path());
    // A header's lines, without a `Vec` for the usual zero or one line.
    let lines = |name| {
        let mut all = req.headers().get_all(name).map(HeaderValue::as_bytes);
        match (all.next(), all.next()) {
            (None, _) => Lines::None,
            (Some(one), None) => Lines::One([one]),
            (Some(one), Some(two)) => Lines::Many([one, two].into_iter().chain(all).collect()),
        }
    };
    FingerprintHasher::new(
        mode,
        req.method().as_str(),
        &path,
        req.query_string(),
        lines(header::CONTENT_TYPE).as_slice(),
        lines(header::CONTENT_ENCODING).as_slice(),
    )
}

/// The request's fingerprint in `encoding`, for a record written in another encoding than the
/// handler's `mode` (see [`lifecycle::claim_in_record_encoding`]); `None` for an encoding this
/// release does not compute. The one place that maps each [`FingerprintEncoding`] id to its
/// computation. A JSON record met by a handler that is not (or no longer) JSON is compared with
/// no ignored member: the ignore list is the handler's, not the record's.
fn fingerprint_in(
    encoding: FingerprintEncoding,
    mode: FingerprintMode,
    req: &HttpRequest,
    body: &Bytes,
) -> Option<Fingerprint> {
    let mode = match (encoding, mode) {
        (FingerprintEncoding::RAW_V2, _) => FingerprintMode::Raw,
        (FingerprintEncoding::JSON_V1, json @ FingerprintMode::Json { .. }) => json,
        (FingerprintEncoding::JSON_V1, FingerprintMode::Raw) => {
            FingerprintMode::Json { ignore: &[] }
        }
        _ => return None,
    };
    let mut hasher = fingerprint_head(req, mode);
    hasher.update(body);
    Some(hasher.finish(body))
}

/// The lines of one request header.
enum Lines<'a> {
    None,
    One([&'a [u8]; 1]),
    Many(Vec<&'a [u8]>),
}

impl<'a> Lines<'a> {
    fn as_slice(&self) -> &[&'a [u8]] {
        match self {
            Self::None => &[],
            Self::One(one) => one,
            Self::Many(many) => many,
        }
    }
}

/// Runs the handler and reads its response while the lease is renewed, then settles.
async fn execute(
    name: &'static str,
    owned: Owned,
    max_response: usize,
    txn: RequestTransaction,
    handler: impl Future<Output = HttpResponse>,
) -> HttpResponse {
    let ran = owned
        .run(async {
            let (resp, body) = handler.await.into_parts();
            let collected = collect_response(body, max_response).await;
            (resp, collected)
        })
        .await;
    let (settlement, resp) = match ran {
        Err(lifecycle::Panicked) => {
            tracing::error!("the idempotent handler panicked; its key is released");
            let outcome = owned.settle(Settlement::Panicked, txn.completion()).await;
            record(name, outcome);
            return HttpResponse::InternalServerError().finish();
        }
        Ok((resp, Collected::Whole(body))) => {
            let stored = StoredResponse::capture(resp.status(), resp.headers(), body.clone());
            (
                Settlement::Response(stored),
                resp.set_body(BoxBody::new(body)),
            )
        }
        Ok((_, Collected::TooLarge(..))) if txn.is_begun() => {
            // Its writes are rolled back with the release: the response must not claim them.
            // The fix is the app's, so it goes to the log, not to the caller.
            tracing::error!(max_response, "{TOO_LARGE_IN_TRANSACTION}; key released");
            let outcome = owned.settle(Settlement::Unstorable, txn.completion()).await;
            record(name, outcome);
            return Problem::Misconfigured.to_response();
        }
        Ok((resp, Collected::TooLarge(head, rest))) => {
            observe::too_large(name);
            tracing::warn!(
                max_response,
                "the response is larger than max_response: sent but not stored, key released"
            );
            (Settlement::Unstorable, resp.set_body(unstored(head, rest)))
        }
        Ok((_, Collected::Failed)) => {
            tracing::error!("the response body failed while it was read; key released");
            let outcome = owned.settle(Settlement::Unstorable, txn.completion()).await;
            record(name, outcome);
            return HttpResponse::InternalServerError().finish();
        }
    };
    let outcome = owned.settle(settlement, txn.completion()).await;
    record(name, outcome);
    if outcome == Outcome::RolledBack {
        return txn.rolled_back();
    }
    resp
}

const TOO_LARGE_IN_TRANSACTION: &str = "the handler's response is larger than max_response, so \
     it cannot be stored and its transaction was rolled back: raise `Idempotency::max_response`";

/// Builds the replay of a stored response.
fn replay(stored: StoredResponse) -> HttpResponse {
    let mut resp = HttpResponse::with_body(stored.status, stored.body).map_into_boxed_body();
    let headers = resp.headers_mut();
    for (name, value) in stored.headers {
        headers.append(name, value);
    }
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    resp
}
