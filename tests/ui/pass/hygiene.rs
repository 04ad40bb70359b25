//! The user's names and the expansion's names never meet: arguments named like the wrapper's
//! (`req`, `payload`), items named like its internals, and a recursive call by the handler's own
//! name, which still means the function as written.

#![deny(unused_variables, unused_mut, dead_code)]

use actix_web::{post, test, web, App, HttpRequest, HttpResponse};
use idem::{idempotent, Idempotency, MemoryStore};

static SPEC: &str = "the user's SPEC";

fn arg0() -> &'static str {
    "the user's arg0"
}

#[post("/names/{n}")]
#[idempotent(scope = idem::Unscoped)]
async fn names(req: HttpRequest, payload: web::Payload, value: web::Path<u32>) -> HttpResponse {
    let error = payload
        .to_bytes()
        .await
        .map(|b| b.len())
        .unwrap_or(usize::MAX);
    let n = value.into_inner();
    HttpResponse::Ok().body(format!("{} {} {} {error} {n}", req.path(), SPEC, arg0()))
}

#[post("/countdown/{n}")]
#[idempotent(scope = idem::Unscoped)]
async fn countdown(n: web::Path<u32>) -> String {
    match n.into_inner() {
        0 => "liftoff".to_owned(),
        // Recursion by name calls the handler as written, without the wrapper.
        n => format!("{n} {}", Box::pin(countdown(web::Path::from(n - 1))).await),
    }
}

#[actix_web::main]
async fn main() {
    let app = test::init_service(
        App::new()
            .app_data(Idempotency::new(MemoryStore::new()))
            .service(names)
            .service(countdown),
    )
    .await;
    let request = test::TestRequest::post()
        .uri("/names/1")
        .insert_header(("Idempotency-Key", "k"))
        .set_payload("abc")
        .to_request();
    assert_eq!(
        test::call_and_read_body(&app, request).await,
        "/names/1 the user's SPEC the user's arg0 3 1"
    );
    let request = test::TestRequest::post()
        .uri("/countdown/3")
        .insert_header(("Idempotency-Key", "k2"))
        .to_request();
    assert_eq!(
        test::call_and_read_body(&app, request).await,
        "3 2 1 liftoff"
    );
}
