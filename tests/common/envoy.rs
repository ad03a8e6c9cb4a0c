//! A real Envoy in front of a tool of the test's own, with the broker as its ext_authz service:
//! downstream mTLS requiring the agent's SVID, ext_authz over gRPC with mTLS using the gateway's
//! own SVID, the request body forwarded for MCP, fail closed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jitbroker::api::pb;
use jitbroker::api::pb::verifier_client::VerifierClient;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::free_port;

/// The Envoy binary: `JITBROKER_ENVOY`, then `envoy` on PATH, then the tools cache. `None`
/// skips the test unless `JITBROKER_REQUIRE_ENVOY=1` (the test script sets it).
pub fn binary() -> Option<PathBuf> {
    let found = std::env::var_os("JITBROKER_ENVOY")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("PATH").and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("envoy"))
                    .find(|f| f.is_file())
            })
        })
        .or_else(|| {
            let home = std::env::var_os("HOME")?;
            let f = Path::new(&home).join(".cache/jitbroker/tools/bin/envoy");
            f.is_file().then_some(f)
        });
    if found.is_none() {
        assert!(
            std::env::var("JITBROKER_REQUIRE_ENVOY").as_deref() != Ok("1"),
            "JITBROKER_REQUIRE_ENVOY=1 but no envoy binary (scripts/tools.sh install envoy)"
        );
        eprintln!("skipping: no envoy binary (scripts/tools.sh install envoy)");
    }
    found
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    child: Child,
    pub listen: SocketAddr,
    pub log: PathBuf,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let page =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/gateways.md"))
            .unwrap();
    let start = page
        .find("<!-- envoy-config -->\n```yaml\n")
        .expect("marked Envoy config");
    let rest = &page[start..];
    let body = &rest[rest.find("```yaml\n").unwrap() + 8..];
    let mut yaml = body[..body.find("```").unwrap()].to_owned();
    let sock = |a: SocketAddr| format!("address: {}, port_value: {}", a.ip(), a.port());
    for (from, to) in [
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
    ] {
        assert!(
            yaml.contains(&from),
            "docs/gateways.md Envoy config lost {from:?}"
        );
        yaml = yaml.replace(&from, &to);
    }
    yaml
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
        child,
        listen,
        log: log.clone(),
    };
    for _ in 0..300 {
        if let Some(r) = super::http_get(&admin, "/ready").await
            && r.contains("LIVE")
        {
            return envoy;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
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
    let mut tls = tls;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut s = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
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

/// What the tool saw: the headers of each request that reached it, and what introspecting the
/// credential it carried said.
#[derive(Clone, Default)]
pub struct Seen(pub Arc<Mutex<Vec<HashMap<String, String>>>>);

impl Seen {
    pub fn all(&self) -> Vec<HashMap<String, String>> {
        self.0.lock().unwrap().clone()
    }
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
