#!/usr/bin/env bash
# What the memory guard prevents: the OOM kill.
#
# Runs the oom_torture storm -- 16 concurrent 150 MB ByteStream uploads plus 8
# concurrent 150 MB Payload/Process calls (half with echo), all at once, first
# over one shared HTTP/2 connection, then with a connection per call -- against
# the RELEASE binary with `[memory] enabled = false`, each variant in a fresh
# 512 MiB child memory cgroup, and prints the cgroup's oom_kill count, its peak
# usage and every client outcome. Nothing is asserted: it is a demonstration.
#
# Run it as root on a host with a writable cgroup memory controller (v1 or v2),
# from anywhere in the repository:
#
#     bench/oom_guard_off.sh                 # extra arguments go to the test harness
#
# It is the ignored test `guard_off` in tests/oom_torture.rs, i.e.
#
#     MEMGATE_REQUIRE_CGROUP=1 cargo test --release --test oom_torture -- \
#         --ignored --exact guard_off --nocapture
#
# and the same storm with the guard on is the acceptance test:
#
#     cargo test --release --test oom_torture -- --nocapture
#
# The first run builds the release profile (several minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
MEMGATE_REQUIRE_CGROUP=1 cargo test --release --test oom_torture -- \
    --ignored --exact guard_off --nocapture "$@" 2>&1 | tee "$log" || status=$?

echo
echo "== summary: guard off, 512 MiB cgroup =="
grep '^RESULT' "$log" || echo "no RESULT lines: see the output above"
exit "$status"
