use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(lease = "10s", lease = "20s")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
