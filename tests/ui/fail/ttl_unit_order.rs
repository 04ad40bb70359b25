use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(ttl = "30m1h")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
