//! [`RedisClusterStoreBuilder`]: the cluster store's settings, and its two durability modes.

use std::{fmt, sync::Arc, time::Duration};

use deadpool_redis::cluster::Pool;

use super::{Inner, RedisClusterStore};
use crate::store::redis::{
    eviction::EvictionCheck,
    lanes::Lanes,
    scripts::{ClaimMode, Scripts},
    KeyFormat, Options,
};

#[derive(Debug, Clone, Copy)]
pub(super) struct WaitForReplicas {
    pub(super) replicas: u32,
    pub(super) timeout: Duration,
}

/// Configures a [`RedisClusterStore`].
pub struct RedisClusterStoreBuilder {
    pub(super) pool: Pool,
    pub(super) options: Options,
    pub(super) wait: Option<WaitForReplicas>,
}

impl fmt::Debug for RedisClusterStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisClusterStoreBuilder")
            .field("prefix", &self.options.keys.prefix())
            .field("timeout", &self.options.timeout)
            .field("lanes", &self.options.lanes)
            .field("wait_for_replicas", &self.wait)
            .finish_non_exhaustive()
    }
}

impl RedisClusterStoreBuilder {
    /// The prefix of every key the store writes (default `idem:`). Keep `{` out of it: Redis
    /// hashes the first `{...}` of a key, so a prefix with a hash tag would put every record in
    /// one slot, on one master.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.options.keys = KeyFormat::new(prefix);
        self
    }

    /// The longest a store call may take, connection and redirects included (default 2 s). A call
    /// that takes longer fails with [`StoreError::Timeout`] (a 503), so a failing master cannot
    /// hang requests while the cluster fails over. With
    /// [`wait_for_replicas`](Self::wait_for_replicas), claim and complete get the `WAIT` timeout
    /// on top.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.options.timeout = timeout;
        self
    }

    /// How many cluster connections the store keeps checked out (default 2, at least 1, at most
    /// the pool's size). Each holds one connection per node. With
    /// [`wait_for_replicas`](Self::wait_for_replicas), raise it: a node answers the commands of
    /// one connection in order, so every `WAIT` holds up the calls queued behind it on that
    /// connection.
    #[must_use]
    pub fn lanes(mut self, lanes: usize) -> Self {
        self.options.lanes = lanes;
        self
    }

    /// Durable claims: after the claim and after the completion, wait until `replicas` replicas
    /// of the record's master confirmed the write, for at most `timeout` (at least 1 ms). `0`
    /// replicas (the default) turns it off.
    ///
    /// # The two modes
    ///
    /// - **Acknowledged by the master** (the default). One round trip per claim and per
    ///   completion, as on a single Redis. Redis replicates asynchronously: if a master dies
    ///   after it acknowledged a claim and before its replica received it, the replica that takes
    ///   over has no record, and a retry of that request runs the handler a second time. The window
    ///   is the replication lag, usually well under a millisecond, but a failover is exactly when
    ///   replicas lag.
    /// - **Confirmed by `replicas` replicas** (this method). Claim and completion are each sent as
    ///   a pipeline of the script and `WAIT replicas timeout`, on one connection to the record's
    ///   master: still one network round trip each, two commands, and the answer waits for the
    ///   replicas' acknowledgement. A claim that too few replicas confirmed fails with
    ///   [`StoreError::Unavailable`] (wrapping [`NotReplicated`]: a 503 with `Retry-After`); the
    ///   handler does not run, and the store releases the key. A completion that too few replicas
    ///   confirmed reports the same error and the response is still sent; if its master then dies
    ///   before replicating it, the replica has the (confirmed) claim, retries get 409 until the
    ///   lease runs out, and then one runs the handler again, as after a crash.
    ///
    /// Costs: a replica round trip on every claim and completion. A replay is a claim and carries
    /// its `WAIT` too, which answers at once unless other requests' writes on the same connection
    /// are still unconfirmed. A connection that waits holds up the commands queued behind it: give
    /// the store more [`lanes`](Self::lanes). Availability: a shard with fewer than `replicas` live replicas
    /// answers 503 to every claim until a replica is back. With one replica per master, a
    /// failover leaves the new master without a replica until the old one rejoins.
    ///
    /// What it promises, and not: with one replica per master and `replicas = 1`, the replica
    /// that takes over is the one that confirmed. With more replicas per master, Redis lets the
    /// most up-to-date replica stand for election first, which is usually one that confirmed but
    /// not always; wait for all of them for the promise to hold. `WAIT` is not consensus: losing
    /// the confirming replicas too, or a forced `CLUSTER FAILOVER TAKEOVER`, can still lose a
    /// claim. Renewals and releases are not waited for: losing one only shortens or prolongs a
    /// lease.
    #[must_use]
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait = (replicas > 0).then_some(WaitForReplicas { replicas, timeout });
        self
    }

    /// Serves even when a master's `maxmemory-policy` can evict keys. **A risk**: a full master
    /// then evicts idempotency records (in-flight ones first, as they have the shortest TTL), and
    /// a retry of an evicted request runs the handler a second time.
    ///
    /// Without it, the store reads the policy of every master on every new connection and again
    /// every [`eviction_check_interval`](Self::eviction_check_interval) (so a master that a
    /// failover promoted, or a resharding added, is checked too) and, unless every one is
    /// `noeviction`, refuses to serve: every call fails with
    /// [`StoreError::Unavailable`] wrapping [`EvictionRisk`](crate::EvictionRisk), and requests
    /// get 503. A master that does not let the store read its configuration (a managed service,
    /// an ACL that denies `CONFIG`) is served, with one warning.
    #[must_use]
    pub fn allow_eviction(mut self) -> Self {
        self.options.allow_eviction = true;
        self
    }

    /// How often the store reads every master's `maxmemory-policy` again while it serves
    /// (default 5 s, [`RedisStore::DEFAULT_EVICTION_CHECK_INTERVAL`](crate::RedisStore::DEFAULT_EVICTION_CHECK_INTERVAL)),
    /// so that a policy changed after start (`CONFIG SET`, a restart with another configuration
    /// file, a failover to a node configured otherwise) is refused within about this interval.
    /// Every new connection is checked before its first call as well, whatever the interval. The
    /// first call after the interval starts the check in the background: no request waits for
    /// it, and it costs each master one `CONFIG GET` per interval per store, never a command per
    /// request. Without effect with [`allow_eviction`](Self::allow_eviction).
    ///
    /// # Panics
    ///
    /// When `every` is zero.
    #[must_use]
    pub fn eviction_check_interval(mut self, every: Duration) -> Self {
        self.options
            .set_eviction_check_interval(every, "RedisClusterStoreBuilder");
        self
    }

    /// Builds the store. No connection is made until the first call (or
    /// [`RedisClusterStore::check`]).
    pub fn build(self) -> RedisClusterStore {
        let eviction = EvictionCheck::new(
            self.options.allow_eviction,
            "RedisClusterStoreBuilder",
            self.options.eviction_check_interval,
        );
        RedisClusterStore {
            inner: Arc::new(Inner {
                lanes: Lanes::new(self.pool, self.options.lanes, eviction),
                keys: self.options.keys,
                timeout: self.options.timeout,
                wait: self.wait,
                scripts: Scripts::new(),
                claim_mode: ClaimMode::native(),
            }),
        }
    }
}
