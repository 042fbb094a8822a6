//! `memgate.v1.Payload/Process`: the unary, whole-message shape. The request's
//! `data` is a slice of tonic's decode buffer (`bytes` fields map to `Bytes`), so the
//! payload is in memory once; an echo shares it instead of copying.

use sha2::{Digest as _, Sha256};
use tonic::{Request, Response, Status};

use crate::guard::Reservation;
use crate::proto::memgate_v1::{ProcessRequest, ProcessResponse, payload_server::Payload};

/// The Payload service.
#[derive(Clone, Default)]
pub struct PayloadService;

#[tonic::async_trait]
impl Payload for PayloadService {
    async fn process(
        &self,
        request: Request<ProcessRequest>,
    ) -> Result<Response<ProcessResponse>, Status> {
        let reservation = request.extensions().get::<Reservation>().cloned();
        let ProcessRequest { data, echo } = request.into_inner();
        if echo && let Some(r) = reservation {
            // The echo is encoded into a second buffer as large as the payload.
            r.grow(data.len() as u64).await?;
        }
        let shared = data.clone();
        // Hashing 150 MB takes a few hundred ms: keep it off the async workers.
        let hash = tokio::task::spawn_blocking(move || Sha256::digest(&shared))
            .await
            .map_err(|e| Status::internal(format!("hashing failed: {e}")))?;
        Ok(Response::new(ProcessResponse {
            sha256: hex::encode(hash),
            size: data.len() as u64,
            data: if echo { data } else { Default::default() },
        }))
    }
}
