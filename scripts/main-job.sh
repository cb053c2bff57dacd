#!/usr/bin/env bash
# Sets up a fresh machine and runs the main job on the built-in default: a synthetic T5-base-shaped library of
# 8 experts (generated once, cached), packed, inspected, and applied to matching activations.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="/opt/swift/usr/bin:$PATH"
swift build -c release --product phatgoose
bin="$(swift build -c release --show-bin-path)/phatgoose"
cache="${PHATGOOSE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/phatgoose}/default-t5-base"
if [ ! -f "$cache/library.phatpack" ]; then
  rm -rf "$cache.tmp" && mkdir -p "$cache.tmp"
  "$bin" synth --out "$cache.tmp/library" --shape t5-base --experts 8 --seed 7 \
    --activations "$cache.tmp/activations.safetensors" --tokens 128 --sequence-length 32
  "$bin" pack "$cache.tmp/library" --out "$cache.tmp/library.phatpack"
  rm -rf "$cache" && mv "$cache.tmp" "$cache"
fi
"$bin" inspect "$cache/library.phatpack" | sed -n '1,6p'
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$bin" apply --library "$cache/library.phatpack" --input "$cache/activations.safetensors" --output "$out/deltas.safetensors"
"$bin" inspect "$out/deltas.safetensors" | sed -n '1,4p'
echo "main job: applied $( "$bin" inspect "$cache/activations.safetensors" --format json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["tensors"]))') routed layers to 128 tokens"
