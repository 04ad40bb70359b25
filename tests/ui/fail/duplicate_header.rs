use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(header = "X-Request-Id", header = "X-Key")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
