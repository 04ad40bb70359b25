use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(scope = idem::Unscoped)]
async fn handler<T: actix_web::FromRequest>(value: T) -> HttpResponse {
    let _ = value;
    HttpResponse::Ok().finish()
}

fn main() {}
