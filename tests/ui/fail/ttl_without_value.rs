use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(ttl, require_key)]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
