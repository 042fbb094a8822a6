//! Builds the gRPC server from a [`Config`]: store, services, HTTP/2 limits and
//! the layer stack, then serves until the shutdown future resolves.

use std::future::Future;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codec::CompressionEncoding;

use crate::api::{
    ByteStreamService, PayloadService, access_log::AccessLogLayer, bytestream::MAX_STREAM_MESSAGE,
};
use crate::config::Config;
use crate::guard::{
    Guard,
    discover::Roots,
    estimate::{Estimate, MethodTable},
};
use crate::proto::{
    FILE_DESCRIPTOR_SET, bytestream::byte_stream_server::ByteStreamServer,
    memgate_v1::payload_server::PayloadServer,
};
use crate::store::{LocalStore, spawn_gc};

/// The HTTP/2 stream window. Throughput is bounded by window / RTT and by how
/// much slack the receiver has while it is busy hashing and writing: measured on
/// loopback (2 cores), a 150 MB Write took 285–320 ms with hyper's default 1 MiB,
/// 205–265 ms with 2 MiB and 165–195 ms with 4 MiB. It is also what hyper may
/// buffer for a stream whose body nobody reads yet, which the guard charges every
/// waiting call.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Streams one connection may carry at once. A gRPC channel multiplexes every call
/// over one connection; 32 large payloads in flight on one connection is plenty,
/// and the number bounds the connection window below.
pub const MAX_CONCURRENT_STREAMS: u32 = 32;
/// Room for every stream's full window, so streams that wait (unread) can never use
/// up the connection window that admitted streams need: no head-of-line stall.
pub const CONNECTION_WINDOW: u32 = STREAM_WINDOW * MAX_CONCURRENT_STREAMS;

/// Largest HTTP/2 frame a client may send us. hyper's default of 16 KiB means
/// ~10,000 frames, each handled and copied separately, per 150 MB upload.
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;

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
    MethodTable::new(Estimate::Fixed(SMALL_CALL))
        // The HTTP/2 window hyper may buffer plus the chunks in flight: never the blob size.
        .method(
            "/google.bytestream.ByteStream/Write",
            Estimate::Fixed(window + WRITE_CHUNKS_IN_FLIGHT * MAX_STREAM_MESSAGE as u64),
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

/// Serves memgate on `listener` until `shutdown` resolves; in-flight calls then finish.
pub async fn serve(
    cfg: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let guard = Guard::start(cfg.memory.clone(), Roots::default(), STREAM_WINDOW as u64).await;
    serve_with_guard(cfg, guard, listener, shutdown).await
}

/// [`serve`] with a guard the caller started (and may inspect).
pub async fn serve_with_guard(
    cfg: &Config,
    guard: Guard,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store = LocalStore::open(&cfg.storage)?;
    let _gc = spawn_gc(
        &store,
        cfg.storage.gc_interval,
        cfg.storage.partial_upload_expiry,
    );
    let max_message = cfg.server.max_message_size.as_u64() as usize;

    let bytestream = ByteStreamServer::new(ByteStreamService::new(
        store,
        cfg.storage.read_chunk_size.as_u64() as usize,
    ))
    .max_decoding_message_size(MAX_STREAM_MESSAGE);
    let payload = PayloadServer::new(PayloadService)
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(max_message)
        // The response carries the payload back plus a hash and a size.
        .max_encoding_message_size(max_message + 1024);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let addr = listener.local_addr()?;
    let snap = guard.snapshot();
    let view = guard.view();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        grpc_addr = %addr,
        data_dir = %cfg.storage.data_dir.display(),
        guard = if cfg.memory.enabled { "on" } else { "off" },
        limit = snap.limit.bytes,
        limit_source = %snap.limit.source,
        budget = view.budget,
        working_set = snap.working_set,
        "listening"
    );
    let layers = tower::ServiceBuilder::new()
        // Outermost: logs every call, including ones the guard turns away.
        .layer(AccessLogLayer)
        // Before tonic decodes anything: reserve the call's memory or reject it.
        .layer(guard.layer(method_table(cfg)))
        .into_inner();
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_frame_size(MAX_FRAME_SIZE)
        .http2_adaptive_window(Some(false))
        .layer(layers)
        .add_service(bytestream)
        .add_service(payload)
        .add_service(reflection)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
