//! The OAuth surface from outside (docs/oauth.md): a token from the token endpoint for a
//! JWT-SVID, introspection by the resource's verifier, and its end with the task; and an
//! independent verifier, OpenBao's JWT auth method, that trusts the broker through OpenID
//! discovery alone and refuses expired and foreign-audience tokens. The independent-client
//! conformance suite is Python (tests/oauth, scripts/test-oauth.sh).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::envoy::https_to_host;
use common::tools::KillOnDrop;
use common::*;
use jitbroker::broker::clock::{Clock, ManualClock, SystemClock};

const RESOURCE: &str = "https://tickets.test/mcp";
const OTHER_RESOURCE: &str = "https://crm.test/api";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const GATEWAY: &str = "spiffe://jitbroker.dev/gateway/mcp";

const POLICY: &str = r#"
@id("agents-tickets")
permit(principal, action == Action::"tickets:read", resource == Resource::"tickets")
when { principal.path like "/agent/*" };
@id("agents-crm")
permit(principal, action == Action::"crm:read", resource == Resource::"crm")
when { principal.path like "/agent/*" };
"#;

/// A dev broker with the OAuth surface on `port`.
fn configure(dir: &Path, port: u16) -> jitbroker::config::Config {
    std::fs::write(dir.join("policy.cedar"), POLICY).unwrap();
    config(dir, |t| {
        let t = t.replace(
            "# jwt_audience = \"jitbroker\"",
            "jwt_audience = \"jitbroker\"",
        );
        format!(
            "{t}
[oauth]
listen = \"127.0.0.1:{port}\"
issuer = \"https://127.0.0.1:{port}\"
access_token_ttl_seconds = 300
token_exchange_actors = [\"{GATEWAY}\"]

[resources.tickets]
kind = \"jwt\"
actions = [\"tickets:read\"]
verifiers = [\"{TOOL}\"]
oauth_resource = \"{RESOURCE}\"

[resources.crm]
kind = \"jwt\"
actions = [\"crm:read\"]
verifiers = [\"{TOOL}\"]
oauth_resource = \"{OTHER_RESOURCE}\"
"
        )
    })
}

/// A dev dir with the OAuth surface on a free port: (dir, config, the OAuth listener's address,
/// the trust bundle to reach it with).
fn oauth_dev() -> (
    tempfile::TempDir,
    jitbroker::config::Config,
    SocketAddr,
    String,
) {
    let dir = dev_dir();
    let port = free_port();
    let cfg = configure(dir.path(), port);
    let (_, _, bundle) = mint(dir.path(), AGENT);
    (dir, cfg, SocketAddr::from(([127, 0, 0, 1], port)), bundle)
}

fn form(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// POSTs a form to the OAuth listener; the status and the JSON body.
async fn post(
    addr: SocketAddr,
    tls: rustls::ClientConfig,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let r = https_to_host(
        addr,
        tls,
        &addr.to_string(),
        "POST",
        path,
        &[("content-type", "application/x-www-form-urlencoded")],
        body,
    )
    .await
    .expect("OAuth request");
    let v = serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null);
    (r.status, v)
}

fn jwt_svid(dir: &Path, id: &str, aud: &str) -> String {
    jitbroker::identity::dev::ensure_dev_jwt_key(dir, "jitbroker.dev")
        .unwrap()
        .mint(id, aud, Duration::from_secs(300))
}

/// A token for `resource` from the jwt-bearer grant, for a new task.
async fn token_for(
    dir: &Path,
    addr: SocketAddr,
    bundle: &str,
    resource: &str,
) -> (u16, serde_json::Value) {
    let issuer = format!("https://{addr}");
    let assertion = jwt_svid(dir, AGENT, &format!("{issuer}/token"));
    post(
        addr,
        tls_config(bundle, None),
        "/token",
        &form(&[
            ("grant_type", JWT_BEARER),
            ("assertion", &assertion),
            ("resource", resource),
            ("purpose", "answer ticket 4711"),
        ]),
    )
    .await
}

#[tokio::test]
async fn token_endpoint_introspection_and_task_end() {
    let (dir, cfg, addr, bundle) = oauth_dev();
    let r = spawn_default(&cfg).await;

    // Discovery over HTTPS, without a client certificate.
    let meta = https_to_host(
        addr,
        tls_config(&bundle, None),
        &addr.to_string(),
        "GET",
        "/.well-known/oauth-authorization-server",
        &[],
        "",
    )
    .await
    .unwrap();
    assert_eq!(meta.status, 200, "{}", meta.body);
    let meta: serde_json::Value = serde_json::from_str(&meta.body).unwrap();
    assert_eq!(meta["issuer"], format!("https://{addr}"));
    assert_eq!(meta["token_endpoint"], format!("https://{addr}/token"));

    let (status, tok) = token_for(dir.path(), addr, &bundle, RESOURCE).await;
    assert_eq!(status, 200, "{tok}");
    assert_eq!(tok["token_type"], "Bearer");
    assert_eq!(tok["scope"], "tickets:read");
    let access = tok["access_token"].as_str().unwrap().to_owned();
    let task_id = tok["task_id"].as_str().unwrap().to_owned();

    // The resource's verifier introspects it over mutual TLS.
    let (chain, key, _) = mint(dir.path(), TOOL);
    let verifier = tls_config(&bundle, Some((&chain, &key)));
    let (status, intro) = post(
        addr,
        verifier.clone(),
        "/introspect",
        &form(&[("token", &access)]),
    )
    .await;
    assert_eq!(status, 200, "{intro}");
    assert_eq!(intro["active"], true);
    assert_eq!(intro["aud"], RESOURCE);
    assert_eq!(intro["sub"], AGENT);
    assert_eq!(intro["task_id"], task_id.as_str());
    // Anyone else learns nothing; nobody unauthenticated gets an answer.
    let (achain, akey, _) = mint(dir.path(), AGENT_B);
    let (_, other) = post(
        addr,
        tls_config(&bundle, Some((&achain, &akey))),
        "/introspect",
        &form(&[("token", &access)]),
    )
    .await;
    assert_eq!(other, serde_json::json!({"active": false}));
    let (status, anon) = post(
        addr,
        tls_config(&bundle, None),
        "/introspect",
        &form(&[("token", &access)]),
    )
    .await;
    assert_eq!(
        (status, anon["error"].as_str()),
        (401, Some("invalid_client"))
    );

    // A gateway exchanges it for a token acting on the agent's behalf (same grant, narrowed).
    let (gchain, gkey, _) = mint(dir.path(), GATEWAY);
    let (status, ex) = post(
        addr,
        tls_config(&bundle, Some((&gchain, &gkey))),
        "/token",
        &form(&[
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", &access),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:access_token",
            ),
            ("resource", RESOURCE),
        ]),
    )
    .await;
    assert_eq!(status, 200, "{ex}");
    let exchanged = ex["access_token"].as_str().unwrap().to_owned();
    let (_, intro) = post(
        addr,
        verifier.clone(),
        "/introspect",
        &form(&[("token", &exchanged)]),
    )
    .await;
    assert_eq!(intro["act"], serde_json::json!({"sub": GATEWAY}));
    assert_eq!(intro["client_id"], GATEWAY);

    // Completing the task ends the token at once.
    let mut agent = clients(&r, AGENT).await;
    agent.complete(&task_id).await;
    for t in [&access, &exchanged] {
        let (_, after) = post(
            addr,
            verifier.clone(),
            "/introspect",
            &form(&[("token", t)]),
        )
        .await;
        assert_eq!(after, serde_json::json!({"active": false}));
    }

    // Errors as the RFCs name them.
    let (status, e) = token_for(dir.path(), addr, &bundle, "https://nowhere.test/").await;
    assert_eq!((status, e["error"].as_str()), (400, Some("invalid_target")));
    let (status, e) = post(
        addr,
        tls_config(&bundle, None),
        "/token",
        &form(&[("grant_type", "password"), ("username", "x")]),
    )
    .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    r.stop().await;
}

/// The `bao` binary: JITBROKER_BAO, else the one scripts/openbao.sh installs.
fn bao_binary() -> Option<PathBuf> {
    let p = std::env::var_os("JITBROKER_BAO")
        .map(PathBuf::from)
        .or_else(|| common::tools::tools_cache("bao"))
        .filter(|p| p.is_file());
    if p.is_none() {
        assert!(
            std::env::var_os("JITBROKER_REQUIRE_OPENBAO").is_none(),
            "JITBROKER_REQUIRE_OPENBAO is set but no bao binary (scripts/openbao.sh install)"
        );
        eprintln!("skipping: no bao binary (scripts/openbao.sh install, or JITBROKER_BAO)");
    }
    p
}

struct Bao {
    _child: KillOnDrop,
    addr: String,
    bin: PathBuf,
    _home: tempfile::TempDir,
}

impl Bao {
    /// Runs `bao ARGS`; its stdout, or its stderr as the error.
    fn run(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.bin)
            .args(args)
            .env("BAO_ADDR", format!("http://{}", self.addr))
            .env("BAO_TOKEN", "root")
            .env("HOME", self._home.path())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

async fn start_bao(bin: PathBuf) -> Bao {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let home = tempfile::tempdir().unwrap();
    let child = Command::new(&bin)
        .args([
            "server",
            "-dev",
            "-dev-root-token-id=root",
            &format!("-dev-listen-address={addr}"),
        ])
        .env("HOME", home.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start bao");
    let bao = Bao {
        _child: KillOnDrop(child),
        addr,
        bin,
        _home: home,
    };
    let started = std::time::Instant::now();
    while bao.run(&["status"]).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "OpenBao did not come up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bao
}

// `bao` is run with blocking process calls while it fetches from the in-process broker: the
// broker needs worker threads of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_trusts_the_broker_through_discovery() {
    let Some(bin) = bao_binary() else { return };
    let (dir, cfg, addr, bundle) = oauth_dev();
    // The broker's clock starts two hours back: a token it issues then has expired on the real
    // clock OpenBao checks with, without the test waiting for anything.
    let clock = ManualClock::starting_at(SystemClock.now() - 2 * 3600 * 1000);
    let r = spawn_on(&cfg, &clock).await;

    let (status, old) = token_for(dir.path(), addr, &bundle, RESOURCE).await;
    assert_eq!(status, 200, "{old}");
    clock.advance(Duration::from_secs(2 * 3600));
    let (status, fresh) = token_for(dir.path(), addr, &bundle, RESOURCE).await;
    assert_eq!(status, 200, "{fresh}");
    let (status, foreign) = token_for(dir.path(), addr, &bundle, OTHER_RESOURCE).await;
    assert_eq!(status, 200, "{foreign}");

    let bao = start_bao(bin).await;
    let ca = dir.path().join("oauth-ca.pem");
    std::fs::write(&ca, &bundle).unwrap();
    bao.run(&["auth", "enable", "jwt"])
        .expect("enable jwt auth");
    bao.run(&[
        "write",
        "auth/jwt/config",
        &format!("oidc_discovery_url=https://{addr}"),
        &format!("oidc_discovery_ca_pem=@{}", ca.display()),
    ])
    .expect("OpenBao accepts the broker's discovery document");
    bao.run(&[
        "write",
        "auth/jwt/role/agents",
        "role_type=jwt",
        &format!("bound_audiences={RESOURCE}"),
        "user_claim=sub",
        "token_policies=default",
        // No grace beyond the token's own exp/nbf.
        "expiration_leeway=-1",
        "not_before_leeway=-1",
        "clock_skew_leeway=-1",
    ])
    .expect("role");
    let login = |t: &serde_json::Value| {
        bao.run(&[
            "write",
            "-format=json",
            "auth/jwt/login",
            "role=agents",
            &format!("jwt={}", t["access_token"].as_str().unwrap()),
        ])
    };
    let ok = login(&fresh).expect("a fresh token for the role's audience logs in");
    let ok: serde_json::Value = serde_json::from_str(&ok).unwrap();
    assert!(
        ok["auth"]["client_token"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{ok}"
    );
    assert_eq!(ok["auth"]["metadata"]["role"], "agents", "{ok}");
    let expired = login(&old).expect_err("an expired token is refused");
    assert!(expired.to_lowercase().contains("expired"), "{expired}");
    let aud = login(&foreign).expect_err("a token for another audience is refused");
    assert!(aud.to_lowercase().contains("aud"), "{aud}");
    drop(bao);
    r.stop().await;
}

#[tokio::test]
async fn the_oauth_port_meters_each_address() {
    let (_dir, mut cfg, addr, bundle) = oauth_dev();
    cfg.server.requests_per_remote_per_second = 5;
    // The broker's clock stands still: the bucket refills only when the test says so.
    let clock = ManualClock::new();
    let r = spawn_on(&cfg, &clock).await;
    // A burst of twice the rate passes, then unauthenticated junk is refused before it is read,
    // with the time to wait.
    let mut statuses = Vec::new();
    for _ in 0..14 {
        let (status, v) = post(addr, tls_config(&bundle, None), "/token", "garbage=1").await;
        statuses.push((status, v["error"].as_str().unwrap_or_default().to_owned()));
    }
    assert!(
        statuses[..10].iter().all(|(s, _)| *s == 400),
        "{statuses:?}"
    );
    assert!(
        statuses[10..]
            .iter()
            .all(|(s, e)| *s == 429 && e == "temporarily_unavailable"),
        "{statuses:?}"
    );
    clock.advance(Duration::from_secs(1));
    let (status, _) = post(addr, tls_config(&bundle, None), "/token", "garbage=1").await;
    assert_eq!(status, 400, "a second later the address is served again");
    r.stop().await;
}

/// A TLS connection to the OAuth port that sends nothing; how long until the broker closes it
/// (`None`: still open after `bound`).
async fn silent_connection_lasts(
    addr: SocketAddr,
    tls: rustls::ClientConfig,
    bound: Duration,
) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let Ok(mut s) = tls_over(tcp, http1(tls)).await else {
        // Refused at the handshake.
        return Some(Duration::ZERO);
    };
    let mut buf = [0u8; 64];
    match tokio::time::timeout(bound, s.read(&mut buf)).await {
        Ok(_) => Some(started.elapsed()),
        Err(_) => None,
    }
}

#[tokio::test]
async fn idle_and_piled_up_connections_are_closed() {
    let (_dir, mut cfg, addr, bundle) = oauth_dev();
    cfg.server.idle_timeout_ms = 1000;
    cfg.server.max_connections_per_remote = 2;
    let r = spawn_default(&cfg).await;
    // A connection that never asks anything is closed once idle (a bound, not a timing).
    let closed =
        silent_connection_lasts(addr, tls_config(&bundle, None), Duration::from_secs(20)).await;
    assert!(
        closed.is_some_and(|d| d > Duration::ZERO),
        "an idle OAuth connection stayed open (or was refused: {closed:?})"
    );
    // Two open connections from one address hold its quota; a third is refused at its
    // handshake, long before the idle close could end it.
    let open = |b: String| async move {
        tls_connect(addr, http1(tls_config(&b, None)))
            .await
            .expect("handshake")
    };
    let held = (open(bundle.clone()).await, open(bundle.clone()).await);
    let third =
        silent_connection_lasts(addr, tls_config(&bundle, None), Duration::from_millis(500)).await;
    assert_eq!(
        third,
        Some(Duration::ZERO),
        "a third connection from one address was kept"
    );
    drop(held);
    // Once they are gone, the address is served again.
    let (status, _) = post(addr, tls_config(&bundle, None), "/token", "x=1").await;
    assert_eq!(status, 400);
    r.stop().await;
}
