//! What memgate tells its metrics about each request to the object store.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use object_store::{MultipartUpload, PutPayload, PutResult, UploadPart};

use super::errors::outcome_of;

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

/// A multipart upload that reports each request to the observer.
#[derive(Debug)]
pub(super) struct Observed {
    pub(super) inner: Box<dyn MultipartUpload>,
    pub(super) observer: Arc<dyn RequestObserver>,
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
