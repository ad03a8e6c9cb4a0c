use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::store::SledStore;
use crate::store::crypto::Kek;

struct Fixture {
    broker: Broker,
    sled: Arc<SledStore>,
    clock: ManualClock,
    _dir: tempfile::TempDir,
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse("test", s).unwrap()
}

async fn fixture() -> Fixture {
    fixture_with(None).await
}

/// The fixture, plus a `postgres` resource `db` served by `upstream` when one is given.
async fn fixture_with(upstream: Option<Arc<dyn Upstream>>) -> Fixture {
    fixture_opts(upstream, None).await
}

/// The fixture; with `archive`, audit archival into the fixture's `audit-archive` directory
/// (keep, segment).
async fn fixture_opts(upstream: Option<Arc<dyn Upstream>>, archive: Option<(u64, u64)>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let kek = Kek::create(&dir.path().join("kek")).unwrap();
    let sled = Arc::new(SledStore::open(&dir.path().join("db"), &kek).unwrap());
    let store = Arc::new(
        crate::store::Storage::open(sled.clone() as Arc<dyn crate::store::Store>, &kek)
            .await
            .unwrap(),
    );
    let policy = Arc::new(
        PolicyEngine::new(
            BTreeMap::from([
                ("demo-token".into(), "token".into()),
                ("db".into(), "postgres".into()),
            ]),
            vec!["read".into(), "write".into()],
            r#"@id("agents") permit(principal, action == Action::"read", resource)
               when { principal.path like "/agent/*" };"#,
            "test",
        )
        .unwrap(),
    );
    let clock = ManualClock::new();
    let mut limits = Limits {
        resources: BTreeMap::from([(
            "demo-token".into(),
            ResourceSpec {
                kind: ResourceKind::Token,
                actions: BTreeSet::from(["read".into(), "write".into()]),
                verifiers: HashSet::from([id("spiffe://td/tool")]),
                max_ttl_seconds: 600,
                inject: None,
                oauth_resource: None,
            },
        )]),
        max_ttl_seconds: 3600,
        default_ttl_seconds: 300,
        max_active_tasks_per_identity: 2,
        max_credentials_per_task: 3,
        admin_ids: HashSet::new(),
        approver_ids: HashSet::new(),
        authorized_trust_domains: HashSet::from(["td".into()]),
        approval_ttl_ms: 900_000,
        ended_retention_ms: 3_600_000,
        max_delegation_depth: 2,
        gateway: None,
        gateway_ids: HashSet::new(),
        oauth: None,
    };
    if upstream.is_some() {
        limits.resources.insert(
            "db".into(),
            ResourceSpec {
                kind: ResourceKind::Postgres,
                actions: BTreeSet::from(["read".into()]),
                verifiers: HashSet::new(),
                max_ttl_seconds: 600,
                inject: None,
                oauth_resource: None,
            },
        );
    }
    let core = Core::new(
        store.clone(),
        policy,
        Arc::new(clock.clone()),
        limits,
        "spiffe://td/jitbroker".into(),
        Arc::new(Metrics::default()),
        None,
    )
    .await
    .unwrap();
    let core = match upstream {
        Some(up) => core.with_upstreams(
            HashMap::from([("db".to_owned(), up)]),
            RevocationConfig::default(),
        ),
        None => core,
    };
    let core = match archive {
        Some((keep, segment)) => core.with_audit_archive(AuditArchive {
            dir: dir.path().join("audit-archive"),
            keep,
            segment,
            lease_ms: 30_000,
        }),
        None => core,
    };
    let broker = Broker::assemble(core);
    Fixture {
        broker,
        sled,
        clock,
        _dir: dir,
    }
}

impl Fixture {
    /// `StartTask` of `start(ttl)` by `who`.
    async fn start(&self, who: &SpiffeId, ttl: u32) -> Task {
        self.broker.tasks.start_task(who, start(ttl)).await.unwrap()
    }

    /// `IssueCredential` of `task` for `demo-token` (read) by `who`.
    async fn issue(
        &self,
        who: &SpiffeId,
        task: &Task,
        ttl: u32,
        key: &str,
    ) -> Result<IssuedCredential> {
        self.broker
            .credentials
            .issue_credential(who, issue(task, ttl, key))
            .await
    }

    /// `CompleteTask` of `task` by `who`.
    async fn complete(&self, who: &SpiffeId, task: &Task) -> Result<Completed> {
        self.broker.tasks.complete_task(who, task.id.as_str()).await
    }

    /// The state `GetTask` reports for `task`.
    async fn state_of(&self, who: &SpiffeId, task: &Task) -> TaskState {
        self.broker
            .tasks
            .get_task(who, task.id.as_str())
            .await
            .unwrap()
            .state
    }

    /// Whether `secret` introspects as live for `tool` at `demo-token`.
    async fn introspects(&self, tool: &SpiffeId, secret: &str) -> bool {
        self.broker
            .credentials
            .introspect(tool, secret, "demo-token")
            .await
            .unwrap()
            .is_some()
    }
}

fn start(ttl: u32) -> StartTask {
    StartTask {
        purpose: "read a ticket".into(),
        grants: vec![Grant {
            resource: "demo-token".into(),
            action: "read".into(),
        }],
        ttl_seconds: ttl,
        ..Default::default()
    }
}

/// The delegation of `parent`'s grants to `to` for 60 s.
fn delegate(parent: &Task, to: &SpiffeId) -> delegation::DelegateTask {
    delegation::DelegateTask {
        parent_task_id: parent.id.to_string(),
        delegate_spiffe_id: to.to_string(),
        purpose: "help".into(),
        grants: start(0).grants,
        ttl_seconds: 60,
    }
}

fn issue(task: &Task, ttl: u32, key: &str) -> IssueCredential {
    IssueCredential {
        task_id: task.id.to_string(),
        resource: "demo-token".into(),
        action: "read".into(),
        ttl_seconds: ttl,
        idempotency_key: key.into(),
    }
}

#[tokio::test]
async fn credential_never_outlives_its_task_and_expires_without_reaper() {
    let f = fixture().await;
    let agent = id("spiffe://td/agent/a");
    let tool = id("spiffe://td/tool");
    let task = f.start(&agent, 60).await;
    let c = f.issue(&agent, &task, 600, "").await.unwrap();
    assert_eq!(c.record.expires_at, task.expires_at, "capped by the task");
    let secret = c.secret.expose().to_owned();
    assert!(f.introspects(&tool, &secret).await);
    f.clock.advance(Duration::from_secs(60));
    assert!(!f.introspects(&tool, &secret).await);
    let err = f.issue(&agent, &task, 10, "").await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    // The reaper then records it.
    assert!(f.broker.reaper.reap_due().await.unwrap() >= 2);
    let rec = f
        .broker
        .store()
        .get_credential(&c.record.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.state, CredentialState::Expired);
    assert_eq!(f.state_of(&agent, &task).await, TaskState::Expired);
}

#[tokio::test]
async fn idempotency_quota_and_ownership() {
    let f = fixture().await;
    let agent = id("spiffe://td/agent/a");
    let other = id("spiffe://td/agent/b");
    let task = f.start(&agent, 0).await;
    let a = f.issue(&agent, &task, 0, "k").await.unwrap();
    let b = f.issue(&agent, &task, 0, "k").await.unwrap();
    assert_eq!(a.record.id, b.record.id);
    assert_eq!(a.secret, b.secret);
    assert!(matches!(
        f.issue(&other, &task, 0, "").await.unwrap_err(),
        Error::NotFound(_)
    ));
    f.issue(&agent, &task, 0, "").await.unwrap();
    f.issue(&agent, &task, 0, "").await.unwrap();
    assert!(matches!(
        f.issue(&agent, &task, 0, "").await.unwrap_err(),
        Error::ResourceExhausted(_)
    ));
    // A replay does not count against the quota.
    f.issue(&agent, &task, 0, "k").await.unwrap();
    f.start(&agent, 0).await;
    assert!(matches!(
        f.broker
            .tasks
            .start_task(&agent, start(0))
            .await
            .unwrap_err(),
        Error::ResourceExhausted(_)
    ));
    let done = f.complete(&agent, &task).await.unwrap();
    assert_eq!(done.revoked_credentials.len(), 3);
    let again = f.complete(&agent, &task).await.unwrap();
    assert!(
        again.revoked_credentials.is_empty(),
        "completion is idempotent"
    );
    f.start(&agent, 0).await;
}

/// An issuance is one audit entry that says what was decided, by which policies, and what was
/// issued; a decision that issues nothing (the quota is full) is still recorded, alone.
#[tokio::test]
async fn an_issuance_is_one_entry_carrying_its_decision() {
    let f = fixture().await;
    let agent = id("spiffe://td/agent/a");
    let task = f.start(&agent, 0).await;
    let store = f.broker.store().clone();
    let entries = |from: u64| {
        let store = store.clone();
        async move {
            let all = store.audit_scan(from, usize::MAX).await.unwrap();
            all.iter()
                .map(|(_, e)| serde_json::from_slice::<crate::audit::Entry>(e).unwrap())
                .collect::<Vec<_>>()
        }
    };
    let before = f.broker.store().audit_head().await.unwrap().seq + 1;
    let issued = f.issue(&agent, &task, 0, "").await.unwrap();
    let new = entries(before).await;
    assert_eq!(new.len(), 1, "{new:#?}");
    let e = &new[0].event;
    assert_eq!(e.kind, "credential_issued");
    assert_eq!(e.credential_id, issued.record.id.to_string());
    assert_eq!(e.task_id, task.id.to_string());
    assert_eq!(e.decision, "ALLOWED");
    assert_eq!(e.policies, vec!["agents".to_owned()]);
    assert!(e.reason.contains("agents"), "{}", e.reason);
    assert_eq!(
        (e.resource.as_str(), e.action.as_str()),
        ("demo-token", "read")
    );
    assert!(e.detail.contains("kind=token"), "{}", e.detail);
    f.issue(&agent, &task, 0, "").await.unwrap();
    f.issue(&agent, &task, 0, "").await.unwrap();
    let before = f.broker.store().audit_head().await.unwrap().seq + 1;
    let full = f.issue(&agent, &task, 0, "").await.unwrap_err();
    assert!(matches!(full, Error::ResourceExhausted(_)), "{full:?}");
    let new = entries(before).await;
    assert_eq!(new.len(), 1, "{new:#?}");
    let e = &new[0].event;
    assert_eq!(
        (e.kind.as_str(), e.decision.as_str()),
        ("decision", "ALLOWED")
    );
    assert_eq!(e.task_id, task.id.to_string());
    assert!(e.credential_id.is_empty());
}

#[tokio::test]
async fn a_start_decision_names_the_task_it_made() {
    let f = fixture().await;
    let agent = id("spiffe://td/agent/a");
    let before = f.broker.store().audit_head().await.unwrap().seq + 1;
    let task = f.start(&agent, 0).await;
    let all = f
        .broker
        .store()
        .audit_scan(before, usize::MAX)
        .await
        .unwrap();
    let events: Vec<_> = all
        .iter()
        .map(|(_, e)| {
            serde_json::from_slice::<crate::audit::Entry>(e)
                .unwrap()
                .event
        })
        .collect();
    let decisions: Vec<_> = events.iter().filter(|e| e.kind == "decision").collect();
    assert!(!decisions.is_empty(), "{events:#?}");
    for e in decisions {
        assert_eq!(e.task_id, task.id.to_string(), "{e:#?}");
    }
    assert!(
        events
            .iter()
            .any(|e| e.kind == "task_started" && e.task_id == task.id.to_string())
    );
}

#[tokio::test]
async fn bad_input_names_the_field() {
    let f = fixture().await;
    let agent = id("spiffe://td/agent/a");
    let cases: Vec<(StartTask, &str)> = vec![
        (
            StartTask {
                purpose: "x".repeat(1 << 20),
                ..start(0)
            },
            "purpose",
        ),
        (
            StartTask {
                purpose: "".into(),
                ..start(0)
            },
            "purpose",
        ),
        (
            StartTask {
                ttl_seconds: 7200,
                ..start(0)
            },
            "ttl_seconds",
        ),
        (
            StartTask {
                grants: vec![],
                ..start(0)
            },
            "grants",
        ),
        (
            StartTask {
                grants: vec![Grant {
                    resource: "r".repeat(10 * 1024),
                    action: "read".into(),
                }],
                ..start(0)
            },
            "grants[0].resource",
        ),
        (
            StartTask {
                grants: vec![Grant {
                    resource: "nope".into(),
                    action: "read".into(),
                }],
                ..start(0)
            },
            "grants[0].resource",
        ),
        (
            StartTask {
                grants: vec![Grant {
                    resource: "demo-token".into(),
                    action: "delete".into(),
                }],
                ..start(0)
            },
            "grants[0].action",
        ),
    ];
    for (req, field) in cases {
        match f.broker.tasks.start_task(&agent, req).await.unwrap_err() {
            Error::InvalidArgument { field: got, reason } => {
                assert_eq!(got, field, "{reason}");
                assert!(reason.len() < 300, "error echoes a bounded preview only");
            }
            e => panic!("{field}: {e}"),
        }
    }
    let denied = f
        .broker
        .tasks
        .start_task(
            &agent,
            StartTask {
                grants: vec![Grant {
                    resource: "demo-token".into(),
                    action: "write".into(),
                }],
                ..start(0)
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(denied, Error::PermissionDenied(_)), "{denied}");
    let stranger = id("spiffe://elsewhere/agent/a");
    assert!(matches!(
        f.broker
            .tasks
            .start_task(&stranger, start(0))
            .await
            .unwrap_err(),
        Error::Unauthenticated(_)
    ));
}

#[tokio::test]
async fn ended_tasks_and_their_credentials_are_purged_after_the_retention_window() {
    let f = fixture().await;
    let agent = id("spiffe://td/agent/a");
    let store = f.broker.store().clone();
    // The task outlives the retention window, so the purge must also take its expiry entries.
    let mut req = start(3000);
    req.idempotency_key = "run-1".into();
    let task = f
        .broker
        .tasks
        .start_task(&agent, req.clone())
        .await
        .unwrap();
    let c1 = f.issue(&agent, &task, 600, "c-1").await.unwrap();
    let c2 = f.issue(&agent, &task, 600, "").await.unwrap();
    f.complete(&agent, &task).await.unwrap();
    let ended = store.get_task(&task.id).await.unwrap().unwrap();
    assert_eq!(ended.purge_at, Some(ended.ended_at.unwrap() + 3_600_000));

    // Within the window the ended records stay readable and a retry finds the same task.
    f.clock.advance(Duration::from_millis(3_599_999));
    f.broker.reaper.reap_due().await.unwrap();
    assert_eq!(f.state_of(&agent, &task).await, TaskState::Completed);
    assert!(store.get_credential(&c1.record.id).await.unwrap().is_some());
    assert_eq!(
        f.broker
            .tasks
            .start_task(&agent, req.clone())
            .await
            .unwrap()
            .id,
        task.id
    );

    f.clock.advance(Duration::from_millis(1));
    f.broker.reaper.reap_due().await.unwrap();
    assert!(store.get_task(&task.id).await.unwrap().is_none());
    for c in [&c1, &c2] {
        assert!(store.get_credential(&c.record.id).await.unwrap().is_none());
        assert!(
            store
                .credential_secret(&c.record.id)
                .await
                .unwrap()
                .is_none()
        );
    }
    assert!(
        store
            .credentials_of_task(&task.id)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .credential_by_idempotency_key(&task.id, "c-1")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .task_by_idempotency_key(&agent, "run-1")
            .await
            .unwrap()
            .is_none()
    );
    // Nothing is left to wake the reaper for: the task's and credentials' expiry entries went too.
    assert_eq!(store.next_due().await.unwrap(), None);
    assert!(matches!(
        f.broker.tasks.get_task(&agent, task.id.as_str()).await,
        Err(Error::NotFound(_))
    ));
    // The idempotency key is free again: a retry now starts a new task.
    assert_ne!(
        f.broker.tasks.start_task(&agent, req).await.unwrap().id,
        task.id
    );
    // A second purge of the same task (an interrupted one repeated) is harmless.
    let mut u = store.begin().await.unwrap();
    assert!(!u.purge_task(&task.id).await.unwrap());
    u.commit().await.unwrap();
}

#[tokio::test]
async fn archived_entries_leave_the_store_in_steps_and_a_stopped_removal_is_finished_later() {
    // keep 100, segments of 2,500: one segment is three removal steps.
    let f = fixture_opts(None, Some((100, 2500))).await;
    let archive_dir = f._dir.path().join("audit-archive");
    let store = f.broker.store().clone();
    for _ in 0..6 {
        let mut u = store.begin().await.unwrap();
        for i in 0..500 {
            f.broker.core().audit(
                &mut u,
                crate::audit::Event {
                    kind: "test".into(),
                    detail: format!("entry {i}"),
                    ..Default::default()
                },
            );
        }
        u.commit().await.unwrap();
    }
    let oldest = |store: Arc<crate::store::Storage>| async move {
        store.audit_scan(0, 1).await.unwrap()[0].0
    };
    // Asked to stop: the segment is written and checkpointed, one step of it removed.
    let (_tx, mut stopped) = tokio::sync::watch::channel(true);
    let archived = f
        .broker
        .retention
        .archive_audit_until(&mut stopped)
        .await
        .unwrap();
    assert_eq!(archived, 2500);
    assert_eq!(oldest(store.clone()).await, 1025);
    let full = crate::audit::verify(store.engine(), Some(&archive_dir))
        .await
        .unwrap();
    assert!(full.ok, "{}", full.reason);
    // The next pass finishes the removal and archives nothing new.
    assert_eq!(f.broker.retention.archive_audit().await.unwrap(), 0);
    assert_eq!(oldest(store.clone()).await, 2501);
    let full = crate::audit::verify(store.engine(), Some(&archive_dir))
        .await
        .unwrap();
    assert!(full.ok, "{}", full.reason);
    assert_eq!(full.entries, store.audit_head().await.unwrap().seq);
}

#[tokio::test]
async fn audit_archival_keeps_the_store_short_and_the_whole_chain_verifiable() {
    let f = fixture_opts(None, Some((20, 10))).await;
    let archive_dir = f._dir.path().join("audit-archive");
    let agent = id("spiffe://td/agent/a");
    for _ in 0..12 {
        let t = f.start(&agent, 60).await;
        f.issue(&agent, &t, 60, "").await.unwrap();
        f.complete(&agent, &t).await.unwrap();
    }
    let store = f.broker.store().clone();
    let before = store.audit_head().await.unwrap().seq;
    assert!(before >= 60, "{before} entries");
    let archived = f.broker.retention.archive_audit().await.unwrap();
    let total = store.audit_head().await.unwrap().seq;
    assert!(archived >= 30 && archived % 10 == 0, "{archived}");
    let segments = crate::audit::archive::segments(&archive_dir).unwrap();
    assert_eq!(segments.len() as u64, archived / 10);
    assert_eq!(segments[0].0, 1);
    // The store holds what was not archived, fewer than keep + segment entries.
    let in_store = store.audit_scan(0, usize::MAX).await.unwrap().len() as u64;
    assert_eq!(in_store, total - archived);
    assert!(in_store < 30, "{in_store}");

    let full = crate::audit::verify(store.engine(), Some(&archive_dir))
        .await
        .unwrap();
    assert!(full.ok, "{}", full.reason);
    assert_eq!(full.entries, total);
    let store_only = crate::audit::verify(store.engine(), None).await.unwrap();
    assert!(store_only.ok, "{}", store_only.reason);
    assert_eq!(store_only.entries, in_store);
    let mut out = Vec::new();
    assert_eq!(
        crate::audit::export(store.engine(), Some(&archive_dir), &mut out)
            .await
            .unwrap(),
        total
    );
    let seqs: Vec<u64> = out
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            serde_json::from_slice::<crate::audit::Entry>(l)
                .unwrap()
                .seq
        })
        .collect();
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());

    // An edited archived entry is found, at its sequence number.
    let second = &segments[1].2;
    let original = std::fs::read(second).unwrap();
    let text = String::from_utf8(original.clone()).unwrap();
    let edited = text.replacen("\"kind\":\"", "\"kind\":\"x", 1);
    std::fs::write(second, edited).unwrap();
    let v = crate::audit::verify(store.engine(), Some(&archive_dir))
        .await
        .unwrap();
    assert!(!v.ok);
    assert_eq!(v.first_bad_seq, 11, "{}", v.reason);
    // A removed segment is found too.
    std::fs::remove_file(second).unwrap();
    let v = crate::audit::verify(store.engine(), Some(&archive_dir))
        .await
        .unwrap();
    assert!(!v.ok);
    assert_eq!(v.first_bad_seq, 11, "{}", v.reason);
    assert!(v.reason.contains("missing"), "{}", v.reason);
    std::fs::write(second, original).unwrap();
    assert!(
        crate::audit::verify(store.engine(), Some(&archive_dir))
            .await
            .unwrap()
            .ok
    );
    // A head resumed from the store continues the chain after the archived part.
    let last = store
        .audit_scan(0, usize::MAX)
        .await
        .unwrap()
        .pop()
        .map(|(_, b)| b);
    let cp = store
        .meta_get(&crate::store::plain_meta_key(
            crate::audit::archive::CHECKPOINT_KEY,
        ))
        .await
        .unwrap();
    let head = crate::audit::Head::resume(last.as_deref(), cp.as_deref()).unwrap();
    assert_eq!(head.head().seq, total);
}

#[tokio::test]
async fn index_entries_a_crash_left_without_their_record_are_ignored() {
    let f = fixture().await;
    let agent = id("spiffe://td/agent/a");
    let tool = id("spiffe://td/tool");
    let task = f.start(&agent, 600).await;
    let now = f.broker.now();
    let ghost = CredentialRecord {
        id: CredentialId::generate(),
        task_id: task.id.clone(),
        owner: agent.clone(),
        resource: "demo-token".into(),
        action: "read".into(),
        kind: "token".into(),
        issued_at: now,
        expires_at: now + 60_000,
        state: CredentialState::Active,
        ended_at: None,
        end_reason: None,
        idempotency_key: Some("retry-1".into()),
        attributes: Default::default(),
        delegation_chain: vec![agent.clone()],
    };
    let secret = Secret::new("jbt_ghost_secret_that_was_never_handed_out".into());
    let sealed = f.broker.store().seal_secret(&ghost.id, &secret).unwrap();
    f.sled
        .crash_after_credential_indexes(&ghost, &sealed)
        .unwrap();

    // The secret does not introspect, and the idempotency key is not a replay of it.
    assert!(!f.introspects(&tool, secret.expose()).await);
    let real = f.issue(&agent, &task, 60, "retry-1").await.unwrap();
    assert_ne!(real.record.id, ghost.id);
    // Nor does the ghost count against the task's quota (3): two more can be issued, then no.
    for key in ["q-1", "q-2"] {
        f.issue(&agent, &task, 60, key).await.unwrap();
    }
    let e = f.issue(&agent, &task, 60, "q-3").await.unwrap_err();
    assert!(matches!(e, Error::ResourceExhausted(_)), "{e:?}");
    // The ghost's expiry entry is dropped by the reaper, and the task completes normally.
    f.clock.advance(Duration::from_secs(61));
    f.broker.reaper.reap_due().await.unwrap();
    f.complete(&agent, &task).await.unwrap();
    assert_eq!(f.state_of(&agent, &task).await, TaskState::Completed);
}

#[tokio::test]
async fn delegated_tasks_count_against_the_delegates_quota() {
    let f = fixture().await;
    let a = id("spiffe://td/agent/a");
    let b = id("spiffe://td/agent/b");
    let parent = f.start(&a, 600).await;
    let delegate = || delegate(&parent, &b);
    for _ in 0..2 {
        f.broker.tasks.delegate_task(&a, delegate()).await.unwrap();
    }
    // B's quota (2) is full of tasks A handed it: A cannot add more, and B cannot start its own.
    let err = f
        .broker
        .tasks
        .delegate_task(&a, delegate())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::ResourceExhausted(m) if m.contains("delegate spiffe://td/agent/b")),
        "{err}"
    );
    let err = f.broker.tasks.start_task(&b, start(60)).await.unwrap_err();
    assert!(matches!(err, Error::ResourceExhausted(_)), "{err}");
    // Once they end, there is room again.
    f.clock.advance(Duration::from_secs(61));
    f.broker.tasks.delegate_task(&a, delegate()).await.unwrap();
}

/// An upstream whose account creation waits until the test lets it finish.
#[derive(Default)]
struct HeldUpstream {
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
    revoked: std::sync::Mutex<Vec<String>>,
}

impl Upstream for HeldUpstream {
    fn prefix(&self) -> &str {
        "jb_"
    }
    fn create<'a>(
        &'a self,
        _name: &'a str,
        _action: &'a str,
        _expires_at: UnixMillis,
    ) -> futures::future::BoxFuture<'a, Result<Issued>> {
        Box::pin(async move {
            self.entered.notify_one();
            self.release.notified().await;
            Ok(Issued {
                secret: Secret::new("postgresql://jb_x:pw@db/app".into()),
                attributes: BTreeMap::new(),
            })
        })
    }
    fn revoke<'a>(&'a self, name: &'a str) -> futures::future::BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.revoked.lock().unwrap().push(name.to_owned());
            Ok(())
        })
    }
    fn list<'a>(&'a self) -> futures::future::BoxFuture<'a, Result<Vec<String>>> {
        Box::pin(async { Ok(vec![]) })
    }
}

#[tokio::test]
async fn no_lock_is_held_while_an_upstream_account_is_made() {
    let up = Arc::new(HeldUpstream::default());
    let f = Arc::new(fixture_with(Some(up.clone())).await);
    let agent = id("spiffe://td/agent/a");
    let mut req = start(600);
    req.grants = vec![Grant {
        resource: "db".into(),
        action: "read".into(),
    }];
    let task = f.broker.tasks.start_task(&agent, req).await.unwrap();
    let issuing = tokio::spawn({
        let (f, agent, task) = (f.clone(), agent.clone(), task.clone());
        async move {
            let mut r = issue(&task, 60, "");
            r.resource = "db".into();
            f.broker.credentials.issue_credential(&agent, r).await
        }
    });
    up.entered.notified().await;
    // While the database is slow, the same task's lock is free: completing it does not wait.
    tokio::time::timeout(
        Duration::from_secs(5),
        f.broker.tasks.complete_task(&agent, task.id.as_str()),
    )
    .await
    .expect("CompleteTask waited for the upstream call")
    .unwrap();
    up.release.notify_one();
    let err = issuing.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::FailedPrecondition(m) if m.contains("ended while")),
        "{err}"
    );
    // The account made for the ended task is queued for removal, and removed.
    assert_eq!(f.broker.revocations.revocation_debt().await.0, 1);
    f.broker.revocations.revoke_due().await.unwrap();
    assert_eq!(up.revoked.lock().unwrap().len(), 1);
    assert_eq!(f.broker.revocations.revocation_debt().await.0, 0);
}

#[tokio::test]
async fn a_retried_complete_task_finishes_the_cascade_a_crash_cut_short() {
    let f = fixture().await;
    let a = id("spiffe://td/agent/a");
    let b = id("spiffe://td/agent/b");
    let parent = f.start(&a, 600).await;
    let child = f
        .broker
        .tasks
        .delegate_task(&a, delegate(&parent, &b))
        .await
        .unwrap();
    // What a crash right after the parent's end leaves: the parent completed, the child live.
    let mut ended = crate::store::local::LocalEngine::get_task(&*f.sled, &parent.id)
        .unwrap()
        .unwrap();
    ended.state = TaskState::Completed;
    ended.ended_at = Some(f.clock.now());
    crate::store::local::LocalEngine::update_task(&*f.sled, &ended).unwrap();
    assert!(
        crate::store::local::LocalEngine::get_task(&*f.sled, &child.id)
            .unwrap()
            .unwrap()
            .is_live(f.clock.now())
    );
    let done = f.complete(&a, &parent).await.unwrap();
    assert_eq!(done.ended_tasks, vec![child.id.clone()]);
    assert!(
        !crate::store::local::LocalEngine::get_task(&*f.sled, &child.id)
            .unwrap()
            .unwrap()
            .is_live(f.clock.now())
    );
}
