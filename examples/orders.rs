//! A minimal orders service that takes every idempotency setting from the environment: how to
//! configure idem for a deployment.
//!
//! ```text
//! cargo run --example orders
//! REDIS_URL=redis://127.0.0.1:6379 ORDERS_LEASE=10s cargo run --example orders
//! ```
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `BIND` | the address to serve on | `127.0.0.1:8081` |
//! | `REDIS_URL` | the Redis that keeps the records (shared by every instance); unset: in memory | unset |
//! | `ORDERS_LEASE` | how long an unfinished request holds its key if its process dies (renewed while the handler runs) | `30s` |
//! | `ORDERS_TTL` | how long a finished response is kept for replay | `24h` |
//! | `ORDERS_STORE_TIMEOUT` | the longest one Redis call may take before the request gets 503 | `2s` |
//! | `ORDERS_DELAY_MS` | simulated work inside the handler, in milliseconds | `0` |
//! | `ORDERS_SHUTDOWN_TIMEOUT` | on SIGTERM or Ctrl-C, how long to wait for running handlers (even those whose client left) before stopping | `30s` |
//!
//! Durations are written as `500ms`, `10s`, `5m`, `24h`.
//!
//! ```text
//! curl -i -X POST localhost:8081/orders \
//!   -H 'Authorization: Bearer alice' -H 'Idempotency-Key: 7d4c' \
//!   -H 'Content-Type: application/json' -d '{"item":"book","quantity":2}'
//! ```
//!
//! - `POST /orders`: 201 with the order; needs `Idempotency-Key` (400 without) and
//!   `Authorization: Bearer <customer>` (the customer is the idempotency scope);
//! - `GET /stats`: `{"executions": N}`, how often this process ran the order handler.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use actix_web::{
    error::ErrorUnauthorized, get, http::header, post, web, App, HttpRequest, HttpResponse,
    HttpServer, Responder,
};
use idem::{idempotent, Idempotency, MemoryStore, RedisStore, ScopeId};
use serde::Deserialize;
use serde_json::json;

/// The service's settings, all from the environment.
struct Settings {
    bind: String,
    redis_url: Option<String>,
    lease: Duration,
    ttl: Duration,
    store_timeout: Duration,
    delay: Duration,
    shutdown_timeout: Duration,
}

impl Settings {
    fn from_env() -> Result<Self, String> {
        Ok(Self {
            bind: var("BIND").unwrap_or_else(|| "127.0.0.1:8081".to_owned()),
            redis_url: var("REDIS_URL"),
            lease: duration("ORDERS_LEASE", idem::Idempotency::DEFAULT_LEASE)?,
            ttl: duration("ORDERS_TTL", idem::Idempotency::DEFAULT_TTL)?,
            store_timeout: duration("ORDERS_STORE_TIMEOUT", idem::RedisStore::DEFAULT_TIMEOUT)?,
            delay: match var("ORDERS_DELAY_MS") {
                None => Duration::ZERO,
                Some(ms) => Duration::from_millis(
                    ms.parse()
                        .map_err(|e| format!("ORDERS_DELAY_MS must be a whole number: {e}"))?,
                ),
            },
            shutdown_timeout: duration("ORDERS_SHUTDOWN_TIMEOUT", Duration::from_secs(30))?,
        })
    }

    /// The idempotency configuration: the store, then the app-wide defaults every
    /// `#[idempotent]` handler uses unless it sets its own. A Redis store is checked here, so an
    /// unreachable Redis, or one whose `maxmemory-policy` could evict records, stops the service
    /// at start with the fix.
    async fn idempotency(&self) -> Result<Idempotency, String> {
        let idempotency = match &self.redis_url {
            Some(url) => {
                let pool = idem::deadpool_redis::Config::from_url(url.as_str())
                    .create_pool(Some(idem::deadpool_redis::Runtime::Tokio1))
                    .map_err(|e| format!("REDIS_URL: {e}"))?;
                let store = RedisStore::builder(pool)
                    .timeout(self.store_timeout)
                    .build();
                store.check().await.map_err(|e| e.to_string())?;
                Idempotency::new(store)
            }
            None => Idempotency::new(MemoryStore::new()),
        };
        Ok(idempotency
            .lease(self.lease)
            .ttl(self.ttl)
            .scope_resolver(|req| customer(req).map(ScopeId::new)))
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn duration(name: &str, default: Duration) -> Result<Duration, String> {
    match var(name) {
        None => Ok(default),
        Some(v) => humantime::parse_duration(&v)
            .map_err(|e| format!("{name} must be a duration such as 500ms or 10s: {e}")),
    }
}

/// The customer, from `Authorization: Bearer <customer>`: the idempotency scope.
fn customer(req: &HttpRequest) -> Result<String, actix_web::Error> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| ErrorUnauthorized("send `Authorization: Bearer <customer>`"))
}

#[derive(Default)]
struct Executions(AtomicU64);

/// Simulated work.
struct Delay(Duration);

#[derive(Deserialize)]
struct NewOrder {
    item: String,
    quantity: u32,
}

#[post("/orders")]
#[idempotent(require_key)]
async fn create_order(
    executions: web::Data<Executions>,
    delay: web::Data<Delay>,
    order: web::Json<NewOrder>,
) -> impl Responder {
    let execution = executions.0.fetch_add(1, Ordering::SeqCst) + 1;
    tracing::info!(execution, "creating an order");
    if !delay.0.is_zero() {
        tokio::time::sleep(delay.0).await;
    }
    if order.quantity == 0 {
        return HttpResponse::BadRequest().json(json!({ "error": "`quantity` must be positive" }));
    }
    let id = format!("ord_{:016x}", rand::random::<u64>());
    HttpResponse::Created()
        .insert_header((header::LOCATION, format!("/orders/{id}")))
        .json(json!({ "id": id, "item": order.item, "quantity": order.quantity }))
}

#[get("/stats")]
async fn stats(executions: web::Data<Executions>) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "executions": executions.0.load(Ordering::SeqCst) }))
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let settings = Settings::from_env().map_err(std::io::Error::other)?;
    let idempotency = settings
        .idempotency()
        .await
        .map_err(std::io::Error::other)?;
    let executions = web::Data::new(Executions::default());
    let delay = web::Data::new(Delay(settings.delay));
    tracing::info!(
        bind = %settings.bind,
        store = if settings.redis_url.is_some() { "redis" } else { "memory" },
        lease = ?settings.lease,
        ttl = ?settings.ttl,
        store_timeout = ?settings.store_timeout,
        delay = ?settings.delay,
        shutdown_timeout = ?settings.shutdown_timeout,
        "orders example listening"
    );
    // Built once above and cloned into the factory, which runs once per worker: every worker
    // reaches the same records (a retry may reach any worker) through one store and one pool.
    let server = HttpServer::new(move || {
        App::new()
            .app_data(idempotency.clone())
            .app_data(executions.clone())
            .app_data(delay.clone())
            .service(create_order)
            .service(stats)
    })
    .disable_signals()
    .shutdown_timeout(settings.shutdown_timeout.as_secs().max(1))
    .bind(&settings.bind)?
    .run();
    // A deploy is not a crash: on SIGTERM, wait for running orders, even those whose client left,
    // so their responses are stored and a retry on another instance replays them.
    let handle = server.handle();
    let timeout = settings.shutdown_timeout;
    actix_web::rt::spawn(async move {
        terminated().await;
        tracing::info!(?timeout, "shutting down: waiting for running orders");
        idem::shutdown(&handle, timeout).await;
    });
    server.await
}

/// Resolves on SIGTERM (a deploy, `docker stop`, Kubernetes) or Ctrl-C.
async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "no SIGTERM handler; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
