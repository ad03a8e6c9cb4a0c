//! A broker configured to decide tool calls for a gateway: resources whose credentials are
//! injected, routes for plain HTTP and MCP calls, and policies that read the call.

use std::path::Path;

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tonic::transport::Channel;

use super::{Running, channel_as};

pub const GATEWAY: &str = "spiffe://jitbroker.dev/gateway/envoy";
pub const TASK_HEADER: &str = "x-jitbroker-task";

/// Appended to the dev configuration.
pub const CONFIG: &str = r#"
[resources.tickets]
kind = "token"
actions = ["read"]
verifiers = ["spiffe://jitbroker.dev/tool/demo"]
[resources.tickets.inject]
header = "authorization"
format = "Bearer {secret}"

[resources.helpdesk-mcp]
kind = "jwt"
actions = ["list", "call"]
verifiers = ["spiffe://jitbroker.dev/tool/demo"]
[resources.helpdesk-mcp.inject]
header = "x-api-key"
format = "{secret}"

[resources.payments]
kind = "token"
actions = ["refund"]
verifiers = ["spiffe://jitbroker.dev/tool/demo"]
[resources.payments.inject]

[gateway]
ids = ["spiffe://jitbroker.dev/gateway/envoy"]
tool_arguments = { amount = "long" }
forward_auth_listen = "127.0.0.1:0"

[[gateway.routes]]
name = "tickets-read"
path_prefix = "/tickets"
methods = ["GET"]
resource = "tickets"
action = "read"

[[gateway.routes]]
name = "mcp-session"
path_prefix = "/mcp"
methods = ["POST"]
mcp_methods = ["initialize", "notifications/initialized", "tools/list"]
resource = "helpdesk-mcp"
action = "list"

[[gateway.routes]]
name = "mcp-refund"
path_prefix = "/mcp"
methods = ["POST"]
mcp_methods = ["tools/call"]
mcp_tools = ["refund"]
resource = "payments"
action = "refund"

[[gateway.routes]]
name = "mcp-tools"
path_prefix = "/mcp"
methods = ["POST"]
mcp_methods = ["tools/call"]
resource = "helpdesk-mcp"
action = "call"
"#;

/// Appended to the dev policy.
pub const POLICY: &str = r#"
@id("agents-read-tickets")
permit(principal, action == Action::"read", resource == Resource::"tickets")
when { principal.spiffe_id like "spiffe://jitbroker.dev/agent/*" };

@id("agents-use-helpdesk")
permit(principal, action in [Action::"list", Action::"call"], resource == Resource::"helpdesk-mcp")
when { principal.spiffe_id like "spiffe://jitbroker.dev/agent/*" };

@id("no-ticket-deletion")
forbid(principal, action == Action::"call", resource == Resource::"helpdesk-mcp")
when { context has tool_call && context.tool_call.tool == "delete_ticket" };

@id("small-refunds")
permit(principal, action == Action::"refund", resource == Resource::"payments")
when {
  if context has tool_call then
    context.tool_call.arguments has amount && context.tool_call.arguments.amount < 100
  else true
};

@id("large-refunds-need-approval")
@approval("required")
permit(principal, action == Action::"refund", resource == Resource::"payments")
when {
  context has tool_call && context.tool_call.arguments has amount &&
  context.tool_call.arguments.amount >= 100
};
"#;

/// Every grant an agent needs for the tickets and helpdesk-mcp routes.
pub fn ticket_and_mcp_grants() -> Vec<jitbroker::api::pb::Grant> {
    vec![
        super::grant("tickets", "read"),
        super::grant("helpdesk-mcp", "list"),
        super::grant("helpdesk-mcp", "call"),
    ]
}

/// A task of `c` granted `tickets` read (10 minutes): its id.
pub async fn tickets_task(c: &mut super::Clients) -> String {
    c.start(vec![super::grant("tickets", "read")], 600)
        .await
        .task_id
}

/// An MCP `tools/call` of `tool` with `args`, as JSON-RPC request `id`.
pub fn mcp_call(id: i64, tool: &str, args: serde_json::Value) -> String {
    serde_json::json!({
        "jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": tool, "arguments": args}
    })
    .to_string()
}

/// Adds the gateway configuration and policies to a dev dir.
pub fn configure(dir: &Path) -> jitbroker::config::Config {
    super::append_policy(dir, POLICY);
    super::config(dir, |t| format!("{t}{CONFIG}"))
}

/// An ext_authz client presenting `id`'s SVID.
pub async fn authz_client(r: &Running, id: &str) -> AuthorizationClient<Channel> {
    AuthorizationClient::new(channel_as(r, id).await)
}

/// The gateway's own SVID (serving agents as `localhost`, calling the broker as a client) and
/// the trust bundle, as files in `dir` for a proxy to read.
pub fn gateway_files(data_dir: &Path, dir: &Path) -> super::envoy::GatewayFiles {
    let ca = jitbroker::identity::dev::ensure_dev_ca(data_dir, "jitbroker.dev").unwrap();
    let gw = ca
        .mint_svid(
            GATEWAY,
            &["localhost".into()],
            &[],
            std::time::Duration::from_secs(3600),
        )
        .unwrap();
    let files = super::envoy::GatewayFiles {
        cert: dir.join("svid.pem"),
        key: dir.join("svid.key"),
        bundle: dir.join("bundle.pem"),
    };
    std::fs::write(&files.cert, &gw.cert_chain_pem).unwrap();
    std::fs::write(&files.key, gw.key_pem.as_bytes()).unwrap();
    std::fs::write(&files.bundle, &gw.bundle_pem).unwrap();
    files
}
