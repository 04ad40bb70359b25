//! Runs a future to its end even when the request that awaits it is dropped.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tracing::{Instrument as _, Span};

/// Polls a future in place, in the task that awaits it, and when it is dropped unfinished, spawns
/// what is left of the future on the current thread so that it runs to its end.
///
/// This keeps the guarantee of spawning the handler (it finishes even if the client disconnects)
/// without paying for a task per request: a task allocation, a scheduler round and a second poll
/// of the whole HTTP dispatcher when its `JoinHandle` wakes it. The future is boxed once so that
/// it can move to a task after it has been polled.
pub(crate) struct RunToEnd<F: Future + 'static> {
    fut: Option<Pin<Box<F>>>,
    span: Span,
}

impl<F: Future + 'static> RunToEnd<F> {
    pub(crate) fn new(fut: F) -> Self {
        Self {
            fut: Some(Box::pin(fut)),
            span: Span::current(),
        }
    }
}

impl<F: Future + 'static> Future for RunToEnd<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(fut) = self.fut.as_mut() else {
            // Only reachable by polling after completion, which `.await` never does.
            return Poll::Pending;
        };
        let out = std::task::ready!(fut.as_mut().poll(cx));
        self.fut = None;
        Poll::Ready(out)
    }
}

impl<F: Future + 'static> Drop for RunToEnd<F> {
    fn drop(&mut self) {
        if let Some(fut) = self.fut.take() {
            if std::thread::panicking() {
                return;
            }
            let span = std::mem::replace(&mut self.span, Span::none());
            drop(actix_web::rt::spawn(
                async move {
                    let _ = fut.await;
                }
                .instrument(span),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        rc::Rc,
        sync::atomic::{AtomicBool, Ordering},
        time::Duration,
    };

    use super::*;

    #[actix_rt::test]
    async fn a_dropped_future_still_runs_to_its_end() {
        let done = Rc::new(AtomicBool::new(false));
        let flag = Rc::clone(&done);
        let run = RunToEnd::new(async move {
            actix_web::rt::time::sleep(Duration::from_millis(20)).await;
            flag.store(true, Ordering::SeqCst);
        });
        // Poll it once, then drop it as a dropped request would.
        let mut run = Box::pin(run);
        let pending =
            std::future::poll_fn(|cx| Poll::Ready(run.as_mut().poll(cx).is_pending())).await;
        assert!(pending);
        drop(run);
        assert!(!done.load(Ordering::SeqCst));
        actix_web::rt::time::sleep(Duration::from_millis(60)).await;
        assert!(done.load(Ordering::SeqCst));
    }

    #[actix_rt::test]
    async fn an_awaited_future_answers_in_place() {
        assert_eq!(RunToEnd::new(async { 7 }).await, 7);
    }
}
