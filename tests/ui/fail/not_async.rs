use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(scope = idem::Unscoped)]
fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
