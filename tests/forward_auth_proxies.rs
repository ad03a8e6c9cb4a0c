//! Enforcement at the point of tool use through real Caddy and Traefik, which ask the broker's
//! forward-auth endpoint about each request (the configurations of docs/gateways.md): the agent
//! calls a tool through the proxy with its task id; the broker decides each call and the proxy
//! copies the credential onto the upstream request, so the tool gets it and the agent never does.

mod common;

use common::envoy::tool_server;
use common::gateway::{TASK_HEADER, configure};
use common::proxies::{self, Kind, https};
use common::*;
use jitbroker::api::pb;

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
    let r = spawn(&cfg, Default::default()).await.expect("spawn");
    let fa = r.forward_auth_addr.expect("a forward-auth listener");
    let mut agent = clients(&r, AGENT).await;
    let mut other = clients(&r, AGENT_B).await;
    let tool = clients(&r, TOOL).await;
    let (tool_addr, seen) = tool_server(tool.verifier.clone()).await;

    let files_dir = tempfile::tempdir().unwrap();
    let files = common::gateway::gateway_files(&r.data_dir, files_dir.path());

    let (chain, key, bundle) = mint(&r.data_dir, AGENT);
    let agent_tls = tls_config(&bundle, Some((&chain, &key)));
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
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            https(listen, tls, method, path, &h, &body)
                .await
                .expect("call through the proxy")
        }
    };
    let call = |method: &'static str, headers: Vec<(&'static str, String)>| {
        send(method, "/tickets/42", headers, String::new())
    };
    let task = agent
        .broker
        .start_task(start_req(
            vec![
                grant("tickets", "read"),
                grant("helpdesk-mcp", "list"),
                grant("helpdesk-mcp", "call"),
            ],
            600,
        ))
        .await
        .unwrap()
        .into_inner()
        .task_id;

    // Allowed: the tool gets a live credential bound to the agent and the task, never the
    // agent's own authorization nor the task header; the agent's response holds no credential.
    let resp = call(
        "GET",
        vec![
            (TASK_HEADER, task.clone()),
            ("authorization", "Bearer agent-own-token".into()),
        ],
    )
    .await;
    assert_eq!(resp.status, 200, "{kind:?}: {resp:?}\n{}", proxy.log_text());
    let v: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
    assert_eq!(v["active"], true, "{kind:?}: {v}");
    assert_eq!(v["spiffe_id"], AGENT);
    assert_eq!(v["task_id"], task.as_str());
    let got = seen.all();
    assert_eq!(got.len(), 1);
    let auth = got[0].get("authorization").expect("injected").clone();
    let secret = auth.strip_prefix("Bearer jbt_").expect("a broker token");
    assert!(!got[0].contains_key(TASK_HEADER), "task header stripped");
    assert!(!auth.contains("agent-own-token"));
    assert!(!resp.head.contains(secret) && !resp.body.contains(secret));

    // Denied before the tool: another agent's task, also with that agent's certificate in the
    // headers the broker reads the agent from (the proxy sets or drops them), and a POST that
    // claims to be a GET.
    let others = other
        .broker
        .start_task(start_req(vec![grant("tickets", "read")], 600))
        .await
        .unwrap()
        .into_inner()
        .task_id;
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
        assert_eq!(resp.status, 403, "{kind:?} {method} {headers:?}: {resp:?}");
        let v: serde_json::Value = serde_json::from_str(&resp.body).expect("JSON denial");
        assert_eq!(v["error"], "denied");
    }
    assert_eq!(seen.all().len(), 1, "denied calls never reach the tool");
    let mut reached = 1;

    // MCP through Traefik, which forwards the body (forwardBody): an allowed tool passes with the
    // JWT in x-api-key; a forbidden one gets a JSON-RPC tool error naming the policy.
    if kind == Kind::Traefik {
        let mcp = |id: u32, tool: &str| {
            serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                "params": {"name": tool, "arguments": {"id": 42}}})
            .to_string()
        };
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
    agent
        .broker
        .complete_task(pb::CompleteTaskRequest {
            task_id: task.clone(),
        })
        .await
        .unwrap();
    let resp = call("GET", vec![(TASK_HEADER, task.clone())]).await;
    assert_eq!(resp.status, 403, "{kind:?}: {resp:?}");
    assert!(resp.body.contains("COMPLETED"), "{}", resp.body);

    // The broker down means failed tool calls that never reach the tool.
    let task2 = agent
        .broker
        .start_task(start_req(vec![grant("tickets", "read")], 600))
        .await
        .unwrap()
        .into_inner()
        .task_id;
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
