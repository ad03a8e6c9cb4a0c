//! The in-memory engine: a [`LocalEngine`] that keeps everything in this process and nothing on
//! disk, so nothing it holds is durable ([`LocalEngine::durable`] resolves at once and a restart
//! forgets everything). It exists for the conformance suite and for tests.
//!
//! Its semantics are those of the sled engine ([`super::SledStore`]), index for index: the same
//! entries are written and removed by the same calls (an ended task leaves its owner's index, a
//! credential no longer active loses its sealed secret and its secret index entry, a purge
//! removes what the sled purge removes), and listings come back in the order of sled's keys.
//! All state sits behind one mutex, so each call is atomic; sled's write order (index entries
//! first, the record last) therefore never shows.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use super::local::{Local, LocalEngine};
use super::{Counts, Expiring, Fut, SealedSecret};
use crate::error::{Error, Result};
use crate::model::{
    Approval, ApprovalId, CredentialId, CredentialRecord, CredentialState, Grant, Revocation,
    SpiffeId, Task, TaskId, TaskState, UnixMillis, UpstreamObject,
};

/// A credential as the engine keeps it (sled's `StoredCredential`).
struct StoredCredential {
    record: CredentialRecord,
    /// The sealed secret, while the credential is active.
    sealed: Option<Vec<u8>>,
    /// The keyed hash of the secret, while the credential is active.
    index: Option<[u8; 32]>,
}

/// Key of the expiry index, ordered as sled's `expiry` keys are: time (negative times count as
/// 0, as sled stores them unsigned), kind byte, id.
type ExpiryKey = (UnixMillis, u8, String);

fn expiry_key(at: UnixMillis, what: &Expiring) -> ExpiryKey {
    let (kind, id) = match what {
        Expiring::Task(id) => (b't', id.as_str()),
        Expiring::Credential(id) => (b'c', id.as_str()),
        Expiring::Purge(id) => (b'p', id.as_str()),
    };
    (at.max(0), kind, id.to_owned())
}

#[derive(Default)]
struct Inner {
    tasks: BTreeMap<TaskId, Task>,
    /// Live tasks of each owner (sled's `by_identity`).
    by_identity: BTreeMap<SpiffeId, BTreeSet<TaskId>>,
    /// Delegated children of each task.
    children: BTreeMap<TaskId, BTreeSet<TaskId>>,
    /// (owner, idempotency key) → task.
    task_idempotency: BTreeMap<(SpiffeId, String), TaskId>,
    /// (task, idempotency key) → credential.
    credential_idempotency: BTreeMap<(TaskId, String), CredentialId>,
    /// (task, grant) → its current approval request.
    approval_grants: BTreeMap<TaskId, BTreeMap<Grant, ApprovalId>>,

    credentials: BTreeMap<CredentialId, StoredCredential>,
    /// Keyed hash of an active credential's secret → the credential.
    secret_index: BTreeMap<[u8; 32], CredentialId>,
    by_task: BTreeMap<TaskId, BTreeSet<CredentialId>>,

    /// The expiry index; the value is what the key names.
    expiry: BTreeMap<ExpiryKey, Expiring>,

    approvals: BTreeMap<ApprovalId, Approval>,
    blocked: BTreeSet<SpiffeId>,
    /// Keyed by (resource, name): the order of sled's `resource ‖ 0 ‖ name` keys.
    upstream: BTreeMap<(String, String), UpstreamObject>,
    revocations: BTreeMap<(String, String), Revocation>,
    meta: BTreeMap<String, Vec<u8>>,
    audit: BTreeMap<u64, Vec<u8>>,
}

/// Adds `v` to the set under `k`.
fn index_insert<K: Ord, V: Ord>(map: &mut BTreeMap<K, BTreeSet<V>>, k: K, v: V) {
    map.entry(k).or_default().insert(v);
}

/// Removes `v` from the set under `k` (and the set once empty); whether it was there.
fn index_remove<K: Ord, V: Ord>(map: &mut BTreeMap<K, BTreeSet<V>>, k: &K, v: &V) -> bool {
    let Some(set) = map.get_mut(k) else {
        return false;
    };
    let was = set.remove(v);
    if set.is_empty() {
        map.remove(k);
    }
    was
}

fn index_list<K: Ord, V: Ord + Clone>(map: &BTreeMap<K, BTreeSet<V>>, k: &K) -> Vec<V> {
    map.get(k)
        .map(|s| s.iter().cloned().collect())
        .unwrap_or_default()
}

/// The in-memory engine (see the module documentation).
pub struct MemoryStore {
    inner: Mutex<Inner>,
    local: Local,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            local: Local::default(),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalEngine for MemoryStore {
    fn local(&self) -> &Local {
        &self.local
    }

    fn get_task(&self, id: &TaskId) -> Result<Option<Task>> {
        Ok(self.inner().tasks.get(id).cloned())
    }

    fn task_by_idempotency_key(&self, owner: &SpiffeId, key: &str) -> Result<Option<TaskId>> {
        Ok(self
            .inner()
            .task_idempotency
            .get(&(owner.clone(), key.to_owned()))
            .cloned())
    }

    fn tasks_of_identity(&self, owner: &SpiffeId) -> Result<Vec<TaskId>> {
        Ok(index_list(&self.inner().by_identity, owner))
    }

    fn children_of(&self, task: &TaskId) -> Result<Vec<TaskId>> {
        Ok(index_list(&self.inner().children, task))
    }

    fn scan_tasks(&self, after: Option<&TaskId>, limit: usize) -> Result<Vec<Task>> {
        let inner = self.inner();
        let lower = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        Ok(inner
            .tasks
            .range::<TaskId, _>((lower, Bound::Unbounded))
            .take(limit)
            .map(|(_, t)| t.clone())
            .collect())
    }

    fn create_task(&self, task: &Task) -> Result<()> {
        let mut inner = self.inner();
        if let Some(p) = &task.parent {
            index_insert(&mut inner.children, p.clone(), task.id.clone());
        }
        index_insert(&mut inner.by_identity, task.owner.clone(), task.id.clone());
        let exp = Expiring::Task(task.id.clone());
        inner.expiry.insert(expiry_key(task.expires_at, &exp), exp);
        if let Some(k) = &task.idempotency_key {
            inner
                .task_idempotency
                .insert((task.owner.clone(), k.clone()), task.id.clone());
        }
        inner.tasks.insert(task.id.clone(), task.clone());
        Ok(())
    }

    fn update_task(&self, task: &Task) -> Result<()> {
        let mut inner = self.inner();
        let ended = task.state != TaskState::Active;
        if let Some(at) = task.purge_at.filter(|_| ended) {
            let purge = Expiring::Purge(task.id.clone());
            inner.expiry.insert(expiry_key(at, &purge), purge);
        }
        inner.tasks.insert(task.id.clone(), task.clone());
        if ended {
            index_remove(&mut inner.by_identity, &task.owner, &task.id);
        }
        Ok(())
    }

    fn purge_task(&self, id: &TaskId) -> Result<bool> {
        let mut inner = self.inner();
        let inner = &mut *inner;
        let task = inner.tasks.get(id).cloned();
        if task.as_ref().is_some_and(|t| t.state == TaskState::Active) {
            // Only ended tasks are purged.
            return Ok(false);
        }
        // The task's credentials with their index entries.
        for cid in inner.by_task.remove(id).unwrap_or_default() {
            if let Some(c) = inner.credentials.remove(&cid) {
                let rec = &c.record;
                inner.expiry.remove(&expiry_key(
                    rec.expires_at,
                    &Expiring::Credential(cid.clone()),
                ));
                if let Some(key) = &rec.idempotency_key {
                    inner
                        .credential_idempotency
                        .remove(&(id.clone(), key.clone()));
                }
                if let Some(h) = &c.index {
                    // Only an ended task is purged, so this is normally gone already.
                    inner.secret_index.remove(h);
                }
            }
        }
        // Its children index (the children themselves stay).
        inner.children.remove(id);
        // Its approvals: the current ones of its grants and those they replaced.
        inner.approval_grants.remove(id);
        inner.approvals.retain(|_, a| &a.task_id != id);
        if let Some(t) = &task {
            inner
                .expiry
                .remove(&expiry_key(t.expires_at, &Expiring::Task(id.clone())));
            if let Some(key) = &t.idempotency_key {
                inner
                    .task_idempotency
                    .remove(&(t.owner.clone(), key.clone()));
            }
            if let Some(p) = &t.parent {
                index_remove(&mut inner.children, p, id);
            }
            index_remove(&mut inner.by_identity, &t.owner, id);
        }
        inner.tasks.remove(id);
        Ok(task.is_some())
    }

    fn get_credential(&self, id: &CredentialId) -> Result<Option<CredentialRecord>> {
        Ok(self.inner().credentials.get(id).map(|c| c.record.clone()))
    }

    fn credential_sealed(&self, id: &CredentialId) -> Result<Option<Vec<u8>>> {
        Ok(self
            .inner()
            .credentials
            .get(id)
            .and_then(|c| c.sealed.clone()))
    }

    fn credential_by_index(&self, index: &[u8; 32]) -> Result<Option<CredentialId>> {
        Ok(self.inner().secret_index.get(index).cloned())
    }

    fn credential_by_idempotency_key(
        &self,
        task: &TaskId,
        key: &str,
    ) -> Result<Option<CredentialId>> {
        Ok(self
            .inner()
            .credential_idempotency
            .get(&(task.clone(), key.to_owned()))
            .cloned())
    }

    fn credentials_of_task(&self, task: &TaskId) -> Result<Vec<CredentialId>> {
        Ok(index_list(&self.inner().by_task, task))
    }

    fn create_credential(&self, rec: &CredentialRecord, secret: &SealedSecret) -> Result<()> {
        let mut inner = self.inner();
        // 256-bit random secrets do not collide; if one does, refuse rather than alias.
        if inner.secret_index.contains_key(&secret.index) {
            return Err(Error::Internal("secret index collision".into()));
        }
        inner.secret_index.insert(secret.index, rec.id.clone());
        index_insert(&mut inner.by_task, rec.task_id.clone(), rec.id.clone());
        let exp = Expiring::Credential(rec.id.clone());
        inner.expiry.insert(expiry_key(rec.expires_at, &exp), exp);
        if let Some(k) = &rec.idempotency_key {
            inner
                .credential_idempotency
                .insert((rec.task_id.clone(), k.clone()), rec.id.clone());
        }
        inner.credentials.insert(
            rec.id.clone(),
            StoredCredential {
                record: rec.clone(),
                sealed: Some(secret.sealed.clone()),
                index: Some(secret.index),
            },
        );
        Ok(())
    }

    fn update_credential(&self, rec: &CredentialRecord) -> Result<()> {
        let mut inner = self.inner();
        let stored = inner
            .credentials
            .get_mut(&rec.id)
            .ok_or_else(|| Error::Storage(format!("credential {} vanished", rec.id)))?;
        let drop_index = if rec.state != CredentialState::Active {
            stored.sealed = None;
            stored.index.take()
        } else {
            None
        };
        stored.record = rec.clone();
        if let Some(h) = drop_index {
            inner.secret_index.remove(&h);
        }
        Ok(())
    }

    fn put_approval(&self, a: &Approval) -> Result<()> {
        let mut inner = self.inner();
        inner.approvals.insert(a.id.clone(), a.clone());
        inner
            .approval_grants
            .entry(a.task_id.clone())
            .or_default()
            .insert(a.grant.clone(), a.id.clone());
        Ok(())
    }

    fn get_approval(&self, id: &ApprovalId) -> Result<Option<Approval>> {
        Ok(self.inner().approvals.get(id).cloned())
    }

    fn approval_for_grant(&self, task: &TaskId, grant: &Grant) -> Result<Option<ApprovalId>> {
        Ok(self
            .inner()
            .approval_grants
            .get(task)
            .and_then(|g| g.get(grant))
            .cloned())
    }

    fn list_approvals(&self) -> Result<Vec<Approval>> {
        Ok(self.inner().approvals.values().cloned().collect())
    }

    fn set_blocked(&self, id: &SpiffeId, blocked: bool) -> Result<bool> {
        let mut inner = self.inner();
        Ok(if blocked {
            !inner.blocked.insert(id.clone())
        } else {
            inner.blocked.remove(id)
        })
    }

    fn blocked_identities(&self) -> Result<Vec<SpiffeId>> {
        Ok(self.inner().blocked.iter().cloned().collect())
    }

    fn put_upstream(&self, o: &UpstreamObject) -> Result<()> {
        self.inner()
            .upstream
            .insert((o.resource.clone(), o.name.clone()), o.clone());
        Ok(())
    }

    fn upstream_objects(&self) -> Result<Vec<UpstreamObject>> {
        Ok(self.inner().upstream.values().cloned().collect())
    }

    fn queue_revocation(&self, r: &Revocation) -> Result<()> {
        let mut inner = self.inner();
        let key = (r.resource.clone(), r.name.clone());
        inner.upstream.remove(&key);
        inner.revocations.insert(key, r.clone());
        Ok(())
    }

    fn update_revocation(&self, r: &Revocation) -> Result<()> {
        // Only while it is queued: a revocation another worker finished stays finished.
        if let Some(e) = self
            .inner()
            .revocations
            .get_mut(&(r.resource.clone(), r.name.clone()))
        {
            *e = r.clone();
        }
        Ok(())
    }

    fn remove_revocation(&self, resource: &str, name: &str) -> Result<bool> {
        Ok(self
            .inner()
            .revocations
            .remove(&(resource.to_owned(), name.to_owned()))
            .is_some())
    }

    fn revocations(&self) -> Result<Vec<Revocation>> {
        Ok(self.inner().revocations.values().cloned().collect())
    }

    fn due(&self, now: UnixMillis, limit: usize) -> Result<Vec<(UnixMillis, Expiring)>> {
        let now = now.max(0);
        Ok(self
            .inner()
            .expiry
            .iter()
            .take_while(|((at, _, _), _)| *at <= now)
            .take(limit)
            .map(|((at, _, _), what)| (*at, what.clone()))
            .collect())
    }

    fn next_due(&self) -> Result<Option<UnixMillis>> {
        Ok(self
            .inner()
            .expiry
            .first_key_value()
            .map(|((at, _, _), _)| *at))
    }

    fn remove_due(&self, at: UnixMillis, what: &Expiring) -> Result<()> {
        self.inner().expiry.remove(&expiry_key(at, what));
        Ok(())
    }

    fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.inner().meta.get(key).cloned())
    }

    fn meta_put(&self, key: &str, value: &[u8]) -> Result<()> {
        self.inner().meta.insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    fn meta_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> Result<Option<Vec<u8>>> {
        let mut inner = self.inner();
        let before = inner.meta.get(key).cloned();
        if before.as_deref() == expected {
            inner.meta.insert(key.to_owned(), value.to_vec());
        }
        Ok(before)
    }

    fn audit_last(&self) -> Result<Option<Vec<u8>>> {
        Ok(self.inner().audit.last_key_value().map(|(_, v)| v.clone()))
    }

    fn audit_put(&self, seq: u64, entry: &[u8]) -> Result<()> {
        self.inner().audit.insert(seq, entry.to_vec());
        Ok(())
    }

    fn audit_scan(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        Ok(self
            .inner()
            .audit
            .range(from..)
            .take(limit)
            .map(|(k, v)| (*k, v.clone()))
            .collect())
    }

    fn audit_remove_through(&self, seq: u64) -> Result<u64> {
        let mut inner = self.inner();
        let kept = match seq.checked_add(1) {
            Some(next) => inner.audit.split_off(&next),
            None => BTreeMap::new(),
        };
        let removed = std::mem::replace(&mut inner.audit, kept);
        Ok(removed.len() as u64)
    }

    fn counts(&self) -> Result<Counts> {
        let inner = self.inner();
        Ok(Counts {
            tasks: inner.by_identity.values().map(|s| s.len() as u64).sum(),
            credentials: inner.secret_index.len() as u64,
        })
    }

    fn durable(&self) -> Fut<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ApprovalState;
    use crate::store::test_records::{self, grant};

    fn owner() -> SpiffeId {
        SpiffeId::parse("o", "spiffe://x/a").unwrap()
    }

    fn task(exp: i64) -> Task {
        test_records::task("spiffe://x/a", exp)
    }

    fn credential(t: &Task) -> CredentialRecord {
        CredentialRecord {
            idempotency_key: Some("c1".into()),
            ..test_records::credential(t)
        }
    }

    fn sealed(b: u8) -> SealedSecret {
        SealedSecret {
            sealed: vec![b, b, b],
            index: [b; 32],
        }
    }

    fn approval(t: &Task) -> Approval {
        Approval {
            id: ApprovalId::generate(),
            task_id: t.id.clone(),
            requester: t.owner.clone(),
            delegation_chain: vec![],
            grant: grant(),
            purpose: "p".into(),
            state: ApprovalState::Pending,
            created_at: 0,
            expires_at: 5_000,
            decided_by: None,
            decided_at: None,
            reason: String::new(),
            policy_ids: vec![],
        }
    }

    #[tokio::test]
    async fn task_and_credential_round_trip() {
        let s = MemoryStore::new();
        let t = task(5_000);
        s.create_task(&t).unwrap();
        assert_eq!(s.get_task(&t.id).unwrap().unwrap().id, t.id);
        assert_eq!(
            s.task_by_idempotency_key(&t.owner, "k1").unwrap(),
            Some(t.id.clone())
        );
        assert_eq!(s.tasks_of_identity(&t.owner).unwrap(), vec![t.id.clone()]);

        let rec = credential(&t);
        s.create_credential(&rec, &sealed(7)).unwrap();
        s.durable().await.unwrap();
        assert_eq!(
            s.credential_by_index(&[7; 32]).unwrap(),
            Some(rec.id.clone())
        );
        assert_eq!(s.credential_sealed(&rec.id).unwrap(), Some(vec![7, 7, 7]));
        assert_eq!(
            s.credential_by_idempotency_key(&t.id, "c1").unwrap(),
            Some(rec.id.clone())
        );
        assert_eq!(s.credentials_of_task(&t.id).unwrap(), vec![rec.id.clone()]);
        assert_eq!(
            s.counts().unwrap(),
            Counts {
                tasks: 1,
                credentials: 1
            }
        );
        // The same secret again is refused, and writes nothing.
        let mut other = credential(&t);
        other.idempotency_key = None;
        let err = s.create_credential(&other, &sealed(7)).unwrap_err();
        assert!(matches!(err, Error::Internal(_)), "{err}");
        assert!(s.get_credential(&other.id).unwrap().is_none());
        assert_eq!(s.credentials_of_task(&t.id).unwrap(), vec![rec.id.clone()]);

        assert_eq!(
            s.due(2_000, 10).unwrap(),
            vec![(2_000, Expiring::Credential(rec.id.clone()))]
        );
        assert_eq!(s.due(1_999, 10).unwrap(), vec![]);
        assert_eq!(s.next_due().unwrap(), Some(2_000));

        let mut dead = rec.clone();
        dead.state = CredentialState::Revoked;
        s.update_credential(&dead).unwrap();
        assert_eq!(s.credential_by_index(&[7; 32]).unwrap(), None);
        assert_eq!(s.credential_sealed(&rec.id).unwrap(), None);
        assert_eq!(
            s.get_credential(&rec.id).unwrap().unwrap().state,
            CredentialState::Revoked
        );
        assert_eq!(s.counts().unwrap().credentials, 0);

        let mut ended = t.clone();
        ended.state = TaskState::Completed;
        ended.purge_at = Some(9_000);
        s.update_task(&ended).unwrap();
        assert!(s.tasks_of_identity(&t.owner).unwrap().is_empty());
        assert_eq!(s.counts().unwrap().tasks, 0);
        assert_eq!(
            s.due(i64::MAX, 10).unwrap(),
            vec![
                (2_000, Expiring::Credential(rec.id.clone())),
                (5_000, Expiring::Task(t.id.clone())),
                (9_000, Expiring::Purge(t.id.clone())),
            ]
        );
        s.remove_due(2_000, &Expiring::Credential(rec.id.clone()))
            .unwrap();
        assert_eq!(s.next_due().unwrap(), Some(5_000));
    }

    #[test]
    fn purge_removes_an_ended_task_and_everything_kept_for_it() {
        let s = MemoryStore::new();
        let parent = task(5_000);
        let mut t = task(5_000);
        t.parent = Some(parent.id.clone());
        t.idempotency_key = Some("k2".into());
        s.create_task(&parent).unwrap();
        s.create_task(&t).unwrap();
        let rec = credential(&t);
        s.create_credential(&rec, &sealed(1)).unwrap();
        let a = approval(&t);
        s.put_approval(&a).unwrap();
        assert_eq!(s.children_of(&parent.id).unwrap(), vec![t.id.clone()]);
        assert_eq!(
            s.approval_for_grant(&t.id, &grant()).unwrap(),
            Some(a.id.clone())
        );

        // An active task is not purged.
        assert!(!s.purge_task(&t.id).unwrap());
        assert!(s.get_task(&t.id).unwrap().is_some());
        assert!(s.get_credential(&rec.id).unwrap().is_some());

        let mut ended = t.clone();
        ended.state = TaskState::Revoked;
        s.update_task(&ended).unwrap();
        assert!(s.purge_task(&t.id).unwrap());
        assert!(s.get_task(&t.id).unwrap().is_none());
        assert!(s.task_by_idempotency_key(&t.owner, "k2").unwrap().is_none());
        assert!(s.get_credential(&rec.id).unwrap().is_none());
        assert!(s.credential_by_index(&[1; 32]).unwrap().is_none());
        assert!(
            s.credential_by_idempotency_key(&t.id, "c1")
                .unwrap()
                .is_none()
        );
        assert!(s.credentials_of_task(&t.id).unwrap().is_empty());
        assert!(s.children_of(&parent.id).unwrap().is_empty());
        assert!(s.get_approval(&a.id).unwrap().is_none());
        assert!(s.approval_for_grant(&t.id, &grant()).unwrap().is_none());
        // Only the parent's entries are left: its record, index entries and expiry entry.
        assert_eq!(
            s.tasks_of_identity(&t.owner).unwrap(),
            vec![parent.id.clone()]
        );
        assert_eq!(
            s.due(i64::MAX, 10).unwrap(),
            vec![(5_000, Expiring::Task(parent.id.clone()))]
        );
        assert_eq!(
            s.counts().unwrap(),
            Counts {
                tasks: 1,
                credentials: 0
            }
        );
        // Purging again finds nothing.
        assert!(!s.purge_task(&t.id).unwrap());

        // A task written ended by `create_task` (as sled would, too) keeps its owner index
        // entry until it is purged.
        let mut stray = task(6_000);
        stray.state = TaskState::Expired;
        stray.idempotency_key = None;
        s.create_task(&stray).unwrap();
        assert_eq!(s.counts().unwrap().tasks, 2);
        assert!(s.purge_task(&stray.id).unwrap());
        assert_eq!(
            s.tasks_of_identity(&t.owner).unwrap(),
            vec![parent.id.clone()]
        );
        assert_eq!(s.counts().unwrap().tasks, 1);
    }

    #[test]
    fn meta_swap_replaces_only_the_expected_value() {
        let s = MemoryStore::new();
        // Absent expected, absent: stored.
        assert_eq!(s.meta_swap("k", None, b"one").unwrap(), None);
        assert_eq!(s.meta_get("k").unwrap(), Some(b"one".to_vec()));
        // Absent expected, present: not stored; the value there is returned.
        assert_eq!(
            s.meta_swap("k", None, b"two").unwrap(),
            Some(b"one".to_vec())
        );
        assert_eq!(s.meta_get("k").unwrap(), Some(b"one".to_vec()));
        // Wrong value expected: not stored.
        assert_eq!(
            s.meta_swap("k", Some(b"nope"), b"two").unwrap(),
            Some(b"one".to_vec())
        );
        assert_eq!(s.meta_get("k").unwrap(), Some(b"one".to_vec()));
        // The value there expected: stored.
        assert_eq!(
            s.meta_swap("k", Some(b"one"), b"two").unwrap(),
            Some(b"one".to_vec())
        );
        assert_eq!(s.meta_get("k").unwrap(), Some(b"two".to_vec()));
    }

    #[test]
    fn audit_blocked_and_revocations() {
        let s = MemoryStore::new();
        for seq in 1..=5u64 {
            s.audit_put(seq, &[seq as u8]).unwrap();
        }
        assert_eq!(s.audit_last().unwrap(), Some(vec![5]));
        assert_eq!(
            s.audit_scan(2, 2).unwrap(),
            vec![(2, vec![2]), (3, vec![3])]
        );
        assert_eq!(s.audit_remove_through(3).unwrap(), 3);
        assert_eq!(
            s.audit_scan(0, 10).unwrap(),
            vec![(4, vec![4]), (5, vec![5])]
        );
        assert_eq!(s.audit_remove_through(u64::MAX).unwrap(), 2);
        assert_eq!(s.audit_last().unwrap(), None);

        let id = owner();
        assert!(!s.set_blocked(&id, true).unwrap());
        assert!(s.set_blocked(&id, true).unwrap());
        assert_eq!(s.blocked_identities().unwrap(), vec![id.clone()]);
        assert!(s.set_blocked(&id, false).unwrap());
        assert!(!s.set_blocked(&id, false).unwrap());

        let cid = CredentialId::generate();
        s.put_upstream(&UpstreamObject {
            resource: "db".into(),
            name: "u1".into(),
            credential_id: cid.clone(),
            state: crate::model::UpstreamState::Live,
            created_at: 0,
            expires_at: 10,
        })
        .unwrap();
        assert_eq!(s.upstream_objects().unwrap().len(), 1);
        s.queue_revocation(&Revocation {
            resource: "db".into(),
            name: "u1".into(),
            credential_id: Some(cid),
            reason: "expired".into(),
            enqueued_at: 0,
            attempts: 0,
            next_attempt_at: 0,
            last_error: None,
        })
        .unwrap();
        assert!(s.upstream_objects().unwrap().is_empty());
        assert_eq!(s.revocations().unwrap().len(), 1);
        assert!(s.remove_revocation("db", "u1").unwrap());
        assert!(!s.remove_revocation("db", "u1").unwrap());
        assert!(s.revocations().unwrap().is_empty());
    }
}
