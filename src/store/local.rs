//! The local-disk backend: blobs at `{data_dir}/blobs/{hash[..2]}/{hash}`, partial
//! uploads at `{data_dir}/uploads/{instance}+{uuid}+{hash}+{size}.part`.
//! A blob exists only once its bytes were verified, fsynced and renamed into place.

use std::{
    collections::HashSet,
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{Result, StoreError, cache, writer};
use crate::api::resource::{Digest, WriteName};
use crate::config::StorageConfig;

/// Chunks queued between the gRPC stream and the disk thread, per upload or read.
/// Two keeps the disk busy while the network delivers the next one.
const CHANNEL_CHUNKS: usize = 2;

/// A content-addressed blob store on local disk.
#[derive(Clone)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

struct Inner {
    blobs: PathBuf,
    uploads: PathBuf,
    max_blob_size: u64,
    active: Mutex<HashSet<String>>,
}

/// Held while a Write stream owns an upload; released on drop.
pub(crate) struct UploadLock {
    inner: Arc<Inner>,
    key: String,
}

impl Drop for UploadLock {
    fn drop(&mut self) {
        self.inner
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

/// An upload in progress: feed it with [`Upload::write`], end it with [`Upload::finish`].
/// Dropping it keeps the data received so far for a later resume.
pub struct Upload {
    tx: Option<mpsc::Sender<writer::Cmd>>,
    task: JoinHandle<Result<u64>>,
    offset: u64,
    declared: u64,
}

impl LocalStore {
    /// Opens (creating if needed) the store under `cfg.data_dir`.
    pub fn open(cfg: &StorageConfig) -> Result<Self> {
        let blobs = cfg.data_dir.join("blobs");
        let uploads = cfg.data_dir.join("uploads");
        for dir in [&blobs, &uploads] {
            std::fs::create_dir_all(dir)
                .map_err(StoreError::io(format!("creating {}", dir.display())))?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                blobs,
                uploads,
                max_blob_size: cfg.max_blob_size.as_u64(),
                active: Mutex::default(),
            }),
        })
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.inner.blobs.join(&hex[..2]).join(hex)
    }

    fn upload_key(name: &WriteName) -> String {
        format!(
            "{}+{}+{}+{}",
            name.instance.as_deref().unwrap_or(""),
            name.uuid,
            name.digest.hex(),
            name.digest.size
        )
    }

    fn partial_path(&self, key: &str) -> PathBuf {
        self.inner.uploads.join(format!("{key}.part"))
    }

    /// Whether the blob is stored (with exactly its declared size).
    pub async fn contains(&self, d: &Digest) -> Result<bool> {
        match tokio::fs::metadata(self.blob_path(d)).await {
            Ok(m) => Ok(m.len() == d.size),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io("reading blob metadata")(e)),
        }
    }

    /// Checks a declared size against `storage.max_blob_size`.
    pub fn check_size(&self, size: u64) -> Result<()> {
        if size > self.inner.max_blob_size {
            return Err(StoreError::TooLarge {
                size,
                max: self.inner.max_blob_size,
            });
        }
        Ok(())
    }

    /// Streams `[offset, offset + limit)` of a blob (limit 0: to the end) in chunks.
    /// The disk thread runs at most [`CHANNEL_CHUNKS`] ahead of the consumer.
    pub async fn read(
        &self,
        d: &Digest,
        offset: u64,
        limit: u64,
        chunk: usize,
    ) -> Result<mpsc::Receiver<Result<Bytes>>> {
        let path = self.blob_path(d);
        let digest = *d;
        let mut file = tokio::task::spawn_blocking(move || -> Result<File> {
            let file = File::open(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => StoreError::NotFound(digest),
                _ => StoreError::io("opening blob")(e),
            })?;
            let len = file
                .metadata()
                .map_err(StoreError::io("reading blob metadata"))?
                .len();
            if len != digest.size {
                return Err(StoreError::NotFound(digest));
            }
            Ok(file)
        })
        .await
        .expect("blob open task panicked")?;
        if offset > d.size {
            return Err(StoreError::OutOfRange {
                offset,
                size: d.size,
            });
        }
        let end = if limit == 0 {
            d.size
        } else {
            d.size.min(offset.saturating_add(limit))
        };
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        tokio::task::spawn_blocking(move || {
            let mut pos = offset;
            if let Err(e) = file.seek(SeekFrom::Start(pos)) {
                let _ = tx.blocking_send(Err(StoreError::io("seeking blob")(e)));
                return;
            }
            while pos < end {
                let want = chunk.min((end - pos) as usize);
                let mut buf = BytesMut::zeroed(want);
                if let Err(e) = file.read_exact(&mut buf) {
                    let _ = tx.blocking_send(Err(StoreError::io("reading blob")(e)));
                    return;
                }
                // Drop what was read from the cache: a download must not fill the cgroup.
                cache::drop_cache(&file, pos, want as u64);
                pos += want as u64;
                if tx.blocking_send(Ok(buf.freeze())).is_err() {
                    break; // the client went away
                }
            }
            // Readahead may have brought in more than was read, and pages still
            // being read ahead were skipped above: drop whatever is left.
            cache::drop_cache(&file, 0, 0);
        });
        Ok(rx)
    }

    /// Starts or resumes an upload at `offset`, which must equal the bytes already received.
    pub async fn begin_write(&self, name: &WriteName, offset: u64) -> Result<Upload> {
        self.check_size(name.digest.size)?;
        let key = Self::upload_key(name);
        let lock = {
            let mut active = self.inner.active.lock().unwrap_or_else(|e| e.into_inner());
            if !active.insert(key.clone()) {
                return Err(StoreError::Busy(name_of(name)));
            }
            UploadLock {
                inner: self.inner.clone(),
                key: key.clone(),
            }
        };
        let partial = self.partial_path(&key);
        let target = writer::Target {
            expected: name.digest,
            partial: partial.clone(),
            blob: self.blob_path(&name.digest),
            lock,
        };
        let (file, hasher, len) = tokio::task::spawn_blocking(move || -> Result<_> {
            let open = |create| {
                OpenOptions::new()
                    .create_new(create)
                    .read(true)
                    .append(true)
                    .open(&partial)
            };
            let mut file = match open(false) {
                Ok(f) => f,
                // A new upload starts at 0; refusing it must leave nothing behind.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && offset != 0 => {
                    return Err(StoreError::WrongOffset {
                        expected: 0,
                        got: offset as i64,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    open(true).map_err(StoreError::io("creating partial upload"))?
                }
                Err(e) => return Err(StoreError::io("opening partial upload")(e)),
            };
            let len = file
                .metadata()
                .map_err(StoreError::io("reading partial upload"))?
                .len();
            if offset != len {
                return Err(StoreError::WrongOffset {
                    expected: len,
                    got: offset as i64,
                });
            }
            let hasher = writer::rehash(&mut file, len)
                .map_err(StoreError::io("re-reading partial upload"))?;
            Ok((file, hasher, len))
        })
        .await
        .expect("upload open task panicked")?;
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        let task = tokio::task::spawn_blocking(move || writer::run(file, hasher, len, target, rx));
        Ok(Upload {
            tx: Some(tx),
            task,
            offset: len,
            declared: name.digest.size,
        })
    }

    /// Bytes durably received for an upload, and whether its blob is complete.
    pub async fn query_write_status(&self, name: &WriteName) -> Result<(u64, bool)> {
        if self.contains(&name.digest).await? {
            return Ok((name.digest.size, true));
        }
        match tokio::fs::metadata(self.partial_path(&Self::upload_key(name))).await {
            Ok(m) => Ok((m.len(), false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StoreError::UploadNotFound(name_of(name)))
            }
            Err(e) => Err(StoreError::io("reading partial upload")(e)),
        }
    }

    /// Deletes partial uploads untouched for longer than `expiry` and not being written.
    /// Returns how many were removed.
    pub async fn collect_garbage(&self, expiry: Duration) -> Result<usize> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || gc(&inner, expiry, SystemTime::now()))
            .await
            .expect("gc task panicked")
    }
}

fn name_of(name: &WriteName) -> String {
    format!("uploads/{}/blobs/{}", name.uuid, name.digest)
}

fn gc(inner: &Inner, expiry: Duration, now: SystemTime) -> Result<usize> {
    let mut removed = 0;
    let entries = std::fs::read_dir(&inner.uploads).map_err(StoreError::io("listing uploads"))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(key) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".part"))
        else {
            continue;
        };
        let active = inner.active.lock().unwrap_or_else(|e| e.into_inner());
        if active.contains(key) {
            continue;
        }
        let idle = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok());
        if idle.is_some_and(|idle| idle > expiry) && std::fs::remove_file(&path).is_ok() {
            removed += 1;
            tracing::info!(upload = key, "removed expired partial upload");
        }
        drop(active);
    }
    Ok(removed)
}

impl Upload {
    /// Bytes received so far, including those from earlier streams.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Appends a chunk. Waits while the disk thread is [`CHANNEL_CHUNKS`] behind.
    pub async fn write(&mut self, data: Bytes) -> Result<()> {
        let received = self.offset + data.len() as u64;
        if received > self.declared {
            return Err(StoreError::Overflow {
                declared: self.declared,
                received,
            });
        }
        if data.is_empty() {
            return Ok(());
        }
        let tx = self.tx.as_ref().expect("write after finish");
        if tx.send(writer::Cmd::Data(data)).await.is_err() {
            return Err(self.failure().await);
        }
        self.offset = received;
        Ok(())
    }

    /// Verifies the digest and commits the blob; returns its size.
    pub async fn finish(mut self) -> Result<u64> {
        let tx = self.tx.take().expect("finish twice");
        let (reply, answer) = oneshot::channel();
        if tx.send(writer::Cmd::Finish(reply)).await.is_err() {
            return Err(self.failure().await);
        }
        drop(tx);
        match answer.await {
            Ok(result) => result,
            Err(_) => Err(self.failure().await),
        }
    }

    /// Ends the stream without committing, waiting until the data is durable.
    pub async fn suspend(mut self) -> Result<u64> {
        self.tx.take();
        (&mut self.task).await.expect("upload task panicked")
    }

    /// The disk thread stopped early: its error says why.
    async fn failure(&mut self) -> StoreError {
        self.tx.take();
        match (&mut self.task).await.expect("upload task panicked") {
            Err(e) => e,
            Ok(_) => StoreError::Io {
                context: "upload thread".into(),
                source: std::io::Error::other("stopped unexpectedly"),
            },
        }
    }
}

/// Runs [`LocalStore::collect_garbage`] every `interval` until the store is dropped.
pub fn spawn_gc(store: &LocalStore, interval: Duration, expiry: Duration) -> JoinHandle<()> {
    let weak = Arc::downgrade(&store.inner);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            let Some(inner) = weak.upgrade() else { return };
            let store = LocalStore { inner };
            if let Err(e) = store.collect_garbage(expiry).await {
                tracing::warn!(error = %e, "partial upload garbage collection failed");
            }
        }
    })
}
