//! Concrete and opaque return types: anything that is a `Responder`.

use actix_web::{
    http::StatusCode, test, web, App, Either, HttpResponse, Responder, Result as ActixResult,
};
use idem::{idempotent, Idempotency, MemoryStore};
use serde::{Deserialize, Serialize};

#[derive(Serialize)]
struct Receipt {
    id: u32,
}

#[idempotent(scope = idem::Unscoped)]
async fn http_response() -> HttpResponse {
    HttpResponse::Accepted().finish()
}

#[idempotent(scope = idem::Unscoped)]
async fn string() -> String {
    "text".to_owned()
}

#[idempotent(scope = idem::Unscoped)]
async fn static_str() -> &'static str {
    "static"
}

#[derive(Deserialize)]
struct Fail {
    fail: bool,
}

#[idempotent(scope = idem::Unscoped)]
async fn result(query: web::Query<Fail>) -> Result<HttpResponse, actix_web::Error> {
    if query.fail {
        return Err(actix_web::error::ErrorConflict("refused"));
    }
    Ok(HttpResponse::Ok().body("ok"))
}

#[idempotent(scope = idem::Unscoped)]
async fn json_with_status() -> (web::Json<Receipt>, StatusCode) {
    (web::Json(Receipt { id: 7 }), StatusCode::CREATED)
}

#[idempotent(scope = idem::Unscoped)]
async fn opaque() -> impl Responder {
    web::Json(Receipt { id: 8 })
        .customize()
        .with_status(StatusCode::CREATED)
}

#[idempotent(scope = idem::Unscoped)]
async fn alias_result() -> ActixResult<impl Responder> {
    Ok("alias")
}

#[idempotent(scope = idem::Unscoped)]
async fn either() -> Either<String, HttpResponse> {
    Either::Left("left".to_owned())
}

#[actix_web::main]
async fn main() {
    let app = test::init_service(
        App::new()
            .app_data(Idempotency::new(MemoryStore::new()))
            .route("/http_response", web::post().to(http_response))
            .route("/string", web::post().to(string))
            .route("/static_str", web::post().to(static_str))
            .route("/result", web::post().to(result))
            .route("/json_with_status", web::post().to(json_with_status))
            .route("/opaque", web::post().to(opaque))
            .route("/alias_result", web::post().to(alias_result))
            .route("/either", web::post().to(either)),
    )
    .await;
    for (uri, status, body) in [
        ("/http_response", 202, ""),
        ("/string", 200, "text"),
        ("/static_str", 200, "static"),
        ("/result?fail=false", 200, "ok"),
        ("/result?fail=true", 409, "refused"),
        ("/json_with_status", 201, r#"{"id":7}"#),
        ("/opaque", 201, r#"{"id":8}"#),
        ("/alias_result", 200, "alias"),
        ("/either", 200, "left"),
    ] {
        for replayed in [false, true] {
            let request = test::TestRequest::post()
                .uri(uri)
                .insert_header(("Idempotency-Key", uri))
                .to_request();
            let response = test::call_service(&app, request).await;
            assert_eq!(response.status().as_u16(), status, "{uri}");
            assert_eq!(
                response.headers().contains_key("idempotent-replayed"),
                replayed,
                "{uri}"
            );
            assert_eq!(test::read_body(response).await, body, "{uri}");
        }
    }
}
