//! `memgate.v1.Payload/Process`: the unary, whole-message shape. The request's
//! `data` is a slice of tonic's decode buffer (`bytes` fields map to `Bytes`), so the
//! payload is in memory once, and an echo sends that same buffer back: [`server`]
//! serves the method by hand because tonic's generated server would encode the
//! response into a second buffer as large as the payload, and [`reply`] frames the
//! response around the request's own bytes.
//!
//! So a Process call holds one payload, echo or not, which is what the guard
//! reserves for it (one copy of the declared length, plus a fixed overhead).

pub mod reply;
pub mod server;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tonic::Status;

use crate::proto::memgate_v1::ProcessRequest;

pub use reply::Reply;
pub use server::PayloadServer;

/// The Payload service's work: what a Process call answers.
#[derive(Clone, Default)]
pub struct PayloadService;

impl PayloadService {
    /// Hashes `data`; the reply carries it back when `echo` is set.
    pub async fn process(&self, request: ProcessRequest) -> Result<Reply, Status> {
        let ProcessRequest { data, echo } = request;
        let shared = data.clone();
        // Hashing 150 MB takes a few hundred ms: keep it off the async workers.
        let hash = tokio::task::spawn_blocking(move || Sha256::digest(&shared))
            .await
            .map_err(|e| Status::internal(format!("hashing failed: {e}")))?;
        Ok(Reply {
            sha256: hex::encode(hash),
            size: data.len() as u64,
            // The request's own buffer, never a copy of it.
            data: if echo { data } else { Bytes::new() },
        })
    }
}
