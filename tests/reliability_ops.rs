//! Exactly once outside the lab: what a production Redis and a production deploy do to a running
//! app, on real processes.
//!
//! - Connections reset under a running handler (`CLIENT KILL`, Redis's idle `timeout`): the
//!   completion and the next claims are re-sent on fresh connections; no second execution, no 503.
//! - Eviction: a Redis whose `maxmemory-policy` can evict records is refused (503, and the examples
//!   stop at start), unless the app accepts the risk; a full `noeviction` Redis answers 503 until
//!   memory frees.
//! - Deploys: SIGTERM waits for a handler whose client left, within the shutdown timeout, and its
//!   response is replayed by the next instance; past the timeout the handler is cut and its key
//!   frees itself after the lease.
//!
//! The apps are the `payments` and `orders` examples run as child processes (build them first with
//! `cargo build --examples`), or an in-process `HttpServer` where the store's builder is under
//! test.

mod common;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{example_binary, post, raw_request, try_request, RawResponse};
use idem_testkit::{free_port, RedisServer};

/// An example app as a child process, its log in a file; SIGKILLed when dropped.
struct App {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl App {
    fn spawn(example: &str, env: &[(&str, String)]) -> Self {
        let binary = example_binary(example);
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("an address");
        let log = std::env::temp_dir().join(format!(
            "idem-{example}-{}-{}.log",
            std::process::id(),
            addr.port()
        ));
        let file = std::fs::File::create(&log).expect("a log file");
        let child = Command::new(&binary)
            .env("BIND", addr.to_string())
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            // The examples log to standard output, and report a failed start on standard error.
            .stdout(Stdio::from(file.try_clone().expect("a second handle")))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
        Self { child, addr, log }
    }

    /// Starts `example` and waits until it listens.
    fn start(example: &str, env: &[(&str, String)]) -> Self {
        let mut app = Self::spawn(example, env);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(app.addr).is_err() {
            if let Ok(Some(status)) = app.child.try_wait() {
                panic!(
                    "the {example} example exited with {status} before it listened: {}",
                    app.log()
                );
            }
            assert!(Instant::now() < deadline, "{example} did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        app
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn executions(&self) -> u64 {
        let stats = raw_request(
            self.addr,
            b"GET /stats HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
        );
        let stats: serde_json::Value = serde_json::from_slice(&stats.body).expect("stats JSON");
        stats["executions"].as_u64().expect("executions")
    }

    /// Waits (bounded) until the handler has started `n` times.
    fn started(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.executions() < n {
            assert!(Instant::now() < deadline, "execution {n} never started");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn describe(r: &RawResponse) -> String {
    format!("{} {}", r.status, String::from_utf8_lossy(&r.body))
}

fn replayed(r: &RawResponse) -> bool {
    r.header("idempotent-replayed") == Some("true")
}

fn payment(key: &str) -> Vec<u8> {
    post(
        "/payments",
        &[("authorization", "Bearer alice"), ("idempotency-key", key)],
        br#"{"amount":1000,"currency":"EUR","destination":"acct_1"}"#,
    )
}

/// Sends `request` from a thread of its own; join it for the answer.
fn in_background(
    addr: SocketAddr,
    request: Vec<u8>,
) -> std::thread::JoinHandle<Result<RawResponse, String>> {
    std::thread::spawn(move || try_request(addr, &request, Duration::from_secs(30)))
}

/// Connection resets: the completion and the claims are re-sent on a fresh connection.
mod resets {
    use super::*;

    fn payments(redis: &RedisServer) -> App {
        App::start(
            "payments",
            &[
                ("REDIS_URL", redis.url()),
                ("PAYMENTS_DELAY_MS", "2000".to_owned()),
            ],
        )
    }

    /// A handler runs while `break_connections` cuts the app's Redis connections: the client
    /// gets 201, the handler ran once, and the retry replays it.
    fn completes_once_despite(redis: &RedisServer, break_connections: impl FnOnce(&App)) {
        let app = payments(redis);
        let first = in_background(app.addr, payment("reset"));
        app.started(1);
        break_connections(&app);
        let first = first.join().expect("client").expect("an answer");
        assert_eq!(first.status, 201, "{}", describe(&first));
        let retry = raw_request(app.addr, &payment("reset"));
        assert_eq!(retry.status, 201, "{}", describe(&retry));
        assert!(
            replayed(&retry),
            "the completion was lost with the connection: {}",
            app.log()
        );
        assert_eq!(retry.body, first.body);
        assert_eq!(app.executions(), 1);
    }

    /// `CLIENT KILL TYPE normal` one second into a two-second payment: the completion is re-sent
    /// on a fresh connection. Then, with no request in flight, the connections are killed again:
    /// the next claims are re-sent too, and none answers 503.
    #[test]
    fn a_killed_connection_neither_runs_a_payment_twice_nor_answers_503() {
        let redis = RedisServer::start();
        completes_once_despite(&redis, |_| {
            std::thread::sleep(Duration::from_secs(1));
            redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
        });

        // Claims on killed connections (every worker's lane is connected by now: the payment,
        // its retry and the check at start went over them).
        let app = payments(&redis);
        for i in 0..4 {
            let warm = raw_request(app.addr, &payment(&format!("warm-{i}")));
            assert_eq!(warm.status, 201, "{}", describe(&warm));
        }
        let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
        assert_ne!(killed, "0", "no connection was killed");
        for i in 0..4 {
            let claim = raw_request(app.addr, &payment(&format!("after-kill-{i}")));
            assert_eq!(claim.status, 201, "{}: {}", describe(&claim), app.log());
        }
    }

    /// Redis's own idle `timeout 1` closes the app's connections while a two-second payment runs
    /// (its lease is renewed every 10 s, so nothing else uses them): the same as a kill.
    #[test]
    fn redis_closing_idle_connections_does_not_run_a_payment_twice() {
        let redis = RedisServer::start();
        redis.cli(&["CONFIG", "SET", "timeout", "1"]);
        completes_once_despite(&redis, |_| {});
        let idle_closed = redis.cli(&["INFO", "stats"]);
        eprintln!(
            "{}",
            idle_closed
                .lines()
                .find(|l| l.starts_with("total_connections_received"))
                .unwrap_or_default()
        );
    }
}
