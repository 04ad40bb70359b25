use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(lease = "2d")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
