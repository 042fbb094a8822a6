# syntax=docker/dockerfile:1.7
#
# memgate's container image.
#
#   DOCKER_BUILDKIT=1 docker build -t memgate:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9090:9090 --memory 1g memgate:0.1.0
#
# The build stage compiles with BuildKit cache mounts for the cargo registry and
# the target directory, so a rebuild after a source change recompiles memgate
# alone. The runtime stage is distroless (glibc, CA certificates, no shell) and
# holds the binary and the default configuration only.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# Only what the build reads: the manifest, the build script and its protos, the
# sources, and the declared bench target (cargo checks that its file exists).
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY benches ./benches
# The workspace's other member (memgate-bench): cargo reads every member's
# manifest even to build one binary. .dockerignore lets in its manifest and
# sources only; nothing of it is compiled here.
COPY bench ./bench
COPY config ./config
# The target dir is a cache mount, so the binary is copied out in the same step;
# `--version` proves that it runs on this glibc before the runtime stage takes it.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin memgate \
 && install -D -m 0755 target/release/memgate /out/usr/local/bin/memgate \
 && /out/usr/local/bin/memgate --version
# The default configuration, with the data directory the image provides
# (config/memgate.toml says ./data, relative to a working directory that is
# read-only here) and both listeners on every interface (its defaults are
# loopback, which `docker run -p` and the kubelet cannot reach). The greps fail
# the build if one of those lines ever changes shape and the sed misses it.
RUN mkdir -p /out/etc/memgate /out/var/lib/memgate \
 && sed -e 's|^data_dir = "./data"$|data_dir = "/var/lib/memgate"|' \
        -e 's|^grpc_addr = "127.0.0.1:50051"$|grpc_addr = "0.0.0.0:50051"|' \
        -e 's|^addr = "127.0.0.1:9090"$|addr = "0.0.0.0:9090"|' \
        config/memgate.toml > /out/etc/memgate/memgate.toml \
 && grep -q '^data_dir = "/var/lib/memgate"$' /out/etc/memgate/memgate.toml \
 && grep -q '^grpc_addr = "0.0.0.0:50051"$' /out/etc/memgate/memgate.toml \
 && grep -q '^addr = "0.0.0.0:9090"$' /out/etc/memgate/memgate.toml

# glibc and libgcc, as the binary needs; the nonroot variant runs as 65532:65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/usr/local/bin/memgate /usr/local/bin/memgate
COPY --from=build /out/etc/memgate/memgate.toml /etc/memgate/memgate.toml
# The only path memgate writes (mount a volume here to keep blobs).
COPY --from=build --chown=65532:65532 /out/var/lib/memgate /var/lib/memgate
# jemalloc's options are embedded in the binary (background_thread:true,
# dirty_decay_ms:1000, muzzy_decay_ms:0, and the heap profiler loaded but not
# sampling until [profiling] enabled: prof:true, prof_active:false,
# lg_prof_sample:19) and suit containers as they are, so _RJEM_MALLOC_CONF is
# not set here; set it at run time only to differ from them.
USER 65532:65532
WORKDIR /var/lib/memgate
# gRPC (ByteStream, Payload, health, reflection) and the admin HTTP listener
# (/livez, /readyz, /metrics).
EXPOSE 50051 9090
# For `docker run`; Kubernetes ignores it and uses the chart's gRPC probes. It
# asks the admin port, whose gRPC health service stays plaintext when [tls]
# puts the gRPC port on TLS. The image's config has [auth] off (memgate's
# default, and it warns about it at start-up on 0.0.0.0): mount a config with
# [auth] and [tls] over /etc/memgate/memgate.toml for anything but a trial.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/memgate", "health", "--addr", "http://127.0.0.1:9090", "--service", ""]
ENTRYPOINT ["/usr/local/bin/memgate"]
CMD ["serve", "--config", "/etc/memgate/memgate.toml"]
