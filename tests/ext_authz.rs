//! Tool calls decided over Envoy's ext_authz protocol, driven directly over gRPC the way a
//! gateway calls it: routing, task ownership, MCP tools and arguments, approvals, credential
//! reuse, audit, metrics, and who may ask.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::gateway::{
    GATEWAY, TASK_HEADER, authz_client, configure, mcp_call, ticket_and_mcp_grants, tickets_task,
};
use common::*;
use envoy_types::pb::envoy::config::core::v3::{Metadata, SocketAddress, address::Address};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use jitbroker::api::pb;
use tonic::transport::Channel;

/// A check request for `agent` calling `method host path` with `headers` and `body`.
fn check(
    agent: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> CheckRequest {
    let mut h: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    if let Some(b) = body {
        h.insert("content-length".into(), b.len().to_string());
        h.insert("content-type".into(), "application/json".into());
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                principal: agent.to_owned(),
                ..Default::default()
            }),
            request: Some(Request {
                http: Some(HttpRequest {
                    id: "req-1".into(),
                    method: method.into(),
                    host: "tools.internal".into(),
                    path: path.into(),
                    headers: h,
                    body: body.unwrap_or_default().into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// (allowed, injected headers, headers to remove, denial body)
struct Answer {
    allowed: bool,
    set: HashMap<String, String>,
    remove: Vec<String>,
    body: String,
    status: u32,
    /// The denial's `www-authenticate` challenge.
    challenge: Option<String>,
}

fn answer(r: CheckResponse) -> Answer {
    let code = r.status.as_ref().map_or(-1, |s| s.code);
    match r.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            assert_eq!(code, 0);
            Answer {
                allowed: true,
                set: ok
                    .headers
                    .into_iter()
                    .filter_map(|h| h.header)
                    .map(|h| (h.key, h.value))
                    .collect(),
                remove: ok.headers_to_remove,
                body: String::new(),
                status: 200,
                challenge: None,
            }
        }
        Some(HttpResponse::DeniedResponse(d)) => {
            assert_eq!(code, 7, "denials carry PERMISSION_DENIED");
            Answer {
                allowed: false,
                set: HashMap::new(),
                remove: vec![],
                challenge: d
                    .headers
                    .iter()
                    .filter_map(|h| h.header.as_ref())
                    .find(|h| h.key == "www-authenticate")
                    .map(|h| h.value.clone()),
                body: d.body,
                status: d.status.map_or(0, |s| s.code as u32),
            }
        }
        other => panic!("no http response: {other:?}"),
    }
}

/// The gateway's answer to `req` (the call itself must succeed).
async fn decide(gw: &mut AuthorizationClient<Channel>, req: CheckRequest) -> Answer {
    answer(gw.check(req).await.unwrap().into_inner())
}

/// An MCP call by `AGENT` under `task` with `body`.
fn mcp_post(task: &str, body: &str) -> CheckRequest {
    check(AGENT, "POST", "/mcp", &[(TASK_HEADER, task)], Some(body))
}

async fn start_task(c: &mut Clients, grants: Vec<pb::Grant>) -> String {
    c.start(grants, 600).await.task_id
}

#[tokio::test]
async fn tool_calls_are_decided_injected_and_audited() {
    let dir = dev_dir();
    let cfg = configure(dir.path());
    let r = spawn_default(&cfg).await;
    let mut gw = authz_client(&r, GATEWAY).await;
    let mut agent = clients(&r, AGENT).await;
    let mut tool = clients(&r, TOOL).await;
    let task = start_task(&mut agent, ticket_and_mcp_grants()).await;

    // Allowed: the credential is injected over the agent's own header, the task header and the
    // agent's authorization are removed, and the credential introspects as the agent's.
    let req = check(
        AGENT,
        "GET",
        "/tickets/42?fields=all",
        &[(TASK_HEADER, &task), ("authorization", "Bearer agent-own")],
        None,
    );
    let a = decide(&mut gw, req.clone()).await;
    assert!(a.allowed, "{}", a.body);
    let value = a.set.get("authorization").expect("injected authorization");
    let secret = value.strip_prefix("Bearer ").expect("Bearer format");
    assert!(secret.starts_with("jbt_"), "{secret}");
    assert!(a.remove.contains(&TASK_HEADER.to_owned()), "{:?}", a.remove);
    assert!(!a.remove.contains(&"authorization".to_owned()));
    let i = introspect(&mut tool, secret, "tickets").await;
    assert!(i.active);
    assert_eq!(i.spiffe_id, AGENT);
    assert_eq!(i.task_id, task);

    // A burst under one task reuses the credential instead of minting one per call.
    for _ in 0..20 {
        let again = decide(&mut gw, req.clone()).await;
        assert_eq!(again.set.get("authorization"), Some(value));
    }

    // The agent cannot ask for an injected credential itself.
    let err = agent
        .broker
        .issue_credential(issue_req(&task, "tickets", 60))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("gateway"), "{}", err.message());

    // MCP: an allowed tool passes with the JWT in x-api-key; a forbidden tool is denied by name
    // as a JSON-RPC tool error; tools/list goes by its own route.
    let body = mcp_call(7, "lookup_ticket", serde_json::json!({"id": 42}));
    let ok = decide(&mut gw, mcp_post(&task, &body)).await;
    assert!(ok.allowed, "{}", ok.body);
    assert_eq!(ok.set.get("x-api-key").unwrap().split('.').count(), 3);
    let body = mcp_call(8, "delete_ticket", serde_json::json!({"id": 42}));
    let no = decide(&mut gw, mcp_post(&task, &body)).await;
    assert!(!no.allowed);
    assert_eq!(no.status, 403);
    let v: serde_json::Value = serde_json::from_str(&no.body).unwrap();
    assert_eq!(v["id"], 8);
    assert_eq!(v["result"]["isError"], true);
    // The challenge names the scope the call needed (RFC 6750 insufficient_scope).
    let challenge = no.challenge.as_deref().unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer error=\"insufficient_scope\", scope=\"call\""),
        "{challenge}"
    );
    assert_eq!(
        v["result"]["_meta"]["jitbroker"]["policies"],
        serde_json::json!(["no-ticket-deletion"])
    );
    let list = r#"{"jsonrpc":"2.0","id":9,"method":"tools/list"}"#;
    let l = decide(&mut gw, mcp_post(&task, list)).await;
    assert!(l.allowed, "{}", l.body);
    let unrouted = r#"{"jsonrpc":"2.0","id":10,"method":"resources/read","params":{}}"#;
    let u = decide(&mut gw, mcp_post(&task, unrouted)).await;
    assert!(!u.allowed);
    assert!(u.body.contains("no route takes MCP method"), "{}", u.body);

    // Denied: no task, an unknown task, another agent's task, no route, a method the route
    // does not take, a path that could mean something else upstream, a truncated MCP body.
    let mut other = clients(&r, AGENT_B).await;
    let others = tickets_task(&mut other).await;
    let unknown = "tsk_0000000000000000000000000000000a";
    for (req, why) in [
        (check(AGENT, "GET", "/tickets/1", &[], None), "no task"),
        (
            check(AGENT, "GET", "/tickets/1", &[(TASK_HEADER, unknown)], None),
            "not a task of",
        ),
        (
            check(AGENT, "GET", "/tickets/1", &[(TASK_HEADER, &others)], None),
            "not a task of",
        ),
        (
            check(AGENT, "GET", "/billing", &[(TASK_HEADER, &task)], None),
            "no route",
        ),
        (
            check(AGENT, "DELETE", "/tickets/1", &[(TASK_HEADER, &task)], None),
            "no route",
        ),
        (
            check(
                AGENT,
                "GET",
                "/tickets/../admin",
                &[(TASK_HEADER, &task)],
                None,
            ),
            "dot segments",
        ),
        (
            check(
                AGENT,
                "GET",
                "/tickets%2F..%2Fadmin",
                &[(TASK_HEADER, &task)],
                None,
            ),
            "encoded",
        ),
        (
            check(
                AGENT,
                "POST",
                "/mcp",
                &[(TASK_HEADER, &task), ("x-envoy-auth-partial-body", "true")],
                Some(&mcp_call(1, "lookup_ticket", serde_json::json!({}))),
            ),
            "truncated",
        ),
        (mcp_post(&task, "[{}]"), "batches"),
        (
            check("", "GET", "/tickets/1", &[(TASK_HEADER, &task)], None),
            "no verified agent",
        ),
    ] {
        let a = decide(&mut gw, req).await;
        assert!(!a.allowed, "{why}");
        assert_eq!(a.status, 403);
        let b = a.body.replace("only part of the body", "truncated");
        assert!(b.contains(why), "{why}: {}", a.body);
    }

    // After CompleteTask the same call is denied at once, and the credential is dead.
    agent.complete(&task).await;
    let a = decide(&mut gw, req.clone()).await;
    assert!(!a.allowed);
    assert!(a.body.contains("COMPLETED"), "{}", a.body);
    assert!(!introspect(&mut tool, secret, "tickets").await.active);

    // Only configured gateways may ask: the agent itself gets PERMISSION_DENIED.
    let mut not_gw = authz_client(&r, AGENT).await;
    let err = not_gw.check(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // Metrics and audit: every decision counted and recorded, no secret in either.
    let metrics = ops_get(r.ops_addr, "/metrics").await;
    assert!(
        metrics.contains("jitbroker_tool_calls_total{decision=\"allowed\"} 23"),
        "{metrics}"
    );
    assert!(metrics.contains("jitbroker_tool_calls_total{decision=\"denied\"} 13"));
    assert!(metrics.contains("jitbroker_tool_call_duration_seconds_count 36"));
    assert!(metrics.contains(
        "jitbroker_request_duration_seconds_count{method=\"envoy.service.auth.v3.Authorization/Check\"} 37"
    ));
    assert!(!metrics.contains(distinctive_part(secret)));
    r.stop().await;

    let (_, text) = audit_export(&cfg);
    assert!(
        !text.contains(distinctive_part(secret)),
        "secret in the audit trail"
    );
    let calls: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e.to_string().contains("\"tool_call\""))
        .collect();
    assert_eq!(calls.len(), 36, "one audit entry per decision");
    let denied_tool = calls
        .iter()
        .find(|e| e.to_string().contains("tool=\\\"delete_ticket\\\""))
        .expect("the denied MCP call is in the trail");
    let s = denied_tool.to_string();
    assert!(
        s.contains(GATEWAY) && s.contains(AGENT) && s.contains("route=mcp-tools"),
        "{s}"
    );
    assert!(
        s.contains("DENIED") && s.contains("no-ticket-deletion"),
        "{s}"
    );
    let issued = text.matches("\"credential_issued\"").count();
    assert_eq!(issued, 3, "one token for the burst, one JWT per MCP grant");
}

#[tokio::test]
async fn tool_arguments_and_approvals_decide_each_call() {
    let dir = dev_dir();
    let cfg = configure(dir.path());
    let (r, clock) = spawn_manual_cfg(&cfg).await;
    let mut gw = authz_client(&r, GATEWAY).await;
    let mut agent = clients(&r, AGENT).await;
    let mut approver = clients(&r, "spiffe://jitbroker.dev/approver").await;
    let task = start_task(&mut agent, vec![grant("payments", "refund")]).await;
    let call = |amount: serde_json::Value| {
        check(
            AGENT,
            "POST",
            "/mcp/",
            &[(TASK_HEADER, &task)],
            Some(&mcp_call(
                3,
                "refund",
                serde_json::json!({"amount": amount, "ticket": 42}),
            )),
        )
    };

    let small = decide(&mut gw, call(40.into())).await;
    assert!(small.allowed, "{}", small.body);
    let wrong_type = decide(&mut gw, call("forty".into())).await;
    assert!(!wrong_type.allowed);
    assert!(
        wrong_type.body.contains("amount is not a whole number"),
        "{}",
        wrong_type.body
    );

    // A large refund waits for a human; once approved it passes once, with its own credential.
    let big = decide(&mut gw, call(500.into())).await;
    assert!(!big.allowed);
    let v: serde_json::Value = serde_json::from_str(&big.body).unwrap();
    let meta = &v["result"]["_meta"]["jitbroker"];
    let approval = meta["approval_id"]
        .as_str()
        .expect("approval id")
        .to_owned();
    assert_eq!(
        meta["policies"],
        serde_json::json!(["large-refunds-need-approval"])
    );
    let again = decide(&mut gw, call(500.into())).await;
    assert!(
        again.body.contains(&approval),
        "the same request stays pending"
    );
    approver
        .approve(&approval, "customer verified")
        .await
        .unwrap();
    let approved = decide(&mut gw, call(500.into())).await;
    assert!(approved.allowed, "{}", approved.body);
    assert_ne!(
        approved.set.get("authorization"),
        small.set.get("authorization")
    );
    let next = decide(&mut gw, call(500.into())).await;
    assert!(!next.allowed, "an approval is used by one call");
    assert!(!next.body.contains(&approval));

    // Expiry on the broker's clock: the reused credential is replaced once it runs low, and
    // the task's end denies at once.
    clock.advance(Duration::from_secs(250));
    let later = decide(&mut gw, call(10.into())).await;
    assert!(later.allowed);
    assert_ne!(
        later.set.get("authorization"),
        small.set.get("authorization")
    );
    clock.advance(Duration::from_secs(400));
    let expired = decide(&mut gw, call(10.into())).await;
    assert!(!expired.allowed);
    assert!(expired.body.contains("EXPIRED"), "{}", expired.body);
    r.stop().await;
}

/// A check request shaped the way agentgateway sends one: principal filled, no certificate,
/// a W3C traceparent as the request id, JWT claims under `metadata_context`, headers as a
/// map, the MCP body as bytes.
#[tokio::test]
async fn agentgateway_shaped_request_is_decided() {
    let dir = dev_dir();
    let cfg = configure(dir.path());
    let r = spawn_default(&cfg).await;
    let mut gw = authz_client(&r, GATEWAY).await;
    let mut agent = clients(&r, AGENT).await;
    let task = start_task(&mut agent, vec![grant("helpdesk-mcp", "call")]).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let body = mcp_call(1, "lookup_ticket", serde_json::json!({"id": 7}));
    let claims = Struct {
        fields: [(
            "sub".to_owned(),
            Value {
                kind: Some(Kind::StringValue(AGENT.to_owned())),
            },
        )]
        .into(),
    };
    let req = CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(envoy_types::pb::envoy::config::core::v3::Address {
                    address: Some(Address::SocketAddress(SocketAddress {
                        address: "10.0.0.7".into(),
                        ..Default::default()
                    })),
                }),
                principal: AGENT.to_owned(),
                certificate: String::new(),
                ..Default::default()
            }),
            request: Some(Request {
                http: Some(HttpRequest {
                    id: traceparent.into(),
                    method: "POST".into(),
                    host: "mcp.internal:443".into(),
                    path: "/mcp".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/1.1".into(),
                    headers: [
                        ("content-type".to_owned(), "application/json".to_owned()),
                        ("traceparent".to_owned(), traceparent.to_owned()),
                        (TASK_HEADER.to_owned(), task.clone()),
                    ]
                    .into(),
                    raw_body: body.clone().into_bytes(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            metadata_context: Some(Metadata {
                filter_metadata: [("jwt".to_owned(), claims)].into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let a = decide(&mut gw, req).await;
    assert!(a.allowed, "{}", a.body);
    assert!(a.set.contains_key("x-api-key"));
    r.stop().await;

    let (_, text) = audit_export(&cfg);
    assert!(
        text.contains(traceparent),
        "the trace id is in the audit entry"
    );
}

/// A delegate calls tools under the delegated task as itself; the delegator cannot use the
/// delegate's task, and a blocked agent is denied at once.
#[tokio::test]
async fn delegated_tasks_and_blocked_agents() {
    let dir = dev_dir();
    let cfg = configure(dir.path());
    let r = spawn_default(&cfg).await;
    let mut gw = authz_client(&r, GATEWAY).await;
    let mut agent = clients(&r, AGENT).await;
    let mut operator = clients(&r, OPERATOR).await;
    let parent = tickets_task(&mut agent).await;
    let child = agent
        .broker
        .delegate_task(pb::DelegateTaskRequest {
            parent_task_id: parent.clone(),
            delegate_spiffe_id: AGENT_B.into(),
            purpose: "look up ticket 42".into(),
            grants: vec![grant("tickets", "read")],
            ttl_seconds: 120,
        })
        .await
        .unwrap()
        .into_inner()
        .task_id;
    let get =
        |who: &str, task: &str| check(who, "GET", "/tickets/42", &[(TASK_HEADER, task)], None);
    let a = decide(&mut gw, get(AGENT_B, &child)).await;
    assert!(a.allowed, "{}", a.body);
    let a = decide(&mut gw, get(AGENT, &child)).await;
    assert!(!a.allowed, "the delegator cannot use the delegate's task");
    let a = decide(&mut gw, get(AGENT_B, &parent)).await;
    assert!(!a.allowed, "the delegate cannot use the parent task");

    operator.block(AGENT_B, "incident").await.unwrap();
    let a = decide(&mut gw, get(AGENT_B, &child)).await;
    assert!(!a.allowed);
    assert!(a.body.contains("blocked"), "{}", a.body);
    r.stop().await;
}

/// The gateway carries many agents' calls: it is not held to one identity's request rate; each
/// agent behind it is, as if it called the broker itself.
#[tokio::test]
async fn agents_behind_the_gateway_are_rate_limited_not_the_gateway() {
    let dir = dev_dir();
    configure(dir.path());
    let cfg = config(dir.path(), |t| {
        format!("{t}\n[server]\nrequests_per_identity_per_second = 2\n")
    });
    let (r, _clock) = spawn_manual_cfg(&cfg).await;
    let mut gw = authz_client(&r, GATEWAY).await;
    let mut a = clients(&r, AGENT).await;
    let mut b = clients(&r, AGENT_B).await;
    let task_a = tickets_task(&mut a).await;
    let task_b = tickets_task(&mut b).await;
    let call =
        |who: &str, task: &str| check(who, "GET", "/tickets/1", &[(TASK_HEADER, task)], None);
    // The broker's clock stands still: no budget comes back during the burst.
    let mut allowed = 0;
    let mut limited = 0;
    for _ in 0..30 {
        let ans = answer(
            gw.check(call(AGENT, &task_a))
                .await
                .expect("the gateway is never refused")
                .into_inner(),
        );
        if ans.allowed {
            allowed += 1;
        } else if ans.body.contains("requests_per_identity_per_second") {
            limited += 1;
        }
    }
    assert!((1..30).contains(&allowed), "allowed {allowed}");
    assert_eq!(allowed + limited, 30);
    let other = decide(&mut gw, call(AGENT_B, &task_b)).await;
    assert!(
        other.allowed,
        "another agent keeps its own budget: {}",
        other.body
    );
    r.stop().await;
}
