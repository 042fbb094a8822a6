#!/usr/bin/env bash
# Installs Garage (the S3-compatible object store the S3 tests run against)
# into a cache directory shared by every checkout on this machine, once.
# Prints the path of the garage binary on stdout.
#
#   MEMGATE_TOOLS_CACHE  cache root (default: ~/.cache/memgate-tools)
#   GARAGE_VERSION       crate version to install (default below)
set -euo pipefail

version="${GARAGE_VERSION:-2.5.0}"
cache="${MEMGATE_TOOLS_CACHE:-$HOME/.cache/memgate-tools}"
root="$cache/garage-$version"
bin="$root/bin/garage"

if [[ -x "$bin" ]] && "$bin" --version >/dev/null 2>&1; then
    echo "$bin"
    exit 0
fi

mkdir -p "$cache"
# Only what a single-node test server needs: the sqlite metadata engine with
# bundled C libraries. This skips the metrics, lmdb and k2v features, which
# shortens the build on two cores.
echo "installing garage $version into $root (takes several minutes, once)" >&2
if ! cargo install garage --locked --version "$version" \
        --no-default-features --features bundled-libs,sqlite \
        --root "$root.tmp" >&2; then
    echo "error: could not install garage $version with cargo; the S3 tests need it" >&2
    exit 1
fi
rm -rf "$root"
mv "$root.tmp" "$root"
echo "$bin"
