//! The in-memory store: the embedded default for single-process apps, examples and tests.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use async_trait::async_trait;
use tokio::time::Instant;

use super::{Ownership, Store, StoreError, Ticket};
use crate::{
    protocol::{classify, Claim},
    record::{Record, StoredResponse},
    scope::RecordKey,
};

const SHARDS: usize = 32;
/// A shard sweeps its expired records once every this many inserts, so memory stays bounded by
/// the live records without a background task.
const SWEEP_EVERY: u32 = 1024;

/// An in-process store with expiring records.
///
/// Records live in this process only: two app instances do not share them, and a restart forgets
/// them. Use [`RedisStore`](crate::RedisStore) for anything that runs more than one process.
#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
}

#[derive(Debug, Default)]
struct Shard {
    records: HashMap<RecordKey, Entry>,
    inserts: u32,
}

#[derive(Debug)]
struct Entry {
    record: Record,
    expires_at: Instant,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    /// The number of live (unexpired) records.
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.shards
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
        self.shards
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
        let i = (u64::from_le_bytes(tail) % self.shards.len() as u64) as usize;
        lock(&self.shards[i])
    }

    /// Runs `f` on the live record owned by `ticket`, if it is still owned.
    fn with_owned(
        &self,
        ticket: &Ticket,
        f: impl FnOnce(&mut HashMap<RecordKey, Entry>, Instant),
    ) -> Ownership {
        let now = Instant::now();
        let mut shard = self.shard(ticket.key());
        let owned = matches!(
            shard.records.get(ticket.key()),
            Some(Entry { record: Record::Pending { fingerprint, token }, expires_at })
                if *expires_at > now && fingerprint == ticket.fingerprint() && token == ticket.token()
        );
        if owned {
            f(&mut shard.records, now);
            Ownership::Held
        } else {
            Ownership::Lost
        }
    }
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while holding the lock leaves a consistent map (every mutation is a single insert or
    // remove), so a poisoned lock is safe to keep using.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn claim(&self, ticket: &Ticket, lease: Duration) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(ticket.key());
        if let Some(entry) = shard.records.get(ticket.key()) {
            if entry.expires_at > now {
                return Ok(classify(
                    entry.record.clone(),
                    ticket,
                    entry.expires_at - now,
                ));
            }
        }
        shard.records.insert(
            *ticket.key(),
            Entry {
                record: Record::Pending {
                    fingerprint: *ticket.fingerprint(),
                    token: *ticket.token(),
                },
                expires_at: now + lease,
            },
        );
        shard.inserts = shard.inserts.wrapping_add(1);
        if shard.inserts.is_multiple_of(SWEEP_EVERY) {
            shard.records.retain(|_, e| e.expires_at > now);
        }
        Ok(Claim::Acquired)
    }

    async fn renew(&self, ticket: &Ticket, lease: Duration) -> Result<Ownership, StoreError> {
        Ok(self.with_owned(ticket, |records, now| {
            if let Some(e) = records.get_mut(ticket.key()) {
                e.expires_at = now + lease;
            }
        }))
    }

    async fn complete(
        &self,
        ticket: &Ticket,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<Ownership, StoreError> {
        Ok(self.with_owned(ticket, |records, now| {
            records.insert(
                *ticket.key(),
                Entry {
                    record: Record::Completed {
                        fingerprint: *ticket.fingerprint(),
                        response: response.clone(),
                    },
                    expires_at: now + ttl,
                },
            );
        }))
    }

    async fn release(&self, ticket: &Ticket) -> Result<Ownership, StoreError> {
        Ok(self.with_owned(ticket, |records, _| {
            records.remove(ticket.key());
        }))
    }
}
