//! The flagship example: a payments API whose `POST /payments` is safe to retry.
//!
//! ```text
//! cargo run --release --example payments
//! ```
//!
//! - serves on `127.0.0.1:8080` (`BIND` overrides);
//! - uses Redis when `REDIS_URL` is set, a Redis Cluster when `REDIS_CLUSTER_URLS` (comma-separated
//!   node URLs) is set, and the in-memory store otherwise (it logs which);
//! - each payment is charged through a card processor, as a journaled step (`idem::Steps`) that
//!   sends the step's downstream key as the processor's `Idempotency-Key`: with
//!   `PROCESSOR_URL=http://host:port`, `POST {PROCESSOR_URL}/charges`; without it, a built-in fake
//!   processor in this process, whose charges `GET /processor/charges` lists;
//! - `PAYMENTS_DELAY_MS` waits inside the handler before the charge (default 0);
//!   `PAYMENTS_COMMIT_DELAY_MS` a wait after the payment is written and before the handler
//!   returns (default 0: in the transactional mode, before the commit); `PAYMENTS_LEASE_MS` sets
//!   the idempotency lease (default 30 s); `PAYMENTS_DOWNSTREAM_KEY` (`hand-built` or `none`)
//!   changes the key the charge sends, for the crash test's comparison only (leave it unset);
//! - with `DATABASE_URL=postgres://...` (feature `postgres`) the payments live in a Postgres table
//!   `payments`, created at start: without `REDIS_URL`, the records are in a `PostgresStore` on
//!   the same database and each payment is written in the same transaction as its completed
//!   record (the transactional mode); with `REDIS_URL`, the records are in Redis and the payment
//!   is written on its own (no transaction);
//! - built with `--features openapi`, `GET /openapi.json` serves the OpenAPI document, whose
//!   idempotency parts (the key header, 409/422/..., retention) come from `#[idempotent]` itself;
//! - `GET /metrics` serves idem's metrics (and any other) in the Prometheus text format: the app
//!   installs the recorder, idem only emits.
//!
//! `GET /stats` answers `{"executions": N, "payments": M, "resumed": R}`: the handler's executions
//! in this process, the payments stored (rows in Postgres with `DATABASE_URL`, else this
//! process's), and the executions in this process that resumed from the journal of an earlier one
//! (their charge replayed, not made again).
//!
//! Every request names its client with `Authorization: Bearer <token>`; the client's account is
//! the idempotency scope, so two accounts can use the same key without seeing each other's
//! payments. A token `<account>.<anything>` is a credential of `<account>` (`alice` and
//! `alice.mobile` are one account, one scope); any other token names an account of its own.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, SystemTime},
};

use actix_web::{
    dev::Payload,
    error::InternalError,
    get,
    http::{header, StatusCode},
    post, web, App, FromRequest, HttpRequest, HttpResponse, HttpServer,
};
#[cfg(feature = "openapi")]
use idem::openapi::IdempotencyDocs;
use idem::{idempotent, Idempotency, MemoryStore, RedisStore, ScopeId, StepError, Steps};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The payments this process has created, by (client, id).
#[derive(Default)]
struct Ledger {
    payments: Mutex<HashMap<(String, String), Payment>>,
    executions: AtomicU64,
    /// Executions that found the charge in the journal of an earlier one.
    resumed: AtomicU64,
}

#[derive(Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
struct Payment {
    id: String,
    amount: u64,
    currency: String,
    destination: String,
    status: String,
    created_at: String,
    /// The processor's id of the charge that paid it.
    charge: String,
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

/// The caller's account, from `Authorization: Bearer <token>`.
struct Client(String);

/// The account a bearer token is a credential of: `<account>.<anything>` belongs to `<account>`
/// (so `alice` and `alice.mobile` are one account), and any other token names an account of its
/// own.
///
/// The idempotency scope is this account, never the token itself: a token is a credential, which
/// is refreshed, rotated or differs between the account's devices, while a retry with the same key
/// may come after any of these. Scoped by the token, the retry would land in a new scope, miss
/// the first payment and make a second one.
fn account_of(token: &str) -> &str {
    match token.split_once('.') {
        Some((account, _)) if !account.is_empty() => account,
        _ => token,
    }
}

fn client_of(req: &HttpRequest) -> Result<String, actix_web::Error> {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    match token {
        Some(token) => Ok(account_of(token).to_owned()),
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

/// The largest amount: what every store of the example holds exactly (Postgres `bigint`), so that
/// the 201 and the stored payment always agree.
const MAX_AMOUNT: u64 = i64::MAX as u64;
/// The longest `destination`, in characters.
const MAX_DESTINATION: usize = 128;

/// The payment's fields, or why they are refused (a 400, the same in every mode: a value one
/// store cannot hold, such as a NUL character in Postgres `text`, is refused by all of them).
fn validate(body: &NewPayment) -> Result<(u64, String, String), String> {
    let amount = body
        .amount
        .as_u64()
        .filter(|a| (1..=MAX_AMOUNT).contains(a))
        .ok_or_else(|| {
            format!("`amount` must be a positive integer (minor units) of at most {MAX_AMOUNT}")
        })?;
    let currency = body
        .currency
        .as_str()
        .filter(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()))
        .ok_or("`currency` must be three upper-case letters")?;
    let destination = body
        .destination
        .as_str()
        .filter(|d| {
            !d.is_empty()
                && d.chars().count() <= MAX_DESTINATION
                && !d.chars().any(char::is_control)
        })
        .ok_or_else(|| {
            format!(
                "`destination` must be a non-empty string of at most {MAX_DESTINATION} \
                 characters, without control characters"
            )
        })?;
    Ok((amount, currency.to_owned(), destination.to_owned()))
}

/// Make a payment.
///
/// Authenticated with `Authorization: Bearer <token>`; the token names the client.
// `#[idempotent]` comes first: it adds what it knows to `#[utoipa::path]` (with the `openapi`
// feature), and both come before the route attribute, as utoipa expects.
#[idempotent(ttl = "24h", require_key, fingerprint = "json")]
#[allow(clippy::too_many_arguments)]
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
        (status = 503, description = "The processor is unavailable (not stored: a retry runs again, and charges at most once)"),
    ),
))]
#[post("/payments")]
async fn create_payment(
    req: HttpRequest,
    client: Client,
    ledger: web::Data<Ledger>,
    delay: web::Data<Delay>,
    commit_delay: web::Data<CommitDelay>,
    database: web::Data<Database>,
    processor: web::Data<Processor>,
    steps: Steps,
    body: web::Json<NewPayment>,
) -> actix_web::Result<HttpResponse> {
    ledger.executions.fetch_add(1, Ordering::SeqCst);
    if !delay.0.is_zero() {
        tokio::time::sleep(delay.0).await;
    }
    let (amount, currency, destination) = match validate(&body) {
        Ok(fields) => fields,
        Err(detail) => {
            return Ok(problem(
                StatusCode::BAD_REQUEST,
                "invalid-payment",
                "Invalid payment",
                &detail,
            ))
        }
    };
    let order = Order {
        amount,
        currency: &currency,
        destination: &destination,
    };
    let charge = match charge(&steps, &processor, &ledger, &req, &client.0, &order).await {
        Ok(charge) => charge,
        Err(answer) => return Ok(answer),
    };
    if let Some(answer) = unavailable_after_charge(&destination) {
        return Ok(answer);
    }
    let payment = Payment::new(amount, currency, destination, charge.id);
    match &database.0 {
        // DATABASE_URL with REDIS_URL: the payment row, on its own (no transaction).
        #[cfg(feature = "postgres")]
        Some(pool) => {
            let key = idempotency_key(&req);
            if let Err(e) = db::insert(pool, &client.0, &key, &payment).await {
                return Ok(db::unavailable(&e));
            }
        }
        _ => {
            ledger
                .payments
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert((client.0, payment.id.clone()), payment.clone());
        }
    }
    if !commit_delay.0.is_zero() {
        tokio::time::sleep(commit_delay.0).await;
    }
    Ok(created(&payment))
}

impl Payment {
    fn new(amount: u64, currency: String, destination: String, charge: String) -> Self {
        Self {
            id: format!("pay_{:016x}", rand::random::<u64>()),
            amount,
            currency,
            destination,
            status: "pending".to_owned(),
            created_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            charge,
        }
    }
}

/// The 201 of a payment.
fn created(payment: &Payment) -> HttpResponse {
    HttpResponse::Created()
        .insert_header((header::LOCATION, format!("/payments/{}", payment.id)))
        .json(payment)
}

/// The request's `Idempotency-Key`, as sent (the handler requires one).
fn idempotency_key(req: &HttpRequest) -> String {
    req.headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// The destination `unavailable`: a 503 after the charge step (not stored: a retry runs the
/// handler again, and finds its charge in the journal instead of charging twice).
fn unavailable_after_charge(destination: &str) -> Option<HttpResponse> {
    (destination == "unavailable").then(|| {
        problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "payment-unavailable",
            "Payment unavailable",
            "The payment could not be completed; retry with the same key.",
        )
    })
}

/// The payment's 402 when the processor declines it (stored and replayed).
fn declined() -> HttpResponse {
    problem(
        StatusCode::PAYMENT_REQUIRED,
        "card-declined",
        "Payment declined",
        "The processor declined the payment.",
    )
}

/// What a charge asks the processor for: the JSON body of `POST {PROCESSOR_URL}/charges`.
#[derive(Serialize)]
struct Order<'a> {
    amount: u64,
    currency: &'a str,
    destination: &'a str,
}

/// A charge the processor made (its id).
#[derive(Clone, Serialize, Deserialize)]
struct Charge {
    id: String,
}

/// The processor's answer to a charge, an outcome either way: journaled by the step, so that a
/// later execution of the same payment gets it back without calling the processor again.
#[derive(Serialize, Deserialize)]
enum Charged {
    /// 200 or 201 with the charge's id.
    Charge(Charge),
    /// 402: the card was declined; no money moved.
    Declined,
}

/// A processor that gave no outcome: 409 (the same key in flight), a 5xx, another status, a
/// timeout or a refused connection. Not journaled: the payment answers 503 and its retry calls the
/// processor again, under the same key.
#[derive(Debug)]
struct ProcessorUnavailable(String);

impl std::fmt::Display for ProcessorUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Charges the payment as the journaled step `charge`: the first execution calls the processor
/// and journals its outcome before going on; a later one (after a crash, a cut deploy, a 503 that
/// released the key) gets the outcome from the journal. The processor also gets the step's
/// downstream key as its `Idempotency-Key`, so that a crash between its answer and the journal
/// write is a replay on its side, not a second charge. The `Err` is the answer to send instead of
/// a payment: 402 (a decline), 503 (no outcome from the processor, or the journal failed).
async fn charge(
    steps: &Steps,
    processor: &Processor,
    ledger: &Ledger,
    req: &HttpRequest,
    client: &str,
    order: &Order<'_>,
) -> Result<Charge, HttpResponse> {
    let charged = steps
        .run("charge", |key| async move {
            let key = match processor.keys {
                KeyMode::Step => Some(key.to_string()),
                KeyMode::HandBuilt => Some(format!("{client}:{}", idempotency_key(req))),
                KeyMode::NoKey => None,
            };
            processor.charge(order, key.as_deref()).await
        })
        .await;
    if steps.resumed() {
        ledger.resumed.fetch_add(1, Ordering::SeqCst);
    }
    match charged {
        Ok(Charged::Charge(charge)) => Ok(charge),
        Ok(Charged::Declined) => Err(declined()),
        Err(StepError::Failed(ProcessorUnavailable(why))) => {
            tracing::warn!(%why, "the processor gave no outcome; the payment answers 503");
            Err(problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "processor-unavailable",
                "Processor unavailable",
                "The payment processor is unavailable; retry with the same key.",
            ))
        }
        // The journal's own failures: 503 (lease lost, store down) or 500 (misuse), as idem
        // answers them.
        Err(other) => Err(actix_web::ResponseError::error_response(&other)),
    }
}

/// The `Idempotency-Key` a charge sends: the step's downstream key. `PAYMENTS_DOWNSTREAM_KEY`
/// chooses another **for the crash test's comparison only** (`tests/crash_charges.rs`): never
/// set it in a real deployment.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyMode {
    /// `step` (the default): the step's downstream key (a digest of the record's address, the
    /// handler and the step: the same on every execution and instance, no client bytes).
    Step,
    /// `hand-built`: `<client>:<the client's Idempotency-Key>`, what the README showed before
    /// steps existed (the client's raw key, the same for every call the handler makes).
    HandBuilt,
    /// `none`: no `Idempotency-Key` (a processor that cannot deduplicate).
    NoKey,
}

impl KeyMode {
    fn from_env() -> std::io::Result<Self> {
        match std::env::var("PAYMENTS_DOWNSTREAM_KEY").as_deref() {
            Err(_) | Ok("step") => Ok(Self::Step),
            Ok("hand-built") => Ok(Self::HandBuilt),
            Ok("none") => Ok(Self::NoKey),
            Ok(other) => Err(std::io::Error::other(format!(
                "PAYMENTS_DOWNSTREAM_KEY must be `step`, `hand-built` or `none`, not {other:?}"
            ))),
        }
    }
}

/// How long a charge may take at the processor before the payment answers 503.
const PROCESSOR_TIMEOUT: Duration = Duration::from_secs(10);

/// The card processor: `PROCESSOR_URL`, else the built-in fake.
struct Processor {
    backend: Backend,
    keys: KeyMode,
}

enum Backend {
    /// `POST {url}/charges` over HTTP.
    Remote {
        http: reqwest::Client,
        charges: String,
    },
    /// In this process: charges `GET /processor/charges` lists.
    BuiltIn(Arc<BuiltInProcessor>),
}

impl Processor {
    fn from_env() -> std::io::Result<Self> {
        let keys = KeyMode::from_env()?;
        let backend = match std::env::var("PROCESSOR_URL") {
            Ok(url) => {
                let http = reqwest::Client::builder()
                    .timeout(PROCESSOR_TIMEOUT)
                    .build()
                    .map_err(std::io::Error::other)?;
                tracing::info!(%url, "charging through the processor at PROCESSOR_URL");
                Backend::Remote {
                    http,
                    charges: format!("{}/charges", url.trim_end_matches('/')),
                }
            }
            Err(_) => {
                tracing::info!(
                    "charging through the built-in fake processor (set PROCESSOR_URL for a real one)"
                );
                Backend::BuiltIn(Arc::default())
            }
        };
        Ok(Self { backend, keys })
    }

    /// One charge request, and the processor's outcome.
    async fn charge(
        &self,
        order: &Order<'_>,
        key: Option<&str>,
    ) -> Result<Charged, ProcessorUnavailable> {
        match &self.backend {
            Backend::BuiltIn(processor) => Ok(processor.charge(order, key)),
            Backend::Remote { http, charges } => {
                let body = serde_json::to_vec(order)
                    .map_err(|e| ProcessorUnavailable(format!("encoding the charge: {e}")))?;
                let mut request = http
                    .post(charges.as_str())
                    .header(header::CONTENT_TYPE.as_str(), "application/json")
                    .body(body);
                if let Some(key) = key {
                    request = request.header("Idempotency-Key", key);
                }
                let response = request
                    .send()
                    .await
                    .map_err(|e| ProcessorUnavailable(format!("POST {charges}: {e}")))?;
                let status = response.status().as_u16();
                let body = response
                    .bytes()
                    .await
                    .map_err(|e| ProcessorUnavailable(format!("POST {charges}: {e}")))?;
                match status {
                    200 | 201 => serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v.get("id")?.as_str().map(str::to_owned))
                        .map(|id| Charged::Charge(Charge { id }))
                        .ok_or_else(|| {
                            ProcessorUnavailable(format!(
                                "POST {charges}: {status} without a charge id"
                            ))
                        }),
                    402 => Ok(Charged::Declined),
                    other => Err(ProcessorUnavailable(format!("POST {charges}: {other}"))),
                }
            }
        }
    }
}

/// The built-in fake processor: it declines the destination `decline`, charges anything else,
/// and deduplicates by `Idempotency-Key` like a real processor (the same key: the same outcome,
/// no second charge; a charge without a key is a new one each time).
#[derive(Default)]
struct BuiltInProcessor {
    state: Mutex<BuiltInState>,
}

#[derive(Default)]
struct BuiltInState {
    /// The outcome given to each key.
    by_key: HashMap<String, Option<usize>>,
    /// The charges made, in order.
    charges: Vec<BuiltInCharge>,
}

/// One charge of the built-in processor, as `GET /processor/charges` lists it.
#[derive(Clone, Serialize)]
struct BuiltInCharge {
    id: String,
    /// The `Idempotency-Key` it was made under (`null` without one).
    idempotency_key: Option<String>,
    amount: u64,
    currency: String,
    destination: String,
    /// The charge requests that carried its key (1 if the key was never sent again).
    requests: u64,
}

impl BuiltInProcessor {
    fn charge(&self, order: &Order<'_>, key: Option<&str>) -> Charged {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(seen) = key.and_then(|k| state.by_key.get(k).copied()) {
            return match seen {
                Some(i) => {
                    state.charges[i].requests += 1;
                    Charged::Charge(Charge {
                        id: state.charges[i].id.clone(),
                    })
                }
                None => Charged::Declined,
            };
        }
        let charged = (order.destination != "decline").then(|| {
            state.charges.push(BuiltInCharge {
                id: format!("ch_{:016x}", rand::random::<u64>()),
                idempotency_key: key.map(str::to_owned),
                amount: order.amount,
                currency: order.currency.to_owned(),
                destination: order.destination.to_owned(),
                requests: 1,
            });
            state.charges.len() - 1
        });
        if let Some(key) = key {
            state.by_key.insert(key.to_owned(), charged);
        }
        match charged {
            Some(i) => Charged::Charge(Charge {
                id: state.charges[i].id.clone(),
            }),
            None => Charged::Declined,
        }
    }

    fn charges(&self) -> Vec<BuiltInCharge> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .charges
            .clone()
    }
}

/// The built-in processor's charges (only without `PROCESSOR_URL`): what a test counts per key.
#[get("/processor/charges")]
async fn processor_charges(processor: web::Data<Processor>) -> HttpResponse {
    match &processor.backend {
        Backend::BuiltIn(processor) => HttpResponse::Ok().json(json!({
            "charges": processor.charges(),
        })),
        Backend::Remote { .. } => problem(
            StatusCode::NOT_FOUND,
            "not-found",
            "No built-in processor",
            "Charges go to PROCESSOR_URL; ask that processor.",
        ),
    }
}

#[get("/payments/{id}")]
async fn get_payment(
    client: Client,
    ledger: web::Data<Ledger>,
    database: web::Data<Database>,
    id: web::Path<String>,
) -> HttpResponse {
    let found = match &database.0 {
        #[cfg(feature = "postgres")]
        Some(pool) => match db::find(pool, &client.0, &id).await {
            Ok(found) => found,
            Err(e) => return db::unavailable(&e),
        },
        _ => ledger
            .payments
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(client.0, id.into_inner()))
            .cloned(),
    };
    match found {
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
async fn stats(ledger: web::Data<Ledger>, database: web::Data<Database>) -> HttpResponse {
    let payments = match &database.0 {
        #[cfg(feature = "postgres")]
        Some(pool) => match db::count(pool).await {
            Ok(n) => n,
            Err(e) => return db::unavailable(&e),
        },
        _ => ledger
            .payments
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64,
    };
    HttpResponse::Ok().json(json!({
        "executions": ledger.executions.load(Ordering::SeqCst),
        "payments": payments,
        "resumed": ledger.resumed.load(Ordering::SeqCst),
    }))
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

/// A wait before the charge.
struct Delay(Duration);

/// A wait after the payment is written, before the handler returns (and, in the transactional
/// mode, before the commit).
struct CommitDelay(Duration);

/// The Postgres pool holding the payments table, with `DATABASE_URL`.
#[cfg(feature = "postgres")]
struct Database(Option<idem::sqlx::PgPool>);
/// Without the `postgres` feature there is no database.
#[cfg(not(feature = "postgres"))]
struct Database(Option<std::convert::Infallible>);

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

/// A whole number of milliseconds from the environment, if set.
fn millis_from_env(name: &str) -> std::io::Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) => v
            .parse::<u64>()
            .map(Some)
            .map_err(|e| std::io::Error::other(format!("{name} must be a whole number: {e}"))),
        Err(_) => Ok(None),
    }
}

/// `POST /payments`: the transactional handler when the records are in Postgres, else the
/// plain one.
fn payments_route(cfg: &mut web::ServiceConfig, transactional: bool) {
    #[cfg(feature = "postgres")]
    if transactional {
        cfg.service(db::create_payment_in_transaction);
        return;
    }
    let _ = transactional;
    cfg.service(create_payment);
}

/// The idempotency store and the payments database from the environment: with `DATABASE_URL`,
/// see [`db::stores_from_env`]; else the store of `store_from_env` and no database.
async fn stores_from_env() -> std::io::Result<(Idempotency, Database, bool)> {
    if std::env::var_os("DATABASE_URL").is_none() {
        return Ok((store_from_env().await?, Database(None), false));
    }
    #[cfg(feature = "postgres")]
    return db::stores_from_env().await;
    #[cfg(not(feature = "postgres"))]
    Err(std::io::Error::other(
        "DATABASE_URL needs the `postgres` feature: cargo run --features postgres --example payments",
    ))
}

/// The payments in Postgres (`DATABASE_URL`, feature `postgres`).
#[cfg(feature = "postgres")]
mod db {
    use actix_web::{post, web, HttpRequest, HttpResponse};
    use idem::{
        idempotent,
        sqlx::{self, PgPool},
        Idempotency, PgTransaction, PostgresStore, ScopeId, Steps,
    };

    use super::{
        charge, client_of, created, idempotency_key, problem, store_from_env,
        unavailable_after_charge, validate, Client, CommitDelay, Database, Delay, Ledger,
        NewPayment, Order, Payment, Processor,
    };

    /// The advisory lock under which instances starting together create the table.
    const SETUP_LOCK: i64 = 0x7061_796d_656e_7473;

    /// The payments table, created where missing, under an advisory lock (one simple-protocol
    /// message: one implicit transaction that holds the lock), so that instances starting at
    /// once do not race on `CREATE TABLE IF NOT EXISTS`.
    async fn create_table(pool: &PgPool) -> Result<(), sqlx::Error> {
        sqlx::raw_sql(&format!(
            "SELECT pg_advisory_xact_lock({SETUP_LOCK});
             CREATE TABLE IF NOT EXISTS payments (
                 id              text PRIMARY KEY,
                 client          text NOT NULL,
                 idempotency_key text NOT NULL,
                 amount          bigint NOT NULL,
                 currency        text NOT NULL,
                 destination     text NOT NULL,
                 status          text NOT NULL,
                 created_at      text NOT NULL,
                 charge          text NOT NULL DEFAULT ''
             );
             ALTER TABLE payments ADD COLUMN IF NOT EXISTS charge text NOT NULL DEFAULT '';"
        ))
        .execute(pool)
        .await
        .map(|_| ())
    }

    /// With `REDIS_URL` (or `REDIS_CLUSTER_URLS`): records in Redis, payments in Postgres, written
    /// on their own. Without: records in a `PostgresStore` on the same database, each payment
    /// written in its record's transaction.
    pub(super) async fn stores_from_env() -> std::io::Result<(Idempotency, Database, bool)> {
        let url = std::env::var("DATABASE_URL").unwrap_or_default();
        let io = |e: &dyn std::fmt::Display| std::io::Error::other(format!("DATABASE_URL: {e}"));
        let redis = std::env::var_os("REDIS_URL").is_some()
            || std::env::var_os("REDIS_CLUSTER_URLS").is_some();
        if redis {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .connect_lazy(&url)
                .map_err(|e| io(&e))?;
            create_table(&pool).await.map_err(|e| io(&e))?;
            tracing::info!("payments in Postgres, records in Redis (no transaction)");
            return Ok((store_from_env().await?, Database(Some(pool)), false));
        }
        let store = PostgresStore::from_url(&url).map_err(|e| io(&e))?;
        store.migrate().await.map_err(|e| io(&e))?;
        create_table(store.pool()).await.map_err(|e| io(&e))?;
        tracing::info!(
            "payments and records in Postgres: each payment commits with its record (transactional mode)"
        );
        let pool = store.pool().clone();
        let idempotency =
            Idempotency::new(store).scope_resolver(|req| client_of(req).map(ScopeId::new));
        // The transactional handler needs the records in this PostgresStore: checked at start.
        idempotency.check_transactional().map_err(|e| io(&e))?;
        Ok((idempotency, Database(Some(pool)), true))
    }

    /// Writes the payment row, keeping the idempotency key that created it (for audits, and
    /// to count duplicates in the crash test).
    pub(super) async fn insert(
        conn: impl sqlx::PgExecutor<'_>,
        client: &str,
        key: &str,
        p: &Payment,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO payments (id, client, idempotency_key, amount, currency, destination, \
             status, created_at, charge) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&p.id)
        .bind(client)
        .bind(key)
        // `validate` bounds the amount: a value out of range is an error, never a clamped row.
        .bind(i64::try_from(p.amount).map_err(|e| sqlx::Error::Encode(Box::new(e)))?)
        .bind(&p.currency)
        .bind(&p.destination)
        .bind(&p.status)
        .bind(&p.created_at)
        .bind(&p.charge)
        .execute(conn)
        .await
        .map(|_| ())
    }

    pub(super) async fn find(
        pool: &PgPool,
        client: &str,
        id: &str,
    ) -> Result<Option<Payment>, sqlx::Error> {
        #[allow(clippy::type_complexity)]
        let row: Option<(String, i64, String, String, String, String, String)> = sqlx::query_as(
            "SELECT id, amount, currency, destination, status, created_at, charge FROM payments \
             WHERE client = $1 AND id = $2",
        )
        .bind(client)
        .bind(id)
        .fetch_optional(pool)
        .await?;
        Ok(row.map(
            |(id, amount, currency, destination, status, created_at, charge)| Payment {
                id,
                amount: u64::try_from(amount).unwrap_or(0),
                currency,
                destination,
                status,
                created_at,
                charge,
            },
        ))
    }

    pub(super) async fn count(pool: &PgPool) -> Result<u64, sqlx::Error> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM payments")
            .fetch_one(pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub(super) fn unavailable(e: &sqlx::Error) -> HttpResponse {
        tracing::error!(error = %e, "the payments database failed");
        problem(
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
            "database-unavailable",
            "Database unavailable",
            "The payments database is unavailable; retry with the same key.",
        )
    }

    /// `POST /payments` in the transactional mode: the charge first, as a journaled step
    /// (committed at once, outside the transaction: the money moved whatever happens next), then
    /// the payment row through the request's transaction, then the handler meets its outcome. The
    /// runtime commits the row with the completed record, or rolls it back (a 503 here, a crash, a
    /// lost lease); the retry finds the charge in the journal and writes the row again.
    #[post("/payments")]
    #[idempotent(ttl = "24h", require_key, fingerprint = "json")]
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn create_payment_in_transaction(
        req: HttpRequest,
        client: Client,
        ledger: web::Data<Ledger>,
        delay: web::Data<Delay>,
        commit_delay: web::Data<CommitDelay>,
        processor: web::Data<Processor>,
        steps: Steps,
        mut tx: PgTransaction,
        body: web::Json<NewPayment>,
    ) -> actix_web::Result<HttpResponse> {
        ledger
            .executions
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if !delay.0.is_zero() {
            tokio::time::sleep(delay.0).await;
        }
        let (amount, currency, destination) = match validate(&body) {
            Ok(fields) => fields,
            Err(detail) => {
                return Ok(problem(
                    actix_web::http::StatusCode::BAD_REQUEST,
                    "invalid-payment",
                    "Invalid payment",
                    &detail,
                ))
            }
        };
        let order = Order {
            amount,
            currency: &currency,
            destination: &destination,
        };
        // A declined card moves no money: nothing to write.
        let charge = match charge(&steps, &processor, &ledger, &req, &client.0, &order).await {
            Ok(charge) => charge,
            Err(answer) => return Ok(answer),
        };
        let payment = Payment::new(amount, currency, destination, charge.id);
        let key = idempotency_key(&req);
        if let Err(e) = insert(&mut *tx.acquire().await?, &client.0, &key, &payment).await {
            return Ok(unavailable(&e));
        }
        if !commit_delay.0.is_zero() {
            tokio::time::sleep(commit_delay.0).await;
        }
        // `unavailable`: a 503 after the write, which the runtime rolls back.
        if let Some(answer) = unavailable_after_charge(&payment.destination) {
            return Ok(answer);
        }
        Ok(created(&payment))
    }
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:8080".to_owned());
    let delay_ms = millis_from_env("PAYMENTS_DELAY_MS")?.unwrap_or(0);
    let commit_delay_ms = millis_from_env("PAYMENTS_COMMIT_DELAY_MS")?.unwrap_or(0);
    let (idempotency, database, transactional) = stores_from_env().await?;
    let idempotency = match millis_from_env("PAYMENTS_LEASE_MS")? {
        Some(ms) => idempotency.lease(Duration::from_millis(ms.max(1))),
        None => idempotency,
    };
    // The application, not idem, installs the recorder; this one only renders (no listener).
    // Buckets make idem's latencies Prometheus histograms, which add up across instances;
    // without them the exporter renders every histogram as a summary of this process alone.
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("idem_store_operation_seconds".to_owned()),
            STORE_SECONDS_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("idem_wait_seconds".to_owned()),
                WAIT_SECONDS_BUCKETS,
            )
        })
        .and_then(PrometheusBuilder::install_recorder)
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
    let ledger = web::Data::new(Ledger::default());
    let delay = web::Data::new(Delay(Duration::from_millis(delay_ms)));
    let commit_delay = web::Data::new(CommitDelay(Duration::from_millis(commit_delay_ms)));
    let database = web::Data::new(database);
    let processor = web::Data::new(Processor::from_env()?);
    tracing::info!(%bind, delay_ms, commit_delay_ms, transactional, "payments example listening");
    // Built once above and cloned into the factory, which runs once per worker: every worker
    // reaches the same records (a retry may reach any worker) through one store and one pool.
    let server = HttpServer::new(move || {
        let app = App::new()
            .app_data(idempotency.clone())
            .app_data(ledger.clone())
            .app_data(delay.clone())
            .app_data(commit_delay.clone())
            .app_data(database.clone())
            .app_data(processor.clone())
            .app_data(prometheus.clone())
            .app_data(json_config())
            .configure(|cfg| payments_route(cfg, transactional))
            .service(get_payment)
            .service(stats)
            .service(processor_charges)
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

/// The buckets of `idem_store_operation_seconds`: from an in-memory call (microseconds) through
/// Redis and Postgres round trips to the store timeout (2 s).
const STORE_SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The buckets of `idem_wait_seconds`: a duplicate waits up to its handler's `wait`.
const WAIT_SECONDS_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

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
