//! The gRPC surface: the only code that touches tonic and prost types. Each handler decodes the
//! request into domain types, calls the [`Broker`], and maps errors with [`crate::error::to_status`].

use std::net::SocketAddr;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::broker::{self, Broker};
use crate::error::to_status;
use crate::model::{self, CredentialRecord, SpiffeId, Task, UnixMillis};

pub mod ext_authz;
pub mod forward_auth;
pub mod oauth;
pub use ext_authz::ExtAuthzApi;

/// Generated protobuf and gRPC code for `jitbroker.v1`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("jitbroker.v1");

    /// Descriptor set for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("jitbroker_descriptor");
}

/// The descriptors of what the API port serves, for server reflection: the broker's own
/// services. The SPIFFE Workload API is compiled in (the broker is its client) but not served, so
/// its services are left out and reflection never advertises them.
pub fn served_descriptor_set() -> prost_types::FileDescriptorSet {
    use prost::Message;
    // Compiled in: a set that does not decode is a build defect, and serves nothing.
    let mut set =
        prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).unwrap_or_default();
    for file in &mut set.file {
        if file.package() != "jitbroker.v1" {
            file.service.clear();
        }
    }
    set
}

/// Every gRPC method the API port serves, as `/package.Service/Method`: the broker's own
/// services and `grpc.health.v1`. Metrics label requests by these names only.
pub fn served_methods() -> Vec<String> {
    use prost::Message;
    let health = prost_types::FileDescriptorSet::decode(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .unwrap_or_default();
    let mut out = Vec::new();
    for set in [served_descriptor_set(), health] {
        for file in set.file {
            let package = file.package();
            for service in &file.service {
                for method in &service.method {
                    out.push(format!("/{package}.{}/{}", service.name(), method.name()));
                }
            }
        }
    }
    // Envoy's external authorization, served from the envoy-types crate's own code.
    out.push(ext_authz::CHECK_PATH.to_owned());
    out
}

/// What the transport learnt about the caller: set by the TLS acceptor for each connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The SPIFFE ID of the verified client certificate, if one was presented.
    pub spiffe_id: Option<SpiffeId>,
    pub remote_addr: Option<SocketAddr>,
}

/// Static facts for `Admin.Status`.
#[derive(Clone, Debug)]
pub struct ServerFacts {
    pub version: &'static str,
    pub trust_domain: String,
    pub identity_source: &'static str,
    pub started_at: UnixMillis,
    pub identity: Option<crate::identity::Identity>,
}

/// The verified TLS peer of a connection to an HTTPS listener (forward auth, OAuth).
#[derive(Clone, Debug)]
pub struct TlsPeer {
    pub remote: SocketAddr,
    /// The SPIFFE ID of the client certificate, when one was presented (it was verified in
    /// the handshake).
    pub spiffe_id: Option<SpiffeId>,
    /// Base64url SHA-256 of the client certificate's DER (RFC 8705 `x5t#S256`).
    pub thumbprint: Option<String>,
}

impl TlsPeer {
    pub fn new(remote: SocketAddr, leaf: Option<&[u8]>) -> Self {
        let spiffe_id = leaf
            .and_then(|der| {
                crate::identity::peer_spiffe_id(&[rustls_pki_types::CertificateDer::from(der)]).ok()
            })
            .and_then(|s| SpiffeId::parse("client certificate", &s).ok());
        Self {
            remote,
            thumbprint: leaf.map(|d| {
                use base64::Engine;
                use sha2::Digest;
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(d))
            }),
            spiffe_id,
        }
    }
}

fn ts(ms: UnixMillis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// The caller's verified SPIFFE ID, or `UNAUTHENTICATED` naming the reason.
///
/// One identity per request: the X.509-SVID of the connection, or a JWT-SVID in
/// `authorization: Bearer …` (when enabled). When both are present they must name the same
/// SPIFFE ID.
async fn caller<T>(
    req: &Request<T>,
    broker: &Broker,
    identity: &Option<crate::identity::Identity>,
) -> Result<SpiffeId, Status> {
    let peer = req.extensions().get::<PeerInfo>();
    let addr = peer.and_then(|p| p.remote_addr);
    let x509 = peer.and_then(|p| p.spiffe_id.clone());
    let jwt_enabled = identity.as_ref().is_some_and(|i| i.jwt_enabled());
    let outcome = match (x509, bearer(req)) {
        (_, Err(reason)) => Err(reason),
        (Some(id), Ok(None)) => Ok(id),
        (None, Ok(None)) if jwt_enabled => Err(
            "no X.509-SVID on the connection and no JWT-SVID (authorization: Bearer …)".to_owned(),
        ),
        (None, Ok(None)) => {
            Err("no X.509-SVID on the connection: connect with mTLS using an X.509-SVID".to_owned())
        }
        (x509, Ok(Some(token))) => {
            let verified = match identity {
                Some(i) => i.verify_jwt(token).map_err(|e| e.to_string()),
                None => Err("JWT-SVIDs are not enabled on this broker".to_owned()),
            };
            verified
                .and_then(|s| SpiffeId::parse("JWT-SVID sub", &s).map_err(|e| e.to_string()))
                .and_then(|jwt_id| match x509 {
                    Some(x) if x != jwt_id => Err(format!(
                        "JWT-SVID refused: its SPIFFE ID {jwt_id} differs from the mTLS peer's {x}"
                    )),
                    _ => Ok(jwt_id),
                })
        }
    };
    match outcome {
        Ok(id) => {
            broker.admit(&id).map_err(to_status)?;
            Ok(id)
        }
        Err(reason) => {
            let remote = addr.map(|a| a.ip().to_string()).unwrap_or_default();
            broker.auth_failed(&remote, &reason);
            Err(Status::unauthenticated(format!(
                "no verified SPIFFE identity: {reason}"
            )))
        }
    }
}

/// The bearer token of `authorization` metadata: none, a token, or why it is unusable.
fn bearer<T>(req: &Request<T>) -> Result<Option<&str>, String> {
    let Some(v) = req.metadata().get("authorization") else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .map_err(|_| "authorization metadata is not valid ASCII".to_owned())?;
    let token = s
        .strip_prefix("Bearer ")
        .or_else(|| s.strip_prefix("bearer "))
        .map(str::trim)
        .ok_or_else(|| "authorization metadata is not \"Bearer <JWT-SVID>\"".to_owned())?;
    if token.is_empty() {
        return Err("authorization: Bearer carries no token".to_owned());
    }
    Ok(Some(token))
}

/// Runs a state-changing broker call to completion even if the caller goes away. hyper drops a
/// handler's future when its stream is reset or its connection closes; a call cut between its
/// steps (a PostgreSQL role committed but its credential not yet recorded, a task completed but
/// its delegates not yet revoked) would leave what it made half-done until a restart.
async fn to_completion<T, F>(call: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: std::future::Future<Output = crate::error::Result<T>> + Send + 'static,
{
    match tokio::spawn(call).await {
        Ok(r) => r.map_err(to_status),
        Err(e) => Err(to_status(crate::error::Error::Internal(format!(
            "the call did not finish: {e}"
        )))),
    }
}

fn decision(d: model::Decision) -> i32 {
    (match d {
        model::Decision::Allowed => pb::Decision::Allowed,
        model::Decision::NeedsApproval => pb::Decision::NeedsApproval,
        model::Decision::Denied => pb::Decision::Denied,
    }) as i32
}

fn task_state(s: model::TaskState) -> i32 {
    (match s {
        model::TaskState::Active => pb::TaskState::Active,
        model::TaskState::Completed => pb::TaskState::Completed,
        model::TaskState::Expired => pb::TaskState::Expired,
        model::TaskState::Revoked => pb::TaskState::Revoked,
    }) as i32
}

fn task_pb(t: Task, now: UnixMillis) -> pb::Task {
    let state = task_state(t.effective_state(now));
    pb::Task {
        task_id: t.id.to_string(),
        spiffe_id: t.owner.to_string(),
        purpose: t.purpose,
        grants: t
            .grants
            .into_iter()
            .map(|g| pb::GrantDecision {
                grant: Some(pb::Grant {
                    resource: g.grant.resource,
                    action: g.grant.action,
                }),
                decision: decision(g.decision),
                reason: g.reason,
                approval_id: g.approval_id.map(|a| a.to_string()).unwrap_or_default(),
            })
            .collect(),
        labels: t.labels.into_iter().collect(),
        state,
        created_at: Some(ts(t.created_at)),
        expires_at: Some(ts(t.expires_at)),
        parent_task_id: t.parent.map(|p| p.to_string()).unwrap_or_default(),
        delegation_chain: t.delegation_chain.into_iter().map(String::from).collect(),
    }
}

fn credential_pb(r: CredentialRecord, secret: &model::Secret) -> pb::Credential {
    pb::Credential {
        credential_id: r.id.to_string(),
        task_id: r.task_id.to_string(),
        resource: r.resource,
        action: r.action,
        kind: r.kind,
        secret: secret.expose().to_owned(),
        issued_at: Some(ts(r.issued_at)),
        expires_at: Some(ts(r.expires_at)),
        attributes: r.attributes.into_iter().collect(),
    }
}

fn grants(v: Vec<pb::Grant>) -> Vec<model::Grant> {
    v.into_iter()
        .map(|g| model::Grant {
            resource: g.resource,
            action: g.action,
        })
        .collect()
}

/// `jitbroker.v1.Broker`.
#[derive(Clone)]
pub struct BrokerApi {
    pub broker: Arc<Broker>,
    pub identity: Option<crate::identity::Identity>,
}

#[tonic::async_trait]
impl pb::broker_server::Broker for BrokerApi {
    async fn start_task(
        &self,
        request: Request<pb::StartTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let who = caller(&request, &self.broker, &self.identity).await?;
        let r = request.into_inner();
        let b = self.broker.clone();
        let task = to_completion(async move {
            b.start_task(
                &who,
                broker::StartTask {
                    purpose: r.purpose,
                    grants: grants(r.grants),
                    ttl_seconds: r.ttl_seconds,
                    labels: r.labels,
                    idempotency_key: r.idempotency_key,
                },
            )
            .await
        })
        .await?;
        Ok(Response::new(task_pb(task, self.broker.now())))
    }

    async fn issue_credential(
        &self,
        request: Request<pb::IssueCredentialRequest>,
    ) -> Result<Response<pb::Credential>, Status> {
        let who = caller(&request, &self.broker, &self.identity).await?;
        let r = request.into_inner();
        let b = self.broker.clone();
        let issued = to_completion(async move {
            b.issue_credential(
                &who,
                broker::IssueCredential {
                    task_id: r.task_id,
                    resource: r.resource,
                    action: r.action,
                    ttl_seconds: r.ttl_seconds,
                    idempotency_key: r.idempotency_key,
                },
            )
            .await
        })
        .await?;
        Ok(Response::new(credential_pb(issued.record, &issued.secret)))
    }

    async fn complete_task(
        &self,
        request: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        let who = caller(&request, &self.broker, &self.identity).await?;
        let r = request.into_inner();
        let b = self.broker.clone();
        let done = to_completion(async move { b.complete_task(&who, &r.task_id).await }).await?;
        Ok(Response::new(pb::CompleteTaskResponse {
            revoked_credential_ids: done
                .revoked_credentials
                .into_iter()
                .map(|c| c.to_string())
                .collect(),
            revoked_tasks: done
                .ended_tasks
                .into_iter()
                .map(|t| t.to_string())
                .collect(),
        }))
    }

    async fn revoke_credential(
        &self,
        request: Request<pb::RevokeCredentialRequest>,
    ) -> Result<Response<pb::RevokeCredentialResponse>, Status> {
        let who = caller(&request, &self.broker, &self.identity).await?;
        let r = request.into_inner();
        let b = self.broker.clone();
        to_completion(async move { b.revoke_credential(&who, &r.credential_id).await }).await?;
        Ok(Response::new(pb::RevokeCredentialResponse {}))
    }

    async fn delegate_task(
        &self,
        request: Request<pb::DelegateTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let who = caller(&request, &self.broker, &self.identity).await?;
        let r = request.into_inner();
        let b = self.broker.clone();
        let task = to_completion(async move {
            b.delegate_task(
                &who,
                broker::delegation::DelegateTask {
                    parent_task_id: r.parent_task_id,
                    delegate_spiffe_id: r.delegate_spiffe_id,
                    purpose: r.purpose,
                    grants: grants(r.grants),
                    ttl_seconds: r.ttl_seconds,
                },
            )
            .await
        })
        .await?;
        Ok(Response::new(task_pb(task, self.broker.now())))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let who = caller(&request, &self.broker, &self.identity).await?;
        let r = request.into_inner();
        let task = self.broker.get_task(&who, &r.task_id).map_err(to_status)?;
        Ok(Response::new(task_pb(task, self.broker.now())))
    }
}

/// `jitbroker.v1.Verifier`.
#[derive(Clone)]
pub struct VerifierApi {
    pub broker: Arc<Broker>,
    pub identity: Option<crate::identity::Identity>,
}

#[tonic::async_trait]
impl pb::verifier_server::Verifier for VerifierApi {
    async fn introspect(
        &self,
        request: Request<pb::IntrospectRequest>,
    ) -> Result<Response<pb::IntrospectResponse>, Status> {
        let who = caller(&request, &self.broker, &self.identity).await?;
        let r = request.into_inner();
        let found = self
            .broker
            .introspect(&who, &r.secret, &r.resource)
            .map_err(to_status)?;
        Ok(Response::new(match found {
            None => pb::IntrospectResponse::default(),
            Some(i) => pb::IntrospectResponse {
                active: true,
                credential_id: i.record.id.to_string(),
                spiffe_id: i.record.owner.to_string(),
                task_id: i.record.task_id.to_string(),
                resource: i.record.resource,
                action: i.record.action,
                expires_at: Some(ts(i.record.expires_at)),
                delegation_chain: i
                    .record
                    .delegation_chain
                    .into_iter()
                    .map(String::from)
                    .collect(),
            },
        }))
    }

    async fn get_jwks(
        &self,
        request: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        let _who = caller(&request, &self.broker, &self.identity).await?;
        Ok(Response::new(pb::GetJwksResponse {
            jwks_json: self.broker.jwks_json(),
        }))
    }

    async fn get_x509_authorities(
        &self,
        request: Request<pb::GetX509AuthoritiesRequest>,
    ) -> Result<Response<pb::GetX509AuthoritiesResponse>, Status> {
        let who = caller(&request, &self.broker, &self.identity).await?;
        let r = request.into_inner();
        let pem = self
            .broker
            .x509_authorities_pem(&who, &r.resource)
            .map_err(to_status)?;
        Ok(Response::new(pb::GetX509AuthoritiesResponse { pem }))
    }

    async fn x509_status(
        &self,
        request: Request<pb::X509StatusRequest>,
    ) -> Result<Response<pb::X509StatusResponse>, Status> {
        let who = caller(&request, &self.broker, &self.identity).await?;
        let r = request.into_inner();
        let found = self
            .broker
            .x509_status(&who, &r.resource, &r.serial)
            .map_err(to_status)?;
        let (status, record) = match found {
            broker::X509Status::Unknown => (pb::X509CertStatus::X509CertUnknown, None),
            broker::X509Status::Good(r) => (pb::X509CertStatus::X509CertGood, Some(r)),
            broker::X509Status::Revoked(r) => (pb::X509CertStatus::X509CertRevoked, Some(r)),
            broker::X509Status::Expired(r) => (pb::X509CertStatus::X509CertExpired, Some(r)),
        };
        let mut out = pb::X509StatusResponse {
            status: status as i32,
            ..Default::default()
        };
        if let Some(r) = record {
            out.credential_id = r.id.to_string();
            out.spiffe_id = r.owner.to_string();
            out.task_id = r.task_id.to_string();
            out.expires_at = Some(ts(r.expires_at));
            // A credential that ran out without being ended yet still ended at its expiry.
            out.ended_at = match (r.ended_at, status) {
                (Some(at), _) => Some(ts(at)),
                (None, pb::X509CertStatus::X509CertExpired) => Some(ts(r.expires_at)),
                (None, _) => None,
            };
            out.reason = match (r.end_reason, status) {
                (Some(reason), _) => reason.as_str().to_owned(),
                (None, pb::X509CertStatus::X509CertExpired) => "expired".to_owned(),
                (None, _) => String::new(),
            };
            out.resource = r.resource;
            out.action = r.action;
        }
        Ok(Response::new(out))
    }
}

/// `jitbroker.v1.Admin`.
#[derive(Clone)]
pub struct AdminApi {
    pub broker: Arc<Broker>,
    pub facts: ServerFacts,
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminApi {
    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let who = caller(&request, &self.broker, &self.facts.identity).await?;
        let s = self.broker.status(&who).map_err(to_status)?;
        let f = &self.facts;
        let (own_id, svid_exp) = match &f.identity {
            Some(i) => (
                i.own_spiffe_id().unwrap_or_default(),
                i.svid_not_after().and_then(|t| {
                    t.duration_since(std::time::UNIX_EPOCH)
                        .ok()
                        .map(|d| ts(d.as_millis() as i64))
                }),
            ),
            None => (String::new(), None),
        };
        Ok(Response::new(pb::StatusResponse {
            version: f.version.to_owned(),
            trust_domain: f.trust_domain.clone(),
            identity_source: f.identity_source.to_owned(),
            started_at: Some(ts(f.started_at)),
            active_tasks: s.active_tasks,
            active_credentials: s.active_credentials,
            policy_count: s.policy_count as u32,
            policy_digest: s.policy_digest,
            spiffe_id: own_id,
            svid_expires_at: svid_exp,
        }))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let who = caller(&request, &self.broker, &self.facts.identity).await?;
        let r = request.into_inner();
        let state = match pb::TaskState::try_from(r.state) {
            Ok(pb::TaskState::Unspecified) => None,
            Ok(pb::TaskState::Active) => Some(model::TaskState::Active),
            Ok(pb::TaskState::Completed) => Some(model::TaskState::Completed),
            Ok(pb::TaskState::Expired) => Some(model::TaskState::Expired),
            Ok(pb::TaskState::Revoked) => Some(model::TaskState::Revoked),
            Err(_) => {
                return Err(to_status(crate::error::Error::invalid(
                    "state",
                    format!("{} is not a task state", r.state),
                )));
            }
        };
        let (tasks, next) = self
            .broker
            .list_tasks(&who, Some(&r.spiffe_id), state, r.page_size, &r.page_token)
            .map_err(to_status)?;
        let now = self.broker.now();
        Ok(Response::new(pb::ListTasksResponse {
            tasks: tasks.into_iter().map(|t| task_pb(t, now)).collect(),
            next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }

    async fn revoke_task(
        &self,
        request: Request<pb::RevokeTaskRequest>,
    ) -> Result<Response<pb::RevokeTaskResponse>, Status> {
        let who = caller(&request, &self.broker, &self.facts.identity).await?;
        let r = request.into_inner();
        let b = self.broker.clone();
        let done =
            to_completion(async move { b.admin_revoke_task(&who, &r.task_id, &r.reason).await })
                .await?;
        Ok(Response::new(pb::RevokeTaskResponse {
            revoked_credential_ids: ids(&done.revoked_credentials),
            revoked_tasks: ids(&done.ended_tasks),
        }))
    }

    async fn revoke_identity(
        &self,
        request: Request<pb::RevokeIdentityRequest>,
    ) -> Result<Response<pb::RevokeIdentityResponse>, Status> {
        let who = caller(&request, &self.broker, &self.facts.identity).await?;
        let r = request.into_inner();
        let (b, block) = (self.broker.clone(), r.block);
        let done = to_completion(async move {
            b.revoke_identity(&who, &r.spiffe_id, &r.reason, r.block)
                .await
        })
        .await?;
        Ok(Response::new(pb::RevokeIdentityResponse {
            revoked_credential_ids: ids(&done.revoked_credentials),
            revoked_tasks: ids(&done.ended_tasks),
            blocked: block,
        }))
    }

    async fn unblock_identity(
        &self,
        request: Request<pb::UnblockIdentityRequest>,
    ) -> Result<Response<pb::UnblockIdentityResponse>, Status> {
        let who = caller(&request, &self.broker, &self.facts.identity).await?;
        let r = request.into_inner();
        let was_blocked = self
            .broker
            .unblock_identity(&who, &r.spiffe_id, &r.reason)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::UnblockIdentityResponse { was_blocked }))
    }

    async fn list_approvals(
        &self,
        request: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        let who = caller(&request, &self.broker, &self.facts.identity).await?;
        let r = request.into_inner();
        let now = self.broker.now();
        let list = self
            .broker
            .list_approvals(&who, &r.state)
            .map_err(to_status)?;
        Ok(Response::new(pb::ListApprovalsResponse {
            approvals: list.into_iter().map(|a| approval_pb(a, now)).collect(),
        }))
    }

    async fn approve(
        &self,
        request: Request<pb::ApproveRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        let who = caller(&request, &self.broker, &self.facts.identity).await?;
        let r = request.into_inner();
        let a = self
            .broker
            .decide_approval(&who, &r.approval_id, &r.reason, true)
            .await
            .map_err(to_status)?;
        Ok(Response::new(approval_pb(a, self.broker.now())))
    }

    async fn deny(
        &self,
        request: Request<pb::DenyRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        let who = caller(&request, &self.broker, &self.facts.identity).await?;
        let r = request.into_inner();
        let a = self
            .broker
            .decide_approval(&who, &r.approval_id, &r.reason, false)
            .await
            .map_err(to_status)?;
        Ok(Response::new(approval_pb(a, self.broker.now())))
    }

    async fn reload_policy(
        &self,
        request: Request<pb::ReloadPolicyRequest>,
    ) -> Result<Response<pb::ReloadPolicyResponse>, Status> {
        let who = caller(&request, &self.broker, &self.facts.identity).await?;
        let (n, digest) = self.broker.reload_policy(&who).await.map_err(to_status)?;
        Ok(Response::new(pb::ReloadPolicyResponse {
            policy_count: n as u32,
            policy_digest: digest,
        }))
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let who = caller(&request, &self.broker, &self.facts.identity).await?;
        let v = self.broker.verify_audit(&who).await.map_err(to_status)?;
        Ok(Response::new(pb::VerifyAuditResponse {
            ok: v.ok,
            entries: v.entries,
            first_bad_seq: v.first_bad_seq,
            reason: v.reason,
        }))
    }
}

fn approval_pb(a: model::Approval, now: UnixMillis) -> pb::Approval {
    let (state, expired) = a.effective_state(now);
    pb::Approval {
        approval_id: a.id.to_string(),
        task_id: a.task_id.to_string(),
        requester: a.requester.to_string(),
        grant: Some(pb::Grant {
            resource: a.grant.resource,
            action: a.grant.action,
        }),
        purpose: a.purpose,
        state: if expired { "EXPIRED" } else { state.as_str() }.to_owned(),
        created_at: Some(ts(a.created_at)),
        expires_at: Some(ts(a.expires_at)),
        decided_by: a.decided_by.map(String::from).unwrap_or_default(),
        reason: a.reason,
        policy_ids: a.policy_ids,
        delegation_chain: a.delegation_chain.into_iter().map(String::from).collect(),
    }
}

fn ids<T: std::fmt::Display>(v: &[T]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}
