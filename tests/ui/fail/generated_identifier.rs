use actix_web::HttpResponse;
use idem::idempotent;

#[idempotent(scope = idem::Unscoped)]
async fn handler(body: String) -> HttpResponse {
    let _ = body;
    // `req`, `payload` and `SPEC` are the expansion's own: user code cannot see them.
    HttpResponse::Ok().body(format!("{} {:?} {:?}", req.path(), payload, SPEC))
}

fn main() {}
