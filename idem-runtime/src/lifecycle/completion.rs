//! Who writes a completed record, and the bounded retry of a fenced write.

use std::{future::Future, time::Duration};

use async_trait::async_trait;
use tokio::time::Instant;

use crate::{
    observe::{self, Op},
    record::StoredResponse,
    store::{Ownership, Store, StoreError, Ticket},
};

/// Writes a completed record. [`StoreCompletion`] uses the store's own fenced `complete`; a
/// transactional store completes the record in the handler's transaction and commits it.
#[async_trait]
pub(crate) trait Completion: Send {
    /// Completes the ticket's record with `response`, kept for `ttl`; fenced by the ticket's token.
    /// A write that is safe to re-apply retries a store failure for up to `retry_for` (see
    /// [`retry_fenced`]); one that is not (a transaction's commit) ignores it.
    async fn complete(
        self: Box<Self>,
        store: &dyn Store,
        ticket: &Ticket,
        response: &StoredResponse,
        ttl: Duration,
        retry_for: Duration,
    ) -> Result<Ownership, StoreError>;

    /// The response is not stored: undo whatever the completion holds (a transaction rolls back).
    async fn abandon(self: Box<Self>) {}

    /// Whether the handler's own writes stand or fall with this completion (a transaction that
    /// holds them): then a completion that did not happen means the response must not be sent.
    fn holds_the_handlers_writes(&self) -> bool {
        false
    }
}

/// The default [`Completion`]: the store's own `complete`.
pub(crate) struct StoreCompletion;

#[async_trait]
impl Completion for StoreCompletion {
    async fn complete(
        self: Box<Self>,
        store: &dyn Store,
        ticket: &Ticket,
        response: &StoredResponse,
        ttl: Duration,
        retry_for: Duration,
    ) -> Result<Ownership, StoreError> {
        // Each attempt is one store call, timed as such.
        let kind = store.kind();
        retry_fenced("completion", retry_for, || {
            observe::timed(Op::Complete, kind, store.complete(ticket, response, ttl))
        })
        .await
    }
}

/// The longest a fenced write (complete, release) that failed on the store is retried. The bound
/// is the lease, and at most this: past the lease the pending record may have expired (renewal
/// stopped when the handler ended) and a retry of the request may be running the handler, so a
/// later write could only answer `Lost`; and the handler's response waits for its completion, so
/// a store that stays down must not hold it back from its client for longer than this. A
/// routine failure (a reset connection, a failover, a full Redis that frees memory) heals well
/// within it.
pub(crate) const FENCED_RETRY_LIMIT: Duration = Duration::from_secs(10);

/// Runs a fenced write, retrying it with backoff while the store is unavailable or times out, for
/// up to `retry_for` (a last attempt may start just before the bound and take one store timeout).
/// Re-applying a fenced write is safe: the owner token makes a second complete or release of the
/// same record a no-op or the same write, and never a write over a newer owner's record. Other
/// errors (a corrupt record, an unencodable response) are not retried: they would fail again.
pub(crate) async fn retry_fenced<F, Fut>(
    what: &str,
    retry_for: Duration,
    mut write: F,
) -> Result<Ownership, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Ownership, StoreError>>,
{
    let deadline = Instant::now() + retry_for;
    let mut backoff = Duration::from_millis(20);
    let mut failures = 0u32;
    loop {
        match write().await {
            Err(err @ (StoreError::Unavailable(_) | StoreError::Timeout(_))) => {
                failures += 1;
                let now = Instant::now();
                if now + backoff >= deadline {
                    return Err(err);
                }
                tracing::warn!(error = %err, attempt = failures, "the {what} failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            answer => {
                if failures > 0 && answer.is_ok() {
                    tracing::info!(attempts = failures + 1, "the {what} succeeded on a retry");
                }
                return answer;
            }
        }
    }
}
