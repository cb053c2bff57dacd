#!/usr/bin/env bash
# Checks what `phatgoose profile` writes, as a person would see it: runs a short profile on the built-in library,
# renders report.html in headless Chromium (Debian's package) to a PNG and checks the picture (expected size, not
# blank, many colours, pixel variance), checks the HTML is self-contained with every plot, and that trace.json is
# valid Chrome trace-event JSON. Usage: scripts/check-report.sh [PHATGOOSE_BINARY] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-$(swift build -c release --show-bin-path)/phatgoose}"
out="${2:-$(mktemp -d)}"
mkdir -p "$out"
browser="$(command -v chromium || command -v chromium-browser || true)"
if [ -z "$browser" ]; then
  echo "check-report: chromium is required (apt-get install chromium)" >&2
  exit 1
fi
"$bin" profile --duration "${PHATGOOSE_PROFILE_SECONDS:-5}" --warmup 1 --out "$out/profile" --progress plain >"$out/profile.txt"
tail -6 "$out/profile.txt"
python3 scripts/check_profile.py html "$out/profile/report.html"
python3 scripts/check_profile.py trace "$out/profile/trace.json"
width=1280 height=6000
# --no-sandbox: CI runs as root; a temporary profile directory keeps runs independent.
timeout 120 "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$out/chromium" \
  --window-size="$width,$height" --screenshot="$out/report.png" "file://$(cd "$out/profile" && pwd)/report.html" \
  >"$out/chromium.log" 2>&1 || { cat "$out/chromium.log" >&2; exit 1; }
python3 scripts/check_profile.py png "$out/report.png" "$width" "$height"
# --compare reads the summary back.
"$bin" profile --compare "$out/profile" "$out/profile/summary.json" | sed -n '1,6p'
echo "check-report: ok ($out)"
