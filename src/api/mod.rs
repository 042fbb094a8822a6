//! The gRPC services: ByteStream over the blob store and the unary Payload service,
//! plus resource-name parsing and the mapping of errors to statuses.

pub mod access_log;
pub mod bytestream;
pub mod payload;
pub mod resource;
mod status;

pub use bytestream::ByteStreamService;
pub use payload::PayloadService;
