//! The reaper (DESIGN §8): walks the expiry index and ends what is due. Readers never depend on
//! it: `Introspect` and `IssueCredential` check expiry themselves, so a lagging reaper only delays
//! bookkeeping, never makes a dead credential usable.

use std::sync::Arc;
use std::time::Duration;

use super::{Broker, Completed};
use crate::error::Result;
use crate::model::{CredentialState, RevokeReason, TaskState};
use crate::store::Expiring;

/// Entries handled per pass, so one pass never holds up the runtime for long.
const BATCH: usize = 512;
/// The reaper yields to request handling after this many entries.
const YIELD_EVERY: usize = 8;
/// The reaper never sleeps longer than this, so a moved clock or a new earlier expiry is caught.
const MAX_SLEEP: Duration = Duration::from_secs(1);

impl Broker {
    /// Ends everything due now. Returns how many entries it handled.
    ///
    /// In a mass expiry it paces itself: it yields to request handling every few entries and,
    /// between batches, rests as long as the batch took, so at most about half of one worker's
    /// time goes to bookkeeping while agents are being served. Readers check expiry themselves,
    /// so the slower drain costs nothing but bookkeeping lag (and, for upstream accounts, the
    /// drop waits a little longer behind its `VALID UNTIL` backstop).
    pub async fn reap_due(&self) -> Result<usize> {
        let mut handled = 0;
        loop {
            let started = std::time::Instant::now();
            let now = self.now();
            let due = self.store.due(now, BATCH)?;
            if due.is_empty() {
                break;
            }
            let n = due.len();
            let mut failed = 0;
            for (i, (at, what)) in due.into_iter().enumerate() {
                if i % YIELD_EVERY == YIELD_EVERY - 1 {
                    tokio::task::yield_now().await;
                }
                // One entry that cannot be handled (a corrupt record) must not stop the others.
                if let Err(e) = self.reap_one(now, at, &what).await {
                    failed += 1;
                    tracing::error!(error = %e, entry = ?what, "could not end an expired entry; the others go on");
                }
            }
            self.store.durable().await?;
            handled += n;
            if n < BATCH || failed == n {
                break;
            }
            tokio::time::sleep(started.elapsed()).await;
        }
        if self.jwt().rotate_if_due(self.store.as_ref(), self.now())? {
            self.store.durable().await?;
        }
        Ok(handled)
    }

    /// Ends one due entry and removes it from the index.
    async fn reap_one(
        &self,
        now: crate::model::UnixMillis,
        at: crate::model::UnixMillis,
        what: &Expiring,
    ) -> Result<()> {
        match what {
            Expiring::Credential(id) => {
                // Take the task's lock so this does not race a completion of the task.
                let task_id = self.store.get_credential(id)?.map(|r| r.task_id);
                let _g = match &task_id {
                    Some(t) => Some(self.lock_task(t).lock().await),
                    None => None,
                };
                self.end_credential(id, CredentialState::Expired, RevokeReason::Expired, now)?;
            }
            Expiring::Task(id) => {
                let mut out = Completed::default();
                {
                    let _g = self.lock_task(id).lock().await;
                    if let Some(mut task) = self.store.get_task(id)?
                        && task.state == TaskState::Active
                    {
                        self.end_task(
                            &mut task,
                            TaskState::Expired,
                            RevokeReason::Expired,
                            now,
                            &mut out,
                        )?;
                    }
                }
                self.revoke_descendants(id, &mut out).await?;
            }
            Expiring::Purge(id) => {
                let _g = self.lock_task(id).lock().await;
                if self.store.purge_task(id)? {
                    self.metrics.purged();
                }
            }
        }
        self.store.remove_due(at, what)
    }

    /// Runs until `shutdown` resolves.
    pub async fn run_reaper(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            if let Err(e) = self.reap_due().await {
                tracing::error!(error = %e, "reaper pass failed; retrying");
            }
            let sleep = match self.store.next_due() {
                Ok(Some(at)) => {
                    Duration::from_millis((at - self.now()).max(0) as u64).min(MAX_SLEEP)
                }
                _ => MAX_SLEEP,
            };
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }
}
