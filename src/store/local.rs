//! The local-disk backend: blobs at `{data_dir}/blobs/{hash[..2]}/{hash}`, partial
//! uploads at `{data_dir}/uploads/{instance}+{uuid}+{hash}+{size}.part`.
//! A blob exists only once its bytes were verified, fsynced and renamed into place.
//! Uploads are admitted against the free disk space ([`space`]).

mod space;

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom},
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::BytesMut;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub use space::{DiskSpace, Reservation, SpaceReading, is_disk_full, statvfs};

use super::{
    BlobStore, ReadStream, Result, StoreError, cache,
    upload::{ActiveUploads, CHANNEL_CHUNKS, UPLOAD_QUEUE, Upload},
    writer,
};
use crate::api::resource::{Digest, WriteName};
use crate::config::{Backend, StorageConfig};

/// A content-addressed blob store on local disk.
#[derive(Clone)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

struct Inner {
    blobs: PathBuf,
    uploads: PathBuf,
    max_blob_size: u64,
    active: ActiveUploads,
    space: DiskSpace,
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
                active: ActiveUploads::default(),
                space: DiskSpace::new(cfg.data_dir.clone(), cfg.min_free_space.as_u64()),
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
}

#[async_trait::async_trait]
impl BlobStore for LocalStore {
    fn backend(&self) -> Backend {
        Backend::Local
    }

    fn max_blob_size(&self) -> u64 {
        self.inner.max_blob_size
    }

    async fn contains(&self, d: &Digest) -> Result<bool> {
        match tokio::fs::metadata(self.blob_path(d)).await {
            Ok(m) => Ok(m.len() == d.size),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io("reading blob metadata")(e)),
        }
    }

    /// The disk thread runs at most [`CHANNEL_CHUNKS`] ahead of the consumer.
    async fn read(&self, d: &Digest, offset: u64, limit: u64, chunk: usize) -> Result<ReadStream> {
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
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn begin_write(&self, name: &WriteName, offset: u64) -> Result<Upload> {
        self.check_size(name.digest.size)?;
        let key = Self::upload_key(name);
        let lock = self
            .inner
            .active
            .lock(&key)
            .await
            .map_err(|c| c.into_error(name_of(name)))?;
        let partial = self.partial_path(&key);
        let declared = name.digest.size;
        let space = self.inner.space.clone();
        let open_partial = partial.clone();
        let (file, hasher, len, reservation) = tokio::task::spawn_blocking(move || -> Result<_> {
            let partial = open_partial;
            let open = |create| {
                OpenOptions::new()
                    .create_new(create)
                    .read(true)
                    .append(true)
                    .open(&partial)
            };
            let (mut file, created) = match open(false) {
                Ok(f) => (f, false),
                // A new upload starts at 0; refusing it must leave nothing behind.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && offset != 0 => {
                    return Err(StoreError::WrongOffset {
                        expected: 0,
                        got: offset as i64,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                    open(true).map_err(StoreError::write_failed("creating partial upload", 0))?,
                    true,
                ),
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
            let reservation = match reserve_space(&space, &file, len, declared) {
                Ok(r) => r,
                Err(e) => {
                    if created {
                        let _ = std::fs::remove_file(&partial);
                    }
                    return Err(e);
                }
            };
            let hasher = writer::rehash(&mut file, len)
                .map_err(StoreError::io("re-reading partial upload"))?;
            Ok((file, hasher, len, reservation))
        })
        .await
        .expect("upload open task panicked")?;
        let marker = lock.marker(len);
        let target = writer::Target {
            expected: name.digest,
            partial,
            blob: self.blob_path(&name.digest),
            space: reservation,
            lock,
        };
        let (tx, rx) = mpsc::channel(UPLOAD_QUEUE);
        let task = tokio::task::spawn_blocking(move || writer::run(file, hasher, len, target, rx));
        Ok(Upload::new(tx, task, len, name.digest.size, marker))
    }

    async fn query_write_status(&self, name: &WriteName) -> Result<(u64, bool)> {
        if self.contains(&name.digest).await? {
            return Ok((name.digest.size, true));
        }
        let key = Self::upload_key(name);
        // A stream that just ended may still be writing its last chunk: wait for
        // it, so the answer is where a resumed Write must start. A live stream's
        // partial file grows as it goes, and its length is what is durable.
        self.inner
            .active
            .settle(&key)
            .await
            .map_err(|c| c.into_error(name_of(name)))?;
        if self.contains(&name.digest).await? {
            return Ok((name.digest.size, true));
        }
        match tokio::fs::metadata(self.partial_path(&key)).await {
            Ok(m) => Ok((m.len(), false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StoreError::UploadNotFound(name_of(name)))
            }
            Err(e) => Err(StoreError::io("reading partial upload")(e)),
        }
    }

    async fn collect_garbage(&self, expiry: Duration) -> Result<usize> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || gc(&inner, expiry, SystemTime::now()))
            .await
            .expect("gc task panicked")
    }

    fn disk(&self) -> Option<DiskSpace> {
        Some(self.inner.space.clone())
    }
}

/// Takes the disk space an upload at `committed` of `declared` bytes still
/// needs, before its first byte, or refuses it (RESOURCE_EXHAUSTED). Its own
/// step, apart from the upload lock and the file handling around it.
fn reserve_space(
    space: &DiskSpace,
    file: &File,
    committed: u64,
    declared: u64,
) -> Result<Reservation> {
    let reservation = space.reserve(file, committed, declared);
    if let Err(e @ StoreError::NoSpace { .. }) = &reservation {
        tracing::warn!(error = %e, "upload refused: disk space");
    }
    reservation
}

pub(super) fn name_of(name: &WriteName) -> String {
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
        let active = inner.active.set();
        if active.contains_key(key) {
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
