//! Operating the broker: the kill switch, operator-only Admin, the tamper-evident audit chain,
//! metrics that move, and no secret in logs, audit export or metrics.

mod common;

use common::*;
use jitbroker::api::pb;
use tonic::Code;

#[tokio::test]
async fn a_block_holds_for_every_role() {
    const OPERATOR_2: &str = "spiffe://jitbroker.dev/operator-2";
    const APPROVER: &str = "spiffe://jitbroker.dev/approver";
    let dir = dev_dir();
    let cfg = config(dir.path(), |t| {
        t.replace(
            "admin_ids = [\"spiffe://jitbroker.dev/operator\"]",
            &format!("admin_ids = [\"{OPERATOR}\", \"{OPERATOR_2}\"]"),
        )
    });
    let r = spawn_default(&cfg).await;
    let mut op = clients(&r, OPERATOR).await;
    let mut op2 = clients(&r, OPERATOR_2).await;
    let mut approver = clients(&r, APPROVER).await;
    for target in [OPERATOR, APPROVER] {
        op2.block(target, "compromised").await.unwrap();
    }
    // The blocked operator can neither undo its block nor act as an operator.
    let s = op
        .admin
        .unblock_identity(pb::UnblockIdentityRequest {
            spiffe_id: OPERATOR.into(),
            reason: "let me back in".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("blocked"), "{s:?}");
    let s = op
        .admin
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    // The blocked approver can neither list nor decide approvals.
    let s = approver
        .admin
        .list_approvals(pb::ListApprovalsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let s = approver.approve("x", "ok").await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    // Another operator lifts the block.
    op2.admin
        .unblock_identity(pb::UnblockIdentityRequest {
            spiffe_id: OPERATOR.into(),
            reason: "keys rotated".into(),
        })
        .await
        .unwrap();
    op.admin
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap();
    r.stop().await;
}

#[tokio::test]
async fn revoke_identity_with_block_kills_everything_until_unblocked() {
    let (_dir, cfg, r) = start_dev().await;
    let mut a = clients(&r, AGENT).await;
    let mut b = clients(&r, AGENT_B).await;
    let mut op = clients(&r, OPERATOR).await;
    let mut tool = clients(&r, TOOL).await;
    let mut secrets = Vec::new();
    for _ in 0..3 {
        let t = a.start(both_demos(), 600).await;
        for res in ["demo-token", "demo-jwt"] {
            secrets.push((res, a.issue(&t.task_id, res, 300).await.secret));
        }
    }
    let tb = b.start(vec![grant("demo-token", "read")], 600).await;
    let sb = b.issue(&tb.task_id, "demo-token", 300).await.secret;

    // An operator ends one task of another agent: its credential dies, the rest stays.
    let tb2 = b.start(vec![grant("demo-token", "read")], 600).await;
    let sb2 = b.issue(&tb2.task_id, "demo-token", 300).await.secret;
    let mut opr = clients(&r, OPERATOR).await;
    let rt = opr
        .admin
        .revoke_task(pb::RevokeTaskRequest {
            task_id: tb2.task_id.clone(),
            reason: "suspicious".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rt.revoked_tasks, vec![tb2.task_id.clone()]);
    assert_eq!(rt.revoked_credential_ids.len(), 1);
    assert!(!active(&mut tool, &sb2, "demo-token").await);
    let unknown = "tsk_00000000000000000000000000000000";
    assert_eq!(
        opr.admin
            .revoke_task(pb::RevokeTaskRequest {
                task_id: unknown.into(),
                reason: String::new()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    drop(opr);

    // An agent calling Admin is refused.
    let s = a.block(AGENT_B, "x").await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert_eq!(
        a.admin
            .status(pb::StatusRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    let out = op.block(AGENT, "compromised").await.unwrap();
    assert_eq!(out.revoked_credential_ids.len(), 6);
    assert_eq!(out.revoked_tasks.len(), 3);
    for (res, s) in &secrets {
        assert!(!active(&mut tool, s, res).await);
    }
    assert!(
        active(&mut tool, &sb, "demo-token").await,
        "other identities untouched"
    );
    let s = a
        .broker
        .start_task(start_req(vec![grant("demo-token", "read")], 600))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("blocked"));

    let list = revoked_page(&mut op, String::new()).await;
    assert_eq!(list.tasks.len(), 2);
    let rest = revoked_page(&mut op, list.next_page_token).await;
    assert_eq!(rest.tasks.len(), 1);

    let u = op
        .admin
        .unblock_identity(pb::UnblockIdentityRequest {
            spiffe_id: AGENT.into(),
            reason: "re-imaged".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(u.was_blocked);
    a.start(vec![grant("demo-token", "read")], 600).await;

    // The block survives a restart.
    op.block(AGENT_B, "x").await.unwrap();
    drop((a, b, op, tool));
    r.stop().await;
    let r = spawn_default(&cfg).await;
    let mut b = clients(&r, AGENT_B).await;
    assert_eq!(
        b.broker
            .start_task(start_req(vec![grant("demo-token", "read")], 600))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    drop(b);
    r.stop().await;
}

/// A page of two of `AGENT`'s revoked tasks, as the operator `op` lists them.
async fn revoked_page(op: &mut Clients, page_token: String) -> pb::ListTasksResponse {
    op.admin
        .list_tasks(pb::ListTasksRequest {
            spiffe_id: AGENT.into(),
            state: pb::TaskState::Revoked as i32,
            page_size: 2,
            page_token,
        })
        .await
        .unwrap()
        .into_inner()
}

/// `Admin.VerifyAudit` on a running broker, as the operator.
async fn verify_live(r: &Running) -> pb::VerifyAuditResponse {
    let mut op = clients(r, OPERATOR).await;
    op.admin
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Read grants on both demo resources.
fn both_demos() -> Vec<pb::Grant> {
    vec![grant("demo-token", "read"), grant("demo-jwt", "read")]
}

async fn busy_broker(dir: &std::path::Path) -> (Running, Vec<String>) {
    let cfg = config(dir, |t| t);
    let r = spawn_default(&cfg).await;
    let mut a = clients(&r, AGENT).await;
    let mut tool = clients(&r, TOOL).await;
    let mut secrets = Vec::new();
    for i in 0..10 {
        let t = a.start(both_demos(), 600).await;
        for res in ["demo-token", "demo-jwt"] {
            let c = a.issue(&t.task_id, res, 300).await;
            assert!(active(&mut tool, &c.secret, res).await);
            if i % 3 == 0 {
                a.revoke(&c.credential_id).await;
            }
            secrets.push(c.secret);
        }
        a.complete(&t.task_id).await;
    }
    let _ = tool
        .broker
        .start_task(start_req(vec![grant("demo-token", "read")], 60))
        .await; // a denial
    (r, secrets)
}

#[tokio::test]
async fn audit_chain_detects_tampering_through_admin_and_offline() {
    if sled_only("tampering with the audit tree offline") {
        return;
    }
    let dir = dev_dir();
    let (r, _) = busy_broker(dir.path()).await;
    let v = verify_live(&r).await;
    assert!(v.ok, "{}", v.reason);
    assert!(v.entries > 80, "{} entries", v.entries);
    r.stop().await;

    let cfg = config(dir.path(), |t| t);
    let db_path = dir.path().join("db");
    let offline = |cfg: &jitbroker::config::Config| {
        futures::executor::block_on(jitbroker::audit::verify(&open_store(cfg), None)).unwrap()
    };
    assert!(offline(&cfg).ok);

    // Each tampering, applied to a copy of the untouched chain, is caught at the right place.
    type Tamper = fn(&sled::Tree);
    let flip: Tamper = |t| {
        let k = 17u64.to_be_bytes();
        let mut v = t.get(k).unwrap().unwrap().to_vec();
        let i = v.iter().position(|&b| b == b'"').unwrap() + 3;
        v[i] ^= 0x01;
        t.insert(k, v).unwrap();
    };
    let delete: Tamper = |t| {
        t.remove(17u64.to_be_bytes()).unwrap();
    };
    let swap: Tamper = |t| {
        let a = t.get(17u64.to_be_bytes()).unwrap().unwrap();
        let b = t.get(18u64.to_be_bytes()).unwrap().unwrap();
        t.insert(17u64.to_be_bytes(), b).unwrap();
        t.insert(18u64.to_be_bytes(), a).unwrap();
    };
    for (name, tamper) in [("flip", flip), ("delete", delete), ("swap", swap)] {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), copy.path());
        {
            let db = jitbroker::store::sled_store::open_raw(&copy.path().join("db")).unwrap();
            tamper(&db.open_tree("audit").unwrap());
            db.flush().unwrap();
        }
        let mut c = cfg.clone();
        c.data_dir = copy.path().to_path_buf();
        let v = offline(&c);
        assert!(!v.ok, "{name} not detected");
        assert_eq!(v.first_bad_seq, 17, "{name}: {}", v.reason);
        // And through the live Admin API.
        let r = spawn_default(&c).await;
        let v = verify_live(&r).await;
        assert!(!v.ok);
        assert_eq!(v.first_bad_seq, 17, "{name}: {}", v.reason);
        r.stop().await;
    }
    assert!(db_path.exists());
}

#[tokio::test]
async fn no_secret_in_audit_export_or_metrics_and_counters_move() {
    let dir = dev_dir();
    let (r, secrets) = busy_broker(dir.path()).await;
    let metrics = ops_get(r.ops_addr, "/metrics").await;
    assert!(
        metrics.contains("jitbroker_credentials_issued_total{kind=\"token\"} 10"),
        "{metrics}"
    );
    assert!(metrics.contains("jitbroker_credentials_issued_total{kind=\"jwt\"} 10"));
    assert!(
        metrics.contains("jitbroker_credentials_ended_total{reason=\"revoked\"} 8"),
        "{metrics}"
    );
    assert!(
        metrics.contains("jitbroker_credentials_ended_total{reason=\"completed\"} 12"),
        "{metrics}"
    );
    assert!(metrics.contains("jitbroker_policy_decisions_total{decision=\"denied\"} 1"));
    assert!(
        metrics.contains(
            "jitbroker_request_duration_seconds_count{method=\"jitbroker.v1.Broker/StartTask\"} 11"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("jitbroker_request_duration_seconds_bucket{method=\"jitbroker.v1.Broker/IssueCredential\",le=\"+Inf\"} 20"));
    assert!(ops_get(r.ops_addr, "/readyz").await.contains("ready"));
    r.stop().await;

    let (n, text) = audit_export(&config(dir.path(), |t| t));
    assert!(n > 80);
    assert!(text.contains("\"kind\":\"credential_issued\""));
    assert!(text.contains("\"purpose\":\"summarise ticket 42\""));
    assert!(text.contains("\"reason\":\"revoked\""));
    for s in &secrets {
        let tail = distinctive_part(s);
        assert!(!text.contains(tail), "secret in the audit export");
        assert!(!metrics.contains(tail), "secret in the metrics");
    }
}

#[tokio::test]
async fn archived_audit_entries_stay_one_verifiable_chain() {
    if sled_only("verifying the archive against the store opened offline") {
        return;
    }
    let dir = dev_dir();
    config(dir.path(), |t| {
        format!("{t}\n[retention]\naudit_entries_in_store = 20\naudit_segment_entries = 16\n")
    });
    let (r, _) = busy_broker(dir.path()).await;
    r.stop().await;
    // The archiver's first pass runs as the broker starts.
    let cfg = config(dir.path(), |t| t);
    let archive = cfg.audit_archive_dir();
    let r = spawn_default(&cfg).await;
    eventually("segments archived", || async {
        jitbroker::audit::archive::segments(&archive).is_ok_and(|s| s.len() >= 4)
    })
    .await;
    let v = verify_live(&r).await;
    assert!(v.ok, "{}", v.reason);
    assert!(v.entries > 80, "{} entries", v.entries);
    let metrics = ops_get(r.ops_addr, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("jitbroker_audit_entries_archived_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    r.stop().await;

    let store = open_store(&cfg);
    use jitbroker::store::Store;
    let in_store = futures::executor::block_on(store.audit_scan(0, usize::MAX))
        .unwrap()
        .len() as u64;
    assert!(in_store < 20 + 16, "{in_store} entries left in the store");
    let whole =
        futures::executor::block_on(jitbroker::audit::verify(&store, Some(&archive))).unwrap();
    assert!(whole.ok, "{}", whole.reason);
    assert!(whole.entries >= v.entries);
    let store_part = futures::executor::block_on(jitbroker::audit::verify(&store, None)).unwrap();
    assert!(store_part.ok, "{}", store_part.reason);
    assert_eq!(store_part.entries, in_store);
    // Losing the oldest segment is detected: the chain no longer starts at entry 1.
    let segments = jitbroker::audit::archive::segments(&archive).unwrap();
    std::fs::remove_file(&segments[0].2).unwrap();
    let v = futures::executor::block_on(jitbroker::audit::verify(&store, Some(&archive))).unwrap();
    assert!(!v.ok);
    assert_eq!(v.first_bad_seq, 1, "{}", v.reason);
}

#[tokio::test]
async fn a_restore_from_an_older_backup_says_what_it_rolls_back_and_blocks_again() {
    if sled_only("restoring an older copy of the data directory") {
        return;
    }
    let dir = dev_dir();
    let elsewhere = tempfile::tempdir().unwrap();
    let anchor_file = elsewhere.path().join("anchor.json");
    let cfg = config(dir.path(), |t| {
        format!(
            "{t}\n[retention]\naudit_anchor_file = {:?}\n",
            anchor_file.display().to_string()
        )
    });
    let r = spawn_default(&cfg).await;
    let mut a = clients(&r, AGENT).await;
    a.start(vec![grant("demo-token", "read")], 600).await;
    drop(a);
    r.stop().await;
    let backup = tempfile::tempdir().unwrap();
    copy_dir(&dir.path().join("db"), backup.path());

    // After the backup: the agent is blocked.
    let r = spawn_default(&cfg).await;
    let mut op = clients(&r, OPERATOR).await;
    op.block(AGENT, "compromised").await.unwrap();
    drop(op);
    r.stop().await;
    let anchor: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&anchor_file).unwrap()).unwrap();
    assert_eq!(anchor["blocked"], serde_json::json!([AGENT]));

    // The store comes back from the backup: the block is in the anchor, not in the store.
    std::fs::remove_dir_all(dir.path().join("db")).unwrap();
    copy_dir(backup.path(), &dir.path().join("db"));
    let r = spawn_default(&cfg).await;
    let mut a = clients(&r, AGENT).await;
    let s = a
        .broker
        .start_task(start_req(vec![grant("demo-token", "read")], 600))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("blocked"), "{s:?}");
    drop(a);
    r.stop().await;
    let entries = audit_entries(dir.path());
    let found = entries
        .iter()
        .find(|e| e["kind"] == "restore_detected")
        .expect("the restore is audited");
    let reason = found["reason"].as_str().unwrap();
    for what in [
        "behind its audit anchor",
        "revoked since are active again",
        AGENT,
    ] {
        assert!(reason.contains(what), "{what}: {reason}");
    }
}
