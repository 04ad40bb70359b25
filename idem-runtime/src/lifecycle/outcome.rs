//! What the lifecycle reports: the outcome of each request (the span's `outcome` field), and how
//! long a handler typically runs (the hint of a 409's `Retry-After`).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// What happened to one idempotent request: the value of the `outcome` field of its span. One
/// place names every outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The handler ran and its response was stored (or the store refused it; see the logs).
    Executed,
    /// The handler ran and its key was released: the policy does not store its response, or the
    /// response could not be stored (too large, a failed body).
    ExecutedReleased,
    /// The handler panicked; its key was released.
    Panicked,
    /// The handler ran in a database transaction that was rolled back because its record could
    /// not be completed in it (the lease was lost, or the completion or the commit failed): its
    /// writes are undone, its response is replaced by a 503.
    RolledBack,
    /// A stored response was replayed.
    Replayed,
    /// The key was used before for a different request: 422.
    Mismatch,
    /// The same request is in flight: 409.
    InFlight,
    /// No key, and the handler requires one: 400.
    MissingKey,
    /// No key: the handler ran without idempotency.
    NoKey,
    /// A malformed key: 400.
    InvalidKey,
    /// The scope extractor refused the request.
    ScopeRefused,
    /// The body is over the limit: 413.
    BodyTooLarge,
    /// The body could not be read: 400.
    BadBody,
    /// The store failed; the handler did not run: 503.
    StoreError,
    /// The process is shutting down (`idem::shutdown`); the handler did not run: 503.
    ShuttingDown,
    /// The store failed; the handler ran without idempotency (`fail_open`).
    StoreErrorFailOpen,
    /// The key's record was written by a newer release (a record format or a fingerprint
    /// encoding this one does not read); the handler did not run: 503.
    NewerRecord,
    /// The app is misconfigured (no store, no scope, invalid settings): 500.
    Misconfigured,
}

impl Outcome {
    /// The outcome's name in spans and logs.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Executed => "executed",
            Self::ExecutedReleased => "executed_released",
            Self::Panicked => "panicked",
            Self::RolledBack => "rolled_back",
            Self::Replayed => "replayed",
            Self::Mismatch => "mismatch",
            Self::InFlight => "in_flight",
            Self::MissingKey => "missing_key",
            Self::NoKey => "no_key",
            Self::InvalidKey => "invalid_key",
            Self::ScopeRefused => "scope_refused",
            Self::BodyTooLarge => "body_too_large",
            Self::BadBody => "bad_body",
            Self::StoreError => "store_error",
            Self::ShuttingDown => "shutting_down",
            Self::StoreErrorFailOpen => "store_error_fail_open",
            Self::NewerRecord => "newer_record",
            Self::Misconfigured => "misconfigured",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Outcome;

    /// Every outcome; `as_str` matches them all, so a new one fails to compile there first.
    const ALL: [Outcome; 18] = [
        Outcome::Executed,
        Outcome::ExecutedReleased,
        Outcome::Panicked,
        Outcome::RolledBack,
        Outcome::Replayed,
        Outcome::Mismatch,
        Outcome::InFlight,
        Outcome::MissingKey,
        Outcome::NoKey,
        Outcome::InvalidKey,
        Outcome::ScopeRefused,
        Outcome::BodyTooLarge,
        Outcome::BadBody,
        Outcome::StoreError,
        Outcome::ShuttingDown,
        Outcome::StoreErrorFailOpen,
        Outcome::NewerRecord,
        Outcome::Misconfigured,
    ];

    #[test]
    fn every_outcome_has_a_distinct_name() {
        let names: std::collections::HashSet<_> = ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(names.len(), ALL.len());
    }

    /// The README's metrics table lists every value of the `outcome` label, and nothing else.
    #[test]
    fn the_readme_names_every_outcome() {
        let readme = include_str!("../../../README.md");
        let row = readme
            .lines()
            .find(|l| l.starts_with("| `idem_requests_total` |"))
            .expect("the README's metrics table has a row for idem_requests_total");
        let what = row.split(" | ").nth(3).expect("the row's last column");
        let listed: Vec<&str> = what
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|name| name.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .collect();
        let mut known: Vec<&str> = ALL.iter().map(|o| o.as_str()).collect();
        let mut documented = listed.clone();
        known.sort_unstable();
        documented.sort_unstable();
        documented.dedup();
        assert_eq!(documented, known, "the README lists {listed:?}");
    }
}

/// The `Retry-After` of a 409 for a record whose handler runs in this process: how long this
/// handler typically runs (as this process observed it), at least 1 s, and never past the
/// in-flight lease's remaining time (after which a retry may run the handler itself). Without an
/// observation, 1 s. The lease's remaining time alone would tell a polite client to wait up to
/// the whole lease (30 s by default) for a handler that takes a fraction of a second. For a record
/// this process does not run (its owner is another instance, or crashed), the 409 says the
/// lease's remaining time instead: nothing here knows better.
pub(crate) fn retry_after_hint(lease_remaining: Duration, typical: Option<Duration>) -> Duration {
    const FLOOR: Duration = Duration::from_secs(1);
    typical
        .unwrap_or(FLOOR)
        .max(FLOOR)
        .min(lease_remaining.max(FLOOR))
}

/// How long a handler typically runs, observed in this process: a moving average (each run counts
/// for a fifth), kept in the handler's static settings. Concurrent updates may lose one another's
/// sample; a hint does not need more.
#[derive(Debug)]
pub struct HandlerTiming {
    /// Milliseconds, 0 before the first run.
    average_ms: AtomicU64,
}

impl HandlerTiming {
    /// No run observed yet.
    pub const fn new() -> Self {
        Self {
            average_ms: AtomicU64::new(0),
        }
    }

    /// Counts one run that took `took`.
    pub(crate) fn record(&self, took: Duration) {
        let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX).max(1);
        let old = self.average_ms.load(Ordering::Relaxed);
        let new = if old == 0 {
            ms
        } else {
            old.saturating_mul(4).saturating_add(ms) / 5
        };
        self.average_ms.store(new.max(1), Ordering::Relaxed);
    }

    /// The typical run time, once one run was observed.
    pub(crate) fn typical(&self) -> Option<Duration> {
        match self.average_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}

impl Default for HandlerTiming {
    fn default() -> Self {
        Self::new()
    }
}
