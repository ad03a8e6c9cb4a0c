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
use std::sync::Arc;

use tokio::sync::Mutex;

use crate::audit::Event;
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
use crate::store::disk::DiskFloor;
use crate::store::{Inserted, Storage, Uow};
use crate::telemetry::Metrics;
pub use clock::{Clock, ManualClock, SystemClock};

pub const MAX_PURPOSE_LEN: usize = 1024;
pub const MAX_GRANTS: usize = 32;
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_KEY_LEN: usize = 63;
pub const MAX_LABEL_VALUE_LEN: usize = 256;
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;
pub const MAX_SECRET_LEN: usize = 16 * 1024;
/// A unit of work of the store: every handler opens one, does its reads, writes and audit
/// through it, and replies after [`Broker::finish`] committed it.
pub(crate) type Tx<'s> = Box<dyn Uow<'s> + 's>;
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
    /// Made by this call (not the replay of an idempotency key).
    pub fresh: bool,
}

/// A task to create, validated ([`Broker::create_task`]).
pub(crate) struct NewTask<'a> {
    pub owner: &'a SpiffeId,
    pub purpose: String,
    pub grants: &'a [Grant],
    pub labels: BTreeMap<String, String>,
    pub ttl_ms: i64,
    pub idempotency_key: Option<String>,
    /// The delegating task, for a delegated one.
    pub parent: Option<TaskId>,
    /// Root first, ending with `owner`.
    pub chain: Vec<SpiffeId>,
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
    store: Arc<Storage>,
    policy: Arc<PolicyEngine>,
    jwt: JwtIssuer,
    x509: X509Issuer,
    clock: Arc<dyn Clock>,
    limits: Limits,
    metrics: Arc<Metrics>,
    policy_file: Option<std::path::PathBuf>,
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
}

/// Audit archival settings (`[retention]`): once the store holds `keep + segment` entries, the
/// oldest `segment` of them move to a file in `dir`.
#[derive(Clone, Debug)]
pub struct AuditArchive {
    pub dir: std::path::PathBuf,
    pub keep: u64,
    pub segment: u64,
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
    pub async fn new(
        store: Arc<Storage>,
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
        let x509 = X509Issuer::load(&store, &jwt_issuer, &x509_resources, clock.now()).await?;
        let jwt = JwtIssuer::load(
            &store,
            jwt_issuer,
            JWT_ROTATE_MS,
            secs_to_ms(limits.max_ttl_seconds),
            clock.now(),
        )
        .await?;
        Ok(Self {
            store,
            policy,
            jwt,
            x509,
            clock,
            limits,
            metrics,
            policy_file,
            upstreams: HashMap::new(),
            revocation: RevocationConfig::default(),
            revoke_wake: tokio::sync::Notify::new(),
            audit_archive: None,
            archive_lock: Mutex::new(()),
            identity_rate: RateLimiter::new(u32::MAX, u32::MAX),
            auth_failures: FailureSummaries::default(),
            disk: None,
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
    async fn check_caller(&self, caller: &SpiffeId) -> Result<()> {
        if self.store.is_blocked(caller).await? {
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

    /// Records one decision (`evaluate` counted it) in the unit of work of the action it decided.
    fn record_decision(
        &self,
        u: &mut Tx<'_>,
        principal: &SpiffeId,
        grant: &Grant,
        c: &DecideCtx<'_>,
        v: &crate::policy::Verdict,
    ) {
        self.audit(
            u,
            Event {
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
            },
        );
    }

    /// Decides `grant` now (a pure evaluation) and records the decision in `u`.
    fn decide(
        &self,
        u: &mut Tx<'_>,
        principal: &SpiffeId,
        grant: &Grant,
        c: &DecideCtx<'_>,
    ) -> crate::policy::Verdict {
        let v = self.evaluate(principal, grant, c, None);
        self.record_decision(u, principal, grant, c, &v);
        v
    }

    /// Decides every grant of a new task (with the policy ids of each verdict), recorded in `u`.
    /// If none is allowed, nothing is created: the denials are recorded as one entry (however
    /// many grants the request named), and the caller gets `PERMISSION_DENIED` naming each
    /// grant's reason; `whom` completes "no grant was allowed…".
    fn decide_grants(
        &self,
        u: &mut Tx<'_>,
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
            self.audit(
                u,
                Event {
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
                },
            );
            return Err(Error::PermissionDenied(format!(
                "no grant was allowed{whom}: {}",
                reasons.join("; ")
            )));
        }
        let mut decided = Vec::with_capacity(grants.len());
        for (g, v) in grants.iter().zip(verdicts) {
            self.record_decision(u, principal, g, ctx, &v);
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

    /// Records an audit event in the unit of work of the change it describes: appended to the
    /// chain when the unit commits, with it (a failure to audit fails the commit: fail closed).
    pub(crate) fn audit(&self, u: &mut Tx<'_>, event: Event) {
        u.audit(self.now(), event);
    }

    /// Ends a handler: commits its unit of work, whatever the handler's outcome (a refusal is
    /// recorded as surely as an action), and returns that outcome once the commit is durable.
    /// A failed commit is the answer: nothing the unit did is acknowledged.
    pub(crate) async fn finish<T>(&self, u: Tx<'_>, outcome: Result<T>) -> Result<T> {
        u.commit().await?;
        outcome
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
        let mut u = self.store.begin().await?;
        for s in &all {
            self.audit(
                &mut u,
                Event {
                    kind: "auth_failed".into(),
                    reason: s.reason.clone(),
                    detail: format!(
                        "remote {}: {} refused between {} and {}",
                        s.remote, s.count, s.first_ms, s.last_ms
                    ),
                    ..Default::default()
                },
            );
        }
        u.commit().await?;
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
        self.check_caller(caller).await?;
        self.writable()?;
        self.check_purpose(&req.purpose)?;
        self.check_grants(&req.grants)?;
        let ttl_ms = self.task_ttl_ms(req.ttl_seconds)?;
        let labels = Self::validate_labels(&req.labels)?;
        let idem = Self::check_idempotency_key(&req.idempotency_key)?;
        let mut u = self.store.begin().await?;
        let r = self
            .create_task(
                &mut u,
                NewTask {
                    owner: caller,
                    purpose: req.purpose,
                    grants: &req.grants,
                    labels,
                    ttl_ms,
                    idempotency_key: idem,
                    parent: None,
                    chain: vec![caller.clone()],
                },
            )
            .await;
        let r = match r {
            Ok((task, true)) => {
                self.audit(
                    &mut u,
                    Event {
                        kind: "task_started".into(),
                        spiffe_id: caller.to_string(),
                        task_id: task.id.to_string(),
                        purpose: task.purpose.clone(),
                        detail: format!("expires_at={}", task.expires_at),
                        ..Default::default()
                    },
                );
                Ok(task)
            }
            Ok((task, false)) => Ok(task),
            Err(e) => Err(e),
        };
        self.finish(u, r).await
    }

    /// The one path that creates a task (`StartTask`, `DelegateTask`, the OAuth grants): under
    /// its owner's lock, it refuses a blocked owner, answers a repeated idempotency key with the
    /// task it made, holds the owner's quota of live tasks, decides every grant (recorded in
    /// `u`), asks for the approvals policy wants, and writes the task. Returns the task and
    /// whether it is new; the caller records how it came to be.
    pub(crate) async fn create_task(&self, u: &mut Tx<'_>, n: NewTask<'_>) -> Result<(Task, bool)> {
        let owner = n.owner;
        let delegated = n.parent.is_some();
        let whose = if delegated { "delegate " } else { "" };
        if u.lock_identity(owner).await?.blocked {
            return Err(Error::PermissionDenied(format!(
                "{whose}{owner} is blocked by an operator"
            )));
        }
        if let Some(key) = &n.idempotency_key
            && let Some(id) = self.store.task_by_idempotency_key(owner, key).await?
            && let Some(task) = self.store.get_task(&id).await?
        {
            return Ok((task, false));
        }
        let now = self.now();
        self.check_task_quota(owner, now, whose).await?;
        let ctx = DecideCtx {
            task: None,
            purpose: &n.purpose,
            labels: &n.labels,
            requested_ttl_ms: n.ttl_ms,
            chain: &n.chain,
            approved: false,
        };
        let whom = if delegated {
            format!(" for delegate {owner}")
        } else {
            String::new()
        };
        let decided = self.decide_grants(u, owner, n.grants, &ctx, &whom)?;
        let needing: Vec<(Grant, Vec<String>)> = decided
            .iter()
            .filter(|(g, _)| g.decision == Decision::NeedsApproval)
            .map(|(g, ids)| (g.grant.clone(), ids.clone()))
            .collect();
        let mut task = Task {
            id: TaskId::generate(),
            owner: owner.clone(),
            purpose: n.purpose,
            grants: decided.into_iter().map(|(g, _)| g).collect(),
            labels: n.labels,
            state: TaskState::Active,
            created_at: now,
            expires_at: now + n.ttl_ms,
            ended_at: None,
            purge_at: None,
            parent: n.parent,
            delegation_chain: n.chain,
            idempotency_key: n.idempotency_key,
        };
        for (g, ids) in needing {
            self.request_approval(u, &mut task, &g, ids, now).await?;
        }
        match u.insert_task(&task).await? {
            Inserted::New => Ok((task, true)),
            Inserted::Existing(id) => {
                let task = self
                    .store
                    .get_task(&id)
                    .await?
                    .ok_or_else(|| Error::Storage(format!("idempotency key points at {id}")))?;
                Ok((task, false))
            }
        }
    }

    /// `RESOURCE_EXHAUSTED` when `who` already has its maximum of live tasks (its own and those
    /// delegated to it alike). The caller holds `who`'s lock, so the count cannot go stale
    /// before the new task is written. `whose` prefixes the message ("delegate ").
    async fn check_task_quota(&self, who: &SpiffeId, now: UnixMillis, whose: &str) -> Result<()> {
        let mut live = 0u64;
        for id in self.store.tasks_of_identity(who).await? {
            if self
                .store
                .get_task(&id)
                .await?
                .is_none_or(|t| t.is_live(now))
            {
                live += 1;
            }
        }
        if live >= self.limits.max_active_tasks_per_identity {
            return Err(Error::ResourceExhausted(format!(
                "{whose}{who} already has {live} active tasks (limit {}); complete some first",
                self.limits.max_active_tasks_per_identity
            )));
        }
        Ok(())
    }

    /// Loads a task the caller owns; anyone else's reads as unknown (no probing).
    async fn owned_task(&self, caller: &SpiffeId, task_id: &TaskId) -> Result<Task> {
        match self.store.get_task(task_id).await? {
            Some(t) if &t.owner == caller => Ok(t),
            _ => Err(Error::NotFound(format!("task {task_id}"))),
        }
    }

    /// Locks a task the caller owns in `u` and reads it under the lock.
    async fn lock_owned_task(
        &self,
        u: &mut Tx<'_>,
        caller: &SpiffeId,
        task_id: &TaskId,
    ) -> Result<Task> {
        match u.lock_task(task_id).await? {
            Some(t) if &t.owner == caller => Ok(t),
            _ => Err(Error::NotFound(format!("task {task_id}"))),
        }
    }

    /// `Broker.GetTask`.
    pub async fn get_task(&self, caller: &SpiffeId, task_id: &str) -> Result<Task> {
        self.check_caller(caller).await?;
        let id = TaskId::parse(task_id)?;
        let mut t = self.owned_task(caller, &id).await?;
        t.state = t.effective_state(self.now());
        Ok(t)
    }

    /// `Broker.IssueCredential`.
    pub async fn issue_credential(
        &self,
        caller: &SpiffeId,
        req: IssueCredential,
    ) -> Result<IssuedCredential> {
        self.check_caller(caller).await?;
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
        let mut u = self.store.begin().await?;
        let r = self
            .issue_for_task(
                &mut u,
                caller,
                &task_id,
                &spec,
                grant,
                ttl_s,
                idem,
                None,
                BTreeMap::new(),
            )
            .await;
        let issued = self.finish(u, r).await?;
        crate::failpoint::hit("issue-before-reply");
        if issued.fresh {
            self.metrics.issued(&issued.record.kind);
        }
        Ok(issued)
    }

    /// Issues a credential of `caller`'s task for `grant`, deciding it again now: the one path
    /// of `IssueCredential` and the OAuth token endpoint, in the caller's unit of work (which
    /// holds the task's lock from here on). It lives `ttl_s` seconds, no longer than the task
    /// nor `not_after`; `binding` is recorded with it (see
    /// [`crate::issuers::IssueRequest::binding`]).
    #[expect(
        clippy::too_many_arguments,
        reason = "one issuance, its inputs named at the call"
    )]
    pub(crate) async fn issue_for_task<'s>(
        &'s self,
        u: &mut Tx<'s>,
        caller: &SpiffeId,
        task_id: &TaskId,
        spec: &ResourceSpec,
        grant: Grant,
        ttl_s: u64,
        idem: Option<String>,
        not_after: Option<UnixMillis>,
        binding: BTreeMap<String, String>,
    ) -> Result<IssuedCredential> {
        let task = self.lock_owned_task(u, caller, task_id).await?;
        if let Some(key) = &idem
            && let Some(cid) = self.store.credential_by_idempotency_key(task_id, key).await?
            // An index entry without its record is what a crash mid-write leaves: not issued.
            && self.store.get_credential(&cid).await?.is_some()
        {
            return self.replay(&cid, &grant).await;
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
        let mut v = self.decide(u, caller, &grant, &ctx);
        let mut approval = None;
        if v.decision == Decision::NeedsApproval
            && let Some(a) = self.usable_approval(&task, &grant, now).await?
        {
            ctx.approved = true;
            v = self.decide(u, caller, &grant, &ctx);
            approval = Some(a);
        }
        match v.decision {
            Decision::Allowed => {}
            Decision::Denied => {
                return Err(Error::PermissionDenied(format!(
                    "({}, {}) is not allowed now: {}",
                    grant.resource, grant.action, v.reason
                )));
            }
            Decision::NeedsApproval => {
                let id = self
                    .pending_or_new_approval(u, &task, &grant, v.policy_ids, now)
                    .await?;
                return Err(Error::NeedsApproval {
                    message: format!(
                        "({}, {}) needs approval: {}",
                        grant.resource, grant.action, v.reason
                    ),
                    approval_id: id.to_string(),
                });
            }
        }
        self.mint_credential(
            u, caller, &task, spec, &grant, expires_at, idem, approval, binding,
        )
        .await
    }

    /// Issues one credential of a task for a grant already decided: the per-task quota, the
    /// issuer, the records, the approval it uses and the audit entry, all in `u` (which holds the
    /// task's lock). An upstream account (PostgreSQL) is made with no lock held: `u` is committed
    /// first (the decisions stay recorded), the account's write-ahead ledger entry is made
    /// durable in a unit of its own, and `u` is replaced by a new unit that locks the task again
    /// and looks at it anew: an ended task, or a quota filled meanwhile, gets the account queued
    /// for removal instead of a credential.
    #[expect(
        clippy::too_many_arguments,
        reason = "one issuance, its inputs named at the call"
    )]
    pub(crate) async fn mint_credential<'s>(
        &'s self,
        u: &mut Tx<'s>,
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
        let indexed = self.store.credentials_of_task(&task_id).await?;
        let mut issued_count = indexed.len() as u64;
        if issued_count >= self.limits.max_credentials_per_task {
            // At the limit by the index: count only credentials whose record exists (a crash
            // mid-write can leave an index entry without its record, which was never issued).
            issued_count = 0;
            for cid in &indexed {
                if self.store.get_credential(cid).await?.is_some() {
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
                // A slow database must not hold up the task's other calls (a completion, the
                // kill switch): no lock is held across the upstream's network I/O.
                let decided = std::mem::replace(u, self.store.begin().await?);
                decided.commit().await?;
                let made = self
                    .create_upstream(&grant.resource, &id, &grant.action, now, expires_at)
                    .await;
                let task_now = u.lock_task(&task_id).await?;
                let (name, issued) = made?;
                let later = self.now();
                let refusal = if !task_now.is_some_and(|t| t.is_live(later)) {
                    Some(Error::FailedPrecondition(format!(
                        "task {task_id} ended while its credential was being made; the account \
                         is being removed"
                    )))
                } else if self.store.credentials_of_task(&task_id).await?.len() as u64
                    >= self.limits.max_credentials_per_task
                {
                    Some(Error::ResourceExhausted(format!(
                        "task {task_id} reached its limit of {} credentials while this one was \
                         being made; the account is being removed",
                        self.limits.max_credentials_per_task
                    )))
                } else {
                    None
                };
                if let Some(e) = refusal {
                    self.queue_upstream_revocation(
                        u,
                        &grant.resource,
                        &name,
                        Some(id.clone()),
                        "task-ended",
                        later,
                    )
                    .await?;
                    return Err(e);
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
        let sealed = self.store.seal_secret(&record.id, &secret)?;
        if let Inserted::Existing(cid) = u.insert_credential(&record, &sealed).await? {
            // The caller holds the task's lock and looked the key up: this is a crash leftover.
            return Err(Error::Storage(format!(
                "idempotency key of task {} already names {cid}",
                record.task_id
            )));
        }
        if let Some(name) = upstream_name {
            u.put_upstream(&UpstreamObject {
                resource: record.resource.clone(),
                name,
                credential_id: record.id.clone(),
                state: UpstreamState::Live,
                created_at: now,
                expires_at,
            })
            .await?;
        }
        if let Some(a) = approval {
            self.use_approval(u, a, record.id.as_str(), now).await?;
        }
        self.audit(
            u,
            Event {
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
            },
        );
        Ok(IssuedCredential {
            record,
            secret,
            fresh: true,
        })
    }

    /// Returns the credential an earlier call with the same idempotency key made.
    async fn replay(&self, id: &CredentialId, grant: &Grant) -> Result<IssuedCredential> {
        let record = self
            .store
            .get_credential(id)
            .await?
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
        let gone = || {
            Error::FailedPrecondition(format!(
                "credential {id} issued for this idempotency key is no longer active"
            ))
        };
        if !record.is_live(self.now()) {
            return Err(gone());
        }
        let secret = self.store.credential_secret(id).await?.ok_or_else(gone)?;
        Ok(IssuedCredential {
            record,
            secret,
            fresh: false,
        })
    }

    /// Ends one credential if it is active, in `u` (which holds its task's lock). Returns
    /// whether it changed.
    async fn end_credential(
        &self,
        u: &mut Tx<'_>,
        id: &CredentialId,
        state: CredentialState,
        reason: RevokeReason,
        now: UnixMillis,
    ) -> Result<bool> {
        let Some(mut rec) = self.store.get_credential(id).await? else {
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
        u.update_credential(&rec).await?;
        if let Some(name) = rec.attributes.get("user")
            && self.upstreams.contains_key(&rec.resource)
        {
            self.queue_upstream_revocation(
                u,
                &rec.resource,
                name,
                Some(rec.id.clone()),
                rec.end_reason.map(RevokeReason::as_str).unwrap_or(""),
                now,
            )
            .await?;
        }
        self.metrics.ended(rec.end_reason.unwrap_or(reason));
        self.audit(
            u,
            Event {
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
            },
        );
        Ok(true)
    }

    /// Ends a task and every credential of it, in `u` (which holds the task's lock).
    async fn end_task(
        &self,
        u: &mut Tx<'_>,
        task: &mut Task,
        state: TaskState,
        reason: RevokeReason,
        now: UnixMillis,
        out: &mut Completed,
    ) -> Result<()> {
        for cid in self.store.credentials_of_task(&task.id).await? {
            if self
                .end_credential(u, &cid, CredentialState::Revoked, reason, now)
                .await?
            {
                out.revoked_credentials.push(cid);
            }
        }
        task.state = state;
        task.ended_at = Some(now);
        task.purge_at = Some(now.saturating_add(self.limits.ended_retention_ms));
        u.update_task(task).await?;
        out.ended_tasks.push(task.id.clone());
        self.audit(
            u,
            Event {
                kind: "task_ended".into(),
                spiffe_id: task.owner.to_string(),
                task_id: task.id.to_string(),
                reason: reason.as_str().into(),
                ..Default::default()
            },
        );
        Ok(())
    }

    /// `Broker.CompleteTask`: revokes every credential of the task and ends its descendants,
    /// in one unit of work. Completing a task that is already completed succeeds with nothing
    /// to revoke, so retries are safe.
    pub async fn complete_task(&self, caller: &SpiffeId, task_id: &str) -> Result<Completed> {
        self.check_caller(caller).await?;
        self.writable()?;
        let id = TaskId::parse(task_id)?;
        let mut u = self.store.begin().await?;
        let r = self.complete_in(&mut u, caller, &id).await;
        self.finish(u, r).await
    }

    async fn complete_in(
        &self,
        u: &mut Tx<'_>,
        caller: &SpiffeId,
        id: &TaskId,
    ) -> Result<Completed> {
        let mut task = self.lock_owned_task(u, caller, id).await?;
        let now = self.now();
        let mut out = Completed::default();
        match task.effective_state(now) {
            TaskState::Active => {
                self.end_task(
                    u,
                    &mut task,
                    TaskState::Completed,
                    RevokeReason::Completed,
                    now,
                    &mut out,
                )
                .await?;
                self.revoke_descendants(u, id, &mut out).await?;
                Ok(out)
            }
            TaskState::Completed => {
                // A retry, perhaps after a crash between the task's end and its descendants':
                // the cascade is run again (it ends only what is still live).
                self.revoke_descendants(u, id, &mut out).await?;
                Ok(out)
            }
            TaskState::Expired if task.state == TaskState::Active => {
                // Past its expiry but not yet reaped: end it now, as expired.
                self.end_task(
                    u,
                    &mut task,
                    TaskState::Expired,
                    RevokeReason::Expired,
                    now,
                    &mut out,
                )
                .await?;
                Err(Error::FailedPrecondition(format!("task {id} is EXPIRED")))
            }
            s => Err(Error::FailedPrecondition(format!(
                "task {id} is {}",
                state_name(s)
            ))),
        }
    }

    /// `Broker.RevokeCredential`: only the owner of the credential's task may revoke it.
    pub async fn revoke_credential(&self, caller: &SpiffeId, credential_id: &str) -> Result<()> {
        self.check_caller(caller).await?;
        self.writable()?;
        let id = CredentialId::parse(credential_id)?;
        let not_found = || Error::NotFound(format!("credential {id}"));
        let rec = self
            .store
            .get_credential(&id)
            .await?
            .ok_or_else(not_found)?;
        if &rec.owner != caller {
            return Err(not_found());
        }
        self.revoke_now(&rec).await
    }

    /// Revokes one credential (if still active) under its task's lock, durably.
    pub(crate) async fn revoke_now(&self, rec: &CredentialRecord) -> Result<()> {
        let mut u = self.store.begin().await?;
        let r = async {
            u.lock_task(&rec.task_id).await?;
            self.end_credential(
                &mut u,
                &rec.id,
                CredentialState::Revoked,
                RevokeReason::Revoked,
                self.now(),
            )
            .await
            .map(|_| ())
        }
        .await;
        self.finish(u, r).await
    }

    /// `Verifier.Introspect`: only verifiers configured for the resource may ask; unknown,
    /// revoked, expired and other-resource credentials all read as inactive.
    pub async fn introspect(
        &self,
        caller: &SpiffeId,
        secret: &str,
        resource: &str,
    ) -> Result<Option<Introspection>> {
        self.check_caller(caller).await?;
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
            .active_credential(secret)
            .await?
            .filter(|r| r.resource == resource)
            .map(|record| Introspection { record }))
    }

    /// `Verifier.GetX509Authorities`: without a resource, the root that signs every resource's
    /// issuing CA; with one, only that resource's issuing CA.
    pub async fn x509_authorities_pem(&self, caller: &SpiffeId, resource: &str) -> Result<String> {
        self.check_caller(caller).await?;
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
    pub async fn x509_status(
        &self,
        caller: &SpiffeId,
        resource: &str,
        serial: &str,
    ) -> Result<X509Status> {
        self.check_caller(caller).await?;
        self.require_verifier(caller, resource)?;
        let Some(id) = crate::issuers::x509::credential_of_serial(serial)? else {
            return Ok(X509Status::Unknown);
        };
        let Some(record) = self.store.get_credential(&id).await? else {
            return Ok(X509Status::Unknown);
        };
        if record.resource != resource || record.kind != ResourceKind::X509.as_str() {
            return Ok(X509Status::Unknown);
        }
        let now = self.now();
        let task_live = self
            .store
            .get_task(&record.task_id)
            .await?
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
    async fn require_admin(&self, caller: &SpiffeId) -> Result<()> {
        if self.is_admin(caller) {
            self.check_caller(caller).await
        } else {
            Err(Error::PermissionDenied(format!(
                "{caller} is not an operator of this broker"
            )))
        }
    }

    /// `Admin.Status`.
    pub async fn status(&self, caller: &SpiffeId) -> Result<StatusInfo> {
        self.require_admin(caller).await?;
        let c = self.store.counts().await?;
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

    pub fn store(&self) -> &Arc<Storage> {
        &self.store
    }

    pub(crate) fn jwt(&self) -> &JwtIssuer {
        &self.jwt
    }
}

#[cfg(test)]
mod tests;
