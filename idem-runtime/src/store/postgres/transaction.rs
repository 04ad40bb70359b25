//! The transactional mode: a handler writes through [`PgTransaction`], and the runtime completes
//! the record in that same transaction and commits it before the response is sent, so the record
//! is completed if and only if the handler's writes are committed.
//!
//! The pieces: the extractor and its guard (public); [`RequestTransaction`], which the actix-web
//! adapter installs in the request's extensions when the app's store is a [`PostgresStore`] and
//! consults after the handler; and [`TransactionCompletion`], the [`Completion`] that writes the
//! fenced `complete` on the transaction's connection and commits (or rolls back).

use std::{
    any::Any,
    ops::{Deref, DerefMut},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use actix_web::{
    dev::Payload, error::InternalError, FromRequest, HttpMessage as _, HttpRequest, HttpResponse,
};
use async_trait::async_trait;
use futures_util::future::LocalBoxFuture;
use sqlx::{PgConnection, Postgres, Transaction};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard, OwnedSemaphorePermit};

use super::{
    is_broken_connection, map_err,
    sql::{begin_sql, sql_millis},
    PostgresStore,
};
use crate::{
    config::{Idempotency, Settings},
    lifecycle::{Completion, StoreCompletion},
    observe::{self, Op},
    problem::Problem,
    record::{encode_completed, StoredResponse},
    store::{Ownership, Store, StoreError, Ticket},
};

/// The database transaction of an `#[idempotent]` handler on a [`PostgresStore`] (feature
/// `postgres`): the transactional mode.
///
/// Take it as an extractor and write through it; the runtime writes the completed record in the
/// same transaction after the handler answers, and commits before the response is sent. So the
/// record is completed if and only if the handler's writes are committed: a process that dies
/// before the commit leaves neither (the retry runs the handler once, after the lease), one that
/// dies after it leaves both (the retry replays).
///
/// ```no_run
/// use actix_web::{post, HttpResponse};
/// use idem_runtime::{sqlx, PgTransaction};
///
/// #[post("/payments")]
/// // #[idempotent(require_key)] (from the `idem` facade)
/// async fn create_payment(mut tx: PgTransaction) -> actix_web::Result<HttpResponse> {
///     let mut conn = tx.acquire().await?; // the request's transaction, begun before the handler
///     sqlx::query("INSERT INTO payments (id, amount) VALUES ($1, $2)")
///         .bind("pay_1")
///         .bind(1000_i64)
///         .execute(&mut *conn)
///         .await
///         .map_err(actix_web::error::ErrorInternalServerError)?;
///     Ok(HttpResponse::Created().finish())
///     // The runtime completes the record in this transaction and commits, then answers.
/// }
/// ```
///
/// What the runtime does with the transaction, after the handler answered:
///
/// - a response the policy stores (2xx, 3xx, 4xx but 408 and 429): the fenced completion of the
///   record runs on the transaction's connection, then `COMMIT`. If the request lost its lease
///   meanwhile (another request owns the key now), the completion changes no row, the whole
///   transaction rolls back and the client gets `503` with `Retry-After` instead of the handler's
///   answer (its writes were undone). A failed or ambiguous commit is a `503` too: the retry
///   finds either the committed record (a replay) or none (the handler runs again);
/// - a response the policy does not store (5xx, 408, 429), a panic, a response larger than
///   `max_response`: the transaction rolls back and the key is released. A response too large
///   to store is replaced by a `500`, since its writes were undone;
/// - without an `Idempotency-Key` (a handler without `require_key`), or when the store failed and
///   the handler runs anyway (`fail_open`), there is no record: the transaction commits after a
///   response under 500, and rolls back otherwise.
///
/// The transaction begins before the handler's body runs, when the extractor is resolved: a
/// pool that has no connection to spare (or a database that does not answer `BEGIN` within the
/// store timeout) answers `503` with `Retry-After` and the key is released before any of the
/// handler's code ran. A handler that does not take a `PgTransaction` never opens one (its record
/// is completed by the store as usual). `BEGIN`, the completion and `COMMIT` each run within the
/// store's timeout.
///
/// The handler's own statements are the handler's business: the transaction runs at the
/// database's default isolation level, and `SET TRANSACTION ISOLATION LEVEL` as the handler's
/// first statement chooses another. Every level completes: the lease is renewed in a table of
/// its own (on another connection), never in the record's row that the completion updates, so
/// `REPEATABLE READ` and `SERIALIZABLE` do not meet a concurrent update of it. A serialization
/// failure among the handler's own statements is the handler's to answer (retry it in the
/// handler, or answer a 5xx: the transaction rolls back and the key is released). Over a pool
/// from [`PostgresStore::from_url`] the transaction also gets the database's `statement_timeout`
/// and `lock_timeout` back (the store's sessions bound the store's own statements more tightly).
///
/// Once the handler answered, the server ends the transaction if its `COMMIT` does not arrive
/// within the store timeout (a network partition that swallowed it), so the record's row lock
/// is released and the key can be retried. A client that vanishes while the handler runs is
/// noticed by the server through TCP keepalives (set on [`PostgresStore::from_url`]'s sessions:
/// within half a minute), or by the database's own `idle_in_transaction_session_timeout` if you
/// set one.
///
/// While the handler runs, its transaction holds one of the pool's connections; the lease is
/// renewed on another. A quarter of the pool (at least one connection) is kept for the store's
/// own calls (claims, renewals), so handlers' transactions never starve them: size the pool for
/// the transactional requests you run at once, plus that quarter (see
/// [`PostgresStore::from_url_with_pool_size`]).
///
/// Do not end the transaction yourself (`COMMIT`, `ROLLBACK` through the connection): the runtime
/// commits it with the record, or not at all.
///
/// It is only available in `#[idempotent]` handlers of an app whose store is a [`PostgresStore`]
/// (registered with `Idempotency::new`). Check that at start with
/// [`Idempotency::check_transactional`], so that an app configured with another store (a
/// `REDIS_URL` left set, a test's `MemoryStore`) does not start. A request that meets the
/// extractor anyway gets a generic `500` `misconfigured` problem, which names nothing of the
/// app's configuration; the fix is logged (once per process) at the `error` level.
pub struct PgTransaction {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PgTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTransaction")
            .field("begun", &self.shared.begun.load(Ordering::Relaxed))
            .finish()
    }
}

/// The connection of a [`PgTransaction`], borrowed: `&mut *guard` is a `&mut PgConnection`, an
/// sqlx executor, inside the request's transaction.
pub struct PgTransactionGuard<'a> {
    txn: MappedMutexGuard<'a, Transaction<'static, Postgres>>,
}

impl std::fmt::Debug for PgTransactionGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTransactionGuard").finish_non_exhaustive()
    }
}

impl Deref for PgTransactionGuard<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.txn
    }
}

impl DerefMut for PgTransactionGuard<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.txn
    }
}

impl PgTransaction {
    /// The transaction's connection (the transaction began when the extractor was resolved,
    /// before the handler ran).
    ///
    /// # Errors
    ///
    /// `500` when the transaction is already ended (a `PgTransaction` kept past its handler) or
    /// borrowed by another guard (hold one at a time).
    pub async fn acquire(&mut self) -> Result<PgTransactionGuard<'_>, actix_web::Error> {
        let shared = &*self.shared;
        let mut slot = shared.slot.try_lock().map_err(|_| {
            internal(
                "the request's PgTransaction is already borrowed: drop the other guard before \
                 acquiring it again",
            )
        })?;
        shared.begin(&mut slot).await?;
        MutexGuard::try_map(slot, |slot| match slot {
            Slot::Open(open) => Some(&mut open.txn),
            Slot::Idle | Slot::Ended => None,
        })
        .map(|txn| PgTransactionGuard { txn })
        .map_err(|_| {
            internal(
                "the request's PgTransaction was used after its handler answered: it is ended; \
                 do not keep it past the handler",
            )
        })
    }
}

fn internal(message: &'static str) -> actix_web::Error {
    tracing::error!("{message}");
    InternalError::from_response(message, HttpResponse::InternalServerError().finish()).into()
}

impl FromRequest for PgTransaction {
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    /// Begins the transaction, before the handler's body runs.
    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let found = req.extensions().get::<Arc<Shared>>().cloned();
        match found {
            Some(shared) => Box::pin(async move {
                {
                    let mut slot = shared
                        .slot
                        .try_lock()
                        .map_err(|_| internal("the request's PgTransaction is already borrowed"))?;
                    shared.begin(&mut slot).await?;
                }
                Ok(Self { shared })
            }),
            None => {
                let err = unavailable_here(req);
                Box::pin(async move { Err(err) })
            }
        }
    }
}

/// The fix when the app registered no idempotency store.
const NO_STORE: &str = "idem::PgTransaction needs an idempotency store: register one with \
     `App::new().app_data(idem::Idempotency::new(idem::PostgresStore::from_url(url)?))`";

/// The fix when the app's store is not a [`PostgresStore`].
const NOT_POSTGRES: &str = "idem::PgTransaction needs the app's idempotency store to be a \
     PostgresStore (the record is completed in the handler's transaction): register \
     `idem::Idempotency::new(idem::PostgresStore::from_url(url)?)`, or write through your own \
     pool without the transactional mode";

/// Why a request has no transaction: the fix, logged once per process, and a generic 500
/// problem for the caller (the fix is about the app's configuration, not the request).
fn unavailable_here(req: &HttpRequest) -> actix_web::Error {
    static LOGGED: [AtomicBool; 3] = [
        AtomicBool::new(false),
        AtomicBool::new(false),
        AtomicBool::new(false),
    ];
    let (which, fix) = match Idempotency::registered(req) {
        None => (0, NO_STORE),
        Some(idem) if postgres_of(&idem.inner.store).is_none() => (1, NOT_POSTGRES),
        Some(_) => (
            2,
            "idem::PgTransaction is only available in #[idempotent] handlers (the runtime commits \
             it with the record): add #[idempotent] to the handler, or use the pool directly",
        ),
    };
    if !LOGGED[which].swap(true, Ordering::Relaxed) {
        tracing::error!("{fix}");
    }
    InternalError::from_response(fix, Problem::Misconfigured.to_response()).into()
}

/// Why [`Idempotency::check_transactional`] refused a configuration: its store is not a
/// [`PostgresStore`]. The message names the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", NOT_POSTGRES)]
pub struct NotTransactional(());

impl Idempotency {
    /// Checks that handlers taking a [`PgTransaction`] can run under this configuration (its
    /// store is a [`PostgresStore`], registered with [`Idempotency::new`]): call it at start in
    /// an app that uses the transactional mode, so that a configuration with another store
    /// stops the app there instead of failing those requests with `500`.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use idem_runtime::{Idempotency, PostgresStore};
    ///
    /// let store = PostgresStore::from_url("postgres://app:secret@127.0.0.1:5432/app")?;
    /// store.migrate().await?;
    /// let idempotency = Idempotency::new(store);
    /// idempotency.check_transactional()?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`NotTransactional`] when the store is another one (a [`MemoryStore`], a `RedisStore`,
    /// or a store that wraps a `PostgresStore`: the transaction needs the store itself).
    ///
    /// [`MemoryStore`]: crate::MemoryStore
    pub fn check_transactional(&self) -> Result<(), NotTransactional> {
        match postgres_of(&self.inner.store) {
            Some(_) => Ok(()),
            None => Err(NotTransactional(())),
        }
    }
}

/// The app's store, when it is a [`PostgresStore`].
fn postgres_of(store: &Arc<dyn Store>) -> Option<&PostgresStore> {
    let any: &dyn Any = &**store;
    any.downcast_ref::<PostgresStore>()
}

/// What the extractor and the runtime share for one request.
struct Shared {
    store: PostgresStore,
    retry_after: Duration,
    /// Set once `BEGIN` succeeded: the request uses the transaction.
    begun: AtomicBool,
    slot: Mutex<Slot>,
}

enum Slot {
    /// Not begun (no `PgTransaction` extracted yet).
    Idle,
    Open(OpenTransaction),
    /// Taken by the runtime, committed or rolled back.
    Ended,
}

/// A handler's open transaction and its share of the pool.
pub(super) struct OpenTransaction {
    txn: Transaction<'static, Postgres>,
    /// One of the connections handlers' transactions may hold (returned when this is dropped).
    _permit: OwnedSemaphorePermit,
}

impl PostgresStore {
    /// Begins a handler's transaction within the store timeout (waiting for a connection
    /// included).
    ///
    /// `BEGIN` runs in a task of its own, never cut off: sqlx 0.8 counts a transaction as open
    /// only once `BEGIN` has answered, so a `BEGIN` abandoned at the timeout would give its
    /// connection back to the pool inside a transaction nobody knows of, and every later call on
    /// that connection would run inside it. Left to finish, a late `BEGIN` yields a transaction
    /// that is dropped (rolled back) as soon as it arrives.
    async fn begin_transaction(&self) -> Result<OpenTransaction, StoreError> {
        self.start_sweeper();
        let timeout = self.inner.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let session = self.inner.session.as_ref();
        let sql = begin_sql(
            session.and_then(|s| s.default_isolation()),
            session.is_some(),
        );
        let store = self.clone();
        let begin = tokio::spawn(async move {
            let slots = Arc::clone(&store.inner.transactions);
            let permit = tokio::time::timeout_at(deadline, slots.acquire_owned())
                .await
                .map_err(|_| StoreError::Timeout(timeout))?
                .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
            let pool = &store.inner.pool;
            let mut broken = 0u32;
            loop {
                // When the connection was dead (a restarted server), again on another one.
                match pool.begin_with(sql.clone()).await {
                    Err(e) if is_broken_connection(&e) && broken <= pool.size() => broken += 1,
                    began => {
                        return began
                            .map(|txn| OpenTransaction {
                                txn,
                                _permit: permit,
                            })
                            .map_err(|e| map_err(e, timeout))
                    }
                }
            }
        });
        match tokio::time::timeout_at(deadline, begin).await {
            Ok(Ok(began)) => began,
            Ok(Err(panicked)) => Err(StoreError::Unavailable(Box::new(panicked))),
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
    }
}

impl Shared {
    /// Begins the transaction if it is not yet: answers `503` when it cannot.
    async fn begin(&self, slot: &mut Slot) -> Result<(), actix_web::Error> {
        if !matches!(slot, Slot::Idle) {
            return Ok(());
        }
        let began =
            observe::timed(Op::Begin, self.store.kind(), self.store.begin_transaction()).await;
        match began {
            Ok(open) => {
                *slot = Slot::Open(open);
                self.begun.store(true, Ordering::Release);
                Ok(())
            }
            Err(err) => {
                tracing::error!(error = %err, "the handler's transaction could not begin: answering 503, the handler does not run");
                Err(InternalError::from_response(
                    err,
                    Problem::StoreUnavailable {
                        retry_after: self.retry_after,
                    }
                    .to_response(),
                )
                .into())
            }
        }
    }

    /// The open transaction, taken out of the slot. `Err` when a guard still holds it.
    fn take(&self) -> Result<Option<OpenTransaction>, StoreError> {
        let mut slot = self.slot.try_lock().map_err(|_| {
            StoreError::Protocol(
                "the handler's transaction is still borrowed (a PgTransactionGuard outlived the \
                 handler): it is not committed"
                    .into(),
            )
        })?;
        match std::mem::replace(&mut *slot, Slot::Ended) {
            Slot::Open(txn) => Ok(Some(txn)),
            Slot::Idle | Slot::Ended => Ok(None),
        }
    }

    async fn rollback(&self, open: OpenTransaction) {
        if let Err(err) = self.store.bounded(open.txn.rollback()).await {
            tracing::warn!(
                error = %err,
                "the handler's transaction could not be rolled back explicitly; the database \
                 rolls it back when its connection is reset or closed"
            );
        }
    }
}

/// The transaction of one request, as the actix-web adapter sees it: installed before the
/// handler runs (when the store is a [`PostgresStore`]), consulted after it.
pub(crate) struct RequestTransaction(Option<Arc<Shared>>);

impl RequestTransaction {
    /// Makes the transaction available to the request's [`PgTransaction`] extractor, when the
    /// app's store is a [`PostgresStore`].
    pub(crate) fn install(req: &HttpRequest, settings: &Settings) -> Self {
        let Some(store) = postgres_of(&settings.store) else {
            return Self(None);
        };
        let shared = Arc::new(Shared {
            store: store.clone(),
            retry_after: settings.unavailable_retry_after,
            begun: AtomicBool::new(false),
            slot: Mutex::new(Slot::Idle),
        });
        req.extensions_mut().insert(Arc::clone(&shared));
        Self(Some(shared))
    }

    /// Whether the handler began the transaction.
    pub(crate) fn is_begun(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|s| s.begun.load(Ordering::Acquire))
    }

    /// Who completes the record: the transaction when the handler began it, else the store.
    pub(crate) fn completion(&self) -> Box<dyn Completion> {
        match &self.0 {
            Some(shared) if self.is_begun() => Box::new(TransactionCompletion(Arc::clone(shared))),
            _ => Box::new(StoreCompletion),
        }
    }

    /// Ends the transaction of a request that has no record (no key, or `fail_open`): commits
    /// after a response under 500, rolls back otherwise. A failed commit answers 503.
    pub(crate) async fn finish_unrecorded(&self, resp: HttpResponse) -> HttpResponse {
        let Some(shared) = self.0.as_ref().filter(|_| self.is_begun()) else {
            return resp;
        };
        let open = match shared.take() {
            Ok(Some(open)) => open,
            Ok(None) => return resp,
            Err(err) => return self.unavailable(&err),
        };
        if resp.status().is_server_error() {
            shared.rollback(open).await;
            return resp;
        }
        match shared.store.bounded(open.txn.commit()).await {
            Ok(()) => resp,
            Err(err) => self.unavailable(&err),
        }
    }

    /// The 503 of a transaction that was not committed.
    pub(crate) fn rolled_back(&self) -> HttpResponse {
        let retry_after = self
            .0
            .as_ref()
            .map_or(Idempotency::DEFAULT_UNAVAILABLE_RETRY_AFTER, |s| {
                s.retry_after
            });
        Problem::StoreUnavailable { retry_after }.to_response()
    }

    fn unavailable(&self, err: &StoreError) -> HttpResponse {
        tracing::error!(error = %err, "the handler's transaction was not committed: answering 503");
        self.rolled_back()
    }
}

/// Completes the record in the handler's transaction and commits it.
struct TransactionCompletion(Arc<Shared>);

#[async_trait]
impl Completion for TransactionCompletion {
    async fn complete(
        self: Box<Self>,
        _store: &dyn Store,
        ticket: &Ticket,
        response: &StoredResponse,
        ttl: Duration,
        // A commit is not safe to re-send: a failure is answered with a 503 instead.
        _retry_for: Duration,
    ) -> Result<Ownership, StoreError> {
        let shared = &*self.0;
        let Some(open) = shared.take()? else {
            return Err(StoreError::Protocol(
                "the handler's transaction was already ended".into(),
            ));
        };
        // Timed and counted as the store's completion (`op="complete"`), commit included.
        observe::timed(
            Op::Complete,
            shared.store.kind(),
            complete_and_commit(shared, open, ticket, response, ttl),
        )
        .await
    }

    async fn abandon(self: Box<Self>) {
        match self.0.take() {
            Ok(Some(open)) => self.0.rollback(open).await,
            Ok(None) => {}
            Err(err) => tracing::warn!(error = %err, "the handler's transaction is not ended here"),
        }
    }

    fn holds_the_handlers_writes(&self) -> bool {
        true
    }
}

/// The fenced completion on the transaction's connection, then `COMMIT`: two round trips.
async fn complete_and_commit(
    shared: &Shared,
    open: OpenTransaction,
    ticket: &Ticket,
    response: &StoredResponse,
    ttl: Duration,
) -> Result<Ownership, StoreError> {
    let OpenTransaction { mut txn, _permit } = open;
    let store = &shared.store;
    match complete_in_transaction(store, &mut txn, ticket, response, ttl).await {
        Ok(Ownership::Held) => store.bounded(txn.commit()).await.map(|()| Ownership::Held),
        not_held => {
            shared.rollback(OpenTransaction { txn, _permit }).await;
            not_held
        }
    }
}

/// The store's fenced `complete`, on the transaction's connection, in one statement whose
/// `RETURNING` also bounds the wait for the `COMMIT` on the server: from here the transaction
/// waits for the runtime only, and a `COMMIT` lost in a partition must not leave the record's row
/// locked for hours. (It used to be a `SET LOCAL` of its own before the `UPDATE`: a round trip
/// more per request.) When the fence does not hold, no row comes back and nothing is set: the
/// caller rolls back at once.
///
/// The statement's `now()` is the transaction's start: a lease that ran out since then with
/// nobody taking the key over still completes (no other execution can have begun: a take-over
/// would have changed the owner, and one racing this statement waits for its row lock, then sees
/// the completed record).
async fn complete_in_transaction(
    store: &PostgresStore,
    txn: &mut PgConnection,
    ticket: &Ticket,
    response: &StoredResponse,
    ttl: Duration,
) -> Result<Ownership, StoreError> {
    let record = encode_completed(ticket.fingerprint(), response)?;
    let inner = &*store.inner;
    let updated = store
        .bounded(
            sqlx::query(&inner.sql.complete_in_transaction)
                .bind(&ticket.key().as_bytes()[..])
                .bind(&ticket.token().as_bytes()[..])
                .bind(&ticket.fingerprint().as_bytes()[..])
                .bind(&record[..])
                .bind(sql_millis(ttl))
                .bind(inner.commit_bound.as_str())
                .fetch_optional(&mut *txn),
        )
        .await?;
    Ok(match updated {
        Some(_) => Ownership::Held,
        None => Ownership::Lost,
    })
}
