use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(header = "")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
