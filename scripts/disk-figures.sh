#!/usr/bin/env bash
# The figures in docs/disk.md: the issue's scenario on small real filesystems,
# with the real binary and its CLI. For each of a 220 MiB tmpfs and a 240 MiB
# ext4 loop filesystem (ext4's journal and inode tables take about 24 MiB, so
# 240 MiB leaves what the tmpfs has): a 150 MB upload, a second 150 MB upload (refused), a
# 1 MB upload, what the refused Write cost the server (bytes received, from
# /metrics) and how long each took; then what preallocating 150 MB costs on each
# (fallocate(1), the same call memgate makes).
#
#   cargo build --release --bin memgate
#   bash scripts/disk-figures.sh            # as root: it mounts
#
# MEMGATE_BIN picks another binary; RUNS (default 5) the fallocate repetitions.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=$(realpath "${MEMGATE_BIN:-target/release/memgate}")
runs=${RUNS:-5}
[[ $(id -u) == 0 ]] || { echo "error: needs root (it mounts filesystems)" >&2; exit 1; }
[[ -x $bin ]] || { echo "error: $bin missing: cargo build --release --bin memgate" >&2; exit 1; }

work=$(mktemp -d)
server=""
cleanup() {
    [[ -n $server ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
    umount "$work/mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s%N; }
ms() { echo $(( ($2 - $1) / 1000000 )); }

mount_fs() {
    mkdir -p "$work/mnt"
    case $1 in
        tmpfs) mount -t tmpfs -o size=220m tmpfs "$work/mnt" ;;
        ext4)
            rm -f "$work/fs.img"
            truncate -s 240M "$work/fs.img"
            mkfs.ext4 -q -F -m 0 "$work/fs.img"
            mount -o loop "$work/fs.img" "$work/mnt"
            ;;
    esac
}

start_server() {
    "$bin" serve --grpc-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --log-format json \
        --data-dir "$work/mnt" > /dev/null 2> "$work/server.log" &
    server=$!
    for _ in $(seq 100); do
        grep -q '"listening"' "$work/server.log" 2>/dev/null && break
        sleep 0.1
    done
    grpc=$(grep -o '"grpc_addr":"[^"]*"' "$work/server.log" | cut -d'"' -f4)
    admin=$(grep -o '"admin_addr":"[^"]*"' "$work/server.log" | cut -d'"' -f4)
}

metric() {
    curl -s "http://$admin/metrics" > "$work/metrics.txt"
    awk -v m="$1" '$1 == m { v = $2 } END { print (v == "" ? 0 : v) }' "$work/metrics.txt"
}
write_received() { metric 'memgate_received_bytes_total{method="/google.bytestream.ByteStream/Write"}'; }
mib() { awk -v b="${1:-0}" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

head -c 150000000 /dev/urandom > "$work/a.bin"
head -c 150000000 /dev/urandom > "$work/b.bin"
head -c 1000000 /dev/urandom > "$work/c.bin"

echo "memgate: $bin"
echo
printf '| filesystem | step | result | took | Write bytes received |\n|---|---|---|---|---|\n'
for fs in tmpfs ext4; do
    mount_fs "$fs"
    start_server
    for step in "150 MB:a.bin" "second 150 MB:b.bin" "1 MB:c.bin"; do
        label=${step%%:*} file=${step##*:}
        before=$(write_received)
        t0=$(now)
        if out=$("$bin" upload "$work/$file" --addr "http://$grpc" 2>&1); then
            result="OK"
        else
            case $out in
                *"resource has been exhausted"*) result="RESOURCE_EXHAUSTED" ;;
                *) result="failed: ${out:0:80}" ;;
            esac
            echo "$out" | tail -1 > "$work/refusal.txt"
        fi
        t1=$(now)
        after=$(write_received)
        printf '| %s | %s | %s | %s ms | %s |\n' "$fs" "$label" "$result" "$(ms "$t0" "$t1")" \
            "$(mib $(( ${after%.*} - ${before%.*} )))"
    done
    printf '| %s | after | free %s, admittable %s, readyz %s | | |\n' "$fs" \
        "$(mib "$(metric memgate_storage_free_bytes)")" "$(mib "$(metric memgate_storage_admittable_bytes)")" \
        "$(curl -s -o /dev/null -w '%{http_code}' "http://$admin/readyz")"
    kill "$server"; wait "$server" 2>/dev/null || true; server=""
    umount "$work/mnt"
done
echo
echo "The refusal, as the CLI printed it:"
cat "$work/refusal.txt"

echo
printf '| filesystem | fallocate -n 150000000 bytes, %d runs: min / median / max |\n|---|---|\n' "$runs"
for fs in tmpfs ext4; do
    mount_fs "$fs"
    times=()
    for _ in $(seq "$runs"); do
        : > "$work/mnt/p"
        t0=$(now)
        fallocate -n -l 150000000 "$work/mnt/p"
        t1=$(now)
        times+=("$(( (t1 - t0) / 1000 ))")
        rm "$work/mnt/p"
    done
    sorted=$(printf '%s\n' "${times[@]}" | sort -n)
    printf '| %s | %s / %s / %s µs |\n' "$fs" "$(echo "$sorted" | head -1)" \
        "$(echo "$sorted" | sed -n "$(( (runs + 1) / 2 ))p")" "$(echo "$sorted" | tail -1)"
    umount "$work/mnt"
done
