use actix_web::web;
use idem::idempotent;

#[idempotent(scope = idem::Unscoped)]
async fn handler(body: web::Bytes) -> Vec<u32> {
    vec![body.len() as u32]
}

fn main() {}
