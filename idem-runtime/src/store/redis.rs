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
//!
//! A [`RedisStore`] gives each thread that calls it one lane (threads are numbered as they first
//! call, modulo the number of lanes), and a lane's connection is opened by the first thread that
//! takes it, so its I/O task runs on that thread: with as many lanes as actix workers, no command
//! or answer crosses threads. Set [`RedisStoreBuilder::lanes`] to the number of workers.

use std::{
    fmt,
    future::Future,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_redis::{
    redis::{
        self, aio::MultiplexedConnection, cluster_async::ClusterConnection, ErrorKind, Script,
        ServerErrorKind, Value,
    },
    Pool, Runtime,
};

use super::{millis, Ownership, Store, StoreError, Ticket};
use crate::{
    protocol::{classify, Claim},
    record::{encode_completed, Record, StoredResponse},
    scope::RecordKey,
};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "idem:";
/// The default timeout of one store call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// The default number of multiplexed connections kept out of the pool.
pub const DEFAULT_LANES: usize = 2;

/// `KEYS[1]` record, `ARGV[1]` pending record, `ARGV[2]` lease in ms.
/// Answers 1 when the claim was taken, else `{existing record, PTTL}`. Only an in-flight record
/// needs its PTTL (the `Retry-After` of a 409), so the script asks for it only when the record's
/// kind byte (the 4th, see [`crate::record`]) is `P` (80): a replay costs Redis one inner call,
/// not two, and answers `{record, 0}`.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if v then
  if string.byte(v, 4) == 80 then
    return {v, redis.call('PTTL', KEYS[1])}
  end
  return {v, 0}
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
/// or flushed server), then retries; the cluster store falls back to `EVAL` instead (see
/// `cluster.rs`).
pub(crate) struct Scripts {
    pub(crate) claim: Lua,
    pub(crate) renew: Lua,
    pub(crate) complete: Lua,
    pub(crate) release: Lua,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Self {
            claim: Lua::new(CLAIM),
            renew: Lua::new(RENEW),
            complete: Lua::new(COMPLETE),
            release: Lua::new(RELEASE),
        }
    }

    /// The four scripts by name, as sent to Redis.
    pub(crate) fn sources() -> [(&'static str, &'static str); 4] {
        [
            ("claim", CLAIM),
            ("renew", RENEW),
            ("complete", COMPLETE),
            ("release", RELEASE),
        ]
    }
}

/// A script with its source: the cluster store sends the source (`EVAL`) where a node does not
/// know the hash yet, so that the fallback is routed by key like the call itself.
pub(crate) struct Lua {
    pub(crate) script: Script,
    pub(crate) source: &'static str,
}

impl Lua {
    fn new(source: &'static str) -> Self {
        Self {
            script: Script::new(source),
            source,
        }
    }
}

impl std::ops::Deref for Lua {
    type Target = Script;

    fn deref(&self) -> &Script {
        &self.script
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

/// A deadpool pool of multiplexed connections: one checked-out connection serves any number of
/// concurrent requests through cheap clones of its handle. Implemented for the single-server pool
/// and the cluster pool, so that both stores keep their connections as [`Lanes`].
pub(crate) trait MultiplexedPool: Send + Sync + 'static {
    /// The handle one request clones (no I/O).
    type Conn: Clone + Send + 'static;
    /// The pool's object, held while its lane lives so the pool counts it as in use.
    type Object: Send + 'static;

    /// The pool's maximum size.
    fn max_size(&self) -> usize;

    /// Checks a connection out of the pool (the pool creates or recycles it).
    fn checkout(&self) -> impl Future<Output = Result<Self::Object, StoreError>> + Send;

    /// The handle of a checked-out connection.
    fn handle(object: &Self::Object) -> Self::Conn;

    /// Takes a broken connection out of the pool for good, so it makes a new one instead of
    /// recycling it.
    fn detach(object: Self::Object);
}

impl MultiplexedPool for Pool {
    type Conn = MultiplexedConnection;
    type Object = deadpool_redis::Connection;

    fn max_size(&self) -> usize {
        self.status().max_size
    }

    async fn checkout(&self) -> Result<Self::Object, StoreError> {
        self.get()
            .await
            .map_err(|e| StoreError::Unavailable(Box::new(e)))
    }

    fn handle(object: &Self::Object) -> Self::Conn {
        MultiplexedConnection::clone(object)
    }

    fn detach(object: Self::Object) {
        drop(deadpool_redis::Connection::take(object));
    }
}

impl MultiplexedPool for deadpool_redis::cluster::Pool {
    type Conn = ClusterConnection;
    type Object = deadpool_redis::cluster::Connection;

    fn max_size(&self) -> usize {
        self.status().max_size
    }

    async fn checkout(&self) -> Result<Self::Object, StoreError> {
        self.get()
            .await
            .map_err(|e| StoreError::Unavailable(Box::new(e)))
    }

    fn handle(object: &Self::Object) -> Self::Conn {
        ClusterConnection::clone(object)
    }

    fn detach(object: Self::Object) {
        drop(deadpool_redis::cluster::Connection::take(object));
    }
}

/// A few connections checked out of a pool once and kept, each serving the calls that pick it (in
/// turn, or by thread: see [`Pick`] and the module docs). A lane whose connection fails (an I/O
/// error or a timeout) is dropped, and the next request on it checks a fresh connection out of
/// the pool.
pub(crate) struct Lanes<P: MultiplexedPool> {
    pool: P,
    lanes: Box<[Slot<P>]>,
    pick: Pick,
    generation: AtomicU64,
}

/// How a call picks its lane.
enum Pick {
    /// Successive calls take successive lanes.
    RoundRobin(AtomicUsize),
    /// A thread always takes the same lane.
    Thread,
}

struct Slot<P: MultiplexedPool> {
    lane: Mutex<Option<Lane<P>>>,
    // Held by the one request that checks a connection out for an empty lane; the others wait for
    // it. Without it, with as many lanes as the pool has connections, a burst of first requests
    // could leave every connection kept by a lane and the rest waiting on the pool for ever.
    filling: tokio::sync::Mutex<()>,
}

struct Lane<P: MultiplexedPool> {
    conn: P::Conn,
    generation: u64,
    // Held so the pool counts the connection as in use; taken from the pool when the lane fails.
    object: P::Object,
}

impl<P: MultiplexedPool> Lanes<P> {
    /// `lanes` connections at most, clamped to 1..=the pool's size, taken in turn by successive
    /// calls.
    pub(crate) fn new(pool: P, lanes: usize) -> Self {
        Self::with_pick(pool, lanes, Pick::RoundRobin(AtomicUsize::new(0)))
    }

    /// `lanes` connections at most, clamped to 1..=the pool's size, each taken by the threads that
    /// map to it (see [`thread_lane`]): with as many lanes as worker threads, each worker has a
    /// connection whose I/O task runs on its own thread.
    pub(crate) fn per_thread(pool: P, lanes: usize) -> Self {
        Self::with_pick(pool, lanes, Pick::Thread)
    }

    fn with_pick(pool: P, lanes: usize, pick: Pick) -> Self {
        let lanes = lanes.clamp(1, pool.max_size().max(1));
        Self {
            pool,
            lanes: (0..lanes)
                .map(|_| Slot {
                    lane: Mutex::new(None),
                    filling: tokio::sync::Mutex::new(()),
                })
                .collect(),
            pick,
            generation: AtomicU64::new(0),
        }
    }

    pub(crate) fn pool(&self) -> &P {
        &self.pool
    }

    pub(crate) fn len(&self) -> usize {
        self.lanes.len()
    }

    async fn lane(&self) -> Result<(usize, u64, P::Conn), StoreError> {
        let i = match &self.pick {
            Pick::RoundRobin(next) => next.fetch_add(1, Ordering::Relaxed),
            Pick::Thread => thread_lane(),
        } % self.lanes.len();
        let slot = &self.lanes[i];
        if let Some(lane) = lock(&slot.lane).as_ref() {
            return Ok((i, lane.generation, lane.conn.clone()));
        }
        let _filling = slot.filling.lock().await;
        if let Some(lane) = lock(&slot.lane).as_ref() {
            // Filled while this request waited.
            return Ok((i, lane.generation, lane.conn.clone()));
        }
        let object = self.pool.checkout().await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let conn = P::handle(&object);
        *lock(&slot.lane) = Some(Lane {
            conn: conn.clone(),
            generation,
            object,
        });
        Ok((i, generation, conn))
    }

    fn drop_lane(&self, i: usize, generation: u64) {
        let mut slot = lock(&self.lanes[i].lane);
        if slot.as_ref().is_some_and(|l| l.generation == generation) {
            if let Some(lane) = slot.take() {
                P::detach(lane.object);
            }
        }
    }

    /// Runs `call` on a lane's connection within `timeout` (connection included). A connection
    /// error or a timeout drops the lane.
    pub(crate) async fn run<T, F, Fut>(&self, timeout: Duration, call: F) -> Result<T, StoreError>
    where
        F: FnOnce(P::Conn) -> Fut,
        Fut: Future<Output = Result<T, redis::RedisError>>,
    {
        let mut lane = None;
        let attempt = async {
            let (i, generation, conn) = self.lane().await?;
            lane = Some((i, generation));
            call(conn).await.map_err(|e| {
                if is_connection_error(&e) {
                    self.drop_lane(i, generation);
                }
                // The connection's response timeout is the store's (see `eval`), so it races
                // the timer below: either way the call took the whole timeout.
                if e.is_timeout() {
                    StoreError::Timeout(timeout)
                } else {
                    StoreError::Unavailable(Box::new(e))
                }
            })
        };
        match tokio::time::timeout(timeout, attempt).await {
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

/// A store on one Redis server (or a replicated primary).
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    lanes: Lanes<Pool>,
    prefix: String,
    timeout: Duration,
    scripts: Scripts,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
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
    /// most the pool's size). Each thread that calls the store uses one of them, so the number of
    /// actix workers is the best value: every worker then has a connection of its own.
    #[must_use]
    pub fn lanes(mut self, lanes: usize) -> Self {
        self.lanes = lanes;
        self
    }

    /// Builds the store. No connection is made until the first call.
    pub fn build(self) -> RedisStore {
        RedisStore {
            inner: Arc::new(Inner {
                lanes: Lanes::per_thread(self.pool, self.lanes),
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
        self.inner.lanes.pool()
    }

    /// Calls `f` with the store key of a record, as bytes: the same as
    /// [`RecordKey::redis_key`], built on the stack for any prefix up to 62 bytes.
    fn with_key_bytes<R>(&self, key: &RecordKey, f: impl FnOnce(&[u8]) -> R) -> R {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut tag = [0u8; 34];
        tag[0] = b'{';
        for (i, b) in key.as_bytes()[..16].iter().enumerate() {
            tag[1 + 2 * i] = HEX[usize::from(b >> 4)];
            tag[2 + 2 * i] = HEX[usize::from(b & 0xf)];
        }
        tag[33] = b'}';
        let prefix = self.inner.prefix.as_bytes();
        let mut buf = [0u8; 96];
        if let Some(dst) = buf.get_mut(..prefix.len() + tag.len()) {
            let (head, rest) = dst.split_at_mut(prefix.len());
            head.copy_from_slice(prefix);
            rest.copy_from_slice(&tag);
            f(dst)
        } else {
            f(&[prefix, &tag[..]].concat())
        }
    }

    /// Runs `script` on the ticket's record in one `EVALSHA` round trip (plus a `SCRIPT LOAD`
    /// and a retry after `NOSCRIPT`, when the server lost its scripts).
    ///
    /// The command is packed straight from the borrowed arguments into one buffer sized up
    /// front: a request copies its record into the command once.
    async fn eval(
        &self,
        script: &Script,
        ticket: &Ticket,
        args: &[Arg<'_>],
    ) -> Result<Value, StoreError> {
        // "EVALSHA", the hash, "1", the key, then the arguments (a duration is at most 20 digits).
        let data = 7 + 40 + 1 + self.inner.prefix.len() + 34;
        let data = data + args.iter().map(Arg::len).sum::<usize>();
        let mut cmd = redis::Cmd::with_capacity(4 + args.len(), data);
        cmd.arg("EVALSHA").arg(script.get_hash()).arg(1);
        self.with_key_bytes(ticket.key(), |key| cmd.arg(key));
        for arg in args {
            match *arg {
                Arg::Bytes(bytes) => cmd.arg(bytes),
                Arg::Millis(ms) => cmd.arg(ms),
            };
        }
        let cmd = &cmd;
        self.inner
            .lanes
            .run(self.inner.timeout, |mut conn| async move {
                // The connection's own response timeout (redis-rs defaults to 500 ms) would
                // otherwise cut a call short of the configured timeout.
                conn.set_response_timeout(self.inner.timeout);
                match cmd.query_async::<Value>(&mut conn).await {
                    Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                        script.load_async(&mut conn).await?;
                        cmd.query_async::<Value>(&mut conn).await
                    }
                    answer => answer,
                }
            })
            .await
    }
}

/// One script argument after the key.
enum Arg<'a> {
    Bytes(&'a [u8]),
    /// A duration in milliseconds, sent as its decimal digits.
    Millis(u64),
}

impl Arg<'_> {
    /// The most bytes the argument takes in the command.
    fn len(&self) -> usize {
        match self {
            Self::Bytes(bytes) => bytes.len(),
            Self::Millis(_) => 20,
        }
    }
}

/// The lane a thread uses: threads are numbered in the order they first call a store, so that
/// each of `lanes` threads (an actix worker each) gets a connection of its own. A multiplexed
/// connection's I/O task runs on the thread that opened it; a request from another thread would
/// hand every command and every answer across threads (a wake-up, often a futex and an eventfd
/// write, each way).
fn thread_lane() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static LANE: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    LANE.with(|lane| *lane)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[async_trait]
impl Store for RedisStore {
    async fn claim(&self, ticket: &Ticket, lease: Duration) -> Result<Claim, StoreError> {
        let value = self
            .eval(
                &self.inner.scripts.claim,
                ticket,
                &[
                    Arg::Bytes(ticket.pending_record()),
                    Arg::Millis(millis(lease)),
                ],
            )
            .await?;
        parse_claim(value, ticket)
    }

    async fn renew(&self, ticket: &Ticket, lease: Duration) -> Result<Ownership, StoreError> {
        let value = self
            .eval(
                &self.inner.scripts.renew,
                ticket,
                &[
                    Arg::Bytes(ticket.pending_record()),
                    Arg::Millis(millis(lease)),
                ],
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
        let value = self
            .eval(
                &self.inner.scripts.complete,
                ticket,
                &[
                    Arg::Bytes(ticket.pending_record()),
                    Arg::Bytes(&record),
                    Arg::Millis(millis(ttl)),
                ],
            )
            .await?;
        parse_ownership(&value)
    }

    async fn release(&self, ticket: &Ticket) -> Result<Ownership, StoreError> {
        let value = self
            .eval(
                &self.inner.scripts.release,
                ticket,
                &[Arg::Bytes(ticket.pending_record())],
            )
            .await?;
        parse_ownership(&value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{key::IdempotencyKey, scope::ScopeId};

    /// The claim script tells an in-flight record by its 4th byte (`string.byte(v, 4) == 80`).
    #[test]
    fn the_claim_script_reads_the_record_kind_where_the_encoding_puts_it() {
        use crate::{fingerprint::Fingerprint, record::OwnerToken};
        let fp = Fingerprint::compute("POST", "/p", "", b"{}");
        let pending = crate::record::encode_pending(&fp, &OwnerToken::random());
        assert_eq!(pending[3], 80);
        let completed = encode_completed(
            &fp,
            &StoredResponse {
                status: actix_web::http::StatusCode::CREATED,
                headers: vec![],
                body: Bytes::from_static(b"P"),
            },
        )
        .expect("encodes");
        assert_ne!(completed[3], 80);
        assert!(CLAIM.contains("string.byte(v, 4) == 80"));
    }

    #[test]
    fn key_bytes_are_the_record_keys_redis_key() {
        let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:1")
            .create_pool(Some(Runtime::Tokio1))
            .expect("a pool needs no connection");
        let long = "a prefix longer than the stack buffer: ".repeat(3);
        for prefix in ["idem:", "", "a much longer prefix:with:parts:", &long] {
            let store = RedisStore::builder(pool.clone()).prefix(prefix).build();
            for key in ["k", "8e03978e-40d5-43e8-bc93-6894a57f9324", "{evil}"] {
                let key = IdempotencyKey::parse(key.as_bytes()).expect("valid key");
                let record = RecordKey::new(&ScopeId::new("alice"), &key);
                assert_eq!(
                    store.with_key_bytes(&record, <[u8]>::to_vec),
                    record.redis_key(prefix).into_bytes()
                );
            }
        }
    }
}
