//! The OpenAPI description of idempotent endpoints, for [utoipa](https://docs.rs/utoipa)
//! (feature `openapi`).
//!
//! With the feature on, `#[idempotent(...)]` written **above** `#[utoipa::path(...)]` adds to that
//! attribute a vendor extension, `x-idempotency`, holding what the attribute says (the key header,
//! whether it is required, `ttl`, `lease`, `wait`, and how the body is compared: `"fingerprint":
//! {"mode": "raw" | "json", "ignore": [JSON pointers]}`). [`IdempotencyDocs`], a [`Modify`] added to the
//! document with `#[openapi(modifiers(&IdempotencyDocs))]`, turns it into the operation's
//! parameters, responses and description:
//!
//! ```ignore
//! use idem::openapi::IdempotencyDocs;
//! use utoipa::OpenApi;
//!
//! #[idempotent(ttl = "24h", require_key)]          // first: it rewrites the utoipa attribute
//! #[utoipa::path(post, path = "/payments", request_body = NewPayment,
//!     responses((status = 201, description = "Created", body = Payment)))]
//! #[post("/payments")]
//! async fn create_payment(body: web::Json<NewPayment>) -> impl Responder { /* ... */ }
//!
//! #[derive(OpenApi)]
//! #[openapi(paths(create_payment), modifiers(&IdempotencyDocs))]
//! struct ApiDoc;
//! ```

use std::time::Duration;

use serde_json::{json, Value};
use utoipa::{
    openapi::{
        path::{Operation, Parameter, ParameterBuilder, ParameterIn},
        schema::{ObjectBuilder, SchemaFormat, Type},
        ContentBuilder, HeaderBuilder, OpenApi, Ref, RefOr, Required, ResponseBuilder,
    },
    Modify,
};

use crate::{config::Idempotency, problem::TYPE_BASE};

/// The vendor extension `#[idempotent]` writes into `#[utoipa::path]`, and [`IdempotencyDocs`]
/// completes (a handler's unset `ttl` and `lease` become the defaults) and keeps in the document.
pub const EXTENSION: &str = "x-idempotency";

/// The name of the `application/problem+json` schema component of idem's errors.
pub const PROBLEM_SCHEMA: &str = "IdempotencyProblem";

const PROBLEM_JSON: &str = "application/problem+json";

/// A utoipa [`Modify`] that documents every operation `#[idempotent]` marked (see the
/// [module](self)): the key header parameter (its name; required with `require_key`; a string of
/// 1 to 255 characters), the responses idem produces (400, 409 and 503 with `Retry-After`, 413,
/// 422, as `application/problem+json` of the [`PROBLEM_SCHEMA`] component), the
/// `Idempotent-Replayed` header on the handler's own responses, and the retention (`ttl`), lease
/// and wait in the description. An operation without the mark is left alone.
///
/// A handler that leaves `ttl` or `lease` to the app is described with idem's defaults (24 h,
/// 30 s); an app that sets other defaults with [`Idempotency::ttl`] or [`Idempotency::lease`]
/// should also write them on the attributes of the handlers it documents.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdempotencyDocs;

impl Modify for IdempotencyDocs {
    fn modify(&self, openapi: &mut OpenApi) {
        let mut patched = false;
        for item in openapi.paths.paths.values_mut() {
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
            ]
            .into_iter()
            .flatten()
            {
                patched |= document(operation);
            }
        }
        if patched {
            openapi
                .components
                .get_or_insert_with(Default::default)
                .schemas
                .insert(PROBLEM_SCHEMA.to_owned(), problem_schema());
        }
    }
}

/// What the mark says, with the defaults filled in.
struct Marked {
    header: String,
    required: bool,
    ttl: Duration,
    lease: Duration,
    wait: Option<Duration>,
    /// `Some(ignored pointers)` for the JSON fingerprint; `None` for raw bytes (also what a mark
    /// written before the JSON fingerprint existed means).
    json: Option<Vec<String>>,
}

impl Marked {
    fn read(value: &Value) -> Option<Self> {
        let millis = |name: &str| {
            value
                .get(name)
                .and_then(Value::as_u64)
                .map(Duration::from_millis)
        };
        Some(Self {
            header: value.get("header")?.as_str()?.to_owned(),
            required: value.get("required")?.as_bool()?,
            ttl: millis("ttl_ms").unwrap_or(Idempotency::DEFAULT_TTL),
            lease: millis("lease_ms").unwrap_or(Idempotency::DEFAULT_LEASE),
            wait: millis("wait_ms"),
            json: value
                .get("fingerprint")
                .filter(|f| f.get("mode").and_then(Value::as_str) == Some("json"))
                .map(|f| {
                    f.get("ignore")
                        .and_then(Value::as_array)
                        .map(|pointers| {
                            pointers
                                .iter()
                                .filter_map(|p| p.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default()
                }),
        })
    }

    fn to_json(&self) -> Value {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let mut value = json!({
            "header": self.header,
            "required": self.required,
            "ttl_ms": ms(self.ttl),
            "lease_ms": ms(self.lease),
            "fingerprint": match &self.json {
                Some(ignore) => json!({"mode": "json", "ignore": ignore}),
                None => json!({"mode": "raw", "ignore": []}),
            },
        });
        if let (Some(wait), Some(map)) = (self.wait, value.as_object_mut()) {
            map.insert("wait_ms".to_owned(), json!(ms(wait)));
        }
        value
    }
}

/// Documents one operation if it carries the mark; says whether it did.
fn document(operation: &mut Operation) -> bool {
    let Some(extensions) = operation.extensions.as_mut() else {
        return false;
    };
    let Some(marked) = extensions.get(EXTENSION).and_then(Marked::read) else {
        return false;
    };
    extensions.insert(EXTENSION.to_owned(), marked.to_json());

    // The key header, replacing one of the same name the path already declared.
    let parameters = operation.parameters.get_or_insert_with(Vec::new);
    parameters.retain(|p| {
        !matches!(p, RefOr::T(Parameter { name, parameter_in: ParameterIn::Header, .. })
            if name.eq_ignore_ascii_case(&marked.header))
    });
    parameters.push(RefOr::T(key_parameter(&marked)));

    // Every response the handler declared may be a replay.
    for response in operation.responses.responses.values_mut() {
        if let RefOr::T(response) = response {
            response.headers.insert(
                "Idempotent-Replayed".to_owned(),
                RefOr::T(
                    HeaderBuilder::new()
                        .schema(Some(
                            ObjectBuilder::new()
                                .schema_type(Type::String)
                                .enum_values(Some(["true"])),
                        ))
                        .description(Some(
                            "`true` when this response is the replay of the stored response to an \
                         earlier request with the same key (the handler did not run again).",
                        ))
                        .build(),
                ),
            );
        }
    }

    let header = &marked.header;
    let mut idem_responses = vec![(
        "400",
        format!(
            "A malformed `{header}` (empty, over 255 characters, not visible ASCII, or sent \
             twice){}, or a body that could not be read.",
            if marked.required { ", or none" } else { "" }
        ),
        false,
    )];
    idem_responses.extend([
        (
            "409",
            "The same request (same key, same body) is still in flight: retry after \
             `Retry-After` seconds with the same key."
                .to_owned(),
            true,
        ),
        (
            "413",
            "The request body is larger than the endpoint accepts; nothing was recorded."
                .to_owned(),
            false,
        ),
        (
            "422",
            format!(
                "This `{header}` was already used for a different request (method, path, query \
                 or {}): use a new key.",
                if marked.json.is_some() {
                    "the body's JSON content"
                } else {
                    "body"
                }
            ),
            false,
        ),
        (
            "503",
            "The idempotency store is unavailable, the server is shutting down, or this key's \
             record was written by a newer version of the service during an upgrade; the \
             request did not run. Retry after `Retry-After` seconds with the same key."
                .to_owned(),
            true,
        ),
    ]);
    for (status, description, retry_after) in idem_responses {
        add_response(operation, status, &description, retry_after);
    }

    let mut text = format!(
        "Idempotent: a retry with the same `{header}` and the same request replays the first \
         response, marked `Idempotent-Replayed: true`, instead of running again. A completed \
         response is kept for {ttl} (retention); a request still running holds its key for {lease} \
         (lease, renewed while it runs), after which a retry may run it again.",
        ttl = human(marked.ttl),
        lease = human(marked.lease),
    );
    if let Some(wait) = marked.wait {
        text.push_str(&format!(
            " A duplicate of a request still running waits up to {} for its response before \
             answering 409.",
            human(wait)
        ));
    }
    if let Some(ignore) = &marked.json {
        text.push_str(
            " Requests are compared by the body's JSON content: the order of members, whitespace \
             and how strings are escaped do not count",
        );
        if !ignore.is_empty() {
            let listed: Vec<String> = ignore.iter().map(|p| format!("`{p}`")).collect();
            text.push_str(&format!(", nor the values at {}", listed.join(", ")));
        }
        text.push('.');
    }
    text.push_str(if marked.required {
        " The key is required."
    } else {
        " Without a key, the request runs without idempotency."
    });
    operation.description = Some(match operation.description.take() {
        Some(own) if !own.trim().is_empty() => format!("{own}\n\n{text}"),
        _ => text,
    });
    true
}

fn key_parameter(marked: &Marked) -> Parameter {
    ParameterBuilder::new()
        .name(&marked.header)
        .parameter_in(ParameterIn::Header)
        .required(if marked.required {
            Required::True
        } else {
            Required::False
        })
        .description(Some(
            "The idempotency key: 1 to 255 visible ASCII characters, bare or as a quoted string \
             (`\"abc\"`). Send the same key again to retry this request safely.",
        ))
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(255)),
        ))
        .build()
}

/// Adds idem's response for `status`, or, when the handler declared one, adds to it.
fn add_response(operation: &mut Operation, status: &str, description: &str, retry_after: bool) {
    let content = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name(PROBLEM_SCHEMA)))
        .build();
    let retry_after_header = || {
        HeaderBuilder::new()
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(1)),
            ))
            .description(Some("Seconds to wait before retrying with the same key."))
            .build()
    };
    match operation.responses.responses.get_mut(status) {
        Some(RefOr::T(own)) => {
            own.description = format!(
                "{}. Or, from idem: {description}",
                own.description.trim_end_matches('.')
            );
            own.content
                .entry(PROBLEM_JSON.to_owned())
                .or_insert_with(|| RefOr::T(content));
            if retry_after {
                own.headers
                    .entry("Retry-After".to_owned())
                    .or_insert_with(|| RefOr::T(retry_after_header()));
            }
        }
        // A reference to a response component: the app documented it on purpose.
        Some(RefOr::Ref(_)) => {}
        None => {
            let mut response = ResponseBuilder::new()
                .description(description)
                .content(PROBLEM_JSON, content);
            if retry_after {
                response = response.header("Retry-After", retry_after_header());
            }
            operation
                .responses
                .responses
                .insert(status.to_owned(), RefOr::T(response.build()));
        }
    }
}

/// RFC 9457 problem details, as idem writes them.
fn problem_schema() -> RefOr<utoipa::openapi::schema::Schema> {
    let string = || ObjectBuilder::new().schema_type(Type::String);
    RefOr::T(
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "An error idem answered (RFC 9457 problem details); `type` names it, under \
                 https://idem.dev/problems/.",
            ))
            .property(
                "type",
                string()
                    .format(Some(SchemaFormat::Custom("uri".to_owned())))
                    .examples([format!("{TYPE_BASE}key-reused")]),
            )
            .property("title", string())
            .property(
                "status",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(400))
                    .maximum(Some(599)),
            )
            .property("detail", string())
            .required("type")
            .required("title")
            .required("status")
            .into(),
    )
}

/// `24 h`, `1 h 30 min`, `30 s`, `500 ms`; days from two days on (`7 d`).
fn human(d: Duration) -> String {
    let mut ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let mut parts = Vec::new();
    let day = if ms >= 2 * 86_400_000 {
        86_400_000
    } else {
        u64::MAX
    };
    for (unit, size) in [
        ("d", day),
        ("h", 3_600_000),
        ("min", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        if ms >= size {
            parts.push(format!("{} {unit}", ms / size));
            ms %= size;
        }
    }
    if parts.is_empty() {
        "0 s".to_owned()
    } else {
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use utoipa::openapi::{
        path::{HttpMethod, OperationBuilder, PathItem, PathsBuilder},
        OpenApiBuilder,
    };

    use super::*;

    fn doc(mark: Option<Value>) -> OpenApi {
        let mut operation = OperationBuilder::new()
            .operation_id(Some("pay"))
            .response("201", ResponseBuilder::new().description("Created"))
            .build();
        if let Some(mark) = mark {
            let mut ext = utoipa::openapi::extensions::Extensions::default();
            ext.insert(EXTENSION.to_owned(), mark);
            operation.extensions = Some(ext);
        }
        OpenApiBuilder::new()
            .paths(PathsBuilder::new().path("/pay", PathItem::new(HttpMethod::Post, operation)))
            .build()
    }

    #[test]
    fn an_unmarked_operation_is_left_alone() {
        let mut openapi = doc(None);
        let before = openapi.to_json().expect("json");
        IdempotencyDocs.modify(&mut openapi);
        assert_eq!(openapi.to_json().expect("json"), before);
    }

    #[test]
    fn a_marked_operation_is_documented() {
        let mut openapi = doc(Some(
            json!({"header": "X-Key", "required": false, "ttl_ms": 5_400_000}),
        ));
        IdempotencyDocs.modify(&mut openapi);
        let v: Value = serde_json::from_str(&openapi.to_json().expect("json")).expect("json");
        let op = &v["paths"]["/pay"]["post"];
        assert_eq!(op["parameters"][0]["name"], "X-Key");
        assert_eq!(op["parameters"][0]["in"], "header");
        assert_eq!(op["parameters"][0]["required"], false);
        assert_eq!(op["parameters"][0]["schema"]["maxLength"], 255);
        assert_eq!(
            op[EXTENSION],
            json!({"header": "X-Key", "required": false, "ttl_ms": 5_400_000, "lease_ms": 30_000,
                "fingerprint": {"mode": "raw", "ignore": []}})
        );
        for status in ["400", "409", "413", "422", "503"] {
            assert_eq!(
                op["responses"][status]["content"][PROBLEM_JSON]["schema"]["$ref"],
                format!("#/components/schemas/{PROBLEM_SCHEMA}")
            );
        }
        assert!(op["responses"]["409"]["headers"]["Retry-After"].is_object());
        assert!(op["responses"]["201"]["headers"]["Idempotent-Replayed"].is_object());
        let text = op["description"].as_str().expect("description");
        assert!(text.contains("kept for 1 h 30 min"), "{text}");
        assert!(text.contains("its key for 30 s"), "{text}");
        assert!(v["components"]["schemas"][PROBLEM_SCHEMA].is_object());
    }

    #[test]
    fn the_json_fingerprint_is_documented() {
        let mut openapi = doc(Some(json!({"header": "Idempotency-Key", "required": true,
            "fingerprint": {"mode": "json", "ignore": ["/client_ts", "/trace/id"]}})));
        IdempotencyDocs.modify(&mut openapi);
        let v: Value = serde_json::from_str(&openapi.to_json().expect("json")).expect("json");
        let op = &v["paths"]["/pay"]["post"];
        assert_eq!(
            op[EXTENSION]["fingerprint"],
            json!({"mode": "json", "ignore": ["/client_ts", "/trace/id"]})
        );
        let text = op["description"].as_str().expect("description");
        assert!(
            text.contains("compared by the body's JSON content")
                && text.contains("nor the values at `/client_ts`, `/trace/id`."),
            "{text}"
        );
        let mismatch = op["responses"]["422"]["description"].as_str().expect("422");
        assert!(mismatch.contains("the body's JSON content"), "{mismatch}");
    }

    #[test]
    fn durations_read_as_written() {
        let ms = Duration::from_millis;
        assert_eq!(human(ms(86_400_000)), "24 h");
        assert_eq!(human(ms(7 * 86_400_000)), "7 d");
        assert_eq!(human(ms(5_400_000)), "1 h 30 min");
        assert_eq!(human(ms(30_000)), "30 s");
        assert_eq!(human(ms(1_500)), "1 s 500 ms");
    }
}
