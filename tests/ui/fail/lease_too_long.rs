use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(lease = "1d1s", ttl = "30d")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
