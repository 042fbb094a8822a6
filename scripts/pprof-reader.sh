#!/usr/bin/env bash
# Installs the pprof reader the profiling tests decode profiles with (Datadog's
# pure-JavaScript pprof-format, pinned by tests/pprof/package-lock.json) into
# target/pprof-reader, once per version of its files; prints the reader's path.
# Needs Node.js and npm.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/pprof-reader
src=tests/pprof
want="$(cat "$src/package.json" "$src/package-lock.json" "$src/read-profile.mjs" | sha256sum | cut -d' ' -f1)"
stamp="$dir/.stamp"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "pprof-reader: installing pprof-format into $dir (once)" >&2
    rm -rf "$dir"
    mkdir -p "$dir"
    cp "$src/package.json" "$src/package-lock.json" "$src/read-profile.mjs" "$dir/"
    (cd "$dir" && npm ci --no-audit --no-fund --silent >&2)
    echo "$want" > "$stamp"
fi
echo "$PWD/$dir/read-profile.mjs"
