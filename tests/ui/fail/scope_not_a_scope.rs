use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(scope = actix_web::HttpRequest)]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
