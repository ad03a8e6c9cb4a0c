//! A real Envoy in front of a tool of the test's own, with the broker as its ext_authz service:
//! downstream mTLS requiring the agent's SVID, ext_authz over gRPC with mTLS using the gateway's
//! own SVID, the request body forwarded for MCP, fail closed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jitbroker::api::pb;
use jitbroker::api::pb::verifier_client::VerifierClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::free_port;
use super::tools::{self, KillOnDrop};

/// The Envoy binary: `JITBROKER_ENVOY`, then `envoy` on PATH, then the tools cache. `None`
/// skips the test unless `JITBROKER_REQUIRE_ENVOY=1` (the test script sets it).
pub fn binary() -> Option<PathBuf> {
    tools::binary(
        "envoy",
        tools::tools_cache("envoy"),
        "scripts/tools.sh install envoy",
    )
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    _child: KillOnDrop,
    pub listen: SocketAddr,
    pub log: PathBuf,
}

/// Files Envoy reads: the gateway's SVID and the trust bundle.
pub struct GatewayFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

/// The Envoy configuration of docs/gateways.md, with the test's addresses, files and trust
/// domain put in. Every replaced text must be there, so the page and the test cannot drift.
pub fn config_from_docs(
    listen: SocketAddr,
    admin: SocketAddr,
    broker: SocketAddr,
    tool: SocketAddr,
    f: &GatewayFiles,
) -> String {
    let sock = |a: SocketAddr| format!("address: {}, port_value: {}", a.ip(), a.port());
    tools::replace_all(
        tools::docs_block("envoy-config", "yaml"),
        "Envoy config",
        &[
            (
                "address: 127.0.0.1, port_value: 9901".to_owned(),
                sock(admin),
            ),
            (
                "address: 0.0.0.0, port_value: 10443".to_owned(),
                sock(listen),
            ),
            (
                "address: jitbroker.jitbroker.svc.cluster.local, port_value: 8443".to_owned(),
                sock(broker),
            ),
            (
                "address: tickets.tools.svc.cluster.local, port_value: 8080".to_owned(),
                sock(tool),
            ),
            (
                "/etc/envoy/svid/svid.pem".to_owned(),
                f.cert.display().to_string(),
            ),
            (
                "/etc/envoy/svid/svid.key".to_owned(),
                f.key.display().to_string(),
            ),
            (
                "/etc/envoy/svid/bundle.pem".to_owned(),
                f.bundle.display().to_string(),
            ),
            (
                "spiffe://example.org/ns/agents/".to_owned(),
                "spiffe://jitbroker.dev/agent/".to_owned(),
            ),
            (
                "spiffe://example.org/ns/jitbroker/sa/jitbroker".to_owned(),
                "spiffe://jitbroker.dev/jitbroker".to_owned(),
            ),
        ],
    )
}

/// Starts Envoy with the YAML `cfg` (listening on `listen`, admin on `admin`) and waits until
/// its admin endpoint says it is live.
pub async fn start(
    bin: &Path,
    dir: &Path,
    cfg: &str,
    listen: SocketAddr,
    admin: SocketAddr,
) -> Envoy {
    let admin = admin.to_string();
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, cfg).unwrap();
    let log = dir.join("envoy.log");
    let child = Command::new(bin)
        .arg("--config-path")
        .arg(&path)
        .args([
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--log-level",
            "warn",
        ])
        .arg("--log-path")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start envoy");
    let envoy = Envoy {
        _child: KillOnDrop(child),
        listen,
        log: log.clone(),
    };
    let live = || async {
        super::http_get(&admin, "/ready")
            .await
            .is_some_and(|r| r.contains("LIVE"))
    };
    if super::poll_until(300, Duration::from_millis(50), live).await {
        return envoy;
    }
    panic!(
        "envoy did not become ready; its log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// Free loopback addresses for Envoy's listener and admin endpoint.
pub fn addrs() -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    )
}

/// An HTTP/1.1 response: status, lower-case headers, body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// One HTTP/1.1 request over TLS to `addr` (server name `localhost`) with `tls`.
pub async fn https(
    addr: SocketAddr,
    tls: rustls::ClientConfig,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<HttpResponse> {
    https_to_host(addr, tls, "tools.internal", method, path, headers, body).await
}

/// [`https`] with `host` as the `host` header.
pub async fn https_to_host(
    addr: SocketAddr,
    tls: rustls::ClientConfig,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<HttpResponse> {
    // This client speaks HTTP/1.1, and says so (servers may refuse another protocol).
    let mut s = super::tls_connect(addr, super::http1(tls)).await?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    // Envoy closes after the response (connection: close); a TLS close without notify is fine.
    let _ = s.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        unchunk(body)
    } else {
        body.to_owned()
    };
    Ok(HttpResponse {
        status,
        head: head.to_ascii_lowercase(),
        body,
    })
}

fn unchunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `headers` with borrowed values, as [`https`] takes them.
pub fn borrowed<'a>(headers: &'a [(&'a str, String)]) -> Vec<(&'a str, &'a str)> {
    headers.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Checks the first call that reached the tool, made by `AGENT` under `task`: the tool answered
/// that the credential it got is live for the agent and the task, and it saw one request, without
/// the task header. Returns the `authorization` the gateway injected.
pub fn first_allowed_call(resp: &HttpResponse, seen: &Seen, task: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
    assert_eq!(v["active"], true, "{v}");
    assert_eq!(v["spiffe_id"], super::AGENT);
    assert_eq!(v["task_id"], task);
    let got = seen.all();
    assert_eq!(got.len(), 1);
    assert!(
        !got[0].contains_key(super::gateway::TASK_HEADER),
        "task header removed"
    );
    got[0].get("authorization").expect("injected").clone()
}

/// The headers of an agent's call under `task` that also carries the agent's own
/// `authorization` (which must never reach the tool).
pub fn with_own_authorization(task: &str) -> Vec<(&'static str, String)> {
    vec![
        (super::gateway::TASK_HEADER, task.to_owned()),
        ("authorization", "Bearer agent-own-token".into()),
    ]
}

/// [`first_allowed_call`] for a call with [`with_own_authorization`]: the the agent's own `Bearer agent-own-token`: the
/// gateway replaced it with a broker token, which the agent's response does not show.
pub fn replaced_by_broker_token(resp: &HttpResponse, seen: &Seen, task: &str) {
    let auth = first_allowed_call(resp, seen, task);
    let secret = auth.strip_prefix("Bearer jbt_").expect("a broker token");
    assert!(!auth.contains("agent-own-token"));
    assert!(!resp.head.contains(secret) && !resp.body.contains(secret));
}

/// The broker's denial of a call under a completed task.
pub fn assert_denied_completed(resp: &HttpResponse, context: &str) {
    assert_eq!(resp.status, 403, "{context}{resp:?}");
    assert!(resp.body.contains("COMPLETED"), "{}", resp.body);
}

/// A denial answered by the broker: 403 with its JSON body.
pub fn assert_denied(resp: &HttpResponse, context: &str) {
    assert_eq!(resp.status, 403, "{context}: {resp:?}");
    let v: serde_json::Value = serde_json::from_str(&resp.body).expect("JSON denial");
    assert_eq!(v["error"], "denied");
}

/// What the tool saw: the headers of each request that reached it, and what introspecting the
/// credential it carried said.
#[derive(Clone, Default)]
pub struct Seen(pub Arc<Mutex<Vec<HashMap<String, String>>>>);

impl Seen {
    pub fn all(&self) -> Vec<HashMap<String, String>> {
        self.0.lock().unwrap().clone()
    }
}

/// A tool of the test's own (see [`tool_server`]) that introspects as `TOOL` on the broker `r`,
/// and the gateway's SVID files, written to `dir`: (the tool's address, what it saw, the files).
pub async fn tool_behind_gateway(
    r: &super::Running,
    dir: &Path,
) -> (SocketAddr, Seen, GatewayFiles) {
    let tool = super::clients(r, super::TOOL).await;
    let (addr, seen) = tool_server(tool.verifier.clone()).await;
    (addr, seen, super::gateway::gateway_files(&r.data_dir, dir))
}

/// A small HTTP tool: records each request and introspects the credential the gateway put in
/// `authorization` (tickets) or `x-api-key` (MCP), answering with the verdict only.
pub async fn tool_server(
    verifier: VerifierClient<tonic::transport::Channel>,
) -> (SocketAddr, Seen) {
    let seen = Seen::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = seen.clone();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let s = s.clone();
        let mut verifier = verifier.clone();
        async move {
            let headers: HashMap<String, String> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect();
            s.0.lock().unwrap().push(headers.clone());
            let (secret, resource) = if req.uri().path().starts_with("/mcp") {
                (headers.get("x-api-key").cloned(), "helpdesk-mcp")
            } else {
                (
                    headers
                        .get("authorization")
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .map(str::to_owned),
                    "tickets",
                )
            };
            let verdict = match secret {
                Some(secret) => verifier
                    .introspect(pb::IntrospectRequest {
                        secret,
                        resource: resource.into(),
                    })
                    .await
                    .map(|r| r.into_inner())
                    .ok(),
                None => None,
            };
            let body = serde_json::json!({
                "active": verdict.as_ref().is_some_and(|v| v.active),
                "spiffe_id": verdict.as_ref().map(|v| v.spiffe_id.clone()),
                "task_id": verdict.as_ref().map(|v| v.task_id.clone()),
            });
            ([("content-type", "application/json")], body.to_string())
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, seen)
}
