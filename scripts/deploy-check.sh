#!/usr/bin/env bash
# Checks the Kubernetes deployment pieces (helm/memgate, k8s/, Dockerfile)
# with real tools, offline, without a cluster or a container engine:
#   - Helm v4's library (helm-python-sdk): strict lint, renders of the chart with
#     its defaults and every helm/memgate/ci/*.yaml set, schema rejections;
#   - kubernetes-validate --strict for Kubernetes 1.27 and the newest it knows;
#   - checkov over every render, k8s/ and the Dockerfile;
#   - the rendered memgate.toml loaded by the real binary (`memgate limits`).
#
#   bash scripts/deploy-check.sh            # after `cargo build --bin memgate`
#   bash scripts/deploy-check.sh -k s3      # extra arguments go to pytest
#
# The tools live in a virtual environment at target/deploy-venv, installed from
# the pinned tests/deploy/requirements.txt and reused while that file is
# unchanged. MEMGATE_BIN points the config test at another memgate binary.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/deploy-venv
requirements=tests/deploy/requirements.txt
python=${PYTHON:-python3}

# tomllib (the tests) and the pinned numpy (checkov) need Python 3.11.
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: $python is $("$python" --version 2>&1); the deployment checks need Python >= 3.11 (set PYTHON=...)" >&2
    exit 1
fi

# The venv is keyed on the requirements and the interpreter: either changing
# means a fresh install. A half-finished install leaves no stamp, so the next
# run starts over instead of trusting it.
want="$(sha256sum "$requirements" | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.version.split()[0])')"
stamp="$venv/.requirements.sha256"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "deploy-check: installing the pinned tools into $venv (once; about a minute)" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --no-input --require-virtualenv -r "$requirements"
    echo "$want" > "$stamp"
fi

# checkov stays offline: no mapping download, no update check (the tests pass
# --skip-download too). Neither pytest's cache nor bytecode lands in the tree.
export BC_SKIP_MAPPING=TRUE CKV_SKIP_PACKAGE_UPDATE_CHECK=TRUE PYTHONDONTWRITEBYTECODE=1
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/deploy "$@"
