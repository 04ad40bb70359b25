//! The Postgres store: one row per record, on sqlx. The user-facing design notes are on
//! [`PostgresStore`].

use std::{
    fmt,
    str::FromStr,
    sync::{atomic::AtomicBool, Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions, PgRow},
    Executor as _, PgPool, Row as _,
};
use tokio::sync::{oneshot, Semaphore};

mod sql;
mod sweep;
mod transaction;
mod verify;

pub use self::sql::InvalidTableName;
use self::sql::{
    commit_bound, session_sql, sql_millis, Isolation, Statements, TableName, EXPECTED,
    MIGRATE_TIMEOUT,
};
pub(crate) use self::transaction::RequestTransaction;
pub use self::transaction::{NotTransactional, PgTransaction, PgTransactionGuard};
use self::verify::Found;
pub use self::verify::SchemaMismatch;
use super::{Ownership, Store, StoreError, Ticket};
use crate::{
    encoding::FingerprintEncoding,
    fingerprint::Fingerprint,
    protocol::{classify, Claim},
    record::{encode_completed, OwnerToken, Record, StoredResponse},
};

/// A store on Postgres: durable records without running Redis (feature `postgres`).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_runtime::{Idempotency, PostgresStore};
///
/// let store = PostgresStore::from_url("postgres://app:secret@127.0.0.1:5432/app")?;
/// store.migrate().await?;
/// let idempotency = Idempotency::new(store);
/// # drop(idempotency);
/// # Ok(())
/// # }
/// ```
///
/// # Schema
///
/// [`PostgresStore::migrate`] creates the table, its expiry index, the lease table and the claim
/// function if they are missing, under an advisory lock so that instances starting together do
/// not race, then checks what it finds: a table of another shape (made by something else: a column missing or
/// of another type) fails `migrate` with a [`SchemaMismatch`] naming the difference and the fix,
/// instead of an app that starts and answers every request 503. Teams that run their own
/// migrations apply `idem-runtime/src/store/postgres/schema.sql` instead (the same SQL, also
/// given by [`PostgresStore::schema_sql`] for a configured table name) and call
/// [`PostgresStore::verify_schema`] at start.
///
/// The schema has a version, kept in the table's comment (`idem schema 4`) and raised by the
/// schema SQL when a release adds a migration step. Steps only add (a column with a default, a
/// function), so a build accepts a table of a newer version, and `migrate` of an older build
/// leaves a newer table as it is: instances of two releases can share a table during a rolling
/// upgrade or a rollback.
///
/// A row holds the record's address (the 32-byte digest of scope and key), the request
/// fingerprint, the state (`pending` or `completed`), the owner token while pending, one deadline
/// `expires_at` (the first lease while pending, the ttl once completed) and, once completed, the response
/// in the same versioned binary encoding the Redis stores keep (the private `record` module): one format
/// to evolve, decoded with the same checks, and no migration when the response format grows.
///
/// # Round trips and clocks
///
/// Claim, renew, complete and release are one statement each. A renewal writes the pending
/// record's lease in a table of its own (`<table>_leases`), never the record's row, so a handler's
/// transaction that completes the record at `REPEATABLE READ` or `SERIALIZABLE` does not meet a
/// concurrent update of that row; a pending record lives until the later of its own deadline and
/// its owner's lease. Every deadline is computed and
/// compared by the database (`now()`), never by an app instance, so instances whose clocks disagree
/// still agree on leases and expiry. A row past its deadline is invisible to claims at once (a
/// claim takes it over); a background sweep deletes such rows in bounded batches.
///
/// # The claim
///
/// A claim is a call of a PL/pgSQL function that `migrate` creates: it reads a live row (a replay
/// or a duplicate writes nothing), else inserts one (`ON CONFLICT DO NOTHING`), else takes over an
/// expired row (`UPDATE ... WHERE expires_at <= now()`), and starts again when a concurrent
/// transaction changed the row in between. Each of its statements sees the rows committed before
/// it started, so a row that a concurrent claim committed while this one waited on it is never
/// missed, which a single `INSERT ... ON CONFLICT` with a `SELECT` in a CTE cannot promise (both
/// read one snapshot, taken before the wait). A claim that finds a pending row holding its own
/// owner token (a claim retried after its answer was lost) acquires it again, with a fresh lease.
///
/// # Connections
///
/// [`PostgresStore::from_url`] makes a lazy pool (no connection until the first call) of
/// [`PostgresStore::DEFAULT_MAX_CONNECTIONS`] connections
/// ([`PostgresStore::from_url_with_pool_size`] chooses another size) that does not ping a
/// connection before handing it out (sqlx's `test_before_acquire`, a hidden round trip per call),
/// waits up to half the store timeout for a connection, and sets on each session, in one round
/// trip at connection: `READ COMMITTED` for the store's statements whatever the database's default
/// (the claim relies on it), `statement_timeout` half the store timeout (the server gives up on a
/// statement no later than the store call does), `lock_timeout` a quarter of it (a claim that
/// meets a locked record answers "in flight" instead of holding its connection),
/// `idle_in_transaction_session_timeout` the store timeout, and TCP keepalives (a vanished peer is
/// noticed within half a minute). A handler's transaction gets the database's isolation level and
/// timeouts back.
///
/// A statement that meets a connection a server restart broke is sent again on another one (each
/// broken connection is closed as it fails), so the first calls after a restart succeed. (sqlx
/// still pings each connection as it goes back to the pool, in the background, off the request's
/// path.) Over your own pool ([`PostgresStore::builder`]) consider the same session settings.
///
/// Handlers' transactions ([`PgTransaction`]) may hold all but a quarter of the pool's connections
/// (at least one is kept when there are two or more): the rest serves claims and renewals.
///
/// # Sweeper
///
/// Cloning is cheap and shares the pool and the sweeper. The sweeper (a tokio task deleting
/// expired rows every [`PostgresStoreBuilder::sweep_interval`]) starts when the store is built
/// inside a tokio runtime, or else at its first call, and stops when the last clone is dropped.
/// Sweepers of several instances do not get in each other's way (each skips the rows another has
/// locked), but one is enough: see [`PostgresStoreBuilder::sweeper`].
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    table: TableName,
    timeout: Duration,
    /// [`commit_bound`] of `timeout`: what a handler's transaction gets with its completion.
    commit_bound: String,
    /// The connections handlers' transactions may hold at once: the pool's size less a reserve
    /// for the store's own calls (claims, renewals), which would starve otherwise.
    transactions: Arc<Semaphore>,
    /// The session settings of a pool that [`PostgresStore::from_url`] made (`None` over the
    /// app's own pool): what a handler's transaction restores.
    session: Option<Arc<Session>>,
    sql: Statements,
    sweep_interval: Duration,
    sweep_batch: u32,
    /// Whether the sweeper still has to be started (false when disabled or started).
    sweeper_pending: AtomicBool,
    /// Taken by the sweeper when it starts; it stops when `_stop` is dropped with the store.
    stopped: Mutex<Option<oneshot::Receiver<()>>>,
    _stop: oneshot::Sender<()>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.inner.table.to_string())
            .field("timeout", &self.inner.timeout)
            .field("sweep_interval", &self.inner.sweep_interval)
            .field("sweep_batch", &self.inner.sweep_batch)
            .field("pool", &self.inner.pool)
            .finish()
    }
}

/// What a pool made by [`PostgresStore::from_url`] learnt of the database at connection: the
/// isolation level its transactions get unless told otherwise (the store's own sessions run
/// `READ COMMITTED`; a handler's transaction gets the database's default back).
#[derive(Debug, Default)]
struct Session {
    default_isolation: Mutex<Option<Isolation>>,
}

impl Session {
    fn default_isolation(&self) -> Option<Isolation> {
        *self
            .default_isolation
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Configures a [`PostgresStore`].
#[derive(Debug)]
pub struct PostgresStoreBuilder {
    pool: PgPool,
    session: Option<Arc<Session>>,
    table: String,
    timeout: Duration,
    sweep_interval: Duration,
    sweep_batch: u32,
    sweeper: bool,
}

impl PostgresStoreBuilder {
    /// The table holding the records: `name` or `schema.name` (default `idem_records`), each part
    /// 1 to 48 characters of `a-z`, `0-9` and `_`, not starting with a digit. It is checked by
    /// [`PostgresStoreBuilder::build`] before it is ever spliced into SQL, and quoted there.
    #[must_use]
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The longest a store call may take, waiting for a connection included (default 2 s). A
    /// call that takes longer fails with [`StoreError::Timeout`].
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How often the sweeper deletes expired rows (default 60 s).
    #[must_use]
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// How many rows one sweep statement deletes at most (default 1000, at least 1). A sweep
    /// runs batches until one deletes fewer rows than this, or 100 batches ran.
    #[must_use]
    pub fn sweep_batch(mut self, rows: u32) -> Self {
        self.sweep_batch = rows.max(1);
        self
    }

    /// Whether the store runs its own sweeper (default true). Turn it off when expired rows are
    /// deleted elsewhere (a cron job calling [`PostgresStore::sweep`], or one instance's sweeper).
    /// Expired rows are ignored by claims either way; they only take space.
    #[must_use]
    pub fn sweeper(mut self, enabled: bool) -> Self {
        self.sweeper = enabled;
        self
    }

    /// Builds the store. No connection is made here: call [`PostgresStore::migrate`] at startup
    /// unless the schema is applied by your own migrations.
    ///
    /// # Errors
    ///
    /// [`InvalidTableName`] when the table name is not `name` or `schema.name` as described in
    /// [`PostgresStoreBuilder::table`].
    pub fn build(self) -> Result<PostgresStore, InvalidTableName> {
        let table: TableName = self.table.parse()?;
        let (stop, stopped) = oneshot::channel();
        let transactions = Arc::new(Semaphore::new(transaction_slots(
            self.pool.options().get_max_connections(),
        )));
        let store = PostgresStore {
            inner: Arc::new(Inner {
                pool: self.pool,
                transactions,
                session: self.session,
                sql: Statements::new(&table),
                table,
                timeout: self.timeout,
                commit_bound: commit_bound(self.timeout),
                sweep_interval: self.sweep_interval,
                sweep_batch: self.sweep_batch,
                sweeper_pending: AtomicBool::new(self.sweeper),
                stopped: Mutex::new(Some(stopped)),
                _stop: stop,
            }),
        };
        store.start_sweeper();
        Ok(store)
    }
}

impl PostgresStore {
    /// The default table.
    pub const DEFAULT_TABLE: &'static str = "idem_records";
    /// The default timeout of one store call.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
    /// The default time between two sweeps of expired rows.
    pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
    /// The default number of rows one sweep statement deletes at most.
    pub const DEFAULT_SWEEP_BATCH: u32 = 1000;
    /// The default size of [`PostgresStore::from_url`]'s pool.
    pub const DEFAULT_MAX_CONNECTIONS: u32 = 20;

    /// A builder over an existing pool.
    pub fn builder(pool: PgPool) -> PostgresStoreBuilder {
        PostgresStoreBuilder {
            pool,
            session: None,
            table: Self::DEFAULT_TABLE.to_owned(),
            timeout: Self::DEFAULT_TIMEOUT,
            sweep_interval: Self::DEFAULT_SWEEP_INTERVAL,
            sweep_batch: Self::DEFAULT_SWEEP_BATCH,
            sweeper: true,
        }
    }

    /// A store with default settings over a new lazy pool for `url`
    /// (`postgres://user:password@host:5432/database`): no connection is made until the first
    /// call. See [Connections](PostgresStore#connections) for the pool's settings. Call it inside a tokio runtime
    /// (an actix-web app's `main` is one).
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when the URL is invalid or no tokio runtime is running.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        Self::from_url_with_pool_size(url, Self::DEFAULT_MAX_CONNECTIONS)
    }

    /// [`PostgresStore::from_url`] with a pool of `max_connections` (at least 1) instead of
    /// [`PostgresStore::DEFAULT_MAX_CONNECTIONS`]. A quarter of them (at least one, when there are
    /// two or more) is kept for the store's own calls: see [Connections](PostgresStore#connections).
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when the URL is invalid or no tokio runtime is running.
    pub fn from_url_with_pool_size(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StoreError::Unavailable(
                "PostgresStore::from_url must be called inside a tokio runtime".into(),
            ));
        }
        let timeout = Self::DEFAULT_TIMEOUT;
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(Box::new(e)))?
            .application_name("idem");
        let session = Arc::new(Session::default());
        let learnt = Arc::clone(&session);
        // One text for every pool (the timeout is the default one): the callback's future must
        // not borrow from the callback.
        static SETUP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let setup: &'static str = SETUP.get_or_init(|| session_sql(Self::DEFAULT_TIMEOUT));
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            // Half the store timeout for a connection, half for the statement (whose
            // `statement_timeout` is the other half): the server gives up on a statement no
            // later than the store call does.
            .acquire_timeout(timeout / 2)
            .test_before_acquire(false)
            .after_connect(move |conn, _| set_up_session(conn, setup, Arc::clone(&learnt)))
            .connect_lazy_with(options);
        let mut builder = Self::builder(pool);
        builder.session = Some(session);
        builder
            .build()
            .map_err(|e| StoreError::Unavailable(Box::new(e)))
    }

    /// The pool behind the store.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The table, as configured (`name` or `schema.name`).
    pub fn table(&self) -> String {
        self.inner.table.to_string()
    }

    /// The SQL that [`PostgresStore::migrate`] runs for this store's table: the table, its expiry
    /// index, the lease table and the claim function, each created only if missing (the function
    /// is replaced), then the journal of steps' table `<table>_steps` and its expiry index.
    pub fn schema_sql(&self) -> &str {
        &self.inner.sql.schema
    }

    /// Creates the table, its index, the lease table and the claim function where missing, then checks the
    /// table as [`PostgresStore::verify_schema`] does, in one transaction under an advisory lock:
    /// several instances may call it at once, and a table that fails the check is left as it
    /// was. A table of a newer schema version (a later release migrated it) is only checked.
    /// Waits up to 30 s (or the store timeout, if longer) for the lock and the statements.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when the database fails or refuses (for example, the user may
    /// not create tables), or wrapping a [`SchemaMismatch`] when an existing table is of another
    /// shape (its message names the difference and the fix); [`StoreError::Timeout`] when it
    /// takes longer than the bound above.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let timeout = self.inner.timeout.max(MIGRATE_TIMEOUT);
        let sql = &self.inner.sql;
        let run = async {
            let mut txn = self.inner.pool.begin().await?;
            // Statements without parameters go as one simple-protocol message each (several
            // statements in one), through `Executor`'s boxed futures, which keep this one `Send`.
            // The transaction-scoped lock is held until the commit or rollback.
            txn.execute(sql.migrate_lock.as_str()).await?;
            if Found::read(&mut txn, sql).await?.version() <= EXPECTED.version {
                txn.execute(sql.schema.as_str()).await?;
            }
            let found = Found::read(&mut txn, sql).await?;
            match found.check(&self.table(), &sql.inspect_args.1) {
                Ok(()) => txn.commit().await.map(|()| Ok(())),
                Err(mismatch) => txn.rollback().await.map(|()| Err(mismatch)),
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(mismatch))) => Err(StoreError::Unavailable(Box::new(mismatch))),
            Ok(Err(e)) => Err(map_err(e, timeout)),
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
    }

    /// Checks that the table is what this version of idem needs, without changing anything: for
    /// teams that apply `schema.sql` with their own migrations, to call at start. It reads the
    /// catalog: the table's columns and their types, its key, the claim function, and the schema
    /// version in the table's comment (older than this build's is refused, newer is accepted).
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] wrapping a [`SchemaMismatch`] (its message names what differs
    /// and the fix) when the table is missing or of another shape or version, or when the
    /// database fails; [`StoreError::Timeout`] when it does not answer within the store timeout.
    pub async fn verify_schema(&self) -> Result<(), StoreError> {
        let found = self
            .bounded(async {
                let mut conn = self.inner.pool.acquire().await?;
                Found::read(&mut conn, &self.inner.sql).await
            })
            .await?;
        found
            .check(&self.table(), &self.inner.sql.inspect_args.1)
            .map_err(|mismatch| StoreError::Unavailable(Box::new(mismatch)))
    }

    /// Runs a statement on the pool (`query`, called again for each attempt), within the store
    /// timeout. A statement that fails because its connection was broken (a server restart or
    /// failover leaves every idle connection of the pool dead) is sent again on another one, as
    /// many times as the pool has connections: each broken one is closed as it fails. Every
    /// statement the store sends this way is safe to repeat (a claim carries its owner token, the
    /// fenced writes are idempotent).
    async fn pooled<T, F, Fut>(&self, mut query: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        let pool = &self.inner.pool;
        let attempts = async {
            let mut broken = 0u32;
            loop {
                match query().await {
                    Err(e) if is_broken_connection(&e) && broken <= pool.size() => {
                        broken += 1;
                        tracing::warn!(error = %e, "idem: a broken Postgres connection; sending the statement again on another");
                    }
                    answer => return answer,
                }
            }
        };
        self.bounded(attempts).await
    }

    /// Runs `query` within the store timeout, mapping its errors.
    async fn bounded<T>(
        &self,
        query: impl std::future::Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        self.start_sweeper();
        let timeout = self.inner.timeout;
        match tokio::time::timeout(timeout, query).await {
            Ok(result) => result.map_err(|e| map_err(e, timeout)),
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
    }

    /// Runs a fenced write (`sql` with the ticket's key, token and fingerprint as `$1..$3`, then
    /// `extra`), answering whether it changed the ticket's row.
    async fn fenced(
        &self,
        sql: &str,
        ticket: &Ticket,
        extra: Extra<'_>,
    ) -> Result<Ownership, StoreError> {
        let result = self
            .pooled(|| {
                let query = sqlx::query(sql)
                    .bind(&ticket.key().as_bytes()[..])
                    .bind(&ticket.token().as_bytes()[..])
                    .bind(&ticket.fingerprint().as_bytes()[..]);
                let query = match extra {
                    Extra::None => query,
                    Extra::Millis(ms) => query.bind(ms),
                    Extra::Completed(record, ms) => query.bind(record).bind(ms),
                    Extra::Step(name, entry, ms) => query.bind(name).bind(entry).bind(ms),
                };
                query.execute(&self.inner.pool)
            })
            .await?;
        match result.rows_affected() {
            0 => Ok(Ownership::Lost),
            1 => Ok(Ownership::Held),
            n => Err(StoreError::Protocol(format!(
                "a fenced write changed {n} rows"
            ))),
        }
    }
}

/// Sends `setup` ([`session_sql`]) on a new connection of [`PostgresStore::from_url`]'s pool,
/// and keeps the database's default isolation level it answers.
fn set_up_session<'c>(
    conn: &'c mut sqlx::PgConnection,
    setup: &'static str,
    learnt: Arc<Session>,
) -> futures_util::future::BoxFuture<'c, Result<(), sqlx::Error>> {
    Box::pin(async move {
        let row = sqlx::query(setup).fetch_one(&mut *conn).await?;
        let default = row
            .try_get::<String, _>(0)
            .ok()
            .and_then(|level| level.parse::<Isolation>().ok());
        *learnt
            .default_isolation
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = default;
        Ok(())
    })
}

/// How many of a pool's `max_connections` handlers' transactions may hold at once: all but a
/// quarter (at least one when there are two or more), kept for the store's own short calls.
fn transaction_slots(max_connections: u32) -> usize {
    let max = max_connections.max(1);
    let reserve = if max >= 2 { (max / 4).max(1) } else { 0 };
    usize::try_from(max - reserve).unwrap_or(1)
}

/// Whether `e` says the connection was dead before the statement could run (or broke while it
/// ran): the server restarted, failed over, or ended the session.
fn is_broken_connection(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) => true,
        // connection_exception (class 08), admin_shutdown, crash_shutdown, cannot_connect_now.
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// Whether `e` is `lock_timeout` firing: the statement met a row another transaction holds.
fn is_lock_timeout(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
}

/// The parameters of a fenced write after the ticket's.
#[derive(Clone, Copy)]
enum Extra<'a> {
    None,
    Millis(i64),
    Completed(&'a [u8], i64),
    Step(&'a str, &'a [u8], i64),
}

fn map_err(e: sqlx::Error, timeout: Duration) -> StoreError {
    match e {
        sqlx::Error::PoolTimedOut => StoreError::Timeout(timeout),
        // query_canceled: the statement_timeout fired.
        sqlx::Error::Database(db) if db.code().as_deref() == Some("57014") => {
            StoreError::Timeout(timeout)
        }
        // lock_not_available: `lock_timeout` fired on a row another transaction holds.
        ref e if is_lock_timeout(e) => StoreError::Timeout(timeout),
        other => StoreError::Unavailable(Box::new(other)),
    }
}

/// Parses the claim function's row: the claim, and how long the completed record it met still
/// lives (by the server's clock), for the replay cache.
fn parse_claim(row: &PgRow, ticket: &Ticket) -> Result<(Claim, Option<Duration>), StoreError> {
    let column = |e: sqlx::Error| StoreError::Protocol(format!("claim answered a bad row: {e}"));
    let acquired: Option<bool> = row.try_get(0).map_err(column)?;
    if acquired == Some(true) {
        return Ok((Claim::Acquired, None));
    }
    let state: Option<String> = row.try_get(1).map_err(column)?;
    let fingerprint: Option<Vec<u8>> = row.try_get(2).map_err(column)?;
    let owner: Option<Vec<u8>> = row.try_get(3).map_err(column)?;
    let response: Option<Vec<u8>> = row.try_get(4).map_err(column)?;
    let remaining: Option<i64> = row.try_get(5).map_err(column)?;
    let encoding: Option<i16> = row.try_get(6).map_err(column)?;
    // NULL: a row of the previous release (or claimed through its claim function), in the only
    // encoding it had.
    let encoding = match encoding {
        None => FingerprintEncoding::RAW_V2,
        Some(id) => u8::try_from(id)
            .map(FingerprintEncoding::from_id)
            .map_err(|_| {
                StoreError::Protocol(format!("a record with fingerprint encoding {id}"))
            })?,
    };
    let fingerprint = fingerprint
        .and_then(|f| <[u8; 32]>::try_from(f).ok())
        .map(|digest| Fingerprint::new(encoding, digest))
        .ok_or_else(|| StoreError::Protocol("a record without a 32-byte fingerprint".into()))?;
    let record = match (state.as_deref(), owner, response) {
        (Some("pending"), Some(owner), None) => Record::Pending {
            fingerprint,
            token: <[u8; 16]>::try_from(owner)
                .map(OwnerToken::from_bytes)
                .map_err(|_| {
                    StoreError::Protocol("a pending record without a 16-byte owner".into())
                })?,
        },
        (Some("completed"), None, Some(response)) => {
            // The record names its own encoding; the column may lag behind it on a row that an
            // instance of the previous release (whose claim function does not set the column)
            // took over and completed.
            let record = Record::decode(Bytes::from(response))?;
            if !matches!(record, Record::Completed { .. })
                || record.fingerprint().as_bytes() != fingerprint.as_bytes()
            {
                return Err(StoreError::Protocol(
                    "a completed row whose response is not its completed record".into(),
                ));
            }
            record
        }
        (state, ..) => {
            return Err(StoreError::Protocol(format!(
                "claim answered a record in state {state:?} with inconsistent columns"
            )))
        }
    };
    let remaining =
        Duration::from_millis(remaining.and_then(|ms| u64::try_from(ms).ok()).unwrap_or(0));
    let life = matches!(record, Record::Completed { .. }).then_some(remaining);
    Ok((classify(record, ticket, remaining), life))
}

impl PostgresStore {
    /// [`Store::claim`], and how long the completed record it met still lives.
    pub(crate) async fn claim_expiring(
        &self,
        ticket: &Ticket,
        lease: Duration,
    ) -> Result<(Claim, Option<Duration>), StoreError> {
        let claimed = self
            .pooled(|| async {
                let row = sqlx::query(&self.inner.sql.claim)
                    .bind(&ticket.key().as_bytes()[..])
                    .bind(&ticket.fingerprint().as_bytes()[..])
                    .bind(&ticket.token().as_bytes()[..])
                    .bind(sql_millis(lease))
                    .bind(i16::from(ticket.fingerprint().encoding().id()))
                    .fetch_one(&self.inner.pool)
                    .await;
                match row {
                    // The record's row is locked by another transaction (a request completing
                    // it, or one whose connection went silent before its commit, which the
                    // server ends within a lease): it is in flight. The claim gives its
                    // connection back at `lock_timeout` instead of holding it.
                    Err(e) if is_lock_timeout(&e) => Ok(None),
                    other => other.map(Some),
                }
            })
            .await?;
        match claimed {
            Some(row) => parse_claim(&row, ticket),
            None => Ok((
                Claim::InFlight {
                    retry_after: lease.min(self.inner.timeout),
                },
                None,
            )),
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn claim(&self, ticket: &Ticket, lease: Duration) -> Result<Claim, StoreError> {
        Ok(self.claim_expiring(ticket, lease).await?.0)
    }

    async fn renew(&self, ticket: &Ticket, lease: Duration) -> Result<Ownership, StoreError> {
        self.fenced(
            &self.inner.sql.renew,
            ticket,
            Extra::Millis(sql_millis(lease)),
        )
        .await
    }

    async fn complete(
        &self,
        ticket: &Ticket,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<Ownership, StoreError> {
        let record = encode_completed(ticket.fingerprint(), response)?;
        self.fenced(
            &self.inner.sql.complete,
            ticket,
            Extra::Completed(&record, sql_millis(ttl)),
        )
        .await
    }

    async fn release(&self, ticket: &Ticket) -> Result<Ownership, StoreError> {
        self.fenced(&self.inner.sql.release, ticket, Extra::None)
            .await
    }

    async fn load_steps(&self, ticket: &Ticket) -> Result<Vec<(String, Bytes)>, StoreError> {
        let rows = self
            .bounded(
                sqlx::query(&self.inner.sql.load_steps)
                    .bind(&ticket.key().as_bytes()[..])
                    .bind(&ticket.fingerprint().as_bytes()[..])
                    .fetch_all(&self.inner.pool),
            )
            .await?;
        rows.iter()
            .map(|row| {
                let column = |e: sqlx::Error| StoreError::Protocol(format!("a bad step row: {e}"));
                let name: String = row.try_get(0).map_err(column)?;
                let entry: Vec<u8> = row.try_get(1).map_err(column)?;
                Ok((name, Bytes::from(entry)))
            })
            .collect()
    }

    /// On the store's pool, never in the request's transaction (`PgTransaction`): a step's
    /// result commits at once, whether or not the handler's writes commit later.
    async fn record_step(
        &self,
        ticket: &Ticket,
        name: &str,
        entry: &[u8],
        ttl: Duration,
    ) -> Result<Ownership, StoreError> {
        self.fenced(
            &self.inner.sql.record_step,
            ticket,
            Extra::Step(name, entry, sql_millis(ttl)),
        )
        .await
    }
}
