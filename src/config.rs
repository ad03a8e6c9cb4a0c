//! Broker configuration: a TOML file, `JITBROKER_…` environment overrides, secrets by file path.
//! Unknown keys are an error, so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::SpiffeId;

/// Longest TTL anyone may configure: a day. Credentials here are meant to live for minutes.
pub const TTL_CEILING_SECONDS: u64 = 86_400;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_ops_listen")]
    pub ops_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub kek_file: PathBuf,
    pub policy_file: PathBuf,
    #[serde(default)]
    pub admin_ids: Vec<String>,
    #[serde(default)]
    pub approver_ids: Vec<String>,
    #[serde(default = "default_max_ttl")]
    pub max_ttl_seconds: u64,
    #[serde(default = "default_ttl")]
    pub default_ttl_seconds: u64,
    #[serde(default = "default_max_tasks")]
    pub max_active_tasks_per_identity: u64,
    #[serde(default = "default_max_creds")]
    pub max_credentials_per_task: u64,
    /// How long a granted approval stays usable (it is single-use either way).
    #[serde(default = "default_approval_ttl")]
    pub approval_ttl_seconds: u64,
    /// Hops of delegation allowed below a root task.
    #[serde(default = "default_delegation_depth")]
    pub max_delegation_depth: u32,
    #[serde(default)]
    pub log_format: LogFormat,
    #[serde(default)]
    pub jwt_issuer: Option<String>,
    pub identity: IdentityConfig,
    #[serde(default)]
    pub resources: BTreeMap<String, ResourceConfig>,
    #[serde(default)]
    pub revocation: RevocationConfig,
    #[serde(default)]
    pub retention: RetentionConfig,
    #[serde(default)]
    pub store: StoreConfig,
    /// Tool calls decided for gateways (Envoy ext_authz); absent = no gateway may ask.
    #[serde(default)]
    pub gateway: Option<crate::gateway::GatewayConfig>,
    /// The OAuth 2 authorization-server surface (docs/oauth.md); absent = not served.
    #[serde(default)]
    pub oauth: Option<OAuthConfig>,
    #[serde(default)]
    pub server: ServerConfig,
}

/// `[oauth]`: the HTTPS listener that speaks OAuth 2 (metadata, token endpoint, introspection,
/// revocation, JWKS) for MCP servers and gateways that do not speak the gRPC API.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthConfig {
    pub listen: SocketAddr,
    /// The issuer identifier: `https://host[:port][/path]`, no query or fragment, no trailing
    /// slash. Endpoints live under it; JWT credentials carry it as `iss`.
    pub issuer: String,
    /// Life of an access token when the request does not cap it further.
    #[serde(default = "default_access_token_ttl")]
    pub access_token_ttl_seconds: u64,
    /// SPIFFE IDs that may exchange an agent's token for a downstream one (RFC 8693).
    #[serde(default)]
    pub token_exchange_actors: Vec<String>,
}

impl OAuthConfig {
    fn validate(&self, cfg: &Config) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("[oauth] {m}")));
        let iss = &self.issuer;
        let Some(rest) = iss.strip_prefix("https://") else {
            return bad(format!("issuer = {iss:?} must start with https://"));
        };
        let host = rest.split('/').next().unwrap_or("");
        if host.is_empty()
            || iss.contains(['?', '#', ' ', '"', '\\'])
            || iss.ends_with('/')
            || iss.len() > 512
            || !iss.is_ascii()
        {
            return bad(format!(
                "issuer = {iss:?} must be https://host[:port][/path] with no query, fragment, \
                 white space or trailing slash"
            ));
        }
        if !(1..=cfg.max_ttl_seconds).contains(&self.access_token_ttl_seconds) {
            return bad(format!(
                "access_token_ttl_seconds = {} must be between 1 and max_ttl_seconds ({})",
                self.access_token_ttl_seconds, cfg.max_ttl_seconds
            ));
        }
        for a in &self.token_exchange_actors {
            SpiffeId::parse("token_exchange_actors", a)
                .map_err(|e| Error::Config(format!("[oauth] {e}")))?;
        }
        if cfg.identity.jwt_audience.is_none() {
            return bad(
                "needs identity.jwt_audience: JWT-SVID assertions are verified with the bundles it \
                 enables"
                    .into(),
            );
        }
        if let Some(j) = &cfg.jwt_issuer
            && j != iss
        {
            return bad(format!(
                "issuer = {iss:?} differs from jwt_issuer = {j:?}: with [oauth] every JWT carries \
                 the OAuth issuer; remove jwt_issuer or make them equal"
            ));
        }
        if self.listen == cfg.listen || self.listen == cfg.ops_listen {
            return bad(format!(
                "listen = {} is already the API or ops address",
                self.listen
            ));
        }
        Ok(())
    }
}

/// Checks an RFC 8707 resource indicator: an absolute http(s) URI without a fragment.
pub fn check_resource_indicator(field: &str, uri: &str) -> Result<()> {
    let ok = (uri.starts_with("https://") || uri.starts_with("http://"))
        && uri.len() <= 512
        && !uri.contains('#')
        && uri.bytes().all(|b| b.is_ascii_graphic())
        && uri
            .split("://")
            .nth(1)
            .is_some_and(|r| !r.is_empty() && !r.starts_with('/'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "{} is not an absolute http(s) URI without a fragment",
                crate::model::preview(uri)
            ),
        ))
    }
}

/// `[server]`: limits of the API port. Everything here bounds what a client, authenticated or
/// not, can make the broker hold: connections, streams, requests in progress, bytes buffered
/// and time.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Open connections (TLS handshakes included). Beyond it new connections wait in the
    /// kernel's accept queue until one closes.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Open connections from one IP address. Beyond it a new connection is closed at once.
    #[serde(default = "default_max_connections_per_remote")]
    pub max_connections_per_remote: usize,
    /// HTTP/2 streams (requests) one connection may have open at once.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// Requests being handled at once, over all connections. A request that finds no room
    /// within its timeout is answered `RESOURCE_EXHAUSTED`.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// A request not answered within this is answered `DEADLINE_EXCEEDED` (a request body still
    /// arriving by then is cut off).
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: u64,
    /// A TLS handshake not done within this is dropped.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_ms: u64,
    /// A connection with no request in progress for this long is closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_ms: u64,
    /// HTTP/2 PING interval, and how long an unanswered PING waits before the connection is
    /// closed as dead.
    #[serde(default = "default_keepalive_interval")]
    pub keepalive_interval_ms: u64,
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout_ms: u64,
    /// Streams a client may reset before the broker accepted them, before the connection is
    /// closed (HTTP/2 rapid-reset protection).
    #[serde(default = "default_max_pending_reset_streams")]
    pub max_pending_reset_streams: usize,
    /// Streams the broker may reset for a client's protocol errors before it closes the
    /// connection.
    #[serde(default = "default_max_local_error_reset_streams")]
    pub max_local_error_reset_streams: usize,
    /// Largest request message, in bytes. It is read before the caller is authenticated, so it
    /// stays small; the largest valid request (an `Introspect` of a 16 KiB secret) fits.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Largest block of request headers, in bytes (a JWT-SVID travels in one).
    #[serde(default = "default_max_header_list_bytes")]
    pub max_header_list_bytes: u32,
    /// Requests per second from one IP address (bursts of twice as many), authenticated or
    /// not; beyond it `RESOURCE_EXHAUSTED`.
    #[serde(default = "default_requests_per_remote")]
    pub requests_per_remote_per_second: u32,
    /// New connections per second from one IP address (bursts of twice as many); beyond it a
    /// connection is closed before its TLS handshake.
    #[serde(default = "default_connections_per_remote")]
    pub connections_per_remote_per_second: u32,
    /// Requests per second from one SPIFFE ID (bursts of twice as many); beyond it
    /// `RESOURCE_EXHAUSTED`.
    #[serde(default = "default_requests_per_identity")]
    pub requests_per_identity_per_second: u32,
    /// Refused authentications are counted per remote address and audited as one summary per
    /// address this often (never one entry per attempt).
    #[serde(default = "default_auth_failure_summary")]
    pub auth_failure_summary_seconds: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            max_connections_per_remote: default_max_connections_per_remote(),
            max_concurrent_streams: default_max_concurrent_streams(),
            max_concurrent_requests: default_max_concurrent_requests(),
            request_timeout_ms: default_request_timeout(),
            handshake_timeout_ms: default_handshake_timeout(),
            idle_timeout_ms: default_idle_timeout(),
            keepalive_interval_ms: default_keepalive_interval(),
            keepalive_timeout_ms: default_keepalive_timeout(),
            max_pending_reset_streams: default_max_pending_reset_streams(),
            max_local_error_reset_streams: default_max_local_error_reset_streams(),
            max_message_bytes: default_max_message_bytes(),
            max_header_list_bytes: default_max_header_list_bytes(),
            requests_per_remote_per_second: default_requests_per_remote(),
            connections_per_remote_per_second: default_connections_per_remote(),
            requests_per_identity_per_second: default_requests_per_identity(),
            auth_failure_summary_seconds: default_auth_failure_summary(),
        }
    }
}

/// Smallest `server.max_message_bytes`: an `Introspect` of the longest secret must fit.
pub const MIN_MESSAGE_BYTES: usize = 20 * 1024;

/// `[store]`: the data store's memory.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// sled's page cache, in MiB (approximate: RSS adds the runtime, buffers and allocator
    /// slack on top). Size the process's memory limit well above it.
    #[serde(default = "default_cache_mb")]
    pub cache_mb: u64,
    /// Free space (MiB) the file system of `data_dir` must keep: under it every write is refused
    /// with `UNAVAILABLE` naming the disk, and `/readyz` fails, until space is freed.
    #[serde(default = "default_min_free_mb")]
    pub min_free_mb: u64,
    /// `sled` (embedded, the default: one replica) or `postgres` (several replicas share one
    /// database; docs/ha.md).
    #[serde(default)]
    pub engine: StoreEngine,
    /// `postgres`: a file holding the connection string (libpq `key=value` or a
    /// `postgresql://` URL; several hosts with `target_session_attrs=read-write` follow a
    /// failover).
    #[serde(default)]
    pub dsn_file: Option<PathBuf>,
    /// `postgres`: CA certificates (PEM) of the server's certificate; the connection then uses
    /// verified TLS. Required unless every host is on loopback.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `postgres`: connections per replica in each of its two pools (units of work, reads).
    #[serde(default = "default_store_pool")]
    pub pool_size: usize,
    /// How long a lease on singleton work (audit archival) lasts unless renewed.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_seconds: u64,
    /// `postgres`: `/readyz` fails while this replica's clock and the database's differ by
    /// more (replicas judge expiry by their own clocks).
    #[serde(default = "default_max_clock_skew")]
    pub max_clock_skew_ms: u64,
}

/// The storage engine (`[store] engine`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreEngine {
    #[default]
    Sled,
    Postgres,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            cache_mb: default_cache_mb(),
            min_free_mb: default_min_free_mb(),
            engine: StoreEngine::default(),
            dsn_file: None,
            ca_file: None,
            pool_size: default_store_pool(),
            lease_ttl_seconds: default_lease_ttl(),
            max_clock_skew_ms: default_max_clock_skew(),
        }
    }
}

impl StoreConfig {
    pub fn cache_bytes(&self) -> u64 {
        self.cache_mb << 20
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Spire,
    Files,
    Dev,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Spire => "spire",
            Self::Files => "files",
            Self::Dev => "dev",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    pub source: SourceKind,
    pub trust_domain: String,
    #[serde(default)]
    pub authorized_trust_domains: Vec<String>,
    #[serde(default)]
    pub workload_api_socket: Option<String>,
    /// Enables JWT-SVID authentication for this audience (client certificates become optional
    /// at the TLS layer; every request still needs one valid identity).
    #[serde(default)]
    pub jwt_audience: Option<String>,
    /// `dev` and `files` sources: bundles (PEM) of federated trust domains that may call (they
    /// must also be in `authorized_trust_domains`). SPIRE delivers federated bundles itself.
    #[serde(default)]
    pub federated_bundle_files: BTreeMap<String, PathBuf>,
    /// `files` source: JSON `{ "<trust domain>": <JWKS>, … }`, reloaded when it changes.
    #[serde(default)]
    pub jwt_bundle_file: Option<PathBuf>,
    #[serde(default)]
    pub svid_file: Option<PathBuf>,
    #[serde(default)]
    pub svid_key_file: Option<PathBuf>,
    #[serde(default)]
    pub bundle_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    Token,
    Jwt,
    X509,
    Postgres,
}

impl ResourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::Jwt => "jwt",
            Self::X509 => "x509",
            Self::Postgres => "postgres",
        }
    }
}

/// `[resources.NAME.postgres]`: how the broker makes per-credential login roles.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// A file holding the admin connection string (libpq `key=value` form or a
    /// `postgresql://` URL). The role needs CREATEROLE, the grant option on what the statements
    /// hand out and, on PostgreSQL 16+, the admin option on the group roles; no superuser.
    pub admin_dsn_file: PathBuf,
    /// Every role the broker makes starts with this; the reconciler drops unknown ones.
    #[serde(default = "default_role_prefix")]
    pub role_prefix: String,
    /// What agents connect to; defaults to the admin connection's host, port and database.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub database: Option<String>,
    /// Per action: group roles to join and GRANT statements (`{role}` is the new role).
    #[serde(default)]
    pub grants: BTreeMap<String, PostgresGrant>,
    /// CA certificates (PEM) that sign the server's certificate: the admin connection then
    /// requires TLS and verifies the server. Without it the admin connection is plaintext, which
    /// is accepted only for a server on the loopback interface.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Admin sessions kept open to the server: creates and drops run on this many at once.
    #[serde(default = "default_pg_pool")]
    pub pool_size: usize,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresGrant {
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub statements: Vec<String>,
}

/// `[retention]`: how long ended records stay in the store, and how much of the audit chain
/// stays in the store before older entries move to archive segment files (DESIGN §7, §9).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// An ended task and its credentials (records only: secrets go when they end) are deleted
    /// this long after the task ended. Until then `Admin.GetTask`/`ListTasks` show them and an
    /// idempotent retry finds them.
    #[serde(default = "default_ended_records")]
    pub ended_records_seconds: u64,
    /// Audit entries kept in the store; older ones are archived once a whole segment is due.
    #[serde(default = "default_audit_in_store")]
    pub audit_entries_in_store: u64,
    /// Entries per archive segment file.
    #[serde(default = "default_audit_segment")]
    pub audit_segment_entries: u64,
    /// Where archive segments are written (default: `<data_dir>/audit-archive`).
    #[serde(default)]
    pub audit_archive_dir: Option<PathBuf>,
    /// A file outside the data volume where the audit chain's head (sequence, hash, time and
    /// the blocked identities) is written every minute and at shutdown. At start a store whose
    /// chain lacks that head was restored from an older backup or lost its tail: the broker
    /// says what that rolls back, audits it, and blocks again the identities blocked then.
    #[serde(default)]
    pub audit_anchor_file: Option<PathBuf>,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            ended_records_seconds: default_ended_records(),
            audit_entries_in_store: default_audit_in_store(),
            audit_segment_entries: default_audit_segment(),
            audit_archive_dir: None,
            audit_anchor_file: None,
        }
    }
}

/// `[revocation]`: the durable queue of upstream revocations (DESIGN §8).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationConfig {
    /// First retry delay; doubles per failed attempt up to `backoff_max_ms`. Never gives up.
    #[serde(default = "default_backoff_initial")]
    pub backoff_initial_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    /// One upstream call (create, revoke, list) longer than this counts as failed.
    #[serde(default = "default_attempt_timeout")]
    pub attempt_timeout_ms: u64,
    /// How often the reconciler compares upstream accounts with the ledger (also at start).
    #[serde(default = "default_reconcile_interval")]
    pub reconcile_interval_seconds: u64,
}

impl Default for RevocationConfig {
    fn default() -> Self {
        Self {
            backoff_initial_ms: default_backoff_initial(),
            backoff_max_ms: default_backoff_max(),
            attempt_timeout_ms: default_attempt_timeout(),
            reconcile_interval_seconds: default_reconcile_interval(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    pub kind: ResourceKind,
    pub actions: Vec<String>,
    #[serde(default)]
    pub verifiers: Vec<String>,
    #[serde(default)]
    pub max_ttl_seconds: Option<u64>,
    /// Required for `kind = "postgres"`.
    #[serde(default)]
    pub postgres: Option<PostgresConfig>,
    /// How a gateway injects this resource's credential into the upstream request.
    #[serde(default)]
    pub inject: Option<crate::gateway::InjectConfig>,
    /// The RFC 8707 resource indicator (a URI) that names this resource to OAuth clients; its
    /// access tokens carry it as `aud` (docs/oauth.md).
    #[serde(default)]
    pub oauth_resource: Option<String>,
}

/// Defines serde's `default = "…"` functions, each returning its value.
macro_rules! serde_defaults {
    ($($name:ident: $ty:ty = $value:expr;)*) => {
        $(fn $name() -> $ty {
            $value
        })*
    };
}

serde_defaults! {
    default_access_token_ttl: u64 = 300;
    default_max_connections: usize = 1024;
    default_max_connections_per_remote: usize = 64;
    default_max_concurrent_streams: u32 = 32;
    default_max_concurrent_requests: usize = 256;
    default_request_timeout: u64 = 30_000;
    default_handshake_timeout: u64 = 10_000;
    default_idle_timeout: u64 = 300_000;
    default_keepalive_interval: u64 = 30_000;
    default_keepalive_timeout: u64 = 20_000;
    default_max_pending_reset_streams: usize = 20;
    default_max_local_error_reset_streams: usize = 256;
    default_max_message_bytes: usize = 64 * 1024;
    default_max_header_list_bytes: u32 = 16 * 1024;
    default_requests_per_remote: u32 = 1000;
    default_connections_per_remote: u32 = 50;
    default_requests_per_identity: u32 = 200;
    default_auth_failure_summary: u64 = 60;
    default_min_free_mb: u64 = 64;
    default_cache_mb: u64 = crate::store::sled_store::DEFAULT_CACHE_BYTES >> 20;
    default_pg_pool: usize = 8;
    default_store_pool: usize = 16;
    default_lease_ttl: u64 = 15;
    default_max_clock_skew: u64 = 1_000;
    default_role_prefix: String = "jb_".to_owned();
    default_ended_records: u64 = 86_400;
    // A short tail: the store is for what changes; the archive is where the trail is kept.
    default_audit_in_store: u64 = 100_000;
    default_audit_segment: u64 = 50_000;
    default_backoff_initial: u64 = 500;
    // A revocation waits at most this long after the upstream comes back.
    default_backoff_max: u64 = 5_000;
    default_attempt_timeout: u64 = 10_000;
    default_reconcile_interval: u64 = 300;
    default_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8443));
    default_ops_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 9090));
    default_max_ttl: u64 = 3600;
    default_ttl: u64 = 900;
    default_max_tasks: u64 = 100;
    default_max_creds: u64 = 64;
    default_approval_ttl: u64 = 900;
    default_delegation_depth: u32 = 3;
}

pub use crate::model::MAX_NAME_LEN;

/// Resource and action names: printable, no white space or quotes, so they are safe in Cedar
/// entity ids, metrics labels and log lines.
/// The largest configuration text accepted: far above any real one, and a bound on what a parse
/// of a wrong file (a log, a binary) may allocate.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// Refuses a text of `len` bytes over `max`, naming where it came from and what it should be.
pub fn check_text_size(origin: &str, what: &str, len: usize, max: usize) -> Result<()> {
    if len > max {
        return Err(Error::Config(format!(
            "{origin}: is {len} bytes; a {what} holds at most {max}: is this the right file?"
        )));
    }
    Ok(())
}

pub use crate::model::check_name;

impl Config {
    /// Reads the file, applies environment overrides, validates.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!("cannot read config file {}: {e}", path.display()))
        })?;
        Self::from_toml(&text, &path.display().to_string(), |k| {
            std::env::var(k).ok()
        })
    }

    /// Parses config text; `env` looks up `JITBROKER_…` overrides (injected so tests need no
    /// process environment).
    pub fn from_toml(
        text: &str,
        origin: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        check_text_size(origin, "configuration", text.len(), MAX_CONFIG_BYTES)?;
        let mut cfg: Config = toml::from_str(text)
            .map_err(|e| Error::Config(format!("{origin}: {}", e.to_string().trim_end())))?;
        cfg.apply_env(env)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<()> {
        let addr = |k: &str, v: String| -> Result<SocketAddr> {
            v.parse()
                .map_err(|e| Error::Config(format!("{k}={v:?} is not an address: {e}")))
        };
        if let Some(v) = env("JITBROKER_LISTEN") {
            self.listen = addr("JITBROKER_LISTEN", v)?;
        }
        if let Some(v) = env("JITBROKER_OPS_LISTEN") {
            self.ops_listen = addr("JITBROKER_OPS_LISTEN", v)?;
        }
        if let Some(v) = env("JITBROKER_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = env("JITBROKER_KEK_FILE") {
            self.kek_file = v.into();
        }
        if let Some(v) = env("JITBROKER_POLICY_FILE") {
            self.policy_file = v.into();
        }
        if let Some(v) = env("JITBROKER_LOG_FORMAT") {
            self.log_format = match v.as_str() {
                "json" => LogFormat::Json,
                "plain" => LogFormat::Plain,
                _ => {
                    return Err(Error::Config(format!(
                        "JITBROKER_LOG_FORMAT={v:?}: expected \"json\" or \"plain\""
                    )));
                }
            };
        }
        if let Some(v) = env("JITBROKER_WORKLOAD_API_SOCKET") {
            self.identity.workload_api_socket = Some(v);
        }
        Ok(())
    }

    fn validate(&mut self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        let td = &self.identity.trust_domain;
        SpiffeId::parse("identity.trust_domain", &format!("spiffe://{td}"))
            .map_err(|e| Error::Config(e.to_string()))?;
        if self.identity.authorized_trust_domains.is_empty() {
            self.identity.authorized_trust_domains = vec![td.clone()];
        }
        for (field, ids) in [
            ("admin_ids", &self.admin_ids),
            ("approver_ids", &self.approver_ids),
        ] {
            for id in ids {
                SpiffeId::parse(field, id).map_err(|e| Error::Config(e.to_string()))?;
            }
        }
        if self.max_ttl_seconds == 0 || self.max_ttl_seconds > TTL_CEILING_SECONDS {
            return bad(format!(
                "max_ttl_seconds = {} must be between 1 and {TTL_CEILING_SECONDS}",
                self.max_ttl_seconds
            ));
        }
        if self.default_ttl_seconds == 0 || self.default_ttl_seconds > self.max_ttl_seconds {
            return bad(format!(
                "default_ttl_seconds = {} must be between 1 and max_ttl_seconds ({})",
                self.default_ttl_seconds, self.max_ttl_seconds
            ));
        }
        if self.max_active_tasks_per_identity == 0 || self.max_credentials_per_task == 0 {
            return bad(
                "max_active_tasks_per_identity and max_credentials_per_task must be at least 1"
                    .into(),
            );
        }
        if let Some(aud) = &self.identity.jwt_audience
            && aud.trim().is_empty()
        {
            return bad("identity.jwt_audience must not be empty (or remove the key)".into());
        }
        match (
            self.identity.source,
            &self.identity.jwt_audience,
            &self.identity.jwt_bundle_file,
        ) {
            (SourceKind::Files, Some(_), None) => {
                return bad(
                    "identity.jwt_bundle_file is required when identity.source = \"files\" and \
                     identity.jwt_audience is set"
                        .into(),
                );
            }
            (_, None, Some(_)) => {
                return bad(
                    "identity.jwt_bundle_file is set but identity.jwt_audience is not; set the \
                     audience to enable JWT-SVIDs, or remove the file"
                        .into(),
                );
            }
            (SourceKind::Spire | SourceKind::Dev, _, Some(_)) => {
                return bad(format!(
                    "identity.jwt_bundle_file only applies to identity.source = \"files\" \
                     (source {:?} has its own JWT bundles)",
                    self.identity.source.as_str()
                ));
            }
            _ => {}
        }
        if self.identity.source == SourceKind::Spire
            && !self.identity.federated_bundle_files.is_empty()
        {
            return bad(
                "identity.federated_bundle_files does not apply to source = \"spire\": SPIRE \
                 delivers federated bundles through the Workload API (configure federation in \
                 SPIRE and list the trust domains in authorized_trust_domains)"
                    .into(),
            );
        }
        for td in self.identity.federated_bundle_files.keys() {
            SpiffeId::parse("identity.federated_bundle_files", &format!("spiffe://{td}"))
                .map_err(|e| Error::Config(e.to_string()))?;
            if *td == self.identity.trust_domain {
                return bad(format!(
                    "identity.federated_bundle_files: {td} is the broker's own trust domain"
                ));
            }
        }
        if self.identity.source == SourceKind::Files {
            for (k, v) in [
                ("identity.svid_file", &self.identity.svid_file),
                ("identity.svid_key_file", &self.identity.svid_key_file),
                ("identity.bundle_file", &self.identity.bundle_file),
            ] {
                if v.is_none() {
                    return bad(format!("{k} is required when identity.source = \"files\""));
                }
            }
        }
        for (name, r) in &self.resources {
            check_name("resource name", name)
                .map_err(|e| Error::Config(format!("[resources.{name}]: {e}")))?;
            if r.actions.is_empty() {
                return bad(format!("[resources.{name}] actions must list at least one"));
            }
            for a in &r.actions {
                check_name("action", a)
                    .map_err(|e| Error::Config(format!("[resources.{name}]: {e}")))?;
            }
            for v in &r.verifiers {
                SpiffeId::parse("verifiers", v)
                    .map_err(|e| Error::Config(format!("[resources.{name}]: {e}")))?;
            }
            match (r.kind, &r.postgres) {
                (ResourceKind::Postgres, None) => {
                    return bad(format!(
                        "[resources.{name}] kind = \"postgres\" needs a [resources.{name}.postgres] \
                         section (admin_dsn_file, grants)"
                    ));
                }
                (ResourceKind::Postgres, Some(pg)) => {
                    let p = &pg.role_prefix;
                    let ok = (2..=20).contains(&p.len())
                        && p.starts_with(|c: char| c.is_ascii_lowercase())
                        && p.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                    if !ok {
                        return bad(format!(
                            "[resources.{name}.postgres] role_prefix = {p:?}: 2 to 20 of a-z, 0-9 \
                             and _, starting with a letter"
                        ));
                    }
                    if !(1..=64).contains(&pg.pool_size) {
                        return bad(format!(
                            "[resources.{name}.postgres] pool_size = {}: must be between 1 and 64",
                            pg.pool_size
                        ));
                    }
                    for (action, g) in &pg.grants {
                        if !r.actions.contains(action) {
                            return bad(format!(
                                "[resources.{name}.postgres.grants] {action:?} is not one of the \
                                 resource's actions {:?}",
                                r.actions
                            ));
                        }
                        for role in &g.roles {
                            if role.is_empty() || role.len() > 63 || role.contains('\0') {
                                return bad(format!(
                                    "[resources.{name}.postgres.grants.{action}] role {role:?} is \
                                     not a valid role name"
                                ));
                            }
                        }
                        for st in &g.statements {
                            if !st.contains("{role}") {
                                return bad(format!(
                                    "[resources.{name}.postgres.grants.{action}] statement {st:?} \
                                     does not mention {{role}}"
                                ));
                            }
                        }
                    }
                }
                (_, Some(_)) => {
                    return bad(format!(
                        "[resources.{name}.postgres] only applies to kind = \"postgres\""
                    ));
                }
                (_, None) => {}
            }
            if let Some(inject) = &r.inject {
                inject.validate(name, r.kind)?;
            }
            if let Some(m) = r.max_ttl_seconds
                && (m == 0 || m > self.max_ttl_seconds)
            {
                return bad(format!(
                    "[resources.{name}] max_ttl_seconds = {m} must be between 1 and \
                     max_ttl_seconds ({})",
                    self.max_ttl_seconds
                ));
            }
        }
        if let Some(g) = &self.gateway {
            g.validate(&self.resources)?;
        }
        let mut indicators = BTreeMap::new();
        for (name, r) in &self.resources {
            let Some(uri) = &r.oauth_resource else {
                continue;
            };
            check_resource_indicator("oauth_resource", uri)
                .map_err(|e| Error::Config(format!("[resources.{name}]: {e}")))?;
            if !matches!(r.kind, ResourceKind::Jwt | ResourceKind::Token) {
                return bad(format!(
                    "[resources.{name}] oauth_resource: only jwt and token resources issue access \
                     tokens (this one is {})",
                    r.kind.as_str()
                ));
            }
            if let Some(other) = indicators.insert(uri.clone(), name.clone()) {
                return bad(format!(
                    "[resources.{name}] oauth_resource {uri:?} is also the indicator of resource \
                     {other}"
                ));
            }
        }
        if let Some(o) = &self.oauth {
            o.validate(self)?;
        }
        let rt = &self.retention;
        if rt.ended_records_seconds == 0
            || rt.ended_records_seconds > 366 * 86_400
            || rt.audit_segment_entries == 0
            || rt.audit_segment_entries > 10_000_000
        {
            return bad(format!(
                "[retention] needs ended_records_seconds between 1 and 31622400 and \
                 audit_segment_entries between 1 and 10000000 (got ended_records_seconds = {}, \
                 audit_segment_entries = {})",
                rt.ended_records_seconds, rt.audit_segment_entries
            ));
        }
        if !(16..=65_536).contains(&self.store.cache_mb) {
            return bad(format!(
                "[store] cache_mb = {} must be between 16 and 65536",
                self.store.cache_mb
            ));
        }
        let st = &self.store;
        match st.engine {
            StoreEngine::Postgres if st.dsn_file.is_none() => {
                return bad(
                    "[store] engine = \"postgres\" needs dsn_file (a file holding the \
                     connection string)"
                        .into(),
                );
            }
            StoreEngine::Sled if st.dsn_file.is_some() || st.ca_file.is_some() => {
                return bad(
                    "[store] dsn_file and ca_file are for engine = \"postgres\"; the \
                     engine is sled"
                        .into(),
                );
            }
            _ => {}
        }
        for (key, v, lo, hi) in [
            ("pool_size", st.pool_size as u64, 1, 1024),
            ("lease_ttl_seconds", st.lease_ttl_seconds, 5, 3600),
            ("max_clock_skew_ms", st.max_clock_skew_ms, 1, 60_000),
        ] {
            if !(lo..=hi).contains(&v) {
                return bad(format!("[store] {key} = {v} must be between {lo} and {hi}"));
            }
        }
        let sv = &self.server;
        let positive = [
            ("max_connections", sv.max_connections as u64),
            (
                "max_connections_per_remote",
                sv.max_connections_per_remote as u64,
            ),
            (
                "max_concurrent_streams",
                u64::from(sv.max_concurrent_streams),
            ),
            ("max_concurrent_requests", sv.max_concurrent_requests as u64),
            ("request_timeout_ms", sv.request_timeout_ms),
            ("handshake_timeout_ms", sv.handshake_timeout_ms),
            ("idle_timeout_ms", sv.idle_timeout_ms),
            ("keepalive_interval_ms", sv.keepalive_interval_ms),
            ("keepalive_timeout_ms", sv.keepalive_timeout_ms),
            (
                "max_pending_reset_streams",
                sv.max_pending_reset_streams as u64,
            ),
            (
                "max_local_error_reset_streams",
                sv.max_local_error_reset_streams as u64,
            ),
            (
                "requests_per_remote_per_second",
                u64::from(sv.requests_per_remote_per_second),
            ),
            (
                "connections_per_remote_per_second",
                u64::from(sv.connections_per_remote_per_second),
            ),
            (
                "requests_per_identity_per_second",
                u64::from(sv.requests_per_identity_per_second),
            ),
            (
                "auth_failure_summary_seconds",
                sv.auth_failure_summary_seconds,
            ),
        ];
        if let Some((k, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return bad(format!("[server] {k} must be at least 1"));
        }
        if !(MIN_MESSAGE_BYTES..=4 << 20).contains(&sv.max_message_bytes) {
            return bad(format!(
                "[server] max_message_bytes = {} must be between {MIN_MESSAGE_BYTES} and {}",
                sv.max_message_bytes,
                4 << 20
            ));
        }
        if !(4096..=1 << 20).contains(&sv.max_header_list_bytes) {
            return bad(format!(
                "[server] max_header_list_bytes = {} must be between 4096 and {}",
                sv.max_header_list_bytes,
                1 << 20
            ));
        }
        let rv = &self.revocation;
        if rv.backoff_initial_ms == 0
            || rv.backoff_max_ms < rv.backoff_initial_ms
            || rv.attempt_timeout_ms == 0
            || rv.reconcile_interval_seconds == 0
        {
            return bad(format!(
                "[revocation] needs backoff_initial_ms >= 1, backoff_max_ms >= backoff_initial_ms, \
                 attempt_timeout_ms >= 1 and reconcile_interval_seconds >= 1 (got {rv:?})"
            ));
        }
        Ok(())
    }

    /// Directory of the audit archive segments.
    pub fn audit_archive_dir(&self) -> PathBuf {
        self.retention
            .audit_archive_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("audit-archive"))
    }

    /// The JWT `iss` claim.
    pub fn jwt_issuer(&self) -> String {
        self.oauth
            .as_ref()
            .map(|o| o.issuer.clone())
            .or_else(|| self.jwt_issuer.clone())
            .unwrap_or_else(|| format!("spiffe://{}/jitbroker", self.identity.trust_domain))
    }

    /// Every action any resource declares (the Cedar schema's action list).
    pub fn actions(&self) -> Vec<String> {
        let mut a: Vec<String> = self
            .resources
            .values()
            .flat_map(|r| r.actions.iter().cloned())
            .collect();
        a.sort();
        a.dedup();
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
data_dir = "/tmp/x"
kek_file = "/tmp/x/kek"
policy_file = "/tmp/x/policy.cedar"
[identity]
source = "dev"
trust_domain = "jitbroker.dev"
[resources.demo-token]
kind = "token"
actions = ["read"]
verifiers = ["spiffe://jitbroker.dev/tool/demo"]
"#;

    #[test]
    fn parses_and_defaults() {
        let c = Config::from_toml(MIN, "t", |_| None).unwrap();
        assert_eq!(c.identity.authorized_trust_domains, vec!["jitbroker.dev"]);
        assert_eq!(c.actions(), vec!["read"]);
        assert_eq!(c.default_ttl_seconds, 900);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::from_toml(&format!("colour = 1\n{MIN}"), "t", |_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
        let err = Config::from_toml(&MIN.replace("kind =", "knd =\nkind ="), "t", |_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("knd"), "{err}");
    }

    #[test]
    fn env_overrides_and_validation() {
        let c = Config::from_toml(MIN, "t", |k| {
            (k == "JITBROKER_POLICY_FILE").then(|| "/etc/p.cedar".to_string())
        })
        .unwrap();
        assert_eq!(c.policy_file, PathBuf::from("/etc/p.cedar"));
        let err = Config::from_toml(MIN, "t", |k| {
            (k == "JITBROKER_LISTEN").then(|| "nope".to_string())
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("JITBROKER_LISTEN"), "{err}");
        let err = Config::from_toml(&format!("max_ttl_seconds = 0\n{MIN}"), "t", |_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_ttl_seconds"), "{err}");
    }

    /// The minimal config followed by `section`.
    fn with(section: &str) -> Result<Config> {
        Config::from_toml(&format!("{MIN}{section}"), "t", |_| None)
    }

    #[test]
    fn store_cache_default_and_bounds() {
        let c = with("").unwrap();
        assert_eq!(c.store.cache_mb, 256);
        assert_eq!(c.store.cache_bytes(), 256 << 20);
        assert_eq!(with("[store]\ncache_mb = 64\n").unwrap().store.cache_mb, 64);
        for bad in ["[store]\ncache_mb = 8\n", "[store]\ncache_mb = 100000\n"] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains("[store] cache_mb"), "{bad}: {err}");
        }
        let err = with("[store]\ncache = 1\n").unwrap_err().to_string();
        assert!(err.contains("cache"), "{err}");
    }

    #[test]
    fn retention_defaults_and_bounds() {
        let c = Config::from_toml(MIN, "t", |_| None).unwrap();
        assert_eq!(c.retention.ended_records_seconds, 86_400);
        assert_eq!(c.audit_archive_dir(), PathBuf::from("/tmp/x/audit-archive"));
        let c =
            with("[retention]\nended_records_seconds = 60\naudit_archive_dir = \"/a\"\n").unwrap();
        assert_eq!(c.retention.ended_records_seconds, 60);
        assert_eq!(c.audit_archive_dir(), PathBuf::from("/a"));
        for bad in [
            "[retention]\nended_records_seconds = 0\n",
            "[retention]\naudit_segment_entries = 0\n",
        ] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains("[retention]"), "{bad}: {err}");
        }
        let err = with("[retention]\nkeep = 1\n").unwrap_err().to_string();
        assert!(err.contains("keep"), "{err}");
    }

    #[test]
    fn server_limits_default_and_bounds() {
        let c = with("").unwrap();
        assert_eq!(c.server.max_message_bytes, 64 * 1024);
        assert_eq!(c.server.max_pending_reset_streams, 20);
        let c = with("[server]\nmax_connections = 10\nrequest_timeout_ms = 500\n").unwrap();
        assert_eq!(
            (c.server.max_connections, c.server.request_timeout_ms),
            (10, 500)
        );
        for (bad, named) in [
            ("[server]\nmax_connections = 0\n", "max_connections"),
            ("[server]\nidle_timeout_ms = 0\n", "idle_timeout_ms"),
            ("[server]\nmax_message_bytes = 100\n", "max_message_bytes"),
            (
                "[server]\nmax_header_list_bytes = 10\n",
                "max_header_list_bytes",
            ),
            ("[server]\nmax_conns = 1\n", "max_conns"),
        ] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains(named), "{bad}: {err}");
        }
    }

    #[test]
    fn postgres_pool_size_is_bounded() {
        let pg = |pool: &str| {
            let text = MIN.replace("kind = \"token\"", "kind = \"postgres\"")
                + "[resources.demo-token.postgres]\nadmin_dsn_file = \"/x\"\n"
                + pool;
            Config::from_toml(&text, "t", |_| None)
        };
        assert_eq!(
            pg("").unwrap().resources["demo-token"]
                .postgres
                .as_ref()
                .unwrap()
                .pool_size,
            8
        );
        let err = pg("pool_size = 0\n").unwrap_err().to_string();
        assert!(err.contains("pool_size"), "{err}");
        assert!(pg("pool_size = 16\n").is_ok());
    }
}
