//! The Redis Cluster store: the same records, the same native claim and the same Lua scripts as
//! [`RedisStore`], on a cluster. Its builder is in [`builder`].
//!
//! # One slot per record
//!
//! A record is one key, `<prefix>{<32 hex digits>}`: the hex digest is a Redis Cluster hash tag, and
//! each script names exactly one key, `KEYS[1]`. So every script runs on the one master that owns
//! the record's slot, and a `CROSSSLOT` error cannot happen (a test checks both). The journal of
//! steps is the key `<prefix>{<32 hex digits>}:steps`, with the same hash tag: the step script
//! names both keys, in the same slot (the store suite runs it on a cluster).
//!
//! # Connections
//!
//! A [`ClusterConnection`] keeps one multiplexed connection per node and routes each command by its
//! key's slot, following `MOVED` and `ASK` redirects and refreshing its slot map when the cluster
//! changes (resharding, failover). Like [`RedisStore`], the store checks a few of them out of a
//! deadpool-redis cluster pool once and keeps them as lanes (a pool checkout per request would cost
//! a hidden `PING`). A lane that times out or loses its connection is dropped, and the next request
//! on it checks out a fresh cluster connection (a fresh view of the topology).
//!
//! # Scripts on every master
//!
//! A claim is a native `SET ... NX GET` (on a master older than Redis 7.0, the claim script); a
//! fenced write sends `EVALSHA`. A master that does not know the script yet (a new node, a replica
//! promoted by a failover, a `SCRIPT FLUSH`) answers `NOSCRIPT`, and the store sends the same call
//! as `EVAL` with the source: routed by the same key (so redirects are followed exactly as for
//! `EVALSHA`), and it caches the script on that node for the next `EVALSHA`. (A `SCRIPT LOAD` has
//! no key: it would go to every master and fail whenever any one of them is down.)
//!
//! # Durability: two modes
//!
//! Redis replicates asynchronously. By default a claim counts once its master acknowledged it; if
//! that master dies before its replica received the claim, the replica that takes over has no
//! record, and a retry runs the handler a second time. With
//! [`RedisClusterStoreBuilder::wait_for_replicas`], claim and complete are each pipelined with
//! `WAIT n timeout` on the same connection to the same master, and succeed only once `n` replicas
//! confirmed the write. See the builder method for what it costs and what it does not promise.
//!
//! [`RedisStore`]: super::RedisStore

use std::{fmt, sync::Arc, time::Duration};

mod builder;

pub use self::builder::RedisClusterStoreBuilder;
use self::builder::WaitForReplicas;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_redis::{
    cluster::Pool,
    redis::{
        self,
        cluster_async::ClusterConnection,
        cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr},
        Cmd, ServerErrorKind, Value,
    },
    Runtime,
};

use super::{
    lanes::{Call, Lanes},
    scripts::{
        expires_at, millis, native_claim, parse_claim_expiring, parse_native_claim_expiring,
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

/// A store on a Redis Cluster (or a managed service that speaks the cluster protocol).
///
/// Cloning is cheap; clones share connections.
#[derive(Clone)]
pub struct RedisClusterStore {
    inner: Arc<Inner>,
}

struct Inner {
    lanes: Lanes<Pool>,
    keys: KeyFormat,
    timeout: Duration,
    wait: Option<WaitForReplicas>,
    scripts: Scripts,
    claim_mode: ClaimMode,
}

impl fmt::Debug for RedisClusterStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisClusterStore")
            .field("prefix", &self.inner.keys.prefix())
            .field("timeout", &self.inner.timeout)
            .field("wait_for_replicas", &self.inner.wait)
            .field("lanes", &self.inner.lanes.len())
            .field("pool", &self.inner.lanes.pool().status())
            .finish()
    }
}

impl RedisClusterStore {
    /// A builder over an existing deadpool-redis cluster pool.
    pub fn builder(pool: Pool) -> RedisClusterStoreBuilder {
        RedisClusterStoreBuilder {
            pool,
            options: Options::default(),
            wait: None,
        }
    }

    /// A store with default settings over a new pool for the cluster that `urls` belong to
    /// (`["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"]`: a few nodes are enough, the rest
    /// are discovered).
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when a URL is invalid or the list is empty. No connection is
    /// made here.
    pub fn from_urls<S: AsRef<str>>(urls: &[S]) -> Result<Self, StoreError> {
        Ok(Self::builder(pool_for(urls)?).build())
    }

    /// The Redis key of the ticket's record (for tests that look at Redis directly).
    #[cfg(feature = "testing")]
    pub(crate) fn key_of(&self, ticket: &Ticket) -> String {
        self.inner.keys.string(ticket.key())
    }

    /// The pool behind the store.
    pub fn pool(&self) -> &Pool {
        self.inner.lanes.pool()
    }

    /// Connects and checks that the store can serve: the cluster answers, and no master's
    /// `maxmemory-policy` can evict records (see [`RedisClusterStoreBuilder::allow_eviction`]).
    /// Call it at start, so that a misconfigured cluster stops the app with the fix rather than
    /// failing its requests.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when the cluster cannot be reached or a master's policy can
    /// evict records (wrapping [`EvictionRisk`](crate::EvictionRisk), whose message names the
    /// fix); [`StoreError::Timeout`] when it does not answer within the store timeout.
    pub async fn check(&self) -> Result<(), StoreError> {
        self.inner.lanes.ping(self.inner.timeout).await
    }

    /// Runs `lua` on the master of `key`'s slot, pipelined with `WAIT` when `wait` is set.
    /// Answers the script's value and the number of replicas `WAIT` counted.
    async fn eval(
        &self,
        kind: Call,
        lua: &Lua,
        ticket: &Ticket,
        args: &[Arg<'_>],
        wait: Option<WaitForReplicas>,
    ) -> Result<(Value, Option<Value>), StoreError> {
        let timeout = self.inner.timeout + wait.map_or(Duration::ZERO, |w| w.timeout);
        let (evalsha, eval, route) = self.inner.keys.with_bytes(ticket.key(), |key| {
            let route = Route::with_key(key, SlotAddr::Master);
            (lua.evalsha(key, args), lua.eval(key, args), route)
        });
        let route = &SingleNodeRoutingInfo::SpecificNode(route);
        let (evalsha, eval) = (&evalsha, &eval);
        let mut values = self
            .inner
            .lanes
            .run(timeout, kind, |mut conn| async move {
                let values = send(&mut conn, evalsha, wait, route).await?;
                if !values.first().is_some_and(is_noscript) {
                    return Ok(values);
                }
                // Not loaded on this master yet (a new or promoted node, a flush): send the
                // source, routed by the same key. It also caches the script there.
                match (wait, values.get(1)) {
                    // The WAIT sent along found too few replicas, after its whole timeout (a
                    // promoted master has none yet): the write cannot be confirmed now, so do
                    // not wait a second time; report that count.
                    (Some(w), Some(&Value::Int(acked))) if acked < i64::from(w.replicas) => {
                        let mut values = send(&mut conn, eval, None, route).await?;
                        values.push(Value::Int(acked));
                        Ok(values)
                    }
                    _ => send(&mut conn, eval, wait, route).await,
                }
            })
            .await?
            .into_iter();
        let script = values
            .next()
            .ok_or_else(|| StoreError::Protocol("the cluster answered nothing".into()))?
            .extract_error()
            .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        Ok((script, values.next()))
    }

    /// The native claim (`SET ... NX GET`) on the master of the record's slot, pipelined with
    /// `WAIT` when `wait` is set. `None` when a master refused the syntax (older than Redis 7.0).
    async fn claim_natively(
        &self,
        ticket: &Ticket,
        lease: Duration,
        wait: Option<WaitForReplicas>,
    ) -> Result<Option<(Value, Option<Value>)>, StoreError> {
        let timeout = self.inner.timeout + wait.map_or(Duration::ZERO, |w| w.timeout);
        let (cmd, route) = self.inner.keys.with_bytes(ticket.key(), |key| {
            let cmd = native_claim(key, ticket.pending_record(), lease);
            (cmd, Route::with_key(key, SlotAddr::Master))
        });
        let route = &SingleNodeRoutingInfo::SpecificNode(route);
        let cmd = &cmd;
        let values = self
            .inner
            .lanes
            .run(timeout, Call::Claim, |mut conn| async move {
                match send(&mut conn, cmd, wait, route).await {
                    Err(e) if refuses_native_claim(&e) => Ok(None),
                    answer => answer.map(Some),
                }
            })
            .await?;
        let Some(values) = values else {
            return Ok(None);
        };
        let mut values = values.into_iter();
        let first = values
            .next()
            .ok_or_else(|| StoreError::Protocol("the cluster answered nothing".into()))?;
        match first.extract_error() {
            Ok(value) => Ok(Some((value, values.next()))),
            Err(e) if refuses_native_claim(&e) => Ok(None),
            Err(e) => Err(StoreError::Unavailable(Box::new(e))),
        }
    }

    /// The remaining lease of the in-flight record a native claim found (its `PTTL`, on the
    /// master of its slot), for the 409's `Retry-After`; the claim's `lease`, an upper bound,
    /// when the master does not answer.
    async fn remaining(&self, ticket: &Ticket, lease: Duration) -> Duration {
        let (cmd, route) = self.inner.keys.with_bytes(ticket.key(), |key| {
            (pttl(key), Route::with_key(key, SlotAddr::Master))
        });
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
        let (cmd, routing) = (&cmd, &routing);
        let answer = self
            .inner
            .lanes
            .run(self.inner.timeout, Call::Claim, |mut conn| async move {
                conn.route_command(cmd.clone(), routing.clone()).await
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

    /// [`Store::claim`], and how long a completed record it replays still lives (from the
    /// expiry the record carries), for the replay cache.
    pub(crate) async fn claim_expiring(
        &self,
        ticket: &Ticket,
        lease: Duration,
    ) -> Result<(Claim, Option<Duration>), StoreError> {
        // The cluster client re-sends a command whose connection broke before the answer came (a
        // master failing over, a reconnect): the second attempt can find the pending record the
        // first one wrote, and `parse_claim` recognises it as this request's own claim.
        let native = if self.inner.claim_mode.is_native() {
            let answer = self.claim_natively(ticket, lease, self.inner.wait).await?;
            if answer.is_none() {
                self.inner.claim_mode.fall_back();
            }
            answer
        } else {
            None
        };
        let claim = match native {
            Some((value, acked)) => match parse_native_claim_expiring(value, ticket, lease)? {
                (Claim::InFlight { .. }, _) => (
                    Claim::InFlight {
                        retry_after: self.remaining(ticket, lease).await,
                    },
                    None,
                    acked,
                ),
                (claim, expires_at) => (claim, expires_at, acked),
            },
            None => {
                let args = [Arg::Bytes(ticket.pending_record()), Arg::Millis(lease)];
                let (value, acked) = self
                    .eval(
                        Call::Claim,
                        &self.inner.scripts.claim,
                        ticket,
                        &args,
                        self.inner.wait,
                    )
                    .await?;
                let (claim, expires_at) = parse_claim_expiring(value, ticket)?;
                (claim, expires_at, acked)
            }
        };
        let (claim, expires_at, acked) = claim;
        if claim == Claim::Acquired {
            if let Err(err) = self.replicated(acked) {
                // The handler will not run: free the key rather than leave retries in flight until
                // the lease runs out. In the background, so that a dying master does not hold up
                // the 503; best effort, the lease frees the key otherwise.
                let (store, ticket) = (self.clone(), ticket.clone());
                tokio::spawn(async move {
                    if let Err(e) = store.release(&ticket).await {
                        tracing::debug!(error = %e, "an unreplicated claim was not released");
                    }
                });
                return Err(err);
            }
        }
        Ok((claim, remaining_life(expires_at)))
    }

    /// Makes the store claim with the Lua script, as it does on a Redis older than 7.0.
    #[cfg(feature = "testing")]
    pub(crate) fn claim_with_lua(&self) {
        self.inner.claim_mode.fall_back();
    }

    /// Whether `WAIT` counted enough replicas (always, without `wait_for_replicas`).
    fn replicated(&self, acked: Option<Value>) -> Result<(), StoreError> {
        let Some(wait) = self.inner.wait else {
            return Ok(());
        };
        let acked = match acked {
            Some(Value::Int(n)) => u32::try_from(n).unwrap_or(0),
            Some(Value::ServerError(e)) => {
                return Err(StoreError::Unavailable(Box::new(redis::RedisError::from(
                    e,
                ))))
            }
            other => {
                return Err(StoreError::Protocol(format!("WAIT answered {other:?}")));
            }
        };
        if acked >= wait.replicas {
            Ok(())
        } else {
            Err(StoreError::Unavailable(Box::new(NotReplicated {
                wanted: wait.replicas,
                acked,
                timeout: wait.timeout,
            })))
        }
    }
}

/// A deadpool-redis cluster pool for `urls`.
fn pool_for<S: AsRef<str>>(urls: &[S]) -> Result<Pool, StoreError> {
    if urls.is_empty() {
        return Err(StoreError::Unavailable(
            "a Redis Cluster store needs at least one node URL".into(),
        ));
    }
    let urls: Vec<String> = urls.iter().map(|u| u.as_ref().to_owned()).collect();
    deadpool_redis::cluster::Config::from_urls(urls)
        .create_pool(Some(Runtime::Tokio1))
        .map_err(|e| StoreError::Unavailable(Box::new(e)))
}

/// Sends `script` to the master of the key's slot: alone, or pipelined with `WAIT` on the same
/// connection, so that `WAIT` counts the replicas that have this very write. Answers one value per
/// command; a server error is a value here, so the caller can tell `NOSCRIPT` apart.
async fn send(
    conn: &mut ClusterConnection,
    script: &Cmd,
    wait: Option<WaitForReplicas>,
    route: &SingleNodeRoutingInfo,
) -> Result<Vec<Value>, redis::RedisError> {
    match wait {
        None => {
            let routing = RoutingInfo::SingleNode(route.clone());
            Ok(vec![conn.route_command(script.clone(), routing).await?])
        }
        Some(wait) => {
            let mut pipe = redis::pipe();
            pipe.add_command(script.clone())
                .cmd("WAIT")
                .arg(wait.replicas)
                .arg(millis(wait.timeout));
            conn.route_pipeline(pipe, 0, 2, route.clone()).await
        }
    }
}

fn is_noscript(value: &Value) -> bool {
    matches!(value, Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript))
}

/// A write that fewer replicas than asked for confirmed within the `WAIT` timeout (see
/// [`RedisClusterStoreBuilder::wait_for_replicas`]). Reported inside
/// [`StoreError::Unavailable`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{acked} of {wanted} replicas confirmed the write within {timeout:?}")]
pub struct NotReplicated {
    wanted: u32,
    acked: u32,
    timeout: Duration,
}

impl NotReplicated {
    /// How many replicas had to confirm the write.
    pub fn wanted(&self) -> u32 {
        self.wanted
    }

    /// How many did in time.
    pub fn acked(&self) -> u32 {
        self.acked
    }
}

#[async_trait]
impl Store for RedisClusterStore {
    fn kind(&self) -> &'static str {
        "redis_cluster"
    }

    async fn claim(&self, ticket: &Ticket, lease: Duration) -> Result<Claim, StoreError> {
        self.claim_expiring(ticket, lease)
            .await
            .map(|(claim, _)| claim)
    }

    async fn renew(&self, ticket: &Ticket, lease: Duration) -> Result<Ownership, StoreError> {
        let args = [Arg::Bytes(ticket.pending_record()), Arg::Millis(lease)];
        let (value, _) = self
            .eval(Call::Fenced, &self.inner.scripts.renew, ticket, &args, None)
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
        let (value, acked) = self
            .eval(
                Call::Fenced,
                &self.inner.scripts.complete,
                ticket,
                &args,
                self.inner.wait,
            )
            .await?;
        let ownership = parse_ownership(&value)?;
        if ownership == Ownership::Held {
            self.replicated(acked)?;
        }
        Ok(ownership)
    }

    async fn release(&self, ticket: &Ticket) -> Result<Ownership, StoreError> {
        let args = [Arg::Bytes(ticket.pending_record())];
        let (value, _) = self
            .eval(
                Call::Fenced,
                &self.inner.scripts.release,
                ticket,
                &args,
                None,
            )
            .await?;
        parse_ownership(&value)
    }

    async fn load_steps(&self, ticket: &Ticket) -> Result<Vec<(String, Bytes)>, StoreError> {
        let (cmd, route) = self.inner.keys.with_bytes(ticket.key(), |key| {
            (load_command(key), Route::with_key(key, SlotAddr::Master))
        });
        let route = &SingleNodeRoutingInfo::SpecificNode(route);
        let cmd = &cmd;
        let mut values = self
            .inner
            .lanes
            .run(self.inner.timeout, Call::Fenced, |mut conn| async move {
                send(&mut conn, cmd, None, route).await
            })
            .await?
            .into_iter();
        let value = values
            .next()
            .ok_or_else(|| StoreError::Protocol("the cluster answered nothing".into()))?
            .extract_error()
            .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        parse_load(value, ticket)
    }

    /// On the master of the record's slot, pipelined with `WAIT` under `wait_for_replicas` (a
    /// step's result is as precious as a completion); `NOSCRIPT` is answered with `EVAL`, routed
    /// by the same key.
    async fn record_step(
        &self,
        ticket: &Ticket,
        name: &str,
        entry: &[u8],
        ttl: Duration,
    ) -> Result<Ownership, StoreError> {
        let step = &*STEP_SCRIPT;
        let wait = self.inner.wait;
        let timeout = self.inner.timeout + wait.map_or(Duration::ZERO, |w| w.timeout);
        let (evalsha, eval, route) = self.inner.keys.with_bytes(ticket.key(), |key| {
            (
                step.command(false, key, ticket, name, entry, ttl),
                step.command(true, key, ticket, name, entry, ttl),
                Route::with_key(key, SlotAddr::Master),
            )
        });
        let route = &SingleNodeRoutingInfo::SpecificNode(route);
        let (evalsha, eval) = (&evalsha, &eval);
        let mut values = self
            .inner
            .lanes
            .run(timeout, Call::Fenced, |mut conn| async move {
                let values = send(&mut conn, evalsha, wait, route).await?;
                if values.first().is_some_and(is_noscript) {
                    return send(&mut conn, eval, wait, route).await;
                }
                Ok(values)
            })
            .await?
            .into_iter();
        let value = values
            .next()
            .ok_or_else(|| StoreError::Protocol("the cluster answered nothing".into()))?
            .extract_error()
            .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        let ownership = parse_ownership(&value)?;
        if ownership == Ownership::Held {
            self.replicated(values.next())?;
        }
        Ok(ownership)
    }
}
