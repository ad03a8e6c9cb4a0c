//! The broker's error type (DESIGN §2). Domain code returns [`Error`]; only
//! `api::status::to_status` turns it into a `tonic::Status`, so the meaning of each status code
//! is decided in exactly one place, at the edge.

use std::fmt;

/// Errors that reach a caller or stop the broker from starting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No valid SVID, or one that does not identify an authorised workload.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Policy said no, the caller lacks a role (admin, verifier), or the identity is blocked.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A task or credential is unknown *or not the caller's*; both read the same so nobody can probe.
    #[error("{0} not found")]
    NotFound(String),
    /// The object exists but is in the wrong state (task not active, approval pending…).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// Policy wants a human's approval first; `approval_id` names the request to approve.
    #[error("failed precondition: {message} approval_id={approval_id}")]
    NeedsApproval {
        message: String,
        approval_id: String,
    },
    /// Malformed input; always names the field.
    #[error("invalid argument: {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// A quota would be exceeded.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// Bad configuration or key material found at start or reload; says what to check.
    #[error("configuration: {0}")]
    Config(String),
    /// Storage failed; the operation had no effect that a caller could observe.
    #[error("storage: {0}")]
    Storage(String),
    /// Sealing or unsealing failed (wrong key, corrupted record).
    #[error("crypto: {0}")]
    Crypto(String),
    /// A dependency of the broker is not reachable right now.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.to_string(),
        }
    }

    pub fn storage(e: impl fmt::Display) -> Self {
        Self::Storage(e.to_string())
    }

    pub fn internal(e: impl fmt::Display) -> Self {
        Self::Internal(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
