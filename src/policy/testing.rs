//! `jitbroker policy test`: run a file of requests with expected decisions against a policy set,
//! so users can test their policies in their own CI.
//!
//! ```toml
//! [[case]]
//! name = "support agent reads tickets"
//! principal = "spiffe://example.org/ns/support/sa/agent"
//! action = "read"
//! resource = "tickets"
//! purpose = "answer ticket 42"          # optional
//! labels = { env = "prod" }            # optional
//! requested_ttl_seconds = 300          # optional
//! delegation_chain = []                # optional: delegators, root first (the principal is appended)
//! approved = false                     # optional
//! expect = "allowed"                   # allowed | needs_approval | denied
//! expect_policies = ["support-read"]   # optional: exactly the deciding policy ids
//!
//! [case.tool_call]                     # optional: a call through a gateway (context.tool_call)
//! route = "mcp-refund"
//! mcp_method = "tools/call"
//! tool = "refund"
//! arguments = { amount = 40 }          # integers, strings and booleans
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use super::{ArgValue, PolicyEngine, PolicyRequest, ToolCallContext};
use crate::error::{Error, Result};
use crate::model::{Decision, SpiffeId};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[serde(default)]
    case: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    principal: String,
    action: String,
    resource: String,
    #[serde(default = "default_purpose")]
    purpose: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default = "default_ttl")]
    requested_ttl_seconds: i64,
    #[serde(default)]
    delegation_chain: Vec<String>,
    #[serde(default)]
    approved: bool,
    #[serde(default)]
    task_age_seconds: i64,
    expect: Expect,
    #[serde(default)]
    expect_policies: Option<Vec<String>>,
    #[serde(default)]
    tool_call: Option<CaseToolCall>,
}

/// `[case.tool_call]`: what a gateway would report about the call.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseToolCall {
    #[serde(default)]
    gateway: String,
    #[serde(default)]
    route: String,
    #[serde(default)]
    method: String,
    #[serde(default)]
    host: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    mcp_method: String,
    #[serde(default)]
    tool: String,
    #[serde(default)]
    arguments: BTreeMap<String, toml::Value>,
}

impl CaseToolCall {
    fn context(&self) -> Result<ToolCallContext> {
        let mut arguments = BTreeMap::new();
        for (k, v) in &self.arguments {
            let v = match v {
                toml::Value::Integer(n) => ArgValue::Long(*n),
                toml::Value::String(s) => ArgValue::String(s.clone()),
                toml::Value::Boolean(b) => ArgValue::Bool(*b),
                other => {
                    return Err(Error::invalid(
                        format!("tool_call.arguments.{k}"),
                        format!("must be an integer, a string or a boolean (got {other})"),
                    ));
                }
            };
            arguments.insert(k.clone(), v);
        }
        Ok(ToolCallContext {
            gateway: self.gateway.clone(),
            route: self.route.clone(),
            method: self.method.clone(),
            host: self.host.clone(),
            path: self.path.clone(),
            mcp_method: self.mcp_method.clone(),
            tool: self.tool.clone(),
            arguments,
        })
    }
}

fn default_purpose() -> String {
    "policy test".into()
}
fn default_ttl() -> i64 {
    300
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Expect {
    Allowed,
    NeedsApproval,
    Denied,
}

impl Expect {
    fn matches(self, d: Decision) -> bool {
        matches!(
            (self, d),
            (Expect::Allowed, Decision::Allowed)
                | (Expect::NeedsApproval, Decision::NeedsApproval)
                | (Expect::Denied, Decision::Denied)
        )
    }
}

/// One case's outcome.
#[derive(Debug)]
pub struct CaseResult {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// The outcome of a case file.
#[derive(Debug, Default)]
pub struct CaseReport {
    pub results: Vec<CaseResult>,
}

impl CaseReport {
    pub fn passed(&self) -> bool {
        self.results.iter().all(|r| r.passed)
    }

    pub fn failed(&self) -> usize {
        self.results.iter().filter(|r| !r.passed).count()
    }
}

impl fmt::Display for CaseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.results {
            writeln!(
                f,
                "{} {}{}",
                if r.passed { "PASS" } else { "FAIL" },
                r.name,
                if r.passed {
                    String::new()
                } else {
                    format!(": {}", r.detail)
                }
            )?;
        }
        write!(
            f,
            "{} passed, {} failed",
            self.results.len() - self.failed(),
            self.failed()
        )
    }
}

/// The largest file of policy test cases accepted.
pub const MAX_CASES_BYTES: usize = 4 << 20;

/// Runs every case of `cases_toml` (named `origin` in errors) against `engine`.
pub fn run_cases(engine: &PolicyEngine, cases_toml: &str, origin: &str) -> Result<CaseReport> {
    crate::config::check_text_size(
        origin,
        "policy test file",
        cases_toml.len(),
        MAX_CASES_BYTES,
    )?;
    let file: CaseFile = toml::from_str(cases_toml)
        .map_err(|e| Error::Config(format!("{origin}: {}", e.to_string().trim_end())))?;
    if file.case.is_empty() {
        return Err(Error::Config(format!("{origin}: no [[case]] entries")));
    }
    let mut report = CaseReport::default();
    for (i, c) in file.case.iter().enumerate() {
        let at = |e: Error| Error::Config(format!("{origin}: case {} ({:?}): {e}", i + 1, c.name));
        let principal = SpiffeId::parse("principal", &c.principal).map_err(at)?;
        let mut chain = c
            .delegation_chain
            .iter()
            .map(|s| SpiffeId::parse("delegation_chain", s))
            .collect::<Result<Vec<_>>>()
            .map_err(at)?;
        chain.push(principal.clone());
        let tool_call = c
            .tool_call
            .as_ref()
            .map(CaseToolCall::context)
            .transpose()
            .map_err(at)?;
        let v = engine.decide(&PolicyRequest {
            principal: &principal,
            action: &c.action,
            resource: &c.resource,
            purpose: &c.purpose,
            task_age_seconds: c.task_age_seconds,
            requested_ttl_seconds: c.requested_ttl_seconds,
            delegation_chain: &chain,
            approved: c.approved,
            labels: &c.labels,
            now_unix: 0,
            tool_call: tool_call.as_ref(),
        });
        let mut problems = Vec::new();
        if !c.expect.matches(v.decision) {
            problems.push(format!(
                "expected {:?}, got {:?} ({})",
                c.expect, v.decision, v.reason
            ));
        }
        if let Some(want) = &c.expect_policies {
            let mut want = want.clone();
            want.sort();
            if want != v.policy_ids {
                problems.push(format!(
                    "expected deciding policies {want:?}, got {:?}",
                    v.policy_ids
                ));
            }
        }
        report.results.push(CaseResult {
            name: c.name.clone(),
            passed: problems.is_empty(),
            detail: problems.join("; "),
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Every example under policies/ passes its own cases.
    #[test]
    fn example_policy_sets_pass_their_cases() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let mut seen = 0;
        for entry in std::fs::read_dir(&root).unwrap() {
            let dir = entry.unwrap().path();
            if !dir.is_dir() {
                continue;
            }
            let cfg_text = std::fs::read_to_string(dir.join("jitbroker.toml")).unwrap();
            let cfg = Config::from_toml(&cfg_text, "example", |_| None).unwrap();
            let mut cfg = cfg;
            cfg.policy_file = dir.join("policy.cedar");
            let engine = crate::server::load_policy(&cfg).unwrap();
            let cases = std::fs::read_to_string(dir.join("cases.toml")).unwrap();
            let report = run_cases(&engine, &cases, "cases.toml").unwrap();
            assert!(report.passed(), "{}:\n{report}", dir.display());
            assert!(report.results.len() >= 6, "{}", dir.display());
            seen += 1;
        }
        assert_eq!(seen, 2, "both example scenarios are present");
    }

    #[test]
    fn unknown_keys_and_failures_are_reported() {
        let engine = PolicyEngine::new(
            [("r".to_string(), "token".to_string())].into(),
            vec!["read".into()],
            "@id(\"p\") permit(principal, action, resource);",
            "t",
        )
        .unwrap();
        let err = run_cases(
            &engine,
            "[[case]]\nname='x'\nprincipal='spiffe://td/a'\naction='read'\nresource='r'\nexpect='allowed'\ncolour=1\n",
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("colour"), "{err}");
        let report = run_cases(
            &engine,
            "[[case]]\nname='x'\nprincipal='spiffe://td/a'\naction='read'\nresource='r'\nexpect='denied'\n",
            "c.toml",
        )
        .unwrap();
        assert!(!report.passed());
        assert!(
            report
                .to_string()
                .contains("FAIL x: expected Denied, got Allowed")
        );
    }
}
