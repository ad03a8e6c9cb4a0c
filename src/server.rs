//! Assembles the broker from its configuration and serves it: the mTLS gRPC API port and the
//! plain-HTTP ops port. [`run`] takes already-bound listeners and a shutdown future, so tests bind
//! `127.0.0.1:0` and start the real server in-process.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

mod limits;

use crate::api::{AdminApi, BrokerApi, ExtAuthzApi, PeerInfo, ServerFacts, VerifierApi, pb};
use crate::broker::{AuditArchive, Broker, Clock, Core, Limits, SystemClock};
use crate::config::StoreEngine;
use crate::config::{Config, ServerConfig, SourceKind};
use crate::error::{Error, Result};
use crate::identity::{self, Identity, IdentitySource};
use crate::issuers::Upstream;
use crate::model::SpiffeId;
use crate::policy::PolicyEngine;
use crate::store::SledStore;
use crate::store::crypto::Kek;
use crate::telemetry::Metrics;

/// A TLS handshake that takes longer than this is dropped (slow-loris guard).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once on each of the forward-auth and OAuth listeners (TLS handshakes
/// included).
const HTTPS_CONNECTIONS: usize = 1024;
/// Longest a connection to the forward-auth or OAuth listener stays open with no request in
/// progress (`[server] idle_timeout_ms` when that is shorter).
const HTTPS_IDLE_MS: u64 = 30_000;
/// Connections waiting for the gRPC server; more wait in the kernel's accept queue.
const ACCEPT_QUEUE: usize = 256;

/// Knobs that tests set and production leaves at their defaults.
#[derive(Clone)]
pub struct Options {
    pub clock: Arc<dyn Clock>,
    /// Run the background reaper (tests of reader-side expiry turn it off).
    pub reaper: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            reaper: true,
        }
    }
}

/// Everything a running broker is made of.
pub struct App {
    pub broker: Arc<Broker>,
    pub identity: Identity,
    pub metrics: Arc<Metrics>,
    pub facts: ServerFacts,
    pub options: Options,
    /// The forward-auth listener (`[gateway] forward_auth_listen`), bound by [`App::build`].
    pub forward_auth: Option<TcpListener>,
    /// Largest body read for MCP routing (`[gateway] max_body_bytes`).
    pub forward_auth_max_body: usize,
    /// The path proxies call (`[gateway] forward_auth_path`).
    pub forward_auth_path: String,
    /// The OAuth listener (`[oauth] listen`) and its issuer, bound by [`App::build`].
    pub oauth: Option<(TcpListener, String)>,
    /// The API port's limits.
    pub limits: ServerConfig,
    /// Where the audit chain's head is anchored besides the logs (`[retention]`).
    pub audit_anchor_file: Option<std::path::PathBuf>,
}

/// The identity source the configuration asks for.
pub fn identity_source(cfg: &Config, api_addr: Option<SocketAddr>) -> Result<IdentitySource> {
    let id = &cfg.identity;
    Ok(match id.source {
        SourceKind::Dev => {
            let ca = identity::dev::ensure_dev_ca(&cfg.data_dir, &id.trust_domain)
                .map_err(|e| Error::Config(e.to_string()))?;
            let mut ips = vec![std::net::IpAddr::from([127, 0, 0, 1])];
            if let Some(a) = api_addr
                && !a.ip().is_unspecified()
                && !ips.contains(&a.ip())
            {
                ips.push(a.ip());
            }
            IdentitySource::Dev {
                ca,
                server_id: format!("spiffe://{}/jitbroker", id.trust_domain),
                dns_names: vec!["localhost".to_owned()],
                ips,
                federated: federated_files(cfg),
            }
        }
        SourceKind::Files => IdentitySource::Files {
            svid_file: id.svid_file.clone().unwrap_or_default(),
            key_file: id.svid_key_file.clone().unwrap_or_default(),
            bundle_file: id.bundle_file.clone().unwrap_or_default(),
            federated: federated_files(cfg),
        },
        SourceKind::Spire => IdentitySource::Spire {
            endpoint: id.workload_api_socket.clone(),
        },
    })
}

fn federated_files(cfg: &Config) -> Vec<(String, std::path::PathBuf)> {
    cfg.identity
        .federated_bundle_files
        .iter()
        .map(|(td, p)| (td.clone(), p.clone()))
        .collect()
}

/// JWT-SVID settings, when `identity.jwt_audience` is set: the bundles come from the same kind
/// of source as the X.509 material.
pub fn jwt_settings(cfg: &Config) -> Result<Option<identity::JwtSettings>> {
    let id = &cfg.identity;
    let Some(audience) = id.jwt_audience.clone() else {
        return Ok(None);
    };
    let bundles = match id.source {
        SourceKind::Dev => {
            let key = identity::dev::ensure_dev_jwt_key(&cfg.data_dir, &id.trust_domain)
                .map_err(|e| Error::Config(e.to_string()))?;
            let json = key.bundle_json().to_string();
            let set = identity::parse_bundle_set(json.as_bytes())
                .map_err(|e| Error::Config(format!("dev JWT bundle: {e}")))?;
            identity::JwtBundleSource::Fixed(set)
        }
        SourceKind::Files => {
            identity::JwtBundleSource::File(id.jwt_bundle_file.clone().unwrap_or_default())
        }
        SourceKind::Spire => identity::JwtBundleSource::Spire {
            endpoint: id.workload_api_socket.clone(),
        },
    };
    Ok(Some(identity::JwtSettings { audience, bundles }))
}

/// The upstream systems of the configured resources (one PostgreSQL issuer per `postgres`
/// resource). Nothing connects yet: a database that is down at start only delays issuance.
pub fn upstreams(cfg: &Config) -> Result<HashMap<String, Arc<dyn Upstream>>> {
    let mut out: HashMap<String, Arc<dyn Upstream>> = HashMap::new();
    for (name, r) in &cfg.resources {
        if let Some(pg) = &r.postgres {
            out.insert(
                name.clone(),
                Arc::new(crate::issuers::postgres::PostgresIssuer::new(name, pg)?),
            );
        }
    }
    Ok(out)
}

/// Checks each upstream's account at start-up: missing privileges stop the start with what to
/// grant; an upstream that cannot be reached now is only logged (it delays issuance, not start).
async fn preflight_upstreams(ups: &HashMap<String, Arc<dyn Upstream>>) -> Result<()> {
    for (name, u) in ups {
        match tokio::time::timeout(Duration::from_secs(5), u.preflight()).await {
            Ok(Ok(())) => {}
            Ok(Err(e @ Error::Config(_))) => return Err(e),
            Ok(Err(e)) => {
                tracing::warn!(resource = %name, error = %e, "could not check the upstream account's privileges now; issuance will tell")
            }
            Err(_) => {
                tracing::warn!(resource = %name, "checking the upstream account's privileges timed out; issuance will tell")
            }
        }
    }
    Ok(())
}

/// Reads the policy file named by the configuration and builds the policy engine.
pub fn load_policy(cfg: &Config) -> Result<PolicyEngine> {
    let text = std::fs::read_to_string(&cfg.policy_file).map_err(|e| {
        Error::Config(format!(
            "cannot read policy file {}: {e}",
            cfg.policy_file.display()
        ))
    })?;
    let resources = cfg
        .resources
        .iter()
        .map(|(k, v)| (k.clone(), v.kind.as_str().to_owned()))
        .collect();
    PolicyEngine::with_tool_arguments(
        resources,
        cfg.actions(),
        cfg.gateway
            .as_ref()
            .map(|g| g.tool_arguments.clone())
            .unwrap_or_default(),
        &text,
        &cfg.policy_file.display().to_string(),
    )
}

/// How long a starting broker waits for an unreachable database before it gives up.
const DATABASE_WAIT: Duration = Duration::from_secs(60);

/// [`open_engine`] for a starting broker: a database that cannot be reached yet (started at the
/// same time, failing over, briefly down) is tried again, at growing intervals up to 5 s, for
/// [`DATABASE_WAIT`], each failure logged with its reason; any other error ends the start at once.
async fn open_engine_waiting(cfg: &Config, kek: &Kek) -> Result<Arc<dyn crate::store::Store>> {
    let deadline = tokio::time::Instant::now() + DATABASE_WAIT;
    let mut pause = Duration::from_millis(250);
    loop {
        match open_engine(cfg, kek).await {
            Err(Error::Unavailable(reason)) if tokio::time::Instant::now() + pause < deadline => {
                tracing::warn!(
                    error = %reason,
                    retry_in_ms = pause.as_millis() as u64,
                    "the store's database is not reachable yet; waiting for it"
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            r => return r,
        }
    }
}

/// Opens the storage engine `[store] engine` names.
pub async fn open_engine(cfg: &Config, kek: &Kek) -> Result<Arc<dyn crate::store::Store>> {
    Ok(match cfg.store.engine {
        StoreEngine::Sled => Arc::new(SledStore::open_with_cache(
            &cfg.data_dir.join("db"),
            kek,
            cfg.store.cache_bytes(),
        )?),
        StoreEngine::Postgres => {
            let dsn_file = cfg.store.dsn_file.as_deref().ok_or_else(|| {
                Error::Config("[store] engine = \"postgres\" needs dsn_file".into())
            })?;
            let settings = crate::store::PgSettings::from_files(
                "[store]",
                dsn_file,
                cfg.store.ca_file.as_deref(),
                cfg.store.pool_size,
            )?;
            Arc::new(crate::store::PgStore::connect(settings).await?)
        }
    })
}

impl App {
    /// Opens the store (the KEK must open it), loads policy, starts the identity source.
    pub async fn build(
        cfg: &Config,
        api_addr: Option<SocketAddr>,
        options: Options,
    ) -> Result<Self> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            Error::Config(format!(
                "cannot create data directory {}: {e}",
                cfg.data_dir.display()
            ))
        })?;
        let kek = Kek::load(&cfg.kek_file)?;
        let engine = open_engine_waiting(cfg, &kek).await?;
        let store = Arc::new(crate::store::Storage::open(engine, &kek).await?);
        drop(kek);
        let policy = Arc::new(load_policy(cfg)?);
        let ups = upstreams(cfg)?;
        preflight_upstreams(&ups).await?;
        let metrics = Arc::new(Metrics::new(crate::api::served_methods()));
        let broker = Arc::new(Broker::assemble(
            Core::new(
                store,
                policy,
                options.clock.clone(),
                Limits::from_config(cfg)?,
                cfg.jwt_issuer(),
                metrics.clone(),
                Some(cfg.policy_file.clone()),
            )
            .await?
            .with_upstreams(ups, cfg.revocation.clone())
            .with_identity_rate(cfg.server.requests_per_identity_per_second)
            .with_max_clock_skew_ms(cfg.store.max_clock_skew_ms as i64)
            .with_disk_floor(crate::store::disk::DiskFloor::new(
                cfg.data_dir.clone(),
                cfg.store.min_free_mb,
            ))
            .with_audit_archive(AuditArchive {
                dir: cfg.audit_archive_dir(),
                keep: cfg.retention.audit_entries_in_store,
                segment: cfg.retention.audit_segment_entries,
                lease_ms: (cfg.store.lease_ttl_seconds as i64).saturating_mul(1000),
            }),
        ));
        if let Some(file) = &cfg.retention.audit_anchor_file {
            broker.retention.check_audit_anchor(file).await?;
        }
        let source = identity_source(cfg, api_addr)?;
        let identity = identity::start(
            source,
            &cfg.identity.trust_domain,
            &cfg.identity.authorized_trust_domains,
            jwt_settings(cfg)?,
        )
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
        let facts = ServerFacts {
            version: env!("CARGO_PKG_VERSION"),
            trust_domain: cfg.identity.trust_domain.clone(),
            identity_source: cfg.identity.source.as_str(),
            started_at: options.clock.now(),
            identity: Some(identity.clone()),
        };
        let forward_auth = match cfg.gateway.as_ref().and_then(|g| g.forward_auth_listen) {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                Error::Config(format!(
                    "cannot listen on {addr} (gateway.forward_auth_listen): {e}"
                ))
            })?),
            None => None,
        };
        let oauth = match &cfg.oauth {
            Some(o) => Some((
                TcpListener::bind(o.listen).await.map_err(|e| {
                    Error::Config(format!("cannot listen on {} (oauth.listen): {e}", o.listen))
                })?,
                o.issuer.clone(),
            )),
            None => None,
        };
        Ok(Self {
            broker,
            identity,
            metrics,
            facts,
            options,
            forward_auth,
            oauth,
            forward_auth_max_body: cfg.gateway.as_ref().map_or(0, |g| g.max_body_bytes),
            forward_auth_path: cfg
                .gateway
                .as_ref()
                .map_or_else(String::new, |g| g.forward_auth_path.clone()),
            limits: {
                // A gateway's check carries the request body it asks about: room for
                // `[gateway] max_body_bytes` of body and its headers.
                let mut l = cfg.server.clone();
                if let Some(g) = &cfg.gateway {
                    l.max_message_bytes = l.max_message_bytes.max(g.max_body_bytes + (64 << 10));
                }
                l
            },
            audit_anchor_file: cfg.retention.audit_anchor_file.clone(),
        })
    }
}

/// A verified TLS connection, what it told us about the peer, and its place among the open
/// connections (given back when the connection is dropped).
struct TlsConn {
    inner: TlsStream<TcpStream>,
    info: limits::ConnInfo,
    idle: limits::IdleClose,
    _permit: limits::ConnectionPermit,
}

impl Connected for TlsConn {
    type ConnectInfo = limits::ConnInfo;
    fn connect_info(&self) -> limits::ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            // Idle for `server.idle_timeout_ms`: end of stream, and the HTTP/2 server closes.
            Poll::Pending if this.idle.poll_idle(cx).is_ready() => Poll::Ready(Ok(())),
            r => r,
        }
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections, runs each TLS handshake in its own task (a slow client never holds
/// up the others) and hands verified connections to the gRPC server.
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<std::io::Result<TlsConn>>,
    broker: Arc<Broker>,
    gate: Arc<limits::ConnectionGate>,
    cfg: ServerConfig,
    mut stop: watch::Receiver<bool>,
) {
    let handshake_timeout = Duration::from_millis(cfg.handshake_timeout_ms);
    let idle_timeout = Duration::from_millis(cfg.idle_timeout_ms);
    loop {
        // At `server.max_connections`, stop accepting: new connections wait in the kernel.
        let room = tokio::select! {
            room = gate.room() => room,
            _ = stop.changed() => return,
        };
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Some(permit) = gate.admit(room, remote) else {
            tracing::debug!(remote = %remote, "connection refused: a per-remote connection limit is reached");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        let broker = broker.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    broker.auth_failed(
                        &remote.ip().to_string(),
                        &format!("TLS handshake refused: {e}"),
                    );
                    return;
                }
                Err(_) => {
                    broker.auth_failed(&remote.ip().to_string(), "TLS handshake timed out");
                    return;
                }
            };
            let spiffe_id = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(identity::peer_spiffe_id)
                .transpose()
                .map_err(|e| e.to_string())
                .and_then(|o| {
                    o.map(|s| {
                        SpiffeId::parse("peer certificate URI SAN", &s).map_err(|e| e.to_string())
                    })
                    .transpose()
                });
            let spiffe_id = match spiffe_id {
                Ok(id) => id,
                Err(reason) => {
                    broker.auth_failed(
                        &remote.ip().to_string(),
                        &format!("peer certificate refused: {reason}"),
                    );
                    return;
                }
            };
            let activity = limits::Activity::new();
            let conn = TlsConn {
                inner: tls,
                info: limits::ConnInfo {
                    peer: PeerInfo {
                        spiffe_id,
                        remote_addr: Some(remote),
                    },
                    activity: activity.clone(),
                },
                idle: limits::IdleClose::new(activity, idle_timeout),
                _permit: permit,
            };
            let _ = tx.send(Ok(conn)).await;
        });
    }
}

/// Serves the API on `api` (mTLS gRPC) and the ops endpoints on `ops` until `shutdown` resolves.
pub async fn run(
    api: TcpListener,
    ops: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let tls_config = app
        .identity
        .server_config()
        .map_err(|e| Error::Config(e.to_string()))?;
    let acceptor = TlsAcceptor::from(tls_config.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (conn_tx, conn_rx) = mpsc::channel(ACCEPT_QUEUE);
    let lim = app.limits.clone();
    let accept = tokio::spawn(accept_loop(
        api,
        acceptor,
        conn_tx,
        app.broker.clone(),
        limits::ConnectionGate::new(&lim, app.metrics.clone()),
        lim.clone(),
        stop_rx.clone(),
    ));

    // What a crash left half-done upstream is queued before the first call is accepted.
    let recovered = app.broker.revocations.recover_upstream_ledger().await?;
    if recovered > 0 {
        tracing::warn!(
            queued = recovered,
            "upstream accounts left by an interrupted run are queued for removal"
        );
    }
    // The background loops, each until `stop_rx` changes.
    let (b, stop) = (&app.broker, &stop_rx);
    let mut background = vec![
        tokio::spawn(b.revocations.clone().run_revocations(stop.clone())),
        tokio::spawn(b.revocations.clone().run_reconciler(stop.clone())),
        tokio::spawn(b.retention.clone().run_audit_archiver(stop.clone())),
        tokio::spawn(b.core().clone().run_auth_summaries(
            Duration::from_secs(lim.auth_failure_summary_seconds),
            stop.clone(),
        )),
        tokio::spawn(
            b.retention
                .clone()
                .run_audit_anchor(app.audit_anchor_file.clone(), stop.clone()),
        ),
    ];
    if app.options.reaper {
        let mut rx = stop.clone();
        background.push(tokio::spawn(b.reaper.clone().run_reaper(async move {
            let _ = rx.changed().await;
        })));
    }

    let watcher = tokio::spawn(watch_policy(app.broker.clone(), stop_rx.clone()));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::broker_server::BrokerServer<BrokerApi>>()
        .await;
    health_reporter
        .set_serving::<pb::verifier_server::VerifierServer<VerifierApi>>()
        .await;
    health_reporter
        .set_serving::<pb::admin_server::AdminServer<AdminApi>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_file_descriptor_set(crate::api::served_descriptor_set())
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(Error::internal)?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_file_descriptor_set(crate::api::served_descriptor_set())
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(Error::internal)?;

    let broker_api = BrokerApi {
        broker: app.broker.clone(),
        identity: Some(app.identity.clone()),
    };
    let verifier_api = VerifierApi {
        broker: app.broker.clone(),
        identity: Some(app.identity.clone()),
    };
    let admin_api = AdminApi {
        broker: app.broker.clone(),
        facts: app.facts.clone(),
    };
    let ext_authz_api = ExtAuthzApi {
        broker: app.broker.clone(),
        identity: Some(app.identity.clone()),
    };
    health_reporter
        .set_serving::<AuthorizationServer<ExtAuthzApi>>()
        .await;

    // Idle connections on the HTTPS listeners close sooner than on the API port: clients there
    // are proxies and OAuth clients with pools that reconnect.
    let https_idle = Duration::from_millis(lim.idle_timeout_ms.min(HTTPS_IDLE_MS));
    let forward_auth = match app.forward_auth {
        Some(listener) => {
            // The same mTLS as the API, for proxies speaking HTTP/1.1.
            let mut tls = (*tls_config).clone();
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            let (broker, max_body) = (app.broker.clone(), app.forward_auth_max_body);
            let path: Arc<str> = Arc::from(app.forward_auth_path.as_str());
            Some(tokio::spawn(serve_https(
                "forward-auth",
                listener,
                TlsAcceptor::from(Arc::new(tls)),
                app.broker.clone(),
                // Proxies are few addresses with pools of their own: no per-address cap.
                None,
                https_idle,
                move |peer: Arc<crate::api::TlsPeer>, req| {
                    let (broker, path) = (broker.clone(), path.clone());
                    async move {
                        crate::api::forward_auth::handle(
                            &broker,
                            peer.spiffe_id.as_ref(),
                            max_body,
                            &path,
                            req,
                        )
                        .await
                    }
                },
                stop_rx.clone(),
            )))
        }
        None => None,
    };
    let oauth = match app.oauth {
        Some((listener, issuer)) => {
            // The broker's SVID as server certificate; a client certificate is optional (OAuth
            // clients may authenticate with a JWT-SVID instead) but verified when presented.
            let mut tls = (*tls_config).clone();
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            let service = Arc::new(crate::api::oauth::OAuthService {
                broker: app.broker.clone(),
                identity: app.identity.clone(),
                issuer,
                metrics: app.metrics.clone(),
                remote_rate: Arc::new(crate::ratelimit::RateLimiter::new(
                    lim.requests_per_remote_per_second,
                    lim.requests_per_remote_per_second.saturating_mul(2),
                )),
            });
            Some(tokio::spawn(serve_https(
                "OAuth",
                listener,
                TlsAcceptor::from(Arc::new(tls)),
                app.broker.clone(),
                Some(lim.max_connections_per_remote),
                https_idle,
                move |peer: Arc<crate::api::TlsPeer>, req| {
                    let service = service.clone();
                    async move { service.serve(&peer, req).await }
                },
                stop_rx.clone(),
            )))
        }
        None => None,
    };
    let ops_task = tokio::spawn(serve_ops(
        ops,
        app.broker.clone(),
        app.identity.clone(),
        app.metrics.clone(),
        stop_rx.clone(),
    ));

    let mut grpc_stop = stop_rx.clone();
    let max_msg = lim.max_message_bytes;
    let grpc = tonic::transport::Server::builder()
        .max_concurrent_streams(lim.max_concurrent_streams)
        .http2_max_pending_accept_reset_streams(Some(lim.max_pending_reset_streams))
        .http2_max_local_error_reset_streams(Some(lim.max_local_error_reset_streams))
        .http2_max_header_list_size(lim.max_header_list_bytes)
        .http2_keepalive_interval(Some(Duration::from_millis(lim.keepalive_interval_ms)))
        .http2_keepalive_timeout(Some(Duration::from_millis(lim.keepalive_timeout_ms)))
        .layer(limits::RequestLimits::new(
            &lim,
            app.metrics.clone(),
            app.broker.gateway_ids().clone(),
        ))
        .layer(crate::telemetry::LatencyLayer(app.metrics.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            pb::broker_server::BrokerServer::new(broker_api).max_decoding_message_size(max_msg),
        )
        .add_service(
            pb::verifier_server::VerifierServer::new(verifier_api)
                .max_decoding_message_size(max_msg),
        )
        .add_service(
            pb::admin_server::AdminServer::new(admin_api).max_decoding_message_size(max_msg),
        )
        .add_service(AuthorizationServer::new(ext_authz_api).max_decoding_message_size(max_msg))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::ReceiverStream::new(conn_rx),
            async move {
                let _ = grpc_stop.changed().await;
            },
        );
    let grpc = tokio::spawn(grpc);

    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = accept.await;
    for task in background {
        let _ = task.await;
    }
    let _ = ops_task.await;
    if let Some(f) = forward_auth {
        let _ = f.await;
    }
    if let Some(o) = oauth {
        let _ = o.await;
    }
    let _ = watcher.await;
    // Requests in progress get up to their timeout to finish; a connection that keeps a stream
    // open past that (or never speaks HTTP/2) does not hold the shutdown up.
    let grace = Duration::from_millis(lim.request_timeout_ms);
    let mut grpc = grpc;
    match tokio::time::timeout(grace, &mut grpc).await {
        Ok(served) => served
            .map_err(Error::internal)?
            .map_err(|e| Error::Internal(format!("gRPC server: {e}")))?,
        Err(_) => {
            tracing::warn!(
                grace_ms = lim.request_timeout_ms,
                "connections still open after the shutdown grace period are dropped"
            );
            grpc.abort();
        }
    }
    // Every unit of work was durable when it answered. The last head, after every writer
    // stopped:
    app.broker
        .retention
        .anchor_audit(app.audit_anchor_file.as_deref(), &mut 0)
        .await;
    Ok(())
}

/// The HTTPS listeners besides the gRPC port (forward auth, OAuth): TLS handshakes with a
/// timeout (a client certificate is verified when presented; whether one is required is the
/// handler's business), at most [`HTTPS_CONNECTIONS`] connections at once (beyond it new
/// ones are closed at once), each served as HTTP/1.1 with its verified peer until `stop`.
#[expect(
    clippy::too_many_arguments,
    reason = "one listener, its parts named at the call"
)]
async fn serve_https<F, Fut>(
    what: &'static str,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    broker: Arc<Broker>,
    per_remote: Option<usize>,
    idle: Duration,
    handler: F,
    mut stop: watch::Receiver<bool>,
) where
    F: Fn(Arc<crate::api::TlsPeer>, hyper::Request<hyper::body::Incoming>) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = hyper::Response<http_body_util::Full<bytes::Bytes>>>
        + Send
        + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(HTTPS_CONNECTIONS));
    let remotes = per_remote.map(limits::PerRemote::new);
    loop {
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, listener = what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(remote = %remote, listener = what, "connection refused: {HTTPS_CONNECTIONS} already open");
            continue;
        };
        let remote_slot = match &remotes {
            Some(r) => match r.take(remote.ip()) {
                Some(s) => Some(s),
                None => {
                    broker.auth_failed(
                        &remote.ip().to_string(),
                        &format!("{what}: too many connections open from this address"),
                    );
                    continue;
                }
            },
            None => None,
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, broker, handler, mut stop) = (
            acceptor.clone(),
            broker.clone(),
            handler.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let _slot = (slot, remote_slot);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    broker.auth_failed(
                        &remote.ip().to_string(),
                        &format!("{what} TLS handshake: {e}"),
                    );
                    return;
                }
                Err(_) => return,
            };
            let leaf = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.as_ref().to_vec());
            let peer = Arc::new(crate::api::TlsPeer::new(remote, leaf.as_deref()));
            // A connection with no request in progress for `idle` is closed, the first request
            // included: idle keep-alive connections cannot pile up to the cap.
            let activity = limits::Activity::new();
            let mut idle_close = limits::IdleClose::new(activity.clone(), idle);
            let svc = hyper::service::service_fn(move |req| {
                let (handler, peer) = (handler.clone(), peer.clone());
                let busy = activity.begin();
                async move {
                    let answer = handler(peer, req).await;
                    drop(busy);
                    Ok::<_, std::convert::Infallible>(answer)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT)
                .max_buf_size(64 << 10)
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = std::future::poll_fn(|cx| idle_close.poll_idle(cx)) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
    }
}

/// Reloads the policy when its file changes or on SIGHUP, audited either way. A bad policy is
/// refused (logged and audited) and the previous set keeps serving.
async fn watch_policy(broker: Arc<Broker>, mut stop: watch::Receiver<bool>) {
    let Some(path) = broker.policy_file().map(|p| p.to_path_buf()) else {
        return;
    };
    let stamp = |p: &std::path::Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut last = stamp(&path);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let sighup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let sighup = std::future::pending::<()>();
        let forced = tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => false,
            _ = sighup => true,
        };
        let now = stamp(&path);
        if forced || now != last {
            last = now;
            let trigger = if forced {
                "sighup"
            } else {
                "policy file watcher"
            };
            if let Err(e) = broker.admin.reload_policy_on(trigger).await {
                tracing::error!(error = %e, trigger, "policy reload");
            }
        }
    }
}

/// The ops port, plain HTTP/1 and h2c: `/healthz` (process up), `/readyz` (identity usable),
/// `/metrics` (Prometheus), and `grpc.health.v1.Health` for Kubernetes gRPC probes.
async fn serve_ops(
    listener: TcpListener,
    broker: Arc<Broker>,
    identity: Identity,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    use axum::routing::get;
    let (reporter, health) = tonic_health::server::health_reporter();
    let ready_identity = identity.clone();
    let ready_broker = broker.clone();
    let page = move |path: &'static str| {
        let (broker, identity, metrics) = (broker.clone(), identity.clone(), metrics.clone());
        get(move || {
            let (broker, identity, metrics) = (broker.clone(), identity.clone(), metrics.clone());
            async move {
                let (code, body) = ops_response(path, &broker, &identity, &metrics).await;
                (
                    axum::http::StatusCode::from_u16(code)
                        .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR),
                    [("content-type", "text/plain; version=0.0.4")],
                    body,
                )
            }
        })
    };
    // Reflection of the health service only, so `grpcurl -plaintext` works without proto files.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1();
    let mut routes = tonic::service::Routes::new(health);
    match reflection {
        Ok(r) => routes = routes.add_service(r),
        Err(e) => tracing::warn!(error = %e, "ops port: no reflection service"),
    }
    let router = routes
        .into_axum_router()
        .route("/healthz", page("/healthz"))
        .route("/readyz", page("/readyz"))
        .route("/metrics", page("/metrics"));
    // gRPC health follows readiness: NOT_SERVING while the broker has no usable SVID.
    let mut watch_stop = stop.clone();
    let watcher = tokio::spawn(async move {
        loop {
            let status = if ready_identity.is_ready() && ready_broker.ready().await.is_ok() {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = watch_stop.changed() => return,
            }
        }
    });
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        })
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "ops server failed");
    }
    let _ = watcher.await;
}

async fn ops_response(
    path: &str,
    broker: &Broker,
    identity: &Identity,
    metrics: &Metrics,
) -> (u16, String) {
    match path {
        "/healthz" => (200, "ok\n".into()),
        "/readyz" => {
            if !identity.is_ready() {
                (
                    503,
                    "not ready: no usable SVID from the identity source\n".into(),
                )
            } else if let Err(e) = broker.ready().await {
                (503, format!("not ready: {e}\n"))
            } else {
                (200, "ready\n".into())
            }
        }
        "/metrics" => {
            let counts = broker.store().counts().await.unwrap_or_default();
            let svid_secs = identity
                .svid_not_after()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0.0, |d| d.as_secs_f64());
            let (policies, _) = broker.policy().info();
            let (debt, oldest) = broker.revocations.revocation_debt().await;
            (
                200,
                metrics.render(&[
                    (
                        "revocation_debt",
                        "Upstream revocations queued and not yet done.",
                        debt as f64,
                    ),
                    (
                        "revocation_oldest_pending_seconds",
                        "Age of the oldest queued upstream revocation (0 when none).",
                        oldest,
                    ),
                    ("active_tasks", "Tasks not yet ended.", counts.tasks as f64),
                    (
                        "active_credentials",
                        "Credentials not yet revoked or expired.",
                        counts.credentials as f64,
                    ),
                    ("policies", "Policies in the serving set.", policies as f64),
                    (
                        "audit_head_sequence",
                        "Sequence number of the last audit entry (it never goes down; the logs carry its hash as event audit_anchor).",
                        broker.retention.audit_head().await.map_or(0, |h| h.seq) as f64,
                    ),
                    (
                        "svid_expiry_timestamp_seconds",
                        "Expiry of the broker's own X.509-SVID.",
                        svid_secs,
                    ),
                    (
                        "ready",
                        "1 when the broker has a usable SVID.",
                        if identity.is_ready() { 1.0 } else { 0.0 },
                    ),
                ]),
            )
        }
        _ => (404, "not found\n".into()),
    }
}
