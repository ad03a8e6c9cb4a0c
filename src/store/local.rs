//! In-process engines: what one process needs to turn a synchronous, write-through key-value
//! engine ([`LocalEngine`]) into the [`Store`] interface. The serialisation points a replicated
//! engine keeps in its database (row locks, claims, leases, the audit head, the kill-switch flag)
//! live here, in this process: correct because an in-process engine is opened by one process
//! only (sled holds a file lock).
//!
//! A unit of work ([`LocalUow`]) writes through to the engine as it goes; its commit appends its
//! audit entries to the chain under the chain's lock, releases its locks and claims, and then
//! waits for the engine's group commit ([`LocalEngine::durable`]). Locks are therefore not held
//! while a flush is awaited: a later unit that reads this one's writes takes its durability
//! ticket after them, so it cannot be acknowledged before them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use tokio::sync::{OwnedMutexGuard, broadcast};

use super::{
    Change, Counts, Expiring, Fut, IdentityRow, Inserted, Lease, SealedSecret, Store, Uow,
    plain_meta_key,
};
use crate::audit::{Anchor, Event, Head};
use crate::error::{Error, Result};
use crate::model::{
    Approval, ApprovalId, ApprovalState, CredentialId, CredentialRecord, Grant, Revocation,
    SpiffeId, Task, TaskId, UnixMillis, UpstreamObject,
};

/// A synchronous key-value engine used by one process. Every write is atomic on its own and
/// applied at once; [`LocalEngine::durable`] resolves when everything written before it is on
/// disk (an engine that keeps nothing on disk resolves at once).
pub trait LocalEngine: Send + Sync + 'static {
    /// The in-process coordination state of this engine.
    fn local(&self) -> &Local;

    fn get_task(&self, id: &TaskId) -> Result<Option<Task>>;
    fn task_by_idempotency_key(&self, owner: &SpiffeId, key: &str) -> Result<Option<TaskId>>;
    fn tasks_of_identity(&self, owner: &SpiffeId) -> Result<Vec<TaskId>>;
    fn children_of(&self, task: &TaskId) -> Result<Vec<TaskId>>;
    fn scan_tasks(&self, after: Option<&TaskId>, limit: usize) -> Result<Vec<Task>>;
    /// Inserts a new task, its owner index entry, its expiry entry, its idempotency key and, for
    /// a delegated task, its parent's children index entry (index entries first).
    fn create_task(&self, task: &Task) -> Result<()>;
    /// Replaces a task record. An ended task leaves the owner index; with `purge_at`, a `Purge`
    /// expiry entry is added.
    fn update_task(&self, task: &Task) -> Result<()>;
    /// Deletes an ended task and everything kept for it, the record last (resumable).
    fn purge_task(&self, id: &TaskId) -> Result<bool>;

    fn get_credential(&self, id: &CredentialId) -> Result<Option<CredentialRecord>>;
    fn credential_sealed(&self, id: &CredentialId) -> Result<Option<Vec<u8>>>;
    fn credential_by_index(&self, index: &[u8; 32]) -> Result<Option<CredentialId>>;
    fn credential_by_idempotency_key(
        &self,
        task: &TaskId,
        key: &str,
    ) -> Result<Option<CredentialId>>;
    fn credentials_of_task(&self, task: &TaskId) -> Result<Vec<CredentialId>>;
    /// Inserts a credential with its sealed secret and its index entries (the record last).
    fn create_credential(&self, rec: &CredentialRecord, secret: &SealedSecret) -> Result<()>;
    /// Replaces a credential record; a record no longer active loses its secret and index.
    fn update_credential(&self, rec: &CredentialRecord) -> Result<()>;

    fn put_approval(&self, a: &Approval) -> Result<()>;
    fn get_approval(&self, id: &ApprovalId) -> Result<Option<Approval>>;
    fn approval_for_grant(&self, task: &TaskId, grant: &Grant) -> Result<Option<ApprovalId>>;
    fn list_approvals(&self) -> Result<Vec<Approval>>;

    /// Sets or clears an identity's block; whether it was set before.
    fn set_blocked(&self, id: &SpiffeId, blocked: bool) -> Result<bool>;
    fn blocked_identities(&self) -> Result<Vec<SpiffeId>>;

    fn put_upstream(&self, o: &UpstreamObject) -> Result<()>;
    fn upstream_objects(&self) -> Result<Vec<UpstreamObject>>;
    fn queue_revocation(&self, r: &Revocation) -> Result<()>;
    /// Replaces a queued revocation; one no longer queued stays gone.
    fn update_revocation(&self, r: &Revocation) -> Result<()>;
    fn remove_revocation(&self, resource: &str, name: &str) -> Result<bool>;
    fn revocations(&self) -> Result<Vec<Revocation>>;

    /// Up to `limit` expiry entries due at or before `now`, earliest first.
    fn due(&self, now: UnixMillis, limit: usize) -> Result<Vec<(UnixMillis, Expiring)>>;
    fn next_due(&self) -> Result<Option<UnixMillis>>;
    fn remove_due(&self, at: UnixMillis, what: &Expiring) -> Result<()>;

    fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    fn meta_put(&self, key: &str, value: &[u8]) -> Result<()>;
    /// Atomically: store `value` if `key` holds `expected` (`None`: absent). Returns what the
    /// key held before (equal to `expected` when the swap happened).
    fn meta_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> Result<Option<Vec<u8>>>;

    fn audit_last(&self) -> Result<Option<Vec<u8>>>;
    fn audit_put(&self, seq: u64, entry: &[u8]) -> Result<()>;
    fn audit_scan(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>>;
    fn audit_remove_through(&self, seq: u64) -> Result<u64>;

    fn counts(&self) -> Result<Counts>;

    /// Resolves when every write made before the call is on disk.
    fn durable(&self) -> Fut<'_, ()>;
}

/// Lock names: identities and tasks live in one table.
fn identity_lock(id: &SpiffeId) -> String {
    format!("i\0{}", id.as_str())
}

fn task_lock(id: &TaskId) -> String {
    format!("t\0{}", id.as_str())
}

/// The in-process coordination state of a [`LocalEngine`].
pub struct Local {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Expiry entries held by a unit of work (the reaper's claims).
    due_claims: Mutex<HashSet<(UnixMillis, Expiring)>>,
    /// Revocations claimed, until when.
    revocation_claims: Mutex<HashMap<(String, String), UnixMillis>>,
    leases: Mutex<HashMap<String, (String, Lease)>>,
    /// The audit chain's head, read from the engine on first use.
    chain: OnceLock<Mutex<Head>>,
    /// The kill-switch set, read from the engine on first use and kept with every change.
    blocked: OnceLock<RwLock<HashSet<SpiffeId>>>,
    /// Serialises the read-check-write of approvals and of compare-and-swaps.
    cas: Mutex<()>,
    changes: broadcast::Sender<Change>,
}

impl Default for Local {
    fn default() -> Self {
        Self {
            locks: Mutex::default(),
            due_claims: Mutex::default(),
            revocation_claims: Mutex::default(),
            leases: Mutex::default(),
            chain: OnceLock::new(),
            blocked: OnceLock::new(),
            cas: Mutex::new(()),
            changes: broadcast::channel(256).0,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Local {
    fn lock_entry(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.locks)
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Forgets a lock nobody else holds or waits for.
    fn release(&self, name: &str, entry: Arc<tokio::sync::Mutex<()>>, guard: OwnedMutexGuard<()>) {
        drop(guard);
        let mut locks = lock(&self.locks);
        // The table's reference and `entry`: nobody else has it.
        if Arc::strong_count(&entry) == 2 {
            locks.remove(name);
        }
    }

    fn chain<E: LocalEngine>(&self, engine: &E) -> Result<&Mutex<Head>> {
        if let Some(c) = self.chain.get() {
            return Ok(c);
        }
        let checkpoint = engine.meta_get(&plain_meta_key(crate::audit::archive::CHECKPOINT_KEY))?;
        let chain = Head::resume(engine.audit_last()?.as_deref(), checkpoint.as_deref())?;
        Ok(self.chain.get_or_init(|| Mutex::new(chain)))
    }

    fn blocked<E: LocalEngine>(&self, engine: &E) -> Result<&RwLock<HashSet<SpiffeId>>> {
        if let Some(b) = self.blocked.get() {
            return Ok(b);
        }
        let set = engine.blocked_identities()?.into_iter().collect();
        Ok(self.blocked.get_or_init(|| RwLock::new(set)))
    }
}

/// A unit of work on a [`LocalEngine`].
pub struct LocalUow<'a, E: LocalEngine> {
    engine: &'a E,
    held: Vec<(String, Arc<tokio::sync::Mutex<()>>, OwnedMutexGuard<()>)>,
    due: Vec<(UnixMillis, Expiring)>,
    audit: Vec<(UnixMillis, Event)>,
    fences: Vec<(String, u64)>,
}

impl<'a, E: LocalEngine> LocalUow<'a, E> {
    fn holds(&self, name: &str) -> bool {
        self.held.iter().any(|(n, _, _)| n == name)
    }

    async fn take(&mut self, name: String) {
        if self.holds(&name) {
            return;
        }
        let entry = self.engine.local().lock_entry(&name);
        let guard = entry.clone().lock_owned().await;
        self.held.push((name, entry, guard));
    }

    fn try_take(&mut self, name: String) -> bool {
        if self.holds(&name) {
            return true;
        }
        let entry = self.engine.local().lock_entry(&name);
        match entry.clone().try_lock_owned() {
            Ok(guard) => {
                self.held.push((name, entry, guard));
                true
            }
            Err(_) => {
                // Not ours: forget the entry if nobody holds it after all.
                let local = self.engine.local();
                let mut locks = lock(&local.locks);
                if Arc::strong_count(&entry) == 2 && entry.try_lock().is_ok() {
                    locks.remove(&name);
                }
                false
            }
        }
    }

    fn check_fences(&self) -> Result<()> {
        let leases = lock(&self.engine.local().leases);
        for (name, epoch) in &self.fences {
            match leases.get(name) {
                Some((_, l)) if l.epoch == *epoch => {}
                _ => {
                    return Err(Error::Unavailable(format!(
                        "the lease {name} (epoch {epoch}) is no longer held by this worker"
                    )));
                }
            }
        }
        Ok(())
    }

    fn end(&mut self) {
        let local = self.engine.local();
        if !self.due.is_empty() {
            let mut claims = lock(&local.due_claims);
            for d in self.due.drain(..) {
                claims.remove(&d);
            }
        }
        for (name, entry, guard) in self.held.drain(..).rev() {
            local.release(&name, entry, guard);
        }
    }
}

impl<E: LocalEngine> Drop for LocalUow<'_, E> {
    fn drop(&mut self) {
        self.end();
    }
}

/// Wraps a synchronous result as the interface's future.
fn ready<'a, T: Send + 'a>(r: Result<T>) -> Fut<'a, T> {
    Box::pin(std::future::ready(r))
}

impl<'a, E: LocalEngine> Uow<'a> for LocalUow<'a, E> {
    fn lock_identity<'b>(&'b mut self, id: &'b SpiffeId) -> Fut<'b, IdentityRow> {
        Box::pin(async move {
            self.take(identity_lock(id)).await;
            let blocked = self.engine.local().blocked(self.engine)?;
            let blocked = blocked
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(id);
            Ok(IdentityRow { blocked })
        })
    }

    fn lock_task<'b>(&'b mut self, id: &'b TaskId) -> Fut<'b, Option<Task>> {
        Box::pin(async move {
            self.take(task_lock(id)).await;
            self.engine.get_task(id)
        })
    }

    fn try_lock_task<'b>(&'b mut self, id: &'b TaskId) -> Fut<'b, Option<Option<Task>>> {
        let r = if self.try_take(task_lock(id)) {
            self.engine.get_task(id).map(Some)
        } else {
            Ok(None)
        };
        ready(r)
    }

    fn insert_task<'b>(&'b mut self, task: &'b Task) -> Fut<'b, Inserted<TaskId>> {
        let r = (|| {
            if let Some(key) = &task.idempotency_key
                && let Some(id) = self.engine.task_by_idempotency_key(&task.owner, key)?
                && self.engine.get_task(&id)?.is_some()
            {
                return Ok(Inserted::Existing(id));
            }
            self.engine.create_task(task)?;
            Ok(Inserted::New)
        })();
        ready(r)
    }

    fn update_task<'b>(&'b mut self, task: &'b Task) -> Fut<'b, ()> {
        ready(self.engine.update_task(task))
    }

    fn purge_task<'b>(&'b mut self, id: &'b TaskId) -> Fut<'b, bool> {
        ready(self.engine.purge_task(id))
    }

    fn insert_credential<'b>(
        &'b mut self,
        rec: &'b CredentialRecord,
        secret: &'b SealedSecret,
    ) -> Fut<'b, Inserted<CredentialId>> {
        let r = (|| {
            if let Some(key) = &rec.idempotency_key
                && let Some(id) = self
                    .engine
                    .credential_by_idempotency_key(&rec.task_id, key)?
                && self.engine.get_credential(&id)?.is_some()
            {
                return Ok(Inserted::Existing(id));
            }
            self.engine.create_credential(rec, secret)?;
            Ok(Inserted::New)
        })();
        ready(r)
    }

    fn update_credential<'b>(&'b mut self, rec: &'b CredentialRecord) -> Fut<'b, ()> {
        ready(self.engine.update_credential(rec))
    }

    fn put_approval<'b>(&'b mut self, a: &'b Approval) -> Fut<'b, ()> {
        let _g = lock(&self.engine.local().cas);
        ready(self.engine.put_approval(a))
    }

    fn consume_approval<'b>(
        &'b mut self,
        id: &'b ApprovalId,
        _by: &'b str,
        now: UnixMillis,
    ) -> Fut<'b, bool> {
        let r = (|| {
            let _g = lock(&self.engine.local().cas);
            let Some(mut a) = self.engine.get_approval(id)? else {
                return Ok(false);
            };
            if a.state != ApprovalState::Approved || now >= a.expires_at {
                return Ok(false);
            }
            a.state = ApprovalState::Used;
            self.engine.put_approval(&a)?;
            Ok(true)
        })();
        ready(r)
    }

    fn set_blocked<'b>(&'b mut self, id: &'b SpiffeId, blocked: bool) -> Fut<'b, bool> {
        let r = (|| {
            let local = self.engine.local();
            let set = local.blocked(self.engine)?;
            let mut set = set.write().unwrap_or_else(|p| p.into_inner());
            let before = self.engine.set_blocked(id, blocked)?;
            if blocked {
                set.insert(id.clone());
            } else {
                set.remove(id);
            }
            let _ = local.changes.send(Change::Blocked(id.clone(), blocked));
            Ok(before)
        })();
        ready(r)
    }

    fn put_upstream<'b>(&'b mut self, o: &'b UpstreamObject) -> Fut<'b, ()> {
        ready(self.engine.put_upstream(o))
    }

    fn queue_revocation<'b>(&'b mut self, r: &'b Revocation) -> Fut<'b, ()> {
        ready(self.engine.queue_revocation(r))
    }

    fn update_revocation<'b>(&'b mut self, r: &'b Revocation) -> Fut<'b, ()> {
        let out = self.engine.update_revocation(r);
        lock(&self.engine.local().revocation_claims).remove(&(r.resource.clone(), r.name.clone()));
        ready(out)
    }

    fn remove_revocation<'b>(&'b mut self, resource: &'b str, name: &'b str) -> Fut<'b, bool> {
        let out = self.engine.remove_revocation(resource, name);
        lock(&self.engine.local().revocation_claims)
            .remove(&(resource.to_owned(), name.to_owned()));
        ready(out)
    }

    fn claim_revocations(
        &mut self,
        now: UnixMillis,
        limit: usize,
        hold_ms: i64,
    ) -> Fut<'_, Vec<Revocation>> {
        let r = (|| {
            let mut claims = lock(&self.engine.local().revocation_claims);
            // Read under the claims lock: a queue read before it may still list a revocation
            // that another unit removed (or rescheduled) and released since.
            let queue = self.engine.revocations()?;
            claims.retain(|_, until| *until > now);
            let mut out = Vec::new();
            for r in queue {
                if out.len() >= limit {
                    break;
                }
                let key = (r.resource.clone(), r.name.clone());
                if r.next_attempt_at > now || claims.contains_key(&key) {
                    continue;
                }
                claims.insert(key, now.saturating_add(hold_ms));
                out.push(r);
            }
            Ok(out)
        })();
        ready(r)
    }

    fn claim_due(&mut self, now: UnixMillis, limit: usize) -> Fut<'_, Vec<(UnixMillis, Expiring)>> {
        let r = (|| {
            let mut claims = lock(&self.engine.local().due_claims);
            let due = self.engine.due(now, limit.saturating_add(claims.len()))?;
            let mut out = Vec::new();
            for d in due {
                if out.len() >= limit {
                    break;
                }
                if claims.insert(d.clone()) {
                    self.due.push(d.clone());
                    out.push(d);
                }
            }
            Ok(out)
        })();
        ready(r)
    }

    fn remove_due<'b>(&'b mut self, at: UnixMillis, what: &'b Expiring) -> Fut<'b, ()> {
        ready(self.engine.remove_due(at, what))
    }

    fn meta_put<'b>(&'b mut self, key: &'b str, value: Vec<u8>) -> Fut<'b, ()> {
        let r = self.engine.meta_put(key, &value);
        if r.is_ok() {
            let _ = self
                .engine
                .local()
                .changes
                .send(Change::Meta(key.to_owned()));
        }
        ready(r)
    }

    fn fence<'b>(&'b mut self, lease: &'b str, epoch: u64) -> Fut<'b, ()> {
        self.fences.push((lease.to_owned(), epoch));
        ready(self.check_fences())
    }

    fn audit(&mut self, time: UnixMillis, event: Event) {
        self.audit.push((time, event));
    }

    fn commit(mut self: Box<Self>) -> Fut<'a, Vec<u64>> {
        let engine = self.engine;
        let appended = (|| {
            self.check_fences()?;
            if self.audit.is_empty() {
                return Ok(Vec::new());
            }
            let chain = engine.local().chain(engine)?;
            let mut chain = lock(chain);
            let mut seqs = Vec::with_capacity(self.audit.len());
            let mut lines = Vec::with_capacity(self.audit.len());
            for (time, event) in self.audit.drain(..) {
                let (seq, bytes, next) = chain.entry(time, event)?;
                engine.audit_put(seq, &bytes)?;
                chain.advance(next);
                seqs.push(seq);
                lines.push(bytes);
            }
            drop(chain);
            for bytes in lines {
                tracing::info!(
                    target: "jitbroker::audit",
                    audit = %String::from_utf8_lossy(&bytes),
                    "audit"
                );
            }
            Ok(seqs)
        })();
        // Locks and claims end here: the next unit's durability ticket covers these writes.
        self.end();
        let durable = engine.durable();
        Box::pin(LocalCommit {
            appended: Some(appended),
            durable: Some(durable),
        })
    }
}

/// The rest of a local commit: the group commit's flush.
struct LocalCommit<'a> {
    appended: Option<Result<Vec<u64>>>,
    durable: Option<Fut<'a, ()>>,
}

impl std::future::Future for LocalCommit<'_> {
    type Output = Result<Vec<u64>>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if let Some(d) = self.durable.as_mut() {
            match d.as_mut().poll(cx) {
                std::task::Poll::Pending => return std::task::Poll::Pending,
                std::task::Poll::Ready(r) => {
                    self.durable = None;
                    if let Err(e) = r {
                        return std::task::Poll::Ready(Err(e));
                    }
                }
            }
        }
        std::task::Poll::Ready(self.appended.take().unwrap_or_else(|| Ok(Vec::new())))
    }
}

impl<E: LocalEngine> Store for E {
    fn begin(&self) -> Fut<'_, Box<dyn Uow<'_> + '_>> {
        let u: Box<dyn Uow<'_> + '_> = Box::new(LocalUow {
            engine: self,
            held: Vec::new(),
            due: Vec::new(),
            audit: Vec::new(),
            fences: Vec::new(),
        });
        ready(Ok(u))
    }

    fn get_task(&self, id: &TaskId) -> Fut<'_, Option<Task>> {
        ready(LocalEngine::get_task(self, id))
    }

    fn task_by_idempotency_key(&self, owner: &SpiffeId, key: &str) -> Fut<'_, Option<TaskId>> {
        ready(LocalEngine::task_by_idempotency_key(self, owner, key))
    }

    fn tasks_of_identity(&self, owner: &SpiffeId) -> Fut<'_, Vec<TaskId>> {
        ready(LocalEngine::tasks_of_identity(self, owner))
    }

    fn children_of(&self, task: &TaskId) -> Fut<'_, Vec<TaskId>> {
        ready(LocalEngine::children_of(self, task))
    }

    fn scan_tasks(&self, after: Option<&TaskId>, limit: usize) -> Fut<'_, Vec<Task>> {
        ready(LocalEngine::scan_tasks(self, after, limit))
    }

    fn get_credential(&self, id: &CredentialId) -> Fut<'_, Option<CredentialRecord>> {
        ready(LocalEngine::get_credential(self, id))
    }

    fn credential_sealed(&self, id: &CredentialId) -> Fut<'_, Option<Vec<u8>>> {
        ready(LocalEngine::credential_sealed(self, id))
    }

    fn credential_by_index(&self, index: &[u8; 32]) -> Fut<'_, Option<CredentialId>> {
        ready(LocalEngine::credential_by_index(self, index))
    }

    fn credential_by_idempotency_key(
        &self,
        task: &TaskId,
        key: &str,
    ) -> Fut<'_, Option<CredentialId>> {
        ready(LocalEngine::credential_by_idempotency_key(self, task, key))
    }

    fn credentials_of_task(&self, task: &TaskId) -> Fut<'_, Vec<CredentialId>> {
        ready(LocalEngine::credentials_of_task(self, task))
    }

    fn get_approval(&self, id: &ApprovalId) -> Fut<'_, Option<Approval>> {
        ready(LocalEngine::get_approval(self, id))
    }

    fn approval_for_grant(&self, task: &TaskId, grant: &Grant) -> Fut<'_, Option<ApprovalId>> {
        ready(LocalEngine::approval_for_grant(self, task, grant))
    }

    fn list_approvals(&self) -> Fut<'_, Vec<Approval>> {
        ready(LocalEngine::list_approvals(self))
    }

    fn is_blocked(&self, id: &SpiffeId) -> Fut<'_, bool> {
        ready(
            self.local()
                .blocked(self)
                .map(|b| b.read().unwrap_or_else(|p| p.into_inner()).contains(id)),
        )
    }

    fn blocked_identities(&self) -> Fut<'_, Vec<SpiffeId>> {
        ready(self.local().blocked(self).map(|b| {
            let mut v: Vec<SpiffeId> = b
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned()
                .collect();
            v.sort();
            v
        }))
    }

    fn upstream_objects(&self) -> Fut<'_, Vec<UpstreamObject>> {
        ready(LocalEngine::upstream_objects(self))
    }

    fn revocations(&self) -> Fut<'_, Vec<Revocation>> {
        ready(LocalEngine::revocations(self))
    }

    fn next_due(&self) -> Fut<'_, Option<UnixMillis>> {
        ready(LocalEngine::next_due(self))
    }

    fn audit_head(&self) -> Fut<'_, Anchor> {
        ready(self.local().chain(self).map(|c| lock(c).head()))
    }

    fn audit_scan(&self, from: u64, limit: usize) -> Fut<'_, Vec<(u64, Vec<u8>)>> {
        ready(LocalEngine::audit_scan(self, from, limit))
    }

    fn audit_remove_through(&self, seq: u64) -> Fut<'_, u64> {
        ready(LocalEngine::audit_remove_through(self, seq))
    }

    fn counts(&self) -> Fut<'_, Counts> {
        ready(LocalEngine::counts(self))
    }

    fn meta_get(&self, key: &str) -> Fut<'_, Option<Vec<u8>>> {
        ready(LocalEngine::meta_get(self, key))
    }

    fn meta_put_if_absent(&self, key: &str, value: Vec<u8>) -> Fut<'_, Vec<u8>> {
        let key = key.to_owned();
        Box::pin(async move {
            let before = self.meta_swap(&key, None, &value)?;
            match before {
                Some(existing) => Ok(existing),
                None => {
                    self.durable().await?;
                    Ok(value)
                }
            }
        })
    }

    fn meta_cas(&self, key: &str, expected: Option<Vec<u8>>, value: Vec<u8>) -> Fut<'_, bool> {
        let key = key.to_owned();
        Box::pin(async move {
            let before = self.meta_swap(&key, expected.as_deref(), &value)?;
            if before != expected {
                return Ok(false);
            }
            self.durable().await?;
            let _ = self.local().changes.send(Change::Meta(key));
            Ok(true)
        })
    }

    fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now: UnixMillis,
        ttl_ms: i64,
    ) -> Fut<'_, Option<Lease>> {
        let mut leases = lock(&self.local().leases);
        let until = now.saturating_add(ttl_ms);
        let out = match leases.get_mut(name) {
            Some((h, l)) if h == holder => {
                l.valid_until = until;
                Some(*l)
            }
            Some((_, l)) if l.valid_until > now => None,
            Some((h, l)) => {
                *h = holder.to_owned();
                l.epoch += 1;
                l.valid_until = until;
                Some(*l)
            }
            None => {
                let l = Lease {
                    epoch: 1,
                    valid_until: until,
                };
                leases.insert(name.to_owned(), (holder.to_owned(), l));
                Some(l)
            }
        };
        ready(Ok(out))
    }

    fn changes(&self) -> broadcast::Receiver<Change> {
        self.local().changes.subscribe()
    }
}
