//! Test hooks: what the project's own tests and benchmark need to reach below the public API.
//! Behind the non-default `testing` feature; not part of the stable API.

use std::time::Duration;

use deadpool_redis::redis;

use crate::{
    fingerprint::{Fingerprint, FingerprintHasher, FingerprintMode},
    key::IdempotencyKey,
    record::OwnerToken,
    scope::RecordKey,
    store::{
        memory::MemoryStore,
        redis::{scripts, KeyFormat},
        Ticket,
    },
    RedisClusterStore, RedisStore,
};

/// The address of `key` (a valid key) under `scope`.
///
/// # Panics
///
/// When `key` is not a valid idempotency key.
pub fn record_key(scope: &str, key: &str) -> RecordKey {
    let key = IdempotencyKey::parse(key.as_bytes()).expect("a valid idempotency key");
    RecordKey::new(scope, &key)
}

/// The fingerprint of a request.
pub fn fingerprint(method: &str, path: &str, query: &str, body: &[u8]) -> Fingerprint {
    Fingerprint::compute(method, path, query, body)
}

/// The fingerprint of a `POST /payments` with `Content-Type: application/json` and `body`, in
/// `mode`, the body fed in chunks of 16 KiB as a request's reads feed it: what one request costs
/// to fingerprint, for the benchmark.
pub fn fingerprint_request(mode: FingerprintMode, body: &[u8]) -> Fingerprint {
    let mut hasher =
        FingerprintHasher::new(mode, "POST", "/payments", "", &[b"application/json"], &[]);
    for chunk in body.chunks(16 * 1024) {
        hasher.update(chunk);
    }
    hasher.finish(body)
}

/// A ticket with a fresh owner token, as a request makes one.
pub fn ticket(key: RecordKey, fingerprint: Fingerprint) -> Ticket {
    Ticket::new(key, fingerprint)
}

/// A ticket with the given owner token (to play a stale owner).
pub fn ticket_with_token(key: RecordKey, fingerprint: Fingerprint, token: OwnerToken) -> Ticket {
    Ticket::with_token(key, fingerprint, token)
}

/// The Redis key of a record under `prefix`.
pub fn redis_key(prefix: &str, key: &RecordKey) -> String {
    KeyFormat::new(prefix).string(key)
}

/// The Redis key of the ticket's record in `store`.
pub fn redis_key_of(store: &RedisStore, ticket: &Ticket) -> String {
    store.key_of(ticket)
}

/// The Redis key of the ticket's record in `store`.
pub fn cluster_key_of(store: &RedisClusterStore, ticket: &Ticket) -> String {
    store.key_of(ticket)
}

/// The Lua scripts both Redis stores run, as `(name, source)`.
pub fn lua_scripts() -> [(&'static str, &'static str); 4] {
    scripts::SOURCES
}

/// The `EVALSHA` of the library's script `name` on `key`, built as the stores build it.
pub fn script_command(name: &str, key: &[u8], args: &[&[u8]]) -> Option<redis::Cmd> {
    let (_, source) = scripts::SOURCES.iter().find(|(n, _)| *n == name)?;
    let args: Vec<scripts::Arg<'_>> = args.iter().map(|a| scripts::Arg::Bytes(a)).collect();
    Some(scripts::Lua::new(source).evalsha(key, &args))
}

/// The time to live of every live record of a memory store.
pub fn memory_ttls(store: &MemoryStore) -> Vec<Duration> {
    store.ttls()
}

/// Makes a Redis store claim with the Lua script, as it does on a server older than Redis 7.0.
pub fn claim_with_lua(store: &RedisStore) {
    store.claim_with_lua();
}

/// Makes a Redis Cluster store claim with the Lua script, as on masters older than Redis 7.0.
pub fn cluster_claim_with_lua(store: &RedisClusterStore) {
    store.claim_with_lua();
}

/// The native claim the Redis stores send: `SET <key> <pending> NX GET PX <lease_ms>`.
pub fn claim_command(key: &[u8], pending: &[u8], lease_ms: u64) -> redis::Cmd {
    scripts::native_claim(key, pending, Duration::from_millis(lease_ms))
}

/// The bytes the replay cache of `idem` holds now (after its pending upkeep); 0 when it is off.
pub async fn replay_cache_weight(idem: &crate::Idempotency) -> u64 {
    match &idem.inner.replay_cache {
        Some(cache) => cache.weighed().await,
        None => 0,
    }
}
