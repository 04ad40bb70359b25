use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(store_server_errors = "yes")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
