//! More extractors than actix-web's own limit of 16 handler arguments: the wrapper takes two.

use actix_web::{post, test, web, App, HttpRequest};
use idem::{idempotent, Idempotency, MemoryStore};

#[post("/sum")]
#[idempotent(scope = idem::Unscoped)]
async fn sum(
    a0: web::Data<u32>,
    a1: web::Data<u32>,
    a2: web::Data<u32>,
    a3: web::Data<u32>,
    a4: web::Data<u32>,
    a5: web::Data<u32>,
    a6: web::Data<u32>,
    a7: web::Data<u32>,
    a8: web::Data<u32>,
    a9: web::Data<u32>,
    a10: web::Data<u32>,
    a11: web::Data<u32>,
    a12: web::Data<u32>,
    a13: web::Data<u32>,
    a14: web::Data<u32>,
    a15: web::Data<u32>,
    a16: web::Data<u32>,
    req: HttpRequest,
) -> String {
    format!(
        "{} {}",
        **a0 + **a1
            + **a2
            + **a3
            + **a4
            + **a5
            + **a6
            + **a7
            + **a8
            + **a9
            + **a10
            + **a11
            + **a12
            + **a13
            + **a14
            + **a15
            + **a16,
        req.path()
    )
}

#[actix_web::main]
async fn main() {
    let app = test::init_service(
        App::new()
            .app_data(Idempotency::new(MemoryStore::new()))
            .app_data(web::Data::new(2_u32))
            .service(sum),
    )
    .await;
    let request = test::TestRequest::post()
        .uri("/sum")
        .insert_header(("Idempotency-Key", "k"))
        .to_request();
    assert_eq!(test::call_and_read_body(&app, request).await, "34 /sum");
}
