#!/usr/bin/env bash
# Renders a flamegraph SVG (from `memgate profile -o heap.svg`) to PNG with
# headless Chromium, at the SVG's own size: how docs/diagnosis.md's picture was
# made. Needs Debian's chromium (`apt-get install -y chromium`).
#
#   bash scripts/flamegraph-png.sh heap.svg docs/diagnosis-flamegraph.png
set -euo pipefail
svg=$(realpath "$1")
png=$(realpath -m "$2")
chromium=${CHROMIUM:-chromium}
# inferno writes <svg ... width="1200" height="N" ...> on the root element.
read -r width height < <(python3 - "$svg" <<'PY'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
print(int(float(root.get("width", "1200"))), int(float(root.get("height", "800"))))
PY
)
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$chromium" --headless --no-sandbox --disable-gpu --disable-quic \
    --disable-background-networking --disable-component-update --disable-sync \
    --no-first-run --hide-scrollbars --user-data-dir="$profile" \
    --window-size="$width,$height" --screenshot="$png" "file://$svg" >/dev/null 2>&1
test -s "$png"
echo "$png: ${width}x${height}"
