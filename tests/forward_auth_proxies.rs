//! Enforcement at the point of tool use through real Caddy and Traefik, which ask the broker's
//! forward-auth endpoint about each request (the configurations of docs/gateways.md): the agent
//! calls a tool through the proxy with its task id; the broker decides each call and the proxy
//! copies the credential onto the upstream request, so the tool gets it and the agent never does.

mod common;

use common::envoy::{
    assert_denied, assert_denied_completed, borrowed, https_to_host, replaced_by_broker_token,
    tool_behind_gateway, with_own_authorization,
};
use common::gateway::{TASK_HEADER, configure, mcp_call, ticket_and_mcp_grants, tickets_task};
use common::proxies::{self, HOST, Kind};
use common::*;

/// The base64 DER of the leaf in `chain_pem` (what a proxy passes for a verified agent).
fn leaf_b64(chain_pem: &str) -> String {
    let start = chain_pem.find("-----BEGIN CERTIFICATE-----").unwrap() + 27;
    let end = chain_pem[start..].find("-----END").unwrap() + start;
    chain_pem[start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}

async fn forward_auth_through(kind: Kind) {
    let Some(bin) = kind.binary() else { return };
    let dir = dev_dir();
    let cfg = configure(dir.path());
    let r = spawn_default(&cfg).await;
    let fa = r.forward_auth_addr.expect("a forward-auth listener");
    let mut agent = clients(&r, AGENT).await;
    let mut other = clients(&r, AGENT_B).await;
    let files_dir = tempfile::tempdir().unwrap();
    let (tool_addr, seen, files) = tool_behind_gateway(&r, files_dir.path()).await;

    let agent_tls = tls_as(&r.data_dir, AGENT);
    let proxy = proxies::start(
        kind,
        &bin,
        files_dir.path(),
        fa,
        tool_addr,
        &files,
        &agent_tls,
    )
    .await;
    let listen = proxy.listen;
    let send = |method: &'static str,
                path: &'static str,
                headers: Vec<(&'static str, String)>,
                body: String| {
        let tls = agent_tls.clone();
        async move {
            https_to_host(listen, tls, HOST, method, path, &borrowed(&headers), &body)
                .await
                .expect("call through the proxy")
        }
    };
    let call = |method: &'static str, headers: Vec<(&'static str, String)>| {
        send(method, "/tickets/42", headers, String::new())
    };
    let task = agent.start(ticket_and_mcp_grants(), 600).await.task_id;

    // Allowed: the tool gets a live credential bound to the agent and the task, never the
    // agent's own authorization nor the task header; the agent's response holds no credential.
    let resp = call("GET", with_own_authorization(&task)).await;
    assert_eq!(resp.status, 200, "{kind:?}: {resp:?}\n{}", proxy.log_text());
    replaced_by_broker_token(&resp, &seen, &task);

    // Denied before the tool: another agent's task, also with that agent's certificate in the
    // headers the broker reads the agent from (the proxy sets or drops them), and a POST that
    // claims to be a GET.
    let others = tickets_task(&mut other).await;
    let (b_chain, _, _) = mint(&r.data_dir, AGENT_B);
    let b_cert = leaf_b64(&b_chain);
    for (method, headers) in [
        ("GET", vec![(TASK_HEADER, others.clone())]),
        (
            "GET",
            vec![
                (TASK_HEADER, others.clone()),
                ("x-client-cert", b_cert.clone()),
                ("x-forwarded-tls-client-cert", b_cert.clone()),
            ],
        ),
        (
            "POST",
            vec![
                (TASK_HEADER, task.clone()),
                ("x-forwarded-method", "GET".into()),
                ("x-original-method", "GET".into()),
            ],
        ),
    ] {
        let resp = call(method, headers.clone()).await;
        assert_denied(&resp, &format!("{kind:?} {method} {headers:?}"));
    }
    assert_eq!(seen.all().len(), 1, "denied calls never reach the tool");
    let mut reached = 1;

    // MCP through Traefik, which forwards the body (forwardBody): an allowed tool passes with the
    // JWT in x-api-key; a forbidden one gets a JSON-RPC tool error naming the policy.
    if kind == Kind::Traefik {
        let mcp = |id, tool| mcp_call(id, tool, serde_json::json!({"id": 42}));
        let headers = vec![
            (TASK_HEADER, task.clone()),
            ("content-type", "application/json".to_owned()),
        ];
        let resp = send("POST", "/mcp", headers.clone(), mcp(1, "lookup_ticket")).await;
        assert_eq!(resp.status, 200, "{resp:?}");
        let v: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
        assert_eq!(v["active"], true, "{v}");
        assert_eq!(v["task_id"], task.as_str());
        let resp = send("POST", "/mcp", headers.clone(), mcp(2, "delete_ticket")).await;
        assert_eq!(resp.status, 403, "{resp:?}");
        let v: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
        assert_eq!(v["id"], 2);
        assert_eq!(v["result"]["isError"], true);
        assert!(resp.body.contains("no-ticket-deletion"), "{}", resp.body);
        reached += 1;
        assert_eq!(seen.all().len(), reached);
        // A body over maxBodySize is refused by Traefik itself (401).
        let big = format!(
            r#"{{"jsonrpc":"2.0","id":3,"method":"tools/list","pad":"{}"}}"#,
            "x".repeat(70_000)
        );
        let resp = send("POST", "/mcp", headers, big).await;
        assert!(!(200..300).contains(&resp.status), "{resp:?}");
        assert_eq!(seen.all().len(), reached);
    }

    // After CompleteTask the same call is denied at once.
    agent.complete(&task).await;
    let resp = call("GET", vec![(TASK_HEADER, task.clone())]).await;
    assert_denied_completed(&resp, &format!("{kind:?}: "));

    // The broker down means failed tool calls that never reach the tool.
    let task2 = tickets_task(&mut agent).await;
    r.stop().await;
    let resp = call("GET", vec![(TASK_HEADER, task2)]).await;
    assert!(
        !(200..300).contains(&resp.status),
        "{kind:?} with the broker down: {resp:?}"
    );
    assert_eq!(
        seen.all().len(),
        reached,
        "nothing reached the tool with the broker down"
    );
    drop(proxy);
}

#[tokio::test]
async fn caddy_forward_auth_injects_the_credential_and_fails_closed() {
    forward_auth_through(Kind::Caddy).await;
}

#[tokio::test]
async fn traefik_forward_auth_injects_the_credential_and_fails_closed() {
    forward_auth_through(Kind::Traefik).await;
}
