//! Real Caddy and Traefik in front of a tool of the test's own, asking the broker's forward-auth
//! endpoint about each request: agents on mTLS with their SVID, the proxy on mTLS to the broker
//! with the gateway's SVID, the agent's certificate passed in a header, the credential copied
//! onto the upstream request and the task header dropped. Their configurations are read from
//! docs/gateways.md, so the page and the tests cannot drift.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::envoy::{GatewayFiles, https_to_host};
use super::free_port;
use super::tools::{self, KillOnDrop, docs_block, replace_all};

/// The proxies under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Caddy,
    Traefik,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Caddy => "caddy",
            Kind::Traefik => "traefik",
        }
    }

    /// The binary: `JITBROKER_CADDY` / `JITBROKER_TRAEFIK`, then PATH, then the tools cache.
    /// `None` skips the test unless `JITBROKER_REQUIRE_CADDY=1` / `JITBROKER_REQUIRE_TRAEFIK=1`
    /// (scripts/test.sh sets them).
    pub fn binary(self) -> Option<PathBuf> {
        let name = self.name();
        tools::binary(
            name,
            tools::tools_cache(name),
            &format!("scripts/tools.sh install {name}"),
        )
    }
}

/// A running proxy, killed on drop.
pub struct Proxy {
    child: KillOnDrop,
    pub kind: Kind,
    pub listen: SocketAddr,
    pub log: PathBuf,
}

impl Proxy {
    /// What the proxy logged so far (for assertion messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The replacements both proxies share: the SVID files, the broker and the tool.
fn common_pairs(dir: &str, f: &GatewayFiles, tool: SocketAddr) -> Vec<(String, String)> {
    vec![
        (format!("{dir}/svid.pem"), f.cert.display().to_string()),
        (format!("{dir}/svid.key"), f.key.display().to_string()),
        (format!("{dir}/bundle.pem"), f.bundle.display().to_string()),
        (
            "tickets.tools.svc.cluster.local:8080".to_owned(),
            tool.to_string(),
        ),
    ]
}

/// The Caddyfile of docs/gateways.md, listening on `listen` (loopback only), asking the broker's
/// forward-auth endpoint at `broker` (its certificate names `localhost`).
pub fn caddy_config_from_docs(
    listen: SocketAddr,
    broker: SocketAddr,
    tool: SocketAddr,
    f: &GatewayFiles,
) -> String {
    let mut pairs = common_pairs("/etc/caddy/svid", f, tool);
    pairs.extend([
        (
            "https://:10443 {".to_owned(),
            format!("https://:{} {{\n\tbind {}", listen.port(), listen.ip()),
        ),
        (
            "https://jitbroker.jitbroker.svc.cluster.local:8444".to_owned(),
            format!("https://{broker}"),
        ),
        (
            "tls_server_name jitbroker.jitbroker.svc.cluster.local".to_owned(),
            "tls_server_name localhost".to_owned(),
        ),
    ]);
    replace_all(docs_block("caddy-config", "caddyfile"), "Caddyfile", &pairs)
}

/// Traefik's static and dynamic configuration of docs/gateways.md, listening on `listen`, with
/// a ping entry point on `ping` for readiness.
pub fn traefik_config_from_docs(
    listen: SocketAddr,
    ping: SocketAddr,
    dynamic_path: &Path,
    broker: SocketAddr,
    tool: SocketAddr,
    f: &GatewayFiles,
) -> (String, String) {
    let static_cfg = replace_all(
        docs_block("traefik-static", "yaml"),
        "Traefik static configuration",
        &[
            (
                "address: \":10443\"".to_owned(),
                format!("address: \"{listen}\"\n  ping:\n    address: \"{ping}\""),
            ),
            (
                "/etc/traefik/dynamic.yml".to_owned(),
                dynamic_path.display().to_string(),
            ),
        ],
    ) + "ping:\n  entryPoint: ping\nlog:\n  level: WARN\n";
    let mut pairs = common_pairs("/etc/traefik/svid", f, tool);
    pairs.push((
        "https://jitbroker.jitbroker.svc.cluster.local:8444/forward-auth".to_owned(),
        format!("https://{broker}/forward-auth"),
    ));
    let dynamic = replace_all(
        docs_block("traefik-dynamic", "yaml"),
        "Traefik dynamic configuration",
        &pairs,
    );
    (static_cfg, dynamic)
}

/// Starts `kind` in front of `tool`, deciding with the broker's forward-auth endpoint `broker`,
/// and waits until a call by the agent (`agent_tls`) gets an answer decided by the broker.
pub async fn start(
    kind: Kind,
    bin: &Path,
    dir: &Path,
    broker: SocketAddr,
    tool: SocketAddr,
    files: &GatewayFiles,
    agent_tls: &rustls::ClientConfig,
) -> Proxy {
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = dir.join(format!("{}.log", kind.name()));
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(bin);
    match kind {
        Kind::Caddy => {
            let path = dir.join("Caddyfile");
            std::fs::write(&path, caddy_config_from_docs(listen, broker, tool, files)).unwrap();
            // Caddy keeps its state (instance id, locks) under the XDG directories.
            cmd.args(["run", "--adapter", "caddyfile", "--config"])
                .arg(&path)
                .env("HOME", dir)
                .env("XDG_DATA_HOME", dir.join("data"))
                .env("XDG_CONFIG_HOME", dir.join("config"));
        }
        Kind::Traefik => {
            let ping = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let dynamic_path = dir.join("dynamic.yml");
            let (static_cfg, dynamic) =
                traefik_config_from_docs(listen, ping, &dynamic_path, broker, tool, files);
            let static_path = dir.join("traefik.yml");
            std::fs::write(&dynamic_path, dynamic).unwrap();
            std::fs::write(&static_path, static_cfg).unwrap();
            cmd.arg(format!("--configfile={}", static_path.display()))
                .env("HOME", dir);
        }
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", kind.name()));
    let mut proxy = Proxy {
        child: KillOnDrop(child),
        kind,
        listen,
        log,
    };
    // Ready when a call without a task is answered by the broker (403 with its JSON): the
    // listener is up and the route (Traefik loads it after listening) goes through forward auth.
    let mut last = None;
    for _ in 0..300 {
        match https_to_host(listen, agent_tls.clone(), HOST, "GET", "/", &[], "").await {
            Ok(r) if r.status == 403 && r.body.contains("\"denied\"") => return proxy,
            r => last = Some(r),
        }
        if let Ok(Some(status)) = proxy.child.0.try_wait() {
            panic!("{} exited ({status}):\n{}", kind.name(), proxy.log_text());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{} did not become ready (last answer: {last:?}); its log:\n{}",
        kind.name(),
        proxy.log_text()
    );
}

/// The `host` header of requests through the proxies: `localhost`, the server name too (Caddy
/// refuses a host that differs from the SNI when it verifies client certificates).
pub const HOST: &str = "localhost";
