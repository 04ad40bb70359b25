use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(max_body = 1024u16)]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
