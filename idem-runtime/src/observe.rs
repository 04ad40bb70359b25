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
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex, Once,
    },
    time::{Duration, Instant},
};

use metrics::{
    counter, describe_counter, describe_histogram, histogram, Counter, Histogram, Key, Label,
    Level, Metadata, Recorder, Unit,
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
    /// A handler's transaction beginning (transactional mode): waiting for a connection and
    /// `BEGIN`.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Begin,
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
            Self::Begin => "begin",
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
            "Latency of idempotency store operations (claim, renew, complete, release; begin for a transactional handler), by store."
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

/// What the `metrics` macros would give the recorder.
static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

type Labels = [(&'static str, &'static str); 2];

/// A handle registered with the global recorder, and when.
enum Kept {
    Counter(Counter, Instant),
    Histogram(Histogram, Instant),
}

/// One per-request metric of one thread: its key, and its handle once registered with the
/// global recorder.
struct Metric {
    name: &'static str,
    labels: Labels,
    key: Key,
    kept: Option<Kept>,
}

/// A thread's per-request metrics (handlers × outcomes, operations × stores: a small, bounded
/// set), and the address of the recorder their handles belong to.
struct Metrics {
    recorder: usize,
    metrics: Vec<Metric>,
}

thread_local! {
    /// The macros would allocate the labels, hash the key and ask the recorder for the metric at
    /// every emission (a lookup in its registry, about half of what an emission costs with the
    /// Prometheus exporter): here the key is built once per thread, and the handle is kept once
    /// the recorder is known to be the global one.
    static METRICS: RefCell<Metrics> = const {
        RefCell::new(Metrics { recorder: 0, metrics: Vec::new() })
    };
}

/// The address of the recorder that a thread without a local recorder sees: the global one once
/// installed, else the no-op one; 0 until the first probe. Either lives as long as the process
/// (a global recorder is never dropped), so no other recorder can ever have its address, and
/// handles registered with it stay valid. A local recorder (`metrics::with_local_recorder`,
/// usually a test's) is asked at every emission: one dropped and another made at its address
/// must not receive the first one's handles.
static GLOBAL: AtomicUsize = AtomicUsize::new(0);

/// When the last probe for [`GLOBAL`] started: at most one a second, and only while emissions
/// meet a recorder other than the one known.
static PROBED: Mutex<Option<Instant>> = Mutex::new(None);

const PROBE_EVERY: Duration = Duration::from_secs(1);

/// How long a kept handle is used before the recorder is asked again. A recorder may delete a
/// metric that was not updated for a while (the Prometheus exporter's `idle_timeout`), and a
/// handle kept past that would update the deleted one: asked again at least this often, a handle
/// is never older than an idle timeout of a second or more.
const KEEP_FOR: Duration = Duration::from_secs(1);

fn address(recorder: &dyn Recorder) -> usize {
    std::ptr::from_ref(recorder).cast::<()>().addr()
}

/// Learns [`GLOBAL`] from a new thread, which has no local recorder, and answers it. Waits for
/// that thread (tens of microseconds, at most once a second, and only while emissions meet a
/// recorder other than the one known: a newly installed global one, or a local one).
fn probe() -> usize {
    let known = GLOBAL.load(Ordering::Relaxed);
    let Ok(mut probed) = PROBED.try_lock() else {
        return known;
    };
    if probed.is_some_and(|at| at.elapsed() < PROBE_EVERY) {
        return known;
    }
    *probed = Some(Instant::now());
    // A thread that cannot start leaves the cache off: every emission asks the recorder.
    let Ok(global) = std::thread::Builder::new()
        .name("idem-metrics-probe".into())
        .spawn(|| metrics::with_recorder(address))
        .map_err(drop)
        .and_then(|probe| probe.join().map_err(drop))
    else {
        return known;
    };
    GLOBAL.store(global, Ordering::Relaxed);
    global
}

fn same(a: &'static str, b: &'static str) -> bool {
    std::ptr::eq(a, b) || a == b
}

fn new_key(name: &'static str, labels: Labels) -> Key {
    // Retained: its labels shared (an `Arc`), so that a recorder's `to_retained` (the Prometheus
    // one calls it at every registration) clones a pointer, not the labels.
    Key::from_parts(
        name,
        labels
            .iter()
            .map(|(k, v)| Label::from_static_parts(k, v))
            .collect::<Vec<_>>(),
    )
    .to_retained()
}

/// What one emission records.
#[derive(Clone, Copy)]
enum Value {
    Count(u64),
    Seconds(f64),
}

impl Value {
    /// Asks `recorder` for the metric and records into it, keeping the handle in `kept`, if
    /// given.
    fn register(
        self,
        recorder: &dyn Recorder,
        key: &Key,
        kept: Option<(&mut Option<Kept>, Instant)>,
    ) {
        match self {
            Self::Count(n) => {
                let counter = recorder.register_counter(key, &METADATA);
                counter.increment(n);
                if let Some((kept, now)) = kept {
                    *kept = Some(Kept::Counter(counter, now));
                }
            }
            Self::Seconds(s) => {
                let histogram = recorder.register_histogram(key, &METADATA);
                histogram.record(s);
                if let Some((kept, now)) = kept {
                    *kept = Some(Kept::Histogram(histogram, now));
                }
            }
        }
    }

    /// Records through the kept handle; false when there is none of this kind, or it is too old.
    fn record(self, kept: Option<&Kept>, now: Instant) -> bool {
        let young = |at: &Instant| now.saturating_duration_since(*at) < KEEP_FOR;
        match (self, kept) {
            (Self::Count(n), Some(Kept::Counter(counter, at))) if young(at) => counter.increment(n),
            (Self::Seconds(s), Some(Kept::Histogram(histogram, at))) if young(at) => {
                histogram.record(s);
            }
            _ => return false,
        }
        true
    }
}

/// Records `value` under `name` and `labels` with the recorder in effect: through the handle
/// kept for it when it is the global recorder, else by asking it for the metric. `now` is a
/// moment of this emission (the caller's, when it has one).
fn emit(name: &'static str, labels: Labels, value: Value, now: Instant) {
    metrics::with_recorder(|recorder| {
        let at = address(recorder);
        let keep = at == GLOBAL.load(Ordering::Relaxed) || at == probe();
        let cached = METRICS.try_with(|metrics| {
            let Ok(mut metrics) = metrics.try_borrow_mut() else {
                // Re-entered (a recorder that emits idem's metrics while registering one).
                return value.register(recorder, &new_key(name, labels), None);
            };
            let metrics = &mut *metrics;
            if keep && metrics.recorder != at {
                // The global recorder was learned anew (installed after a probe saw the no-op one).
                for m in &mut metrics.metrics {
                    m.kept = None;
                }
                metrics.recorder = at;
            }
            let found = metrics.metrics.iter().position(|m| {
                same(m.name, name)
                    && same(m.labels[0].0, labels[0].0)
                    && same(m.labels[0].1, labels[0].1)
                    && same(m.labels[1].0, labels[1].0)
                    && same(m.labels[1].1, labels[1].1)
            });
            let i = found.unwrap_or_else(|| {
                metrics.metrics.push(Metric {
                    name,
                    labels,
                    key: new_key(name, labels),
                    kept: None,
                });
                metrics.metrics.len() - 1
            });
            let metric = &mut metrics.metrics[i];
            if !keep {
                value.register(recorder, &metric.key, None);
            } else if !value.record(metric.kept.as_ref(), now) {
                value.register(recorder, &metric.key, Some((&mut metric.kept, now)));
            }
        });
        if cached.is_err() {
            // The thread is ending and its metrics are gone (a request finished by a
            // thread-local's destructor): asked of the recorder, not lost.
            value.register(recorder, &new_key(name, labels), None);
        }
    });
}

fn increment(name: &'static str, labels: Labels) {
    emit(name, labels, Value::Count(1), Instant::now());
}

/// Counts one idempotent request's final outcome.
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
    let ended = Instant::now();
    let seconds = ended.saturating_duration_since(started).as_secs_f64();
    let labels = [("op", op.as_str()), ("store", store)];
    emit(STORE_SECONDS, labels, Value::Seconds(seconds), ended);
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
    use std::sync::{atomic::AtomicU64, Arc};

    use metrics::{KeyName, SharedString};
    use metrics_util::{
        debugging::{DebugValue, DebuggingRecorder, Snapshotter},
        CompositeKey,
    };

    use super::*;

    type Snapshot = Vec<(CompositeKey, Option<Unit>, Option<SharedString>, DebugValue)>;

    /// The value of the metric `name` with `labels` in a snapshot.
    fn value_of<'a>(
        snapshot: &'a Snapshot,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Option<&'a DebugValue> {
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
    }

    /// The value of the counter `name` with `labels` now; 0 when it was never emitted.
    fn counted(snapshotter: &Snapshotter, name: &str, labels: &[(&str, &str)]) -> u64 {
        match value_of(&snapshotter.snapshot().into_vec(), name, labels) {
            None => 0,
            Some(DebugValue::Counter(n)) => *n,
            Some(other) => panic!("{name} is not a counter: {other:?}"),
        }
    }

    /// Recorders made one after another at one address (a test's recorder, made anew in a loop
    /// or a helper) each see their own emissions: none gets a handle of the one before.
    #[test]
    fn a_local_recorder_at_an_earlier_ones_address_gets_its_own_metrics() {
        let mut addresses = Vec::new();
        for round in 1..=3u64 {
            let recorder = DebuggingRecorder::new();
            addresses.push(address(&recorder));
            metrics::with_local_recorder(&recorder, || {
                for _ in 0..round {
                    request("local-pay", Outcome::Executed);
                }
            });
            let labels = [("handler", "local-pay"), ("outcome", "executed")];
            assert_eq!(
                counted(&recorder.snapshotter(), REQUESTS, &labels),
                round,
                "round {round}"
            );
        }
        // The premise: the loop's recorder lives at one address, so a cache keyed by the
        // recorder's address alone would have served the first one's handles to the others.
        assert!(addresses.windows(2).any(|w| w[0] == w[1]), "{addresses:x?}");
    }

    /// A recorder that counts the registrations of this test's metrics.
    struct Registrations {
        inner: DebuggingRecorder,
        counters: Arc<AtomicU64>,
        histograms: Arc<AtomicU64>,
    }

    impl Registrations {
        fn mine(key: &Key) -> bool {
            key.labels()
                .any(|l| l.value() == "global-pay" || l.value() == "global-store")
        }
    }

    impl Recorder for Registrations {
        fn describe_counter(&self, key: KeyName, unit: Option<Unit>, text: SharedString) {
            self.inner.describe_counter(key, unit, text);
        }
        fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, text: SharedString) {
            self.inner.describe_gauge(key, unit, text);
        }
        fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, text: SharedString) {
            self.inner.describe_histogram(key, unit, text);
        }
        fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
            if Self::mine(key) {
                self.counters.fetch_add(1, Ordering::Relaxed);
            }
            self.inner.register_counter(key, metadata)
        }
        fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> metrics::Gauge {
            self.inner.register_gauge(key, metadata)
        }
        fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
            if Self::mine(key) {
                self.histograms.fetch_add(1, Ordering::Relaxed);
            }
            self.inner.register_histogram(key, metadata)
        }
    }

    /// With the global recorder (the only test of this binary that installs one), a thread asks
    /// it for each metric once and then records through the handle it kept; every emission is
    /// recorded, from every thread, and a local recorder on top of it still gets its own.
    #[test]
    fn the_global_recorders_handles_are_kept_per_thread() {
        let inner = DebuggingRecorder::new();
        let snapshotter = inner.snapshotter();
        let counters = Arc::new(AtomicU64::new(0));
        let histograms = Arc::new(AtomicU64::new(0));
        metrics::set_global_recorder(Registrations {
            inner,
            counters: Arc::clone(&counters),
            histograms: Arc::clone(&histograms),
        })
        .expect("no other test of this binary installs a global recorder");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let emit_many = |n: u64| {
            for _ in 0..n {
                request("global-pay", Outcome::Executed);
                let timed = timed(Op::Claim, "global-store", async { Ok::<_, StoreError>(()) });
                let _ = runtime.block_on(timed);
            }
        };
        // Until a probe (at most one a second) has learned the new global recorder, emissions ask
        // it every time.
        let started = Instant::now();
        let mut emitted = 0;
        while GLOBAL.load(Ordering::Relaxed) != metrics::with_recorder(address) {
            assert!(started.elapsed() < Duration::from_secs(10), "no probe");
            emit_many(1);
            emitted += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        emit_many(1);
        let before = (
            counters.load(Ordering::Relaxed),
            histograms.load(Ordering::Relaxed),
        );
        let busy = Instant::now();
        emit_many(1_000);
        let others: Vec<_> = (0..2)
            .map(|_| {
                std::thread::spawn(|| {
                    for _ in 0..500 {
                        request("global-pay", Outcome::Executed);
                    }
                })
            })
            .collect();
        for other in others {
            other.join().expect("an emitting thread");
        }
        // Each thread asks once per metric, and again each time its handle is [`KEEP_FOR`] old:
        // a handful, for 2,000 counts and 1,000 latencies.
        let seconds = busy.elapsed().as_secs();
        let counter_registrations = counters.load(Ordering::Relaxed) - before.0;
        let histogram_registrations = histograms.load(Ordering::Relaxed) - before.1;
        assert!(
            (2..=2 + 3 * seconds).contains(&counter_registrations)
                && histogram_registrations <= seconds,
            "{counter_registrations} counter and {histogram_registrations} histogram \
             registrations in {seconds} s"
        );
        // A handle older than KEEP_FOR is asked for again (a recorder may have deleted an idle
        // metric), and the count still goes on from where it was.
        std::thread::sleep(KEEP_FOR + Duration::from_millis(100));
        let before = counters.load(Ordering::Relaxed);
        request("global-pay", Outcome::Executed);
        request("global-pay", Outcome::Executed);
        assert_eq!(counters.load(Ordering::Relaxed) - before, 1);
        assert_eq!(
            counted(
                &snapshotter,
                REQUESTS,
                &[("handler", "global-pay"), ("outcome", "executed")]
            ),
            emitted + 1 + 2_000 + 2
        );
        // A local recorder over the global one gets its own emission, and the global one none.
        let local = DebuggingRecorder::new();
        metrics::with_local_recorder(&local, || request("global-pay", Outcome::Replayed));
        let replayed = [("handler", "global-pay"), ("outcome", "replayed")];
        assert_eq!(counted(&local.snapshotter(), REQUESTS, &replayed), 1);
        assert_eq!(counted(&snapshotter, REQUESTS, &replayed), 0);

        // A request that ends in a thread-local's destructor, after the thread's own metrics
        // are gone (destructors run in the reverse order of the first uses), is still counted.
        struct EndsLate;
        impl Drop for EndsLate {
            fn drop(&mut self) {
                request("global-pay", Outcome::InFlight);
            }
        }
        thread_local! {
            static ENDS_LATE: RefCell<Option<EndsLate>> = const { RefCell::new(None) };
        }
        std::thread::spawn(|| {
            ENDS_LATE.with(|late| *late.borrow_mut() = Some(EndsLate));
            request("global-pay", Outcome::InFlight);
        })
        .join()
        .expect("a thread whose last request ends as it exits");
        let in_flight = [("handler", "global-pay"), ("outcome", "in_flight")];
        assert_eq!(counted(&snapshotter, REQUESTS, &in_flight), 2);
    }

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
            value_of(&snapshot, name, labels)
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
