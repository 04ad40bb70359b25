use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(wait = "five seconds")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
