//! Credentials: the one issuance path (`IssueCredential`, the OAuth token endpoint, gateway tool
//! calls), replay of an idempotency key, the end of a credential, revocation, introspection and
//! X.509 status.

use super::*;

/// What an issuance asks for: a grant of the task, for `ttl_s` seconds (no longer than the task
/// nor `not_after`), with an idempotency key and a `binding` recorded with the credential (see
/// [`crate::issuers::IssueRequest::binding`]).
pub(crate) struct Issuance {
    pub grant: Grant,
    pub ttl_s: u64,
    pub idempotency_key: Option<String>,
    pub not_after: Option<UnixMillis>,
    pub binding: BTreeMap<String, String>,
}

/// A credential to make for a grant already decided: until when, its idempotency key, the
/// approval it uses, and the attributes bound to it.
pub(crate) struct Minting<'a> {
    pub grant: &'a Grant,
    pub expires_at: UnixMillis,
    pub idempotency_key: Option<String>,
    pub approval: Option<crate::model::Approval>,
    pub binding: BTreeMap<String, String>,
    /// The policy decision that allowed it, not yet recorded: the issuance's audit entry
    /// carries it (decision, policies, reason), so an issuance is one entry, not two. If no
    /// credential is made, it is recorded alone. `None` when the caller recorded its own.
    pub allowed: Option<crate::policy::Verdict>,
}

component!(
    /// Credentials: issuance (the one path), replay, ending, revocation, introspection.
    Credentials { approvals: approvals::Approvals, revocations: upstream::Revocations }
);

impl Credentials {
    /// `Broker.IssueCredential`.
    pub async fn issue_credential(
        &self,
        caller: &SpiffeId,
        req: IssueCredential,
    ) -> Result<IssuedCredential> {
        self.check_caller(caller).await?;
        self.writable()?;
        let task_id = TaskId::parse(&req.task_id)?;
        let spec = self.resource("resource", &req.resource)?.clone();
        self.check_action("action", &spec, &req.resource, &req.action)?;
        if spec.inject.as_ref().is_some_and(|i| i.gateway_only) {
            return Err(Error::FailedPrecondition(format!(
                "credentials of resource {} are injected by a gateway only (inject.gateway_only): \
                 call the tool through the gateway with the task id in its task header",
                req.resource
            )));
        }
        let idem = Core::check_idempotency_key(&req.idempotency_key)?;
        let res_max = spec.max_ttl_seconds.min(self.limits.max_ttl_seconds);
        let ttl_s = match u64::from(req.ttl_seconds) {
            0 => self.limits.default_ttl_seconds.min(res_max),
            t if t > res_max => {
                return Err(Error::invalid(
                    "ttl_seconds",
                    format!(
                        "{t} is above the maximum of {res_max} seconds for resource {}",
                        req.resource
                    ),
                ));
            }
            t => t,
        };
        let grant = Grant {
            resource: req.resource,
            action: req.action,
        };
        let mut u = self.store.begin().await?;
        let asked = Issuance {
            grant,
            ttl_s,
            idempotency_key: idem,
            not_after: None,
            binding: BTreeMap::new(),
        };
        let r = self
            .issue_for_task(&mut u, caller, &task_id, &spec, asked)
            .await;
        let issued = self.finish(u, r).await?;
        crate::failpoint::hit("issue-before-reply");
        if issued.fresh {
            self.metrics.issued(&issued.record.kind);
        }
        Ok(issued)
    }

    /// Issues a credential of `caller`'s task as `asked`, deciding it again now: the one path
    /// of `IssueCredential` and the OAuth token endpoint, in the caller's unit of work (which
    /// holds the task's lock from here on).
    pub(crate) async fn issue_for_task<'s>(
        &'s self,
        u: &mut Tx<'s>,
        caller: &SpiffeId,
        task_id: &TaskId,
        spec: &ResourceSpec,
        asked: Issuance,
    ) -> Result<IssuedCredential> {
        let Issuance {
            grant,
            ttl_s,
            idempotency_key: idem,
            not_after,
            binding,
        } = asked;
        let task = self.lock_owned_task(u, caller, task_id).await?;
        if let Some(key) = &idem
            && let Some(cid) = self.store.credential_by_idempotency_key(task_id, key).await?
            // An index entry without its record is what a crash mid-write leaves: not issued.
            && self.store.get_credential(&cid).await?.is_some()
        {
            return self.replay(&cid, &grant).await;
        }
        let now = self.now();
        if !task.is_live(now) {
            return Err(Error::FailedPrecondition(format!(
                "task {task_id} is {}",
                state_name(task.effective_state(now))
            )));
        }
        let Some(granted) = task.grants.iter().find(|g| g.grant == grant) else {
            return Err(Error::PermissionDenied(format!(
                "task {task_id} did not ask for ({}, {}) when it started",
                grant.resource, grant.action
            )));
        };
        if granted.decision == Decision::Denied {
            return Err(Error::PermissionDenied(format!(
                "({}, {}) was denied at task start: {}",
                grant.resource, grant.action, granted.reason
            )));
        }
        // Policy again, now: a reload or the passing of time may have changed the answer.
        let expires_at = (now + secs_to_ms(ttl_s))
            .min(task.expires_at)
            .min(not_after.unwrap_or(i64::MAX));
        if expires_at <= now {
            return Err(Error::FailedPrecondition(
                "the credential would expire at once".into(),
            ));
        }
        let mut ctx = DecideCtx::for_task(&task, expires_at - now);
        let mut v = self.evaluate(caller, &grant, &ctx, None);
        let mut approval = None;
        if v.decision == Decision::NeedsApproval
            && let Some(a) = self.approvals.usable_approval(&task, &grant, now).await?
        {
            self.record_decision(u, caller, &grant, &ctx, &v);
            ctx.approved = true;
            v = self.evaluate(caller, &grant, &ctx, None);
            approval = Some(a);
        }
        if v.decision != Decision::Allowed {
            self.record_decision(u, caller, &grant, &ctx, &v);
        }
        match v.decision {
            // Recorded by `mint_credential`: in the issuance's own entry, or alone if it fails.
            Decision::Allowed => {}
            Decision::Denied => {
                return Err(Error::PermissionDenied(format!(
                    "({}, {}) is not allowed now: {}",
                    grant.resource, grant.action, v.reason
                )));
            }
            Decision::NeedsApproval => {
                let id = self
                    .approvals
                    .pending_or_new_approval(u, &task, &grant, v.policy_ids, now)
                    .await?;
                return Err(Error::NeedsApproval {
                    message: format!(
                        "({}, {}) needs approval: {}",
                        grant.resource, grant.action, v.reason
                    ),
                    approval_id: id.to_string(),
                });
            }
        }
        let minted = Minting {
            grant: &grant,
            expires_at,
            idempotency_key: idem,
            approval,
            binding,
            allowed: Some(v),
        };
        self.mint_credential(u, caller, &task, spec, minted).await
    }

    /// Issues one credential of a task for a grant already decided: the per-task quota, the
    /// issuer, the records, the approval it uses and the audit entry, all in `u` (which holds the
    /// task's lock). An upstream account (PostgreSQL) is made with no lock held: `u` is committed
    /// first (the decisions stay recorded), the account's write-ahead ledger entry is made
    /// durable in a unit of its own, and `u` is replaced by a new unit that locks the task again
    /// and looks at it anew: an ended task, or a quota filled meanwhile, gets the account queued
    /// for removal instead of a credential.
    pub(crate) async fn mint_credential<'s>(
        &'s self,
        u: &mut Tx<'s>,
        caller: &SpiffeId,
        task: &Task,
        spec: &ResourceSpec,
        mut minted: Minting<'_>,
    ) -> Result<IssuedCredential> {
        let grant = minted.grant;
        let mut allowed = minted.allowed.take();
        let r = self
            .mint_in(u, caller, task, spec, minted, &mut allowed)
            .await;
        // No issuance entry took the decision with it: it is recorded on its own.
        self.record_allowed(u, caller, grant, task, &mut allowed);
        r
    }

    /// Records the decision still held in `allowed` (if any) as an entry of its own.
    fn record_allowed(
        &self,
        u: &mut Tx<'_>,
        caller: &SpiffeId,
        grant: &Grant,
        task: &Task,
        allowed: &mut Option<crate::policy::Verdict>,
    ) {
        if let Some(v) = allowed.take() {
            self.record_decision(u, caller, grant, &DecideCtx::for_task(task, 0), &v);
        }
    }

    /// `mint_credential`'s body; takes the decision out of `allowed` where it is recorded.
    async fn mint_in<'s>(
        &'s self,
        u: &mut Tx<'s>,
        caller: &SpiffeId,
        task: &Task,
        spec: &ResourceSpec,
        minted: Minting<'_>,
        allowed: &mut Option<crate::policy::Verdict>,
    ) -> Result<IssuedCredential> {
        let Minting {
            grant,
            expires_at,
            idempotency_key: idem,
            approval,
            binding: extra_attributes,
            allowed: _,
        } = minted;
        let now = self.now();
        let task_id = task.id.clone();
        let indexed = self.store.credentials_of_task(&task_id).await?;
        let mut issued_count = indexed.len() as u64;
        if issued_count >= self.limits.max_credentials_per_task {
            // At the limit by the index: count only credentials whose record exists (a crash
            // mid-write can leave an index entry without its record, which was never issued).
            issued_count = 0;
            for cid in &indexed {
                if self.store.get_credential(cid).await?.is_some() {
                    issued_count += 1;
                }
            }
        }
        if issued_count >= self.limits.max_credentials_per_task {
            return Err(Error::ResourceExhausted(format!(
                "task {task_id} already has {issued_count} credentials (limit {})",
                self.limits.max_credentials_per_task
            )));
        }
        let id = CredentialId::generate();
        let ireq = IssueRequest {
            credential_id: &id,
            task_id: &task_id,
            owner: caller,
            resource: &grant.resource,
            action: &grant.action,
            issued_at: now,
            expires_at,
            delegation_chain: &task.delegation_chain,
            audience: spec.oauth_resource.as_deref().unwrap_or(&grant.resource),
            access_token: spec.oauth_resource.is_some(),
            binding: &extra_attributes,
        };
        let mut upstream_name = None;
        let Issued {
            secret,
            mut attributes,
        } = match spec.kind {
            ResourceKind::Token => token::issue(),
            ResourceKind::Jwt => self.jwt.issue(&ireq)?,
            ResourceKind::X509 => self.x509.issue(&ireq)?,
            ResourceKind::Postgres => {
                // A slow database must not hold up the task's other calls (a completion, the
                // kill switch): no lock is held across the upstream's network I/O.
                self.record_allowed(u, caller, grant, task, allowed);
                let decided = std::mem::replace(u, self.store.begin().await?);
                decided.commit().await?;
                let made = self
                    .revocations
                    .create_upstream(&grant.resource, &id, &grant.action, now, expires_at)
                    .await;
                let task_now = u.lock_task(&task_id).await?;
                let (name, issued) = made?;
                let later = self.now();
                let refusal = if !task_now.is_some_and(|t| t.is_live(later)) {
                    Some(Error::FailedPrecondition(format!(
                        "task {task_id} ended while its credential was being made; the account \
                         is being removed"
                    )))
                } else if self.store.credentials_of_task(&task_id).await?.len() as u64
                    >= self.limits.max_credentials_per_task
                {
                    Some(Error::ResourceExhausted(format!(
                        "task {task_id} reached its limit of {} credentials while this one was \
                         being made; the account is being removed",
                        self.limits.max_credentials_per_task
                    )))
                } else {
                    None
                };
                if let Some(e) = refusal {
                    self.revocations
                        .queue_upstream_revocation(
                            u,
                            &grant.resource,
                            &name,
                            Some(id.clone()),
                            "task-ended",
                            later,
                        )
                        .await?;
                    return Err(e);
                }
                upstream_name = Some(name);
                issued
            }
        };
        attributes.extend(extra_attributes);
        let record = CredentialRecord {
            id,
            task_id,
            owner: caller.clone(),
            resource: grant.resource.clone(),
            action: grant.action.clone(),
            kind: spec.kind.as_str().to_owned(),
            issued_at: now,
            expires_at,
            state: CredentialState::Active,
            ended_at: None,
            end_reason: None,
            idempotency_key: idem,
            attributes,
            delegation_chain: task.delegation_chain.clone(),
        };
        let sealed = self.store.seal_secret(&record.id, &secret)?;
        if let Inserted::Existing(cid) = u.insert_credential(&record, &sealed).await? {
            // The caller holds the task's lock and looked the key up: this is a crash leftover.
            return Err(Error::Storage(format!(
                "idempotency key of task {} already names {cid}",
                record.task_id
            )));
        }
        if let Some(name) = upstream_name {
            u.put_upstream(&UpstreamObject {
                resource: record.resource.clone(),
                name,
                credential_id: record.id.clone(),
                state: UpstreamState::Live,
                created_at: now,
                expires_at,
            })
            .await?;
        }
        if let Some(a) = approval {
            self.approvals
                .use_approval(u, a, record.id.as_str(), now)
                .await?;
        }
        let (decision, policies, reason) = match allowed.take() {
            Some(v) => (decision_name(v.decision).into(), v.policy_ids, v.reason),
            None => Default::default(),
        };
        self.audit(
            u,
            Event {
                kind: "credential_issued".into(),
                decision,
                policies,
                reason,
                spiffe_id: caller.to_string(),
                task_id: record.task_id.to_string(),
                credential_id: record.id.to_string(),
                resource: record.resource.clone(),
                action: record.action.clone(),
                purpose: task.purpose.clone(),
                delegation_chain: task
                    .delegation_chain
                    .iter()
                    .map(|c| c.to_string())
                    .collect(),
                detail: {
                    // Who else acts with it (token exchange) and what it is bound to, in the trail.
                    let mut d = format!("kind={} expires_at={}", record.kind, record.expires_at);
                    for key in [crate::issuers::ATTR_ACTORS, crate::issuers::ATTR_CLIENT_ID] {
                        if let Some(v) = record.attributes.get(key) {
                            d.push_str(&format!(" {key}={v}"));
                        }
                    }
                    if record.attributes.contains_key(crate::issuers::ATTR_CNF) {
                        d.push_str(" cnf=x5t#S256");
                    }
                    d
                },
                ..Default::default()
            },
        );
        Ok(IssuedCredential {
            record,
            secret,
            fresh: true,
        })
    }

    /// Returns the credential an earlier call with the same idempotency key made.
    pub(super) async fn replay(
        &self,
        id: &CredentialId,
        grant: &Grant,
    ) -> Result<IssuedCredential> {
        let record = self
            .store
            .get_credential(id)
            .await?
            .ok_or_else(|| Error::Storage(format!("idempotency key points at missing {id}")))?;
        if record.resource != grant.resource || record.action != grant.action {
            return Err(Error::invalid(
                "idempotency_key",
                format!(
                    "was used for ({}, {}) on this task; use a new key for a different request",
                    record.resource, record.action
                ),
            ));
        }
        let gone = || {
            Error::FailedPrecondition(format!(
                "credential {id} issued for this idempotency key is no longer active"
            ))
        };
        if !record.is_live(self.now()) {
            return Err(gone());
        }
        let secret = self.store.credential_secret(id).await?.ok_or_else(gone)?;
        Ok(IssuedCredential {
            record,
            secret,
            fresh: false,
        })
    }

    /// Ends one credential if it is active, in `u` (which holds its task's lock). Returns
    /// whether it changed.
    pub(super) async fn end_credential(
        &self,
        u: &mut Tx<'_>,
        id: &CredentialId,
        state: CredentialState,
        reason: RevokeReason,
        now: UnixMillis,
    ) -> Result<bool> {
        let Some(mut rec) = self.store.get_credential(id).await? else {
            return Ok(false);
        };
        if rec.state != CredentialState::Active {
            return Ok(false);
        }
        // A credential past its expiry ends as expired, whatever ended it.
        rec.state = if now >= rec.expires_at {
            CredentialState::Expired
        } else {
            state
        };
        rec.ended_at = Some(now);
        rec.end_reason = Some(if rec.state == CredentialState::Expired {
            RevokeReason::Expired
        } else {
            reason
        });
        u.update_credential(&rec).await?;
        if let Some(name) = rec.attributes.get("user")
            && self.upstreams.contains_key(&rec.resource)
        {
            self.revocations
                .queue_upstream_revocation(
                    u,
                    &rec.resource,
                    name,
                    Some(rec.id.clone()),
                    rec.end_reason.map(RevokeReason::as_str).unwrap_or(""),
                    now,
                )
                .await?;
        }
        self.metrics.ended(rec.end_reason.unwrap_or(reason));
        self.audit(
            u,
            Event {
                kind: "credential_ended".into(),
                spiffe_id: rec.owner.to_string(),
                task_id: rec.task_id.to_string(),
                credential_id: rec.id.to_string(),
                resource: rec.resource.clone(),
                action: rec.action.clone(),
                reason: rec
                    .end_reason
                    .map(RevokeReason::as_str)
                    .unwrap_or("")
                    .into(),
                ..Default::default()
            },
        );
        Ok(true)
    }

    /// `Broker.RevokeCredential`: only the owner of the credential's task may revoke it.
    pub async fn revoke_credential(&self, caller: &SpiffeId, credential_id: &str) -> Result<()> {
        self.check_caller(caller).await?;
        self.writable()?;
        let id = CredentialId::parse(credential_id)?;
        let not_found = || Error::NotFound(format!("credential {id}"));
        let rec = self
            .store
            .get_credential(&id)
            .await?
            .ok_or_else(not_found)?;
        if &rec.owner != caller {
            return Err(not_found());
        }
        self.revoke_now(&rec).await
    }

    /// Revokes one credential (if still active) under its task's lock, durably.
    pub(crate) async fn revoke_now(&self, rec: &CredentialRecord) -> Result<()> {
        let mut u = self.store.begin().await?;
        let r = async {
            u.lock_task(&rec.task_id).await?;
            self.end_credential(
                &mut u,
                &rec.id,
                CredentialState::Revoked,
                RevokeReason::Revoked,
                self.now(),
            )
            .await
            .map(|_| ())
        }
        .await;
        self.finish(u, r).await
    }

    /// `Verifier.Introspect`: only verifiers configured for the resource may ask; unknown,
    /// revoked, expired and other-resource credentials all read as inactive.
    pub async fn introspect(
        &self,
        caller: &SpiffeId,
        secret: &str,
        resource: &str,
    ) -> Result<Option<Introspection>> {
        self.check_caller(caller).await?;
        self.require_verifier(caller, resource)?;
        if secret.is_empty() {
            return Err(Error::invalid("secret", "is required"));
        }
        if secret.len() > MAX_SECRET_LEN {
            return Err(Error::invalid(
                "secret",
                format!("is {} bytes; at most {MAX_SECRET_LEN}", secret.len()),
            ));
        }
        Ok(self
            .active_credential(secret)
            .await?
            .filter(|r| r.resource == resource)
            .map(|record| Introspection { record }))
    }

    /// `Verifier.GetX509Authorities`: without a resource, the root that signs every resource's
    /// issuing CA; with one, only that resource's issuing CA.
    pub async fn x509_authorities_pem(&self, caller: &SpiffeId, resource: &str) -> Result<String> {
        self.check_caller(caller).await?;
        if resource.is_empty() {
            return Ok(self.x509.root_pem().to_owned());
        }
        let spec = self.resource("resource", resource)?;
        if spec.kind != ResourceKind::X509 {
            return Err(Error::invalid(
                "resource",
                format!(
                    "{resource} issues {} credentials, not x509",
                    spec.kind.as_str()
                ),
            ));
        }
        self.x509
            .resource_ca_pem(resource)
            .map(str::to_owned)
            .ok_or_else(|| Error::Internal(format!("no issuing CA for resource {resource}")))
    }

    /// `Verifier.X509Status`: what became of the certificate with this serial number. Only
    /// verifiers of the resource may ask; a certificate of another resource, another kind or not
    /// made by this broker reads as unknown.
    pub async fn x509_status(
        &self,
        caller: &SpiffeId,
        resource: &str,
        serial: &str,
    ) -> Result<X509Status> {
        self.check_caller(caller).await?;
        self.require_verifier(caller, resource)?;
        let Some(id) = crate::issuers::x509::credential_of_serial(serial)? else {
            return Ok(X509Status::Unknown);
        };
        let Some(record) = self.store.get_credential(&id).await? else {
            return Ok(X509Status::Unknown);
        };
        if record.resource != resource || record.kind != ResourceKind::X509.as_str() {
            return Ok(X509Status::Unknown);
        }
        let now = self.now();
        let task_live = self
            .store
            .get_task(&record.task_id)
            .await?
            .is_some_and(|t| t.is_live(now));
        Ok(if record.is_live(now) && task_live {
            X509Status::Good(record)
        } else if record.state == CredentialState::Revoked {
            X509Status::Revoked(record)
        } else {
            X509Status::Expired(record)
        })
    }
}
