//! A request through an expanded handler: the first call runs it, a retry with the same key replays
//! the stored response without running it, a different body under the same key is refused.

use std::sync::atomic::{AtomicUsize, Ordering};

use actix_web::{http::StatusCode, post, test, App, HttpResponse};
use idem::{idempotent, Idempotency, MemoryStore};

static RUNS: AtomicUsize = AtomicUsize::new(0);

#[post("/payments")]
#[idempotent(scope = idem::Unscoped)]
async fn create_payment(body: String) -> HttpResponse {
    let run = RUNS.fetch_add(1, Ordering::SeqCst) + 1;
    HttpResponse::Created()
        .insert_header(("x-run", run.to_string()))
        .body(format!("paid {body} (run {run})"))
}

#[actix_web::main]
async fn main() {
    let app = test::init_service(
        App::new()
            .app_data(Idempotency::new(MemoryStore::new()))
            .service(create_payment),
    )
    .await;
    let request = |key: &str, body: &'static str| {
        test::TestRequest::post()
            .uri("/payments")
            .insert_header(("Idempotency-Key", key))
            .set_payload(body)
            .to_request()
    };

    let first = test::call_service(&app, request("k1", "100")).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    assert_eq!(test::read_body(first).await, "paid 100 (run 1)");

    let retry = test::call_service(&app, request("k1", "100")).await;
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(
        retry
            .headers()
            .get("idempotent-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert_eq!(
        retry.headers().get("x-run").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert_eq!(test::read_body(retry).await, "paid 100 (run 1)");
    assert_eq!(RUNS.load(Ordering::SeqCst), 1);

    let mismatch = test::call_service(&app, request("k1", "999")).await;
    assert_eq!(mismatch.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(RUNS.load(Ordering::SeqCst), 1);

    // The handler reads the body the runtime hashed: a new key runs it with its own body.
    let other = test::call_service(&app, request("k2", "7")).await;
    assert_eq!(test::read_body(other).await, "paid 7 (run 2)");

    // No key, no `require_key`: the handler runs with no idempotency.
    let unkeyed = test::TestRequest::post()
        .uri("/payments")
        .set_payload("1")
        .to_request();
    let unkeyed = test::call_service(&app, unkeyed).await;
    assert_eq!(test::read_body(unkeyed).await, "paid 1 (run 3)");
}
