use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(wait = "0s")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
