//! Test support: start the real broker in-process on 127.0.0.1:0 with a dev CA, and connect
//! gRPC clients over mTLS with rcgen-minted SVIDs.
#![allow(dead_code, reason = "each test binary uses part of the shared helpers")]

pub mod envoy;
pub mod gateway;
pub mod pg;
pub mod procs;
pub mod proxies;
pub mod tools;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use jitbroker::api::pb;
use jitbroker::broker::{Clock, ManualClock};
use jitbroker::config::Config;
use jitbroker::server::{App, Options};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint, Uri};

pub use jitbroker::api::pb::{
    admin_client::AdminClient, broker_client::BrokerClient, verifier_client::VerifierClient,
};

pub const AGENT: &str = "spiffe://jitbroker.dev/agent/a";
pub const AGENT_B: &str = "spiffe://jitbroker.dev/agent/b";
pub const TOOL: &str = "spiffe://jitbroker.dev/tool/demo";
pub const OPERATOR: &str = "spiffe://jitbroker.dev/operator";

/// A broker running in this process.
pub struct Running {
    pub addr: SocketAddr,
    pub ops_addr: SocketAddr,
    /// The forward-auth listener, when the config sets `[gateway] forward_auth_listen`.
    pub forward_auth_addr: Option<SocketAddr>,
    pub data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<jitbroker::error::Result<()>>>,
}

impl Running {
    /// Stops the broker and waits until it has released the data directory.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("server task").expect("server run");
        }
    }
}

/// A temp data dir prepared like `jitbroker dev` does.
pub fn dev_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    jitbroker::cli::prepare_dev(dir.path()).expect("prepare dev dir");
    dir
}

/// Appends `policy` to the Cedar policy of the dev dir `dir`.
pub fn append_policy(dir: &Path, policy: &str) {
    let path = dir.join("policy.cedar");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(policy);
    std::fs::write(&path, text).unwrap();
}

/// The dev config text with JWT-SVIDs enabled (the client certificate becomes optional).
pub fn enable_jwt_svids(t: String) -> String {
    t.replace("# jwt_audience = ", "jwt_audience = ")
}

/// Loads the dev config of `dir`, letting the test edit its text first.
pub fn config(dir: &Path, edit: impl FnOnce(String) -> String) -> Config {
    let path = dir.join("jitbroker.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = edit(text);
    std::fs::write(&path, &text).unwrap();
    Config::from_toml(&text, "test", |_| None).expect("config")
}

std::thread_local! {
    /// Databases of brokers started on this thread under `JITBROKER_TEST_ENGINE=postgres`, by
    /// data directory (a broker restarted on its directory finds its data again); stopped when
    /// the test's thread ends.
    static TEST_DATABASES: std::cell::RefCell<std::collections::HashMap<PathBuf, pg::Pg>> =
        std::cell::RefCell::default();
}

/// The engine the tests run on: `JITBROKER_TEST_ENGINE=postgres` puts the store of every broker
/// these helpers start into a throwaway PostgreSQL server (one per data directory), so the same
/// tests prove both engines; unset (or `sled`), the configuration's own engine.
fn with_test_engine(cfg: &Config) -> Config {
    let mut cfg = cfg.clone();
    let wanted = std::env::var("JITBROKER_TEST_ENGINE").unwrap_or_default();
    if wanted != "postgres" || cfg.store.engine != jitbroker::config::StoreEngine::Sled {
        return cfg;
    }
    let dsn = TEST_DATABASES.with(|dbs| {
        let mut dbs = dbs.borrow_mut();
        let pg = dbs.entry(cfg.data_dir.clone()).or_insert_with(|| {
            pg::Pg::start().expect("JITBROKER_TEST_ENGINE=postgres needs PostgreSQL installed")
        });
        pg.admin_dsn()
    });
    let file = cfg.data_dir.join("store.dsn");
    std::fs::write(&file, dsn).unwrap();
    cfg.store.engine = jitbroker::config::StoreEngine::Postgres;
    cfg.store.dsn_file = Some(file);
    cfg
}

/// Whether `JITBROKER_TEST_ENGINE=postgres` moves the brokers' stores into PostgreSQL. A test
/// that works on sled's files themselves (offline tampering, restoring a copy of the data
/// directory) skips itself then, saying so; the sled run covers it.
pub fn sled_only(what: &str) -> bool {
    let pg = std::env::var("JITBROKER_TEST_ENGINE").is_ok_and(|v| v == "postgres");
    if pg {
        eprintln!("SKIP under JITBROKER_TEST_ENGINE=postgres: {what} works on sled's files");
    }
    pg
}

/// Where the stores of the brokers with data directory `dir` keep their files: `dir` itself,
/// and its database's data directory under `JITBROKER_TEST_ENGINE=postgres`.
pub fn store_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    TEST_DATABASES.with(|dbs| {
        if let Some(pg) = dbs.borrow().get(dir) {
            out.push(pg.data_dir());
        }
    });
    out
}

pub async fn spawn(cfg: &Config, options: Options) -> jitbroker::error::Result<Running> {
    let cfg = &with_test_engine(cfg);
    let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = api.local_addr().unwrap();
    let ops_addr = ops.local_addr().unwrap();
    let app = App::build(cfg, Some(addr), options).await?;
    let forward_auth_addr = app.forward_auth.as_ref().and_then(|l| l.local_addr().ok());
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(jitbroker::server::run(api, ops, app, async move {
        let _ = rx.await;
    }));
    Ok(Running {
        addr,
        ops_addr,
        forward_auth_addr,
        data_dir: cfg.data_dir.clone(),
        stop: Some(tx),
        task: Some(task),
    })
}

/// Starts a broker for `cfg` with the default options (system clock, reaper on).
pub async fn spawn_default(cfg: &Config) -> Running {
    spawn(cfg, Options::default()).await.expect("spawn")
}

/// A broker on a fresh dev dir with its config as prepared: (dir, config, broker).
pub async fn start_dev() -> (tempfile::TempDir, Config, Running) {
    let dir = dev_dir();
    let cfg = config(dir.path(), |t| t);
    let r = spawn_default(&cfg).await;
    (dir, cfg, r)
}

/// Starts a broker on a fresh dev dir with a manual clock and no reaper.
pub async fn spawn_manual(dir: &Path) -> (Running, ManualClock) {
    spawn_manual_cfg(&config(dir, |t| t)).await
}

/// Starts a broker for `cfg` on a new manual clock, without the reaper.
pub async fn spawn_manual_cfg(cfg: &Config) -> (Running, ManualClock) {
    let clock = ManualClock::new();
    let r = spawn_on(cfg, &clock).await;
    (r, clock)
}

/// Options for a broker on `clock`, with or without the reaper.
pub fn clock_options(clock: &ManualClock, reaper: bool) -> Options {
    Options {
        clock: Arc::new(clock.clone()) as Arc<dyn Clock>,
        reaper,
    }
}

/// Starts a broker for `cfg` on `clock`, without the reaper (the test moves time itself).
pub async fn spawn_on(cfg: &Config, clock: &ManualClock) -> Running {
    spawn(cfg, clock_options(clock, false))
        .await
        .expect("spawn")
}

/// Mints an SVID for `id` from the dev CA of `dir` and returns (chain PEM, key PEM, bundle PEM).
pub fn mint(dir: &Path, id: &str) -> (String, String, String) {
    let ca = jitbroker::identity::dev::ensure_dev_ca(dir, "jitbroker.dev").unwrap();
    let svid = ca
        .mint_svid(id, &[], &[], Duration::from_secs(3600))
        .unwrap();
    (
        svid.cert_chain_pem.clone(),
        svid.key_pem.to_string(),
        svid.bundle_pem.clone(),
    )
}

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pemfile_certs(pem)
}

fn rustls_pemfile_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap())
        .collect()
}

/// A TLS client config trusting `bundle_pem`, presenting `identity` if given.
pub fn tls_config(bundle_pem: &str, identity: Option<(&str, &str)>) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(bundle_pem) {
        roots.add(c).unwrap();
    }
    let b = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut cfg = match identity {
        Some((chain, key)) => b
            .with_client_auth_cert(
                certs(chain),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg
}

/// A TLS client config presenting the SVID of `id` minted from the dev CA of `dir`, trusting
/// that CA's bundle.
pub fn tls_as(dir: &Path, id: &str) -> rustls::ClientConfig {
    let (chain, key, bundle) = mint(dir, id);
    tls_config(&bundle, Some((&chain, &key)))
}

/// `tls` offering HTTP/1.1 only (for the plain HTTP clients of the tests).
pub fn http1(mut tls: rustls::ClientConfig) -> rustls::ClientConfig {
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    tls
}

/// A client TLS stream.
pub type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// TLS over `tcp` with `tls`, verifying the server as `localhost`.
pub async fn tls_over(
    tcp: tokio::net::TcpStream,
    tls: rustls::ClientConfig,
) -> std::io::Result<TlsStream> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let name = ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

/// A new TCP connection to `addr` and [`tls_over`] it.
pub async fn tls_connect(
    addr: SocketAddr,
    tls: rustls::ClientConfig,
) -> std::io::Result<TlsStream> {
    tls_over(tokio::net::TcpStream::connect(addr).await?, tls).await
}

/// A gRPC channel to `addr` over TLS with `tls`, verifying the server as `localhost`.
pub async fn channel(
    addr: SocketAddr,
    tls: rustls::ClientConfig,
) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let tls = tls.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tls_connect(addr, tls).await?)) }
        }))
        .await
}

/// A gRPC channel to the broker `r` as `id`.
pub async fn channel_as(r: &Running, id: &str) -> Channel {
    channel(r.addr, tls_as(&r.data_dir, id))
        .await
        .expect("connect")
}

/// Adds `authorization` metadata to every call.
pub type BearerInterceptor =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;

pub type Authed =
    BrokerClient<tonic::service::interceptor::InterceptedService<Channel, BearerInterceptor>>;

/// A Broker client that sends `authorization: <value>` on every call.
pub fn authed(ch: Channel, value: String) -> Authed {
    let f: BearerInterceptor = Box::new(move |mut req: tonic::Request<()>| {
        req.metadata_mut()
            .insert("authorization", value.parse().expect("ascii header"));
        Ok(req)
    });
    BrokerClient::with_interceptor(ch, f)
}

/// The serial number of the certificate the server presents on a new TLS connection.
pub async fn server_cert_serial(addr: SocketAddr, tls: rustls::ClientConfig) -> Vec<u8> {
    let s = tls_connect(addr, tls).await.unwrap();
    let cert = s.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
    c.raw_serial().to_vec()
}

/// Polls (bounded, 30 s) until `f` holds; panics with `what` otherwise. For waiting on real
/// processes (a file watcher, PostgreSQL, a child broker), never for asserting a time.
pub async fn eventually<F, Fut>(what: &str, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    if !poll_until(300, Duration::from_millis(100), f).await {
        panic!("timed out waiting until {what}");
    }
}

/// Polls (bounded: `tries` times, `every` apart) until `f` holds; whether it did.
pub async fn poll_until<F, Fut>(tries: usize, every: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..tries {
        if f().await {
            return true;
        }
        tokio::time::sleep(every).await;
    }
    false
}

/// A free TCP port on 127.0.0.1 (for servers started as separate processes).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over plain HTTP/1.1 (the ops port): the whole response, or None if unreachable.
pub async fn http_get(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

/// `GET path` on the ops port at `addr`: the whole response (panics if it does not answer).
pub async fn ops_get(addr: SocketAddr, path: &str) -> String {
    http_get(&addr.to_string(), path)
        .await
        .expect("the ops port answers")
}

/// Clients for one identity.
#[derive(Clone)]
pub struct Clients {
    pub broker: BrokerClient<Channel>,
    pub verifier: VerifierClient<Channel>,
    pub admin: AdminClient<Channel>,
}

impl Clients {
    /// The clients of one channel.
    pub fn new(ch: Channel) -> Self {
        Clients {
            broker: BrokerClient::new(ch.clone()),
            verifier: VerifierClient::new(ch.clone()),
            admin: AdminClient::new(ch),
        }
    }

    /// Starts a task with `grants` for `ttl` seconds ([`start_req`]); panics if refused.
    pub async fn start(&mut self, grants: Vec<pb::Grant>, ttl: u32) -> pb::Task {
        self.broker
            .start_task(start_req(grants, ttl))
            .await
            .expect("start task")
            .into_inner()
    }

    /// Issues a credential to read `resource` under `task_id` for `ttl` seconds
    /// ([`issue_req`]); panics if refused.
    pub async fn issue(&mut self, task_id: &str, resource: &str, ttl: u32) -> pb::Credential {
        self.broker
            .issue_credential(issue_req(task_id, resource, ttl))
            .await
            .expect("issue credential")
            .into_inner()
    }

    /// Completes `task_id`; panics if refused.
    pub async fn complete(&mut self, task_id: &str) -> pb::CompleteTaskResponse {
        self.broker
            .complete_task(pb::CompleteTaskRequest {
                task_id: task_id.into(),
            })
            .await
            .expect("complete task")
            .into_inner()
    }

    /// `GetTask` for `task_id`; panics if refused.
    pub async fn task(&mut self, task_id: &str) -> pb::Task {
        self.broker
            .get_task(pb::GetTaskRequest {
                task_id: task_id.into(),
            })
            .await
            .expect("get task")
            .into_inner()
    }

    /// Revokes `credential_id`; panics if refused.
    pub async fn revoke(&mut self, credential_id: &str) {
        self.broker
            .revoke_credential(pb::RevokeCredentialRequest {
                credential_id: credential_id.into(),
            })
            .await
            .expect("revoke credential");
    }

    /// `Admin.Approve` of `approval_id`, for `reason`.
    pub async fn approve(
        &mut self,
        approval_id: &str,
        reason: &str,
    ) -> Result<pb::Approval, tonic::Status> {
        self.admin
            .approve(pb::ApproveRequest {
                approval_id: approval_id.into(),
                reason: reason.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// `Admin.RevokeIdentity` of `id` with `block` set, for `reason`.
    pub async fn block(
        &mut self,
        id: &str,
        reason: &str,
    ) -> Result<pb::RevokeIdentityResponse, tonic::Status> {
        self.admin
            .revoke_identity(pb::RevokeIdentityRequest {
                spiffe_id: id.into(),
                reason: reason.into(),
                block: true,
            })
            .await
            .map(|r| r.into_inner())
    }
}

/// Clients as `id` of the broker at `addr` whose dev dir is `dir`.
pub async fn clients_at(addr: SocketAddr, dir: &Path, id: &str) -> Clients {
    Clients::new(channel(addr, tls_as(dir, id)).await.expect("connect"))
}

pub async fn clients(r: &Running, id: &str) -> Clients {
    clients_at(r.addr, &r.data_dir, id).await
}

pub fn grant(resource: &str, action: &str) -> pb::Grant {
    pb::Grant {
        resource: resource.into(),
        action: action.into(),
    }
}

pub fn start_req(grants: Vec<pb::Grant>, ttl: u32) -> pb::StartTaskRequest {
    pb::StartTaskRequest {
        purpose: "summarise ticket 42".into(),
        grants,
        ttl_seconds: ttl,
        ..Default::default()
    }
}

pub fn issue_req(task_id: &str, resource: &str, ttl: u32) -> pb::IssueCredentialRequest {
    pb::IssueCredentialRequest {
        task_id: task_id.into(),
        resource: resource.into(),
        action: "read".into(),
        ttl_seconds: ttl,
        idempotency_key: String::new(),
    }
}

pub async fn introspect(c: &mut Clients, secret: &str, resource: &str) -> pb::IntrospectResponse {
    c.verifier
        .introspect(pb::IntrospectRequest {
            secret: secret.into(),
            resource: resource.into(),
        })
        .await
        .expect("introspect")
        .into_inner()
}

/// Whether `secret` introspects as active for `resource`, asked by the verifier `c`.
pub async fn active(c: &mut Clients, secret: &str, resource: &str) -> bool {
    introspect(c, secret, resource).await.active
}

/// A `tracing` writer that keeps everything logged, so tests can scan the logs.
#[derive(Clone, Default)]
pub struct LogCapture(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl LogCapture {
    /// Installs a global subscriber logging everything the broker logs (trace level) and
    /// everything else at info, as JSON, into the capture. Dependencies' trace logging stays off:
    /// tokio's runtime threads log while their thread-locals are torn down at exit, which aborts
    /// the test process.
    pub fn install() -> Self {
        let cap = LogCapture::default();
        tracing_subscriber::fmt()
            .with_env_filter("info,jitbroker=trace")
            .json()
            .with_writer(cap.clone())
            .try_init()
            .expect("first subscriber in this test binary");
        cap
    }

    /// One capture for the whole test binary, installed by whichever test asks first (tests in
    /// one binary share the global subscriber).
    pub fn shared() -> Self {
        static SHARED: std::sync::OnceLock<LogCapture> = std::sync::OnceLock::new();
        SHARED.get_or_init(Self::install).clone()
    }

    pub fn text(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

/// Every file under `dir`, recursively, as bytes.
pub fn all_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The part of a secret that cannot occur by chance: a token's random part, a JWT's signature.
pub fn distinctive_part(secret: &str) -> &str {
    let part = match secret.strip_prefix("jbt_") {
        Some(random) => random,
        None => secret.rsplit('.').next().unwrap_or(secret),
    };
    assert!(
        part.len() >= 40,
        "secret part too short to be distinctive: {}",
        part.len()
    );
    part
}

/// One sample of a Prometheus text exposition: metric name, labels, value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// Parses a Prometheus text exposition strictly (names, quoted and escaped label values, a
/// numeric value), as a scraper would; the first malformed line is the error.
pub fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    let name_ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with(|c: char| c.is_ascii_digit())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
    };
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("malformed exposition line: {line:?}");
        let (series, value) = line.rsplit_once(' ').ok_or_else(bad)?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().map_err(|_| bad())?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').ok_or_else(bad)?;
                let mut labels = Vec::new();
                let mut chars = body.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    if !name_ok(&key) || chars.next() != Some('"') {
                        return Err(bad());
                    }
                    let mut v = String::new();
                    loop {
                        match chars.next().ok_or_else(bad)? {
                            '"' => break,
                            '\\' => match chars.next().ok_or_else(bad)? {
                                'n' => v.push('\n'),
                                c @ ('\\' | '"') => v.push(c),
                                _ => return Err(bad()),
                            },
                            '\n' => return Err(bad()),
                            c => v.push(c),
                        }
                    }
                    labels.push((key, v));
                    match chars.next() {
                        None => break,
                        Some(',') => {}
                        Some(_) => return Err(bad()),
                    }
                }
                (name, labels)
            }
        };
        if !name_ok(name) {
            return Err(bad());
        }
        out.push((name.to_owned(), labels, value));
    }
    Ok(out)
}

/// The ops port's `/metrics`, parsed (panics naming the bad line if it does not parse).
pub async fn scrape(r: &Running) -> Vec<Sample> {
    let resp = ops_get(r.ops_addr, "/metrics").await;
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    parse_exposition(body).unwrap_or_else(|e| panic!("/metrics does not parse: {e}"))
}

/// The store of the stopped broker of `cfg`, opened offline.
pub fn open_store(cfg: &Config) -> jitbroker::store::SledStore {
    let kek = jitbroker::store::crypto::Kek::load(&cfg.kek_file).unwrap();
    jitbroker::store::SledStore::open(&cfg.data_dir.join("db"), &kek).unwrap()
}

/// The audit export (JSON lines) of the stopped broker of `cfg`: (entries, text). From its
/// database under `JITBROKER_TEST_ENGINE=postgres`.
pub fn audit_export(cfg: &Config) -> (u64, String) {
    let mut export = Vec::new();
    let cfg = with_test_engine(cfg);
    if cfg.store.engine == jitbroker::config::StoreEngine::Postgres {
        // A runtime of its own on a thread of its own: callers may be inside one.
        let n = std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let kek = jitbroker::store::crypto::Kek::load(&cfg.kek_file).unwrap();
                    let engine = jitbroker::server::open_engine(&cfg, &kek).await.unwrap();
                    jitbroker::audit::export(engine.as_ref(), None, &mut export)
                        .await
                        .unwrap()
                })
            })
            .join()
            .unwrap()
        });
        return (n, String::from_utf8(export).unwrap());
    }
    let store = open_store(&cfg);
    // The engine's futures are ready at once: no runtime needed.
    let n =
        futures::executor::block_on(jitbroker::audit::export(&store, None, &mut export)).unwrap();
    (n, String::from_utf8(export).unwrap())
}

/// Every audit entry of the stopped broker whose dev dir is `dir`, as JSON, in order.
pub fn audit_entries(dir: &Path) -> Vec<serde_json::Value> {
    audit_export(&config(dir, |t| t))
        .1
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Copies every file under `from` to the same place under `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    for (path, bytes) in all_bytes(from) {
        let dest = to.join(path.strip_prefix(from).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(dest, bytes).unwrap();
    }
}

/// A dev JWT signing key of its own (one the broker does not know) for `trust_domain`.
pub fn random_jwt_key(trust_domain: &str) -> jitbroker::identity::DevJwtKey {
    jitbroker::identity::DevJwtKey::new(
        p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng),
        trust_domain,
    )
}

/// Bytes under `dir`, recursively.
pub fn dir_bytes(dir: &Path) -> u64 {
    all_bytes(dir).iter().map(|(_, b)| b.len() as u64).sum()
}
