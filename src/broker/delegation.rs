//! Delegation (DESIGN §5): a task's owner hands another SPIFFE ID a subset of its allowed
//! grants, for no longer than its own remaining life, up to a configured depth. Policy decides
//! again with the delegate as principal and the chain in context. Ending a task ends every
//! descendant (reason `cascade`).

use std::collections::HashSet;

use super::*;
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

impl Tasks {
    /// `Broker.DelegateTask`.
    pub async fn delegate_task(&self, caller: &SpiffeId, req: DelegateTask) -> Result<Task> {
        self.check_caller(caller).await?;
        self.writable()?;
        let parent_id =
            TaskId::parse(&req.parent_task_id).map_err(|e| rename_field(e, "parent_task_id"))?;
        let delegate = SpiffeId::parse("delegate_spiffe_id", &req.delegate_spiffe_id)?;
        if &delegate == caller {
            return Err(Error::invalid("delegate_spiffe_id", "is the caller itself"));
        }
        self.check_caller(&delegate)
            .await
            .map_err(|e| Error::PermissionDenied(format!("delegate {delegate}: {e}")))?;
        self.check_purpose(&req.purpose)?;
        self.check_grants(&req.grants)?;
        let mut u = self.store.begin().await?;
        let r = self
            .delegate_in(&mut u, caller, &parent_id, &delegate, req)
            .await;
        self.finish(u, r).await
    }

    pub(super) async fn delegate_in(
        &self,
        u: &mut Tx<'_>,
        caller: &SpiffeId,
        parent_id: &TaskId,
        delegate: &SpiffeId,
        req: DelegateTask,
    ) -> Result<Task> {
        // The delegate's lock first (the new task counts against its quota; `create_task` takes
        // it), then the parent's: the lock order of every unit of work.
        u.lock_identity(delegate).await?;
        let parent = self.lock_owned_task(u, caller, parent_id).await?;
        let now = self.now();
        if !parent.is_live(now) {
            return Err(Error::FailedPrecondition(format!(
                "task {parent_id} is {}",
                super::state_name(parent.effective_state(now))
            )));
        }
        if parent.delegation_chain.iter().any(|id| id == delegate) {
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
        let (child, _) = self
            .create_task(
                u,
                NewTask {
                    owner: delegate,
                    purpose: req.purpose,
                    grants: &req.grants,
                    labels: parent.labels.clone(),
                    ttl_ms,
                    idempotency_key: None,
                    parent: Some(parent_id.clone()),
                    chain,
                },
            )
            .await?;
        self.audit(
            u,
            Event {
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
            },
        );
        Ok(child)
    }

    /// Ends every live descendant of a task, depth first, in `u`: each child is locked after
    /// its parent (the lock order), and stays locked until the unit commits.
    pub(crate) async fn revoke_descendants(
        &self,
        u: &mut Tx<'_>,
        root: &TaskId,
        out: &mut Completed,
    ) -> Result<()> {
        let mut stack = self.store.children_of(root).await?;
        let mut seen = HashSet::new();
        while let Some(id) = stack.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            if let Some(mut t) = u.lock_task(&id).await?
                && t.state == TaskState::Active
            {
                let end = (TaskState::Revoked, RevokeReason::Cascade);
                self.end_task(u, &mut t, end, self.now(), out).await?;
            }
            stack.extend(self.store.children_of(&id).await?);
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
