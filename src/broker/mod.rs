//! The broker's domain logic (DESIGN §1, §8): tasks, credentials, expiry and revocation. It sees
//! neither tonic nor sled: callers arrive as verified [`SpiffeId`]s, state goes through [`Store`].

pub mod admin;
pub mod approvals;
pub mod clock;
pub mod delegation;
pub mod oauth;
pub mod reaper;
pub mod retention;
pub mod tool_calls;
pub mod upstream;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use tokio::sync::Mutex;

use crate::audit::{AuditLog, Event};
use crate::config::{self, Config, ResourceKind, RevocationConfig};
use crate::error::{Error, Result};
use crate::issuers::jwt::JwtIssuer;
use crate::issuers::x509::X509Issuer;
use crate::issuers::{IssueRequest, Issued, Upstream, token};
use crate::model::{
    CredentialId, CredentialRecord, CredentialState, Decision, Grant, GrantDecision, RevokeReason,
    Secret, SpiffeId, Task, TaskId, TaskState, UnixMillis, UpstreamObject, UpstreamState, preview,
};
use crate::policy::PolicyEngine;
use crate::ratelimit::{FailureSummaries, RateLimiter};
use crate::store::Store;
use crate::store::disk::DiskFloor;
use crate::telemetry::Metrics;
pub use clock::{Clock, ManualClock, SystemClock};

pub const MAX_PURPOSE_LEN: usize = 1024;
pub const MAX_GRANTS: usize = 32;
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_KEY_LEN: usize = 63;
pub const MAX_LABEL_VALUE_LEN: usize = 256;
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;
pub const MAX_SECRET_LEN: usize = 16 * 1024;
const LOCK_STRIPES: usize = 64;
/// JWT signing keys rotate daily.
const JWT_ROTATE_MS: i64 = 24 * 3600 * 1000;

/// Per-resource settings the broker enforces.
#[derive(Clone, Debug)]
pub struct ResourceSpec {
    pub kind: ResourceKind,
    pub actions: BTreeSet<String>,
    pub verifiers: HashSet<SpiffeId>,
    pub max_ttl_seconds: u64,
    /// How a gateway carries this resource's credential (`[resources.NAME.inject]`).
    pub inject: Option<crate::gateway::InjectConfig>,
    /// The RFC 8707 resource indicator of this resource (`oauth_resource`): the `aud` of its
    /// JWTs and what OAuth clients name it by.
    pub oauth_resource: Option<String>,
}

/// The OAuth surface's settings (`[oauth]`), as the broker needs them.
#[derive(Clone, Debug)]
pub struct OAuthLimits {
    pub issuer: String,
    pub access_token_ttl_seconds: u64,
    pub token_exchange_actors: HashSet<SpiffeId>,
}

/// The limits and roles the broker enforces, taken from [`Config`].
#[derive(Clone, Debug)]
pub struct Limits {
    pub resources: BTreeMap<String, ResourceSpec>,
    pub max_ttl_seconds: u64,
    pub default_ttl_seconds: u64,
    pub max_active_tasks_per_identity: u64,
    pub max_credentials_per_task: u64,
    pub admin_ids: HashSet<SpiffeId>,
    pub approver_ids: HashSet<SpiffeId>,
    pub authorized_trust_domains: HashSet<String>,
    /// How long an approval stays usable once granted.
    pub approval_ttl_ms: i64,
    /// How many hops of delegation below a root task are allowed.
    pub max_delegation_depth: u32,
    /// How long an ended task and its credentials stay in the store before they are deleted.
    pub ended_retention_ms: i64,
    /// Tool calls decided for gateways (`[gateway]`), and the gateways allowed to ask.
    pub gateway: Option<Arc<crate::gateway::GatewayConfig>>,
    pub gateway_ids: HashSet<SpiffeId>,
    /// `[oauth]`, when the OAuth surface is served.
    pub oauth: Option<OAuthLimits>,
}

impl Limits {
    pub fn from_config(cfg: &Config) -> Result<Self> {
        let ids = |field: &str, v: &[String]| -> Result<HashSet<SpiffeId>> {
            v.iter().map(|s| SpiffeId::parse(field, s)).collect()
        };
        let mut resources = BTreeMap::new();
        for (name, r) in &cfg.resources {
            resources.insert(
                name.clone(),
                ResourceSpec {
                    kind: r.kind,
                    actions: r.actions.iter().cloned().collect(),
                    verifiers: ids("verifiers", &r.verifiers)?,
                    max_ttl_seconds: r.max_ttl_seconds.unwrap_or(cfg.max_ttl_seconds),
                    inject: r.inject.clone(),
                    oauth_resource: r.oauth_resource.clone(),
                },
            );
        }
        Ok(Self {
            resources,
            max_ttl_seconds: cfg.max_ttl_seconds,
            default_ttl_seconds: cfg.default_ttl_seconds,
            max_active_tasks_per_identity: cfg.max_active_tasks_per_identity,
            max_credentials_per_task: cfg.max_credentials_per_task,
            admin_ids: ids("admin_ids", &cfg.admin_ids)?,
            approver_ids: ids("approver_ids", &cfg.approver_ids)?,
            approval_ttl_ms: secs_to_ms(cfg.approval_ttl_seconds),
            max_delegation_depth: cfg.max_delegation_depth,
            ended_retention_ms: secs_to_ms(cfg.retention.ended_records_seconds),
            gateway: cfg.gateway.clone().map(Arc::new),
            gateway_ids: match &cfg.gateway {
                Some(g) => ids("gateway.ids", &g.ids)?,
                None => HashSet::new(),
            },
            oauth: match &cfg.oauth {
                Some(o) => Some(OAuthLimits {
                    issuer: o.issuer.clone(),
                    access_token_ttl_seconds: o.access_token_ttl_seconds,
                    token_exchange_actors: ids(
                        "oauth.token_exchange_actors",
                        &o.token_exchange_actors,
                    )?,
                }),
                None => None,
            },
            authorized_trust_domains: cfg
                .identity
                .authorized_trust_domains
                .iter()
                .cloned()
                .collect(),
        })
    }
}

/// A `StartTask` request, already decoded from the wire.
#[derive(Clone, Debug, Default)]
pub struct StartTask {
    pub purpose: String,
    pub grants: Vec<Grant>,
    pub ttl_seconds: u32,
    pub labels: HashMap<String, String>,
    pub idempotency_key: String,
}

/// An `IssueCredential` request, already decoded from the wire.
#[derive(Clone, Debug, Default)]
pub struct IssueCredential {
    pub task_id: String,
    pub resource: String,
    pub action: String,
    pub ttl_seconds: u32,
    pub idempotency_key: String,
}

/// A credential handed to its owner: the record and the secret.
#[derive(Debug)]
pub struct IssuedCredential {
    pub record: CredentialRecord,
    pub secret: Secret,
}

/// What `Introspect` tells a verifier about an active credential.
#[derive(Clone, Debug)]
pub struct Introspection {
    pub record: CredentialRecord,
}

/// What `X509Status` says of a certificate, with the credential it belongs to.
#[derive(Clone, Debug)]
pub enum X509Status {
    /// Not a certificate of this resource that the broker knows (never issued, another resource,
    /// or its record is gone after retention): a relying party treats it as revoked.
    Unknown,
    Good(CredentialRecord),
    Revoked(CredentialRecord),
    Expired(CredentialRecord),
}

/// What `CompleteTask` ended.
#[derive(Clone, Debug, Default)]
pub struct Completed {
    pub revoked_credentials: Vec<CredentialId>,
    pub ended_tasks: Vec<TaskId>,
}

/// Broker-wide figures for `Admin.Status`.
#[derive(Clone, Debug)]
pub struct StatusInfo {
    pub active_tasks: u64,
    pub active_credentials: u64,
    pub policy_count: usize,
    pub policy_digest: String,
}

/// The task-side context of one policy decision.
#[derive(Clone, Copy)]
struct DecideCtx<'a> {
    task: Option<&'a Task>,
    purpose: &'a str,
    labels: &'a BTreeMap<String, String>,
    requested_ttl_ms: i64,
    chain: &'a [SpiffeId],
    approved: bool,
}

impl<'a> DecideCtx<'a> {
    /// The context of a decision about an existing task (an issuance or a tool call), before
    /// any approval.
    fn for_task(task: &'a Task, requested_ttl_ms: i64) -> Self {
        Self {
            task: Some(task),
            purpose: &task.purpose,
            labels: &task.labels,
            requested_ttl_ms,
            chain: &task.delegation_chain,
            approved: false,
        }
    }
}

pub struct Broker {
    store: Arc<dyn Store>,
    audit: AuditLog,
    policy: Arc<PolicyEngine>,
    jwt: JwtIssuer,
    x509: X509Issuer,
    clock: Arc<dyn Clock>,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// Identities refused everything (kill switch), mirrored from the store.
    blocked: std::sync::RwLock<HashSet<SpiffeId>>,
    policy_file: Option<std::path::PathBuf>,
    /// Serialises changes to one task (issue vs complete) and to one owner's task creation.
    stripes: Vec<Mutex<()>>,
    /// Upstream systems by resource name (PostgreSQL…), and how their revocations are retried.
    upstreams: HashMap<String, Arc<dyn Upstream>>,
    revocation: RevocationConfig,
    /// Wakes the revocation worker when something is queued.
    revoke_wake: tokio::sync::Notify,
    /// Where and when older audit entries leave the store.
    audit_archive: Option<AuditArchive>,
    /// Held by an archival step and by a verification, so a verification never sees the
    /// checkpoint of one step and the store after the next.
    archive_lock: Mutex<()>,
    /// Requests per caller (`[server] requests_per_identity_per_second`).
    identity_rate: RateLimiter<SpiffeId>,
    /// Refused authentications since the last summary, by remote address.
    auth_failures: FailureSummaries,
    /// Writes are refused while the data directory's disk is under its free-space floor.
    disk: Option<DiskFloor>,
    /// Credentials being made upstream, by task, with no lock held (they count against the
    /// task's quota meanwhile).
    issuing: InFlight,
}

/// Counts per task of issuances in progress outside the task's lock.
#[derive(Default)]
struct InFlight(std::sync::Mutex<HashMap<TaskId, u64>>);

/// One issuance in progress; dropping it ends it.
struct InFlightSlot<'a>(&'a InFlight, TaskId);

impl InFlight {
    fn count(&self, task: &TaskId) -> u64 {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(task).copied().unwrap_or(0)
    }

    fn start(&self, task: &TaskId) -> InFlightSlot<'_> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(task.clone()).or_insert(0) += 1;
        InFlightSlot(self, task.clone())
    }
}

impl Drop for InFlightSlot<'_> {
    fn drop(&mut self) {
        let mut map = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

/// Audit archival settings (`[retention]`): once the store holds `keep + segment` entries, the
/// oldest `segment` of them move to a file in `dir`.
#[derive(Clone, Debug)]
pub struct AuditArchive {
    pub dir: std::path::PathBuf,
    pub keep: u64,
    pub segment: u64,
}

fn stripe_of(key: &str) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() as usize) % LOCK_STRIPES
}

fn secs_to_ms(s: u64) -> i64 {
    (s as i64).saturating_mul(1000)
}

fn decision_name(d: Decision) -> &'static str {
    match d {
        Decision::Allowed => "ALLOWED",
        Decision::NeedsApproval => "NEEDS_APPROVAL",
        Decision::Denied => "DENIED",
    }
}

fn state_name(s: TaskState) -> &'static str {
    match s {
        TaskState::Active => "ACTIVE",
        TaskState::Completed => "COMPLETED",
        TaskState::Expired => "EXPIRED",
        TaskState::Revoked => "REVOKED",
    }
}

impl Broker {
    pub fn new(
        store: Arc<dyn Store>,
        policy: Arc<PolicyEngine>,
        clock: Arc<dyn Clock>,
        limits: Limits,
        jwt_issuer: String,
        metrics: Arc<Metrics>,
        policy_file: Option<std::path::PathBuf>,
    ) -> Result<Self> {
        let x509_resources: Vec<&str> = limits
            .resources
            .iter()
            .filter(|(_, r)| r.kind == ResourceKind::X509)
            .map(|(name, _)| name.as_str())
            .collect();
        let x509 = X509Issuer::load(store.as_ref(), &jwt_issuer, &x509_resources, clock.now())?;
        let jwt = JwtIssuer::load(
            store.as_ref(),
            jwt_issuer,
            JWT_ROTATE_MS,
            secs_to_ms(limits.max_ttl_seconds),
            clock.now(),
        )?;
        let audit = AuditLog::open(store.as_ref())?;
        let blocked = store.blocked_identities()?.into_iter().collect();
        Ok(Self {
            store,
            audit,
            policy,
            jwt,
            x509,
            clock,
            limits,
            metrics,
            blocked: std::sync::RwLock::new(blocked),
            policy_file,
            stripes: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            upstreams: HashMap::new(),
            revocation: RevocationConfig::default(),
            revoke_wake: tokio::sync::Notify::new(),
            audit_archive: None,
            archive_lock: Mutex::new(()),
            identity_rate: RateLimiter::new(u32::MAX, u32::MAX),
            auth_failures: FailureSummaries::default(),
            disk: None,
            issuing: InFlight::default(),
        })
    }

    /// Caps each caller at `per_second` requests on average (bursts of twice as many).
    pub fn with_identity_rate(mut self, per_second: u32) -> Self {
        self.identity_rate = RateLimiter::new(per_second, per_second.saturating_mul(2));
        self
    }

    /// Refuses writes while the data directory's disk is under `floor`.
    pub fn with_disk_floor(mut self, floor: DiskFloor) -> Self {
        self.disk = Some(floor);
        self
    }

    /// `Ok` while writes are accepted; `UNAVAILABLE` naming the disk under its floor.
    pub fn writable(&self) -> Result<()> {
        match &self.disk {
            Some(d) => d.check(),
            None => Ok(()),
        }
    }

    /// Takes one request from `caller`'s rate budget, or `RESOURCE_EXHAUSTED` saying when to
    /// come back.
    pub fn admit(&self, caller: &SpiffeId) -> Result<()> {
        // A gateway asks for many agents; each of them is admitted when its call is decided.
        if self.limits.gateway_ids.contains(caller) {
            return Ok(());
        }
        self.identity_rate
            .check(caller, self.now())
            .map_err(|wait_ms| {
                self.metrics.rate_limited("identity");
                Error::ResourceExhausted(format!(
                    "{caller} is over [server] requests_per_identity_per_second; retry in {wait_ms} ms"
                ))
            })
    }

    /// The gateways allowed to ask about tool calls (`[gateway] ids`).
    pub fn gateway_ids(&self) -> &HashSet<SpiffeId> {
        &self.limits.gateway_ids
    }

    /// Turns on audit archival.
    pub fn with_audit_archive(mut self, archive: AuditArchive) -> Self {
        self.audit_archive = Some(archive);
        self
    }

    /// Adds the upstream systems (one per `postgres` resource) and the revocation settings.
    pub fn with_upstreams(
        mut self,
        upstreams: HashMap<String, Arc<dyn Upstream>>,
        revocation: RevocationConfig,
    ) -> Self {
        self.upstreams = upstreams;
        self.revocation = revocation;
        self
    }

    pub fn policy(&self) -> &Arc<PolicyEngine> {
        &self.policy
    }

    pub fn now(&self) -> UnixMillis {
        self.clock.now()
    }

    /// Refuses callers from trust domains the configuration does not authorise. The TLS layer
    /// checks this too; this keeps the rule where the domain can see it.
    fn check_caller(&self, caller: &SpiffeId) -> Result<()> {
        if self
            .blocked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(caller)
        {
            return Err(Error::PermissionDenied(format!(
                "{caller} is blocked by an operator"
            )));
        }
        if self
            .limits
            .authorized_trust_domains
            .contains(caller.trust_domain())
        {
            Ok(())
        } else {
            Err(Error::Unauthenticated(format!(
                "trust domain {} is not authorised to call this broker",
                caller.trust_domain()
            )))
        }
    }

    fn resource(&self, field: &str, name: &str) -> Result<&ResourceSpec> {
        config::check_name(field, name)?;
        self.limits
            .resources
            .get(name)
            .ok_or_else(|| Error::invalid(field, format!("unknown resource {}", preview(name))))
    }

    fn check_action(
        &self,
        field: &str,
        spec: &ResourceSpec,
        resource: &str,
        action: &str,
    ) -> Result<()> {
        config::check_name(field, action)?;
        if spec.actions.contains(action) {
            Ok(())
        } else {
            Err(Error::invalid(
                field,
                format!(
                    "resource {resource} has no action {} (it has: {})",
                    preview(action),
                    spec.actions.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            ))
        }
    }

    fn check_idempotency_key(key: &str) -> Result<Option<String>> {
        if key.is_empty() {
            return Ok(None);
        }
        if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
            return Err(Error::invalid(
                "idempotency_key",
                format!("is {} bytes; at most {MAX_IDEMPOTENCY_KEY_LEN}", key.len()),
            ));
        }
        if key.chars().any(char::is_control) {
            return Err(Error::invalid(
                "idempotency_key",
                "holds control characters",
            ));
        }
        Ok(Some(key.to_owned()))
    }

    fn validate_labels(labels: &HashMap<String, String>) -> Result<BTreeMap<String, String>> {
        if labels.len() > MAX_LABELS {
            return Err(Error::invalid(
                "labels",
                format!("has {} entries; at most {MAX_LABELS}", labels.len()),
            ));
        }
        let mut out = BTreeMap::new();
        for (k, v) in labels {
            let ok_key = !k.is_empty()
                && k.len() <= MAX_LABEL_KEY_LEN
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
            if !ok_key {
                return Err(Error::invalid(
                    "labels",
                    format!(
                        "key {} must be 1-{MAX_LABEL_KEY_LEN} of A-Z a-z 0-9 - _ . /",
                        preview(k)
                    ),
                ));
            }
            if v.len() > MAX_LABEL_VALUE_LEN || v.chars().any(char::is_control) {
                return Err(Error::invalid(
                    "labels",
                    format!(
                        "value of {k} must be at most {MAX_LABEL_VALUE_LEN} bytes without control characters"
                    ),
                ));
            }
            out.insert(k.clone(), v.clone());
        }
        Ok(out)
    }

    fn check_purpose(&self, purpose: &str) -> Result<()> {
        if purpose.trim().is_empty() {
            return Err(Error::invalid(
                "purpose",
                "is required: say what the task is for",
            ));
        }
        if purpose.len() > MAX_PURPOSE_LEN {
            return Err(Error::invalid(
                "purpose",
                format!("is {} bytes; at most {MAX_PURPOSE_LEN}", purpose.len()),
            ));
        }
        Ok(())
    }

    fn check_grants(&self, grants: &[Grant]) -> Result<()> {
        if grants.is_empty() {
            return Err(Error::invalid("grants", "at least one grant is required"));
        }
        if grants.len() > MAX_GRANTS {
            return Err(Error::invalid(
                "grants",
                format!("has {} entries; at most {MAX_GRANTS}", grants.len()),
            ));
        }
        let mut seen = HashSet::new();
        for (i, g) in grants.iter().enumerate() {
            let spec = self.resource(&format!("grants[{i}].resource"), &g.resource)?;
            self.check_action(&format!("grants[{i}].action"), spec, &g.resource, &g.action)?;
            if !seen.insert(g) {
                return Err(Error::invalid(
                    format!("grants[{i}]"),
                    format!("repeats ({}, {})", g.resource, g.action),
                ));
            }
        }
        Ok(())
    }

    fn task_ttl_ms(&self, ttl_seconds: u32) -> Result<i64> {
        let ttl = u64::from(ttl_seconds);
        if ttl == 0 {
            return Ok(secs_to_ms(self.limits.default_ttl_seconds));
        }
        if ttl > self.limits.max_ttl_seconds {
            return Err(Error::invalid(
                "ttl_seconds",
                format!(
                    "{ttl} is above the maximum of {} seconds",
                    self.limits.max_ttl_seconds
                ),
            ));
        }
        Ok(secs_to_ms(ttl))
    }

    /// Audits one decision (`evaluate` counted it).
    fn record_decision(
        &self,
        principal: &SpiffeId,
        grant: &Grant,
        c: &DecideCtx<'_>,
        v: &crate::policy::Verdict,
    ) -> Result<()> {
        self.audit(Event {
            kind: "decision".into(),
            spiffe_id: principal.to_string(),
            task_id: c.task.map(|t| t.id.to_string()).unwrap_or_default(),
            resource: grant.resource.clone(),
            action: grant.action.clone(),
            decision: decision_name(v.decision).into(),
            policies: v.policy_ids.clone(),
            reason: v.reason.clone(),
            purpose: c.purpose.to_owned(),
            delegation_chain: c.chain.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        })?;
        Ok(())
    }

    fn decide(
        &self,
        principal: &SpiffeId,
        grant: &Grant,
        c: &DecideCtx<'_>,
    ) -> Result<crate::policy::Verdict> {
        let v = self.evaluate(principal, grant, c, None);
        self.record_decision(principal, grant, c, &v)?;
        Ok(v)
    }

    /// Decides every grant of a new task (with the policy ids of each verdict). If none is
    /// allowed, nothing is created: the denials are audited as one entry (however many grants
    /// the request named) made durable, and the caller gets `PERMISSION_DENIED` naming each
    /// grant's reason; `whom` completes "no grant was allowed…".
    async fn decide_grants(
        &self,
        principal: &SpiffeId,
        grants: &[Grant],
        ctx: &DecideCtx<'_>,
        whom: &str,
    ) -> Result<Vec<(GrantDecision, Vec<String>)>> {
        let verdicts: Vec<_> = grants
            .iter()
            .map(|g| self.evaluate(principal, g, ctx, None))
            .collect();
        if verdicts.iter().all(|v| v.decision == Decision::Denied) {
            let reasons: Vec<String> = grants
                .iter()
                .zip(&verdicts)
                .map(|(g, v)| format!("({}, {}): {}", g.resource, g.action, v.reason))
                .collect();
            let mut policies: Vec<String> = verdicts
                .iter()
                .flat_map(|v| v.policy_ids.iter().cloned())
                .collect();
            policies.sort();
            policies.dedup();
            self.audit(Event {
                kind: "decision".into(),
                spiffe_id: principal.to_string(),
                task_id: ctx.task.map(|t| t.id.to_string()).unwrap_or_default(),
                decision: decision_name(Decision::Denied).into(),
                policies,
                reason: reasons.join("; "),
                purpose: ctx.purpose.to_owned(),
                delegation_chain: ctx.chain.iter().map(|c| c.to_string()).collect(),
                detail: format!("all {} grants denied", grants.len()),
                ..Default::default()
            })?;
            self.store.durable().await?;
            return Err(Error::PermissionDenied(format!(
                "no grant was allowed{whom}: {}",
                reasons.join("; ")
            )));
        }
        let mut decided = Vec::with_capacity(grants.len());
        for (g, v) in grants.iter().zip(verdicts) {
            self.record_decision(principal, g, ctx, &v)?;
            decided.push((
                GrantDecision {
                    grant: g.clone(),
                    decision: v.decision,
                    reason: v.reason,
                    approval_id: None,
                },
                v.policy_ids,
            ));
        }
        Ok(decided)
    }

    /// Appends to the audit chain. The caller's next `durable()` makes it durable with the
    /// change it records; a failure to audit fails the operation (fail closed).
    pub(crate) fn audit(&self, event: Event) -> Result<()> {
        self.audit.append(self.store.as_ref(), self.now(), event)?;
        Ok(())
    }

    /// Records a refused authentication (no, or an invalid, SVID, or a failed TLS handshake)
    /// from `remote` (an IP address): counted in metrics at once, logged once per remote per
    /// summary window (each at debug level), and audited by [`Broker::audit_auth_failures`] as one summary per remote.
    /// Nothing is written per attempt, so nobody without an identity can fill the disk.
    pub fn auth_failed(&self, remote: &str, reason: &str) {
        self.metrics.auth_failure();
        if self
            .auth_failures
            .record(remote, &preview(reason), self.now())
        {
            tracing::warn!(event = "authentication_failed", remote = %remote, reason = %reason,
                "authentication refused (further refusals from this address are counted and summarised)");
        } else {
            // Each one stays visible at debug level, which production does not log by default.
            tracing::debug!(event = "authentication_failed", remote = %remote, reason = %reason,
                "authentication refused");
        }
    }

    /// Audits one `auth_failed` summary per remote address for the refusals counted since the
    /// last call, and makes them durable. Returns how many summaries were written.
    pub async fn audit_auth_failures(&self) -> Result<usize> {
        let all = self.auth_failures.take();
        if all.is_empty() {
            return Ok(0);
        }
        self.writable()?;
        for s in &all {
            self.audit(Event {
                kind: "auth_failed".into(),
                reason: s.reason.clone(),
                detail: format!(
                    "remote {}: {} refused between {} and {}",
                    s.remote, s.count, s.first_ms, s.last_ms
                ),
                ..Default::default()
            })?;
        }
        self.store.durable().await?;
        Ok(all.len())
    }

    /// Writes the refused-authentication summaries every `every`, and once more at `stop`.
    pub async fn run_auth_summaries(
        self: Arc<Self>,
        every: std::time::Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let stopping = tokio::select! {
                _ = tokio::time::sleep(every) => false,
                _ = stop.changed() => true,
            };
            if let Err(e) = self.audit_auth_failures().await {
                tracing::error!(error = %e, "could not audit refused authentications");
            }
            if stopping {
                return;
            }
        }
    }

    /// `Broker.StartTask`.
    pub async fn start_task(&self, caller: &SpiffeId, req: StartTask) -> Result<Task> {
        self.check_caller(caller)?;
        self.writable()?;
        self.check_purpose(&req.purpose)?;
        self.check_grants(&req.grants)?;
        let ttl_ms = self.task_ttl_ms(req.ttl_seconds)?;
        let labels = Self::validate_labels(&req.labels)?;
        let idem = Self::check_idempotency_key(&req.idempotency_key)?;

        let _guard = self.stripes[stripe_of(caller.as_str())].lock().await;
        if let Some(key) = &idem
            && let Some(id) = self.store.task_by_idempotency_key(caller, key)?
            && let Some(task) = self.store.get_task(&id)?
        {
            return Ok(task);
        }
        let now = self.now();
        self.check_task_quota(caller, now, "")?;
        let chain = vec![caller.clone()];
        let ctx = DecideCtx {
            task: None,
            purpose: &req.purpose,
            labels: &labels,
            requested_ttl_ms: ttl_ms,
            chain: &chain,
            approved: false,
        };
        let decided = self.decide_grants(caller, &req.grants, &ctx, "").await?;
        let needing: Vec<(Grant, Vec<String>)> = decided
            .iter()
            .filter(|(g, _)| g.decision == Decision::NeedsApproval)
            .map(|(g, ids)| (g.grant.clone(), ids.clone()))
            .collect();
        let grants: Vec<GrantDecision> = decided.into_iter().map(|(g, _)| g).collect();
        let mut task = Task {
            id: TaskId::generate(),
            owner: caller.clone(),
            purpose: req.purpose,
            grants,
            labels,
            state: TaskState::Active,
            created_at: now,
            expires_at: now + ttl_ms,
            ended_at: None,
            purge_at: None,
            parent: None,
            delegation_chain: chain,
            idempotency_key: idem,
        };
        for (g, ids) in needing {
            self.request_approval(&mut task, &g, ids, now)?;
        }
        self.store.create_task(&task)?;
        self.audit(Event {
            kind: "task_started".into(),
            spiffe_id: caller.to_string(),
            task_id: task.id.to_string(),
            purpose: task.purpose.clone(),
            detail: format!("expires_at={}", task.expires_at),
            ..Default::default()
        })?;
        self.store.durable().await?;
        Ok(task)
    }

    /// `RESOURCE_EXHAUSTED` when `who` already has its maximum of live tasks (its own and those
    /// delegated to it alike). The caller holds `who`'s stripe, so the count cannot go stale
    /// before the new task is written. `whose` prefixes the message ("delegate ").
    pub(crate) fn check_task_quota(
        &self,
        who: &SpiffeId,
        now: UnixMillis,
        whose: &str,
    ) -> Result<()> {
        let live = self
            .store
            .tasks_of_identity(who)?
            .into_iter()
            .filter_map(|id| self.store.get_task(&id).transpose())
            .filter(|t| t.as_ref().map_or(true, |t| t.is_live(now)))
            .count() as u64;
        if live >= self.limits.max_active_tasks_per_identity {
            return Err(Error::ResourceExhausted(format!(
                "{whose}{who} already has {live} active tasks (limit {}); complete some first",
                self.limits.max_active_tasks_per_identity
            )));
        }
        Ok(())
    }

    /// The lock stripes of a task and of an identity, locked in index order (one lock when they
    /// share a stripe), so two of these never wait on each other in a cycle.
    pub(crate) async fn lock_task_and_identity(
        &self,
        task: &TaskId,
        who: &SpiffeId,
    ) -> (
        tokio::sync::MutexGuard<'_, ()>,
        Option<tokio::sync::MutexGuard<'_, ()>>,
    ) {
        let (a, b) = (stripe_of(task.as_str()), stripe_of(who.as_str()));
        let first = self.stripes[a.min(b)].lock().await;
        let second = if a == b {
            None
        } else {
            Some(self.stripes[a.max(b)].lock().await)
        };
        (first, second)
    }

    /// Loads a task the caller owns; anyone else's reads as unknown (no probing).
    fn owned_task(&self, caller: &SpiffeId, task_id: &TaskId) -> Result<Task> {
        match self.store.get_task(task_id)? {
            Some(t) if &t.owner == caller => Ok(t),
            _ => Err(Error::NotFound(format!("task {task_id}"))),
        }
    }

    /// `Broker.GetTask`.
    pub fn get_task(&self, caller: &SpiffeId, task_id: &str) -> Result<Task> {
        self.check_caller(caller)?;
        let id = TaskId::parse(task_id)?;
        let mut t = self.owned_task(caller, &id)?;
        t.state = t.effective_state(self.now());
        Ok(t)
    }

    /// `Broker.IssueCredential`.
    pub async fn issue_credential(
        &self,
        caller: &SpiffeId,
        req: IssueCredential,
    ) -> Result<IssuedCredential> {
        self.check_caller(caller)?;
        self.writable()?;
        let task_id = TaskId::parse(&req.task_id)?;
        let spec = self.resource("resource", &req.resource)?.clone();
        self.check_action("action", &spec, &req.resource, &req.action)?;
        if spec.inject.as_ref().is_some_and(|i| i.gateway_only) {
            return Err(Error::FailedPrecondition(format!(
                "credentials of resource {} are injected by a gateway only (inject.gateway_only): \
                 call the tool through the gateway with the task id in its task header",
                req.resource
            )));
        }
        let idem = Self::check_idempotency_key(&req.idempotency_key)?;
        let res_max = spec.max_ttl_seconds.min(self.limits.max_ttl_seconds);
        let ttl_s = match u64::from(req.ttl_seconds) {
            0 => self.limits.default_ttl_seconds.min(res_max),
            t if t > res_max => {
                return Err(Error::invalid(
                    "ttl_seconds",
                    format!(
                        "{t} is above the maximum of {res_max} seconds for resource {}",
                        req.resource
                    ),
                ));
            }
            t => t,
        };
        let grant = Grant {
            resource: req.resource,
            action: req.action,
        };
        self.issue_for_task(
            caller,
            &task_id,
            &spec,
            grant,
            ttl_s,
            idem,
            None,
            BTreeMap::new(),
        )
        .await
    }

    /// Issues a credential of `caller`'s task for `grant`, deciding it again now: the one path
    /// of `IssueCredential` and the OAuth token endpoint. It lives `ttl_s` seconds, no longer
    /// than the task nor `not_after`; `binding` is recorded with it (see
    /// [`crate::issuers::IssueRequest::binding`]). Durable before it returns.
    #[expect(
        clippy::too_many_arguments,
        reason = "one issuance, its inputs named at the call"
    )]
    pub(crate) async fn issue_for_task(
        &self,
        caller: &SpiffeId,
        task_id: &TaskId,
        spec: &ResourceSpec,
        grant: Grant,
        ttl_s: u64,
        idem: Option<String>,
        not_after: Option<UnixMillis>,
        binding: BTreeMap<String, String>,
    ) -> Result<IssuedCredential> {
        let task_id = task_id.clone();
        let mut guard = Some(self.lock_task(&task_id).lock().await);
        let task = self.owned_task(caller, &task_id)?;
        if let Some(key) = &idem
            && let Some(cid) = self.store.credential_by_idempotency_key(&task_id, key)?
            // An index entry without its record is what a crash mid-write leaves: not issued.
            && self.store.get_credential(&cid)?.is_some()
        {
            return self.replay(&cid, &grant);
        }
        let now = self.now();
        if !task.is_live(now) {
            return Err(Error::FailedPrecondition(format!(
                "task {task_id} is {}",
                state_name(task.effective_state(now))
            )));
        }
        let Some(granted) = task.grants.iter().find(|g| g.grant == grant) else {
            return Err(Error::PermissionDenied(format!(
                "task {task_id} did not ask for ({}, {}) when it started",
                grant.resource, grant.action
            )));
        };
        if granted.decision == Decision::Denied {
            return Err(Error::PermissionDenied(format!(
                "({}, {}) was denied at task start: {}",
                grant.resource, grant.action, granted.reason
            )));
        }
        // Policy again, now: a reload or the passing of time may have changed the answer.
        let expires_at = (now + secs_to_ms(ttl_s))
            .min(task.expires_at)
            .min(not_after.unwrap_or(i64::MAX));
        if expires_at <= now {
            return Err(Error::FailedPrecondition(
                "the credential would expire at once".into(),
            ));
        }
        let mut ctx = DecideCtx::for_task(&task, expires_at - now);
        let mut v = self.decide(caller, &grant, &ctx)?;
        let mut approval = None;
        if v.decision == Decision::NeedsApproval
            && let Some(a) = self.usable_approval(&task, &grant, now)?
        {
            ctx.approved = true;
            v = self.decide(caller, &grant, &ctx)?;
            approval = Some(a);
        }
        match v.decision {
            Decision::Allowed => {}
            Decision::Denied => {
                self.store.durable().await?;
                return Err(Error::PermissionDenied(format!(
                    "({}, {}) is not allowed now: {}",
                    grant.resource, grant.action, v.reason
                )));
            }
            Decision::NeedsApproval => {
                let id = self.pending_or_new_approval(&task, &grant, v.policy_ids, now)?;
                self.store.durable().await?;
                return Err(Error::FailedPrecondition(format!(
                    "({}, {}) needs approval: {} approval_id={id}",
                    grant.resource, grant.action, v.reason
                )));
            }
        }
        let issued = self
            .mint_credential(
                &mut guard, caller, &task, spec, &grant, expires_at, idem, approval, binding,
            )
            .await?;
        self.store.durable().await?;
        crate::failpoint::hit("issue-before-reply");
        self.metrics.issued(&issued.record.kind);
        Ok(issued)
    }

    /// Issues one credential of a task for a grant already decided: the per-task quota, the
    /// issuer, the records, the approval it uses and the audit entry. The caller holds the task's
    /// stripe in `guard` (released while an upstream account is made: see below, and held again
    /// on return) and makes the writes durable before replying.
    #[expect(
        clippy::too_many_arguments,
        reason = "one issuance, its inputs named at the call"
    )]
    pub(crate) async fn mint_credential<'s>(
        &'s self,
        guard: &mut Option<tokio::sync::MutexGuard<'s, ()>>,
        caller: &SpiffeId,
        task: &Task,
        spec: &ResourceSpec,
        grant: &Grant,
        expires_at: UnixMillis,
        idem: Option<String>,
        approval: Option<crate::model::Approval>,
        extra_attributes: BTreeMap<String, String>,
    ) -> Result<IssuedCredential> {
        let now = self.now();
        let task_id = task.id.clone();
        let indexed = self.store.credentials_of_task(&task_id)?;
        let in_flight = self.issuing.count(&task_id);
        let mut issued_count = indexed.len() as u64 + in_flight;
        if issued_count >= self.limits.max_credentials_per_task {
            // At the limit by the index: count only credentials whose record exists (a crash
            // mid-write can leave an index entry without its record, which was never issued).
            issued_count = in_flight;
            for cid in &indexed {
                if self.store.get_credential(cid)?.is_some() {
                    issued_count += 1;
                }
            }
        }
        if issued_count >= self.limits.max_credentials_per_task {
            return Err(Error::ResourceExhausted(format!(
                "task {task_id} already has {issued_count} credentials (limit {})",
                self.limits.max_credentials_per_task
            )));
        }
        let id = CredentialId::generate();
        let ireq = IssueRequest {
            credential_id: &id,
            task_id: &task_id,
            owner: caller,
            resource: &grant.resource,
            action: &grant.action,
            issued_at: now,
            expires_at,
            delegation_chain: &task.delegation_chain,
            audience: spec.oauth_resource.as_deref().unwrap_or(&grant.resource),
            access_token: spec.oauth_resource.is_some(),
            binding: &extra_attributes,
        };
        let mut upstream_name = None;
        let Issued {
            secret,
            mut attributes,
        } = match spec.kind {
            ResourceKind::Token => token::issue(),
            ResourceKind::Jwt => self.jwt.issue(&ireq)?,
            ResourceKind::X509 => self.x509.issue(&ireq)?,
            ResourceKind::Postgres => {
                // The stripe is shared with other tasks, the reaper's and the kill switch's work:
                // it is not held across the upstream's network I/O. The credential counts against
                // the task's quota meanwhile, and the task is looked at again afterwards.
                let slot = self.issuing.start(&task_id);
                *guard = None;
                let made = self
                    .create_upstream(&grant.resource, &id, &grant.action, now, expires_at)
                    .await;
                *guard = Some(self.lock_task(&task_id).lock().await);
                drop(slot);
                let (name, issued) = made?;
                let still_live = self
                    .store
                    .get_task(&task_id)?
                    .is_some_and(|t| t.is_live(self.now()));
                if !still_live {
                    self.queue_upstream_revocation(
                        &grant.resource,
                        &name,
                        Some(id.clone()),
                        "task-ended",
                        self.now(),
                    )?;
                    self.store.durable().await?;
                    return Err(Error::FailedPrecondition(format!(
                        "task {task_id} ended while its credential was being made; the account \
                         is being removed"
                    )));
                }
                upstream_name = Some(name);
                issued
            }
        };
        attributes.extend(extra_attributes);
        let record = CredentialRecord {
            id,
            task_id,
            owner: caller.clone(),
            resource: grant.resource.clone(),
            action: grant.action.clone(),
            kind: spec.kind.as_str().to_owned(),
            issued_at: now,
            expires_at,
            state: CredentialState::Active,
            ended_at: None,
            end_reason: None,
            idempotency_key: idem,
            attributes,
            delegation_chain: task.delegation_chain.clone(),
        };
        self.store.create_credential(&record, &secret)?;
        if let Some(name) = upstream_name {
            self.store.put_upstream(&UpstreamObject {
                resource: record.resource.clone(),
                name,
                credential_id: record.id.clone(),
                state: UpstreamState::Live,
                created_at: now,
                expires_at,
            })?;
        }
        if let Some(a) = approval {
            self.use_approval(a, record.id.as_str())?;
        }
        self.audit(Event {
            kind: "credential_issued".into(),
            spiffe_id: caller.to_string(),
            task_id: record.task_id.to_string(),
            credential_id: record.id.to_string(),
            resource: record.resource.clone(),
            action: record.action.clone(),
            purpose: task.purpose.clone(),
            delegation_chain: task
                .delegation_chain
                .iter()
                .map(|c| c.to_string())
                .collect(),
            detail: {
                // Who else acts with it (token exchange) and what it is bound to, in the trail.
                let mut d = format!("kind={} expires_at={}", record.kind, record.expires_at);
                for key in [crate::issuers::ATTR_ACTORS, crate::issuers::ATTR_CLIENT_ID] {
                    if let Some(v) = record.attributes.get(key) {
                        d.push_str(&format!(" {key}={v}"));
                    }
                }
                if record.attributes.contains_key(crate::issuers::ATTR_CNF) {
                    d.push_str(" cnf=x5t#S256");
                }
                d
            },
            ..Default::default()
        })?;
        Ok(IssuedCredential { record, secret })
    }

    /// Returns the credential an earlier call with the same idempotency key made.
    fn replay(&self, id: &CredentialId, grant: &Grant) -> Result<IssuedCredential> {
        let record = self
            .store
            .get_credential(id)?
            .ok_or_else(|| Error::Storage(format!("idempotency key points at missing {id}")))?;
        if record.resource != grant.resource || record.action != grant.action {
            return Err(Error::invalid(
                "idempotency_key",
                format!(
                    "was used for ({}, {}) on this task; use a new key for a different request",
                    record.resource, record.action
                ),
            ));
        }
        if !record.is_live(self.now()) {
            return Err(Error::FailedPrecondition(format!(
                "credential {id} issued for this idempotency key is no longer active"
            )));
        }
        let secret = self.store.credential_secret(id)?.ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "credential {id} issued for this idempotency key is no longer active"
            ))
        })?;
        Ok(IssuedCredential { record, secret })
    }

    /// Ends one credential if it is active. Returns whether it changed.
    fn end_credential(
        &self,
        id: &CredentialId,
        state: CredentialState,
        reason: RevokeReason,
        now: UnixMillis,
    ) -> Result<bool> {
        let Some(mut rec) = self.store.get_credential(id)? else {
            return Ok(false);
        };
        if rec.state != CredentialState::Active {
            return Ok(false);
        }
        // A credential past its expiry ends as expired, whatever ended it.
        rec.state = if now >= rec.expires_at {
            CredentialState::Expired
        } else {
            state
        };
        rec.ended_at = Some(now);
        rec.end_reason = Some(if rec.state == CredentialState::Expired {
            RevokeReason::Expired
        } else {
            reason
        });
        self.store.update_credential(&rec)?;
        if let Some(name) = rec.attributes.get("user")
            && self.upstreams.contains_key(&rec.resource)
        {
            self.queue_upstream_revocation(
                &rec.resource,
                name,
                Some(rec.id.clone()),
                rec.end_reason.map(RevokeReason::as_str).unwrap_or(""),
                now,
            )?;
        }
        self.metrics.ended(rec.end_reason.unwrap_or(reason));
        self.audit(Event {
            kind: "credential_ended".into(),
            spiffe_id: rec.owner.to_string(),
            task_id: rec.task_id.to_string(),
            credential_id: rec.id.to_string(),
            resource: rec.resource.clone(),
            action: rec.action.clone(),
            reason: rec
                .end_reason
                .map(RevokeReason::as_str)
                .unwrap_or("")
                .into(),
            ..Default::default()
        })?;
        Ok(true)
    }

    /// Ends a task and every credential of it. Caller holds the task's stripe.
    fn end_task(
        &self,
        task: &mut Task,
        state: TaskState,
        reason: RevokeReason,
        now: UnixMillis,
        out: &mut Completed,
    ) -> Result<()> {
        for cid in self.store.credentials_of_task(&task.id)? {
            if self.end_credential(&cid, CredentialState::Revoked, reason, now)? {
                out.revoked_credentials.push(cid);
            }
        }
        task.state = state;
        task.ended_at = Some(now);
        task.purge_at = Some(now.saturating_add(self.limits.ended_retention_ms));
        self.store.update_task(task)?;
        out.ended_tasks.push(task.id.clone());
        self.audit(Event {
            kind: "task_ended".into(),
            spiffe_id: task.owner.to_string(),
            task_id: task.id.to_string(),
            reason: reason.as_str().into(),
            ..Default::default()
        })
    }

    /// `Broker.CompleteTask`: revokes every credential of the task. Completing a task that is
    /// already completed succeeds with nothing to revoke, so retries are safe.
    pub async fn complete_task(&self, caller: &SpiffeId, task_id: &str) -> Result<Completed> {
        self.check_caller(caller)?;
        self.writable()?;
        let id = TaskId::parse(task_id)?;
        let guard = self.stripes[stripe_of(id.as_str())].lock().await;
        let mut task = self.owned_task(caller, &id)?;
        let now = self.now();
        let mut out = Completed::default();
        match task.effective_state(now) {
            TaskState::Active => {
                self.end_task(
                    &mut task,
                    TaskState::Completed,
                    RevokeReason::Completed,
                    now,
                    &mut out,
                )?;
                drop(guard);
                self.revoke_descendants(&id, &mut out).await?;
            }
            TaskState::Completed => {
                // A retry, perhaps after a crash between the task's end and its descendants':
                // the cascade is run again (it ends only what is still live).
                drop(guard);
                self.revoke_descendants(&id, &mut out).await?;
                if !out.ended_tasks.is_empty() {
                    self.store.durable().await?;
                }
                return Ok(out);
            }
            TaskState::Expired if task.state == TaskState::Active => {
                // Past its expiry but not yet reaped: end it now, as expired.
                self.end_task(
                    &mut task,
                    TaskState::Expired,
                    RevokeReason::Expired,
                    now,
                    &mut out,
                )?;
                self.store.durable().await?;
                return Err(Error::FailedPrecondition(format!("task {id} is EXPIRED")));
            }
            s => {
                return Err(Error::FailedPrecondition(format!(
                    "task {id} is {}",
                    state_name(s)
                )));
            }
        }
        self.store.durable().await?;
        Ok(out)
    }

    /// `Broker.RevokeCredential`: only the owner of the credential's task may revoke it.
    pub async fn revoke_credential(&self, caller: &SpiffeId, credential_id: &str) -> Result<()> {
        self.check_caller(caller)?;
        self.writable()?;
        let id = CredentialId::parse(credential_id)?;
        let not_found = || Error::NotFound(format!("credential {id}"));
        let rec = self.store.get_credential(&id)?.ok_or_else(not_found)?;
        if &rec.owner != caller {
            return Err(not_found());
        }
        self.revoke_now(&rec).await
    }

    /// Revokes one credential (if still active) under its task's lock, durably.
    pub(crate) async fn revoke_now(&self, rec: &CredentialRecord) -> Result<()> {
        let _guard = self.lock_task(&rec.task_id).lock().await;
        self.end_credential(
            &rec.id,
            CredentialState::Revoked,
            RevokeReason::Revoked,
            self.now(),
        )?;
        self.store.durable().await
    }

    /// `Verifier.Introspect`: only verifiers configured for the resource may ask; unknown,
    /// revoked, expired and other-resource credentials all read as inactive.
    pub fn introspect(
        &self,
        caller: &SpiffeId,
        secret: &str,
        resource: &str,
    ) -> Result<Option<Introspection>> {
        self.check_caller(caller)?;
        self.require_verifier(caller, resource)?;
        if secret.is_empty() {
            return Err(Error::invalid("secret", "is required"));
        }
        if secret.len() > MAX_SECRET_LEN {
            return Err(Error::invalid(
                "secret",
                format!("is {} bytes; at most {MAX_SECRET_LEN}", secret.len()),
            ));
        }
        Ok(self
            .active_credential(secret)?
            .filter(|r| r.resource == resource)
            .map(|record| Introspection { record }))
    }

    /// `Verifier.GetX509Authorities`: without a resource, the root that signs every resource's
    /// issuing CA; with one, only that resource's issuing CA.
    pub fn x509_authorities_pem(&self, caller: &SpiffeId, resource: &str) -> Result<String> {
        self.check_caller(caller)?;
        if resource.is_empty() {
            return Ok(self.x509.root_pem().to_owned());
        }
        let spec = self.resource("resource", resource)?;
        if spec.kind != ResourceKind::X509 {
            return Err(Error::invalid(
                "resource",
                format!(
                    "{resource} issues {} credentials, not x509",
                    spec.kind.as_str()
                ),
            ));
        }
        self.x509
            .resource_ca_pem(resource)
            .map(str::to_owned)
            .ok_or_else(|| Error::Internal(format!("no issuing CA for resource {resource}")))
    }

    /// `Verifier.X509Status`: what became of the certificate with this serial number. Only
    /// verifiers of the resource may ask; a certificate of another resource, another kind or not
    /// made by this broker reads as unknown.
    pub fn x509_status(
        &self,
        caller: &SpiffeId,
        resource: &str,
        serial: &str,
    ) -> Result<X509Status> {
        self.check_caller(caller)?;
        self.require_verifier(caller, resource)?;
        let Some(id) = crate::issuers::x509::credential_of_serial(serial)? else {
            return Ok(X509Status::Unknown);
        };
        let Some(record) = self.store.get_credential(&id)? else {
            return Ok(X509Status::Unknown);
        };
        if record.resource != resource || record.kind != ResourceKind::X509.as_str() {
            return Ok(X509Status::Unknown);
        }
        let now = self.now();
        let task_live = self
            .store
            .get_task(&record.task_id)?
            .is_some_and(|t| t.is_live(now));
        Ok(if record.is_live(now) && task_live {
            X509Status::Good(record)
        } else if record.state == CredentialState::Revoked {
            X509Status::Revoked(record)
        } else {
            X509Status::Expired(record)
        })
    }

    /// Refuses callers that are not configured as verifiers of `resource`.
    fn require_verifier(&self, caller: &SpiffeId, resource: &str) -> Result<()> {
        config::check_name("resource", resource)?;
        if self.is_verifier(caller, resource) {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!(
                "{caller} is not a verifier of resource {resource}"
            )))
        }
    }

    /// `caller` is configured as a verifier of `resource`.
    pub(crate) fn is_verifier(&self, caller: &SpiffeId, resource: &str) -> bool {
        self.limits
            .resources
            .get(resource)
            .is_some_and(|r| r.verifiers.contains(caller))
    }

    /// `Verifier.GetJwks`.
    pub fn jwks_json(&self) -> String {
        self.jwt.jwks_json()
    }

    pub fn is_admin(&self, caller: &SpiffeId) -> bool {
        self.limits.admin_ids.contains(caller)
    }

    /// An operator, not blocked: a block holds for every role, so a blocked operator cannot
    /// undo its own block.
    fn require_admin(&self, caller: &SpiffeId) -> Result<()> {
        if self.is_admin(caller) {
            self.check_caller(caller)
        } else {
            Err(Error::PermissionDenied(format!(
                "{caller} is not an operator of this broker"
            )))
        }
    }

    /// `Admin.Status`.
    pub fn status(&self, caller: &SpiffeId) -> Result<StatusInfo> {
        self.require_admin(caller)?;
        let c = self.store.counts()?;
        let (policy_count, policy_digest) = self.policy.info();
        Ok(StatusInfo {
            active_tasks: c.tasks,
            active_credentials: c.credentials,
            policy_count,
            policy_digest,
        })
    }

    pub fn policy_file(&self) -> Option<&std::path::Path> {
        self.policy_file.as_deref()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub(crate) fn lock_task(&self, id: &TaskId) -> &Mutex<()> {
        &self.stripes[stripe_of(id.as_str())]
    }

    pub(crate) fn jwt(&self) -> &JwtIssuer {
        &self.jwt
    }
}

#[cfg(test)]
mod tests;
