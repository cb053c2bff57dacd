#!/usr/bin/env bash
# Sets up a fresh machine and runs the main job: `phatgoose loadtest` on the built-in default, a synthetic
# T5-base-shaped library of 16 experts (generated once, cached in $PHATGOOSE_CACHE or ~/.cache/phatgoose), driven
# by 4 clients with model-shaped requests for 3 s of warm-up and 20 s of measurement; prints the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="/opt/swift/usr/bin:$PATH"
swift build -c release --product phatgoose
bin="$(swift build -c release --show-bin-path)/phatgoose"
"$bin" loadtest
