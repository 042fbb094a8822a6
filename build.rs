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
    // memgate.v1's server is written by hand (src/api/payload/server.rs): tonic's
    // generated one would encode an echo into a second buffer. Its client and
    // messages are generated as usual.
    let (mut payload, mut rest) = (fds.clone(), fds);
    payload.file.retain(|f| f.package() == "memgate.v1");
    rest.file.retain(|f| f.package() != "memgate.v1");
    tonic_prost_build::configure()
        // Decoded payloads share tonic's decode buffer instead of being copied.
        .bytes(".")
        .compile_fds(rest)?;
    tonic_prost_build::configure()
        .bytes(".")
        .build_server(false)
        .compile_fds(payload)?;
    Ok(())
}
