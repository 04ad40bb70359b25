//! The store behavioural suite against the in-memory store and a real Redis.

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
    let server = RedisServer::start();
    let store = RedisStore::builder(
        idem_runtime::deadpool_redis::Config::from_url(server.url())
            .create_pool(Some(idem_runtime::deadpool_redis::Runtime::Tokio1))
            .expect("pool"),
    )
    .prefix("test:")
    .build();
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

/// Behaviour only a network store has: scripts, connections, faults.
mod redis_only {
    use std::time::{Duration, Instant};

    use idem_runtime::{Claim, RedisStore, Store, StoreError};
    use idem_testkit::{command_stats, RedisServer};

    use super::suite::{retry_of, ticket, LEASE};

    fn store(server: &RedisServer, timeout: Duration) -> RedisStore {
        let pool = idem_runtime::deadpool_redis::Config::from_url(server.url())
            .create_pool(Some(idem_runtime::deadpool_redis::Runtime::Tokio1))
            .expect("pool");
        RedisStore::builder(pool).timeout(timeout).build()
    }

    fn calls(server: &RedisServer) -> std::collections::HashMap<String, u64> {
        command_stats(&server.cli(&["INFO", "commandstats"]))
            .into_iter()
            .collect()
    }

    #[tokio::test]
    async fn a_claim_is_one_evalsha_and_nothing_else() {
        let server = RedisServer::start();
        let store = store(&server, Duration::from_secs(2));
        // Warm up: the first call checks connections out of the pool and loads the script.
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
        let stats = calls(&server);
        assert_eq!(stats.get("evalsha"), Some(&100), "{stats:?}");
        for extra in ["ping", "unwatch", "script|load", "eval"] {
            assert_eq!(stats.get(extra), None, "a per-request {extra}: {stats:?}");
        }
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
