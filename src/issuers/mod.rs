//! Credential issuers, one per resource kind (DESIGN §6). An issuer makes the secret; the broker
//! records, seals and expires it.

pub mod jwt;
pub mod token;

use std::collections::BTreeMap;

use crate::model::{CredentialId, Secret, SpiffeId, TaskId, UnixMillis};

/// Everything an issuer may put into a credential.
#[derive(Clone, Debug)]
pub struct IssueRequest<'a> {
    pub credential_id: &'a CredentialId,
    pub task_id: &'a TaskId,
    pub owner: &'a SpiffeId,
    pub resource: &'a str,
    pub action: &'a str,
    pub issued_at: UnixMillis,
    pub expires_at: UnixMillis,
    /// Owners from the root task down to this credential's owner.
    pub delegation_chain: &'a [SpiffeId],
}

/// A freshly issued secret and its non-secret attributes.
#[derive(Debug)]
pub struct Issued {
    pub secret: Secret,
    pub attributes: BTreeMap<String, String>,
}
