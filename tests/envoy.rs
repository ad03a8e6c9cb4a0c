//! Enforcement at the point of tool use, through a real Envoy: the agent calls a tool through
//! the gateway with its task id; the broker decides each call and the gateway injects the
//! credential, so the tool gets it and the agent never does.

mod common;

use common::envoy::{
    self, assert_denied, assert_denied_completed, borrowed, https, replaced_by_broker_token,
    with_own_authorization,
};
use common::gateway::{TASK_HEADER, configure, mcp_call, ticket_and_mcp_grants, tickets_task};
use common::*;

#[tokio::test]
async fn envoy_injects_the_credential_and_fails_closed() {
    let Some(bin) = envoy::binary() else { return };
    let dir = dev_dir();
    let cfg = configure(dir.path());
    let r = spawn_default(&cfg).await;
    let mut agent = clients(&r, AGENT).await;
    let mut other = clients(&r, AGENT_B).await;
    let files_dir = tempfile::tempdir().unwrap();
    let (tool_addr, seen, files) = envoy::tool_behind_gateway(&r, files_dir.path()).await;
    let (listen, admin) = envoy::addrs();
    let cfg_yaml = envoy::config_from_docs(listen, admin, r.addr, tool_addr, &files);
    let proxy = envoy::start(&bin, files_dir.path(), &cfg_yaml, listen, admin).await;

    let agent_tls = tls_as(&r.data_dir, AGENT);
    let call = |path: &'static str, headers: Vec<(&'static str, String)>, body: String| {
        let tls = agent_tls.clone();
        let method = if body.is_empty() { "GET" } else { "POST" };
        async move {
            https(listen, tls, method, path, &borrowed(&headers), &body)
                .await
                .expect("call through envoy")
        }
    };
    let task = agent.start(ticket_and_mcp_grants(), 600).await.task_id;

    // Allowed: the tool gets a live credential bound to the agent and the task, never the
    // agent's own authorization nor the task header; the agent's response holds no credential.
    let resp = call("/tickets/42", with_own_authorization(&task), String::new()).await;
    assert_eq!(
        resp.status,
        200,
        "{resp:?}\n{}",
        std::fs::read_to_string(&proxy.log).unwrap_or_default()
    );
    replaced_by_broker_token(&resp, &seen, &task);

    // Denied before the tool: no task, an unknown task, another agent's task.
    let others = tickets_task(&mut other).await;
    for headers in [
        vec![],
        vec![(
            TASK_HEADER,
            "tsk_0000000000000000000000000000000a".to_owned(),
        )],
        vec![(TASK_HEADER, others)],
    ] {
        let resp = call("/tickets/42", headers.clone(), String::new()).await;
        assert_denied(&resp, &format!("{headers:?}"));
    }
    assert_eq!(seen.all().len(), 1, "denied calls never reach the tool");

    // MCP: an allowed tool passes with the JWT in x-api-key; a forbidden one gets a JSON-RPC
    // tool error naming the policy; tools/list passes by its own route.
    let mcp = |id, tool| mcp_call(id, tool, serde_json::json!({"id": 42}));
    let json = ("content-type", "application/json".to_owned());
    let resp = call(
        "/mcp",
        vec![(TASK_HEADER, task.clone()), json.clone()],
        mcp(1, "lookup_ticket"),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&resp.body).unwrap()["active"],
        true
    );
    let resp = call(
        "/mcp",
        vec![(TASK_HEADER, task.clone()), json.clone()],
        mcp(2, "delete_ticket"),
    )
    .await;
    assert_eq!(resp.status, 403, "{resp:?}");
    let v: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
    assert_eq!(v["id"], 2);
    assert_eq!(v["result"]["isError"], true);
    assert!(resp.body.contains("no-ticket-deletion"), "{}", resp.body);
    let resp = call(
        "/mcp",
        vec![(TASK_HEADER, task.clone()), json.clone()],
        r#"{"jsonrpc":"2.0","id":3,"method":"tools/list"}"#.into(),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(seen.all().len(), 3);

    // After CompleteTask the same call is denied at once.
    agent.complete(&task).await;
    let resp = call(
        "/tickets/42",
        vec![(TASK_HEADER, task.clone())],
        String::new(),
    )
    .await;
    assert_denied_completed(&resp, "");

    // The broker down means denied tool calls (failure_mode_allow: false).
    let task2 = tickets_task(&mut agent).await;
    r.stop().await;
    let resp = call("/tickets/42", vec![(TASK_HEADER, task2)], String::new()).await;
    assert_eq!(resp.status, 403, "{resp:?}");
    assert_eq!(
        seen.all().len(),
        3,
        "nothing reached the tool with the broker down"
    );
    drop(proxy);
}
