//! Operator actions (DESIGN §2 Admin): listing, revoking tasks and identities, blocking, policy
//! reload and audit verification. Every call checks the caller is a configured operator and is
//! audited.

use super::*;
use crate::audit::{self, Event, Verification};
use crate::error::{Error, Result};
use crate::model::{RevokeReason, SpiffeId, Task, TaskId, TaskState, preview};

pub const DEFAULT_PAGE: usize = 50;
pub const MAX_PAGE: usize = 500;
const MAX_REASON_LEN: usize = 1024;

fn check_reason(reason: &str) -> Result<()> {
    if reason.len() > MAX_REASON_LEN {
        return Err(Error::invalid(
            "reason",
            format!("is {} bytes; at most {MAX_REASON_LEN}", reason.len()),
        ));
    }
    Ok(())
}

component!(
    /// Operator calls: listing, revoking, the kill switch, policy reload, audit verification.
    Admin { tasks: Tasks }
);

impl Admin {
    pub(super) fn admin_event(&self, u: &mut Tx<'_>, caller: &SpiffeId, what: &str, ev: Event) {
        self.audit(
            u,
            Event {
                kind: "admin".into(),
                actor: caller.to_string(),
                detail: what.into(),
                ..ev
            },
        );
    }

    /// The checks of every operator write: the caller is an operator, the broker is writable,
    /// the reason is not too long.
    async fn check_write(&self, caller: &SpiffeId, reason: &str) -> Result<()> {
        self.require_admin(caller).await?;
        self.writable()?;
        check_reason(reason)
    }

    /// An operator write on an identity: the checks, the identity it names, and a unit of work
    /// holding the identity's lock.
    async fn lock_identity_for_write(
        &self,
        caller: &SpiffeId,
        spiffe_id: &str,
        reason: &str,
    ) -> Result<(SpiffeId, Tx<'_>)> {
        self.check_write(caller, reason).await?;
        let target = SpiffeId::parse("spiffe_id", spiffe_id)?;
        let mut u = self.store.begin().await?;
        u.lock_identity(&target).await?;
        Ok((target, u))
    }

    /// The audit entry of an operator write on an identity.
    fn identity_event(
        &self,
        u: &mut Tx<'_>,
        caller: &SpiffeId,
        what: &str,
        target: &SpiffeId,
        reason: &str,
    ) {
        self.admin_event(
            u,
            caller,
            what,
            Event {
                spiffe_id: target.to_string(),
                reason: reason.into(),
                ..Default::default()
            },
        );
    }

    /// `Admin.ListTasks`.
    pub async fn list_tasks(
        &self,
        caller: &SpiffeId,
        owner: Option<&str>,
        state: Option<TaskState>,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<Task>, Option<TaskId>)> {
        self.require_admin(caller).await?;
        let owner = owner
            .filter(|s| !s.is_empty())
            .map(|s| SpiffeId::parse("spiffe_id", s))
            .transpose()?;
        let want = match page_size as usize {
            0 => DEFAULT_PAGE,
            n if n > MAX_PAGE => {
                return Err(Error::invalid(
                    "page_size",
                    format!("{n} is above the maximum of {MAX_PAGE}"),
                ));
            }
            n => n,
        };
        let mut after = if page_token.is_empty() {
            None
        } else {
            Some(TaskId::parse(page_token).map_err(|_| {
                Error::invalid(
                    "page_token",
                    format!("is not a page token: {}", preview(page_token)),
                )
            })?)
        };
        let now = self.now();
        let mut out = Vec::new();
        // Scan in batches until the page is full or the tasks run out.
        loop {
            let batch = self.store.scan_tasks(after.as_ref(), 512).await?;
            let exhausted = batch.len() < 512;
            for mut t in batch {
                after = Some(t.id.clone());
                t.state = t.effective_state(now);
                let ok = owner.as_ref().is_none_or(|o| &t.owner == o)
                    && state.is_none_or(|s| t.state == s);
                if ok {
                    out.push(t);
                    if out.len() == want {
                        return Ok((out, after));
                    }
                }
            }
            if exhausted {
                return Ok((out, None));
            }
        }
    }

    /// `Admin.RevokeTask`: ends the task and every credential of it.
    pub async fn admin_revoke_task(
        &self,
        caller: &SpiffeId,
        task_id: &str,
        reason: &str,
    ) -> Result<Completed> {
        self.check_write(caller, reason).await?;
        let id = TaskId::parse(task_id)?;
        if self.store.get_task(&id).await?.is_none() {
            return Err(Error::NotFound(format!("task {id}")));
        }
        let mut u = self.store.begin().await?;
        let mut out = Completed::default();
        let r = self
            .revoke_tree(&mut u, &id, RevokeReason::Admin, &mut out)
            .await;
        self.admin_event(
            &mut u,
            caller,
            "revoke_task",
            Event {
                task_id: id.to_string(),
                reason: reason.into(),
                ..Default::default()
            },
        );
        self.finish(u, r.map(|()| out)).await
    }

    /// `Admin.RevokeIdentity`: the kill switch for a compromised agent.
    pub async fn revoke_identity(
        &self,
        caller: &SpiffeId,
        spiffe_id: &str,
        reason: &str,
        block: bool,
    ) -> Result<Completed> {
        // The identity's lock for the whole unit: a task it starts meanwhile either committed
        // before (and is found below) or waits and then sees the block.
        let (target, mut u) = self
            .lock_identity_for_write(caller, spiffe_id, reason)
            .await?;
        if block {
            // Block first, so nothing new starts while the old is being revoked.
            u.set_blocked(&target, true).await?;
        }
        let mut out = Completed::default();
        let mut r = Ok(());
        for id in self.store.tasks_of_identity(&target).await? {
            r = self
                .revoke_tree(&mut u, &id, RevokeReason::IdentityRevoked, &mut out)
                .await;
            if r.is_err() {
                break;
            }
        }
        let what = if block {
            "revoke_identity+block"
        } else {
            "revoke_identity"
        };
        self.identity_event(&mut u, caller, what, &target, reason);
        self.finish(u, r.map(|()| out)).await
    }

    /// Ends a task if it is still active (state REVOKED, `reason`) and then all its descendants.
    pub(super) async fn revoke_tree(
        &self,
        u: &mut Tx<'_>,
        id: &TaskId,
        reason: RevokeReason,
        out: &mut Completed,
    ) -> Result<()> {
        if let Some(mut task) = u.lock_task(id).await?
            && task.state == TaskState::Active
        {
            self.tasks
                .end_task(u, &mut task, (TaskState::Revoked, reason), self.now(), out)
                .await?;
        }
        self.tasks.revoke_descendants(u, id, out).await
    }

    /// `Admin.UnblockIdentity`. Returns whether it was blocked.
    pub async fn unblock_identity(
        &self,
        caller: &SpiffeId,
        spiffe_id: &str,
        reason: &str,
    ) -> Result<bool> {
        let (target, mut u) = self
            .lock_identity_for_write(caller, spiffe_id, reason)
            .await?;
        let was = u.set_blocked(&target, false).await;
        self.identity_event(&mut u, caller, "unblock_identity", &target, reason);
        self.finish(u, was).await
    }

    /// `Admin.ReloadPolicy`: re-reads the policy file; a bad one is refused and the serving set
    /// stays.
    pub async fn reload_policy(&self, caller: &SpiffeId) -> Result<(usize, String)> {
        self.require_admin(caller).await?;
        self.writable()?;
        let result = self.reload_policy_file();
        let mut u = self.store.begin().await?;
        self.admin_event(
            &mut u,
            caller,
            "reload_policy",
            Event {
                reason: match &result {
                    Ok((n, d)) => format!("loaded {n} policies, sha256 {d}"),
                    Err(e) => format!("refused: {e}"),
                },
                ..Default::default()
            },
        );
        u.commit().await?;
        result.map_err(|e| match e {
            Error::Config(m) => Error::FailedPrecondition(format!(
                "the new policy set was refused and the previous one keeps serving: {m}"
            )),
            e => e,
        })
    }

    /// Reloads the policy file because it changed or on SIGHUP (`trigger` says which), audited
    /// as an operator's reload is: what was loaded, or why the new set was refused.
    pub async fn reload_policy_on(&self, trigger: &str) -> Result<(usize, String)> {
        self.writable()?;
        let result = self.reload_policy_file();
        let mut u = self.store.begin().await?;
        self.audit(
            &mut u,
            Event {
                kind: "policy_reload".into(),
                actor: trigger.into(),
                reason: match &result {
                    Ok((n, d)) => format!("loaded {n} policies, sha256 {d}"),
                    Err(e) => format!("refused: {e}"),
                },
                ..Default::default()
            },
        );
        u.commit().await?;
        result
    }

    /// Re-reads the configured policy file into the engine (file change, SIGHUP, Admin).
    pub fn reload_policy_file(&self) -> Result<(usize, String)> {
        let path = self
            .policy_file
            .as_ref()
            .ok_or_else(|| Error::FailedPrecondition("no policy file is configured".into()))?;
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!("cannot read policy file {}: {e}", path.display()))
        })?;
        let r = self.policy.reload(&text, &path.display().to_string());
        self.metrics.policy_reload(r.is_ok());
        match &r {
            Ok((n, d)) => tracing::info!(policies = n, sha256 = %d, "policy reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "policy reload refused; the previous set keeps serving")
            }
        }
        r
    }

    /// `Admin.VerifyAudit`.
    pub async fn verify_audit(&self, caller: &SpiffeId) -> Result<Verification> {
        self.require_admin(caller).await?;
        let _no_archival_meanwhile = self.archive_lock.lock().await;
        let dir = self.audit_archive.as_ref().map(|a| a.dir.clone());
        audit::verify(self.store.engine(), dir.as_deref()).await
    }

    /// `Admin.Status`.
    pub async fn status(&self, caller: &SpiffeId) -> Result<StatusInfo> {
        self.require_admin(caller).await?;
        let c = self.store.counts().await?;
        let (policy_count, policy_digest) = self.policy.info();
        Ok(StatusInfo {
            active_tasks: c.tasks,
            active_credentials: c.credentials,
            policy_count,
            policy_digest,
        })
    }
}
