//! Every argument at once, with a scope extractor of the user's own.

use std::{
    borrow::Cow,
    future::{ready, Ready},
};

use actix_web::{
    dev::Payload, error::ErrorUnauthorized, http::StatusCode, post, test, web, App, FromRequest,
    HttpRequest, HttpResponse,
};
use idem::{idempotent, Idempotency, IdempotencyScope, MemoryStore};

mod auth {
    /// The authenticated caller.
    pub struct User(pub String);
}

impl FromRequest for auth::User {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let user = req.headers().get("x-user").and_then(|v| v.to_str().ok());
        ready(
            user.map(|u| Self(u.to_owned()))
                .ok_or_else(|| ErrorUnauthorized("no user")),
        )
    }
}

impl IdempotencyScope for auth::User {
    fn scope_id(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.0)
    }
}

#[post("/transfers")]
#[idempotent(
    ttl = "1d2h",
    lease = "1m30s",
    require_key,
    header = "X-Request-Id",
    scope = crate::auth::User,
    wait = "250ms",
    fail_open,
    store_server_errors,
    max_body = "64KiB",
    fingerprint = "json",
    ignore = ["/client_ts", "/trace/id"],
)]
async fn transfer(user: auth::User, body: web::Bytes) -> HttpResponse {
    if body.is_empty() {
        return HttpResponse::ServiceUnavailable().body("try later");
    }
    HttpResponse::Ok().body(format!("{} moved {} bytes", user.0, body.len()))
}

#[post("/small")]
#[idempotent(scope = idem::Unscoped, max_body = 16)]
async fn small(body: String) -> String {
    body
}

#[actix_web::main]
async fn main() {
    let app = test::init_service(
        App::new()
            .app_data(Idempotency::new(MemoryStore::new()))
            .service(transfer)
            .service(small),
    )
    .await;
    let request = |key: &str, body: &'static str| {
        test::TestRequest::post()
            .uri("/transfers")
            .insert_header(("x-user", "alice"))
            .insert_header(("x-request-id", key))
            .set_payload(body)
            .to_request()
    };

    // `header`: the key is read from X-Request-Id.
    let first = test::call_service(&app, request("a", "12345")).await;
    assert_eq!(first.status(), StatusCode::OK);
    let retry = test::call_service(&app, request("a", "12345")).await;
    assert!(retry.headers().contains_key("idempotent-replayed"));
    assert_eq!(test::read_body(retry).await, "alice moved 5 bytes");

    // `store_server_errors`: a 503 is stored and replayed.
    let failed = test::call_service(&app, request("b", "")).await;
    assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
    let again = test::call_service(&app, request("b", "")).await;
    assert_eq!(again.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(again.headers().contains_key("idempotent-replayed"));

    // `require_key`: the default header is not the key header here.
    let unkeyed = test::TestRequest::post()
        .uri("/transfers")
        .insert_header(("x-user", "alice"))
        .insert_header(("Idempotency-Key", "a"))
        .to_request();
    let unkeyed = test::call_service(&app, unkeyed).await;
    assert_eq!(unkeyed.status(), StatusCode::BAD_REQUEST);

    // `scope`: the user's extractor refuses an anonymous request.
    let anonymous = test::TestRequest::post()
        .uri("/transfers")
        .insert_header(("x-request-id", "a"))
        .to_request();
    let anonymous = test::call_service(&app, anonymous).await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    // `max_body = 16`: a larger body is refused before the handler runs.
    let big = test::TestRequest::post()
        .uri("/small")
        .insert_header(("Idempotency-Key", "k"))
        .set_payload("x".repeat(17))
        .to_request();
    let big = test::call_service(&app, big).await;
    assert_eq!(big.status(), StatusCode::PAYLOAD_TOO_LARGE);
}
