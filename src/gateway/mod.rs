//! Enforcement at the point of tool use: a gateway (Envoy, agentgateway…) asks the broker about
//! every call an agent makes to a tool, and injects the task's credential into the upstream
//! request when the call is allowed, so the agent never holds it.
//!
//! This module holds what does not depend on the wire: the `[gateway]` configuration, the
//! routing of an HTTP request (host, path prefix, method) or an MCP JSON-RPC call (method, tool
//! name) to a `(resource, action)`, and the checks on what the gateway forwarded. The decision
//! itself is [`crate::broker::Broker::check_tool_call`]; the Envoy `ext_authz` mapping is in
//! `api::ext_authz`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use serde::Deserialize;

use crate::config::{ResourceConfig, ResourceKind, check_name};
use crate::error::{Error, Result};
use crate::model::{SpiffeId, preview};
use crate::policy::{ArgType, ArgValue};

pub mod client_cert;

/// Header Envoy sets on the check request when it cut the body at `max_request_bytes`.
pub const PARTIAL_BODY_HEADER: &str = "x-envoy-auth-partial-body";
/// Longest route list accepted (routes are matched in order on every call).
const MAX_ROUTES: usize = 1024;

/// `[gateway]`: which gateways may ask, how they name the task, how calls map to grants.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// SPIFFE IDs of the gateways allowed to call `envoy.service.auth.v3.Authorization/Check`.
    pub ids: Vec<String>,
    /// Request header carrying the task id (the gateway removes it before the upstream).
    #[serde(default = "default_task_header")]
    pub task_header: String,
    /// Life of a credential minted for calls through the gateway (capped by the resource's
    /// `max_ttl_seconds` and by the task's expiry).
    #[serde(default = "default_credential_ttl")]
    pub credential_ttl_seconds: u64,
    /// A minted credential is reused for the task's later calls while it has at least this
    /// much life left; then a fresh one is minted.
    #[serde(default = "default_reuse_min")]
    pub reuse_min_remaining_seconds: u64,
    /// Largest request body the broker reads for MCP routing; larger bodies are denied.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Headers of the agent's request removed before the upstream (besides the task header).
    /// The injected header is always overwritten, never removed.
    #[serde(default = "default_strip_headers")]
    pub strip_headers: Vec<String>,
    /// Tool arguments that policies may read in `context.tool_call.arguments`, with their
    /// types (`long`, `string`, `bool`). Undeclared arguments are not passed to policy.
    #[serde(default)]
    pub tool_arguments: BTreeMap<String, ArgType>,
    /// Matched in order; the first match decides the `(resource, action)`. No match: denied.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// An HTTPS listener (mTLS, the proxy's own SVID) for nginx `auth_request`, Caddy
    /// `forward_auth` and Traefik `forwardAuth` at `/forward-auth`; absent = none.
    #[serde(default)]
    pub forward_auth_listen: Option<SocketAddr>,
    /// The path proxies call on the forward-auth listener (GET or POST).
    #[serde(default = "default_forward_auth_path")]
    pub forward_auth_path: String,
}

fn default_forward_auth_path() -> String {
    "/forward-auth".to_owned()
}

/// `[[gateway.routes]]`: one kind of call and the grant it needs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Names the route in decisions, audit entries and `context.tool_call.route`.
    pub name: String,
    /// Exact host (`:authority`), case-insensitive; without a port it matches any port.
    #[serde(default)]
    pub host: Option<String>,
    /// Path prefix, matched on segment boundaries (`/mcp` matches `/mcp` and `/mcp/x`, not
    /// `/mcpx`); the query string is not part of the path.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// HTTP methods (upper case); empty = any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// MCP: JSON-RPC methods this route takes (`tools/call`, `tools/list`, `initialize`…).
    /// Non-empty makes this an MCP route: the body must be one JSON-RPC message.
    #[serde(default)]
    pub mcp_methods: Vec<String>,
    /// MCP `tools/call`: the tool names this route takes; empty = any tool.
    #[serde(default)]
    pub mcp_tools: Vec<String>,
    pub resource: String,
    pub action: String,
}

/// `[resources.NAME.inject]`: how a gateway puts the credential into the upstream request.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectConfig {
    /// Header name, e.g. `authorization` or `x-api-key`.
    #[serde(default = "default_inject_header")]
    pub header: String,
    /// Header value; `{secret}` is replaced by the credential.
    #[serde(default = "default_inject_format")]
    pub format: String,
    /// Credentials of this resource reach the tool only through a gateway: `IssueCredential`
    /// refuses them, so the agent never holds one. Set to false to let agents also ask
    /// directly.
    #[serde(default = "default_true")]
    pub gateway_only: bool,
}

fn default_task_header() -> String {
    "x-jitbroker-task".into()
}
fn default_credential_ttl() -> u64 {
    300
}
fn default_reuse_min() -> u64 {
    60
}
fn default_max_body() -> usize {
    64 * 1024
}
fn default_strip_headers() -> Vec<String> {
    vec!["authorization".into(), "proxy-authorization".into()]
}
fn default_inject_header() -> String {
    "authorization".into()
}
fn default_true() -> bool {
    true
}
fn default_inject_format() -> String {
    "Bearer {secret}".into()
}

/// An HTTP header name as Envoy passes it (lower case token characters).
fn check_header_name(field: &str, h: &str) -> std::result::Result<(), String> {
    let ok = !h.is_empty()
        && h.len() <= 128
        && h.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(&b)
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field} = {h:?} must be a lower-case HTTP header name"
        ))
    }
}

impl GatewayConfig {
    /// Checks the section against the resources it refers to.
    pub fn validate(&self, resources: &BTreeMap<String, ResourceConfig>) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("[gateway] {m}")));
        if self.ids.is_empty() {
            return bad("ids must list at least one gateway SPIFFE ID".into());
        }
        for id in &self.ids {
            SpiffeId::parse("ids", id).map_err(|e| Error::Config(format!("[gateway] {e}")))?;
        }
        check_header_name("task_header", &self.task_header).or_else(bad)?;
        for h in &self.strip_headers {
            check_header_name("strip_headers", h).or_else(bad)?;
            if h.starts_with(':') || h == "host" {
                return bad(format!("strip_headers cannot remove {h:?}"));
            }
        }
        let p = &self.forward_auth_path;
        let plain = p.len() <= 256
            && p.starts_with('/')
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~/".contains(&b))
            && !p
                .split('/')
                .skip(1)
                .any(|seg| seg.is_empty() || seg == "." || seg == "..");
        if !plain {
            return bad(format!(
                "forward_auth_path = {p:?} must be an absolute path of non-empty segments of \
                 A-Z a-z 0-9 - . _ ~ (no dot segments, no query), e.g. \"/forward-auth\""
            ));
        }
        if self.credential_ttl_seconds == 0 {
            return bad("credential_ttl_seconds must be at least 1".into());
        }
        if self.reuse_min_remaining_seconds >= self.credential_ttl_seconds {
            return bad(format!(
                "reuse_min_remaining_seconds ({}) must be below credential_ttl_seconds ({})",
                self.reuse_min_remaining_seconds, self.credential_ttl_seconds
            ));
        }
        if !(1..=16 << 20).contains(&self.max_body_bytes) {
            return bad("max_body_bytes must be between 1 and 16777216".into());
        }
        for name in self.tool_arguments.keys() {
            let ok = !name.is_empty()
                && name.len() <= 64
                && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return bad(format!(
                    "tool_arguments: {name:?} must be 1-64 of A-Z a-z 0-9 _, not starting with a digit"
                ));
            }
        }
        if self.routes.len() > MAX_ROUTES {
            return bad(format!(
                "has {} routes; at most {MAX_ROUTES}",
                self.routes.len()
            ));
        }
        let mut names = std::collections::HashSet::new();
        for r in &self.routes {
            let at = |m: String| Error::Config(format!("[[gateway.routes]] {:?}: {m}", r.name));
            check_name("name", &r.name).map_err(|e| at(e.to_string()))?;
            if !names.insert(&r.name) {
                return Err(at("two routes have this name".into()));
            }
            let Some(res) = resources.get(&r.resource) else {
                return Err(at(format!("resource {:?} is not configured", r.resource)));
            };
            if !res.actions.contains(&r.action) {
                return Err(at(format!(
                    "resource {} has no action {:?} (it has: {})",
                    r.resource,
                    r.action,
                    res.actions.join(", ")
                )));
            }
            if res.inject.is_none() {
                return Err(at(format!(
                    "resource {} has no [resources.{}.inject] section saying which header \
                     carries its credential",
                    r.resource, r.resource
                )));
            }
            if let Some(p) = &r.path_prefix
                && !p.starts_with('/')
            {
                return Err(at(format!("path_prefix {p:?} must start with /")));
            }
            for m in &r.methods {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(at(format!(
                        "method {m:?} must be an upper-case HTTP method"
                    )));
                }
            }
            if !r.mcp_tools.is_empty() && !r.mcp_methods.iter().any(|m| m == "tools/call") {
                return Err(at(
                    "mcp_tools applies only to a route whose mcp_methods include \"tools/call\""
                        .into(),
                ));
            }
            if r.mcp_methods
                .iter()
                .chain(&r.mcp_tools)
                .any(|m| m.is_empty())
            {
                return Err(at(
                    "mcp_methods and mcp_tools entries must not be empty".into()
                ));
            }
        }
        Ok(())
    }
}

impl InjectConfig {
    pub fn validate(&self, resource: &str, kind: ResourceKind) -> Result<()> {
        let at = |m: String| Err(Error::Config(format!("[resources.{resource}.inject] {m}")));
        if !matches!(kind, ResourceKind::Token | ResourceKind::Jwt) {
            return at(format!(
                "a {} credential cannot be injected into an HTTP header; use kind token or jwt",
                kind.as_str()
            ));
        }
        check_header_name("header", &self.header).or_else(at)?;
        if self.header == "host" {
            return at("header cannot be host".into());
        }
        if self.format.matches("{secret}").count() != 1 {
            return at(format!(
                "format = {:?} must contain {{secret}} exactly once",
                self.format
            ));
        }
        if self.format.chars().any(char::is_control) {
            return at("format must not hold control characters".into());
        }
        Ok(())
    }

    /// The header value carrying `secret`.
    pub fn value(&self, secret: &str) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(self.format.replacen("{secret}", secret, 1))
    }
}

/// One request as the gateway saw it. Header names are lower case.
#[derive(Clone, Copy, Debug)]
pub struct HttpCall<'a> {
    pub method: &'a str,
    pub host: &'a str,
    /// Path with its query string, as sent.
    pub path: &'a str,
    pub headers: &'a HashMap<String, String>,
    /// The body the gateway forwarded, if any.
    pub body: Option<&'a [u8]>,
}

impl HttpCall<'_> {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The path without its query string or fragment.
    pub fn path_only(&self) -> &str {
        let end = self.path.find(['?', '#']).unwrap_or(self.path.len());
        &self.path[..end]
    }
}

/// An MCP JSON-RPC call read from a request body.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct McpCall {
    pub method: String,
    /// The tool name of a `tools/call`.
    pub tool: String,
    /// The JSON-RPC id (absent for a notification), echoed in a denial.
    pub id: Option<serde_json::Value>,
    /// The declared arguments of a `tools/call` the call carries, typed.
    pub arguments: BTreeMap<String, ArgValue>,
}

/// The route a call matched.
#[derive(Clone, Debug)]
pub struct Routed<'a> {
    pub route: &'a RouteConfig,
    pub mcp: Option<McpCall>,
}

/// Why a call could not be routed: the message names what is wrong; `mcp_id` is set when the
/// call was a JSON-RPC request whose id a denial should echo.
#[derive(Clone, Debug)]
pub struct Unroutable {
    pub reason: String,
    pub mcp_id: Option<serde_json::Value>,
}

fn unroutable(reason: impl Into<String>) -> Unroutable {
    Unroutable {
        reason: reason.into(),
        mcp_id: None,
    }
}

fn host_matches(want: &str, got: &str) -> bool {
    if want.eq_ignore_ascii_case(got) {
        return true;
    }
    // A route host without a port matches the host on any port.
    !want.contains(':')
        && got.rsplit_once(':').is_some_and(|(h, port)| {
            port.bytes().all(|b| b.is_ascii_digit()) && h.eq_ignore_ascii_case(want)
        })
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Paths that could mean something else upstream than what the route prefix says are refused
/// rather than guessed at: dot segments and encoded slashes, dots or backslashes.
fn check_path(path: &str) -> std::result::Result<(), Unroutable> {
    if !path.starts_with('/') {
        return Err(unroutable(format!(
            "path {} does not start with /",
            preview(path)
        )));
    }
    let lower = path.to_ascii_lowercase();
    let suspicious = path.split('/').any(|seg| seg == "." || seg == "..")
        || ["%2f", "%5c", "%2e", "\\"]
            .iter()
            .any(|p| lower.contains(p))
        || path.bytes().any(|b| b.is_ascii_control());
    if suspicious {
        return Err(unroutable(format!(
            "path {} holds dot segments or encoded separators; normalise paths at the gateway",
            preview(path)
        )));
    }
    Ok(())
}

impl GatewayConfig {
    /// Finds the route for a call. MCP routes read the body: a body the gateway cut short, or
    /// one that is not a single JSON-RPC request, matches no MCP route and is denied.
    pub fn route<'a>(&'a self, call: &HttpCall<'_>) -> std::result::Result<Routed<'a>, Unroutable> {
        let path = call.path_only();
        check_path(path)?;
        let mut mcp: Option<std::result::Result<McpCall, Unroutable>> = None;
        for r in &self.routes {
            if r.host
                .as_deref()
                .is_some_and(|h| !host_matches(h, call.host))
                || r.path_prefix
                    .as_deref()
                    .is_some_and(|p| !prefix_matches(p, path))
                || (!r.methods.is_empty() && !r.methods.iter().any(|m| m == call.method))
            {
                continue;
            }
            if r.mcp_methods.is_empty() {
                return Ok(Routed {
                    route: r,
                    mcp: None,
                });
            }
            let parsed = mcp.get_or_insert_with(|| self.read_mcp(call));
            let m = match parsed {
                Ok(m) => m,
                // Not an MCP message: no MCP route can match; a plain route further on may.
                Err(_) => continue,
            };
            if !r.mcp_methods.contains(&m.method) {
                continue;
            }
            if m.method == "tools/call" && !r.mcp_tools.is_empty() && !r.mcp_tools.contains(&m.tool)
            {
                continue;
            }
            let m = m.clone();
            return Ok(Routed {
                route: r,
                mcp: Some(m),
            });
        }
        Err(match mcp {
            Some(Err(e)) => e,
            Some(Ok(m)) => Unroutable {
                reason: if m.method == "tools/call" {
                    format!(
                        "no route takes MCP tools/call of tool {} ({} {}{})",
                        preview(&m.tool),
                        call.method,
                        preview(call.host),
                        preview(path)
                    )
                } else {
                    format!(
                        "no route takes MCP method {} ({} {}{})",
                        preview(&m.method),
                        call.method,
                        preview(call.host),
                        preview(path)
                    )
                },
                mcp_id: m.id,
            },
            None => unroutable(format!(
                "no route takes {} {}{}",
                preview(call.method),
                preview(call.host),
                preview(path)
            )),
        })
    }

    /// Reads one MCP JSON-RPC message from the body.
    fn read_mcp(&self, call: &HttpCall<'_>) -> std::result::Result<McpCall, Unroutable> {
        if call
            .header(PARTIAL_BODY_HEADER)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            return Err(unroutable(
                "the gateway forwarded only part of the body (it is larger than the gateway's \
                 max_request_bytes): an MCP call is never decided on a truncated body",
            ));
        }
        let Some(body) = call.body.filter(|b| !b.is_empty()) else {
            return Err(unroutable(
                "no request body reached the broker: configure the gateway to forward it \
                 (Envoy: with_request_body)",
            ));
        };
        if let Some(len) = call.header("content-length")
            && len.trim().parse::<usize>().ok() != Some(body.len())
        {
            return Err(unroutable(format!(
                "the body the gateway forwarded is {} bytes but content-length says {}: an MCP \
                 call is never decided on a truncated body",
                body.len(),
                preview(len)
            )));
        }
        if body.len() > self.max_body_bytes {
            return Err(unroutable(format!(
                "the body is {} bytes; the broker reads at most {} (gateway.max_body_bytes)",
                body.len(),
                self.max_body_bytes
            )));
        }
        parse_mcp(body, &self.tool_arguments)
    }
}

/// Parses one JSON-RPC 2.0 message (no batches) and the declared arguments of a `tools/call`.
pub fn parse_mcp(
    body: &[u8],
    declared: &BTreeMap<String, ArgType>,
) -> std::result::Result<McpCall, Unroutable> {
    let v: serde_json::Value = serde_json::from_slice::<Unique>(body)
        .map_err(|e| unroutable(format!("the body is not JSON: {e}")))?
        .0;
    let serde_json::Value::Object(obj) = v else {
        return Err(unroutable(
            "the body is not one JSON-RPC message (batches are not accepted)",
        ));
    };
    let id = obj.get("id").cloned();
    let bad = |reason: String| Unroutable {
        reason,
        mcp_id: id.clone(),
    };
    if obj.get("jsonrpc").and_then(|v| v.as_str()) != Some("2.0") {
        return Err(bad(
            "the body is not JSON-RPC 2.0 (jsonrpc must be \"2.0\")".into(),
        ));
    }
    let Some(method) = obj.get("method").and_then(|m| m.as_str()) else {
        return Err(bad(
            "the JSON-RPC message has no method (a response is not a call)".into(),
        ));
    };
    let mut call = McpCall {
        method: method.to_owned(),
        id: id.clone(),
        ..Default::default()
    };
    if method == "tools/call" {
        let params = obj.get("params").and_then(|p| p.as_object());
        let Some(name) = params.and_then(|p| p.get("name")).and_then(|n| n.as_str()) else {
            return Err(bad("tools/call without params.name".into()));
        };
        call.tool = name.to_owned();
        let args = match params.and_then(|p| p.get("arguments")) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Object(a)) => Some(a),
            Some(_) => return Err(bad("tools/call params.arguments is not an object".into())),
        };
        if let Some(args) = args {
            for (name, ty) in declared {
                let Some(v) = args.get(name) else { continue };
                let typed = match (ty, v) {
                    (ArgType::Long, serde_json::Value::Number(n)) => n.as_i64().map(ArgValue::Long),
                    (ArgType::String, serde_json::Value::String(s)) => {
                        Some(ArgValue::String(s.clone()))
                    }
                    (ArgType::Bool, serde_json::Value::Bool(b)) => Some(ArgValue::Bool(*b)),
                    _ => None,
                };
                let Some(typed) = typed else {
                    return Err(bad(format!(
                        "tool argument {name} is not a {} (got {})",
                        match ty {
                            ArgType::Long => "whole number",
                            ArgType::String => "string",
                            ArgType::Bool => "boolean",
                        },
                        preview(&v.to_string())
                    )));
                };
                call.arguments.insert(name.clone(), typed);
            }
        }
    }
    Ok(call)
}

/// JSON that refuses an object with the same key twice, at any depth. Parsers disagree on which
/// of two `"name"`s wins; a call is decided only on a body every parser reads the same way.
struct Unique(serde_json::Value);

impl<'de> serde::Deserialize<'de> for Unique {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor).map(Unique)
    }
}

struct UniqueVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> std::result::Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Unique(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(out.into())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let Unique(v) = map.next_value()?;
            if out.contains_key(&k) {
                return Err(serde::de::Error::custom(format!(
                    "key {} appears twice in one object",
                    preview(&k)
                )));
            }
            out.insert(k, v);
        }
        Ok(out.into())
    }
}

#[cfg(test)]
mod tests;
