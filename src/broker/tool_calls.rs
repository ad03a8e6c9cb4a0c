//! Tool calls decided for a gateway (`envoy.service.auth.v3.Authorization/Check`): the agent is
//! the gateway's verified downstream peer, the task comes in a request header, the route gives
//! the grant, Cedar decides with the call in `context.tool_call`, and an allowed call gets the
//! task's credential for the gateway to inject, minted or reused. Every decision is audited.

use std::collections::BTreeMap;
use std::time::Instant;

use zeroize::Zeroizing;

use super::*;
use crate::audit::Event;
use crate::error::{Error, Result};
use crate::gateway::{GatewayConfig, HttpCall, Routed};
use crate::model::{
    CredentialId, CredentialState, Decision, Grant, SpiffeId, Task, TaskId, UnixMillis, preview,
};
use crate::policy::{PolicyRequest, ToolCallContext};

/// Attribute marking credentials minted for a gateway; only those are reused for later calls
/// (a credential the agent asked for itself is in the agent's hands).
const VIA_ATTRIBUTE: &str = "via";
const VIA_GATEWAY: &str = "gateway";

/// One call as a gateway reports it.
#[derive(Clone, Copy, Debug)]
pub struct ToolCallRequest<'a> {
    /// The verified downstream peer (`attributes.source.principal`): the agent's SPIFFE ID.
    pub principal: &'a str,
    pub call: HttpCall<'a>,
    /// The gateway's request id or W3C trace id, recorded in the audit entry.
    pub request_id: &'a str,
}

/// What the gateway does with the call.
#[derive(Debug)]
pub enum ToolCallVerdict {
    /// Forward it, with `header: value` set (overwriting the agent's) and `remove` removed.
    Allow {
        header: String,
        value: Zeroizing<String>,
        remove: Vec<String>,
        credential_id: CredentialId,
    },
    /// Answer the agent with a denial.
    Deny(ToolCallDenial),
}

/// Why a call was denied, for the agent.
#[derive(Clone, Debug, Default)]
pub struct ToolCallDenial {
    pub reason: String,
    /// Ids of the policies that decided (empty when no policy was reached).
    pub policies: Vec<String>,
    /// Set when the call waits for a human: the approval to ask for.
    pub approval_id: Option<String>,
    /// Set for an MCP JSON-RPC call: the denial is a JSON-RPC response.
    pub mcp: Option<McpReply>,
    /// The scope (action) the call needed, when the task lacks it or policy refused it: the
    /// gateway answers with an `insufficient_scope` challenge naming it.
    pub scope: Option<String>,
}

/// How to answer a denied MCP call.
#[derive(Clone, Debug, Default)]
pub struct McpReply {
    /// The request's JSON-RPC id (none for a notification or an unreadable message).
    pub id: Option<serde_json::Value>,
    /// A `tools/call`: answered as a tool result flagged `isError`, which MCP clients hand to
    /// the model as the tool's answer; anything else is a JSON-RPC error.
    pub tool_call: bool,
}

/// What one check found, for the verdict, the audit entry and the metrics.
#[derive(Default)]
struct Outcome {
    decision: Option<Decision>,
    denial: ToolCallDenial,
    principal: Option<SpiffeId>,
    task: Option<Task>,
    route: String,
    grant: Option<Grant>,
    mcp_method: String,
    tool: String,
    allow: Option<(String, Zeroizing<String>, CredentialId)>,
    reused: bool,
    /// The kind of a credential minted for this call.
    minted: Option<String>,
}

component!(
    /// Tool calls that gateways ask about (Envoy ext_authz, forward auth).
    ToolCalls { credentials: Credentials, approvals: Approvals }
);

impl Outcome {
    pub(super) fn deny(mut self, reason: impl Into<String>) -> Self {
        self.denial.reason = reason.into();
        self
    }
}

impl ToolCalls {
    /// Decides one tool call for `gateway`. Callers that are not configured gateways get
    /// `PermissionDenied` (an error, not a verdict); a store failure is an error too, so the
    /// gateway fails closed. Everything about the call itself is a verdict, audited.
    pub async fn check_tool_call(
        &self,
        gateway: &SpiffeId,
        req: ToolCallRequest<'_>,
    ) -> Result<ToolCallVerdict> {
        self.check_caller(gateway).await?;
        let Some(gw) = self.limits.gateway.as_deref() else {
            return Err(Error::PermissionDenied(
                "this broker has no [gateway] section: it decides no tool calls".into(),
            ));
        };
        if !self.limits.gateway_ids.contains(gateway) {
            return Err(Error::PermissionDenied(format!(
                "{gateway} is not a gateway of this broker (gateway.ids)"
            )));
        }
        let started = Instant::now();
        let mut u = self.store.begin().await?;
        let out = self.decide_tool_call(&mut u, gateway, gw, &req).await?;
        let decision = out.decision.unwrap_or(Decision::Denied);
        let path = req.call.path_only();
        let mut detail = format!(
            "route={} method={} host={} path={}",
            out.route,
            preview(req.call.method),
            preview(req.call.host),
            preview(path)
        );
        if !out.mcp_method.is_empty() {
            detail.push_str(&format!(" mcp_method={}", preview(&out.mcp_method)));
        }
        if !out.tool.is_empty() {
            detail.push_str(&format!(" tool={}", preview(&out.tool)));
        }
        if !req.request_id.is_empty() {
            detail.push_str(&format!(" request_id={}", preview(req.request_id)));
        }
        if let Some(a) = &out.denial.approval_id {
            detail.push_str(&format!(" approval_id={a}"));
        }
        if out.reused {
            detail.push_str(" credential=reused");
        }
        let (resource, action) = out
            .grant
            .as_ref()
            .map(|g| (g.resource.clone(), g.action.clone()))
            .unwrap_or_default();
        self.audit(
            &mut u,
            Event {
                kind: "tool_call".into(),
                actor: gateway.to_string(),
                spiffe_id: out
                    .principal
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_else(|| preview(req.principal)),
                task_id: out
                    .task
                    .as_ref()
                    .map(|t| t.id.to_string())
                    .unwrap_or_default(),
                credential_id: out
                    .allow
                    .as_ref()
                    .map(|(_, _, id)| id.to_string())
                    .unwrap_or_default(),
                resource,
                action,
                decision: decision_name(decision).into(),
                policies: out.denial.policies.clone(),
                reason: out.denial.reason.clone(),
                purpose: out
                    .task
                    .as_ref()
                    .map(|t| t.purpose.clone())
                    .unwrap_or_default(),
                delegation_chain: out
                    .task
                    .as_ref()
                    .map(|t| t.delegation_chain.iter().map(ToString::to_string).collect())
                    .unwrap_or_default(),
                detail,
            },
        );
        u.commit().await?;
        if out.minted.is_some() {
            self.metrics
                .issued(out.minted.as_deref().unwrap_or_default());
        }
        self.metrics.tool_call(decision, started.elapsed());
        Ok(match out.allow {
            Some((header, value, credential_id)) => {
                let mut remove = vec![gw.task_header.clone()];
                remove.extend(gw.strip_headers.iter().filter(|h| **h != header).cloned());
                ToolCallVerdict::Allow {
                    header,
                    value,
                    remove,
                    credential_id,
                }
            }
            None => ToolCallVerdict::Deny(out.denial),
        })
    }

    async fn decide_tool_call<'s>(
        &'s self,
        u: &mut Tx<'s>,
        gateway: &SpiffeId,
        gw: &GatewayConfig,
        req: &ToolCallRequest<'_>,
    ) -> Result<Outcome> {
        let mut out = Outcome::default();
        let principal = match SpiffeId::parse("attributes.source.principal", req.principal) {
            Ok(p) => p,
            Err(e) => {
                return Ok(out.deny(format!(
                    "the gateway sent no verified agent identity (downstream mTLS with an \
                     X.509-SVID is required): {e}"
                )));
            }
        };
        out.principal = Some(principal.clone());
        // The agent's own rate budget, as if it called the broker itself.
        if let Err(e) = match self.check_caller(&principal).await {
            Ok(()) => self.admit(&principal),
            Err(e) => Err(e),
        } {
            return Ok(out.deny(e.to_string()));
        }
        let routed: Routed<'_> = match gw.route(&req.call) {
            Ok(r) => r,
            Err(u) => {
                out.denial.mcp = u.mcp_id.map(|id| McpReply {
                    id: Some(id),
                    tool_call: false,
                });
                return Ok(out.deny(u.reason));
            }
        };
        out.route = routed.route.name.clone();
        if let Some(m) = &routed.mcp {
            out.mcp_method = m.method.clone();
            out.tool = m.tool.clone();
            out.denial.mcp = Some(McpReply {
                id: m.id.clone(),
                tool_call: m.method == "tools/call",
            });
        }
        let grant = Grant {
            resource: routed.route.resource.clone(),
            action: routed.route.action.clone(),
        };
        out.grant = Some(grant.clone());
        let Some(task_header) = req.call.header(&gw.task_header) else {
            return Ok(out.deny(format!(
                "no task: send the task id in the {} header",
                gw.task_header
            )));
        };
        let task_id = match TaskId::parse(task_header.trim()) {
            Ok(id) => id,
            Err(e) => return Ok(out.deny(format!("header {}: {e}", gw.task_header))),
        };
        let task = match u.lock_task(&task_id).await? {
            Some(t) if t.owner == principal => t,
            // Anyone else's task reads as unknown (no probing).
            _ => return Ok(out.deny(format!("task {task_id} is not a task of {principal}"))),
        };
        out.task = Some(task.clone());
        let now = self.now();
        if !task.is_live(now) {
            return Ok(out.deny(format!(
                "task {task_id} is {}",
                state_name(task.effective_state(now))
            )));
        }
        // From here on, a denial is about this grant: the challenge names its scope.
        out.denial.scope = Some(grant.action.clone());
        let Some(granted) = task.grants.iter().find(|g| g.grant == grant) else {
            return Ok(out.deny(format!(
                "task {task_id} did not ask for ({}, {}) when it started (route {})",
                grant.resource, grant.action, routed.route.name
            )));
        };
        if granted.decision == Decision::Denied {
            return Ok(out.deny(format!(
                "({}, {}) was denied at task start: {}",
                grant.resource, grant.action, granted.reason
            )));
        }
        let Some(spec) = self.limits.resources.get(&grant.resource) else {
            return Ok(out.deny(format!("resource {} is not configured", grant.resource)));
        };
        let Some(inject) = spec.inject.as_ref() else {
            return Ok(out.deny(format!(
                "resource {} has no inject section: the gateway cannot carry its credential",
                grant.resource
            )));
        };
        let ttl_s = gw
            .credential_ttl_seconds
            .min(spec.max_ttl_seconds)
            .min(self.limits.max_ttl_seconds);
        let expires_at = (now + secs_to_ms(ttl_s)).min(task.expires_at);
        let tool_call = ToolCallContext {
            gateway: gateway.to_string(),
            route: routed.route.name.clone(),
            method: req.call.method.to_owned(),
            host: req.call.host.to_owned(),
            path: req.call.path_only().to_owned(),
            mcp_method: out.mcp_method.clone(),
            tool: out.tool.clone(),
            arguments: routed
                .mcp
                .as_ref()
                .map(|m| m.arguments.clone())
                .unwrap_or_default(),
        };
        let mut ctx = DecideCtx::for_task(&task, expires_at - now);
        let mut v = self.evaluate(&principal, &grant, &ctx, Some(&tool_call));
        let mut approval = None;
        if v.decision == Decision::NeedsApproval
            && let Some(a) = self.approvals.usable_approval(&task, &grant, now).await?
        {
            ctx.approved = true;
            v = self.evaluate(&principal, &grant, &ctx, Some(&tool_call));
            approval = Some(a);
        }
        out.decision = Some(v.decision);
        out.denial.policies = v.policy_ids.clone();
        match v.decision {
            Decision::Allowed => {}
            Decision::Denied => return Ok(out.deny(v.reason)),
            Decision::NeedsApproval => {
                let id = self
                    .approvals
                    .pending_or_new_approval(u, &task, &grant, v.policy_ids, now)
                    .await?;
                out.denial.approval_id = Some(id.to_string());
                return Ok(out.deny(format!("{}; approval_id={id}", v.reason)));
            }
        }
        out.denial.reason = v.reason;
        // An approval is used by one issuance: an approved call always gets a fresh credential.
        let reusable = match approval {
            Some(_) => None,
            None => self.reusable_credential(&task, &grant, now, gw).await?,
        };
        let (credential_id, secret) = match reusable {
            Some(found) => {
                out.reused = true;
                found
            }
            None => {
                let issued = self
                    .credentials
                    .mint_credential(
                        u,
                        &principal,
                        &task,
                        spec,
                        super::credentials::Minting {
                            grant: &grant,
                            expires_at,
                            idempotency_key: None,
                            approval,
                            binding: BTreeMap::from([(
                                VIA_ATTRIBUTE.to_owned(),
                                VIA_GATEWAY.to_owned(),
                            )]),
                            allowed: None,
                        },
                    )
                    .await;
                let issued = match issued {
                    Ok(i) => i,
                    Err(Error::ResourceExhausted(m)) => {
                        out.decision = Some(Decision::Denied);
                        return Ok(out.deny(m));
                    }
                    Err(e) => return Err(e),
                };
                out.minted = Some(issued.record.kind.clone());
                (issued.record.id, issued.secret)
            }
        };
        out.allow = Some((
            inject.header.clone(),
            inject.value(secret.expose()),
            credential_id,
        ));
        Ok(out)
    }

    /// A live gateway credential of this task for this grant with enough life left (the one
    /// living longest), with its secret.
    pub(super) async fn reusable_credential(
        &self,
        task: &Task,
        grant: &Grant,
        now: UnixMillis,
        gw: &GatewayConfig,
    ) -> Result<Option<(CredentialId, crate::model::Secret)>> {
        let min_left = secs_to_ms(gw.reuse_min_remaining_seconds);
        let mut best: Option<(UnixMillis, CredentialId)> = None;
        for cid in self.store.credentials_of_task(&task.id).await? {
            let Some(rec) = self.store.get_credential(&cid).await? else {
                continue;
            };
            let usable = rec.state == CredentialState::Active
                && rec.resource == grant.resource
                && rec.action == grant.action
                && rec.attributes.get(VIA_ATTRIBUTE).map(String::as_str) == Some(VIA_GATEWAY)
                && rec.expires_at - now >= min_left;
            if usable && best.as_ref().is_none_or(|(e, _)| rec.expires_at > *e) {
                best = Some((rec.expires_at, cid));
            }
        }
        let Some((_, cid)) = best else {
            return Ok(None);
        };
        Ok(self.store.credential_secret(&cid).await?.map(|s| (cid, s)))
    }
}
impl Core {
    /// One policy decision without an audit entry of its own (the caller records it).
    pub(super) fn evaluate(
        &self,
        principal: &SpiffeId,
        grant: &Grant,
        c: &DecideCtx<'_>,
        tool_call: Option<&ToolCallContext>,
    ) -> crate::policy::Verdict {
        let now = self.now();
        let v = self.policy.decide(&PolicyRequest {
            principal,
            action: &grant.action,
            resource: &grant.resource,
            purpose: c.purpose,
            task_age_seconds: c.task.map_or(0, |t| (now - t.created_at).max(0) / 1000),
            requested_ttl_seconds: c.requested_ttl_ms / 1000,
            delegation_chain: c.chain,
            approved: c.approved,
            labels: c.labels,
            now_unix: now / 1000,
            tool_call,
        });
        self.metrics.decision(v.decision);
        v
    }
}
