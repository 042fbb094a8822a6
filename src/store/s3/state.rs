//! What the store holds for one upload, wherever it sits: staging objects left
//! by streams that ended, and multipart uploads still open. An open one is a
//! stream still running somewhere, or one cut short by a store outage, a
//! memgate crash or a take-over; either way the parts the store acknowledged
//! are bytes the client sent at those offsets, so they count as committed.
//!
//! Open uploads are listed before staging objects: a stream that completes
//! its multipart upload between the two listings then shows up as the object
//! it became, never as nothing.
//!
//! Before a new stream writes, [`S3Store::settle`] makes the state plain
//! staging objects again: it completes the open upload holding the most (with
//! its acknowledged prefix of parts) if that beats every staging object, and
//! aborts the other open ones. A stream still writing into one of those then
//! fails at its next part with ABORTED: the newest stream takes the upload
//! over, on any replica.

use std::time::Instant;

use object_store::{
    ObjectMeta,
    multipart::{MultipartStore, PartId},
    path::Path,
};

use super::{
    S3Store,
    listing::{self, contiguous},
};
use crate::store::{Result, StoreError};

/// A multipart upload the store holds open, and what it holds.
#[derive(Debug, Clone)]
pub(super) struct OpenUpload {
    pub key: Path,
    pub upload_id: String,
    /// Parts 1, 2, ... up to the first gap: what can be completed.
    pub parts: Vec<PartId>,
    /// Their total size: the bytes of the upload this multipart upload holds.
    pub size: u64,
    /// Its start or its newest part, whichever is later (ms since the epoch).
    pub active_ms: i64,
}

/// Everything the store holds for one upload.
pub(super) struct UploadState {
    /// Staging objects, largest first.
    pub staged: Vec<ObjectMeta>,
    /// Open multipart uploads, largest first.
    pub open: Vec<OpenUpload>,
}

impl UploadState {
    /// The bytes committed: the most any staging object or open upload holds.
    pub fn committed(&self) -> u64 {
        let staged = self.staged.first().map_or(0, |m| m.size);
        let open = self.open.first().map_or(0, |o| o.size);
        staged.max(open)
    }
}

impl S3Store {
    /// The multipart uploads open under `dir`, with what each holds. One that
    /// is completed or aborted while it is being listed is left out.
    pub(super) async fn open_under(&self, dir: &Path) -> Result<Vec<OpenUpload>> {
        // A key prefix ends with `/`, except the bucket's root.
        let prefix = match dir.as_ref() {
            "" => String::new(),
            dir => format!("{dir}/"),
        };
        let start = Instant::now();
        let listed = listing::open_uploads(&self.inner.store, &self.inner.http, &prefix).await;
        let entries = self.observe("list_uploads", start, listed, "listing open uploads")?;
        let mut open = Vec::with_capacity(entries.len());
        for e in entries {
            let key = Path::from(e.key.as_str());
            let start = Instant::now();
            let listed =
                listing::parts(&self.inner.store, &self.inner.http, &key, &e.upload_id).await;
            let Some(parts) = self.observe("list_parts", start, listed, "listing upload parts")?
            else {
                continue;
            };
            let (prefix, size) = contiguous(&parts);
            let newest = parts.iter().map(|p| p.modified_ms).max().unwrap_or(0);
            open.push(OpenUpload {
                key,
                upload_id: e.upload_id,
                parts: prefix
                    .iter()
                    .map(|p| PartId {
                        content_id: p.etag.clone(),
                    })
                    .collect(),
                size,
                active_ms: newest.max(e.initiated_ms),
            });
        }
        open.sort_by(|a, b| b.size.cmp(&a.size).then(b.key.cmp(&a.key)));
        Ok(open)
    }

    /// What the store holds for upload `id`.
    pub(super) async fn upload_state(&self, id: &str) -> Result<UploadState> {
        let open = self.open_under(&self.uploads_dir(id)).await?;
        let staged = self.staged(id).await?;
        Ok(UploadState { staged, open })
    }

    /// Leaves upload `name`'s state as staging objects only (see the module
    /// docs) and returns them, largest first. `Busy` if an open upload it
    /// meant to complete was completed or aborted meanwhile: another stream
    /// got there first.
    pub(super) async fn settle(&self, name: &str, state: UploadState) -> Result<Vec<(Path, u64)>> {
        let mut staged: Vec<(Path, u64)> = state
            .staged
            .into_iter()
            .map(|m| (m.location, m.size))
            .collect();
        let best_staged = staged.first().map_or(0, |s| s.1);
        let mut open = state.open.into_iter();
        if let Some(best) = open.next() {
            if best.size > best_staged {
                self.complete_open(name, &best).await?;
                tracing::info!(
                    upload = %best.key,
                    bytes = best.size,
                    "kept the acknowledged parts of an interrupted upload"
                );
                staged.insert(0, (best.key, best.size));
            } else {
                self.abort_open(&best).await;
            }
        }
        for other in open {
            self.abort_open(&other).await;
        }
        Ok(staged)
    }

    async fn complete_open(&self, name: &str, o: &OpenUpload) -> Result<()> {
        let start = Instant::now();
        let r = self
            .inner
            .store
            .complete_multipart(&o.key, &o.upload_id, o.parts.clone())
            .await;
        match r {
            Err(object_store::Error::NotFound { .. }) => {
                self.inner.observer.object_store_request(
                    "complete_multipart",
                    "not_found",
                    start.elapsed(),
                );
                Err(StoreError::Busy(name.to_owned()))
            }
            r => self
                .observe(
                    "complete_multipart",
                    start,
                    r,
                    "keeping an interrupted upload",
                )
                .map(drop),
        }
    }

    /// Aborts an open upload; best effort (garbage collection retries).
    pub(super) async fn abort_open(&self, o: &OpenUpload) {
        let start = Instant::now();
        let r = self.inner.store.abort_multipart(&o.key, &o.upload_id).await;
        match r {
            // Gone already: what was wanted.
            Err(object_store::Error::NotFound { .. }) => self.inner.observer.object_store_request(
                "abort_multipart",
                "not_found",
                start.elapsed(),
            ),
            r => {
                if let Err(e) =
                    self.observe("abort_multipart", start, r, "aborting a superseded upload")
                {
                    tracing::warn!(upload = %o.key, error = %e, "could not abort an open upload; garbage collection will retry");
                }
            }
        }
    }
}
