//! Domain types shared by the broker, the store and the API layer: validated identifiers, tasks,
//! credentials and the secret type. Nothing here knows about tonic or sled.

use std::fmt;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::Error;

/// Longest SPIFFE ID accepted (the SPIFFE spec caps URIs at 2048 bytes).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// A validated SPIFFE ID (`spiffe://trust-domain/path`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId(String);

impl SpiffeId {
    /// Parses and validates a SPIFFE ID; `field` names the input in the error.
    pub fn parse(field: &str, s: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::invalid(field, format!("{why} (got {})", preview(s)));
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(bad("is longer than 2048 bytes"));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("must start with spiffe://"))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(bad("has an empty trust domain"));
        }
        if !td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(bad("trust domain may hold only a-z, 0-9, '-', '.', '_'"));
        }
        if !path.is_empty() {
            for seg in path[1..].split('/') {
                if seg.is_empty() || seg == "." || seg == ".." {
                    return Err(bad("path has an empty, '.' or '..' segment"));
                }
                if !seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                {
                    return Err(bad("path may hold only A-Z, a-z, 0-9, '-', '.', '_'"));
                }
            }
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn trust_domain(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.split('/').next().unwrap_or(rest)
    }

    pub fn path(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.find('/').map_or("", |i| &rest[i..])
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        Self::parse("spiffe_id", &s)
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.0
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.0)
    }
}

/// Shortens untrusted input for error messages so that a 1 MiB field does not become a 1 MiB error.
pub fn preview(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return format!("{s:?}");
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..end], s.len())
}

macro_rules! random_id {
    ($name:ident, $prefix:literal, $field:literal) => {
        #[doc = concat!("128-bit identifier, printed as `", $prefix, "` + 32 hex digits: 48 bits of \
            creation time (milliseconds) then 80 random bits.")]
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// A new id. The time prefix makes ids of new records sort after older ones, so
            /// the store appends at the end of its trees instead of rewriting pages all over
            /// them (which, with sled, also keeps dead space reclaimable: BENCHMARKS.md). The
            /// 80 random bits keep ids unguessable; ids are never credentials either way.
            pub fn generate() -> Self {
                let mut b = [0u8; 16];
                let ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
                rand::rngs::OsRng.fill_bytes(&mut b[6..]);
                Self(format!("{}{}", $prefix, hex::encode(b)))
            }

            pub fn parse(s: &str) -> Result<Self, Error> {
                let ok = s.len() == $prefix.len() + 32
                    && s.starts_with($prefix)
                    && s[$prefix.len()..]
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                if ok {
                    Ok(Self(s.to_owned()))
                } else if s.is_empty() {
                    Err(Error::invalid($field, "is required"))
                } else {
                    Err(Error::invalid(
                        $field,
                        format!(
                            "must be {}<32 lowercase hex digits> (got {})",
                            $prefix,
                            preview(s)
                        ),
                    ))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self, Error> {
                Self::parse(&s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

random_id!(TaskId, "tsk_", "task_id");
random_id!(CredentialId, "crd_", "credential_id");
random_id!(ApprovalId, "apr_", "approval_id");

/// Secret material. Debug never shows it; the bytes are wiped when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    /// The plaintext. Callers must not log or persist it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Milliseconds since the Unix epoch: the broker's one time unit.
pub type UnixMillis = i64;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Grant {
    pub resource: String,
    pub action: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    Allowed,
    NeedsApproval,
    Denied,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantDecision {
    pub grant: Grant,
    pub decision: Decision,
    pub reason: String,
    #[serde(default)]
    pub approval_id: Option<ApprovalId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    Active,
    Completed,
    Expired,
    Revoked,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub owner: SpiffeId,
    pub purpose: String,
    pub grants: Vec<GrantDecision>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub state: TaskState,
    pub created_at: UnixMillis,
    pub expires_at: UnixMillis,
    #[serde(default)]
    pub ended_at: Option<UnixMillis>,
    /// When an ended task and its credentials are deleted from the store (retention window).
    #[serde(default)]
    pub purge_at: Option<UnixMillis>,
    #[serde(default)]
    pub parent: Option<TaskId>,
    /// Owners from the root task down to this one (this task's owner last).
    #[serde(default)]
    pub delegation_chain: Vec<SpiffeId>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

impl Task {
    /// Active and not past its expiry: the only state in which it may be used.
    pub fn is_live(&self, now: UnixMillis) -> bool {
        self.state == TaskState::Active && now < self.expires_at
    }

    /// The state a reader should see: an active task past its expiry is expired even before the
    /// reaper has marked it.
    pub fn effective_state(&self, now: UnixMillis) -> TaskState {
        if self.state == TaskState::Active && now >= self.expires_at {
            TaskState::Expired
        } else {
            self.state
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApprovalState {
    Pending,
    Approved,
    Denied,
    /// Approved and consumed by one issuance.
    Used,
}

impl ApprovalState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Approved => "APPROVED",
            Self::Denied => "DENIED",
            Self::Used => "USED",
        }
    }
}

/// A request for a human to approve one (task, resource, action). Single-use, expiring.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Approval {
    pub id: ApprovalId,
    pub task_id: TaskId,
    pub requester: SpiffeId,
    /// The requester's delegation chain (root first); nobody in it may approve.
    pub delegation_chain: Vec<SpiffeId>,
    pub grant: Grant,
    pub purpose: String,
    pub state: ApprovalState,
    pub created_at: UnixMillis,
    /// A pending approval lapses with its task; an approved one at `expires_at` too.
    pub expires_at: UnixMillis,
    #[serde(default)]
    pub decided_by: Option<SpiffeId>,
    #[serde(default)]
    pub decided_at: Option<UnixMillis>,
    #[serde(default)]
    pub reason: String,
    /// Policies that asked for the approval.
    #[serde(default)]
    pub policy_ids: Vec<String>,
}

impl Approval {
    /// The state a reader should see: past its expiry, a pending or approved request is expired.
    pub fn effective_state(&self, now: UnixMillis) -> (ApprovalState, bool) {
        let expired = matches!(self.state, ApprovalState::Pending | ApprovalState::Approved)
            && now >= self.expires_at;
        (self.state, expired)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CredentialState {
    Active,
    Revoked,
    Expired,
}

/// Why a credential or task ended; recorded with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RevokeReason {
    Completed,
    Expired,
    Revoked,
    Admin,
    Cascade,
    IdentityRevoked,
}

impl RevokeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::Admin => "admin",
            Self::Cascade => "cascade",
            Self::IdentityRevoked => "identity-revoked",
        }
    }
}

/// Where an account the broker made upstream (a PostgreSQL role…) stands in the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpstreamState {
    /// Written (and flushed) before the account is created: a crash between the two leaves a
    /// known name to clean up, never an unknown account.
    Creating,
    /// Created and recorded with its credential.
    Live,
}

/// An upstream account in the ledger (tree `upstream`, key resource ‖ 0 ‖ name).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpstreamObject {
    pub resource: String,
    pub name: String,
    pub credential_id: CredentialId,
    pub state: UpstreamState,
    pub created_at: UnixMillis,
    pub expires_at: UnixMillis,
}

/// A pending upstream revocation (tree `revocations`, same key): written before it is
/// attempted, retried with capped backoff until it succeeds, never dropped.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Revocation {
    pub resource: String,
    pub name: String,
    #[serde(default)]
    pub credential_id: Option<CredentialId>,
    /// Why it is revoked (credential end reason, or what the reconciler found).
    pub reason: String,
    pub enqueued_at: UnixMillis,
    pub attempts: u32,
    pub next_attempt_at: UnixMillis,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// A credential's record. The secret itself is not here: the store keeps it sealed beside the record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CredentialRecord {
    pub id: CredentialId,
    pub task_id: TaskId,
    pub owner: SpiffeId,
    pub resource: String,
    pub action: String,
    pub kind: String,
    pub issued_at: UnixMillis,
    pub expires_at: UnixMillis,
    pub state: CredentialState,
    #[serde(default)]
    pub ended_at: Option<UnixMillis>,
    #[serde(default)]
    pub end_reason: Option<RevokeReason>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Non-secret attributes returned with the credential (key id, user name…).
    #[serde(default)]
    pub attributes: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub delegation_chain: Vec<SpiffeId>,
}

impl CredentialRecord {
    pub fn is_live(&self, now: UnixMillis) -> bool {
        self.state == CredentialState::Active && now < self.expires_at
    }
}

/// The longest resource, action or route name.
pub const MAX_NAME_LEN: usize = 128;

/// Checks a resource, action or route name: 1 to [`MAX_NAME_LEN`] bytes of A-Z a-z 0-9 - _ . : /,
/// naming `field` when it is not.
pub fn check_name(field: &str, s: &str) -> Result<(), Error> {
    if s.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(Error::invalid(
            field,
            format!("is {} bytes; at most {MAX_NAME_LEN}", s.len()),
        ));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b))
    {
        return Err(Error::invalid(
            field,
            format!(
                "may hold only A-Z, a-z, 0-9 and - _ . : / (got {})",
                preview(s)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_start_with_their_creation_time_and_stay_unique() {
        let ms = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64
        };
        let before = ms();
        let ids: Vec<TaskId> = (0..1000).map(|_| TaskId::generate()).collect();
        let after = ms();
        let mut seen = std::collections::HashSet::new();
        for id in &ids {
            let t = u64::from_str_radix(&id.as_str()[4..16], 16).unwrap();
            assert!(
                (before..=after).contains(&t),
                "{id:?}: {t} not in {before}..={after}"
            );
            assert!(TaskId::parse(id.as_str()).is_ok());
            assert!(seen.insert(id.clone()));
        }
        // Ids made in a later millisecond sort after all earlier ones.
        let first = &ids[0];
        let later = ids
            .iter()
            .filter(|i| i.as_str()[4..16] > first.as_str()[4..16]);
        assert!(later.clone().all(|i| i > first));
    }

    #[test]
    fn spiffe_id_round_trips_and_rejects_bad_input() {
        let id = SpiffeId::parse("x", "spiffe://example.org/agent/a-1").unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "/agent/a-1");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        for bad in [
            "",
            "https://example.org/a",
            "spiffe:///a",
            "spiffe://Ex.org/a",
            "spiffe://example.org//a",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a b",
        ] {
            let err = SpiffeId::parse("delegate_spiffe_id", bad).unwrap_err();
            assert!(err.to_string().contains("delegate_spiffe_id"), "{err}");
        }
        assert!(SpiffeId::parse("x", &format!("spiffe://a/{}", "b".repeat(3000))).is_err());
    }

    #[test]
    fn random_ids_round_trip() {
        let t = TaskId::generate();
        assert_eq!(TaskId::parse(t.as_str()).unwrap(), t);
        assert!(TaskId::parse("tsk_zz").is_err());
        assert!(
            CredentialId::parse(t.as_str()).is_err(),
            "prefix is checked"
        );
        let err = TaskId::parse("").unwrap_err().to_string();
        assert!(err.contains("task_id"), "{err}");
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::new("jbt_supersecret".into());
        assert!(!format!("{s:?}").contains("supersecret"));
    }

    #[test]
    fn preview_cuts_long_input() {
        let long = "é".repeat(10_000);
        assert!(preview(&long).len() < 200);
    }
}
