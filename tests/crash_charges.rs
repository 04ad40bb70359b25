//! Exactly one charge per payment through SIGKILL: the `payments` example as a child process,
//! charging through a fake card processor that runs outside it (`idem_testkit::processor`: it
//! deduplicates by `Idempotency-Key` like a real processor, and is slow on purpose), killed at
//! random moments hundreds of times; then every key is retried until it answers 201.
//!
//! The handler waits `PAYMENTS_DELAY_MS` before its charge step; the processor makes the charge
//! when the request arrives and answers 0–20 ms later; the step journals the answer; the handler
//! writes the payment row and waits `PAYMENTS_COMMIT_DELAY_MS` before it returns (before the commit
//! in the transactional mode). Kills land uniformly over a window longer than a request, so they
//! fall before the charge, while the processor answers (charged, not journaled), after its answer
//! (the journal write, the row, the commit) and after the commit; the test classifies every
//! request a kill cut off from the processor's log.
//!
//! Runs, each with the same kills:
//!
//! - **Redis records, rows in Postgres** and **the Postgres transactional mode**, with the step's
//!   downstream key: asserted, for every key, exactly one charge at the processor, the 201 naming
//!   it, and no charge without a payment row;
//! - the same kills (Redis records) with the README's old hand-built key
//!   (`<client>:<Idempotency-Key>`) and with no downstream key
//!   (`PAYMENTS_DOWNSTREAM_KEY`, a knob of the example for this comparison only): their double
//!   charges are reported; without a key there must be some, or the kills missed the window the
//!   key closes.
//!
//! `IDEM_CRASH_KILLS` and `IDEM_CRASH_SEED` change the number of kills (default 200 per run) and
//! the seed.

#![cfg(feature = "postgres")]

mod common;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    process::Child,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{post, raw_request, try_request, RawResponse};
use idem_testkit::{
    postgres::PostgresServer, processor::FakeProcessor, spawn_example, RedisServer,
};
use rand::{rngs::StdRng, Rng as _, SeedableRng as _};

const LEASE: Duration = Duration::from_millis(1000);
const DELAY_MS: u64 = 5;
const COMMIT_DELAY_MS: u64 = 15;
const PROCESSOR_LATENCY: (Duration, Duration) = (Duration::ZERO, Duration::from_millis(20));
/// Keys in play; each cycle sends a few of them.
const KEYS: usize = 120;
const PER_CYCLE: usize = 6;
/// Kill cycles run in this many lanes at once (each its own child process, and its own share of
/// the keys: key `i` belongs to lane `i % LANES`), to keep the test short.
const LANES: usize = 2;

/// One `payments` process, SIGKILLed when dropped.
struct Payments {
    child: Child,
    addr: SocketAddr,
}

impl Payments {
    fn start(run: &Run<'_>) -> Self {
        let (db, processor) = (run.db.url(), run.processor.url());
        let (lease, delay, commit_delay) = (
            LEASE.as_millis().to_string(),
            DELAY_MS.to_string(),
            COMMIT_DELAY_MS.to_string(),
        );
        let redis = run.redis.map(|redis| redis.url());
        let mut env = vec![
            ("DATABASE_URL", db.as_str()),
            ("PROCESSOR_URL", processor.as_str()),
            ("PAYMENTS_DOWNSTREAM_KEY", run.keys),
            ("PAYMENTS_LEASE_MS", lease.as_str()),
            ("PAYMENTS_DELAY_MS", delay.as_str()),
            ("PAYMENTS_COMMIT_DELAY_MS", commit_delay.as_str()),
            ("RUST_LOG", "off"),
        ];
        env.extend(redis.as_deref().map(|url| ("REDIS_URL", url)));
        let (child, addr) = spawn_example("payments", &env);
        Self { child, addr }
    }

    fn stats(&self) -> serde_json::Value {
        let stats = raw_request(
            self.addr,
            b"GET /stats HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
        );
        serde_json::from_slice(&stats.body).expect("stats JSON")
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

/// One run: a store, a processor of its own, a key mode, and a client of its own (the client is
/// the idempotency scope, and tags its payment rows).
struct Run<'a> {
    label: &'static str,
    client: &'static str,
    keys: &'static str,
    db: &'a PostgresServer,
    redis: Option<&'a RedisServer>,
    processor: FakeProcessor,
}

/// The destination of key `i`'s payment: the processor's charges name their key through it.
fn destination(i: usize) -> String {
    format!("acct_{i:03}")
}

fn key(i: usize) -> String {
    format!("charge-{i:03}")
}

fn pay(client: &str, i: usize) -> Vec<u8> {
    let body = format!(
        r#"{{"amount":1000,"currency":"EUR","destination":"{}"}}"#,
        destination(i)
    );
    post(
        "/payments",
        &[
            ("authorization", &format!("Bearer {client}")),
            ("idempotency-key", &key(i)),
        ],
        body.as_bytes(),
    )
}

/// Where a kill found a request it cut off, from the processor's log.
#[derive(Default, Debug, Clone, Copy)]
struct Cut {
    before_charge: usize,
    processor_answering: usize,
    after_answer: usize,
}

struct Figures {
    kills: usize,
    cut: Cut,
    keys: usize,
    charges: usize,
    /// Keys charged more than once, and the extra charges.
    double_charged_keys: usize,
    extra_charges: usize,
    /// Charges whose id no payment row names, once every key answered 201.
    orphans: usize,
    rows: u64,
    resumed: u64,
    processor_replays: u64,
    elapsed: Duration,
}

/// One lane's kill cycles: start a child, send `PER_CYCLE` random keys, SIGKILL it at a random
/// moment; classify every request it cut off.
fn kill_cycles(run: &Run<'_>, lane: usize, kills: usize, seed: u64) -> Cut {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cut = Cut::default();
    // A window a bit longer than one request (claim, delay, charge, journal, write, commit
    // delay, commit), so that kills fall at every point of it and sometimes after the answer.
    let window_us =
        (DELAY_MS + PROCESSOR_LATENCY.1.as_millis() as u64 + COMMIT_DELAY_MS + 25) * 1000;
    for _ in 0..kills {
        let mut app = Payments::start(run);
        let addr = app.addr;
        let sent = Instant::now();
        let clients: Vec<_> = (0..PER_CYCLE)
            .map(|_| {
                let i = rng.random_range(0..KEYS / LANES) * LANES + lane;
                let request = pay(run.client, i);
                (
                    i,
                    std::thread::spawn(move || try_request(addr, &request, Duration::from_secs(5))),
                )
            })
            .collect();
        std::thread::sleep(Duration::from_micros(rng.random_range(0..window_us)));
        let killed = Instant::now();
        app.kill();
        let log = run.processor.requests();
        for (i, client) in clients {
            if client.join().expect("client thread").is_ok() {
                continue;
            }
            let dest = destination(i);
            let reached = log
                .iter()
                .filter(|r| r.destination == dest && r.received >= sent && r.received < killed)
                .max_by_key(|r| r.received);
            match reached {
                None => cut.before_charge += 1,
                Some(r) if r.answered.is_none_or(|at| at >= killed) => {
                    cut.processor_answering += 1;
                }
                Some(_) => cut.after_answer += 1,
            }
        }
    }
    cut
}

/// The procedure: `kills` SIGKILLs of children serving random keys, then every key retried until
/// it answers 201, then the processor's charges against the payment rows.
fn run(run: &Run<'_>, kills: usize, seed: u64) -> Figures {
    let started = Instant::now();
    run.processor
        .set_latency(PROCESSOR_LATENCY.0, PROCESSOR_LATENCY.1);
    let cut = Arc::new(Mutex::new(Cut::default()));
    std::thread::scope(|s| {
        for lane in 0..LANES {
            let n = kills / LANES + usize::from(lane < kills % LANES);
            let cut = Arc::clone(&cut);
            s.spawn(move || {
                let c = kill_cycles(run, lane, n, seed.wrapping_add(lane as u64));
                let mut total = cut.lock().expect("cut");
                total.before_charge += c.before_charge;
                total.processor_answering += c.processor_answering;
                total.after_answer += c.after_answer;
            });
        }
    });
    let cut = *cut.lock().expect("cut");
    let label = run.label;

    // Every key, retried until it answers 201: the lease of a killed request runs out first.
    let app = Payments::start(run);
    let mut answers: HashMap<usize, RawResponse> = HashMap::new();
    let deadline = Instant::now() + LEASE * 10 + Duration::from_secs(20);
    while answers.len() < KEYS {
        for i in 0..KEYS {
            if answers.contains_key(&i) {
                continue;
            }
            let r = raw_request(app.addr, &pay(run.client, i));
            match r.status {
                201 => {
                    answers.insert(i, r);
                }
                409 | 503 => {}
                other => panic!(
                    "{label}: {} answered {other}: {}",
                    key(i),
                    String::from_utf8_lossy(&r.body)
                ),
            }
        }
        assert!(
            Instant::now() < deadline,
            "{label}: {} keys still unanswered",
            KEYS - answers.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stats = app.stats();
    let resumed = stats["resumed"].as_u64().expect("resumed in /stats");
    // Every retry after that replays the same body.
    for (i, first) in &answers {
        let again = raw_request(app.addr, &pay(run.client, *i));
        assert_eq!(again.status, 201, "{label}: {}", key(*i));
        assert_eq!(again.header("idempotent-replayed"), Some("true"));
        assert_eq!(
            again.body,
            first.body,
            "{label}: {} replayed another body",
            key(*i)
        );
    }
    drop(app);

    // The processor's charges, per key (through their destination).
    let charges = run.processor.charges();
    let mut per_key: HashMap<usize, Vec<String>> = HashMap::new();
    for c in &charges {
        let i = (0..KEYS)
            .find(|i| destination(*i) == c.destination)
            .unwrap_or_else(|| panic!("{label}: a charge to {}", c.destination));
        per_key.entry(i).or_default().push(c.id.clone());
    }
    let rows: Vec<(String, String)> = run
        .db
        .psql(&format!(
            "SELECT idempotency_key, charge FROM payments WHERE client = '{}'",
            run.client
        ))
        .lines()
        .map(|l| {
            let (k, c) = l.split_once('|').expect("key|charge");
            (k.to_owned(), c.to_owned())
        })
        .collect();
    let charged_rows: HashSet<&str> = rows.iter().map(|(_, c)| c.as_str()).collect();
    let orphans = charges
        .iter()
        .filter(|c| !charged_rows.contains(c.id.as_str()))
        .count();
    let double_charged_keys = per_key.values().filter(|ids| ids.len() > 1).count();
    let extra_charges = per_key
        .values()
        .map(|ids| ids.len().saturating_sub(1))
        .sum();
    for (i, first) in &answers {
        let body: serde_json::Value = serde_json::from_slice(&first.body).expect("JSON");
        let charge = body["charge"]
            .as_str()
            .expect("the payment names its charge");
        assert!(
            per_key
                .get(i)
                .is_some_and(|ids| ids.iter().any(|id| id == charge)),
            "{label}: {} names the charge {charge}, which the processor did not make for it",
            key(*i)
        );
    }
    Figures {
        kills,
        cut,
        keys: KEYS,
        charges: charges.len(),
        double_charged_keys,
        extra_charges,
        orphans,
        rows: rows.len() as u64,
        resumed,
        processor_replays: run.processor.stats().replays,
        elapsed: started.elapsed(),
    }
}

fn print(label: &str, f: &Figures) {
    println!(
        "{label}: {} kills (requests cut off: {} before the charge, {} while the processor \
         answered, {} after its answer), {} keys, {} charges, {} keys charged twice or more ({} \
         extra charges), {} charges without a payment row, {} payment rows, {} executions resumed \
         from the journal in the retries, {} processor replays, {:.1} s",
        f.kills,
        f.cut.before_charge,
        f.cut.processor_answering,
        f.cut.after_answer,
        f.keys,
        f.charges,
        f.double_charged_keys,
        f.extra_charges,
        f.orphans,
        f.rows,
        f.resumed,
        f.processor_replays,
        f.elapsed.as_secs_f64()
    );
}

#[test]
fn sigkill_at_random_moments_leaves_one_charge_per_key() {
    let kills: usize = std::env::var("IDEM_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed: u64 = std::env::var("IDEM_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0xc4a6);
    println!(
        "seed {seed}, {kills} kills per run, lease {LEASE:?}, delay {DELAY_MS} ms, processor \
         latency {PROCESSOR_LATENCY:?}, commit delay {COMMIT_DELAY_MS} ms"
    );
    let db = PostgresServer::start();
    let redis = RedisServer::start();
    let new_run = |label, client, keys, redis| Run {
        label,
        client,
        keys,
        db: &db,
        redis,
        processor: FakeProcessor::start(),
    };

    let redis_step = new_run("redis", "redis-step", "step", Some(&redis));
    let f = run(&redis_step, kills, seed);
    print("Redis records, rows in Postgres, step keys", &f);
    let redis_step = f;

    let tx_step = new_run("transactional", "tx-step", "step", None);
    let f = run(&tx_step, kills, seed);
    print("Postgres transactional mode, step keys", &f);
    let tx_step = f;

    let hand = new_run("hand-built", "redis-hand-built", "hand-built", Some(&redis));
    let hand = run(&hand, kills, seed);
    print("Redis records, the old hand-built key", &hand);

    let none = new_run("none", "redis-none", "none", Some(&redis));
    let none = run(&none, kills, seed);
    print("Redis records, no downstream key", &none);

    for (label, f) in [("redis", &redis_step), ("transactional", &tx_step)] {
        assert_eq!(
            f.charges, KEYS,
            "{label}: {} charges for {KEYS} keys ({} keys charged more than once)",
            f.charges, f.double_charged_keys
        );
        assert_eq!(f.double_charged_keys, 0, "{label}");
        assert_eq!(f.orphans, 0, "{label}: charges without a payment row");
    }
    assert_eq!(
        tx_step.rows, KEYS as u64,
        "transactional: one payment row per key"
    );
    assert!(
        none.extra_charges > 0,
        "without a downstream key no kill charged twice: the kills missed the window between \
         the processor's charge and the journal write ({:?})",
        none.cut
    );
}
