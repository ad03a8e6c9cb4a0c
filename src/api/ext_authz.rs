//! `envoy.service.auth.v3.Authorization`: Envoy's external authorization protocol, spoken by
//! Envoy, Istio, Envoy Gateway and agentgateway. The caller is the gateway (its own SVID on the
//! mTLS connection); the agent is the gateway's verified downstream peer. The decision is
//! [`Broker::check_tool_call`]; this module only maps the wire.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction,
    HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, HttpStatusCode, OkHttpResponse,
};
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

use super::caller;
use crate::broker::Broker;
use crate::broker::tool_calls::{ToolCallDenial, ToolCallRequest, ToolCallVerdict};
use crate::gateway::HttpCall;

/// The gRPC path of the check (metrics label requests by it).
pub const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// gRPC status codes carried inside `CheckResponse.status`.
const RPC_OK: i32 = 0;
const RPC_PERMISSION_DENIED: i32 = 7;
/// JSON-RPC error code of a denied MCP call (implementation-defined server error range).
const MCP_DENIED: i32 = -32001;

/// The ext_authz service on the API port.
#[derive(Clone)]
pub struct ExtAuthzApi {
    pub broker: Arc<Broker>,
    pub identity: Option<crate::identity::Identity>,
}

#[tonic::async_trait]
impl Authorization for ExtAuthzApi {
    async fn check(&self, req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let gateway = caller(&req, &self.broker, &self.identity).await?;
        // A gateway vouches for the agent's identity: it must itself be on mTLS, not a bearer.
        let on_mtls = req
            .extensions()
            .get::<super::PeerInfo>()
            .and_then(|p| p.spiffe_id.as_ref())
            == Some(&gateway);
        if !on_mtls {
            return Err(Status::permission_denied(format!(
                "{gateway}: gateways call Authorization/Check over mTLS with their X.509-SVID"
            )));
        }
        let check = req.into_inner();
        let attrs = check.attributes.unwrap_or_default();
        let principal = attrs.source.map(|s| s.principal).unwrap_or_default();
        let http = attrs.request.and_then(|r| r.http).unwrap_or_default();
        let mut headers: HashMap<String, String> = http.headers;
        // Gateways that send `header_map` (encode_raw_headers) instead of `headers`.
        if let Some(map) = http.header_map {
            for h in map.headers {
                let v = if h.raw_value.is_empty() {
                    h.value
                } else {
                    String::from_utf8_lossy(&h.raw_value).into_owned()
                };
                headers
                    .entry(h.key.to_ascii_lowercase())
                    .and_modify(|e| {
                        e.push(',');
                        e.push_str(&v);
                    })
                    .or_insert(v);
            }
        }
        let body: Option<Vec<u8>> = if !http.raw_body.is_empty() {
            Some(http.raw_body)
        } else if !http.body.is_empty() {
            Some(http.body.into_bytes())
        } else {
            None
        };
        let request_id = headers
            .get("traceparent")
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or(&http.id)
            .to_owned();
        // A Check may mint the credential the gateway injects: it runs to completion even if
        // the gateway resets the stream (see `super::to_completion`).
        let broker = self.broker.clone();
        let (method, host, path) = (http.method, http.host, http.path);
        let verdict = super::to_completion(async move {
            broker
                .tool_calls
                .check_tool_call(
                    &gateway,
                    ToolCallRequest {
                        principal: &principal,
                        call: HttpCall {
                            method: &method,
                            host: &host,
                            path: &path,
                            headers: &headers,
                            body: body.as_deref(),
                        },
                        request_id: &request_id,
                    },
                )
                .await
        })
        .await?;
        Ok(Response::new(check_response(verdict)))
    }
}

fn header(key: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value,
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

/// The `CheckResponse` for a verdict: the injected header on allow, a 403 naming the policies
/// on deny (a JSON-RPC response for MCP calls, so an MCP client shows it as a tool error).
pub fn check_response(verdict: ToolCallVerdict) -> CheckResponse {
    match verdict {
        ToolCallVerdict::Allow {
            header: name,
            value,
            remove,
            ..
        } => CheckResponse {
            status: Some(rpc::Status {
                code: RPC_OK,
                ..Default::default()
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: vec![header(&name, value.as_str().to_owned())],
                headers_to_remove: remove,
                ..Default::default()
            })),
            ..Default::default()
        },
        ToolCallVerdict::Deny(d) => CheckResponse {
            status: Some(rpc::Status {
                code: RPC_PERMISSION_DENIED,
                message: d.reason.clone(),
                ..Default::default()
            }),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus {
                    code: HttpStatusCode::Forbidden as i32,
                }),
                headers: std::iter::once(header("content-type", "application/json".into()))
                    .chain(insufficient_scope(&d).map(|v| header("www-authenticate", v)))
                    .collect(),
                body: denial_body(&d),
            })),
            ..Default::default()
        },
    }
}

/// The `WWW-Authenticate` challenge of a denial about a grant (RFC 6750 §3.1
/// `insufficient_scope`, naming the scope the call needs, as MCP's authorization rules ask).
pub fn insufficient_scope(d: &ToolCallDenial) -> Option<String> {
    let scope = d.scope.as_deref()?;
    // Scopes are action names (no quotes or backslashes); the description is cut to plain text.
    let desc: String = d
        .reason
        .chars()
        .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
        .take(200)
        .collect();
    Some(format!(
        "Bearer error=\"insufficient_scope\", scope=\"{scope}\", error_description=\"{desc}\""
    ))
}

/// The JSON body of a denial.
pub fn denial_body(d: &ToolCallDenial) -> String {
    let mut detail = serde_json::json!({
        "error": "denied",
        "reason": d.reason,
        "policies": d.policies,
    });
    if let Some(a) = &d.approval_id {
        detail["approval_id"] = serde_json::Value::String(a.clone());
    }
    let Some(mcp) = &d.mcp else {
        return detail.to_string();
    };
    let text = match d.approval_id.as_deref() {
        Some(a) => format!("Denied by jitbroker (needs approval {a}): {}", d.reason),
        None => format!("Denied by jitbroker: {}", d.reason),
    };
    let mut msg = serde_json::json!({
        "jsonrpc": "2.0",
        "id": mcp.id.clone().unwrap_or(serde_json::Value::Null),
    });
    if mcp.tool_call {
        // A tool result flagged as an error: MCP clients hand it to the model as the tool's
        // answer instead of failing the session.
        msg["result"] = serde_json::json!({
            "content": [{"type": "text", "text": text}],
            "isError": true,
            "_meta": {"jitbroker": detail},
        });
    } else {
        msg["error"] = serde_json::json!({
            "code": MCP_DENIED,
            "message": text,
            "data": detail,
        });
    }
    msg.to_string()
}
