//! Seen from outside: the `payments` example, run as a child process, counts every outcome once in
//! its `GET /metrics` (Prometheus text), and (built with the `openapi` feature) describes its
//! idempotent endpoint in `GET /openapi.json`.

mod common;

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{example_binary, post, raw_request, RawResponse};
use idem_testkit::free_port;

/// One `payments` process on the in-memory store, killed when dropped.
struct Payments {
    child: Child,
    addr: SocketAddr,
}

impl Payments {
    fn start(delay_ms: u64) -> Self {
        let binary = example_binary("payments");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("an address");
        let child = Command::new(&binary)
            .env("BIND", addr.to_string())
            .env("PAYMENTS_DELAY_MS", delay_ms.to_string())
            .env("RUST_LOG", "warn")
            .env_remove("REDIS_URL")
            .env_remove("REDIS_CLUSTER_URLS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
        let mut payments = Self { child, addr };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = payments.child.try_wait() {
                panic!("the payments example exited with {status} before it listened on {addr}");
            }
            assert!(
                Instant::now() < deadline,
                "the payments example did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        payments
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
