//! Generated protobuf and gRPC code for the public API.

/// `google.bytestream`: the standard blob streaming API.
pub mod bytestream {
    tonic::include_proto!("google.bytestream");
}

/// `memgate.v1`: whole-message work on large payloads.
pub mod memgate_v1 {
    tonic::include_proto!("memgate.v1");

    /// The server side, written by hand (an echo must not be encoded into a
    /// second copy of the payload): see [`crate::api::payload::server`].
    pub mod payload_server {
        pub use crate::api::payload::server::PayloadServer;
    }
}

/// The encoded file descriptor set, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("memgate_descriptor");
