use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(ttl = "366d")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
