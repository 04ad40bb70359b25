//! The in-memory store: the embedded default for single-process apps, examples and tests.

use std::{
    collections::HashMap,
    mem::size_of,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, OnceLock, PoisonError,
    },
    time::Duration,
};

use actix_web::http::header::{HeaderName, HeaderValue};
use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use super::{Ownership, Store, StoreError, Ticket};
use crate::{
    config::Idempotency,
    fingerprint::Fingerprint,
    protocol::{classify, Claim},
    record::{Record, StoredResponse},
    scope::RecordKey,
};

const SHARDS: usize = 32;
/// A shard sweeps its expired records once it has taken this many new records since its last
/// sweep, or a quarter of what it holds if that is more: memory stays bounded by the live records
/// (at most a quarter more, plus this) without a background task, and a sweep's scan, which
/// visits every record of the shard, costs each insert a constant share however many records
/// are live (a fixed interval would cost each insert a share that grows with the store).
const SWEEP_EVERY: usize = 1024;
/// A full store sweeps every shard for expired records at most this often: a flood of new keys
/// against a full store costs one sweep per interval, not one per request.
const FULL_SWEEP_INTERVAL: Duration = Duration::from_millis(100);
/// What a record costs besides its response: its slot in the map (the key and the entry, with
/// the fingerprint and owner token inline) and the map's control byte.
const SLOT: usize = size_of::<(RecordKey, Entry)>() + 1;

/// An in-process store with expiring records, within a capacity in bytes.
///
/// Records live in this process only: two app instances do not share them, and a restart forgets
/// them. Use [`RedisStore`](crate::RedisStore) for anything that runs more than one process.
///
/// **One store per process.** [`new`](Self::new), [`with_capacity`](Self::with_capacity) and
/// [`Default`] return a handle to the process's memory store: every call, wherever it is made,
/// reaches the same records. So the store may be built where actix-web builds everything else,
/// in the factory that `HttpServer::new` calls once per worker:
///
/// ```
/// use actix_web::{App, HttpServer};
/// use idem_runtime::{Idempotency, MemoryStore};
///
/// # fn run() -> std::io::Result<()> {
/// // Four workers, four handles, one store: a key runs once, whichever worker its requests reach.
/// let server = HttpServer::new(|| App::new().app_data(Idempotency::new(MemoryStore::new())))
///     .workers(4)
///     .bind("127.0.0.1:8080")?;
/// # Ok(()) }
/// ```
///
/// Were each worker's store its own, a retry that reaches another worker (every new connection
/// may) would find no record and run the handler again. A store of its own, which shares nothing
/// with the others, is [`isolated`](Self::isolated): for tests that want a fresh store each, or a
/// store built once and cloned into the factory. Clones of a handle share its records. The
/// process's store lives as long as the process; an isolated one, until its last handle is
/// dropped.
///
/// **Capacity.** The store counts what each record costs (its map slot with key, fingerprint and
/// owner token, and for a completed record the response's body and headers) against the
/// capacity of the handle that claims, [`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY) unless set
/// with [`with_capacity`](Self::with_capacity). When a new claim does not fit, even after expired
/// records are swept, it fails with [`StoreError::Full`]: the request gets 503 with `Retry-After`
/// and its handler does not run (unless it fails open). A live record is never evicted early, so
/// every stored response stays replayable for its ttl. The completion of a request already
/// claimed always succeeds, so memory can exceed the capacity by the responses of the requests in
/// flight when it filled (each at most `max_response`). Handles of the process's store with
/// different capacities share its records, and each refuses new claims once they hold its own
/// capacity.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    records: Arc<Records>,
    capacity: usize,
}

/// The records of one store, shared by its handles.
#[derive(Debug)]
struct Records {
    shards: Box<[Mutex<Shard>]>,
    /// The bytes the records hold, by the count above.
    used: AtomicUsize,
    /// When a full store last swept every shard.
    last_full_sweep: Mutex<Option<Instant>>,
}

impl Records {
    fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            used: AtomicUsize::new(0),
            last_full_sweep: Mutex::new(None),
        }
    }
}

/// The process's memory store: the records behind every [`MemoryStore::new`] and
/// [`MemoryStore::with_capacity`].
static PROCESS: OnceLock<Arc<Records>> = OnceLock::new();

#[derive(Debug, Default)]
struct Shard {
    records: HashMap<RecordKey, Entry>,
    /// The journals of steps, beside the records: a release deletes the record and keeps its
    /// journal (so the retry resumes); each expires on its own, `ttl` after its last write.
    journals: HashMap<RecordKey, Journal>,
    /// New records since the last sweep.
    inserts: usize,
}

/// One request's journal of steps (see `Steps`).
#[derive(Debug)]
struct Journal {
    fingerprint: Fingerprint,
    steps: HashMap<String, Bytes>,
    expires_at: Instant,
    /// What this journal counts against the capacity.
    cost: usize,
}

/// What a journal costs besides its steps: its slot in the map.
const JOURNAL_SLOT: usize = size_of::<(RecordKey, Journal)>() + 1;
/// What one journaled step costs besides its name and entry.
const STEP_SLOT: usize = size_of::<(String, Bytes)>() + 1;

#[derive(Debug)]
struct Entry {
    record: Record,
    expires_at: Instant,
    /// What this record counts against the capacity.
    cost: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// The capacity of [`new`](Self::new) and [`isolated`](Self::isolated): 256 MiB.
    pub const DEFAULT_CAPACITY: usize = 256 * 1024 * 1024;

    /// A handle to the process's memory store (one per process, see above), with the
    /// [default capacity](Self::DEFAULT_CAPACITY).
    pub fn new() -> Self {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }

    /// A handle to the process's memory store (one per process, see above) that claims new
    /// records while the store holds less than `bytes` (see "Capacity" above): a pending record
    /// costs about 150 bytes, a completed one that plus its response's body and headers. A new
    /// claim that does not fit fails with [`StoreError::Full`] (503).
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            records: Arc::clone(PROCESS.get_or_init(|| Arc::new(Records::new()))),
            capacity: bytes,
        }
    }

    /// A new, empty store of its own, with the [default capacity](Self::DEFAULT_CAPACITY): it
    /// shares records only with its clones. For tests that want a fresh store each; an app that
    /// builds one must build it once, outside `HttpServer::new`'s factory, and clone it in.
    pub fn isolated() -> Self {
        Self::isolated_with_capacity(Self::DEFAULT_CAPACITY)
    }

    /// [`isolated`](Self::isolated), holding records worth at most `bytes`.
    pub fn isolated_with_capacity(bytes: usize) -> Self {
        Self {
            records: Arc::new(Records::new()),
            capacity: bytes,
        }
    }

    /// The number of live (unexpired) records of the store (of the process's store: its records
    /// from every handle).
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.records
            .shards
            .iter()
            .map(|s| {
                lock(s)
                    .records
                    .values()
                    .filter(|e| e.expires_at > now)
                    .count()
            })
            .sum()
    }

    /// Whether no live record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The time to live of every live record: each record has one, by construction.
    #[cfg(feature = "testing")]
    pub(crate) fn ttls(&self) -> Vec<Duration> {
        let now = Instant::now();
        self.records
            .shards
            .iter()
            .flat_map(|s| {
                lock(s)
                    .records
                    .values()
                    .filter(|e| e.expires_at > now)
                    .map(|e| e.expires_at - now)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn shard(&self, key: &RecordKey) -> MutexGuard<'_, Shard> {
        // A record key is already a SHA-256 digest: its last bytes pick the shard without hashing
        // it again (the map inside the shard keeps its keyed hash). A client who grinds keys into
        // one shard gains nothing but sharing that shard's lock.
        let mut tail = [0u8; 8];
        tail.copy_from_slice(&key.as_bytes()[24..]);
        // The modulo keeps the index in range; truncation is intended.
        #[allow(clippy::cast_possible_truncation)]
        let shards = &self.records.shards;
        let i = (u64::from_le_bytes(tail) % shards.len() as u64) as usize;
        lock(&shards[i])
    }

    /// Counts `cost` more bytes if they fit in the capacity.
    fn reserve(&self, cost: usize) -> bool {
        self.records
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(cost).filter(|&n| n <= self.capacity)
            })
            .is_ok()
    }

    /// Counts `cost` more bytes, whether or not they fit.
    fn charge(&self, cost: usize) {
        self.records.used.fetch_add(cost, Ordering::AcqRel);
    }

    /// Counts `cost` fewer bytes.
    fn refund(&self, cost: usize) {
        self.records.used.fetch_sub(cost, Ordering::AcqRel);
    }

    /// Drops the expired records of one shard.
    fn sweep(&self, shard: &mut Shard, now: Instant) {
        shard.inserts = 0;
        let mut freed = 0;
        shard.records.retain(|_, e| {
            let live = e.expires_at > now;
            if !live {
                freed += e.cost;
            }
            live
        });
        shard.journals.retain(|_, j| {
            let live = j.expires_at > now;
            if !live {
                freed += j.cost;
            }
            live
        });
        self.refund(freed);
    }

    /// Sweeps every shard, unless another sweep ran within [`FULL_SWEEP_INTERVAL`] or is running.
    /// Called with no shard locked.
    fn sweep_all_if_due(&self) {
        let Ok(mut last) = self.records.last_full_sweep.try_lock() else {
            return;
        };
        let now = Instant::now();
        if last.is_some_and(|at| now.saturating_duration_since(at) < FULL_SWEEP_INTERVAL) {
            return;
        }
        *last = Some(now);
        for shard in &*self.records.shards {
            self.sweep(&mut lock(shard), now);
        }
    }

    /// One attempt at a claim; `None` when a new record does not fit.
    fn try_claim(&self, ticket: &Ticket, lease: Duration) -> Option<Claim> {
        let now = Instant::now();
        let mut shard = self.shard(ticket.key());
        if let Some(entry) = shard.records.get(ticket.key()) {
            if entry.expires_at > now {
                return Some(classify(
                    entry.record.clone(),
                    ticket,
                    entry.expires_at - now,
                ));
            }
        }
        if !self.reserve(SLOT) {
            return None;
        }
        let old = shard.records.insert(
            *ticket.key(),
            Entry {
                record: Record::Pending {
                    fingerprint: *ticket.fingerprint(),
                    token: *ticket.token(),
                },
                expires_at: expiry(now, lease),
                cost: SLOT,
            },
        );
        if let Some(old) = old {
            self.refund(old.cost);
        }
        shard.inserts += 1;
        if shard.inserts >= SWEEP_EVERY.max((shard.records.len() + shard.journals.len()) / 4) {
            self.sweep(&mut shard, now);
        }
        Some(Claim::Acquired)
    }

    /// Runs `f` on the live record owned by `ticket`, if it is still owned.
    fn with_owned(&self, ticket: &Ticket, f: impl FnOnce(&mut Entry, Instant)) -> Ownership {
        let now = Instant::now();
        let mut shard = self.shard(ticket.key());
        match shard.records.get_mut(ticket.key()) {
            Some(entry) if owns(entry, ticket, now) => {
                f(entry, now);
                Ownership::Held
            }
            _ => Ownership::Lost,
        }
    }
}

/// Whether `entry` is the live pending record of `ticket`.
fn owns(entry: &Entry, ticket: &Ticket, now: Instant) -> bool {
    entry.expires_at > now
        && matches!(
            &entry.record,
            Record::Pending { fingerprint, token }
                if fingerprint == ticket.fingerprint() && token == ticket.token()
        )
}

/// What a completed record with `response` counts against the capacity.
fn completed_cost(response: &StoredResponse) -> usize {
    let headers: usize = response
        .headers
        .iter()
        .map(|(name, value)| {
            size_of::<(HeaderName, HeaderValue)>() + name.as_str().len() + value.len()
        })
        .sum();
    SLOT + headers + response.body.len()
}

/// When a record written at `now` for `d` expires. A custom caller of the [`Store`] trait may pass
/// any duration: longer than [`Idempotency::MAX_TTL`] is clamped to it (the `Idempotency` setters
/// and the attribute refuse more), so a huge duration neither overflows nor fails.
fn expiry(now: Instant, d: Duration) -> Instant {
    let d = d.min(Idempotency::MAX_TTL);
    // 365 days past now is representable on every platform; should it not be, the latest
    // representable instant is the closest to what was asked.
    now.checked_add(d).unwrap_or_else(|| far_future(now, d))
}

fn far_future(now: Instant, d: Duration) -> Instant {
    let mut step = d;
    let mut at = now;
    while !step.is_zero() {
        match at.checked_add(step) {
            Some(later) => at = later,
            None => step /= 2,
        }
    }
    at
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves a consistent map (every mutation is a single insert or
    // remove, and the count is adjusted next to it), so a poisoned lock is safe to keep using.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn claim(&self, ticket: &Ticket, lease: Duration) -> Result<Claim, StoreError> {
        if let Some(claim) = self.try_claim(ticket, lease) {
            return Ok(claim);
        }
        // Full: drop what has expired everywhere (no shard is locked here), then try once more.
        self.sweep_all_if_due();
        self.try_claim(ticket, lease).ok_or(StoreError::Full {
            capacity: self.capacity,
        })
    }

    async fn renew(&self, ticket: &Ticket, lease: Duration) -> Result<Ownership, StoreError> {
        Ok(self.with_owned(ticket, |entry, now| {
            entry.expires_at = expiry(now, lease);
        }))
    }

    async fn complete(
        &self,
        ticket: &Ticket,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<Ownership, StoreError> {
        // A claimed request always completes, even past the capacity: refusing it would turn a
        // response already sent into a retry that runs the handler again.
        Ok(self.with_owned(ticket, |entry, now| {
            let cost = completed_cost(response);
            self.charge(cost);
            self.refund(entry.cost);
            *entry = Entry {
                record: Record::Completed {
                    fingerprint: *ticket.fingerprint(),
                    response: response.clone(),
                },
                expires_at: expiry(now, ttl),
                cost,
            };
        }))
    }

    async fn release(&self, ticket: &Ticket) -> Result<Ownership, StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(ticket.key());
        if !shard
            .records
            .get(ticket.key())
            .is_some_and(|e| owns(e, ticket, now))
        {
            return Ok(Ownership::Lost);
        }
        if let Some(removed) = shard.records.remove(ticket.key()) {
            self.refund(removed.cost);
        }
        Ok(Ownership::Held)
    }

    async fn load_steps(&self, ticket: &Ticket) -> Result<Vec<(String, Bytes)>, StoreError> {
        let now = Instant::now();
        let shard = self.shard(ticket.key());
        Ok(match shard.journals.get(ticket.key()) {
            Some(j) if j.expires_at > now && j.fingerprint == *ticket.fingerprint() => j
                .steps
                .iter()
                .map(|(name, entry)| (name.clone(), entry.clone()))
                .collect(),
            _ => Vec::new(),
        })
    }

    async fn record_step(
        &self,
        ticket: &Ticket,
        name: &str,
        entry: &[u8],
        ttl: Duration,
    ) -> Result<Ownership, StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(ticket.key());
        if !shard
            .records
            .get(ticket.key())
            .is_some_and(|e| owns(e, ticket, now))
        {
            return Ok(Ownership::Lost);
        }
        // Like a completion, a step of a claimed request is always journaled, even past the
        // capacity (its effect already happened); `Steps` bounds each journal.
        let journal = shard
            .journals
            .entry(*ticket.key())
            .or_insert_with(|| Journal {
                fingerprint: *ticket.fingerprint(),
                steps: HashMap::new(),
                expires_at: now,
                cost: 0,
            });
        if journal.fingerprint != *ticket.fingerprint() || journal.expires_at <= now {
            // Another request's journal (or an expired one): this request starts its own.
            self.refund(journal.cost);
            journal.fingerprint = *ticket.fingerprint();
            journal.steps.clear();
            journal.cost = 0;
        }
        if journal.cost == 0 {
            journal.cost = JOURNAL_SLOT;
            self.charge(JOURNAL_SLOT);
        }
        let cost = STEP_SLOT + name.len() + entry.len();
        if let Some(old) = journal
            .steps
            .insert(name.to_owned(), Bytes::copy_from_slice(entry))
        {
            let old_cost = STEP_SLOT + name.len() + old.len();
            self.refund(old_cost);
            journal.cost -= old_cost;
        }
        self.charge(cost);
        journal.cost += cost;
        journal.expires_at = expiry(now, ttl);
        Ok(Ownership::Held)
    }
}

#[cfg(test)]
mod tests {
    use actix_web::http::StatusCode;
    use bytes::Bytes;

    use super::*;
    use crate::fingerprint::Fingerprint;

    fn ticket(key: u8) -> Ticket {
        Ticket::new(
            RecordKey::from_bytes([key; 32]),
            Fingerprint::compute("POST", "/p", "", b"{}"),
        )
    }

    fn response(body: &[u8]) -> StoredResponse {
        StoredResponse {
            status: StatusCode::CREATED,
            headers: vec![],
            body: Bytes::copy_from_slice(body),
        }
    }

    fn longest_expiry(store: &MemoryStore) -> Duration {
        let now = Instant::now();
        store
            .records
            .shards
            .iter()
            .flat_map(|s| {
                lock(s)
                    .records
                    .values()
                    .map(|e| e.expires_at.saturating_duration_since(now))
                    .collect::<Vec<_>>()
            })
            .max()
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn a_huge_duration_is_clamped_to_the_longest_ttl() {
        let store = MemoryStore::isolated();
        let t = ticket(1);
        assert_eq!(
            store.claim(&t, Duration::MAX).await.expect("claims"),
            Claim::Acquired
        );
        assert!(longest_expiry(&store) <= Idempotency::MAX_TTL);
        assert_eq!(
            store.renew(&t, Duration::MAX).await.expect("renews"),
            Ownership::Held
        );
        assert_eq!(
            store
                .complete(&t, &response(b"paid"), Duration::MAX)
                .await
                .expect("completes"),
            Ownership::Held
        );
        let kept = longest_expiry(&store);
        assert!(kept <= Idempotency::MAX_TTL, "{kept:?}");
        assert!(
            kept > Idempotency::MAX_TTL - Duration::from_secs(60),
            "{kept:?}"
        );
        assert_eq!(
            store.claim(&t, Duration::MAX).await.expect("claims"),
            Claim::Replay(response(b"paid"))
        );
    }

    fn used(store: &MemoryStore) -> usize {
        store.records.used.load(Ordering::Acquire)
    }

    #[tokio::test]
    async fn a_full_store_refuses_new_claims_and_keeps_every_live_record() {
        let store = MemoryStore::isolated_with_capacity(3 * SLOT);
        let lease = Duration::from_secs(30);
        let owners: Vec<Ticket> = (1..=3).map(ticket).collect();
        for owner in &owners {
            assert_eq!(
                store.claim(owner, lease).await.expect("claims"),
                Claim::Acquired
            );
        }
        assert_eq!(used(&store), 3 * SLOT);
        let refused = store.claim(&ticket(4), lease).await;
        assert!(
            matches!(refused, Err(StoreError::Full { capacity }) if capacity == 3 * SLOT),
            "{refused:?}"
        );
        assert!(refused
            .expect_err("full")
            .to_string()
            .contains(&format!("capacity {} bytes", 3 * SLOT)));
        // A claimed request completes even past the capacity, and is replayed.
        let big = response(&[b'x'; 1000]);
        let t1 = &owners[0];
        assert_eq!(
            store
                .complete(t1, &big, Duration::from_secs(60))
                .await
                .expect("completes"),
            Ownership::Held
        );
        assert_eq!(used(&store), completed_cost(&big) + 2 * SLOT);
        assert!(used(&store) > 3 * SLOT);
        assert_eq!(
            store.claim(t1, lease).await.expect("claims"),
            Claim::Replay(big)
        );
        // Records in flight stay in flight and keep their lease: nothing was evicted.
        assert!(matches!(
            store.claim(&ticket(2), lease).await,
            Ok(Claim::InFlight { .. })
        ));
        assert_eq!(
            store.renew(&owners[1], lease).await.expect("renews"),
            Ownership::Held
        );
        assert!(matches!(
            store.claim(&ticket(5), lease).await,
            Err(StoreError::Full { .. })
        ));
        assert_eq!(store.len(), 3);
    }

    /// A ticket at an address of its own: the process's store is shared by every test here.
    fn unique_ticket() -> Ticket {
        Ticket::new(
            RecordKey::from_bytes(rand::random()),
            Fingerprint::compute("POST", "/p", "", b"{}"),
        )
    }

    #[tokio::test]
    async fn every_default_handle_reaches_the_processs_records_and_isolated_ones_do_not() {
        let lease = Duration::from_secs(30);
        let t = unique_ticket();
        // The same request again (another owner token), as a retry sends it.
        let retry = || Ticket::new(*t.key(), *t.fingerprint());
        // As `HttpServer::new`'s factory builds it, once per worker.
        let workers = [
            MemoryStore::new(),
            MemoryStore::default(),
            MemoryStore::with_capacity(1 << 20),
            MemoryStore::new().clone(),
        ];
        assert_eq!(
            workers[0].claim(&t, lease).await.expect("claims"),
            Claim::Acquired
        );
        for other in &workers[1..] {
            assert!(
                matches!(
                    other.claim(&retry(), lease).await,
                    Ok(Claim::InFlight { .. })
                ),
                "another handle of the process's store sees the claim"
            );
        }
        assert_eq!(
            workers[3]
                .complete(&t, &response(b"paid"), Duration::from_secs(60))
                .await
                .expect("completes"),
            Ownership::Held
        );
        for other in &workers {
            assert_eq!(
                other.claim(&retry(), lease).await.expect("claims"),
                Claim::Replay(response(b"paid"))
            );
        }
        // A store of its own sees none of it, and shares only with its clones.
        let isolated = MemoryStore::isolated();
        assert_eq!(
            isolated.claim(&t, lease).await.expect("claims"),
            Claim::Acquired
        );
        assert!(matches!(
            isolated.clone().claim(&retry(), lease).await,
            Ok(Claim::InFlight { .. })
        ));
        assert!(matches!(
            MemoryStore::isolated().claim(&t, lease).await,
            Ok(Claim::Acquired)
        ));
    }

    #[tokio::test]
    async fn each_handle_claims_within_its_own_capacity() {
        let lease = Duration::from_secs(30);
        let small = MemoryStore::isolated_with_capacity(2 * SLOT);
        let large = MemoryStore {
            capacity: 3 * SLOT,
            ..small.clone()
        };
        for _ in 0..2 {
            assert_eq!(
                small.claim(&unique_ticket(), lease).await.expect("claims"),
                Claim::Acquired
            );
        }
        assert!(matches!(
            small.claim(&unique_ticket(), lease).await,
            Err(StoreError::Full { capacity }) if capacity == 2 * SLOT
        ));
        assert_eq!(
            large.claim(&unique_ticket(), lease).await.expect("claims"),
            Claim::Acquired
        );
        assert_eq!(small.len(), 3);
        assert_eq!(large.len(), 3);
    }

    #[tokio::test]
    async fn a_release_makes_room() {
        let store = MemoryStore::isolated_with_capacity(SLOT);
        let lease = Duration::from_secs(30);
        let t1 = ticket(1);
        assert_eq!(
            store.claim(&t1, lease).await.expect("claims"),
            Claim::Acquired
        );
        assert!(store.claim(&ticket(2), lease).await.is_err());
        assert_eq!(store.release(&t1).await.expect("releases"), Ownership::Held);
        assert_eq!(used(&store), 0);
        assert_eq!(
            store.claim(&ticket(2), lease).await.expect("claims"),
            Claim::Acquired
        );
    }

    #[tokio::test(start_paused = true)]
    async fn expired_records_make_room_again() {
        // Room for two pending records, or one pending and one small completed one.
        let store = MemoryStore::isolated_with_capacity(2 * SLOT + 100);
        let (t1, t2) = (ticket(1), ticket(2));
        assert_eq!(
            store
                .claim(&t1, Duration::from_secs(1))
                .await
                .expect("claims"),
            Claim::Acquired
        );
        assert_eq!(
            store
                .claim(&t2, Duration::from_secs(1))
                .await
                .expect("claims"),
            Claim::Acquired
        );
        assert_eq!(
            store
                .complete(&t2, &response(b"paid"), Duration::from_secs(5))
                .await
                .expect("completes"),
            Ownership::Held
        );
        assert!(store
            .claim(&ticket(3), Duration::from_secs(1))
            .await
            .is_err());
        // The pending record's lease runs out: its room is taken back, the completed one stays.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            store
                .claim(&ticket(3), Duration::from_secs(1))
                .await
                .expect("claims"),
            Claim::Acquired
        );
        assert_eq!(used(&store), SLOT + completed_cost(&response(b"paid")));
        assert_eq!(
            store
                .claim(&t2, Duration::from_secs(1))
                .await
                .expect("claims"),
            Claim::Replay(response(b"paid"))
        );
        // Everything expires: the store is empty and its count back to zero.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            store
                .claim(&ticket(4), Duration::from_secs(1))
                .await
                .expect("claims"),
            Claim::Acquired
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        store.sweep_all_if_due();
        assert_eq!(used(&store), 0);
        assert!(store.is_empty());
    }

    /// A journal counts against the capacity while it lives (a release keeps it), a replaced
    /// journal gives its bytes back, and an expired one is swept to zero.
    #[tokio::test(start_paused = true)]
    async fn journals_count_against_the_capacity_until_they_expire() {
        let store = MemoryStore::isolated();
        let t = ticket(5);
        let ttl = Duration::from_secs(5);
        assert_eq!(
            store
                .claim(&t, Duration::from_secs(1))
                .await
                .expect("claims"),
            Claim::Acquired
        );
        let held = store.record_step(&t, "charge", b"1234", ttl).await;
        assert_eq!(held.expect("records"), Ownership::Held);
        let held = store.record_step(&t, "charge", b"12345678", ttl).await;
        assert_eq!(held.expect("records"), Ownership::Held);
        let journal = JOURNAL_SLOT + STEP_SLOT + "charge".len() + 8;
        assert_eq!(used(&store), SLOT + journal);
        assert_eq!(store.release(&t).await.expect("releases"), Ownership::Held);
        assert_eq!(used(&store), journal, "the journal outlives the release");
        // Another request under the same key replaces it.
        let other = Ticket::new(*t.key(), Fingerprint::compute("POST", "/p", "", b"[]"));
        assert_eq!(
            store
                .claim(&other, Duration::from_secs(1))
                .await
                .expect("claims"),
            Claim::Acquired
        );
        let held = store.record_step(&other, "x", b"1", ttl).await;
        assert_eq!(held.expect("records"), Ownership::Held);
        assert_eq!(used(&store), SLOT + JOURNAL_SLOT + STEP_SLOT + 2);
        assert!(store.load_steps(&t).await.expect("loads").is_empty());
        tokio::time::advance(Duration::from_secs(6)).await;
        store.sweep_all_if_due();
        assert_eq!(used(&store), 0);
    }
}
