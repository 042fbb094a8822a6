//! The upload task: a Write stream's bytes into a multipart upload of a
//! staging generation, hashed beside, committed or kept when the stream ends.

use std::time::Instant;

use bytes::Bytes;
use object_store::{ObjectStoreExt, PutPayload, path::Path};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use super::{S3Store, parts::Multipart};
use crate::api::resource::Digest;
use crate::store::{
    Result, StoreError,
    upload::{CHANNEL_CHUNKS, Cmd, UploadLock},
};

/// What the upload task needs to commit or suspend.
pub(super) struct Target {
    pub(super) store: S3Store,
    pub(super) expected: Digest,
    /// Generations from earlier streams, replaced by this one when it ends.
    pub(super) staged: Vec<Path>,
    pub(super) committed: u64,
    pub(super) _lock: UploadLock,
}

/// The upload task: feeds the multipart upload until `Finish` or until the
/// stream's end (then it keeps what arrived).
pub(super) async fn run(
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
                // On failure the multipart upload stays open: what the store
                // acknowledged stays the upload's (state.rs).
                m.feed(data, parts).await?;
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

/// The SHA-256 of an upload, computed on a blocking thread beside the uploads.
pub(super) struct Hashing {
    tx: mpsc::Sender<Bytes>,
    task: tokio::task::JoinHandle<Sha256>,
}

impl Hashing {
    pub(super) fn spawn() -> Self {
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

    pub(super) async fn update(&self, chunk: Bytes) {
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
