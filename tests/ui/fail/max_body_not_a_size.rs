use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(max_body = true)]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
