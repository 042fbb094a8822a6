#!/usr/bin/env bash
# Reproduces docs/diagnosis.md on this machine: starts the release memgate with
# [profiling] on, keeps 150 MB Process calls with echo going, and while the
# server holds one takes `memgate limits`, /metrics, a pprof heap profile and a
# flamegraph, then renders the flamegraph to PNG (scripts/flamegraph-png.sh,
# Debian's chromium). Everything goes to OUT (default target/diagnosis-demo).
#
#   cargo build --release --bin memgate
#   bash scripts/diagnosis-demo.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-target/diagnosis-demo}")
bin=${MEMGATE_BIN:-target/release/memgate}
mkdir -p "$out"
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

cat > "$work/memgate.toml" <<'EOF'
[profiling]
enabled = true
[log]
format = "json"
EOF
"$bin" serve --config "$work/memgate.toml" --grpc-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 \
    --data-dir "$work/data" 2> "$work/server.log" &
pids+=($!)
for _ in $(seq 100); do
    grep -q '"listening"' "$work/server.log" && break
    sleep 0.1
done
grpc=$(grep -o '"grpc_addr":"[^"]*"' "$work/server.log" | cut -d'"' -f4)
admin=$(grep -o '"admin_addr":"[^"]*"' "$work/server.log" | cut -d'"' -f4)
echo "memgate: gRPC $grpc, admin $admin" >&2

head -c 150000000 /dev/urandom > "$work/payload"
metric() { curl -sf "http://$admin/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }

# 150 MB Process calls with echo from two clients, each one call after the
# other, as a busy pod would see them: the server holds decoded requests and,
# during an echo, the encoded copy too.
loads=()
for client in 1 2; do
    (
        while [[ ! -e "$work/stop" ]]; do
            "$bin" process "$work/payload" --echo --addr "http://$grpc" > "$out/process-$client.txt"
        done
    ) &
    pids+=($!)
    loads+=($!)
done
# Waits until a call's request buffer is allocated (jemalloc's allocated bytes).
in_flight() {
    for _ in $(seq 1000); do
        allocated=$(metric memgate_jemalloc_allocated_bytes)
        [[ ${allocated%.*} -ge 150000000 ]] && return 0
        sleep 0.01
    done
    echo "no call in flight" >&2
    return 1
}
in_flight
"$bin" limits --config "$work/memgate.toml" > "$out/limits.txt"
curl -sf "http://$admin/metrics" | grep -E '^memgate_(memory_(limit|working_set|budget|reserved)|jemalloc_(allocated|resident))_bytes' > "$out/metrics.txt"
# A profile shows what is live when it is taken; between two calls that is
# little. Take each until it holds a call (150 MB or more in use).
reader=$(bash scripts/pprof-reader.sh)
pprof_total() {
    node "$reader" "$1" | python3 -c 'import json,sys; print(sum(s["values"][0] for s in json.load(sys.stdin)["samples"]))'
}
svg_total() {
    python3 - "$1" <<'PY'
import re, sys
m = re.search(r"<title>all \(([0-9,]+) bytes", open(sys.argv[1]).read())
print(m.group(1).replace(",", "") if m else 0)
PY
}
for _ in $(seq 20); do
    in_flight
    "$bin" profile --admin-addr "$admin" -o "$out/heap.pb.gz" >&2
    [[ $(pprof_total "$out/heap.pb.gz") -ge 150000000 ]] && break
done
for _ in $(seq 20); do
    in_flight
    "$bin" profile --admin-addr "$admin" -o "$out/heap.svg" >&2
    [[ $(svg_total "$out/heap.svg") -ge 150000000 ]] && break
done
touch "$work/stop"
wait "${loads[@]}"
echo "last calls: $(cat "$out"/process-*.txt | tr '\n' ' ')" >&2
if command -v go >/dev/null; then
    go tool pprof -top -nodecount=12 "$out/heap.pb.gz" > "$out/pprof-top.txt" 2>&1
fi
bash scripts/flamegraph-png.sh "$out/heap.svg" "$out/heap.png"
ls -la "$out" >&2
