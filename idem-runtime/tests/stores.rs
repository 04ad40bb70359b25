//! The store behavioural suite against the in-memory store, a real Redis and (feature `postgres`)
//! a real Postgres.

mod suite;

use std::sync::Arc;

use idem_runtime::{
    redis::{self, AsyncCommands as _},
    testing, MemoryStore, RedisStore, Ticket,
};
use idem_testkit::RedisServer;
use suite::Harness;

async fn memory() -> Harness {
    let store = Arc::new(MemoryStore::new());
    let inspect = Arc::clone(&store);
    Harness {
        store,
        ttls: Box::new(move || {
            let ttls = testing::memory_ttls(&inspect)
                .into_iter()
                .map(|d| Some(d.as_millis() as u64))
                .collect();
            Box::pin(async move { ttls })
        }),
        write_raw: None,
        write_foreign_type: None,
        guard: Box::new(()),
    }
}

async fn redis_harness() -> Harness {
    redis_harness_with(false).await
}

async fn redis_lua_harness() -> Harness {
    redis_harness_with(true).await
}

async fn redis_harness_with(lua_claim: bool) -> Harness {
    let server = RedisServer::start();
    let store = RedisStore::builder(
        idem_runtime::deadpool_redis::Config::from_url(server.url())
            .create_pool(Some(idem_runtime::deadpool_redis::Runtime::Tokio1))
            .expect("pool"),
    )
    .prefix("test:")
    .build();
    if lua_claim {
        testing::claim_with_lua(&store);
    }
    let client = redis::Client::open(server.url()).expect("client");
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let ttl_conn = conn.clone();
    let (write_raw, write_foreign_type) = suite::redis_writers(conn, {
        let store = store.clone();
        move |t: &Ticket| testing::redis_key_of(&store, t)
    });
    Harness {
        store: Arc::new(store),
        ttls: Box::new(move || {
            let mut conn = ttl_conn.clone();
            Box::pin(async move {
                let keys: Vec<String> = conn.keys("*").await.expect("KEYS");
                let mut out = Vec::new();
                for k in keys {
                    let pttl: i64 = conn.pttl(&k).await.expect("PTTL");
                    out.push(u64::try_from(pttl).ok());
                }
                out
            })
        }),
        write_raw: Some(write_raw),
        write_foreign_type: Some(write_foreign_type),
        guard: Box::new(server),
    }
}

suite!(memory, memory());
suite!(redis_store, redis_harness(); corrupt_stored_values_are_errors);
// The claim a server older than Redis 7.0 gets: the same suite over the Lua claim script.
suite!(redis_lua_claim, redis_lua_harness(); corrupt_stored_values_are_errors);
#[cfg(feature = "postgres")]
suite!(postgres_store, postgres::harness(); corrupt_stored_values_are_errors);

/// Behaviour only a network store has: scripts, connections, faults.
mod redis_only {
    use std::time::{Duration, Instant};

    use idem_runtime::{testing, Claim, Ownership, RedisStore, Store, StoreError};
    use idem_testkit::{command_stats, RedisServer};

    use super::suite::{response, retry_of, ticket, LEASE, TTL};

    fn store(server: &RedisServer, timeout: Duration) -> RedisStore {
        let pool = idem_runtime::deadpool_redis::Config::from_url(server.url())
            .create_pool(Some(idem_runtime::deadpool_redis::Runtime::Tokio1))
            .expect("pool");
        RedisStore::builder(pool).timeout(timeout).build()
    }

    /// Commands since the last `CONFIG RESETSTAT` (itself left out). Redis 7 counts the
    /// commands a script runs too: an `EVALSHA` of the completion shows as `evalsha`, `get` and
    /// `set`.
    fn calls(server: &RedisServer) -> std::collections::HashMap<String, u64> {
        command_stats(&server.cli(&["INFO", "commandstats"]))
            .into_iter()
            .filter(|(name, _)| name != "config|resetstat")
            .collect()
    }

    /// A claim is one native `SET ... NX GET` (no script): a first request costs Redis that `SET`
    /// and the completion's `EVALSHA`, a replay one `SET`, and nothing else (no `PING`,
    /// `UNWATCH`, `SCRIPT LOAD` per request).
    #[tokio::test]
    async fn a_first_request_is_one_set_and_one_evalsha_and_a_replay_one_set() {
        let server = RedisServer::start();
        let store = store(&server, Duration::from_secs(2));
        // Warm up: the first calls check connections out of the pool and load the script.
        for lane in 0..4 {
            let t = ticket("warm", &format!("w{lane}"), b"{}");
            store.claim(&t, LEASE).await.expect("claim");
            let held = store
                .complete(&t, &response(b"warm"), TTL)
                .await
                .expect("complete");
            assert_eq!(held, Ownership::Held);
        }
        server.cli(&["CONFIG", "RESETSTAT"]);
        for i in 0..50 {
            let t = ticket("alice", &format!("k{i}"), b"{}");
            assert_eq!(
                store.claim(&t, LEASE).await.expect("claim"),
                Claim::Acquired
            );
            assert_eq!(
                store
                    .complete(&t, &response(b"paid"), TTL)
                    .await
                    .expect("complete"),
                Ownership::Held
            );
        }
        // 50 claims (SET) and 50 completions (EVALSHA, running a GET and a SET inside).
        let first = calls(&server);
        let want = [("evalsha", 50), ("get", 50), ("set", 100)];
        assert_eq!(
            first,
            want.map(|(n, c)| (n.to_owned(), c)).into(),
            "{first:?}"
        );
        server.cli(&["CONFIG", "RESETSTAT"]);
        for i in 0..50 {
            let t = ticket("alice", &format!("k{i}"), b"{}");
            assert_eq!(
                store.claim(&retry_of(&t), LEASE).await.expect("claim"),
                Claim::Replay(response(b"paid"))
            );
        }
        // A replay is one SET, and no script.
        let replays = calls(&server);
        assert_eq!(replays, [("set".to_owned(), 50)].into(), "{replays:?}");
    }

    /// The journal of steps costs one `HGETALL` per execution (its first step) and one `EVALSHA`
    /// per step that runs; the step script's inner calls are counted too.
    #[tokio::test]
    async fn a_step_is_one_evalsha_and_an_execution_one_hgetall() {
        let server = RedisServer::start();
        let store = store(&server, Duration::from_secs(2));
        for lane in 0..4 {
            let t = ticket("warm", &format!("w{lane}"), b"{}");
            store.claim(&t, LEASE).await.expect("claim");
            let held = store.record_step(&t, "a", b"x", TTL).await.expect("step");
            assert_eq!(held, Ownership::Held);
            let done = store.complete(&t, &response(b"warm"), TTL).await;
            assert_eq!(done.expect("complete"), Ownership::Held);
        }
        server.cli(&["CONFIG", "RESETSTAT"]);
        for i in 0..20 {
            let t = ticket("alice", &format!("k{i}"), b"{}");
            assert_eq!(
                store.claim(&t, LEASE).await.expect("claim"),
                Claim::Acquired
            );
            assert!(store.load_steps(&t).await.expect("load").is_empty());
            let held = store
                .record_step(&t, "charge", b"\x01O{}", TTL)
                .await
                .expect("step");
            assert_eq!(held, Ownership::Held);
            let done = store
                .complete(&t, &response(b"paid"), TTL)
                .await
                .expect("complete");
            assert_eq!(done, Ownership::Held);
        }
        // Per request: SET (claim), HGETALL (load), EVALSHA (step: GET, HGET, HSET, PEXPIRE;
        // a DEL only over another request's journal), EVALSHA (complete: GET, SET).
        let stats = calls(&server);
        let want = [
            ("set", 40),
            ("hgetall", 20),
            ("evalsha", 40),
            ("get", 40),
            ("hget", 20),
            ("hset", 20),
            ("pexpire", 20),
        ];
        assert_eq!(
            stats,
            want.map(|(n, c)| (n.to_owned(), c)).into(),
            "{stats:?}"
        );
    }

    /// On a server older than Redis 7.0 the store claims with the Lua script: one `EVALSHA`.
    #[tokio::test]
    async fn the_lua_claim_is_one_evalsha_and_nothing_else() {
        let server = RedisServer::start();
        let store = store(&server, Duration::from_secs(2));
        testing::claim_with_lua(&store);
        for lane in 0..4 {
            let t = ticket("warm", &format!("w{lane}"), b"{}");
            store.claim(&t, LEASE).await.expect("claim");
        }
        server.cli(&["CONFIG", "RESETSTAT"]);
        for i in 0..50 {
            let t = ticket("alice", &format!("k{i}"), b"{}");
            assert_eq!(
                store.claim(&t, LEASE).await.expect("claim"),
                Claim::Acquired
            );
            assert!(matches!(
                store.claim(&retry_of(&t), LEASE).await.expect("claim"),
                Claim::InFlight { .. }
            ));
        }
        // 100 EVALSHA (running a GET each, and a SET or a PTTL), and nothing else.
        let stats = calls(&server);
        let want = [("evalsha", 100), ("get", 100), ("set", 50), ("pttl", 50)];
        assert_eq!(
            stats,
            want.map(|(n, c)| (n.to_owned(), c)).into(),
            "{stats:?}"
        );
    }

    #[tokio::test]
    async fn scripts_are_reloaded_after_a_flush() {
        let server = RedisServer::start();
        let store = store(&server, Duration::from_secs(2));
        let t = ticket("alice", "k", b"{}");
        assert_eq!(
            store.claim(&t, LEASE).await.expect("claim"),
            Claim::Acquired
        );
        server.cli(&["SCRIPT", "FLUSH"]);
        assert!(matches!(
            store
                .claim(&retry_of(&t), LEASE)
                .await
                .expect("claim after SCRIPT FLUSH"),
            Claim::InFlight { .. }
        ));
    }

    #[tokio::test]
    async fn a_stopped_server_is_an_error_and_a_restarted_one_is_used_again() {
        let mut server = RedisServer::start();
        let store = store(&server, Duration::from_secs(2));
        let t = ticket("alice", "k", b"{}");
        assert_eq!(
            store.claim(&t, LEASE).await.expect("claim"),
            Claim::Acquired
        );
        server.stop();
        let started = Instant::now();
        let err = store
            .claim(&retry_of(&t), LEASE)
            .await
            .expect_err("server is down");
        assert!(
            matches!(err, StoreError::Unavailable(_) | StoreError::Timeout(_)),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        server.restart();
        // The same store reconnects through its pool; the restarted server is empty.
        let mut answer = store.claim(&retry_of(&t), LEASE).await;
        for _ in 0..3 {
            if answer.is_ok() {
                break;
            }
            answer = store.claim(&retry_of(&t), LEASE).await;
        }
        assert_eq!(answer.expect("claim after restart"), Claim::Acquired);
    }

    #[tokio::test]
    async fn a_hung_server_times_out_instead_of_hanging() {
        let server = RedisServer::start();
        let timeout = Duration::from_millis(300);
        let store = store(&server, timeout);
        let t = ticket("alice", "k", b"{}");
        assert_eq!(
            store.claim(&t, LEASE).await.expect("claim"),
            Claim::Acquired
        );
        server.pause();
        let started = Instant::now();
        let err = store
            .claim(&retry_of(&t), LEASE)
            .await
            .expect_err("server is hung");
        let took = started.elapsed();
        server.resume();
        assert!(
            matches!(err, StoreError::Timeout(d) if d == timeout),
            "{err:?}"
        );
        assert!(took < timeout * 3, "took {took:?}");
        // Once it answers again, so does the store.
        let mut answer = store.claim(&retry_of(&t), LEASE).await;
        for _ in 0..3 {
            if answer.is_ok() {
                break;
            }
            answer = store.claim(&retry_of(&t), LEASE).await;
        }
        assert!(matches!(
            answer.expect("claim after resume"),
            Claim::InFlight { .. }
        ));
    }
}

/// The Postgres store: its harness for the suite, and behaviour only it has (the claim under
/// concurrent writers, the sweep, migrations, a server that goes away).
#[cfg(feature = "postgres")]
mod postgres {
    use std::{
        sync::Arc,
        time::{Duration, Instant},
    };

    use idem_runtime::{
        sqlx::{self, postgres::PgPoolOptions, PgPool},
        Claim, Ownership, PostgresStore, Store, StoreError, Ticket,
    };
    use idem_testkit::postgres::PostgresServer;

    use super::suite::{response, retry_of, ticket, Harness, LEASE, TTL};

    /// A pool of `size` connections that does not ping before each checkout, as `from_url` makes.
    async fn pool(server: &PostgresServer, size: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(false)
            .connect(&server.url())
            .await
            .expect("connect")
    }

    async fn migrated(store: PostgresStore) -> PostgresStore {
        store.migrate().await.expect("migrate");
        store
    }

    pub(super) async fn harness() -> Harness {
        let server = PostgresServer::start();
        let store = migrated(PostgresStore::from_url(&server.url()).expect("store")).await;
        let probe = store.pool().clone();
        let writer = store.pool().clone();
        Harness {
            store: Arc::new(store),
            ttls: Box::new(move || {
                let pool = probe.clone();
                Box::pin(async move {
                    let ttls: Vec<i64> = sqlx::query_scalar(
                        "SELECT ceil(extract(epoch FROM expires_at - now()) * 1000)::bigint \
                         FROM idem_records WHERE expires_at > now()",
                    )
                    .fetch_all(&pool)
                    .await
                    .expect("ttls");
                    ttls.into_iter().map(|ms| u64::try_from(ms).ok()).collect()
                })
            }),
            // A completed row whose response column holds `bytes`.
            write_raw: Some(Box::new(move |t: Ticket, bytes: Vec<u8>| {
                let pool = writer.clone();
                Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO idem_records (key, fingerprint, state, owner, expires_at, response) \
                         VALUES ($1, $2, 'completed', NULL, now() + interval '60 seconds', $3) \
                         ON CONFLICT (key) DO UPDATE SET response = excluded.response",
                    )
                    .bind(&t.key().as_bytes()[..])
                    .bind(&t.fingerprint().as_bytes()[..])
                    .bind(bytes)
                    .execute(&pool)
                    .await
                    .expect("write raw");
                })
            })),
            // The schema's constraints keep any other shape out of the table.
            write_foreign_type: None,
            guard: Box::new(server),
        }
    }

    async fn rows(pool: &PgPool) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM idem_records")
            .fetch_one(pool)
            .await
            .expect("count")
    }

    /// Many connections at once, so that claims really overlap in the database: a new key, then an
    /// expired lease taken over by hundreds of claims, give exactly one owner each.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_claims_on_a_new_and_an_expired_record_give_one_owner() {
        let server = PostgresServer::start();
        let store = Arc::new(
            migrated(
                PostgresStore::builder(pool(&server, 64).await)
                    .build()
                    .expect("store"),
            )
            .await,
        );
        for round in 0..5 {
            let t = ticket("alice", &format!("k{round}"), b"{}");
            if round % 2 == 1 {
                // An expired lease: every claim below finds a dead owner's row.
                assert_eq!(
                    store
                        .claim(&t, Duration::from_millis(1))
                        .await
                        .expect("claim"),
                    Claim::Acquired
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let barrier = Arc::new(tokio::sync::Barrier::new(500));
            let tasks: Vec<_> = (0..500)
                .map(|_| {
                    let store = Arc::clone(&store);
                    let barrier = Arc::clone(&barrier);
                    let retry = retry_of(&t);
                    tokio::spawn(async move {
                        barrier.wait().await;
                        store.claim(&retry, LEASE).await
                    })
                })
                .collect();
            let (mut acquired, mut in_flight) = (0, 0);
            for task in tasks {
                match task.await.expect("task").expect("claim") {
                    Claim::Acquired => acquired += 1,
                    Claim::InFlight { .. } => in_flight += 1,
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!((acquired, in_flight), (1, 499), "round {round}");
        }
    }

    /// A claim that races the owner's completion sees the record pending (409) or completed
    /// (replay), never absent: it must not run the handler a second time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_racing_a_completion_answers_replay_never_new() {
        let server = PostgresServer::start();
        let store = Arc::new(
            migrated(
                PostgresStore::builder(pool(&server, 32).await)
                    .build()
                    .expect("store"),
            )
            .await,
        );
        let (mut in_flight, mut replayed) = (0, 0);
        for round in 0..40 {
            let owner = ticket("alice", &format!("k{round}"), b"{}");
            assert_eq!(
                store.claim(&owner, LEASE).await.expect("claim"),
                Claim::Acquired
            );
            let barrier = Arc::new(tokio::sync::Barrier::new(21));
            let claims: Vec<_> = (0..20)
                .map(|_| {
                    let store = Arc::clone(&store);
                    let barrier = Arc::clone(&barrier);
                    let retry = retry_of(&owner);
                    tokio::spawn(async move {
                        barrier.wait().await;
                        store.claim(&retry, LEASE).await
                    })
                })
                .collect();
            barrier.wait().await;
            assert_eq!(
                store
                    .complete(&owner, &response(b"done"), TTL)
                    .await
                    .expect("complete"),
                Ownership::Held
            );
            for claim in claims {
                match claim.await.expect("task").expect("claim") {
                    Claim::InFlight { .. } => in_flight += 1,
                    Claim::Replay(r) => {
                        assert_eq!(&r.body[..], b"done");
                        replayed += 1;
                    }
                    other => {
                        panic!("round {round}: a claim racing a completion answered {other:?}")
                    }
                }
            }
        }
        assert_eq!(in_flight + replayed, 800);
    }

    /// A claim whose answer was lost is retried with the same owner token: it acquires again (with
    /// a fresh lease) instead of answering 409 to its own request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_retried_with_its_own_token_acquires_again() {
        let server = PostgresServer::start();
        let store = migrated(PostgresStore::from_url(&server.url()).expect("store")).await;
        let t = ticket("alice", "k", b"{}");
        assert_eq!(
            store
                .claim(&t, Duration::from_millis(300))
                .await
                .expect("claim"),
            Claim::Acquired
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            store.claim(&t, LEASE).await.expect("retried claim"),
            Claim::Acquired
        );
        // The retry renewed the lease: 300 ms after the first claim, the record is still held.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(matches!(
            store.claim(&retry_of(&t), LEASE).await.expect("claim"),
            Claim::InFlight { retry_after } if retry_after > LEASE / 2
        ));
        assert_eq!(
            store
                .complete(&t, &response(b"x"), TTL)
                .await
                .expect("complete"),
            Ownership::Held
        );
        // Completed: the same token now replays like anyone else.
        assert!(matches!(
            store.claim(&t, LEASE).await.expect("claim"),
            Claim::Replay(_)
        ));
    }

    /// The sweep deletes expired rows, at most one batch per call and oldest first, and never a live
    /// one, even while claims take expired rows over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sweep_deletes_expired_rows_in_batches_and_never_a_live_one() {
        let server = PostgresServer::start();
        let store = Arc::new(
            migrated(
                PostgresStore::builder(pool(&server, 16).await)
                    .sweep_batch(10)
                    .sweeper(false)
                    .build()
                    .expect("store"),
            )
            .await,
        );
        let short = Duration::from_millis(50);
        for i in 0..25 {
            let t = ticket("alice", &format!("expired{i}"), b"{}");
            assert_eq!(
                store.claim(&t, short).await.expect("claim"),
                Claim::Acquired
            );
        }
        let mut live = Vec::new();
        for i in 0..10 {
            let t = ticket("alice", &format!("live{i}"), b"{}");
            assert_eq!(
                store.claim(&t, LEASE).await.expect("claim"),
                Claim::Acquired
            );
            if i % 2 == 0 {
                // A completed record whose short lease would have expired: its ttl counts now.
                assert_eq!(
                    store
                        .complete(&t, &response(b"x"), TTL)
                        .await
                        .expect("complete"),
                    Ownership::Held
                );
            }
            live.push(t);
        }
        tokio::time::sleep(short * 3).await;
        let mut batches = Vec::new();
        loop {
            let n = store.sweep().await.expect("sweep");
            batches.push(n);
            if n == 0 {
                break;
            }
        }
        assert_eq!(batches, [10, 10, 5, 0]);
        assert_eq!(rows(store.pool()).await, 10);
        for t in &live {
            assert!(matches!(
                store.claim(&retry_of(t), LEASE).await.expect("claim"),
                Claim::InFlight { .. } | Claim::Replay(_)
            ));
        }

        // Sweeps racing claims that take expired rows over: every row a claim took over survives.
        let keys: Vec<Ticket> = (0..200)
            .map(|i| ticket("bob", &format!("race{i}"), b"{}"))
            .collect();
        for t in &keys {
            assert_eq!(store.claim(t, short).await.expect("claim"), Claim::Acquired);
        }
        tokio::time::sleep(short * 3).await;
        let sweeper = {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut deleted = 0;
                for _ in 0..100 {
                    deleted += store.sweep().await.expect("sweep");
                }
                deleted
            })
        };
        let mut owners = Vec::new();
        for t in &keys {
            let retry = retry_of(t);
            if store.claim(&retry, LEASE).await.expect("claim") == Claim::Acquired {
                owners.push(retry);
            }
        }
        let deleted = sweeper.await.expect("sweeper");
        assert_eq!(
            owners.len(),
            200,
            "every expired row is taken over or deleted, then claimed"
        );
        for owner in &owners {
            assert_eq!(
                store.renew(owner, LEASE).await.expect("renew"),
                Ownership::Held,
                "swept a live row"
            );
        }
        assert!(deleted <= 200);
    }

    /// The sweeper runs on its own, and stops when the last clone of the store is dropped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sweeper_runs_in_the_background_and_stops_with_the_store() {
        let server = PostgresServer::start();
        let pool = pool(&server, 4).await;
        let store = migrated(
            PostgresStore::builder(pool.clone())
                .sweep_interval(Duration::from_millis(100))
                .build()
                .expect("store"),
        )
        .await;
        let clone = store.clone();
        for i in 0..5 {
            let t = ticket("alice", &format!("k{i}"), b"{}");
            assert_eq!(
                store
                    .claim(&t, Duration::from_millis(10))
                    .await
                    .expect("claim"),
                Claim::Acquired
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while rows(&pool).await > 0 {
            assert!(
                Instant::now() < deadline,
                "the sweeper did not delete expired rows"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(store);
        // One clone left: the sweeper still runs.
        let t = ticket("alice", "after-first-drop", b"{}");
        assert_eq!(
            clone
                .claim(&t, Duration::from_millis(10))
                .await
                .expect("claim"),
            Claim::Acquired
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while rows(&pool).await > 0 {
            assert!(
                Instant::now() < deadline,
                "the sweeper stopped with a clone alive"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(clone);
        let t = ticket("alice", "after-last-drop", b"{}");
        sqlx::query(
            "INSERT INTO idem_records (key, fingerprint, state, owner, expires_at) \
             VALUES ($1, $2, 'pending', $3, now() - interval '1 second')",
        )
        .bind(&t.key().as_bytes()[..])
        .bind(&t.fingerprint().as_bytes()[..])
        .bind(&t.token().as_bytes()[..])
        .execute(&pool)
        .await
        .expect("insert");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(rows(&pool).await, 1, "the sweeper outlived the store");
    }

    /// A stopped server is an error within the timeout, never a hang; once it is back, the same
    /// store works again, and the records it held are still there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_server_is_an_error_and_a_restarted_one_is_used_again() {
        let mut server = PostgresServer::start();
        let timeout = Duration::from_secs(1);
        let store = migrated(
            PostgresStore::builder(pool(&server, 4).await)
                .timeout(timeout)
                .build()
                .expect("store"),
        )
        .await;
        let t = ticket("alice", "k", b"{}");
        assert_eq!(
            store.claim(&t, LEASE).await.expect("claim"),
            Claim::Acquired
        );
        server.stop();
        for _ in 0..3 {
            let started = Instant::now();
            let err = store
                .claim(&retry_of(&t), LEASE)
                .await
                .expect_err("server is down");
            assert!(
                matches!(err, StoreError::Unavailable(_) | StoreError::Timeout(_)),
                "{err:?}"
            );
            assert!(
                started.elapsed() < timeout + Duration::from_millis(500),
                "took {:?}",
                started.elapsed()
            );
        }
        server.restart();
        // Connections the restart broke fail once each at most (4 in this pool), then are replaced.
        let mut failures = 0;
        let answer = loop {
            match store.claim(&retry_of(&t), LEASE).await {
                Ok(answer) => break answer,
                Err(e) => {
                    failures += 1;
                    assert!(failures <= 4, "still failing after a restart: {e}");
                }
            }
        };
        assert!(matches!(answer, Claim::InFlight { .. }), "{answer:?}");
        assert_eq!(
            store
                .complete(&t, &response(b"x"), TTL)
                .await
                .expect("complete"),
            Ownership::Held
        );
    }

    /// A database that does not answer (here: a lock held elsewhere) is a timeout, not a hang.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blocked_database_times_out_instead_of_hanging() {
        let server = PostgresServer::start();
        let timeout = Duration::from_millis(300);
        let pool = pool(&server, 4).await;
        let store = migrated(
            PostgresStore::builder(pool.clone())
                .timeout(timeout)
                .build()
                .expect("store"),
        )
        .await;
        let t = ticket("alice", "k", b"{}");
        assert_eq!(
            store.claim(&t, LEASE).await.expect("claim"),
            Claim::Acquired
        );
        let mut tx = pool.begin().await.expect("begin");
        sqlx::query("LOCK TABLE idem_records IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .expect("lock");
        let started = Instant::now();
        let err = store
            .claim(&retry_of(&t), LEASE)
            .await
            .expect_err("the table is locked");
        let took = started.elapsed();
        assert!(
            matches!(err, StoreError::Timeout(d) if d == timeout),
            "{err:?}"
        );
        assert!(took < timeout * 3, "took {took:?}");
        tx.rollback().await.expect("rollback");
        let mut answer = store.claim(&retry_of(&t), LEASE).await;
        for _ in 0..3 {
            if answer.is_ok() {
                break;
            }
            answer = store.claim(&retry_of(&t), LEASE).await;
        }
        assert!(matches!(
            answer.expect("claim after the lock"),
            Claim::InFlight { .. }
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn table_names_are_checked_before_they_reach_sql() {
        let server = PostgresServer::start();
        let pool = pool(&server, 4).await;
        for bad in [
            "idem records",
            "x; DROP TABLE y",
            "\"quoted\"",
            "Upper",
            "a.b.c",
            "",
        ] {
            assert!(
                PostgresStore::builder(pool.clone())
                    .table(bad)
                    .build()
                    .is_err(),
                "{bad:?} accepted"
            );
        }
        server.psql("CREATE SCHEMA app");
        let store = migrated(
            PostgresStore::builder(pool.clone())
                .table("app.records")
                .build()
                .expect("store"),
        )
        .await;
        assert_eq!(store.table(), "app.records");
        let t = ticket("alice", "k", b"{}");
        assert_eq!(
            store.claim(&t, LEASE).await.expect("claim"),
            Claim::Acquired
        );
        assert_eq!(server.psql("SELECT count(*) FROM app.records"), "1");
        assert_eq!(
            server.psql("SELECT to_regclass('public.idem_records') IS NULL"),
            "t"
        );
    }

    /// Instances that start together all migrate: the advisory lock serialises them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_migrations_all_succeed() {
        let server = PostgresServer::start();
        let pool = pool(&server, 16).await;
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let store = PostgresStore::builder(pool.clone()).build().expect("store");
                tokio::spawn(async move { store.migrate().await })
            })
            .collect();
        for task in tasks {
            task.await.expect("task").expect("migrate");
        }
        let store = migrated(PostgresStore::builder(pool).build().expect("store")).await;
        let t = ticket("alice", "k", b"{}");
        assert_eq!(
            store.claim(&t, LEASE).await.expect("claim"),
            Claim::Acquired
        );
    }

    /// With `pg_stat_statements`: a claim is one statement, and so is each fenced write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_operation_is_one_statement() {
        let server = PostgresServer::start();
        assert!(
            server.pg_stat_statements(),
            "the testkit loads pg_stat_statements"
        );
        let store = migrated(PostgresStore::from_url(&server.url()).expect("store")).await;
        server.psql("SELECT pg_stat_statements_reset()");
        for i in 0..20 {
            let t = ticket("alice", &format!("k{i}"), b"{}");
            assert_eq!(
                store.claim(&t, LEASE).await.expect("claim"),
                Claim::Acquired
            );
            assert_eq!(
                store.renew(&t, LEASE).await.expect("renew"),
                Ownership::Held
            );
            assert_eq!(
                store
                    .complete(&t, &response(b"x"), TTL)
                    .await
                    .expect("complete"),
                Ownership::Held
            );
            assert!(matches!(
                store.claim(&retry_of(&t), LEASE).await.expect("claim"),
                Claim::Replay(_)
            ));
        }
        let calls = server.psql(
            "SELECT string_agg(calls || ' ' || split_part(query, ' ', 1), ',' ORDER BY query) \
             FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat_statements%'",
        );
        assert_eq!(calls, "40 SELECT,20 UPDATE,20 UPDATE", "{calls}");
    }
}
