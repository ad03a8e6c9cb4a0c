//! Load generator: N concurrent agents over persistent mTLS channels play the task flow
//! `StartTask → k × IssueCredential(token) → Introspect (by a tool) → CompleteTask` against a
//! running broker, or the no-op floor (`grpc.health.v1.Health/Check` over the same kind of
//! channel: what tonic + rustls cost with no work at all).
//!
//! ```text
//! jitbroker-load --addr 127.0.0.1:8443 --data-dir jitbroker-dev --agents 16 --k 4 --seconds 20 [--pid PID] [--noop]
//! ```
//! SVIDs are minted from the dev CA of `--data-dir`. With `--pid` of the broker it also reports
//! the broker's CPU seconds per 1000 operations, its peak RSS, and the size of the store.
//!
//! Several addresses (`--addr A --addr B` or `--addr A,B`) are replicas of one broker on a shared
//! database: agent i works with replica i mod n, over a channel to every replica made before the
//! clock starts. A call that fails with `UNAVAILABLE`, or on its connection (no status from a
//! server), is sent once more, unchanged, to the next replica, which the agent keeps from then
//! on; StartTask and IssueCredential carry idempotency keys then (`--idempotency-keys` sends them
//! with one address too), so a call sent twice makes one task or credential. The report adds
//! `replicas=n` and a `retries:` line; with `--pid` of each replica the CPU figure is their sum
//! and the peak RSS the largest.
//!
//! `--target openbao --addr 127.0.0.1:8200 --server-ca CA.pem` plays the same flow against
//! OpenBao over HTTP/2 + TLS, one persistent connection per agent presenting the agent's SVID:
//! cert-auth login (`POST /v1/auth/cert/login`, role `agent`; = StartTask) → k × child token
//! with a TTL (`POST /v1/auth/token/create`; = IssueCredential) → lookup of the last child by the
//! tool's token (`POST /v1/auth/token/lookup`, tool logged in once with role `tool`; =
//! Introspect) → `POST /v1/auth/token/revoke-self` with the login token, which revokes its
//! children (= CompleteTask). With `--bao-creds database/creds/ROLE` each issuance reads a
//! database credential instead (a real role, leased to the login token), the tool looks the
//! lease up, and revoke-self revokes the leases with the token. The no-op floor is
//! `GET /v1/sys/health`. OpenBao must have cert auth at `auth/cert` with roles `agent` and `tool` trusting the dev CA (scripts/bench.sh sets
//! this up).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jitbroker::api::pb;
use rustls::pki_types::ServerName;
use tonic::transport::Channel;

mod load_common;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    Jitbroker,
    Openbao,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Arrivals {
    Poisson,
    Even,
}

/// When a paced agent starts its next task. A start that is already late happens at once
/// (nothing is skipped), as with a queue of arrivals.
struct Pacer {
    next: tokio::time::Instant,
    period: Duration,
    arrivals: Arrivals,
}

impl Pacer {
    fn new(arrivals: Arrivals, period: Duration, start: Instant, n: usize, agents: usize) -> Self {
        let t0 = tokio::time::Instant::from_std(start);
        let mut p = Pacer {
            next: t0,
            period,
            arrivals,
        };
        p.next = match arrivals {
            Arrivals::Even => t0 + period * n as u32 / agents.max(1) as u32,
            Arrivals::Poisson => t0 + p.gap(),
        };
        p
    }

    fn gap(&self) -> Duration {
        match self.arrivals {
            Arrivals::Even => self.period,
            // Exponential with mean `period`: -ln(1 - U), U uniform in [0, 1).
            Arrivals::Poisson => self.period.mul_f64(-(1.0 - rand::random::<f64>()).ln()),
        }
    }

    async fn wait(&mut self) {
        tokio::time::sleep_until(self.next).await;
        self.next += self.gap();
    }
}

#[derive(Parser, Debug)]
struct Args {
    /// What to load: the broker's gRPC API, or OpenBao's HTTP API.
    #[arg(long, value_enum, default_value_t = Target::Jitbroker)]
    target: Target,
    /// The server's address. For the broker, several (repeated or comma-separated) are its
    /// replicas on one database: agent i uses replica i mod n, and a call failing with
    /// UNAVAILABLE or on its connection is sent once more to the next replica.
    #[arg(long, default_value = "127.0.0.1:8443", value_delimiter = ',')]
    addr: Vec<SocketAddr>,
    /// PEM of the CA that signed the server's certificate (openbao target; the broker's own
    /// bundle is used otherwise).
    #[arg(long)]
    server_ca: Option<PathBuf>,
    /// Directory whose size is reported as the store's (default: DATA_DIR/db).
    #[arg(long)]
    store_dir: Option<PathBuf>,
    #[arg(long, default_value = "jitbroker-dev")]
    data_dir: PathBuf,
    #[arg(long, default_value_t = 16)]
    agents: usize,
    /// Credentials per task.
    #[arg(long, default_value_t = 4)]
    k: usize,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// The server's process id, for CPU and memory figures; several (repeated or
    /// comma-separated, one per replica) add their CPU and report the largest peak RSS.
    #[arg(long, value_delimiter = ',')]
    pid: Vec<u32>,
    /// Send idempotency keys with StartTask and IssueCredential (always with several --addr,
    /// where a call may be sent twice).
    #[arg(long)]
    idempotency_keys: bool,
    /// Measure the no-op floor instead of the task flow.
    #[arg(long)]
    noop: bool,
    /// The resource the flow issues credentials for (its kind decides what is made: a
    /// `postgres` resource makes real roles). The tool must be one of its verifiers.
    #[arg(long, default_value = "demo-token")]
    resource: String,
    /// Instead of a load: write this many live credentials straight into the (stopped) store of
    /// --data-dir, 16 per task, and exit. For restart and reaper-storm measurements.
    #[arg(long)]
    prefill: Option<u64>,
    /// Pace the flow to this many issuances per second across all agents (task starts spread
    /// as --arrivals says); 0 runs as fast as the server answers. For latency at a
    /// given load, e.g. half of the peak rate.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// openbao target: issue by reading this secrets path (e.g. `database/creds/orders`: a
    /// database role per read, leased to the task's login token) instead of creating child
    /// tokens; the tool looks the last lease up (`PUT /v1/sys/leases/lookup`) and revoke-self
    /// ends the login token with its leases.
    #[arg(long)]
    bao_creds: Option<String>,
    /// With --rate: how task starts are spread. `poisson`: each agent's starts are a Poisson
    /// process (exponential gaps with the period as mean), so the whole load is one, with the
    /// random bunching of independent clients; `even`: agent n starts every period, n/N of a
    /// period after agent 0.
    #[arg(long, value_enum, default_value_t = Arrivals::Poisson)]
    arrivals: Arrivals,
    /// With --prefill: the credentials' lifetime from now, in seconds.
    #[arg(long, default_value_t = 3600)]
    prefill_ttl_seconds: u64,
    /// With --prefill: write into the store this configuration names (e.g. its PostgreSQL
    /// database, `[store] engine = "postgres"`), through units of work (one per task), instead
    /// of the sled store of --data-dir.
    #[arg(long)]
    store_config: Option<PathBuf>,
}

fn tls(roots_pem: &str, chain: &str, key: &str) -> rustls::ClientConfig {
    load_common::client_tls(roots_pem, chain, key, b"h2")
}

async fn channel(addr: SocketAddr, cfg: rustls::ClientConfig) -> Channel {
    load_common::grpc_channel(addr, Arc::new(cfg))
        .await
        .expect("connect to the broker")
}

/// TLS client config presenting a fresh SVID for `id` from the dev CA of `--data-dir`.
fn identity_tls(args: &Args, id: &str) -> rustls::ClientConfig {
    let ca =
        jitbroker::identity::dev::ensure_dev_ca(&args.data_dir, "jitbroker.dev").expect("dev CA");
    let svid = ca
        .mint_svid(id, &[], &[], Duration::from_secs(3600))
        .expect("mint");
    let roots = match &args.server_ca {
        Some(p) => std::fs::read_to_string(p).expect("read --server-ca"),
        None => svid.bundle_pem.clone(),
    };
    tls(&roots, &svid.cert_chain_pem, &svid.key_pem)
}

/// Channels for `id`, one to each broker replica of `--addr`, in order.
async fn identity_channels(args: &Args, id: &str) -> Vec<Channel> {
    let cfg = identity_tls(args, id);
    let mut out = Vec::new();
    for addr in &args.addr {
        out.push(channel(*addr, cfg.clone()).await);
    }
    out
}

/// One agent's clients of one replica.
#[derive(Clone)]
struct Replica {
    broker: pb::broker_client::BrokerClient<Channel>,
    verifier: pb::verifier_client::VerifierClient<Channel>,
    health: tonic_health::pb::health_client::HealthClient<Channel>,
}

/// One agent's way to the broker: its calls go to replica `home`; with several replicas, a
/// call that fails with UNAVAILABLE or on its connection is sent once more to the next one,
/// which becomes `home`.
struct Route {
    replicas: Vec<Replica>,
    home: usize,
    retries: u64,
}

/// Whether a failed call may go to another replica: the server answered UNAVAILABLE, or no
/// server answered (the status is the client's own, made from a transport error: connection
/// refused, reset or closed mid-call). Statuses sent by a server carry no source.
fn retriable(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable || std::error::Error::source(s).is_some()
}

impl Route {
    /// Makes the call `f` with `req` on the home replica (and once more on the next one, as
    /// above, with a copy of `req` kept only when there is a next one); panics with `what` on
    /// a failure that is not retried or on a second failure.
    async fn call<Q: Clone, T>(
        &mut self,
        what: &str,
        req: Q,
        f: impl AsyncFn(&mut Replica, Q) -> Result<tonic::Response<T>, tonic::Status>,
    ) -> T {
        let again = (self.replicas.len() > 1).then(|| req.clone());
        let r = match (f(&mut self.replicas[self.home], req).await, again) {
            (Err(s), Some(req)) if retriable(&s) => {
                self.home = (self.home + 1) % self.replicas.len();
                self.retries += 1;
                f(&mut self.replicas[self.home], req).await
            }
            (r, _) => r,
        };
        r.unwrap_or_else(|e| panic!("{what}: {e:?}")).into_inner()
    }
}

/// What one agent did: its issuance (or no-op) latencies in µs, its calls, and the calls it
/// sent a second time.
#[derive(Default)]
struct Tally {
    lat: Vec<u64>,
    ops: u64,
    retries: u64,
}

/// One persistent HTTP/2 connection to OpenBao.
#[derive(Clone)]
struct Bao {
    send: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    base: String,
}

impl Bao {
    async fn connect(addr: SocketAddr, cfg: rustls::ClientConfig) -> Bao {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to OpenBao");
        tcp.set_nodelay(true).expect("nodelay");
        let s = connector
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
            .expect("TLS to OpenBao");
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .expect("HTTP/2 handshake with OpenBao");
        tokio::spawn(conn);
        Bao {
            send,
            base: format!("https://localhost:{}", addr.port()),
        }
    }

    /// One call; panics on anything but 2xx. Returns the JSON body (Null when empty).
    async fn call(
        &mut self,
        method: hyper::Method,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("x-vault-token", t);
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Bytes::from(serde_json::to_vec(&b).expect("json"))
            }
            None => Bytes::new(),
        };
        self.send.ready().await.expect("OpenBao connection");
        let resp = self
            .send
            .send_request(req.body(Full::new(body)).expect("request"))
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .expect("response body")
            .to_bytes();
        assert!(
            status.is_success(),
            "{path}: {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
        if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON response")
        }
    }

    /// Cert-auth login with the connection's client certificate; returns the client token.
    async fn login(&mut self, role: &str) -> String {
        let r = self
            .call(
                hyper::Method::POST,
                "/v1/auth/cert/login",
                None,
                Some(serde_json::json!({ "name": role })),
            )
            .await;
        r["auth"]["client_token"]
            .as_str()
            .expect("auth.client_token")
            .to_string()
    }
}

/// What each OpenBao agent does: k issuances per task (child tokens, or reads of `creds`), or
/// the no-op floor.
#[derive(Clone)]
struct BaoWork {
    k: usize,
    noop: bool,
    creds: Option<Arc<String>>,
}

/// One agent's OpenBao loop.
async fn openbao_agent(
    mut conn: Bao,
    mut tool: Bao,
    tool_token: Arc<String>,
    work: BaoWork,
    start: Instant,
    deadline: Duration,
) -> Tally {
    use hyper::Method;
    let BaoWork { k, noop, creds } = work;
    let mut lat = Vec::new();
    let mut ops = 0u64;
    while start.elapsed() < deadline {
        if noop {
            let t = Instant::now();
            conn.call(Method::GET, "/v1/sys/health", None, None).await;
            lat.push(t.elapsed().as_micros() as u64);
            ops += 1;
            continue;
        }
        let task_token = conn.login("agent").await;
        let mut last = String::new();
        for _ in 0..k {
            let t = Instant::now();
            last = match &creds {
                Some(path) => {
                    let c = conn
                        .call(Method::GET, &format!("/v1/{path}"), Some(&task_token), None)
                        .await;
                    c["lease_id"].as_str().expect("lease_id").to_string()
                }
                None => {
                    let c = conn
                        .call(
                            Method::POST,
                            "/v1/auth/token/create",
                            Some(&task_token),
                            Some(serde_json::json!({
                                "ttl": "120s",
                                "policies": ["demo-token"],
                                "display_name": "load",
                            })),
                        )
                        .await;
                    c["auth"]["client_token"]
                        .as_str()
                        .expect("child client_token")
                        .to_string()
                }
            };
            lat.push(t.elapsed().as_micros() as u64);
        }
        let (path, body) = match creds {
            Some(_) => (
                "/v1/sys/leases/lookup",
                serde_json::json!({ "lease_id": last }),
            ),
            None => (
                "/v1/auth/token/lookup",
                serde_json::json!({ "token": last }),
            ),
        };
        let i = tool
            .call(Method::PUT, path, Some(&tool_token), Some(body))
            .await;
        assert!(
            i["data"]["ttl"].as_i64().unwrap_or(0) > 0,
            "lookup: {last} not live"
        );
        conn.call(
            Method::POST,
            "/v1/auth/token/revoke-self",
            Some(&task_token),
            None,
        )
        .await;
        ops += k as u64 + 3;
    }
    Tally {
        lat,
        ops,
        retries: 0,
    }
}

fn proc_stat(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some((ticks / 100.0, hwm * 1024))
}

/// CPU seconds summed over `pids` and the largest peak RSS among them; None without pids or
/// when one is gone.
fn procs_stat(pids: &[u32]) -> Option<(f64, u64)> {
    let mut out: Option<(f64, u64)> = None;
    for &pid in pids {
        let (cpu, rss) = proc_stat(pid)?;
        let (c, r) = out.unwrap_or_default();
        out = Some((c + cpu, r.max(rss)));
    }
    out
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            total += if path.is_dir() {
                dir_bytes(&path)
            } else {
                e.metadata().map(|m| m.len()).unwrap_or(0)
            };
        }
    }
    total
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Some(n) = args.prefill {
        prefill(&args, n).await;
        return;
    }
    let deadline = Duration::from_secs(args.seconds);
    // Connections (TLS handshakes, the tool's login) are made before the clock and the server's
    // CPU counter start.
    let mut handles = Vec::new();
    if args.target == Target::Openbao {
        let &[addr] = args.addr.as_slice() else {
            eprintln!("--target openbao takes one --addr");
            std::process::exit(2);
        };
        let mut tool = Bao::connect(
            addr,
            identity_tls(&args, "spiffe://jitbroker.dev/tool/demo"),
        )
        .await;
        let tool_token = Arc::new(tool.login("tool").await);
        let mut conns = Vec::new();
        for a in 0..args.agents {
            let id = format!("spiffe://jitbroker.dev/agent/load-{a}");
            conns.push(Bao::connect(addr, identity_tls(&args, &id)).await);
        }
        let before = procs_stat(&args.pid);
        let start = Instant::now();
        for conn in conns {
            handles.push(tokio::spawn(openbao_agent(
                conn,
                tool.clone(),
                tool_token.clone(),
                BaoWork {
                    k: args.k,
                    noop: args.noop,
                    creds: args.bao_creds.clone().map(Arc::new),
                },
                start,
                deadline,
            )));
        }
        report(&args, handles, start, before).await;
        return;
    }
    let tools = identity_channels(&args, "spiffe://jitbroker.dev/tool/demo").await;
    let mut routes = Vec::new();
    for a in 0..args.agents {
        let chans =
            identity_channels(&args, &format!("spiffe://jitbroker.dev/agent/load-{a}")).await;
        let replicas = chans
            .into_iter()
            .zip(&tools)
            .map(|(ch, tool)| Replica {
                broker: pb::broker_client::BrokerClient::new(ch.clone()),
                verifier: pb::verifier_client::VerifierClient::new(tool.clone()),
                health: tonic_health::pb::health_client::HealthClient::new(ch),
            })
            .collect::<Vec<_>>();
        routes.push(Route {
            home: a % replicas.len(),
            replicas,
            retries: 0,
        });
    }
    // A run's keys: unique across runs on the same store (a StartTask key is per owner, and the
    // agents' identities are the same every run); an IssueCredential key is per task.
    let run_key = (args.idempotency_keys || args.addr.len() > 1)
        .then(|| format!("{:016x}", rand::random::<u64>()));
    let before = procs_stat(&args.pid);
    let start = Instant::now();
    let agents = routes.len();
    // One task (k issuances) per agent every `period` on average when paced.
    let period = (args.rate > 0.0)
        .then(|| Duration::from_secs_f64(agents as f64 * args.k as f64 / args.rate));
    for (n, mut route) in routes.into_iter().enumerate() {
        let (k, noop) = (args.k, args.noop);
        let resource = args.resource.clone();
        let arrivals = args.arrivals;
        let run_key = run_key.clone();
        handles.push(tokio::spawn(async move {
            let mut pace = period.map(|p| Pacer::new(arrivals, p, start, n, agents));
            let mut lat_issue = Vec::new();
            let mut ops = 0u64;
            let mut seq = 0u64;
            while start.elapsed() < deadline {
                if noop {
                    let t = Instant::now();
                    route
                        .call(
                            "health",
                            tonic_health::pb::HealthCheckRequest::default(),
                            async |r, q| r.health.check(q).await,
                        )
                        .await;
                    lat_issue.push(t.elapsed().as_micros() as u64);
                    ops += 1;
                    continue;
                }
                if let Some(p) = pace.as_mut() {
                    p.wait().await;
                    if start.elapsed() >= deadline {
                        break;
                    }
                }
                seq += 1;
                let start_req = pb::StartTaskRequest {
                    purpose: "load".into(),
                    grants: vec![pb::Grant {
                        resource: resource.clone(),
                        action: "read".into(),
                    }],
                    ttl_seconds: 300,
                    idempotency_key: run_key
                        .as_ref()
                        .map(|r| format!("{r}-{seq}"))
                        .unwrap_or_default(),
                    ..Default::default()
                };
                let task = route
                    .call("start", start_req, async |r, q| {
                        r.broker.start_task(q).await
                    })
                    .await;
                let mut last = String::new();
                for i in 0..k {
                    let t = Instant::now();
                    let req = pb::IssueCredentialRequest {
                        task_id: task.task_id.clone(),
                        resource: resource.clone(),
                        action: "read".into(),
                        ttl_seconds: 120,
                        idempotency_key: match run_key {
                            Some(_) => i.to_string(),
                            None => String::new(),
                        },
                    };
                    let c = route
                        .call("issue", req, async |r, q| {
                            r.broker.issue_credential(q).await
                        })
                        .await;
                    lat_issue.push(t.elapsed().as_micros() as u64);
                    last = c.secret;
                }
                let req = pb::IntrospectRequest {
                    secret: last,
                    resource: resource.clone(),
                };
                let i = route
                    .call("introspect", req, async |r, q| {
                        r.verifier.introspect(q).await
                    })
                    .await;
                assert!(i.active);
                let req = pb::CompleteTaskRequest {
                    task_id: task.task_id,
                };
                route
                    .call("complete", req, async |r, q| {
                        r.broker.complete_task(q).await
                    })
                    .await;
                ops += k as u64 + 3;
            }
            Tally {
                lat: lat_issue,
                ops,
                retries: route.retries,
            }
        }));
    }
    report(&args, handles, start, before).await;
}

async fn report(
    args: &Args,
    handles: Vec<tokio::task::JoinHandle<Tally>>,
    start: Instant,
    before: Option<(f64, u64)>,
) {
    let mut lat = Vec::new();
    let mut ops = 0;
    let mut retries = 0;
    for h in handles {
        let t = h.await.expect("agent task");
        lat.extend(t.lat);
        ops += t.ops;
        retries += t.retries;
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let what = if args.noop {
        "no-op calls"
    } else {
        "issuances"
    };
    let replicas = args.addr.len();
    println!(
        "target={} agents={} k={} seconds={:.1} mode={}{}",
        match args.target {
            Target::Jitbroker => "jitbroker",
            Target::Openbao => "openbao",
        },
        args.agents,
        args.k,
        secs,
        if args.noop { "noop" } else { "flow" },
        if replicas > 1 {
            format!(" replicas={replicas}")
        } else {
            String::new()
        }
    );
    println!("{what}/s: {:.0}", lat.len() as f64 / secs);
    println!("all rpcs/s: {:.0}", ops as f64 / secs);
    if replicas > 1 {
        println!("retries: {retries}");
    }
    println!(
        "{what} latency ms: p50 {:.3} p99 {:.3} p99.9 {:.3}",
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        pct(&lat, 0.999)
    );
    if let Some((cpu0, _)) = before
        && let Some((cpu1, rss)) = procs_stat(&args.pid)
    {
        println!(
            "server cpu seconds per 1000 rpcs: {:.3}",
            (cpu1 - cpu0) * 1000.0 / ops.max(1) as f64
        );
        if args.pid.len() > 1 {
            println!(
                "server peak rss MiB: {:.1} (the largest of {} processes)",
                rss as f64 / 1048576.0,
                args.pid.len()
            );
        } else {
            println!("server peak rss MiB: {:.1}", rss as f64 / 1048576.0);
        }
    }
    let store = args
        .store_dir
        .clone()
        .unwrap_or_else(|| args.data_dir.join("db"));
    println!("store bytes: {}", dir_bytes(&store));
}

/// One prefilled task (owner `fill-{t mod 1000}`, expiring at `task_expires_at`) and its first
/// `count` live token credentials (expiring at `expires_at`), each with its secret.
fn prefill_records(
    args: &Args,
    t: u64,
    count: u64,
    now: i64,
    expires_at: i64,
    task_expires_at: i64,
) -> (
    jitbroker::model::Task,
    Vec<(jitbroker::model::CredentialRecord, jitbroker::model::Secret)>,
) {
    use jitbroker::model::{
        CredentialId, CredentialRecord, CredentialState, Decision, Grant, GrantDecision, Secret,
        SpiffeId, Task, TaskId, TaskState,
    };
    let grant = Grant {
        resource: args.resource.clone(),
        action: "read".into(),
    };
    let owner = SpiffeId::parse(
        "owner",
        &format!("spiffe://jitbroker.dev/agent/fill-{}", t % 1000),
    )
    .expect("id");
    let task = Task {
        id: TaskId::generate(),
        owner: owner.clone(),
        purpose: "prefill".into(),
        grants: vec![GrantDecision {
            grant: grant.clone(),
            decision: Decision::Allowed,
            reason: "prefill".into(),
            approval_id: None,
        }],
        labels: Default::default(),
        state: TaskState::Active,
        created_at: now,
        expires_at: task_expires_at,
        ended_at: None,
        purge_at: None,
        parent: None,
        delegation_chain: vec![owner.clone()],
        idempotency_key: None,
    };
    let credentials = (0..count)
        .map(|_| {
            let rec = CredentialRecord {
                id: CredentialId::generate(),
                task_id: task.id.clone(),
                owner: owner.clone(),
                resource: grant.resource.clone(),
                action: grant.action.clone(),
                kind: "token".into(),
                issued_at: now,
                expires_at,
                state: CredentialState::Active,
                ended_at: None,
                end_reason: None,
                idempotency_key: None,
                attributes: Default::default(),
                delegation_chain: vec![owner.clone()],
            };
            let secret = Secret::new(format!("jbt_prefill_{}", rec.id.as_str()));
            (rec, secret)
        })
        .collect();
    (task, credentials)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

fn print_prefilled(made: u64, tasks: u64, start: Instant) {
    let secs = start.elapsed().as_secs_f64();
    println!("prefilled credentials: {made} in {tasks} tasks");
    println!(
        "prefill seconds: {secs:.1} ({:.0} credentials/s)",
        made as f64 / secs
    );
}

/// Writes `n` live token credentials (16 per task) into the store of `--data-dir` through the
/// same `Store` the broker uses (so they are sealed, indexed and on the expiry index), then
/// flushes. The broker must be stopped.
async fn prefill(args: &Args, n: u64) {
    if let Some(cfg) = &args.store_config {
        return prefill_engine(args, cfg, n).await;
    }
    use jitbroker::store::local::LocalEngine;
    let kek = jitbroker::store::crypto::Kek::load(&args.data_dir.join("kek")).expect("kek");
    let store = std::sync::Arc::new(
        jitbroker::store::SledStore::open(&args.data_dir.join("db"), &kek).expect("open store"),
    );
    // Sealing is above the engine: the same keys the broker loads.
    let sealing = jitbroker::store::Storage::open(store.clone(), &kek)
        .await
        .expect("data keys");
    let now = now_ms();
    let expires_at = now + args.prefill_ttl_seconds as i64 * 1000;
    let start = Instant::now();
    let (mut made, mut t) = (0u64, 0u64);
    while made < n {
        let (task, credentials) =
            prefill_records(args, t, 16.min(n - made), now, expires_at, expires_at);
        t += 1;
        store.create_task(&task).expect("task");
        for (rec, secret) in &credentials {
            let sealed = sealing.seal_secret(&rec.id, secret).expect("seal");
            store.create_credential(rec, &sealed).expect("credential");
            made += 1;
        }
        if t.is_multiple_of(4096) {
            store.durable().await.expect("flush");
            eprintln!(
                "prefill: {made} credentials in {:.0} s",
                start.elapsed().as_secs_f64()
            );
        }
    }
    store.durable().await.expect("flush");
    print_prefilled(made, t, start);
    println!("store bytes: {}", dir_bytes(&args.data_dir.join("db")));
}

/// `--prefill` into the engine a configuration names: one unit of work per task of 16
/// credentials, as the broker writes them (sealed, indexed, on the expiry index). The tasks
/// outlive their credentials (an hour at least), so the credentials end by their own expiry.
async fn prefill_engine(args: &Args, config: &std::path::Path, n: u64) {
    let cfg = jitbroker::config::Config::load(config).expect("store config");
    let kek = jitbroker::store::crypto::Kek::load(&cfg.kek_file).expect("kek");
    let engine = jitbroker::server::open_engine(&cfg, &kek)
        .await
        .expect("open the store");
    let storage = jitbroker::store::Storage::open(engine, &kek)
        .await
        .expect("data keys");
    let now = now_ms();
    let expires_at = now + args.prefill_ttl_seconds as i64 * 1000;
    let start = Instant::now();
    let (mut made, mut t) = (0u64, 0u64);
    while made < n {
        let (task, credentials) = prefill_records(
            args,
            t,
            16.min(n - made),
            now,
            expires_at,
            expires_at.max(now + 3_600_000),
        );
        t += 1;
        let mut u = storage.begin().await.expect("begin");
        u.lock_identity(&task.owner).await.expect("lock");
        u.insert_task(&task).await.expect("task");
        for (rec, secret) in &credentials {
            let sealed = storage.seal_secret(&rec.id, secret).expect("seal");
            u.insert_credential(rec, &sealed).await.expect("credential");
            made += 1;
        }
        u.commit().await.expect("commit");
    }
    print_prefilled(made, t, start);
}
