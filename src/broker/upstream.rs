//! Accounts in upstream systems (DESIGN §8): write-ahead creation, the durable revocation queue
//! and the reconciler.
//!
//! - Creation: the name is recorded as `Creating` and flushed *before* the account exists, so a
//!   crash between the two leaves a name the ledger knows, never an unknown account.
//! - Revocation: ending a credential moves its account from the ledger to the `revocations`
//!   queue in one store step. A worker attempts each entry with a per-attempt timeout and, on
//!   failure, retries with capped exponential backoff, forever: a database that is down for an
//!   hour gets its revocations the moment it is back. Entries survive restarts.
//! - Reconciliation (at start and every `reconcile_interval_seconds`): every account upstream with
//!   the broker's prefix that the ledger does not hold as live is queued for revocation; ledger
//!   entries left by a crash (`Creating` at start, `Live` whose credential has ended) likewise.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;

use super::*;
use crate::audit::Event;
use crate::error::{Error, Result};
use crate::issuers::Issued;
use crate::model::{CredentialId, Revocation, UnixMillis, UpstreamObject, UpstreamState, preview};

/// Revocations claimed (and attempted) per pass.
const CLAIM_BATCH: usize = 64;
/// The worker sleeps at most this long between queue scans (it is woken when work arrives).
const MAX_IDLE: Duration = Duration::from_secs(5);

/// The account name for a credential: the resource's prefix and the credential id's random part.
pub fn account_name(prefix: &str, id: &CredentialId) -> String {
    let s = id.as_str();
    format!("{prefix}{}", s.strip_prefix("crd_").unwrap_or(s))
}

component!(
    /// Upstream accounts: write-ahead creation, the revocation queue and the reconciler.
    Revocations {  }
);

impl Revocations {
    pub(super) fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.revocation.attempt_timeout_ms)
    }

    /// Backoff after `attempts` failures: initial × 2^(attempts−1), capped, with ±20% jitter.
    pub(super) fn backoff_ms(&self, attempts: u32) -> i64 {
        let r = &self.revocation;
        let exp = attempts.saturating_sub(1).min(30);
        let base = r
            .backoff_initial_ms
            .saturating_mul(1u64 << exp)
            .min(r.backoff_max_ms);
        let jitter = rand::thread_rng().gen_range(0.8..1.2);
        ((base as f64) * jitter).max(1.0) as i64
    }

    /// Creates the upstream account for a new credential, write-ahead.
    pub(super) async fn create_upstream(
        &self,
        resource: &str,
        id: &CredentialId,
        action: &str,
        now: UnixMillis,
        expires_at: UnixMillis,
    ) -> Result<(String, Issued)> {
        let up = self.upstreams.get(resource).cloned().ok_or_else(|| {
            Error::Internal(format!("resource {resource} has no upstream configured"))
        })?;
        let name = account_name(up.prefix(), id);
        // Write-ahead: the name is durable before the account exists.
        let mut u = self.store.begin().await?;
        u.put_upstream(&UpstreamObject {
            resource: resource.to_owned(),
            name: name.clone(),
            credential_id: id.clone(),
            state: UpstreamState::Creating,
            created_at: now,
            expires_at,
        })
        .await?;
        u.commit().await?;
        crate::failpoint::hit("issue-after-intent");
        let made = match tokio::time::timeout(
            self.attempt_timeout(),
            up.create(&name, action, expires_at),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Error::Unavailable(format!(
                "resource {resource}: creating the account timed out after {} ms",
                self.revocation.attempt_timeout_ms
            ))),
        };
        match made {
            Ok(issued) => {
                crate::failpoint::hit("issue-after-create");
                Ok((name, issued))
            }
            Err(e) => {
                // Whatever part of it may exist is cleaned up by the queue. The database's own
                // words (role names, SQL, certificate problems) are for operators, not agents:
                // the agent gets a reference to find them in the log.
                let reference = hex::encode(rand::random::<[u8; 4]>());
                tracing::warn!(resource, account = %name, error = %e, reference = %reference, "upstream account creation failed");
                let mut u = self.store.begin().await?;
                self.queue_upstream_revocation(
                    &mut u,
                    resource,
                    &name,
                    Some(id.clone()),
                    "creation-failed",
                    now,
                )
                .await?;
                u.commit().await?;
                Err(Error::Unavailable(format!(
                    "resource {resource}: the upstream could not make the credential now; try \
                     again later (operators: the broker log has the cause under reference \
                     {reference})"
                )))
            }
        }
    }

    /// Moves an account from the ledger to the revocation queue (one store step) in `u` and
    /// wakes the worker.
    pub(super) async fn queue_upstream_revocation(
        &self,
        u: &mut Tx<'_>,
        resource: &str,
        name: &str,
        credential_id: Option<CredentialId>,
        reason: &str,
        now: UnixMillis,
    ) -> Result<()> {
        u.queue_revocation(&Revocation {
            resource: resource.to_owned(),
            name: name.to_owned(),
            credential_id,
            reason: reason.to_owned(),
            enqueued_at: now,
            attempts: 0,
            next_attempt_at: now,
            last_error: None,
        })
        .await?;
        self.audit(
            u,
            Event {
                kind: "upstream_revocation_queued".into(),
                resource: resource.to_owned(),
                reason: reason.to_owned(),
                detail: format!("account {name}"),
                ..Default::default()
            },
        );
        self.revoke_wake.notify_one();
        Ok(())
    }

    /// Queue depth and the age in seconds of the oldest entry (for metrics).
    pub async fn revocation_debt(&self) -> (usize, f64) {
        let q = self.store.revocations().await.unwrap_or_default();
        let now = self.now();
        let oldest = q
            .iter()
            .map(|r| now - r.enqueued_at)
            .max()
            .unwrap_or(0)
            .max(0);
        (q.len(), oldest as f64 / 1000.0)
    }

    /// Attempts every due revocation once; returns when the next one is due. Entries are
    /// claimed first (for twice the attempt timeout), so two workers never attempt one at the
    /// same time; each outcome is recorded in one unit of work at the end of the pass.
    pub async fn revoke_due(&self) -> Result<Option<UnixMillis>> {
        let now = self.now();
        let hold = i64::try_from(self.revocation.attempt_timeout_ms)
            .unwrap_or(i64::MAX / 4)
            .saturating_mul(2);
        let claimed = {
            let mut u = self.store.begin().await?;
            let c = u.claim_revocations(now, CLAIM_BATCH, hold).await?;
            u.commit().await?;
            c
        };
        let mut next: Option<UnixMillis> = self
            .store
            .revocations()
            .await?
            .iter()
            .filter(|r| r.next_attempt_at > now)
            .map(|r| r.next_attempt_at)
            .min();
        if claimed.is_empty() {
            return Ok(next);
        }
        if claimed.len() == CLAIM_BATCH {
            next = Some(now);
        }
        // A resource that failed in this pass is not tried again in it (it is probably down).
        let mut failing: HashMap<String, String> = HashMap::new();
        let mut outcomes = Vec::with_capacity(claimed.len());
        for r in claimed {
            let outcome = match (failing.get(&r.resource), self.upstreams.get(&r.resource)) {
                (Some(e), _) => Err(e.clone()),
                (None, None) => Err(format!(
                    "resource {} is not configured (restore it so this account can be dropped)",
                    r.resource
                )),
                (None, Some(up)) => {
                    match tokio::time::timeout(self.attempt_timeout(), up.revoke(&r.name)).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!(
                            "timed out after {} ms",
                            self.revocation.attempt_timeout_ms
                        )),
                    }
                }
            };
            if let Err(e) = &outcome {
                failing
                    .entry(r.resource.clone())
                    .or_insert_with(|| e.clone());
            } else {
                crate::failpoint::hit("revoke-after-drop");
            }
            outcomes.push((r, outcome));
        }
        let mut u = self.store.begin().await?;
        for (mut r, outcome) in outcomes {
            match outcome {
                Ok(()) => {
                    // Whoever removes the entry records the revocation, once.
                    if u.remove_revocation(&r.resource, &r.name).await? {
                        self.audit(
                            &mut u,
                            Event {
                                kind: "upstream_revoked".into(),
                                resource: r.resource.clone(),
                                credential_id: r
                                    .credential_id
                                    .as_ref()
                                    .map(|c| c.to_string())
                                    .unwrap_or_default(),
                                reason: r.reason.clone(),
                                detail: format!(
                                    "account {} after {} failed attempts",
                                    r.name, r.attempts
                                ),
                                ..Default::default()
                            },
                        );
                        tracing::info!(resource = %r.resource, account = %r.name, attempts = r.attempts, "upstream account revoked");
                    }
                }
                Err(e) => {
                    r.attempts = r.attempts.saturating_add(1);
                    r.next_attempt_at = now + self.backoff_ms(r.attempts);
                    r.last_error = Some(preview(&e));
                    tracing::warn!(resource = %r.resource, account = %r.name, attempts = r.attempts,
                        retry_in_ms = r.next_attempt_at - now, error = %e, "upstream revocation failed; will retry");
                    u.update_revocation(&r).await?;
                    next = Some(next.map_or(r.next_attempt_at, |n| n.min(r.next_attempt_at)));
                }
            }
        }
        u.commit().await?;
        Ok(next)
    }

    /// The revocation worker: runs until `stop` turns true.
    pub async fn run_revocations(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let next = match self.revoke_due().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "revocation pass failed");
                    Some(self.now() + 1000)
                }
            };
            let wait = next.map_or(MAX_IDLE, |at| {
                Duration::from_millis((at - self.now()).max(0) as u64).min(MAX_IDLE)
            });
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.revoke_wake.notified() => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
        }
    }

    /// Queues ledger entries whose account should no longer exist: `Live` entries whose
    /// credential has ended without reaching the queue and, when `creating_too`, `Creating`
    /// entries (only safe when no issuance can be in flight). `who` prefixes the reason.
    pub(super) async fn queue_dead_ledger_entries(
        &self,
        u: &mut Tx<'_>,
        creating_before: Option<UnixMillis>,
        who: &str,
    ) -> Result<usize> {
        let now = self.now();
        let mut n = 0;
        for o in self.store.upstream_objects().await? {
            let why = match o.state {
                UpstreamState::Creating if creating_before.is_some_and(|t| o.created_at < t) => {
                    "creation interrupted"
                }
                UpstreamState::Creating => continue,
                UpstreamState::Live
                    if self
                        .store
                        .get_credential(&o.credential_id)
                        .await?
                        .is_some_and(|c| c.is_live(now)) =>
                {
                    continue;
                }
                UpstreamState::Live => "credential no longer live",
            };
            self.queue_upstream_revocation(
                u,
                &o.resource,
                &o.name,
                Some(o.credential_id),
                &format!("{who}: {why}"),
                now,
            )
            .await?;
            n += 1;
        }
        Ok(n)
    }

    /// On an engine other replicas share: `Creating` entries made before this time belong to a
    /// creation that cannot still be running anywhere (two attempt timeouts). Alone on its
    /// engine the broker knows its own creations, so `None`.
    fn stale_creations(&self) -> Option<UnixMillis> {
        self.store.shared().then(|| {
            let grace = i64::try_from(self.attempt_timeout().as_millis())
                .unwrap_or(i64::MAX)
                .saturating_mul(2);
            self.now().saturating_sub(grace)
        })
    }

    /// Queues what a crash left in the ledger: `Creating` entries and `Live` entries whose
    /// credential has ended. Alone on its engine, no issuance is in flight before the server
    /// accepts calls, so every `Creating` entry was interrupted; on an engine other replicas
    /// share, only those older than two attempt timeouts are (younger ones may be in creation
    /// elsewhere right now; the reconciler finds them later if not). Runs before serving;
    /// needs only the store, so it works while the upstream is down.
    pub async fn recover_upstream_ledger(&self) -> Result<usize> {
        let before = self.stale_creations().unwrap_or(UnixMillis::MAX);
        let mut u = self.store.begin().await?;
        let n = self
            .queue_dead_ledger_entries(&mut u, Some(before), "recovery")
            .await;
        self.finish(u, n).await
    }

    /// Compares upstream accounts with the ledger and queues every account with the broker's
    /// prefix that the ledger neither holds (live or being created) nor has queued. Returns how
    /// many accounts were queued.
    pub async fn reconcile(&self) -> Result<usize> {
        let mut u = self.store.begin().await?;
        let r = self.reconcile_in(&mut u).await;
        self.finish(u, r).await
    }

    pub(super) async fn reconcile_in(&self, u: &mut Tx<'_>) -> Result<usize> {
        let mut n = 0;
        for (resource, up) in &self.upstreams {
            let names = match tokio::time::timeout(self.attempt_timeout(), up.list()).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    tracing::warn!(resource = %resource, error = %e, "reconciler cannot list upstream accounts; will try again");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(resource = %resource, "reconciler timed out listing upstream accounts; will try again");
                    continue;
                }
            };
            // Read the ledger *after* listing: an account is created only after its name is
            // in the ledger, so every listed account made by this broker is known by now.
            let mut known: HashSet<String> = self
                .store
                .upstream_objects()
                .await?
                .into_iter()
                .filter(|o| o.resource == *resource)
                .map(|o| o.name)
                .collect();
            known.extend(
                self.store
                    .revocations()
                    .await?
                    .into_iter()
                    .filter(|r| r.resource == *resource)
                    .map(|r| r.name),
            );
            let now = self.now();
            for name in names {
                if known.contains(&name) {
                    continue;
                }
                tracing::warn!(resource = %resource, account = %name, "upstream account unknown to the ledger; queued for removal");
                self.queue_upstream_revocation(
                    u,
                    resource,
                    &name,
                    None,
                    "reconciler: unknown to the ledger",
                    now,
                )
                .await?;
                n += 1;
            }
        }
        n += self
            .queue_dead_ledger_entries(u, self.stale_creations(), "reconciler")
            .await?;
        Ok(n)
    }

    /// Runs the reconciler at start and then every `reconcile_interval_seconds` until `stop`.
    pub async fn run_reconciler(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        if self.upstreams.is_empty()
            && self
                .store
                .upstream_objects()
                .await
                .is_ok_and(|o| o.is_empty())
        {
            return;
        }
        loop {
            match self.reconcile().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    queued = n,
                    "reconciler queued upstream accounts for removal"
                ),
                Err(e) => tracing::error!(error = %e, "reconciliation failed"),
            }
            let every = Duration::from_secs(self.revocation.reconcile_interval_seconds);
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
        }
    }
}
