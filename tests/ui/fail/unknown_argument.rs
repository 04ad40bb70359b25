use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(scope = idem::Unscoped, tll = "24h")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
