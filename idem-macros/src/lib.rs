//! The `#[idempotent]` attribute of [idem](https://docs.rs/idem). Depend on `idem`, not on this
//! crate: the expansion names `::idem::__private`.
//!
//! This crate only parses, checks and rewrites; everything that runs lives in `idem-runtime`.

#![forbid(unsafe_code)]

mod args;
mod duration;
mod expand;
mod handler;
#[cfg(feature = "openapi")]
mod openapi;
mod size;

use proc_macro::TokenStream;

/// Makes an actix-web handler safe to retry with an `Idempotency-Key` header.
///
/// The first request with a key runs the handler; every retry with the same key, from the same
/// caller, with the same request (method, path, query and body bytes) gets the first response
/// back, with `Idempotent-Replayed: true`, without running the handler again. A retry while the
/// first request is still running gets 409 (or waits, with `wait`); the same key with a different
/// request gets 422. A request without the header runs the handler with no idempotency, unless
/// `require_key` is set.
///
/// The app must register an `idem::Idempotency` (the store and app-wide defaults) with
/// `App::app_data`: built once, before `HttpServer::new`, and cloned into its factory, so that
/// every worker reaches the same records.
///
/// The handler must be an `async fn` whose arguments are extractors and whose return type is a
/// `Responder`; it stays exactly as written. The attribute works above or below actix-web's route
/// attributes (`#[post("/x")]`), and with `.route("/x", web::post().to(handler))`. The wrapped
/// handler takes its arguments itself, so it is not bound by actix-web's limit of 16 extractors.
///
/// # Arguments
///
/// All are optional; durations are strings of a positive integer and a unit, `ms`, `s`, `m`, `h`
/// or `d`, possibly several largest first (`"1h30m"`).
///
/// - `scope = Type`: the extractor that names the caller, an `idem::IdempotencyScope` (for
///   example your authenticated user). Records are addressed by (scope, key), so one caller can
///   never see or block another's. Default: the scope resolver registered with
///   `Idempotency::scope_resolver`; without one, such a handler answers 500. Write
///   `scope = idem::Unscoped` to share one key space between all callers on purpose.
/// - `ttl = "24h"`: how long a finished response is kept and replayed. Default: the app's
///   (`Idempotency::ttl`, 24 hours).
/// - `lease = "30s"`: how long an unfinished request holds its key if its process dies; renewed
///   while the handler runs. Must be shorter than `ttl`. Default: the app's (30 seconds).
/// - `require_key`: answer 400 to a request without a key. Default: off (such a request runs the
///   handler without idempotency).
/// - `header = "X-Request-Id"`: the header that carries the key. Default: `Idempotency-Key`.
/// - `wait = "5s"`: a retry that arrives while the first request runs waits up to this long for
///   it to finish and replays its response, instead of getting 409 at once. Default: no wait.
/// - `fail_open`: when the store is unreachable, run the handler without idempotency. Default:
///   fail closed (503 with `Retry-After`; the handler does not run).
/// - `store_server_errors`: store and replay 5xx responses too. Default: a 5xx releases the key,
///   so a retry runs the handler again.
/// - `max_body = 65536` or `max_body = "64KiB"` (units `B`, `KB`, `KiB`, `MB`, `MiB`): the
///   largest request body that is read and fingerprinted; a keyed request with a larger one gets
///   413 and nothing is recorded. (A request without a key is not fingerprinted: it reaches the
///   handler as is, and the handler's own extractors apply their limits.) Default: the app's
///   (1 MiB).
/// - `fingerprint = "json"`: compare the body by its canonical JSON form instead of its bytes,
///   so that member order, whitespace and string escapes (`"\u0041"` for `"A"`) do not count;
///   numbers count by their text as written (`100` is not `100.0`). A body with no canonical
///   form (not JSON, nested deeper than 128, sent with a `Content-Encoding`, or naming one
///   member twice) is compared by its bytes and left to the handler's own extractor. Default:
///   `"raw"`, the body's bytes as sent.
/// - `ignore = ["/client_ts", "/trace/id"]`: with `fingerprint = "json"`, JSON pointers
///   (RFC 6901) to values left out of the comparison, for fields that change on every attempt.
///   A member a pointer names counts neither when it is there nor when it is not. Default:
///   nothing left out.
///
/// Each argument is checked at compile time: a malformed duration, a lease not shorter than the
/// ttl, an invalid header name, an unknown fingerprint, a malformed JSON pointer or `ignore`
/// without `fingerprint = "json"`, a scope type that is not an `IdempotencyScope` or a return type
/// that is not a `Responder` are compile errors.
///
/// # Examples
///
/// (These examples are compiled as tests of the `idem` crate, whose documentation has more.)
///
/// ```ignore
/// use actix_web::{post, web, HttpResponse, Responder};
/// use idem::idempotent;
///
/// #[post("/payments")]
/// #[idempotent(scope = AuthUser, ttl = "24h", require_key)]
/// async fn create_payment(user: AuthUser, body: web::Json<NewPayment>) -> impl Responder {
///     HttpResponse::Created().json(charge(&user, &body))
/// }
///
/// // Or registered by hand, with the app's scope resolver:
/// #[idempotent(lease = "10s", wait = "5s", fingerprint = "json", ignore = ["/client_ts"])]
/// async fn refund(path: web::Path<u64>) -> HttpResponse {
///     HttpResponse::Ok().body(format!("refunded {path}"))
/// }
/// // App::new().route("/refunds/{id}", web::post().to(refund))
/// ```
#[proc_macro_attribute]
pub fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::idempotent(args.into(), item.into()).into()
}
