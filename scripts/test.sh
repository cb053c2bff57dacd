#!/usr/bin/env bash
# Sets up a fresh machine and runs the test suite (Swift Testing). The README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="/opt/swift/usr/bin:$PATH"
swift build --build-tests
swift test --skip-build
