//! Generated protobuf and gRPC code for the public API.

/// `google.bytestream`: the standard blob streaming API.
pub mod bytestream {
    tonic::include_proto!("google.bytestream");
}

/// `memgate.v1`: whole-message work on large payloads.
pub mod memgate_v1 {
    tonic::include_proto!("memgate.v1");
}

/// The encoded file descriptor set, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("memgate_descriptor");
