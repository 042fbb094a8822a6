//! The one place where library errors become gRPC statuses, with messages a
//! client can act on.

use tonic::{Code, Status};

use super::resource::NameError;
use crate::store::StoreError;

impl From<NameError> for Status {
    fn from(e: NameError) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        let code = match &e {
            StoreError::NotFound(_) | StoreError::UploadNotFound(_) => Code::NotFound,
            StoreError::OutOfRange { .. } => Code::OutOfRange,
            StoreError::WrongOffset { .. }
            | StoreError::DigestMismatch { .. }
            | StoreError::Overflow { .. }
            | StoreError::TooLarge { .. } => Code::InvalidArgument,
            StoreError::Busy(_) => Code::Aborted,
            StoreError::Unavailable { .. } => Code::Unavailable,
            StoreError::Denied { .. } => Code::PermissionDenied,
            StoreError::Throttled { .. } => {
                // gRFC A6: tell the client when to come back.
                let mut status = Status::resource_exhausted(e.to_string());
                status
                    .metadata_mut()
                    .insert("grpc-retry-pushback-ms", THROTTLED_PUSHBACK_MS.into());
                return status;
            }
            StoreError::Backend { .. } => Code::Internal,
            StoreError::Io { .. } => {
                tracing::error!(error = %e, "storage failure");
                Code::Internal
            }
        };
        Status::new(code, e.to_string())
    }
}

/// How long a client should wait after the object store throttled us (its own
/// retries with back-off were already spent).
const THROTTLED_PUSHBACK_MS: u32 = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_store_failures_become_codes_a_client_can_act_on() {
        let context = || "uploading a part".to_string();
        let throttled = Status::from(StoreError::Throttled { context: context() });
        assert_eq!(throttled.code(), Code::ResourceExhausted);
        assert_eq!(
            throttled
                .metadata()
                .get("grpc-retry-pushback-ms")
                .and_then(|v| v.to_str().ok()),
            Some("1000")
        );
        let down = Status::from(StoreError::Unavailable {
            context: context(),
            detail: "connection refused".into(),
        });
        assert_eq!(down.code(), Code::Unavailable);
        assert!(down.message().contains("connection refused"));
        let denied = Status::from(StoreError::Denied { context: context() });
        assert_eq!(denied.code(), Code::PermissionDenied);
        let other = Status::from(StoreError::Backend {
            context: context(),
            detail: "InvalidRequest".into(),
        });
        assert_eq!(other.code(), Code::Internal);
    }
}
