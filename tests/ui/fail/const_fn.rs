use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(scope = idem::Unscoped)]
const async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
