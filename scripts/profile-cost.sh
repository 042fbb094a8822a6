#!/usr/bin/env bash
# What taking a heap profile costs the server: wall time of each request, and
# its memory (peak RSS during the profile, from VmHWM after resetting it through
# /proc/PID/clear_refs; RSS and jemalloc's allocated bytes after). A release
# memgate with [profiling] on first serves a 150 MB Process call with echo (so
# the profile has the decode and encode paths to symbolize), then takes
# ROUNDS pprof profiles and ROUNDS flamegraphs, one at a time. Needs root (or
# the server's owner) to write clear_refs.
#
#   cargo build --release --bin memgate
#   bash scripts/profile-cost.sh [ROUNDS]     # default 3
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
bin=${MEMGATE_BIN:-target/release/memgate}
work=$(mktemp -d)
pid=
cleanup() {
    [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
printf '[profiling]\nenabled = true\n[log]\nformat = "json"\n' > "$work/memgate.toml"
"$bin" serve --config "$work/memgate.toml" --grpc-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 \
    --data-dir "$work/data" 2> "$work/server.log" &
pid=$!
for _ in $(seq 100); do grep -q '"listening"' "$work/server.log" && break; sleep 0.1; done
grpc=$(grep -o '"grpc_addr":"[^"]*"' "$work/server.log" | cut -d'"' -f4)
admin=$(grep -o '"admin_addr":"[^"]*"' "$work/server.log" | cut -d'"' -f4)
kib() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$pid/status"; }
allocated() { curl -sf "http://$admin/metrics" | awk '$1 == "memgate_jemalloc_allocated_bytes" { printf "%.1f", $2 / 1048576 }'; }

head -c 150000000 /dev/urandom > "$work/payload"
"$bin" process "$work/payload" --echo --addr "http://$grpc" > /dev/null
sleep 6 # jemalloc's decay (dirty_decay_ms 1000) returns the call's pages
echo "idle after one 150 MB Process --echo: RSS $(( $(kib VmRSS) / 1024 )) MiB, jemalloc allocated $(allocated) MiB"
for format in pprof svg; do
    for r in $(seq "$rounds"); do
        echo 5 > "/proc/$pid/clear_refs"
        before=$(kib VmRSS)
        start=$(date +%s.%N)
        "$bin" profile --admin-addr "$admin" -o "$work/heap.$format" --format "$format" > /dev/null
        end=$(date +%s.%N)
        hwm=$(kib VmHWM)
        after=$(kib VmRSS)
        awk -v f="$format" -v r="$r" -v s="$start" -v e="$end" -v b="$before" -v h="$hwm" -v a="$after" -v al="$(allocated)" \
            'BEGIN { printf "%s %d: %.2f s, RSS %.1f MiB -> peak %.1f MiB (+%.1f) -> %.1f MiB after, jemalloc allocated after %s MiB\n", f, r, e - s, b / 1024, h / 1024, (h - b) / 1024, a / 1024, al }'
    done
done
