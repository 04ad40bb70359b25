//! Argument patterns are kept as written: destructuring, `mut`, `_`, and attributes on
//! parameters. (`web::Path((a, b))` is not among them: actix-web 4's `Path` has a private field,
//! with or without `#[idempotent]`.)

#![deny(unused_variables, unused_mut)]

use std::collections::BTreeMap;

use actix_web::{http::header::ContentType, test, web, App, HttpRequest, HttpResponse};
use idem::{idempotent, Idempotency, MemoryStore};
use serde::Deserialize;

#[derive(Deserialize)]
struct Payment {
    amount: u64,
    currency: String,
}

#[derive(Deserialize)]
struct Note {
    note: String,
}

#[idempotent(scope = idem::Unscoped)]
async fn pay(
    path: web::Path<(u32, u32)>,
    web::Json(Payment { amount, currency }): web::Json<Payment>,
    web::Query(Note { note }): web::Query<Note>,
    web::Header(ContentType(mime)): web::Header<ContentType>,
    mut extra: web::Query<BTreeMap<String, String>>,
    _: HttpRequest,
    #[allow(unused_variables)] unused: web::Bytes,
) -> HttpResponse {
    let (account, invoice) = path.into_inner();
    extra.insert("seen".to_owned(), "yes".to_owned());
    HttpResponse::Ok().body(format!(
        "{account}/{invoice}: {amount} {currency} {note} {mime} {:?}",
        extra.into_inner()
    ))
}

#[actix_web::main]
async fn main() {
    let app = test::init_service(
        App::new()
            .app_data(Idempotency::new(MemoryStore::new()))
            .route(
                "/accounts/{account}/invoices/{invoice}",
                web::post().to(pay),
            ),
    )
    .await;
    let request = test::TestRequest::post()
        .uri("/accounts/3/invoices/9?note=x")
        .insert_header(("Idempotency-Key", "k"))
        .set_json(serde_json::json!({ "amount": 5, "currency": "EUR" }))
        .to_request();
    let body = test::call_and_read_body(&app, request).await;
    assert_eq!(
        body,
        r#"3/9: 5 EUR x application/json {"note": "x", "seen": "yes"}"#
    );
}
