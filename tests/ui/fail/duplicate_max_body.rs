use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(max_body = 1024, max_body = "1KiB")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
