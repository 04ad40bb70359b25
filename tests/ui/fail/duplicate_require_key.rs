use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(require_key, require_key)]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
