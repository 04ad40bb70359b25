//! Journaled steps: recovery points for the calls an `#[idempotent]` handler makes to other
//! systems, and the downstream key each step sends them.
//!
//! A [`Steps`] extractor is bound to one *execution* of a request (one claim that was
//! `Acquired`): the actix-web adapter puts an [`Execution`] in the request's extensions before
//! the handler runs. The first step loads the request's journal from the store (one read); each
//! step that runs writes its result, fenced by the owner token (one write); a step found in the
//! journal is answered from it without running. A replayed request never runs its handler, so it
//! costs the journal nothing.
//!
//! The journal's entries are encoded here (a version byte, then the outcome kind, then JSON), so
//! that every store holds the same opaque bytes (see [`Store::record_step`]).

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    fmt,
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use actix_web::{
    dev::Payload, http::StatusCode, FromRequest, HttpMessage as _, HttpRequest, HttpResponse,
    ResponseError,
};
use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::OnceCell;

mod key;

pub use self::key::DownstreamKey;
use crate::{
    lifecycle::{retry_fenced, FENCED_RETRY_LIMIT},
    observe::{self, Op, StepOutcome},
    problem::Problem,
    store::{Ownership, Store, StoreError, Ticket},
};

/// The version byte of a journal entry's encoding.
const ENTRY_V1: u8 = 1;
/// An entry's kind: the step's `Ok` output.
const KIND_OK: u8 = b'O';
/// An entry's kind: the step's `Err`, recorded as an outcome (`run_recorded`).
const KIND_ERR: u8 = b'E';

/// An actix-web extractor for an `#[idempotent]` handler: the request's journal of steps.
///
/// Wrap each call to another system (a card processor, an email, a broker) in a named step:
///
/// ```no_run
/// # use actix_web::HttpResponse;
/// # use idem_runtime::{Steps, StepError};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct Charge { id: String }
/// # #[derive(Debug, serde::Serialize, serde::Deserialize)] struct Decline;
/// # impl std::fmt::Display for Decline { fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str("declined") } }
/// # async fn charge(key: &str) -> Result<Charge, Decline> { unimplemented!() }
/// async fn create_payment(steps: Steps) -> Result<HttpResponse, actix_web::Error> {
///     // Runs once per request: a retry after a crash, a 5xx or a lost lease gets the journaled
///     // result back. The processor gets the step's downstream key as its Idempotency-Key.
///     let charge: Result<Charge, Decline> = steps
///         .run_recorded("charge", |key| async move { charge(key.as_str()).await })
///         .await?;
///     match charge {
///         Ok(charge) => Ok(HttpResponse::Created().body(charge.id)),
///         Err(_) => Ok(HttpResponse::PaymentRequired().finish()),
///     }
/// }
/// ```
///
/// - [`run`](Self::run) runs a step once per request: its `Ok` output is journaled under the
///   request's record, fenced by the owner token, **before** `run` returns it; a later execution
///   of the same request (same scope, key and fingerprint; after a crash, a cut deploy, a lost
///   lease, or a 5xx, 408, 429 or panic that released the key) gets the journaled output back
///   without running the step. An `Err` is not journaled: the step runs again next time.
/// - [`run_recorded`](Self::run_recorded) journals the step's `Err` too: an outcome (a
///   processor's decline), not a fault.
/// - Steps are found by name, so an execution that reaches them in another order still finds
///   each; one name twice in one execution is [`StepError::Misuse`], except after an outcome
///   that was not journaled (an `Err` from `run`, a store failure): the handler may retry it.
/// - The closure gets the step's [`DownstreamKey`]: send it to the other system as its
///   `Idempotency-Key`, so that a crash between its answer and the journal write is a replay on
///   its side.
///
/// **Store round trips.** The first step of an execution reads the journal (one read); each step
/// that runs writes its result (one fenced write, retried while the connection breaks, within
/// the lease); a step answered from the journal costs nothing more. A request replayed from a
/// completed record never runs its handler and never reads the journal.
///
/// **Lifetime.** The journal is kept beside the record, with the handler's ttl from its last
/// write: a release (a 5xx, 408, 429, panic) keeps it, so the retry resumes; a completion leaves
/// it to expire (a completed record is replayed without it). A request with another fingerprint
/// never sees it, and the first step of a new request under the same key replaces it.
///
/// **Limits.** An entry (the JSON of the output) is at most [`Steps::MAX_ENTRY`] bytes, a
/// request's journal at most [`Steps::MAX_JOURNAL`] (entries and names): past either, the step's
/// result is not journaled and `run` answers [`StepError::Misuse`] (never a silent drop).
///
/// **Outside an execution** (no `Idempotency-Key` on a handler without `require_key`, or a
/// store error with `fail_open`) there is no record and no journal: each step runs directly, and
/// its downstream key is random per request (two unkeyed requests are two requests). In a
/// handler without `#[idempotent]`, the extractor answers `500` `misconfigured`.
///
/// **Transactional mode** (`PgTransaction`): a step's result is committed at once on its own
/// connection, outside the handler's transaction (the charge happened whether or not the
/// handler's rows commit). Make the foreign calls as steps first, then write your rows through
/// the transaction; they commit with the record.
#[derive(Clone)]
pub struct Steps {
    execution: Arc<Execution>,
}

impl fmt::Debug for Steps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Steps")
            .field("handler", &self.execution.handler)
            .field("journaled", &self.execution.journal.is_some())
            .field("resumed", &self.resumed())
            .finish()
    }
}

/// Why a step did not hand back an output.
///
/// As an actix-web error (a handler can `?` it) each variant answers a problem+json:
/// [`Failed`](Self::Failed) `503` `step-failed`, [`LeaseLost`](Self::LeaseLost) `503`
/// `lease-lost`, [`Store`](Self::Store) `503` `store-unavailable` (each with `Retry-After`; a
/// 503 releases the key and keeps the journal, so the retry resumes), and
/// [`Misuse`](Self::Misuse) `500` `misconfigured` (its message is logged, not sent).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StepError<E> {
    /// The step itself failed (not journaled by `run`): the handler decides (e.g. answer 503).
    #[error("step failed: {0}")]
    Failed(E),
    /// This execution lost its lease: its journal write was refused. Answer 503; do not use the
    /// output (a newer owner exists).
    #[error("the request lost its lease: the step's result was not journaled")]
    LeaseLost,
    /// The store failed or timed out, or does not journal steps (a custom store that does not
    /// implement them).
    #[error("the step's journal is unavailable: {0}")]
    Store(#[source] StoreError),
    /// The same name was used twice in one execution; an entry or journal over the size
    /// limits; an output that does not (de)serialise; an invalid step name.
    #[error("steps misused: {0}")]
    Misuse(String),
}

impl<E: fmt::Debug + fmt::Display> ResponseError for StepError<E> {
    fn status_code(&self) -> StatusCode {
        self.problem().status()
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            Self::Misuse(why) => tracing::error!("steps misused: {why}"),
            Self::Store(err) => tracing::error!(error = %err, "a step's journal is unavailable"),
            Self::Failed(err) => tracing::warn!(error = %err, "a step failed"),
            Self::LeaseLost => {
                tracing::warn!("the lease was lost while a step ran: its result is not journaled");
            }
        }
        self.problem().to_response()
    }
}

impl<E> StepError<E> {
    fn problem(&self) -> Problem {
        let retry_after = crate::config::Idempotency::DEFAULT_UNAVAILABLE_RETRY_AFTER;
        match self {
            Self::Failed(_) => Problem::StepFailed { retry_after },
            Self::LeaseLost => Problem::LeaseLost { retry_after },
            Self::Store(_) => Problem::StoreUnavailable { retry_after },
            Self::Misuse(_) => Problem::Misconfigured,
        }
    }
}

impl StepError<Infallible> {
    /// The same error for any `Failed` type (it carries none).
    fn cast<F>(self) -> StepError<F> {
        match self {
            Self::Failed(never) => match never {},
            Self::LeaseLost => StepError::LeaseLost,
            Self::Store(e) => StepError::Store(e),
            Self::Misuse(m) => StepError::Misuse(m),
        }
    }
}

/// One execution of a request, as the adapter installs it for [`Steps`].
pub(crate) struct Execution {
    handler: &'static str,
    /// The journal, when the execution holds a claim; `None` outside one.
    journal: Option<Journal>,
    /// The random nonce of the downstream keys of an execution without a record.
    nonce: [u8; 32],
    /// The names run in this execution.
    used: Mutex<HashSet<String>>,
}

struct Journal {
    store: Arc<dyn Store>,
    ticket: Ticket,
    ttl: Duration,
    lease: Duration,
    /// The entries loaded at the first step.
    loaded: OnceCell<HashMap<String, Bytes>>,
    /// The bytes of the journal (loaded, and written since), against [`Steps::MAX_JOURNAL`].
    size: Mutex<usize>,
}

impl Execution {
    /// An execution holding the claim of `ticket`: its steps are journaled.
    pub(crate) fn journaled(
        handler: &'static str,
        store: Arc<dyn Store>,
        ticket: Ticket,
        ttl: Duration,
        lease: Duration,
    ) -> Self {
        Self {
            handler,
            journal: Some(Journal {
                store,
                ticket,
                ttl,
                lease,
                loaded: OnceCell::new(),
                size: Mutex::new(0),
            }),
            nonce: [0; 32],
            used: Mutex::new(HashSet::new()),
        }
    }

    /// An execution without a record (no key, or failing open): steps run directly.
    pub(crate) fn unjournaled(handler: &'static str) -> Self {
        Self {
            handler,
            journal: None,
            nonce: rand::random(),
            used: Mutex::new(HashSet::new()),
        }
    }

    /// Puts the execution in the request's extensions, for the [`Steps`] extractor.
    pub(crate) fn install(self: &Arc<Self>, req: &HttpRequest) {
        req.extensions_mut().insert(Arc::clone(self));
    }

    /// Whether a step of this execution found the journal of an earlier one (see
    /// [`Steps::resumed`]): the adapter records it on the request's span once the handler ran.
    pub(crate) fn resumed(&self) -> bool {
        self.journal
            .as_ref()
            .and_then(|j| j.loaded.get())
            .is_some_and(|loaded| !loaded.is_empty())
    }
}

impl FromRequest for Steps {
    type Error = actix_web::Error;
    type Future = std::future::Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let found = req.extensions().get::<Arc<Execution>>().cloned();
        std::future::ready(match found {
            Some(execution) => Ok(Self { execution }),
            None => {
                tracing::error!("{OUTSIDE}");
                Err(actix_web::error::InternalError::from_response(
                    OUTSIDE,
                    Problem::Misconfigured.to_response(),
                )
                .into())
            }
        })
    }
}

const OUTSIDE: &str = "the `Steps` extractor is only available in a handler marked \
     `#[idempotent]`: add the attribute to the handler";

impl Steps {
    /// The most bytes one journal entry (the JSON of a step's output, plus 2) may take.
    pub const MAX_ENTRY: usize = 64 * 1024;
    /// The most bytes one request's journal (its entries and step names) may take.
    pub const MAX_JOURNAL: usize = 256 * 1024;
    /// The longest step name, in bytes.
    pub const MAX_NAME: usize = 128;

    /// Runs `step` once per request: the first execution runs it and journals its `Ok` output
    /// (fenced by the owner token) before returning it; a later execution of the same request
    /// (same scope, key, fingerprint) gets the journaled output back without running it.
    /// An `Err` is not journaled (the step runs again next time).
    ///
    /// # Errors
    ///
    /// [`StepError::Failed`] with the step's error; [`StepError::LeaseLost`] when the journal
    /// write was refused (do not use the output: a newer owner exists); [`StepError::Store`]
    /// when the store failed; [`StepError::Misuse`] for a name used twice, an output over the
    /// limits or that does not (de)serialise.
    pub async fn run<T, E, F, Fut>(&self, name: &str, step: F) -> Result<T, StepError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(DownstreamKey) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let ran = self
            .step(name, None, step)
            .await
            .map_err(StepError::<Infallible>::cast)?;
        match ran {
            Ok(output) => Ok(output),
            Err(e) => Err(StepError::Failed(e)),
        }
    }

    /// Like [`run`](Self::run), but the step's error is an outcome and is journaled too (a
    /// processor's decline): a later execution gets the same `Err` back without running the
    /// step.
    ///
    /// # Errors
    ///
    /// As [`run`](Self::run), but never [`StepError::Failed`]: the step's `Err` is the `Ok` of
    /// the outer result.
    pub async fn run_recorded<T, E, F, Fut>(
        &self,
        name: &str,
        step: F,
    ) -> Result<Result<T, E>, StepError<Infallible>>
    where
        T: Serialize + DeserializeOwned,
        E: Serialize + DeserializeOwned,
        F: FnOnce(DownstreamKey) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.step(name, Some(ErrCodec::json()), step).await
    }

    /// The downstream key of step `name` (the same one `run` hands its closure).
    pub fn key(&self, name: &str) -> DownstreamKey {
        let ex = &*self.execution;
        match &ex.journal {
            Some(j) => {
                DownstreamKey::derive(j.ticket.key(), j.ticket.fingerprint(), ex.handler, name)
            }
            None => DownstreamKey::unjournaled(&ex.nonce, ex.handler, name),
        }
    }

    /// Whether this execution resumed a journal left by an earlier one: known once the first
    /// step has read the journal (`false` before, and outside an execution).
    pub fn resumed(&self) -> bool {
        self.execution.resumed()
    }

    /// Runs or replays one step. `errs`: how the step's `Err` is journaled, when it is.
    async fn step<T, E, F, Fut>(
        &self,
        name: &str,
        errs: Option<ErrCodec<E>>,
        step: F,
    ) -> Result<Result<T, E>, StepError<Infallible>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(DownstreamKey) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let ex = &*self.execution;
        if name.is_empty() || name.len() > Self::MAX_NAME {
            return Err(StepError::Misuse(format!(
                "a step name is 1 to {} bytes, got {} bytes",
                Self::MAX_NAME,
                name.len()
            )));
        }
        let first_use = ex
            .used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned());
        if !first_use {
            return Err(StepError::Misuse(format!(
                "the step {name:?} ran twice in one execution: give each step its own name"
            )));
        }
        let key = self.key(name);
        let Some(journal) = &ex.journal else {
            let out = step(key).await;
            observe::step(ex.handler, outcome_of(&out, false));
            if out.is_err() {
                ex.forget(name);
            }
            return Ok(out);
        };

        // 1. The journal, read once per execution.
        let loaded = journal
            .loaded
            .get_or_try_init(|| journal.load())
            .await
            .map_err(|err| {
                observe::step(ex.handler, StepOutcome::StoreError);
                ex.forget(name);
                StepError::Store(err)
            })?;
        if let Some(entry) = loaded.get(name) {
            let out = decode::<T, E>(name, entry, errs.as_ref())?;
            observe::step(ex.handler, StepOutcome::Replayed);
            return Ok(out);
        }

        // 2. Run it, 3. journal what is to be journaled before handing it back.
        let out = step(key).await;
        let entry = match (&out, &errs) {
            (Ok(output), _) => Some(encode(KIND_OK, output)),
            (Err(err), Some(codec)) => Some((codec.encode)(err)),
            (Err(_), None) => None,
        };
        let Some(entry) = entry else {
            observe::step(ex.handler, StepOutcome::Failed);
            ex.forget(name);
            return Ok(out);
        };
        let entry = entry.map_err(|why| {
            StepError::Misuse(format!(
                "the output of step {name:?} does not serialise: {why}"
            ))
        })?;
        match journal.record(ex.handler, name, &entry).await {
            Ok(()) => {}
            Err(err @ StepError::Store(_)) => {
                ex.forget(name);
                return Err(err);
            }
            Err(err) => return Err(err),
        }
        observe::step(ex.handler, outcome_of(&out, true));
        Ok(out)
    }
}

impl Execution {
    /// Lets a step whose outcome was not journaled (its error under `run`, a store failure) run
    /// again in this execution: a retry loop in the handler.
    fn forget(&self, name: &str) {
        self.used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }
}

/// The outcome a step that ran counts as.
fn outcome_of<T, E>(out: &Result<T, E>, journaled: bool) -> StepOutcome {
    match (out, journaled) {
        (Ok(_), _) | (Err(_), true) => StepOutcome::Ran,
        (Err(_), false) => StepOutcome::Failed,
    }
}

impl Journal {
    async fn load(&self) -> Result<HashMap<String, Bytes>, StoreError> {
        let kind = self.store.kind();
        let entries =
            observe::timed(Op::LoadSteps, kind, self.store.load_steps(&self.ticket)).await?;
        let size = entries.iter().map(|(n, e)| n.len() + e.len()).sum();
        *self.size.lock().unwrap_or_else(PoisonError::into_inner) = size;
        Ok(entries.into_iter().collect())
    }

    /// Writes one entry, fenced; retried while the connection breaks, within the lease.
    async fn record(
        &self,
        handler: &'static str,
        name: &str,
        entry: &[u8],
    ) -> Result<(), StepError<Infallible>> {
        if entry.len() > Steps::MAX_ENTRY {
            observe::step(handler, StepOutcome::TooLarge);
            return Err(StepError::Misuse(format!(
                "the output of step {name:?} takes {} bytes, more than the {} a journal entry \
                 may take: it is not journaled",
                entry.len(),
                Steps::MAX_ENTRY
            )));
        }
        {
            let mut size = self.size.lock().unwrap_or_else(PoisonError::into_inner);
            let total = *size + name.len() + entry.len();
            if total > Steps::MAX_JOURNAL {
                drop(size);
                observe::step(handler, StepOutcome::TooLarge);
                return Err(StepError::Misuse(format!(
                    "step {name:?} would bring the request's journal to {total} bytes, more than \
                     the {} it may take: it is not journaled",
                    Steps::MAX_JOURNAL
                )));
            }
            *size = total;
        }
        let kind = self.store.kind();
        let retry_for = self.lease.min(FENCED_RETRY_LIMIT);
        let written = retry_fenced("record_step", retry_for, || {
            observe::timed(
                Op::RecordStep,
                kind,
                self.store.record_step(&self.ticket, name, entry, self.ttl),
            )
        })
        .await;
        if !matches!(written, Ok(Ownership::Held)) {
            let mut size = self.size.lock().unwrap_or_else(PoisonError::into_inner);
            *size = size.saturating_sub(name.len() + entry.len());
        }
        match written {
            Ok(Ownership::Held) => Ok(()),
            Ok(Ownership::Lost) => {
                observe::step(handler, StepOutcome::Refused);
                observe::lease_lost(handler, Op::RecordStep);
                tracing::warn!(
                    step = name,
                    "the lease was lost while the step ran: its result is not journaled"
                );
                Err(StepError::LeaseLost)
            }
            Err(err) => {
                observe::step(handler, StepOutcome::StoreError);
                Err(StepError::Store(err))
            }
        }
    }
}

/// How a step's `Err` is journaled (`run_recorded`), as plain functions.
struct ErrCodec<E> {
    encode: fn(&E) -> Result<Vec<u8>, String>,
    decode: fn(&[u8]) -> Result<E, String>,
}

impl<E: Serialize + DeserializeOwned> ErrCodec<E> {
    fn json() -> Self {
        Self {
            encode: |e| encode(KIND_ERR, e),
            decode: |json| serde_json::from_slice(json).map_err(|e| e.to_string()),
        }
    }
}

/// A journal entry: the version byte, the kind, the JSON of the value.
fn encode<V: Serialize>(kind: u8, value: &V) -> Result<Vec<u8>, String> {
    let mut entry = vec![ENTRY_V1, kind];
    serde_json::to_writer(&mut entry, value).map_err(|e| e.to_string())?;
    Ok(entry)
}

/// Reads a journal entry back as the step's outcome.
fn decode<T: DeserializeOwned, E>(
    name: &str,
    entry: &[u8],
    errs: Option<&ErrCodec<E>>,
) -> Result<Result<T, E>, StepError<Infallible>> {
    let misuse = |why: String| StepError::Misuse(format!("the journaled step {name:?} {why}"));
    match entry {
        [ENTRY_V1, KIND_OK, json @ ..] => serde_json::from_slice(json)
            .map(Ok)
            .map_err(|e| misuse(format!("does not deserialise as the step's output: {e}"))),
        [ENTRY_V1, KIND_ERR, json @ ..] => match errs {
            Some(codec) => (codec.decode)(json)
                .map(Err)
                .map_err(|e| misuse(format!("does not deserialise as the step's error: {e}"))),
            None => Err(misuse(
                "holds an error (journaled by `run_recorded`), but is now run with `run`".into(),
            )),
        },
        [version, ..] => Err(StepError::Store(StoreError::Corrupt(
            format!("journal entry of step {name:?}: unknown version or kind (byte {version})")
                .into(),
        ))),
        [] => Err(StepError::Store(StoreError::Corrupt(
            format!("journal entry of step {name:?} is empty").into(),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;

    use super::*;
    use crate::{
        fingerprint::Fingerprint, protocol::Claim, record::StoredResponse, scope::RecordKey,
        store::memory::MemoryStore,
    };

    /// A custom store that implements only the record calls.
    struct RecordsOnly(MemoryStore);

    #[async_trait]
    impl Store for RecordsOnly {
        async fn claim(&self, t: &Ticket, lease: Duration) -> Result<Claim, StoreError> {
            self.0.claim(t, lease).await
        }
        async fn renew(&self, t: &Ticket, lease: Duration) -> Result<Ownership, StoreError> {
            self.0.renew(t, lease).await
        }
        async fn complete(
            &self,
            t: &Ticket,
            r: &StoredResponse,
            ttl: Duration,
        ) -> Result<Ownership, StoreError> {
            self.0.complete(t, r, ttl).await
        }
        async fn release(&self, t: &Ticket) -> Result<Ownership, StoreError> {
            self.0.release(t).await
        }
    }

    #[tokio::test]
    async fn a_store_that_does_not_journal_refuses_with_the_fix() {
        let store = RecordsOnly(MemoryStore::isolated());
        let t = Ticket::new(
            RecordKey::from_bytes([1; 32]),
            Fingerprint::compute("POST", "/p", "", b""),
        );
        let refused = store.load_steps(&t).await.expect_err("refused");
        assert!(matches!(
            refused,
            StoreError::StepsUnsupported { store: "custom" }
        ));
        assert!(
            refused.to_string().contains("Store::load_steps"),
            "{refused}"
        );
        let refused = store
            .record_step(&t, "a", b"x", Duration::from_secs(1))
            .await
            .expect_err("refused");
        assert!(matches!(refused, StoreError::StepsUnsupported { .. }));
    }

    #[test]
    fn entries_are_versioned_and_read_back() {
        let entry = encode(KIND_OK, &vec![1, 2]).expect("encodes");
        assert_eq!(&entry[..2], &[ENTRY_V1, KIND_OK]);
        let codec = ErrCodec::<String>::json();
        let back: Result<Vec<i32>, String> = decode("s", &entry, Some(&codec)).expect("decodes");
        assert_eq!(back, Ok(vec![1, 2]));
        let err = (codec.encode)(&"declined".to_owned()).expect("encodes");
        let back: Result<Vec<i32>, String> = decode("s", &err, Some(&codec)).expect("decodes");
        assert_eq!(back, Err("declined".to_owned()));
        // A journaled error read by `run` (no codec): misuse, not a silent success.
        assert!(matches!(
            decode::<Vec<i32>, String>("s", &err, None),
            Err(StepError::Misuse(_))
        ));
        // An unknown version: corrupt.
        assert!(matches!(
            decode::<Vec<i32>, String>("s", &[9, KIND_OK, b'1'], Some(&codec)),
            Err(StepError::Store(StoreError::Corrupt(_)))
        ));
    }
}
