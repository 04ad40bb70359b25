use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(ttl = "2w")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
