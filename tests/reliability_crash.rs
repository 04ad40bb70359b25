//! Crash mid-handler: an app process is SIGKILLed while its handler runs. Its lease was being
//! renewed; nobody renews it now, so it runs out: until then a retry gets 409, after it a retry
//! runs the handler (once), and the key is never wedged for the record TTL.
//!
//! The app is the `orders` example (`examples/orders.rs`) with its settings from the environment,
//! run as child processes: instance A, which is killed, and instance B, which takes the retries.
//! Both share one `redis-server`.

mod common;

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{assert_every_key_expires_within, post, raw_request, RawResponse};
use idem_testkit::{example_binary, free_port, wait_until_listening, RedisServer};

const LEASE: Duration = Duration::from_secs(1);
const TTL: Duration = Duration::from_secs(60);

/// One `orders` process, SIGKILLed when dropped.
struct Orders {
    child: Child,
    addr: SocketAddr,
}

impl Orders {
    fn start(redis: &RedisServer, delay: Duration) -> Self {
        let binary = example_binary("orders");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("an address");
        let child = Command::new(&binary)
            .env("BIND", addr.to_string())
            .env("REDIS_URL", redis.url())
            .env("ORDERS_LEASE", format!("{}ms", LEASE.as_millis()))
            .env("ORDERS_TTL", format!("{}s", TTL.as_secs()))
            .env("ORDERS_STORE_TIMEOUT", "500ms")
            .env("ORDERS_DELAY_MS", delay.as_millis().to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
        let mut orders = Self { child, addr };
        wait_until_listening(&mut orders.child, addr, "orders example");
        orders
    }

    fn executions(&self) -> u64 {
        let stats = raw_request(
            self.addr,
            b"GET /stats HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
        );
        let stats: serde_json::Value = serde_json::from_slice(&stats.body).expect("stats JSON");
        stats["executions"].as_u64().expect("executions")
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Orders {
    fn drop(&mut self) {
        self.kill();
    }
}

fn order() -> Vec<u8> {
    post(
        "/orders",
        &[
            ("authorization", "Bearer alice"),
            ("idempotency-key", "order-1"),
        ],
        br#"{"item":"book","quantity":1}"#,
    )
}

fn describe(r: &RawResponse) -> String {
    format!("{} {}", r.status, String::from_utf8_lossy(&r.body))
}

#[test]
fn a_crashed_instance_blocks_its_key_for_one_lease_at_most() {
    let redis = RedisServer::start();
    let mut a = Orders::start(&redis, Duration::from_secs(30));
    let b = Orders::start(&redis, Duration::ZERO);

    // A client's request reaches instance A, whose handler takes its time.
    let a_addr = a.addr;
    let doomed =
        std::thread::spawn(move || common::try_request(a_addr, &order(), Duration::from_secs(30)));
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.executions() == 0 {
        assert!(Instant::now() < deadline, "A never ran the handler");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Let A renew its lease at least once, so the kill finds a lease that was kept alive.
    std::thread::sleep(LEASE / 2);

    a.kill();
    let killed = Instant::now();
    assert!(
        doomed.join().expect("client").is_err(),
        "A died without answering"
    );

    // Before the lease runs out, the retry (on instance B) is told to come back later.
    let early = raw_request(b.addr, &order());
    assert_eq!(early.status, 409, "{}", describe(&early));
    assert!(early.header("retry-after").is_some());
    assert_eq!(b.executions(), 0);

    // After it, a retry runs the handler: the key frees itself, long before the record TTL.
    let limit = LEASE + Duration::from_secs(10);
    let mut conflicts = 1;
    let retry = loop {
        let r = raw_request(b.addr, &order());
        if r.status != 409 {
            break r;
        }
        conflicts += 1;
        assert!(
            killed.elapsed() < limit,
            "the key is still blocked {:?} after the crash (lease {LEASE:?})",
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let blocked = killed.elapsed();
    println!(
        "crash mid-handler: key blocked for {blocked:?} after SIGKILL with a lease of {LEASE:?} \
         ({conflicts} retries got 409)"
    );
    assert_eq!(retry.status, 201, "{}", describe(&retry));
    assert!(retry.header("idempotent-replayed").is_none());
    assert_eq!(b.executions(), 1, "the retry ran the handler once");

    // And from then on, it is replayed.
    let replay = raw_request(b.addr, &order());
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.body, retry.body);
    assert_eq!(b.executions(), 1);

    actix_rt::System::new().block_on(assert_every_key_expires_within(&redis, TTL));
}
