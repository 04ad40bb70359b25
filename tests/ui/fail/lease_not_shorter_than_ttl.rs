use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(ttl = "1h", lease = "60m")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
