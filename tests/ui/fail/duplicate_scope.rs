use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(scope = idem::Unscoped, scope = idem::Unscoped)]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
