//! `google.bytestream.ByteStream` over the blob store. Every direction streams:
//! Write hands each chunk to the store as it arrives, Read sends chunks as the
//! disk produces them, and neither ever holds a whole blob.

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::resource::{parse_read_name, parse_write_name};
use crate::proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse, byte_stream_server::ByteStream,
};
use crate::store::{Store, StoreError};

/// Largest single `WriteRequest` accepted. Clients send 16 KiB to 1 MiB chunks; the
/// cap bounds each stream's decode buffer, which the guard reserves for.
pub const MAX_STREAM_MESSAGE: usize = 4 * 1024 * 1024;

/// The ByteStream service.
#[derive(Clone)]
pub struct ByteStreamService {
    store: Store,
    read_chunk: usize,
}

impl ByteStreamService {
    pub fn new(store: Store, read_chunk: usize) -> Self {
        Self { store, read_chunk }
    }
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

fn non_negative(value: i64, field: &str) -> Result<u64, Status> {
    u64::try_from(value)
        .map_err(|_| Status::invalid_argument(format!("{field} must not be negative, got {value}")))
}

/// The spec: "A `read_offset` that is negative or greater than the size of the
/// resource will cause an `OUT_OF_RANGE` error" (past the end is the store's check).
fn read_offset(value: i64) -> Result<u64, Status> {
    u64::try_from(value)
        .map_err(|_| Status::out_of_range(format!("read_offset must not be negative, got {value}")))
}

/// How long a Write waits, after committing on `finish_write`, for the client
/// to half-close. Clients half-close right after their last message (Bazel,
/// grpc-go's CloseAndRecv, tonic), so the end is normally there already; one
/// that waits for the response before closing gets it after this.
pub const AFTER_FINISH_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// The spec: "Sending any `WriteRequest`s subsequent to one in which
/// `finish_write` is `true` will cause an error." Called once the blob is
/// committed, which such a message does not undo.
async fn nothing_after_finish(stream: &mut Streaming<WriteRequest>) -> Result<(), Status> {
    match tokio::time::timeout(AFTER_FINISH_WAIT, stream.message()).await {
        Ok(Ok(Some(_))) => Err(Status::invalid_argument(
            "a WriteRequest followed the one with finish_write = true; the blob was \
             committed and stays, but nothing may be sent after finish_write",
        )),
        // Half-closed, gone, or still open after the wait: the commit stands.
        Ok(Ok(None)) | Ok(Err(_)) | Err(_) => Ok(()),
    }
}

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let req = request.into_inner();
        let name = parse_read_name(&req.resource_name)?;
        let offset = read_offset(req.read_offset)?;
        let limit = non_negative(req.read_limit, "read_limit")?;
        if name.digest.is_empty_blob() {
            // REAPI: "Servers MUST behave as though empty blobs are always available."
            if offset > 0 {
                return Err(StoreError::OutOfRange { offset, size: 0 }.into());
            }
            return Ok(Response::new(Box::pin(tokio_stream::empty())));
        }
        let chunks = self
            .store
            .read(&name.digest, offset, limit, self.read_chunk)
            .await?;
        let stream = chunks.map(|chunk| {
            chunk
                .map(|data| ReadResponse { data })
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let mut stream = request.into_inner();
        let Some(mut msg) = stream.message().await? else {
            return Err(Status::invalid_argument(
                "Write stream ended before its first message",
            ));
        };
        let resource = std::mem::take(&mut msg.resource_name);
        let name = parse_write_name(&resource)?;
        self.store.check_size(name.digest.size)?;
        let offset = non_negative(msg.write_offset, "write_offset")?;
        let size = name.digest.size as i64;
        if name.digest.is_empty_blob() || self.store.contains(&name.digest).await? {
            // Already stored: succeed at once without reading (or storing) it again.
            return Ok(Response::new(WriteResponse {
                committed_size: size,
            }));
        }
        let mut upload = self.store.begin_write(&name, offset).await?;
        loop {
            if !msg.resource_name.is_empty() && msg.resource_name != resource {
                return Err(Status::invalid_argument(format!(
                    "resource_name changed mid-stream: {:?} after {resource:?}",
                    msg.resource_name
                )));
            }
            if msg.write_offset != upload.offset() as i64 {
                return Err(StoreError::WrongOffset {
                    expected: upload.offset(),
                    got: msg.write_offset,
                }
                .into());
            }
            upload.write(msg.data).await?;
            if msg.finish_write {
                let committed = upload.finish().await?;
                nothing_after_finish(&mut stream).await?;
                return Ok(Response::new(WriteResponse {
                    committed_size: committed as i64,
                }));
            }
            // The next message is decoded only once the store can take it.
            if let Err(e) = upload.ready().await {
                return Err(e.into());
            }
            match stream.message().await {
                Ok(Some(next)) => msg = next,
                // Half-closed without finish_write: a deliberate pause, resumable later.
                Ok(None) => {
                    let committed = upload.suspend().await?;
                    return Ok(Response::new(WriteResponse {
                        committed_size: committed as i64,
                    }));
                }
                Err(status) => {
                    // The client went away or sent garbage: keep what arrived, durably.
                    let _ = upload.suspend().await;
                    return Err(status);
                }
            }
        }
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let name = parse_write_name(&request.get_ref().resource_name)?;
        let (committed, complete) = match name.digest.is_empty_blob() {
            true => (0, true),
            false => self.store.query_write_status(&name).await?,
        };
        Ok(Response::new(QueryWriteStatusResponse {
            committed_size: committed as i64,
            complete,
        }))
    }
}
