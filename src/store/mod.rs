//! Blob storage. Today one backend, [`LocalStore`], a content-addressed store on
//! local disk with resumable uploads. Everything streams: no call holds more than
//! a few chunks of a blob in memory.
//!
//! Errors are typed here and turned into gRPC statuses in exactly one place,
//! `api::status`.

mod cache;
mod local;
mod writer;

pub use local::{LocalStore, Upload, spawn_gc};

use crate::api::resource::Digest;

/// What can go wrong in the store. Each variant carries what a client needs to act.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob {0} not found")]
    NotFound(Digest),
    #[error("upload {0} not found")]
    UploadNotFound(String),
    #[error("read_offset {offset} is past the end of blob of {size} bytes")]
    OutOfRange { offset: u64, size: u64 },
    #[error("write_offset {got} does not continue the upload: expected {expected}")]
    WrongOffset { expected: u64, got: i64 },
    #[error(
        "digest mismatch: the name says {expected}, the data received is {actual_hash}/{actual_size}; nothing was stored"
    )]
    DigestMismatch {
        expected: Digest,
        actual_hash: String,
        actual_size: u64,
    },
    #[error("upload is larger than its declared size {declared}: {received} bytes received")]
    Overflow { declared: u64, received: u64 },
    #[error("blob size {size} exceeds the configured maximum storage.max_blob_size = {max}")]
    TooLarge { size: u64, max: u64 },
    #[error("another Write stream is active for upload {0}")]
    Busy(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| StoreError::Io { context, source }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
