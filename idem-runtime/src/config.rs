//! The app-wide configuration: the store, defaults, and the scope resolver.

use std::{fmt, sync::Arc, time::Duration};

use actix_web::HttpRequest;

use crate::{scope::ScopeId, store::Store};

/// The default record retention.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The default in-flight lease. It is renewed while the handler runs, so it bounds only how long a
/// crashed request blocks its key.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// The default request body limit for fingerprinting.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// The default largest response that is stored for replay.
pub const DEFAULT_MAX_RESPONSE: usize = 1024 * 1024;
/// The default `Retry-After` of a 503 when the store is unavailable.
pub const DEFAULT_UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(1);

type Resolver = dyn Fn(&HttpRequest) -> Result<ScopeId, actix_web::Error> + Send + Sync;

/// The idempotency configuration of an app: register it with `App::app_data(idempotency)`.
///
/// ```
/// use idem_runtime::{Idempotency, MemoryStore, ScopeId};
///
/// let idem = Idempotency::new(MemoryStore::new())
///     .scope_resolver(|req| {
///         let tenant = req.headers().get("x-tenant").and_then(|v| v.to_str().ok());
///         tenant
///             .map(ScopeId::new)
///             .ok_or_else(|| actix_web::error::ErrorUnauthorized("no tenant"))
///     });
/// let app = actix_web::App::new().app_data(idem);
/// ```
#[derive(Clone)]
pub struct Idempotency {
    pub(crate) inner: Arc<Settings>,
}

pub(crate) struct Settings {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) lease: Duration,
    pub(crate) ttl: Duration,
    pub(crate) max_body: usize,
    pub(crate) max_response: usize,
    pub(crate) unavailable_retry_after: Duration,
    pub(crate) resolver: Option<Arc<Resolver>>,
}

impl Idempotency {
    /// A configuration over `store` with the defaults.
    pub fn new(store: impl Store) -> Self {
        Self::from_arc(Arc::new(store))
    }

    /// A configuration over a shared store.
    pub fn from_arc(store: Arc<dyn Store>) -> Self {
        Self {
            inner: Arc::new(Settings {
                store,
                lease: DEFAULT_LEASE,
                ttl: DEFAULT_TTL,
                max_body: DEFAULT_MAX_BODY,
                max_response: DEFAULT_MAX_RESPONSE,
                unavailable_retry_after: DEFAULT_UNAVAILABLE_RETRY_AFTER,
                resolver: None,
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Settings)) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(settings) => f(settings),
            None => {
                let s = &*self.inner;
                let mut copy = Settings {
                    store: Arc::clone(&s.store),
                    lease: s.lease,
                    ttl: s.ttl,
                    max_body: s.max_body,
                    max_response: s.max_response,
                    unavailable_retry_after: s.unavailable_retry_after,
                    resolver: s.resolver.clone(),
                };
                f(&mut copy);
                self.inner = Arc::new(copy);
            }
        }
        self
    }

    /// The default in-flight lease for handlers that set none (default 30 s).
    #[must_use]
    pub fn lease(self, lease: Duration) -> Self {
        self.edit(|s| s.lease = lease)
    }

    /// The default record retention for handlers that set none (default 24 h).
    #[must_use]
    pub fn ttl(self, ttl: Duration) -> Self {
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

    /// The `Retry-After` sent with a 503 when the store is unavailable (default 1 s).
    #[must_use]
    pub fn unavailable_retry_after(self, after: Duration) -> Self {
        self.edit(|s| s.unavailable_retry_after = after)
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

    /// Finds the configuration registered on the app, as `app_data(Idempotency)` or
    /// `app_data(web::Data<Idempotency>)`.
    pub fn from_request(req: &HttpRequest) -> Option<Self> {
        req.app_data::<Self>().cloned().or_else(|| {
            req.app_data::<actix_web::web::Data<Self>>()
                .map(|d| Self::clone(d))
        })
    }
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
            .field("scope_resolver", &s.resolver.is_some())
            .finish_non_exhaustive()
    }
}
