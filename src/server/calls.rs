//! What each memgate call reserves from the memory budget.

use crate::api::bytestream::MAX_STREAM_MESSAGE;
use crate::config::{Backend, Config};
use crate::guard::estimate::{Estimate, MethodTable};

use super::STREAM_WINDOW;

/// Chunks a Write stream may hold at once: one being decoded, one being written,
/// and the store's queue of two. Each is at most [`MAX_STREAM_MESSAGE`].
const WRITE_CHUNKS_IN_FLIGHT: u64 = 4;
/// A unary call's fixed costs besides its message: headers, the response, tonic's
/// first decode buffer.
const UNARY_OVERHEAD: u64 = 256 * 1024;
/// Calls without a message of note (QueryWriteStatus, unknown methods).
const SMALL_CALL: u64 = 64 * 1024;

/// What each memgate method reserves; see [`Estimate`].
pub fn method_table(cfg: &Config) -> MethodTable {
    let window = STREAM_WINDOW as u64;
    let read_chunk = cfg.storage.read_chunk_size.as_u64();
    let max_message = cfg.server.max_message_size.as_u64();
    // With S3, a Write also holds the multipart part being filled and the parts
    // in flight.
    let part_buffers = match cfg.storage.backend {
        Backend::Local => 0,
        Backend::S3 => cfg.storage.s3.stream_buffer(),
    };
    MethodTable::new(Estimate::Fixed(SMALL_CALL))
        // A call keeps its reservation only while its client keeps sending or
        // reading: a stalled one is cut (server.stream_idle_timeout, min_throughput).
        .with_stream_limits(cfg.server.stream_limits())
        // The HTTP/2 window hyper may buffer plus the chunks in flight: never the blob size.
        .method(
            "/google.bytestream.ByteStream/Write",
            Estimate::Fixed(
                window + WRITE_CHUNKS_IN_FLIGHT * MAX_STREAM_MESSAGE as u64 + part_buffers,
            ),
        )
        // The store's read-ahead (two chunks), one being encoded, and the send window.
        .method(
            "/google.bytestream.ByteStream/Read",
            Estimate::Fixed(window + 4 * read_chunk),
        )
        .method(
            "/google.bytestream.ByteStream/QueryWriteStatus",
            Estimate::Fixed(SMALL_CALL),
        )
        // One copy: `bytes` fields share the decode buffer. An echo grows the
        // reservation by one more copy in the handler, once it knows.
        .method(
            "/memgate.v1.Payload/Process",
            Estimate::Unary {
                copies: 1,
                overhead: UNARY_OVERHEAD,
                compressed: max_message,
            },
        )
}
