//! Connections: a few multiplexed connections checked out of a deadpool pool once and kept as
//! *lanes* (see the module docs of [`super`] for why).

use std::{
    future::Future,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Mutex, PoisonError,
    },
    time::Duration,
};

use deadpool_redis::{
    redis::{self, aio::MultiplexedConnection, cluster_async::ClusterConnection},
    Pool,
};

use super::{
    eviction::{EvictionCheck, Policies, Vetting},
    scripts::{is_broken_connection, is_connection_error},
};
use crate::store::StoreError;

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

    /// The `maxmemory-policy` of every server the connection writes records to.
    fn policies(
        conn: Self::Conn,
        timeout: Duration,
    ) -> impl Future<Output = Result<Policies, redis::RedisError>> + Send;
}

/// The two deadpool pools have the same API but no common trait: one implementation, written
/// once, for both.
macro_rules! multiplexed_pool {
    ($pool:ty, $conn:ty, $object:ty, $policies:path) => {
        impl MultiplexedPool for $pool {
            type Conn = $conn;
            type Object = $object;

            fn max_size(&self) -> usize {
                self.status().max_size
            }

            async fn checkout(&self) -> Result<Self::Object, StoreError> {
                self.get()
                    .await
                    .map_err(|e| StoreError::Unavailable(Box::new(e)))
            }

            fn handle(object: &Self::Object) -> Self::Conn {
                <$conn>::clone(object)
            }

            fn detach(object: Self::Object) {
                drop(<$object>::take(object));
            }

            fn policies(
                conn: Self::Conn,
                timeout: Duration,
            ) -> impl Future<Output = Result<Policies, redis::RedisError>> + Send {
                $policies(conn, timeout)
            }
        }
    };
}

multiplexed_pool!(
    Pool,
    MultiplexedConnection,
    deadpool_redis::Connection,
    super::eviction::single_policies
);
multiplexed_pool!(
    deadpool_redis::cluster::Pool,
    ClusterConnection,
    deadpool_redis::cluster::Connection,
    super::eviction::cluster_policies
);

/// What a call does, for the eviction check: a store that refuses (a `maxmemory-policy` that can
/// evict) refuses claims, so no new handler runs, but lets the fenced writes of claims already
/// held through: a handler that ran stores its response (else its key would stay in flight until
/// its lease ran out, and the retry after it would run the handler again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    /// A claim, or the store's `check`: refused while the policy can evict.
    Claim,
    /// A renewal, completion or release of a claim this request holds.
    Fenced,
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
    eviction: EvictionCheck,
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
    // The generation (plus 1) of the lane's connection that passed the eviction check: a new
    // connection (a reconnect: it may reach another server) is checked before its first call.
    vetted: AtomicU64,
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
    pub(crate) fn new(pool: P, lanes: usize, eviction: EvictionCheck) -> Self {
        Self::with_pick(pool, lanes, Pick::RoundRobin(AtomicUsize::new(0)), eviction)
    }

    /// `lanes` connections at most, clamped to 1..=the pool's size, each taken by the threads that
    /// map to it (see [`thread_lane`]): with as many lanes as worker threads, each worker has a
    /// connection whose I/O task runs on its own thread.
    pub(crate) fn per_thread(pool: P, lanes: usize, eviction: EvictionCheck) -> Self {
        Self::with_pick(pool, lanes, Pick::Thread, eviction)
    }

    fn with_pick(pool: P, lanes: usize, pick: Pick, eviction: EvictionCheck) -> Self {
        let lanes = lanes.clamp(1, pool.max_size().max(1));
        Self {
            pool,
            lanes: (0..lanes)
                .map(|_| Slot {
                    lane: Mutex::new(None),
                    filling: tokio::sync::Mutex::new(()),
                    vetted: AtomicU64::new(0),
                })
                .collect(),
            pick,
            generation: AtomicU64::new(0),
            eviction,
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

    /// Connects (and so runs the eviction check) and sends a `PING`: the stores' `check`.
    pub(crate) async fn ping(&self, timeout: Duration) -> Result<(), StoreError>
    where
        P::Conn: redis::aio::ConnectionLike + Send,
    {
        self.run(timeout, Call::Claim, |mut conn| async move {
            redis::cmd("PING")
                .query_async::<redis::Value>(&mut conn)
                .await
                .map(drop)
        })
        .await
    }

    /// Runs `call` on a lane's connection within `timeout` (connection included). A connection
    /// error or a timeout drops the lane.
    ///
    /// A call whose connection broke (reset, broken pipe, closed by the server: Redis's idle
    /// `timeout`, a `CLIENT KILL`, a proxy or load balancer that cut it) is sent once more on a
    /// fresh connection, within the same `timeout`. This is safe for every call the stores make:
    /// renew, complete and release are fenced by the owner token, and a claim that finds the
    /// pending record its first attempt wrote answers `Acquired` (see `scripts::parse_claim`).
    /// So a routine reset costs neither a 503 nor a lost completion. A timeout is not re-sent:
    /// the connection was alive and the server slow, and the budget is spent.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        timeout: Duration,
        kind: Call,
        call: F,
    ) -> Result<T, StoreError>
    where
        F: Fn(P::Conn) -> Fut,
        Fut: Future<Output = Result<T, redis::RedisError>>,
    {
        let mut lane = None;
        let attempt = async {
            let mut resent = false;
            loop {
                let (i, generation, conn) = self.lane().await?;
                lane = Some((i, generation));
                let vetting = Vetting {
                    vetted: &self.lanes[i].vetted,
                    generation,
                };
                let answer = match self.eviction.admit::<P>(&conn, vetting, timeout).await {
                    Ok(Ok(())) => call(conn).await,
                    Ok(Err(refused)) if kind == Call::Claim => {
                        return Err(StoreError::Unavailable(Box::new(refused)))
                    }
                    Ok(Err(_)) => call(conn).await,
                    Err(e) => Err(e),
                };
                let e = match answer {
                    Ok(value) => return Ok(value),
                    Err(e) => e,
                };
                if is_connection_error(&e) {
                    self.drop_lane(i, generation);
                }
                if !resent && is_broken_connection(&e) {
                    resent = true;
                    tracing::debug!(error = %e, "a Redis connection broke; re-sending the call on a fresh one");
                    continue;
                }
                // The connection's response timeout is the store's (see `eval`), so it races
                // the timer below: either way the call took the whole timeout.
                return Err(if e.is_timeout() {
                    StoreError::Timeout(timeout)
                } else {
                    StoreError::Unavailable(Box::new(e))
                });
            }
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
