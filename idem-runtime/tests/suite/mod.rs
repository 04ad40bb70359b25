//! The behavioural suite every store backend passes: the same test functions, run by
//! `suite!(backend_name, harness_expression)` against each backend.

#![allow(dead_code, unreachable_pub)]

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use idem_runtime::{
    testing, Claim, Fingerprint, FingerprintEncoding, OwnerToken, Ownership, Store, StoreError,
    StoredResponse, Ticket,
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

/// A duplicate learns how long the first claim's lease still runs (the 409's `Retry-After` for a
/// record this instance does not run), not the lease it asked for itself.
pub async fn in_flight_answers_the_remaining_lease_of_the_record(h: Harness) {
    let t = ticket("alice", "remaining", b"{}");
    assert_eq!(must_claim(&*h.store, &t, LEASE).await, Claim::Acquired);
    match must_claim(&*h.store, &retry_of(&t), LEASE * 6).await {
        Claim::InFlight { retry_after } => {
            assert!(
                retry_after <= LEASE,
                "{retry_after:?} is past the record's lease"
            );
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
        b"id\x01Cxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
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

/// A fingerprint encoding no release knows yet, as a newer release would write one.
const NEWER: FingerprintEncoding = FingerprintEncoding::from_id(200);

/// `t`'s request fingerprinted in `encoding` (a stand-in digest: the same bytes).
fn in_encoding(t: &Ticket, encoding: FingerprintEncoding) -> Ticket {
    testing::ticket(
        *t.key(),
        Fingerprint::new(encoding, *t.fingerprint().as_bytes()),
    )
}

/// A store keeps the encoding of a record's fingerprint: a ticket in another encoding learns the
/// record's (to fingerprint the request again in it), in every state, and is never answered as
/// the same request or as a different one.
pub async fn records_keep_their_fingerprint_encoding(h: Harness) {
    let raw = ticket("alice", "encoding", b"{}");
    let newer = in_encoding(&raw, NEWER);
    assert_eq!(must_claim(&*h.store, &newer, LEASE).await, Claim::Acquired);
    let other = Claim::OtherEncoding { encoding: NEWER };
    assert_eq!(must_claim(&*h.store, &retry_of(&raw), LEASE).await, other);
    assert!(matches!(
        must_claim(&*h.store, &retry_of(&newer), LEASE).await,
        Claim::InFlight { .. }
    ));
    let done = h.store.complete(&newer, &response(b"newer"), TTL).await;
    assert_eq!(done.expect("completes"), Ownership::Held);
    assert_eq!(must_claim(&*h.store, &retry_of(&raw), LEASE).await, other);
    assert_eq!(
        must_claim(&*h.store, &retry_of(&newer), LEASE).await,
        Claim::Replay(response(b"newer"))
    );
    // And the other way round: a raw record, met by a ticket in another encoding.
    let raw = ticket("alice", "encoding-raw", b"{}");
    assert_eq!(must_claim(&*h.store, &raw, LEASE).await, Claim::Acquired);
    assert_eq!(
        must_claim(&*h.store, &in_encoding(&raw, NEWER), LEASE).await,
        Claim::OtherEncoding {
            encoding: FingerprintEncoding::RAW_V2
        }
    );
}

/// Records the previous release wrote (record format 1, fingerprint encoding raw/v2), pinned as
/// the bytes its own code path stored in Redis for `POST /payments`
/// (`{"amount":1000,"currency":"eur"}`, answered 201) and for a request still running.
pub const FORMAT_1_COMPLETED: &str = "6964014345671f309ac0a35f2a3550e1cd36201ad1ec9f963cf94ebe5d2f96dfa56c6cd400c9000200086c6f636174696f6e000000152f7061796d656e74732f7061795f66697874757265000c636f6e74656e742d74797065000000106170706c69636174696f6e2f6a736f6e7b22616d6f756e74223a313030302c226964223a227061795f66697874757265227d";
/// The pending record of the previous release's running request.
pub const FORMAT_1_PENDING: &str = "69640150509719dfb384885fbb736892a50db41928e0a28f0b42cbb0565ce2fb0c7db8156cb4c98a4632df7d0e74873879612100";

pub fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The fingerprint a pinned record holds (bytes 4..36 of format 1).
pub fn fingerprint_of(record: &[u8]) -> Fingerprint {
    Fingerprint::from_bytes(record[4..36].try_into().expect("32 bytes"))
}

/// The replayed body of the completed fixture.
pub const FIXTURE_BODY: &[u8] = br#"{"amount":1000,"id":"pay_fixture"}"#;

fn expect_replay(claim: Claim) -> StoredResponse {
    match claim {
        Claim::Replay(stored) => stored,
        other => panic!("expected a replay, got {other:?}"),
    }
}

/// The previous release's records, as it stored them: their retries replay (or wait), a
/// different request with their key is still a mismatch, and this release's own pending
/// record is byte for byte the previous release's (so the previous release's fenced writes and
/// this one's compare the same bytes while both share the store).
pub async fn records_of_the_previous_release_replay(h: Harness) {
    let write_raw = h
        .write_raw
        .as_ref()
        .expect("this test is only instantiated for backends that hold encoded bytes");
    let completed = hex(FORMAT_1_COMPLETED);
    let t = testing::ticket(
        testing::record_key("alice", "previous-completed"),
        fingerprint_of(&completed),
    );
    write_raw(t.clone(), completed).await;
    let stored = expect_replay(must_claim(&*h.store, &t, LEASE).await);
    assert_eq!(stored.status, StatusCode::CREATED);
    assert_eq!(&stored.body[..], FIXTURE_BODY);
    let different = testing::ticket(
        *t.key(),
        testing::fingerprint("POST", "/payments", "", b"{}"),
    );
    assert_eq!(
        must_claim(&*h.store, &different, LEASE).await,
        Claim::Mismatch
    );

    let pending = hex(FORMAT_1_PENDING);
    let token = OwnerToken::from_bytes(pending[36..52].try_into().expect("16 bytes"));
    let key = testing::record_key("alice", "previous-pending");
    let owner = testing::ticket_with_token(key, fingerprint_of(&pending), token);
    assert_eq!(owner.pending_record(), &pending[..]);
    write_raw(owner.clone(), pending).await;
    assert!(matches!(
        must_claim(&*h.store, &retry_of(&owner), LEASE).await,
        Claim::InFlight { .. }
    ));
    let other = testing::ticket(key, testing::fingerprint("POST", "/payments", "", b"{}"));
    assert_eq!(must_claim(&*h.store, &other, LEASE).await, Claim::Mismatch);
    // Its owner (an instance of the previous release) completes it; the retry replays.
    let done = h.store.complete(&owner, &response(b"late"), TTL).await;
    assert_eq!(done.expect("completes"), Ownership::Held);
    assert_eq!(
        expect_replay(must_claim(&*h.store, &retry_of(&owner), LEASE).await),
        response(b"late")
    );
}

/// A format 2 record with `encoding`, `digest`, kind `kind` and `rest` (the kind's part), then
/// `sections`: what a newer release may write.
pub fn format_2(
    kind: u8,
    encoding: u8,
    fingerprint: &Fingerprint,
    rest: &[u8],
    sections: &[(u16, &[u8])],
) -> Vec<u8> {
    let mut out = b"id\x02".to_vec();
    out.push(kind);
    out.push(encoding);
    out.extend_from_slice(fingerprint.as_bytes());
    out.extend_from_slice(rest);
    for (tag, data) in sections {
        out.extend_from_slice(&tag.to_be_bytes());
        out.extend_from_slice(&u32::try_from(data.len()).expect("short").to_be_bytes());
        out.extend_from_slice(data);
    }
    out
}

/// The completed part of a format 2 record: 201, no header, `body`.
pub fn completed_part(body: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 201, 0, 0];
    out.extend_from_slice(&u32::try_from(body.len()).expect("short").to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// This release meeting records of a newer one: an additional section it does not know is
/// skipped (the record replays), a newer format, a record kind or a critical section it does
/// not know is refused as unreadable (never misread, never a mismatch), and a fingerprint
/// encoding it does not know is named in the answer.
pub async fn newer_records_are_read_or_refused(h: Harness) {
    let write_raw = h
        .write_raw
        .as_ref()
        .expect("this test is only instantiated for backends that hold encoded bytes");
    let t = ticket("alice", "newer", b"{}");
    let fp = *t.fingerprint();
    let body = completed_part(b"paid");
    let with_steps = format_2(b'C', 2, &fp, &body, &[(0x0001, b"journal"), (0x0042, b"")]);
    write_raw(t.clone(), with_steps).await;
    let stored = expect_replay(must_claim(&*h.store, &retry_of(&t), LEASE).await);
    assert_eq!(
        (stored.status, &stored.body[..]),
        (StatusCode::CREATED, &b"paid"[..])
    );

    let pending = format_2(b'P', 2, &fp, &[3; 16], &[(0x0001, b"journal")]);
    write_raw(t.clone(), pending).await;
    assert!(matches!(
        must_claim(&*h.store, &retry_of(&t), LEASE).await,
        Claim::InFlight { .. }
    ));

    let mut format_3 = format_2(b'C', 2, &fp, &body, &[]);
    format_3[2] = 3;
    for unreadable in [
        format_3,
        format_2(b'C', 2, &fp, &body, &[(0x8001, b"must understand")]),
        format_2(b'R', 2, &fp, &body, &[]),
    ] {
        write_raw(t.clone(), unreadable.clone()).await;
        match h.store.claim(&retry_of(&t), LEASE).await {
            Err(StoreError::Unreadable(_)) => {}
            other => panic!("expected an unreadable record for {unreadable:?}, got {other:?}"),
        }
    }

    write_raw(t.clone(), format_2(b'C', NEWER.id(), &fp, &body, &[])).await;
    assert_eq!(
        must_claim(&*h.store, &retry_of(&t), LEASE).await,
        Claim::OtherEncoding { encoding: NEWER }
    );
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
/// `; corrupt_stored_values_are_errors, records_of_the_previous_release_replay,
/// newer_records_are_read_or_refused`.
#[macro_export]
macro_rules! suite {
    ($name:ident, $harness:expr $(; $($extra:ident),*)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::suite!(@tests $harness;
                first_claim_acquires_and_duplicates_are_in_flight,
                in_flight_answers_the_remaining_lease_of_the_record,
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
                records_keep_their_fingerprint_encoding,
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
