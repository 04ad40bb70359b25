//! The request lifecycle, apart from actix-web: claim (and wait), run while renewing the lease,
//! settle by policy (store or release). Every step is a plain async function over the [`Store`]
//! trait, so the state machine is tested here without a server or an HTTP framework; the actix-web
//! adapter in [`crate::http`] reads the body, builds the [`Ticket`] and turns the answers into
//! responses.
//!
//! ```text
//!             claim ──► Replay / Mismatch / InFlight  (answered, nothing runs)
//!               │
//!            Acquired
//!               │
//!   Owned::run(work) ── renews the lease every third of it until `work` ends
//!               │
//!   Owned::settle(settlement)
//!        ├── Response + policy says store ──► Completion::complete (the store, by default)
//!        └── otherwise (5xx, 408, 429, panic, unstorable body) ──► Store::release
//! ```
//!
//! The seam for writers other than the store is [`Completion`]: whoever completes the record
//! (the store's own fenced `complete`, or a database transaction that also holds the handler's
//! writes) is passed to [`Owned::settle`].

use std::{future::Future, panic::AssertUnwindSafe, sync::Arc, time::Duration};

use futures_util::{
    future::{select, Either},
    FutureExt as _,
};
use tokio::time::Instant;

mod completion;
mod outcome;

pub use self::outcome::HandlerTiming;
pub(crate) use self::{
    completion::{retry_fenced, Completion, StoreCompletion, FENCED_RETRY_LIMIT},
    outcome::{retry_after_hint, Outcome},
};

use crate::{
    cache::ReplayCache,
    encoding::FingerprintEncoding,
    fingerprint::Fingerprint,
    observe::{self, Op},
    policy::{self, Disposition, ServerErrors},
    protocol::Claim,
    record::StoredResponse,
    store::{Ownership, Store, StoreError, Ticket},
    waiters::{Waiters, POLL_INTERVAL},
};

/// A handler's settings resolved against the app's, and checked together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    /// The handler's name: the `handler` label of its metrics.
    pub(crate) handler: &'static str,
    pub(crate) lease: Duration,
    pub(crate) ttl: Duration,
    /// How long a duplicate of an in-flight request waits for its response (`None`: 409 at once).
    pub(crate) in_flight_wait: Option<Duration>,
    pub(crate) server_errors: ServerErrors,
}

impl Policy {
    /// Resolves the handler's own values (`None`: the app's) and checks that the lease is shorter
    /// than the ttl. The macro checks a handler's own pair at compile time; this catches a pair
    /// whose halves come from two places (a handler's `ttl` under the app's `lease`).
    pub(crate) fn resolve(
        handler: &'static str,
        lease: Option<Duration>,
        ttl: Option<Duration>,
        app_lease: Duration,
        app_ttl: Duration,
        in_flight_wait: Option<Duration>,
        server_errors: ServerErrors,
    ) -> Result<Self, String> {
        let (lease, ttl) = (lease.unwrap_or(app_lease), ttl.unwrap_or(app_ttl));
        if lease >= ttl {
            return Err(format!(
                "the handler's lease ({lease:?}) is not shorter than its ttl ({ttl:?}): set a \
                 shorter `lease` on the handler (or with `Idempotency::lease`), or a longer `ttl`"
            ));
        }
        Ok(Self {
            handler,
            lease,
            ttl,
            in_flight_wait,
            server_errors,
        })
    }
}

/// Claims the ticket's record; with a wait, waits for an in-flight record to complete, or for the
/// wait to run out. The waiters of one record in this process share one poll of the store and
/// wake when it settles here (see [`crate::waiters`]).
#[cfg(test)]
pub(crate) async fn claim(
    store: &dyn Store,
    ticket: &Ticket,
    policy: &Policy,
    waiters: &Waiters,
) -> Result<Claim, StoreError> {
    claim_via(store, ticket, policy, waiters, None).await
}

/// [`claim`], answered from `cache` when it holds a copy of the record (see [`crate::cache`]).
async fn claim_via(
    store: &dyn Store,
    ticket: &Ticket,
    policy: &Policy,
    waiters: &Waiters,
    cache: Option<&ReplayCache>,
) -> Result<Claim, StoreError> {
    let answer = match cache {
        Some(cache) => cache.claim(store, ticket, policy.lease).await?,
        None => observe::timed(Op::Claim, store.kind(), store.claim(ticket, policy.lease)).await?,
    };
    let (Claim::InFlight { .. }, Some(wait)) = (&answer, policy.in_flight_wait) else {
        return Ok(answer);
    };
    let started = std::time::Instant::now();
    let waited = wait_for(store, ticket, policy, waiters, answer, wait).await;
    observe::waited(policy.handler, started.elapsed());
    waited
}

/// How many times one request is fingerprinted again in a record's encoding and claimed again: a
/// record changes encoding only when another instance replaces it, so a second change within one
/// request is already an unusual race; after this many, the request answers as for an unknown
/// encoding (503).
pub(crate) const REENCODE_LIMIT: usize = 2;

/// [`claim`], compared in the record's fingerprint encoding: when the claim finds a record in
/// another encoding than the ticket's ([`Claim::OtherEncoding`], a record of another release or of
/// the handler's previous fingerprint mode, during a rolling upgrade), `fingerprint_in` computes
/// the request's fingerprint in that encoding (the body is still in memory) and the claim is sent
/// again with it: one more store round trip, only then. Answers the claim and the ticket it was
/// made with (the one the request then owns, completes or releases).
///
/// `fingerprint_in` answers `None` for an encoding this release does not know (written by a newer
/// release): the answer stays [`Claim::OtherEncoding`], which the caller turns into a 503. Digests
/// of different encodings never agree, so no request meets a record it is not the same request
/// as in the record's own encoding.
pub(crate) async fn claim_in_record_encoding(
    store: &dyn Store,
    mut ticket: Ticket,
    policy: &Policy,
    waiters: &Waiters,
    cache: Option<&ReplayCache>,
    mut fingerprint_in: impl FnMut(FingerprintEncoding) -> Option<Fingerprint>,
) -> Result<(Claim, Ticket), StoreError> {
    let mut again = 0;
    loop {
        let answer = claim_via(store, &ticket, policy, waiters, cache).await?;
        let Claim::OtherEncoding { encoding } = answer else {
            return Ok((answer, ticket));
        };
        let Some(fingerprint) = fingerprint_in(encoding).filter(|_| again < REENCODE_LIMIT) else {
            return Ok((answer, ticket));
        };
        again += 1;
        tracing::debug!(
            record = %encoding,
            request = %ticket.fingerprint().encoding(),
            "the record's fingerprint is in another encoding: claiming again in the record's"
        );
        ticket = Ticket::new(*ticket.key(), fingerprint);
    }
}

/// Polls an in-flight record (with the other waiters of this process) until it is no longer in
/// flight or `wait` runs out.
async fn wait_for(
    store: &dyn Store,
    ticket: &Ticket,
    policy: &Policy,
    waiters: &Waiters,
    mut answer: Claim,
    wait: Duration,
) -> Result<Claim, StoreError> {
    let kind = store.kind();
    let deadline = Instant::now() + wait;
    let member = waiters.join(*ticket.key(), *ticket.fingerprint());
    let mut backoff = Duration::from_millis(5);
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(answer);
        }
        member.pause((now + backoff).min(deadline)).await;
        backoff = (backoff * 2).min(POLL_INTERVAL);
        answer = member
            .poll(observe::timed(
                Op::Claim,
                kind,
                store.claim(ticket, policy.lease),
            ))
            .await?;
        if !matches!(answer, Claim::InFlight { .. }) {
            return Ok(answer);
        }
    }
}

/// A claim this request holds: the lease is its own until it settles.
pub(crate) struct Owned {
    store: Arc<dyn Store>,
    ticket: Ticket,
    policy: Policy,
}

/// The handler's work panicked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Panicked;

/// How a request that ran ends.
pub(crate) enum Settlement {
    /// The handler answered with this response (the whole body in memory).
    Response(StoredResponse),
    /// The handler answered, but its response cannot be replayed faithfully (larger than the
    /// limit, or its body failed): release the key.
    Unstorable,
    /// The handler panicked: release the key.
    Panicked,
}

impl Owned {
    /// The claim `ticket` acquired under `policy`.
    pub(crate) fn new(store: Arc<dyn Store>, ticket: Ticket, policy: Policy) -> Self {
        Self {
            store,
            ticket,
            policy,
        }
    }

    /// Runs `work` (the handler, and reading its response) to its end while renewing the lease
    /// every third of it, so a slow handler keeps its key. A panic in `work` is caught.
    pub(crate) async fn run<F: Future>(&self, work: F) -> Result<F::Output, Panicked> {
        let work = AssertUnwindSafe(work).catch_unwind();
        let renewal = renew(&*self.store, &self.ticket, &self.policy);
        futures_util::pin_mut!(work, renewal);
        let result = match select(work, renewal).await {
            Either::Left((result, _)) => result,
            // The lease is lost (another request owns the key now); the work still finishes, and
            // its completion is refused by the owner-token check.
            Either::Right(((), work)) => work.await,
        };
        result.map_err(|_| Panicked)
    }

    /// Ends the request: stores its response when the policy says so (through `completion`), and
    /// otherwise releases the key so that a retry runs the handler again.
    pub(crate) async fn settle(
        self,
        settlement: Settlement,
        completion: Box<dyn Completion>,
    ) -> Outcome {
        let response = match settlement {
            Settlement::Response(response) => response,
            Settlement::Unstorable => {
                completion.abandon().await;
                self.release().await;
                return Outcome::ExecutedReleased;
            }
            Settlement::Panicked => {
                completion.abandon().await;
                self.release().await;
                return Outcome::Panicked;
            }
        };
        match policy::disposition(response.status, self.policy.server_errors) {
            Disposition::Store => {
                let binding = completion.holds_the_handlers_writes();
                let written = completion
                    .complete(
                        &*self.store,
                        &self.ticket,
                        &response,
                        self.policy.ttl,
                        self.retry_for(),
                    )
                    .await;
                match written {
                    Ok(Ownership::Held) => {}
                    // The handler's writes were rolled back with the completion: its response
                    // would tell the client about work that did not happen.
                    Ok(Ownership::Lost) if binding => {
                        observe::lease_lost(self.policy.handler, Op::Complete);
                        tracing::warn!(
                            "the lease was lost before completion: the handler's transaction was rolled back; answering 503"
                        );
                        return Outcome::RolledBack;
                    }
                    Err(err) if binding => {
                        tracing::error!(
                            error = %err,
                            "the handler's transaction was not committed (or its commit is unknown): answering 503"
                        );
                        // Fenced on the pending record: a no-op if the commit did happen.
                        self.release().await;
                        return Outcome::RolledBack;
                    }
                    Ok(Ownership::Lost) => {
                        observe::lease_lost(self.policy.handler, Op::Complete);
                        tracing::warn!(
                        "the lease was lost before completion: the response was sent but not stored"
                        );
                    }
                    Err(err) => tracing::error!(
                        error = %err,
                        retried_for = ?self.retry_for(),
                        "the response could not be stored: a retry after the lease runs out runs the handler again"
                    ),
                }
                Outcome::Executed
            }
            Disposition::Release => {
                completion.abandon().await;
                self.release().await;
                Outcome::ExecutedReleased
            }
        }
    }

    /// How long a fenced write is retried: the lease, at most [`FENCED_RETRY_LIMIT`].
    fn retry_for(&self) -> Duration {
        self.policy.lease.min(FENCED_RETRY_LIMIT)
    }

    async fn release(&self) {
        let kind = self.store.kind();
        let released = retry_fenced("release", self.retry_for(), || {
            observe::timed(Op::Release, kind, self.store.release(&self.ticket))
        })
        .await;
        match released {
            Ok(Ownership::Held) => {}
            Ok(Ownership::Lost) => observe::lease_lost(self.policy.handler, Op::Release),
            Err(err) => tracing::warn!(
                error = %err,
                "the key could not be released; it frees itself when its lease runs out"
            ),
        }
    }
}

/// Renews the lease every third of its length; returns only when the lease is lost.
async fn renew(store: &dyn Store, ticket: &Ticket, policy: &Policy) {
    let lease = policy.lease;
    let period = (lease / 3).max(Duration::from_millis(1));
    loop {
        tokio::time::sleep(period).await;
        match observe::timed(Op::Renew, store.kind(), store.renew(ticket, lease)).await {
            Ok(Ownership::Held) => observe::renewed(policy.handler),
            Ok(Ownership::Lost) => {
                observe::lease_lost(policy.handler, Op::Renew);
                tracing::warn!("the in-flight lease was lost while the handler ran");
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "the in-flight lease could not be renewed; retrying");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;

    use actix_web::http::StatusCode;
    use bytes::Bytes;

    use super::*;
    use crate::{fingerprint::Fingerprint, scope::RecordKey, store::memory::MemoryStore};

    fn ticket(body: &[u8]) -> Ticket {
        Ticket::new(
            RecordKey::from_bytes([9; 32]),
            Fingerprint::compute("POST", "/p", "", body),
        )
    }

    fn policy(lease_ms: u64) -> Policy {
        Policy::resolve(
            "test",
            Some(Duration::from_millis(lease_ms)),
            None,
            Idempotency::DEFAULT_LEASE,
            Idempotency::DEFAULT_TTL,
            None,
            ServerErrors::Release,
        )
        .expect("valid")
    }

    use crate::config::Idempotency;

    fn response(status: u16) -> StoredResponse {
        StoredResponse {
            status: StatusCode::from_u16(status).expect("status"),
            headers: vec![],
            body: Bytes::from_static(b"paid"),
        }
    }

    async fn acquire(store: &Arc<dyn Store>, t: &Ticket, p: Policy) -> Owned {
        assert_eq!(
            claim(&**store, t, &p, &Waiters::default())
                .await
                .expect("claims"),
            Claim::Acquired
        );
        Owned::new(Arc::clone(store), t.clone(), p)
    }

    #[tokio::test]
    async fn a_claim_answers_acquired_then_in_flight_then_replay_or_mismatch() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::isolated());
        let p = policy(1000);
        let owned = acquire(&store, &ticket(b"a"), p).await;
        assert!(matches!(
            claim(&*store, &ticket(b"a"), &p, &Waiters::default()).await,
            Ok(Claim::InFlight { .. })
        ));
        assert_eq!(
            claim(&*store, &ticket(b"b"), &p, &Waiters::default())
                .await
                .expect("claims"),
            Claim::Mismatch
        );
        let outcome = owned
            .settle(
                Settlement::Response(response(201)),
                Box::new(StoreCompletion),
            )
            .await;
        assert_eq!(outcome, Outcome::Executed);
        assert_eq!(
            claim(&*store, &ticket(b"a"), &p, &Waiters::default())
                .await
                .expect("claims"),
            Claim::Replay(response(201))
        );
        assert_eq!(
            claim(&*store, &ticket(b"b"), &p, &Waiters::default())
                .await
                .expect("claims"),
            Claim::Mismatch
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_duplicate_replays_once_the_first_completes() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::isolated());
        let p = policy(30_000);
        let owned = acquire(&store, &ticket(b"a"), p).await;
        let waiting = Policy {
            in_flight_wait: Some(Duration::from_secs(5)),
            ..p
        };
        let first = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            owned
                .settle(
                    Settlement::Response(response(201)),
                    Box::new(StoreCompletion),
                )
                .await
        };
        let duplicate = ticket(b"a");
        let waiters = Waiters::default();
        let (outcome, replay) = tokio::join!(first, claim(&*store, &duplicate, &waiting, &waiters));
        assert_eq!(outcome, Outcome::Executed);
        assert_eq!(replay.expect("claims"), Claim::Replay(response(201)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_runs_out_answers_in_flight() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::isolated());
        let p = policy(30_000);
        let _owned = acquire(&store, &ticket(b"a"), p).await;
        let waiting = Policy {
            in_flight_wait: Some(Duration::from_millis(200)),
            ..p
        };
        let started = Instant::now();
        assert!(matches!(
            claim(&*store, &ticket(b"a"), &waiting, &Waiters::default()).await,
            Ok(Claim::InFlight { .. })
        ));
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_handler_keeps_its_lease() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::isolated());
        let p = policy(300);
        let owned = acquire(&store, &ticket(b"a"), p).await;
        let ran = owned
            .run(tokio::time::sleep(Duration::from_millis(1000)))
            .await;
        assert_eq!(ran, Ok(()));
        assert!(matches!(
            claim(&*store, &ticket(b"a"), &p, &Waiters::default()).await,
            Ok(Claim::InFlight { .. })
        ));
    }

    /// A store whose renewals fail, counting them, over a memory store for everything else.
    struct RenewFails {
        inner: MemoryStore,
        renewals: AtomicUsize,
    }

    #[async_trait]
    impl Store for RenewFails {
        async fn claim(&self, t: &Ticket, lease: Duration) -> Result<Claim, StoreError> {
            self.inner.claim(t, lease).await
        }
        async fn renew(&self, _: &Ticket, _: Duration) -> Result<Ownership, StoreError> {
            self.renewals.fetch_add(1, Ordering::Relaxed);
            Err(StoreError::Timeout(Duration::from_millis(1)))
        }
        async fn complete(
            &self,
            t: &Ticket,
            r: &StoredResponse,
            ttl: Duration,
        ) -> Result<Ownership, StoreError> {
            self.inner.complete(t, r, ttl).await
        }
        async fn release(&self, t: &Ticket) -> Result<Ownership, StoreError> {
            self.inner.release(t).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_renewal_is_retried_and_the_handler_still_finishes() {
        let failing = Arc::new(RenewFails {
            inner: MemoryStore::isolated(),
            renewals: AtomicUsize::new(0),
        });
        let store: Arc<dyn Store> = failing.clone();
        let p = policy(300);
        let owned = acquire(&store, &ticket(b"a"), p).await;
        let ran = owned
            .run(async {
                tokio::time::sleep(Duration::from_millis(1000)).await;
                7
            })
            .await;
        assert_eq!(ran, Ok(7));
        assert!(failing.renewals.load(Ordering::Relaxed) >= 3);
        // The lease ran out meanwhile: the completion is refused, the settle still answers.
        let outcome = owned
            .settle(
                Settlement::Response(response(201)),
                Box::new(StoreCompletion),
            )
            .await;
        assert_eq!(outcome, Outcome::Executed);
        assert_eq!(
            claim(&*store, &ticket(b"a"), &p, &Waiters::default())
                .await
                .expect("claims"),
            Claim::Acquired
        );
    }

    /// A store whose fenced writes (complete, release) fail `failures` times, as on a broken
    /// connection, then reach a memory store.
    struct WritesFail {
        inner: MemoryStore,
        failures: usize,
        completes: AtomicUsize,
        releases: AtomicUsize,
    }

    impl WritesFail {
        fn new(failures: usize) -> Arc<Self> {
            Arc::new(Self {
                inner: MemoryStore::isolated(),
                failures,
                completes: AtomicUsize::new(0),
                releases: AtomicUsize::new(0),
            })
        }

        fn broken(&self, calls: &AtomicUsize) -> Result<(), StoreError> {
            if calls.fetch_add(1, Ordering::Relaxed) < self.failures {
                let pipe = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
                return Err(StoreError::Unavailable(Box::new(pipe)));
            }
            Ok(())
        }
    }

    #[async_trait]
    impl Store for WritesFail {
        async fn claim(&self, t: &Ticket, lease: Duration) -> Result<Claim, StoreError> {
            self.inner.claim(t, lease).await
        }
        async fn renew(&self, t: &Ticket, lease: Duration) -> Result<Ownership, StoreError> {
            self.inner.renew(t, lease).await
        }
        async fn complete(
            &self,
            t: &Ticket,
            r: &StoredResponse,
            ttl: Duration,
        ) -> Result<Ownership, StoreError> {
            self.broken(&self.completes)?;
            self.inner.complete(t, r, ttl).await
        }
        async fn release(&self, t: &Ticket) -> Result<Ownership, StoreError> {
            self.broken(&self.releases)?;
            self.inner.release(t).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_completion_is_retried_until_it_is_stored() {
        let failing = WritesFail::new(4);
        let store: Arc<dyn Store> = failing.clone();
        let p = policy(30_000);
        let owned = acquire(&store, &ticket(b"a"), p).await;
        let outcome = owned
            .settle(
                Settlement::Response(response(201)),
                Box::new(StoreCompletion),
            )
            .await;
        assert_eq!(outcome, Outcome::Executed);
        assert_eq!(failing.completes.load(Ordering::Relaxed), 5);
        // The retry replays: the handler would not run a second time.
        assert_eq!(
            claim(&*store, &ticket(b"a"), &p, &Waiters::default())
                .await
                .expect("claims"),
            Claim::Replay(response(201))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_release_is_retried_until_the_key_is_free() {
        let failing = WritesFail::new(3);
        let store: Arc<dyn Store> = failing.clone();
        let p = policy(30_000);
        let owned = acquire(&store, &ticket(b"a"), p).await;
        let outcome = owned
            .settle(
                Settlement::Response(response(503)),
                Box::new(StoreCompletion),
            )
            .await;
        assert_eq!(outcome, Outcome::ExecutedReleased);
        assert_eq!(failing.releases.load(Ordering::Relaxed), 4);
        assert_eq!(
            claim(&*store, &ticket(b"a"), &p, &Waiters::default())
                .await
                .expect("claims"),
            Claim::Acquired
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_that_stays_down_is_given_up_on_within_the_bound() {
        for (lease_ms, bound) in [
            (2_000, Duration::from_secs(2)),
            (60_000, FENCED_RETRY_LIMIT),
        ] {
            let failing = WritesFail::new(usize::MAX);
            let store: Arc<dyn Store> = failing.clone();
            let p = policy(lease_ms);
            let owned = acquire(&store, &ticket(b"a"), p).await;
            let started = Instant::now();
            let outcome = owned
                .settle(
                    Settlement::Response(response(201)),
                    Box::new(StoreCompletion),
                )
                .await;
            assert_eq!(outcome, Outcome::Executed);
            assert!(started.elapsed() <= bound, "{:?}", started.elapsed());
            assert!(started.elapsed() >= bound / 2, "{:?}", started.elapsed());
            assert!(failing.completes.load(Ordering::Relaxed) > 3);
        }
    }

    #[tokio::test]
    async fn the_policy_stores_or_releases() {
        for (status, stored) in [(201, true), (400, true), (402, true), (500, false)] {
            for (status, stored) in [(status, stored), (408, false), (429, false), (503, false)] {
                let store: Arc<dyn Store> = Arc::new(MemoryStore::isolated());
                let p = policy(1000);
                let owned = acquire(&store, &ticket(b"a"), p).await;
                let outcome = owned
                    .settle(
                        Settlement::Response(response(status)),
                        Box::new(StoreCompletion),
                    )
                    .await;
                let again = claim(&*store, &ticket(b"a"), &p, &Waiters::default())
                    .await
                    .expect("claims");
                if stored {
                    assert_eq!(outcome, Outcome::Executed, "{status}");
                    assert_eq!(again, Claim::Replay(response(status)), "{status}");
                } else {
                    assert_eq!(outcome, Outcome::ExecutedReleased, "{status}");
                    assert_eq!(again, Claim::Acquired, "{status}");
                }
            }
        }
        // `store_server_errors`: a 5xx is stored.
        let store: Arc<dyn Store> = Arc::new(MemoryStore::isolated());
        let p = Policy {
            server_errors: ServerErrors::Store,
            ..policy(1000)
        };
        let owned = acquire(&store, &ticket(b"a"), p).await;
        owned
            .settle(
                Settlement::Response(response(503)),
                Box::new(StoreCompletion),
            )
            .await;
        assert_eq!(
            claim(&*store, &ticket(b"a"), &p, &Waiters::default())
                .await
                .expect("claims"),
            Claim::Replay(response(503))
        );
    }

    #[tokio::test]
    async fn a_panic_is_caught_and_releases_the_key() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::isolated());
        let p = policy(1000);
        let owned = acquire(&store, &ticket(b"a"), p).await;
        let ran = owned
            .run(async {
                if p.lease > Duration::ZERO {
                    panic!("the handler panics");
                }
            })
            .await;
        assert_eq!(ran, Err(Panicked));
        assert_eq!(
            owned
                .settle(Settlement::Panicked, Box::new(StoreCompletion))
                .await,
            Outcome::Panicked
        );
        assert_eq!(
            claim(&*store, &ticket(b"a"), &p, &Waiters::default())
                .await
                .expect("claims"),
            Claim::Acquired
        );
    }

    #[tokio::test]
    async fn an_unstorable_response_releases_the_key() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::isolated());
        let p = policy(1000);
        let owned = acquire(&store, &ticket(b"a"), p).await;
        assert_eq!(
            owned
                .settle(Settlement::Unstorable, Box::new(StoreCompletion))
                .await,
            Outcome::ExecutedReleased
        );
        assert_eq!(
            claim(&*store, &ticket(b"a"), &p, &Waiters::default())
                .await
                .expect("claims"),
            Claim::Acquired
        );
    }

    /// A completion that holds the handler's writes (a transaction) and fails as told.
    struct Binding(Result<Ownership, ()>);

    #[async_trait]
    impl Completion for Binding {
        async fn complete(
            self: Box<Self>,
            _: &dyn Store,
            _: &Ticket,
            _: &StoredResponse,
            _: Duration,
            _: Duration,
        ) -> Result<Ownership, StoreError> {
            self.0
                .map_err(|()| StoreError::Timeout(Duration::from_millis(1)))
        }

        fn holds_the_handlers_writes(&self) -> bool {
            true
        }
    }

    /// A transaction that was not committed (lease lost, failed or ambiguous commit) must not
    /// send the handler's answer; a failed commit also releases the key (fenced on the pending
    /// record, so a commit that did happen keeps its completed record).
    #[tokio::test]
    async fn a_completion_holding_the_writes_that_fails_is_rolled_back() {
        for (result, released) in [(Ok(Ownership::Lost), false), (Err(()), true)] {
            let store: Arc<dyn Store> = Arc::new(MemoryStore::isolated());
            let p = policy(1000);
            let owned = acquire(&store, &ticket(b"a"), p).await;
            let outcome = owned
                .settle(
                    Settlement::Response(response(201)),
                    Box::new(Binding(result)),
                )
                .await;
            assert_eq!(outcome, Outcome::RolledBack);
            let again = claim(&*store, &ticket(b"a"), &p, &Waiters::default())
                .await
                .expect("claims");
            assert_eq!(matches!(again, Claim::Acquired), released, "{again:?}");
        }
    }

    #[test]
    fn a_lease_from_the_app_not_shorter_than_the_handlers_ttl_is_refused() {
        let refused = Policy::resolve(
            "test",
            None,
            Some(Duration::from_secs(10)),
            Duration::from_secs(30),
            Idempotency::DEFAULT_TTL,
            None,
            ServerErrors::Release,
        );
        assert!(refused.is_err_and(|e| e.contains("not shorter than its ttl")));
    }

    /// A memory store that counts claims.
    struct Counting {
        inner: MemoryStore,
        claims: AtomicUsize,
    }

    #[async_trait]
    impl Store for Counting {
        async fn claim(&self, t: &Ticket, lease: Duration) -> Result<Claim, StoreError> {
            self.claims.fetch_add(1, Ordering::Relaxed);
            self.inner.claim(t, lease).await
        }
        async fn renew(&self, t: &Ticket, lease: Duration) -> Result<Ownership, StoreError> {
            self.inner.renew(t, lease).await
        }
        async fn complete(
            &self,
            t: &Ticket,
            r: &StoredResponse,
            ttl: Duration,
        ) -> Result<Ownership, StoreError> {
            self.inner.complete(t, r, ttl).await
        }
        async fn release(&self, t: &Ticket) -> Result<Ownership, StoreError> {
            self.inner.release(t).await
        }
    }

    /// 200 waiters on one record whose owner runs elsewhere (another process: it completes in
    /// the store, and this process is not told) make the store see their 200 arriving claims and
    /// then one poll per `POLL_INTERVAL`, not one each (it was ~9,100 claims in 5 s).
    #[tokio::test(start_paused = true)]
    async fn waiters_of_one_record_share_one_poll() {
        let counting = Arc::new(Counting {
            inner: MemoryStore::isolated(),
            claims: AtomicUsize::new(0),
        });
        let store: Arc<dyn Store> = counting.clone();
        let p = policy(30_000);
        let owner = ticket(b"a");
        assert_eq!(
            store.claim(&owner, p.lease).await.expect("claims"),
            Claim::Acquired
        );
        let waiting = Policy {
            in_flight_wait: Some(Duration::from_secs(10)),
            ..p
        };
        let waiters = Waiters::default();
        let duplicates: Vec<Ticket> = (0..200).map(|_| ticket(b"a")).collect();
        let all = futures_util::future::join_all(
            duplicates
                .iter()
                .map(|t| claim(&*store, t, &waiting, &waiters)),
        );
        let elsewhere = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            store
                .complete(&owner, &response(201), Idempotency::DEFAULT_TTL)
                .await
        };
        let (answers, completed) = tokio::join!(all, elsewhere);
        assert_eq!(completed.expect("completes"), Ownership::Held);
        for answer in answers {
            assert_eq!(answer.expect("claims"), Claim::Replay(response(201)));
        }
        let claims = counting.claims.load(Ordering::Relaxed) - 1;
        let polls = (2000 / POLL_INTERVAL.as_millis()) as usize + 2;
        assert!(claims <= 200 + polls, "{claims} claims");
        assert_eq!(waiters.len(), 0, "the group is gone with its last waiter");
    }

    /// A record written in the raw encoding meets a handler that fingerprints in another one
    /// (here a stand-in, id 200, over the same fields): the retry is compared in the record's
    /// encoding, for one more claim, and a different request still never meets the record.
    #[tokio::test]
    async fn a_record_in_another_encoding_is_compared_in_its_own() {
        let newer = FingerprintEncoding::from_id(200);
        let in_newer = |body: &[u8]| {
            let raw = Fingerprint::compute("POST", "/p", "", body);
            let mut digest = *raw.as_bytes();
            digest[0] ^= 0xff;
            Ticket::new(
                RecordKey::from_bytes([9; 32]),
                Fingerprint::new(newer, digest),
            )
        };
        let raw_of = |body: &'static [u8]| {
            move |encoding: FingerprintEncoding| {
                (encoding == FingerprintEncoding::RAW_V2)
                    .then(|| Fingerprint::compute("POST", "/p", "", body))
            }
        };
        let counting = Arc::new(Counting {
            inner: MemoryStore::isolated(),
            claims: AtomicUsize::new(0),
        });
        let store: Arc<dyn Store> = counting.clone();
        let p = policy(30_000);
        let w = Waiters::default();
        // The previous release's request, still running: the same request waits (409).
        let first = acquire(&store, &ticket(b"a"), p).await;
        let (answer, _) =
            claim_in_record_encoding(&*store, in_newer(b"a"), &p, &w, None, raw_of(b"a"))
                .await
                .expect("claims");
        assert!(matches!(answer, Claim::InFlight { .. }), "{answer:?}");
        // Completed: the same request replays, in two claims; a different one is 422.
        first
            .settle(
                Settlement::Response(response(201)),
                Box::new(StoreCompletion),
            )
            .await;
        let before = counting.claims.load(Ordering::Relaxed);
        let (answer, used) =
            claim_in_record_encoding(&*store, in_newer(b"a"), &p, &w, None, raw_of(b"a"))
                .await
                .expect("claims");
        assert_eq!(answer, Claim::Replay(response(201)));
        assert_eq!(used.fingerprint().encoding(), FingerprintEncoding::RAW_V2);
        assert_eq!(counting.claims.load(Ordering::Relaxed) - before, 2);
        let (answer, _) =
            claim_in_record_encoding(&*store, in_newer(b"b"), &p, &w, None, raw_of(b"b"))
                .await
                .expect("claims");
        assert_eq!(answer, Claim::Mismatch);
        // A ticket in the record's own encoding costs one claim, as before.
        let before = counting.claims.load(Ordering::Relaxed);
        let (answer, _) =
            claim_in_record_encoding(&*store, ticket(b"a"), &p, &w, None, raw_of(b"a"))
                .await
                .expect("claims");
        assert_eq!(answer, Claim::Replay(response(201)));
        assert_eq!(counting.claims.load(Ordering::Relaxed) - before, 1);
        // An encoding this release cannot compute stays unanswered: the caller's 503.
        let (answer, _) = claim_in_record_encoding(&*store, in_newer(b"a"), &p, &w, None, |_| None)
            .await
            .expect("claims");
        assert_eq!(
            answer,
            Claim::OtherEncoding {
                encoding: FingerprintEncoding::RAW_V2
            }
        );
        // A record that keeps answering another encoding is given up on after the limit.
        let calls = AtomicUsize::new(0);
        let (answer, _) = claim_in_record_encoding(&*store, in_newer(b"a"), &p, &w, None, |_| {
            calls.fetch_add(1, Ordering::Relaxed);
            Some(in_newer(b"a").fingerprint().to_owned())
        })
        .await
        .expect("claims");
        assert!(matches!(answer, Claim::OtherEncoding { .. }), "{answer:?}");
        assert_eq!(calls.load(Ordering::Relaxed), REENCODE_LIMIT + 1);
    }

    /// An owner in this process wakes its waiters when it settles: they replay at once.
    #[tokio::test(start_paused = true)]
    async fn waiters_wake_when_the_record_settles_here() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::isolated());
        let p = policy(30_000);
        let owner = ticket(b"a");
        let owned = acquire(&store, &owner, p).await;
        let waiting = Policy {
            in_flight_wait: Some(Duration::from_secs(10)),
            ..p
        };
        let waiters = Waiters::default();
        let duplicates: Vec<Ticket> = (0..20).map(|_| ticket(b"a")).collect();
        // Let the waiters back off to the longest pause first.
        let settle = async {
            tokio::time::sleep(Duration::from_millis(2010)).await;
            let outcome = owned
                .settle(
                    Settlement::Response(response(201)),
                    Box::new(StoreCompletion),
                )
                .await;
            waiters.settled(*owner.key(), *owner.fingerprint());
            (outcome, Instant::now())
        };
        let all = futures_util::future::join_all(
            duplicates
                .iter()
                .map(|t| async { (claim(&*store, t, &waiting, &waiters).await, Instant::now()) }),
        );
        let ((outcome, settled_at), answers) = tokio::join!(settle, all);
        assert_eq!(outcome, Outcome::Executed);
        for (answer, at) in answers {
            assert_eq!(answer.expect("claims"), Claim::Replay(response(201)));
            assert!(
                at - settled_at < Duration::from_millis(5),
                "{:?}",
                at - settled_at
            );
        }
    }

    #[test]
    fn the_409_hint_is_the_typical_run_bounded_by_the_lease() {
        let s = Duration::from_secs;
        assert_eq!(retry_after_hint(s(28), None), s(1));
        assert_eq!(
            retry_after_hint(s(28), Some(Duration::from_millis(300))),
            s(1)
        );
        assert_eq!(retry_after_hint(s(28), Some(s(4))), s(4));
        assert_eq!(retry_after_hint(s(3), Some(s(20))), s(3));
        assert_eq!(retry_after_hint(Duration::ZERO, Some(s(20))), s(1));
        let timing = HandlerTiming::new();
        assert_eq!(timing.typical(), None);
        timing.record(s(2));
        assert_eq!(timing.typical(), Some(s(2)));
        timing.record(s(7));
        assert_eq!(timing.typical(), Some(s(3)));
    }
}
