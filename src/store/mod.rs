//! Blob storage behind one trait, [`BlobStore`], with two backends:
//!
//! - [`LocalStore`]: a content-addressed store on local disk (the default; one
//!   replica, since another pod cannot see its disk);
//! - [`S3Store`]: objects in an S3-compatible bucket through Apache Arrow's
//!   `object_store`, streamed into multipart uploads (any number of replicas).
//!
//! Both keep the same guarantees: a blob is visible under its digest only once
//! its bytes were verified; an interrupted upload keeps what it received and
//! resumes at [`BlobStore::query_write_status`]'s offset; nothing streams a whole
//! blob through memory.
//!
//! Errors are typed here and turned into gRPC statuses in exactly one place,
//! `api::status`.

mod cache;
mod local;
mod s3;
mod upload;
mod writer;

use std::{pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::Stream;
use tokio::task::JoinHandle;

pub use local::{DiskSpace, LocalStore, SpaceReading, statvfs};
pub use s3::{RequestObserver, S3Store};
pub use upload::Upload;

use crate::api::resource::{Digest, WriteName};
use crate::config::{Backend, StorageConfig};

/// A blob's bytes, in chunks, as the backend produces them.
pub type ReadStream = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

/// A content-addressed blob store with resumable uploads.
#[async_trait::async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Which backend this is, for logs, metrics and `memgate limits`.
    fn backend(&self) -> Backend;

    /// `storage.max_blob_size`.
    fn max_blob_size(&self) -> u64;

    /// Checks a declared size against `storage.max_blob_size`.
    fn check_size(&self, size: u64) -> Result<()> {
        let max = self.max_blob_size();
        if size > max {
            return Err(StoreError::TooLarge { size, max });
        }
        Ok(())
    }

    /// Whether the blob is stored (with exactly its declared size).
    async fn contains(&self, d: &Digest) -> Result<bool>;

    /// Streams `[offset, offset + limit)` of a blob (limit 0: to the end) in
    /// chunks of at most `chunk` bytes, reading ahead only a little of what the
    /// consumer has taken.
    async fn read(&self, d: &Digest, offset: u64, limit: u64, chunk: usize) -> Result<ReadStream>;

    /// Starts or resumes an upload at `offset`, which must equal the bytes
    /// already received.
    async fn begin_write(&self, name: &WriteName, offset: u64) -> Result<Upload>;

    /// Bytes durably received for an upload, and whether its blob is complete.
    async fn query_write_status(&self, name: &WriteName) -> Result<(u64, bool)>;

    /// Deletes partial uploads untouched for longer than `expiry` and not being
    /// written. Returns how many were removed.
    async fn collect_garbage(&self, expiry: Duration) -> Result<usize>;

    /// Whether the store can serve requests now; `Err` says why not. Readiness
    /// follows it. Local disk is always reachable.
    async fn check_reachable(&self) -> Result<()> {
        Ok(())
    }

    /// The local disk budget uploads are admitted against (for metrics); object
    /// stores have none.
    fn disk(&self) -> Option<DiskSpace> {
        None
    }
}

/// A shared handle to whichever backend the configuration selected.
pub type Store = Arc<dyn BlobStore>;

/// Opens the backend `cfg.backend` names. Object-store requests are reported to
/// `observer` (the server's metrics).
pub fn open(cfg: &StorageConfig, observer: Arc<dyn RequestObserver>) -> Result<Store> {
    Ok(match cfg.backend {
        Backend::Local => Arc::new(LocalStore::open(cfg)?),
        Backend::S3 => Arc::new(S3Store::open(cfg, observer)?),
    })
}

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
    /// The previous stream of this upload ended but is still making what it
    /// received durable; retrying in a moment succeeds.
    #[error(
        "the previous Write stream for upload {0} is still saving what it received; retry in a moment"
    )]
    Releasing(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Refused up front: what the upload still has to write does not fit the
    /// free disk space above `storage.min_free_space`.
    #[error(
        "not enough disk space for this upload: it still needs {} but {} are free above the \
         storage.min_free_space floor of {} ({} free on the volume{}); free space on the data \
         volume, or lower storage.min_free_space, then retry",
        mib(.need), mib(.available), mib(.floor), mib(.free), reserved_note(.reserved)
    )]
    NoSpace {
        need: u64,
        available: u64,
        free: u64,
        floor: u64,
        /// Held by uploads in progress, not yet written.
        reserved: u64,
    },
    /// The disk (or a quota) filled up while the upload was being written.
    /// What reached the disk before stays committed and resumable.
    #[error(
        "disk full while {context}: {source}; the first {committed} bytes of the upload are \
         committed and kept: free space on the data volume, then resume at write_offset {committed}"
    )]
    DiskFull {
        context: String,
        committed: u64,
        #[source]
        source: std::io::Error,
    },
    /// The object store could not be reached or failed; retrying later may work.
    #[error("object store unavailable while {context}: {detail}")]
    Unavailable { context: String, detail: String },
    /// The object store asked us to slow down.
    #[error("object store is throttling requests while {context}; retry later")]
    Throttled { context: String },
    /// The object store refused memgate's credentials. The detail goes to the
    /// server log only: it can name the access key.
    #[error(
        "object store denied access while {context}: check memgate's credentials and the bucket policy"
    )]
    Denied { context: String },
    /// Anything else the object store said.
    #[error("object store error while {context}: {detail}")]
    Backend { context: String, detail: String },
}

impl StoreError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| StoreError::Io { context, source }
    }

    /// An upload's write failed with `committed` bytes on disk: a full disk (or
    /// quota) is [`StoreError::DiskFull`], anything else an I/O error whose
    /// message still says what was kept.
    pub(crate) fn write_failed(
        context: impl Into<String>,
        committed: u64,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| {
            if local::is_disk_full(&source) {
                StoreError::DiskFull {
                    context,
                    committed,
                    source,
                }
            } else {
                StoreError::Io {
                    context: format!(
                        "{context} (the first {committed} bytes of the upload are committed and kept)"
                    ),
                    source,
                }
            }
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A byte count for people: whole MiB when exact, else one decimal.
fn mib(bytes: &u64) -> String {
    const MIB: u64 = 1 << 20;
    if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{:.1} MiB", *bytes as f64 / MIB as f64)
    }
}

fn reserved_note(reserved: &u64) -> String {
    match reserved {
        0 => String::new(),
        r => format!("; uploads in progress have {} reserved", mib(r)),
    }
}

/// Runs [`BlobStore::collect_garbage`] every `interval` until the store is dropped.
pub fn spawn_gc(store: &Store, interval: Duration, expiry: Duration) -> JoinHandle<()> {
    let weak = Arc::downgrade(store);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            let Some(store) = weak.upgrade() else { return };
            if let Err(e) = store.collect_garbage(expiry).await {
                tracing::warn!(error = %e, "partial upload garbage collection failed");
            }
        }
    })
}
