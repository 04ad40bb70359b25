//! Duplicates of one in-flight request, waiting in this process (`wait = "..."`), share one poll
//! of the store, and wake at once when the request completes here.
//!
//! Without it, each waiter polled the store on its own backoff: 200 waiters on one key made
//! ~9,100 claims in 5 s. Now a waiter re-claims only when no other waiter of the same record has
//! asked within [`POLL_INTERVAL`], and otherwise reads the answer that one got: the store sees at
//! most one claim per key per `POLL_INTERVAL` per process from the waiters (plus the one claim each
//! request makes when it arrives). When the owner runs in this process, its settle wakes every
//! waiter at once ([`Waiters::settled`]), so they replay without waiting for a poll.

use std::{
    collections::{hash_map::Entry, HashMap},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, PoisonError, Weak,
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use crate::{fingerprint::Fingerprint, protocol::Claim, scope::RecordKey};

/// How long one waiter's answer from the store serves the others of the same record: at most a
/// few claims per second per key per process, and a cross-process completion is seen within it.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(250);

type GroupKey = (RecordKey, Fingerprint);

/// How many locks the records running here are spread over, so that the workers' executed
/// requests rarely meet on one.
const RUNNING_SHARDS: usize = 16;

/// The waiting groups of one app configuration (one store), and the records whose handler runs
/// in this process.
#[derive(Default)]
pub(crate) struct Waiters {
    groups: Mutex<HashMap<GroupKey, Weak<Group>>>,
    /// How many groups the map holds: every executed request tells the waiters it settled, and
    /// with nobody waiting (the usual case) that costs one atomic load, not a lock and a lookup.
    live: AtomicUsize,
    /// The records whose handler runs in this process, and how many runs each (two, when a run
    /// lost its lease and a retry here took the key over). A 409 for one of them can count on
    /// the handler's typical run time; for any other record the owner is another instance, or
    /// gone (a crash), and only the lease's remaining time is an honest `Retry-After`.
    running: [Mutex<HashMap<RecordKey, u32>>; RUNNING_SHARDS],
}

/// A record's handler running in this process, from its claim until it settles (or its task is
/// dropped: a shutdown that cut it).
pub(crate) struct RunningHere {
    waiters: Arc<Waiters>,
    key: RecordKey,
}

impl Drop for RunningHere {
    fn drop(&mut self) {
        let mut running = self.waiters.running_shard(&self.key);
        if let Entry::Occupied(mut e) = running.entry(self.key) {
            if *e.get() <= 1 {
                e.remove();
            } else {
                *e.get_mut() -= 1;
            }
        }
    }
}

/// The waiters of one record (and fingerprint).
#[derive(Default)]
pub(crate) struct Group {
    /// The last answer a waiter got from the store, and when. Held across a claim, so that the
    /// waiters that wake meanwhile wait for that answer instead of asking again.
    last: tokio::sync::Mutex<Option<(Instant, Claim)>>,
    /// Woken when the record settles in this process.
    settled: Notify,
}

/// One waiter's place in its group; leaving the last place removes the group.
pub(crate) struct Membership<'a> {
    waiters: &'a Waiters,
    key: GroupKey,
    group: Arc<Group>,
}

impl Waiters {
    fn groups(&self) -> std::sync::MutexGuard<'_, HashMap<GroupKey, Weak<Group>>> {
        self.groups.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Joins the waiters of `key` (with `fingerprint`).
    pub(crate) fn join(&self, key: RecordKey, fingerprint: Fingerprint) -> Membership<'_> {
        let id = (key, fingerprint);
        let mut groups = self.groups();
        let group = match groups.entry(id) {
            Entry::Occupied(mut e) => match e.get().upgrade() {
                Some(group) => group,
                None => {
                    let group = Arc::new(Group::default());
                    e.insert(Arc::downgrade(&group));
                    group
                }
            },
            Entry::Vacant(e) => {
                let group = Arc::new(Group::default());
                e.insert(Arc::downgrade(&group));
                self.live.fetch_add(1, Ordering::Relaxed);
                group
            }
        };
        Membership {
            waiters: self,
            key: id,
            group,
        }
    }

    fn running_shard(&self, key: &RecordKey) -> std::sync::MutexGuard<'_, HashMap<RecordKey, u32>> {
        self.running[usize::from(key.as_bytes()[0]) % RUNNING_SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts `key`'s handler as running in this process until the guard drops.
    pub(crate) fn run_here(self: &Arc<Self>, key: RecordKey) -> RunningHere {
        *self.running_shard(&key).entry(key).or_insert(0) += 1;
        RunningHere {
            waiters: Arc::clone(self),
            key,
        }
    }

    /// Whether `key`'s handler runs in this process.
    pub(crate) fn runs_here(&self, key: &RecordKey) -> bool {
        self.running_shard(key).contains_key(key)
    }

    /// The record settled in this process (completed or released): wake its waiters, and forget
    /// the answer they shared, so that the next one asks the store.
    pub(crate) fn settled(&self, key: RecordKey, fingerprint: Fingerprint) {
        if self.live.load(Ordering::Relaxed) == 0 {
            return;
        }
        let group = self
            .groups()
            .get(&(key, fingerprint))
            .and_then(Weak::upgrade);
        if let Some(group) = group {
            if let Ok(mut last) = group.last.try_lock() {
                *last = None;
            }
            group.settled.notify_waiters();
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.groups().len()
    }
}

impl Membership<'_> {
    /// Sleeps until `until`, or until the record settles in this process.
    pub(crate) async fn pause(&self, until: Instant) {
        tokio::select! {
            () = tokio::time::sleep_until(until) => {}
            () = self.group.settled.notified() => {}
        }
    }

    /// The store's answer for this record: the one another waiter got within [`POLL_INTERVAL`],
    /// or a fresh one from `claim`. `Acquired` is this waiter's own (its token) and never shared.
    pub(crate) async fn poll<E, F>(&self, claim: F) -> Result<Claim, E>
    where
        F: std::future::Future<Output = Result<Claim, E>>,
    {
        let mut last = self.group.last.lock().await;
        if let Some((at, answer)) = last.as_ref() {
            if at.elapsed() < POLL_INTERVAL {
                return Ok(answer.clone());
            }
        }
        let answer = claim.await?;
        *last = match answer {
            Claim::Acquired => None,
            ref shared => Some((Instant::now(), shared.clone())),
        };
        Ok(answer)
    }
}

impl Drop for Membership<'_> {
    fn drop(&mut self) {
        let mut groups = self.waiters.groups();
        // This place and the map's weak reference: the group dies with the last place.
        if Arc::strong_count(&self.group) == 1 {
            if let Entry::Occupied(e) = groups.entry(self.key) {
                if Weak::ptr_eq(e.get(), &Arc::downgrade(&self.group)) {
                    e.remove();
                    self.waiters.live.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_runs_here_until_its_last_run_settles() {
        let waiters = Arc::new(Waiters::default());
        let (a, b) = (
            RecordKey::from_bytes([1; 32]),
            RecordKey::from_bytes([2; 32]),
        );
        assert!(!waiters.runs_here(&a));
        let first = waiters.run_here(a);
        let second = waiters.run_here(a);
        assert!(waiters.runs_here(&a));
        assert!(!waiters.runs_here(&b));
        drop(first);
        assert!(waiters.runs_here(&a), "one run of it still runs");
        drop(second);
        assert!(!waiters.runs_here(&a));
    }
}
