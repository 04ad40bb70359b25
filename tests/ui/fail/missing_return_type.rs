use idem::idempotent;

#[idempotent(scope = idem::Unscoped)]
async fn handler(body: String) {
    let _ = body;
}

fn main() {}
