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

mod credentials;

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt, stream};
use object_store::{
    ClientOptions, GetOptions, GetRange, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutPayload, PutResult, RetryConfig, UploadPart, WriteMultipart,
    aws::{AmazonS3, AmazonS3Builder},
    path::Path,
};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use super::{
    BlobStore, ReadStream, Result, StoreError,
    local::name_of,
    upload::{ActiveUploads, CHANNEL_CHUNKS, Cmd, Upload, UploadLock},
};
use crate::api::resource::{Digest, WriteName};
use crate::config::{Backend, S3Config, StorageConfig};

/// Largest object S3's CopyObject copies in one request; larger blobs are
/// copied by streaming them through memgate.
const MAX_SERVER_SIDE_COPY: u64 = 5 * 1024 * 1024 * 1024;

/// Told about every request memgate makes to the object store (the server's
/// metrics implement it).
pub trait RequestObserver: Send + Sync {
    /// `op` is one of a fixed set (`get`, `head`, `list`, `put_part`, ...);
    /// `outcome` is `ok`, `not_found`, `unavailable`, `throttled`, `denied` or `error`.
    fn object_store_request(&self, op: &'static str, outcome: &'static str, elapsed: Duration);
}

/// No metrics: for tools and tests that open a store on their own.
impl RequestObserver for () {
    fn object_store_request(&self, _: &'static str, _: &'static str, _: Duration) {}
}

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

/// What the upload task needs to commit or suspend.
struct Target {
    store: S3Store,
    expected: Digest,
    /// Generations from earlier streams, replaced by this one when it ends.
    staged: Vec<Path>,
    committed: u64,
    _lock: UploadLock,
}

/// The upload task: feeds the multipart upload until `Finish` or until the
/// stream's end (then it keeps what arrived).
async fn run(
    mut m: Multipart,
    hashing: Hashing,
    target: Target,
    mut rx: mpsc::Receiver<Cmd>,
) -> Result<u64> {
    let parts = target.store.inner.parts_in_flight;
    let mut len = target.committed;
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Cmd::Data(data) => {
                let n = data.len() as u64;
                hashing.update(data.clone()).await;
                if let Err(e) = m.feed(data, parts).await {
                    m.abort().await;
                    return Err(e);
                }
                len += n;
            }
            Cmd::Finish(reply) => {
                let hash = hashing.finish().await;
                let _ = reply.send(commit(m, hash, len, &target).await);
                return Ok(len);
            }
        }
    }
    // The stream ended without finish_write: keep what arrived, for resume.
    drop(hashing);
    if len == target.committed {
        m.abort().await;
        return Ok(len);
    }
    m.finish().await?;
    for old in &target.staged {
        target.store.delete_quietly(old).await;
    }
    Ok(len)
}

async fn commit(m: Multipart, hash: [u8; 32], size: u64, t: &Target) -> Result<u64> {
    let store = &t.store;
    let expected = t.expected;
    if hash != expected.hash || size != expected.size {
        m.abort().await;
        for old in &t.staged {
            store.delete_quietly(old).await;
        }
        return Err(StoreError::DigestMismatch {
            expected,
            actual_hash: hex::encode(hash),
            actual_size: size,
        });
    }
    if size == 0 {
        // S3 cannot complete a multipart upload without parts; the empty blob
        // is one small PUT.
        m.abort().await;
        let start = Instant::now();
        let key = store.blob_key(&expected);
        let r = store.inner.store.put(&key, PutPayload::new()).await;
        store.observe("put", start, r, "committing a blob")?;
        return Ok(0);
    }
    let staging = m.finish().await?;
    store
        .copy(&staging, &store.blob_key(&expected), size)
        .await?;
    store.delete_quietly(&staging).await;
    for old in &t.staged {
        store.delete_quietly(old).await;
    }
    Ok(size)
}

/// A multipart upload in progress, and the key it will complete to.
struct Multipart {
    w: WriteMultipart,
    key: Path,
}

impl Multipart {
    /// Hands a chunk over once fewer than `parts - 1` parts are uploading, so
    /// with the one filling there are at most `parts` part buffers: the
    /// back-pressure that bounds an upload's memory.
    async fn feed(&mut self, data: Bytes, parts: usize) -> Result<()> {
        self.w
            .wait_for_capacity(parts - 1)
            .await
            .map_err(|e| classify("uploading a part", e))?;
        self.w.put(data);
        Ok(())
    }

    /// Gives up; the parts uploaded so far are deleted (best effort: a store
    /// that is down keeps them until its lifecycle rule reclaims them).
    async fn abort(self) {
        if let Err(e) = self.w.abort().await {
            tracing::warn!(key = %self.key, error = %e, "could not abort a multipart upload");
        }
    }

    /// Completes the upload; returns its key.
    async fn finish(self) -> Result<Path> {
        self.w
            .finish()
            .await
            .map_err(|e| classify("completing an upload", e))?;
        Ok(self.key)
    }
}

/// The SHA-256 of an upload, computed on a blocking thread beside the uploads.
struct Hashing {
    tx: mpsc::Sender<Bytes>,
    task: tokio::task::JoinHandle<Sha256>,
}

impl Hashing {
    fn spawn() -> Self {
        let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_CHUNKS);
        let task = tokio::task::spawn_blocking(move || {
            let mut hasher = Sha256::new();
            while let Some(chunk) = rx.blocking_recv() {
                hasher.update(&chunk);
            }
            hasher
        });
        Self { tx, task }
    }

    async fn update(&self, chunk: Bytes) {
        // The thread only stops when this sender goes.
        let _ = self.tx.send(chunk).await;
    }

    async fn finish(self) -> [u8; 32] {
        drop(self.tx);
        self.task
            .await
            .expect("hashing task panicked")
            .finalize()
            .into()
    }
}

/// A multipart upload that reports each request to the observer.
#[derive(Debug)]
struct Observed {
    inner: Box<dyn MultipartUpload>,
    observer: Arc<dyn RequestObserver>,
}

impl std::fmt::Debug for dyn RequestObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestObserver")
    }
}

#[async_trait::async_trait]
impl MultipartUpload for Observed {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let part = self.inner.put_part(data);
        let observer = self.observer.clone();
        Box::pin(async move {
            let start = Instant::now();
            let r = part.await;
            let outcome = r.as_ref().map_or_else(outcome_of, |_| "ok");
            observer.object_store_request("put_part", outcome, start.elapsed());
            r
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let start = Instant::now();
        let r = self.inner.complete().await;
        let outcome = r.as_ref().map_or_else(outcome_of, |_| "ok");
        self.observer
            .object_store_request("complete_multipart", outcome, start.elapsed());
        r
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        let start = Instant::now();
        let r = self.inner.abort().await;
        let outcome = r.as_ref().map_or_else(outcome_of, |_| "ok");
        self.observer
            .object_store_request("abort_multipart", outcome, start.elapsed());
        r
    }
}

/// Regroups a GET body (arriving in whatever pieces the connection delivers)
/// into chunks of `chunk` bytes, the last one shorter. Pulls only as the
/// consumer pulls, so at most one chunk is held besides the socket's buffers.
fn rechunk(
    body: stream::BoxStream<'static, Result<Bytes>>,
    chunk: usize,
) -> impl futures_util::Stream<Item = Result<Bytes>> + Send {
    stream::unfold(
        (body, BytesMut::new(), false),
        move |(mut body, mut buf, done)| async move {
            if done {
                return None;
            }
            while buf.len() < chunk {
                match body.next().await {
                    Some(Ok(piece)) => buf.extend_from_slice(&piece),
                    Some(Err(e)) => return Some((Err(e), (body, BytesMut::new(), true))),
                    None if buf.is_empty() => return None,
                    None => {
                        let last = buf.split().freeze();
                        return Some((Ok(last), (body, buf, true)));
                    }
                }
            }
            let out = buf.split_to(chunk).freeze();
            Some((Ok(out), (body, buf, false)))
        },
    )
}

fn builder(s3: &S3Config) -> AmazonS3Builder {
    // The standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    // AWS_SESSION_TOKEN, web identity for IRSA, ...) first; the config file wins
    // for everything it sets. Credentials never come from the config file.
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(&s3.bucket)
        .with_region(&s3.region)
        .with_virtual_hosted_style_request(!s3.path_style)
        .with_client_options(
            ClientOptions::new()
                .with_timeout(s3.request_timeout)
                .with_connect_timeout(s3.connect_timeout)
                .with_allow_http(s3.endpoint.starts_with("http://")),
        )
        .with_retry(RetryConfig {
            max_retries: s3.max_retries,
            retry_timeout: s3.retry_timeout,
            ..RetryConfig::default()
        });
    if !s3.endpoint.is_empty() {
        b = b.with_endpoint(&s3.endpoint);
    }
    if !s3.credentials_file.as_os_str().is_empty() {
        b = b.with_credentials(Arc::new(credentials::FileCredentials::new(
            s3.credentials_file.clone(),
            s3.profile.clone(),
        )));
    }
    b
}

/// `memgate/` from `memgate`, `/memgate/` or `memgate/`; empty stays empty.
fn normalise_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("{trimmed}/")
    }
}

/// A fixed-length, key-safe id for an upload name (instance names may hold `/`).
fn upload_id(name: &WriteName) -> String {
    let mut h = Sha256::new();
    h.update(name.instance.as_deref().unwrap_or("").as_bytes());
    h.update([0]);
    h.update(name.uuid.as_bytes());
    h.update([0]);
    h.update(name.digest.to_string().as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// A new staging generation: nanoseconds since the epoch, zero-padded, so
/// generations sort by age.
fn generation() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{nanos:024}")
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The metric outcome of an object-store error.
fn outcome_of(e: &object_store::Error) -> &'static str {
    match kind_of(e) {
        Kind::NotFound => "not_found",
        Kind::Unavailable => "unavailable",
        Kind::Throttled => "throttled",
        Kind::Denied => "denied",
        Kind::Other => "error",
    }
}

enum Kind {
    NotFound,
    Unavailable,
    Throttled,
    Denied,
    Other,
}

fn kind_of(e: &object_store::Error) -> Kind {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => return Kind::NotFound,
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => return Kind::Denied,
        _ => {}
    }
    // object_store keeps the HTTP status in a type it does not export; its
    // message is stable ("... status code: 503 Service Unavailable ..."). A
    // transport error (refused, reset, timed out) is an HttpError in the chain.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<object_store::client::HttpError>()
            .is_some()
        {
            return Kind::Unavailable;
        }
        source = s.source();
    }
    let text = e.to_string();
    if text.contains("SlowDown") {
        return Kind::Throttled;
    }
    match status_in(&text) {
        Some(429) => Kind::Throttled,
        Some(500..=599) => Kind::Unavailable,
        _ => Kind::Other,
    }
}

/// The HTTP status in an object_store error message, if it names one.
fn status_in(text: &str) -> Option<u16> {
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

/// An object-store error as a [`StoreError`] a client can act on. The full
/// error goes to the log; a denial's detail never reaches the client.
fn classify(context: &str, e: object_store::Error) -> StoreError {
    let context = context.to_owned();
    match kind_of(&e) {
        Kind::Unavailable => {
            tracing::warn!(error = %e, "object store unavailable while {context}");
            StoreError::Unavailable {
                context,
                detail: short(&e),
            }
        }
        Kind::Throttled => {
            tracing::warn!(error = %e, "object store throttling while {context}");
            StoreError::Throttled { context }
        }
        Kind::Denied => {
            tracing::error!(error = %e, "object store denied access while {context}");
            StoreError::Denied { context }
        }
        Kind::NotFound | Kind::Other => {
            tracing::error!(error = %e, "object store error while {context}");
            StoreError::Backend {
                context,
                detail: short(&e),
            }
        }
    }
}

/// The innermost cause of an error, which says what happened without the
/// request details (URLs, retry counts) of the outer layers.
fn short(e: &object_store::Error) -> String {
    let mut last: &dyn std::error::Error = e;
    while let Some(s) = last.source() {
        last = s;
    }
    last.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_normalised_to_end_with_one_slash() {
        assert_eq!(normalise_prefix(""), "");
        assert_eq!(normalise_prefix("/"), "");
        assert_eq!(normalise_prefix("memgate"), "memgate/");
        assert_eq!(normalise_prefix("/a/b/"), "a/b/");
    }

    #[test]
    fn status_codes_are_read_from_object_store_messages() {
        let msg = "Generic S3 error: Error performing PUT http://x/b/k in 1s - Server returned non-2xx status code: 503 Service Unavailable: <Error>";
        assert_eq!(status_in(msg), Some(503));
        assert_eq!(status_in("status code: 42"), None);
        assert_eq!(status_in("no status here"), None);
    }

    #[test]
    fn upload_ids_differ_by_instance_uuid_and_digest() {
        let d = Digest {
            hash: [1; 32],
            size: 5,
        };
        let name = |instance: Option<&str>, uuid: &str, d: Digest| WriteName {
            instance: instance.map(str::to_owned),
            uuid: uuid.into(),
            digest: d,
        };
        let a = upload_id(&name(None, "u", d));
        assert_eq!(a.len(), 32);
        assert_ne!(a, upload_id(&name(Some("i"), "u", d)));
        assert_ne!(a, upload_id(&name(None, "v", d)));
        assert_ne!(a, upload_id(&name(None, "u", Digest { size: 6, ..d })));
        assert_eq!(a, upload_id(&name(None, "u", d)));
    }

    #[test]
    fn object_store_errors_map_to_what_a_client_can_act_on() {
        let generic = |msg: &str| object_store::Error::Generic {
            store: "S3",
            source: msg.to_string().into(),
        };
        let path = || "blobs/x".to_string();
        let cases = [
            (
                generic(
                    "Server returned non-2xx status code: 503 Service Unavailable: <Code>SlowDown</Code>",
                ),
                "throttled",
            ),
            (
                generic("Server returned non-2xx status code: 429 Too Many Requests"),
                "throttled",
            ),
            (
                generic("Server returned non-2xx status code: 500 Internal Server Error"),
                "unavailable",
            ),
            (
                generic("Server returned non-2xx status code: 400 Bad Request"),
                "error",
            ),
            (
                object_store::Error::PermissionDenied {
                    path: path(),
                    source: "SignatureDoesNotMatch".into(),
                },
                "denied",
            ),
            (
                object_store::Error::Unauthenticated {
                    path: path(),
                    source: "InvalidAccessKeyId".into(),
                },
                "denied",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(outcome_of(&e), want, "{e}");
            let mapped = classify("uploading a part", e);
            let kind = match mapped {
                StoreError::Throttled { .. } => "throttled",
                StoreError::Unavailable { .. } => "unavailable",
                StoreError::Denied { .. } => "denied",
                StoreError::Backend { .. } => "error",
                other => panic!("unexpected {other:?}"),
            };
            assert_eq!(kind, want);
        }
    }

    #[tokio::test]
    async fn rechunk_regroups_pieces_into_fixed_chunks() {
        let pieces: Vec<Result<Bytes>> = [3usize, 5, 1, 7, 2]
            .iter()
            .map(|&n| Ok(Bytes::from(vec![n as u8; n])))
            .collect();
        let total: Vec<u8> = pieces
            .iter()
            .flat_map(|p| p.as_ref().unwrap().to_vec())
            .collect();
        let out: Vec<Bytes> = rechunk(stream::iter(pieces).boxed(), 4)
            .try_collect()
            .await
            .unwrap();
        let sizes: Vec<usize> = out.iter().map(Bytes::len).collect();
        assert_eq!(sizes, [4, 4, 4, 4, 2]);
        assert_eq!(out.concat(), total);
    }

    #[tokio::test]
    async fn rechunk_passes_an_error_on_and_stops() {
        let pieces: Vec<Result<Bytes>> = vec![
            Ok(Bytes::from_static(b"ab")),
            Err(StoreError::Unavailable {
                context: "reading".into(),
                detail: "reset".into(),
            }),
            Ok(Bytes::from_static(b"cd")),
        ];
        let out: Vec<Result<Bytes>> = rechunk(stream::iter(pieces).boxed(), 4).collect().await;
        assert_eq!(out.len(), 1);
        assert!(matches!(out[0], Err(StoreError::Unavailable { .. })));
    }
}
