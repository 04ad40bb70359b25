use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(lease = "0ms")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
