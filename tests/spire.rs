//! Against a real SPIRE server and agent (v1.13, built by scripts/tools.sh): the broker in `spire`
//! mode serves with its SPIRE-issued SVID, an agent workload gets its SVID from the same Workload
//! API and runs a task, an unregistered workload gets nothing, SVIDs rotate under live traffic,
//! and the broker rides out the SPIRE agent going away.
//!
//! The broker runs as its own process (`jitbroker serve`) so that the unix workload attestor can
//! tell it from this test process by binary path. Set JITBROKER_REQUIRE_SPIRE=1 (scripts/test.sh
//! does) to make missing SPIRE binaries a failure rather than a skip.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use jitbroker::api::pb;
use tokio::process::{Child, Command};

const TD: &str = "jitbroker.test";

fn tools_bin() -> PathBuf {
    std::env::var_os("JITBROKER_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/jitbroker/tools")
        })
        .join("bin")
}

struct Spire {
    dir: tempfile::TempDir,
    bin: PathBuf,
    server: Child,
    agent: Option<Child>,
    port: u16,
}

impl Spire {
    fn server_sock(&self) -> PathBuf {
        self.dir.path().join("server.sock")
    }
    fn agent_sock(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    async fn cli(&self, tool: &str, args: &[&str]) -> String {
        let (ok, text) = self.try_cli(tool, args).await;
        assert!(ok, "{tool} {args:?} failed: {text}");
        text
    }

    async fn try_cli(&self, tool: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new(self.bin.join(tool))
            .args(args)
            .output()
            .await
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    async fn start() -> Option<Spire> {
        let bin = tools_bin();
        if !bin.join("spire-server").exists() || !bin.join("spire-agent").exists() {
            assert!(
                std::env::var_os("JITBROKER_REQUIRE_SPIRE").is_none(),
                "SPIRE is required but not installed in {}: run scripts/tools.sh install spire-server spire-agent",
                bin.display()
            );
            eprintln!(
                "SKIP: SPIRE not installed in {} (scripts/tools.sh install spire-server spire-agent)",
                bin.display()
            );
            return None;
        }
        // Unix socket paths are short-limited: keep the temp dir near the root.
        let dir = tempfile::Builder::new()
            .prefix("jbspire")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        let port = free_port();
        std::fs::write(
            d.join("server.conf"),
            format!(
                r#"server {{
  bind_address = "127.0.0.1"
  bind_port = "{port}"
  socket_path = "{sock}"
  trust_domain = "{TD}"
  data_dir = "{d}/server-data"
  log_level = "WARN"
  ca_ttl = "24h"
  default_x509_svid_ttl = "1h"
}}
plugins {{
  DataStore "sql" {{ plugin_data {{ database_type = "sqlite3" connection_string = "{d}/datastore.sqlite3" }} }}
  KeyManager "memory" {{ plugin_data {{}} }}
  NodeAttestor "join_token" {{ plugin_data {{}} }}
}}
"#,
                sock = d.join("server.sock").display(),
                d = d.display()
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("agent.conf"),
            format!(
                r#"agent {{
  data_dir = "{d}/agent-data"
  log_level = "WARN"
  server_address = "127.0.0.1"
  server_port = "{port}"
  socket_path = "{sock}"
  trust_domain = "{TD}"
  insecure_bootstrap = true
}}
plugins {{
  KeyManager "disk" {{ plugin_data {{ directory = "{d}/agent-data" }} }}
  NodeAttestor "join_token" {{ plugin_data {{}} }}
  WorkloadAttestor "unix" {{ plugin_data {{ discover_workload_path = true }} }}
}}
"#,
                sock = d.join("agent.sock").display(),
                d = d.display()
            ),
        )
        .unwrap();
        let server = Command::new(bin.join("spire-server"))
            .args(["run", "-config"])
            .arg(d.join("server.conf"))
            .stdout(std::fs::File::create(d.join("server.out")).unwrap())
            .stderr(std::fs::File::create(d.join("server.log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut s = Spire {
            dir,
            bin,
            server,
            agent: None,
            port,
        };
        let sock = s.server_sock().display().to_string();
        eventually("spire-server healthy", || async {
            s.try_cli("spire-server", &["healthcheck", "-socketPath", &sock])
                .await
                .0
        })
        .await;
        let token = s
            .cli(
                "spire-server",
                &[
                    "token",
                    "generate",
                    "-spiffeID",
                    &format!("spiffe://{TD}/node"),
                    "-socketPath",
                    &sock,
                ],
            )
            .await;
        let token = token
            .trim()
            .strip_prefix("Token: ")
            .unwrap()
            .trim()
            .to_string();
        std::fs::write(s.dir.path().join("token"), &token).unwrap();
        s.start_agent(Some(&token)).await;
        Some(s)
    }

    async fn start_agent(&mut self, token: Option<&str>) {
        let mut cmd = Command::new(self.bin.join("spire-agent"));
        cmd.args(["run", "-config"])
            .arg(self.dir.path().join("agent.conf"));
        if let Some(t) = token {
            cmd.args(["-joinToken", t]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let out = log.try_clone().unwrap();
        self.agent = Some(
            cmd.stdout(out)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .unwrap(),
        );
        let sock = self.agent_sock().display().to_string();
        let healthy = || async {
            self.try_cli("spire-agent", &["healthcheck", "-socketPath", &sock])
                .await
                .0
        };
        if poll_until(300, Duration::from_millis(100), healthy).await {
            return;
        }
        panic!(
            "spire-agent did not become healthy:\n{}",
            std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
        );
    }

    async fn stop_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill().await.unwrap();
        }
    }

    async fn register(&self, id: &str, binary: &Path, ttl_s: u32, dns: &[&str]) {
        let sock = self.server_sock().display().to_string();
        // The agent's unix attestor reports the executable's resolved path: a target directory
        // reached through a symlink must be registered by where it really is.
        let binary = binary
            .canonicalize()
            .unwrap_or_else(|_| binary.to_path_buf());
        let selector = format!("unix:path:{}", binary.display());
        let ttl = ttl_s.to_string();
        let spiffe_id = format!("spiffe://{TD}{id}");
        let parent = format!("spiffe://{TD}/node");
        let mut args = vec![
            "entry",
            "create",
            "-parentID",
            &parent,
            "-spiffeID",
            &spiffe_id,
            "-selector",
            &selector,
            "-x509SVIDTTL",
            &ttl,
            "-socketPath",
            &sock,
        ];
        for d in dns {
            args.push("-dns");
            args.push(d);
        }
        self.cli("spire-server", &args).await;
    }
}

impl Drop for Spire {
    fn drop(&mut self) {
        let _ = self.server.start_kill();
        if let Some(a) = &mut self.agent {
            let _ = a.start_kill();
        }
    }
}

/// Whether the broker's `/readyz` on `ops_addr` answers with `status` (e.g. `" 200 "`).
async fn readyz_says(ops_addr: &str, status: &str) -> bool {
    http_get(ops_addr, "/readyz")
        .await
        .is_some_and(|r| r.contains(status))
}

fn pem_of(svid: &spiffe::X509Svid) -> (String, String) {
    let b64 = |tag: &str, der: &[u8]| {
        use base64::Engine;
        let body = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {tag}-----\n{}\n-----END {tag}-----\n",
            lines.join("\n")
        )
    };
    let chain: String = svid
        .cert_chain()
        .iter()
        .map(|c| b64("CERTIFICATE", c.as_ref()))
        .collect();
    (chain, b64("PRIVATE KEY", svid.private_key().as_ref()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_on_real_spire() {
    let Some(mut spire) = Spire::start().await else {
        return;
    };
    let broker_bin = PathBuf::from(env!("CARGO_BIN_EXE_jitbroker"));
    let me = std::env::current_exe().unwrap();
    spire
        .register("/jitbroker", &broker_bin, 20, &["localhost"])
        .await;
    spire.register("/agent/test", &me, 3600, &[]).await;

    // A workload with no registration entry (spire-agent's own CLI binary) gets nothing.
    let sock = spire.agent_sock().display().to_string();
    let (ok, text) = spire
        .try_cli(
            "spire-agent",
            &[
                "api",
                "fetch",
                "x509",
                "-socketPath",
                &sock,
                "-timeout",
                "3s",
            ],
        )
        .await;
    assert!(!ok, "an unregistered workload got an SVID: {text}");

    // The broker, in spire mode.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("kek"), format!("{}\n", "5a".repeat(32))).unwrap();
    std::fs::set_permissions(
        d.join("kek"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(
        d.join("policy.cedar"),
        "@id(\"test-agents\") permit(principal, action == Action::\"read\", resource == Resource::\"demo-token\") when { principal.path like \"/agent/*\" };",
    )
    .unwrap();
    let (api, ops) = (free_port(), free_port());
    std::fs::write(
        d.join("jitbroker.toml"),
        format!(
            r#"listen = "127.0.0.1:{api}"
ops_listen = "127.0.0.1:{ops}"
data_dir = "{d}/data"
kek_file = "{d}/kek"
policy_file = "{d}/policy.cedar"
admin_ids = ["spiffe://{TD}/agent/test"]
[identity]
source = "spire"
trust_domain = "{TD}"
workload_api_socket = "unix://{sock}"
jwt_audience = "jitbroker"
[resources.demo-token]
kind = "token"
actions = ["read"]
verifiers = ["spiffe://{TD}/agent/test"]
"#,
            d = d.display()
        ),
    )
    .unwrap();
    // Entries reach the agent's cache asynchronously: wait until the broker can fetch one.
    let mut broker = None;
    for _ in 0..30 {
        let mut child = Command::new(&broker_bin)
            .args(["serve", "--config"])
            .arg(d.join("jitbroker.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("broker.log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let ops_addr = format!("127.0.0.1:{ops}");
        let mut ready = false;
        for _ in 0..150 {
            if readyz_says(&ops_addr, " 200 ").await {
                ready = true;
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if ready {
            broker = Some(child);
            break;
        }
        let _ = child.kill().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut broker = broker.unwrap_or_else(|| {
        panic!(
            "broker never became ready: {}",
            std::fs::read_to_string(d.join("broker.log")).unwrap_or_default()
        )
    });

    // The test agent's SVID, from the same Workload API.
    let mut svid = None;
    for _ in 0..100 {
        let c = spiffe::WorkloadApiClient::connect_to(format!("unix://{sock}"))
            .await
            .unwrap();
        if let Ok(s) = c.fetch_x509_context().await {
            svid = s
                .svids()
                .iter()
                .find(|s| s.spiffe_id().to_string().ends_with("/agent/test"))
                .cloned();
            if svid.is_some() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let svid = svid.expect("test agent SVID");
    let bundle = {
        let c = spiffe::WorkloadApiClient::connect_to(format!("unix://{sock}"))
            .await
            .unwrap();
        let ctx = c.fetch_x509_context().await.unwrap();
        let td = spiffe::TrustDomain::new(TD).unwrap();
        let b = ctx.bundle_set().get(&td).unwrap().clone();
        let (pem, _) = pem_of_certs(b.authorities());
        pem
    };
    let (chain, key) = pem_of(&svid);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{api}").parse().unwrap();
    let tls = tls_config(&bundle, Some((&chain, &key)));
    let ch = channel(addr, tls.clone())
        .await
        .expect("mTLS to the SPIRE-identified broker");
    let mut agent = Clients::new(ch.clone());
    let status = agent
        .admin
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.spiffe_id, format!("spiffe://{TD}/jitbroker"));
    assert_eq!(status.identity_source, "spire");

    // Full lifecycle.
    let t = agent.start(vec![grant("demo-token", "read")], 600).await;
    assert_eq!(t.spiffe_id, format!("spiffe://{TD}/agent/test"));
    let c = agent.issue(&t.task_id, "demo-token", 300).await;
    assert!(active(&mut agent, &c.secret, "demo-token").await);
    agent.complete(&t.task_id).await;
    assert!(!active(&mut agent, &c.secret, "demo-token").await);

    // JWT-SVIDs from the real agent: one for the broker's audience is an identity on its own (on
    // a channel without a client certificate); one for another audience is refused.
    let wl = spiffe::WorkloadApiClient::connect_to(format!("unix://{sock}"))
        .await
        .unwrap();
    let jwt = wl
        .fetch_jwt_svid(["jitbroker"], None)
        .await
        .expect("a JWT-SVID for the broker's audience");
    let wrong = wl
        .fetch_jwt_svid(["someone-else"], None)
        .await
        .expect("a JWT-SVID for another audience");
    let bare = channel(addr, tls_config(&bundle, None))
        .await
        .expect("TLS without a client certificate (JWT-SVIDs enabled)");
    let jt = authed(bare.clone(), format!("Bearer {}", jwt.token()))
        .start_task(start_req(vec![grant("demo-token", "read")], 60))
        .await
        .expect("the agent's JWT-SVID authenticates")
        .into_inner();
    assert_eq!(jt.spiffe_id, format!("spiffe://{TD}/agent/test"));
    let refused = authed(bare.clone(), format!("Bearer {}", wrong.token()))
        .start_task(start_req(vec![grant("demo-token", "read")], 60))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(refused.message().contains("audience"), "{refused:?}");
    let none = BrokerClient::new(bare)
        .start_task(start_req(vec![grant("demo-token", "read")], 60))
        .await
        .unwrap_err();
    assert_eq!(none.code(), tonic::Code::Unauthenticated);

    // Rotation: the broker's SVID lives 20 s; the agent renews it at half-life. New handshakes
    // must see a new certificate while the old channel keeps working.
    let first = server_cert_serial(addr, tls.clone()).await;
    let mut rotated = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        agent
            .broker
            .start_task(start_req(vec![grant("demo-token", "read")], 60))
            .await
            .expect("requests keep working across rotation");
        if server_cert_serial(addr, tls.clone()).await != first {
            rotated = true;
            break;
        }
    }
    assert!(rotated, "the broker's serving certificate did not rotate");
    let fresh = channel(addr, tls.clone()).await.unwrap();
    BrokerClient::new(fresh)
        .start_task(start_req(vec![grant("demo-token", "read")], 60))
        .await
        .unwrap();

    // Bundle rotation: SPIRE prepares a new X.509 authority (the bundle now carries both CAs),
    // then activates it. A client SVID signed by the new CA is accepted without a restart.
    bundle_rotation(&spire, addr, &bundle).await;

    // The agent goes away: requests keep working with the current SVID; readiness drops once
    // the source notices; it recovers when the agent returns.
    spire.stop_agent().await;
    agent
        .broker
        .start_task(start_req(vec![grant("demo-token", "read")], 60))
        .await
        .expect("serving without the agent");
    let ops_addr = format!("127.0.0.1:{ops}");
    let every = Duration::from_millis(200);
    let went_unready = poll_until(100, every, || readyz_says(&ops_addr, " 503 ")).await;
    assert!(went_unready, "readiness did not report the lost agent");
    agent
        .broker
        .start_task(start_req(vec![grant("demo-token", "read")], 60))
        .await
        .expect("still serving while not ready");
    spire.start_agent(None).await;
    let back = poll_until(150, every, || readyz_says(&ops_addr, " 200 ")).await;
    assert!(back, "readiness did not recover with the agent");
    drop((agent, ch));
    let _ = broker.kill().await;
    let _ = spire.port;
}

/// `spire-server localauthority x509 prepare` + `activate`, then an SVID minted by the new CA
/// must be accepted by the running broker (its bundle came from the Workload API).
async fn bundle_rotation(spire: &Spire, addr: std::net::SocketAddr, old_bundle: &str) {
    let srv = spire.server_sock().display().to_string();
    let out = spire
        .cli(
            "spire-server",
            &["localauthority", "x509", "prepare", "-socketPath", &srv],
        )
        .await;
    // "Prepared X.509 authority:\n  Authority ID: <hex>\n …"
    let id = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Authority ID:"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| panic!("no authority ID in: {out}"));
    spire
        .cli(
            "spire-server",
            &[
                "localauthority",
                "x509",
                "activate",
                "-authorityID",
                &id,
                "-socketPath",
                &srv,
            ],
        )
        .await;
    let mint_dir = tempfile::tempdir().unwrap();
    let md = mint_dir.path().display().to_string();
    spire
        .cli(
            "spire-server",
            &[
                "x509",
                "mint",
                "-spiffeID",
                &format!("spiffe://{TD}/agent/minted"),
                "-ttl",
                "10m",
                "-write",
                &md,
                "-socketPath",
                &srv,
            ],
        )
        .await;
    let read = |n: &str| std::fs::read_to_string(mint_dir.path().join(n)).unwrap();
    let (chain, key, new_bundle) = (read("svid.pem"), read("key.pem"), read("bundle.pem"));
    // The minted SVID is really from the new authority: no CA of the old bundle issued it.
    let leaf_aki = aki_of_first(&chain);
    for ca in pem_blocks(old_bundle) {
        assert_ne!(
            Some(leaf_aki.clone()),
            ski_of(&ca),
            "minted by an old authority"
        );
    }
    // The broker learns the new bundle from the agent asynchronously: retry, bounded.
    let tls = tls_config(&new_bundle, Some((&chain, &key)));
    let mut last = String::new();
    for _ in 0..60 {
        match channel(addr, tls.clone()).await {
            Ok(ch) => match BrokerClient::new(ch)
                .start_task(start_req(vec![grant("demo-token", "read")], 60))
                .await
            {
                Ok(t) => {
                    assert_eq!(
                        t.into_inner().spiffe_id,
                        format!("spiffe://{TD}/agent/minted")
                    );
                    return;
                }
                Err(e) => last = format!("{e:?}"),
            },
            Err(e) => last = format!("{e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("a client SVID from the new authority was never accepted: {last}");
}

fn pem_blocks(pem: &str) -> Vec<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap().as_ref().to_vec())
        .collect()
}

fn aki_of_first(pem: &str) -> Vec<u8> {
    let der = pem_blocks(pem).remove(0);
    let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
    c.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .expect("leaf has an authority key identifier")
}

fn ski_of(der: &[u8]) -> Option<Vec<u8>> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    c.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
}

fn pem_of_certs<'a>(certs: impl IntoIterator<Item = &'a spiffe::Certificate>) -> (String, usize) {
    use base64::Engine;
    let mut out = String::new();
    let mut n = 0;
    for c in certs {
        let body = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        out.push_str(&format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            lines.join("\n")
        ));
        n += 1;
    }
    (out, n)
}
