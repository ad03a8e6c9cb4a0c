//! The reaper (DESIGN §8): walks the expiry index and ends what is due. Readers never depend on
//! it: `Introspect` and `IssueCredential` check expiry themselves, so a lagging reaper only delays
//! bookkeeping, never makes a dead credential usable.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::error::Result;
use crate::model::{CredentialState, RevokeReason, TaskState};
use crate::store::Expiring;

/// Entries handled per pass, so one pass never holds up the runtime for long.
const BATCH: usize = 512;
/// The reaper yields to request handling after this many entries.
const YIELD_EVERY: usize = 8;
/// Between passes the reaper sleeps at least this long.
const MIN_SLEEP: Duration = Duration::from_millis(20);
/// The reaper never sleeps longer than this, so a moved clock or a new earlier expiry is caught.
const MAX_SLEEP: Duration = Duration::from_secs(1);

component!(
    /// The reaper: ends what expired, a claimed batch per unit of work.
    Reaper { tasks: Tasks, credentials: Credentials }
);

impl Reaper {
    /// Ends everything due now. Returns how many entries it handled.
    ///
    /// Each batch is one unit of work: its entries are claimed (another reaper, in this process
    /// or in another replica, skips them), each one's task is locked without waiting (an entry
    /// whose task is busy is left for the next pass), and the batch commits once, so a mass
    /// expiry costs one flush per batch. In a mass expiry it paces itself: it yields to request
    /// handling every few entries and, between batches, rests as long as the batch took, so at
    /// most about half of one worker's time goes to bookkeeping while agents are being served.
    /// Readers check expiry themselves, so the slower drain costs nothing but bookkeeping lag
    /// (and, for upstream accounts, the drop waits a little longer behind its `VALID UNTIL`
    /// backstop).
    pub async fn reap_due(&self) -> Result<usize> {
        let mut handled = 0;
        loop {
            let started = std::time::Instant::now();
            let now = self.now();
            let mut u = self.store.begin().await?;
            let due = u.claim_due(now, BATCH).await?;
            if due.is_empty() {
                break;
            }
            let n = due.len();
            let mut failed = 0;
            let mut busy = 0;
            for (i, (at, what)) in due.into_iter().enumerate() {
                if i % YIELD_EVERY == YIELD_EVERY - 1 {
                    tokio::task::yield_now().await;
                }
                // One entry that cannot be handled (a corrupt record) must not stop the others.
                match self.reap_one(&mut u, now, at, &what).await {
                    Ok(true) => {}
                    Ok(false) => busy += 1,
                    Err(e) => {
                        failed += 1;
                        tracing::error!(error = %e, entry = ?what, "could not end an expired entry; the others go on");
                    }
                }
            }
            u.commit().await?;
            handled += n - busy;
            if n < BATCH || failed + busy == n {
                break;
            }
            tokio::time::sleep(started.elapsed()).await;
        }
        if self.jwt().rotate_if_due(&self.store, self.now()).await? {
            tracing::info!("rotated the JWT signing keys");
        }
        Ok(handled)
    }

    /// Ends one due entry and removes it from the index, in `u`. `false`: its task is locked
    /// by someone else right now; the entry stays due.
    pub(super) async fn reap_one(
        &self,
        u: &mut Tx<'_>,
        now: crate::model::UnixMillis,
        at: crate::model::UnixMillis,
        what: &Expiring,
    ) -> Result<bool> {
        match what {
            Expiring::Credential(id) => {
                // The task's lock, so this does not race a completion or an issuance.
                if let Some(task_id) = self.store.get_credential(id).await?.map(|r| r.task_id) {
                    if u.try_lock_task(&task_id).await?.is_none() {
                        return Ok(false);
                    }
                    self.credentials
                        .end_credential(u, id, CredentialState::Expired, RevokeReason::Expired, now)
                        .await?;
                }
            }
            Expiring::Task(id) => {
                let Some(task) = u.try_lock_task(id).await? else {
                    return Ok(false);
                };
                if let Some(mut task) = task
                    && task.state == TaskState::Active
                {
                    let mut out = Completed::default();
                    self.tasks
                        .end_task(u, &mut task, super::tasks::EXPIRED, now, &mut out)
                        .await?;
                    self.tasks.revoke_descendants(u, id, &mut out).await?;
                }
            }
            Expiring::Purge(id) => {
                if u.try_lock_task(id).await?.is_none() {
                    return Ok(false);
                }
                if u.purge_task(id).await? {
                    self.metrics.purged();
                }
            }
        }
        u.remove_due(at, what).await?;
        Ok(true)
    }

    /// Runs until `shutdown` resolves.
    pub async fn run_reaper(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            if let Err(e) = self.reap_due().await {
                tracing::error!(error = %e, "reaper pass failed; retrying");
            }
            let sleep = match self.store.next_due().await {
                // An entry left for a busy task is due already: come back shortly, not at once.
                Ok(Some(at)) => Duration::from_millis((at - self.now()).max(0) as u64)
                    .clamp(MIN_SLEEP, MAX_SLEEP),
                _ => MAX_SLEEP,
            };
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }
}
