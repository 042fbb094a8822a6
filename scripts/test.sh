#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Needs only the Rust toolchain; installs cargo-nextest if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
# Unit, integration, property and cgroup tests; the OOM torture test runs the
# real binary in a real memory cgroup (it skips without root unless
# MEMGATE_REQUIRE_CGROUP=1, which .ci/run sets).
cargo nextest run --locked --no-fail-fast
# Examples in the docs (nextest does not run doctests).
cargo test --locked --doc
