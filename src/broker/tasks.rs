//! Tasks: creation (the one path for `StartTask`, `DelegateTask` and the OAuth grants),
//! completion and the end of a task with its credentials. Delegation is in `delegation.rs`.

use super::*;

/// How a task ends when it runs out: EXPIRED, its credentials revoked as expired.
pub(super) const EXPIRED: (TaskState, RevokeReason) = (TaskState::Expired, RevokeReason::Expired);
/// How a task ends when its owner completes it.
pub(super) const COMPLETED: (TaskState, RevokeReason) =
    (TaskState::Completed, RevokeReason::Completed);

component!(
    /// Tasks: creation (the one path), completion, delegation, the cascade to descendants.
    Tasks { approvals: approvals::Approvals, credentials: credentials::Credentials }
);

impl Tasks {
    /// `Broker.StartTask`.
    pub async fn start_task(&self, caller: &SpiffeId, req: StartTask) -> Result<Task> {
        self.check_caller(caller).await?;
        self.writable()?;
        self.check_purpose(&req.purpose)?;
        self.check_grants(&req.grants)?;
        let ttl_ms = self.task_ttl_ms(req.ttl_seconds)?;
        let labels = Core::validate_labels(&req.labels)?;
        let idem = Core::check_idempotency_key(&req.idempotency_key)?;
        let mut u = self.store.begin().await?;
        let r = self
            .create_task(
                &mut u,
                NewTask {
                    owner: caller,
                    purpose: req.purpose,
                    grants: &req.grants,
                    labels,
                    ttl_ms,
                    idempotency_key: idem,
                    parent: None,
                    chain: vec![caller.clone()],
                },
            )
            .await;
        let r = match r {
            Ok((task, true)) => {
                self.audit(
                    &mut u,
                    Event {
                        kind: "task_started".into(),
                        spiffe_id: caller.to_string(),
                        task_id: task.id.to_string(),
                        purpose: task.purpose.clone(),
                        detail: format!("expires_at={}", task.expires_at),
                        ..Default::default()
                    },
                );
                Ok(task)
            }
            Ok((task, false)) => Ok(task),
            Err(e) => Err(e),
        };
        self.finish(u, r).await
    }

    /// The one path that creates a task (`StartTask`, `DelegateTask`, the OAuth grants): under
    /// its owner's lock, it refuses a blocked owner, answers a repeated idempotency key with the
    /// task it made, holds the owner's quota of live tasks, decides every grant (recorded in
    /// `u`), asks for the approvals policy wants, and writes the task. Returns the task and
    /// whether it is new; the caller records how it came to be.
    pub(crate) async fn create_task(&self, u: &mut Tx<'_>, n: NewTask<'_>) -> Result<(Task, bool)> {
        let owner = n.owner;
        let delegated = n.parent.is_some();
        let whose = if delegated { "delegate " } else { "" };
        if u.lock_identity(owner).await?.blocked {
            return Err(Error::PermissionDenied(format!(
                "{whose}{owner} is blocked by an operator"
            )));
        }
        if let Some(key) = &n.idempotency_key
            && let Some(id) = self.store.task_by_idempotency_key(owner, key).await?
            && let Some(task) = self.store.get_task(&id).await?
        {
            return Ok((task, false));
        }
        let now = self.now();
        self.check_task_quota(owner, now, whose).await?;
        let id = TaskId::generate();
        let ctx = DecideCtx {
            task: None,
            new_task: Some(&id),
            purpose: &n.purpose,
            labels: &n.labels,
            requested_ttl_ms: n.ttl_ms,
            chain: &n.chain,
            approved: false,
        };
        let whom = if delegated {
            format!(" for delegate {owner}")
        } else {
            String::new()
        };
        let decided = self.decide_grants(u, owner, n.grants, &ctx, &whom)?;
        let needing: Vec<(Grant, Vec<String>)> = decided
            .iter()
            .filter(|(g, _)| g.decision == Decision::NeedsApproval)
            .map(|(g, ids)| (g.grant.clone(), ids.clone()))
            .collect();
        let mut task = Task {
            id,
            owner: owner.clone(),
            purpose: n.purpose,
            grants: decided.into_iter().map(|(g, _)| g).collect(),
            labels: n.labels,
            state: TaskState::Active,
            created_at: now,
            expires_at: now + n.ttl_ms,
            ended_at: None,
            purge_at: None,
            parent: n.parent,
            delegation_chain: n.chain,
            idempotency_key: n.idempotency_key,
        };
        for (g, ids) in needing {
            self.approvals
                .request_approval(u, &mut task, &g, ids, now)
                .await?;
        }
        match u.insert_task(&task).await? {
            Inserted::New => Ok((task, true)),
            Inserted::Existing(id) => {
                let task = self
                    .store
                    .get_task(&id)
                    .await?
                    .ok_or_else(|| Error::Storage(format!("idempotency key points at {id}")))?;
                Ok((task, false))
            }
        }
    }

    /// `RESOURCE_EXHAUSTED` when `who` already has its maximum of live tasks (its own and those
    /// delegated to it alike). The caller holds `who`'s lock, so the count cannot go stale
    /// before the new task is written. `whose` prefixes the message ("delegate ").
    pub(super) async fn check_task_quota(
        &self,
        who: &SpiffeId,
        now: UnixMillis,
        whose: &str,
    ) -> Result<()> {
        let mut live = 0u64;
        for id in self.store.tasks_of_identity(who).await? {
            if self
                .store
                .get_task(&id)
                .await?
                .is_none_or(|t| t.is_live(now))
            {
                live += 1;
            }
        }
        if live >= self.limits.max_active_tasks_per_identity {
            return Err(Error::ResourceExhausted(format!(
                "{whose}{who} already has {live} active tasks (limit {}); complete some first",
                self.limits.max_active_tasks_per_identity
            )));
        }
        Ok(())
    }

    /// `Broker.GetTask`.
    pub async fn get_task(&self, caller: &SpiffeId, task_id: &str) -> Result<Task> {
        self.check_caller(caller).await?;
        let id = TaskId::parse(task_id)?;
        let mut t = self.owned_task(caller, &id).await?;
        t.state = t.effective_state(self.now());
        Ok(t)
    }

    /// Ends a task and every credential of it, in `u` (which holds the task's lock): the task's
    /// new state, and the reason its credentials are revoked for (e.g. [`EXPIRED`]).
    pub(super) async fn end_task(
        &self,
        u: &mut Tx<'_>,
        task: &mut Task,
        (state, reason): (TaskState, RevokeReason),
        now: UnixMillis,
        out: &mut Completed,
    ) -> Result<()> {
        for cid in self.store.credentials_of_task(&task.id).await? {
            if self
                .credentials
                .end_credential(u, &cid, CredentialState::Revoked, reason, now)
                .await?
            {
                out.revoked_credentials.push(cid);
            }
        }
        task.state = state;
        task.ended_at = Some(now);
        task.purge_at = Some(now.saturating_add(self.limits.ended_retention_ms));
        u.update_task(task).await?;
        out.ended_tasks.push(task.id.clone());
        self.audit(
            u,
            Event {
                kind: "task_ended".into(),
                spiffe_id: task.owner.to_string(),
                task_id: task.id.to_string(),
                reason: reason.as_str().into(),
                ..Default::default()
            },
        );
        Ok(())
    }

    /// `Broker.CompleteTask`: revokes every credential of the task and ends its descendants,
    /// in one unit of work. Completing a task that is already completed succeeds with nothing
    /// to revoke, so retries are safe.
    pub async fn complete_task(&self, caller: &SpiffeId, task_id: &str) -> Result<Completed> {
        self.check_caller(caller).await?;
        self.writable()?;
        let id = TaskId::parse(task_id)?;
        let mut u = self.store.begin().await?;
        let r = self.complete_in(&mut u, caller, &id).await;
        self.finish(u, r).await
    }

    pub(super) async fn complete_in(
        &self,
        u: &mut Tx<'_>,
        caller: &SpiffeId,
        id: &TaskId,
    ) -> Result<Completed> {
        let mut task = self.lock_owned_task(u, caller, id).await?;
        let now = self.now();
        let mut out = Completed::default();
        match task.effective_state(now) {
            TaskState::Active => {
                self.end_task(u, &mut task, COMPLETED, now, &mut out)
                    .await?;
                self.revoke_descendants(u, id, &mut out).await?;
                Ok(out)
            }
            TaskState::Completed => {
                // A retry, perhaps after a crash between the task's end and its descendants':
                // the cascade is run again (it ends only what is still live).
                self.revoke_descendants(u, id, &mut out).await?;
                Ok(out)
            }
            TaskState::Expired if task.state == TaskState::Active => {
                // Past its expiry but not yet reaped: end it now, as expired.
                self.end_task(u, &mut task, EXPIRED, now, &mut out).await?;
                Err(Error::FailedPrecondition(format!("task {id} is EXPIRED")))
            }
            s => Err(Error::FailedPrecondition(format!(
                "task {id} is {}",
                state_name(s)
            ))),
        }
    }
}
