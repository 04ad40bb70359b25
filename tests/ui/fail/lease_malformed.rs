use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(lease = "30")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
