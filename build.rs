//! Compiles the protos with `protox` (pure Rust), so no system `protoc` is needed.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/google/bytestream/bytestream.proto",
        "proto/memgate/v1/payload.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // Served by gRPC reflection; `compile_fds` does not write it itself.
    std::fs::write(
        out.join("memgate_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Decoded payloads share tonic's decode buffer instead of being copied.
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
