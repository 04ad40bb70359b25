use idem::idempotent;

#[idempotent(require_key)]
struct Payment {
    amount: u64,
}

fn main() {}
