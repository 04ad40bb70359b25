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

/// The waiting groups of one app configuration (one store).
#[derive(Default)]
pub(crate) struct Waiters {
    groups: Mutex<HashMap<GroupKey, Weak<Group>>>,
    /// How many groups the map holds: every executed request tells the waiters it settled, and
    /// with nobody waiting (the usual case) that costs one atomic load, not a lock and a lookup.
    live: AtomicUsize,
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
