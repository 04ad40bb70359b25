use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(ttl = "24h", ttl = "1h")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
