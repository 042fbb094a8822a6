#!/usr/bin/env bash
# The heap profiler's CPU cost, measured as the server's own CPU time (utime +
# stime from /proc/PID/stat) per GB moved, which a busy shared machine blurs far
# less than wall-clock throughput: for each round, a release memgate with
# [profiling] enabled = true and one with false each take the same uploads and
# Process calls, one at a time, from the memgate client. Prints one line per
# round and server, then the median ratio.
#
#   cargo build --release --bin memgate
#   bash scripts/profiling-cpu.sh [ROUNDS] [CALLS]     # default 5 rounds of 8 calls
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
calls=${2:-8}
bin=${MEMGATE_BIN:-target/release/memgate}
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
ticks=$(getconf CLK_TCK)
cpu_seconds() { awk -v t="$ticks" '{ print ($14 + $15) / t }' "/proc/$1/stat"; }

# Distinct 150 MB payloads (a stored blob would be answered without its bytes).
for i in $(seq "$calls"); do head -c 150000000 /dev/urandom > "$work/p$i"; done

run() { # run ON|OFF ROUND: prints the server's CPU seconds for the calls
    local on=$1 round=$2 dir="$work/$1-$2"
    mkdir -p "$dir"
    printf '[profiling]\nenabled = %s\n[log]\nformat = "json"\n' "$on" > "$dir/memgate.toml"
    "$bin" serve --config "$dir/memgate.toml" --grpc-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 \
        --data-dir "$dir/data" 2> "$dir/server.log" &
    local pid=$!
    pids+=("$pid")
    for _ in $(seq 100); do grep -q '"listening"' "$dir/server.log" && break; sleep 0.1; done
    local grpc
    grpc=$(grep -o '"grpc_addr":"[^"]*"' "$dir/server.log" | cut -d'"' -f4)
    local before after
    before=$(cpu_seconds "$pid")
    for i in $(seq "$calls"); do
        "$bin" upload "$work/p$i" --addr "http://$grpc" > /dev/null
        "$bin" process "$work/p$i" --addr "http://$grpc" > /dev/null
    done
    after=$(cpu_seconds "$pid")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    rm -rf "$dir/data"
    awk -v a="$after" -v b="$before" 'BEGIN { printf "%.3f\n", a - b }'
}

gb=$(awk -v n="$calls" 'BEGIN { print 2 * n * 0.15 }')
ratios=()
for r in $(seq "$rounds"); do
    # Alternate which goes first, so warm-up and drift do not favour one side.
    if (( r % 2 )); then on=$(run true "$r"); off=$(run false "$r"); else off=$(run false "$r"); on=$(run true "$r"); fi
    ratio=$(awk -v a="$on" -v b="$off" 'BEGIN { printf "%.4f", a / b }')
    ratios+=("$ratio")
    awk -v r="$r" -v a="$on" -v b="$off" -v g="$gb" -v x="$ratio" \
        'BEGIN { printf "round %d: profiling on %.2f s CPU (%.2f s/GB), off %.2f s (%.2f s/GB), on/off %.3f\n", r, a, a / g, b, b / g, x }'
done
printf '%s\n' "${ratios[@]}" | sort -n | awk '{ v[NR] = $1 } END { printf "median on/off CPU time: %.3f over %d rounds (%s GB per server per round)\n", v[int((NR + 1) / 2)], NR, "'"$gb"'" }'
