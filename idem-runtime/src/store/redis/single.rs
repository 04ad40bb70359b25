//! [`RedisStore`]: one key per record on one Redis server. A claim is one native `SET ... NX GET`
//! (Redis 7.0 and later; the claim script on an older server, detected by its first refusal);
//! renew, complete and release are each one `EVALSHA` of the scripts in [`super::scripts`].
//!
//! A [`RedisStore`] gives each thread that calls it one lane (threads are numbered as they first
//! call, modulo the number of lanes), and a lane's connection is opened by the first thread that
//! takes it, so its I/O task runs on that thread: with as many lanes as actix workers, no command
//! or answer crosses threads. Set [`RedisStoreBuilder::lanes`] to the number of workers.

use std::{fmt, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_redis::{
    redis::{ErrorKind, ServerErrorKind, Value},
    Pool, Runtime,
};

use super::{
    eviction::EvictionCheck,
    lanes::{Call, Lanes},
    scripts::{
        expires_at, native_claim, parse_claim_expiring, parse_native_claim_expiring,
        parse_ownership, pttl, refuses_native_claim, remaining_lease, remaining_life, Arg,
        ClaimMode, Lua, Scripts,
    },
    steps::{load_command, parse_load, STEP_SCRIPT},
    KeyFormat, Options,
};
use crate::{
    protocol::Claim,
    record::{encode_completed_expiring, StoredResponse},
    store::{Ownership, Store, StoreError, Ticket},
};

/// A store on one Redis server (or a replicated primary).
///
/// Cloning is cheap; clones share connections.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    lanes: Lanes<Pool>,
    keys: KeyFormat,
    timeout: Duration,
    scripts: Scripts,
    claim_mode: ClaimMode,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.keys.prefix())
            .field("timeout", &self.inner.timeout)
            .field("lanes", &self.inner.lanes.len())
            .field("pool", &self.inner.lanes.pool().status())
            .finish()
    }
}

/// Configures a [`RedisStore`].
#[derive(Debug)]
pub struct RedisStoreBuilder {
    pool: Pool,
    options: Options,
}

impl RedisStoreBuilder {
    /// The prefix of every key the store writes (default `idem:`).
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.options.keys = KeyFormat::new(prefix);
        self
    }

    /// The longest a store call may take, connection included (default 2 s). A call that takes
    /// longer fails with [`StoreError::Timeout`], so a hung Redis cannot hang every request.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.options.timeout = timeout;
        self
    }

    /// How many multiplexed connections the store keeps checked out (default 2, at least 1, at
    /// most the pool's size). Each thread that calls the store uses one of them, so the number of
    /// actix workers is the best value: every worker then has a connection of its own.
    #[must_use]
    pub fn lanes(mut self, lanes: usize) -> Self {
        self.options.lanes = lanes;
        self
    }

    /// Serves even when Redis's `maxmemory-policy` can evict keys. **A risk**: a full Redis then
    /// evicts idempotency records (in-flight ones first, as they have the shortest TTL), and a
    /// retry of an evicted request runs the handler a second time.
    ///
    /// Without it, the store reads the policy on every new connection and again every
    /// [`eviction_check_interval`](Self::eviction_check_interval) and, unless it is
    /// `noeviction`, refuses to serve: every call fails with [`StoreError::Unavailable`] wrapping
    /// [`EvictionRisk`](crate::EvictionRisk), and requests get 503. With `noeviction`, a full
    /// Redis refuses writes instead, and requests get 503 until memory frees: the safe answer.
    /// A server that does not let the store read its configuration (a managed Redis, an ACL that
    /// denies `CONFIG`) is served, with one warning.
    #[must_use]
    pub fn allow_eviction(mut self) -> Self {
        self.options.allow_eviction = true;
        self
    }

    /// How often the store reads Redis's `maxmemory-policy` again while it serves (default 5 s,
    /// [`RedisStore::DEFAULT_EVICTION_CHECK_INTERVAL`]), so that a policy changed after start
    /// (`CONFIG SET`, a restart with another configuration file) is refused within about this
    /// interval. Every new connection is checked before its first call as well, whatever the
    /// interval. The first call after the interval starts the check in the background: no request
    /// waits for it, and it costs Redis one `CONFIG GET` per interval per store, never a command
    /// per request. Without effect with [`allow_eviction`](Self::allow_eviction).
    ///
    /// # Panics
    ///
    /// When `every` is zero.
    #[must_use]
    pub fn eviction_check_interval(mut self, every: Duration) -> Self {
        self.options
            .set_eviction_check_interval(every, "RedisStoreBuilder");
        self
    }

    /// Builds the store. No connection is made until the first call (or [`RedisStore::check`]).
    pub fn build(self) -> RedisStore {
        let eviction = EvictionCheck::new(
            self.options.allow_eviction,
            "RedisStoreBuilder",
            self.options.eviction_check_interval,
        );
        RedisStore {
            inner: Arc::new(Inner {
                lanes: Lanes::per_thread(self.pool, self.options.lanes, eviction),
                keys: self.options.keys,
                timeout: self.options.timeout,
                scripts: Scripts::new(),
                claim_mode: ClaimMode::native(),
            }),
        }
    }
}

impl RedisStore {
    /// The default prefix of every key the Redis stores write.
    pub const DEFAULT_PREFIX: &'static str = "idem:";
    /// The default timeout of one store call.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
    /// The default number of multiplexed connections kept out of the pool.
    pub const DEFAULT_LANES: usize = 2;
    /// How often a store reads Redis's `maxmemory-policy` again while it serves, by default (see
    /// [`RedisStoreBuilder::eviction_check_interval`]).
    pub const DEFAULT_EVICTION_CHECK_INTERVAL: Duration = super::eviction::DEFAULT_INTERVAL;

    /// A builder over an existing deadpool-redis pool.
    pub fn builder(pool: Pool) -> RedisStoreBuilder {
        RedisStoreBuilder {
            pool,
            options: Options::default(),
        }
    }

    /// A store with default settings over a new pool for `url` (`redis://127.0.0.1:6379`).
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when the URL is invalid. No connection is made here.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let pool = deadpool_redis::Config::from_url(url)
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        Ok(Self::builder(pool).build())
    }

    /// The pool behind the store.
    pub fn pool(&self) -> &Pool {
        self.inner.lanes.pool()
    }

    /// Connects and checks that the store can serve: Redis answers, and its `maxmemory-policy`
    /// cannot evict records (see [`RedisStoreBuilder::allow_eviction`]). Call it at start, so
    /// that a misconfigured Redis stops the app with the fix rather than failing its requests.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when Redis cannot be reached or its policy can evict records
    /// (wrapping [`EvictionRisk`](crate::EvictionRisk), whose message names the fix);
    /// [`StoreError::Timeout`] when it does not answer within the store timeout.
    pub async fn check(&self) -> Result<(), StoreError> {
        self.inner.lanes.ping(self.inner.timeout).await
    }

    /// The Redis key of the ticket's record (for tests that look at Redis directly).
    #[cfg(feature = "testing")]
    pub(crate) fn key_of(&self, ticket: &Ticket) -> String {
        self.inner.keys.string(ticket.key())
    }

    /// Makes the store claim with the Lua script, as it does on a Redis older than 7.0.
    #[cfg(feature = "testing")]
    pub(crate) fn claim_with_lua(&self) {
        self.inner.claim_mode.fall_back();
    }

    /// [`Store::claim`], and how long a completed record it replays still lives (from the
    /// expiry the record carries), for the replay cache.
    pub(crate) async fn claim_expiring(
        &self,
        ticket: &Ticket,
        lease: Duration,
    ) -> Result<(Claim, Option<Duration>), StoreError> {
        if self.inner.claim_mode.is_native() {
            match self.claim_natively(ticket, lease).await? {
                Some(value) => {
                    return match parse_native_claim_expiring(value, ticket, lease)? {
                        (Claim::InFlight { .. }, _) => Ok((
                            Claim::InFlight {
                                retry_after: self.remaining(ticket, lease).await,
                            },
                            None,
                        )),
                        (claim, expires_at) => Ok((claim, remaining_life(expires_at))),
                    }
                }
                None => self.inner.claim_mode.fall_back(),
            }
        }
        let args = [Arg::Bytes(ticket.pending_record()), Arg::Millis(lease)];
        let value = self
            .eval(Call::Claim, &self.inner.scripts.claim, ticket, &args)
            .await?;
        let (claim, expires_at) = parse_claim_expiring(value, ticket)?;
        Ok((claim, remaining_life(expires_at)))
    }

    /// The native claim: one `SET ... NX GET` round trip. `None` when the server refused the
    /// syntax (older than Redis 7.0): the caller claims with the script instead.
    async fn claim_natively(
        &self,
        ticket: &Ticket,
        lease: Duration,
    ) -> Result<Option<Value>, StoreError> {
        let cmd = self.inner.keys.with_bytes(ticket.key(), |key| {
            native_claim(key, ticket.pending_record(), lease)
        });
        let cmd = &cmd;
        let timeout = self.inner.timeout;
        self.inner
            .lanes
            .run(timeout, Call::Claim, |mut conn| async move {
                conn.set_response_timeout(timeout);
                match cmd.query_async::<Value>(&mut conn).await {
                    Err(e) if refuses_native_claim(&e) => Ok(None),
                    answer => answer.map(Some),
                }
            })
            .await
    }

    /// The remaining lease of the in-flight record a native claim found (its `PTTL`), for the
    /// 409's `Retry-After`; the claim's `lease`, an upper bound, when Redis does not answer.
    async fn remaining(&self, ticket: &Ticket, lease: Duration) -> Duration {
        let cmd = self.inner.keys.with_bytes(ticket.key(), pttl);
        let cmd = &cmd;
        let timeout = self.inner.timeout;
        let answer = self
            .inner
            .lanes
            .run(timeout, Call::Claim, |mut conn| async move {
                conn.set_response_timeout(timeout);
                cmd.query_async::<Value>(&mut conn).await
            })
            .await;
        match answer {
            Ok(value) => remaining_lease(&value, lease),
            Err(e) => {
                tracing::debug!(error = %e, "could not read an in-flight record's PTTL");
                lease
            }
        }
    }

    /// Runs `lua` on the ticket's record in one `EVALSHA` round trip (plus a `SCRIPT LOAD` and a
    /// retry after `NOSCRIPT`, when the server lost its scripts).
    async fn eval(
        &self,
        kind: Call,
        lua: &Lua,
        ticket: &Ticket,
        args: &[Arg<'_>],
    ) -> Result<Value, StoreError> {
        let cmd = self
            .inner
            .keys
            .with_bytes(ticket.key(), |key| lua.evalsha(key, args));
        let cmd = &cmd;
        let timeout = self.inner.timeout;
        self.inner
            .lanes
            .run(timeout, kind, |mut conn| async move {
                // The connection's own response timeout (redis-rs defaults to 500 ms) would
                // otherwise cut a call short of the configured timeout.
                conn.set_response_timeout(timeout);
                match cmd.query_async::<Value>(&mut conn).await {
                    Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                        lua.script().load_async(&mut conn).await?;
                        cmd.query_async::<Value>(&mut conn).await
                    }
                    answer => answer,
                }
            })
            .await
    }
}

#[async_trait]
impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn claim(&self, ticket: &Ticket, lease: Duration) -> Result<Claim, StoreError> {
        self.claim_expiring(ticket, lease)
            .await
            .map(|(claim, _)| claim)
    }

    async fn renew(&self, ticket: &Ticket, lease: Duration) -> Result<Ownership, StoreError> {
        let args = [Arg::Bytes(ticket.pending_record()), Arg::Millis(lease)];
        let value = self
            .eval(Call::Fenced, &self.inner.scripts.renew, ticket, &args)
            .await?;
        parse_ownership(&value)
    }

    async fn complete(
        &self,
        ticket: &Ticket,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<Ownership, StoreError> {
        let record = encode_completed_expiring(ticket.fingerprint(), response, expires_at(ttl))?;
        let args = [
            Arg::Bytes(ticket.pending_record()),
            Arg::Bytes(&record),
            Arg::Millis(ttl),
        ];
        let value = self
            .eval(Call::Fenced, &self.inner.scripts.complete, ticket, &args)
            .await?;
        parse_ownership(&value)
    }

    async fn release(&self, ticket: &Ticket) -> Result<Ownership, StoreError> {
        let args = [Arg::Bytes(ticket.pending_record())];
        let value = self
            .eval(Call::Fenced, &self.inner.scripts.release, ticket, &args)
            .await?;
        parse_ownership(&value)
    }

    async fn load_steps(&self, ticket: &Ticket) -> Result<Vec<(String, Bytes)>, StoreError> {
        let cmd = self.inner.keys.with_bytes(ticket.key(), load_command);
        let cmd = &cmd;
        let timeout = self.inner.timeout;
        let value = self
            .inner
            .lanes
            .run(timeout, Call::Fenced, |mut conn| async move {
                conn.set_response_timeout(timeout);
                cmd.query_async::<Value>(&mut conn).await
            })
            .await?;
        parse_load(value, ticket)
    }

    async fn record_step(
        &self,
        ticket: &Ticket,
        name: &str,
        entry: &[u8],
        ttl: Duration,
    ) -> Result<Ownership, StoreError> {
        let step = &*STEP_SCRIPT;
        let cmd = self.inner.keys.with_bytes(ticket.key(), |key| {
            step.command(false, key, ticket, name, entry, ttl)
        });
        let cmd = &cmd;
        let timeout = self.inner.timeout;
        let value = self
            .inner
            .lanes
            .run(timeout, Call::Fenced, |mut conn| async move {
                conn.set_response_timeout(timeout);
                match cmd.query_async::<Value>(&mut conn).await {
                    Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                        step.script().load_async(&mut conn).await?;
                        cmd.query_async::<Value>(&mut conn).await
                    }
                    answer => answer,
                }
            })
            .await?;
        parse_ownership(&value)
    }
}
