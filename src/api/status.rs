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
            StoreError::Io { .. } => {
                tracing::error!(error = %e, "storage failure");
                Code::Internal
            }
        };
        Status::new(code, e.to_string())
    }
}
