//! The app-wide configuration: the store, the defaults, and the scope resolver.

use std::{fmt, sync::Arc, time::Duration};

use actix_web::HttpRequest;

use crate::{
    cache::ReplayCache,
    scope::ScopeId,
    store::{memory::MemoryStore, Store},
    waiters::Waiters,
};

type Resolver = dyn Fn(&HttpRequest) -> Result<ScopeId, actix_web::Error> + Send + Sync;

/// The idempotency configuration of an app: register it with `App::app_data(idempotency)`.
///
/// Build it once, before `HttpServer::new`, and clone it into the factory: the factory runs once
/// per worker, and every worker must reach the same records (a retry that reaches another worker
/// would otherwise run the handler again). Clones share the store.
///
/// ```
/// use actix_web::{App, HttpServer};
/// use idem_runtime::{Idempotency, MemoryStore, ScopeId};
///
/// # fn run() -> std::io::Result<()> {
/// let idem = Idempotency::new(MemoryStore::new())
///     .scope_resolver(|req| {
///         let tenant = req.headers().get("x-tenant").and_then(|v| v.to_str().ok());
///         tenant
///             .map(ScopeId::new)
///             .ok_or_else(|| actix_web::error::ErrorUnauthorized("no tenant"))
///     });
/// let server = HttpServer::new(move || App::new().app_data(idem.clone())).bind("127.0.0.1:8080")?;
/// # Ok(()) }
/// ```
///
/// (`MemoryStore::new()` is the process's one memory store wherever it is built, so even a
/// configuration built inside the factory shares its records; a Redis or Postgres store built
/// there would be a pool per worker.)
///
/// Every setter checks its value where it is set: a value out of range is a programming error and
/// panics there (see each setter's `# Panics`), not on the first request.
#[derive(Clone)]
pub struct Idempotency {
    pub(crate) inner: Arc<Settings>,
}

/// The settings behind an [`Idempotency`]. `Clone`, so that a setter on a shared configuration
/// copies every field, including ones added later.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) lease: Duration,
    pub(crate) ttl: Duration,
    pub(crate) max_body: usize,
    pub(crate) max_response: usize,
    pub(crate) unavailable_retry_after: Duration,
    pub(crate) resolver: Option<Arc<Resolver>>,
    /// The duplicates waiting for in-flight requests of this store, in this process.
    pub(crate) waiters: Arc<Waiters>,
    /// Copies of completed records, replayed without a store round trip (`None`: off).
    pub(crate) replay_cache: Option<Arc<ReplayCache>>,
    /// Its capacity in bytes (0: off).
    pub(crate) replay_cache_bytes: usize,
}

impl Idempotency {
    /// The default record retention: 24 h.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
    /// The default in-flight lease: 30 s. It is renewed while the handler runs, so it bounds only
    /// how long a crashed request blocks its key.
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
    /// The longest record retention: 365 days.
    pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);
    /// The longest in-flight lease: 24 h.
    pub const MAX_LEASE: Duration = Duration::from_secs(24 * 60 * 60);
    /// The default request body limit for fingerprinting: 1 MiB.
    pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
    /// The default largest response stored for replay: 1 MiB.
    pub const DEFAULT_MAX_RESPONSE: usize = 1024 * 1024;
    /// The default `Retry-After` of a 503 when the store is unavailable: 1 s.
    pub const DEFAULT_UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(1);

    /// A configuration over `store` with the defaults.
    pub fn new(store: impl Store) -> Self {
        Self::from_arc(Arc::new(store))
    }

    /// The default capacity of the replay cache: 16 MiB of copies of completed records (about
    /// 30,000 responses of half a kilobyte).
    pub const DEFAULT_REPLAY_CACHE: usize = 16 * 1024 * 1024;

    /// A configuration over a shared store.
    pub fn from_arc(store: Arc<dyn Store>) -> Self {
        // The memory store is in this process already: a copy would only double its records.
        let any: &dyn std::any::Any = &*store;
        let replay_cache_bytes = if any.is::<MemoryStore>() {
            0
        } else {
            Self::DEFAULT_REPLAY_CACHE
        };
        Self {
            inner: Arc::new(Settings {
                store,
                lease: Self::DEFAULT_LEASE,
                ttl: Self::DEFAULT_TTL,
                max_body: Self::DEFAULT_MAX_BODY,
                max_response: Self::DEFAULT_MAX_RESPONSE,
                unavailable_retry_after: Self::DEFAULT_UNAVAILABLE_RETRY_AFTER,
                resolver: None,
                waiters: Arc::default(),
                replay_cache: (replay_cache_bytes > 0)
                    .then(|| Arc::new(ReplayCache::new(replay_cache_bytes))),
                replay_cache_bytes,
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Settings)) -> Self {
        f(Arc::make_mut(&mut self.inner));
        self
    }

    /// The default in-flight lease for handlers that set none (default 30 s).
    ///
    /// # Panics
    ///
    /// When `lease` is zero, longer than [`MAX_LEASE`](Self::MAX_LEASE), or not shorter than the
    /// configured [`ttl`](Self::ttl) (set the lease first when you shorten both).
    #[must_use]
    #[track_caller]
    pub fn lease(self, lease: Duration) -> Self {
        check_range("lease", lease, Self::MAX_LEASE);
        assert!(
            lease < self.inner.ttl,
            "Idempotency::lease({lease:?}) must be shorter than the ttl ({:?}): the lease bounds \
             how long a crashed request blocks its key, the ttl how long its response is kept",
            self.inner.ttl
        );
        self.edit(|s| s.lease = lease)
    }

    /// The default record retention for handlers that set none (default 24 h).
    ///
    /// # Panics
    ///
    /// When `ttl` is zero, longer than [`MAX_TTL`](Self::MAX_TTL), or not longer than the
    /// configured [`lease`](Self::lease) (shorten the lease first).
    #[must_use]
    #[track_caller]
    pub fn ttl(self, ttl: Duration) -> Self {
        check_range("ttl", ttl, Self::MAX_TTL);
        assert!(
            ttl > self.inner.lease,
            "Idempotency::ttl({ttl:?}) must be longer than the lease ({:?}): call \
             `.lease(..)` with a shorter lease first",
            self.inner.lease
        );
        self.edit(|s| s.ttl = ttl)
    }

    /// The default request body limit for handlers that set none (default 1 MiB).
    #[must_use]
    pub fn max_body(self, bytes: usize) -> Self {
        self.edit(|s| s.max_body = bytes)
    }

    /// The largest response body stored for replay (default 1 MiB). A larger response is sent to
    /// the client but not stored: its key is released, so a retry runs the handler again.
    #[must_use]
    pub fn max_response(self, bytes: usize) -> Self {
        self.edit(|s| s.max_response = bytes)
    }

    /// The `Retry-After` sent with a 503 when the store is unavailable, or when the process is
    /// shutting down ([`shutdown`](crate::shutdown)) (default 1 s; sent in whole seconds, rounded
    /// up).
    ///
    /// # Panics
    ///
    /// When `after` is longer than [`MAX_LEASE`](Self::MAX_LEASE).
    #[must_use]
    #[track_caller]
    pub fn unavailable_retry_after(self, after: Duration) -> Self {
        assert!(
            after <= Self::MAX_LEASE,
            "Idempotency::unavailable_retry_after({after:?}) is longer than {:?}",
            Self::MAX_LEASE
        );
        self.edit(|s| s.unavailable_retry_after = after)
    }

    /// The capacity, in bytes, of this instance's **replay cache** (default
    /// [`DEFAULT_REPLAY_CACHE`](Self::DEFAULT_REPLAY_CACHE), 16 MiB; `0` turns it off; off by
    /// default over a [`MemoryStore`], which is in the process already).
    ///
    /// The cache keeps copies of completed records in this process's memory, so that a retry of
    /// a completed request is replayed without a store round trip, and a retry storm on one key
    /// costs the store one read per instance. A copy answers exactly as the store would (the
    /// same response to the same request, 422 to a different one) and never outlives its
    /// record. A copy is made when a retry's claim reads a completed record from the store
    /// (never when a request completes one: first requests pay nothing for it), and lasts the
    /// record's remaining life (the Redis stores write the expiry into the record, read by this
    /// instance's clock less a second; `PostgresStore` answers it by its own clock, less a
    /// second), and at most 10 minutes. What it changes: **a record deleted from the store by
    /// hand keeps replaying on an instance that holds a copy until the copy ends** (at most 10
    /// minutes, or restart the instance). Copies are weighed by their headers and body; the
    /// least used go first when the capacity is reached, and a response over a sixteenth of
    /// the capacity is not copied.
    #[must_use]
    pub fn replay_cache(self, bytes: usize) -> Self {
        self.edit(|s| {
            s.replay_cache = (bytes > 0).then(|| Arc::new(ReplayCache::new(bytes)));
            s.replay_cache_bytes = bytes;
        })
    }

    /// How handlers that name no `scope` find the caller: a function of the request that returns
    /// the caller's id, or an error response (such as 401) that is sent instead.
    #[must_use]
    pub fn scope_resolver<F>(self, resolver: F) -> Self
    where
        F: Fn(&HttpRequest) -> Result<ScopeId, actix_web::Error> + Send + Sync + 'static,
    {
        self.edit(|s| s.resolver = Some(Arc::new(resolver)))
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The configuration registered on the app, as `app_data(Idempotency)` or
    /// `app_data(web::Data<Idempotency>)`.
    pub(crate) fn registered(req: &HttpRequest) -> Option<Self> {
        req.app_data::<Self>().cloned().or_else(|| {
            req.app_data::<actix_web::web::Data<Self>>()
                .map(|d| Self::clone(d))
        })
    }
}

#[track_caller]
fn check_range(what: &str, value: Duration, max: Duration) {
    assert!(
        !value.is_zero(),
        "Idempotency::{what}: a zero duration is not a {what}"
    );
    assert!(
        value <= max,
        "Idempotency::{what}({value:?}) is longer than the longest allowed, {max:?}"
    );
}

impl fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &*self.inner;
        f.debug_struct("Idempotency")
            .field("lease", &s.lease)
            .field("ttl", &s.ttl)
            .field("max_body", &s.max_body)
            .field("max_response", &s.max_response)
            .field("unavailable_retry_after", &s.unavailable_retry_after)
            .field("replay_cache", &s.replay_cache_bytes)
            .field("scope_resolver", &s.resolver.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::panic::catch_unwind;

    use super::*;
    use crate::store::memory::MemoryStore;

    fn idem() -> Idempotency {
        Idempotency::new(MemoryStore::new())
    }

    #[test]
    fn durations_are_checked_where_they_are_set() {
        let set = |f: fn(Idempotency) -> Idempotency| catch_unwind(|| f(idem())).is_ok();
        assert!(set(|i| i.ttl(Duration::from_secs(3600))));
        assert!(set(|i| i
            .lease(Duration::from_secs(5))
            .ttl(Duration::from_secs(10))));
        assert!(!set(|i| i.ttl(Duration::ZERO)));
        assert!(!set(|i| i.ttl(Duration::MAX)));
        assert!(!set(
            |i| i.ttl(Idempotency::MAX_TTL + Duration::from_millis(1))
        ));
        assert!(set(|i| i.ttl(Idempotency::MAX_TTL)));
        assert!(!set(|i| i.lease(Duration::ZERO)));
        assert!(!set(|i| i.lease(Duration::from_secs(2 * 24 * 3600))));
        // The default lease is 30 s: a ttl at or below it is refused, whichever is set.
        assert!(!set(|i| i.ttl(Duration::from_secs(30))));
        assert!(!set(|i| i
            .ttl(Duration::from_secs(600))
            .lease(Duration::from_secs(600))));
        assert!(!set(|i| i.unavailable_retry_after(Duration::MAX)));
    }

    #[test]
    fn a_setter_on_a_shared_configuration_keeps_every_other_field() {
        let base = idem()
            .max_body(7)
            .max_response(9)
            .scope_resolver(|_| Ok(ScopeId::new("x")));
        let shared = base.clone();
        let edited = shared.ttl(Duration::from_secs(60));
        assert!(!Arc::ptr_eq(&base.inner, &edited.inner));
        assert_eq!(edited.inner.max_body, 7);
        assert_eq!(edited.inner.max_response, 9);
        assert!(edited.inner.resolver.is_some());
        assert_eq!(edited.inner.ttl, Duration::from_secs(60));
        assert_eq!(base.inner.ttl, Idempotency::DEFAULT_TTL);
    }
}
