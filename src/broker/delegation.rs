//! Delegation (DESIGN §5): a task's owner hands another SPIFFE ID a subset of its allowed
//! grants, for no longer than its own remaining life, up to a configured depth. Policy decides
//! again with the delegate as principal and the chain in context. Ending a task ends every
//! descendant (reason `cascade`).

use std::collections::{BTreeMap, HashSet};

use super::{Broker, Completed, DecideCtx, secs_to_ms};
use crate::audit::Event;
use crate::error::{Error, Result};
use crate::model::{Decision, Grant, RevokeReason, SpiffeId, Task, TaskId, TaskState};

/// A `DelegateTask` request, already decoded from the wire.
#[derive(Clone, Debug, Default)]
pub struct DelegateTask {
    pub parent_task_id: String,
    pub delegate_spiffe_id: String,
    pub purpose: String,
    pub grants: Vec<Grant>,
    pub ttl_seconds: u32,
}

impl Broker {
    /// `Broker.DelegateTask`.
    pub async fn delegate_task(&self, caller: &SpiffeId, req: DelegateTask) -> Result<Task> {
        self.check_caller(caller)?;
        self.writable()?;
        let parent_id =
            TaskId::parse(&req.parent_task_id).map_err(|e| rename_field(e, "parent_task_id"))?;
        let delegate = SpiffeId::parse("delegate_spiffe_id", &req.delegate_spiffe_id)?;
        if &delegate == caller {
            return Err(Error::invalid("delegate_spiffe_id", "is the caller itself"));
        }
        self.check_caller(&delegate)
            .map_err(|e| Error::PermissionDenied(format!("delegate {delegate}: {e}")))?;
        self.check_purpose(&req.purpose)?;
        self.check_grants(&req.grants)?;

        // The parent's lock, and the delegate's: the new task counts against its quota.
        let _guards = self.lock_task_and_identity(&parent_id, &delegate).await;
        let parent = self.owned_task(caller, &parent_id)?;
        let now = self.now();
        self.check_task_quota(&delegate, now, "delegate ")?;
        if !parent.is_live(now) {
            return Err(Error::FailedPrecondition(format!(
                "task {parent_id} is {}",
                super::state_name(parent.effective_state(now))
            )));
        }
        if parent.delegation_chain.iter().any(|id| id == &delegate) {
            return Err(Error::invalid(
                "delegate_spiffe_id",
                format!("{delegate} is already in the delegation chain"),
            ));
        }
        let depth = parent.delegation_chain.len() as u32; // the child's depth
        if depth > self.limits.max_delegation_depth {
            return Err(Error::PermissionDenied(format!(
                "delegation depth {depth} is above the configured maximum of {}",
                self.limits.max_delegation_depth
            )));
        }
        for (i, g) in req.grants.iter().enumerate() {
            let held = parent
                .grants
                .iter()
                .any(|p| &p.grant == g && p.decision == Decision::Allowed);
            if !held {
                return Err(Error::PermissionDenied(format!(
                    "grants[{i}] ({}, {}) is not an allowed grant of task {parent_id}; a delegate \
                     gets a subset of its parent's grants only",
                    g.resource, g.action
                )));
            }
        }
        let remaining = parent.expires_at - now;
        let ttl_ms = match req.ttl_seconds {
            0 => remaining,
            t if secs_to_ms(u64::from(t)) > remaining => {
                return Err(Error::invalid(
                    "ttl_seconds",
                    format!(
                        "{t} is longer than the parent task's remaining {} seconds",
                        remaining / 1000
                    ),
                ));
            }
            t => secs_to_ms(u64::from(t)),
        };
        let mut chain = parent.delegation_chain.clone();
        chain.push(delegate.clone());
        let labels: BTreeMap<String, String> = parent.labels.clone();
        let ctx = DecideCtx {
            task: None,
            purpose: &req.purpose,
            labels: &labels,
            requested_ttl_ms: ttl_ms,
            chain: &chain,
            approved: false,
        };
        let decided = self
            .decide_grants(
                &delegate,
                &req.grants,
                &ctx,
                &format!(" for delegate {delegate}"),
            )
            .await?;
        let mut child = Task {
            id: TaskId::generate(),
            owner: delegate.clone(),
            purpose: req.purpose,
            grants: decided.iter().map(|(g, _)| g.clone()).collect(),
            labels,
            state: TaskState::Active,
            created_at: now,
            expires_at: now + ttl_ms,
            ended_at: None,
            purge_at: None,
            parent: Some(parent_id.clone()),
            delegation_chain: chain,
            idempotency_key: None,
        };
        for (g, ids) in decided
            .into_iter()
            .filter(|(g, _)| g.decision == Decision::NeedsApproval)
        {
            self.request_approval(&mut child, &g.grant, ids, now)?;
        }
        self.store.create_task(&child)?;
        self.audit(Event {
            kind: "task_delegated".into(),
            actor: caller.to_string(),
            spiffe_id: delegate.to_string(),
            task_id: child.id.to_string(),
            purpose: child.purpose.clone(),
            delegation_chain: child
                .delegation_chain
                .iter()
                .map(|c| c.to_string())
                .collect(),
            detail: format!("parent={parent_id} expires_at={}", child.expires_at),
            ..Default::default()
        })?;
        self.store.durable().await?;
        Ok(child)
    }

    /// Ends every live descendant of a task, depth first. Takes each child's lock in turn (never
    /// while holding the parent's), so it cannot deadlock with issuance.
    pub(crate) async fn revoke_descendants(
        &self,
        root: &TaskId,
        out: &mut Completed,
    ) -> Result<()> {
        let mut stack = self.store.children_of(root)?;
        let mut seen = HashSet::new();
        while let Some(id) = stack.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            {
                let _guard = self.lock_task(&id).lock().await;
                if let Some(mut t) = self.store.get_task(&id)?
                    && t.state == TaskState::Active
                {
                    self.end_task(
                        &mut t,
                        TaskState::Revoked,
                        RevokeReason::Cascade,
                        self.now(),
                        out,
                    )?;
                }
            }
            stack.extend(self.store.children_of(&id)?);
        }
        Ok(())
    }
}

fn rename_field(e: Error, field: &str) -> Error {
    match e {
        Error::InvalidArgument { reason, .. } => Error::InvalidArgument {
            field: field.into(),
            reason,
        },
        e => e,
    }
}
