#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Needs the Rust toolchain, Python 3.11 and Node.js with npm; installs what
# else it needs: cargo-nextest if missing, Garage (the S3 server the S3 tests
# start) into ~/.cache/memgate-tools once, into venvs under target/ the
# deployment checkers (Helm's library, kubernetes-validate, checkov) and
# grpcio, and into target/pprof-reader the pprof decoder of the profiling tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi

# Built once per machine (about 10 minutes on 2 cores), then reused.
MEMGATE_GARAGE_BIN="$(bash scripts/install-garage.sh)"
export MEMGATE_GARAGE_BIN
# A second gRPC implementation (grpcio) for tests/security.rs, in target/.
bash scripts/interop-venv.sh >/dev/null
# An independent pprof reader (pprof-format, npm) for tests/heap_profile.rs.
bash scripts/pprof-reader.sh >/dev/null

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Unit, integration, property and cgroup tests; the OOM torture test runs the
# real binary in a real memory cgroup (it skips without root unless
# MEMGATE_REQUIRE_CGROUP=1, which .ci/run sets).
cargo nextest run --workspace --locked --no-fail-fast
# Examples in the docs (nextest does not run doctests).
cargo test --locked --doc
# The Helm chart, k8s/ manifests and Dockerfile, checked by real Helm,
# kubernetes-validate and checkov; the rendered config is loaded by the binary.
cargo build --locked --bin memgate
bash scripts/deploy-check.sh
