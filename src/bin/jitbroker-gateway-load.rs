//! Load for enforcement at the point of tool use (scripts/bench-gateway.sh drives it):
//!
//! ```text
//! jitbroker-gateway-load check --addr BROKER --data-dir D --agents N --seconds S [--rate R]
//! jitbroker-gateway-load http  --addr ENVOY --broker BROKER --data-dir D --agents N --seconds S [--rate R]
//! jitbroker-gateway-load oauth-token      --addr OAUTH --resource URI --data-dir D --agents N --seconds S [--rate R]
//! jitbroker-gateway-load oauth-introspect --addr OAUTH --resource URI --data-dir D --agents N --seconds S [--rate R]
//! jitbroker-gateway-load tool  --listen 127.0.0.1:PORT
//! jitbroker-gateway-load gateway-svid --data-dir D --out DIR
//! ```
//! `check` calls `envoy.service.auth.v3.Authorization/Check` directly over mTLS as the gateway
//! (one HTTP/2 channel per agent, one task per agent); `http` sends `GET /tickets/1` with the
//! task header through Envoy, one keep-alive HTTPS connection per agent presenting the agent's
//! SVID (without `--broker`, no task is started: for Envoy without the filter); `tool` serves
//! the upstream (200 "ok"); `gateway-svid` writes the gateway's SVID (serving as localhost) for
//! Envoy; `oauth-token` asks the OAuth token endpoint for a token per call (jwt-bearer with the
//! agent's JWT-SVID; one call in 16 starts a new task with `purpose`, the others name the agent's
//! current task) and `oauth-introspect` introspects an agent's token
//! as the resource's verifier, each over one keep-alive HTTPS connection. `http` also measures
//! nginx, Caddy or Traefik with forward auth. SVIDs come from the dev CA of the data directory. Latency is per call, reported as
//! p50/p90/p99/max with the number of calls and errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use jitbroker::api::pb;
use rustls::pki_types::ServerName;
use tonic::transport::Channel;

mod load_common;

const GATEWAY: &str = "spiffe://jitbroker.dev/gateway/bench";
const TASK_HEADER: &str = "x-jitbroker-task";

#[derive(Parser, Debug)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
struct Load {
    /// Where calls go: the broker (check) or Envoy's listener (http).
    #[arg(long)]
    addr: SocketAddr,
    /// The broker, to start each agent's task (http).
    #[arg(long)]
    broker: Option<SocketAddr>,
    #[arg(long, default_value = "jitbroker-dev")]
    data_dir: PathBuf,
    #[arg(long, default_value_t = 8)]
    agents: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Calls per second across all agents, evenly spread; 0 = as fast as answered.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
}

#[derive(clap::Args, Debug, Clone)]
struct OAuthLoad {
    #[command(flatten)]
    load: Load,
    /// The RFC 8707 resource indicator to ask tokens for.
    #[arg(long)]
    resource: String,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    Check(Load),
    Http(Load),
    /// Token endpoint: jwt-bearer grants with each agent's JWT-SVID, one task per agent.
    OauthToken(OAuthLoad),
    /// Introspection by the resource's verifier (mTLS) of one token per agent.
    OauthIntrospect(OAuthLoad),
    Tool {
        #[arg(long)]
        listen: SocketAddr,
    },
    GatewaySvid {
        #[arg(long, default_value = "jitbroker-dev")]
        data_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

struct Svid {
    chain: String,
    key: String,
    bundle: String,
}

fn mint(data_dir: &Path, id: &str, dns: &[String]) -> Svid {
    let ca = jitbroker::identity::dev::ensure_dev_ca(data_dir, "jitbroker.dev").expect("dev CA");
    let s = ca
        .mint_svid(id, dns, &[], Duration::from_secs(3600))
        .expect("mint SVID");
    Svid {
        chain: s.cert_chain_pem.clone(),
        key: s.key_pem.to_string(),
        bundle: s.bundle_pem.clone(),
    }
}

fn tls(s: &Svid, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    Arc::new(load_common::client_tls(&s.bundle, &s.chain, &s.key, alpn))
}

async fn grpc(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Channel {
    load_common::grpc_channel(addr, tls).await.expect("connect")
}

async fn start_task(broker: SocketAddr, s: &Svid) -> String {
    let mut c = pb::broker_client::BrokerClient::new(grpc(broker, tls(s, b"h2")).await);
    c.start_task(pb::StartTaskRequest {
        purpose: "gateway benchmark".into(),
        grants: vec![pb::Grant {
            resource: "tickets".into(),
            action: "read".into(),
        }],
        ttl_seconds: 3600,
        ..Default::default()
    })
    .await
    .expect("start task")
    .into_inner()
    .task_id
}

/// Waits for the next evenly spread slot of agent `n`.
struct Pace(Option<(tokio::time::Instant, Duration)>);

impl Pace {
    fn new(rate: f64, n: usize, agents: usize, start: Instant) -> Self {
        if rate <= 0.0 {
            return Self(None);
        }
        let period = Duration::from_secs_f64(agents as f64 / rate);
        let t0 = tokio::time::Instant::from_std(start) + period.mul_f64(n as f64 / agents as f64);
        Self(Some((t0, period)))
    }
    async fn wait(&mut self) {
        if let Some((next, period)) = &mut self.0 {
            tokio::time::sleep_until(*next).await;
            *next += *period;
        }
    }
}

async fn check_agent(l: Load, n: usize, start: Instant) -> (Vec<u64>, u64) {
    let agent_id = format!("spiffe://jitbroker.dev/agent/bench-{n}");
    let agent = mint(&l.data_dir, &agent_id, &[]);
    let task = start_task(l.addr, &agent).await;
    let gw = mint(&l.data_dir, GATEWAY, &[]);
    let mut client = AuthorizationClient::new(grpc(l.addr, tls(&gw, b"h2")).await);
    let req = CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                principal: agent_id,
                ..Default::default()
            }),
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    host: "tickets.internal".into(),
                    path: "/tickets/1".into(),
                    headers: [(TASK_HEADER.to_owned(), task)].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let (mut lat, mut errors) = (Vec::new(), 0u64);
    let mut pace = Pace::new(l.rate, n, l.agents, start);
    let deadline = Duration::from_secs(l.seconds);
    while start.elapsed() < deadline {
        pace.wait().await;
        let t = Instant::now();
        let ok = client.check(req.clone()).await.is_ok_and(|r| {
            matches!(
                r.into_inner().http_response,
                Some(HttpResponse::OkResponse(_))
            )
        });
        lat.push(t.elapsed().as_micros() as u64);
        errors += u64::from(!ok);
    }
    (lat, errors)
}

async fn http_agent(l: Load, n: usize, start: Instant) -> (Vec<u64>, u64) {
    let agent_id = format!("spiffe://jitbroker.dev/agent/bench-{n}");
    let agent = mint(&l.data_dir, &agent_id, &[]);
    let task = match l.broker {
        Some(b) => Some(start_task(b, &agent).await),
        None => None,
    };
    let connector = tokio_rustls::TlsConnector::from(tls(&agent, b"http/1.1"));
    let tcp = tokio::net::TcpStream::connect(l.addr)
        .await
        .expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let stream = connector
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS to envoy");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http1");
    tokio::spawn(conn);
    let (mut lat, mut errors) = (Vec::new(), 0u64);
    let mut pace = Pace::new(l.rate, n, l.agents, start);
    let deadline = Duration::from_secs(l.seconds);
    while start.elapsed() < deadline {
        pace.wait().await;
        let mut b = hyper::Request::get("/tickets/1").header("host", "tickets.internal");
        if let Some(t) = &task {
            b = b.header(TASK_HEADER, t.as_str());
        }
        let req = b.body(Empty::<Bytes>::new()).expect("request");
        let t = Instant::now();
        let ok = match send.send_request(req).await {
            Ok(r) => {
                let status = r.status();
                let _ = r.into_body().collect().await;
                status == 200
            }
            Err(_) => false,
        };
        lat.push(t.elapsed().as_micros() as u64);
        errors += u64::from(!ok);
        if !ok && send.ready().await.is_err() {
            break;
        }
    }
    (lat, errors)
}

const VERIFIER: &str = "spiffe://jitbroker.dev/tool/demo";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Tokens asked for on one task before the agent starts another.
const TOKENS_PER_TASK: u64 = 16;

/// A keep-alive HTTP/1.1 connection over TLS presenting `svid`.
async fn https_conn(
    addr: SocketAddr,
    svid: &Svid,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>> {
    let connector = tokio_rustls::TlsConnector::from(tls(svid, b"http/1.1"));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let stream = connector
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http1");
    tokio::spawn(conn);
    send
}

/// POSTs a form; the status and the JSON answer.
async fn post_form(
    send: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
    addr: SocketAddr,
    path: &str,
    form: &[(&str, &str)],
) -> Option<(u16, serde_json::Value)> {
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let req = hyper::Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(http_body_util::Full::new(Bytes::from(body)))
        .expect("request");
    send.ready().await.ok()?;
    let r = send.send_request(req).await.ok()?;
    let status = r.status().as_u16();
    let bytes = r.into_body().collect().await.ok()?.to_bytes();
    Some((status, serde_json::from_slice(&bytes).unwrap_or_default()))
}

/// The agent's first token (starting its task): its task id and access token.
async fn first_token(
    o: &OAuthLoad,
    send: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
    assertion: &str,
) -> (String, String) {
    let (status, v) = post_form(
        send,
        o.load.addr,
        "/token",
        &[
            ("grant_type", JWT_BEARER),
            ("assertion", assertion),
            ("resource", &o.resource),
            ("purpose", "OAuth benchmark"),
        ],
    )
    .await
    .expect("first token");
    assert_eq!(status, 200, "first token: {v}");
    (
        v["task_id"].as_str().unwrap_or_default().to_owned(),
        v["access_token"].as_str().unwrap_or_default().to_owned(),
    )
}

fn assertion_for(o: &OAuthLoad, agent_id: &str) -> String {
    jitbroker::identity::dev::ensure_dev_jwt_key(&o.load.data_dir, "jitbroker.dev")
        .expect("dev JWT key")
        .mint(
            agent_id,
            &format!("https://{}/token", o.load.addr),
            Duration::from_secs(3600),
        )
}

async fn oauth_token_agent(o: OAuthLoad, n: usize, start: Instant) -> (Vec<u64>, u64) {
    let agent_id = format!("spiffe://jitbroker.dev/agent/bench-{n}");
    let agent = mint(&o.load.data_dir, &agent_id, &[]);
    let assertion = assertion_for(&o, &agent_id);
    let mut send = https_conn(o.load.addr, &agent).await;
    let (mut task, _) = first_token(&o, &mut send, &assertion).await;
    let (mut lat, mut errors) = (Vec::new(), 0u64);
    let mut pace = Pace::new(o.load.rate, n, o.load.agents, start);
    let deadline = Duration::from_secs(o.load.seconds);
    let mut i = 0u64;
    while start.elapsed() < deadline {
        pace.wait().await;
        i += 1;
        // Every TOKENS_PER_TASK-th token starts a new task (`purpose`), the others name the
        // agent's current one (`task_id`).
        let fresh = i.is_multiple_of(TOKENS_PER_TASK);
        let which = if fresh {
            ("purpose", "OAuth benchmark")
        } else {
            ("task_id", task.as_str())
        };
        let t = Instant::now();
        let answer = post_form(
            &mut send,
            o.load.addr,
            "/token",
            &[
                ("grant_type", JWT_BEARER),
                ("assertion", &assertion),
                ("resource", &o.resource),
                which,
            ],
        )
        .await;
        let ok = match answer {
            Some((200, v)) => {
                if fresh {
                    task = v["task_id"].as_str().unwrap_or_default().to_owned();
                }
                true
            }
            _ => false,
        };
        lat.push(t.elapsed().as_micros() as u64);
        errors += u64::from(!ok);
    }
    (lat, errors)
}

async fn oauth_introspect_agent(o: OAuthLoad, n: usize, start: Instant) -> (Vec<u64>, u64) {
    let agent_id = format!("spiffe://jitbroker.dev/agent/bench-{n}");
    let agent = mint(&o.load.data_dir, &agent_id, &[]);
    let assertion = assertion_for(&o, &agent_id);
    let mut a = https_conn(o.load.addr, &agent).await;
    let (_, token) = first_token(&o, &mut a, &assertion).await;
    let verifier = mint(&o.load.data_dir, VERIFIER, &[]);
    let mut send = https_conn(o.load.addr, &verifier).await;
    let (mut lat, mut errors) = (Vec::new(), 0u64);
    let mut pace = Pace::new(o.load.rate, n, o.load.agents, start);
    let deadline = Duration::from_secs(o.load.seconds);
    while start.elapsed() < deadline {
        pace.wait().await;
        let t = Instant::now();
        let ok = post_form(&mut send, o.load.addr, "/introspect", &[("token", &token)])
            .await
            .is_some_and(|(s, v)| s == 200 && v["active"] == true);
        lat.push(t.elapsed().as_micros() as u64);
        errors += u64::from(!ok);
    }
    (lat, errors)
}

fn report(what: &str, l: &Load, mut lat: Vec<u64>, errors: u64, secs: f64) {
    lat.sort_unstable();
    let q = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |v| *v as f64 / 1000.0)
    };
    println!(
        "{what}: agents={} rate={} calls={} errors={errors} throughput={:.0}/s p50={:.3}ms p90={:.3}ms p99={:.3}ms max={:.3}ms",
        l.agents,
        if l.rate > 0.0 {
            format!("{}/s", l.rate)
        } else {
            "max".into()
        },
        lat.len(),
        lat.len() as f64 / secs,
        q(0.50),
        q(0.90),
        q(0.99),
        lat.last().map_or(0.0, |v| *v as f64 / 1000.0),
    );
}

async fn run<F, Fut>(what: &str, l: Load, f: F)
where
    F: Fn(Load, usize, Instant) -> Fut,
    Fut: std::future::Future<Output = (Vec<u64>, u64)> + Send + 'static,
{
    // Connections and tasks are set up before the clock starts for everyone.
    let start = Instant::now() + Duration::from_millis(500);
    let mut handles = Vec::new();
    for n in 0..l.agents {
        handles.push(tokio::spawn(f(l.clone(), n, start)));
    }
    let (mut lat, mut errors) = (Vec::new(), 0);
    for h in handles {
        let (l, e) = h.await.expect("agent");
        lat.extend(l);
        errors += e;
    }
    report(what, &l, lat, errors, l.seconds as f64);
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match args.cmd {
        Cmd::Check(l) => run("check", l, check_agent).await,
        Cmd::Http(l) => run("http", l, http_agent).await,
        Cmd::OauthToken(o) => {
            let l = o.load.clone();
            run("oauth-token", l, move |_, n, start| {
                oauth_token_agent(o.clone(), n, start)
            })
            .await
        }
        Cmd::OauthIntrospect(o) => {
            let l = o.load.clone();
            run("oauth-introspect", l, move |_, n, start| {
                oauth_introspect_agent(o.clone(), n, start)
            })
            .await
        }
        Cmd::Tool { listen } => {
            let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
            let app = axum::Router::new().fallback(|| async { "ok" });
            axum::serve(listener, app).await.expect("serve");
        }
        Cmd::GatewaySvid { data_dir, out } => {
            let s = mint(&data_dir, GATEWAY, &["localhost".into()]);
            std::fs::create_dir_all(&out).expect("out dir");
            std::fs::write(out.join("svid.pem"), s.chain).expect("write");
            std::fs::write(out.join("svid.key"), s.key).expect("write");
            std::fs::write(out.join("bundle.pem"), s.bundle).expect("write");
        }
    }
}
