//! The sweep: expired rows are invisible to claims at once (every statement compares with
//! `now()`), and deleted here in bounded batches, by a task that lives as long as the store.

use std::sync::{atomic::Ordering, Arc, PoisonError, Weak};

use super::{sql::SWEEP_MAX_BATCHES, Inner, PostgresStore};
use crate::store::StoreError;

impl PostgresStore {
    /// Deletes up to one batch of expired rows (oldest first), skipping rows a claim is taking
    /// over, then up to one batch of expired steps (the journal's table), and returns how many
    /// rows it deleted. The sweeper calls it; so can a cron job.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database fails or does not answer within the store timeout.
    pub async fn sweep(&self) -> Result<u64, StoreError> {
        let result = self
            .bounded(
                sqlx::query(&self.inner.sql.sweep)
                    .bind(i64::from(self.inner.sweep_batch))
                    .execute(&self.inner.pool),
            )
            .await?;
        let steps = self
            .bounded(
                sqlx::query(&self.inner.sql.sweep_steps)
                    .bind(i64::from(self.inner.sweep_batch))
                    .execute(&self.inner.pool),
            )
            .await?;
        let rows = result.rows_affected() + steps.rows_affected();
        crate::observe::swept("postgres", rows);
        Ok(rows)
    }

    /// Starts the sweeper if it is enabled, not started yet, and a tokio runtime is running.
    pub(super) fn start_sweeper(&self) {
        if !self.inner.sweeper_pending.load(Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(mut stopped) = self
            .inner
            .stopped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        self.inner.sweeper_pending.store(false, Ordering::Relaxed);
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let interval = self.inner.sweep_interval;
        runtime.spawn(async move {
            loop {
                tokio::select! {
                    // The last store clone was dropped (the sender with it).
                    _ = &mut stopped => return,
                    () = tokio::time::sleep(interval) => {}
                }
                let Some(inner) = weak.upgrade() else { return };
                let store = PostgresStore { inner };
                for _ in 0..SWEEP_MAX_BATCHES {
                    match store.sweep().await {
                        Ok(n) if n >= u64::from(store.inner.sweep_batch) => {}
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, table = %store.inner.table, "idem: sweeping expired records failed");
                            break;
                        }
                    }
                }
            }
        });
    }
}
