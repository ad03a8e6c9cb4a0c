//! A real Envoy in front of a tool of the test's own, with the broker as its ext_authz service:
//! downstream mTLS requiring the agent's SVID, ext_authz over gRPC with mTLS using the gateway's
//! own SVID, the request body forwarded for MCP, fail closed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

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

/// The Envoy configuration the docs show, with the test's addresses and files.
pub fn config(
    listen: SocketAddr,
    admin: SocketAddr,
    broker: SocketAddr,
    tool: SocketAddr,
    f: &GatewayFiles,
) -> serde_json::Value {
    let file = |p: &Path| serde_json::json!({"filename": p.display().to_string()});
    let sock = |a: SocketAddr| serde_json::json!({"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}});
    let endpoint = |name: &str, a: SocketAddr| {
        serde_json::json!({
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": sock(a)}}]}]
        })
    };
    let certs =
        serde_json::json!([{"certificate_chain": file(&f.cert), "private_key": file(&f.key)}]);
    serde_json::json!({
      "admin": {"address": sock(admin)},
      "static_resources": {
        "listeners": [{
          "name": "agents",
          "address": sock(listen),
          "filter_chains": [{
            "transport_socket": {
              "name": "envoy.transport_sockets.tls",
              "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": true,
                "common_tls_context": {
                  "tls_certificates": certs,
                  "validation_context": {
                    "trusted_ca": file(&f.bundle),
                    "match_typed_subject_alt_names": [
                      {"san_type": "URI", "matcher": {"prefix": "spiffe://jitbroker.dev/agent/"}}
                    ]
                  }
                }
              }
            },
            "filters": [{
              "name": "envoy.filters.network.http_connection_manager",
              "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "agents",
                "normalize_path": true,
                "merge_slashes": true,
                "path_with_escaped_slashes_action": "REJECT_REQUEST",
                "route_config": {
                  "virtual_hosts": [{
                    "name": "tools",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "tool"}}]
                  }]
                },
                "http_filters": [
                  {
                    "name": "envoy.filters.http.ext_authz",
                    "typed_config": {
                      "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                      "transport_api_version": "V3",
                      "failure_mode_allow": false,
                      "with_request_body": {"max_request_bytes": 65536, "allow_partial_message": true},
                      "grpc_service": {
                        "envoy_grpc": {"cluster_name": "jitbroker"},
                        "timeout": "2s"
                      }
                    }
                  },
                  {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
                  }
                ]
              }
            }]
          }]
        }],
        "clusters": [
          {
            "name": "jitbroker",
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
              "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
              }
            },
            "load_assignment": endpoint("jitbroker", broker),
            "transport_socket": {
              "name": "envoy.transport_sockets.tls",
              "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "localhost",
                "common_tls_context": {
                  "alpn_protocols": ["h2"],
                  "tls_certificates": certs,
                  "validation_context": {
                    "trusted_ca": file(&f.bundle),
                    "match_typed_subject_alt_names": [
                      {"san_type": "URI", "matcher": {"exact": "spiffe://jitbroker.dev/jitbroker"}}
                    ]
                  }
                }
              }
            }
          },
          {
            "name": "tool",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": endpoint("tool", tool)
          }
        ]
      }
    })
}

/// Starts Envoy with `cfg` and waits until its admin endpoint says it is live.
pub async fn start(bin: &Path, dir: &Path, cfg: serde_json::Value) -> Envoy {
    let listen: SocketAddr = {
        let a = &cfg["static_resources"]["listeners"][0]["address"]["socket_address"];
        format!("{}:{}", a["address"].as_str().unwrap(), a["port_value"])
            .parse()
            .unwrap()
    };
    let admin = {
        let a = &cfg["admin"]["address"]["socket_address"];
        format!("{}:{}", a["address"].as_str().unwrap(), a["port_value"])
    };
    let path = dir.join("envoy.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
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
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut s = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: tools.internal\r\nconnection: close\r\ncontent-length: {}\r\n",
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
