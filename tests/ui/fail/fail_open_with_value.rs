use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(fail_open(true))]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
