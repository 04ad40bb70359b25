//! The behavioural suite every store backend passes: the same test functions, run by
//! `suite!(backend_name, harness_expression)` against each backend.

#![allow(dead_code, unreachable_pub)]

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use idem_runtime::{
    testing, Claim, OwnerToken, Ownership, Store, StoreError, StoredResponse, Ticket,
};

use actix_web::http::{
    header::{HeaderName, HeaderValue},
    StatusCode,
};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
/// Lists the remaining TTL (ms) of every key the backend holds.
pub type TtlProbe = Box<dyn Fn() -> BoxFuture<'static, Vec<Option<u64>>> + Send + Sync>;
/// Writes raw bytes where a ticket's record lives.
pub type RawWriter = Box<dyn Fn(Ticket, Vec<u8>) -> BoxFuture<'static, ()> + Send + Sync>;
/// Puts a value of another type where a ticket's record lives.
pub type ForeignWriter = Box<dyn Fn(Ticket) -> BoxFuture<'static, ()> + Send + Sync>;

/// One backend under test.
pub struct Harness {
    pub store: Arc<dyn Store>,
    /// The remaining time to live of every key the store holds, in ms (`None`: no expiry).
    pub ttls: TtlProbe,
    /// Writes raw bytes where the ticket's record lives (backends that hold encoded bytes).
    pub write_raw: Option<RawWriter>,
    /// Makes the key hold a value of another type (a foreign writer), where the backend can.
    pub write_foreign_type: Option<ForeignWriter>,
    /// Keeps servers alive as long as the harness.
    pub guard: Box<dyn std::any::Any + Send + Sync>,
}

/// The raw and foreign-type writers of a Redis-backed harness: `conn` talks to the server (or
/// cluster) behind the store, `key_of` names a ticket's record the way the store does.
pub fn redis_writers<C>(
    conn: C,
    key_of: impl Fn(&Ticket) -> String + Clone + Send + Sync + 'static,
) -> (RawWriter, ForeignWriter)
where
    C: idem_runtime::redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    use idem_runtime::redis::AsyncCommands as _;

    let raw_conn = conn.clone();
    let raw_key = key_of.clone();
    let raw: RawWriter = Box::new(move |t, bytes| {
        let mut conn = raw_conn.clone();
        let key = raw_key(&t);
        Box::pin(async move {
            let () = conn.set_ex(key, bytes, 60).await.expect("SET");
        })
    });
    let foreign: ForeignWriter = Box::new(move |t| {
        let mut conn = conn.clone();
        let key = key_of(&t);
        Box::pin(async move {
            let _: i64 = conn.hset(&key, "f", "v").await.expect("HSET");
            let _: bool = conn.expire(&key, 60).await.expect("EXPIRE");
        })
    });
    (raw, foreign)
}

pub const LEASE: Duration = Duration::from_secs(10);
pub const TTL: Duration = Duration::from_secs(3600);

pub fn ticket(scope: &str, key: &str, body: &[u8]) -> Ticket {
    testing::ticket(
        testing::record_key(scope, key),
        testing::fingerprint("POST", "/payments", "", body),
    )
}

/// Another request with the same key and body: same record, same fingerprint, new owner token.
pub fn retry_of(t: &Ticket) -> Ticket {
    testing::ticket(*t.key(), *t.fingerprint())
}

pub fn response(body: &'static [u8]) -> StoredResponse {
    StoredResponse {
        status: StatusCode::CREATED,
        headers: vec![
            (
                HeaderName::from_static("content-type"),
                HeaderValue::from_static("application/json"),
            ),
            (
                HeaderName::from_static("location"),
                HeaderValue::from_static("/payments/pay_1"),
            ),
            (
                HeaderName::from_static("x-dup"),
                HeaderValue::from_static("1"),
            ),
            (
                HeaderName::from_static("x-dup"),
                HeaderValue::from_static("2"),
            ),
        ],
        body: Bytes::from_static(body),
    }
}

async fn must_claim(store: &dyn Store, t: &Ticket, lease: Duration) -> Claim {
    store.claim(t, lease).await.expect("claim succeeds")
}

pub async fn first_claim_acquires_and_duplicates_are_in_flight(h: Harness) {
    let t = ticket("alice", "k1", b"{}");
    assert_eq!(must_claim(&*h.store, &t, LEASE).await, Claim::Acquired);
    match must_claim(&*h.store, &retry_of(&t), LEASE).await {
        Claim::InFlight { retry_after } => {
            assert!(retry_after <= LEASE, "{retry_after:?}");
            assert!(retry_after > LEASE / 2, "{retry_after:?}");
        }
        other => panic!("expected in flight, got {other:?}"),
    }
}

pub async fn completed_records_replay_byte_for_byte(h: Harness) {
    let t = ticket("alice", "k1", b"{}");
    assert_eq!(must_claim(&*h.store, &t, LEASE).await, Claim::Acquired);
    let resp = response(b"{\"id\":\"pay_1\"}\n\x00\xff binary tail");
    assert_eq!(
        h.store.complete(&t, &resp, TTL).await.expect("complete"),
        Ownership::Held
    );
    for _ in 0..3 {
        match must_claim(&*h.store, &retry_of(&t), LEASE).await {
            Claim::Replay(stored) => {
                assert_eq!(stored, resp);
                assert!(!stored
                    .headers
                    .iter()
                    .any(|(n, _)| n == "idempotent-replayed"));
            }
            other => panic!("expected replay, got {other:?}"),
        }
    }
}

pub async fn a_different_request_with_the_same_key_is_a_mismatch(h: Harness) {
    let t = ticket("alice", "k1", b"{\"amount\":100}");
    let other = ticket("alice", "k1", b"{\"amount\":200}");
    assert_eq!(must_claim(&*h.store, &t, LEASE).await, Claim::Acquired);
    // While in flight: 422 wins over 409.
    assert_eq!(must_claim(&*h.store, &other, LEASE).await, Claim::Mismatch);
    assert_eq!(
        h.store
            .complete(&t, &response(b"ok"), TTL)
            .await
            .expect("complete"),
        Ownership::Held
    );
    assert_eq!(must_claim(&*h.store, &other, LEASE).await, Claim::Mismatch);
}

pub async fn scopes_do_not_share_records(h: Harness) {
    let alice = ticket("alice", "same-key", b"{}");
    let bob = ticket("bob", "same-key", b"{}");
    assert_eq!(must_claim(&*h.store, &alice, LEASE).await, Claim::Acquired);
    assert_eq!(must_claim(&*h.store, &bob, LEASE).await, Claim::Acquired);
    let bob_other_body = ticket("bob", "other", b"{\"x\":1}");
    assert_eq!(
        must_claim(&*h.store, &bob_other_body, LEASE).await,
        Claim::Acquired
    );
}

pub async fn a_stale_owner_can_neither_complete_nor_release(h: Harness) {
    let owner = ticket("alice", "k1", b"{}");
    assert_eq!(must_claim(&*h.store, &owner, LEASE).await, Claim::Acquired);
    let stale = testing::ticket_with_token(
        *owner.key(),
        *owner.fingerprint(),
        OwnerToken::from_bytes(rand_token()),
    );
    assert_eq!(
        h.store
            .complete(&stale, &response(b"stale"), TTL)
            .await
            .expect("complete"),
        Ownership::Lost
    );
    assert_eq!(
        h.store.release(&stale).await.expect("release"),
        Ownership::Lost
    );
    assert_eq!(
        h.store.renew(&stale, LEASE).await.expect("renew"),
        Ownership::Lost
    );
    // Nothing changed: the record is still in flight, and the real owner completes it.
    assert!(matches!(
        must_claim(&*h.store, &retry_of(&owner), LEASE).await,
        Claim::InFlight { .. }
    ));
    assert_eq!(
        h.store
            .complete(&owner, &response(b"real"), TTL)
            .await
            .expect("complete"),
        Ownership::Held
    );
    // A completed record is no longer pending: even its owner cannot overwrite or release it.
    assert_eq!(
        h.store
            .complete(&owner, &response(b"again"), TTL)
            .await
            .expect("complete"),
        Ownership::Lost
    );
    assert_eq!(
        h.store.release(&owner).await.expect("release"),
        Ownership::Lost
    );
    match must_claim(&*h.store, &retry_of(&owner), LEASE).await {
        Claim::Replay(r) => assert_eq!(r.body, Bytes::from_static(b"real")),
        other => panic!("expected replay, got {other:?}"),
    }
}

pub async fn an_expired_lease_lets_a_new_claim_in_and_fences_the_old_owner(h: Harness) {
    let short = Duration::from_millis(150);
    let first = ticket("alice", "k1", b"{}");
    assert_eq!(must_claim(&*h.store, &first, short).await, Claim::Acquired);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = retry_of(&first);
    assert_eq!(must_claim(&*h.store, &second, LEASE).await, Claim::Acquired);
    // The first owner wakes up late: it must not overwrite or delete the newer record.
    assert_eq!(
        h.store
            .complete(&first, &response(b"late"), TTL)
            .await
            .expect("complete"),
        Ownership::Lost
    );
    assert_eq!(
        h.store.release(&first).await.expect("release"),
        Ownership::Lost
    );
    assert!(matches!(
        must_claim(&*h.store, &retry_of(&first), LEASE).await,
        Claim::InFlight { .. }
    ));
    assert_eq!(
        h.store
            .complete(&second, &response(b"second"), TTL)
            .await
            .expect("complete"),
        Ownership::Held
    );
    match must_claim(&*h.store, &retry_of(&first), LEASE).await {
        Claim::Replay(r) => assert_eq!(r.body, Bytes::from_static(b"second")),
        other => panic!("expected replay, got {other:?}"),
    }
}

pub async fn renewal_keeps_the_lease(h: Harness) {
    let short = Duration::from_millis(300);
    let t = ticket("alice", "k1", b"{}");
    assert_eq!(must_claim(&*h.store, &t, short).await, Claim::Acquired);
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            h.store.renew(&t, short).await.expect("renew"),
            Ownership::Held
        );
    }
    // 600 ms after the claim, twice the lease: still ours.
    assert!(matches!(
        must_claim(&*h.store, &retry_of(&t), short).await,
        Claim::InFlight { .. }
    ));
}

pub async fn release_lets_a_retry_run_again(h: Harness) {
    let t = ticket("alice", "k1", b"{}");
    assert_eq!(must_claim(&*h.store, &t, LEASE).await, Claim::Acquired);
    assert_eq!(h.store.release(&t).await.expect("release"), Ownership::Held);
    let retry = retry_of(&t);
    assert_eq!(must_claim(&*h.store, &retry, LEASE).await, Claim::Acquired);
    // The released owner is fenced out of the new record.
    assert_eq!(
        h.store
            .complete(&t, &response(b"x"), TTL)
            .await
            .expect("complete"),
        Ownership::Lost
    );
}

pub async fn completed_records_expire_after_their_ttl(h: Harness) {
    let t = ticket("alice", "k1", b"{}");
    assert_eq!(must_claim(&*h.store, &t, LEASE).await, Claim::Acquired);
    assert_eq!(
        h.store
            .complete(&t, &response(b"x"), Duration::from_millis(200))
            .await
            .expect("complete"),
        Ownership::Held
    );
    assert!(matches!(
        must_claim(&*h.store, &retry_of(&t), LEASE).await,
        Claim::Replay(_)
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        must_claim(&*h.store, &retry_of(&t), LEASE).await,
        Claim::Acquired
    );
}

pub async fn every_key_has_a_ttl_within_bounds(h: Harness) {
    let pending = ticket("alice", "pending", b"{}");
    let done = ticket("alice", "done", b"{}");
    assert_eq!(
        must_claim(&*h.store, &pending, LEASE).await,
        Claim::Acquired
    );
    assert_eq!(must_claim(&*h.store, &done, LEASE).await, Claim::Acquired);
    assert_eq!(
        h.store
            .complete(&done, &response(b"x"), TTL)
            .await
            .expect("complete"),
        Ownership::Held
    );
    let ttls = (h.ttls)().await;
    assert_eq!(ttls.len(), 2, "{ttls:?}");
    let mut ttls: Vec<u64> = ttls
        .into_iter()
        .map(|t| t.expect("every key has a TTL"))
        .collect();
    ttls.sort_unstable();
    assert!(
        ttls[0] <= LEASE.as_millis() as u64 && ttls[0] > 0,
        "{ttls:?}"
    );
    assert!(
        ttls[1] <= TTL.as_millis() as u64 && ttls[1] > LEASE.as_millis() as u64,
        "{ttls:?}"
    );
}

pub async fn hundreds_of_concurrent_claims_yield_one_owner(h: Harness) {
    let t = ticket("alice", "contended", b"{}");
    let mut tasks = Vec::new();
    for _ in 0..500 {
        let store = Arc::clone(&h.store);
        let retry = retry_of(&t);
        tasks.push(tokio::spawn(
            async move { store.claim(&retry, LEASE).await },
        ));
    }
    let mut acquired = 0;
    let mut in_flight = 0;
    for task in tasks {
        match task.await.expect("task").expect("claim") {
            Claim::Acquired => acquired += 1,
            Claim::InFlight { .. } => in_flight += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((acquired, in_flight), (1, 499));
}

pub async fn corrupt_stored_values_are_errors(h: Harness) {
    let write_raw = h
        .write_raw
        .as_ref()
        .expect("this test is only instantiated for backends that hold encoded bytes");
    for garbage in [
        &b"not a record at all"[..],
        b"",
        b"id",
        b"id\x01C",
        b"id\x09Cxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    ] {
        let t = ticket("alice", "corrupt", garbage);
        write_raw(t.clone(), garbage.to_vec()).await;
        match h.store.claim(&t, LEASE).await {
            Err(StoreError::Corrupt(_)) => {}
            other => panic!("expected a corrupt-record error for {garbage:?}, got {other:?}"),
        }
    }
    if let Some(write_foreign) = &h.write_foreign_type {
        let t = ticket("alice", "foreign", b"{}");
        write_foreign(t.clone()).await;
        assert!(h.store.claim(&t, LEASE).await.is_err());
        assert!(h.store.complete(&t, &response(b"x"), TTL).await.is_err());
    }
}

fn sorted(mut steps: Vec<(String, Bytes)>) -> Vec<(String, Bytes)> {
    steps.sort();
    steps
}

fn step(name: &str, entry: &'static [u8]) -> (String, Bytes) {
    (name.to_owned(), Bytes::from_static(entry))
}

async fn record(h: &Harness, t: &Ticket, name: &str, entry: &[u8], ttl: Duration) -> Ownership {
    h.store
        .record_step(t, name, entry, ttl)
        .await
        .expect("record_step")
}

async fn load(h: &Harness, t: &Ticket) -> Vec<(String, Bytes)> {
    sorted(h.store.load_steps(t).await.expect("load_steps"))
}

/// Steps are found by name, byte for byte, and a release (a 5xx) keeps them for the retry.
pub async fn steps_are_journaled_and_kept_across_a_release(h: Harness) {
    let t = ticket("alice", "k1", b"{}");
    assert_eq!(must_claim(&*h.store, &t, LEASE).await, Claim::Acquired);
    assert!(load(&h, &t).await.is_empty());
    let binary: &'static [u8] = b"\x01O{\"id\":\"ch_1\"}\x00\xff";
    assert_eq!(record(&h, &t, "charge", binary, TTL).await, Ownership::Held);
    assert_eq!(
        record(&h, &t, "email", b"\x01O1", TTL).await,
        Ownership::Held
    );
    assert_eq!(
        load(&h, &t).await,
        vec![step("charge", binary), step("email", b"\x01O1")]
    );
    assert_eq!(h.store.release(&t).await.expect("release"), Ownership::Held);
    let retry = retry_of(&t);
    assert_eq!(must_claim(&*h.store, &retry, LEASE).await, Claim::Acquired);
    assert_eq!(
        load(&h, &retry).await,
        vec![step("charge", binary), step("email", b"\x01O1")]
    );
    // Another record (scope or key) has its own journal.
    assert!(load(&h, &ticket("bob", "k1", b"{}")).await.is_empty());
    assert!(load(&h, &ticket("alice", "k2", b"{}")).await.is_empty());
}

/// Two owners: the first loses its lease, the second claims; the first can no longer write.
pub async fn a_stale_owner_never_writes_into_a_newer_owners_journal(h: Harness) {
    let first = ticket("alice", "k1", b"{}");
    let short = Duration::from_millis(300);
    assert_eq!(must_claim(&*h.store, &first, short).await, Claim::Acquired);
    assert_eq!(
        record(&h, &first, "a", b"\x01Ofirst", TTL).await,
        Ownership::Held
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = retry_of(&first);
    assert_eq!(must_claim(&*h.store, &second, LEASE).await, Claim::Acquired);
    assert_eq!(load(&h, &second).await, vec![step("a", b"\x01Ofirst")]);
    // The stale first owner: refused, nothing written.
    assert_eq!(
        record(&h, &first, "b", b"\x01Ostale", TTL).await,
        Ownership::Lost
    );
    assert_eq!(
        record(&h, &first, "a", b"\x01Ostale", TTL).await,
        Ownership::Lost
    );
    assert_eq!(
        record(&h, &second, "b", b"\x01Osecond", TTL).await,
        Ownership::Held
    );
    assert_eq!(
        load(&h, &second).await,
        vec![step("a", b"\x01Ofirst"), step("b", b"\x01Osecond")]
    );
}

/// A request with another fingerprint (the key reused after a release) never sees the journal,
/// and its first step replaces it.
pub async fn another_fingerprint_never_sees_the_journal_and_replaces_it(h: Harness) {
    let t = ticket("alice", "k1", b"{\"amount\":100}");
    assert_eq!(must_claim(&*h.store, &t, LEASE).await, Claim::Acquired);
    assert_eq!(
        record(&h, &t, "charge", b"\x01O100", TTL).await,
        Ownership::Held
    );
    assert_eq!(h.store.release(&t).await.expect("release"), Ownership::Held);
    let other = ticket("alice", "k1", b"{\"amount\":200}");
    assert!(load(&h, &other).await.is_empty());
    assert_eq!(must_claim(&*h.store, &other, LEASE).await, Claim::Acquired);
    assert!(load(&h, &other).await.is_empty());
    assert_eq!(
        record(&h, &other, "refund", b"\x01O200", TTL).await,
        Ownership::Held
    );
    assert_eq!(load(&h, &other).await, vec![step("refund", b"\x01O200")]);
    assert_eq!(
        h.store.release(&other).await.expect("release"),
        Ownership::Held
    );
    let again = retry_of(&t);
    assert_eq!(must_claim(&*h.store, &again, LEASE).await, Claim::Acquired);
    assert!(load(&h, &again).await.is_empty());
}

/// A step written again (a call re-sent after its answer was lost) is held, and stays one step.
pub async fn a_step_written_again_is_the_same_step(h: Harness) {
    let t = ticket("alice", "k1", b"{}");
    assert_eq!(must_claim(&*h.store, &t, LEASE).await, Claim::Acquired);
    for _ in 0..3 {
        assert_eq!(
            record(&h, &t, "charge", b"\x01Oa", TTL).await,
            Ownership::Held
        );
    }
    assert_eq!(load(&h, &t).await, vec![step("charge", b"\x01Oa")]);
}

/// The journal lives as long as its ttl from its last write, record or not.
pub async fn a_journal_expires_after_its_ttl(h: Harness) {
    let t = ticket("alice", "k1", b"{}");
    assert_eq!(must_claim(&*h.store, &t, LEASE).await, Claim::Acquired);
    let ttl = Duration::from_millis(300);
    assert_eq!(
        record(&h, &t, "charge", b"\x01Oa", ttl).await,
        Ownership::Held
    );
    assert_eq!(h.store.release(&t).await.expect("release"), Ownership::Held);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let retry = retry_of(&t);
    assert_eq!(must_claim(&*h.store, &retry, LEASE).await, Claim::Acquired);
    assert!(load(&h, &retry).await.is_empty());
    // A new step of the same request starts a new journal: the expired steps are not revived.
    assert_eq!(
        record(&h, &retry, "email", b"\x01Ob", TTL).await,
        Ownership::Held
    );
    assert_eq!(load(&h, &retry).await, vec![step("email", b"\x01Ob")]);
    for ttl in (h.ttls)().await {
        assert!(ttl.is_some(), "a key without expiry");
    }
}

/// No record, a completed record, a released one: a step write is refused and changes nothing.
pub async fn steps_need_a_live_pending_record(h: Harness) {
    let t = ticket("alice", "k1", b"{}");
    assert_eq!(record(&h, &t, "a", b"\x01Oa", TTL).await, Ownership::Lost);
    assert_eq!(must_claim(&*h.store, &t, LEASE).await, Claim::Acquired);
    assert_eq!(
        h.store
            .complete(&t, &response(b"ok"), TTL)
            .await
            .expect("complete"),
        Ownership::Held
    );
    assert_eq!(record(&h, &t, "b", b"\x01Ob", TTL).await, Ownership::Lost);
    let u = ticket("alice", "k2", b"{}");
    assert_eq!(must_claim(&*h.store, &u, LEASE).await, Claim::Acquired);
    assert_eq!(h.store.release(&u).await.expect("release"), Ownership::Held);
    assert_eq!(record(&h, &u, "c", b"\x01Oc", TTL).await, Ownership::Lost);
    assert!(load(&h, &t).await.is_empty());
    assert!(load(&h, &u).await.is_empty());
}

/// Instantiates the suite for one backend: `suite!(memory, harness_expr)`, where the expression
/// is a future yielding a [`Harness`]. Backends that hold encoded bytes add
/// `; corrupt_stored_values_are_errors`.
#[macro_export]
macro_rules! suite {
    ($name:ident, $harness:expr $(; $($extra:ident),*)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::suite!(@tests $harness;
                first_claim_acquires_and_duplicates_are_in_flight,
                completed_records_replay_byte_for_byte,
                a_different_request_with_the_same_key_is_a_mismatch,
                scopes_do_not_share_records,
                a_stale_owner_can_neither_complete_nor_release,
                an_expired_lease_lets_a_new_claim_in_and_fences_the_old_owner,
                renewal_keeps_the_lease,
                release_lets_a_retry_run_again,
                completed_records_expire_after_their_ttl,
                every_key_has_a_ttl_within_bounds,
                hundreds_of_concurrent_claims_yield_one_owner,
                steps_are_journaled_and_kept_across_a_release,
                a_stale_owner_never_writes_into_a_newer_owners_journal,
                another_fingerprint_never_sees_the_journal_and_replaces_it,
                a_step_written_again_is_the_same_step,
                a_journal_expires_after_its_ttl,
                steps_need_a_live_pending_record,
                $($($extra,)*)?
            );
        }
    };
    (@tests $harness:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let harness = $harness.await;
                suite::$test(harness).await;
            }
        )*
    };
}

/// A random owner token (one that no request holds).
fn rand_token() -> [u8; 16] {
    rand::random()
}
