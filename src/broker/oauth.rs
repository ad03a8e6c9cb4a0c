//! The OAuth grants mapped onto tasks and credentials (docs/oauth.md): an access token is a
//! credential of a task, decided by Cedar when it is issued and ended with its task. The HTTP
//! side (`api::oauth`) verifies the caller's SVID and speaks the RFCs; this module decides.

use std::collections::BTreeMap;

use super::*;
use crate::config::ResourceKind;
use crate::error::Error;
use crate::issuers::{ATTR_ACTORS, ATTR_CLIENT_ID, ATTR_CNF, actors_of};
use crate::model::{CredentialRecord, Grant, SpiffeId, TaskId};

/// The error codes of RFC 6749 §5.2 and the extensions the token endpoint answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OAuthErrorCode {
    InvalidRequest,
    InvalidClient,
    InvalidGrant,
    UnauthorizedClient,
    UnsupportedGrantType,
    InvalidScope,
    /// RFC 8707.
    InvalidTarget,
    /// RFC 8628 §3.5: a human approval is pending.
    AuthorizationPending,
    /// Rate limited (HTTP 429).
    SlowDown,
    TemporarilyUnavailable,
    ServerError,
}

component!(
    /// The OAuth grants, mapped onto tasks and credentials.
    OAuth { tasks: Tasks, credentials: Credentials }
);

impl OAuthErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::InvalidClient => "invalid_client",
            Self::InvalidGrant => "invalid_grant",
            Self::UnauthorizedClient => "unauthorized_client",
            Self::UnsupportedGrantType => "unsupported_grant_type",
            Self::InvalidScope => "invalid_scope",
            Self::InvalidTarget => "invalid_target",
            Self::AuthorizationPending => "authorization_pending",
            Self::SlowDown => "temporarily_unavailable",
            Self::TemporarilyUnavailable => "temporarily_unavailable",
            Self::ServerError => "server_error",
        }
    }
}

/// An OAuth error answer: its code, a description for the client, and the approval to wait for.
#[derive(Clone, Debug)]
pub struct OAuthError {
    pub code: OAuthErrorCode,
    pub description: String,
    pub approval_id: Option<String>,
    /// The task a pending token waits in (a retry names it in `task_id`).
    pub task_id: Option<String>,
}

impl OAuthError {
    pub fn new(code: OAuthErrorCode, description: impl Into<String>) -> Self {
        Self {
            code,
            description: description.into(),
            approval_id: None,
            task_id: None,
        }
    }

    /// A broker error met while serving a token request, as the RFCs name it. Denials by
    /// policy or by the task's grants are `invalid_scope`; unknown or ended tasks
    /// `invalid_grant`; failures inside the broker reach the client without their detail.
    pub(super) fn from_issuance(e: Error) -> Self {
        use OAuthErrorCode as C;
        match e {
            Error::PermissionDenied(m) => Self::new(C::InvalidScope, m),
            Error::NotFound(m) => Self::new(C::InvalidGrant, format!("{m} not found")),
            Error::NeedsApproval {
                message,
                approval_id,
            } => Self {
                code: C::AuthorizationPending,
                description: format!("{message} approval_id={approval_id}"),
                approval_id: Some(approval_id),
                task_id: None,
            },
            Error::FailedPrecondition(m) => Self::new(C::InvalidGrant, m),
            Error::InvalidArgument { field, reason } => {
                Self::new(C::InvalidRequest, format!("{field}: {reason}"))
            }
            Error::ResourceExhausted(m) => Self::new(C::InvalidRequest, m),
            Error::Unauthenticated(m) => Self::new(C::UnauthorizedClient, m),
            Error::Unavailable(m) => Self::new(C::TemporarilyUnavailable, m),
            e => {
                tracing::error!(error = %e, "OAuth request failed inside the broker");
                Self::new(
                    C::ServerError,
                    "internal error; the broker's log has the detail",
                )
            }
        }
    }
}

/// Which task a token belongs to.
#[derive(Clone, Debug)]
pub enum TaskChoice {
    /// An active task of the caller (`task_id`).
    Existing(String),
    /// A new task for just this grant (`purpose`).
    New { purpose: String },
}

/// A token request after the grant's credentials were verified.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// The RFC 8707 resource indicator.
    pub resource: String,
    pub scope: Option<String>,
    pub task: TaskChoice,
    /// `cnf.x5t#S256` of the client certificate (RFC 8705), for certificate-bound tokens.
    pub certificate_thumbprint: Option<String>,
}

/// A token exchange request (RFC 8693) after the actor was verified.
#[derive(Clone, Debug)]
pub struct ExchangeRequest {
    pub subject_token: zeroize::Zeroizing<String>,
    pub resource: String,
    pub scope: Option<String>,
    pub certificate_thumbprint: Option<String>,
}

/// An issued access token.
#[derive(Debug)]
pub struct AccessToken {
    pub issued: IssuedCredential,
    pub expires_in: u64,
}

/// The actions a task asked for on a resource.
fn asked_on(task: &crate::model::Task, resource: &str) -> Vec<String> {
    task.grants
        .iter()
        .filter(|g| g.grant.resource == resource)
        .map(|g| g.grant.action.clone())
        .collect()
}

/// What revocation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revocation {
    /// Ended now, or already inactive.
    Done,
    /// Not a token of this broker (answered 200 all the same, RFC 7009 §2.2).
    Unknown,
    /// A token the caller may not revoke.
    NotYours,
}

impl OAuth {
    /// The resource an RFC 8707 indicator names.
    pub fn resource_of_indicator(&self, uri: &str) -> Option<(&str, &ResourceSpec)> {
        self.limits
            .resources
            .iter()
            .find(|(_, r)| r.oauth_resource.as_deref() == Some(uri))
            .map(|(n, r)| (n.as_str(), r))
    }

    /// The RFC 8707 indicator of a resource, if it has one.
    pub fn resource_indicator(&self, name: &str) -> Option<String> {
        self.limits
            .resources
            .get(name)
            .and_then(|r| r.oauth_resource.clone())
    }

    /// Every action of a resource with an indicator (metadata's `scopes_supported`).
    pub fn oauth_scopes(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .limits
            .resources
            .values()
            .filter(|r| r.oauth_resource.is_some())
            .flat_map(|r| r.actions.iter().cloned())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The OAuth settings; the surface is not served without them.
    pub(super) fn oauth_limits(&self) -> Result<&super::OAuthLimits, OAuthError> {
        self.limits.oauth.as_ref().ok_or_else(|| {
            OAuthError::new(
                OAuthErrorCode::ServerError,
                "the OAuth surface is not configured",
            )
        })
    }

    /// The resource of an indicator that may issue access tokens: `invalid_target` otherwise.
    pub(super) fn target(&self, uri: &str) -> Result<(String, ResourceSpec), OAuthError> {
        let Some((name, spec)) = self.resource_of_indicator(uri) else {
            return Err(OAuthError::new(
                OAuthErrorCode::InvalidTarget,
                format!(
                    "resource {} is not a resource indicator of this authorization server",
                    crate::model::preview(uri)
                ),
            ));
        };
        if spec.inject.as_ref().is_some_and(|i| i.gateway_only) {
            return Err(OAuthError::new(
                OAuthErrorCode::InvalidTarget,
                format!(
                    "credentials of {uri} are injected by a gateway only (inject.gateway_only); \
                     call the tool through the gateway"
                ),
            ));
        }
        debug_assert!(matches!(spec.kind, ResourceKind::Jwt | ResourceKind::Token));
        Ok((name.to_owned(), spec.clone()))
    }

    /// The caller may act at all: not blocked, of an authorised trust domain.
    pub(super) async fn oauth_caller(&self, who: &SpiffeId) -> Result<(), OAuthError> {
        self.check_caller(who)
            .await
            .map_err(|e| OAuthError::new(OAuthErrorCode::UnauthorizedClient, e.to_string()))
    }

    /// The scope of a token: the requested one if it is an action of the resource, else the one
    /// action the candidates leave.
    pub(super) fn pick_scope(
        &self,
        uri: &str,
        spec: &ResourceSpec,
        requested: Option<&str>,
        candidates: &[String],
    ) -> Result<String, OAuthError> {
        let choices = || {
            let v: Vec<&str> = candidates.iter().map(String::as_str).collect();
            v.join(" ")
        };
        match requested {
            Some(s) if s.split(' ').filter(|p| !p.is_empty()).count() > 1 => Err(OAuthError::new(
                OAuthErrorCode::InvalidScope,
                format!("one scope per token; choose one of: {}", choices()),
            )),
            Some(s) if spec.actions.contains(s.trim()) => Ok(s.trim().to_owned()),
            Some(s) => Err(OAuthError::new(
                OAuthErrorCode::InvalidScope,
                format!(
                    "{} is not a scope of {uri}; its scopes: {}",
                    crate::model::preview(s),
                    spec.actions.iter().cloned().collect::<Vec<_>>().join(" ")
                ),
            )),
            None if candidates.len() == 1 => Ok(candidates[0].clone()),
            None => Err(OAuthError::new(
                OAuthErrorCode::InvalidScope,
                format!("name a scope; choose one of: {}", choices()),
            )),
        }
    }

    /// The token endpoint for the jwt-bearer and client_credentials grants: `client` is the
    /// verified SPIFFE ID of the assertion or of the client certificate.
    pub async fn oauth_token(
        &self,
        client: &SpiffeId,
        req: TokenRequest,
    ) -> Result<AccessToken, OAuthError> {
        self.oauth_limits()?;
        self.oauth_caller(client).await?;
        self.writable().map_err(OAuthError::from_issuance)?;
        let (name, spec) = self.target(&req.resource)?;
        // One unit of work: the task a grant starts and its token commit together, or not at
        // all.
        let mut u = self
            .store
            .begin()
            .await
            .map_err(OAuthError::from_issuance)?;
        let r = self.oauth_token_in(&mut u, client, req, name, spec).await;
        // Committed whatever the outcome (a refusal is recorded as surely as a token).
        u.commit().await.map_err(OAuthError::from_issuance)?;
        r
    }

    pub(super) async fn oauth_token_in<'s>(
        &'s self,
        u: &mut Tx<'s>,
        client: &SpiffeId,
        req: TokenRequest,
        name: String,
        spec: ResourceSpec,
    ) -> Result<AccessToken, OAuthError> {
        let (task_id, scope, fresh) = match req.task {
            TaskChoice::Existing(id) => {
                let task = match TaskId::parse(&id) {
                    Ok(tid) => self.owned_task(client, &tid).await.ok(),
                    Err(_) => None,
                };
                let task = task.ok_or_else(|| {
                    OAuthError::new(
                        OAuthErrorCode::InvalidGrant,
                        format!(
                            "task {} is not an active task of {client}",
                            crate::model::preview(&id)
                        ),
                    )
                })?;
                let asked = asked_on(&task, &name);
                let scope = self.pick_scope(&req.resource, &spec, req.scope.as_deref(), &asked)?;
                (task.id, scope, false)
            }
            TaskChoice::New { purpose } => {
                let all: Vec<String> = spec.actions.iter().cloned().collect();
                let scope = self.pick_scope(&req.resource, &spec, req.scope.as_deref(), &all)?;
                self.check_purpose(&purpose)
                    .map_err(OAuthError::from_issuance)?;
                let grants = [Grant {
                    resource: name.clone(),
                    action: scope.clone(),
                }];
                let (task, _) = self
                    .tasks
                    .create_task(
                        u,
                        NewTask {
                            owner: client,
                            purpose,
                            grants: &grants,
                            labels: BTreeMap::from([("via".to_owned(), "oauth".to_owned())]),
                            ttl_ms: super::secs_to_ms(self.limits.default_ttl_seconds),
                            idempotency_key: None,
                            parent: None,
                            chain: vec![client.clone()],
                        },
                    )
                    .await
                    .map_err(OAuthError::from_issuance)?;
                self.audit(
                    u,
                    crate::audit::Event {
                        kind: "task_started".into(),
                        spiffe_id: client.to_string(),
                        task_id: task.id.to_string(),
                        purpose: task.purpose.clone(),
                        detail: format!("expires_at={} via=oauth", task.expires_at),
                        ..Default::default()
                    },
                );
                (task.id, scope, true)
            }
        };
        let issued = self
            .issue_access_token(
                u,
                client,
                &task_id,
                (name, &spec, scope),
                BTreeMap::new(),
                req.certificate_thumbprint,
                None,
            )
            .await;
        match issued {
            Ok(i) => {
                if i.fresh {
                    self.metrics.issued(&i.record.kind);
                }
                Ok(self.access_token(i))
            }
            Err(e) => {
                let mut err = OAuthError::from_issuance(e);
                err.task_id = Some(task_id.to_string());
                // A new task that cannot hold its token now (denied, or failed) is ended in
                // the same unit; one waiting for a human is kept for the approval.
                if fresh
                    && err.code != OAuthErrorCode::AuthorizationPending
                    && let Ok(Some(mut task)) = u.lock_task(&task_id).await
                {
                    let now = self.now();
                    let _ = self
                        .tasks
                        .end_task(
                            u,
                            &mut task,
                            super::tasks::COMPLETED,
                            now,
                            &mut super::Completed::default(),
                        )
                        .await;
                }
                Err(err)
            }
        }
    }

    /// Issues an access token of `owner`'s task for `(resource, spec, scope)` through the one
    /// issuance path: the OAuth life (capped by the resource, the task and `not_after`), the
    /// `binding`, and the certificate it is bound to.
    #[expect(
        clippy::too_many_arguments,
        reason = "one issuance, its inputs named at the call"
    )]
    pub(super) async fn issue_access_token<'s>(
        &'s self,
        u: &mut Tx<'s>,
        owner: &SpiffeId,
        task_id: &TaskId,
        (resource, spec, action): (String, &ResourceSpec, String),
        mut binding: BTreeMap<String, String>,
        certificate_thumbprint: Option<String>,
        not_after: Option<crate::model::UnixMillis>,
    ) -> crate::error::Result<IssuedCredential> {
        let ttl = self
            .limits
            .oauth
            .as_ref()
            .map_or(spec.max_ttl_seconds, |o| o.access_token_ttl_seconds)
            .min(spec.max_ttl_seconds);
        if let Some(t) = certificate_thumbprint {
            binding.insert(ATTR_CNF.to_owned(), t);
        }
        let grant = Grant { resource, action };
        let asked = super::credentials::Issuance {
            grant,
            ttl_s: ttl,
            idempotency_key: None,
            not_after,
            binding,
        };
        self.credentials
            .issue_for_task(u, owner, task_id, spec, asked)
            .await
    }

    pub(super) fn access_token(&self, issued: IssuedCredential) -> AccessToken {
        let left = issued.record.expires_at - self.now();
        AccessToken {
            expires_in: u64::try_from(left.max(0) / 1000).unwrap_or(0),
            issued,
        }
    }

    /// Token exchange (RFC 8693): `actor` (verified, one of `token_exchange_actors`) gets a
    /// token of the subject token's agent and task for a downstream resource, narrowed: no
    /// longer lived than the subject token, for a grant the task asked for and Cedar allows now,
    /// and for the subject's own resource no other scope than the subject's.
    pub async fn oauth_exchange(
        &self,
        actor: &SpiffeId,
        req: ExchangeRequest,
    ) -> Result<AccessToken, OAuthError> {
        let oauth = self.oauth_limits()?.clone();
        self.oauth_caller(actor).await?;
        self.writable().map_err(OAuthError::from_issuance)?;
        if !oauth.token_exchange_actors.contains(actor) {
            return Err(OAuthError::new(
                OAuthErrorCode::UnauthorizedClient,
                format!("{actor} is not allowed to exchange tokens (oauth.token_exchange_actors)"),
            ));
        }
        let subject = self
            .credentials
            .active_credential(&req.subject_token)
            .await
            .map_err(OAuthError::from_issuance)?
            .filter(|r| r.kind == "jwt" || r.kind == "token")
            .ok_or_else(|| {
                OAuthError::new(
                    OAuthErrorCode::InvalidGrant,
                    "subject_token is not an active access token of this authorization server",
                )
            })?;
        if self.check_caller(&subject.owner).await.is_err() {
            return Err(OAuthError::new(
                OAuthErrorCode::InvalidGrant,
                format!(
                    "the subject token's owner {} may not act now",
                    subject.owner
                ),
            ));
        }
        let (name, spec) = self.target(&req.resource)?;
        let scope = if name == subject.resource {
            let s = req.scope.clone().unwrap_or_else(|| subject.action.clone());
            if s != subject.action {
                return Err(OAuthError::new(
                    OAuthErrorCode::InvalidScope,
                    format!(
                        "an exchange narrows, never widens: the subject token's scope on {} is {}",
                        req.resource, subject.action
                    ),
                ));
            }
            s
        } else {
            let task = self
                .store
                .get_task(&subject.task_id)
                .await
                .map_err(OAuthError::from_issuance)?
                .ok_or_else(|| OAuthError::new(OAuthErrorCode::InvalidGrant, "task is gone"))?;
            let asked = asked_on(&task, &name);
            let scope = self.pick_scope(&req.resource, &spec, req.scope.as_deref(), &asked)?;
            if !asked.contains(&scope) {
                return Err(OAuthError::new(
                    OAuthErrorCode::InvalidScope,
                    format!(
                        "the subject token's task did not ask for ({name}, {scope}); an exchange \
                         narrows, never widens"
                    ),
                ));
            }
            scope
        };
        let mut actors = actors_of(&subject.attributes);
        actors.push(actor.clone());
        let binding = BTreeMap::from([
            (
                ATTR_ACTORS.to_owned(),
                actors
                    .iter()
                    .map(SpiffeId::as_str)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (ATTR_CLIENT_ID.to_owned(), actor.to_string()),
        ]);
        let mut u = self
            .store
            .begin()
            .await
            .map_err(OAuthError::from_issuance)?;
        let r = self
            .issue_access_token(
                &mut u,
                &subject.owner,
                &subject.task_id,
                (name, &spec, scope),
                binding,
                req.certificate_thumbprint,
                Some(subject.expires_at),
            )
            .await;
        let issued = self.finish(u, r).await.map_err(OAuthError::from_issuance)?;
        if issued.fresh {
            self.metrics.issued(&issued.record.kind);
        }
        Ok(self.access_token(issued))
    }

    /// Introspection (RFC 7662): the active credential a token names, if `caller` is a
    /// verifier of its resource; anything else reads as inactive.
    pub async fn oauth_introspect(
        &self,
        caller: &SpiffeId,
        token: &str,
    ) -> crate::error::Result<Option<CredentialRecord>> {
        self.check_caller(caller).await?;
        let Some(record) = self.credentials.active_credential(token).await? else {
            return Ok(None);
        };
        Ok(self.is_verifier(caller, &record.resource).then_some(record))
    }

    /// Revocation (RFC 7009) by the agent the token was issued to, the actor it was exchanged
    /// for, or a verifier of its resource.
    pub async fn oauth_revoke(
        &self,
        caller: &SpiffeId,
        token: &str,
    ) -> crate::error::Result<Revocation> {
        self.check_caller(caller).await?;
        self.writable()?;
        if token.is_empty() || token.len() > super::MAX_SECRET_LEN {
            return Ok(Revocation::Unknown);
        }
        let Some(id) = self.store.credential_by_secret(token).await? else {
            return Ok(Revocation::Unknown);
        };
        let Some(record) = self.store.get_credential(&id).await? else {
            return Ok(Revocation::Unknown);
        };
        let may = &record.owner == caller
            || record.attributes.get(ATTR_CLIENT_ID).map(String::as_str) == Some(caller.as_str())
            || self.is_verifier(caller, &record.resource);
        if !may {
            return Ok(Revocation::NotYours);
        }
        self.credentials.revoke_now(&record).await?;
        Ok(Revocation::Done)
    }
}
impl Credentials {
    /// An active credential of this broker that a token names, with its live task (belt and
    /// braces: a task's end revokes its credentials anyway).
    pub(crate) async fn active_credential(
        &self,
        token: &str,
    ) -> crate::error::Result<Option<CredentialRecord>> {
        if token.is_empty() || token.len() > super::MAX_SECRET_LEN {
            return Ok(None);
        }
        let Some(id) = self.store.credential_by_secret(token).await? else {
            return Ok(None);
        };
        let Some(record) = self.store.get_credential(&id).await? else {
            return Ok(None);
        };
        let now = self.now();
        if !record.is_live(now) {
            return Ok(None);
        }
        Ok(match self.store.get_task(&record.task_id).await? {
            Some(t) if t.is_live(now) => Some(record),
            _ => None,
        })
    }
}
