use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(scope = idem::Unscoped)]
async fn handler(amount: u64, body: String) -> HttpResponse {
    HttpResponse::Ok().body(format!("{amount} {body}"))
}

fn main() {}
