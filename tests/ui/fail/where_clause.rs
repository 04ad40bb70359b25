use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(scope = idem::Unscoped)]
async fn handler() -> HttpResponse
where
    HttpResponse: Sized,
{
    HttpResponse::Ok().finish()
}

fn main() {}
