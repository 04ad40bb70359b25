use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(scope = idem::Unscoped)]
#[idempotent(require_key)]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
