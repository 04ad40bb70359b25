//! A handler that takes nothing.

use actix_web::{post, test, App};
use idem::{idempotent, Idempotency, MemoryStore};

#[post("/ping")]
#[idempotent(scope = idem::Unscoped)]
async fn ping() -> &'static str {
    "pong"
}

#[actix_web::main]
async fn main() {
    let app = test::init_service(
        App::new()
            .app_data(Idempotency::new(MemoryStore::new()))
            .service(ping),
    )
    .await;
    for _ in 0..2 {
        let request = test::TestRequest::post()
            .uri("/ping")
            .insert_header(("Idempotency-Key", "k"))
            .to_request();
        assert_eq!(test::call_and_read_body(&app, request).await, "pong");
    }
}
