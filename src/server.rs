//! Builds the gRPC server from a [`Config`]: store, services, HTTP/2 limits and
//! the layer stack, then serves until the shutdown future resolves.

use std::future::Future;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codec::CompressionEncoding;

use crate::api::{ByteStreamService, PayloadService, access_log::AccessLogLayer, bytestream::MAX_STREAM_MESSAGE};
use crate::config::Config;
use crate::proto::{
    FILE_DESCRIPTOR_SET, bytestream::byte_stream_server::ByteStreamServer, memgate_v1::payload_server::PayloadServer,
};
use crate::store::{LocalStore, spawn_gc};

/// hyper's default stream window. Throughput is window / RTT: 1 MiB sustains
/// gigabytes per second on loopback and ~1 GB/s at 1 ms RTT, while bounding what a
/// client can push into a stream whose body nobody reads yet.
pub const STREAM_WINDOW: u32 = 1024 * 1024;
/// Streams one connection may carry at once. A gRPC channel multiplexes every call
/// over one connection; 64 is plenty for large payloads and bounds the window below.
pub const MAX_CONCURRENT_STREAMS: u32 = 64;
/// Room for every stream's full window, so streams that wait (unread) can never use
/// up the connection window that admitted streams need: no head-of-line stall.
pub const CONNECTION_WINDOW: u32 = STREAM_WINDOW * MAX_CONCURRENT_STREAMS;

/// Serves memgate on `listener` until `shutdown` resolves; in-flight calls then finish.
pub async fn serve(
    cfg: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store = LocalStore::open(&cfg.storage)?;
    let _gc = spawn_gc(&store, cfg.storage.gc_interval, cfg.storage.partial_upload_expiry);
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
    tracing::info!(grpc_addr = %addr, data_dir = %cfg.storage.data_dir.display(), "listening");
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_adaptive_window(Some(false))
        // Outermost: logs every call, including ones the guard turns away.
        .layer(AccessLogLayer)
        .add_service(bytestream)
        .add_service(payload)
        .add_service(reflection)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
