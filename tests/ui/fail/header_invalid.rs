use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(header = "Idempotency Key")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
