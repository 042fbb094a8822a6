//! HTTP/2 settings of the gRPC listener.

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
