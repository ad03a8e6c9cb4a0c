//! The broker's domain logic (DESIGN §1, §8): tasks, credentials, expiry and revocation. It sees
//! neither tonic nor sled: callers arrive as verified [`SpiffeId`]s, state goes through the
//! store's units of work ([`crate::store`]).
//!
//! The broker is a set of components with one job each, wired once by [`Broker::assemble`]
//! (which `server` calls): [`tasks::Tasks`], [`credentials::Credentials`],
//! [`approvals::Approvals`], [`upstream::Revocations`], [`reaper::Reaper`], [`admin::Admin`],
//! [`retention::Retention`], [`tool_calls::ToolCalls`] and [`oauth::OAuth`]. Each holds the
//! shared [`Core`] (store, policy, issuers, clock, limits, metrics, and the checks every call
//! makes) and the components it calls; the wiring has no cycle. Every handler opens one unit of
//! work, and replies after [`Core::finish`] committed it.

/// Declares a component: the shared [`Core`] and the components it calls (`Deref` to the core,
/// so the checks every component makes read alike).
macro_rules! component {
    ($(#[$doc:meta])* $name:ident { $($dep:ident: $ty:ty),* }) => {
        $(#[$doc])*
        pub struct $name {
            pub(super) core: std::sync::Arc<super::Core>,
            $(pub(super) $dep: std::sync::Arc<$ty>,)*
        }

        impl std::ops::Deref for $name {
            type Target = super::Core;
            fn deref(&self) -> &super::Core {
                &self.core
            }
        }
    };
}

pub mod admin;
pub mod approvals;
pub mod clock;
pub mod credentials;
pub mod delegation;
pub mod oauth;
pub mod reaper;
pub mod retention;
pub mod tasks;
pub mod tool_calls;
pub mod upstream;

pub use admin::Admin;
pub use approvals::Approvals;
pub use credentials::Credentials;
pub use oauth::OAuth;
pub use reaper::Reaper;
pub use retention::Retention;
pub use tasks::Tasks;
pub use tool_calls::ToolCalls;
pub use upstream::Revocations;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::Mutex;

use crate::audit::Event;
use crate::config::{Config, ResourceKind, RevocationConfig};
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
    /// The id a task being created will have, so that its grants' decisions name it.
    new_task: Option<&'a TaskId>,
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
            new_task: None,
            purpose: &task.purpose,
            labels: &task.labels,
            requested_ttl_ms,
            chain: &task.delegation_chain,
            approved: false,
        }
    }

    /// The task the decision is about, existing or being created ("" when neither).
    fn task_id(&self) -> String {
        match (self.task, self.new_task) {
            (Some(t), _) => t.id.to_string(),
            (None, Some(id)) => id.to_string(),
            (None, None) => String::new(),
        }
    }
}

/// What every component shares: the store (with sealing), policy, issuers, clock, limits,
/// metrics, the rate and disk guards, and the checks every call makes.
pub struct Core {
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
    /// Readiness fails while the engine's clock and ours differ by more (`[store]`).
    max_clock_skew_ms: i64,
    /// Who this process is when it holds a lease on singleton work.
    holder: String,
}

/// Audit archival settings (`[retention]`): once the store holds `keep + segment` entries, the
/// oldest `segment` of them move to a file in `dir`.
#[derive(Clone, Debug)]
pub struct AuditArchive {
    pub dir: std::path::PathBuf,
    pub keep: u64,
    pub segment: u64,
    /// How long the archiver's lease lasts without renewal (another replica takes over after).
    pub lease_ms: i64,
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

impl Core {
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
            max_clock_skew_ms: 1_000,
            holder: format!(
                "{}-{}",
                std::process::id(),
                hex::encode(rand::random::<[u8; 6]>())
            ),
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

    /// Readiness fails while the storage engine's clock and this process's differ by more than
    /// `ms` (an engine other replicas share; replicas judge expiry by their own clocks).
    pub fn with_max_clock_skew_ms(mut self, ms: i64) -> Self {
        self.max_clock_skew_ms = ms;
        self
    }

    /// `Ok` when this replica can serve: writes accepted ([`Core::writable`]) and the storage
    /// engine reachable with its clock within the allowed skew.
    pub async fn ready(&self) -> Result<()> {
        self.writable()?;
        self.store
            .check_ready(self.now(), self.max_clock_skew_ms)
            .await
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
        crate::model::check_name(field, name)?;
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
        crate::model::check_name(field, action)?;
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
                task_id: c.task_id(),
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

    /// Refuses callers that are not configured as verifiers of `resource`.
    fn require_verifier(&self, caller: &SpiffeId, resource: &str) -> Result<()> {
        crate::model::check_name("resource", resource)?;
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

    pub fn policy_file(&self) -> Option<&std::path::Path> {
        self.policy_file.as_deref()
    }

    /// This process's name as a lease holder.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub fn store(&self) -> &Arc<Storage> {
        &self.store
    }

    pub(crate) fn jwt(&self) -> &JwtIssuer {
        &self.jwt
    }
}

/// The broker: its components, wired once.
pub struct Broker {
    core: Arc<Core>,
    pub tasks: Arc<tasks::Tasks>,
    pub credentials: Arc<credentials::Credentials>,
    pub approvals: Arc<approvals::Approvals>,
    pub revocations: Arc<upstream::Revocations>,
    pub reaper: Arc<reaper::Reaper>,
    pub admin: Arc<admin::Admin>,
    pub retention: Arc<retention::Retention>,
    pub tool_calls: Arc<tool_calls::ToolCalls>,
    pub oauth: Arc<oauth::OAuth>,
}

impl Broker {
    /// Wires the components around `core`, each with the components it calls.
    pub fn assemble(core: Core) -> Self {
        let core = Arc::new(core);
        let approvals = Arc::new(approvals::Approvals { core: core.clone() });
        let revocations = Arc::new(upstream::Revocations { core: core.clone() });
        let credentials = Arc::new(credentials::Credentials {
            core: core.clone(),
            approvals: approvals.clone(),
            revocations: revocations.clone(),
        });
        let tasks = Arc::new(tasks::Tasks {
            core: core.clone(),
            approvals: approvals.clone(),
            credentials: credentials.clone(),
        });
        Self {
            reaper: Arc::new(reaper::Reaper {
                core: core.clone(),
                tasks: tasks.clone(),
                credentials: credentials.clone(),
            }),
            admin: Arc::new(admin::Admin {
                core: core.clone(),
                tasks: tasks.clone(),
            }),
            retention: Arc::new(retention::Retention { core: core.clone() }),
            tool_calls: Arc::new(tool_calls::ToolCalls {
                core: core.clone(),
                credentials: credentials.clone(),
                approvals: approvals.clone(),
            }),
            oauth: Arc::new(oauth::OAuth {
                core: core.clone(),
                tasks: tasks.clone(),
                credentials: credentials.clone(),
            }),
            core,
            tasks,
            credentials,
            approvals,
            revocations,
        }
    }

    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }
}

impl std::ops::Deref for Broker {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

#[cfg(test)]
mod tests;
