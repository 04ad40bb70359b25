//! The flagship example: a payments API whose `POST /payments` is safe to retry.
//!
//! ```text
//! cargo run --release --example payments
//! ```
//!
//! - serves on `127.0.0.1:8080` (`BIND` overrides);
//! - uses Redis when `REDIS_URL` is set, a Redis Cluster when `REDIS_CLUSTER_URLS` (comma-separated
//!   node URLs) is set, and the in-memory store otherwise (it logs which);
//! - `PAYMENTS_DELAY_MS` adds simulated processor latency inside the handler (default 0);
//! - built with `--features openapi`, `GET /openapi.json` serves the OpenAPI document, whose
//!   idempotency parts (the key header, 409/422/..., retention) come from `#[idempotent]` itself;
//! - `GET /metrics` serves idem's metrics (and any other) in the Prometheus text format: the app
//!   installs the recorder, idem only emits.
//!
//! Every request names its client with `Authorization: Bearer <token>`; the client is the
//! idempotency scope, so two clients can use the same key without seeing each other's payments.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, PoisonError,
    },
    time::{Duration, SystemTime},
};

use actix_web::{
    dev::Payload,
    error::InternalError,
    get,
    http::{header, StatusCode},
    post, web, App, FromRequest, HttpRequest, HttpResponse, HttpServer, Responder,
};
#[cfg(feature = "openapi")]
use idem::openapi::IdempotencyDocs;
use idem::{idempotent, Idempotency, MemoryStore, RedisStore, ScopeId};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The payments this process has created, by (client, id).
#[derive(Default)]
struct Ledger {
    payments: Mutex<HashMap<(String, String), Payment>>,
    executions: AtomicU64,
}

#[derive(Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
struct Payment {
    id: String,
    amount: u64,
    currency: String,
    destination: String,
    status: &'static str,
    created_at: String,
}

/// A payment to make (fields checked by the handler, which answers 400 with the reason).
#[derive(Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
struct NewPayment {
    /// Minor units, positive.
    #[cfg_attr(feature = "openapi", schema(value_type = u64))]
    amount: serde_json::Value,
    /// Three upper-case letters.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    currency: serde_json::Value,
    /// `decline` and `unavailable` simulate the processor's answers.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    destination: serde_json::Value,
}

/// The caller, from `Authorization: Bearer <token>`.
struct Client(String);

fn client_of(req: &HttpRequest) -> Result<String, actix_web::Error> {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    match token {
        Some(token) => Ok(token.to_owned()),
        None => Err(InternalError::from_response(
            "unauthorized",
            problem(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Unauthorized",
                "Send `Authorization: Bearer <token>`; the token names the client.",
            ),
        )
        .into()),
    }
}

impl FromRequest for Client {
    type Error = actix_web::Error;
    type Future = std::future::Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(client_of(req).map(Client))
    }
}

fn problem(status: StatusCode, slug: &str, title: &str, detail: &str) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/problem+json")
        .json(json!({
            "type": format!("https://example.com/problems/{slug}"),
            "title": title,
            "status": status.as_u16(),
            "detail": detail,
        }))
}

fn validate(body: &NewPayment) -> Result<(u64, String, String), String> {
    let amount = body
        .amount
        .as_u64()
        .filter(|a| *a > 0)
        .ok_or("`amount` must be a positive integer (minor units)")?;
    let currency = body
        .currency
        .as_str()
        .filter(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()))
        .ok_or("`currency` must be three upper-case letters")?;
    let destination = body
        .destination
        .as_str()
        .filter(|d| !d.is_empty())
        .ok_or("`destination` must be a non-empty string")?;
    Ok((amount, currency.to_owned(), destination.to_owned()))
}

/// Make a payment.
///
/// Authenticated with `Authorization: Bearer <token>`; the token names the client.
// `#[idempotent]` comes first: it adds what it knows to `#[utoipa::path]` (with the `openapi`
// feature), and both come before the route attribute, as utoipa expects.
#[idempotent(ttl = "24h", require_key)]
#[cfg_attr(feature = "openapi", utoipa::path(
    post,
    path = "/payments",
    request_body = NewPayment,
    responses(
        (status = 201, description = "The payment was created", body = Payment,
            headers(("Location" = String, description = "The payment's URL"))),
        (status = 400, description = "Invalid JSON or fields (stored and replayed)"),
        (status = 401, description = "No `Authorization: Bearer <token>`"),
        (status = 402, description = "The processor declined the payment (stored and replayed)"),
        (status = 503, description = "The processor is unavailable (not stored: a retry runs again)"),
    ),
))]
#[post("/payments")]
async fn create_payment(
    client: Client,
    ledger: web::Data<Ledger>,
    delay: web::Data<Delay>,
    body: web::Json<NewPayment>,
) -> impl Responder {
    ledger.executions.fetch_add(1, Ordering::SeqCst);
    if !delay.0.is_zero() {
        tokio::time::sleep(delay.0).await;
    }
    let (amount, currency, destination) = match validate(&body) {
        Ok(fields) => fields,
        Err(detail) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "invalid-payment",
                "Invalid payment",
                &detail,
            )
        }
    };
    match destination.as_str() {
        "decline" => {
            return problem(
                StatusCode::PAYMENT_REQUIRED,
                "card-declined",
                "Payment declined",
                "The processor declined the payment.",
            )
        }
        "unavailable" => {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "processor-unavailable",
                "Processor unavailable",
                "The payment processor is unavailable; retry with the same key.",
            )
        }
        _ => {}
    }
    let payment = Payment {
        id: format!("pay_{:016x}", rand::random::<u64>()),
        amount,
        currency,
        destination,
        status: "pending",
        created_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
    };
    ledger
        .payments
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert((client.0, payment.id.clone()), payment.clone());
    HttpResponse::Created()
        .insert_header((header::LOCATION, format!("/payments/{}", payment.id)))
        .json(payment)
}

#[get("/payments/{id}")]
async fn get_payment(
    client: Client,
    ledger: web::Data<Ledger>,
    id: web::Path<String>,
) -> HttpResponse {
    let payments = ledger
        .payments
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    match payments.get(&(client.0, id.into_inner())) {
        Some(payment) => HttpResponse::Ok().json(payment),
        None => problem(
            StatusCode::NOT_FOUND,
            "not-found",
            "Payment not found",
            "No payment of yours has this id.",
        ),
    }
}

#[get("/stats")]
async fn stats(ledger: web::Data<Ledger>) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "executions": ledger.executions.load(Ordering::SeqCst) }))
}

/// The OpenAPI document of `POST /payments`; `IdempotencyDocs` documents its idempotency.
#[cfg(feature = "openapi")]
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "payments (idem example)", description = "A payments API that is safe to retry."),
    paths(create_payment),
    modifiers(&IdempotencyDocs)
)]
struct ApiDoc;

#[cfg(feature = "openapi")]
#[get("/openapi.json")]
async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(<ApiDoc as utoipa::OpenApi>::openapi())
}

/// The metrics in the Prometheus text format.
#[get("/metrics")]
async fn metrics(prometheus: web::Data<PrometheusHandle>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(prometheus.render())
}

/// Simulated processor latency.
struct Delay(Duration);

fn json_config() -> web::JsonConfig {
    web::JsonConfig::default().error_handler(|err, _req| {
        let detail = err.to_string();
        InternalError::from_response(
            err,
            problem(
                StatusCode::BAD_REQUEST,
                "invalid-json",
                "Invalid JSON",
                &detail,
            ),
        )
        .into()
    })
}

/// The store, checked at start: an unreachable Redis, or one whose `maxmemory-policy` could evict
/// records, stops the example with the fix rather than failing its requests.
async fn store_from_env() -> std::io::Result<Idempotency> {
    let to_io = |e: idem::StoreError| std::io::Error::other(e.to_string());
    let store = if let Ok(urls) = std::env::var("REDIS_CLUSTER_URLS") {
        let urls: Vec<&str> = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        tracing::info!(nodes = ?urls, "using the Redis Cluster store");
        let store = idem::RedisClusterStore::from_urls(&urls).map_err(to_io)?;
        store.check().await.map_err(to_io)?;
        Idempotency::new(store)
    } else if let Ok(url) = std::env::var("REDIS_URL") {
        tracing::info!(%url, "using the Redis store");
        let store = RedisStore::from_url(&url).map_err(to_io)?;
        store.check().await.map_err(to_io)?;
        Idempotency::new(store)
    } else {
        tracing::info!(
            "using the in-memory store (set REDIS_URL to share records between processes)"
        );
        Idempotency::new(MemoryStore::new())
    };
    Ok(store.scope_resolver(|req| client_of(req).map(ScopeId::new)))
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:8080".to_owned());
    let delay_ms = match std::env::var("PAYMENTS_DELAY_MS") {
        Ok(v) => v.parse::<u64>().map_err(|e| {
            std::io::Error::other(format!("PAYMENTS_DELAY_MS must be a whole number: {e}"))
        })?,
        Err(_) => 0,
    };
    // The application, not idem, installs the recorder; this one only renders (no listener).
    let prometheus = PrometheusBuilder::new()
        .install_recorder()
        .map_err(std::io::Error::other)?;
    let upkeep = prometheus.clone();
    actix_web::rt::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    let prometheus = web::Data::new(prometheus);
    let idempotency = store_from_env().await?;
    let ledger = web::Data::new(Ledger::default());
    let delay = web::Data::new(Delay(Duration::from_millis(delay_ms)));
    tracing::info!(%bind, delay_ms, "payments example listening");
    let server = HttpServer::new(move || {
        let app = App::new()
            .app_data(idempotency.clone())
            .app_data(ledger.clone())
            .app_data(delay.clone())
            .app_data(prometheus.clone())
            .app_data(json_config())
            .service(create_payment)
            .service(get_payment)
            .service(stats)
            .service(metrics);
        #[cfg(feature = "openapi")]
        let app = app.service(openapi_json);
        app
    })
    .disable_signals()
    .shutdown_timeout(SHUTDOWN_TIMEOUT.as_secs())
    .bind(&bind)?
    .run();
    // On SIGTERM or Ctrl-C, wait for running payments (even those whose client left) before
    // stopping, so that a deploy does not cut one mid-flight and leave its retry to run it again.
    let handle = server.handle();
    actix_web::rt::spawn(async move {
        terminated().await;
        tracing::info!("shutting down: waiting for running payments");
        idem::shutdown(&handle, SHUTDOWN_TIMEOUT).await;
    });
    server.await
}

/// How long a shutdown waits for running handlers (actix-web's default shutdown timeout).
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

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
