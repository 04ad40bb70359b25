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
    PgPool, Row as _,
};
use tokio::sync::oneshot;

mod sql;
mod sweep;
mod transaction;

pub use self::sql::InvalidTableName;
use self::sql::{sql_millis, Statements, TableName, MIGRATE_TIMEOUT};
pub(crate) use self::transaction::RequestTransaction;
pub use self::transaction::{PgTransaction, PgTransactionGuard};
use super::{Ownership, Store, StoreError, Ticket};
use crate::{
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
/// [`PostgresStore::migrate`] creates the table, its expiry index and the claim function if they
/// are missing, under an advisory lock so that instances starting together do not race. Teams that
/// run their own migrations apply `idem-runtime/src/store/postgres/schema.sql` instead (the same
/// SQL, also given by [`PostgresStore::schema_sql`] for a configured table name).
///
/// A row holds the record's address (the 32-byte digest of scope and key), the request
/// fingerprint, the state (`pending` or `completed`), the owner token while pending, one deadline
/// `expires_at` (the lease while pending, the ttl once completed) and, once completed, the response
/// in the same versioned binary encoding the Redis stores keep (the private `record` module): one format
/// to evolve, decoded with the same checks, and no migration when the response format grows.
///
/// # Round trips and clocks
///
/// Claim, renew, complete and release are one statement each. Every deadline is computed and
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
/// [`PostgresStore::from_url`] makes a lazy pool (no connection until the first call) that does not
/// ping a connection before handing it out (sqlx's `test_before_acquire`, a hidden round trip per
/// call) and sets `statement_timeout` to the store's timeout on every connection. A connection
/// that a server restart broke fails one call, then is replaced. (sqlx still pings each connection
/// as it goes back to the pool, in the background, off the request's path.) Over your own pool
/// ([`PostgresStore::builder`]) consider the same settings.
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

/// Configures a [`PostgresStore`].
#[derive(Debug)]
pub struct PostgresStoreBuilder {
    pool: PgPool,
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
        let store = PostgresStore {
            inner: Arc::new(Inner {
                pool: self.pool,
                sql: Statements::new(&table),
                table,
                timeout: self.timeout,
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

    /// A builder over an existing pool.
    pub fn builder(pool: PgPool) -> PostgresStoreBuilder {
        PostgresStoreBuilder {
            pool,
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
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StoreError::Unavailable(
                "PostgresStore::from_url must be called inside a tokio runtime".into(),
            ));
        }
        let timeout = Self::DEFAULT_TIMEOUT;
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(Box::new(e)))?
            .application_name("idem")
            .options([("statement_timeout", timeout.as_millis().to_string())]);
        let pool = PgPoolOptions::new()
            .acquire_timeout(timeout)
            .test_before_acquire(false)
            .connect_lazy_with(options);
        Self::builder(pool)
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
    /// index and the claim function, each created only if missing (the function is replaced),
    /// then the journal of steps' table `<table>_steps` and its expiry index.
    pub fn schema_sql(&self) -> &str {
        &self.inner.sql.schema
    }

    /// Creates the table, its index and the claim function where missing, in one transaction
    /// (one round trip) under an advisory lock: several instances may call it at once. Waits up to 30 s (or the
    /// store timeout, if longer) for the lock and the statements.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when the database fails or refuses (for example, the user may
    /// not create tables), [`StoreError::Timeout`] when it takes longer than the bound above.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let timeout = self.inner.timeout.max(MIGRATE_TIMEOUT);
        // One simple-protocol message: Postgres runs its statements as one transaction, so the
        // transaction-scoped lock taken first is held until every statement is done.
        let run = sqlx::raw_sql(&self.inner.sql.migrate).execute(&self.inner.pool);
        match tokio::time::timeout(timeout, run).await {
            Ok(result) => result.map(|_| ()).map_err(|e| map_err(e, timeout)),
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
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
        let result = self.bounded(query.execute(&self.inner.pool)).await?;
        match result.rows_affected() {
            0 => Ok(Ownership::Lost),
            1 => Ok(Ownership::Held),
            n => Err(StoreError::Protocol(format!(
                "a fenced write changed {n} rows"
            ))),
        }
    }
}

/// The parameters of a fenced write after the ticket's.
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
        other => StoreError::Unavailable(Box::new(other)),
    }
}

/// Parses the claim function's row.
fn parse_claim(row: &PgRow, ticket: &Ticket) -> Result<Claim, StoreError> {
    let column = |e: sqlx::Error| StoreError::Protocol(format!("claim answered a bad row: {e}"));
    let acquired: Option<bool> = row.try_get(0).map_err(column)?;
    if acquired == Some(true) {
        return Ok(Claim::Acquired);
    }
    let state: Option<String> = row.try_get(1).map_err(column)?;
    let fingerprint: Option<Vec<u8>> = row.try_get(2).map_err(column)?;
    let owner: Option<Vec<u8>> = row.try_get(3).map_err(column)?;
    let response: Option<Vec<u8>> = row.try_get(4).map_err(column)?;
    let remaining: Option<i64> = row.try_get(5).map_err(column)?;
    let fingerprint = fingerprint
        .and_then(|f| <[u8; 32]>::try_from(f).ok())
        .map(Fingerprint::from_bytes)
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
            let record = Record::decode(Bytes::from(response))?;
            if !matches!(record, Record::Completed { .. }) || *record.fingerprint() != fingerprint {
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
    Ok(classify(record, ticket, remaining))
}

#[async_trait]
impl Store for PostgresStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn claim(&self, ticket: &Ticket, lease: Duration) -> Result<Claim, StoreError> {
        let row = self
            .bounded(
                sqlx::query(&self.inner.sql.claim)
                    .bind(&ticket.key().as_bytes()[..])
                    .bind(&ticket.fingerprint().as_bytes()[..])
                    .bind(&ticket.token().as_bytes()[..])
                    .bind(sql_millis(lease))
                    .fetch_one(&self.inner.pool),
            )
            .await?;
        parse_claim(&row, ticket)
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
