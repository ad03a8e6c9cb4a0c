use super::*;
use crate::config::Config;

const BASE: &str = r#"
data_dir = "/tmp/x"
kek_file = "/tmp/x/kek"
policy_file = "/tmp/x/policy.cedar"
[identity]
source = "dev"
trust_domain = "jitbroker.dev"
[resources.tickets]
kind = "token"
actions = ["read", "call"]
[resources.tickets.inject]
[resources.db]
kind = "x509"
actions = ["read"]
"#;

const GATEWAY: &str = r#"
[gateway]
ids = ["spiffe://jitbroker.dev/gateway/envoy"]
tool_arguments = { amount = "long", note = "string", urgent = "bool" }
[[gateway.routes]]
name = "api"
host = "tickets.internal"
path_prefix = "/api"
methods = ["GET"]
resource = "tickets"
action = "read"
[[gateway.routes]]
name = "mcp-call"
path_prefix = "/mcp"
mcp_methods = ["tools/call"]
mcp_tools = ["lookup"]
resource = "tickets"
action = "call"
[[gateway.routes]]
name = "mcp-rest"
path_prefix = "/mcp"
mcp_methods = ["tools/list", "initialize"]
resource = "tickets"
action = "read"
"#;

fn gateway() -> GatewayConfig {
    Config::from_toml(&format!("{BASE}{GATEWAY}"), "t", |_| None)
        .unwrap()
        .gateway
        .unwrap()
}

fn call<'a>(
    method: &'a str,
    host: &'a str,
    path: &'a str,
    headers: &'a HashMap<String, String>,
    body: Option<&'a str>,
) -> HttpCall<'a> {
    HttpCall {
        method,
        host,
        path,
        headers,
        body: body.map(str::as_bytes),
    }
}

fn route_name(g: &GatewayConfig, c: &HttpCall<'_>) -> std::result::Result<String, String> {
    g.route(c)
        .map(|r| r.route.name.clone())
        .map_err(|u| u.reason)
}

#[test]
fn http_routes_match_host_port_prefix_and_method() {
    let g = gateway();
    let h = HashMap::new();
    for (host, path, method, want) in [
        ("tickets.internal", "/api/t/1", "GET", Some("api")),
        ("TICKETS.internal:8443", "/api?x=1", "GET", Some("api")),
        ("tickets.internal", "/api/", "GET", Some("api")),
        ("tickets.internal", "/apix", "GET", None),
        ("tickets.internal", "/api/t/1", "POST", None),
        ("evil.internal", "/api/t/1", "GET", None),
        ("tickets.internal.evil:80", "/api/t/1", "GET", None),
        ("tickets.internal:x", "/api/t/1", "GET", None),
    ] {
        let got = route_name(&g, &call(method, host, path, &h, None)).ok();
        assert_eq!(got.as_deref(), want, "{method} {host}{path}");
    }
}

#[test]
fn paths_that_could_mean_something_else_are_refused() {
    let g = gateway();
    let h = HashMap::new();
    for path in [
        "/api/../admin",
        "/api/./t",
        "/api/%2e%2e/admin",
        "/api%2Fadmin",
        "/api\\admin",
        "api/t",
        "/api/t\u{7}",
    ] {
        let err = route_name(&g, &call("GET", "tickets.internal", path, &h, None)).unwrap_err();
        assert!(
            err.contains("dot segments") || err.contains("does not start with /"),
            "{path}: {err}"
        );
    }
}

#[test]
fn mcp_calls_route_by_method_and_tool() {
    let g = gateway();
    let h = HashMap::new();
    let at = |body: &str| route_name(&g, &call("POST", "mcp", "/mcp", &h, Some(body)));
    assert_eq!(
        at(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"lookup"}}"#).unwrap(),
        "mcp-call"
    );
    assert_eq!(
        at(r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#).unwrap(),
        "mcp-rest"
    );
    let err = at(r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"drop"}}"#)
        .unwrap_err();
    assert!(err.contains("tool \"drop\""), "{err}");
    for (body, why) in [
        ("", "no request body"),
        ("{", "not JSON"),
        ("[]", "batches"),
        (r#"{"jsonrpc":"1.0","method":"x"}"#, "JSON-RPC 2.0"),
        (r#"{"jsonrpc":"2.0","id":1,"result":{}}"#, "no method"),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#,
            "params.name",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"lookup","arguments":[1]}}"#,
            "not an object",
        ),
    ] {
        let err = at(body).unwrap_err();
        assert!(err.contains(why), "{body}: {err}");
    }
}

#[test]
fn truncated_or_oversized_bodies_are_never_guessed_at() {
    let g = gateway();
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    let partial = HashMap::from([(PARTIAL_BODY_HEADER.to_owned(), "true".to_owned())]);
    let err = route_name(&g, &call("POST", "m", "/mcp", &partial, Some(body))).unwrap_err();
    assert!(err.contains("only part of the body"), "{err}");
    let longer = HashMap::from([("content-length".to_owned(), "9999".to_owned())]);
    let err = route_name(&g, &call("POST", "m", "/mcp", &longer, Some(body))).unwrap_err();
    assert!(err.contains("content-length says"), "{err}");
    let mut small = g.clone();
    small.max_body_bytes = 10;
    let err = route_name(
        &small,
        &call("POST", "m", "/mcp", &HashMap::new(), Some(body)),
    )
    .unwrap_err();
    assert!(err.contains("at most 10"), "{err}");
}

#[test]
fn declared_arguments_are_typed_and_others_ignored() {
    let g = gateway();
    let body = |args: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{{"name":"lookup","arguments":{args}}}}}"#
        )
    };
    let m = parse_mcp(
        body(r#"{"amount":42,"note":"hi","urgent":true,"secret":"x"}"#).as_bytes(),
        &g.tool_arguments,
    )
    .unwrap();
    assert_eq!(m.id, Some(serde_json::json!("a")));
    assert_eq!(
        m.arguments,
        BTreeMap::from([
            ("amount".to_owned(), ArgValue::Long(42)),
            ("note".to_owned(), ArgValue::String("hi".into())),
            ("urgent".to_owned(), ArgValue::Bool(true)),
        ])
    );
    for bad in [
        r#"{"amount":4.5}"#,
        r#"{"amount":"4"}"#,
        r#"{"urgent":1}"#,
        r#"{"amount":1e30}"#,
    ] {
        let err = parse_mcp(body(bad).as_bytes(), &g.tool_arguments).unwrap_err();
        assert!(
            err.reason.contains("tool argument"),
            "{bad}: {}",
            err.reason
        );
        assert_eq!(err.mcp_id, Some(serde_json::json!("a")));
    }
}

#[test]
fn configuration_errors_name_what_is_wrong() {
    let cfg = |extra: &str| {
        Config::from_toml(&format!("{BASE}{extra}"), "t", |_| None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let gw = |routes: &str| {
        cfg(&format!(
            "[gateway]\nids = [\"spiffe://jitbroker.dev/gw\"]\n{routes}"
        ))
    };
    let route = |body: &str| gw(&format!("[[gateway.routes]]\nname = \"r\"\n{body}"));
    for (err, want) in [
        (cfg("[gateway]\nids = []\n"), "ids must list"),
        (cfg("[gateway]\nids = [\"nope\"]\n"), "spiffe://"),
        (gw("task_header = \"X-Task\"\n"), "lower-case"),
        (
            gw("credential_ttl_seconds = 60\nreuse_min_remaining_seconds = 60\n"),
            "below",
        ),
        (gw("strip_headers = [\"host\"]\n"), "cannot remove"),
        (gw("forward_auth_path = \"auth\"\n"), "forward_auth_path"),
        (gw("forward_auth_path = \"/a/../b\"\n"), "no dot segments"),
        (gw("forward_auth_path = \"/a?b=1\"\n"), "forward_auth_path"),
        (gw("forward_auth_path = \"/a//b\"\n"), "forward_auth_path"),
        (
            gw("tool_arguments = { \"1x\" = \"long\" }\n"),
            "tool_arguments",
        ),
        (gw("tool_arguments = { x = \"float\" }\n"), "float"),
        (
            route("resource = \"nope\"\naction = \"read\"\n"),
            "not configured",
        ),
        (
            route("resource = \"tickets\"\naction = \"write\"\n"),
            "no action",
        ),
        (
            route("resource = \"db\"\naction = \"read\"\n"),
            "no [resources.db.inject]",
        ),
        (
            route("resource = \"tickets\"\naction = \"read\"\npath_prefix = \"api\"\n"),
            "must start with /",
        ),
        (
            route("resource = \"tickets\"\naction = \"read\"\nmethods = [\"get\"]\n"),
            "upper-case",
        ),
        (
            route("resource = \"tickets\"\naction = \"read\"\nmcp_tools = [\"x\"]\n"),
            "tools/call",
        ),
        (
            gw(
                "[[gateway.routes]]\nname = \"r\"\nresource = \"tickets\"\naction = \"read\"\n[[gateway.routes]]\nname = \"r\"\nresource = \"tickets\"\naction = \"read\"\n",
            ),
            "two routes",
        ),
        (cfg("[resources.db.inject]\n"), "cannot be injected"),
        (
            cfg(
                "[resources.x]\nkind = \"token\"\nactions = [\"a\"]\n[resources.x.inject]\nformat = \"Bearer\"\n",
            ),
            "exactly once",
        ),
    ] {
        assert!(err.contains(want), "want {want:?} in {err:?}");
    }
}

#[test]
fn injected_value_follows_the_format() {
    let i = InjectConfig {
        header: "x-api-key".into(),
        format: "Token {secret}".into(),
        gateway_only: true,
    };
    assert_eq!(i.value("jbt_1").as_str(), "Token jbt_1");
}
