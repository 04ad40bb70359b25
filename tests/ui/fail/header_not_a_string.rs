use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(header = X_Request_Id)]
async fn handler() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
