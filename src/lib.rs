//! Make actix-web endpoints safe to retry.
//!
//! A client that sends `POST /payments` and loses the connection cannot tell whether the payment
//! was made. With idem it retries with the same `Idempotency-Key` header: the first request runs
//! the handler once, and every retry with the same key (from the same caller, with the same
//! request) gets the first response back, byte for byte, with `Idempotent-Replayed: true`, without
//! running the handler again: even when the retries arrive at the same moment, on different app
//! instances, or after the first client vanished mid-request.
//!
//! - [`#[idempotent]`](macro@idempotent) on a handler turns it on, with per-handler settings;
//! - [`Idempotency`], registered with `App::app_data`, holds the store and the app's defaults;
//! - [`MemoryStore`] keeps records in the process (one instance, tests, the example): one store
//!   per process, whichever worker builds it; [`RedisStore`] shares them between instances;
//! - [`IdempotencyScope`] names the caller: records are addressed by (scope, key), so one caller can
//!   neither read nor block another's.
//!
//! # Usage
//!
//! ```
//! use std::borrow::Cow;
//!
//! use actix_web::{
//!     dev::Payload, error::ErrorUnauthorized, http::StatusCode, post, test, web, App, FromRequest,
//!     HttpRequest, HttpResponse, Responder,
//! };
//! use idem::{idempotent, Idempotency, IdempotencyScope, MemoryStore};
//!
//! /// The authenticated caller (here, trusted from a header to keep the example short).
//! struct AuthUser(String);
//!
//! impl FromRequest for AuthUser {
//!     type Error = actix_web::Error;
//!     type Future = std::future::Ready<Result<Self, Self::Error>>;
//!
//!     fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
//!         let user = req.headers().get("x-user").and_then(|v| v.to_str().ok());
//!         std::future::ready(match user {
//!             Some(user) => Ok(AuthUser(user.to_owned())),
//!             None => Err(ErrorUnauthorized("who are you?")),
//!         })
//!     }
//! }
//!
//! /// Records are kept per user: one user's keys never collide with another's.
//! impl IdempotencyScope for AuthUser {
//!     fn scope_id(&self) -> Cow<'_, str> {
//!         Cow::Borrowed(&self.0)
//!     }
//! }
//!
//! #[derive(serde::Deserialize)]
//! struct NewPayment {
//!     amount: u64,
//! }
//!
//! #[post("/payments")]
//! #[idempotent(scope = AuthUser, ttl = "24h", require_key)]
//! async fn create_payment(user: AuthUser, body: web::Json<NewPayment>) -> impl Responder {
//!     // Charge the card: this runs once per key, however often the client retries.
//!     HttpResponse::Created().body(format!("{} paid {}", user.0, body.amount))
//! }
//!
//! # actix_web::rt::System::new().block_on(async {
//! let app = test::init_service(
//!     App::new()
//!         .app_data(Idempotency::new(MemoryStore::new()))
//!         .service(create_payment),
//! )
//! .await;
//! let payment = || {
//!     test::TestRequest::post()
//!         .uri("/payments")
//!         .insert_header(("x-user", "alice"))
//!         .insert_header(("Idempotency-Key", "4f1c2a"))
//!         .set_json(serde_json::json!({ "amount": 100 }))
//!         .to_request()
//! };
//!
//! let first = test::call_service(&app, payment()).await;
//! assert_eq!(first.status(), StatusCode::CREATED);
//! assert!(first.headers().get("idempotent-replayed").is_none());
//!
//! let retry = test::call_service(&app, payment()).await;
//! assert_eq!(retry.status(), StatusCode::CREATED);
//! assert_eq!(retry.headers().get("idempotent-replayed").unwrap(), "true");
//! assert_eq!(test::read_body(retry).await, "alice paid 100");
//! # });
//! ```
//!
//! A handler that names no `scope` uses the app's scope resolver, so the caller is resolved in one
//! place for every handler:
//!
//! ```
//! use actix_web::{error::ErrorUnauthorized, web, App, HttpResponse};
//! use idem::{idempotent, Idempotency, MemoryStore, ScopeId};
//!
//! #[idempotent(lease = "10s", wait = "5s")]
//! async fn refund(id: web::Path<u64>) -> HttpResponse {
//!     HttpResponse::Ok().body(format!("refunded {id}"))
//! }
//!
//! let idem = Idempotency::new(MemoryStore::new()).scope_resolver(|req| {
//!     let tenant = req.headers().get("x-tenant").and_then(|v| v.to_str().ok());
//!     tenant
//!         .map(ScopeId::new)
//!         .ok_or_else(|| ErrorUnauthorized("no tenant"))
//! });
//! let app = App::new()
//!     .app_data(idem)
//!     .route("/refunds/{id}", web::post().to(refund));
//! ```
//!
//! A server runs the app factory once per worker: build the configuration once and clone it in,
//! so that every worker reaches the same records (a retry that reaches another worker must find
//! the first request's record):
//!
//! ```no_run
//! # use actix_web::{web, App, HttpResponse, HttpServer};
//! # use idem::{idempotent, Idempotency, RedisStore, ScopeId};
//! # #[idempotent(require_key)]
//! # async fn refund(id: web::Path<u64>) -> HttpResponse { HttpResponse::Ok().finish() }
//! # fn tenant(req: &actix_web::HttpRequest) -> actix_web::Result<ScopeId> {
//! #     Ok(ScopeId::new(req.headers().get("x-tenant").and_then(|v| v.to_str().ok()).unwrap_or("")))
//! # }
//! # #[actix_web::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let idem = Idempotency::new(RedisStore::from_url("redis://127.0.0.1:6379")?)
//!     .scope_resolver(tenant);
//! HttpServer::new(move || {
//!     App::new()
//!         .app_data(idem.clone()) // every worker: one store, one Redis pool
//!         .route("/refunds/{id}", web::post().to(refund))
//! })
//! .bind("127.0.0.1:8080")?
//! .run()
//! .await?;
//! # Ok(()) }
//! ```
//!
//! (`MemoryStore::new()` is the process's one memory store wherever it is built, so
//! `HttpServer::new(|| App::new().app_data(Idempotency::new(MemoryStore::new())))` is safe too;
//! `MemoryStore::isolated()`, a store of its own for tests, is not.)
//!
//! A JSON API can compare what a body says rather than its bytes: with `fingerprint = "json"`, a
//! retry whose JSON is written another way (member order, whitespace, escapes) replays, and
//! `ignore` leaves out the fields that change on every attempt:
//!
//! ```
//! use actix_web::{http::StatusCode, test, web, App, HttpResponse};
//! use idem::{idempotent, Idempotency, MemoryStore, Unscoped};
//!
//! #[idempotent(scope = Unscoped, fingerprint = "json", ignore = ["/client_ts"])]
//! async fn transfer(body: web::Json<serde_json::Value>) -> HttpResponse {
//!     HttpResponse::Created().body(format!("moved {}", body["amount"]))
//! }
//!
//! # actix_web::rt::System::new().block_on(async {
//! let app = test::init_service(
//!     App::new()
//!         .app_data(Idempotency::new(MemoryStore::new()))
//!         .route("/transfers", web::post().to(transfer)),
//! )
//! .await;
//! let send = |body: &'static str| {
//!     test::TestRequest::post()
//!         .uri("/transfers")
//!         .insert_header(("Idempotency-Key", "t-1"))
//!         .insert_header(("Content-Type", "application/json"))
//!         .set_payload(body)
//!         .to_request()
//! };
//!
//! let first = test::call_service(&app, send(r#"{"amount":100,"to":"bob","client_ts":1}"#)).await;
//! assert_eq!(first.status(), StatusCode::CREATED);
//!
//! let retry = send(r#"{ "to": "bob", "amount": 100, "client_ts": 2 }"#);
//! let retry = test::call_service(&app, retry).await;
//! assert_eq!(retry.headers().get("idempotent-replayed").unwrap(), "true");
//!
//! let changed = send(r#"{"amount":200,"to":"bob","client_ts":3}"#);
//! let changed = test::call_service(&app, changed).await;
//! assert_eq!(changed.status(), StatusCode::UNPROCESSABLE_ENTITY);
//! # });
//! ```
//!
//! See [`#[idempotent]`](macro@idempotent) for every argument.
//!
//! # Supported Rust Versions
//!
//! The minimum supported Rust version is 1.89 (that of actix-web 4.18, the newest dependency floor; tested on 1.95).

#![forbid(unsafe_code)]

#[doc(inline)]
pub use idem_macros::idempotent;
pub use idem_runtime::*;

/// Not public API: what `#[idempotent]` expands to names these. Anything here may change in any
/// release.
#[doc(hidden)]
pub use idem_runtime::__private;
