//! Seen from outside: the `payments` example, run as a child process, counts every outcome once in
//! its `GET /metrics` (Prometheus text), and (built with the `openapi` feature) describes its
//! idempotent endpoint in `GET /openapi.json`.

mod common;

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{post, raw_request, RawResponse};
use idem_testkit::spawn_example;

/// One `payments` process on the in-memory store, killed when dropped.
struct Payments {
    child: Child,
    addr: SocketAddr,
}

impl Payments {
    fn start(delay_ms: u64) -> Self {
        let delay = delay_ms.to_string();
        let (child, addr) = spawn_example("payments", &[("PAYMENTS_DELAY_MS", &delay)]);
        Self { child, addr }
    }

    fn get(&self, path: &str) -> RawResponse {
        raw_request(
            self.addr,
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
    }

    fn pay(&self, key: &str, amount: u64) -> RawResponse {
        let body = format!(r#"{{"amount":{amount},"currency":"EUR","destination":"acct_1"}}"#);
        raw_request(
            self.addr,
            &post(
                "/payments",
                &[("Authorization", "Bearer alice"), ("Idempotency-Key", key)],
                body.as_bytes(),
            ),
        )
    }

    fn executions(&self) -> u64 {
        let stats: serde_json::Value =
            serde_json::from_slice(&self.get("/stats").body).expect("stats JSON");
        stats["executions"].as_u64().expect("executions")
    }
}

impl Drop for Payments {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the sample `name{labels}` (labels in any order), if the text has it.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            if metric != name {
                return None;
            }
            let set: Vec<&str> = rest.trim_end_matches('}').split(',').collect();
            let wanted = labels
                .iter()
                .all(|(k, v)| set.contains(&&*format!("{k}=\"{v}\"")));
            (wanted && set.iter().filter(|l| !l.is_empty()).count() == labels.len())
                .then(|| value.parse().expect("a number"))
        })
}

#[test]
fn metrics_count_each_outcome_once() {
    let payments = Payments::start(600);
    let first = std::thread::scope(|s| {
        let first = s.spawn(|| payments.pay("metrics-1", 1000));
        // The first request is in the handler (counted by /stats before it sleeps): a duplicate
        // now is in flight.
        let deadline = Instant::now() + Duration::from_secs(10);
        while payments.executions() == 0 {
            assert!(Instant::now() < deadline, "the first request never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        let duplicate = payments.pay("metrics-1", 1000);
        assert_eq!(duplicate.status, 409, "{:?}", duplicate.headers);
        first.join().expect("the first request")
    });
    assert_eq!(first.status, 201);
    let replay = payments.pay("metrics-1", 1000);
    assert_eq!(replay.status, 201);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.body, first.body);
    let reused = payments.pay("metrics-1", 2000);
    assert_eq!(reused.status, 422);
    assert_eq!(payments.executions(), 1);

    let scraped = payments.get("/metrics");
    assert_eq!(scraped.status, 200);
    assert!(scraped
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain")));
    let text = String::from_utf8(scraped.body).expect("UTF-8");
    for outcome in ["executed", "replayed", "in_flight", "mismatch"] {
        assert_eq!(
            sample(
                &text,
                "idem_requests_total",
                &[("handler", "create_payment"), ("outcome", outcome)]
            ),
            Some(1.0),
            "{outcome} in\n{text}"
        );
    }
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("idem_requests_total{"))
            .count(),
        4,
        "no other outcome:\n{text}"
    );
    // Four claims (first, 409, replay, 422) and one completion, timed on the memory store.
    assert_eq!(
        sample(
            &text,
            "idem_store_operation_seconds_count",
            &[("op", "claim"), ("store", "memory")]
        ),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "idem_store_operation_seconds_count",
            &[("op", "complete"), ("store", "memory")]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        text.contains("# TYPE idem_requests_total counter"),
        "{text}"
    );
    assert!(
        text.contains("# HELP idem_requests_total Idempotent requests"),
        "{text}"
    );
    assert!(!text.contains("metrics-1"), "no key in a label:\n{text}");
    assert!(!text.contains("alice"), "no scope in a label:\n{text}");
}

/// The example sets buckets for idem's latencies, so that they are Prometheus histograms (which
/// add up across instances) rather than the summaries the exporter renders by default: every
/// claim lands in the `+Inf` bucket, and the buckets are cumulative.
#[test]
fn store_latency_is_a_histogram_with_buckets() {
    let payments = Payments::start(0);
    for key in ["buckets-1", "buckets-2"] {
        assert_eq!(payments.pay(key, 1000).status, 201);
    }
    assert!(payments
        .pay("buckets-1", 1000)
        .header("idempotent-replayed")
        .is_some());
    let text = String::from_utf8(payments.get("/metrics").body).expect("UTF-8");
    let claims = [("op", "claim"), ("store", "memory")];
    assert!(
        text.contains("# TYPE idem_store_operation_seconds histogram"),
        "rendered as:\n{text}"
    );
    let count = sample(&text, "idem_store_operation_seconds_count", &claims);
    assert_eq!(count, Some(3.0), "{text}");
    let bucket = |le: &str| {
        let labels = [claims[0], claims[1], ("le", le)];
        sample(&text, "idem_store_operation_seconds_bucket", &labels)
    };
    assert_eq!(bucket("+Inf"), count, "{text}");
    let (fast, slow) = (bucket("0.001"), bucket("2.5"));
    assert!(
        fast.is_some_and(|fast| slow.is_some_and(|slow| fast <= slow && slow <= 3.0)),
        "{text}"
    );
    assert!(
        !text.contains("idem_store_operation_seconds{"),
        "no quantile samples:\n{text}"
    );
}

/// The document `GET /openapi.json` serves is valid OpenAPI 3.1 (checked by
/// `openapi-spec-validator`, which `scripts/test.sh` installs), and its idempotency parts are
/// what `#[idempotent(ttl = "24h", require_key)]` says.
#[cfg(feature = "openapi")]
#[test]
fn openapi_document_describes_the_idempotent_endpoint() {
    use serde_json::{json, Value};

    let payments = Payments::start(0);
    let served = payments.get("/openapi.json");
    assert_eq!(served.status, 200);
    let doc: Value = serde_json::from_slice(&served.body).expect("a JSON document");

    // The whole document against the OpenAPI 3.1 schema.
    let mut validator = Command::new("python3")
        .args([
            "-c",
            "import json, sys\n\
             from openapi_spec_validator import validate, OpenAPIV31SpecValidator\n\
             validate(json.load(sys.stdin), cls=OpenAPIV31SpecValidator)\n",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/test.sh installs openapi-spec-validator)");
    std::io::Write::write_all(validator.stdin.as_mut().expect("stdin"), &served.body)
        .expect("the document to the validator");
    let checked = validator
        .wait_with_output()
        .expect("the validator's verdict");
    assert!(
        checked.status.success(),
        "the document is not valid OpenAPI 3.1 (or openapi-spec-validator is missing: \
         `python3 -m pip install openapi-spec-validator`, as scripts/test.sh does):\n{}",
        String::from_utf8_lossy(&checked.stderr)
    );

    assert_eq!(doc["openapi"], "3.1.0");
    let op = &doc["paths"]["/payments"]["post"];
    assert_eq!(op["operationId"], "create_payment");
    assert_eq!(
        op["x-idempotency"],
        json!({"header": "Idempotency-Key", "required": true, "ttl_ms": 86_400_000_u64, "lease_ms": 30_000,
            "fingerprint": {"mode": "json", "ignore": []}})
    );
    let keys: Vec<&Value> = op["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .filter(|p| p["in"] == "header" && p["name"] == "Idempotency-Key")
        .collect();
    assert_eq!(keys.len(), 1, "one key parameter: {op:#}");
    let key = keys[0];
    assert_eq!(key["required"], true);
    assert_eq!(key["schema"]["type"], "string");
    assert_eq!(key["schema"]["minLength"], 1);
    assert_eq!(key["schema"]["maxLength"], 255);

    let problem = json!("#/components/schemas/IdempotencyProblem");
    for status in ["400", "409", "413", "422", "503"] {
        let response = &op["responses"][status];
        assert_eq!(
            response["content"]["application/problem+json"]["schema"]["$ref"], problem,
            "{status}: {response:#}"
        );
    }
    for status in ["409", "503"] {
        let retry_after = &op["responses"][status]["headers"]["Retry-After"];
        assert_eq!(retry_after["schema"]["type"], "integer", "{status}");
    }
    assert!(op["responses"]["413"]["headers"]["Retry-After"].is_null());
    // The handler's own responses stay, and each may be a replay.
    assert_eq!(
        op["responses"]["201"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/Payment"
    );
    for status in ["201", "402"] {
        let replayed = &op["responses"][status]["headers"]["Idempotent-Replayed"];
        assert_eq!(replayed["schema"]["enum"], json!(["true"]), "{status}");
    }
    assert!(op["responses"]["422"]["headers"]["Idempotent-Replayed"].is_null());
    let description = op["description"].as_str().expect("a description");
    assert!(
        description.contains("kept for 24 h (retention)"),
        "{description}"
    );
    assert!(
        description.contains("its key for 30 s (lease"),
        "{description}"
    );
    assert!(
        description.contains("The key is required."),
        "{description}"
    );
    let schema = &doc["components"]["schemas"]["IdempotencyProblem"];
    assert_eq!(schema["type"], "object");
    assert_eq!(schema["required"], json!(["type", "title", "status"]));
}
