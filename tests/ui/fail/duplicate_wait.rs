use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(wait = "1s", wait = "2s")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
