//! The S3 backend, on Apache Arrow's `object_store`. Keys, under `storage.s3.prefix`:
//!
//! - `blobs/{sha256}`: a verified blob. Only ever written by a server-side copy
//!   of a verified staging object, so nothing half-written is ever visible here.
//! - `uploads/{id}/{generation}`: the bytes an interrupted upload received so
//!   far (`id` is a hash of the upload name). The newest generation is the
//!   upload's state; its size is what `QueryWriteStatus` reports.
//!
//! A Write stream streams into a multipart upload of a new staging generation,
//! hashing as it goes, with at most `parts_in_flight` part buffers (one
//! filling, the others uploading): that, not the blob size, is the memory it
//! holds. A resumed stream
//! first copies the previous generation into the new one through memgate (to
//! re-hash it), then continues with the client's bytes. When the stream ends:
//!
//! - `finish_write` with the right digest: complete the multipart upload, copy
//!   it to `blobs/{sha256}`, delete the staging objects;
//! - wrong digest: abort it and delete the staging objects: nothing is stored;
//! - the client half-closes or goes away: complete it as the new generation
//!   (so what arrived stays resumable), delete the previous one.
//!
//! Multipart uploads orphaned by a crash are invisible to readers; a bucket
//! lifecycle rule (`AbortIncompleteMultipartUpload`) reclaims their space.

mod client;
mod credentials;
mod errors;
mod keys;
mod observe;
mod read;
mod write;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use object_store::{
    GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt, WriteMultipart, aws::AmazonS3,
    path::Path,
};
use tokio::sync::mpsc;

pub use observe::RequestObserver;

use self::{
    client::{builder, normalise_prefix},
    errors::{classify, outcome_of},
    keys::{generation, now_millis, upload_id},
    observe::Observed,
    read::rechunk,
    write::{Hashing, Multipart, Target, run},
};
use super::{
    BlobStore, ReadStream, Result, StoreError,
    local::name_of,
    upload::{ActiveUploads, CHANNEL_CHUNKS, Upload},
};
use crate::api::resource::{Digest, WriteName};
use crate::config::{Backend, StorageConfig};

/// Largest object S3's CopyObject copies in one request; larger blobs are
/// copied by streaming them through memgate.
const MAX_SERVER_SIDE_COPY: u64 = 5 * 1024 * 1024 * 1024;

/// Blobs in an S3-compatible bucket.
#[derive(Clone)]
pub struct S3Store {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<AmazonS3>,
    bucket: String,
    prefix: String,
    max_blob_size: u64,
    part_size: usize,
    parts_in_flight: usize,
    active: ActiveUploads,
    observer: Arc<dyn RequestObserver>,
}

impl S3Store {
    /// Builds the client; makes no request (readiness checks reachability).
    pub fn open(cfg: &StorageConfig, observer: Arc<dyn RequestObserver>) -> Result<Self> {
        let s3 = &cfg.s3;
        let store = builder(s3).build().map_err(|e| StoreError::Backend {
            context: "configuring the S3 client".into(),
            detail: e.to_string(),
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                store: Arc::new(store),
                bucket: s3.bucket.clone(),
                prefix: normalise_prefix(&s3.prefix),
                max_blob_size: cfg.max_blob_size.as_u64(),
                part_size: s3.part_size.as_u64() as usize,
                parts_in_flight: s3.parts_in_flight,
                active: ActiveUploads::default(),
                observer,
            }),
        })
    }

    fn key(&self, rest: &str) -> Path {
        Path::from(format!("{}{rest}", self.inner.prefix))
    }

    fn blob_key(&self, d: &Digest) -> Path {
        self.key(&format!("blobs/{}", d.hex()))
    }

    fn uploads_dir(&self, id: &str) -> Path {
        self.key(&format!("uploads/{id}"))
    }

    /// The staging objects of an upload, newest (largest) first.
    async fn staged(&self, id: &str) -> Result<Vec<ObjectMeta>> {
        let dir = self.uploads_dir(id);
        let start = Instant::now();
        let listed: Result<Vec<ObjectMeta>, _> =
            self.inner.store.list(Some(&dir)).try_collect().await;
        let mut objects = self.observe("list", start, listed, "listing an upload")?;
        objects.sort_by(|a, b| b.size.cmp(&a.size).then(b.location.cmp(&a.location)));
        Ok(objects)
    }

    /// Records a request's outcome and turns its error into a [`StoreError`].
    fn observe<T>(
        &self,
        op: &'static str,
        start: Instant,
        result: object_store::Result<T>,
        context: &str,
    ) -> Result<T> {
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => outcome_of(e),
        };
        self.inner
            .observer
            .object_store_request(op, outcome, start.elapsed());
        result.map_err(|e| classify(context, e))
    }

    async fn head(&self, key: &Path) -> Result<Option<ObjectMeta>> {
        let start = Instant::now();
        match self.inner.store.head(key).await {
            Err(object_store::Error::NotFound { .. }) => {
                self.inner
                    .observer
                    .object_store_request("head", "not_found", start.elapsed());
                Ok(None)
            }
            r => self
                .observe("head", start, r, "looking up a blob")
                .map(Some),
        }
    }

    async fn delete_quietly(&self, key: &Path) {
        let start = Instant::now();
        let r = self.inner.store.delete(key).await;
        if let Err(e) = self.observe("delete", start, r, "deleting a staging object") {
            tracing::warn!(key = %key, error = %e, "could not delete a staging object; garbage collection will retry");
        }
    }

    /// Opens a ranged GET stream of `key`, checking the object has `size` bytes.
    async fn get(
        &self,
        key: &Path,
        range: std::ops::Range<u64>,
        size: u64,
        missing: StoreError,
    ) -> Result<stream::BoxStream<'static, Result<Bytes>>> {
        let start = Instant::now();
        let opts = GetOptions {
            range: Some(GetRange::Bounded(range)),
            ..Default::default()
        };
        let got = match self.inner.store.get_opts(key, opts).await {
            Err(object_store::Error::NotFound { .. }) => {
                self.inner
                    .observer
                    .object_store_request("get", "not_found", start.elapsed());
                return Err(missing);
            }
            r => self.observe("get", start, r, "reading a blob")?,
        };
        if got.meta.size != size {
            return Err(missing);
        }
        Ok(got
            .into_stream()
            .map_err(|e| classify("reading a blob", e))
            .boxed())
    }

    async fn put_multipart(&self, key: Path) -> Result<Multipart> {
        let start = Instant::now();
        let r = self.inner.store.put_multipart(&key).await;
        let upload = self.observe("create_multipart", start, r, "starting an upload")?;
        let observed = Observed {
            inner: upload,
            observer: self.inner.observer.clone(),
        };
        let w = WriteMultipart::new_with_chunk_size(Box::new(observed), self.inner.part_size);
        Ok(Multipart { w, key })
    }

    /// Copies `from` to `to`: server-side up to [`MAX_SERVER_SIDE_COPY`], streamed
    /// through memgate (bounded like an upload) above it.
    async fn copy(&self, from: &Path, to: &Path, size: u64) -> Result<()> {
        if size <= MAX_SERVER_SIDE_COPY {
            let start = Instant::now();
            let r = self.inner.store.copy(from, to).await;
            return self.observe("copy", start, r, "committing a blob");
        }
        let missing = StoreError::Backend {
            context: "committing a blob".into(),
            detail: format!("staging object {from} vanished"),
        };
        let mut source = self.get(from, 0..size, size, missing).await?;
        let mut m = self.put_multipart(to.clone()).await?;
        while let Some(chunk) = source.next().await {
            let fed = match chunk {
                Ok(chunk) => m.feed(chunk, self.inner.parts_in_flight).await,
                Err(e) => Err(e),
            };
            if let Err(e) = fed {
                m.abort().await;
                return Err(e);
            }
        }
        m.finish().await.map(drop)
    }
}

#[async_trait::async_trait]
impl BlobStore for S3Store {
    fn backend(&self) -> Backend {
        Backend::S3
    }

    fn max_blob_size(&self) -> u64 {
        self.inner.max_blob_size
    }

    async fn contains(&self, d: &Digest) -> Result<bool> {
        Ok(self
            .head(&self.blob_key(d))
            .await?
            .is_some_and(|m| m.size == d.size))
    }

    async fn read(&self, d: &Digest, offset: u64, limit: u64, chunk: usize) -> Result<ReadStream> {
        let end = if limit == 0 {
            d.size
        } else {
            d.size.min(offset.saturating_add(limit))
        };
        let key = self.blob_key(d);
        if offset >= d.size {
            // No bytes to fetch: only existence and the offset to check.
            if self.head(&key).await?.is_none_or(|m| m.size != d.size) {
                return Err(StoreError::NotFound(*d));
            }
            if offset > d.size {
                return Err(StoreError::OutOfRange {
                    offset,
                    size: d.size,
                });
            }
            return Ok(Box::pin(stream::empty()));
        }
        let body = self
            .get(&key, offset..end, d.size, StoreError::NotFound(*d))
            .await?;
        Ok(Box::pin(rechunk(body, chunk)))
    }

    async fn begin_write(&self, name: &WriteName, offset: u64) -> Result<Upload> {
        self.check_size(name.digest.size)?;
        let id = upload_id(name);
        let lock = self
            .inner
            .active
            .try_lock(&id)
            .ok_or_else(|| StoreError::Busy(name_of(name)))?;
        let staged = self.staged(&id).await?;
        let committed = staged.first().map_or(0, |m| m.size);
        if offset != committed {
            return Err(StoreError::WrongOffset {
                expected: committed,
                got: offset as i64,
            });
        }
        let mut m = self
            .put_multipart(self.key(&format!("uploads/{id}/{}", generation())))
            .await?;
        let hashing = Hashing::spawn();
        if let Some(previous) = staged.first() {
            // Carry the bytes received earlier into the new generation, hashing them.
            let missing = StoreError::UploadNotFound(name_of(name));
            let copied = async {
                let mut body = self
                    .get(&previous.location, 0..committed, committed, missing)
                    .await?;
                while let Some(chunk) = body.next().await {
                    let chunk = chunk?;
                    hashing.update(chunk.clone()).await;
                    m.feed(chunk, self.inner.parts_in_flight).await?;
                }
                Ok::<_, StoreError>(())
            };
            if let Err(e) = copied.await {
                m.abort().await;
                return Err(e);
            }
        }
        let target = Target {
            store: self.clone(),
            expected: name.digest,
            staged: staged.into_iter().map(|m| m.location).collect(),
            committed,
            _lock: lock,
        };
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        let task = tokio::spawn(run(m, hashing, target, rx));
        Ok(Upload::new(tx, task, committed, name.digest.size))
    }

    async fn query_write_status(&self, name: &WriteName) -> Result<(u64, bool)> {
        if self.contains(&name.digest).await? {
            return Ok((name.digest.size, true));
        }
        match self.staged(&upload_id(name)).await?.first() {
            Some(m) => Ok((m.size, false)),
            None => Err(StoreError::UploadNotFound(name_of(name))),
        }
    }

    async fn collect_garbage(&self, expiry: Duration) -> Result<usize> {
        let start = Instant::now();
        let listed: Result<Vec<ObjectMeta>, _> = self
            .inner
            .store
            .list(Some(&self.key("uploads")))
            .try_collect()
            .await;
        let objects = self.observe("list", start, listed, "listing partial uploads")?;
        let now = now_millis();
        let mut removed = 0;
        for m in objects {
            let idle = now - m.last_modified.timestamp_millis();
            if idle <= expiry.as_millis() as i64 {
                continue;
            }
            // uploads/{id}/{generation}: skip uploads with a stream running here.
            let id = m.location.parts().rev().nth(1);
            let Some(id) = id.map(|p| p.as_ref().to_owned()) else {
                continue;
            };
            if self.inner.active.set().contains(&id) {
                continue;
            }
            self.delete_quietly(&m.location).await;
            removed += 1;
            tracing::info!(upload = %m.location, "removed expired partial upload");
        }
        Ok(removed)
    }

    async fn check_reachable(&self) -> Result<()> {
        let start = Instant::now();
        let prefix = (!self.inner.prefix.is_empty()).then(|| self.key(""));
        let r = self.inner.store.list_with_delimiter(prefix.as_ref()).await;
        self.observe("list", start, r, "checking the bucket")
            .map(drop)
            .map_err(|e| match e {
                StoreError::Backend { detail, .. } if detail.contains("NoSuchBucket") => {
                    StoreError::Backend {
                        context: "checking the bucket".into(),
                        detail: format!("bucket {:?} does not exist", self.inner.bucket),
                    }
                }
                e => e,
            })
    }
}
