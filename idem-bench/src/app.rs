//! The app under load: one actix-web server with every benchmarked endpoint.
//!
//! Every endpoint runs the same business handler (the payments example's `create_payment`: an
//! authenticated caller, a JSON body, a 201 with a ~200-byte JSON body and a `Location` header),
//! so that the rows differ only in what they add around it.

use std::{
    borrow::Cow,
    future::{ready, Ready},
    net::TcpListener,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread,
};

use actix_web::{
    dev::{Payload, ServerHandle},
    http::header::{self, HeaderValue},
    web, App, FromRequest, HttpRequest, HttpResponse, HttpServer,
};
use idem::{
    deadpool_redis,
    redis::{self, aio::MultiplexedConnection, FromRedisValue},
    Idempotency, IdempotencyScope, MemoryStore, RedisStore,
};
use serde::{Deserialize, Serialize};

/// The lease the hand-written floor claims a key for (the library's default).
const FLOOR_LEASE_MS: u64 = 30_000;
/// The memory store's capacity in the bench: room for every record of a run.
const MEMORY_CAPACITY: usize = 12 * 1024 * 1024 * 1024;
/// The record TTL, in the floor and in `#[idempotent(ttl = "24h")]`.
const TTL_MS: u64 = 24 * 60 * 60 * 1000;

/// How the app is set up.
#[derive(Debug, Clone)]
pub(crate) struct AppConfig {
    pub(crate) redis_url: String,
    pub(crate) workers: usize,
    pub(crate) lanes: usize,
}

/// The caller, from `Authorization: Bearer <account>`, like the payments example's `AuthUser`.
pub(crate) struct Account(String);

impl FromRequest for Account {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let account = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .filter(|v| !v.is_empty())
            .map(|v| Self(v.to_owned()))
            .ok_or_else(|| actix_web::error::ErrorUnauthorized("no bearer token"));
        ready(account)
    }
}

impl Account {
    /// The bearer token.
    pub(crate) fn name(&self) -> &str {
        &self.0
    }
}

impl IdempotencyScope for Account {
    fn scope_id(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.0)
    }
}

#[derive(Deserialize)]
pub(crate) struct NewPayment {
    amount: u64,
    currency: String,
    customer: String,
}

#[derive(Serialize)]
struct Payment<'a> {
    id: &'a str,
    object: &'static str,
    amount: u64,
    currency: &'a str,
    customer: &'a str,
    account: &'a str,
    status: &'static str,
    description: &'static str,
    livemode: bool,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The business handler every row runs: a 201 with a JSON body and a `Location`.
pub(crate) fn payment(account: &Account, body: &NewPayment) -> (String, Vec<u8>) {
    let id = format!("pay_{:016x}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let json = serde_json::to_vec(&Payment {
        id: &id,
        object: "payment",
        amount: body.amount,
        currency: &body.currency,
        customer: &body.customer,
        account: &account.0,
        status: "succeeded",
        description: "Order #1042, 2 items, shipped to Berlin",
        livemode: false,
    })
    .unwrap_or_default();
    (format!("/payments/{id}"), json)
}

fn created(location: String, json: Vec<u8>) -> HttpResponse {
    HttpResponse::Created()
        .insert_header((header::LOCATION, location))
        .content_type("application/json")
        .body(json)
}

/// Row 1: no idempotency, no Redis.
async fn plain(account: Account, body: web::Json<NewPayment>) -> HttpResponse {
    let (location, json) = payment(&account, &body);
    created(location, json)
}

/// Rows 3 to 5: the same handler under `#[idempotent]`, as the payments example writes it.
#[idem::idempotent(scope = Account, ttl = "24h", require_key)]
async fn create_payment(account: Account, body: web::Json<NewPayment>) -> HttpResponse {
    let (location, json) = payment(&account, &body);
    created(location, json)
}

/// Rows 3s and 4s: the same handler with one journaled step (as a handler wraps a call to a
/// processor; here the step computes the payment, so the row measures the journal alone).
#[idem::idempotent(scope = Account, ttl = "24h", require_key)]
async fn create_payment_step(
    account: Account,
    body: web::Json<NewPayment>,
    steps: idem::Steps,
) -> Result<HttpResponse, actix_web::Error> {
    let (location, json) = steps
        .run("charge", |_key| async {
            Ok::<_, std::convert::Infallible>(payment(&account, &body))
        })
        .await?;
    Ok(created(location, json))
}

/// How a hand-written handler reaches Redis.
#[derive(Clone)]
pub(crate) enum Setup {
    /// A deadpool-redis checkout per request (the pool recycles it first: `UNWATCH` + `PING`).
    Pool(deadpool_redis::Pool),
    /// One multiplexed connection shared by every worker.
    Shared(
        Arc<tokio::sync::OnceCell<MultiplexedConnection>>,
        redis::Client,
    ),
    /// One multiplexed connection per actix worker (its I/O task runs on that worker's thread).
    Worker,
}

/// The per-worker multiplexed connection.
pub(crate) struct WorkerConn(MultiplexedConnection);

enum Held {
    Pooled(deadpool_redis::Connection),
    Mux(MultiplexedConnection),
}

impl Held {
    async fn query<T: FromRedisValue>(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Self::Pooled(c) => cmd.query_async(c).await,
            Self::Mux(c) => cmd.query_async(c).await,
        }
    }
}

async fn connect(req: &HttpRequest) -> Result<Held, HttpResponse> {
    let unavailable = |e: &dyn std::fmt::Display| {
        HttpResponse::ServiceUnavailable().body(format!("redis unavailable: {e}"))
    };
    match req.app_data::<Setup>() {
        Some(Setup::Pool(pool)) => pool
            .get()
            .await
            .map(Held::Pooled)
            .map_err(|e| unavailable(&e)),
        Some(Setup::Shared(cell, client)) => cell
            .get_or_try_init(|| client.get_multiplexed_async_connection())
            .await
            .map(|c| Held::Mux(c.clone()))
            .map_err(|e| unavailable(&e)),
        Some(Setup::Worker) => req
            .app_data::<web::Data<WorkerConn>>()
            .map(|c| Held::Mux(c.0.clone()))
            .ok_or_else(|| unavailable(&"no worker connection")),
        None => Err(unavailable(&"no setup")),
    }
}

fn floor_key(req: &HttpRequest, account: &Account) -> Option<String> {
    let key = req.headers().get("idempotency-key")?.to_str().ok()?;
    Some(format!("floor:{}:{key}", account.0))
}

/// Row 2: the least a correct first request needs, by hand: `SET key NX PX` to claim, the
/// handler, one `SET` to store the response.
async fn floor(req: HttpRequest, account: Account, body: web::Json<NewPayment>) -> HttpResponse {
    let Some(key) = floor_key(&req, &account) else {
        return HttpResponse::BadRequest().finish();
    };
    let mut conn = match connect(&req).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let claim = redis::cmd("SET")
        .arg(&key)
        .arg(b"pending")
        .arg("NX")
        .arg("PX")
        .arg(FLOOR_LEASE_MS)
        .to_owned();
    match conn.query::<Option<()>>(&claim).await {
        Ok(Some(())) => {}
        Ok(None) => return HttpResponse::Conflict().finish(),
        Err(e) => return HttpResponse::ServiceUnavailable().body(e.to_string()),
    }
    let (location, json) = payment(&account, &body);
    let store = redis::cmd("SET")
        .arg(&key)
        .arg(&json)
        .arg("PX")
        .arg(TTL_MS)
        .to_owned();
    if let Err(e) = conn.query::<()>(&store).await {
        return HttpResponse::ServiceUnavailable().body(e.to_string());
    }
    created(location, json)
}

/// Row 4's baseline: one `GET` per request, the stored body sent back.
async fn one_get(req: HttpRequest, account: Account) -> HttpResponse {
    let Some(key) = floor_key(&req, &account) else {
        return HttpResponse::BadRequest().finish();
    };
    let mut conn = match connect(&req).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    match conn
        .query::<Option<Vec<u8>>>(redis::cmd("GET").arg(&key))
        .await
    {
        Ok(Some(body)) => {
            let mut resp = HttpResponse::Created()
                .content_type("application/json")
                .body(body);
            resp.headers_mut()
                .insert(header::LOCATION, HeaderValue::from_static("/payments/x"));
            resp
        }
        Ok(None) => HttpResponse::NotFound().finish(),
        Err(e) => HttpResponse::ServiceUnavailable().body(e.to_string()),
    }
}

/// One of the library's own Lua scripts, by name (`claim`, `complete`), as the library publishes
/// them: the hand-written rows run exactly what the library runs.
pub(crate) fn library_script(name: &str) -> &'static str {
    idem_runtime::testing::lua_scripts()
        .into_iter()
        .find_map(|(n, source)| (n == name).then_some(source))
        .unwrap_or_else(|| panic!("the library has no `{name}` script"))
}

/// A pending record's size: what the library's claim writes and complete compares against.
const PENDING: &[u8; 52] = b"id\x01P________________________________________________";

/// A script, its source (for `SCRIPT LOAD`) and its name in the library.
type Lua = (redis::Script, &'static str, &'static str);

fn scripts() -> &'static (Lua, Lua) {
    static SCRIPTS: std::sync::OnceLock<(Lua, Lua)> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| {
        (
            (
                redis::Script::new(library_script("claim")),
                library_script("claim"),
                "claim",
            ),
            (
                redis::Script::new(library_script("complete")),
                library_script("complete"),
                "complete",
            ),
        )
    })
}

/// One `EVALSHA` (after a `SCRIPT LOAD` when Redis does not know the script yet).
async fn evalsha(
    conn: &mut Held,
    (_, code, name): &Lua,
    key: &str,
    args: &[&[u8]],
) -> redis::RedisResult<redis::Value> {
    // Built by the library's own command builder, as the stores build it.
    let Some(cmd) = idem_runtime::testing::script_command(name, key.as_bytes(), args) else {
        unreachable!("the library has both scripts");
    };
    match conn.query::<redis::Value>(&cmd).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            let load = redis::cmd("SCRIPT").arg("LOAD").arg(*code).to_owned();
            conn.query::<String>(&load).await?;
            conn.query(&cmd).await
        }
        other => other,
    }
}

/// Row 2d: the floor's work through the library's own two Lua scripts, by hand: what the
/// scripts cost Redis, apart from what the library does around them.
async fn floor_lua(
    req: HttpRequest,
    account: Account,
    body: web::Json<NewPayment>,
) -> HttpResponse {
    let Some(key) = floor_key(&req, &account) else {
        return HttpResponse::BadRequest().finish();
    };
    let mut conn = match connect(&req).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let (_, complete) = scripts();
    let claim = idem_runtime::testing::claim_command(key.as_bytes(), PENDING, FLOOR_LEASE_MS);
    match conn.query::<redis::Value>(&claim).await {
        Ok(redis::Value::Nil) => {}
        Ok(_) => return HttpResponse::Conflict().finish(),
        Err(e) => return HttpResponse::ServiceUnavailable().body(e.to_string()),
    }
    let (location, json) = payment(&account, &body);
    let ttl = TTL_MS.to_string();
    match evalsha(&mut conn, complete, &key, &[PENDING, &json, ttl.as_bytes()]).await {
        Ok(redis::Value::Int(1)) => created(location, json),
        Ok(_) => HttpResponse::Conflict().finish(),
        Err(e) => HttpResponse::ServiceUnavailable().body(e.to_string()),
    }
}

/// Row 4b: the library's claim (one `SET ... NX GET`) on a stored record, by hand.
async fn get_lua(req: HttpRequest, account: Account) -> HttpResponse {
    let Some(key) = floor_key(&req, &account) else {
        return HttpResponse::BadRequest().finish();
    };
    let mut conn = match connect(&req).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let claim = idem_runtime::testing::claim_command(key.as_bytes(), PENDING, FLOOR_LEASE_MS);
    match conn.query::<redis::Value>(&claim).await {
        Ok(redis::Value::BulkString(body)) => {
            let mut resp = HttpResponse::Created()
                .content_type("application/json")
                .body(body);
            resp.headers_mut()
                .insert(header::LOCATION, HeaderValue::from_static("/payments/x"));
            resp
        }
        Ok(_) => HttpResponse::NotFound().finish(),
        Err(e) => HttpResponse::ServiceUnavailable().body(e.to_string()),
    }
}

/// A running app server.
pub(crate) struct Server {
    pub(crate) port: u16,
    /// The configuration of the RedisStore rows with the replay cache.
    pub(crate) cached: Idempotency,
    handle: ServerHandle,
    thread: Option<thread::JoinHandle<()>>,
}

impl Server {
    /// Stops the server and waits for its thread.
    pub(crate) fn stop(mut self) {
        let handle = self.handle.clone();
        actix_rt::System::new().block_on(handle.stop(false));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pool(url: &str, size: usize) -> Result<deadpool_redis::Pool, String> {
    let mut cfg = deadpool_redis::Config::from_url(url);
    cfg.pool = Some(deadpool_redis::PoolConfig::new(size));
    cfg.create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .map_err(|e| format!("pool: {e}"))
}

/// Starts the app on a free loopback port, with its own actix system on a thread of its own.
pub(crate) fn start(cfg: &AppConfig) -> Result<Server, String> {
    let client = redis::Client::open(cfg.redis_url.as_str()).map_err(|e| e.to_string())?;
    // The pool a hand-written handler checks a connection out of per request.
    let checkout_pool = pool(&cfg.redis_url, 16)?;
    // The store's own pool: it keeps `lanes` connections checked out.
    let store = RedisStore::builder(pool(&cfg.redis_url, cfg.lanes.max(1) + 2)?)
        .lanes(cfg.lanes)
        .build();
    // The same store twice: with the replay cache (the default) and without it, so that a replay
    // through the store is measured too.
    let store: Arc<dyn idem::Store> = Arc::new(store);
    let redis_idem = Idempotency::from_arc(Arc::clone(&store));
    let uncached_idem = Idempotency::from_arc(store).replay_cache(0);
    let cached = redis_idem.clone();
    // Every unique-key request of every round stays stored for the rows' 24 h ttl: millions of
    // records in a run, past the default capacity (256 MiB), which would answer 503 to new keys.
    let memory_idem = Idempotency::new(MemoryStore::with_capacity(MEMORY_CAPACITY));
    let shared = Setup::Shared(Arc::new(tokio::sync::OnceCell::new()), client.clone());

    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let workers = cfg.workers;
    let (tx, rx) = mpsc::channel();
    let thread = thread::Builder::new()
        .name("bench-app".into())
        .spawn(move || {
            let system = actix_rt::System::new();
            let server = HttpServer::new(move || {
                let client = client.clone();
                App::new()
                    .data_factory(move || {
                        let client = client.clone();
                        async move {
                            client
                                .get_multiplexed_async_connection()
                                .await
                                .map(WorkerConn)
                        }
                    })
                    // Flat resources, one per row, so that every row pays the same routing.
                    .service(web::resource("/plain/payments").route(web::post().to(plain)))
                    .service(
                        web::resource("/floor/pool")
                            .app_data(Setup::Pool(checkout_pool.clone()))
                            .route(web::post().to(floor)),
                    )
                    .service(
                        web::resource("/floor/shared")
                            .app_data(shared.clone())
                            .route(web::post().to(floor)),
                    )
                    .service(
                        web::resource("/floor/worker")
                            .app_data(Setup::Worker)
                            .route(web::post().to(floor)),
                    )
                    .service(
                        web::resource("/floor/lua")
                            .app_data(Setup::Worker)
                            .route(web::post().to(floor_lua)),
                    )
                    .service(
                        web::resource("/get/lua")
                            .app_data(Setup::Worker)
                            .route(web::post().to(get_lua)),
                    )
                    .service(
                        web::resource("/get/shared")
                            .app_data(shared.clone())
                            .route(web::post().to(one_get)),
                    )
                    .service(
                        web::resource("/get/worker")
                            .app_data(Setup::Worker)
                            .route(web::post().to(one_get)),
                    )
                    .service(
                        web::resource("/redis/payments")
                            .app_data(redis_idem.clone())
                            .route(web::post().to(create_payment)),
                    )
                    .service(
                        web::resource("/redis-uncached/payments")
                            .app_data(uncached_idem.clone())
                            .route(web::post().to(create_payment)),
                    )
                    .service(
                        web::resource("/redis/step")
                            .app_data(redis_idem.clone())
                            .route(web::post().to(create_payment_step)),
                    )
                    .service(
                        web::resource("/memory/payments")
                            .app_data(memory_idem.clone())
                            .route(web::post().to(create_payment)),
                    )
            })
            .workers(workers)
            .backlog(1024)
            .disable_signals()
            .shutdown_timeout(1)
            .listen(listener);
            let server = match server {
                Ok(s) => s.run(),
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = tx.send(Ok(server.handle()));
            let _ = system.block_on(server);
        })
        .map_err(|e| e.to_string())?;
    let handle = rx
        .recv()
        .map_err(|e| format!("app thread: {e}"))
        .and_then(|r| r)?;
    Ok(Server {
        port,
        cached,
        handle,
        thread: Some(thread),
    })
}
