//! The one mapping from domain errors to gRPC status (DESIGN §2).

use crate::error::Error;

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
        // The id at the end of the message, where clients have always read it.
        Error::NeedsApproval {
            message,
            approval_id,
        } => Status::failed_precondition(format!("{message} approval_id={approval_id}")),
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
    use crate::error::Error;
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
