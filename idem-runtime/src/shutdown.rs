//! Graceful shutdown that waits for idempotent handlers, including those whose client left.
//!
//! actix-web's graceful stop waits for open connections only. A handler whose client disconnected
//! runs on in a task of its own (so that a retry finds its result), with no connection left to
//! wait for: the worker stops and cuts it mid-flight, its key stays pending until the lease runs
//! out, and the retry then runs the handler again. Every idempotent handler that runs is counted
//! here, from its claim to its settlement, wherever it runs, and [`shutdown`] waits for the count
//! to reach zero before it stops the server.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use actix_web::dev::ServerHandle;
use tokio::sync::Notify;

/// Idempotent handlers running in this process (attached to their request or detached from it).
static RUNNING: AtomicUsize = AtomicUsize::new(0);
/// Notified when [`RUNNING`] drops to zero.
static IDLE: Notify = Notify::const_new();

/// Counts one running handler while it lives: held by the handler's future, so it ends when the
/// future ends, or when it is dropped (cut).
pub(crate) struct Running(());

impl Running {
    pub(crate) fn start() -> Self {
        RUNNING.fetch_add(1, Ordering::AcqRel);
        Self(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if RUNNING.fetch_sub(1, Ordering::AcqRel) == 1 {
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
        if RUNNING.load(Ordering::Acquire) == 0 {
            return;
        }
        notified.await;
    }
}

/// Stops `server` gracefully, without cutting an idempotent handler that is still running, even
/// one whose client already left: stops accepting connections, waits until no `#[idempotent]`
/// handler of this process runs (or `timeout` passes), then stops the server.
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
/// Requests that keep-alive connections send while it waits are still served (and waited for).
pub async fn shutdown(server: &ServerHandle, timeout: Duration) {
    server.pause().await;
    let drained = tokio::time::timeout(timeout, idle()).await.is_ok();
    if !drained {
        tracing::warn!(
            running = RUNNING.load(Ordering::Acquire),
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
        let first = Running::start();
        let second = Running::start();
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
