//! Metrics, through the [`metrics`] facade: idem emits, the application installs a recorder (an
//! exporter) or none. Every name and label value is a `&'static str`; labels are the handler's
//! name, the outcome, the store operation and the store's [`Store::kind`], never a key or a scope.
//!
//! The README's table lists every metric; each is described (unit and sentence) once, on the first
//! emission, so that a recorder installed before the first request knows them all.
//!
//! [`Store::kind`]: crate::Store::kind

use std::{
    cell::RefCell,
    future::Future,
    sync::Once,
    time::{Duration, Instant},
};

use metrics::{
    counter, describe_counter, describe_histogram, histogram, Key, Label, Level, Metadata, Unit,
};

use crate::{lifecycle::Outcome, store::StoreError};

const REQUESTS: &str = "idem_requests_total";
const STORE_SECONDS: &str = "idem_store_operation_seconds";
const WAIT_SECONDS: &str = "idem_wait_seconds";
const RENEWALS: &str = "idem_lease_renewals_total";
const LEASES_LOST: &str = "idem_leases_lost_total";
const STORE_ERRORS: &str = "idem_store_errors_total";
const TOO_LARGE: &str = "idem_responses_too_large_total";
const SWEPT: &str = "idem_swept_records_total";
const STEPS: &str = "idem_steps_total";

/// How one journaled step ended: the `outcome` label of `idem_steps_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StepOutcome {
    /// The step ran (and its result was journaled, in an execution that holds a record).
    Ran,
    /// The step was answered from the journal without running.
    Replayed,
    /// The step ran and failed; its error was not journaled.
    Failed,
    /// The step ran, but its journal write was refused: the lease was lost.
    Refused,
    /// The step ran, but its result is over the journal's limits: not journaled.
    TooLarge,
    /// The journal could not be read or written: the store failed.
    StoreError,
}

impl StepOutcome {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Ran => "ran",
            Self::Replayed => "replayed",
            Self::Failed => "failed",
            Self::Refused => "refused",
            Self::TooLarge => "too_large",
            Self::StoreError => "store_error",
        }
    }
}

/// A store operation: the `op` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Claim,
    Renew,
    Complete,
    Release,
    /// Reading a request's journal of steps.
    LoadSteps,
    /// Writing one step's result to the journal.
    RecordStep,
}

impl Op {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Claim => "claim",
            Self::Renew => "renew",
            Self::Complete => "complete",
            Self::Release => "release",
            Self::LoadSteps => "load_steps",
            Self::RecordStep => "record_step",
        }
    }
}

fn describe() {
    static DESCRIBED: Once = Once::new();
    DESCRIBED.call_once(|| {
        describe_counter!(
            REQUESTS,
            Unit::Count,
            "Idempotent requests, by handler and outcome (executed, replayed, mismatch, in_flight, ...)."
        );
        describe_histogram!(
            STORE_SECONDS,
            Unit::Seconds,
            "Latency of idempotency store operations (claim, renew, complete, release), by store."
        );
        describe_histogram!(
            WAIT_SECONDS,
            Unit::Seconds,
            "Time a duplicate of an in-flight request spent waiting for its response (`wait`)."
        );
        describe_counter!(
            RENEWALS,
            Unit::Count,
            "Leases renewed while a slow handler ran, by handler."
        );
        describe_counter!(
            LEASES_LOST,
            Unit::Count,
            "Fenced store operations refused because the request no longer owned its key, by handler and operation."
        );
        describe_counter!(
            STORE_ERRORS,
            Unit::Count,
            "Idempotency store operations that failed or timed out, by operation and store."
        );
        describe_counter!(
            TOO_LARGE,
            Unit::Count,
            "Responses sent but not stored because they were larger than max_response, by handler."
        );
        describe_counter!(
            SWEPT,
            Unit::Count,
            "Expired records deleted by a store's sweeper, by store."
        );
        describe_counter!(
            STEPS,
            Unit::Count,
            "Journaled steps (Steps::run), by handler and outcome (ran, replayed, failed, refused: the lease was lost, too_large, store_error)."
        );
    });
}

/// Counts one idempotent request's final outcome.
/// What the `metrics` macros would give the recorder.
static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

type Labels = [(&'static str, &'static str); 2];

thread_local! {
    /// The keys of the per-request metrics, built once per thread and label set (handlers ×
    /// outcomes, operations × stores: a small, bounded set). The macros would allocate the
    /// labels and hash the key again on every emission; the recorder is still asked for the
    /// metric each time, so a recorder installed at any moment sees every emission after it.
    static KEYS: RefCell<Vec<(&'static str, Labels, Key)>> = const { RefCell::new(Vec::new()) };
}

fn same(a: &'static str, b: &'static str) -> bool {
    std::ptr::eq(a, b) || a == b
}

/// Runs `f` with the key of `name` and `labels`, built on the first use in this thread.
fn with_key<T>(name: &'static str, labels: Labels, f: impl FnOnce(&Key) -> T) -> T {
    KEYS.with(|keys| {
        let mut keys = keys.borrow_mut();
        let found = keys.iter().position(|(n, l, _)| {
            same(n, name)
                && same(l[0].0, labels[0].0)
                && same(l[0].1, labels[0].1)
                && same(l[1].0, labels[1].0)
                && same(l[1].1, labels[1].1)
        });
        let i = found.unwrap_or_else(|| {
            let key = Key::from_parts(
                name,
                labels
                    .iter()
                    .map(|(k, v)| Label::from_static_parts(k, v))
                    .collect::<Vec<_>>(),
            );
            keys.push((name, labels, key));
            keys.len() - 1
        });
        f(&keys[i].2)
    })
}

fn increment(name: &'static str, labels: Labels) {
    with_key(name, labels, |key| {
        metrics::with_recorder(|r| r.register_counter(key, &METADATA)).increment(1);
    });
}

pub(crate) fn request(handler: &'static str, outcome: Outcome) {
    describe();
    increment(
        REQUESTS,
        [("handler", handler), ("outcome", outcome.as_str())],
    );
}

/// Runs one store operation, recording its latency, and counting it when it fails.
pub(crate) async fn timed<T>(
    op: Op,
    store: &'static str,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    describe();
    let started = Instant::now();
    let result = call.await;
    let seconds = started.elapsed().as_secs_f64();
    let labels = [("op", op.as_str()), ("store", store)];
    with_key(STORE_SECONDS, labels, |key| {
        metrics::with_recorder(|r| r.register_histogram(key, &METADATA)).record(seconds);
    });
    if result.is_err() {
        increment(STORE_ERRORS, labels);
    }
    result
}

/// Records how long a duplicate waited for an in-flight request.
pub(crate) fn waited(handler: &'static str, took: Duration) {
    describe();
    histogram!(WAIT_SECONDS, "handler" => handler).record(took.as_secs_f64());
}

/// Counts one lease renewed.
pub(crate) fn renewed(handler: &'static str) {
    describe();
    counter!(RENEWALS, "handler" => handler).increment(1);
}

/// Counts one fenced operation the store refused: the lease was lost.
pub(crate) fn lease_lost(handler: &'static str, op: Op) {
    describe();
    counter!(LEASES_LOST, "handler" => handler, "op" => op.as_str()).increment(1);
}

/// Counts one response too large to store.
pub(crate) fn too_large(handler: &'static str) {
    describe();
    counter!(TOO_LARGE, "handler" => handler).increment(1);
}

/// Counts one step by how it ended.
pub(crate) fn step(handler: &'static str, outcome: StepOutcome) {
    describe();
    increment(STEPS, [("handler", handler), ("outcome", outcome.as_str())]);
}

/// Counts the records a sweep deleted.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn swept(store: &'static str, records: u64) {
    describe();
    counter!(SWEPT, "store" => store).increment(records);
}

#[cfg(test)]
mod tests {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;

    /// Every helper emits under its documented name and labels, through a recorder local to the
    /// test.
    #[test]
    fn names_and_labels() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            request("pay", Outcome::Replayed);
            request("pay", Outcome::Replayed);
            renewed("pay");
            lease_lost("pay", Op::Complete);
            too_large("pay");
            swept("postgres", 7);
            waited("pay", Duration::from_millis(20));
            step("pay", StepOutcome::Replayed);
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let _ = timed(Op::Claim, "memory", async { Ok::<_, StoreError>(()) }).await;
                let _ = timed(Op::Release, "memory", async {
                    Err::<(), _>(StoreError::Timeout(Duration::from_millis(1)))
                })
                .await;
            });
        });
        let snapshot = snapshotter.snapshot().into_vec();
        let find = |name: &str, labels: &[(&str, &str)]| {
            snapshot
                .iter()
                .find(|(key, _, _, _)| {
                    let key = key.key();
                    key.name() == name
                        && labels
                            .iter()
                            .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v))
                })
                .map(|(_, _, _, value)| value)
                .unwrap_or_else(|| panic!("{name} {labels:?} in {snapshot:?}"))
        };
        assert_eq!(
            find(REQUESTS, &[("handler", "pay"), ("outcome", "replayed")]),
            &DebugValue::Counter(2)
        );
        assert_eq!(
            find(RENEWALS, &[("handler", "pay")]),
            &DebugValue::Counter(1)
        );
        assert_eq!(
            find(LEASES_LOST, &[("handler", "pay"), ("op", "complete")]),
            &DebugValue::Counter(1)
        );
        assert_eq!(
            find(STEPS, &[("handler", "pay"), ("outcome", "replayed")]),
            &DebugValue::Counter(1)
        );
        assert_eq!(
            find(TOO_LARGE, &[("handler", "pay")]),
            &DebugValue::Counter(1)
        );
        assert_eq!(
            find(SWEPT, &[("store", "postgres")]),
            &DebugValue::Counter(7)
        );
        assert!(matches!(
            find(WAIT_SECONDS, &[("handler", "pay")]),
            DebugValue::Histogram(v) if v.len() == 1
        ));
        assert!(matches!(
            find(STORE_SECONDS, &[("op", "claim"), ("store", "memory")]),
            DebugValue::Histogram(v) if v.len() == 1
        ));
        assert_eq!(
            find(STORE_ERRORS, &[("op", "release"), ("store", "memory")]),
            &DebugValue::Counter(1)
        );
    }
}
