use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(require_key = true)]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
