use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::store::SledStore;
use crate::store::crypto::Kek;

struct Fixture {
    broker: Broker,
    clock: ManualClock,
    _dir: tempfile::TempDir,
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse("test", s).unwrap()
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let kek = Kek::create(&dir.path().join("kek")).unwrap();
    let store = Arc::new(SledStore::open(&dir.path().join("db"), &kek).unwrap());
    let policy = Arc::new(
        PolicyEngine::new(
            BTreeMap::from([("demo-token".into(), "token".into())]),
            vec!["read".into(), "write".into()],
            r#"@id("agents") permit(principal, action == Action::"read", resource)
               when { principal.path like "/agent/*" };"#,
            "test",
        )
        .unwrap(),
    );
    let clock = ManualClock::new();
    let limits = Limits {
        resources: BTreeMap::from([(
            "demo-token".into(),
            ResourceSpec {
                kind: ResourceKind::Token,
                actions: BTreeSet::from(["read".into(), "write".into()]),
                verifiers: HashSet::from([id("spiffe://td/tool")]),
                max_ttl_seconds: 600,
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
        max_delegation_depth: 2,
    };
    let broker = Broker::new(
        store,
        policy,
        Arc::new(clock.clone()),
        limits,
        "spiffe://td/jitbroker".into(),
        Arc::new(Metrics::default()),
        None,
    )
    .unwrap();
    Fixture {
        broker,
        clock,
        _dir: dir,
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
    let f = fixture();
    let agent = id("spiffe://td/agent/a");
    let tool = id("spiffe://td/tool");
    let task = f.broker.start_task(&agent, start(60)).await.unwrap();
    let c = f
        .broker
        .issue_credential(&agent, issue(&task, 600, ""))
        .await
        .unwrap();
    assert_eq!(c.record.expires_at, task.expires_at, "capped by the task");
    let secret = c.secret.expose().to_owned();
    assert!(
        f.broker
            .introspect(&tool, &secret, "demo-token")
            .unwrap()
            .is_some()
    );
    f.clock.advance(Duration::from_secs(60));
    assert!(
        f.broker
            .introspect(&tool, &secret, "demo-token")
            .unwrap()
            .is_none()
    );
    let err = f
        .broker
        .issue_credential(&agent, issue(&task, 10, ""))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    // The reaper then records it.
    assert!(f.broker.reap_due().await.unwrap() >= 2);
    let rec = f
        .broker
        .store()
        .get_credential(&c.record.id)
        .unwrap()
        .unwrap();
    assert_eq!(rec.state, CredentialState::Expired);
    assert_eq!(
        f.broker.get_task(&agent, task.id.as_str()).unwrap().state,
        TaskState::Expired
    );
}

#[tokio::test]
async fn idempotency_quota_and_ownership() {
    let f = fixture();
    let agent = id("spiffe://td/agent/a");
    let other = id("spiffe://td/agent/b");
    let task = f.broker.start_task(&agent, start(0)).await.unwrap();
    let a = f
        .broker
        .issue_credential(&agent, issue(&task, 0, "k"))
        .await
        .unwrap();
    let b = f
        .broker
        .issue_credential(&agent, issue(&task, 0, "k"))
        .await
        .unwrap();
    assert_eq!(a.record.id, b.record.id);
    assert_eq!(a.secret, b.secret);
    assert!(matches!(
        f.broker
            .issue_credential(&other, issue(&task, 0, ""))
            .await
            .unwrap_err(),
        Error::NotFound(_)
    ));
    f.broker
        .issue_credential(&agent, issue(&task, 0, ""))
        .await
        .unwrap();
    f.broker
        .issue_credential(&agent, issue(&task, 0, ""))
        .await
        .unwrap();
    assert!(matches!(
        f.broker
            .issue_credential(&agent, issue(&task, 0, ""))
            .await
            .unwrap_err(),
        Error::ResourceExhausted(_)
    ));
    // A replay does not count against the quota.
    f.broker
        .issue_credential(&agent, issue(&task, 0, "k"))
        .await
        .unwrap();
    f.broker.start_task(&agent, start(0)).await.unwrap();
    assert!(matches!(
        f.broker.start_task(&agent, start(0)).await.unwrap_err(),
        Error::ResourceExhausted(_)
    ));
    let done = f
        .broker
        .complete_task(&agent, task.id.as_str())
        .await
        .unwrap();
    assert_eq!(done.revoked_credentials.len(), 3);
    let again = f
        .broker
        .complete_task(&agent, task.id.as_str())
        .await
        .unwrap();
    assert!(
        again.revoked_credentials.is_empty(),
        "completion is idempotent"
    );
    f.broker.start_task(&agent, start(0)).await.unwrap();
}

#[tokio::test]
async fn bad_input_names_the_field() {
    let f = fixture();
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
        match f.broker.start_task(&agent, req).await.unwrap_err() {
            Error::InvalidArgument { field: got, reason } => {
                assert_eq!(got, field, "{reason}");
                assert!(reason.len() < 300, "error echoes a bounded preview only");
            }
            e => panic!("{field}: {e}"),
        }
    }
    let denied = f
        .broker
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
        f.broker.start_task(&stranger, start(0)).await.unwrap_err(),
        Error::Unauthenticated(_)
    ));
}
