//! The replay cache: copies of completed records in this process's memory, so that a retry of a
//! completed request replays without a store round trip.
//!
//! A completed record never changes until it expires (nothing in the protocol rewrites one), so
//! a copy answers exactly what the store would: the stored response to the same request, 422 to
//! another fingerprint. A copy is made when a claim finds a completed record (the first retry
//! this process sees), never when a request completes one: most first requests are never
//! retried, and they pay nothing for the cache. A copy never outlives its record: the store tells
//! how long the record still lives (the Redis stores read it from the record, the expiry its
//! writer put in it, by the writer's clock, less a second for the clocks' skew; `PostgresStore`
//! from its own clock, less a second for the answer's way back). A record of a store that cannot
//! tell (a custom store, a record written before this release) is not copied.
//!
//! No copy lives longer than [`MAX_AGE`] either, so that a record deleted from the store by hand
//! stops replaying here within it. The copies are bounded in bytes (the configuration's
//! `replay_cache`); the least useful are evicted first. Concurrent requests that miss on one key
//! make one store read between them: the others wait for its answer (a retry storm on one key
//! costs the store one read per instance). A record in another fingerprint encoding than the
//! request's is left to the store's claim, which compares in the record's encoding.
//!
//! The memory store keeps no cache: it is in this process already.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use moka::{sync::Cache, Expiry};
use tokio::sync::watch;

use crate::{
    fingerprint::Fingerprint,
    observe::{self, Op},
    protocol::Claim,
    record::StoredResponse,
    scope::RecordKey,
    store::{claim_with_life, Store, StoreError, Ticket},
};

/// The longest a copy is kept, whatever its record's ttl.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(10 * 60);

/// What one copy costs beyond its headers and body: the key, the fingerprint, the entry and the
/// cache's own bookkeeping.
const ENTRY_OVERHEAD: usize = 160;

/// The copies of completed records of one configuration.
pub(crate) struct ReplayCache {
    copies: Cache<RecordKey, Arc<Copy>>,
    /// The largest copy kept: a sixteenth of the capacity, so that one response cannot empty the
    /// cache.
    largest: usize,
    /// The keys this process is reading from the store now (after a miss), each with the end of
    /// its read to wait for.
    reading: Mutex<HashMap<RecordKey, watch::Receiver<()>>>,
}

/// A copy of one completed record.
struct Copy {
    fingerprint: Fingerprint,
    response: StoredResponse,
    /// When the copy ends: never after the record does.
    until: Instant,
}

impl Copy {
    /// What the copy answers to `ticket`: the replay, a mismatch, or nothing (the record's
    /// fingerprint is in another encoding than the request's: the store's claim compares them).
    fn answer(&self, ticket: &Ticket) -> Option<Claim> {
        let theirs = ticket.fingerprint();
        if self.fingerprint.encoding() != theirs.encoding() {
            return None;
        }
        Some(if self.fingerprint == *theirs {
            Claim::Replay(self.response.clone())
        } else {
            Claim::Mismatch
        })
    }

    fn weight(&self) -> usize {
        let headers: usize = self
            .response
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 16)
            .sum();
        ENTRY_OVERHEAD + headers + self.response.body.len()
    }
}

/// A copy expires when it says, whether it was inserted or replaced.
struct UntilItEnds;

impl Expiry<RecordKey, Arc<Copy>> for UntilItEnds {
    fn expire_after_create(
        &self,
        _key: &RecordKey,
        copy: &Arc<Copy>,
        now: Instant,
    ) -> Option<Duration> {
        Some(copy.until.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _key: &RecordKey,
        copy: &Arc<Copy>,
        now: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(copy.until.saturating_duration_since(now))
    }
}

/// A read of one key from the store by this process, underway: the other requests that miss on
/// the key wait for its end, and its copy. Ends (and wakes them) when dropped, answered or not.
struct Reading<'a> {
    cache: &'a ReplayCache,
    key: RecordKey,
    /// Dropped after the key left the map: the waiters' `changed` returns.
    _done: watch::Sender<()>,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        lock(&self.cache.reading).remove(&self.key);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change under the lock is one insert or remove: a poisoned map is still consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ReplayCache {
    /// A cache of at most `capacity` bytes of copies.
    pub(crate) fn new(capacity: usize) -> Self {
        let copies = Cache::builder()
            .max_capacity(capacity as u64)
            .weigher(|_key, copy: &Arc<Copy>| u32::try_from(copy.weight()).unwrap_or(u32::MAX))
            .expire_after(UntilItEnds)
            .build();
        Self {
            copies,
            largest: capacity / 16,
            reading: Mutex::new(HashMap::new()),
        }
    }

    /// Claims `ticket`'s record: from a copy when there is one, else from `store` (one read for
    /// all the requests of this process that miss on the key at once), copying a completed
    /// record whose life the store tells.
    pub(crate) async fn claim(
        &self,
        store: &dyn Store,
        ticket: &Ticket,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        if let Some(answer) = self.answer(ticket) {
            return Ok(answer);
        }
        // Boxed: inline, the store's claim futures nest deep enough to push a handler's future
        // type past the compiler's default recursion limit. A miss waits for a store round trip
        // anyway.
        Box::pin(self.read(store, ticket, lease)).await
    }

    /// Claims `ticket`'s record from `store`, copying a completed record whose life the store
    /// tells; the concurrent misses of this process on one key wait for one read.
    async fn read(
        &self,
        store: &dyn Store,
        ticket: &Ticket,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let role = {
            let mut reading = lock(&self.reading);
            match reading.get(ticket.key()) {
                Some(underway) => Err(underway.clone()),
                None => {
                    let (done, underway) = watch::channel(());
                    reading.insert(*ticket.key(), underway);
                    Ok(Reading {
                        cache: self,
                        key: *ticket.key(),
                        _done: done,
                    })
                }
            }
        };
        match role {
            Ok(reading) => {
                let sent = Instant::now();
                let claimed = claim_with_life(store, ticket, lease).await?;
                if let (Claim::Replay(response), Some(life)) = &claimed {
                    let copy = Copy {
                        fingerprint: *ticket.fingerprint(),
                        response: response.clone(),
                        until: sent + (*life).min(MAX_AGE),
                    };
                    if copy.weight() <= self.largest && !life.is_zero() {
                        self.copies.insert(*ticket.key(), Arc::new(copy));
                    }
                }
                drop(reading);
                Ok(claimed.0)
            }
            Err(mut underway) => {
                // Another request of this process is reading the record: its copy answers,
                // unless there is none (the record was not a replay) or it is in another
                // encoding. The sender only ever goes away: `changed` returns when it does.
                let _ = underway.changed().await;
                if let Some(answer) = self.answer(ticket) {
                    return Ok(answer);
                }
                observe::timed(Op::Claim, store.kind(), store.claim(ticket, lease)).await
            }
        }
    }

    /// What a live copy answers to `ticket`, if there is one.
    fn answer(&self, ticket: &Ticket) -> Option<Claim> {
        self.copies.get(ticket.key())?.answer(ticket)
    }

    /// The bytes the copies weigh now (after the cache's pending upkeep).
    #[cfg(feature = "testing")]
    pub(crate) async fn weighed(&self) -> u64 {
        self.copies.run_pending_tasks();
        self.copies.weighted_size()
    }
}
