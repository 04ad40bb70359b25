use actix_web::HttpResponse;
use idem::idempotent;

struct Payments;

impl Payments {
    #[idempotent(scope = idem::Unscoped)]
    async fn create(&self) -> HttpResponse {
        HttpResponse::Ok().finish()
    }
}

fn main() {}
