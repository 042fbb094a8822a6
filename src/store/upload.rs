//! The async half of an upload, the same for every backend: it feeds a task
//! that owns the backend's side (a disk thread, or a multipart upload) through a
//! channel of a few chunks, which is what bounds an upload's memory.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};

use super::{Result, StoreError};

/// Chunks queued between the gRPC stream and the backend's task, per upload or
/// read. Two keep the backend busy while the network delivers the next one.
pub(super) const CHANNEL_CHUNKS: usize = 2;

/// Chunks queued between a Write stream and the backend's task. One: with the
/// chunk the task is writing and the one the stream decodes next (read only
/// once this queue has room, see [`Upload::ready`]), an upload holds three of
/// its messages at most, which is what the guard reserves for it.
pub(super) const UPLOAD_QUEUE: usize = 1;

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
    /// A place in the queue taken by [`Upload::ready`] for the next chunk.
    slot: Option<mpsc::OwnedPermit<Cmd>>,
    task: JoinHandle<Result<u64>>,
    offset: u64,
    declared: u64,
    marker: StreamMarker,
}

impl Upload {
    /// Wraps a backend task reading `Cmd`s from the other end of `tx`; the upload
    /// already holds `offset` of `declared` bytes.
    pub(super) fn new(
        tx: mpsc::Sender<Cmd>,
        task: JoinHandle<Result<u64>>,
        offset: u64,
        declared: u64,
        marker: StreamMarker,
    ) -> Self {
        Self {
            tx: Some(tx),
            slot: None,
            task,
            offset,
            declared,
            marker,
        }
    }

    /// Bytes received so far, including those from earlier streams.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Waits until the backend can take another chunk. Reading the next message
    /// only after this keeps the stream from holding a decoded chunk it cannot
    /// hand on (the transport's window holds the rest).
    pub async fn ready(&mut self) -> Result<()> {
        if self.slot.is_some() {
            return Ok(());
        }
        let tx = self.tx.clone().expect("ready after finish");
        match tx.reserve_owned().await {
            Ok(slot) => {
                self.slot = Some(slot);
                Ok(())
            }
            Err(_) => Err(self.failure().await),
        }
    }

    /// Appends a chunk. Waits while the backend is [`UPLOAD_QUEUE`] behind.
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
        if let Some(slot) = self.slot.take() {
            slot.send(Cmd::Data(data));
        } else {
            let tx = self.tx.as_ref().expect("write after finish");
            if tx.send(Cmd::Data(data)).await.is_err() {
                return Err(self.failure().await);
            }
        }
        self.offset = received;
        self.marker.received(received);
        Ok(())
    }

    /// Verifies the digest and commits the blob; returns its size.
    pub async fn finish(mut self) -> Result<u64> {
        let tx = self.tx.take().expect("finish twice");
        self.slot.take();
        self.marker.ending();
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
        self.slot.take();
        self.marker.ending();
        (&mut self.task).await.expect("upload task panicked")
    }

    /// The backend's task stopped early: its error says why.
    async fn failure(&mut self) -> StoreError {
        self.tx.take();
        self.slot.take();
        match (&mut self.task).await.expect("upload task panicked") {
            Err(e) => e,
            Ok(_) => StoreError::Io {
                context: "upload task".into(),
                source: std::io::Error::other("stopped unexpectedly"),
            },
        }
    }
}

/// How long a new Write waits for a stream of the same upload that still looks
/// live before it is refused as a second writer: a client that cancels and
/// resumes at once is ahead of the server, which has not yet seen the reset.
/// A stream that really is writing still gets its ABORTED after this.
pub(super) const TAKEOVER_WAIT: Duration = Duration::from_secs(1);

/// How long a new Write (or QueryWriteStatus) waits for an ended stream's
/// backend task to make what it received durable and let go of the upload.
/// Local uploads take milliseconds; an S3 upload stages its last part.
pub(super) const RELEASE_WAIT: Duration = Duration::from_secs(30);

/// Where a Write stream that owns an upload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The gRPC stream is running.
    Live,
    /// The stream ended (finished, cancelled, cut or reclaimed); the backend's
    /// task is still flushing what it received.
    Ending,
    /// The task let go: the upload is free.
    Released,
}

/// One upload's owner, shared by the map, the lock and the stream's marker.
pub(super) struct Slot {
    phase: watch::Sender<Phase>,
    /// Bytes the stream has received so far (from its start offset on).
    received: AtomicU64,
}

/// Why [`ActiveUploads::lock`] gave up.
pub(super) enum Contended {
    /// Another stream is live and writing this upload.
    Live,
    /// The previous stream ended but its data is not durable yet.
    Releasing,
}

impl Contended {
    /// The store's error for upload `name`: ABORTED for a live second writer,
    /// UNAVAILABLE (retry shortly) for one still releasing.
    pub(super) fn into_error(self, name: String) -> StoreError {
        match self {
            Contended::Live => StoreError::Busy(name),
            Contended::Releasing => StoreError::Releasing(name),
        }
    }
}

/// The uploads with a Write stream in this process, by backend-specific key.
/// A new stream for an upload waits a moment for the previous one to end and a
/// while for it to release ([`TAKEOVER_WAIT`], [`RELEASE_WAIT`]), so a client
/// that resumes right after a cancel proceeds; a second live stream is refused.
#[derive(Clone, Default)]
pub(super) struct ActiveUploads(Arc<Mutex<HashMap<String, Arc<Slot>>>>);

impl ActiveUploads {
    /// Takes `key` for a new stream, waiting for the previous owner as above.
    pub(super) async fn lock(&self, key: &str) -> std::result::Result<UploadLock, Contended> {
        let release_by = Instant::now() + RELEASE_WAIT;
        let mut takeover_by = None;
        loop {
            let slot = {
                let mut map = self.set();
                match map.get(key) {
                    Some(slot) => slot.clone(),
                    None => {
                        let slot = Arc::new(Slot {
                            phase: watch::Sender::new(Phase::Live),
                            received: AtomicU64::new(0),
                        });
                        map.insert(key.to_owned(), slot.clone());
                        return Ok(UploadLock {
                            active: self.clone(),
                            key: key.to_owned(),
                            slot,
                        });
                    }
                }
            };
            let mut phase = slot.phase.subscribe();
            let (deadline, refusal) = match *phase.borrow_and_update() {
                Phase::Live => (
                    *takeover_by.get_or_insert(Instant::now() + TAKEOVER_WAIT),
                    Contended::Live,
                ),
                Phase::Ending => (release_by, Contended::Releasing),
                // Released but not yet removed: look again.
                Phase::Released => continue,
            };
            if tokio::time::timeout_at(deadline.into(), phase.changed())
                .await
                .is_err()
            {
                return Err(refusal);
            }
        }
    }

    /// What a stream running here has received for `key`, once any stream that
    /// just ended has released it: `None` when no stream owns the upload (the
    /// store's durable state is the answer), `Some(bytes)` when one still runs
    /// after [`TAKEOVER_WAIT`]. `Err` if an ended stream does not release in time.
    pub(super) async fn settle(&self, key: &str) -> std::result::Result<Option<u64>, Contended> {
        let release_by = Instant::now() + RELEASE_WAIT;
        let takeover_by = Instant::now() + TAKEOVER_WAIT;
        loop {
            let Some(slot) = self.set().get(key).cloned() else {
                return Ok(None);
            };
            let mut phase = slot.phase.subscribe();
            let deadline = match *phase.borrow_and_update() {
                Phase::Live if Instant::now() >= takeover_by => {
                    return Ok(Some(slot.received.load(Ordering::Acquire)));
                }
                Phase::Live => takeover_by,
                Phase::Ending => release_by,
                Phase::Released => continue,
            };
            if tokio::time::timeout_at(deadline.into(), phase.changed())
                .await
                .is_err()
                && deadline == release_by
            {
                return Err(Contended::Releasing);
            }
        }
    }

    /// The map itself, locked: garbage collection holds it while it deletes, so
    /// no stream can start on what it removes.
    pub(super) fn set(&self) -> MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Held by the backend's task while a Write stream owns an upload; released on
/// drop, which lets the next stream in.
pub(super) struct UploadLock {
    active: ActiveUploads,
    key: String,
    slot: Arc<Slot>,
}

impl UploadLock {
    /// The stream's side: marks the upload ending when the stream stops.
    pub(super) fn marker(&self, offset: u64) -> StreamMarker {
        self.slot.received.store(offset, Ordering::Release);
        StreamMarker(self.slot.clone())
    }
}

impl Drop for UploadLock {
    fn drop(&mut self) {
        let mut map = self.active.set();
        if map
            .get(&self.key)
            .is_some_and(|s| Arc::ptr_eq(s, &self.slot))
        {
            map.remove(&self.key);
        }
        drop(map);
        self.slot.phase.send_replace(Phase::Released);
    }
}

/// Carried by the [`Upload`]: records what the stream received, and marks the
/// upload ending as soon as the stream stops, however it stops.
pub(super) struct StreamMarker(Arc<Slot>);

impl StreamMarker {
    fn received(&self, bytes: u64) {
        self.0.received.store(bytes, Ordering::Release);
    }

    /// The stream stopped: what follows is the task's flush and release.
    fn ending(&self) {
        self.0.phase.send_if_modified(|p| {
            let live = *p == Phase::Live;
            if live {
                *p = Phase::Ending;
            }
            live
        });
    }
}

impl Drop for StreamMarker {
    fn drop(&mut self) {
        self.ending();
    }
}
