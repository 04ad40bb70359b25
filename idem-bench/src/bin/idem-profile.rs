//! Drives N requests through one endpoint in process (no network, no load generator), for a
//! profiler: `scripts/profile.sh` runs it under callgrind twice (N and 2N requests) and reports the
//! instructions per request as the difference, so start-up cost cancels out.
//!
//! ```text
//! idem-profile <row> <requests> [redis-url]
//! rows: plain | memory-first | memory-replay | redis-first | redis-replay
//! ```
//!
//! With `IDEM_PROFILE_METRICS=1` in the environment, the Prometheus recorder is installed first
//! (the bench's `--metrics`, without its upkeep thread): the difference between the two counts is
//! what idem's metrics cost per request.
//!
//! Every row runs the same handler as the load benchmark (an authenticated caller, a JSON body, a
//! 201 with a ~200-byte JSON body and a `Location` header); the `*-replay` rows store one record
//! first and then replay it.

use std::{
    borrow::Cow,
    future::{ready, Ready},
};

use actix_web::{
    dev::Payload, http::header, test, web, App, FromRequest, HttpRequest, HttpResponse,
};
use idem::{idempotent, Idempotency, IdempotencyScope, MemoryStore, RedisStore};
use serde::{Deserialize, Serialize};

struct Account(String);

impl FromRequest for Account {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let account = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|v| Self(v.to_owned()))
            .ok_or_else(|| actix_web::error::ErrorUnauthorized("no bearer token"));
        ready(account)
    }
}

impl IdempotencyScope for Account {
    fn scope_id(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.0)
    }
}

#[derive(Deserialize)]
struct NewPayment {
    amount: u64,
    currency: String,
    destination: String,
}

#[derive(Serialize)]
struct Payment<'a> {
    id: &'a str,
    amount: u64,
    currency: &'a str,
    destination: &'a str,
    status: &'static str,
    created_at: &'static str,
}

fn pay(account: &Account, body: &NewPayment) -> HttpResponse {
    let id = format!("pay_{:016x}", body.amount ^ account.0.len() as u64);
    HttpResponse::Created()
        .insert_header((header::LOCATION, format!("/payments/{id}")))
        .json(Payment {
            id: &id,
            amount: body.amount,
            currency: &body.currency,
            destination: &body.destination,
            status: "succeeded",
            created_at: "2026-11-30T12:00:00Z",
        })
}

async fn plain(account: Account, body: web::Json<NewPayment>) -> HttpResponse {
    pay(&account, &body)
}

#[idempotent(scope = Account, ttl = "24h", require_key)]
async fn idempotent_pay(account: Account, body: web::Json<NewPayment>) -> HttpResponse {
    pay(&account, &body)
}

const BODY: &str = r#"{"amount":1000,"currency":"EUR","destination":"acct_1"}"#;

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let row = args
        .next()
        .ok_or("usage: idem-profile <row> <requests> [redis-url]")?;
    let n: usize = args
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or("the number of requests")?;
    let redis_url = args.next();
    if std::env::var_os("IDEM_PROFILE_METRICS").is_some() {
        install_recorder()?;
    }
    actix_web::rt::System::new().block_on(async move {
        let idem = match (row.as_str(), &redis_url) {
            ("redis-first" | "redis-replay", Some(url)) => {
                let store = RedisStore::from_url(url).map_err(|e| e.to_string())?;
                store.check().await.map_err(|e| e.to_string())?;
                Idempotency::new(store)
            }
            ("redis-first" | "redis-replay", None) => return Err("a redis URL".to_owned()),
            _ => Idempotency::new(MemoryStore::new()),
        };
        let app = test::init_service(
            App::new()
                .app_data(idem)
                .route("/plain", web::post().to(plain))
                .route("/payments", web::post().to(idempotent_pay)),
        )
        .await;
        let replay = row.ends_with("-replay");
        let path = if row == "plain" {
            "/plain"
        } else {
            "/payments"
        };
        let run = std::process::id();
        for i in 0..n {
            let key = if replay {
                format!("replay-{run}")
            } else {
                format!("k-{run}-{i}")
            };
            let req = test::TestRequest::post()
                .uri(path)
                .insert_header((header::AUTHORIZATION, "Bearer acct_1"))
                .insert_header((header::CONTENT_TYPE, "application/json"))
                .insert_header(("idempotency-key", key))
                .set_payload(BODY)
                .to_request();
            let resp = test::call_service(&app, req).await;
            if resp.status() != 201 {
                return Err(format!("request {i} answered {}", resp.status()));
            }
            let _ = test::read_body(resp).await;
        }
        Ok(())
    })
}

/// The recorder an application installs (the README's buckets), as the bench's `--metrics` does.
fn install_recorder() -> Result<(), String> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("idem_store_operation_seconds".into()),
            &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ],
        )
        .map_err(|e| format!("the metrics buckets: {e}"))?
        .install_recorder()
        .map(drop)
        .map_err(|e| format!("installing the metrics recorder: {e}"))
}
