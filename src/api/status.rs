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
            StoreError::Unavailable { .. } | StoreError::Releasing(_) => Code::Unavailable,
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
            // gRPC's code for "the entire file system is out of space". Both
            // keep what is committed; the message says how much and what to do.
            StoreError::NoSpace { .. } | StoreError::DiskFull { .. } => Code::ResourceExhausted,
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

    #[test]
    fn a_full_disk_is_resource_exhausted_and_other_disk_errors_internal() {
        let full = Status::from(StoreError::write_failed("writing partial upload", 4096)(
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        ));
        assert_eq!(full.code(), Code::ResourceExhausted);
        assert!(
            full.message().contains("write_offset 4096"),
            "{}",
            full.message()
        );
        let quota = Status::from(StoreError::write_failed("writing partial upload", 0)(
            std::io::Error::from_raw_os_error(libc::EDQUOT),
        ));
        assert_eq!(quota.code(), Code::ResourceExhausted);
        let refused = Status::from(StoreError::NoSpace {
            need: 150 << 20,
            available: 13 << 20,
            free: 77 << 20,
            floor: 64 << 20,
            reserved: 0,
        });
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(refused.message().contains("150 MiB") && refused.message().contains("13 MiB"));
        let eio = Status::from(StoreError::write_failed("writing partial upload", 8192)(
            std::io::Error::from_raw_os_error(libc::EIO),
        ));
        assert_eq!(eio.code(), Code::Internal);
        assert!(
            eio.message().contains("first 8192 bytes"),
            "{}",
            eio.message()
        );
    }
}
