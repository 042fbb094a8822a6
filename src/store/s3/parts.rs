//! A multipart upload fed chunk by chunk: parts of `part_size` bytes, a few
//! uploading while the next one fills. Like `object_store`'s `WriteMultipart`,
//! except for what happens when something fails: `WriteMultipart::finish`
//! aborts the upload on any error, which would delete the parts the store
//! already acknowledged; here a failure leaves the upload open, so those parts
//! stay the upload's committed bytes (see `state.rs`). Only [`Multipart::abort`]
//! deletes them.

use bytes::Bytes;
use object_store::{MultipartUpload, PutPayloadMut, path::Path};
use tokio::task::JoinSet;

use super::errors::classify;
use crate::store::{Result, StoreError};

/// A multipart upload in progress, and the key it will complete to.
pub(super) struct Multipart {
    upload: Box<dyn MultipartUpload>,
    /// The part filling.
    buffer: PutPayloadMut,
    part_size: usize,
    /// The parts uploading.
    uploading: JoinSet<object_store::Result<()>>,
    key: Path,
    /// The upload name this stages, if it is a staging generation: a stream
    /// whose multipart upload vanished was taken over (`state.rs`).
    upload_name: Option<String>,
}

impl Multipart {
    pub(super) fn new(
        upload: Box<dyn MultipartUpload>,
        part_size: usize,
        key: Path,
        upload_name: Option<String>,
    ) -> Self {
        Self {
            upload,
            buffer: PutPayloadMut::new(),
            part_size,
            uploading: JoinSet::new(),
            key,
            upload_name,
        }
    }

    /// Hands a chunk over once fewer than `parts - 1` parts are uploading, so
    /// with the one filling there are at most `parts` part buffers: the
    /// back-pressure that bounds an upload's memory.
    pub(super) async fn feed(&mut self, mut data: Bytes, parts: usize) -> Result<()> {
        self.wait_below(parts - 1).await?;
        while !data.is_empty() {
            let room = self.part_size - self.buffer.content_length();
            if data.len() < room {
                self.buffer.push(data);
                return Ok(());
            }
            self.buffer.push(data.split_to(room));
            self.send_part();
        }
        Ok(())
    }

    fn send_part(&mut self) {
        let part = std::mem::take(&mut self.buffer);
        self.uploading.spawn(self.upload.put_part(part.into()));
    }

    /// Waits until fewer than `max` parts are uploading (for `max` 0: none).
    async fn wait_below(&mut self, max: usize) -> Result<()> {
        while !self.uploading.is_empty() && self.uploading.len() >= max {
            match self.uploading.join_next().await {
                Some(Ok(Ok(()))) | None => {}
                Some(Ok(Err(e))) => return Err(self.failed("uploading a part", e)),
                Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Some(Err(e)) => {
                    return Err(StoreError::Backend {
                        context: "uploading a part".into(),
                        detail: e.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Uploads the last part, waits for every part and completes the upload;
    /// returns its key. On failure the upload stays open.
    pub(super) async fn finish(mut self) -> Result<Path> {
        if !self.buffer.is_empty() {
            self.send_part();
        }
        self.wait_below(0).await?;
        if let Err(e) = self.upload.complete().await {
            return Err(self.failed("completing an upload", e));
        }
        Ok(self.key)
    }

    /// Gives up; the parts uploaded so far are deleted (best effort: a store
    /// that is down keeps them until garbage collection aborts the upload).
    pub(super) async fn abort(mut self) {
        self.uploading.shutdown().await;
        if let Err(e) = self.upload.abort().await {
            tracing::warn!(key = %self.key, error = %e, "could not abort a multipart upload");
        }
    }

    fn failed(&self, context: &str, e: object_store::Error) -> StoreError {
        let Some(name) = &self.upload_name else {
            return classify(context, e);
        };
        if let object_store::Error::NotFound { .. } = e {
            tracing::info!(upload = %self.key, "another Write stream took the upload over");
            return StoreError::Busy(name.clone());
        }
        classify(
            &format!(
                "{context} (the bytes it acknowledged are kept: QueryWriteStatus gives the \
                 offset to resume from)"
            ),
            e,
        )
    }
}
