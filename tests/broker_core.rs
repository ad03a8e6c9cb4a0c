//! The broker core through the real gRPC API over mTLS (issue "broker core" acceptance points).

mod common;

use std::time::Duration;

use common::*;
use jitbroker::api::pb;
use jitbroker::server::Options;
use tonic::Code;

/// The published JWKS, as the verifier `c` gets it.
async fn jwks(c: &mut Clients) -> String {
    c.verifier
        .get_jwks(pb::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner()
        .jwks_json
}

/// The code a GetTask call gets over a new channel with `tls` (`Unavailable` when the channel
/// cannot be made).
async fn get_task_code(r: &Running, tls: rustls::ClientConfig) -> Code {
    match channel(r.addr, tls).await {
        Ok(ch) => BrokerClient::new(ch)
            .get_task(pb::GetTaskRequest {
                task_id: "x".into(),
            })
            .await
            .map(|_| ())
            .unwrap_err()
            .code(),
        Err(_) => Code::Unavailable,
    }
}

#[tokio::test]
async fn full_lifecycle_token_and_jwt() {
    let (_dir, _cfg, r) = start_dev().await;
    let mut agent = clients(&r, AGENT).await;
    let mut tool = clients(&r, TOOL).await;

    let task = agent
        .start(
            vec![grant("demo-token", "read"), grant("demo-jwt", "read")],
            600,
        )
        .await;
    assert_eq!(task.state, pb::TaskState::Active as i32);
    assert_eq!(task.spiffe_id, AGENT);
    assert!(task.grants.iter().all(
        |g| g.decision == pb::Decision::Allowed as i32 && g.reason.contains("dev-agents-demo")
    ));

    let tok = agent.issue(&task.task_id, "demo-token", 60).await;
    let jwt = agent.issue(&task.task_id, "demo-jwt", 60).await;
    assert!(tok.secret.starts_with("jbt_"));
    assert_eq!(jwt.kind, "jwt");

    let i = introspect(&mut tool, &tok.secret, "demo-token").await;
    assert!(i.active);
    assert_eq!(i.spiffe_id, AGENT);
    assert_eq!(i.task_id, task.task_id);
    assert_eq!(i.credential_id, tok.credential_id);
    assert!(active(&mut tool, &jwt.secret, "demo-jwt").await);
    // A credential is only active for its own resource.
    assert!(!active(&mut tool, &tok.secret, "demo-jwt").await);
    // An agent is no verifier.
    let err = agent
        .verifier
        .introspect(pb::IntrospectRequest {
            secret: tok.secret.clone(),
            resource: "demo-token".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Offline JWT verification with the published keys.
    let jwks_json = jwks(&mut tool).await;
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&jwks_json).unwrap();
    let header = jsonwebtoken::decode_header(&jwt.secret).unwrap();
    let kid = header.kid.clone().unwrap();
    let jwk = jwks.find(&kid).expect("kid published");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["demo-jwt"]);
    v.set_issuer(&["spiffe://jitbroker.dev/jitbroker"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(&jwt.secret, &key, &v)
        .expect("JWT verifies offline")
        .claims;
    assert_eq!(claims["sub"], AGENT);
    assert_eq!(claims["jti"], jwt.credential_id);
    assert_eq!(claims["scope"], "read");
    assert_eq!(claims["task_id"], task.task_id);
    let mut wrong_aud = v.clone();
    wrong_aud.set_audience(&["demo-token"]);
    assert!(jsonwebtoken::decode::<serde_json::Value>(&jwt.secret, &key, &wrong_aud).is_err());

    let done = agent.complete(&task.task_id).await;
    let mut revoked = done.revoked_credential_ids.clone();
    revoked.sort();
    let mut want = vec![tok.credential_id.clone(), jwt.credential_id.clone()];
    want.sort();
    assert_eq!(revoked, want);
    assert_eq!(done.revoked_tasks, vec![task.task_id.clone()]);
    assert!(!active(&mut tool, &tok.secret, "demo-token").await);
    assert!(!active(&mut tool, &jwt.secret, "demo-jwt").await);
    let t = agent.task(&task.task_id).await;
    assert_eq!(t.state, pb::TaskState::Completed as i32);
    let err = agent
        .broker
        .issue_credential(issue_req(&task.task_id, "demo-token", 60))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    drop((agent, tool));
    r.stop().await;
}

#[tokio::test]
async fn credential_is_inactive_at_its_ttl_without_the_reaper() {
    let dir = dev_dir();
    let (r, clock) = spawn_manual(dir.path()).await;
    let mut agent = clients(&r, AGENT).await;
    let mut tool = clients(&r, TOOL).await;
    let task = agent.start(vec![grant("demo-token", "read")], 600).await;
    let c = agent.issue(&task.task_id, "demo-token", 2).await;
    clock.advance(Duration::from_millis(1999));
    assert!(active(&mut tool, &c.secret, "demo-token").await);
    clock.advance(Duration::from_millis(1));
    assert!(!active(&mut tool, &c.secret, "demo-token").await);
    // The task outlives it and can still issue.
    agent.issue(&task.task_id, "demo-token", 2).await;
    drop((agent, tool));
    r.stop().await;
}

#[tokio::test]
async fn restart_keeps_state() {
    let dir = dev_dir();
    let (r, clock) = spawn_manual(dir.path()).await;
    let mut agent = clients(&r, AGENT).await;
    let grants = || vec![grant("demo-token", "read"), grant("demo-jwt", "read")];
    let live_task = agent.start(grants(), 600).await;
    let done_task = agent.start(grants(), 600).await;
    let live = agent.issue(&live_task.task_id, "demo-token", 600).await;
    let live_jwt = agent.issue(&live_task.task_id, "demo-jwt", 600).await;
    let short = agent.issue(&live_task.task_id, "demo-token", 5).await;
    let revoked = agent.issue(&live_task.task_id, "demo-token", 600).await;
    agent.revoke(&revoked.credential_id).await;
    let of_done = agent.issue(&done_task.task_id, "demo-token", 600).await;
    agent.complete(&done_task.task_id).await;
    drop(agent);
    r.stop().await;

    clock.advance(Duration::from_secs(10));
    let cfg = config(dir.path(), |t| t);
    let r = spawn(&cfg, clock_options(&clock, true)).await.unwrap();
    let mut agent = clients(&r, AGENT).await;
    let mut tool = clients(&r, TOOL).await;
    assert!(active(&mut tool, &live.secret, "demo-token").await);
    assert!(active(&mut tool, &live_jwt.secret, "demo-jwt").await);
    assert!(
        !active(&mut tool, &short.secret, "demo-token").await,
        "expired stays dead"
    );
    assert!(
        !active(&mut tool, &revoked.secret, "demo-token").await,
        "revoked stays dead"
    );
    assert!(!active(&mut tool, &of_done.secret, "demo-token").await);
    assert_eq!(
        agent.task(&live_task.task_id).await.state,
        pb::TaskState::Active as i32
    );
    assert_eq!(
        agent.task(&done_task.task_id).await.state,
        pb::TaskState::Completed as i32
    );
    // The JWT signing key survived the restart: the old JWT still verifies with the new JWKS.
    let jwks_json = jwks(&mut tool).await;
    let kid = jsonwebtoken::decode_header(&live_jwt.secret)
        .unwrap()
        .kid
        .unwrap();
    assert!(jwks_json.contains(&kid));
    drop((agent, tool));
    r.stop().await;
}

#[tokio::test]
async fn wrong_kek_fails_clearly_and_overwrites_nothing() {
    let (dir, cfg, r) = start_dev().await;
    let mut agent = clients(&r, AGENT).await;
    let task = agent.start(vec![grant("demo-token", "read")], 600).await;
    let c = agent.issue(&task.task_id, "demo-token", 600).await;
    drop(agent);
    r.stop().await;

    let before: Vec<_> = all_bytes(dir.path());
    let elsewhere = tempfile::tempdir().unwrap();
    let wrong = elsewhere.path().join("wrong-kek");
    std::fs::write(&wrong, format!("{}\n", "ab".repeat(32))).unwrap();
    std::fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut bad = cfg.clone();
    bad.kek_file = wrong.clone();
    let err = match spawn(&bad, Options::default()).await {
        Ok(_) => panic!("started with the wrong KEK"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&wrong.display().to_string()),
        "error names the key file: {err}"
    );
    let mut after: Vec<_> = all_bytes(dir.path());
    let mut before = before;
    before.sort();
    after.sort();
    assert!(before == after, "nothing under the data directory changed");

    let r = spawn_default(&cfg).await;
    let mut tool = clients(&r, TOOL).await;
    assert!(active(&mut tool, &c.secret, "demo-token").await);
    drop(tool);
    r.stop().await;
}

#[tokio::test]
async fn bad_input_gets_the_designed_status() {
    let (_dir, _cfg, r) = start_dev().await;
    let mut a = clients(&r, AGENT).await;
    let mut b = clients(&r, AGENT_B).await;

    // No client certificate: the handshake is refused (mTLS is mandatory); nor does a
    // certificate from another CA get in.
    let (_, _, bundle) = mint(&r.data_dir, AGENT);
    let other = tempfile::tempdir().unwrap();
    let (chain, key, _) = mint(other.path(), AGENT);
    for (who, tls) in [
        ("anonymous", tls_config(&bundle, None)),
        ("foreign", tls_config(&bundle, Some((&chain, &key)))),
    ] {
        let code = get_task_code(&r, tls).await;
        assert!(
            matches!(
                code,
                Code::Unavailable | Code::Unauthenticated | Code::Unknown
            ),
            "{who}: {code:?}"
        );
    }

    // Another agent's task reads as unknown.
    let task = a.start(vec![grant("demo-token", "read")], 600).await;
    for code in [
        b.broker
            .get_task(pb::GetTaskRequest {
                task_id: task.task_id.clone(),
            })
            .await
            .unwrap_err()
            .code(),
        b.broker
            .issue_credential(issue_req(&task.task_id, "demo-token", 60))
            .await
            .unwrap_err()
            .code(),
        b.broker
            .complete_task(pb::CompleteTaskRequest {
                task_id: task.task_id.clone(),
            })
            .await
            .unwrap_err()
            .code(),
    ] {
        assert_eq!(code, Code::NotFound);
    }

    let cases: Vec<(pb::StartTaskRequest, Code, &str)> = vec![
        (
            start_req(vec![grant("", "read")], 60),
            Code::InvalidArgument,
            "grants[0].resource",
        ),
        (
            start_req(vec![grant(&"r".repeat(10 * 1024), "read")], 60),
            Code::InvalidArgument,
            "grants[0].resource",
        ),
        (
            pb::StartTaskRequest {
                // (A message over [server] max_message_bytes is refused before decoding:
                // hostile_network.rs.)
                purpose: "p".repeat(4 * 1024),
                ..start_req(vec![grant("demo-token", "read")], 60)
            },
            Code::InvalidArgument,
            "purpose",
        ),
        (
            start_req(vec![grant("demo-token", "read")], 100_000),
            Code::InvalidArgument,
            "ttl_seconds",
        ),
        (
            start_req(vec![grant("no-such-thing", "read")], 60),
            Code::InvalidArgument,
            "grants[0].resource",
        ),
        (
            start_req(vec![grant("demo-token", "delete")], 60),
            Code::InvalidArgument,
            "grants[0].action",
        ),
    ];
    for (req, code, field) in cases {
        let s = a.broker.start_task(req).await.unwrap_err();
        assert_eq!(s.code(), code, "{field}: {}", s.message());
        assert!(s.message().starts_with(field), "{field}: {}", s.message());
        assert!(s.message().len() < 512, "bounded error message");
    }

    // A grant the policy denies: a tool identity is not an agent.
    let mut tool = clients(&r, TOOL).await;
    let s = tool
        .broker
        .start_task(start_req(vec![grant("demo-token", "read")], 60))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("default deny"), "{}", s.message());

    let s = a
        .broker
        .issue_credential(issue_req(&task.task_id, "demo-token", 100_000))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().starts_with("ttl_seconds"), "{}", s.message());
    let s = a
        .broker
        .issue_credential(issue_req("not-a-task", "demo-token", 60))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().starts_with("task_id"), "{}", s.message());
    // Not requested at task start.
    let s = a
        .broker
        .issue_credential(issue_req(&task.task_id, "demo-jwt", 60))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);

    // The broker is still fine after all that.
    a.issue(&task.task_id, "demo-token", 60).await;
    drop((a, b, tool));
    r.stop().await;
}

/// Unreadable entries at the head of the expiry index (a corrupt key, an id that does not
/// parse) do not stop the reaper: the credential behind them still expires and is ended.
#[tokio::test]
async fn corrupt_expiry_entries_do_not_stop_the_reaper() {
    let dir = dev_dir();
    let cfg = config(dir.path(), |t| t);
    let clock = jitbroker::broker::ManualClock::new();
    let opts = || clock_options(&clock, true);
    let r = spawn(&cfg, opts()).await.unwrap();
    let mut c = clients(&r, AGENT).await;
    let task = c.start(vec![grant("demo-token", "read")], 600).await;
    c.issue(&task.task_id, "demo-token", 60).await;
    drop(c);
    r.stop().await;
    {
        let db = jitbroker::store::sled_store::open_raw(&dir.path().join("db")).unwrap();
        let expiry = db.open_tree("expiry").unwrap();
        let mut bad_utf8 = 0u64.to_be_bytes().to_vec();
        bad_utf8.extend_from_slice(b"c\xff\xfe");
        let mut bad_id = 1u64.to_be_bytes().to_vec();
        bad_id.extend_from_slice(b"cnot-a-credential");
        let mut bad_kind = 2u64.to_be_bytes().to_vec();
        bad_kind.extend_from_slice(b"?tsk_0");
        for k in [bad_utf8, bad_id, bad_kind, vec![1, 2, 3]] {
            expiry.insert(k, &[]).unwrap();
        }
        db.flush().unwrap();
    }
    let r = spawn(&cfg, opts()).await.unwrap();
    clock.advance(Duration::from_secs(61));
    let ops = r.ops_addr.to_string();
    eventually("the credential behind the corrupt entries expires", || {
        let ops = ops.clone();
        async move {
            http_get(&ops, "/metrics")
                .await
                .unwrap_or_default()
                .contains("jitbroker_credentials_ended_total{reason=\"expired\"} 1")
        }
    })
    .await;
    r.stop().await;
}

/// `serve` with the dev identity source says at once, on stderr and in the log, that it is not
/// for production.
#[tokio::test]
async fn serve_with_the_dev_identity_source_says_it_is_insecure() {
    use std::io::{BufRead, BufReader};
    let dir = dev_dir();
    let _ = config(dir.path(), |t| t);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_jitbroker"))
        .args(["serve", "--config"])
        .arg(dir.path().join("jitbroker.toml"))
        .env("JITBROKER_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("JITBROKER_OPS_LISTEN", format!("127.0.0.1:{}", free_port()))
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let first = BufReader::new(stderr).lines().next().unwrap().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        first.contains("INSECURE") && first.contains("identity.source = \"dev\""),
        "{first}"
    );
}
