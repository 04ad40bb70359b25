use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(fail_open, fail_open)]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
