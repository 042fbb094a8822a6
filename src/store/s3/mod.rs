//! The S3 backend, on Apache Arrow's `object_store`. Keys, under `storage.s3.prefix`:
//!
//! - `blobs/{sha256}`: a verified blob. Only ever written by a server-side copy
//!   of a verified staging object, so nothing half-written is ever visible here.
//! - `uploads/{id}/{generation}`: the bytes an interrupted upload received so
//!   far (`id` is a hash of the upload name), as a staging object, or as a
//!   multipart upload still open under that key. The largest is the upload's
//!   state; its size is what `QueryWriteStatus` reports, on any replica
//!   (`state.rs`).
//!
//! A Write stream streams into a multipart upload of a new staging generation,
//! hashing as it goes, with at most `parts_in_flight` part buffers (one
//! filling, the others uploading): that, not the blob size, is the memory it
//! holds. A resumed stream first settles the upload's state into one staging
//! object, copies it into the new generation through memgate (to re-hash it),
//! then continues with the client's bytes. When the stream ends:
//!
//! - `finish_write` with the right digest: complete the multipart upload, copy
//!   it to `blobs/{sha256}`, delete the staging objects;
//! - wrong digest: abort it and delete the staging objects: nothing is stored;
//! - the client half-closes or goes away: complete it as the new generation
//!   (so what arrived stays resumable), delete the previous one;
//! - the store fails (down, throttling past the retries, refusing): leave the
//!   multipart upload open. Its acknowledged parts are kept as the upload's
//!   committed bytes, exactly as after a disconnect; what the store never
//!   acknowledged is lost. A memgate replica that dies mid-stream leaves the
//!   same state behind.
//!
//! Open multipart uploads idle for longer than `partial_upload_expiry` are
//! aborted by garbage collection, like staging objects.

mod client;
mod credentials;
mod errors;
mod keys;
mod listing;
mod observe;
mod parts;
mod read;
mod state;
mod write;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use object_store::{
    GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt, aws::AmazonS3,
    client::HttpClient, path::Path,
};
use tokio::sync::mpsc;

pub use observe::RequestObserver;

use self::{
    client::{builder, http_client, normalise_prefix},
    errors::{classify, outcome_of},
    keys::{generation, now_millis, upload_id},
    observe::Observed,
    parts::Multipart,
    read::rechunk,
    write::{Hashing, Target, run},
};
use super::{
    BlobStore, ReadStream, Result, StoreError,
    local::name_of,
    upload::{ActiveUploads, UPLOAD_QUEUE, Upload},
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
    /// For the requests `object_store` does not make (`listing.rs`).
    http: HttpClient,
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
        let configuring = |e: object_store::Error| StoreError::Backend {
            context: "configuring the S3 client".into(),
            detail: e.to_string(),
        };
        let store = builder(s3).build().map_err(configuring)?;
        let http = http_client(s3).map_err(configuring)?;
        Ok(Self {
            inner: Arc::new(Inner {
                store: Arc::new(store),
                http,
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

    /// The staging objects of an upload, largest first. The largest (the one
    /// an upload's state rests on) is checked with a HEAD: a distributed store
    /// may list a key that is gone. Garage 2.5 does, for a key deleted while
    /// one of its nodes was down, once that node is back (its range reads
    /// filter on each node before merging, so the deletion is not seen).
    async fn staged(&self, id: &str) -> Result<Vec<ObjectMeta>> {
        let dir = self.uploads_dir(id);
        let start = Instant::now();
        let listed: Result<Vec<ObjectMeta>, _> =
            self.inner.store.list(Some(&dir)).try_collect().await;
        let mut objects = self.observe("list", start, listed, "listing an upload")?;
        objects.sort_by(|a, b| b.size.cmp(&a.size).then(b.location.cmp(&a.location)));
        while let Some(first) = objects.first() {
            match self.head(&first.location).await? {
                Some(meta) => {
                    objects[0] = meta;
                    break;
                }
                None => {
                    tracing::debug!(key = %first.location, "a listed staging object is gone");
                    objects.remove(0);
                }
            }
        }
        Ok(objects)
    }

    /// Whether a Write stream in this process owns the upload that
    /// `uploads/{id}/{generation}` belongs to.
    fn is_active_here(&self, staging: &Path) -> bool {
        let id = staging.parts().rev().nth(1);
        id.is_some_and(|id| self.inner.active.set().contains_key(id.as_ref()))
    }

    /// Every multipart upload open under the prefix, with the bytes the store
    /// acknowledged for it (its parts up to the first gap), sorted by key: data
    /// held outside any object, for tools and tests.
    pub async fn open_uploads(&self) -> Result<Vec<(String, u64)>> {
        let mut open: Vec<(String, u64)> = self
            .open_under(&self.key(""))
            .await?
            .into_iter()
            .map(|o| (o.key.to_string(), o.size))
            .collect();
        open.sort();
        Ok(open)
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

    /// Starts a multipart upload to `key`; `upload_name` names the upload it
    /// stages, for the error its stream gets if another stream takes it over.
    async fn put_multipart(&self, key: Path, upload_name: Option<String>) -> Result<Multipart> {
        let start = Instant::now();
        let r = self.inner.store.put_multipart(&key).await;
        let upload = self.observe("create_multipart", start, r, "starting an upload")?;
        let observed = Observed {
            inner: upload,
            observer: self.inner.observer.clone(),
        };
        Ok(Multipart::new(
            Box::new(observed),
            self.inner.part_size,
            key,
            upload_name,
        ))
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
        let mut m = self.put_multipart(to.clone(), None).await?;
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
            .lock(&id)
            .await
            .map_err(|c| c.into_error(name_of(name)))?;
        let state = self.upload_state(&id).await?;
        let committed = state.committed();
        if offset != committed {
            return Err(StoreError::WrongOffset {
                expected: committed,
                got: offset as i64,
            });
        }
        let staged = self.settle(&name_of(name), state).await?;
        let mut m = self
            .put_multipart(
                self.key(&format!("uploads/{id}/{}", generation())),
                Some(name_of(name)),
            )
            .await?;
        let hashing = Hashing::spawn();
        if let Some((previous, size)) = staged.first() {
            // Carry the bytes received earlier into the new generation, hashing
            // them. If they vanish meanwhile, another stream finished the upload
            // or took it over.
            let missing = StoreError::Busy(name_of(name));
            let copied = async {
                let mut body = self.get(previous, 0..*size, *size, missing).await?;
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
        let marker = lock.marker(committed);
        let target = Target {
            store: self.clone(),
            expected: name.digest,
            staged: staged.into_iter().map(|(key, _)| key).collect(),
            committed,
            _lock: lock,
        };
        let (tx, rx) = mpsc::channel(UPLOAD_QUEUE);
        let task = tokio::spawn(run(m, hashing, target, rx));
        Ok(Upload::new(tx, task, committed, name.digest.size, marker))
    }

    async fn query_write_status(&self, name: &WriteName) -> Result<(u64, bool)> {
        if self.contains(&name.digest).await? {
            return Ok((name.digest.size, true));
        }
        let id = upload_id(name);
        // A stream that just ended is still staging what it received: wait for
        // it. One that keeps running here holds its bytes in its open multipart
        // upload, which the store does not list yet: report what it received.
        let running = self
            .inner
            .active
            .settle(&id)
            .await
            .map_err(|c| c.into_error(name_of(name)))?;
        if let Some(received) = running {
            return Ok((received, false));
        }
        if self.contains(&name.digest).await? {
            return Ok((name.digest.size, true));
        }
        let state = self.upload_state(&id).await?;
        // Nothing durable yet is the same as no upload: the client starts at 0.
        match state.committed() {
            0 => Err(StoreError::UploadNotFound(name_of(name))),
            committed => Ok((committed, false)),
        }
    }

    async fn collect_garbage(&self, expiry: Duration) -> Result<usize> {
        let uploads = self.key("uploads");
        // Open multipart uploads first, as everywhere (see state.rs).
        let open = self.open_under(&uploads).await?;
        let start = Instant::now();
        let listed: Result<Vec<ObjectMeta>, _> =
            self.inner.store.list(Some(&uploads)).try_collect().await;
        let objects = self.observe("list", start, listed, "listing partial uploads")?;
        let now = now_millis();
        let expired = |last_active_ms: i64| now - last_active_ms > expiry.as_millis() as i64;
        let mut removed = 0;
        for o in open {
            if expired(o.active_ms) && !self.is_active_here(&o.key) {
                self.abort_open(&o).await;
                removed += 1;
                tracing::info!(upload = %o.key, "aborted expired open upload");
            }
        }
        for m in objects {
            if expired(m.last_modified.timestamp_millis()) && !self.is_active_here(&m.location) {
                self.delete_quietly(&m.location).await;
                removed += 1;
                tracing::info!(upload = %m.location, "removed expired partial upload");
            }
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
