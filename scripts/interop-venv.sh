#!/usr/bin/env bash
# Installs the pinned grpcio client (tests/interop/requirements.txt) into
# target/interop-venv, once per requirements file; prints the venv's python.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/interop-venv
requirements=tests/interop/requirements.txt
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
stamp="$venv/.requirements.sha256"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "interop-venv: installing grpcio into $venv (once)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$requirements" >&2
    echo "$want" > "$stamp"
fi
echo "$PWD/$venv/bin/python"
