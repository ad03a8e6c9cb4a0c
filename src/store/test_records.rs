//! Records for the engines' unit tests.

use crate::model::{
    CredentialId, CredentialRecord, CredentialState, Decision, Grant, GrantDecision, SpiffeId,
    Task, TaskId, TaskState,
};

/// The grant every test task asks for: (`r`, `a`).
pub(crate) fn grant() -> Grant {
    Grant {
        resource: "r".into(),
        action: "a".into(),
    }
}

/// An active task of `owner`, allowed `grant()`, with idempotency key `k1`, expiring at `exp`.
pub(crate) fn task(owner: &str, exp: i64) -> Task {
    Task {
        id: TaskId::generate(),
        owner: SpiffeId::parse("o", owner).unwrap(),
        purpose: "p".into(),
        grants: vec![GrantDecision {
            grant: grant(),
            decision: Decision::Allowed,
            reason: "x".into(),
            approval_id: None,
        }],
        labels: Default::default(),
        state: TaskState::Active,
        created_at: 0,
        expires_at: exp,
        ended_at: None,
        purge_at: None,
        parent: None,
        delegation_chain: vec![],
        idempotency_key: Some("k1".into()),
    }
}

/// An active token credential of `t` for `grant()`, expiring at 2000, without idempotency key.
pub(crate) fn credential(t: &Task) -> CredentialRecord {
    CredentialRecord {
        id: CredentialId::generate(),
        task_id: t.id.clone(),
        owner: t.owner.clone(),
        resource: "r".into(),
        action: "a".into(),
        kind: "token".into(),
        issued_at: 0,
        expires_at: 2_000,
        state: CredentialState::Active,
        ended_at: None,
        end_reason: None,
        idempotency_key: None,
        attributes: Default::default(),
        delegation_chain: vec![],
    }
}
