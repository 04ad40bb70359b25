//! Graceful shutdown that waits for idempotent handlers, including those whose client left, and
//! starts none after it began.
//!
//! actix-web's graceful stop waits for open connections only. A handler whose client disconnected
//! runs on in a task of its own (so that a retry finds its result), with no connection left to
//! wait for: the worker stops and cuts it mid-flight, its key stays pending until the lease runs
//! out, and the retry then runs the handler again. Every request that may run an idempotent
//! handler is counted here, from its admission (before its claim) to its settlement, wherever it
//! runs, and [`shutdown`] waits for the count to reach zero before it stops the server.
//!
//! Pausing the server stops new connections only: a keep-alive connection already open keeps
//! sending requests. So once a shutdown begins, no request is admitted any more: it is answered
//! 503 before its claim, and its connection closed (see [`Running::admit`]).

use std::{
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::Duration,
};

use actix_web::dev::ServerHandle;
use tokio::sync::Notify;

/// Requests admitted in this process that may run (or are running) an idempotent handler,
/// attached to their request or detached from it.
static RUNNING: AtomicUsize = AtomicUsize::new(0);
/// Set when a [`shutdown`] begins: from then on no request is admitted.
static DRAINING: AtomicBool = AtomicBool::new(false);
/// Notified when [`RUNNING`] drops to zero.
static IDLE: Notify = Notify::const_new();

/// Counts one admitted request while it lives: held by the request, then by the handler's future,
/// so it ends when the request is answered without running the handler, or when the handler's
/// future ends or is dropped (cut).
pub(crate) struct Running(());

impl Running {
    /// Admits a request that may run an idempotent handler: `None` once a shutdown has begun
    /// (the request must then be answered without a claim).
    ///
    /// The count goes up before the flag is read, and [`shutdown`] sets the flag before it reads
    /// the count (all sequentially consistent): either this request sees the shutdown and backs
    /// out, or the shutdown sees this request and waits for it. No request slips between the
    /// two and runs a handler that the stop then cuts.
    pub(crate) fn admit() -> Option<Self> {
        RUNNING.fetch_add(1, Ordering::SeqCst);
        let running = Self(());
        if DRAINING.load(Ordering::SeqCst) {
            return None; // `running` is dropped: the count goes back down.
        }
        Some(running)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if RUNNING.fetch_sub(1, Ordering::SeqCst) == 1 {
            IDLE.notify_waiters();
        }
    }
}

/// Resolves once no idempotent handler runs.
async fn idle() {
    loop {
        let notified = IDLE.notified();
        futures_util::pin_mut!(notified);
        notified.as_mut().enable();
        if RUNNING.load(Ordering::SeqCst) == 0 {
            return;
        }
        notified.await;
    }
}

/// Stops `server` gracefully, without cutting an idempotent handler that is still running, even
/// one whose client already left, and without starting new ones: stops accepting connections,
/// answers every request that would run an `#[idempotent]` handler with 503, waits until no
/// `#[idempotent]` handler of this process runs (or `timeout` passes), then stops the server.
///
/// Call it on SIGTERM instead of actix-web's own signal handling
/// ([`HttpServer::disable_signals`](actix_web::HttpServer::disable_signals)):
///
/// ```no_run
/// # async fn run(server: actix_web::dev::Server) -> std::io::Result<()> {
/// use std::time::Duration;
///
/// let handle = server.handle();
/// actix_web::rt::spawn(async move {
///     let _ = tokio::signal::ctrl_c().await; // and SIGTERM, see examples/payments.rs
///     idem_runtime::shutdown(&handle, Duration::from_secs(30)).await; // idem::shutdown
/// });
/// server.await
/// # }
/// ```
///
/// - A handler that finishes within `timeout` settles as usual: its response is stored, and a
///   retry on another instance replays it. Once every handler has finished, the server stops
///   gracefully: open connections get their responses (within the server's own
///   `shutdown_timeout`).
/// - Past `timeout`, the server stops at once, and the handlers still running are cut. Their keys
///   stay pending until their leases run out; a retry then runs the handler again. Choose
///   `timeout` longer than your slowest handler, and give the process more than that before it is
///   killed (Kubernetes' `terminationGracePeriodSeconds`).
///
/// - From the moment it is called, a request that keep-alive connections (already open) send to
///   an `#[idempotent]` handler is answered at once, before any claim: `503` problem+json
///   (`https://idem.dev/problems/shutting-down`) with `Retry-After`
///   ([`Idempotency::unavailable_retry_after`](crate::Idempotency::unavailable_retry_after)) and
///   `Connection: close`, so that the client's retry opens a connection to another instance. No
///   handler starts, no key is claimed; a request without a key or with an invalid one is answered
///   as usual (400, or 503 when it would run the handler). Other routes are served as usual.
/// - It is for the process: once called, every `#[idempotent]` handler of the process refuses
///   new requests, whichever server it is served by, until the process exits.
pub async fn shutdown(server: &ServerHandle, timeout: Duration) {
    DRAINING.store(true, Ordering::SeqCst);
    server.pause().await;
    let drained = tokio::time::timeout(timeout, idle()).await.is_ok();
    if !drained {
        tracing::warn!(
            running = RUNNING.load(Ordering::SeqCst),
            ?timeout,
            "shutting down with idempotent handlers still running: they are cut, and their keys \
             stay pending until their leases run out"
        );
    }
    server.stop(drained).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_waits_for_every_running_handler() {
        let first = Running::admit().expect("admitted");
        let second = Running::admit().expect("admitted");
        let waiting = tokio::spawn(idle());
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        drop(second);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("idle once none runs")
            .expect("joins");
    }
}
