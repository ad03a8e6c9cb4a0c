//! Credential issuers, one per resource kind (DESIGN §6). An issuer makes the secret; the broker
//! records, seals and expires it.

pub mod jwt;
pub mod postgres;
pub mod token;
pub mod x509;

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
    /// Who the credential is for: the resource's RFC 8707 indicator when it has one, else its
    /// name (a JWT's `aud`).
    pub audience: &'a str,
    /// An OAuth access token (RFC 9068: `typ` `at+jwt`, `client_id`), for resources with an
    /// indicator.
    pub access_token: bool,
    /// Attributes that bind the credential ([`ATTR_ACTORS`], [`ATTR_CNF`], [`ATTR_CLIENT_ID`]),
    /// stored with its record and, for JWTs, carried as claims.
    pub binding: &'a BTreeMap<String, String>,
}

/// Actors of token exchanges (RFC 8693), oldest first, comma-separated: the `act` claim nests
/// them with the newest outermost.
pub const ATTR_ACTORS: &str = "act";
/// Base64url SHA-256 of the client certificate a token is bound to (RFC 8705 `cnf.x5t#S256`).
pub const ATTR_CNF: &str = "cnf_x5t_s256";
/// The OAuth client the token was issued to, when it is not the owner (an exchange's actor).
pub const ATTR_CLIENT_ID: &str = "client_id";

/// The actors recorded in a credential's attributes, oldest first.
pub fn actors_of(attributes: &BTreeMap<String, String>) -> Vec<SpiffeId> {
    attributes
        .get(ATTR_ACTORS)
        .map(|s| {
            s.split(',')
                .filter_map(|a| SpiffeId::parse(ATTR_ACTORS, a).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A freshly issued secret and its non-secret attributes.
#[derive(Debug)]
pub struct Issued {
    pub secret: Secret,
    pub attributes: BTreeMap<String, String>,
}

/// An upstream system where each credential is a real account (a PostgreSQL role…). Every call
/// is idempotent where it can be: `revoke` of an absent account succeeds, so the revocation queue
/// may retry blindly. The broker bounds each call with a timeout.
pub trait Upstream: Send + Sync {
    /// Every account this broker makes starts with this prefix (and nothing else should).
    fn prefix(&self) -> &str;
    /// Creates account `name` for `action`, valid until `expires_at`, in one step.
    fn create<'a>(
        &'a self,
        name: &'a str,
        action: &'a str,
        expires_at: UnixMillis,
    ) -> futures::future::BoxFuture<'a, crate::error::Result<Issued>>;
    /// Ends the account's sessions and removes it; succeeds if it does not exist.
    fn revoke<'a>(
        &'a self,
        name: &'a str,
    ) -> futures::future::BoxFuture<'a, crate::error::Result<()>>;
    /// The names of existing accounts with the prefix.
    fn list<'a>(&'a self) -> futures::future::BoxFuture<'a, crate::error::Result<Vec<String>>>;
    /// Checks at start-up that the broker's account may do what issuing and revoking need:
    /// `Err(Error::Config)` says exactly what to grant; other errors (the system is down) only
    /// delay the check to the first use.
    fn preflight(&self) -> futures::future::BoxFuture<'_, crate::error::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}
