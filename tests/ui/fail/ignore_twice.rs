use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(fingerprint = "json", ignore = ["/trace/id", "/trace~1id", "/trace/id"])]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
