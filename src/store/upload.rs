//! The async half of an upload, the same for every backend: it feeds a task
//! that owns the backend's side (a disk thread, or a multipart upload) through a
//! channel of a few chunks, which is what bounds an upload's memory.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, MutexGuard},
};

use bytes::Bytes;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use super::{Result, StoreError};

/// Chunks queued between the gRPC stream and the backend's task, per upload or
/// read. Two keep the backend busy while the network delivers the next one.
pub(super) const CHANNEL_CHUNKS: usize = 2;

/// What the async side sends to the backend's task.
pub(super) enum Cmd {
    Data(Bytes),
    /// Verify the digest and commit; the reply carries the committed size.
    Finish(oneshot::Sender<Result<u64>>),
}

/// An upload in progress: feed it with [`Upload::write`], end it with [`Upload::finish`].
/// Dropping it (or [`Upload::suspend`]) keeps the data received so far for a
/// later resume; the backend's task returns how much that is.
pub struct Upload {
    tx: Option<mpsc::Sender<Cmd>>,
    task: JoinHandle<Result<u64>>,
    offset: u64,
    declared: u64,
}

impl Upload {
    /// Wraps a backend task reading `Cmd`s from the other end of `tx`; the upload
    /// already holds `offset` of `declared` bytes.
    pub(super) fn new(
        tx: mpsc::Sender<Cmd>,
        task: JoinHandle<Result<u64>>,
        offset: u64,
        declared: u64,
    ) -> Self {
        Self {
            tx: Some(tx),
            task,
            offset,
            declared,
        }
    }

    /// Bytes received so far, including those from earlier streams.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Appends a chunk. Waits while the backend is [`CHANNEL_CHUNKS`] behind.
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
        if tx.send(Cmd::Data(data)).await.is_err() {
            return Err(self.failure().await);
        }
        self.offset = received;
        Ok(())
    }

    /// Verifies the digest and commits the blob; returns its size.
    pub async fn finish(mut self) -> Result<u64> {
        let tx = self.tx.take().expect("finish twice");
        let (reply, answer) = oneshot::channel();
        if tx.send(Cmd::Finish(reply)).await.is_err() {
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

    /// The backend's task stopped early: its error says why.
    async fn failure(&mut self) -> StoreError {
        self.tx.take();
        match (&mut self.task).await.expect("upload task panicked") {
            Err(e) => e,
            Ok(_) => StoreError::Io {
                context: "upload task".into(),
                source: std::io::Error::other("stopped unexpectedly"),
            },
        }
    }
}

/// The uploads with a Write stream in this process, by backend-specific key: a
/// second stream for the same upload is refused while the first one runs.
#[derive(Clone, Default)]
pub(super) struct ActiveUploads(Arc<Mutex<HashSet<String>>>);

impl ActiveUploads {
    /// Marks `key` active until the returned lock drops; `None` if it already is.
    pub(super) fn try_lock(&self, key: &str) -> Option<UploadLock> {
        if !self.set().insert(key.to_owned()) {
            return None;
        }
        Some(UploadLock {
            active: self.clone(),
            key: key.to_owned(),
        })
    }

    /// The set itself, locked: garbage collection holds it while it deletes, so
    /// no stream can start on what it removes.
    pub(super) fn set(&self) -> MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Held while a Write stream owns an upload; released on drop.
pub(super) struct UploadLock {
    active: ActiveUploads,
    key: String,
}

impl Drop for UploadLock {
    fn drop(&mut self) {
        self.active.set().remove(&self.key);
    }
}
