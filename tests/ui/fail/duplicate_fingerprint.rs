use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(fingerprint = "json", fingerprint = "raw")]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
