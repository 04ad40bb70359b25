use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(ttl = 24)]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
