//! Every idempotent request has an `idempotent` tracing span whose `outcome` field says what
//! happened to it, so an operator can tell. A capturing layer, installed for this test's thread,
//! reads the outcome each span closed with.
//!
//! This file holds one test on purpose: the subscriber is thread-local, and no other test in this
//! binary can race it for tracing's per-callsite interest cache.

mod common;

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use actix_web::{test, web, App, HttpResponse};
use common::{Backend, Kind};
use idem::{idempotent, ScopeId};
use serde::Deserialize;
use tracing::{
    field::{Field, Visit},
    span::{Attributes, Id, Record},
    Subscriber,
};
use tracing_subscriber::{layer::Context, prelude::*, registry::LookupSpan, Layer};

/// The outcomes of the `idempotent` spans that closed, in closing order.
#[derive(Clone, Default)]
struct Outcomes(Arc<Mutex<Vec<String>>>);

impl Outcomes {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The span's latest `outcome`, kept in the span's extensions.
struct Outcome(Option<String>);

struct OutcomeVisitor<'a>(&'a mut Option<String>);

impl Visit for OutcomeVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "outcome" {
            *self.0 = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "outcome" {
            *self.0 = Some(format!("{value:?}"));
        }
    }
}

struct Capture(Outcomes);

impl<S> Layer<S> for Capture
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != "idempotent" {
            return;
        }
        let mut outcome = None;
        attrs.record(&mut OutcomeVisitor(&mut outcome));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Outcome(outcome));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(Outcome(outcome)) = span.extensions_mut().get_mut::<Outcome>() {
                values.record(&mut OutcomeVisitor(outcome));
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(&id) {
            if let Some(Outcome(outcome)) = span.extensions().get::<Outcome>() {
                let outcome = outcome.clone().unwrap_or_else(|| "<none>".to_owned());
                (self.0)
                    .0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(outcome);
            }
        }
    }
}

#[derive(Deserialize)]
struct Order {
    mode: String,
}

async fn behave(order: &Order) -> HttpResponse {
    match order.mode.as_str() {
        "slow" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            HttpResponse::Created().finish()
        }
        "unavailable" => HttpResponse::ServiceUnavailable().finish(),
        "panic" => panic!("on purpose"),
        _ => HttpResponse::Created().finish(),
    }
}

#[idempotent(require_key)]
async fn orders(order: web::Json<Order>) -> HttpResponse {
    behave(&order).await
}

#[idempotent]
async fn optional(order: web::Json<Order>) -> HttpResponse {
    behave(&order).await
}

#[idempotent(require_key, max_body = 16)]
async fn small(order: web::Json<Order>) -> HttpResponse {
    behave(&order).await
}

#[idempotent(require_key, fail_open)]
async fn open(order: web::Json<Order>) -> HttpResponse {
    behave(&order).await
}

fn request(path: &str, client: Option<&str>, key: Option<&str>, body: &str) -> test::TestRequest {
    let mut req = test::TestRequest::post()
        .uri(path)
        .insert_header(("content-type", "application/json"))
        .set_payload(body.to_owned());
    if let Some(client) = client {
        req = req.insert_header(("x-client", client));
    }
    if let Some(key) = key {
        req = req.insert_header(("idempotency-key", key));
    }
    req
}

#[actix_rt::test]
async fn every_request_records_its_outcome_on_the_idempotent_span() {
    let outcomes = Outcomes::default();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(Capture(outcomes.clone())),
    );

    let mut backend = Backend::with(Kind::Redis, |i| {
        i.scope_resolver(|req| {
            req.headers()
                .get("x-client")
                .and_then(|v| v.to_str().ok())
                .map(ScopeId::new)
                .ok_or_else(|| actix_web::error::ErrorUnauthorized("send X-Client"))
        })
    });
    let app = test::init_service(
        App::new()
            .app_data(backend.idem.clone())
            .route("/orders", web::post().to(orders))
            .route("/optional", web::post().to(optional))
            .route("/small", web::post().to(small))
            .route("/open", web::post().to(open)),
    )
    .await;
    let ok = r#"{"mode":"ok"}"#;

    // Sends each request in turn and checks the outcome its span closed with.
    let cases: Vec<(&str, test::TestRequest, u16)> = vec![
        (
            "executed",
            request("/orders", Some("c"), Some("k1"), ok),
            201,
        ),
        (
            "replayed",
            request("/orders", Some("c"), Some("k1"), ok),
            201,
        ),
        (
            "mismatch",
            request("/orders", Some("c"), Some("k1"), r#"{"mode":"other"}"#),
            422,
        ),
        ("missing_key", request("/orders", Some("c"), None, ok), 400),
        (
            "invalid_key",
            request("/orders", Some("c"), Some("a b"), ok),
            400,
        ),
        ("no_key", request("/optional", Some("c"), None, ok), 201),
        (
            "scope_refused",
            request("/orders", None, Some("k2"), ok),
            401,
        ),
        (
            "body_too_large",
            request(
                "/small",
                Some("c"),
                Some("k3"),
                r#"{"mode":"ok","pad":"xxxxxxxx"}"#,
            ),
            413,
        ),
        (
            "executed_released",
            request(
                "/orders",
                Some("c"),
                Some("k4"),
                r#"{"mode":"unavailable"}"#,
            ),
            503,
        ),
        (
            "panicked",
            request("/orders", Some("c"), Some("k5"), r#"{"mode":"panic"}"#),
            500,
        ),
    ];
    for (expected, req, status) in cases {
        let resp = test::call_service(&app, req.to_request()).await;
        assert_eq!(resp.status().as_u16(), status, "the {expected} case");
        drop(test::read_body(resp).await);
        assert_eq!(outcomes.take(), [expected]);
    }

    // Two at once: the second finds the first in flight.
    let slow = r#"{"mode":"slow"}"#;
    let first = test::call_service(
        &app,
        request("/orders", Some("c"), Some("k6"), slow).to_request(),
    );
    let second = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        test::call_service(
            &app,
            request("/orders", Some("c"), Some("k6"), slow).to_request(),
        )
        .await
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (201, 409)
    );
    assert_eq!(outcomes.take(), ["in_flight", "executed"]);

    common::assert_every_key_expires_within(backend.redis(), idem::Idempotency::DEFAULT_TTL).await;

    // The store is down: fail closed, or open where the handler asks for it.
    backend.redis().stop();
    let down = test::call_service(
        &app,
        request("/orders", Some("c"), Some("k7"), ok).to_request(),
    )
    .await;
    assert_eq!(down.status().as_u16(), 503);
    assert_eq!(outcomes.take(), ["store_error"]);
    let open = test::call_service(
        &app,
        request("/open", Some("c"), Some("k7"), ok).to_request(),
    )
    .await;
    assert_eq!(open.status().as_u16(), 201);
    assert_eq!(outcomes.take(), ["store_error_fail_open"]);
}
