//! `#[idempotent]` composes with actix-web's route attributes in either order.

use std::sync::atomic::{AtomicUsize, Ordering};

use actix_web::{http::StatusCode, post, put, test, App, HttpResponse, Responder};
use idem::{idempotent, Idempotency, MemoryStore};

static RUNS: AtomicUsize = AtomicUsize::new(0);

// Outer: `#[idempotent]` expands first and re-emits `#[post]` on the wrapper.
#[idempotent(scope = idem::Unscoped)]
#[post("/outer")]
async fn outer() -> impl Responder {
    RUNS.fetch_add(1, Ordering::SeqCst);
    "outer"
}

// Inner: `#[post]` expands first and nests this function inside its `register` method.
#[post("/inner")]
#[idempotent(scope = idem::Unscoped)]
async fn inner() -> impl Responder {
    RUNS.fetch_add(1, Ordering::SeqCst);
    "inner"
}

/// Documented, with more attributes around: they are all kept, in order.
#[put("/both")]
#[allow(clippy::unused_async)]
#[idempotent(scope = idem::Unscoped, require_key)]
#[doc(alias = "both_orders")]
#[cfg_attr(all(), allow(dead_code))]
async fn both() -> HttpResponse {
    RUNS.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Ok().body("both")
}

#[actix_web::main]
async fn main() {
    let app = test::init_service(
        App::new()
            .app_data(Idempotency::new(MemoryStore::new()))
            .service(outer)
            .service(inner)
            .service(both),
    )
    .await;
    for (method, path, body) in [
        ("POST", "/outer", "outer"),
        ("POST", "/inner", "inner"),
        ("PUT", "/both", "both"),
    ] {
        let request = || {
            test::TestRequest::default()
                .method(method.parse().unwrap())
                .uri(path)
                .insert_header(("Idempotency-Key", path))
                .to_request()
        };
        let before = RUNS.load(Ordering::SeqCst);
        let first = test::call_service(&app, request()).await;
        assert_eq!(first.status(), StatusCode::OK, "{path}");
        assert_eq!(test::read_body(first).await, body);
        let retry = test::call_service(&app, request()).await;
        assert!(
            retry.headers().contains_key("idempotent-replayed"),
            "{path}"
        );
        assert_eq!(test::read_body(retry).await, body);
        assert_eq!(RUNS.load(Ordering::SeqCst), before + 1, "{path}");
    }

    // `require_key` on `both`: no key, 400.
    let unkeyed = test::TestRequest::put().uri("/both").to_request();
    let unkeyed = test::call_service(&app, unkeyed).await;
    assert_eq!(unkeyed.status(), StatusCode::BAD_REQUEST);
}
