//! Conformance suite of the storage engine interface ([`jitbroker::store::Store`]; what it
//! guarantees is written in the module documentation of `src/store/mod.rs`). Every engine must
//! pass every case: an engine is one `conformance!` line at the bottom of this file, which runs
//! each case of [`cases`] on a fresh engine of its own.
//!
//! Races are real races: units of work on the runtime's worker threads, started together behind
//! a barrier, yielding between a read and the write that depends on it (where an engine across a
//! network would wait for a round trip), so that a missing lock or claim shows. Nothing waits on
//! the clock: time is passed to the engine (`now`), and ordering comes from locks, claims and
//! joins.
//!
//! Run: `cargo test --test store_conformance`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

mod common;

use futures::future::join_all;
use jitbroker::audit::{self, Entry, Event};
use jitbroker::model::{
    Approval, ApprovalId, ApprovalState, CredentialId, CredentialRecord, CredentialState, Decision,
    Grant, GrantDecision, Revocation, RevokeReason, Secret, SpiffeId, Task, TaskId, TaskState,
    UnixMillis, UpstreamObject, UpstreamState,
};
use jitbroker::store::{
    Change, Counts, Expiring, Inserted, Kek, MemoryStore, PgSettings, PgStore, SledStore, Storage,
    Store, Uow,
};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Fixture and helpers
// ---------------------------------------------------------------------------------------------

/// "Now" as the tests pass it to the engine.
const NOW: UnixMillis = 1_700_000_000_000;
/// An hour later: when the records made by the tests expire.
const LATER: UnixMillis = NOW + 3_600_000;

/// What an engine factory gets: a private directory and a KEK (in `dir`/kek).
pub struct Env {
    pub dir: TempDir,
    pub kek: Kek,
    /// What an engine needs kept alive until the case ends (a database server).
    pub keep: std::sync::Mutex<Vec<Box<dyn std::any::Any + Send>>>,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::create(&dir.path().join("kek")).unwrap();
        Self {
            dir,
            kek,
            keep: std::sync::Mutex::default(),
        }
    }

    /// The same KEK again (a `Kek` is not `Clone`).
    fn kek(&self) -> Kek {
        Kek::load(self.kek.path()).unwrap()
    }
}

/// A fresh engine for one case. The engine is dropped before its directory.
pub struct Fixture {
    engine: Arc<dyn Store>,
    /// A second handle on the same data: another replica for an engine several replicas share,
    /// the same engine again for an in-process one.
    other: Arc<dyn Store>,
    env: Env,
}

impl Fixture {
    /// The engine with sealing above it (creates the key material on first use).
    async fn storage(&self) -> Storage {
        Storage::open(self.engine.clone(), &self.env.kek)
            .await
            .unwrap()
    }

    /// Racer `i`'s handle: the two handles in turn.
    fn handle(&self, i: usize) -> Arc<dyn Store> {
        if i.is_multiple_of(2) {
            self.engine.clone()
        } else {
            self.other.clone()
        }
    }
}

fn owner(name: &str) -> SpiffeId {
    SpiffeId::parse("owner", &format!("spiffe://example.org/agent/{name}")).unwrap()
}

fn grant(resource: &str) -> Grant {
    Grant {
        resource: resource.into(),
        action: "read".into(),
    }
}

/// An active task of `owner`, expiring at `expires_at`.
fn task(owner: &SpiffeId, key: Option<&str>, expires_at: UnixMillis) -> Task {
    Task {
        id: TaskId::generate(),
        owner: owner.clone(),
        purpose: "conformance".into(),
        grants: vec![GrantDecision {
            grant: grant("db"),
            decision: Decision::Allowed,
            reason: "policy".into(),
            approval_id: None,
        }],
        labels: BTreeMap::from([("suite".to_owned(), "store".to_owned())]),
        state: TaskState::Active,
        created_at: NOW,
        expires_at,
        ended_at: None,
        purge_at: None,
        parent: None,
        delegation_chain: vec![owner.clone()],
        idempotency_key: key.map(str::to_owned),
    }
}

/// The same task, ended (`Completed`) at `NOW`.
fn ended_task(t: &Task, purge_at: Option<UnixMillis>) -> Task {
    let mut t = t.clone();
    t.state = TaskState::Completed;
    t.ended_at = Some(NOW);
    t.purge_at = purge_at;
    t
}

/// An active credential of `task`, expiring at `expires_at`.
fn credential(task: &Task, key: Option<&str>, expires_at: UnixMillis) -> CredentialRecord {
    CredentialRecord {
        id: CredentialId::generate(),
        task_id: task.id.clone(),
        owner: task.owner.clone(),
        resource: "db".into(),
        action: "read".into(),
        kind: "token".into(),
        issued_at: NOW,
        expires_at,
        state: CredentialState::Active,
        ended_at: None,
        end_reason: None,
        idempotency_key: key.map(str::to_owned),
        attributes: BTreeMap::from([("user".to_owned(), "jb_1".to_owned())]),
        delegation_chain: vec![task.owner.clone()],
    }
}

/// The same credential, ended in `state`.
fn ended_credential(c: &CredentialRecord, state: CredentialState) -> CredentialRecord {
    let mut c = c.clone();
    c.state = state;
    c.ended_at = Some(NOW);
    c.end_reason = Some(match state {
        CredentialState::Expired => RevokeReason::Expired,
        _ => RevokeReason::Completed,
    });
    c
}

fn approval(task: &Task, state: ApprovalState, expires_at: UnixMillis) -> Approval {
    Approval {
        id: ApprovalId::generate(),
        task_id: task.id.clone(),
        requester: task.owner.clone(),
        delegation_chain: vec![task.owner.clone()],
        grant: grant("db"),
        purpose: "conformance".into(),
        state,
        created_at: NOW,
        expires_at,
        decided_by: None,
        decided_at: None,
        reason: String::new(),
        policy_ids: vec!["needs-approval".into()],
    }
}

fn upstream(resource: &str, name: &str, credential_id: &CredentialId) -> UpstreamObject {
    UpstreamObject {
        resource: resource.into(),
        name: name.into(),
        credential_id: credential_id.clone(),
        state: UpstreamState::Live,
        created_at: NOW,
        expires_at: LATER,
    }
}

fn revocation(resource: &str, name: &str, next_attempt_at: UnixMillis) -> Revocation {
    Revocation {
        resource: resource.into(),
        name: name.into(),
        credential_id: None,
        reason: "expired".into(),
        enqueued_at: NOW,
        attempts: 0,
        next_attempt_at,
        last_error: None,
    }
}

fn event(kind: &str, detail: impl Into<String>) -> Event {
    Event {
        kind: kind.into(),
        detail: detail.into(),
        ..Event::default()
    }
}

/// A fresh random secret, as issuers make them.
fn random_secret() -> Secret {
    Secret::new(format!("jbt_{}", hex::encode(rand::random::<[u8; 24]>())))
}

/// Records compare by their JSON (the model types do not all implement `PartialEq`).
#[track_caller]
fn assert_same<T: serde::Serialize>(got: &T, want: &T) {
    assert_eq!(
        serde_json::to_value(got).unwrap(),
        serde_json::to_value(want).unwrap()
    );
}

async fn commit(u: Box<dyn Uow<'_> + '_>) -> Vec<u64> {
    u.commit().await.unwrap()
}

/// Creates `tasks` in one unit of work, holding their owner's lock (all have one owner).
async fn create_tasks(engine: &dyn Store, tasks: &[Task]) {
    let mut u = engine.begin().await.unwrap();
    u.lock_identity(&tasks[0].owner).await.unwrap();
    for t in tasks {
        assert_eq!(u.insert_task(t).await.unwrap(), Inserted::New);
    }
    commit(u).await;
}

/// Creates a credential of its task with `secret`, holding the task's lock.
async fn create_credential(storage: &Storage, rec: &CredentialRecord, secret: &Secret) {
    let sealed = storage.seal_secret(&rec.id, secret).unwrap();
    let mut u = storage.begin().await.unwrap();
    u.lock_task(&rec.task_id).await.unwrap();
    assert_eq!(
        u.insert_credential(rec, &sealed).await.unwrap(),
        Inserted::New
    );
    commit(u).await;
}

/// Runs `n` copies of `f` at once on the runtime's worker threads, each starting only when all
/// are spawned; their results, in order.
async fn race<T, F, Fut>(n: usize, f: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let barrier = barrier.clone();
            let work = f(i);
            tokio::spawn(async move {
                barrier.wait().await;
                work.await
            })
        })
        .collect();
    join_all(handles)
        .await
        .into_iter()
        .map(|r| r.expect("a racing unit panicked"))
        .collect()
}

/// A scheduling point where an engine across a network would wait for a round trip: the other
/// racers run meanwhile, so a missing lock or claim shows. Not a sleep.
async fn pause() {
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
}

/// Every audit entry in the store, parsed, in sequence order.
async fn audit_entries(engine: &dyn Store) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let page = engine.audit_scan(from, 1000).await.unwrap();
        let Some((last, _)) = page.last() else {
            return out;
        };
        from = last + 1;
        for (seq, bytes) in page {
            let e: Entry = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(
                e.seq, seq,
                "an entry is stored under its own sequence number"
            );
            out.push(e);
        }
    }
}

/// Checks the chain and that it holds exactly entries `1..=n`.
async fn assert_chain(engine: &dyn Store, n: u64) -> Vec<Entry> {
    let v = audit::verify(engine, None).await.unwrap();
    assert!(v.ok, "audit chain broken: {v:?}");
    assert_eq!(v.entries, n, "audit entries");
    let entries = audit_entries(engine).await;
    let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=n).collect::<Vec<_>>(),
        "sequence numbers 1..=n, no gap"
    );
    let head = engine.audit_head().await.unwrap();
    assert_eq!(head.seq, n, "audit head");
    if let Some(last) = entries.last() {
        assert_eq!(head.hash, last.hash, "audit head hash");
    }
    entries
}

// ---------------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------------

pub mod cases {
    use super::*;

    /// 1. What is written reads back, through every index; an ended credential keeps no secret
    ///    and no index entry; an ended task leaves its owner's live index.
    pub async fn round_trips(fx: Fixture) {
        let storage = fx.storage().await;
        let engine = &*fx.engine;
        let alice = owner("alice");
        let bob = owner("bob");
        assert_eq!(engine.counts().await.unwrap(), Counts::default());
        assert_eq!(engine.next_due().await.unwrap(), None);

        // Tasks: a root, and a child delegated to bob.
        let root = task(&alice, Some("root-key"), LATER);
        let mut child = task(&bob, Some("child-key"), LATER + 1);
        child.parent = Some(root.id.clone());
        child.delegation_chain = vec![alice.clone(), bob.clone()];
        create_tasks(engine, std::slice::from_ref(&root)).await;
        {
            let mut u = engine.begin().await.unwrap();
            assert!(!u.lock_identity(&bob).await.unwrap().blocked);
            let parent = u.lock_task(&root.id).await.unwrap().expect("root exists");
            assert_same(&parent, &root);
            assert_eq!(u.insert_task(&child).await.unwrap(), Inserted::New);
            commit(u).await;
        }
        assert_same(&engine.get_task(&root.id).await.unwrap().unwrap(), &root);
        assert_same(&engine.get_task(&child.id).await.unwrap().unwrap(), &child);
        assert!(
            engine
                .get_task(&TaskId::generate())
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            engine
                .task_by_idempotency_key(&alice, "root-key")
                .await
                .unwrap(),
            Some(root.id.clone())
        );
        assert_eq!(
            engine
                .task_by_idempotency_key(&bob, "root-key")
                .await
                .unwrap(),
            None,
            "idempotency keys are per owner"
        );
        assert_eq!(
            engine.tasks_of_identity(&alice).await.unwrap(),
            vec![root.id.clone()]
        );
        assert_eq!(
            engine.tasks_of_identity(&bob).await.unwrap(),
            vec![child.id.clone()]
        );
        assert_eq!(
            engine.children_of(&root.id).await.unwrap(),
            vec![child.id.clone()]
        );
        assert!(engine.children_of(&child.id).await.unwrap().is_empty());
        // Admin listing: id order, paged.
        let mut ids = [root.id.clone(), child.id.clone()];
        ids.sort();
        let first = engine.scan_tasks(None, 1).await.unwrap();
        assert_eq!(
            first.iter().map(|t| t.id.clone()).collect::<Vec<_>>(),
            ids[..1]
        );
        let rest = engine.scan_tasks(Some(&ids[0]), 10).await.unwrap();
        assert_eq!(
            rest.iter().map(|t| t.id.clone()).collect::<Vec<_>>(),
            ids[1..]
        );
        assert!(
            engine
                .scan_tasks(Some(&ids[1]), 10)
                .await
                .unwrap()
                .is_empty()
        );

        // A credential with its sealed secret.
        let secret = random_secret();
        let rec = credential(&root, Some("cred-key"), LATER);
        let sealed = storage.seal_secret(&rec.id, &secret).unwrap();
        assert!(
            !sealed
                .sealed
                .windows(secret.expose().len())
                .any(|w| w == secret.expose().as_bytes()),
            "the engine is given ciphertext"
        );
        {
            let mut u = engine.begin().await.unwrap();
            let t = u.lock_task(&root.id).await.unwrap().unwrap();
            assert_eq!(t.state, TaskState::Active);
            assert_eq!(
                u.insert_credential(&rec, &sealed).await.unwrap(),
                Inserted::New
            );
            commit(u).await;
        }
        assert_same(
            &engine.get_credential(&rec.id).await.unwrap().unwrap(),
            &rec,
        );
        assert!(
            engine
                .get_credential(&CredentialId::generate())
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            engine.credential_sealed(&rec.id).await.unwrap(),
            Some(sealed.sealed.clone())
        );
        assert_eq!(
            storage.credential_secret(&rec.id).await.unwrap(),
            Some(secret.clone())
        );
        assert_eq!(
            storage.credential_by_secret(secret.expose()).await.unwrap(),
            Some(rec.id.clone())
        );
        assert_eq!(
            engine.credential_by_index(&sealed.index).await.unwrap(),
            Some(rec.id.clone())
        );
        assert_eq!(
            storage
                .credential_by_secret(random_secret().expose())
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            engine
                .credential_by_idempotency_key(&root.id, "cred-key")
                .await
                .unwrap(),
            Some(rec.id.clone())
        );
        assert_eq!(
            engine
                .credential_by_idempotency_key(&child.id, "cred-key")
                .await
                .unwrap(),
            None,
            "credential idempotency keys are per task"
        );
        assert_eq!(
            engine.credentials_of_task(&root.id).await.unwrap(),
            vec![rec.id.clone()]
        );
        assert!(
            engine
                .credentials_of_task(&child.id)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            engine.counts().await.unwrap(),
            Counts {
                tasks: 2,
                credentials: 1
            }
        );

        // Approvals: by id, by grant (the newest request of a grant), listed.
        let first_request = approval(&root, ApprovalState::Pending, LATER);
        let mut second_request = approval(&root, ApprovalState::Pending, LATER);
        {
            let mut u = engine.begin().await.unwrap();
            u.lock_task(&root.id).await.unwrap();
            u.put_approval(&first_request).await.unwrap();
            commit(u).await;
        }
        assert_same(
            &engine
                .get_approval(&first_request.id)
                .await
                .unwrap()
                .unwrap(),
            &first_request,
        );
        assert_eq!(
            engine
                .approval_for_grant(&root.id, &grant("db"))
                .await
                .unwrap(),
            Some(first_request.id.clone())
        );
        assert_eq!(
            engine
                .approval_for_grant(&root.id, &grant("other"))
                .await
                .unwrap(),
            None
        );
        second_request.state = ApprovalState::Approved;
        second_request.decided_by = Some(bob.clone());
        second_request.decided_at = Some(NOW);
        {
            let mut u = engine.begin().await.unwrap();
            u.lock_task(&root.id).await.unwrap();
            u.put_approval(&second_request).await.unwrap();
            commit(u).await;
        }
        assert_same(
            &engine
                .get_approval(&second_request.id)
                .await
                .unwrap()
                .unwrap(),
            &second_request,
        );
        assert_eq!(
            engine
                .approval_for_grant(&root.id, &grant("db"))
                .await
                .unwrap(),
            Some(second_request.id.clone())
        );
        let listed: BTreeSet<ApprovalId> = engine
            .list_approvals()
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.id)
            .collect();
        assert_eq!(
            listed,
            BTreeSet::from([first_request.id.clone(), second_request.id.clone()])
        );

        // The upstream ledger and the revocation queue.
        {
            let mut u = engine.begin().await.unwrap();
            for name in ["u2", "u3", "u1"] {
                u.put_upstream(&upstream("db", name, &rec.id))
                    .await
                    .unwrap();
            }
            commit(u).await;
        }
        let names = |objs: Vec<UpstreamObject>| -> BTreeSet<String> {
            objs.into_iter().map(|o| o.name).collect()
        };
        let objs = engine.upstream_objects().await.unwrap();
        assert_same(
            objs.iter().find(|o| o.name == "u1").unwrap(),
            &upstream("db", "u1", &rec.id),
        );
        assert_eq!(
            names(objs),
            BTreeSet::from(["u1".into(), "u2".into(), "u3".into()])
        );
        {
            let mut u = engine.begin().await.unwrap();
            u.queue_revocation(&revocation("db", "u2", NOW))
                .await
                .unwrap();
            u.queue_revocation(&revocation("db", "u1", NOW))
                .await
                .unwrap();
            commit(u).await;
        }
        assert_eq!(
            names(engine.upstream_objects().await.unwrap()),
            BTreeSet::from(["u3".into()]),
            "a queued revocation leaves the ledger"
        );
        let queue = engine.revocations().await.unwrap();
        assert_same(&queue[1], &revocation("db", "u2", NOW));
        assert_eq!(
            queue.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["u1", "u2"],
            "the queue is in key order"
        );
        let mut retried = revocation("db", "u2", NOW + 1_000);
        retried.attempts = 3;
        retried.last_error = Some("connection refused".into());
        {
            let mut u = engine.begin().await.unwrap();
            u.update_revocation(&retried).await.unwrap();
            assert!(u.remove_revocation("db", "u1").await.unwrap());
            assert!(!u.remove_revocation("db", "u1").await.unwrap());
            assert!(!u.remove_revocation("db", "nobody").await.unwrap());
            commit(u).await;
        }
        let queue = engine.revocations().await.unwrap();
        assert_eq!(queue.len(), 1);
        assert_same(&queue[0], &retried);

        // Raw meta values, and sealed ones through `Storage`.
        assert_eq!(engine.meta_get("conformance/absent").await.unwrap(), None);
        {
            let mut u = engine.begin().await.unwrap();
            u.meta_put("conformance/x", b"one".to_vec()).await.unwrap();
            commit(u).await;
        }
        assert_eq!(
            engine.meta_get("conformance/x").await.unwrap(),
            Some(b"one".to_vec())
        );
        let s1 = Secret::new("signing-key-one-0123456789".into());
        let s2 = Secret::new("signing-key-two-0123456789".into());
        let s3 = Secret::new("signing-key-three-0123456789".into());
        assert_eq!(
            storage.meta_create_sealed("signing", &s1).await.unwrap(),
            s1
        );
        assert_eq!(
            storage.meta_create_sealed("signing", &s2).await.unwrap(),
            s1,
            "created once"
        );
        assert_eq!(
            storage.meta_get_sealed("signing").await.unwrap(),
            Some(s1.clone())
        );
        assert!(
            storage
                .meta_replace_sealed("signing", Some(&s1), &s3)
                .await
                .unwrap()
        );
        assert!(
            !storage
                .meta_replace_sealed("signing", Some(&s1), &s2)
                .await
                .unwrap()
        );
        assert_eq!(
            storage.meta_get_sealed("signing").await.unwrap(),
            Some(s3.clone())
        );

        // The expiry index: the earliest entry first.
        assert_eq!(engine.next_due().await.unwrap(), Some(LATER));

        // An ended credential keeps its record, and no secret and no index entry.
        let expired = ended_credential(&rec, CredentialState::Expired);
        {
            let mut u = engine.begin().await.unwrap();
            u.lock_task(&root.id).await.unwrap();
            u.update_credential(&expired).await.unwrap();
            commit(u).await;
        }
        assert_same(
            &engine.get_credential(&rec.id).await.unwrap().unwrap(),
            &expired,
        );
        assert_eq!(engine.credential_sealed(&rec.id).await.unwrap(), None);
        assert_eq!(storage.credential_secret(&rec.id).await.unwrap(), None);
        assert_eq!(
            storage.credential_by_secret(secret.expose()).await.unwrap(),
            None
        );
        assert_eq!(
            engine.credential_by_index(&sealed.index).await.unwrap(),
            None
        );
        assert_eq!(
            engine.credentials_of_task(&root.id).await.unwrap(),
            vec![rec.id.clone()]
        );
        assert_eq!(engine.counts().await.unwrap().credentials, 0);

        // An ended task leaves its owner's live index, and gets its purge entry.
        let done = ended_task(&root, Some(LATER + 10));
        {
            let mut u = engine.begin().await.unwrap();
            u.lock_task(&root.id).await.unwrap();
            u.update_task(&done).await.unwrap();
            commit(u).await;
        }
        assert_same(&engine.get_task(&root.id).await.unwrap().unwrap(), &done);
        assert!(engine.tasks_of_identity(&alice).await.unwrap().is_empty());
        assert_eq!(
            engine.tasks_of_identity(&bob).await.unwrap(),
            vec![child.id.clone()]
        );
        assert_eq!(
            engine.counts().await.unwrap(),
            Counts {
                tasks: 1,
                credentials: 0
            }
        );
        let mut u = engine.begin().await.unwrap();
        let due = u.claim_due(LATER + 10, 100).await.unwrap();
        drop(u);
        let times: Vec<UnixMillis> = due.iter().map(|(at, _)| *at).collect();
        assert!(times.is_sorted(), "earliest first: {due:?}");
        assert_eq!(
            due.into_iter().collect::<HashSet<_>>(),
            HashSet::from([
                (LATER, Expiring::Task(root.id.clone())),
                (LATER, Expiring::Credential(rec.id.clone())),
                (LATER + 1, Expiring::Task(child.id.clone())),
                (LATER + 10, Expiring::Purge(root.id.clone())),
            ])
        );
    }

    /// Purging an ended task deletes it and everything kept for it; an active task is kept.
    pub async fn purge(fx: Fixture) {
        let storage = fx.storage().await;
        let engine = &*fx.engine;
        let alice = owner("alice");
        let t = task(&alice, Some("purged"), LATER);
        let mut child = task(&alice, None, LATER);
        child.parent = Some(t.id.clone());
        create_tasks(engine, &[t.clone(), child.clone()]).await;
        let rec = credential(&t, Some("c"), LATER + 5);
        let secret = random_secret();
        create_credential(&storage, &rec, &secret).await;
        let a = approval(&t, ApprovalState::Pending, LATER);
        {
            let mut u = engine.begin().await.unwrap();
            u.lock_task(&t.id).await.unwrap();
            u.put_approval(&a).await.unwrap();
            commit(u).await;
        }

        // Active: not purged, nothing removed.
        {
            let mut u = engine.begin().await.unwrap();
            u.lock_task(&t.id).await.unwrap();
            assert!(!u.purge_task(&t.id).await.unwrap());
            commit(u).await;
        }
        assert!(engine.get_task(&t.id).await.unwrap().is_some());
        assert!(engine.get_credential(&rec.id).await.unwrap().is_some());
        assert!(engine.get_approval(&a.id).await.unwrap().is_some());

        {
            let mut u = engine.begin().await.unwrap();
            u.lock_task(&t.id).await.unwrap();
            u.update_credential(&ended_credential(&rec, CredentialState::Revoked))
                .await
                .unwrap();
            u.update_task(&ended_task(&t, Some(LATER + 10)))
                .await
                .unwrap();
            assert!(u.purge_task(&t.id).await.unwrap());
            commit(u).await;
        }
        assert!(engine.get_task(&t.id).await.unwrap().is_none());
        assert_eq!(
            engine
                .task_by_idempotency_key(&alice, "purged")
                .await
                .unwrap(),
            None
        );
        assert!(engine.get_credential(&rec.id).await.unwrap().is_none());
        assert_eq!(engine.credential_sealed(&rec.id).await.unwrap(), None);
        assert_eq!(
            storage.credential_by_secret(secret.expose()).await.unwrap(),
            None
        );
        assert!(engine.credentials_of_task(&t.id).await.unwrap().is_empty());
        assert_eq!(
            engine
                .credential_by_idempotency_key(&t.id, "c")
                .await
                .unwrap(),
            None
        );
        assert!(engine.get_approval(&a.id).await.unwrap().is_none());
        assert_eq!(
            engine
                .approval_for_grant(&t.id, &grant("db"))
                .await
                .unwrap(),
            None
        );
        assert!(engine.children_of(&t.id).await.unwrap().is_empty());
        assert!(
            engine
                .scan_tasks(None, 10)
                .await
                .unwrap()
                .iter()
                .all(|x| x.id != t.id)
        );
        // The child stays, with its own entries.
        assert!(engine.get_task(&child.id).await.unwrap().is_some());
        assert_eq!(
            engine.tasks_of_identity(&alice).await.unwrap(),
            vec![child.id.clone()]
        );
        assert_eq!(
            engine.counts().await.unwrap(),
            Counts {
                tasks: 1,
                credentials: 0
            }
        );
        // No expiry entry for the task's record or its credential is left.
        let mut u = engine.begin().await.unwrap();
        let due = u.claim_due(i64::MAX, 100).await.unwrap();
        drop(u);
        assert!(
            !due.iter().any(|(_, w)| *w == Expiring::Task(t.id.clone())
                || *w == Expiring::Credential(rec.id.clone())),
            "{due:?}"
        );
        // Purging again finds nothing.
        let mut u = engine.begin().await.unwrap();
        assert!(!u.purge_task(&t.id).await.unwrap());
        commit(u).await;
    }

    /// A purge also deletes the approvals of a grant that a newer request replaced (the broker
    /// opens a new request once the previous one was used, denied or lapsed).
    pub async fn purge_removes_replaced_approvals(fx: Fixture) {
        let engine = &*fx.engine;
        let t = task(&owner("alice"), None, LATER);
        create_tasks(engine, std::slice::from_ref(&t)).await;
        let used = approval(&t, ApprovalState::Used, LATER);
        let newer = approval(&t, ApprovalState::Pending, LATER);
        let mut u = engine.begin().await.unwrap();
        u.lock_task(&t.id).await.unwrap();
        u.put_approval(&used).await.unwrap();
        u.put_approval(&newer).await.unwrap();
        u.update_task(&ended_task(&t, Some(LATER))).await.unwrap();
        assert!(u.purge_task(&t.id).await.unwrap());
        commit(u).await;
        assert!(engine.get_approval(&newer.id).await.unwrap().is_none());
        assert!(
            engine.get_approval(&used.id).await.unwrap().is_none(),
            "the replaced approval of a purged task is kept"
        );
        assert!(engine.list_approvals().await.unwrap().is_empty());
    }

    /// How one of the racing units got its answer.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Got<T> {
        /// `Inserted::New`: this unit wrote it.
        New(T),
        /// `Inserted::Existing`.
        Existing(T),
        /// Found by the idempotency-key lookup before inserting.
        Found(T),
    }

    impl<T: Clone> Got<T> {
        fn id(&self) -> T {
            match self {
                Got::New(t) | Got::Existing(t) | Got::Found(t) => t.clone(),
            }
        }
    }

    /// Owners (or tasks) raced for at once in the cases below, each by its own racers: the
    /// more races, the likelier a missing lock shows.
    const RACES: usize = 4;

    /// 2a. For each of four owners, sixteen units create a task with one idempotency key: one
    ///     task per owner, one id for all its racers.
    pub async fn task_idempotency_under_concurrency(fx: Fixture) {
        const RACERS: usize = 16;
        let owners: Vec<SpiffeId> = (0..RACES).map(|i| owner(&format!("a{i}"))).collect();
        let got = race(RACES * RACERS, |i| {
            let engine = fx.handle(i);
            let owner = owners[i % RACES].clone();
            async move {
                let mut u = engine.begin().await.unwrap();
                u.lock_identity(&owner).await.unwrap();
                pause().await;
                // Half look the key up first (as the broker does); half rely on the insert.
                if (i / RACES).is_multiple_of(2)
                    && let Some(id) = engine
                        .task_by_idempotency_key(&owner, "same")
                        .await
                        .unwrap()
                {
                    assert!(engine.get_task(&id).await.unwrap().is_some());
                    return Got::Found(id);
                }
                let t = task(&owner, Some("same"), LATER);
                pause().await;
                let got = match u.insert_task(&t).await.unwrap() {
                    Inserted::New => Got::New(t.id.clone()),
                    Inserted::Existing(id) => Got::Existing(id),
                };
                commit(u).await;
                got
            }
        })
        .await;
        for (o, owner) in owners.iter().enumerate() {
            let got: Vec<&Got<TaskId>> = got.iter().skip(o).step_by(RACES).collect();
            let id = got[0].id();
            assert!(got.iter().all(|g| g.id() == id), "one id for all: {got:?}");
            let new = got.iter().filter(|g| matches!(g, Got::New(_))).count();
            assert_eq!(new, 1, "{got:?}");
            assert_eq!(
                fx.engine.tasks_of_identity(owner).await.unwrap(),
                vec![id.clone()]
            );
            assert_eq!(
                fx.engine
                    .task_by_idempotency_key(owner, "same")
                    .await
                    .unwrap(),
                Some(id)
            );
        }
        assert_eq!(engine_tasks(&fx).await.len(), RACES);
        assert_eq!(fx.engine.counts().await.unwrap().tasks, RACES as u64);
    }

    async fn engine_tasks(fx: &Fixture) -> Vec<TaskId> {
        let tasks = fx.engine.scan_tasks(None, 1000).await.unwrap();
        tasks.into_iter().map(|t| t.id).collect()
    }

    /// 2b. For each of four tasks, sixteen units issue a credential with one idempotency key
    ///     under the task's lock: one credential per task; the losers' secrets were never
    ///     written.
    pub async fn credential_idempotency_under_concurrency(fx: Fixture) {
        const RACERS: usize = 16;
        let storages = [
            Arc::new(fx.storage().await),
            Arc::new(Storage::open(fx.other.clone(), &fx.env.kek).await.unwrap()),
        ];
        let tasks: Vec<Task> = (0..RACES)
            .map(|_| task(&owner("alice"), None, LATER))
            .collect();
        create_tasks(&*fx.engine, &tasks).await;
        let got = race(RACES * RACERS, |i| {
            let storage = storages[i % 2].clone();
            let t = tasks[i % RACES].clone();
            async move {
                let secret = random_secret();
                let rec = credential(&t, Some("same"), LATER);
                let sealed = storage.seal_secret(&rec.id, &secret).unwrap();
                let mut u = storage.begin().await.unwrap();
                u.lock_task(&t.id).await.unwrap().expect("the task exists");
                pause().await;
                if (i / RACES).is_multiple_of(2)
                    && let Some(id) = storage
                        .credential_by_idempotency_key(&t.id, "same")
                        .await
                        .unwrap()
                {
                    assert!(storage.get_credential(&id).await.unwrap().is_some());
                    return (Got::Found(id), secret);
                }
                pause().await;
                let got = match u.insert_credential(&rec, &sealed).await.unwrap() {
                    Inserted::New => Got::New(rec.id.clone()),
                    Inserted::Existing(id) => Got::Existing(id),
                };
                commit(u).await;
                (got, secret)
            }
        })
        .await;
        for (n, t) in tasks.iter().enumerate() {
            let got: Vec<&(Got<CredentialId>, Secret)> =
                got.iter().skip(n).step_by(RACES).collect();
            let id = got[0].0.id();
            assert!(
                got.iter().all(|(g, _)| g.id() == id),
                "one id for all: {got:?}"
            );
            let winners: Vec<_> = got
                .iter()
                .filter(|(g, _)| matches!(g, Got::New(_)))
                .collect();
            assert_eq!(winners.len(), 1, "{got:?}");
            let winner_secret = &winners[0].1;
            assert_eq!(
                fx.engine.credentials_of_task(&t.id).await.unwrap(),
                vec![id.clone()]
            );
            assert_eq!(
                storages[0].credential_secret(&id).await.unwrap().as_ref(),
                Some(winner_secret)
            );
            for (g, secret) in got {
                let found = storages[1]
                    .credential_by_secret(secret.expose())
                    .await
                    .unwrap();
                if matches!(g, Got::New(_)) {
                    assert_eq!(found, Some(id.clone()));
                } else {
                    assert_eq!(found, None, "a unit that did not insert wrote no secret");
                }
            }
        }
        assert_eq!(fx.engine.counts().await.unwrap().credentials, RACES as u64);
    }

    /// 3. For each of four owners, thirty-two units each count the owner's live tasks under its
    ///    lock and create one only below the quota of 5: exactly 5 each.
    pub async fn quota_under_concurrency(fx: Fixture) {
        const QUOTA: usize = 5;
        const RACERS: usize = 32;
        let owners: Vec<SpiffeId> = (0..RACES).map(|i| owner(&format!("a{i}"))).collect();
        let inserted = race(RACES * RACERS, |i| {
            let engine = fx.handle(i);
            let owner = owners[i % RACES].clone();
            async move {
                let mut u = engine.begin().await.unwrap();
                u.lock_identity(&owner).await.unwrap();
                let live = engine.tasks_of_identity(&owner).await.unwrap().len();
                pause().await;
                let insert = live < QUOTA;
                if insert {
                    let t = task(&owner, None, LATER);
                    assert_eq!(u.insert_task(&t).await.unwrap(), Inserted::New);
                }
                commit(u).await;
                insert
            }
        })
        .await;
        for (o, owner) in owners.iter().enumerate() {
            let n = inserted
                .iter()
                .skip(o)
                .step_by(RACES)
                .filter(|i| **i)
                .count();
            assert_eq!(n, QUOTA, "tasks created for {owner}");
            assert_eq!(
                fx.engine.tasks_of_identity(owner).await.unwrap().len(),
                QUOTA
            );
        }
        assert_eq!(engine_tasks(&fx).await.len(), QUOTA * RACES);
        assert_eq!(
            fx.engine.counts().await.unwrap().tasks,
            (QUOTA * RACES) as u64
        );
    }

    /// 4. An approval is used once, whoever races for it.
    pub async fn approval_used_once(fx: Fixture) {
        let engine = &*fx.engine;
        let t = task(&owner("alice"), None, LATER);
        create_tasks(engine, std::slice::from_ref(&t)).await;
        // Many approvals raced for at once: the window of a check-then-write is small.
        const APPROVALS: usize = 32;
        const RACERS: usize = 8;
        let all: Vec<Approval> = (0..APPROVALS)
            .map(|_| approval(&t, ApprovalState::Approved, LATER))
            .collect();
        let granted = all[0].clone();
        let pending = approval(&t, ApprovalState::Pending, LATER);
        let lapsed = approval(&t, ApprovalState::Approved, NOW);
        {
            let mut u = engine.begin().await.unwrap();
            for a in all.iter().chain([&pending, &lapsed]) {
                u.put_approval(a).await.unwrap();
            }
            commit(u).await;
        }
        let won = race(APPROVALS * RACERS, |i| {
            let engine = fx.handle(i);
            let id = all[i % APPROVALS].id.clone();
            async move {
                let mut u = engine.begin().await.unwrap();
                let won = u
                    .consume_approval(&id, &format!("worker-{i}"), NOW)
                    .await
                    .unwrap();
                commit(u).await;
                won
            }
        })
        .await;
        for (n, a) in all.iter().enumerate() {
            let won: Vec<bool> = won.iter().skip(n).step_by(APPROVALS).copied().collect();
            assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
            let state = engine.get_approval(&a.id).await.unwrap().unwrap().state;
            assert_eq!(state, ApprovalState::Used);
        }
        let mut u = engine.begin().await.unwrap();
        assert!(
            !u.consume_approval(&granted.id, "late", NOW).await.unwrap(),
            "used"
        );
        assert!(
            !u.consume_approval(&pending.id, "w", NOW).await.unwrap(),
            "not granted"
        );
        assert!(
            !u.consume_approval(&lapsed.id, "w", NOW).await.unwrap(),
            "expired"
        );
        assert!(
            !u.consume_approval(&ApprovalId::generate(), "w", NOW)
                .await
                .unwrap()
        );
        commit(u).await;
        assert_eq!(
            engine
                .get_approval(&pending.id)
                .await
                .unwrap()
                .unwrap()
                .state,
            ApprovalState::Pending
        );
        assert_eq!(
            engine
                .get_approval(&lapsed.id)
                .await
                .unwrap()
                .unwrap()
                .state,
            ApprovalState::Approved
        );
    }

    /// 5. Issuing (only to an active task, read under its lock) races completing (end the task,
    ///    then every credential of it): never an active credential on an ended task.
    pub async fn issue_and_complete_race(fx: Fixture) {
        const ROUNDS: usize = 200;
        let storage = Arc::new(fx.storage().await);
        let alice = owner("alice");
        let (mut issued_first, mut completed_first) = (0, 0);
        for round in 0..ROUNDS {
            let t = task(&alice, None, LATER);
            create_tasks(&*fx.engine, std::slice::from_ref(&t)).await;
            // Both sides start together.
            let start = Arc::new(tokio::sync::Barrier::new(2));
            let issuer = {
                let storage = storage.clone();
                let t = t.clone();
                let start = start.clone();
                async move {
                    start.wait().await;
                    let rec = credential(&t, Some("issue"), LATER);
                    let secret = random_secret();
                    let sealed = storage.seal_secret(&rec.id, &secret).unwrap();
                    let mut u = storage.begin().await.unwrap();
                    let current = u.lock_task(&t.id).await.unwrap().expect("the task exists");
                    if current.state != TaskState::Active {
                        return None;
                    }
                    pause().await;
                    assert_eq!(
                        u.insert_credential(&rec, &sealed).await.unwrap(),
                        Inserted::New
                    );
                    commit(u).await;
                    Some((rec.id, secret))
                }
            };
            let completer = {
                let engine = fx.other.clone();
                let id = t.id.clone();
                async move {
                    start.wait().await;
                    let mut u = engine.begin().await.unwrap();
                    let current = u.lock_task(&id).await.unwrap().expect("the task exists");
                    u.update_task(&ended_task(&current, None)).await.unwrap();
                    pause().await;
                    let mut ended = 0;
                    for cid in engine.credentials_of_task(&id).await.unwrap() {
                        let Some(c) = engine.get_credential(&cid).await.unwrap() else {
                            continue;
                        };
                        if c.state == CredentialState::Active {
                            let c = ended_credential(&c, CredentialState::Revoked);
                            u.update_credential(&c).await.unwrap();
                            ended += 1;
                        }
                    }
                    commit(u).await;
                    ended
                }
            };
            let (issued, ended) = tokio::join!(tokio::spawn(issuer), tokio::spawn(completer));
            let (issued, ended) = (issued.unwrap(), ended.unwrap());

            let now_task = fx.engine.get_task(&t.id).await.unwrap().unwrap();
            assert_eq!(now_task.state, TaskState::Completed, "round {round}");
            for cid in fx.engine.credentials_of_task(&t.id).await.unwrap() {
                let c = fx.engine.get_credential(&cid).await.unwrap().unwrap();
                assert_ne!(
                    c.state,
                    CredentialState::Active,
                    "round {round}: an active credential on an ended task"
                );
            }
            match issued {
                Some((cid, secret)) => {
                    issued_first += 1;
                    assert_eq!(
                        ended, 1,
                        "round {round}: the completer ended the credential"
                    );
                    assert_eq!(
                        storage.credential_by_secret(secret.expose()).await.unwrap(),
                        None
                    );
                    assert_eq!(storage.credential_secret(&cid).await.unwrap(), None);
                }
                None => {
                    completed_first += 1;
                    assert_eq!(ended, 0);
                    assert!(
                        fx.engine
                            .credentials_of_task(&t.id)
                            .await
                            .unwrap()
                            .is_empty()
                    );
                }
            }
        }
        assert_eq!(fx.engine.counts().await.unwrap(), Counts::default());
        eprintln!(
            "issue/complete: issued first in {issued_first} rounds, completed first in \
             {completed_first}"
        );
    }

    /// 6. Thousands of units append to one chain; a tenth are dropped before commit and append
    ///    nothing. The chain verifies, with sequence numbers 1..=n and no gap.
    pub async fn audit_with_dropped_units(fx: Fixture) {
        const UNITS: usize = 2_000;
        let engine = &*fx.engine;
        let head = engine.audit_head().await.unwrap();
        assert_eq!(head.seq, 0);
        assert_eq!(head.hash, hex::encode(audit::GENESIS));
        let alice = owner("alice");
        let tasks: Vec<Task> = (0..8).map(|_| task(&alice, None, LATER)).collect();
        create_tasks(engine, &tasks).await;
        assert!(
            commit(engine.begin().await.unwrap()).await.is_empty(),
            "no events, no entries"
        );

        let tasks = Arc::new(tasks);
        // Per unit: whether it committed, how many events, the sequence numbers it got.
        let results = race(UNITS, |i| {
            let engine = fx.handle(i);
            let tasks = tasks.clone();
            async move {
                let events = 1 + i % 3;
                let mut u = engine.begin().await.unwrap();
                let t = &tasks[i % tasks.len()];
                u.lock_task(&t.id).await.unwrap();
                for j in 0..events {
                    u.audit(NOW, event("conformance", format!("{i}/{j}")));
                }
                pause().await;
                if i % 10 == 3 {
                    drop(u);
                    return (false, events, Vec::new());
                }
                (true, events, u.commit().await.unwrap())
            }
        })
        .await;

        let mut all_seqs = Vec::new();
        let mut committed_units = 0;
        let mut expected_events = 0;
        for (i, (committed, events, seqs)) in results.iter().enumerate() {
            if !committed {
                continue;
            }
            committed_units += 1;
            expected_events += events;
            assert_eq!(seqs.len(), *events, "unit {i}: one entry per event");
            assert!(
                seqs.is_sorted(),
                "unit {i}: entries in the order recorded: {seqs:?}"
            );
            all_seqs.extend(seqs.iter().copied());
        }
        assert_eq!(committed_units, UNITS - UNITS / 10);
        let n = expected_events as u64;
        all_seqs.sort();
        assert_eq!(
            all_seqs,
            (1..=n).collect::<Vec<_>>(),
            "the commits' sequence numbers"
        );

        let entries = assert_chain(engine, n).await;
        // Each entry is the event its unit recorded under that number; dropped units' are absent.
        let mut at: BTreeMap<u64, String> = BTreeMap::new();
        for (i, (committed, _, seqs)) in results.iter().enumerate() {
            if *committed {
                for (j, seq) in seqs.iter().enumerate() {
                    at.insert(*seq, format!("{i}/{j}"));
                }
            }
        }
        for e in &entries {
            assert_eq!(e.event.kind, "conformance");
            assert_eq!(e.time, NOW);
            assert_eq!(Some(&e.event.detail), at.get(&e.seq), "entry {}", e.seq);
        }
    }

    /// 7. Two reapers claim due entries in batches, each removing what it claims and recording
    ///    one event per entry: every entry handled exactly once. A claim is exclusive and ends
    ///    with its unit.
    pub async fn two_reapers(fx: Fixture) {
        const TASKS: usize = 300;
        let engine = &*fx.engine;
        let alice = owner("alice");
        // Due one millisecond apart, the last one at NOW.
        let tasks: Vec<Task> = (0..TASKS)
            .map(|i| task(&alice, None, NOW - (TASKS - 1 - i) as i64))
            .collect();
        create_tasks(engine, &tasks).await;
        assert_eq!(engine.next_due().await.unwrap(), Some(tasks[0].expires_at));

        // Nothing is due before the first expiry.
        let mut u = engine.begin().await.unwrap();
        assert!(
            u.claim_due(tasks[0].expires_at - 1, 10)
                .await
                .unwrap()
                .is_empty()
        );
        drop(u);
        // Claims are exclusive, earliest first, and end with their unit (dropped or committed).
        let expect = |range: std::ops::Range<usize>| -> Vec<(UnixMillis, Expiring)> {
            tasks[range]
                .iter()
                .map(|t| (t.expires_at, Expiring::Task(t.id.clone())))
                .collect()
        };
        let mut a = engine.begin().await.unwrap();
        assert_eq!(a.claim_due(NOW, 10).await.unwrap(), expect(0..10));
        let mut b = engine.begin().await.unwrap();
        assert_eq!(b.claim_due(NOW, 10).await.unwrap(), expect(10..20));
        drop(a);
        let mut c = engine.begin().await.unwrap();
        assert_eq!(c.claim_due(NOW, 10).await.unwrap(), expect(0..10));
        commit(b).await;
        commit(c).await;
        let mut d = engine.begin().await.unwrap();
        assert_eq!(d.claim_due(NOW, 20).await.unwrap(), expect(0..20));
        drop(d);

        let per_reaper = race(2, |r| {
            let engine = fx.handle(r);
            async move {
                let mut handled = Vec::new();
                loop {
                    let mut u = engine.begin().await.unwrap();
                    let claimed = u.claim_due(NOW, 64).await.unwrap();
                    if claimed.is_empty() {
                        return handled;
                    }
                    pause().await;
                    for (at, what) in &claimed {
                        let Expiring::Task(id) = what else {
                            panic!("only task entries were made: {what:?}");
                        };
                        // Claimed by this unit alone: the task is ours and still active.
                        let t = u
                            .try_lock_task(id)
                            .await
                            .unwrap()
                            .expect("nobody else holds a claimed task")
                            .expect("the task exists");
                        assert_eq!(t.state, TaskState::Active, "reaped twice: {id}");
                        let mut t = t;
                        t.state = TaskState::Expired;
                        t.ended_at = Some(NOW);
                        u.update_task(&t).await.unwrap();
                        u.remove_due(*at, what).await.unwrap();
                        u.audit(NOW, event("task_ended", format!("reaper {r}: {id}")));
                    }
                    commit(u).await;
                    handled.extend(claimed);
                }
            }
        })
        .await;
        eprintln!(
            "reapers handled {} and {} entries",
            per_reaper[0].len(),
            per_reaper[1].len()
        );
        let handled: Vec<_> = per_reaper.into_iter().flatten().collect();
        assert_eq!(handled.len(), TASKS, "each entry handled once");
        let unique: HashSet<_> = handled.iter().cloned().collect();
        assert_eq!(unique, expect(0..TASKS).into_iter().collect::<HashSet<_>>());

        let mut u = engine.begin().await.unwrap();
        assert!(
            u.claim_due(i64::MAX, 10).await.unwrap().is_empty(),
            "nothing left due"
        );
        drop(u);
        assert_eq!(engine.next_due().await.unwrap(), None);
        assert!(engine.tasks_of_identity(&alice).await.unwrap().is_empty());
        let entries = assert_chain(engine, TASKS as u64).await;
        let reaped: HashSet<String> = entries
            .iter()
            .map(|e| e.event.detail.split_once(": ").unwrap().1.to_owned())
            .collect();
        assert_eq!(reaped.len(), TASKS, "one audit entry per task");
    }

    /// 8. Two revocation workers: each queued revocation is claimed and removed by exactly one;
    ///    a claim whose worker stopped comes back once its hold is over.
    pub async fn two_revocation_workers(fx: Fixture) {
        // 300 rather than 100: more claims racing removals, so a claim read from a stale queue
        // (a revocation handed out again after its removal) shows on every run.
        const QUEUED: usize = 300;
        const HOLD: i64 = 60_000;
        let engine = &*fx.engine;
        let cid = CredentialId::generate();
        let names: Vec<String> = (0..QUEUED).map(|i| format!("jb_{i:03}")).collect();
        {
            let mut u = engine.begin().await.unwrap();
            for name in &names {
                u.put_upstream(&upstream("db", name, &cid)).await.unwrap();
                u.queue_revocation(&revocation("db", name, NOW))
                    .await
                    .unwrap();
            }
            commit(u).await;
        }
        assert!(engine.upstream_objects().await.unwrap().is_empty());
        assert_eq!(engine.revocations().await.unwrap().len(), QUEUED);

        // Each worker: claim a batch in one unit, then (the upstream work, then) remove each
        // revocation in a unit of its own.
        let per_worker = race(2, |w| {
            let engine = fx.handle(w);
            async move {
                let (mut claimed, mut removed) = (Vec::new(), Vec::new());
                loop {
                    let mut u = engine.begin().await.unwrap();
                    let batch = u.claim_revocations(NOW, 16, HOLD).await.unwrap();
                    commit(u).await;
                    if batch.is_empty() {
                        return (claimed, removed);
                    }
                    for r in batch {
                        pause().await;
                        let mut u = engine.begin().await.unwrap();
                        let ok = u.remove_revocation(&r.resource, &r.name).await.unwrap();
                        commit(u).await;
                        if ok {
                            removed.push(r.name.clone());
                        }
                        claimed.push(r.name);
                    }
                }
            }
        })
        .await;
        eprintln!(
            "revocation workers removed {} and {}",
            per_worker[0].1.len(),
            per_worker[1].1.len()
        );
        let claimed: Vec<String> = per_worker.iter().flat_map(|w| w.0.clone()).collect();
        let removed: Vec<String> = per_worker.iter().flat_map(|w| w.1.clone()).collect();
        assert_eq!(
            claimed.len(),
            QUEUED,
            "each revocation claimed by one worker"
        );
        assert_eq!(removed.len(), QUEUED, "each removal returned true once");
        let removed: BTreeSet<String> = removed.into_iter().collect();
        assert_eq!(removed, names.iter().cloned().collect::<BTreeSet<_>>());
        assert!(engine.revocations().await.unwrap().is_empty());

        // A worker claims and stops: nobody else gets the claim until its hold is over.
        let t0 = NOW + 10 * HOLD;
        let mut u = engine.begin().await.unwrap();
        u.queue_revocation(&revocation("db", "stuck", NOW))
            .await
            .unwrap();
        u.queue_revocation(&revocation("db", "later", t0 + 5_000))
            .await
            .unwrap();
        commit(u).await;
        let claim = async |now: UnixMillis, hold: i64| -> Vec<String> {
            let mut u = engine.begin().await.unwrap();
            let got = u.claim_revocations(now, 16, hold).await.unwrap();
            commit(u).await;
            got.into_iter().map(|r| r.name).collect()
        };
        assert_eq!(claim(t0, 1_000).await, ["stuck"], "`later` is not due yet");
        assert!(claim(t0 + 1, 1_000).await.is_empty(), "held");
        assert!(claim(t0 + 999, 1_000).await.is_empty(), "held");
        assert_eq!(claim(t0 + 1_001, HOLD).await, ["stuck"], "the hold is over");
        // Its new holder reschedules it: that ends the claim.
        let mut retry = revocation("db", "stuck", t0 + 1_001);
        retry.attempts = 1;
        retry.last_error = Some("timeout".into());
        let mut u = engine.begin().await.unwrap();
        u.update_revocation(&retry).await.unwrap();
        commit(u).await;
        assert_eq!(
            claim(t0 + 1_001, HOLD).await,
            ["stuck"],
            "rescheduled, due, unclaimed"
        );
        assert_eq!(claim(t0 + 5_000, HOLD).await, ["later"]);
        let queue = engine.revocations().await.unwrap();
        assert_eq!(queue.len(), 2);
        let stuck = queue.iter().find(|r| r.name == "stuck").unwrap();
        assert_eq!(stuck.attempts, 1);
        assert_eq!(stuck.last_error.as_deref(), Some("timeout"));
    }

    /// 9. Key material is created once, replaced only from the version read; sealing set up by
    ///    replicas opening together is one.
    pub async fn key_material_bootstrap(fx: Fixture) {
        let engine = &*fx.engine;
        const KEY: &str = "conformance/bootstrap";
        let values: Vec<Vec<u8>> = (0..3).map(|i| format!("value-{i}").into_bytes()).collect();
        let winners = race(3, |i| {
            let engine = fx.handle(i);
            let value = values[i].clone();
            async move { engine.meta_put_if_absent(KEY, value).await.unwrap() }
        })
        .await;
        let winner = winners[0].clone();
        assert!(
            winners.iter().all(|w| *w == winner),
            "one winner: {winners:?}"
        );
        assert!(values.contains(&winner));
        assert_eq!(engine.meta_get(KEY).await.unwrap(), Some(winner.clone()));
        assert_eq!(
            engine
                .meta_put_if_absent(KEY, b"late".to_vec())
                .await
                .unwrap(),
            winner
        );

        // Compare and swap.
        assert!(
            !engine
                .meta_cas(KEY, Some(b"stale".to_vec()), b"x".to_vec())
                .await
                .unwrap()
        );
        assert!(
            !engine.meta_cas(KEY, None, b"x".to_vec()).await.unwrap(),
            "not absent"
        );
        assert_eq!(engine.meta_get(KEY).await.unwrap(), Some(winner.clone()));
        assert!(
            engine
                .meta_cas(KEY, Some(winner.clone()), b"next".to_vec())
                .await
                .unwrap()
        );
        assert_eq!(engine.meta_get(KEY).await.unwrap(), Some(b"next".to_vec()));
        assert!(
            !engine
                .meta_cas(KEY, Some(winner.clone()), b"again".to_vec())
                .await
                .unwrap(),
            "the version read is stale now"
        );
        assert!(
            engine
                .meta_cas("conformance/fresh", None, b"1".to_vec())
                .await
                .unwrap()
        );
        assert!(
            !engine
                .meta_cas("conformance/fresh", None, b"2".to_vec())
                .await
                .unwrap()
        );
        assert_eq!(
            engine.meta_get("conformance/fresh").await.unwrap(),
            Some(b"1".to_vec())
        );
        // Racing swaps from one version: one wins.
        let swapped = race(8, |i| {
            let engine = fx.handle(i);
            async move {
                engine
                    .meta_cas(
                        KEY,
                        Some(b"next".to_vec()),
                        format!("racer-{i}").into_bytes(),
                    )
                    .await
                    .unwrap()
            }
        })
        .await;
        assert_eq!(swapped.iter().filter(|s| **s).count(), 1, "{swapped:?}");
        let i = swapped.iter().position(|s| *s).unwrap();
        assert_eq!(
            engine.meta_get(KEY).await.unwrap(),
            Some(format!("racer-{i}").into_bytes())
        );

        // Replicas opening sealing at once on an empty engine agree on the keys.
        let storages = race(4, |i| {
            let engine = fx.handle(i);
            let kek = fx.env.kek();
            async move { Storage::open(engine, &kek).await.unwrap() }
        })
        .await;
        let t = task(&owner("alice"), None, LATER);
        create_tasks(engine, std::slice::from_ref(&t)).await;
        for (i, sealer) in storages.iter().enumerate() {
            let rec = credential(&t, None, LATER);
            let secret = random_secret();
            create_credential(sealer, &rec, &secret).await;
            let meta = Secret::new(format!("sealed-meta-{i}"));
            let sealed_meta = sealer.seal_meta("k", &meta).unwrap();
            for (j, opener) in storages.iter().enumerate() {
                assert_eq!(
                    opener.credential_secret(&rec.id).await.unwrap().as_ref(),
                    Some(&secret),
                    "sealed by replica {i}, opened by replica {j}"
                );
                assert_eq!(
                    opener.credential_by_secret(secret.expose()).await.unwrap(),
                    Some(rec.id.clone()),
                    "indexed by replica {i}, looked up by replica {j}"
                );
                assert_eq!(opener.open_meta("k", &sealed_meta).unwrap(), meta);
            }
        }
    }

    /// 10. A lease has one holder at a time; its epoch grows at each change of holder; a unit
    ///     fenced with a lost epoch is refused and appends nothing.
    pub async fn lease_fencing(fx: Fixture) {
        let engine = &*fx.engine;
        const TTL: i64 = 1_000;
        let a1 = engine
            .try_lease("x", "a", NOW, TTL)
            .await
            .unwrap()
            .expect("free");
        assert_eq!(a1.valid_until, NOW + TTL);
        assert_eq!(engine.try_lease("x", "b", NOW, TTL).await.unwrap(), None);
        assert_eq!(
            engine
                .try_lease("x", "b", NOW + TTL - 1, TTL)
                .await
                .unwrap(),
            None
        );
        // Another name is another lease.
        assert!(
            engine
                .try_lease("y", "b", NOW, TTL)
                .await
                .unwrap()
                .is_some()
        );
        // The holder renews: same epoch, later end.
        let a2 = engine
            .try_lease("x", "a", NOW + 500, TTL)
            .await
            .unwrap()
            .expect("renewed");
        assert_eq!(a2.epoch, a1.epoch);
        assert_eq!(a2.valid_until, NOW + 500 + TTL);
        assert_eq!(
            engine
                .try_lease("x", "b", NOW + TTL + 1, TTL)
                .await
                .unwrap(),
            None
        );

        // A unit of the holder, fenced while it holds the lease, commits later.
        let mut held = engine.begin().await.unwrap();
        held.fence("x", a1.epoch).await.expect("a holds the lease");
        held.audit(NOW, event("reaped", "by a, fenced in time"));

        // After expiry, b takes it with a higher epoch; a cannot take it back meanwhile.
        let t1 = a2.valid_until + 1;
        let b1 = engine
            .try_lease("x", "b", t1, TTL)
            .await
            .unwrap()
            .expect("expired");
        assert!(b1.epoch > a1.epoch, "{b1:?} after {a1:?}");
        assert_eq!(engine.try_lease("x", "a", t1 + 1, TTL).await.unwrap(), None);

        let head = engine.audit_head().await.unwrap();
        assert!(
            held.commit().await.is_err(),
            "a lost the lease before committing"
        );
        assert_eq!(
            engine.audit_head().await.unwrap(),
            head,
            "and appended nothing"
        );

        let mut late = engine.begin().await.unwrap();
        assert!(late.fence("x", a1.epoch).await.is_err(), "refused at once");
        late.audit(NOW, event("reaped", "by a, fenced late"));
        assert!(late.commit().await.is_err(), "and again at commit");
        assert_eq!(engine.audit_head().await.unwrap(), head, "appended nothing");

        let mut unknown = engine.begin().await.unwrap();
        assert!(unknown.fence("never-taken", 1).await.is_err());
        drop(unknown);

        let mut ok = engine.begin().await.unwrap();
        ok.fence("x", b1.epoch).await.unwrap();
        ok.audit(NOW, event("reaped", "by b"));
        assert_eq!(commit(ok).await, vec![head.seq + 1]);
        let entries = assert_chain(engine, head.seq + 1).await;
        assert_eq!(entries.last().unwrap().event.detail, "by b");

        // Back to a after b's lease: the epoch grows again.
        let a3 = engine
            .try_lease("x", "a", b1.valid_until + 1, TTL)
            .await
            .unwrap()
            .expect("expired");
        assert!(a3.epoch > b1.epoch);
    }

    /// 11. The kill switch is seen at once: by the store, by the next unit locking the identity
    ///     (also one already waiting for the lock), and by the change feed.
    pub async fn kill_switch_seen_at_once(fx: Fixture) {
        let engine = &*fx.engine;
        let mut changes = engine.changes();
        let id = owner("alice");
        let other = owner("bob");
        assert!(!engine.is_blocked(&id).await.unwrap());

        let mut a = engine.begin().await.unwrap();
        assert!(!a.lock_identity(&id).await.unwrap().blocked);
        // A unit that asks for the identity while `a` holds it.
        let waiter = tokio::spawn({
            let engine = fx.other.clone();
            let id = id.clone();
            async move {
                let mut u = engine.begin().await.unwrap();
                let row = u.lock_identity(&id).await.unwrap();
                drop(u);
                row.blocked
            }
        });
        assert!(!a.set_blocked(&id, true).await.unwrap(), "was not blocked");
        a.audit(NOW, event("admin", "block alice"));
        commit(a).await;

        assert!(engine.is_blocked(&id).await.unwrap());
        assert!(
            fx.other.is_blocked(&id).await.unwrap(),
            "seen by another handle"
        );
        assert!(!engine.is_blocked(&other).await.unwrap());
        assert_eq!(engine.blocked_identities().await.unwrap(), vec![id.clone()]);
        let mut u = fx.other.begin().await.unwrap();
        assert!(u.lock_identity(&id).await.unwrap().blocked);
        drop(u);
        assert!(waiter.await.unwrap(), "the waiting unit sees the block");
        assert_eq!(next_blocked(&mut changes).await, (id.clone(), true));

        // Unblocked the same way.
        let mut u = engine.begin().await.unwrap();
        assert!(u.lock_identity(&id).await.unwrap().blocked);
        assert!(u.set_blocked(&id, false).await.unwrap(), "was blocked");
        commit(u).await;
        assert!(!engine.is_blocked(&id).await.unwrap());
        assert!(engine.blocked_identities().await.unwrap().is_empty());
        let mut u = engine.begin().await.unwrap();
        assert!(!u.lock_identity(&id).await.unwrap().blocked);
        drop(u);
        assert_eq!(next_blocked(&mut changes).await, (id, false));
    }

    /// The next `Change::Blocked` on the feed (other changes skipped). The timeout only bounds a
    /// failure: a committed change is expected at once.
    async fn next_blocked(rx: &mut tokio::sync::broadcast::Receiver<Change>) -> (SpiffeId, bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match rx.recv().await.expect("the change feed is open") {
                    Change::Blocked(id, b) => return (id, b),
                    Change::Meta(_) => continue,
                }
            }
        })
        .await
        .expect("no Change::Blocked after the commit")
    }

    /// `try_lock_task` never waits: it fails while another unit holds the task, and succeeds
    /// once that unit ended.
    pub async fn try_lock_task_never_waits(fx: Fixture) {
        let engine = &*fx.engine;
        let t = task(&owner("alice"), None, LATER);
        create_tasks(engine, std::slice::from_ref(&t)).await;
        let mut a = engine.begin().await.unwrap();
        assert!(a.lock_task(&t.id).await.unwrap().is_some());
        let mut b = fx.other.begin().await.unwrap();
        assert!(b.try_lock_task(&t.id).await.unwrap().is_none(), "held by a");
        let unknown = TaskId::generate();
        assert!(
            matches!(b.try_lock_task(&unknown).await.unwrap(), Some(None)),
            "an unknown task is locked and read as absent"
        );
        commit(a).await;
        let got = b.try_lock_task(&t.id).await.unwrap().expect("a committed");
        assert_same(&got.unwrap(), &t);
        let mut c = engine.begin().await.unwrap();
        assert!(c.try_lock_task(&t.id).await.unwrap().is_none(), "held by b");
        drop(c);
        // A dropped unit's locks end (an engine across a network rolls back on its own time,
        // so a waiting lock is what shows it).
        drop(b);
        let mut d = engine.begin().await.unwrap();
        assert!(d.lock_task(&t.id).await.unwrap().is_some(), "b was dropped");
        drop(d);
    }
}

// ---------------------------------------------------------------------------------------------
// The engines
// ---------------------------------------------------------------------------------------------

/// `conformance!(module, factory)`: runs every case on engines made by `factory`, an async
/// closure `async |env: &Env| Arc::new(engine)` called once per case (the engine gets a private
/// directory and a KEK in `env`).
macro_rules! conformance {
    ($name:ident, $make:expr) => {
        conformance!($name, handles: async |env: &Env| {
            let engine: Arc<dyn Store> = ($make)(env).await;
            Some((engine.clone(), engine))
        });
    };
    ($name:ident, handles: $make:expr) => {
        mod $name {
            use super::*;

            /// `None`: the engine's server is not installed here (the case is skipped).
            async fn fixture() -> Option<Fixture> {
                let env = Env::new();
                let (engine, other): (Arc<dyn Store>, Arc<dyn Store>) = ($make)(&env).await?;
                Some(Fixture { engine, other, env })
            }

            conformance!(@cases
                round_trips,
                purge,
                purge_removes_replaced_approvals,
                task_idempotency_under_concurrency,
                credential_idempotency_under_concurrency,
                quota_under_concurrency,
                approval_used_once,
                issue_and_complete_race,
                audit_with_dropped_units,
                two_reapers,
                two_revocation_workers,
                key_material_bootstrap,
                lease_fencing,
                kill_switch_seen_at_once,
                try_lock_task_never_waits,
            );
        }
    };
    (@cases $($(#[$attr:meta])* $case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            $(#[$attr])*
            async fn $case() {
                if let Some(fx) = fixture().await {
                    cases::$case(fx).await;
                }
            }
        )*
    };
}

conformance!(memory, async |_env: &Env| Arc::new(MemoryStore::new()));
conformance!(sled, async |env: &Env| {
    Arc::new(SledStore::open(&env.dir.path().join("db"), &env.kek).unwrap())
});
// Two handles on one database: two replicas. A throwaway server per case (tests/common/pg.rs);
// skipped when PostgreSQL is not installed, unless JITBROKER_REQUIRE_POSTGRES=1.
conformance!(postgres, handles: async |env: &Env| {
    let pg = tokio::task::block_in_place(common::pg::Pg::start)?;
    let handle = async || -> Arc<dyn Store> {
        let settings = PgSettings {
            dsn: pg.admin_dsn().into(),
            tls: None,
            pool_size: 16,
        };
        let store: Arc<dyn Store> = Arc::new(PgStore::connect(settings).await.unwrap());
        store
    };
    let (a, b) = (handle().await, handle().await);
    env.keep.lock().unwrap().push(Box::new(pg));
    Some((a, b))
});

// ---------------------------------------------------------------------------------------------
// Engines that keep data across a restart
// ---------------------------------------------------------------------------------------------

mod sled_restart {
    use super::*;

    /// 12. What committed units wrote is back after the store is dropped and reopened (with the
    ///     KEK read from its file again), the audit head included, and the chain continues.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn reopen_keeps_committed_state_and_the_audit_chain() {
        let env = Env::new();
        let db = env.dir.path().join("db");
        let alice = owner("alice");
        let tasks: Vec<Task> = (0..20)
            .map(|i| task(&alice, Some(&format!("k{i}")), LATER))
            .collect();
        let rec = credential(&tasks[0], Some("c"), LATER);
        let secret = random_secret();

        let (head, entries) = {
            let engine: Arc<dyn Store> = Arc::new(SledStore::open(&db, &env.kek).unwrap());
            let storage = Storage::open(engine.clone(), &env.kek).await.unwrap();
            // Twenty units at once, each creating a task and recording two events.
            let tasks = Arc::new(tasks.clone());
            race(20, |i| {
                let engine = engine.clone();
                let tasks = tasks.clone();
                async move {
                    let mut u = engine.begin().await.unwrap();
                    u.lock_identity(&tasks[i].owner).await.unwrap();
                    assert_eq!(u.insert_task(&tasks[i]).await.unwrap(), Inserted::New);
                    u.audit(NOW, event("task_started", tasks[i].id.to_string()));
                    u.audit(NOW, event("decision", tasks[i].id.to_string()));
                    commit(u).await
                }
            })
            .await;
            create_credential(&storage, &rec, &secret).await;
            let mut u = engine.begin().await.unwrap();
            u.meta_put("conformance/x", b"kept".to_vec()).await.unwrap();
            u.set_blocked(&owner("mallory"), true).await.unwrap();
            commit(u).await;
            let head = engine.audit_head().await.unwrap();
            assert_eq!(head.seq, 40);
            (head, assert_chain(&*engine, 40).await)
            // `storage` and `engine` are dropped here: the store closes.
        };

        let kek = env.kek();
        let engine: Arc<dyn Store> = Arc::new(SledStore::open(&db, &kek).unwrap());
        let storage = Storage::open(engine.clone(), &kek).await.unwrap();
        assert_eq!(engine.audit_head().await.unwrap(), head);
        assert_eq!(audit_entries(&*engine).await, entries);
        for t in &tasks {
            assert_same(&engine.get_task(&t.id).await.unwrap().unwrap(), t);
        }
        let mut live = engine.tasks_of_identity(&alice).await.unwrap();
        live.sort();
        let mut want: Vec<TaskId> = tasks.iter().map(|t| t.id.clone()).collect();
        want.sort();
        assert_eq!(live, want);
        assert_eq!(
            engine.task_by_idempotency_key(&alice, "k3").await.unwrap(),
            Some(tasks[3].id.clone())
        );
        assert_same(
            &engine.get_credential(&rec.id).await.unwrap().unwrap(),
            &rec,
        );
        assert_eq!(
            storage.credential_secret(&rec.id).await.unwrap(),
            Some(secret.clone())
        );
        assert_eq!(
            storage.credential_by_secret(secret.expose()).await.unwrap(),
            Some(rec.id.clone())
        );
        assert_eq!(
            engine.counts().await.unwrap(),
            Counts {
                tasks: 20,
                credentials: 1
            }
        );
        assert_eq!(
            engine.meta_get("conformance/x").await.unwrap(),
            Some(b"kept".to_vec())
        );
        assert!(engine.is_blocked(&owner("mallory")).await.unwrap());
        assert_eq!(engine.next_due().await.unwrap(), Some(LATER));

        // The chain continues from the head it had.
        let mut u = engine.begin().await.unwrap();
        u.audit(NOW, event("admin", "after restart"));
        assert_eq!(commit(u).await, vec![41]);
        let entries = assert_chain(&*engine, 41).await;
        assert_eq!(entries[40].prev_hash, head.hash);
    }
}
