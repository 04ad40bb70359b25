//! The `maxmemory-policy` check: a Redis that may evict keys may evict idempotency records.
//!
//! Every record has a TTL, and an in-flight one has the shortest (its lease), so under any
//! `volatile-*` or `allkeys-*` policy a full Redis drops exactly the records that stop a duplicate
//! from running: a retry of an evicted in-flight request runs the handler a second time. With
//! `noeviction`, a full Redis refuses the writes instead (the request gets 503, which is the safe
//! answer).
//!
//! The stores check the policy of every server they write to the first time they connect, and
//! refuse to serve under a policy that can evict, unless the app accepted the risk
//! (`allow_eviction` on the builders). A server that does not let the app read its configuration
//! (a managed Redis, an ACL that denies `CONFIG`, a renamed `CONFIG`) is served with one warning.

use std::{
    sync::atomic::{AtomicBool, Ordering},
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

/// The check, made once per store: when it passed (or was skipped), it costs an atomic load per
/// call.
pub(crate) struct EvictionCheck {
    builder: &'static str,
    passed: AtomicBool,
    refused: tokio::sync::Mutex<Option<(Instant, EvictionRisk)>>,
}

impl EvictionCheck {
    /// A check for a store built by `builder` (named in the error); `allow` skips it.
    pub(crate) fn new(allow: bool, builder: &'static str) -> Self {
        Self {
            builder,
            passed: AtomicBool::new(allow),
            refused: tokio::sync::Mutex::new(None),
        }
    }

    /// `Ok(Ok(()))` when the store may serve over `conn`; `Ok(Err(_))` when a server's policy can
    /// evict; `Err(_)` when the check itself failed on the connection (the caller handles it like
    /// a failed call, and the check runs again on the next one).
    pub(crate) async fn admit<P: MultiplexedPool>(
        &self,
        conn: &P::Conn,
        timeout: Duration,
    ) -> Result<Result<(), EvictionRisk>, redis::RedisError> {
        if self.passed.load(Ordering::Acquire) {
            return Ok(Ok(()));
        }
        let mut refused = self.refused.lock().await;
        if self.passed.load(Ordering::Acquire) {
            return Ok(Ok(()));
        }
        if let Some((at, risk)) = refused.as_ref() {
            if at.elapsed() < RECHECK {
                return Ok(Err(risk.clone()));
            }
        }
        let policies = P::policies(conn.clone(), timeout).await?;
        let risk = policies
            .known
            .iter()
            .find(|(_, policy)| evicts(policy))
            .map(|(node, policy)| EvictionRisk {
                policy: policy.clone(),
                node: node.clone(),
                builder: self.builder,
            });
        if let Some(risk) = risk {
            if refused.is_none() {
                tracing::error!(error = %risk, "the idempotency store refuses to serve");
            }
            *refused = Some((Instant::now(), risk.clone()));
            return Ok(Err(risk));
        }
        for reason in &policies.unknown {
            tracing::warn!(
                reason = %reason,
                "could not read Redis's maxmemory-policy: make sure it is `noeviction`, or Redis may \
                 evict idempotency records when it is full and a retry would run the handler again"
            );
        }
        if refused.take().is_some() {
            tracing::info!("Redis's maxmemory-policy no longer evicts: the store serves again");
        }
        self.passed.store(true, Ordering::Release);
        Ok(Ok(()))
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
