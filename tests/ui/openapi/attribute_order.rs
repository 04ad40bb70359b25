//! With the `openapi` feature: `#[idempotent]` above `#[utoipa::path]` (both above the route
//! attribute) documents the operation; utoipa's own `extensions(...)` are kept. Below
//! `#[utoipa::path]` it cannot: utoipa has expanded before it runs, so the operation has no
//! idempotency parts (it still compiles and serves).

use actix_web::{post, HttpResponse};
use idem::{idempotent, openapi::IdempotencyDocs};
use utoipa::OpenApi;

#[idempotent(
    scope = idem::Unscoped,
    header = "X-Request-Key",
    lease = "10s",
    wait = "2s",
    fingerprint = "json",
    ignore = ["/client_ts"]
)]
#[utoipa::path(
    post,
    path = "/above",
    responses((status = 200, description = "Done")),
    extensions(("x-own" = json!("kept")))
)]
#[post("/above")]
async fn above() -> HttpResponse {
    HttpResponse::Ok().finish()
}

#[utoipa::path(post, path = "/below", responses((status = 200, description = "Done")))]
#[idempotent(scope = idem::Unscoped)]
#[post("/below")]
async fn below() -> HttpResponse {
    HttpResponse::Ok().finish()
}

#[derive(OpenApi)]
#[openapi(paths(above, below), modifiers(&IdempotencyDocs))]
struct ApiDoc;

fn main() {
    let doc: serde_json::Value =
        serde_json::from_str(&ApiDoc::openapi().to_json().expect("json")).expect("json");
    let documented = &doc["paths"]["/above"]["post"];
    assert_eq!(documented["x-own"], "kept");
    assert_eq!(documented["x-idempotency"]["header"], "X-Request-Key");
    assert_eq!(documented["x-idempotency"]["required"], false);
    assert_eq!(documented["x-idempotency"]["lease_ms"], 10_000);
    assert_eq!(documented["x-idempotency"]["wait_ms"], 2_000);
    assert_eq!(
        documented["x-idempotency"]["fingerprint"],
        serde_json::json!({"mode": "json", "ignore": ["/client_ts"]})
    );
    assert_eq!(documented["parameters"][0]["name"], "X-Request-Key");
    assert_eq!(documented["parameters"][0]["required"], false);
    assert!(documented["responses"]["409"].is_object());
    assert!(documented["description"]
        .as_str()
        .is_some_and(|d| d.contains("waits up to 2 s")));
    let undocumented = &doc["paths"]["/below"]["post"];
    assert!(undocumented["x-idempotency"].is_null());
    assert!(undocumented["responses"]["409"].is_null());
}
