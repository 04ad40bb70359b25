//! The `maxmemory-policy` check: a Redis that may evict keys may evict idempotency records.
//!
//! Every record has a TTL, and an in-flight one has the shortest (its lease), so under any
//! `volatile-*` or `allkeys-*` policy a full Redis drops exactly the records that stop a duplicate
//! from running: a retry of an evicted in-flight request runs the handler a second time. With
//! `noeviction`, a full Redis refuses the writes instead (the request gets 503, which is the safe
//! answer).
//!
//! The stores refuse to serve under a policy that can evict, unless the app accepted the risk
//! (`allow_eviction` on the builders). A policy can change while the app runs (`CONFIG SET`, a
//! restart with another `redis.conf`, a failover to a node configured otherwise), so the policy of
//! every server the store writes to is read:
//!
//! - on every new connection, before its first call (the first connection, and every reconnect
//!   after a connection failed): that call waits for the check;
//! - while the store serves, again once every interval (`eviction_check_interval` on the
//!   builders, default [`DEFAULT_INTERVAL`]): the first call after the interval starts the check
//!   in the background and goes on, so no request waits for it and no claim carries an extra
//!   command; the calls after the check answered follow its verdict;
//! - while the store refuses, at most once a second ([`RECHECK`]), so that fixing the policy takes
//!   effect without restarting the app.
//!
//! A server that does not let the app read its configuration (a managed Redis, an ACL that denies
//! `CONFIG`, a renamed `CONFIG`) is served with one warning.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use deadpool_redis::redis::{
    self,
    aio::MultiplexedConnection,
    cluster_async::ClusterConnection,
    cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo},
    ErrorKind, Value,
};
use tokio::time::Instant;

use super::lanes::MultiplexedPool;

/// A Redis whose `maxmemory-policy` can evict idempotency records: the store refuses to serve on
/// it (every call fails with [`StoreError::Unavailable`](crate::StoreError::Unavailable) wrapping
/// this error, and requests get 503) until the policy is `noeviction` or the app accepted the
/// risk with [`RedisStoreBuilder::allow_eviction`](crate::RedisStoreBuilder::allow_eviction)
/// (or [`RedisClusterStoreBuilder::allow_eviction`](crate::RedisClusterStoreBuilder::allow_eviction)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Redis{} has maxmemory-policy `{policy}`: when it is full it evicts keys, idempotency records \
     included (in-flight ones first: they have the shortest TTL), and a retry of an evicted request \
     runs the handler again. Run `CONFIG SET maxmemory-policy noeviction` on it (and set it in its \
     configuration file), or accept the risk with `{builder}::allow_eviction()`",
    node.as_deref().map(|n| format!(" node {n}")).unwrap_or_default()
)]
pub struct EvictionRisk {
    policy: String,
    node: Option<String>,
    builder: &'static str,
}

impl EvictionRisk {
    /// The policy the server reported (`allkeys-lru`, `volatile-ttl`, ...).
    pub fn policy(&self) -> &str {
        &self.policy
    }
}

/// What the servers said about their policy.
#[derive(Debug, Default)]
pub(crate) struct Policies {
    /// `(node, policy)` for each server that answered (`None`: the one server).
    known: Vec<(Option<String>, String)>,
    /// Why a server's policy could not be read (it refused `CONFIG GET`).
    unknown: Vec<String>,
}

/// Whether `policy` lets Redis evict keys when it is full.
fn evicts(policy: &str) -> bool {
    !policy.eq_ignore_ascii_case("noeviction")
}

/// How often a store that refused re-reads the policy, so that fixing it (`CONFIG SET
/// maxmemory-policy noeviction`) takes effect without restarting the app, at the cost of at most
/// one `CONFIG GET` a second while it refuses.
const RECHECK: Duration = Duration::from_secs(1);

/// How often a serving store reads the policy again, unless the builder sets another interval.
pub(crate) const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// The check of one store. While the policy is safe and the interval has not run out, it costs a
/// call two atomic loads and a clock read.
pub(crate) struct EvictionCheck {
    /// `None`: the app accepted the risk, nothing is checked.
    state: Option<Arc<State>>,
}

struct State {
    builder: &'static str,
    /// The interval between two checks while the store serves, in milliseconds (at least 1).
    every_ms: u64,
    /// What `*_ms` times count from.
    origin: std::time::Instant,
    /// When (ms since `origin`, plus 1) the last check found every policy safe; 0 while the store
    /// refuses or has not checked yet.
    safe_at: AtomicU64,
    /// When (ms since `origin`, plus 1) the last verdict was recorded.
    judged_at: AtomicU64,
    /// A background check is running.
    checking: AtomicBool,
    /// The warning that a server's policy cannot be read was logged (once per store).
    warned: AtomicBool,
    /// Held by a check that a call waits for; the refusal, and when it was checked.
    refused: tokio::sync::Mutex<Option<(Instant, EvictionRisk)>>,
}

/// Whether the connection a call runs on was checked: the lane's record of the generation of the
/// connection that passed, and the generation of the one the call has.
pub(crate) struct Vetting<'a> {
    pub(crate) vetted: &'a AtomicU64,
    pub(crate) generation: u64,
}

impl Vetting<'_> {
    fn done(&self) -> bool {
        self.vetted.load(Ordering::Acquire) == self.generation.wrapping_add(1)
    }

    fn mark(&self) {
        self.vetted
            .store(self.generation.wrapping_add(1), Ordering::Release);
    }
}

impl EvictionCheck {
    /// A check for a store built by `builder` (named in the error), run again every `every` while
    /// the store serves; `allow` skips it.
    pub(crate) fn new(allow: bool, builder: &'static str, every: Duration) -> Self {
        let every_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX).max(1);
        Self {
            state: (!allow).then(|| {
                Arc::new(State {
                    builder,
                    every_ms,
                    origin: std::time::Instant::now(),
                    safe_at: AtomicU64::new(0),
                    judged_at: AtomicU64::new(0),
                    checking: AtomicBool::new(false),
                    warned: AtomicBool::new(false),
                    refused: tokio::sync::Mutex::new(None),
                })
            }),
        }
    }

    /// `Ok(Ok(()))` when the store may serve over `conn`; `Ok(Err(_))` when a server's policy can
    /// evict; `Err(_)` when a check the call waited for failed on the connection (the caller
    /// handles it like a failed call, and the check runs again on the next one).
    ///
    /// A connection that was not checked yet (`lane`) is checked before the call; a checked one
    /// serves at once, and starts a check in the background when the interval ran out.
    pub(crate) async fn admit<P: MultiplexedPool>(
        &self,
        conn: &P::Conn,
        lane: Vetting<'_>,
        timeout: Duration,
    ) -> Result<Result<(), EvictionRisk>, redis::RedisError> {
        let Some(state) = &self.state else {
            return Ok(Ok(()));
        };
        if lane.done() {
            let at = state.safe_at.load(Ordering::Acquire);
            if at != 0 {
                if state.now_ms().saturating_sub(at) >= state.every_ms {
                    State::recheck_in_background::<P>(state, conn, timeout);
                }
                return Ok(Ok(()));
            }
        }
        let mut refused = state.refused.lock().await;
        if lane.done() && state.safe_at.load(Ordering::Acquire) != 0 {
            // Another call checked this connection while this one waited.
            return Ok(Ok(()));
        }
        if let Some((at, risk)) = refused.as_ref() {
            if at.elapsed() < RECHECK {
                return Ok(Err(risk.clone()));
            }
        }
        let policies = P::policies(conn.clone(), timeout).await?;
        let verdict = state.judge(&mut refused, &policies);
        if verdict.is_ok() {
            lane.mark();
        }
        Ok(verdict)
    }
}

impl State {
    /// Milliseconds since `origin`, plus 1 (so that 0 can mean "never").
    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    /// Records what `policies` say, and answers it.
    fn judge(
        &self,
        refused: &mut Option<(Instant, EvictionRisk)>,
        policies: &Policies,
    ) -> Result<(), EvictionRisk> {
        let risk = policies
            .known
            .iter()
            .find(|(_, policy)| evicts(policy))
            .map(|(node, policy)| EvictionRisk {
                policy: policy.clone(),
                node: node.clone(),
                builder: self.builder,
            });
        self.judged_at.store(self.now_ms(), Ordering::Release);
        if let Some(risk) = risk {
            self.safe_at.store(0, Ordering::Release);
            if refused.is_none() {
                tracing::error!(error = %risk, "the idempotency store refuses to serve");
            }
            *refused = Some((Instant::now(), risk.clone()));
            return Err(risk);
        }
        if let Some(reason) = policies.unknown.first() {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    reason = %reason,
                    "could not read Redis's maxmemory-policy: make sure it is `noeviction`, or \
                     Redis may evict idempotency records when it is full and a retry would run \
                     the handler again"
                );
            }
        }
        if refused.take().is_some() {
            tracing::info!("Redis's maxmemory-policy no longer evicts: the store serves again");
        }
        self.safe_at.store(self.now_ms(), Ordering::Release);
        Ok(())
    }

    /// Starts a check on `conn` in the background, unless one is running. Its verdict applies to
    /// the calls that come after it; a check that fails (a broken connection, a master that does
    /// not answer) is tried again a second later, and the store goes on serving meanwhile: every
    /// new connection is checked before its first call anyway.
    fn recheck_in_background<P: MultiplexedPool>(
        state: &Arc<Self>,
        conn: &P::Conn,
        timeout: Duration,
    ) {
        if state.checking.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            state.checking.store(false, Ordering::Release);
            return;
        };
        let running = Checking(Arc::clone(state));
        let conn = conn.clone();
        runtime.spawn(async move {
            let state = &running.0;
            let asked_at = state.now_ms();

            let answer = tokio::time::timeout(timeout, P::policies(conn, timeout)).await;
            match answer {
                Ok(Ok(policies)) => {
                    let mut refused = state.refused.lock().await;
                    // A verdict is not overturned by an older reading: while this check ran, a
                    // call may have waited for a check of its own, asked later.
                    if state.judged_at.load(Ordering::Acquire) < asked_at {
                        let _ = state.judge(&mut refused, &policies);
                    }
                }
                failed => {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {timeout:?}"),
                    };
                    tracing::debug!(%error, "could not read Redis's maxmemory-policy again; trying again in a second");
                    let at = state.safe_at.load(Ordering::Acquire);
                    if at != 0 {
                        let again = state
                            .now_ms()
                            .saturating_sub(state.every_ms)
                            .saturating_add(u64::try_from(RECHECK.as_millis()).unwrap_or(1000))
                            .max(1);
                        let _ = state.safe_at.compare_exchange(
                            at,
                            again,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        );
                    }
                }
            }
        });
    }
}

/// Clears `checking` when the background check ends, also when its task is dropped (a runtime
/// that shuts down), so that the next interval starts a new one.
struct Checking(Arc<State>);

impl Drop for Checking {
    fn drop(&mut self) {
        self.0.checking.store(false, Ordering::Release);
    }
}

fn config_get() -> redis::Cmd {
    let mut cmd = redis::cmd("CONFIG");
    cmd.arg("GET").arg("maxmemory-policy");
    cmd
}

/// Whether the server refused the command itself (an ACL, a renamed or disabled `CONFIG`), as
/// opposed to the connection failing.
fn refused_command(err: &redis::RedisError) -> bool {
    matches!(err.kind(), ErrorKind::Server(_) | ErrorKind::Extension)
}

/// The policy in a `CONFIG GET maxmemory-policy` answer (a flat array in RESP2, a map in RESP3).
fn policy_in(value: &Value) -> Option<String> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    match value {
        Value::Array(items) => items
            .chunks(2)
            .find(|pair| pair.first().and_then(text).as_deref() == Some("maxmemory-policy"))
            .and_then(|pair| pair.get(1).and_then(text)),
        Value::Map(pairs) => pairs
            .iter()
            .find(|(k, _)| text(k).as_deref() == Some("maxmemory-policy"))
            .and_then(|(_, v)| text(v)),
        _ => None,
    }
}

fn record(policies: &mut Policies, node: Option<String>, value: &Value) {
    match policy_in(value) {
        Some(policy) => policies.known.push((node, policy)),
        None => policies.unknown.push(match node {
            Some(node) => format!("{node} answered {value:?} to CONFIG GET maxmemory-policy"),
            None => format!("the server answered {value:?} to CONFIG GET maxmemory-policy"),
        }),
    }
}

/// The policy of the one server.
pub(crate) async fn single_policies(
    mut conn: MultiplexedConnection,
    timeout: Duration,
) -> Result<Policies, redis::RedisError> {
    conn.set_response_timeout(timeout);
    let mut policies = Policies::default();
    match config_get().query_async::<Value>(&mut conn).await {
        Ok(value) => record(&mut policies, None, &value),
        Err(e) if refused_command(&e) => policies.unknown.push(e.to_string()),
        Err(e) => return Err(e),
    }
    Ok(policies)
}

/// The policy of every master of the cluster (the servers that hold records).
pub(crate) async fn cluster_policies(
    mut conn: ClusterConnection,
    _timeout: Duration,
) -> Result<Policies, redis::RedisError> {
    let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
    let mut policies = Policies::default();
    match conn.route_command(config_get(), routing).await {
        // One answer per master, by address.
        Ok(Value::Map(answers)) => {
            for (node, value) in answers {
                let node = match &node {
                    Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                    other => format!("{other:?}"),
                };
                match value {
                    Value::ServerError(e) => policies.unknown.push(format!("{node}: {e:?}")),
                    value => record(&mut policies, Some(node), &value),
                }
            }
        }
        Ok(other) => record(&mut policies, None, &other),
        Err(e) if refused_command(&e) => policies.unknown.push(e.to_string()),
        Err(e) => return Err(e),
    }
    Ok(policies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_noeviction_keeps_every_key() {
        assert!(!evicts("noeviction"));
        for policy in [
            "allkeys-lru",
            "allkeys-lfu",
            "allkeys-random",
            "volatile-lru",
            "volatile-lfu",
            "volatile-random",
            "volatile-ttl",
        ] {
            assert!(evicts(policy), "{policy}");
        }
    }

    #[test]
    fn reads_the_policy_in_both_protocols() {
        let name = Value::BulkString(b"maxmemory-policy".to_vec());
        let policy = Value::BulkString(b"volatile-lru".to_vec());
        let resp2 = Value::Array(vec![name.clone(), policy.clone()]);
        let resp3 = Value::Map(vec![(name, policy)]);
        assert_eq!(policy_in(&resp2).as_deref(), Some("volatile-lru"));
        assert_eq!(policy_in(&resp3).as_deref(), Some("volatile-lru"));
        assert_eq!(policy_in(&Value::Array(vec![])), None);
    }

    #[test]
    fn the_error_names_the_policy_and_both_fixes() {
        let risk = EvictionRisk {
            policy: "allkeys-lru".into(),
            node: None,
            builder: "RedisStoreBuilder",
        };
        let text = risk.to_string();
        assert!(text.contains("`allkeys-lru`"), "{text}");
        assert!(
            text.contains("CONFIG SET maxmemory-policy noeviction"),
            "{text}"
        );
        assert!(
            text.contains("RedisStoreBuilder::allow_eviction()"),
            "{text}"
        );
    }
}
