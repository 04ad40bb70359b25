use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(scope = idem::Unscoped)]
async fn handler(body: impl actix_web::FromRequest) -> HttpResponse {
    let _ = body;
    HttpResponse::Ok().finish()
}

fn main() {}
