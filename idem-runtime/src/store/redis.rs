//! The Redis store: one key per record, claim, renew, complete and release as Lua scripts.
//!
//! # Connections
//!
//! A deadpool-redis checkout recycles its connection before handing it out (a pipelined `UNWATCH`
//! and `PING`): a hidden round trip per request. Redis connections here are multiplexed, so one
//! connection serves any number of concurrent requests. The store therefore checks a few
//! connections out of the pool once and keeps them as *lanes*; a request clones a lane's handle
//! (no I/O) and sends exactly one `EVALSHA`. The pool still creates, health-checks and sizes
//! connections: when a lane's connection fails (an I/O error or a timeout), the lane drops it and
//! the next request checks a fresh one out of the pool.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_redis::{
    redis::{self, aio::MultiplexedConnection, Script, Value},
    Pool, Runtime,
};

use super::{millis, Ownership, Store, StoreError, Ticket};
use crate::{
    protocol::{classify, Claim},
    record::{encode_completed, Record, StoredResponse},
};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "idem:";
/// The default timeout of one store call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// The default number of multiplexed connections kept out of the pool.
pub const DEFAULT_LANES: usize = 2;

/// `KEYS[1]` record, `ARGV[1]` pending record, `ARGV[2]` lease in ms.
/// Answers 1 when the claim was taken, else `{existing record, PTTL}`.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if v then
  return {v, redis.call('PTTL', KEYS[1])}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// `KEYS[1]` record, `ARGV[1]` the owner's pending record, `ARGV[2]` lease in ms.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// `KEYS[1]` record, `ARGV[1]` the owner's pending record, `ARGV[2]` completed record,
/// `ARGV[3]` ttl in ms.
const COMPLETE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// `KEYS[1]` record, `ARGV[1]` the owner's pending record.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// The four scripts, hashed once. `EVALSHA` falls back to `SCRIPT LOAD` on `NOSCRIPT` (a restarted
/// or flushed server), then retries.
pub(crate) struct Scripts {
    pub(crate) claim: Script,
    pub(crate) renew: Script,
    pub(crate) complete: Script,
    pub(crate) release: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Self {
            claim: Script::new(CLAIM),
            renew: Script::new(RENEW),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
        }
    }
}

/// Parses the claim script's answer.
pub(crate) fn parse_claim(value: Value, ticket: &Ticket) -> Result<Claim, StoreError> {
    match value {
        Value::Int(1) => Ok(Claim::Acquired),
        Value::Array(items) => match <[Value; 2]>::try_from(items) {
            Ok([Value::BulkString(raw), Value::Int(pttl)]) => {
                let record = Record::decode(Bytes::from(raw))?;
                let remaining = Duration::from_millis(u64::try_from(pttl).unwrap_or(0));
                Ok(classify(record, ticket.fingerprint(), remaining))
            }
            _ => Err(StoreError::Protocol(
                "claim answered a malformed array".into(),
            )),
        },
        other => Err(StoreError::Protocol(format!("claim answered {other:?}"))),
    }
}

/// Parses a fenced script's answer.
pub(crate) fn parse_ownership(value: &Value) -> Result<Ownership, StoreError> {
    match value {
        Value::Int(1) => Ok(Ownership::Held),
        Value::Int(0) => Ok(Ownership::Lost),
        other => Err(StoreError::Protocol(format!(
            "a fenced write answered {other:?}"
        ))),
    }
}

/// Whether an error means the connection itself is no good.
pub(crate) fn is_connection_error(err: &redis::RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || err.is_unrecoverable_error()
}

/// A store on one Redis server (or a replicated primary).
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    lanes: Box<[Mutex<Option<Lane>>]>,
    next_lane: AtomicUsize,
    generation: AtomicU64,
    prefix: String,
    timeout: Duration,
    scripts: Scripts,
}

struct Lane {
    conn: MultiplexedConnection,
    generation: u64,
    // Held so the pool counts the connection as in use; taken from the pool when the lane fails.
    object: deadpool_redis::Connection,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .field("lanes", &self.inner.lanes.len())
            .field("pool", &self.inner.pool.status())
            .finish()
    }
}

/// Configures a [`RedisStore`].
#[derive(Debug)]
pub struct RedisStoreBuilder {
    pool: Pool,
    prefix: String,
    timeout: Duration,
    lanes: usize,
}

impl RedisStoreBuilder {
    /// The prefix of every key the store writes (default `idem:`).
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest a store call may take, connection included (default 2 s). A call that takes
    /// longer fails with [`StoreError::Timeout`], so a hung Redis cannot hang every request.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How many multiplexed connections the store keeps checked out (default 2, at least 1, at
    /// most the pool's size).
    #[must_use]
    pub fn lanes(mut self, lanes: usize) -> Self {
        self.lanes = lanes;
        self
    }

    /// Builds the store. No connection is made until the first call.
    pub fn build(self) -> RedisStore {
        let max = self.pool.status().max_size.max(1);
        let lanes = self.lanes.clamp(1, max);
        RedisStore {
            inner: Arc::new(Inner {
                pool: self.pool,
                lanes: (0..lanes).map(|_| Mutex::new(None)).collect(),
                next_lane: AtomicUsize::new(0),
                generation: AtomicU64::new(0),
                prefix: self.prefix,
                timeout: self.timeout,
                scripts: Scripts::new(),
            }),
        }
    }
}

impl RedisStore {
    /// A builder over an existing deadpool-redis pool.
    pub fn builder(pool: Pool) -> RedisStoreBuilder {
        RedisStoreBuilder {
            pool,
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            lanes: DEFAULT_LANES,
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

    /// The store key of a record.
    pub fn redis_key(&self, ticket: &Ticket) -> String {
        ticket.key().redis_key(&self.inner.prefix)
    }

    /// The pool behind the store.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    async fn lane(&self) -> Result<(usize, u64, MultiplexedConnection), StoreError> {
        let inner = &*self.inner;
        let i = inner.next_lane.fetch_add(1, Ordering::Relaxed) % inner.lanes.len();
        if let Some(lane) = lock(&inner.lanes[i]).as_ref() {
            return Ok((i, lane.generation, lane.conn.clone()));
        }
        let object = inner
            .pool
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        let mut slot = lock(&inner.lanes[i]);
        if let Some(lane) = slot.as_ref() {
            // Another request filled the lane meanwhile; `object` goes back to the pool.
            return Ok((i, lane.generation, lane.conn.clone()));
        }
        let generation = inner.generation.fetch_add(1, Ordering::Relaxed);
        let conn = MultiplexedConnection::clone(&object);
        *slot = Some(Lane {
            conn: conn.clone(),
            generation,
            object,
        });
        Ok((i, generation, conn))
    }

    fn drop_lane(&self, i: usize, generation: u64) {
        let mut slot = lock(&self.inner.lanes[i]);
        if slot.as_ref().is_some_and(|l| l.generation == generation) {
            if let Some(lane) = slot.take() {
                // Detach the broken connection so the pool makes a new one instead of recycling it.
                drop(deadpool_redis::Connection::take(lane.object));
            }
        }
    }

    async fn eval(&self, script: &Script, key: &str, args: &[&[u8]]) -> Result<Value, StoreError> {
        let timeout = self.inner.timeout;
        let mut lane = None;
        let call = async {
            let (i, generation, mut conn) = self.lane().await?;
            lane = Some((i, generation));
            // The connection's own response timeout (redis-rs defaults to 500 ms) would otherwise
            // cut a call short of the configured timeout.
            conn.set_response_timeout(timeout);
            let mut invocation = script.key(key);
            for arg in args {
                invocation.arg(*arg);
            }
            invocation
                .invoke_async::<Value>(&mut conn)
                .await
                .map_err(|e| (is_connection_error(&e), e))
                .map_err(|(broken, e)| {
                    if broken {
                        self.drop_lane(i, generation);
                    }
                    StoreError::Unavailable(Box::new(e))
                })
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => {
                if let Some((i, generation)) = lane {
                    self.drop_lane(i, generation);
                }
                Err(StoreError::Timeout(timeout))
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[async_trait]
impl Store for RedisStore {
    async fn claim(&self, ticket: &Ticket, lease: Duration) -> Result<Claim, StoreError> {
        let lease = millis(lease).to_string();
        let value = self
            .eval(
                &self.inner.scripts.claim,
                &self.redis_key(ticket),
                &[ticket.pending_record(), lease.as_bytes()],
            )
            .await?;
        parse_claim(value, ticket)
    }

    async fn renew(&self, ticket: &Ticket, lease: Duration) -> Result<Ownership, StoreError> {
        let lease = millis(lease).to_string();
        let value = self
            .eval(
                &self.inner.scripts.renew,
                &self.redis_key(ticket),
                &[ticket.pending_record(), lease.as_bytes()],
            )
            .await?;
        parse_ownership(&value)
    }

    async fn complete(
        &self,
        ticket: &Ticket,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<Ownership, StoreError> {
        let record = encode_completed(ticket.fingerprint(), response)?;
        let ttl = millis(ttl).to_string();
        let value = self
            .eval(
                &self.inner.scripts.complete,
                &self.redis_key(ticket),
                &[ticket.pending_record(), &record, ttl.as_bytes()],
            )
            .await?;
        parse_ownership(&value)
    }

    async fn release(&self, ticket: &Ticket) -> Result<Ownership, StoreError> {
        let value = self
            .eval(
                &self.inner.scripts.release,
                &self.redis_key(ticket),
                &[ticket.pending_record()],
            )
            .await?;
        parse_ownership(&value)
    }
}
