use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(scope = idem::Unscoped)]
async unsafe fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
