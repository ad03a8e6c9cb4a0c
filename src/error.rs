//! The broker's error type and its one mapping to gRPC status codes (DESIGN §2).
//!
//! Domain code returns [`Error`]; only [`to_status`] turns it into a `tonic::Status`, so the
//! meaning of each status code is decided in exactly one place.

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

/// The one mapping from domain errors to gRPC status (DESIGN §2).
///
/// Storage, crypto and internal failures are logged here with their detail and reach the caller
/// only as a generic message: their text may name files or keys that callers have no business
/// seeing.
pub fn to_status(err: Error) -> tonic::Status {
    use tonic::Status;
    match err {
        Error::Unauthenticated(m) => Status::unauthenticated(m),
        Error::PermissionDenied(m) => Status::permission_denied(m),
        Error::NotFound(m) => Status::not_found(format!("{m} not found")),
        Error::FailedPrecondition(m) => Status::failed_precondition(m),
        Error::InvalidArgument { field, reason } => {
            Status::invalid_argument(format!("{field}: {reason}"))
        }
        Error::ResourceExhausted(m) => Status::resource_exhausted(m),
        Error::Unavailable(m) => Status::unavailable(m),
        e @ (Error::Config(_) | Error::Storage(_) | Error::Crypto(_) | Error::Internal(_)) => {
            tracing::error!(error = %e, "request failed inside the broker");
            Status::internal("internal error; the broker's log has the detail")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn mapping_is_one_to_one_with_design() {
        let cases = [
            (Error::Unauthenticated("x".into()), Code::Unauthenticated),
            (Error::PermissionDenied("x".into()), Code::PermissionDenied),
            (Error::NotFound("task".into()), Code::NotFound),
            (
                Error::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (Error::invalid("purpose", "too long"), Code::InvalidArgument),
            (
                Error::ResourceExhausted("x".into()),
                Code::ResourceExhausted,
            ),
            (Error::Storage("/secret/path".into()), Code::Internal),
        ];
        for (e, code) in cases {
            assert_eq!(to_status(e).code(), code);
        }
        let s = to_status(Error::invalid("purpose", "too long"));
        assert!(s.message().starts_with("purpose:"), "{}", s.message());
        assert!(
            !to_status(Error::Storage("/secret/path".into()))
                .message()
                .contains("/secret/path")
        );
    }
}
