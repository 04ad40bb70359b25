use actix_web::HttpResponse;
use idem::idempotent;

struct Caller;

#[idempotent(scope = Caller)]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
