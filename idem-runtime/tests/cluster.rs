//! The Redis Cluster store against real local clusters (testkit's `RedisCluster`: redis-server
//! processes on free loopback ports, killed on drop): the behavioural suite, one slot per record,
//! scripts on every master, resharding under traffic, and failover with and without `WAIT`.

mod suite;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, PoisonError, Weak,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use idem_runtime::{
    deadpool_redis,
    redis::{self, aio::MultiplexedConnection, AsyncCommands as _},
    testing, Claim, Ownership, RedisClusterStore, Store, StoreError, StoredResponse, Ticket,
};
use idem_testkit::{
    cluster::{key_slot, RedisCluster},
    command_stats,
};
use suite::{retry_of, ticket, Harness};

use actix_web::http::StatusCode;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A 3-master cluster shared by the tests that do not disturb it (each uses its own key prefix),
/// started on first use and killed when the last test holding it ends.
fn shared_cluster() -> Arc<RedisCluster> {
    static SHARED: Mutex<Weak<RedisCluster>> = Mutex::new(Weak::new());
    let mut shared = lock(&SHARED);
    if let Some(cluster) = shared.upgrade() {
        return cluster;
    }
    let cluster = Arc::new(RedisCluster::start(3, 0));
    *shared = Arc::downgrade(&cluster);
    cluster
}

/// Starts a cluster without blocking the runtime.
async fn start(masters: usize, replicas: usize) -> RedisCluster {
    tokio::task::spawn_blocking(move || RedisCluster::start(masters, replicas))
        .await
        .expect("cluster start")
}

/// Runs blocking cluster administration (redis-cli) off the runtime.
async fn admin<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("admin task")
}

fn pool(urls: &[String]) -> deadpool_redis::cluster::Pool {
    deadpool_redis::cluster::Config::from_urls(urls.to_vec())
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .expect("cluster pool")
}

async fn node_conn(port: u16) -> MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to node")
}

async fn scan(conn: &mut MultiplexedConnection, pattern: &str) -> Vec<String> {
    let mut cursor = 0u64;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("SCAN");
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

fn stats(cluster: &RedisCluster, port: u16) -> HashMap<String, u64> {
    command_stats(&cluster.cli(port, &["INFO", "commandstats"]))
        .into_iter()
        .collect()
}

/// `errorstat_<CODE>` counts of a node.
fn error_stats(cluster: &RedisCluster, port: u16) -> HashMap<String, u64> {
    cluster
        .cli(port, &["INFO", "errorstats"])
        .lines()
        .filter_map(|line| {
            let (name, fields) = line.trim().strip_prefix("errorstat_")?.split_once(':')?;
            let count = fields.strip_prefix("count=")?.parse().ok()?;
            Some((name.to_owned(), count))
        })
        .collect()
}

static NEXT_PREFIX: AtomicUsize = AtomicUsize::new(0);

async fn cluster_harness() -> Harness {
    let cluster = admin(shared_cluster).await;
    let prefix = format!("suite{}:", NEXT_PREFIX.fetch_add(1, Ordering::Relaxed));
    let store = RedisClusterStore::builder(pool(&cluster.urls()))
        .prefix(prefix.clone())
        .build();
    let masters = admin({
        let cluster = Arc::clone(&cluster);
        move || cluster.masters()
    })
    .await;
    let mut nodes = Vec::new();
    for port in masters {
        nodes.push(node_conn(port).await);
    }
    let direct = redis::cluster::ClusterClient::new(cluster.urls())
        .expect("cluster client")
        .get_async_connection()
        .await
        .expect("cluster connection");
    let (write_raw, write_foreign_type) = suite::redis_writers(direct, {
        let store = store.clone();
        move |t: &Ticket| testing::cluster_key_of(&store, t)
    });
    Harness {
        store: Arc::new(store),
        ttls: Box::new(move || {
            let mut nodes = nodes.clone();
            let pattern = format!("{prefix}*");
            Box::pin(async move {
                let mut out = Vec::new();
                for node in &mut nodes {
                    for key in scan(node, &pattern).await {
                        let pttl: i64 = node.pttl(&key).await.expect("PTTL");
                        out.push(u64::try_from(pttl).ok());
                    }
                }
                out
            })
        }),
        write_raw: Some(write_raw),
        write_foreign_type: Some(write_foreign_type),
        guard: Box::new(cluster),
    }
}

suite!(cluster_store, cluster_harness(); corrupt_stored_values_are_errors);

fn body_of(key: usize) -> Bytes {
    Bytes::from(format!("{{\"payment\":{key}}}"))
}

fn response_of(key: usize) -> StoredResponse {
    StoredResponse {
        status: StatusCode::CREATED,
        headers: Vec::new(),
        body: body_of(key),
    }
}

fn key_ticket(scope: &str, key: usize) -> Ticket {
    ticket(scope, &format!("key-{key}"), b"{}")
}

fn assert_transient(err: &StoreError) {
    assert!(
        matches!(err, StoreError::Unavailable(_) | StoreError::Timeout(_)),
        "a store error other than unavailable/timeout: {err:?}"
    );
}

const LONG_LEASE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(600);

/// Every key the store writes is `<prefix>{<32 hex>}`, one slot per record; the scripts name only
/// `KEYS[1]`; thousands of keys over every slot range never meet `CROSSSLOT`; and the scripts reach
/// every master: loaded on first use (`NOSCRIPT` → `EVAL`), then one `EVALSHA` per call, and again
/// after `SCRIPT FLUSH`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_is_one_slot_and_scripts_reach_every_master() {
    for (name, source) in testing::lua_scripts() {
        let mut rest = source;
        while let Some(at) = rest.find("KEYS[") {
            assert!(
                rest[at..].starts_with("KEYS[1]"),
                "script {name} names a key other than KEYS[1]: {source}"
            );
            rest = &rest[at + 5..];
        }
        for call in source.split("redis.call(").skip(1) {
            let key = call.split([',', ')']).nth(1).map(str::trim);
            assert_eq!(key, Some("KEYS[1]"), "script {name}: redis.call({call}");
        }
    }

    let cluster = Arc::new(start(3, 0).await);
    let masters = admin({
        let c = Arc::clone(&cluster);
        move || c.masters()
    })
    .await;
    assert_eq!(masters.len(), 3);
    let store = RedisClusterStore::builder(pool(&cluster.urls()))
        .prefix("slots:")
        .build();

    // Fresh nodes know no script: the first call on each master goes NOSCRIPT -> EVAL.
    let n = 3000;
    let tickets: Vec<Ticket> = (0..n).map(|i| key_ticket("slots", i)).collect();
    let run = |tickets: Vec<Ticket>, store: RedisClusterStore| async move {
        let mut tasks = Vec::new();
        for (i, t) in tickets.into_iter().enumerate() {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                assert_eq!(store.claim(&t, LONG_LEASE).await?, Claim::Acquired);
                let own = match i % 4 {
                    0 => store.complete(&t, &response_of(i), TTL).await?,
                    1 => store.release(&t).await?,
                    _ => store.renew(&t, LONG_LEASE).await?,
                };
                assert_eq!(own, Ownership::Held);
                Ok::<_, StoreError>(())
            }));
        }
        for task in tasks {
            task.await
                .expect("task")
                .expect("no store error, no CROSSSLOT");
        }
    };
    run(tickets[..n / 2].to_vec(), store.clone()).await;

    let mut stored = 0;
    let mut slots = std::collections::BTreeSet::new();
    for &port in &masters {
        let mut conn = node_conn(port).await;
        let keys = scan(&mut conn, "*").await;
        assert!(!keys.is_empty(), "master {port} holds no record");
        for key in &keys {
            let tag = key
                .strip_prefix("slots:{")
                .and_then(|k| k.strip_suffix('}'))
                .unwrap_or_else(|| panic!("a key without the record hash tag: {key}"));
            assert!(
                tag.len() == 32 && tag.bytes().all(|b| b.is_ascii_hexdigit()),
                "{key}"
            );
            slots.insert(key_slot(key.as_bytes()));
        }
        // The testkit's slot function agrees with Redis.
        for key in keys.iter().take(5) {
            let slot = cluster.cli(port, &["CLUSTER", "KEYSLOT", key]);
            assert_eq!(slot, key_slot(key.as_bytes()).to_string());
        }
        stored += keys.len();
    }
    // Released records are gone; completed and pending ones stay.
    assert_eq!(stored, n / 2 - n / 8);
    assert!(
        slots.len() > 1000,
        "records spread over {} slots",
        slots.len()
    );

    for &port in &masters {
        let s = stats(&cluster, port);
        assert!(s.get("eval").is_some_and(|&c| c >= 1), "{port}: {s:?}");
        assert!(s.get("evalsha").is_some_and(|&c| c > 50), "{port}: {s:?}");
        let errors = error_stats(&cluster, port);
        assert!(!errors.contains_key("CROSSSLOT"), "{port}: {errors:?}");
        cluster.cli(port, &["CONFIG", "RESETSTAT"]);
    }

    // Loaded: one native SET per claim, one EVALSHA per fenced write, and nothing else.
    run(tickets[n / 2..n * 3 / 4].to_vec(), store.clone()).await;
    let mut evalsha = 0;
    for &port in &masters {
        let s = stats(&cluster, port);
        evalsha += s.get("evalsha").copied().unwrap_or(0);
        for extra in ["eval", "script|load", "ping", "wait", "asking"] {
            assert_eq!(s.get(extra), None, "{port}: a per-request {extra}: {s:?}");
        }
        assert!(error_stats(&cluster, port).is_empty(), "{port}");
    }
    assert_eq!(evalsha, (n / 4) as u64);

    // Flushed on every master: reloaded where needed, still no error.
    for &port in &masters {
        cluster.cli(port, &["SCRIPT", "FLUSH"]);
    }
    run(tickets[n * 3 / 4..].to_vec(), store.clone()).await;
    for &port in &masters {
        let s = stats(&cluster, port);
        assert!(s.get("eval").is_some_and(|&c| c >= 1), "{port}: {s:?}");
        let errors = error_stats(&cluster, port);
        assert!(!errors.contains_key("CROSSSLOT"), "{port}: {errors:?}");
    }
}

/// The journal of steps lives in its record's slot: across keys spread over every master, the
/// step script (two keys: the record and `<record>:steps`) never meets `CROSSSLOT`, reaches fresh
/// masters through `NOSCRIPT` → `EVAL`, and every journal shares its record's slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_journal_is_in_its_records_slot_on_every_master() {
    let cluster = Arc::new(start(3, 0).await);
    let masters = admin({
        let c = Arc::clone(&cluster);
        move || c.masters()
    })
    .await;
    let store = RedisClusterStore::builder(pool(&cluster.urls()))
        .prefix("steps:")
        .build();
    for i in 0..300 {
        let t = key_ticket("steps", i);
        assert_eq!(
            store.claim(&t, LONG_LEASE).await.expect("claim"),
            Claim::Acquired
        );
        let held = store
            .record_step(&t, "charge", b"\x01O{}", TTL)
            .await
            .expect("no store error, no CROSSSLOT");
        assert_eq!(held, Ownership::Held);
        assert_eq!(store.load_steps(&t).await.expect("load").len(), 1);
    }
    let mut journals = 0;
    for &port in &masters {
        let mut conn = node_conn(port).await;
        for key in scan(&mut conn, "steps:*:steps").await {
            let record = key.strip_suffix(":steps").expect("a journal key");
            assert_eq!(
                key_slot(key.as_bytes()),
                key_slot(record.as_bytes()),
                "{key}"
            );
            journals += 1;
        }
        let s = stats(&cluster, port);
        assert!(s.get("eval").is_some_and(|&c| c >= 1), "{port}: {s:?}");
        assert!(s.get("hgetall").is_some_and(|&c| c > 10), "{port}: {s:?}");
        assert!(
            !error_stats(&cluster, port).contains_key("CROSSSLOT"),
            "{port}"
        );
    }
    assert_eq!(journals, 300);
}

/// What the requests of one traffic run saw.
#[derive(Default)]
struct Ledger {
    /// Per key: every claim that answered `Acquired` (a handler execution).
    executions: BTreeMap<usize, Vec<Execution>>,
    /// Per key: replays served.
    replays: BTreeMap<usize, usize>,
    /// Store errors met (the 503 case), by key.
    errors: BTreeMap<usize, usize>,
    /// Per key: the tickets of claims that failed. A failed claim may still have been written (a
    /// timeout, or a command the cluster client re-sent to the new master): such a record blocks
    /// the key until its lease runs out, and its ticket is the only one that can release it.
    failed_claims: BTreeMap<usize, Vec<Ticket>>,
}

#[derive(Debug, Clone)]
struct Execution {
    instance: usize,
    /// When the claim's answer arrived.
    acquired_at: Instant,
    ticket: Ticket,
    completed: Option<Result<Ownership, String>>,
}

/// How one client behaves: it sends a request (a new ticket, as every HTTP request has), runs the
/// handler when it owns the key, retries 409s a few times and 503s until `deadline`.
#[derive(Clone, Copy)]
struct ClientPlan {
    handler: Duration,
    in_flight_retries: usize,
    deadline: Instant,
}

async fn client(
    store: Arc<dyn Store>,
    instance: usize,
    key: usize,
    first: Ticket,
    plan: ClientPlan,
    ledger: Arc<Mutex<Ledger>>,
) {
    let mut in_flight = 0;
    loop {
        let t = retry_of(&first);
        match store.claim(&t, LONG_LEASE).await {
            Ok(Claim::Acquired) => {
                let index = {
                    let mut l = lock(&ledger);
                    let runs = l.executions.entry(key).or_default();
                    runs.push(Execution {
                        instance,
                        acquired_at: Instant::now(),
                        ticket: t.clone(),
                        completed: None,
                    });
                    runs.len() - 1
                };
                tokio::time::sleep(plan.handler).await;
                let done = store.complete(&t, &response_of(key), TTL).await;
                if let Err(e) = &done {
                    assert_transient(e);
                }
                lock(&ledger).executions.get_mut(&key).expect("recorded")[index].completed =
                    Some(done.map_err(|e| e.to_string()));
                return;
            }
            Ok(Claim::Replay(r)) => {
                assert_eq!(r.body, body_of(key), "key {key} replayed another body");
                *lock(&ledger).replays.entry(key).or_default() += 1;
                return;
            }
            Ok(Claim::InFlight { .. }) => {
                in_flight += 1;
                if in_flight > plan.in_flight_retries {
                    // The client keeps its 409; the recovery check looks at the key later.
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Claim::Mismatch) => panic!("key {key}: a mismatch for an identical request"),
            Err(e) => {
                assert_transient(&e);
                {
                    let mut l = lock(&ledger);
                    *l.errors.entry(key).or_default() += 1;
                    l.failed_claims.entry(key).or_default().push(t);
                }
                if Instant::now() > plan.deadline {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Two app instances (separate pools, separate connections) send every key twice at once, keys
/// starting `stagger` apart. Returns the client tasks.
fn traffic(
    stores: &[Arc<dyn Store>; 2],
    keys: &[(usize, Ticket)],
    stagger: Duration,
    plan: ClientPlan,
    ledger: &Arc<Mutex<Ledger>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for (n, (key, t)) in keys.iter().enumerate() {
        for (instance, store) in stores.iter().enumerate() {
            let (store, t, ledger, key) = (Arc::clone(store), t.clone(), Arc::clone(ledger), *key);
            let delay = stagger * u32::try_from(n).expect("few keys");
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                client(store, instance, key, t, plan, ledger).await;
            }));
        }
    }
    tasks
}

/// Moving slots from one master to another while two app instances hammer keys in those slots:
/// the cluster answers `ASK` while a slot migrates and `MOVED` once it moved, the client follows
/// both, and every key's handler runs exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_under_traffic_keeps_exactly_once() {
    let cluster = Arc::new(start(3, 0).await);
    let (from, to) = admin({
        let c = Arc::clone(&cluster);
        move || {
            let masters = c.masters();
            (
                c.master_of(0),
                *masters
                    .iter()
                    .find(|&&p| p != c.master_of(0))
                    .expect("2 masters"),
            )
        }
    })
    .await;
    let from_slots = admin({
        let c = Arc::clone(&cluster);
        move || {
            c.topology()
                .into_iter()
                .find(|n| n.port == from)
                .expect("source master")
                .slots
        }
    })
    .await;
    let owned_by_from = |slot: u16| from_slots.iter().any(|&(a, b)| (a..=b).contains(&slot));

    let stores: [Arc<dyn Store>; 2] = [
        Arc::new(RedisClusterStore::builder(pool(&cluster.urls())).build()),
        Arc::new(RedisClusterStore::builder(pool(&cluster.urls())).build()),
    ];
    let key_name = RedisClusterStore::builder(pool(&cluster.urls())).build();
    // 240 keys in the source master's slots, 60 elsewhere; the first 30 keys' slots migrate.
    let mut keys = Vec::new();
    let mut others = 0;
    let mut i = 0;
    while keys.len() < 300 {
        let t = key_ticket("reshard", i);
        let slot = key_slot(testing::cluster_key_of(&key_name, &t).as_bytes());
        if owned_by_from(slot) && keys.len() - others < 240 {
            keys.push((i, t));
        } else if !owned_by_from(slot) && others < 60 {
            others += 1;
            keys.push((i, t));
        }
        i += 1;
    }
    let mut migrating: Vec<u16> = keys
        .iter()
        .map(|(_, t)| key_slot(testing::cluster_key_of(&key_name, t).as_bytes()))
        .filter(|&s| owned_by_from(s))
        .take(30)
        .collect();
    migrating.sort_unstable();
    migrating.dedup();
    // Put the keys of migrating slots first, so their first claims meet the migration.
    keys.sort_by_key(|(_, t)| {
        !migrating.contains(&key_slot(testing::cluster_key_of(&key_name, t).as_bytes()))
    });

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let plan = ClientPlan {
        handler: Duration::from_millis(20),
        in_flight_retries: 200,
        deadline: Instant::now() + Duration::from_secs(30),
    };
    let tasks = traffic(&stores, &keys, Duration::from_millis(10), plan, &ledger);

    // Replays keep coming for every key until the migration is over, so that moved keys meet
    // ASK (migrated, slot still migrating) and MOVED (stale slot maps).
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut replayers = Vec::new();
    for store in &stores {
        let (store, keys, done) = (Arc::clone(store), keys.clone(), Arc::clone(&done));
        let ledger = Arc::clone(&ledger);
        replayers.push(tokio::spawn(async move {
            let mut replays = 0usize;
            while !done.load(Ordering::Relaxed) {
                let completed: Vec<&(usize, Ticket)> = {
                    let l = lock(&ledger);
                    keys.iter()
                        .filter(|(key, _)| {
                            l.executions.get(key).is_some_and(|runs| {
                                runs.iter()
                                    .any(|r| matches!(r.completed, Some(Ok(Ownership::Held))))
                            })
                        })
                        .collect()
                };
                if completed.is_empty() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                for (key, t) in completed {
                    match store.claim(&retry_of(t), LONG_LEASE).await {
                        Ok(Claim::Replay(r)) => {
                            assert_eq!(r.body, body_of(*key));
                            replays += 1;
                        }
                        other => panic!("key {key}: completed, then {other:?}"),
                    }
                }
            }
            replays
        }));
    }

    let moved = migrating.clone();
    admin({
        let c = Arc::clone(&cluster);
        move || {
            for slot in moved {
                c.migrate_slot(slot, to, Duration::from_millis(60));
            }
        }
    })
    .await;
    for task in tasks {
        task.await.expect("client");
    }
    // One more pass after the last slot moved, on connections with a stale slot map.
    tokio::time::sleep(Duration::from_millis(100)).await;
    done.store(true, Ordering::Relaxed);
    let mut replays = 0;
    for r in replayers {
        replays += r.await.expect("replayer");
    }

    let ledger = std::mem::take(&mut *lock(&ledger));
    for (key, _) in &keys {
        let runs = ledger.executions.get(key).map_or(0, Vec::len);
        assert_eq!(runs, 1, "key {key} ran {runs} times");
        let run = &ledger.executions[key][0];
        assert!(
            matches!(run.completed, Some(Ok(Ownership::Held))),
            "key {key}: {run:?}"
        );
    }
    assert!(
        ledger.errors.is_empty(),
        "store errors during resharding: {:?}",
        ledger.errors
    );
    assert!(replays > 0);
    let moved_keys = keys
        .iter()
        .filter(|(_, t)| {
            migrating.contains(&key_slot(testing::cluster_key_of(&key_name, t).as_bytes()))
        })
        .count();
    let (asks, moves, asking) = admin({
        let c = Arc::clone(&cluster);
        move || {
            let e = error_stats(&c, from);
            let asking = stats(&c, to).get("asking").copied().unwrap_or(0);
            (
                e.get("ASK").copied().unwrap_or(0),
                e.get("MOVED").copied().unwrap_or(0),
                asking,
            )
        }
    })
    .await;
    println!(
        "{} slots ({moved_keys} keys) moved under traffic: {asks} ASK, {moves} MOVED, {asking} ASKING, {replays} replays",
        migrating.len()
    );
    assert!(asks > 0 && asking > 0, "no ASK redirect was exercised");
    assert!(moves > 0, "no MOVED redirect was exercised");
    // The migrated records are on the new master.
    let mut conn = node_conn(to).await;
    for (_, t) in &keys {
        let key = testing::cluster_key_of(&key_name, t);
        if migrating.contains(&key_slot(key.as_bytes())) {
            let exists: bool = conn.exists(&key).await.expect("EXISTS");
            assert!(exists, "{key} was not migrated");
        }
    }
}

/// One failover run and what it showed.
struct Failover {
    ledger: Ledger,
    /// The killed master served these slots.
    victim_slots: Vec<(u16, u16)>,
    /// When the replication window opened (replica frozen, or the kill itself) and closed (kill).
    window: (Instant, Instant),
    key_slots: HashMap<usize, u16>,
    keys: usize,
}

/// 3 masters with 1 replica each; two app instances send 300 keys (each twice at once, keys 10 ms
/// apart); 1.2 s in, the master of the first key's slot is SIGKILLed. With `lag`, its replica
/// stops receiving 600 ms before (frozen, and its link dropped: what the master acknowledges
/// meanwhile is not replicated), and is thawed right after the kill. The replica takes over; the
/// dead node is restarted and rejoins as a replica; then every key is claimed once more (a late
/// retry), which must replay, or find a record whose owner still completes it, or run a key that
/// never ran.
async fn failover(wait: bool, lag: bool) -> Failover {
    let mut cluster = start(3, 1).await;
    let build = |cluster: &RedisCluster| {
        let b = RedisClusterStore::builder(pool(&cluster.urls()))
            .timeout(Duration::from_millis(800))
            .lanes(4);
        if wait {
            b.wait_for_replicas(1, Duration::from_millis(300)).build()
        } else {
            b.build()
        }
    };
    let (a, b) = (build(&cluster), build(&cluster));
    let namer = a.clone();
    let stores: [Arc<dyn Store>; 2] = [Arc::new(a.clone()), Arc::new(b)];
    let keys: Vec<(usize, Ticket)> = (0..300).map(|i| (i, key_ticket("failover", i))).collect();
    let key_slots: HashMap<usize, u16> = keys
        .iter()
        .map(|(i, t)| (*i, key_slot(testing::cluster_key_of(&namer, t).as_bytes())))
        .collect();
    let victim_slot = key_slots[&0];

    let victim = cluster.master_of(victim_slot);
    let replica = cluster.replicas_of(victim)[0];
    let victim_slots = cluster
        .topology()
        .into_iter()
        .find(|n| n.port == victim)
        .expect("victim")
        .slots;

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let plan = ClientPlan {
        handler: Duration::from_millis(20),
        in_flight_retries: 10,
        deadline: Instant::now() + Duration::from_secs(40),
    };
    let tasks = traffic(&stores, &keys, Duration::from_millis(10), plan, &ledger);

    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut frozen_at = None;
    if lag {
        cluster.lag_replica(replica);
        frozen_at = Some(Instant::now());
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (cluster, window) = admin(move || {
        let killed = cluster.kill_master_of(victim_slot);
        let closed = Instant::now();
        assert_eq!(killed, victim);
        if lag {
            cluster.resume(replica);
        }
        let promoted = cluster.wait_for_failover(victim_slot, victim);
        assert_eq!(promoted, replica);
        // Without a replica, WAIT cannot succeed on that shard: bring the dead node back.
        cluster.restart(victim);
        // On loopback a replica is normally well under 500 ms behind, even on busy cores.
        let opened = frozen_at.unwrap_or(closed) - Duration::from_millis(500);
        (cluster, (opened, closed))
    })
    .await;
    for task in tasks {
        task.await.expect("client");
    }

    // Recovery: a late retry of every key replays, or finds a pending record that its owner still
    // completes, or (a key that never ran, or whose claim was lost) runs the handler.
    for (key, t) in &keys {
        let (probe, claim) = claim_after_recovery(&a, t).await;
        match claim {
            Claim::Replay(r) => assert_eq!(r.body, body_of(*key)),
            Claim::InFlight { .. } => {
                // A pending record survived the failover. Either a run's completion failed or was
                // lost, and that run's owner completes it now; or a claim that failed (never ran)
                // was written anyway, and its ticket releases it; then the key runs once.
                let (runs, failed) = {
                    let l = lock(&ledger);
                    (
                        l.executions.get(key).cloned().unwrap_or_default(),
                        l.failed_claims.get(key).cloned().unwrap_or_default(),
                    )
                };
                let mut completed = false;
                for run in runs.iter().rev() {
                    let done = a.complete(&run.ticket, &response_of(*key), TTL).await;
                    if matches!(done, Ok(Ownership::Held)) {
                        completed = true;
                        break;
                    }
                }
                if !completed {
                    let mut released = false;
                    for t in &failed {
                        if matches!(a.release(t).await, Ok(Ownership::Held)) {
                            released = true;
                            break;
                        }
                    }
                    assert!(
                        released,
                        "key {key}: a pending record that no known request holds: {runs:?}"
                    );
                    let (probe, claim) = claim_after_recovery(&a, t).await;
                    assert_eq!(claim, Claim::Acquired, "key {key}");
                    let done = a.complete(&probe, &response_of(*key), TTL).await;
                    assert!(matches!(done, Ok(Ownership::Held)), "{done:?}");
                    lock(&ledger)
                        .executions
                        .entry(*key)
                        .or_default()
                        .push(Execution {
                            instance: 2,
                            acquired_at: Instant::now(),
                            ticket: probe,
                            completed: Some(Ok(Ownership::Held)),
                        });
                }
                match claim_after_recovery(&a, t).await.1 {
                    Claim::Replay(r) => assert_eq!(r.body, body_of(*key)),
                    other => panic!("key {key}: {other:?} after its record was finished"),
                }
            }
            Claim::Acquired => {
                let completed = a.complete(&probe, &response_of(*key), TTL).await;
                assert!(matches!(completed, Ok(Ownership::Held)), "{completed:?}");
                lock(&ledger)
                    .executions
                    .entry(*key)
                    .or_default()
                    .push(Execution {
                        instance: 2,
                        acquired_at: Instant::now(),
                        ticket: probe,
                        completed: Some(Ok(Ownership::Held)),
                    });
            }
            Claim::Mismatch => panic!("key {key}: mismatch"),
        }
    }
    drop(cluster);
    let ledger = std::mem::take(&mut *lock(&ledger));
    Failover {
        ledger,
        victim_slots,
        window,
        key_slots,
        keys: keys.len(),
    }
}

/// A claim by a late retry, once the cluster recovered (a few store errors allowed while the
/// client's slot maps catch up).
async fn claim_after_recovery(store: &RedisClusterStore, t: &Ticket) -> (Ticket, Claim) {
    for _ in 0..30 {
        let probe = retry_of(t);
        match store.claim(&probe, LONG_LEASE).await {
            Ok(claim) => return (probe, claim),
            Err(e) => {
                assert_transient(&e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("a key is not claimable after recovery");
}

impl Failover {
    /// Checks every key and returns how many ran twice. `strict`: none may.
    ///
    /// Otherwise a key may run twice only when the async-replication window explains it: its
    /// slot was on the killed master, its first run's claim was acknowledged inside the window
    /// (before the kill, after the replica stopped keeping up), and its second run came after
    /// the kill.
    fn check(&self, strict: bool) -> usize {
        let l = &self.ledger;
        let on_victim = |key: usize| {
            let slot = self.key_slots[&key];
            self.victim_slots
                .iter()
                .any(|&(a, b)| (a..=b).contains(&slot))
        };
        let mut doubles = 0;
        for key in 0..self.keys {
            let runs = l.executions.get(&key).map_or(&[][..], Vec::as_slice);
            assert!(!runs.is_empty(), "key {key} never ran");
            if runs.len() == 1 {
                continue;
            }
            assert!(!strict, "key {key} ran {} times: {runs:#?}", runs.len());
            assert_eq!(runs.len(), 2, "key {key}: {runs:#?}");
            let (first, second) = (&runs[0], &runs[1]);
            let (opened, closed) = self.window;
            assert!(
                on_victim(key)
                    && first.acquired_at >= opened
                    && first.acquired_at <= closed
                    && second.acquired_at > closed,
                "key {key} ran twice, and the replication window does not explain it: {runs:#?}"
            );
            doubles += 1;
        }
        let runs: usize = l.executions.values().map(Vec::len).sum();
        let mut per_instance = [0usize; 3];
        for run in l.executions.values().flatten() {
            per_instance[run.instance] += 1;
        }
        let replays: usize = l.replays.values().sum();
        let errors: usize = l.errors.values().sum();
        let failed_completions = l
            .executions
            .values()
            .flatten()
            .filter(|r| !matches!(r.completed, Some(Ok(Ownership::Held))))
            .count();
        println!(
            "{} keys: {runs} handler runs (app A {}, app B {}, late retries {}; {doubles} keys twice), {replays} replays, {errors} store errors (503), {failed_completions} completions not confirmed",
            self.keys, per_instance[0], per_instance[1], per_instance[2]
        );
        doubles
    }
}

/// A master dies mid-run and its replica takes over. Without `WAIT`, a key may run twice only
/// inside the async-replication window (see `Failover::check`); every key answers after recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_runs_a_key_twice_only_inside_the_replication_window() {
    failover(false, false).await.check(false);
}

/// The same with a replica that lags (cut off 600 ms before its master dies): the claims the
/// master acknowledged meanwhile are lost with it, and their late retries run the handler again.
/// This is the window `wait_for_replicas` closes, and the proof that this test sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_wait_a_lagging_replica_loses_claims_in_a_failover() {
    let doubles = failover(false, true).await.check(false);
    assert!(
        doubles > 0,
        "no claim was lost: the test no longer opens the replication window"
    );
}

/// With `WAIT 1`, the same lagging-replica failover runs every key's handler exactly once: the
/// claims the replica did not confirm failed (503) instead of running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_a_failover_runs_every_key_exactly_once() {
    failover(true, true).await.check(true);
}

/// First requests (claim + complete) and replays per second, with and without `WAIT`.
async fn measure(
    store: &RedisClusterStore,
    label: &str,
    concurrency: usize,
    run_for: Duration,
) -> (f64, f64) {
    let next = Arc::new(AtomicUsize::new(0));
    let created = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (store, next, created) = (store.clone(), Arc::clone(&next), Arc::clone(&created));
        let label = label.to_owned();
        tasks.push(tokio::spawn(async move {
            while started.elapsed() < run_for {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let t = ticket(&label, &format!("m{i}"), b"{}");
                assert_eq!(
                    store.claim(&t, LONG_LEASE).await.expect("claim"),
                    Claim::Acquired
                );
                let held = store
                    .complete(&t, &response_of(i), TTL)
                    .await
                    .expect("complete");
                assert_eq!(held, Ownership::Held);
                lock(&created).push((i, t));
            }
        }));
    }
    for task in tasks {
        task.await.expect("worker");
    }
    let firsts = next.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();

    let created = Arc::new(std::mem::take(&mut *lock(&created)));
    let cursor = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (store, created, cursor) = (store.clone(), Arc::clone(&created), Arc::clone(&cursor));
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            while started.elapsed() < run_for {
                let c = cursor.fetch_add(1, Ordering::Relaxed);
                let (i, t) = &created[c % created.len()];
                match store.claim(&retry_of(t), LONG_LEASE).await.expect("replay") {
                    Claim::Replay(r) => assert_eq!(r.body, body_of(*i)),
                    other => panic!("{other:?}"),
                }
                n += 1;
            }
            n
        }));
    }
    let mut replays = 0;
    for task in tasks {
        replays += task.await.expect("worker");
    }
    (firsts, replays as f64 / started.elapsed().as_secs_f64())
}

/// With `WAIT`, a first request is still two round trips (claim and complete, each pipelined
/// with its `WAIT`) and a replay one, counted by the masters; and what it costs, measured against
/// the default mode in the same run (printed; `--release --nocapture` for real figures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_mode_round_trips_and_cost() {
    let cluster = start(3, 1).await;
    let masters = cluster.masters();
    let plain = RedisClusterStore::builder(pool(&cluster.urls()))
        .lanes(4)
        .build();
    let durable = RedisClusterStore::builder(pool(&cluster.urls()))
        .lanes(4)
        .wait_for_replicas(1, Duration::from_secs(1))
        .build();
    let durable_wide = RedisClusterStore::builder(pool(&cluster.urls()))
        .lanes(8)
        .wait_for_replicas(1, Duration::from_secs(1))
        .build();
    for (name, store) in [("plain", &plain), ("wait", &durable)] {
        // Warm up: every master loads the scripts, every lane connects.
        for i in 0..60 {
            let t = ticket(name, &format!("warm{i}"), b"{}");
            assert_eq!(
                store.claim(&t, LONG_LEASE).await.expect("claim"),
                Claim::Acquired
            );
            let held = store
                .complete(&t, &response_of(i), TTL)
                .await
                .expect("complete");
            assert_eq!(held, Ownership::Held);
        }
        for &port in &masters {
            cluster.cli(port, &["CONFIG", "RESETSTAT"]);
        }
        let n = 100;
        for i in 0..n {
            let t = ticket(name, &format!("rt{i}"), b"{}");
            assert_eq!(
                store.claim(&t, LONG_LEASE).await.expect("claim"),
                Claim::Acquired
            );
            let held = store
                .complete(&t, &response_of(i), TTL)
                .await
                .expect("complete");
            assert_eq!(held, Ownership::Held);
            match store
                .claim(&retry_of(&t), LONG_LEASE)
                .await
                .expect("replay")
            {
                Claim::Replay(r) => assert_eq!(r.body, body_of(i)),
                other => panic!("{other:?}"),
            }
        }
        let mut total: HashMap<String, u64> = HashMap::new();
        for &port in &masters {
            for (cmd, calls) in stats(&cluster, port) {
                *total.entry(cmd).or_default() += calls;
            }
        }
        // Not sent by the store: what the scripts call inside (counted too), the replicas'
        // `REPLCONF ACK`s that a WAIT asks for (on the replication link), topology refreshes,
        // and this test's own INFO and CONFIG.
        total.retain(|cmd, _| {
            !matches!(
                cmd.as_str(),
                "get" | "pttl" | "pexpire" | "del" | "replconf" | "info"
            ) && !cmd.starts_with("cluster")
                && !cmd.starts_with("config")
        });
        let n = n as u64;
        // A claim is one native SET (the first request's and the replay's), the completion one
        // EVALSHA, which runs one SET inside (counted too).
        let mut expected = HashMap::from([("evalsha".to_owned(), n), ("set".to_owned(), 3 * n)]);
        if name == "wait" {
            expected.insert("wait".to_owned(), 3 * n);
        }
        assert_eq!(total, expected, "{name}: commands per request");
    }

    // IDEM_MEASURE_MS lengthens each measurement for real figures (default 700 ms).
    let run_for = Duration::from_millis(
        std::env::var("IDEM_MEASURE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(700),
    );
    println!(
        "mode (lanes)                concurrency  first requests/s (mean µs)  replays/s (mean µs)"
    );
    for concurrency in [1, 32] {
        let mut modes = vec![
            ("acknowledged (4)", &plain),
            ("WAIT 1 replica (4)", &durable),
        ];
        if concurrency > 1 {
            modes.push(("WAIT 1 replica (8)", &durable_wide));
        }
        for (label, store) in modes {
            let scope = format!("{label}{concurrency}");
            let (firsts, replays) = measure(store, &scope, concurrency, run_for).await;
            let micros = |rate: f64| 1e6 * concurrency as f64 / rate;
            println!(
                "{label:<27} {concurrency:>11}  {firsts:>16.0} ({:>6.0})  {replays:>9.0} ({:>6.0})",
                micros(firsts),
                micros(replays)
            );
            assert!(firsts > 0.0 && replays > 0.0);
        }
    }
}

/// As many lanes as the pool has connections, and a burst of first calls: no call waits for a
/// pool connection that every lane keeps (each lane checks out one connection, once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_as_many_as_the_pool_holds_do_not_starve_first_calls() {
    let cluster = admin(shared_cluster).await;
    let mut config = deadpool_redis::cluster::Config::from_urls(cluster.urls());
    config.pool = Some(deadpool_redis::PoolConfig::new(4));
    let pool = config
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .expect("pool");
    let store = RedisClusterStore::builder(pool)
        .prefix("lanes:")
        .lanes(4)
        .timeout(Duration::from_secs(2))
        .build();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.claim(&key_ticket("lanes", i), LONG_LEASE).await
        }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("task").expect("claim"), Claim::Acquired);
    }
    assert_eq!(store.pool().status().size, 4);
}

/// With `WAIT`, a claim that no replica confirms is a store error (`NotReplicated`) after the
/// whole `WAIT` timeout (longer than redis-rs's 500 ms default response timeout: nothing cuts it
/// short), and the key is released, so once the replica is back the retry runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_claim_is_an_error_and_frees_its_key() {
    let cluster = Arc::new(start(3, 1).await);
    let wait = Duration::from_millis(900);
    let store = RedisClusterStore::builder(pool(&cluster.urls()))
        .wait_for_replicas(1, wait)
        .build();
    let t = key_ticket("unconfirmed", 0);
    let slot = key_slot(testing::cluster_key_of(&store, &t).as_bytes());
    // Both lanes connected before a node hangs (connecting to a frozen node takes redis-rs's
    // 1 s connection timeout).
    for i in 1..=4 {
        let warm = key_ticket("unconfirmed", i);
        assert_eq!(
            store.claim(&warm, LONG_LEASE).await.expect("claim"),
            Claim::Acquired
        );
    }

    let (master, replica) = admin({
        let c = Arc::clone(&cluster);
        move || {
            let master = c.master_of(slot);
            let replica = c.replicas_of(master)[0];
            // The master also forgets the scripts, as a newly promoted one would not know them:
            // the WAIT that comes back with NOSCRIPT already counted too few replicas, and the
            // store does not wait a second time.
            c.cli(master, &["SCRIPT", "FLUSH"]);
            c.cli(master, &["CONFIG", "RESETSTAT"]);
            c.lag_replica(replica);
            (master, replica)
        }
    })
    .await;
    let started = Instant::now();
    let err = store
        .claim(&t, LONG_LEASE)
        .await
        .expect_err("no replica confirms");
    let took = started.elapsed();
    let StoreError::Unavailable(source) = &err else {
        panic!("{err:?}");
    };
    let not_replicated = source
        .downcast_ref::<idem_runtime::NotReplicated>()
        .unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!((not_replicated.wanted(), not_replicated.acked()), (1, 0));
    assert!(took >= wait && took < wait * 2, "took {took:?}");
    let waits = admin({
        let c = Arc::clone(&cluster);
        move || stats(&c, master).get("wait").copied()
    })
    .await;
    assert_eq!(waits, Some(1));

    admin({
        let c = Arc::clone(&cluster);
        move || {
            c.resume(replica);
            c.wait_until_ok();
        }
    })
    .await;
    // Released in the background: the retry gets the key (not 409 for the 60 s lease).
    let retry = retry_of(&t);
    let mut claim = store.claim(&retry, LONG_LEASE).await;
    for _ in 0..20 {
        if matches!(claim, Ok(Claim::Acquired)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        claim = store.claim(&retry_of(&t), LONG_LEASE).await;
    }
    assert_eq!(
        claim.expect("claim after the replica is back"),
        Claim::Acquired
    );
}
