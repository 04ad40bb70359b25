use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(ignore = ["/client_ts"])]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
