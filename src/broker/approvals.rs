//! Human approval of high-risk grants (DESIGN §4). A permit annotated `@approval("required")`
//! yields `NEEDS_APPROVAL`; an approver (never the requester nor anyone in its delegation chain)
//! approves that exact (task, resource, action); the approval is used by one issuance and expires.

use super::*;
use crate::audit::Event;
use crate::error::{Error, Result};
use crate::model::{
    Approval, ApprovalId, ApprovalState, Grant, SpiffeId, Task, UnixMillis, preview,
};

const MAX_REASON_LEN: usize = 1024;

component!(
    /// Human approvals: requests, decisions by approvers, single use.
    Approvals {  }
);

impl Approvals {
    /// Opens a pending approval request for one grant of a task and records it on the task.
    pub(crate) async fn request_approval(
        &self,
        u: &mut Tx<'_>,
        task: &mut Task,
        grant: &Grant,
        policy_ids: Vec<String>,
        now: UnixMillis,
    ) -> Result<ApprovalId> {
        let a = Approval {
            id: ApprovalId::generate(),
            task_id: task.id.clone(),
            requester: task.owner.clone(),
            delegation_chain: task.delegation_chain.clone(),
            grant: grant.clone(),
            purpose: task.purpose.clone(),
            state: ApprovalState::Pending,
            created_at: now,
            expires_at: task.expires_at,
            decided_by: None,
            decided_at: None,
            reason: String::new(),
            policy_ids,
        };
        u.put_approval(&a).await?;
        for g in task.grants.iter_mut().filter(|g| &g.grant == grant) {
            g.approval_id = Some(a.id.clone());
        }
        self.audit(
            u,
            Event {
                kind: "approval_requested".into(),
                spiffe_id: task.owner.to_string(),
                task_id: task.id.to_string(),
                resource: grant.resource.clone(),
                action: grant.action.clone(),
                policies: a.policy_ids.clone(),
                purpose: task.purpose.clone(),
                detail: format!("approval_id={}", a.id),
                ..Default::default()
            },
        );
        Ok(a.id)
    }

    /// The unexpired approval of this grant in `state`, if there is one: `Approved` for the
    /// approval an issuance may use, `Pending` for an open request.
    pub(crate) async fn approval_in_state(
        &self,
        task: &Task,
        grant: &Grant,
        state: ApprovalState,
        now: UnixMillis,
    ) -> Result<Option<Approval>> {
        let Some(id) = self.store.approval_for_grant(&task.id, grant).await? else {
            return Ok(None);
        };
        Ok(self
            .store
            .get_approval(&id)
            .await?
            .filter(|a| a.state == state && now < a.expires_at))
    }

    /// The approved, unused, unexpired approval of this grant, if there is one.
    pub(crate) async fn usable_approval(
        &self,
        task: &Task,
        grant: &Grant,
        now: UnixMillis,
    ) -> Result<Option<Approval>> {
        self.approval_in_state(task, grant, ApprovalState::Approved, now)
            .await
    }

    /// The pending approval request of this grant, or a new one recorded on the task.
    pub(crate) async fn pending_or_new_approval(
        &self,
        u: &mut Tx<'_>,
        task: &Task,
        grant: &Grant,
        policy_ids: Vec<String>,
        now: UnixMillis,
    ) -> Result<ApprovalId> {
        if let Some(id) = self
            .approval_in_state(task, grant, ApprovalState::Pending, now)
            .await?
            .map(|a| a.id)
        {
            return Ok(id);
        }
        let mut t = task.clone();
        let id = self
            .request_approval(u, &mut t, grant, policy_ids, now)
            .await?;
        u.update_task(&t).await?;
        Ok(id)
    }

    /// Marks an approval consumed by an issuance.
    /// Uses a granted approval for one credential: exactly one issuance wins it.
    pub(crate) async fn use_approval(
        &self,
        u: &mut Tx<'_>,
        a: Approval,
        credential: &str,
        now: UnixMillis,
    ) -> Result<()> {
        if !u.consume_approval(&a.id, credential, now).await? {
            return Err(Error::FailedPrecondition(format!(
                "approval {} was used or expired meanwhile; ask again",
                a.id
            )));
        }
        self.audit(
            u,
            Event {
                kind: "approval_used".into(),
                spiffe_id: a.requester.to_string(),
                task_id: a.task_id.to_string(),
                credential_id: credential.to_owned(),
                resource: a.grant.resource.clone(),
                action: a.grant.action.clone(),
                detail: format!("approval_id={}", a.id),
                ..Default::default()
            },
        );
        Ok(())
    }

    pub fn is_approver(&self, caller: &SpiffeId) -> bool {
        self.limits.approver_ids.contains(caller)
    }

    /// `Admin.Approve` (`approve = true`) and `Admin.Deny`.
    pub async fn decide_approval(
        &self,
        caller: &SpiffeId,
        approval_id: &str,
        reason: &str,
        approve: bool,
    ) -> Result<Approval> {
        if !self.is_approver(caller) {
            return Err(Error::PermissionDenied(format!(
                "{caller} is not an approver of this broker"
            )));
        }
        // A block holds for every role.
        self.check_caller(caller).await?;
        self.writable()?;
        if reason.len() > MAX_REASON_LEN {
            return Err(Error::invalid(
                "reason",
                format!("is {} bytes; at most {MAX_REASON_LEN}", reason.len()),
            ));
        }
        let id = ApprovalId::parse(approval_id)?;
        let a = self
            .store
            .get_approval(&id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("approval {id}")))?;
        let mut u = self.store.begin().await?;
        let r = self
            .decide_approval_in(&mut u, caller, a, reason, approve)
            .await;
        self.finish(u, r).await
    }

    pub(super) async fn decide_approval_in(
        &self,
        u: &mut Tx<'_>,
        caller: &SpiffeId,
        a: Approval,
        reason: &str,
        approve: bool,
    ) -> Result<Approval> {
        let id = a.id.clone();
        u.lock_task(&a.task_id).await?;
        // Re-read under the task's lock: an issuance may have used it meanwhile.
        let mut a = self
            .store
            .get_approval(&id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("approval {id}")))?;
        if &a.requester == caller || a.delegation_chain.contains(caller) {
            self.audit(
                u,
                Event {
                    kind: "approval_refused".into(),
                    actor: caller.to_string(),
                    task_id: a.task_id.to_string(),
                    reason: "self-approval".into(),
                    detail: format!("approval_id={id}"),
                    ..Default::default()
                },
            );
            return Err(Error::PermissionDenied(format!(
                "{caller} asked for this (or delegated the task that did) and may not decide it"
            )));
        }
        let now = self.now();
        let (state, expired) = a.effective_state(now);
        if expired {
            return Err(Error::FailedPrecondition(format!(
                "approval {id} has expired; the agent must ask again"
            )));
        }
        if state != crate::model::ApprovalState::Pending {
            return Err(Error::FailedPrecondition(format!(
                "approval {id} is already {}",
                state.as_str()
            )));
        }
        let task = self
            .store
            .get_task(&a.task_id)
            .await?
            .filter(|t| t.is_live(now))
            .ok_or_else(|| {
                Error::FailedPrecondition(format!("the task of approval {id} is no longer active"))
            })?;
        a.state = if approve {
            ApprovalState::Approved
        } else {
            ApprovalState::Denied
        };
        a.decided_by = Some(caller.clone());
        a.decided_at = Some(now);
        a.reason = reason.to_owned();
        if approve {
            a.expires_at = (now + self.limits.approval_ttl_ms).min(task.expires_at);
        }
        u.put_approval(&a).await?;
        self.audit(
            u,
            Event {
                kind: if approve {
                    "approval_granted"
                } else {
                    "approval_denied"
                }
                .into(),
                actor: caller.to_string(),
                spiffe_id: a.requester.to_string(),
                task_id: a.task_id.to_string(),
                resource: a.grant.resource.clone(),
                action: a.grant.action.clone(),
                reason: preview(reason),
                purpose: a.purpose.clone(),
                detail: format!("approval_id={id}"),
                ..Default::default()
            },
        );
        Ok(a)
    }

    /// `Admin.ListApprovals`: operators and approvers may list; `state` filters (empty = all).
    pub async fn list_approvals(&self, caller: &SpiffeId, state: &str) -> Result<Vec<Approval>> {
        if !self.is_admin(caller) && !self.is_approver(caller) {
            return Err(Error::PermissionDenied(format!(
                "{caller} is neither an operator nor an approver of this broker"
            )));
        }
        self.check_caller(caller).await?;
        let now = self.now();
        let want = match state.to_ascii_uppercase().as_str() {
            "" => None,
            s @ ("PENDING" | "APPROVED" | "DENIED" | "USED" | "EXPIRED") => Some(s.to_owned()),
            _ => {
                return Err(Error::invalid(
                    "state",
                    format!(
                        "{} is not one of PENDING, APPROVED, DENIED, USED, EXPIRED",
                        preview(state)
                    ),
                ));
            }
        };
        Ok(self
            .store
            .list_approvals()
            .await?
            .into_iter()
            .filter(|a| {
                let (s, expired) = a.effective_state(now);
                let name = if expired { "EXPIRED" } else { s.as_str() };
                want.as_deref().is_none_or(|w| w == name)
            })
            .collect())
    }
}
