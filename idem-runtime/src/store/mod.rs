//! The [`Store`] trait, what its calls take and answer, and its backends: [`memory`] and
//! [`redis`] (single server and cluster), siblings of each other.
//!
//! Every backend gives the same answers for the same calls; one behavioural suite
//! (`idem-runtime/tests/suite`, driven by `tests/stores.rs` and `tests/cluster.rs`) runs against
//! each.

use std::{fmt, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;

use crate::{
    fingerprint::Fingerprint,
    protocol::Claim,
    record::{pending_bytes, DecodeError, EncodeError, OwnerToken, PendingBytes, StoredResponse},
    scope::RecordKey,
};

pub(crate) mod memory;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
pub(crate) mod redis;

/// One request's claim on a record: the record's address, the request's fingerprint and the owner
/// token that fences every later write.
#[derive(Clone, PartialEq, Eq)]
pub struct Ticket {
    key: RecordKey,
    fingerprint: Fingerprint,
    token: OwnerToken,
    pending: PendingBytes,
}

impl Ticket {
    /// A ticket with a fresh random owner token.
    pub(crate) fn new(key: RecordKey, fingerprint: Fingerprint) -> Self {
        Self::with_token(key, fingerprint, OwnerToken::random())
    }

    /// A ticket with a given owner token (tests use it to play a stale owner).
    pub(crate) fn with_token(key: RecordKey, fingerprint: Fingerprint, token: OwnerToken) -> Self {
        let pending = pending_bytes(&fingerprint, &token);
        Self {
            key,
            fingerprint,
            token,
            pending,
        }
    }

    /// The record's address.
    pub fn key(&self) -> &RecordKey {
        &self.key
    }

    /// The request's fingerprint.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// The owner token.
    pub fn token(&self) -> &OwnerToken {
        &self.token
    }

    /// The encoded pending record this ticket writes; the store compares against it to fence
    /// renew, complete and release.
    pub fn pending_record(&self) -> &[u8] {
        self.pending.as_slice()
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("key", &self.key)
            .field("fingerprint", &self.fingerprint)
            .field("token", &self.token)
            .finish()
    }
}

/// Whether a fenced write found this ticket still owning the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Ownership {
    /// The ticket held the lease; the write happened.
    Held,
    /// Another request owns the record, or it expired: nothing was changed.
    Lost,
}

/// A store failure. The request that met it does not run its handler (unless it fails open).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be reached or refused the command.
    #[error("the idempotency store is unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store did not answer within the configured timeout.
    #[error("the idempotency store did not answer within {0:?}")]
    Timeout(Duration),
    /// The store holds a record that this release cannot read: a record format, a record kind
    /// or a critical section of a newer release. The request answers 503 (its handler does not
    /// run, even with `fail_open`) until an instance of the newer release serves it.
    #[error("the stored record was written by a newer release of idem: {0}")]
    Unreadable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store holds a value under the record's key that is not a valid record.
    #[error("the stored record is corrupt: {0}")]
    Corrupt(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The response cannot be encoded for storage.
    #[error("the response cannot be stored: {0}")]
    Encode(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store holds as many records as its capacity allows ([`MemoryStore::with_capacity`],
    /// in bytes), even after dropping the expired ones: a new claim is refused (503 with
    /// `Retry-After`) rather than evicting a live record early, which would break its replays.
    ///
    /// [`MemoryStore::with_capacity`]: crate::MemoryStore::with_capacity
    #[error(
        "the idempotency store is full (capacity {capacity} bytes): no new request can be \
         claimed until records expire"
    )]
    Full {
        /// The capacity, in bytes.
        capacity: usize,
    },
    /// The store answered something the protocol does not allow.
    #[error("the idempotency store answered unexpectedly: {0}")]
    Protocol(String),
    /// The store does not keep a journal of steps: a [`Store`] that does not implement
    /// [`Store::load_steps`] and [`Store::record_step`] refuses every `Steps::run`.
    #[error(
        "the idempotency store `{store}` does not journal steps: implement `Store::load_steps` \
         and `Store::record_step`, or use a built-in store"
    )]
    StepsUnsupported {
        /// The store's [`Store::kind`].
        store: &'static str,
    },
}

impl From<DecodeError> for StoreError {
    fn from(err: DecodeError) -> Self {
        if err.is_newer() {
            Self::Unreadable(Box::new(err))
        } else {
            Self::Corrupt(Box::new(err))
        }
    }
}

impl From<EncodeError> for StoreError {
    fn from(err: EncodeError) -> Self {
        Self::Encode(Box::new(err))
    }
}

/// A place to keep idempotency records.
///
/// `claim` and `complete` are each one atomic operation (one round trip for a network store).
/// `renew`, `complete` and `release` change the record only while the ticket still owns it.
///
/// `Any` lets the runtime recognise a store it has more to say to (the transactional mode of the
/// Postgres store finds its `PostgresStore` behind `Arc<dyn Store>`); every `'static` type is
/// `Any`, so a custom store implements nothing for it.
#[async_trait]
pub trait Store: std::any::Any + Send + Sync + 'static {
    /// Claims the record for `ticket`: creates a pending record with a `lease` when none exists, and
    /// otherwise classifies the existing one: a record whose fingerprint is in another encoding
    /// than the ticket's ([`Fingerprint::encoding`](crate::Fingerprint::encoding)) is a
    /// [`Claim::OtherEncoding`] with the record's encoding; otherwise a completed record with the
    /// ticket's fingerprint is a [`Claim::Replay`], a pending one a [`Claim::InFlight`], any
    /// record with another fingerprint a [`Claim::Mismatch`] (it wins over in-flight). A pending record that holds the ticket's own
    /// token is [`Claim::Acquired`]: an earlier attempt of this same claim whose answer was lost.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails or holds a corrupt value.
    async fn claim(&self, ticket: &Ticket, lease: Duration) -> Result<Claim, StoreError>;

    /// Extends the lease of a pending record this ticket owns.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn renew(&self, ticket: &Ticket, lease: Duration) -> Result<Ownership, StoreError>;

    /// Replaces the pending record this ticket owns with the completed response, kept for `ttl`.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails or the response cannot be encoded.
    async fn complete(
        &self,
        ticket: &Ticket,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<Ownership, StoreError>;

    /// Deletes the pending record this ticket owns, so a retry runs the handler again.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn release(&self, ticket: &Ticket) -> Result<Ownership, StoreError>;

    /// The journal of steps of the ticket's request (see `Steps`): every step recorded under the
    /// ticket's record address **with the ticket's fingerprint**, as `(name, entry)` in any
    /// order, the entries exactly as [`record_step`](Self::record_step) was given them. A journal
    /// written under another fingerprint is not this request's: answer it as empty. One read,
    /// not fenced (a claimed request reads its own journal before its first step).
    ///
    /// The default refuses with [`StoreError::StepsUnsupported`].
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails, or does not journal steps.
    async fn load_steps(&self, ticket: &Ticket) -> Result<Vec<(String, Bytes)>, StoreError> {
        let _ = ticket;
        Err(StoreError::StepsUnsupported { store: self.kind() })
    }

    /// Records one step's `entry` (opaque bytes, versioned by idem) under `name` in the journal
    /// of the ticket's record address, **fenced**: only while the record is the live pending
    /// record of this ticket (same owner token), as one atomic operation; otherwise it changes
    /// nothing and answers [`Ownership::Lost`]. A journal held under another fingerprint is
    /// replaced by one holding only this step. The journal then expires `ttl` from now, and is
    /// kept when the record is released (so the retry resumes). Writing the same entry again
    /// (a call re-sent after a broken connection) answers [`Ownership::Held`].
    ///
    /// The default refuses with [`StoreError::StepsUnsupported`].
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails, or does not journal steps.
    async fn record_step(
        &self,
        ticket: &Ticket,
        name: &str,
        entry: &[u8],
        ttl: Duration,
    ) -> Result<Ownership, StoreError> {
        let _ = (ticket, name, entry, ttl);
        Err(StoreError::StepsUnsupported { store: self.kind() })
    }

    /// A short, fixed name for the store, the `store` label of idem's metrics (`memory`, `redis`,
    /// `redis_cluster`, `postgres` for the built-in stores).
    fn kind(&self) -> &'static str {
        "custom"
    }
}

/// What a copy of a Postgres record is kept less than the life the server answered: the time the
/// answer took to come back, with room to spare.
#[cfg(feature = "postgres")]
const POSTGRES_MARGIN: Duration = Duration::from_secs(1);

/// [`Store::claim`] (timed in the metrics), and how long a completed record the claim replays
/// still lives, where the store can tell: the built-in network stores can, a custom store
/// answers `None`. For the replay cache.
pub(crate) async fn claim_with_life(
    store: &dyn Store,
    ticket: &Ticket,
    lease: Duration,
) -> Result<(Claim, Option<Duration>), StoreError> {
    use crate::observe::{self, Op};
    let kind = store.kind();
    let any: &dyn std::any::Any = store;
    if let Some(redis) = any.downcast_ref::<redis::RedisStore>() {
        return observe::timed(Op::Claim, kind, redis.claim_expiring(ticket, lease)).await;
    }
    if let Some(cluster) = any.downcast_ref::<redis::RedisClusterStore>() {
        return observe::timed(Op::Claim, kind, cluster.claim_expiring(ticket, lease)).await;
    }
    #[cfg(feature = "postgres")]
    if let Some(postgres) = any.downcast_ref::<postgres::PostgresStore>() {
        let (claim, life) =
            observe::timed(Op::Claim, kind, postgres.claim_expiring(ticket, lease)).await?;
        // Counted by the server when it ran the claim: less a margin for the answer's way back.
        return Ok((claim, life.map(|d| d.saturating_sub(POSTGRES_MARGIN))));
    }
    let claim = observe::timed(Op::Claim, kind, store.claim(ticket, lease)).await?;
    Ok((claim, None))
}
