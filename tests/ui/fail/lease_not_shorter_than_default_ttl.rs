use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(lease = "24h")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
