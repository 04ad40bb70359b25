//! Exactly once through SIGKILL: the `payments` example as a child process, killed at random
//! moments while its handlers write payment rows, hundreds of times; then every key is retried
//! until it answers 201, and every key must have exactly one payment row whose id is the one
//! the 201 names, and every later retry replays the same body.
//!
//! Two runs of the same procedure:
//!
//! - **transactional**: `DATABASE_URL` alone, records in a `PostgresStore`, each payment row in its
//!   record's transaction (`PgTransaction`). Asserted: 0 duplicates.
//! - **Redis records, rows in Postgres** (`DATABASE_URL` + `REDIS_URL`): the row commits on its
//!   own before the record completes in Redis; a kill in between makes the retry pay again. Its
//!   duplicates are reported, not asserted: they are why the transactional mode exists.
//!
//! The handler waits `PAYMENTS_DELAY_MS` before writing and `PAYMENTS_COMMIT_DELAY_MS` after
//! (before the commit), and the kills land uniformly over a window longer than a request, so
//! they fall before the claim, before the write, between the write and the commit, and after
//! the commit. `IDEM_CRASH_KILLS` and `IDEM_CRASH_SEED` change the number of kills (default
//! 200 per run) and the seed.

#![cfg(feature = "postgres")]

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::Child,
    time::{Duration, Instant},
};

use common::{post, raw_request, try_request, RawResponse};
use idem_testkit::{postgres::PostgresServer, spawn_example, RedisServer};
use rand::{rngs::StdRng, Rng as _, SeedableRng as _};

const LEASE: Duration = Duration::from_millis(1000);
const DELAY_MS: u64 = 5;
const COMMIT_DELAY_MS: u64 = 25;
/// Keys in play; each cycle sends a few of them.
const KEYS: usize = 120;
const PER_CYCLE: usize = 6;
const BODY: &[u8] = br#"{"amount":1000,"currency":"EUR","destination":"acct_1"}"#;

/// One `payments` process, SIGKILLed when dropped.
struct Payments {
    child: Child,
    addr: SocketAddr,
}

impl Payments {
    fn start(database_url: &str, redis_url: Option<&str>) -> Self {
        let (lease, delay, commit_delay) = (
            LEASE.as_millis().to_string(),
            DELAY_MS.to_string(),
            COMMIT_DELAY_MS.to_string(),
        );
        let mut env = vec![
            ("DATABASE_URL", database_url),
            ("PAYMENTS_LEASE_MS", lease.as_str()),
            ("PAYMENTS_DELAY_MS", delay.as_str()),
            ("PAYMENTS_COMMIT_DELAY_MS", commit_delay.as_str()),
            ("RUST_LOG", "off"),
        ];
        env.extend(redis_url.map(|url| ("REDIS_URL", url)));
        let (child, addr) = spawn_example("payments", &env);
        Self { child, addr }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Payments {
    fn drop(&mut self) {
        self.kill();
    }
}

fn pay(key: &str) -> Vec<u8> {
    post(
        "/payments",
        &[("authorization", "Bearer alice"), ("idempotency-key", key)],
        BODY,
    )
}

fn key(i: usize) -> String {
    format!("crash-{i:03}")
}

struct Figures {
    kills: usize,
    killed_mid_request: usize,
    keys: usize,
    rows: u64,
    duplicates: u64,
    elapsed: Duration,
}

/// The procedure: `kills` SIGKILLs of a child serving random keys, then every key retried until
/// it answers 201.
fn run(
    label: &str,
    db: &PostgresServer,
    redis: Option<&RedisServer>,
    kills: usize,
    seed: u64,
) -> Figures {
    let started = Instant::now();
    let redis_url = redis.map(RedisServer::url);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut killed_mid_request = 0;
    // A window a bit longer than one request (claim, delay, write, commit delay, commit), so
    // that kills fall at every point of it and sometimes after the answer.
    let window_ms = DELAY_MS + COMMIT_DELAY_MS + 30;
    for _ in 0..kills {
        let mut app = Payments::start(&db.url(), redis_url.as_deref());
        let addr = app.addr;
        let clients: Vec<_> = (0..PER_CYCLE)
            .map(|_| {
                let request = pay(&key(rng.random_range(0..KEYS)));
                std::thread::spawn(move || try_request(addr, &request, Duration::from_secs(5)))
            })
            .collect();
        std::thread::sleep(Duration::from_micros(rng.random_range(0..window_ms * 1000)));
        app.kill();
        for client in clients {
            if client.join().expect("client thread").is_err() {
                killed_mid_request += 1;
            }
        }
    }

    // Every key, retried until it answers 201: the lease of a killed request runs out first.
    let app = Payments::start(&db.url(), redis_url.as_deref());
    let stats = raw_request(
        app.addr,
        b"GET /stats HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    );
    let stats: serde_json::Value = serde_json::from_slice(&stats.body).expect("stats JSON");
    assert!(
        stats["payments"].is_u64() && db.psql("SELECT to_regclass('payments') IS NOT NULL") == "t",
        "{label}: the payments example did not keep its payments in Postgres ({stats}); is it \
         built with `--features postgres` (cargo build --examples --all-features)?"
    );
    let mut answers: HashMap<String, RawResponse> = HashMap::new();
    let deadline = Instant::now() + LEASE * 10 + Duration::from_secs(20);
    while answers.len() < KEYS {
        for i in 0..KEYS {
            let k = key(i);
            if answers.contains_key(&k) {
                continue;
            }
            let r = raw_request(app.addr, &pay(&k));
            match r.status {
                201 => {
                    answers.insert(k, r);
                }
                409 | 503 => {}
                other => panic!(
                    "{label}: {k} answered {other}: {}",
                    String::from_utf8_lossy(&r.body)
                ),
            }
        }
        assert!(
            Instant::now() < deadline,
            "{label}: {} keys still unanswered",
            KEYS - answers.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every retry after that replays the same body.
    for (k, first) in &answers {
        let again = raw_request(app.addr, &pay(k));
        assert_eq!(again.status, 201, "{label}: {k}");
        assert_eq!(
            again.header("idempotent-replayed"),
            Some("true"),
            "{label}: {k}"
        );
        assert_eq!(again.body, first.body, "{label}: {k} replayed another body");
    }

    let rows: HashMap<String, (u64, String)> = db
        .psql("SELECT idempotency_key, count(*), max(id) FROM payments GROUP BY 1")
        .lines()
        .map(|l| {
            let mut f = l.split('|');
            let k = f.next().expect("key").to_owned();
            let n = f.next().and_then(|n| n.parse().ok()).expect("count");
            (k, (n, f.next().expect("id").to_owned()))
        })
        .collect();
    let total: u64 = rows.values().map(|(n, _)| n).sum();
    let duplicates: u64 = rows.values().map(|(n, _)| n.saturating_sub(1)).sum();
    assert_eq!(rows.len(), KEYS, "{label}: every key has a payment row");
    if redis.is_none() {
        for (k, first) in &answers {
            let body: serde_json::Value = serde_json::from_slice(&first.body).expect("JSON");
            let (n, id) = &rows[k];
            assert_eq!(*n, 1, "{label}: {k} has {n} payment rows");
            assert_eq!(body["id"].as_str(), Some(id.as_str()), "{label}: {k}");
        }
    }
    Figures {
        kills,
        killed_mid_request,
        keys: KEYS,
        rows: total,
        duplicates,
        elapsed: started.elapsed(),
    }
}

fn print(label: &str, f: &Figures) {
    println!(
        "{label}: {} kills ({} requests cut off), {} keys, {} payment rows, {} duplicates, {:.1} s",
        f.kills,
        f.killed_mid_request,
        f.keys,
        f.rows,
        f.duplicates,
        f.elapsed.as_secs_f64()
    );
}

#[test]
fn sigkill_at_random_moments_leaves_one_payment_per_key_in_the_transactional_mode() {
    let kills: usize = std::env::var("IDEM_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed: u64 = std::env::var("IDEM_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x1de3);
    println!("seed {seed}, {kills} kills per run, lease {LEASE:?}, delay {DELAY_MS} ms, commit delay {COMMIT_DELAY_MS} ms");

    let db = PostgresServer::start();
    let transactional = run("transactional", &db, None, kills, seed);
    print(
        "transactional (records and rows in Postgres)",
        &transactional,
    );

    let db = PostgresServer::start();
    let redis = RedisServer::start();
    let combination = run("redis+postgres", &db, Some(&redis), kills, seed);
    print(
        "Redis records, rows in Postgres (no transaction)",
        &combination,
    );

    assert_eq!(
        transactional.duplicates, 0,
        "duplicate payments in the transactional mode"
    );
    assert_eq!(transactional.rows, KEYS as u64);
}
