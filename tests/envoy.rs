//! Enforcement at the point of tool use, through a real Envoy: the agent calls a tool through
//! the gateway with its task id; the broker decides each call and the gateway injects the
//! credential, so the tool gets it and the agent never does.

mod common;

use common::envoy::{self, https, tool_server};
use common::gateway::{TASK_HEADER, configure};
use common::*;
use jitbroker::api::pb;

#[tokio::test]
async fn envoy_injects_the_credential_and_fails_closed() {
    let Some(bin) = envoy::binary() else { return };
    let dir = dev_dir();
    let cfg = configure(dir.path());
    let r = spawn(&cfg, Default::default()).await.expect("spawn");
    let mut agent = clients(&r, AGENT).await;
    let mut other = clients(&r, AGENT_B).await;
    let tool = clients(&r, TOOL).await;
    let (tool_addr, seen) = tool_server(tool.verifier.clone()).await;

    let files_dir = tempfile::tempdir().unwrap();
    let files = common::gateway::gateway_files(&r.data_dir, files_dir.path());
    let (listen, admin) = envoy::addrs();
    let cfg_yaml = envoy::config_from_docs(listen, admin, r.addr, tool_addr, &files);
    let proxy = envoy::start(&bin, files_dir.path(), &cfg_yaml, listen, admin).await;

    let (chain, key, bundle) = mint(&r.data_dir, AGENT);
    let agent_tls = tls_config(&bundle, Some((&chain, &key)));
    let call = |path: &'static str, headers: Vec<(&'static str, String)>, body: String| {
        let tls = agent_tls.clone();
        let method = if body.is_empty() { "GET" } else { "POST" };
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            https(listen, tls, method, path, &h, &body)
                .await
                .expect("call through envoy")
        }
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
        "/tickets/42",
        vec![
            (TASK_HEADER, task.clone()),
            ("authorization", "Bearer agent-own-token".into()),
        ],
        String::new(),
    )
    .await;
    assert_eq!(
        resp.status,
        200,
        "{resp:?}\n{}",
        std::fs::read_to_string(&proxy.log).unwrap_or_default()
    );
    let v: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
    assert_eq!(v["active"], true, "{v}");
    assert_eq!(v["spiffe_id"], AGENT);
    assert_eq!(v["task_id"], task.as_str());
    let got = seen.all();
    assert_eq!(got.len(), 1);
    let auth = got[0].get("authorization").expect("injected").clone();
    let secret = auth.strip_prefix("Bearer jbt_").expect("a broker token");
    assert!(!got[0].contains_key(TASK_HEADER), "task header stripped");
    assert!(!auth.contains("agent-own-token"));
    assert!(!resp.head.contains(secret) && !resp.body.contains(secret));

    // Denied before the tool: no task, an unknown task, another agent's task.
    let others = other
        .broker
        .start_task(start_req(vec![grant("tickets", "read")], 600))
        .await
        .unwrap()
        .into_inner()
        .task_id;
    for headers in [
        vec![],
        vec![(
            TASK_HEADER,
            "tsk_0000000000000000000000000000000a".to_owned(),
        )],
        vec![(TASK_HEADER, others)],
    ] {
        let resp = call("/tickets/42", headers.clone(), String::new()).await;
        assert_eq!(resp.status, 403, "{headers:?}: {resp:?}");
        let v: serde_json::Value = serde_json::from_str(&resp.body).expect("JSON denial");
        assert_eq!(v["error"], "denied");
    }
    assert_eq!(seen.all().len(), 1, "denied calls never reach the tool");

    // MCP: an allowed tool passes with the JWT in x-api-key; a forbidden one gets a JSON-RPC
    // tool error naming the policy; tools/list passes by its own route.
    let mcp = |id: u32, tool: &str| {
        serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": tool, "arguments": {"id": 42}}})
        .to_string()
    };
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
    agent
        .broker
        .complete_task(pb::CompleteTaskRequest {
            task_id: task.clone(),
        })
        .await
        .unwrap();
    let resp = call(
        "/tickets/42",
        vec![(TASK_HEADER, task.clone())],
        String::new(),
    )
    .await;
    assert_eq!(resp.status, 403, "{resp:?}");
    assert!(resp.body.contains("COMPLETED"), "{}", resp.body);

    // The broker down means denied tool calls (failure_mode_allow: false).
    let task2 = agent
        .broker
        .start_task(start_req(vec![grant("tickets", "read")], 600))
        .await
        .unwrap()
        .into_inner()
        .task_id;
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
