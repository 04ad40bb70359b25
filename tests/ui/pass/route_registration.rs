//! A handler registered by hand, with `.route(...)` and `web::resource(...)`, not by attribute.

use actix_web::{http::StatusCode, test, web, App, HttpResponse};
use idem::{idempotent, Idempotency, MemoryStore, ScopeId};

#[idempotent]
async fn refund(id: web::Path<u64>) -> HttpResponse {
    HttpResponse::Ok().body(format!("refunded {id}"))
}

mod handlers {
    use actix_web::{web, HttpResponse};

    /// Public, in another module.
    #[idem::idempotent(ttl = "1h")]
    pub async fn cancel(id: web::Path<u64>) -> HttpResponse {
        HttpResponse::Ok().body(format!("cancelled {id}"))
    }
}

#[actix_web::main]
async fn main() {
    // No `scope`: the app's resolver names the caller.
    let idem = Idempotency::new(MemoryStore::new()).scope_resolver(|req| {
        let tenant = req.headers().get("x-tenant").and_then(|v| v.to_str().ok());
        tenant
            .map(ScopeId::new)
            .ok_or_else(|| actix_web::error::ErrorUnauthorized("no tenant"))
    });
    let app = test::init_service(
        App::new()
            .app_data(idem)
            .route("/refunds/{id}", web::post().to(refund))
            .service(web::resource("/cancel/{id}").route(web::post().to(handlers::cancel))),
    )
    .await;
    // Keys are per caller, not per route: the key is the URI here.
    let request = |uri: &str, tenant: &str| {
        test::TestRequest::post()
            .uri(uri)
            .insert_header(("x-tenant", tenant))
            .insert_header(("Idempotency-Key", uri))
            .to_request()
    };

    let first = test::call_service(&app, request("/refunds/7", "a")).await;
    assert_eq!(test::read_body(first).await, "refunded 7");
    let retry = test::call_service(&app, request("/refunds/7", "a")).await;
    assert!(retry.headers().contains_key("idempotent-replayed"));
    // Another tenant with the same key has its own record.
    let other = test::call_service(&app, request("/refunds/7", "b")).await;
    assert!(!other.headers().contains_key("idempotent-replayed"));

    let cancel = test::call_service(&app, request("/cancel/3", "a")).await;
    assert_eq!(test::read_body(cancel).await, "cancelled 3");

    let anonymous = test::TestRequest::post()
        .uri("/refunds/7")
        .insert_header(("Idempotency-Key", "k"))
        .to_request();
    let anonymous = test::call_service(&app, anonymous).await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
}
